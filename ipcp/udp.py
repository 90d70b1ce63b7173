"""The udp4/udp6 IPCPs: a layer over UDP/IP, names resolved by broadcast and member gossip.

`peer ADDR` seeds the member list where broadcast cannot reach; members share
the members they know, so configuring any one is enough.

Data takes a fast path: each flow gets its own UDP socket, connected to the
peer's, and that socket is the application's flow fd, so no process relays
SDUs (as the local IPCP does with its socketpairs). The IPCP keeps the
management port for names, handshakes and keepalives, and tears flows down
through the IRMd. With `impair` (tests only) data goes through the relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Hashable
from typing import Any, cast

from ipcp.shim import ShimCore, ShimFlow
from ipcp.shim_io import ShimIpcp, impaired
from proto import messages as m
from transports import udp
from transports.channel import HandlerError
from transports.relay import Relay

log = logging.getLogger(__name__)

DEFAULT_PORT = 3435
UDP_MTU = 8980  # as Ouroboros: jumbo-frame sized, well under the 64 KiB datagram limit
OPTIONS = {"ip", "port", "peer", "impair"}


class UdpIpcp(ShimIpcp):
    type = "udp4"
    version = 4
    mtu = UDP_MTU

    async def open_transport(self, layer: str, conf: dict[str, str]) -> tuple[ShimCore, Relay]:
        if unknown := set(conf) - OPTIONS:
            raise HandlerError(m.EINVAL, f"unknown {self.type} options {sorted(unknown)}: expected {sorted(OPTIONS)}")
        try:
            ip = str(ipaddress.ip_address(conf["ip"]))
            port = int(conf.get("port", DEFAULT_PORT))
            peers: list[tuple[str, int]] = [(str(ipaddress.ip_address(p)), port)
                                     for p in conf.get("peer", "").split(",") if p]
        except (KeyError, ValueError) as e:
            raise HandlerError(m.EINVAL, f"bad {self.type} options: {e}") from None
        if ipaddress.ip_address(ip).version != self.version:
            raise HandlerError(m.EINVAL, f"{ip} is not an IPv{self.version} address")
        try:
            self.sock = udp.open_udp(ip, port)
        except OSError as e:
            raise HandlerError(m.EINVAL, f"cannot bind {ip} port {port}: {e.strerror}") from None
        self.bcast: tuple[str, int] | None = None
        bcast_ip = udp.broadcast_address(ip)
        if bcast_ip is not None:
            self.bcast = (bcast_ip, port)
            # A socket bound to a unicast address never sees broadcasts: listen on one of its own.
            try:
                self.bcast_sock = udp.open_udp(bcast_ip, port, reuse=True)
                asyncio.get_running_loop().add_reader(self.bcast_sock.fileno(), self._on_broadcast)
            except OSError as e:
                log.warning("no broadcast listener on %s: %s", bcast_ip, e)
        self.ip = ip
        self.fast = "impair" not in conf
        own = (ip, port)
        core = ShimCore(eid_bits=32, encode_addr=udp.encode_addr, decode_addrs=udp.decode_addrs,
                        own=own, peers=[p for p in peers if p != own])
        log.info("%s: udp layer %s on %s:%d, broadcast %s, peers %s", self.name, layer, ip, port,
                 bcast_ip or "none", [p[0] for p in peers] or "none")
        return core, Relay(self.sock, impaired(udp.UdpFraming(), conf.get("impair")), 65536, self.on_mgmt)

    def _on_broadcast(self) -> None:
        try:
            frame, src = self.bcast_sock.recvfrom(65536)
        except OSError:
            return
        parsed = udp.UdpFraming.parse(frame, src)
        if parsed is not None and parsed[0] == 0 and parsed[2] != self.core.own:  # type: ignore[union-attr]
            self._receive(bytes(parsed[1]), parsed[2])

    def send_mgmt(self, dst: Hashable | None, frame: bytes) -> None:
        data = udp.EID.pack(0) + frame
        if dst is not None:
            self.sock.sendto(data, cast(tuple[str, int], dst))
            return
        assert self.core is not None
        targets = [cast(tuple[str, int], m) for m in self.core.members]
        for target in [*targets, self.bcast] if self.bcast is not None else targets:
            try:  # one unreachable member must not silence the others
                self.sock.sendto(data, target)
            except OSError as e:
                log.debug("%s: management send to %s failed: %s", self.name, target, e)

    def flow_header(self, flow: ShimFlow) -> bytes:
        return udp.EID.pack(flow.remote_eid)

    def open_endpoint(self) -> tuple[Any, bytes]:
        if not self.fast:
            return super().open_endpoint()
        sock = udp.open_udp(self.ip, 0)
        return sock, udp.PORT.pack(sock.getsockname()[1])

    def connect_endpoint(self, handle: Any, addr: Hashable, peer: bytes) -> int:
        if not self.fast:
            return super().connect_endpoint(handle, addr, peer)
        if len(peer) != udp.PORT.size:
            raise HandlerError(m.EPROTO, "the peer sent no data port")
        handle.connect((cast(tuple[str, int], addr)[0], udp.PORT.unpack(peer)[0]))
        handle.setblocking(True)
        return int(os.dup(handle.fileno()))

    def bind_endpoint(self, flow: ShimFlow, handle: Any) -> None:
        if not self.fast:
            super().bind_endpoint(flow, handle)
        else:
            handle.close()  # the application holds the socket now

    def close_endpoint(self, handle: Any) -> None:
        if not self.fast:
            super().close_endpoint(handle)
        else:
            handle.close()


class Udp6Ipcp(UdpIpcp):
    type = "udp6"
    version = 6

