"""Raw Ethernet for the eth shims: AF_PACKET sockets, interface MAC/MTU, the DIX and LLC frames.

The data path packs headers with struct; scapy, imported lazily, finds interfaces and
defines the frame layer.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
from collections.abc import Hashable
from pathlib import Path
from typing import Any

ETH_HLEN = 14  # dst, src, ethertype/length
ETH_P_802_2 = 0x0004  # the kernel's protocol for 802.3 frames carrying LLC
DEFAULT_ETHERTYPE = 0xA000
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772  # `lo`: Ethernet frames, an all-zero MAC, and every frame comes back to its sender
ZERO_MAC = bytes(6)
BROADCAST = b"\xff" * 6
RCVBUF = 8 * 1024 * 1024
PACKET_IGNORE_OUTGOING = getattr(socket, "PACKET_IGNORE_OUTGOING", 23)
SOL_PACKET = getattr(socket, "SOL_PACKET", 263)
SIOCGIFMTU = 0x8921
LEN = struct.Struct("!H")

# DIX: dst MAC, src MAC, ethertype, eid, payload length; then the payload (Ouroboros's eth-dix).
DIX = struct.Struct("!6s6sHHH")
DIX_EXTRA = DIX.size - ETH_HLEN  # the 4 bytes of eid and length the layer takes from the MTU

# LLC: dst MAC, src MAC, 802.3 length (= 3 + payload), DSAP, SSAP, control (UI); then the payload.
LLC = struct.Struct("!6s6sHBBB")
LLC_EXTRA = LLC.size - ETH_HLEN
_DIX_SIZE, _DIX_UNPACK = DIX.size, DIX.unpack_from  # the data path's, bound once
_LLC_SIZE, _LLC_UNPACK = LLC.size, LLC.unpack_from
LLC_UI = 0x03
LLC_MAX_LEN = 1500  # an 802.3 length field above this would read as an ethertype
LO_MTU = 9000  # Ouroboros caps a layer on a loopback interface (IPCP_ETH_LO_MTU)
# As Ouroboros's eth-llc: a flow's endpoint is an LLC SAP from 2 to 63, SAP 1 carries management,
# and a SAP travels bit-reversed in the frame (plain in management messages).
MGMT_SAP = 0x01
MAX_SAPS = 64


def _reverse8(b: int) -> int:
    return int(f"{b:08b}"[::-1], 2)


WIRE_SAP: list[int] = [_reverse8(sap) for sap in range(256)]  # a SAP as it travels, and back
MGMT_WIRE_SAP = WIRE_SAP[MGMT_SAP]


class InterfaceError(OSError):
    """An interface that does not exist or cannot carry an Ethernet shim."""


# -- addresses ---------------------------------------------------------------


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {text!r}")
    return bytes(int(p, 16) for p in parts)


def encode_addr(addr: Hashable) -> bytes:
    """A MAC address in a member list (eth has no gossip, but the core wants a codec)."""
    return bytes(addr)  # type: ignore[call-overload, no-any-return]


def decode_addrs(data: bytes) -> list[Hashable]:
    return [bytes(data[i : i + 6]) for i in range(0, len(data) - 5, 6)]


# -- interfaces and sockets -------------------------------------------------


def interface_info(dev: str) -> tuple[bytes, int]:
    """(MAC, MTU) of an Ethernet interface of this network namespace, asked through scapy."""
    try:
        socket.if_nametoindex(dev)
    except OSError:
        raise InterfaceError(f"no interface {dev!r} in this network namespace") from None
    # Imported here: scapy costs a few tenths of a second and reads the interfaces of the
    # namespace it is imported in; only an eth IPCP, already in its namespace, needs it.
    from scapy.arch.unix import get_if, get_if_raw_hwaddr

    try:
        hwtype, mac = get_if_raw_hwaddr(dev)
        (mtu,) = struct.unpack_from("16xi", get_if(dev, SIOCGIFMTU))
    except OSError as e:
        raise InterfaceError(f"interface {dev!r}: {e.strerror or e}") from None
    if hwtype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK) or len(mac) != 6:
        raise InterfaceError(f"interface {dev!r} is not Ethernet (hardware type {hwtype})")
    return bytes(mac), int(mtu)


def is_loopback(dev: str) -> bool:
    """Whether `dev` hands every frame back to its sender (`lo`)."""
    try:
        return int(Path(f"/sys/class/net/{dev}/type").read_text()) == ARPHRD_LOOPBACK
    except (OSError, ValueError):
        return False


def link_speed(dev: str) -> int:
    """The interface's speed in bits/s as the kernel reports it; 0 when it does not know."""
    try:
        mbps = int(Path(f"/sys/class/net/{dev}/speed").read_text())
    except (OSError, ValueError):  # down links and some drivers give EINVAL
        return 0
    return max(mbps, 0) * 1_000_000


def open_packet_socket(dev: str, proto: int) -> socket.socket:
    """A non-blocking AF_PACKET socket on `dev` that receives only frames of `proto`."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing until bound
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        for opt in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
            if opt is None or (opt != socket.SO_RCVBUF and os.geteuid() != 0):
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                break
            except OSError:
                continue
        for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
            if opt is None or (opt != socket.SO_SNDBUF and os.geteuid() != 0):
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
                break
            except OSError:
                continue
        sock.bind((dev, proto))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the frame layer, for scapy -----------------------------------------------


@functools.cache
def dix_layer() -> type[Any]:
    """The scapy Packet class of a DIX frame (dst, src, type, eid, len), built on first use."""
    from scapy.fields import LenField, MACField, ShortField, XShortField
    from scapy.packet import Packet

    class OuroborosDix(Packet):
        name = "Ouroboros eth-dix"
        fields_desc = [  # noqa: RUF012 - scapy's declaration style
            MACField("dst", "ff:ff:ff:ff:ff:ff"),
            MACField("src", "00:00:00:00:00:00"),
            XShortField("type", DEFAULT_ETHERTYPE),
            ShortField("eid", 0),
            LenField("len", None),  # payload length, filled in on build
        ]

        def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
            return s[: self.len], s[self.len :]

    return OuroborosDix


def llc_frame(dst: bytes, src: bytes, payload: bytes, sap: int = MGMT_WIRE_SAP) -> bytes:
    """An 802.3/LLC frame built with scapy's layers (management, tests); `sap` as on the wire."""
    from scapy.layers.l2 import LLC as ScapyLlc
    from scapy.layers.l2 import Dot3

    llc = ScapyLlc(dsap=sap, ssap=sap, ctrl=LLC_UI)
    return bytes(Dot3(dst=mac_str(dst), src=mac_str(src)) / llc / payload)


# -- framings for the relay ---------------------------------------------------


def unicast_peer(src: bytes, own: bytes) -> bool:
    """Whether a frame's source can be a peer: not a group address (a flow to it would answer every
    host on the link); not all zeros, nor ourselves, unless we are all zeros: on a loopback interface
    (the tutorials' `lo`) every end has that address."""
    return not src[0] & 1 and src not in not_peers(own)


def not_peers(own: bytes) -> tuple[bytes, ...]:
    """The unicast sources that cannot be peers (unicast_peer; the framings keep it for their own
    address): ourselves and all zeros, unless we are all zeros."""
    return () if own == ZERO_MAC else (own, ZERO_MAC)


class EthFraming:
    """The relay's Framing for eth-dix: the DIX header, struct-packed."""

    needs_src = False  # the frame names its sender

    def __init__(self, own: bytes, ethertype: int = DEFAULT_ETHERTYPE) -> None:
        self.own = own
        self.ethertype = ethertype
        self.not_peers = not_peers(own)

    def parse(self, frame: bytes, src: Any) -> tuple[int, bytes, Hashable] | None:
        """(eid, payload, source MAC) of a frame for us, or None to drop it."""
        if len(frame) < _DIX_SIZE:
            return None
        dst, peer, etype, eid, length = _DIX_UNPACK(frame)
        own = self.own
        if etype != self.ethertype or length > len(frame) - _DIX_SIZE or (dst != own and dst != BROADCAST):
            return None  # bytes beyond the length are Ethernet padding
        if peer[0] & 1 or peer in self.not_peers:
            return None  # not unicast_peer (inlined: once a frame)
        return eid, frame[_DIX_SIZE : _DIX_SIZE + length], peer  # a copy costs less than a view

    def header(self, dst: bytes, eid: int) -> bytes:
        """The per-flow part of the header: everything but the length."""
        return DIX.pack(dst, self.own, self.ethertype, eid, 0)[: DIX.size - LEN.size]

    def send(self, sock: socket.socket, flow: Any, sdu: bytes) -> None:
        sock.send(flow.hdr + LEN.pack(len(sdu)) + sdu)  # one copy costs less than sendmsg's gathering

    def mgmt_frame(self, dst: bytes, payload: bytes) -> bytes:
        hdr = dix_layer()(dst=mac_str(dst), src=mac_str(self.own), type=self.ethertype, eid=0)
        return bytes(hdr / payload)


class LlcFraming:
    """The relay's Framing for eth-llc: 802.3 length, LLC SAPs as endpoint ids (management: eid 0)."""

    needs_src = False

    def __init__(self, own: bytes) -> None:
        self.own = own
        self.not_peers = not_peers(own)

    def parse(self, frame: bytes, src: Any) -> tuple[int, bytes, Hashable] | None:
        if len(frame) < _LLC_SIZE:
            return None
        dst, peer, length, dsap, ssap, ctrl = _LLC_UNPACK(frame)
        own = self.own
        if ctrl != LLC_UI or not LLC_EXTRA <= length <= len(frame) - ETH_HLEN or (dst != own and dst != BROADCAST):
            return None
        if peer[0] & 1 or peer in self.not_peers:
            return None  # not unicast_peer (inlined)
        dsap, ssap = WIRE_SAP[dsap], WIRE_SAP[ssap]
        if dsap == MGMT_SAP:
            eid = 0 if ssap == MGMT_SAP else -1
        else:
            eid = dsap if 2 <= dsap < MAX_SAPS and 2 <= ssap < MAX_SAPS else -1
        if eid < 0:
            return None
        return eid, frame[_LLC_SIZE : ETH_HLEN + length], peer

    def header(self, dst: bytes, local_sap: int, remote_sap: int) -> bytes:
        """dst, src, then DSAP, SSAP, control: the length goes between them per SDU."""
        return dst + self.own + bytes((WIRE_SAP[remote_sap], WIRE_SAP[local_sap], LLC_UI))

    def send(self, sock: socket.socket, flow: Any, sdu: bytes) -> None:
        hdr = flow.hdr
        sock.send(b"".join((hdr[:12], LEN.pack(LLC_EXTRA + len(sdu)), hdr[12:], sdu)))

    def mgmt_frame(self, dst: bytes, payload: bytes) -> bytes:
        return llc_frame(dst, self.own, payload)
