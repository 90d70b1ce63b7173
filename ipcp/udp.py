"""The udp4/udp6 IPCPs: a layer over UDP/IP that speaks Ouroboros 0.23's udp wire, with our extensions.

As Ouroboros, names resolve through getaddrinfo on the hex MD5 of the name (/etc/hosts, DNS),
every member uses the same port, and flows are set up on that one socket. Between nodes of ours,
also: members found by broadcast and gossip (`peer ADDR` seeds the list where broadcast cannot
reach), names found by query, and each flow's data on a UDP socket of its own, which is the
application's flow fd, so no process relays its SDUs (docs/interop.md). With `impair` (tests
only) data goes through the relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Hashable
from pathlib import Path
from typing import cast

from ipcp.lookups import HostsFile, Lookups
from ipcp.shim import Limits, ShimCore, ShimFlow
from ipcp.shim_io import ShimIpcp, impaired
from ipcp.shim_wire import UDP
from proto import messages as m
from proto.options import TYPE_OPTIONS
from transports import udp
from transports.channel import HandlerError
from transports.poller import BURST
from transports.relay import Relay

log = logging.getLogger(__name__)

DEFAULT_PORT = 3435
UDP_MTU = udp.MAX_DATAGRAM - udp.EID.size  # the largest SDU an Ouroboros 0.23 peer reads whole
IPV6_PEER_PREFIX = 64  # the bits of an IPv6 address that name one peer to the IRMd's limits per peer
HASH = "MD5"  # as Ouroboros: a udp layer hashes names with MD5, whatever the bootstrap asked for
LOOKUPS = 4  # getaddrinfo calls at once (each holds a thread while DNS answers)
LOOKUP_QUEUE = 64  # names waiting for one of them; past it a name is not looked up outside the layer
HOSTS = Path("/etc/hosts")  # read here, so that its names never wait behind the resolver
OPTIONS = {"ip", "port", "peer", "impair", "hash", "dns", "members"}


class UdpIpcp(ShimIpcp):
    type = "udp4"
    version = 4
    mtu = UDP_MTU

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)
        self.hash_algo = HASH
        self._lookups = Lookups(lambda name: udp.lookup(name, self.version), LOOKUPS, LOOKUP_QUEUE)
        self._hosts = HostsFile(HOSTS, self.version)

    async def open_transport(self, layer: str, conf: dict[str, str]) -> tuple[ShimCore, Relay]:
        if unknown := set(conf) - OPTIONS:
            raise HandlerError(m.EINVAL, f"unknown {self.type} options {sorted(unknown)}: expected {sorted(OPTIONS)}")
        schema = TYPE_OPTIONS[self.type]  # checked again here: not every client is irm
        try:
            ip = schema["ip"]("ip", conf["ip"])
            port = int(conf.get("port", DEFAULT_PORT))
            peers: list[tuple[str, int]] = [
                (schema["peer"]("peer", p), port) for p in conf.get("peer", "").split(",") if p
            ]
            limits = Limits(members=int(conf.get("members", Limits.members)))
        except (KeyError, ValueError) as e:  # (an OptionError is a ValueError)
            raise HandlerError(m.EINVAL, f"bad {self.type} options: {e}") from None
        if "dns" in conf:
            log.info(
                "%s: no dynamic DNS here (as a 0.23 build without nsupdate): names resolve through"
                " /etc/hosts and the system's resolver",
                self.name,
            )
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
                (log.info if peers else log.warning)(
                    "no broadcast listener on %s: %s%s", bcast_ip, e, "" if peers else "; add peer ADDR to find members"
                )
        self.ip = ip
        self.fast = "impair" not in conf
        own = (ip, port)
        core = ShimCore(
            UDP,
            hash_len=16,
            own=own,
            discovery=True,
            encode_addr=udp.encode_addr,
            decode_addrs=udp.decode_addrs,
            peers=peers,
            limits=limits,
            peer_of=self.peer_of,
        )
        log.info(
            "%s: udp layer %s on %s:%d, broadcast %s, peers %s",
            self.name,
            layer,
            ip,
            port,
            bcast_ip or "none",
            [p[0] for p in peers] or "none",
        )
        framing = impaired(udp.UdpFraming(), conf.get("impair"))
        return core, Relay(self.sock, framing, udp.MAX_DATAGRAM + 1, self.on_mgmt, max_sdu=self.mtu)

    def _on_broadcast(self) -> None:
        """Queries to the subnet's broadcast: into the same bounded, rate-limited queues as the rest."""
        for _ in range(BURST):
            try:
                frame, src = self.bcast_sock.recvfrom(udp.MAX_DATAGRAM)
            except OSError:
                return
            parsed = udp.UdpFraming.parse(frame, src)
            if parsed is not None and parsed[0] == 0 and self.core is not None and parsed[2] != self.core.own:
                self.on_mgmt(bytes(parsed[1]), parsed[2])

    def known(self, digest: bytes) -> Hashable | None:
        """The hash's address in /etc/hosts (the lowercase hex of the hash as a host name), on our port."""
        ip = self._hosts.get(digest.hex())
        return None if ip is None or self.core is None else (ip, self.core.own[1])  # type: ignore[index]

    async def lookup(self, digest: bytes) -> Hashable | None:
        """As Ouroboros 0.23 without DNS updates: getaddrinfo on the lowercase hex of the hash, on our port;
        a few at once, a bounded queue behind them (LookupsBusy past it)."""
        ip = await self._lookups.ask(digest.hex())
        return None if ip is None or self.core is None else (ip, self.core.own[1])  # type: ignore[index]

    def counters(self) -> dict[str, int]:
        return super().counters() | {
            "names not looked up (resolver busy)": self._lookups.refused,
            "lookups dropped (nobody waiting)": self._lookups.dropped,
            "lookups waiting": self._lookups.waiting,
        }

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

    def data_socket(self) -> tuple[socket.socket, int] | None:
        if not self.fast:
            return None
        sock = udp.open_udp(self.ip, 0)
        return sock, sock.getsockname()[1]

    def _ip_of(self, addr: Hashable) -> str:
        return str(cast(tuple[str, int], addr)[0])

    def show_addr(self, addr: Hashable) -> str:
        ip, port = cast(tuple[str, int], addr)
        return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"

    def peer_of(self, addr: Hashable) -> str:
        """A peer by its IP (another source port is no other peer), an IPv6 one by its /64: a host is
        handed a /64 at least and may send from any address in it."""
        ip = ipaddress.ip_address(self._ip_of(addr).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, IPV6_PEER_PREFIX), strict=False))
        return str(ip)


class Udp6Ipcp(UdpIpcp):
    type = "udp6"
    version = 6
