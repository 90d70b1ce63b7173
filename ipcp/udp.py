"""The udp4/udp6 IPCPs: a layer over UDP/IP, names resolved by broadcast and member gossip.

`peer ADDR` seeds the member list where broadcast cannot reach; members share
the members they know, so configuring any one is enough.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Hashable
from typing import cast

from ipcp.shim import ShimCore, ShimFlow
from ipcp.shim_io import ShimIpcp, impaired
from irmd import messages as m
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
        for member in self.core.members:
            self.sock.sendto(data, cast(tuple[str, int], member))
        if self.bcast is not None:
            self.sock.sendto(data, self.bcast)

    def flow_header(self, flow: ShimFlow) -> bytes:
        return udp.EID.pack(flow.remote_eid)


class Udp6Ipcp(UdpIpcp):
    type = "udp6"
    version = 6

