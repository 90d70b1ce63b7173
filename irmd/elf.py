"""What an ELF program tells the dynamic loader before it runs: its interpreter (PT_INTERP) and the
library paths and names of its dynamic section, read with every size, offset and count bounded."""

from __future__ import annotations

import dataclasses
import os
import struct

from irmd.identity import open_regular

MAGIC = b"\x7fELF"
PHDRS_MAX = 65536  # bytes of program headers, the kernel's own bound
INTERP_MAX = 4096  # PATH_MAX: the kernel refuses a longer PT_INTERP
DYNAMIC_MAX = 256 * 1024  # bytes of dynamic section (a real one holds tens of entries)
STRING_MAX = 64 * 1024  # bytes of one string of it
STRINGS_MAX = 1024 * 1024  # bytes of all the strings read
PN_XNUM = 0xFFFF  # e_phnum saying the count is elsewhere (section 0): not in an executable
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29
DT_AUDIT, DT_DEPAUDIT = 0x6FFFFEFC, 0x6FFFFEFB
STRING_TAGS = (DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_AUDIT, DT_DEPAUDIT)
# By class (1 32-bit, 2 64-bit): the ELF header after e_ident, a program header, a dynamic entry, and
# where a program header holds p_type, p_offset, p_vaddr and p_filesz (p_flags moved in 64-bit)
LAYOUTS = {
    1: ("16xHHIIIIIHHH", "IIIIIIII", "iI", (0, 1, 2, 4)),
    2: ("16xHHIQQQIHHH", "IIQQQQQQ", "qQ", (0, 2, 3, 5)),
}


class ElfError(ValueError):
    """A file with the ELF magic that is no ELF file the reader can take whole."""


@dataclasses.dataclass(frozen=True)
class Elf:
    """What an ELF file asks of the loader, its strings decoded as file names (os.fsdecode)."""

    interp: str | None = None  # PT_INTERP: the loader the kernel runs for it; None: none (static)
    rpath: tuple[str, ...] = ()  # each DT_RPATH: directories separated by ':'
    runpath: tuple[str, ...] = ()  # each DT_RUNPATH: the same
    needed: tuple[str, ...] = ()  # DT_NEEDED: a library's name, or its path when it holds a '/'
    audit: tuple[str, ...] = ()  # DT_AUDIT and DT_DEPAUDIT: audit libraries separated by ':'


def read(path: str) -> Elf | None:
    """What the ELF file at `path` asks of the loader; None for a file without the ELF magic.
    OSError if it cannot be read (or is no regular file), ElfError if it is malformed."""
    fd, st = open_regular(path)
    try:
        return _Reader(fd, st.st_size).read()
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class _Segment:
    kind: int
    offset: int
    vaddr: int
    filesz: int


class _Reader:
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size, self.strings = fd, size, 0

    def bytes(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ElfError(f"{length} bytes at {offset} for its {what}: past the end of the file ({self.size} bytes)")
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise ElfError(f"its {what} was cut short (the file shrank)")
        return data

    def read(self) -> Elf | None:
        ident = os.pread(self.fd, 16, 0)
        if not ident.startswith(MAGIC):
            return None
        if len(ident) < 16 or ident[4] not in LAYOUTS or ident[5] not in (1, 2):
            raise ElfError("its ELF identification is cut short or names no known class and byte order")
        order = "<" if ident[5] == 1 else ">"
        header, phdr, dyn, fields_at = LAYOUTS[ident[4]]
        header, phdr, dyn = order + header, order + phdr, order + dyn
        fields = struct.unpack(header, self.bytes(0, struct.calcsize(header), "ELF header"))
        phoff, phentsize, phnum = fields[4], fields[8], fields[9]
        if phnum == PN_XNUM or (phnum and phentsize != struct.calcsize(phdr)):
            raise ElfError(f"its program headers are not ELF's ({phnum} of {phentsize} bytes)")
        if phnum * phentsize > PHDRS_MAX:
            raise ElfError(f"{phnum} program headers: more than {PHDRS_MAX} bytes")
        raw = self.bytes(phoff, phnum * phentsize, "program headers")
        segments = [_Segment(*(entry[i] for i in fields_at)) for entry in struct.iter_unpack(phdr, raw)]
        interps = [s for s in segments if s.kind == PT_INTERP]
        dynamics = [s for s in segments if s.kind == PT_DYNAMIC]
        if len(interps) > 1 or len(dynamics) > 1:
            raise ElfError("more than one PT_INTERP or PT_DYNAMIC")
        interp = self.interp(interps[0]) if interps else None
        if not dynamics:
            return Elf(interp)
        return self.dynamic(interp, dynamics[0], dyn, [s for s in segments if s.kind == PT_LOAD])

    def interp(self, seg: _Segment) -> str:
        if not 2 <= seg.filesz <= INTERP_MAX:
            raise ElfError(f"its PT_INTERP is {seg.filesz} bytes, not 2 to {INTERP_MAX}")
        raw = self.bytes(seg.offset, seg.filesz, "PT_INTERP")
        name = raw.split(b"\0", 1)[0]
        if raw[-1] != 0 or not name:  # as the kernel: the path ends in NUL
            raise ElfError("its PT_INTERP is empty or does not end in NUL")
        return os.fsdecode(name)

    def dynamic(self, interp: str | None, seg: _Segment, dyn: str, loads: list[_Segment]) -> Elf:
        if seg.filesz > DYNAMIC_MAX:
            raise ElfError(f"its dynamic section is {seg.filesz} bytes, more than {DYNAMIC_MAX}")
        raw = self.bytes(seg.offset, seg.filesz, "dynamic section")
        raw = raw[: len(raw) - len(raw) % struct.calcsize(dyn)]
        wanted: list[tuple[int, int]] = []
        tables: dict[int, list[int]] = {DT_STRTAB: [], DT_STRSZ: []}
        for tag, value in struct.iter_unpack(dyn, raw):
            if tag == DT_NULL:
                break
            if tag in tables:
                tables[tag].append(value)
            elif tag in STRING_TAGS:
                wanted.append((tag, value))
        if not wanted:
            return Elf(interp)
        if len(tables[DT_STRTAB]) != 1 or len(tables[DT_STRSZ]) != 1:
            raise ElfError("its dynamic section has strings but not one DT_STRTAB and one DT_STRSZ")
        table, size = self.table(tables[DT_STRTAB][0], tables[DT_STRSZ][0], loads)
        found: dict[int, list[str]] = {tag: [] for tag in STRING_TAGS}
        for tag, value in wanted:
            if value >= size:
                raise ElfError(f"a string at {value} of its dynamic section is past its string table ({size} bytes)")
            found[tag].append(self.string(table + value, min(size - value, STRING_MAX)))
        return Elf(interp, tuple(found[DT_RPATH]), tuple(found[DT_RUNPATH]), tuple(found[DT_NEEDED]),
                   tuple(found[DT_AUDIT] + found[DT_DEPAUDIT]))  # fmt: skip

    def table(self, address: int, size: int, loads: list[_Segment]) -> tuple[int, int]:
        """The file offset of the string table at `address` (as the loader maps it), and its size."""
        for s in loads:
            if s.vaddr <= address and address + size <= s.vaddr + s.filesz:
                return s.offset + address - s.vaddr, size
        raise ElfError(f"its string table ({size} bytes at address {address:#x}) is in none of its segments")

    def string(self, offset: int, limit: int) -> str:
        data = b""
        for length in (512, limit) if limit > 512 else (limit,):  # a short string first: most are
            self.strings += length
            if self.strings > STRINGS_MAX:
                raise ElfError(f"the strings of its dynamic section are more than {STRINGS_MAX} bytes")
            data = self.bytes(offset, length, "string table")
            if b"\0" in data:
                return os.fsdecode(data.split(b"\0", 1)[0])
        raise ElfError(f"a string of its dynamic section has no end within {len(data)} bytes")
