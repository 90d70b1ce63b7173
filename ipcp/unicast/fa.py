"""The flow allocator of a unicast IPCP, sans-IO: endpoint ids, requests under way with their
deadlines, the replies, deallocation, and flows whose destination stays unreachable.

A request goes to each member registered for the name in turn (those with a route first), each
given a share of the time left; it carries the allocation's piggyback (the IRMd's OAP request,
opaque, at most MAX_DATA bytes) and the reply carries the responder's back.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import random
from collections.abc import Callable
from typing import Any

from ipcp.unicast import messages as um
from ipcp.unicast.fsm import Machine
from proto import messages as m
from proto.qos import QosSpec
from transports.wire import Message

MAX_DATA = 4096  # bytes of piggyback a request or reply may carry
MAX_ARRIVED = 256  # requests from peers awaiting the IRMd's answer at once ...
MAX_ARRIVED_PER_MEMBER = 64  # ... of which one member's: it cannot keep the others' requests out
SEEN = 4096  # requests remembered (requester, its eid), so that one replayed is not served twice
ARRIVED_TIMEOUT = 10.0  # seconds the IRMd may take to answer one
PATH_GRACE = 10.0  # a flow whose destination stays unreachable this long goes down

Out = list[tuple[int, Message]]


class FaError(Exception):
    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


class State(enum.Enum):
    REQUESTED = enum.auto()  # ours: a request sent, waiting for the reply
    ARRIVED = enum.auto()  # theirs: waiting for the IRMd to accept it
    ALLOCATED = enum.auto()
    ENDED = enum.auto()  # deallocated by either end, or its path lost
    FAILED = enum.auto()


class Event(enum.Enum):
    RETRY = enum.auto()  # the member asked did not answer in its share of time: ask the next
    REPLIED = enum.auto()
    REFUSED = enum.auto()
    TIMEOUT = enum.auto()
    ACCEPT = enum.auto()
    DEALLOC = enum.auto()
    PEER_DEALLOC = enum.auto()
    PATH_LOST = enum.auto()


ALLOCATION = {
    (State.REQUESTED, Event.RETRY): State.REQUESTED,
    (State.REQUESTED, Event.REPLIED): State.ALLOCATED,
    (State.REQUESTED, Event.REFUSED): State.FAILED,
    (State.REQUESTED, Event.TIMEOUT): State.FAILED,
    (State.ARRIVED, Event.ACCEPT): State.ALLOCATED,
    (State.ARRIVED, Event.REFUSED): State.FAILED,
    (State.ARRIVED, Event.TIMEOUT): State.FAILED,
    (State.ALLOCATED, Event.DEALLOC): State.ENDED,
    (State.ALLOCATED, Event.PEER_DEALLOC): State.ENDED,
    (State.ALLOCATED, Event.PATH_LOST): State.ENDED,
}


@dataclasses.dataclass(eq=False)
class Alloc:
    """One flow of this IPCP, as the flow allocator sees it."""

    eid: int
    qos: QosSpec
    digest: bytes
    machine: Machine[State, Event]
    deadline: float
    flow_id: int = 0  # the IRMd's id (ours: known from the start; theirs: once accepted)
    dst: int = 0  # the peer member's address
    remote_eid: int = 0
    data: bytes = b""  # the piggyback: of the request (theirs), or of the reply (ours, once allocated)
    addrs: list[int] = dataclasses.field(default_factory=list)  # ours: members still to ask
    asked_until: float = 0.0  # ours: when the member asked now has had its share
    unreachable_since: float | None = None
    error: FaError | None = None

    @property
    def state(self) -> State:
        return self.machine.state


@dataclasses.dataclass(frozen=True)
class Allocated:
    alloc: Alloc


@dataclasses.dataclass(frozen=True)
class AllocFailed:
    alloc: Alloc


@dataclasses.dataclass(frozen=True)
class Arrived:
    """A peer asks for a flow: ask the IRMd, then accept() or refuse()."""

    alloc: Alloc


@dataclasses.dataclass(frozen=True)
class Ended:
    """A flow ended by its peer (down=False) or by losing its path (down=True)."""

    alloc: Alloc
    down: bool


FaEvent = Allocated | AllocFailed | Arrived | Ended


class FlowAllocator:
    def __init__(self, me: int, max_eid: int, reachable: Callable[[int], bool]) -> None:
        self.me = me
        self.max_eid = min(max_eid, 2**63 - 1)
        self.reachable = reachable
        self.by_eid: dict[int, Alloc] = {}
        self.by_flow: dict[int, Alloc] = {}
        self.events: list[FaEvent] = []
        self.out: Out = []
        self.refused = 0  # requests refused: too many awaiting the IRMd, or too much piggyback
        self.replayed = 0  # requests seen before, or that name another member (a copy of one sent there)
        self._seen: collections.OrderedDict[tuple[int, int], None] = collections.OrderedDict()
        # Allocations that may have a deadline (pending, or with their path lost): the timers look
        # at these alone, not at every flow (an IPCP may carry tens of thousands); pruned as they settle.
        self._timed: set[Alloc] = set()

    def pop(self) -> tuple[Out, list[FaEvent]]:
        out, events = self.out, self.events
        self.out, self.events = [], []
        return out, events

    def _new(self, qos: QosSpec, digest: bytes, deadline: float) -> Alloc:
        while True:
            eid = random.randint(1, self.max_eid)
            if eid not in self.by_eid:
                break
        alloc = Alloc(eid, qos, digest, Machine("allocation", ALLOCATION, State.REQUESTED), deadline)
        self.by_eid[eid] = alloc
        self._timed.add(alloc)
        return alloc

    def _timers(self) -> list[Alloc]:
        """The allocations with a deadline now (others leave the set: states only move on)."""
        live = [
            a
            for a in self._timed
            if a.state in (State.REQUESTED, State.ARRIVED)
            or (a.state is State.ALLOCATED and a.unreachable_since is not None and a.eid in self.by_eid)
        ]
        if len(live) < len(self._timed):
            self._timed = set(live)
        return live

    # -- ours ------------------------------------------------------------------------

    def alloc(
        self, flow_id: int, digest: bytes, qos: QosSpec, data: bytes, addrs: list[int], timeout: float, now: float
    ) -> Alloc:
        """Ask the members at `addrs` for a flow to `digest`; Allocated or AllocFailed follows."""
        if len(data) > MAX_DATA:
            raise FaError(m.EINVAL, f"allocation data of {len(data)} bytes exceeds {MAX_DATA}")
        if flow_id in self.by_flow:
            raise FaError(m.EEXIST, f"flow {flow_id} is already allocated here")
        alloc = self._new(qos, digest, now + timeout)
        alloc.flow_id, alloc.data = flow_id, data
        alloc.addrs = sorted(addrs, key=lambda a: a != self.me and not self.reachable(a))
        self.by_flow[flow_id] = alloc
        self._ask_next(alloc, now, "")
        return alloc

    def _ask_next(self, alloc: Alloc, now: float, why: str) -> None:
        while alloc.addrs:
            dst = alloc.addrs.pop(0)
            if dst != self.me and not self.reachable(dst):
                why = why or f"no route to address {dst}"
                continue
            alloc.dst = dst
            left = alloc.deadline - now  # the last one may take what is left; the others share it
            alloc.asked_until = now + (left if not alloc.addrs else left / 2)
            self.out.append((dst, um.FaReq(self.me, alloc.eid, alloc.digest, alloc.qos, alloc.data, dst)))
            return
        code = m.ETIMEDOUT if "answer" in why else m.ENOTCONN
        self._fail(alloc, Event.TIMEOUT, FaError(code, why or "no member to ask"))

    def _fail(self, alloc: Alloc, event: Event, error: FaError) -> None:
        alloc.machine.fire(event)
        alloc.error = error
        self._forget(alloc)
        self.events.append(AllocFailed(alloc))

    def _forget(self, alloc: Alloc) -> None:
        self.by_eid.pop(alloc.eid, None)
        if self.by_flow.get(alloc.flow_id) is alloc:
            del self.by_flow[alloc.flow_id]

    def dealloc(self, flow_id: int) -> Alloc | None:
        """The IRMd lets go of the flow: tell the peer."""
        alloc = self.by_flow.get(flow_id)
        if alloc is None or alloc.state is not State.ALLOCATED:
            return None
        alloc.machine.fire(Event.DEALLOC)
        self._forget(alloc)
        self.out.append((alloc.dst, um.FaDealloc(self.me, alloc.eid, alloc.remote_eid)))
        return alloc

    # -- theirs ----------------------------------------------------------------------

    def accept(self, alloc: Alloc, flow_id: int, data: bytes) -> None:
        """The IRMd took the flow as `flow_id`, answering `data`."""
        if len(data) > MAX_DATA:
            self.refuse(alloc, um.E_REFUSED)
            raise FaError(m.EINVAL, f"answer data of {len(data)} bytes exceeds {MAX_DATA}")
        alloc.machine.fire(Event.ACCEPT)
        alloc.flow_id = flow_id
        self.by_flow[flow_id] = alloc
        self.out.append((alloc.dst, um.FaReply(self.me, alloc.eid, alloc.remote_eid, um.OK, data)))

    def refuse(self, alloc: Alloc, result: int) -> None:
        if alloc.machine.can(Event.REFUSED):
            alloc.machine.fire(Event.REFUSED)
            self._forget(alloc)
            self.out.append((alloc.dst, um.FaReply(self.me, 0, alloc.remote_eid, result)))

    # -- from the layer -----------------------------------------------------------------

    def receive(self, msg: Message, now: float) -> None:
        match msg:
            case um.FaReq():
                self._on_request(msg, now)
            case um.FaReply():
                alloc = self.by_eid.get(msg.d_eid)
                if alloc is None or alloc.state is not State.REQUESTED or msg.src != alloc.dst:
                    return  # late, for another, or not from whom we asked
                if msg.result != um.OK:
                    code = um.ERRORS.get(msg.result, m.EIPCP)
                    why = {m.EAUTH: ": authentication failed", m.ECRYPT: ": it requires encryption, or the key "
                           "exchange failed"}.get(code, "")  # fmt: skip
                    self._fail(alloc, Event.REFUSED, FaError(code, f"the destination refused the flow{why}"))
                elif len(msg.data) > MAX_DATA or not 0 < msg.s_eid < 1 << 64:
                    self._fail(alloc, Event.REFUSED, FaError(m.EPROTO, "a malformed flow reply"))
                else:
                    alloc.machine.fire(Event.REPLIED)
                    alloc.remote_eid, alloc.data = msg.s_eid, msg.data
                    self.events.append(Allocated(alloc))
            case um.FaDealloc():
                alloc = self.by_eid.get(msg.d_eid)
                if (
                    alloc is not None
                    and alloc.state is State.ALLOCATED
                    and alloc.dst == msg.src
                    and alloc.remote_eid == msg.s_eid
                ):
                    alloc.machine.fire(Event.PEER_DEALLOC)
                    self._forget(alloc)
                    self.events.append(Ended(alloc, down=False))

    def _on_request(self, req: um.FaReq, now: float) -> None:
        if not 0 < req.s_eid < 1 << 64:
            return
        if req.dst != self.me or (req.src, req.s_eid) in self._seen:
            self.replayed += 1
            return
        self._seen[req.src, req.s_eid] = None
        if len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        arrived = [a for a in self._timers() if a.state is State.ARRIVED]
        theirs = sum(1 for a in arrived if a.dst == req.src)
        if len(arrived) >= MAX_ARRIVED or theirs >= MAX_ARRIVED_PER_MEMBER or len(req.data) > MAX_DATA:
            self.refused += 1
            self.out.append((req.src, um.FaReply(self.me, 0, req.s_eid, um.E_REFUSED)))
            return
        alloc = self._new(req.qos, req.hash, now + ARRIVED_TIMEOUT)
        alloc.machine.state = State.ARRIVED
        alloc.dst, alloc.remote_eid, alloc.data = req.src, req.s_eid, req.data
        self.events.append(Arrived(alloc))

    def routes_changed(self, now: float) -> None:
        """The forwarding table changed: note flows whose destination became (un)reachable."""
        for alloc in self.by_flow.values():
            if alloc.state is State.ALLOCATED and alloc.dst != self.me:
                if self.reachable(alloc.dst):
                    alloc.unreachable_since = None
                elif alloc.unreachable_since is None:
                    alloc.unreachable_since = now
                    self._timed.add(alloc)

    # -- timers (sans-IO) ------------------------------------------------------------

    def get_timer(self) -> float | None:
        due = [
            a.asked_until
            if a.state is State.REQUESTED
            else a.deadline
            if a.state is State.ARRIVED
            else a.unreachable_since + PATH_GRACE  # type: ignore[operator]
            for a in self._timers()
        ]
        return min(due, default=None)

    def handle_timer(self, now: float) -> None:
        for alloc in self._timers():
            if alloc.state is State.REQUESTED and now >= alloc.asked_until:
                alloc.machine.fire(Event.RETRY)
                self._ask_next(alloc, now, f"address {alloc.dst} did not answer the flow request")
            elif alloc.state is State.ARRIVED and now >= alloc.deadline:
                self.refuse(alloc, um.E_REFUSED)
            elif (
                alloc.state is State.ALLOCATED
                and alloc.unreachable_since is not None
                and now >= alloc.unreachable_since + PATH_GRACE
            ):
                alloc.machine.fire(Event.PATH_LOST)
                self._forget(alloc)
                self.events.append(Ended(alloc, down=True))


def table_rows(fa: FlowAllocator) -> list[list[Any]]:
    return [
        [str(a.flow_id), str(a.eid), str(a.dst), str(a.remote_eid), a.state.name.lower()] for a in fa.by_eid.values()
    ]
