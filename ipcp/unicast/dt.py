"""Data transfer: the thread that forwards PDUs between N-1 flows and delivers them to N+1 flows.

It owns its tables (forwarding table, N-1 links, flows); the IPCP's loop changes them only by
commands queued to this thread (`command`). Per PDU: one PCI unpack, one forwarding-table lookup,
and a place in the frame to its next hop; per frame (what one burst sends to one next hop, up to
the N-1 flow's MTU): one seal (keyed layers), one send, flushed before the thread waits again, so a
lone PDU is never held back. Every drop is counted by reason. A congestion policy (ca) marks,
echoes and paces; an error on this thread ends the process.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import logging
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from ipcp.unicast import auth, ca
from ipcp.unicast.pci import FRAMING, LEN, MAX_FRAME_PDUS, MAX_PDU, MGMT_EID, Pci, PciFormat, unframe
from ipcp.unicast.pff import Table
from transports.poller import BURST, PollThread, read_burst
from transports.queues import QueueBudget

log = logging.getLogger(__name__)

RETRY = 0.001  # seconds a flow held back by its full first hop waits before trying again
PACED_BURST = 8  # SDUs taken from a paced flow at once: its pace is kept in small steps
_QUEUED = struct.Struct("i")


Parts = tuple[bytes | bytearray | memoryview, ...]  # a PDU in pieces, sent as one (sendmsg gathers them)


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
    inbox: list[memoryview] = dataclasses.field(default_factory=list)  # SDUs of this burst, to deliver
    queue: int = 0  # bytes of queue its socket was given from the budget (0: the system's default)
    sent: int = 0  # its SDUs sent into the layer (irm flow list)
    delivered: int = 0  # ... and delivered to it
    dropped: int = 0  # ... arrived for it but dropped: the application did not keep up


@dataclasses.dataclass(eq=False)
class Link:
    """The data flow to one neighbour, with its seals in a keyed layer."""

    addr: int
    sock: socket.socket
    sealer: auth.Sealer | None = None
    opener: auth.Opener | None = None
    token: object = None  # the driver's handle of this adjacency, given back when it goes down
    room: int = 65535  # bytes a frame may carry (the N-1 flow's MTU less the seal)
    out: list[bytes | bytearray | memoryview] = dataclasses.field(default_factory=list)  # the frame being packed
    size: int = 0  # ... its bytes
    count: int = 0  # ... its PDUs


@dataclasses.dataclass
class Counters:
    sent: int = 0  # PDUs of our flows sent into the layer
    received: int = 0  # PDUs that came in on N-1 flows (a frame whose seal fails counts as one)
    frames_out: int = 0  # N-1 SDUs sent, each carrying one or more PDUs
    frames_in: int = 0  # ... and received
    delivered: int = 0  # ... delivered to our flows
    forwarded: int = 0
    mgmt_in: int = 0  # management PDUs for this IPCP
    mgmt_out: int = 0
    mgmt_dropped: int = 0  # ... that arrived faster than the IPCP could take them
    ttl_expired: int = 0  # the drops, by reason
    no_route: int = 0
    no_flow: int = 0
    malformed: int = 0
    overflow: int = 0
    oversized: int = 0  # an SDU of one of our flows larger than a PDU carries (its application wrote past the MTU)
    forged: int = 0  # a link's PDU whose seal does not verify
    replayed: int = 0  # ... or whose sequence number was seen
    marked: int = 0  # PDUs this forwarder marked congested
    updates: int = 0  # congestion updates sent back to senders
    paced: int = 0  # times a sending flow was held back by its pace
    held: int = 0  # ... and by its first hop's full queue


def _queued(sock: socket.socket) -> Callable[[], int]:
    fd = sock.fileno()
    return lambda: _QUEUED.unpack(fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * _QUEUED.size))[0]


class Dt(PollThread):
    """`pff` maps a destination to next-hop addresses; `n1` maps a next hop to its link."""

    FAIL_STOP = True

    # Whether a frame's common PDUs (an SDU for a flow of ours, one forwarded unmarked) may skip
    # `_arrived`: not for a subclass whose `_arrived` judges every PDU (the broadcast layer's copies).
    INLINE_ARRIVALS: ClassVar[bool] = True

    def __init__(
        self,
        fmt: PciFormat,
        me: int,
        max_ttl: int,
        bufsize: int,
        on_mgmt: Callable[[bytes, int], None],  # a management PDU for us, and the neighbour it came from
        on_n1_down: Callable[[int, object], None],
        on_congestion: Callable[[UniFlow, ca.Update], None],
        congestion: ca.Congestion | None = None,
        spread: bool = False,
    ) -> None:
        self.fmt = fmt
        self.max_sdu = MAX_PDU - fmt.size  # what one PDU carries of an SDU (its length field is 2 bytes)
        super().__init__("dt")
        self.me = me
        self.max_ttl = max_ttl
        self.bufsize = bufsize
        self.on_mgmt = on_mgmt
        self.on_n1_down = on_n1_down
        self.on_congestion = on_congestion
        self.ca: ca.Congestion = congestion if congestion is not None else ca.Nop()
        # With congestion avoidance, one PDU a frame: a full queue then drops a PDU, not a frame
        # of them, and each PDU's mark reads the queue it joins (packing is for open throughput).
        self.frame_pdus = 1 if self.ca.holds else MAX_FRAME_PDUS
        self._plain = isinstance(self.ca, ca.Nop)  # nothing marked: forwarding needs no _mark
        self.spread = spread  # spread flows over equal next hops (ecmp), else the first that is up
        self.pff: Table = {}
        self.n1: dict[int, Link] = {}  # next-hop address -> its data flow
        self.flows: dict[int, UniFlow] = {}
        self.counters = Counters()
        self._n1_at: dict[int, int] = {}  # fd -> next-hop address
        self._flow_at: dict[int, UniFlow] = {}  # fd -> N+1 flow
        self._commands: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._packed: list[Link] = []  # links with a frame being packed
        self._delivering: list[UniFlow] = []  # flows with SDUs to deliver
        self.queues = QueueBudget()  # longer queues for flows whose applications fall behind

    # -- commands, from the IPCP's loop ----------------------------------------------

    def command(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) on this thread (in order with the other commands)."""
        self._commands.append((fn, args))
        if len(self._commands) == 1:
            self.wake()

    def on_wake(self) -> None:
        while self._commands:
            fn, args = self._commands.popleft()
            fn(*args)
        self.flush()

    def stop(self) -> None:
        flushed = threading.Event()
        self.command(flushed.set)
        flushed.wait(2)  # what the driver queued last (its goodbyes to peers) goes out first
        super().stop()
        log.info("data transfer: %s", self.counters)
        for link in self.n1.values():
            link.sock.close()

    # -- tables: on this thread only ---------------------------------------------------

    def set_pff(self, table: Table) -> None:
        self.pff = table

    def add_n1(
        self,
        addr: int,
        fd: int,
        sealer: auth.Sealer | None = None,
        opener: auth.Opener | None = None,
        token: object = None,
        mtu: int = 65535,
    ) -> None:
        """A data flow to neighbour `addr` that carries up to `mtu` bytes an SDU; this thread owns
        `fd` from now on."""
        self.remove_n1(addr)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        room = min(mtu, 65535) - (auth.SEAL if sealer else 0)
        self.n1[addr] = Link(addr, sock, sealer, opener, token, room)
        self._n1_at[sock.fileno()] = addr
        self.ca.n1_added(addr, _queued(sock), sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        self.watch(sock.fileno())

    def remove_n1(self, addr: int, token: object = None) -> None:
        """Close the data flow to `addr` (only the one added with `token`, if given)."""
        if token is not None and getattr(self.n1.get(addr), "token", None) is not token:
            return
        link = self.n1.pop(addr, None)
        self.ca.n1_removed(addr)
        if link is not None:
            link.out, link.size, link.count = [], 0, 0
            if self._n1_at.pop(link.sock.fileno(), None) is not None:
                self.unwatch(link.sock.fileno())
            link.sock.close()

    def add_flow(self, flow: UniFlow) -> None:
        flow.io.setblocking(False)
        flow.hdr = self.fmt.pack(Pci(flow.dst, flow.qos, self.max_ttl, 0, flow.remote_eid))
        self.ca.flow_added(flow, time.monotonic())
        self.flows[flow.eid] = flow
        self._flow_at[flow.io.fileno()] = flow
        self.watch(flow.io.fileno())

    def remove_flow(self, eid: int) -> UniFlow | None:
        flow = self.flows.pop(eid, None)
        if flow is not None:
            self.queues.give_back(flow)
            if self._flow_at.pop(flow.io.fileno(), None) is not None:
                self.unwatch(flow.io.fileno())
        return flow

    def send_mgmt(self, dst: int, payload: bytes) -> None:
        """A management PDU to the IPCP at `dst`."""
        self.counters.mgmt_out += 1
        if dst == self.me:
            self.on_mgmt(payload, self.me)
        else:
            self._route(dst, (self.fmt.pack(Pci(dst, 0, self.max_ttl, 0, MGMT_EID)), payload), 0)

    def on_update(self, eid: int, src: int, update: ca.Update) -> None:
        """Congestion feedback for our flow `eid` from its receiver, the member at `src`: another member,
        which may know the eid (a forwarder sees it), must not slow the flow down."""
        flow = self.flows.get(eid)
        if flow is not None and flow.tx is not None and flow.dst == src:
            flow.tx.on_update(update, time.monotonic())

    # -- the data path ------------------------------------------------------------------

    def _route(self, dst: int, parts: Parts, spread: int, hold: bool = False, mark: bool = False) -> bool:
        """Queue a PDU (the concatenation of `parts`) towards `dst`; False if there is no way.
        With `hold` it is sent at once, and a full queue raises QueueFull so that its sender keeps
        it. Forwarded PDUs are `mark`ed."""
        if dst == self.me:  # a flow between two applications of this member
            self._arrived(b"".join(parts), self.me)
            return True
        link = self._next_link(dst, spread)
        if link is None:
            self.counters.no_route += 1
            return False
        if mark:
            parts = self._mark(link.addr, parts)
        if hold:
            self._flush(link)
            self._pack(link, parts, send_full=False)
            if not self._flush(link, True):
                raise QueueFull
            return True
        self._pack(link, parts)
        return True

    def _next_link(self, dst: int, spread: int) -> Link | None:
        """The link to the next hop towards `dst` (another member), if one is up."""
        hops = self.pff.get(dst)
        if not hops:
            return None
        n1 = self.n1
        for hop in (hops[spread % len(hops)], *hops) if self.spread and len(hops) > 1 else hops:
            link = n1.get(hop)
            if link is not None:
                return link  # else that next hop's flow is down: try the alternate
        return None

    def _pack(self, link: Link, parts: Parts, send_full: bool = True) -> None:
        """Add a PDU to the frame for `link`, sending the frame first if the PDU would not fit, and
        after if it is full (unless not `send_full`)."""
        size = sum(map(len, parts)) if len(parts) > 1 else len(parts[0])
        if link.count and link.size + size + FRAMING > link.room:
            self._flush(link)
        if not link.count:
            self._packed.append(link)
        link.out.append(LEN.pack(size))
        link.out.extend(parts)
        link.size += size + FRAMING
        link.count += 1
        if send_full and link.count >= self.frame_pdus:
            self._flush(link)  # with congestion avoidance at once: the next PDU's mark sees this one queued

    def _pack_burst(self, link: Link, hdr: bytes, sdus: list[bytes]) -> None:
        """`_pack` of (hdr, sdu) for each SDU, the frame's state kept in locals: a flow's burst."""
        room, most, flush, pack_len = link.room, self.frame_pdus, self._flush, LEN.pack
        framed = len(hdr) + FRAMING
        out, size, count = link.out, link.size, link.count
        for sdu in sdus:
            n = framed + len(sdu)
            if count and size + n > room:
                link.size, link.count = size, count
                flush(link)
                out, size, count = link.out, 0, 0
            if not count:
                self._packed.append(link)
            out.append(pack_len(n - FRAMING) + hdr)  # the length and the PCI in one piece
            out.append(sdu)
            size += n
            count += 1
            if count >= most:
                link.size, link.count = size, count
                flush(link)
                out, size, count = link.out, 0, 0
        link.size, link.count = size, count

    def _flush(self, link: Link, hold: bool = False) -> bool:
        """Send the frame packed for `link`, if any; False if it was dropped (with `hold`: kept)."""
        if not link.count:
            return True
        out, count = link.out, link.count
        try:
            link.sock.sendmsg(link.sealer.seal(*out) if link.sealer else out)
        except BlockingIOError:
            if hold:
                link.out, link.size, link.count = [], 0, 0  # its sender keeps it (a skipped seal is fine)
                return False
            self.counters.overflow += count
        except OSError:
            self.counters.no_route += count  # the flow is going down: its hang-up follows
        else:
            self.counters.frames_out += 1
        link.out, link.size, link.count = [], 0, 0
        return True

    def flush(self) -> None:
        """Send every frame packed so far and every SDU waiting for its flow: before the thread waits."""
        packed = self._packed
        while packed:
            self._flush(packed.pop())
        delivering = self._delivering
        while delivering:
            self._deliver(delivering.pop())

    def _mark(self, hop: int, parts: Parts) -> Parts:
        """The PDU marked with how full the queue to `hop` is, if that is more than it carries."""
        level = self.ca.level(hop)
        at = self.fmt.ecn_offset
        if level <= parts[0][at]:
            return parts
        head = parts[0] if isinstance(parts[0], bytearray) else bytearray(parts[0])
        head[at] = level
        self.counters.marked += 1
        return (head, *parts[1:])

    def _hold(self, flow: UniFlow, wait: float, rest: list[bytes]) -> None:
        """Stop reading the flow for `wait` seconds; then send `rest` (read, not sent) and read on."""
        fd = flow.io.fileno()
        self.unwatch(fd)

        def resume() -> None:
            if self._flow_at.get(fd) is flow and (not rest or self._send_from(flow, rest)):
                with contextlib.suppress(OSError):  # deallocated by a command just now
                    self.watch(fd)
            self.flush()

        self.call_later(wait, resume)

    def on_ready(self, fd: int, mask: int) -> None:
        hup = bool(mask & self.HUP)
        if (hop := self._n1_at.get(fd)) is not None:
            link = self.n1[hop]
            pdus, ended = read_burst(link.sock, self.bufsize, hup)
            self.from_n1(link, pdus)
            if ended:  # torn down below us
                self.remove_n1(hop)
                self.on_n1_down(hop, link.token)
        elif (flow := self._flow_at.get(fd)) is not None:
            paced = flow.tx is not None and flow.tx.paced
            sdus, ended = read_burst(flow.io, self.bufsize, hup, PACED_BURST if paced else BURST)
            self.from_app(flow, sdus)
            if ended:
                self.remove_flow(flow.eid)

    def from_n1(self, link: Link, frames: list[bytes]) -> None:
        """Frames from a neighbour: checked, then PDUs for us delivered, others forwarded one hop
        less to live; what that sends is flushed before this returns."""
        opener, c, arrived, hop = link.opener, self.counters, self._arrived, link.addr
        c.frames_in += len(frames)
        for frame in frames:
            if not frame:
                continue  # the N-1 flow's own keepalive
            if opener is not None:
                try:
                    frame = opener.open(frame)  # type: ignore[assignment]
                except auth.Replayed:
                    c.received += 1
                    c.replayed += 1
                    continue
                except auth.Forged:
                    c.received += 1
                    c.forged += 1
                    continue
            self._unframe(frame, hop, arrived)
        self.flush()

    def _unframe(self, frame: bytes, hop: int, arrived: Callable[[memoryview, int], None]) -> None:
        """`unframe` and `_arrived` in one loop for the PDUs of one frame, the common cases inline (an SDU
        for a flow of ours, a PDU forwarded, without congestion avoidance); the rest goes to `arrived`."""
        if not self.INLINE_ARRIVALS:
            pdus_, malformed_ = unframe(frame)
            self.counters.received += len(pdus_) + malformed_
            self.counters.malformed += malformed_
            for pdu in pdus_:
                arrived(pdu, hop)
            return
        c, me, flows, delivering = self.counters, self.me, self.flows, self._delivering
        pci_size, ttl_offset = self.fmt.size, self.fmt.ttl_offset
        unpack_pci = self.fmt.struct.unpack_from
        plain, next_link, pack = self._plain, self._next_link, self._pack
        unpack_len = LEN.unpack_from
        view = memoryview(frame)
        end, at, pdus = len(view), 0, 0
        malformed = False
        while at < end:
            if end - at < FRAMING:
                malformed = True
                break
            (size,) = unpack_len(view, at)
            at += FRAMING
            if not size or at + size > end:
                malformed = True
                break
            pdus += 1
            nxt = at + size
            if size >= pci_size:
                dst, _, ttl, _, eid = unpack_pci(view, at)
                if dst == me:
                    if eid != MGMT_EID and (flow := flows.get(eid)) is not None and flow.rx is None:
                        if not flow.inbox:
                            delivering.append(flow)
                        flow.inbox.append(view[at + pci_size : nxt])
                        at = nxt
                        continue
                elif plain and ttl > 1 and (link := next_link(dst, eid)) is not None:  # forwarded, unmarked
                    buf = bytearray(view[at:nxt])
                    buf[ttl_offset] = ttl - 1
                    pack(link, (buf,))
                    c.forwarded += 1
                    at = nxt
                    continue
            arrived(view[at:nxt], hop)
            at = nxt
        malformed = malformed or not pdus
        c.received += pdus + malformed
        c.malformed += malformed

    def _arrived(self, pdu: bytes | memoryview, hop: int) -> None:
        """A PDU from neighbour `hop` (its frame's seal checked), or from ourselves."""
        fmt, c = self.fmt, self.counters
        size = fmt.size
        if len(pdu) < size:
            c.malformed += 1
            return
        dst, _, ttl, ecn, eid = fmt.struct.unpack_from(pdu)
        if dst != self.me:
            if ttl <= 1:
                c.ttl_expired += 1
                return
            buf = bytearray(pdu)
            buf[fmt.ttl_offset] = ttl - 1
            if self._route(dst, (buf,), eid, mark=True):
                c.forwarded += 1
            return
        if eid == MGMT_EID:
            c.mgmt_in += 1
            self.on_mgmt(bytes(pdu[size:]), hop)
            return
        flow = self.flows.get(eid)
        if flow is None:  # (a PDU with no SDU carries a keepalive of the flow: delivered empty)
            c.no_flow += 1
            return
        if flow.rx is not None and (update := flow.rx.on_pdu(ecn, len(pdu), time.monotonic())) is not None:
            self.on_congestion(flow, update)
            c.updates += 1
        if not flow.inbox:
            self._delivering.append(flow)
        flow.inbox.append(memoryview(pdu)[size:])

    def _deliver(self, flow: UniFlow) -> None:
        """Hand a flow the SDUs that arrived for it in this burst."""
        sdus, flow.inbox, c = flow.inbox, [], self.counters
        send = flow.io.send
        for i, sdu in enumerate(sdus):
            try:
                send(sdu)
            except BlockingIOError:
                flow.delivered += i
                c.delivered += i
                if self.queues.grow(flow):
                    flow.inbox = sdus[i:]  # a longer queue now: try the rest again
                    self._deliver(flow)
                    return
                c.overflow += len(sdus) - i  # the application is not keeping up: the rest waits no better
                flow.dropped += len(sdus) - i
                return
            except OSError:
                c.no_flow += len(sdus) - i
                flow.delivered += i
                c.delivered += i
                return
        flow.delivered += len(sdus)
        c.delivered += len(sdus)

    def from_app(self, flow: UniFlow, sdus: list[bytes]) -> None:
        self._send_from(flow, sdus)
        self.flush()

    def _send_from(self, flow: UniFlow, sdus: list[bytes]) -> bool:
        """Send a flow's SDUs; False if the flow is now held back. With congestion avoidance it is,
        by its pace or by its first hop's full queue: its writer blocks rather than loses SDUs."""
        if max(map(len, sdus), default=0) > self.max_sdu:
            # The IRMd's MTU is below this, but the flow's socket is the application's to write on as it
            # likes: an SDU no PDU can carry is dropped, not packed (its length would not pack: the
            # thread, and the IPCP with every flow of every user, would end).
            fit = [sdu for sdu in sdus if len(sdu) <= self.max_sdu]
            self.counters.oversized += len(sdus) - len(fit)
            flow.dropped += len(sdus) - len(fit)
            sdus = fit
        tx, hold, route, dst, hdr, eid = flow.tx, self.ca.holds, self._route, flow.dst, flow.hdr, flow.eid
        link = self._next_link(dst, eid) if not hold and dst != self.me else None
        if link is not None:  # the common case: one next hop for the whole burst, looked up once
            self._pack_burst(link, hdr, sdus)
            sent = len(sdus)
        else:
            sent = 0
            for i, sdu in enumerate(sdus):
                try:
                    if route(dst, (hdr, sdu), eid, hold):
                        sent += 1
                except QueueFull:
                    self.counters.sent += sent
                    flow.sent += sent
                    self.counters.held += 1
                    self._hold(flow, RETRY, sdus[i:])
                    return False
        self.counters.sent += sent
        flow.sent += sent
        if tx is not None and tx.paced and (wait := tx.admit(sum(map(len, sdus)), time.monotonic())) > 0:
            self.counters.paced += 1
            self._hold(flow, wait, [])
            return False
        return True
