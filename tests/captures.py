"""C Ouroboros 0.23 captures (tests/fixtures/interop-0.23) as fixtures: the data packets of each pcap,
and the field values the independent decodes beside them (*.txt) annotate.

Only data packets come out: udp4 datagrams with a non-zero eid, eth-dix frames with a non-zero eid.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Iterator
from pathlib import Path

DIR = Path(__file__).parent / "fixtures" / "interop-0.23"
PCAP_HEADER = struct.Struct("<IHHiIII")
RECORD = struct.Struct("<IIII")
ETH = struct.Struct("!6s6sH")
ETH_DIX = 0xA000
UDP_PORT = 3435


@dataclasses.dataclass(frozen=True)
class DataPacket:
    no: int  # the packet's number in the capture, from 1 (as the decodes number them)
    t: float
    src: str  # IPv4 address or MAC
    dst: str
    eid: int
    sdu: bytes


def data_packets(name: str) -> Iterator[DataPacket]:
    raw = (DIR / f"{name}.pcap").read_bytes()
    magic, _, _, _, _, _, linktype = PCAP_HEADER.unpack_from(raw)
    assert magic == 0xA1B2C3D4 and linktype == 1, "little-endian Ethernet pcap expected"
    off, no, t0 = PCAP_HEADER.size, 0, None
    while off < len(raw):
        sec, usec, caplen, _ = RECORD.unpack_from(raw, off)
        frame = raw[off + RECORD.size : off + RECORD.size + caplen]
        off += RECORD.size + caplen
        no += 1
        t = sec + usec / 1e6
        t0 = t if t0 is None else t0
        packet = _data(no, t - t0, frame)
        if packet is not None:
            yield packet


def _data(no: int, t: float, frame: bytes) -> DataPacket | None:
    dst, src, ethertype = ETH.unpack_from(frame)
    body = frame[ETH.size :]
    if ethertype == ETH_DIX:
        eid, length = struct.unpack_from("!HH", body)
        return DataPacket(no, t, src.hex(":"), dst.hex(":"), eid, body[4 : 4 + length]) if eid else None
    if ethertype != 0x0800 or body[9] != 17:  # IPv4, UDP
        return None
    ihl = (body[0] & 0x0F) * 4
    sport, dport, ulen = struct.unpack_from("!HHH", body, ihl)
    if UDP_PORT not in (sport, dport):
        return None
    payload = body[ihl + 8 : ihl + ulen]
    (eid,) = struct.unpack_from("!I", payload)
    ips = ".".join(map(str, body[12:16])), ".".join(map(str, body[16:20]))
    return DataPacket(no, t, ips[0], ips[1], eid, payload[4:]) if eid else None


_FIELD = re.compile(r"FRCT (flags|rwe|seqno|ackno)\s+= 0x([0-9a-f]+)")


def annotated_pcis(name: str) -> dict[int, dict[str, int]]:
    """{packet number: {flags, rwe, seqno, ackno}} as the decode of `name` annotates its FRCT PCIs."""
    out: dict[int, dict[str, int]] = {}
    no = 0
    for line in (DIR / f"{name}.txt").read_text().splitlines():
        if m := re.match(r"#(\d+)\s", line):
            no = int(m.group(1))
        elif m := _FIELD.search(line):
            out.setdefault(no, {})[m.group(1)] = int(m.group(2), 16)
    return out
