"""exNodes: a file as mappings of its byte ranges onto IBP allocations (striped, replicated), in
the LoRS XML form (namespace http://loci.cs.utk.edu/exnode), and the plans that lay them out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from apps.ibp.capability import BadCapability, Capability

NS = "http://loci.cs.utk.edu/exnode"
VERSION = "3.0"
# LoRS writes its library version as exNode metadata (a double) and warns when reading a file
# without it ("Pre-Version exNode file"); 0.82 is LoRS 0.82's, the release whose format this is.
LORS_VERSION = "0.820000"
MAX_XML = 16 * 1024 * 1024  # bytes of exNode we agree to parse
MAX_MAPPINGS = 100_000
MAX_DEPTH = 64  # elements nested in an exNode at most (LoRS nests a few functions): ET.tostring recurses per level
_INT_FIELDS = ("exnode_offset", "logical_length", "alloc_offset", "alloc_length")


class BadExnode(ValueError):
    """An exNode file we cannot use."""


@dataclass(frozen=True)
class Mapping:
    """Bytes [exnode_offset, +logical_length) of the file are at alloc_offset in one allocation."""

    exnode_offset: int
    logical_length: int
    alloc_offset: int
    alloc_length: int
    read: str
    write: str = ""
    manage: str = ""
    sha256: str = ""  # of the mapped bytes; our metadata, so downloads can verify
    expires: int = 0  # when the allocation ends (epoch s, 0: unknown); ours, kept by upload and refresh
    # LoRS's end-to-end conditioning (checksums, compression, encryption) of the mapped bytes: its
    # <exnode:function> element as it came, kept so that a rewritten exNode still says how to read
    # them, and its e2e_blocksize. The bytes in the allocation are not the file's.
    function: str = ""
    e2e_blocksize: int = 0

    @property
    def depot(self) -> str:
        return Capability.parse(self.read).depot

    @property
    def end(self) -> int:
        return self.exnode_offset + self.logical_length

    @property
    def conditioning(self) -> str:
        """The names of LoRS's conditioning functions on this mapping ('' when none), outermost first."""
        if not self.function:
            return ""
        return ", ".join(f.get("name", "?") for f in ET.fromstring(self.function).iter(_q("function")))


def conditioned(mappings: list[Mapping]) -> None:
    """BadExnode if one of these mappings holds bytes LoRS conditioned end to end (not done here)."""
    for m in mappings:
        if m.function:
            raise BadExnode(
                f"bytes {m.exnode_offset}..{m.end} are conditioned end to end by LoRS ({m.conditioning}):"
                " not implemented here"
            )


@dataclass
class ExNode:
    filename: str
    size: int
    sha256: str = ""
    mappings: list[Mapping] = field(default_factory=list)

    def blocks(self) -> list[tuple[int, int, list[Mapping]]]:
        """(offset, length, replicas) per distinct byte range, in file order."""
        ranges: dict[tuple[int, int], list[Mapping]] = {}
        for m in self.mappings:
            ranges.setdefault((m.exnode_offset, m.logical_length), []).append(m)
        return [(o, n, ms) for (o, n), ms in sorted(ranges.items())]

    def gaps(self) -> list[tuple[int, int]]:
        """Byte ranges of the file no mapping covers."""
        out, pos = [], 0
        for m in sorted(self.mappings, key=lambda m: m.exnode_offset):
            if m.exnode_offset > pos:
                out.append((pos, m.exnode_offset - pos))
            pos = max(pos, m.end)
        if pos < self.size:
            out.append((pos, self.size - pos))
        return out

    def pieces(self, offset: int = 0, length: int | None = None) -> list[tuple[list[Mapping], int, int]]:
        """What to read for the file's bytes [offset, offset + length): (replicas of a block, where
        in the block, how many bytes), in file order, each byte once. BadExnode if a byte is unmapped."""
        end = self.size if length is None else min(self.size, offset + length)
        out, pos = [], offset
        for off, n, block in self.blocks():
            if off + n <= pos or off >= end:
                continue
            if off > pos:
                break
            take = min(off + n, end) - pos
            out.append((block, pos - off, take))
            pos += take
        if pos < end:
            raise BadExnode(f"the exNode does not cover bytes {pos}..{end}")
        return out

    def replicas(self) -> list[tuple[int, int, int]]:
        """(offset, length, replica count) per block."""
        return [(o, n, len(ms)) for o, n, ms in self.blocks()]


def plan(size: int, stripe: int, depots: list[str], replicas: int) -> list[tuple[int, int, list[str]]]:
    """Blocks of `stripe` bytes, each on `replicas` distinct depots, round robin: (offset, length, depots)."""
    if stripe <= 0 or not depots or not 1 <= replicas <= len(depots):
        raise ValueError(f"need a positive stripe and 1..{len(depots)} replicas on {len(depots)} depots")
    blocks = []
    for i, off in enumerate(range(0, size, stripe)):
        blocks.append((off, min(stripe, size - off), [depots[(i + r) % len(depots)] for r in range(replicas)]))
    return blocks


def _q(tag: str) -> str:
    return f"{{{NS}}}{tag}"


def _meta(parent: ET.Element, name: str, kind: str, value: object) -> None:
    e = ET.SubElement(parent, _q("metadata"), {"name": name, "type": kind})
    e.text = str(value)


def to_xml(ex: ExNode) -> bytes:
    ET.register_namespace("exnode", NS)
    root = ET.Element("exnode", {"version": VERSION})
    _meta(root, "filename", "string", ex.filename)
    _meta(root, "lorsversion", "double", LORS_VERSION)
    _meta(root, "original_filesize", "integer", ex.size)
    if ex.sha256:
        _meta(root, "sha256", "string", ex.sha256)
    for m in ex.mappings:
        e = ET.SubElement(root, _q("mapping"))
        for name in _INT_FIELDS:
            _meta(e, name, "integer", getattr(m, name))
        _meta(e, "e2e_blocksize", "integer", m.e2e_blocksize)  # LoRS reads it; 0: no conditioning
        if m.sha256:
            _meta(e, "sha256", "string", m.sha256)
        if m.expires:
            _meta(e, "expires", "integer", m.expires)
        if m.function:
            e.append(ET.fromstring(m.function))
        for tag in ("read", "write", "manage"):
            if getattr(m, tag):
                ET.SubElement(e, _q(tag)).text = getattr(m, tag)
    ET.indent(root)
    body: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    return b'<?xml version="1.0"?>\n' + body + b"\n"


def _metas(e: ET.Element) -> dict[str, str]:
    return {m.get("name", ""): (m.text or "").strip() for m in e.findall(_q("metadata"))}


def _nonneg(meta: dict[str, str], name: str, where: str) -> int:
    text = meta.get(name)
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 18:
        raise BadExnode(f"{where}: metadata {name!r} must be a non-negative integer")
    return int(text)


def _depth(root: ET.Element) -> int:
    """How deep elements nest under `root` (itself 1), found without recursion."""
    deepest, stack = 0, [(root, 1)]
    while stack:
        el, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in el)
    return deepest


def from_xml(data: bytes) -> ExNode:
    """Parse an exNode strictly: no DTDs or entities, bounded size, every mapping checked."""
    if len(data) > MAX_XML:
        raise BadExnode(f"exNode larger than {MAX_XML} bytes")
    # Decoded here, as UTF-8 (what to_xml and LoRS write), so that the DTD check sees the text the
    # parser does: an exNode declaring UTF-16 would hide its DTD from a check on the bytes.
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadExnode("exNode is not UTF-8") from None
    lowered = text.lower()
    if "<!doctype" in lowered or "<!entity" in lowered:
        raise BadExnode("exNode with a DTD or entities refused")
    try:
        root = ET.fromstring(text)  # text: its encoding declaration is not followed
    except ET.ParseError as e:
        raise BadExnode(f"not XML: {e}") from None
    if _depth(root) > MAX_DEPTH:  # deeper, keeping a <function> (ET.tostring) raised RecursionError
        raise BadExnode(f"exNode elements nested more than {MAX_DEPTH} deep")
    if root.tag not in ("exnode", _q("exnode")):
        raise BadExnode(f"root element is {root.tag!r}, not exnode")
    if NS not in text:  # LoRS's reader too wants its namespace declared (xmlSearchNsByHref)
        raise BadExnode(f"not an exNode: no namespace {NS}")
    meta = _metas(root)
    # LoRS writes no file size: its size is where the last mapping ends. Ours says it, so that a
    # file whose tail no mapping holds is seen to be incomplete.
    sized = "original_filesize" in meta
    ex = ExNode(meta.get("filename", ""), _nonneg(meta, "original_filesize", "exnode") if sized else 0)
    ex.sha256 = meta.get("sha256", "")
    maps = root.findall(_q("mapping"))
    if len(maps) > MAX_MAPPINGS:
        raise BadExnode(f"more than {MAX_MAPPINGS} mappings")
    for i, el in enumerate(maps):
        where = f"mapping {i}"
        mm = _metas(el)
        off, length, aoff, alen = (_nonneg(mm, n, where) for n in _INT_FIELDS)
        caps = {t: (el.findtext(_q(t)) or "").strip() for t in ("read", "write", "manage")}
        try:
            for right, text in caps.items():
                if text and Capability.parse(text).right != right.upper():
                    raise BadExnode(f"{where}: the {right} capability is a {Capability.parse(text).right} one")
        except BadCapability as err:
            raise BadExnode(f"{where}: {err}") from None
        if not caps["read"]:
            raise BadExnode(f"{where}: no read capability")
        expires = _nonneg(mm, "expires", where) if "expires" in mm else 0
        e2e = _nonneg(mm, "e2e_blocksize", where) if "e2e_blocksize" in mm else 0
        fn = el.find(_q("function"))
        function = ET.tostring(fn, encoding="unicode").strip() if fn is not None else ""
        m = Mapping(
            off, length, aoff, alen, caps["read"], caps["write"], caps["manage"], mm.get("sha256", ""), expires,
            function, e2e,
        )  # fmt: skip
        if sized and m.end > ex.size:
            raise BadExnode(f"{where}: bytes {m.exnode_offset}..{m.end} fall outside the file of {ex.size}")
        if not function and m.alloc_offset + m.logical_length > m.alloc_length:  # compressed ones are shorter
            raise BadExnode(f"{where}: runs past the end of its allocation")
        ex.mappings.append(m)
    if not sized:
        ex.size = max((m.end for m in ex.mappings), default=0)
    return ex
