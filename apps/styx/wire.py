"""The 9P2000 wire format, defined once: messages, qids and stat records.

Exactly as Plan 9's intro(5) and plan9port's fcall.h: little-endian integers,
strings as len[2] + UTF-8, every message size[4] type[1] tag[2] body.
"""

from __future__ import annotations

import struct
from dataclasses import field
from typing import Any, ClassVar

from transports.records import FrozenRecord, Record, frozen_record, record

VERSION9P = "9P2000"
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
MAXWELEM = 16
IOHDRSZ = 24  # size[4] type[1] tag[2] fid[4] offset[8] count[4]: what a Twrite adds to its data
QIDSZ = 13
STATFIXLEN = 49  # a stat record with four empty strings, its own size[2] included
HEADER = 7  # size[4] type[1] tag[2]
MSIZE_MIN = 256  # smaller than this cannot carry a useful Rread/Twrite
MSIZE_SDU = 65535  # the largest message that travels as one SDU: the most a flow's SDU carries
# On a reliable flow a longer message goes in SDUs of PIECE bytes, each one FRCT PDU of a local
# layer (65,535 bytes, 12 of them FRCT's header): see transport.py.
PIECE = 65_000
MSIZE_DEFAULT = 4 * PIECE  # what clients ask for and servers allow: a message is four whole PDUs
MSIZE_MAX = 16 << 20  # the most a server may be told to allow (each connection may buffer one)

# Message types (fcall.h).
TVERSION, RVERSION = 100, 101
TAUTH, RAUTH = 102, 103
TATTACH, RATTACH = 104, 105
TERROR, RERROR = 106, 107  # Terror is illegal
TFLUSH, RFLUSH = 108, 109
TWALK, RWALK = 110, 111
TOPEN, ROPEN = 112, 113
TCREATE, RCREATE = 114, 115
TREAD, RREAD = 116, 117
TWRITE, RWRITE = 118, 119
TCLUNK, RCLUNK = 120, 121
TREMOVE, RREMOVE = 122, 123
TSTAT, RSTAT = 124, 125
TWSTAT, RWSTAT = 126, 127

# Qid types.
QTDIR, QTAPPEND, QTEXCL, QTMOUNT, QTAUTH, QTTMP, QTFILE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x00
# Mode bits in stat records and Tcreate perm.
DMDIR = 0x80000000
DMAPPEND = 0x40000000
DMEXCL = 0x20000000
DMMOUNT = 0x10000000
DMAUTH = 0x08000000
DMTMP = 0x04000000
DMREAD, DMWRITE, DMEXEC = 0x4, 0x2, 0x1
# Open modes.
OREAD, OWRITE, ORDWR, OEXEC = 0, 1, 2, 3
OTRUNC, OCEXEC, ORCLOSE = 0x10, 0x20, 0x40


class DecodeError(ValueError):
    """Bytes that are not a well-formed 9P2000 message or stat record."""


@frozen_record
class Qid(FrozenRecord):
    """A file as the server knows it: its type bits, its version, and a path unique in its tree."""

    type: int = QTFILE
    vers: int = 0
    path: int = 0


@record
class Stat(Record):
    """A directory entry (stat(5)); in Twstat, ~0 and "" mean "don't touch"."""

    type: int = 0
    dev: int = 0
    qid: Qid = field(default_factory=Qid)
    mode: int = 0
    atime: int = 0
    mtime: int = 0
    length: int = 0
    name: str = ""
    uid: str = ""
    gid: str = ""
    muid: str = ""

    @staticmethod
    def dont_touch() -> Stat:
        """The Twstat record that changes nothing."""
        return Stat(
            0xFFFF,
            0xFFFFFFFF,
            Qid(0xFF, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
            0xFFFFFFFF,
            0xFFFFFFFF,
            0xFFFFFFFF,
            0xFFFFFFFFFFFFFFFF,
        )

    def encode(self) -> bytes:
        body = b"".join([
            struct.pack("<HI", self.type, self.dev), _qid(self.qid),
            struct.pack("<IIIQ", self.mode, self.atime, self.mtime, self.length),
            _str(self.name), _str(self.uid), _str(self.gid), _str(self.muid),
        ])  # fmt: skip
        if len(body) > 0xFFFF:
            raise ValueError("stat record longer than 65535 bytes")
        return struct.pack("<H", len(body)) + body

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Stat:
        """Exactly one stat record, its size[2] included."""
        r = _Reader(data)
        st = r.stat()
        r.done()
        return st


# -- messages ---------------------------------------------------------------------
# Each message lists its body fields as (name, kind); kinds: 1 2 4 8 (integers),
# s (string), qid, data (count[4] bytes), stat (n[2] stat record), wname, wqid.


@record
class Msg(Record):
    """A 9P message: its tag, and the body fields FIELDS lists in their order on the wire."""

    TYPE: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    tag: int


@record
class Tversion(Msg):
    """version(5): the largest message the client takes, and the protocol it speaks; a new session."""

    TYPE: ClassVar[int] = TVERSION
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("msize", "4"), ("version", "s"))
    msize: int = 8192
    version: str = VERSION9P


@record
class Rversion(Msg):
    """The msize both ends keep to, and the version the server speaks ("unknown" if none)."""

    TYPE: ClassVar[int] = RVERSION
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("msize", "4"), ("version", "s"))
    msize: int = 8192
    version: str = VERSION9P


@record
class Tauth(Msg):
    """attach(5): afid, a file to run the authentication protocol on, for uname to reach aname."""

    TYPE: ClassVar[int] = TAUTH
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("afid", "4"), ("uname", "s"), ("aname", "s"))
    afid: int = NOFID
    uname: str = ""
    aname: str = ""


@record
class Rauth(Msg):
    """The authentication file's qid."""

    TYPE: ClassVar[int] = RAUTH
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("aqid", "qid"),)
    aqid: Qid = field(default_factory=Qid)


@record
class Tattach(Msg):
    """attach(5): fid becomes the root of aname's tree for uname (authenticated on afid, or NOFID)."""

    TYPE: ClassVar[int] = TATTACH
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("afid", "4"), ("uname", "s"), ("aname", "s"))
    fid: int = 0
    afid: int = NOFID
    uname: str = ""
    aname: str = ""


@record
class Rattach(Msg):
    """The root's qid."""

    TYPE: ClassVar[int] = RATTACH
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("qid", "qid"),)
    qid: Qid = field(default_factory=Qid)


@record
class Rerror(Msg):
    """error(5): the request failed; ename says why."""

    TYPE: ClassVar[int] = RERROR
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("ename", "s"),)
    ename: str = ""


@record
class Tflush(Msg):
    """flush(5): abort the request tagged oldtag."""

    TYPE: ClassVar[int] = TFLUSH
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("oldtag", "2"),)
    oldtag: int = 0


@record
class Rflush(Msg):
    """oldtag is answered or abandoned: its tag may be used again."""

    TYPE: ClassVar[int] = RFLUSH


@record
class Twalk(Msg):
    """walk(5): newfid is fid walked through the names wname (at most MAXWELEM of them)."""

    TYPE: ClassVar[int] = TWALK
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("newfid", "4"), ("wname", "wname"))
    fid: int = 0
    newfid: int = 0
    wname: list[str] = field(default_factory=list)


@record
class Rwalk(Msg):
    """The qids of the names walked: fewer than asked when the walk stopped short."""

    TYPE: ClassVar[int] = RWALK
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("wqid", "wqid"),)
    wqid: list[Qid] = field(default_factory=list)


@record
class Topen(Msg):
    """open(5): open fid's file for mode (OREAD ... ORDWR, OEXEC, with OTRUNC, ORCLOSE)."""

    TYPE: ClassVar[int] = TOPEN
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("mode", "1"))
    fid: int = 0
    mode: int = OREAD


@record
class Ropen(Msg):
    """The file's qid, and iounit: the most a read or write moves in one message (0: as msize allows)."""

    TYPE: ClassVar[int] = ROPEN
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("qid", "qid"), ("iounit", "4"))
    qid: Qid = field(default_factory=Qid)
    iounit: int = 0


@record
class Tcreate(Msg):
    """open(5): make name in fid's directory with perm, open it for mode; fid becomes the new file."""

    TYPE: ClassVar[int] = TCREATE
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("name", "s"), ("perm", "4"), ("mode", "1"))
    fid: int = 0
    name: str = ""
    perm: int = 0
    mode: int = OREAD


@record
class Rcreate(Msg):
    """As Ropen, for the file made."""

    TYPE: ClassVar[int] = RCREATE
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("qid", "qid"), ("iounit", "4"))
    qid: Qid = field(default_factory=Qid)
    iounit: int = 0


@record
class Tread(Msg):
    """read(5): count bytes of fid's file from offset."""

    TYPE: ClassVar[int] = TREAD
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("offset", "8"), ("count", "4"))
    fid: int = 0
    offset: int = 0
    count: int = 0


@record
class Rread(Msg):
    """The bytes read: fewer than asked at the end of the file."""

    TYPE: ClassVar[int] = RREAD
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("data", "data"),)
    data: bytes | memoryview = b""  # decoded: a view of the message it came in (no copy)


@record
class Twrite(Msg):
    """read(5): write data to fid's file at offset."""

    TYPE: ClassVar[int] = TWRITE
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("offset", "8"), ("data", "data"))
    fid: int = 0
    offset: int = 0
    data: bytes | memoryview = b""  # as Rread's


@record
class Rwrite(Msg):
    """How many bytes were written."""

    TYPE: ClassVar[int] = RWRITE
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("count", "4"),)
    count: int = 0


@record
class Tclunk(Msg):
    """clunk(5): fid is no longer needed."""

    TYPE: ClassVar[int] = TCLUNK
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"),)
    fid: int = 0


@record
class Rclunk(Msg):
    """fid is forgotten."""

    TYPE: ClassVar[int] = RCLUNK


@record
class Tremove(Msg):
    """remove(5): remove fid's file; fid is forgotten, whether the file could be removed or not."""

    TYPE: ClassVar[int] = TREMOVE
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"),)
    fid: int = 0


@record
class Rremove(Msg):
    """The file is removed."""

    TYPE: ClassVar[int] = RREMOVE


@record
class Tstat(Msg):
    """stat(5): the stat record of fid's file."""

    TYPE: ClassVar[int] = TSTAT
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"),)
    fid: int = 0


@record
class Rstat(Msg):
    """The stat record."""

    TYPE: ClassVar[int] = RSTAT
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("stat", "stat"),)
    stat: Stat = field(default_factory=Stat)


@record
class Twstat(Msg):
    """stat(5): change fid's file as the record says (~0 and "" leave a field as it is)."""

    TYPE: ClassVar[int] = TWSTAT
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = (("fid", "4"), ("stat", "stat"))
    fid: int = 0
    stat: Stat = field(default_factory=Stat)


@record
class Rwstat(Msg):
    """The changes are made."""

    TYPE: ClassVar[int] = RWSTAT


MESSAGES: dict[int, type[Msg]] = {cls.TYPE: cls for cls in (
    Tversion, Rversion, Tauth, Rauth, Tattach, Rattach, Rerror, Tflush, Rflush, Twalk, Rwalk,
    Topen, Ropen, Tcreate, Rcreate, Tread, Rread, Twrite, Rwrite, Tclunk, Rclunk, Tremove,
    Rremove, Tstat, Rstat, Twstat, Rwstat,
)}  # fmt: skip

_INT = {"1": "<B", "2": "<H", "4": "<I", "8": "<Q"}


def _str(s: str) -> bytes:
    b = s.encode()
    if len(b) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("<H", len(b)) + b


def _qid(q: Qid) -> bytes:
    return struct.pack("<BIQ", q.type, q.vers, q.path)


def encode(msg: Msg) -> bytes:
    """One whole message, size[4] included; a data field is copied once, into the message."""
    parts: list[bytes | memoryview] = [b""]
    for name, kind in msg.FIELDS:
        v: Any = getattr(msg, name)
        if kind in _INT:
            parts.append(struct.pack(_INT[kind], v))
        elif kind == "s":
            parts.append(_str(v))
        elif kind == "qid":
            parts.append(_qid(v))
        elif kind == "data":
            parts += (struct.pack("<I", len(v)), v)
        elif kind == "stat":
            st = v.encode()
            parts.append(struct.pack("<H", len(st)) + st)
        elif kind == "wname":
            if len(v) > MAXWELEM:
                raise ValueError(f"walk of {len(v)} names: at most {MAXWELEM}")
            parts.append(struct.pack("<H", len(v)) + b"".join(_str(s) for s in v))
        elif kind == "wqid":
            if len(v) > MAXWELEM:
                raise ValueError(f"walk reply of {len(v)} qids: at most {MAXWELEM}")
            parts.append(struct.pack("<H", len(v)) + b"".join(_qid(q) for q in v))
    parts[0] = struct.pack("<IBH", HEADER + sum(len(p) for p in parts), msg.TYPE, msg.tag)
    return b"".join(parts)


def message_size(header: bytes) -> int:
    """The size[4] a message starts with (for splitting byte streams)."""
    return int(struct.unpack_from("<I", header)[0])


def decode(data: bytes | memoryview, msize: int = MSIZE_MAX) -> Msg:
    """One whole message; raises DecodeError for anything malformed or longer than msize."""
    if len(data) < HEADER:
        raise DecodeError(f"message of {len(data)} bytes: shorter than the 7-byte header")
    size, mtype, tag = struct.unpack_from("<IBH", data)
    if size != len(data):
        raise DecodeError(f"size field says {size} bytes, the message has {len(data)}")
    if size > msize:
        raise DecodeError(f"message of {size} bytes exceeds msize {msize}")
    cls = MESSAGES.get(mtype)
    if cls is None:
        raise DecodeError(f"unknown message type {mtype}")
    r = _Reader(data, HEADER)
    values: dict[str, Any] = {}
    for name, kind in cls.FIELDS:
        values[name] = r.field(kind)
    r.done()
    return cls(tag, **values)


def peek_tag(data: bytes | memoryview) -> int | None:
    """The tag of a message too broken to decode, so its Rerror can still be addressed."""
    if len(data) < HEADER:
        return None
    return int(struct.unpack_from("<H", data, 5)[0])


class _Reader:
    """Bounded reads from one buffer; every overrun is a DecodeError."""

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise DecodeError(f"truncated: wanted {n} bytes at offset {self.pos} of {len(self.data)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        return int(struct.unpack(fmt, self.take(n))[0])

    def string(self) -> str:
        raw = self.take(self.uint("<H"))
        try:
            return bytes(raw).decode()
        except UnicodeDecodeError:
            raise DecodeError("string is not valid UTF-8") from None

    def qid(self) -> Qid:
        t, v, p = struct.unpack("<BIQ", self.take(QIDSZ))
        return Qid(t, v, p)

    def stat(self) -> Stat:
        size = self.uint("<H")
        end = self.pos + size
        if size < STATFIXLEN - 2 or end > len(self.data):
            raise DecodeError(f"stat record of {size} bytes does not fit")
        typ, dev = struct.unpack("<HI", self.take(6))
        qid = self.qid()
        mode, atime, mtime, length = struct.unpack("<IIIQ", self.take(20))
        st = Stat(typ, dev, qid, mode, atime, mtime, length, self.string(), self.string(), self.string(), self.string())
        if self.pos != end:
            raise DecodeError("stat record size does not match its contents")
        return st

    def field(self, kind: str) -> Any:
        if kind in _INT:
            return self.uint(_INT[kind])
        if kind == "s":
            return self.string()
        if kind == "qid":
            return self.qid()
        if kind == "data":
            return self.take(self.uint("<I"))  # a view of the message: bulk data is not copied
        if kind == "stat":
            n = self.uint("<H")
            sub = _Reader(self.take(n))
            st = sub.stat()
            sub.done()
            return st
        n = self.uint("<H")
        if n > MAXWELEM:
            raise DecodeError(f"{n} walk elements: at most {MAXWELEM}")
        if kind == "wname":
            return [self.string() for _ in range(n)]
        return [self.qid() for _ in range(n)]

    def done(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{len(self.data) - self.pos} bytes left over")


def stats_encode(stats: list[Stat]) -> bytes:
    return b"".join(s.encode() for s in stats)


def stats_decode(data: bytes | bytearray | memoryview) -> list[Stat]:
    """The concatenated stat records a directory read returns."""
    r = _Reader(data)
    out = []
    while r.pos < len(data):
        out.append(r.stat())
    return out
