"""Data transfer: the thread that forwards PDUs between N-1 flows and delivers them to N+1 flows.

Per PDU: one PCI unpack, one forwarding-table lookup, one send; TTL expiry and
PDUs for unknown flows are dropped and counted. With congestion avoidance on, PDUs
are marked by the queue they enter, and flows are paced by what their receivers echo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import struct
import termios
import time
from collections.abc import Callable

from ipcp.unicast import ca
from ipcp.unicast.pci import MGMT_EID, Pci, PciError, PciFormat
from transports.poller import BURST, PollThread, read_burst

log = logging.getLogger(__name__)

SAMPLE_EVERY = 8  # PDUs sent into an N-1 flow between two looks at how full its queue is
RETRY = 0.001  # seconds a flow held back by its full first hop waits before trying again
PACED_BURST = 8  # SDUs taken from a paced flow at once: its pace is kept in small steps
_QUEUED = struct.Struct("i")


class QueueFull(Exception):
    """The next hop's queue is full and the PDU was not sent (only where the caller can hold it)."""


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
    rx: ca.Receiver | None = None  # congestion avoidance, when the layer has it
    tx: ca.Sender | None = None


@dataclasses.dataclass(eq=False)
class N1Queue:
    """How full the queue into one N-1 flow is, looked at every SAMPLE_EVERY PDUs and averaged
    (as RED does), so that a burst the next hop is draining is not taken for congestion."""

    sock: socket.socket
    capacity: int
    sent: int = 0
    level: int = 0
    average: float = 0.0

    def sample(self) -> int:
        queued = _QUEUED.unpack(fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * _QUEUED.size))[0]
        self.average += (queued - self.average) / 8
        self.level = ca.ecn_level(int(self.average), self.capacity)
        return self.level


@dataclasses.dataclass
class Counters:
    forwarded: int = 0
    delivered: int = 0
    ttl_expired: int = 0
    no_route: int = 0
    no_flow: int = 0
    malformed: int = 0
    overflow: int = 0
    marked: int = 0  # PDUs this forwarder marked congested
    updates: int = 0  # congestion updates sent back to senders
    paced: int = 0  # times a sending flow was held back by its pace
    held: int = 0  # ... and by its first hop's full queue


class Dt(PollThread):
    """`pff` maps a destination to next-hop addresses; `n1` maps a next hop to its socket."""

    def __init__(self, fmt: PciFormat, me: int, max_ttl: int, bufsize: int,
                 on_mgmt: Callable[[bytes], None], on_n1_down: Callable[[int], None],
                 on_congestion: Callable[[UniFlow, ca.Update], None] | None = None) -> None:
        self.fmt = fmt
        super().__init__("dt")
        self.me = me
        self.max_ttl = max_ttl
        self.bufsize = bufsize
        self.on_mgmt = on_mgmt
        self.on_n1_down = on_n1_down
        self.on_congestion = on_congestion  # None: the layer does no congestion avoidance
        self.pff: dict[int, list[int]] = {}
        self.ecmp = False  # spread flows over equal next hops (else: first that is up)
        self.n1: dict[int, socket.socket] = {}  # next-hop address -> its data flow
        self.flows: dict[int, UniFlow] = {}
        self.counters = Counters()
        self._n1_at: dict[int, int] = {}  # fd -> next-hop address
        self._flow_at: dict[int, UniFlow] = {}  # fd -> N+1 flow
        self._queues: dict[int, N1Queue] = {}  # next-hop address -> its queue, with congestion avoidance

    def stop(self) -> None:
        super().stop()
        log.info("data transfer: %s", self.counters)
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
        if self.on_congestion is not None:
            self._queues[addr] = N1Queue(sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        self.watch(sock.fileno())

    def remove_n1(self, addr: int) -> None:
        sock = self.n1.pop(addr, None)
        self._queues.pop(addr, None)
        if sock is not None:
            if self._n1_at.pop(sock.fileno(), None) is not None:
                self.unwatch(sock.fileno())
            sock.close()

    def add_flow(self, flow: UniFlow) -> None:
        flow.io.setblocking(False)
        flow.hdr = self.fmt.pack(Pci(flow.dst, flow.qos, self.max_ttl, 0, flow.remote_eid))
        if self.on_congestion is not None:
            now = time.monotonic()
            flow.rx, flow.tx = ca.Receiver(now), ca.Sender(now)
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

    def _route(self, dst: int, bufs: tuple[bytes | bytearray, ...], spread: int, hold: bool = False) -> bool:
        """Send a PDU towards `dst`; False if there is no way. A full queue drops it, or with
        `hold` raises QueueFull so that its sender keeps it."""
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
                if self._queues and not hold:  # our own flows' writers are held back by a full queue instead
                    bufs = self._mark(hop, bufs)
                sock.sendmsg(bufs)
            except BlockingIOError:
                if hold:
                    raise QueueFull from None
                self.counters.overflow += 1
            except OSError:
                continue
            return True
        self.counters.no_route += 1
        return False

    def _mark(self, hop: int, bufs: tuple[bytes | bytearray, ...]) -> tuple[bytes | bytearray, ...]:
        """The PDU marked with how full the queue to `hop` is, if that is more than it carries."""
        queue = self._queues.get(hop)
        if queue is None:
            return bufs
        queue.sent += 1
        level = queue.sample() if queue.sent % SAMPLE_EVERY == 0 else queue.level
        at = self.fmt.ecn_offset
        if level <= bufs[0][at]:
            return bufs
        head = bufs[0] if isinstance(bufs[0], bytearray) else bytearray(bufs[0])
        head[at] = level
        self.counters.marked += 1
        return (head, *bufs[1:])

    def on_update(self, eid: int, update: ca.Update) -> None:
        """Congestion feedback for our flow `eid` from its receiver."""
        flow = self.flows.get(eid)
        if flow is not None and flow.tx is not None:
            flow.tx.on_update(update, time.monotonic())  # a few stores: safe from the IPCP's thread

    def _hold(self, flow: UniFlow, wait: float, rest: list[bytes]) -> None:
        """Stop reading the flow for `wait` seconds; then send `rest` (read, not sent) and read on."""
        fd = flow.io.fileno()
        self.unwatch(fd)

        def resume() -> None:
            if self._flow_at.get(fd) is flow and (not rest or self._send_from(flow, rest)):
                with contextlib.suppress(OSError):  # deallocated by the IPCP's thread just now
                    self.watch(fd)

        self.call_later(wait, resume)

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
            paced = flow.tx is not None and flow.tx.paced
            sdus, ended = read_burst(flow.io, self.bufsize, hup, PACED_BURST if paced else BURST)
            self.from_app(flow, sdus)
            if ended:
                self.remove_flow(flow.eid)

    def from_n1(self, hop: int, pdus: list[bytes]) -> None:
        """PDUs from a neighbour: ours are delivered, others forwarded with one hop less to live."""
        fmt, size, me, c = self.fmt, self.fmt.size, self.me, self.counters
        now = time.monotonic() if self.on_congestion is not None else 0.0
        for pdu in pdus:
            if not pdu:
                continue  # the N-1 flow's own keepalive
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
                if flow is None:  # (a PDU with no SDU carries a keepalive of the flow: delivered empty)
                    c.no_flow += 1
                    continue
                if flow.rx is not None and (update := flow.rx.on_pdu(pci.ecn, len(pdu), now)) is not None:
                    assert self.on_congestion is not None
                    self.on_congestion(flow, update)
                    c.updates += 1
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
        self._send_from(flow, sdus)

    def _send_from(self, flow: UniFlow, sdus: list[bytes]) -> bool:
        """Send a flow's SDUs; False if the flow is now held back. With congestion avoidance it is,
        by its pace or by its first hop's full queue: its writer blocks rather than loses SDUs."""
        tx = flow.tx
        for i, sdu in enumerate(sdus):
            try:
                self._route(flow.dst, (flow.hdr, sdu), flow.eid, tx is not None)
            except QueueFull:
                self.counters.held += 1
                self._hold(flow, RETRY, sdus[i:])
                return False
        if tx is not None and tx.paced and (wait := tx.admit(sum(map(len, sdus)), time.monotonic())) > 0:
            self.counters.paced += 1
            self._hold(flow, wait, [])
            return False
        return True
