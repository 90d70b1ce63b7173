"""The CRC32 trailer of flows asking qos ber 0, as C Ouroboros 0.23 puts it on the wire:
IEEE 802.3 CRC-32 (zlib's) over everything before it, stored big-endian.
"""

from __future__ import annotations

import struct
import zlib

TRAILER = struct.Struct("!I")
CRCLEN = TRAILER.size


def add(packet: bytes) -> bytes:
    return packet + TRAILER.pack(zlib.crc32(packet))


def strip(packet: bytes) -> bytes | None:
    """The packet without its trailer, or None if the trailer does not match (or is missing)."""
    if len(packet) < CRCLEN:
        return None
    body = packet[:-CRCLEN]
    if TRAILER.unpack_from(packet, len(body))[0] != zlib.crc32(body):
        return None
    return body
