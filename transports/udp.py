"""UDP sockets for the udp shims: bind with big buffers, find the subnet's broadcast address.

Pure socket plumbing; the udp IPCP's logic lives in ipcp/udp.py and ipcp/shim.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Hashable

RCVBUF = 8 * 1024 * 1024
SIOCGIFADDR = 0x8915
SIOCGIFBRDADDR = 0x8919
SIOCGIFNETMASK = 0x891B
EID = struct.Struct("!I")  # every udp-shim datagram starts with the receiver's endpoint id
MAX_DATAGRAM = 8980  # eid included: what an Ouroboros 0.23 udp IPCP reads at most (IPCP_UDP_MAX_PACKET_SIZE)


def open_udp(ip: str, port: int, reuse: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    # The default 208 KiB buffer loses datagrams at full rate even on loopback.
    for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if opt is not None and (opt == socket.SO_RCVBUF or os.geteuid() == 0):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF if opt == socket.SO_RCVBUF else opt, RCVBUF)
                break
    sock.bind((ip, port))
    sock.setblocking(False)
    return sock


def broadcast_address(ip: str) -> str | None:
    """The IPv4 broadcast address of the interface holding `ip`, if it has one."""
    if ipaddress.ip_address(ip).version != 4 or ipaddress.ip_address(ip).is_loopback:
        return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for _, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                addr = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFADDR, req)[20:24])
                if addr == ip:
                    bcast = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFBRDADDR, req)[20:24])
                    if bcast != "0.0.0.0":
                        return bcast
                    # Added without "brd +" (iproute2's default): derive it from the netmask.
                    mask = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFNETMASK, req)[20:24])
                    return str(ipaddress.ip_network(f"{ip}/{mask}", strict=False).broadcast_address)
            except OSError:
                continue
    finally:
        probe.close()
    return None


def lookup(name: str, version: int) -> str | None:
    """The first address getaddrinfo gives `name` (/etc/hosts, then DNS), as Ouroboros's udp layer asks."""
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    try:
        infos = socket.getaddrinfo(name, None, family)
    except (OSError, UnicodeError):
        return None
    return next((str(info[4][0]) for info in infos if info[0] == family), None)


def encode_addr(addr: Hashable) -> bytes:
    ip, port = addr[:2]  # type: ignore[index]
    packed = ipaddress.ip_address(ip).packed
    return bytes([len(packed)]) + packed + struct.pack("!H", port)


def decode_addrs(data: bytes) -> list[Hashable]:
    """Addresses from a MEMBERS list; malformed entries end the list."""
    out: list[Hashable] = []
    i = 0
    while i < len(data):
        n = data[i]
        if n not in (4, 16) or i + 1 + n + 2 > len(data):
            break
        addr = ipaddress.ip_address(data[i + 1 : i + 1 + n])
        (port,) = struct.unpack_from("!H", data, i + 1 + n)
        i += 1 + n + 2
        if port and not (addr.is_multicast or addr.is_unspecified):
            out.append((str(addr), port))
    return out


class UdpFraming:
    """eid (u32) then the SDU; a peer is its (ip, port)."""

    needs_src = True

    @staticmethod
    def parse(frame: bytes, src: tuple[str, int]) -> tuple[int, memoryview, Hashable] | None:
        if len(frame) < EID.size:
            return None
        return EID.unpack_from(frame)[0], memoryview(frame)[EID.size :], src[:2]

    @staticmethod
    def send(sock: socket.socket, flow: object, sdu: bytes) -> None:
        sock.sendmsg((flow.hdr, sdu), (), 0, flow.addr)  # type: ignore[attr-defined]
