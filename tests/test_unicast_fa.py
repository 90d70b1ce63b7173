"""The unicast flow allocator, sans-IO: two FlowAllocator cores wired by hand through the
management codec, time passed explicitly. Requests carry the allocation's piggyback both ways,
unanswered requests move on to the next member, flows whose path is lost go down; the
allocation table refuses what it does not list."""

from __future__ import annotations

import pytest

from ipcp.unicast import messages as um
from ipcp.unicast.fa import (
    ARRIVED_TIMEOUT,
    MAX_ARRIVED,
    MAX_ARRIVED_PER_MEMBER,
    MAX_DATA,
    PATH_GRACE,
    Allocated,
    AllocFailed,
    Arrived,
    Ended,
    Event,
    FaError,
    FlowAllocator,
    State,
)
from ipcp.unicast.fsm import IllegalTransition
from proto.qos import QosSpec

QOS = QosSpec()
NAME = b"\x11" * 32


class Net:
    """Allocators by address; messages pass through the codec; routes can be cut."""

    def __init__(self, *addrs: int) -> None:
        self.routes = set(addrs)
        self.fa = {a: FlowAllocator(a, 2**64 - 1, self.routes.__contains__) for a in addrs}
        self.events: dict[int, list[object]] = {a: [] for a in addrs}
        self.sent: list[tuple[int, um.Message]] = []

    def run(self, now: float = 0.0) -> None:
        busy = True
        while busy:
            busy = False
            for a, fa in self.fa.items():
                out, events = fa.pop()
                self.events[a] += events
                for dst, msg in out:
                    busy = True
                    self.sent.append((dst, msg))
                    if dst in self.fa and dst in self.routes:
                        self.fa[dst].receive(um.CODEC.decode(um.CODEC.encode(msg)).msg, now)

    def arrived(self, addr: int) -> Arrived:
        ev = next(e for e in self.events[addr] if isinstance(e, Arrived))
        self.events[addr].remove(ev)
        return ev


def test_allocation_carries_the_piggyback_both_ways() -> None:
    net = Net(1, 2)
    mine = net.fa[1].alloc(7, NAME, QOS, b"oap request", [2], 10.0, 0.0)
    net.run()
    theirs = net.arrived(2).alloc
    assert theirs.data == b"oap request" and theirs.state is State.ARRIVED and theirs.dst == 1
    net.fa[2].accept(theirs, 40, b"oap response")
    net.run()
    assert net.events[1] == [Allocated(mine)]
    assert mine.state is State.ALLOCATED and mine.data == b"oap response"
    assert (mine.remote_eid, theirs.remote_eid) == (theirs.eid, mine.eid) and mine.dst == 2


def test_piggyback_is_bounded_at_both_ends() -> None:
    net = Net(1, 2)
    with pytest.raises(FaError, match="exceeds"):
        net.fa[1].alloc(7, NAME, QOS, b"x" * (MAX_DATA + 1), [2], 10.0, 0.0)
    net.fa[2].receive(um.FaReq(1, 99, NAME, QOS, b"x" * (MAX_DATA + 1), 2), 0.0)  # from a peer that did not check
    out, events = net.fa[2].pop()
    assert events == [] and out == [(1, um.FaReply(2, 0, 99, um.E_REFUSED))] and net.fa[2].refused == 1


def test_a_refusal_fails_the_allocation_saying_why() -> None:
    net = Net(1, 2)
    mine = net.fa[1].alloc(7, NAME, QOS, b"", [2], 10.0, 0.0)
    net.run()
    net.fa[2].refuse(net.arrived(2).alloc, um.E_NOENT)
    net.run()
    assert net.events[1] == [AllocFailed(mine)] and mine.error is not None and mine.error.code == "ENOENT"
    assert 7 not in net.fa[1].by_flow and not net.fa[2].by_eid


def test_an_unanswered_request_moves_on_to_the_next_member_then_times_out() -> None:
    net = Net(1, 2, 3)
    fa = net.fa[1]
    mine = fa.alloc(7, NAME, QOS, b"", [3, 2], 10.0, 0.0)
    assert fa.pop()[0][0][0] == 3 and fa.get_timer() == 5.0  # the first gets half the time
    fa.handle_timer(5.0)
    out, _ = fa.pop()
    assert out[0][0] == 2 and fa.get_timer() == 10.0  # the last gets what is left
    fa.handle_timer(10.0)
    assert fa.pop()[1] == [AllocFailed(mine)] and mine.error is not None and mine.error.code == "ETIMEDOUT"


def test_a_reply_from_someone_not_asked_is_ignored() -> None:
    net = Net(1, 2)
    mine = net.fa[1].alloc(7, NAME, QOS, b"", [2], 10.0, 0.0)
    net.fa[1].receive(um.FaReply(66, 5, mine.eid), 0.0)
    assert mine.state is State.REQUESTED


def test_dealloc_ends_the_flow_at_the_peer_and_a_forged_one_does_not() -> None:
    net = Net(1, 2)
    mine = net.fa[1].alloc(7, NAME, QOS, b"", [2], 10.0, 0.0)
    net.run()
    theirs = net.arrived(2).alloc
    net.fa[2].accept(theirs, 40, b"")
    net.run()
    net.fa[2].receive(um.FaDealloc(3, mine.eid, theirs.eid), 0.0)  # not from its peer
    net.fa[2].receive(um.FaDealloc(1, mine.eid + 1, theirs.eid), 0.0)  # not its eids
    assert theirs.state is State.ALLOCATED
    net.fa[1].dealloc(7)
    net.run()
    assert net.events[2] == [Ended(theirs, down=False)] and not net.fa[2].by_flow
    with pytest.raises(IllegalTransition, match="DEALLOC is not allowed in state ENDED"):
        theirs.machine.fire(Event.DEALLOC)


def test_a_flow_whose_path_stays_lost_goes_down_after_the_grace() -> None:
    net = Net(1, 2)
    mine = net.fa[1].alloc(7, NAME, QOS, b"", [2], 10.0, 0.0)
    net.run()
    net.fa[2].accept(net.arrived(2).alloc, 40, b"")
    net.run()
    net.routes.discard(2)
    net.fa[1].routes_changed(1.0)
    assert net.fa[1].get_timer() == 1.0 + PATH_GRACE
    net.routes.add(2)  # back in time: nothing happens
    net.fa[1].routes_changed(2.0)
    assert net.fa[1].get_timer() is None
    net.routes.discard(2)
    net.fa[1].routes_changed(3.0)
    net.fa[1].handle_timer(3.0 + PATH_GRACE)
    assert net.fa[1].pop()[1] == [Ended(mine, down=True)]


def test_requests_awaiting_the_irmd_are_bounded_and_time_out() -> None:
    fa = FlowAllocator(2, 2**64 - 1, lambda a: True)
    for i in range(MAX_ARRIVED + 5):  # from members enough that none reaches its own share
        fa.receive(um.FaReq(10 + i % 8, i + 1, NAME, QOS, dst=2), 0.0)
    out, events = fa.pop()
    assert len(events) == MAX_ARRIVED and fa.refused == 5
    assert sum(1 for _, msg in out if isinstance(msg, um.FaReply) and msg.result == um.E_REFUSED) == 5
    fa.handle_timer(ARRIVED_TIMEOUT)
    out, _ = fa.pop()
    assert len(out) == MAX_ARRIVED and not fa.by_eid  # each refused: the IRMd never answered
    with pytest.raises(IllegalTransition):
        fa.accept(events[0].alloc, 9, b"")  # type: ignore[union-attr]


def test_a_replayed_request_is_not_served_twice() -> None:
    net = Net(1, 2)
    net.fa[1].alloc(7, NAME, QOS, b"", [2], 10.0, 0.0)
    net.run()
    req = next(msg for _, msg in net.sent if isinstance(msg, um.FaReq))
    net.fa[2].receive(req, 1.0)
    out, events = net.fa[2].pop()
    assert out == [] and [e for e in events if isinstance(e, Arrived)] == [] and net.fa[2].replayed == 1


def test_one_member_holds_only_its_share_of_the_requests_awaiting_the_irmd() -> None:
    """A member that asks for flows by the hundred and never sees them answered (the IRMd waits for an
    application's accept) once held all MAX_ARRIVED slots: every other member's request was refused."""
    fa = FlowAllocator(2, 2**64 - 1, lambda a: True)
    for i in range(MAX_ARRIVED):
        fa.receive(um.FaReq(9, i + 1, NAME, QOS, dst=2), 0.0)
    out, events = fa.pop()
    assert len(events) == MAX_ARRIVED_PER_MEMBER < MAX_ARRIVED
    assert fa.refused == MAX_ARRIVED - MAX_ARRIVED_PER_MEMBER
    assert all(dst == 9 and isinstance(msg, um.FaReply) and msg.result == um.E_REFUSED for dst, msg in out)
    fa.receive(um.FaReq(1, 1, NAME, QOS, dst=2), 0.0)  # another member's request still arrives
    out, events = fa.pop()
    assert out == [] and [type(e) for e in events] == [Arrived] and events[0].alloc.dst == 1
    fa.handle_timer(ARRIVED_TIMEOUT)  # once its requests are refused in turn, the member may ask again
    fa.pop()
    fa.receive(um.FaReq(9, MAX_ARRIVED + 1, NAME, QOS, dst=2), ARRIVED_TIMEOUT)
    assert [type(e) for e in fa.pop()[1]] == [Arrived]


def test_a_request_taken_to_another_member_is_not_served_there() -> None:
    """A request names the member asked, under the requester's signature: a forwarder that copied one
    sent to 2 and took it to 3 (which serves the same name) once had 3 hand its IRMd an allocation,
    piggyback and all, that 1 never asked of it."""
    net = Net(1, 2, 3)
    net.fa[1].alloc(7, NAME, QOS, b"oap request", [2], 10.0, 0.0)
    net.run()
    req = next(msg for _, msg in net.sent if isinstance(msg, um.FaReq))
    assert req.dst == 2 and net.arrived(2).alloc.data == b"oap request"  # 2, asked, has it
    net.fa[3].receive(req, 1.0)
    out, events = net.fa[3].pop()
    assert out == [] and events == [] and net.fa[3].replayed == 1
