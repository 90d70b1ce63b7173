"""Data transfer: the thread that forwards PDUs between N-1 flows and delivers them to N+1 flows.

Per PDU: one PCI unpack, one forwarding-table lookup, one send; TTL expiry and
PDUs for unknown flows are dropped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable

from ipcp.unicast.pci import MGMT_EID, Pci, PciError, PciFormat
from transports.poller import PollThread, read_burst

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class UniFlow:
    """An N+1 flow: the IPCP's end of the application socket and where its PDUs go."""

    eid: int
    io: socket.socket
    dst: int = 0
    remote_eid: int = 0
    flow_id: int = 0
    qos: int = 0
    hdr: bytes = b""


@dataclasses.dataclass
class Counters:
    forwarded: int = 0
    delivered: int = 0
    ttl_expired: int = 0
    no_route: int = 0
    no_flow: int = 0
    malformed: int = 0
    overflow: int = 0


class Dt(PollThread):
    """`pff` maps a destination to next-hop addresses; `n1` maps a next hop to its socket."""

    def __init__(self, fmt: PciFormat, me: int, max_ttl: int, bufsize: int,
                 on_mgmt: Callable[[bytes], None], on_n1_down: Callable[[int], None]) -> None:
        self.fmt = fmt
        super().__init__("dt")
        self.me = me
        self.max_ttl = max_ttl
        self.bufsize = bufsize
        self.on_mgmt = on_mgmt
        self.on_n1_down = on_n1_down
        self.pff: dict[int, list[int]] = {}
        self.ecmp = False  # spread flows over equal next hops (else: first that is up)
        self.n1: dict[int, socket.socket] = {}  # next-hop address -> its data flow
        self.flows: dict[int, UniFlow] = {}
        self.counters = Counters()
        self._n1_at: dict[int, int] = {}  # fd -> next-hop address
        self._flow_at: dict[int, UniFlow] = {}  # fd -> N+1 flow

    def stop(self) -> None:
        super().stop()
        for sock in self.n1.values():
            sock.close()

    # -- tables, changed from the IPCP's loop ----------------------------------

    def add_n1(self, addr: int, fd: int) -> None:
        """A data flow to neighbour `addr` (the fd is duplicated; the caller keeps its own)."""
        self.remove_n1(addr)
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        self.n1[addr] = sock
        self._n1_at[sock.fileno()] = addr
        self.watch(sock.fileno())

    def remove_n1(self, addr: int) -> None:
        sock = self.n1.pop(addr, None)
        if sock is not None:
            if self._n1_at.pop(sock.fileno(), None) is not None:
                self.unwatch(sock.fileno())
            sock.close()

    def add_flow(self, flow: UniFlow) -> None:
        flow.io.setblocking(False)
        flow.hdr = self.fmt.pack(Pci(flow.dst, flow.qos, self.max_ttl, 0, flow.remote_eid))
        self.flows[flow.eid] = flow
        self._flow_at[flow.io.fileno()] = flow
        self.watch(flow.io.fileno())

    def remove_flow(self, eid: int) -> UniFlow | None:
        flow = self.flows.pop(eid, None)
        if flow is not None and self._flow_at.pop(flow.io.fileno(), None) is not None:
            self.unwatch(flow.io.fileno())
        return flow

    def send_mgmt(self, dst: int, payload: bytes) -> bool:
        """A management PDU to the IPCP at `dst` (thread-safe); False if unroutable."""
        if dst == self.me:
            self.on_mgmt(payload)
            return True
        return self._route(dst, (self.fmt.pack(Pci(dst, 0, self.max_ttl, 0, MGMT_EID)), payload), 0)

    def _route(self, dst: int, bufs: tuple[bytes | bytearray, ...], spread: int) -> bool:
        if dst == self.me:  # a flow between two applications of this member
            self.from_n1(dst, [b"".join(bufs)])
            return True
        hops = self.pff.get(dst)
        if not hops:
            self.counters.no_route += 1
            return False
        n1 = self.n1
        for hop in (hops[spread % len(hops)], *hops) if self.ecmp and len(hops) > 1 else hops:
            sock = n1.get(hop)
            if sock is None:
                continue  # that next hop's flow is down: try the alternate
            try:
                sock.sendmsg(bufs)
            except BlockingIOError:
                self.counters.overflow += 1
            except OSError:
                continue
            return True
        self.counters.no_route += 1
        return False

    # -- the thread ----------------------------------------------------------

    def on_ready(self, fd: int, mask: int) -> None:
        hup = bool(mask & self.HUP)
        if (hop := self._n1_at.get(fd)) is not None:
            sock = self.n1.get(hop)
            if sock is not None:
                pdus, ended = read_burst(sock, self.bufsize, hup)
                self.from_n1(hop, pdus)
                if ended:  # torn down below us
                    self.remove_n1(hop)
                    self.on_n1_down(hop)
        elif (flow := self._flow_at.get(fd)) is not None:
            sdus, ended = read_burst(flow.io, self.bufsize, hup)
            self.from_app(flow, sdus)
            if ended:
                self.remove_flow(flow.eid)

    def from_n1(self, hop: int, pdus: list[bytes]) -> None:
        """PDUs from a neighbour: ours are delivered, others forwarded with one hop less to live."""
        fmt, size, me, c = self.fmt, self.fmt.size, self.me, self.counters
        for pdu in pdus:
            try:
                pci = fmt.unpack(pdu)
            except PciError:
                c.malformed += 1
                continue
            if pci.dst == me:
                if pci.eid == MGMT_EID:
                    self.on_mgmt(pdu[size:])
                    continue
                flow = self.flows.get(pci.eid)
                if flow is None or len(pdu) == size:
                    c.no_flow += 1
                    continue
                try:
                    flow.io.send(memoryview(pdu)[size:])
                    c.delivered += 1
                except BlockingIOError:
                    c.overflow += 1
                except OSError:
                    c.no_flow += 1
                continue
            if pci.ttl <= 1:
                c.ttl_expired += 1
                continue
            buf = bytearray(pdu)
            buf[fmt.ttl_offset] = pci.ttl - 1
            if self._route(pci.dst, (buf,), pci.eid):
                c.forwarded += 1

    def from_app(self, flow: UniFlow, sdus: list[bytes]) -> None:
        for sdu in sdus:
            self._route(flow.dst, (flow.hdr, sdu), flow.eid)
