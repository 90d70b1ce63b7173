"""The data transfer wire, defined once: the PDU header (PCI: dst address, qos cube, ttl, ecn,
eid) and the frame that carries one or more PDUs in one N-1 SDU.

Field sizes come from the layer's config (addr 4 and eid 8 bytes by default),
so a layer's header is a struct built at enrollment; all fields big-endian.
A frame is PDUs each behind its 2-byte length: `[len][PDU][len][PDU]...` (at least one);
the DT thread packs what one burst sends to one next hop into as few frames as the N-1 flow's
MTU allows, and a keyed layer seals each frame once.
"""

from __future__ import annotations

import dataclasses
import struct

MGMT_EID = 0  # PDUs for the IPCP's own components (flow allocator, directory)
_INT = {1: "B", 2: "H", 4: "I", 8: "Q"}
LEN = struct.Struct("!H")  # each PDU's length in a frame
FRAMING = LEN.size  # what a frame adds to each PDU
MAX_PDU = (1 << 8 * LEN.size) - 1  # bytes of a PDU at most, its PCI included
MAX_FRAME_PDUS = 64  # PDUs packed into one frame at most (each is two or three iovecs of one sendmsg)


class PciError(ValueError):
    """A PDU too short for its header, or with impossible field values."""


@dataclasses.dataclass(frozen=True)
class Pci:
    dst: int
    qos: int
    ttl: int
    ecn: int
    eid: int


class PciFormat:
    """The PCI layout of one layer."""

    def __init__(self, addr_size: int = 4, eid_size: int = 8) -> None:
        if addr_size not in _INT or eid_size not in _INT:
            raise ValueError(f"addr and eid sizes must be one of {sorted(_INT)} bytes")
        self.struct = struct.Struct(f"!{_INT[addr_size]}BBB{_INT[eid_size]}")
        self.size = self.struct.size
        self.ttl_offset = addr_size + 1
        self.ecn_offset = addr_size + 2
        self.max_addr = (1 << (8 * addr_size)) - 1
        self.max_eid = (1 << (8 * eid_size)) - 1

    def pack(self, pci: Pci) -> bytes:
        return self.struct.pack(pci.dst, pci.qos, pci.ttl, pci.ecn, pci.eid)

    def unpack(self, pdu: bytes | bytearray | memoryview) -> Pci:
        if len(pdu) < self.size:
            raise PciError(f"PDU of {len(pdu)} bytes is shorter than the {self.size}-byte PCI")
        return Pci(*self.struct.unpack_from(pdu))


def frame(*pdus: bytes) -> bytes:
    """One frame carrying `pdus` (each 1 to 65,535 bytes)."""
    return b"".join(LEN.pack(len(pdu)) + pdu for pdu in pdus)


def unframe(frame: bytes | memoryview) -> tuple[list[memoryview], bool]:
    """The PDUs of a frame, and whether it was malformed (then the PDUs before the fault)."""
    view = memoryview(frame)
    end, at = len(view), 0
    pdus: list[memoryview] = []
    unpack = LEN.unpack_from
    while at < end:
        if end - at < FRAMING:
            return pdus, True
        (size,) = unpack(view, at)
        at += FRAMING
        if not size or at + size > end:
            return pdus, True
        pdus.append(view[at : at + size])
        at += size
    return pdus, not pdus
