"""The eth suite's baseline: SDUs in raw Ethernet frames on a plain AF_PACKET socket.

A frame is dst MAC, src MAC, EtherType, a 2-byte SDU length (short frames are padded), the SDU.
"""

from __future__ import annotations

import socket
import struct

from bench.session import RECV_BUF

ETHERTYPE = 0x88B5  # IEEE 802 local experimental: never one of the layers' own
HEADER = struct.Struct("!6s6sHH")


class PacketLink:
    """Send and receive SDUs to one peer MAC over a bound AF_PACKET SOCK_RAW socket."""

    def __init__(self, sock: socket.socket, local_mac: bytes, peer_mac: bytes) -> None:
        self.sock = sock
        self._prefix = HEADER.pack(peer_mac, local_mac, ETHERTYPE, 0)[:-2]

    def send(self, sdu: bytes) -> int:
        return self.sock.send(self._prefix + len(sdu).to_bytes(2, "big") + sdu)

    def recv(self) -> bytes:
        while True:
            frame = self.sock.recv(RECV_BUF)
            if len(frame) < HEADER.size:
                continue
            _, _, kind, size = HEADER.unpack_from(frame)
            if kind == ETHERTYPE:
                return frame[HEADER.size : HEADER.size + size]

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
