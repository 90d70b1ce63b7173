"""ShimCore without sockets: two or three cores wired by a fake network, time passed explicitly.

The fake network delivers what `datagrams_to_send()` returns to the addressed core (a None
destination goes to every member of the sender, plus every other core when the network
"broadcasts"), with the sender's own address as the source, until nothing is left to send.
Hosts can be cut off (all their traffic dropped) and single messages dropped by a filter.
Fuzz tests (hypothesis) cover the management parser, the member-list parser and UDP framing.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Hashable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib import qos
from flowlib.qos import QosSpec
from ipcp import shim
from ipcp.shim import (
    ALLOC_RETRY,
    CACHE_TTL,
    E_NOENT,
    E_REFUSED,
    FLOW_DEALLOC,
    FLOW_REPLY,
    FLOW_REQ,
    HELLO,
    HELLO_EVERY,
    KEEPALIVE,
    KEEPALIVE_IDLE,
    MEMBER_TTL,
    MEMBERS,
    MGMT,
    NAME_GONE,
    NAME_QUERY,
    NAME_REPLY,
    OK,
    PEER_TIMEOUT,
    QUERY_RETRY,
    QUERY_TIMEOUT,
    AllocDone,
    FlowEnded,
    FlowRequested,
    Mgmt,
    QueryDone,
    ShimCore,
    ShimWireError,
    decode_qos,
    encode_qos,
)
from transports import udp

pytestmark = pytest.mark.timeout(120)

A = ("10.9.0.1", 3435)
B = ("10.9.0.2", 3435)
C = ("10.9.0.3", 3435)
T0 = 1000.0  # a monotonic clock is far from zero; MEMBER_TTL compares against it
PONG = bytes(range(32))  # a 32-byte name hash (SHA3-256 sized)
OTHER = bytes(range(1, 33))


def core(own: Hashable, peers: Iterable[Hashable] = ()) -> ShimCore:
    return ShimCore(eid_bits=32, encode_addr=udp.encode_addr, decode_addrs=udp.decode_addrs,
                    own=own, peers=list(peers))


Sent = tuple[Hashable, Hashable, Mgmt]  # src, dst, message


class Net:
    """A lossless, instant network between cores, unless told to drop."""

    def __init__(self, *cores: ShimCore, broadcast: bool = False, now: float = T0) -> None:
        self.cores = {c.own: c for c in cores}
        self.broadcast = broadcast
        self.now = now
        self.cut: set[Hashable] = set()  # hosts that neither send nor receive
        self.drop: Callable[[Hashable, Hashable, Mgmt], bool] = lambda src, dst, msg: False
        self.sent: list[Sent] = []  # everything put on the wire (delivered or not)
        self.events: dict[Hashable, list[object]] = {a: [] for a in self.cores}

    def __getitem__(self, addr: Hashable) -> ShimCore:
        return self.cores[addr]

    def _targets(self, src: Hashable, dst: Hashable | None) -> list[Hashable]:
        if dst is not None:
            return [dst]
        out = [m for m in self.cores[src].members if m != src]
        if self.broadcast:
            out += [a for a in self.cores if a != src and a not in out]
        return out

    def pump(self) -> None:
        """Deliver until every core is quiet; collect each core's events."""
        for _ in range(1000):
            moved = False
            for src, c in list(self.cores.items()):
                for dst, data in c.datagrams_to_send():
                    moved = True
                    msg = Mgmt.decode(data)  # everything a core sends must parse
                    for target in self._targets(src, dst):
                        self.sent.append((src, target, msg))
                        if src in self.cut or target in self.cut or self.drop(src, target, msg):
                            continue
                        if target in self.cores:
                            self.cores[target].receive(data, src, self.now)
            for addr, c in self.cores.items():
                while (ev := c.next_event()) is not None:
                    self.events[addr].append(ev)
            if not moved:
                return
        raise AssertionError("the cores never went quiet")

    def tick(self, now: float) -> None:
        """Move the clock to `now`, run every core's timer, deliver."""
        self.now = now
        for addr, c in self.cores.items():
            if addr not in self.cut:
                c.handle_timer(now)
        self.pump()

    def run(self, seconds: float, step: float = 0.1, each: Callable[[], None] | None = None) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            if each is not None:
                each()
            self.tick(round(self.now + step, 6))

    def boot(self) -> None:
        """The first timer run of every core (HELLOs to configured peers), at the current time."""
        self.tick(self.now)

    def take(self, addr: Hashable, kind: type) -> list[object]:
        """And remove: the events of `kind` that `addr`'s core produced."""
        mine = [e for e in self.events[addr] if isinstance(e, kind)]
        self.events[addr] = [e for e in self.events[addr] if not isinstance(e, kind)]
        return mine

    def count(self, code: int, src: Hashable | None = None, dst: Hashable | None = None) -> int:
        return sum(1 for s, d, m in self.sent
                   if m.code == code and (src is None or s == src) and (dst is None or d == dst))


def connect(net: Net, src: Hashable, dst: Hashable, digest: bytes = PONG,
            spec: QosSpec = qos.raw) -> tuple[int, int]:
    """A flow from src to dst, accepted; (src's eid, dst's eid)."""
    flow = net[src].alloc(digest, spec, dst, net.now, 5.0)
    net.pump()
    (req,) = net.take(dst, FlowRequested)
    accepted = net[dst].accept(req, net.now)
    net.pump()
    assert net.take(src, AllocDone) == [AllocDone(flow.eid, OK)]
    return flow.eid, accepted.eid


# -- name resolution ----------------------------------------------------------------


def test_a_query_is_answered_by_a_configured_member() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    net[B].query(PONG, net.now)
    net.pump()
    assert net.take(B, QueryDone) == [QueryDone(PONG, A)]
    assert net[B].resolved(PONG, net.now) == A
    assert net.count(NAME_REPLY, src=A, dst=B) == 1


def test_a_query_for_an_unregistered_name_gets_no_reply() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(OTHER, True)
    net[B].query(PONG, net.now)
    net.pump()
    assert net.count(NAME_QUERY, src=B, dst=A) == 1
    assert net.count(NAME_REPLY) == 0
    assert net.take(B, QueryDone) == []


def test_broadcast_resolves_without_any_configured_member() -> None:
    net = Net(core(A), core(B), core(C), broadcast=True)
    net[C].register(PONG, True)
    net[A].query(PONG, net.now)
    net.pump()
    assert net.take(A, QueryDone) == [QueryDone(PONG, C)]


def test_resolution_is_cached_until_cache_ttl() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    net[B].query(PONG, net.now)
    net.pump()
    net.take(B, QueryDone)
    queries = net.count(NAME_QUERY)

    net.now = T0 + CACHE_TTL - 1
    net[B].query(PONG, net.now)  # a hit: answered at once, nothing sent
    assert net[B].next_event() == QueryDone(PONG, A)
    assert net[B].datagrams_to_send() == []
    assert net.count(NAME_QUERY) == queries

    net.now = T0 + CACHE_TTL + 0.01  # expired: asks again
    assert net[B].resolved(PONG, net.now) is None
    net[B].query(PONG, net.now)
    net.pump()
    assert net.count(NAME_QUERY) == queries + 1
    assert net.take(B, QueryDone) == [QueryDone(PONG, A)]
    assert net[B].resolved(PONG, T0 + 2 * CACHE_TTL - 1) == A  # the new entry has a fresh TTL


def test_a_query_retries_then_times_out_with_no_address() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net.pump()
    net.run(QUERY_TIMEOUT - 0.05, step=0.05)
    assert net.take(B, QueryDone) == [], "timed out early"
    retries = net.count(NAME_QUERY, src=B)
    expected = 1 + int((QUERY_TIMEOUT - 0.05) / QUERY_RETRY)
    assert expected - 1 <= retries <= expected + 1, f"{retries} query transmissions"
    net.run(0.1, step=0.05)
    assert net.take(B, QueryDone) == [QueryDone(PONG, None)]
    after = net.count(NAME_QUERY, src=B)
    net.run(2.0)
    assert net.take(B, QueryDone) == [], "QueryDone reported twice"
    assert net.count(NAME_QUERY, src=B) == after, "still asking after the timeout"


def test_a_lost_query_is_retransmitted_and_still_resolves() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    first = [True]

    def lose_first(src: Hashable, dst: Hashable, msg: Mgmt) -> bool:
        if msg.code == NAME_QUERY and first[0]:
            first[0] = False
            return True
        return False

    net.drop = lose_first
    net[B].query(PONG, net.now)
    net.pump()
    assert net.take(B, QueryDone) == []
    net.run(QUERY_RETRY + 0.1, step=0.05)
    assert net.take(B, QueryDone) == [QueryDone(PONG, A)]


def test_concurrent_queries_for_one_name_send_one_query_and_one_answer() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    net[B].query(PONG, net.now)
    net[B].query(PONG, net.now)
    net.pump()
    assert net.count(NAME_QUERY, src=B) == 1
    assert net.take(B, QueryDone) == [QueryDone(PONG, A)]


def test_a_reply_with_the_wrong_cookie_is_ignored() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net[B].datagrams_to_send()
    forged = Mgmt(NAME_REPLY, cookie=12345, body=PONG).encode()
    net[B].receive(forged, C, net.now)
    assert net[B].next_event() is None
    assert net[B].resolved(PONG, net.now) is None


def test_unregistering_sends_name_gone_which_purges_peer_caches() -> None:
    net = Net(core(A), core(B, peers=[A]), core(C, peers=[A]))
    net.boot()  # A learns B and C through their HELLOs
    net[A].register(PONG, True)
    for host in (B, C):
        net[host].query(PONG, net.now)
    net.pump()
    assert net[B].resolved(PONG, net.now) == A and net[C].resolved(PONG, net.now) == A

    net[A].register(PONG, False)
    net.pump()
    assert net.count(NAME_GONE, src=A, dst=B) == 1 and net.count(NAME_GONE, src=A, dst=C) == 1
    assert net[B].resolved(PONG, net.now) is None
    assert net[C].resolved(PONG, net.now) is None
    net[B].query(PONG, net.now)  # and asking again finds nobody
    net.pump()
    net.run(QUERY_TIMEOUT + 0.1)
    assert net.take(B, QueryDone) == [QueryDone(PONG, A), QueryDone(PONG, None)]


def test_unregistering_a_name_that_was_never_registered_sends_nothing() -> None:
    a = core(A, peers=[B])
    a.register(PONG, False)
    assert a.datagrams_to_send() == []


def test_name_gone_from_another_host_does_not_purge_the_cache() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    net[B].query(PONG, net.now)
    net.pump()
    net[B].receive(Mgmt(NAME_GONE, body=PONG).encode(), C, net.now)
    assert net[B].resolved(PONG, net.now) == A


# -- flow allocation ----------------------------------------------------------------


@pytest.mark.parametrize("spec", [qos.raw, qos.best_effort, qos.video, qos.voice, qos.data],
                         ids=["raw", "best", "video", "voice", "data"])
def test_a_flow_request_is_accepted_and_both_ends_know_each_others_eid(spec: QosSpec) -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    flow = net[B].alloc(PONG, spec, A, net.now, 5.0)
    assert flow.remote_eid == 0
    net.pump()
    (req,) = net.take(A, FlowRequested)
    assert req == FlowRequested(B, flow.eid, PONG, spec)
    assert net.take(B, AllocDone) == [], "done before the peer decided"
    theirs = net[A].accept(req, net.now)
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, OK)]
    assert net[B].flows[flow.eid].remote_eid == theirs.eid
    assert net[A].flows[theirs.eid].remote_eid == flow.eid
    assert net[A].flows[theirs.eid].addr == B and net[B].flows[flow.eid].addr == A


def test_data_endpoints_travel_in_the_handshake() -> None:
    """Transports with per-flow data endpoints (udp's own port per flow) exchange them here."""
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0, endpoint=b"\x9c\x41")
    net.pump()
    (req,) = net.take(A, FlowRequested)
    assert req.endpoint == b"\x9c\x41" and req.digest == PONG
    net[A].accept(req, net.now, endpoint=b"\x12\x34")
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, OK, b"\x12\x34")]


def test_a_refusal_carries_no_endpoint() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0, endpoint=b"\x00\x01")
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net[A].refuse(req, E_REFUSED)
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, E_REFUSED, b"")]


def test_a_refused_flow_request_reports_the_refusal_and_forgets_the_flow() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net[A].refuse(req, E_REFUSED)
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, E_REFUSED)]
    assert flow.eid not in net[B].flows
    assert net[A].flows == {}
    net.run(ALLOC_RETRY * 3)  # no retransmission after the answer
    assert net.count(FLOW_REQ, src=B) == 1


def test_a_flow_request_for_a_name_not_registered_there_gets_noent_and_purges_the_cache() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    net[B].query(PONG, net.now)
    net.pump()
    net[A].registered.discard(PONG)  # gone without a NAME_GONE (say it was lost)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    assert net.take(A, FlowRequested) == []
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, E_NOENT)]
    assert net[B].resolved(PONG, net.now) is None, "a stale cache entry survived E_NOENT"


def test_an_allocation_to_a_silent_peer_retransmits_then_times_out() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net.cut.add(A)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 2.0)
    net.pump()
    net.run(1.9, step=0.05)
    assert net.take(B, AllocDone) == []
    sent = net.count(FLOW_REQ, src=B)
    assert 3 <= sent <= 5, f"{sent} FLOW_REQ transmissions in 1.9 s (retry every {ALLOC_RETRY} s)"
    net.run(0.2, step=0.05)
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, -1)]
    assert net[B].flows == {}


def test_a_retransmitted_request_after_the_accept_is_answered_again_with_the_same_eid() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    lost = [0]

    def lose_first_reply(src: Hashable, dst: Hashable, msg: Mgmt) -> bool:
        if msg.code == FLOW_REPLY and lost[0] == 0:
            lost[0] += 1
            return True
        return False

    net.drop = lose_first_reply
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    theirs = net[A].accept(req, net.now, endpoint=b"\x0b\xb8")
    net.pump()  # that reply is lost
    assert net.take(B, AllocDone) == []
    net.run(ALLOC_RETRY + 0.1)
    assert net.take(A, FlowRequested) == [], "a retransmission was taken for a new request"
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, OK, b"\x0b\xb8")]
    assert net[B].flows[flow.eid].remote_eid == theirs.eid
    assert list(net[A].flows) == [theirs.eid], "the retransmission made a second flow"
    replies = [m for s, d, m in net.sent if m.code == FLOW_REPLY]
    assert len(replies) == 2 and all(m.s_eid == theirs.eid and m.result == OK for m in replies)


def test_a_retransmitted_request_while_the_peer_decides_is_not_answered_as_a_refusal() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net.run(ALLOC_RETRY * 2 + 0.1)  # the peer takes a while (starting a server program, say)
    assert net.count(FLOW_REQ, src=B) >= 2
    assert net.take(A, FlowRequested) == []
    assert net.take(B, AllocDone) == [], "the allocation ended while the peer was still deciding"
    net[A].accept(req, net.now)
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, OK)]


def test_a_retransmitted_request_after_a_lost_refusal_is_decided_again_not_accepted() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    lost = [False]

    def lose_first_reply(src: Hashable, dst: Hashable, msg: Mgmt) -> bool:
        if msg.code == FLOW_REPLY and not lost[0]:
            lost[0] = True
            return True
        return False

    net.drop = lose_first_reply
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net[A].refuse(req, E_REFUSED)
    net.pump()  # the refusal is lost
    net.run(ALLOC_RETRY + 0.1)
    (again,) = net.take(A, FlowRequested)  # asked again: the IPCP decides again
    net[A].refuse(again, E_REFUSED)
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, E_REFUSED)]
    assert net[A].flows == {}


def test_a_reply_from_another_address_than_the_one_asked_is_ignored() -> None:
    net = Net(core(A), core(B, peers=[A]))
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net[B].datagrams_to_send()
    net[B].receive(Mgmt(FLOW_REPLY, OK, 77, flow.eid).encode(), C, net.now)
    assert net[B].next_event() is None
    assert net[B].flows[flow.eid].remote_eid == 0


def test_a_reply_for_an_unknown_eid_is_ignored() -> None:
    b = core(B, peers=[A])
    b.receive(Mgmt(FLOW_REPLY, OK, 77, 12345).encode(), A, T0)
    assert b.next_event() is None and b.flows == {}


# -- deallocation and liveness ------------------------------------------------------


@pytest.mark.parametrize("closer", ["requester", "acceptor"])
def test_deallocating_notifies_the_peer(closer: str) -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    b_eid, a_eid = connect(net, B, A)
    here, there, mine, theirs = (B, A, b_eid, a_eid) if closer == "requester" else (A, B, a_eid, b_eid)
    assert net[here].dealloc(mine) is not None
    net.pump()
    assert net.take(there, FlowEnded) == [FlowEnded(theirs, down=False)]
    assert net.take(here, FlowEnded) == []
    assert net[A].flows == {} and net[B].flows == {}
    assert net[here].dealloc(mine) is None  # twice is harmless
    net.pump()
    assert net.count(FLOW_DEALLOC) == 1


def test_a_dealloc_naming_the_wrong_remote_eid_or_sender_is_ignored() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    b_eid, a_eid = connect(net, B, A)
    net[A].receive(Mgmt(FLOW_DEALLOC, s_eid=b_eid + 1, d_eid=a_eid).encode(), B, net.now)
    net[A].receive(Mgmt(FLOW_DEALLOC, s_eid=b_eid, d_eid=a_eid).encode(), C, net.now)
    assert net[A].next_event() is None and a_eid in net[A].flows


def test_keepalives_keep_an_idle_flow_up() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    _b_eid, _a_eid = connect(net, B, A)
    net.run(4 * PEER_TIMEOUT)
    assert net.take(A, FlowEnded) == [] and net.take(B, FlowEnded) == []
    asks = sum(1 for s, d, m in net.sent if m.code == KEEPALIVE and m.result == shim.KEEPALIVE_ASK)
    assert asks >= 2, "idle peers never asked for a sign of life"
    assert asks <= 2 * 4 * PEER_TIMEOUT / KEEPALIVE_IDLE + 2, f"{asks} keepalive requests: too chatty"


def test_data_from_the_peer_stands_in_for_keepalives() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    b_eid, a_eid = connect(net, B, A)

    def traffic() -> None:  # what the relay does on every SDU
        net[A].flows[a_eid].rx = True
        net[B].flows[b_eid].rx = True

    net.run(3 * PEER_TIMEOUT, each=traffic)
    assert net.count(KEEPALIVE) == 0
    assert net.take(A, FlowEnded) == [] and net.take(B, FlowEnded) == []


def test_a_silent_peer_takes_its_flows_down_after_peer_timeout() -> None:
    net = Net(core(A), core(B, peers=[A, C]), core(C))
    net[A].register(PONG, True)
    net[C].register(PONG, True)
    b1, _ = connect(net, B, A)
    b2, _ = connect(net, B, A)
    b3, _c3 = connect(net, B, C)
    net.cut.add(A)  # A vanishes
    net.run(PEER_TIMEOUT - 0.2)
    assert net.take(B, FlowEnded) == [], "down before PEER_TIMEOUT"
    net.run(1.0)
    ended = net.take(B, FlowEnded)
    assert sorted(ended, key=lambda e: e.eid) == sorted(
        [FlowEnded(b1, down=True), FlowEnded(b2, down=True)], key=lambda e: e.eid)
    assert list(net[B].flows) == [b3], "the flow to the live peer went down too"
    net.run(2 * PEER_TIMEOUT)
    assert net.take(B, FlowEnded) == [] and net.take(C, FlowEnded) == []


def test_a_peer_that_comes_back_in_time_keeps_its_flows() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(PONG, True)
    connect(net, B, A)
    net.cut.add(A)
    net.run(PEER_TIMEOUT - 1.5)
    net.cut.discard(A)
    net.run(3 * PEER_TIMEOUT)
    assert net.take(B, FlowEnded) == [] and net.take(A, FlowEnded) == []


# -- members and gossip ---------------------------------------------------------------


def test_configuring_any_one_member_is_enough_c_learns_a_through_b() -> None:
    net = Net(core(A), core(B, peers=[A]), core(C, peers=[B]))
    net.boot()
    assert A in net[C].members, "C did not learn A from B"
    assert C in net[A].members, "A did not learn C"
    assert net[C].static_peers == {B}
    net[A].register(PONG, True)
    net[C].query(PONG, net.now)
    net.pump()
    assert net.take(C, QueryDone) == [QueryDone(PONG, A)]
    # and a flow across the learned membership
    net.take(A, FlowRequested)
    _c_eid, a_eid = connect(net, C, A)
    assert net[A].flows[a_eid].addr == C


def test_a_member_that_joins_later_is_learned_at_the_next_hello_round() -> None:
    net = Net(core(A), core(B), core(C, peers=[B]))
    net.boot()  # C knows B; B knows C; nobody knows A
    assert A not in net[C].members
    net[B].static_peers.add(A)  # A joins through B, after C's HELLO
    net[B].members[A] = 0.0
    net.run(HELLO_EVERY + 0.5)
    assert A in net[C].members and C in net[A].members
    net[A].register(PONG, True)
    net[C].query(PONG, net.now)
    net.pump()
    assert net.take(C, QueryDone) == [QueryDone(PONG, A)]


def test_a_learned_member_that_goes_silent_is_forgotten_but_a_configured_one_is_kept() -> None:
    net = Net(core(A), core(B, peers=[A]), core(C, peers=[B]))
    net.boot()
    assert A in net[C].members
    net.cut.update({A, B})
    net.run(MEMBER_TTL + HELLO_EVERY + 1, step=0.5)
    assert A not in net[C].members, "a silent learned member was kept forever"
    assert B in net[C].members, "a configured peer was dropped"


def test_members_lists_never_include_the_receiver_or_garbage() -> None:
    net = Net(core(A), core(B, peers=[A]), core(C, peers=[A]))
    net.boot()
    for src, dst, msg in net.sent:
        if msg.code == MEMBERS:
            listed = udp.decode_addrs(msg.body)
            assert dst not in listed
            assert udp.encode_addr(dst) not in msg.body or dst == src
    assert net[A].own not in net[A].members


# -- fuzzing the parsers ----------------------------------------------------------------

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_SLOW = settings(FUZZ, max_examples=250)  # strategies that build whole message sequences


def _busy_core() -> tuple[ShimCore, list[int]]:
    """A core with state for messages to hit: a registered name, pending and live flows."""
    c = core(A, peers=[B])
    c.register(PONG, True)
    c.query(OTHER, T0)
    pending = c.alloc(PONG, qos.raw, B, T0, 5.0)
    live = c.alloc(OTHER, qos.raw, C, T0, 5.0)
    c.receive(Mgmt(FLOW_REPLY, OK, 99, live.eid).encode(), C, T0)
    c.datagrams_to_send()
    while c.next_event() is not None:
        pass
    return c, [pending.eid, live.eid, 99]


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_receive_of_arbitrary_bytes_never_raises_and_counts_drops(data: bytes) -> None:
    c, _ = _busy_core()
    try:
        Mgmt.decode(data)
        valid = True
    except ShimWireError:
        valid = False
    before = c.dropped
    c.receive(data, C, T0 + 1)
    if not valid:
        assert c.dropped == before + 1
    c.handle_timer(T0 + 2)
    for _, out in c.datagrams_to_send():
        Mgmt.decode(out)  # whatever it answers is well formed


ADDRS = st.sampled_from([A, B, C, ("127.0.0.1", 1), ("10.9.0.255", 3435)])


@st.composite
def mgmt_messages(draw: st.DrawFn) -> bytes:
    """Well-framed management messages with arbitrary fields and bodies (or a chopped one)."""
    code = draw(st.integers(1, 9) | st.integers(0, 255))
    eids = st.sampled_from([0, 99, 1, 0xFFFFFFFF]) | st.integers(0, 0xFFFFFFFF)
    body = draw(st.one_of(
        st.binary(max_size=200),
        st.just(PONG), st.just(OTHER),
        st.builds(lambda q, h: encode_qos(q) + h, st.sampled_from(list(qos.PRESETS.values())),
                  st.binary(max_size=80)),
        st.builds(lambda q, h, e: encode_qos(q) + bytes([len(h)]) + h + e,
                  st.sampled_from(list(qos.PRESETS.values())),
                  st.sampled_from([PONG, OTHER, b"", bytes(65)]) | st.binary(max_size=70),
                  st.binary(max_size=4)),
        st.lists(ADDRS, max_size=5).map(lambda xs: b"".join(udp.encode_addr(x) for x in xs)),
    ))
    result = draw(st.integers(0, 255))
    msg = Mgmt(code, result, draw(eids), draw(eids), draw(st.integers(0, 2**64 - 1)), body)
    data = MGMT.pack(code, result, len(body), msg.s_eid, msg.d_eid, msg.cookie) + body
    cut = draw(st.none() | st.integers(0, len(data)))
    return data if cut is None else data[:cut]


@FUZZ_SLOW
@given(st.lists(st.tuples(mgmt_messages(), ADDRS), min_size=1, max_size=8))
def test_fuzz_well_framed_messages_with_arbitrary_fields_never_crash_the_core(
        msgs: list[tuple[bytes, Hashable]]) -> None:
    c, eids = _busy_core()
    now = T0
    for data, src in msgs:
        # aim some messages at the live flows
        if len(data) >= MGMT.size and data[0] in (FLOW_REPLY, FLOW_DEALLOC):
            data = data[:12] + struct.pack("!I", eids[data[1] % len(eids)]) + data[16:]
        now += 0.3
        c.receive(data, src, now)
        c.handle_timer(now)
        for _, out in c.datagrams_to_send():
            Mgmt.decode(out)
        while (ev := c.next_event()) is not None:
            if isinstance(ev, FlowRequested):  # the I/O loop answers every request
                if ev.remote_eid % 2:
                    c.accept(ev, now)
                else:
                    c.refuse(ev, E_REFUSED)
    c.handle_timer(now + PEER_TIMEOUT + MEMBER_TTL + HELLO_EVERY)
    c.datagrams_to_send()


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_mgmt_decode_raises_only_shim_wire_error(data: bytes) -> None:
    try:
        msg = Mgmt.decode(data)
    except ShimWireError:
        return
    assert msg.encode() == data  # what parses re-encodes to the same bytes


@FUZZ
@given(mgmt_messages())
def test_fuzz_mgmt_decode_of_well_framed_messages_raises_only_shim_wire_error(data: bytes) -> None:
    try:
        msg = Mgmt.decode(data)
    except ShimWireError:
        return
    assert msg.encode() == data


@FUZZ
@given(st.binary(max_size=100))
def test_fuzz_decode_qos_raises_only_shim_wire_error(data: bytes) -> None:
    try:
        spec = decode_qos(data)
    except ShimWireError:
        assert len(data) < shim.QOS.size
        return
    assert isinstance(spec, QosSpec)


@pytest.mark.parametrize("spec", list(qos.PRESETS.values()))
def test_qos_survives_the_wire(spec: QosSpec) -> None:
    assert decode_qos(encode_qos(spec)) == spec


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_decode_addrs_never_raises(data: bytes) -> None:
    addrs = udp.decode_addrs(data)
    for ip, port in addrs:  # type: ignore[misc]
        assert isinstance(ip, str) and 0 <= port <= 0xFFFF


@FUZZ_SLOW
@given(st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).flatmap(
    lambda ip: st.tuples(st.just(str(ip)), st.integers(0, 0xFFFF))), max_size=10),
    st.binary(max_size=20))
def test_fuzz_decode_addrs_round_trips_members_lists(addrs: list[tuple[str, int]], tail: bytes) -> None:
    data = b"".join(udp.encode_addr(a) for a in addrs)
    usable = [(ip, port) for ip, port in addrs
              if port and not (ipaddress.ip_address(ip).is_multicast or ipaddress.ip_address(ip).is_unspecified)]
    assert udp.decode_addrs(data) == usable  # port 0, multicast and unspecified addresses are never members
    got = udp.decode_addrs(data + tail)  # trailing garbage may add entries, never lose or raise
    assert got[: len(usable)] == usable


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from([("127.0.0.1", 5), ("10.9.0.1", 3435, 0, 0)]))
def test_fuzz_udp_framing_parse_never_raises(frame: bytes, src: tuple[str, int]) -> None:
    parsed = udp.UdpFraming.parse(frame, src)
    if len(frame) < udp.EID.size:
        assert parsed is None
        return
    assert parsed is not None
    eid, sdu, peer = parsed
    assert eid == int.from_bytes(frame[:4], "big")
    assert bytes(sdu) == frame[4:]
    assert peer == src[:2]


def test_every_code_is_named_once() -> None:
    codes = [FLOW_REQ, FLOW_REPLY, FLOW_DEALLOC, KEEPALIVE, NAME_QUERY, NAME_REPLY, NAME_GONE, HELLO, MEMBERS]
    assert sorted(codes) == list(shim.CODES)
