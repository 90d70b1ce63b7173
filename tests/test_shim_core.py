"""ShimCore without sockets: cores wired by a fake network, time passed explicitly.

The fake network delivers what `datagrams_to_send()` returns to the addressed core (a None
destination goes to every member of the sender, plus every other core when the network
"broadcasts"), with the sender's own address as the source, until nothing is left to send.
Hosts can be cut off and single messages dropped by a filter. A host may also be a "0.23 peer":
a stand-in that answers as an Ouroboros 0.23 node would (tests/shim_peer.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Hashable, Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib import qos
from flowlib.qos import QosSpec
from ipcp.shim import (
    ALLOC_RETRY,
    AMPLIFICATION,
    CACHE_TTL,
    HELLO_EVERY,
    KEEPALIVE_IDLE,
    MEMBER_TTL,
    PEER_TIMEOUT,
    QUARANTINE,
    QUERY_RETRY,
    QUERY_TIMEOUT,
    AllocDone,
    FlowEnded,
    FlowRequested,
    Limits,
    QueryDone,
    ShimCore,
    ShimFlow,
)
from ipcp.shim_wire import COOKIE, ERRNO, ETH_DIX, ETH_LLC, UDP, Kind, Layout, Mgmt, Offer, ShimWireError
from transports import udp

pytestmark = pytest.mark.timeout(120)

A = ("10.9.0.1", 3435)
B = ("10.9.0.2", 3435)
C = ("10.9.0.3", 3435)
MAC_A, MAC_B, MAC_C = (bytes.fromhex(f"02000000000{i}") for i in "abc")
T0 = 1000.0  # a monotonic clock is far from zero; MEMBER_TTL compares against it
PONG = bytes(range(16))  # a 16-byte name hash (MD5 sized, as udp's)
OTHER = bytes(range(1, 17))
OAP_REQ = b"\x9a" * 16 + bytes(8) + bytes(12)  # opaque to the shim: carried as it is
OAP_RESP = b"\x9a" * 16 + bytes(20) + b"\xe6" * 48


def core(
    own: Hashable,
    peers: Iterable[Hashable] = (),
    layout: Layout = UDP,
    limits: Limits | None = None,
    hash_len: int = 16,
) -> ShimCore:
    limits = limits or Limits()
    if layout is UDP:
        return ShimCore(
            UDP,
            hash_len=hash_len,
            own=own,
            discovery=True,
            encode_addr=udp.encode_addr,
            decode_addrs=udp.decode_addrs,
            peers=list(peers),
            limits=limits,
        )
    return ShimCore(layout, hash_len=hash_len, own=own, discovery=False, limits=limits)


@dataclasses.dataclass(frozen=True)
class Sent:
    src: Hashable
    dst: Hashable
    kind: Kind
    msg: Mgmt
    size: int


class Net:
    """A lossless, instant network between cores, unless told to drop."""

    def __init__(self, *cores: ShimCore, broadcast: bool = False, now: float = T0) -> None:
        self.cores = {c.own: c for c in cores}
        self.broadcast = broadcast
        self.now = now
        self.cut: set[Hashable] = set()  # hosts that neither send nor receive
        self.drop: Callable[[Sent], bool] = lambda s: False
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
                    kind, msg = c.layout.decode(data)  # everything a core sends must parse
                    for target in self._targets(src, dst):
                        sent = Sent(src, target, kind, msg, len(data))
                        self.sent.append(sent)
                        if src in self.cut or target in self.cut or self.drop(sent):
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
        """Move the clock to `now`, run every core's timer that is due, deliver."""
        self.now = now
        for addr, c in self.cores.items():
            if addr not in self.cut and c.get_timer() <= now:
                c.handle_timer(now)
        self.pump()

    def run(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.tick(round(self.now + step, 6))

    def boot(self) -> None:
        """The first timer run of every core (HELLOs to configured peers), then the cookie round trips."""
        self.tick(self.now)

    def take(self, addr: Hashable, kind: type) -> list[object]:
        """And remove: the events of `kind` that `addr`'s core produced."""
        mine = [e for e in self.events[addr] if isinstance(e, kind)]
        self.events[addr] = [e for e in self.events[addr] if not isinstance(e, kind)]
        return mine

    def count(self, kind: Kind, src: Hashable | None = None, dst: Hashable | None = None) -> int:
        return sum(
            1 for s in self.sent if s.kind is kind and (src is None or s.src == src) and (dst is None or s.dst == dst)
        )


def connect(
    net: Net, src: Hashable, dst: Hashable, digest: bytes = PONG, spec: QosSpec = qos.raw, port: int = 0
) -> tuple[int, int]:
    """A flow from src to dst, accepted; (src's eid, dst's eid)."""
    flow = net[src].alloc(digest, spec, dst, net.now, 5.0, OAP_REQ, port)
    net.pump()
    (req,) = net.take(dst, FlowRequested)
    accepted = net[dst].accept(req, net.now, OAP_RESP, port)
    assert accepted is not None
    net.pump()
    (done,) = net.take(src, AllocDone)
    assert done.eid == flow.eid and done.response == 0 and done.data == OAP_RESP
    net[src].established(flow, net.now)
    return flow.eid, accepted.eid


def pong_at(host: Hashable, *others: ShimCore) -> Net:
    net = Net(core(host), *others)
    net[host].register(PONG, True)
    return net


# -- the messages on the wire: Ouroboros 0.23's layouts -------------------------------------


def test_a_udp_flow_request_is_0_23_s_bytes_with_the_piggyback_after_the_hash() -> None:
    """INTEROP-0.23.md §5.2 #3: header(47, with the eid) | MD5 | OAP, 99 bytes for a plain flow."""
    c23 = dataclasses.replace(qos.raw, timeout=120000)
    a = core(A)
    flow = a.alloc(bytes.fromhex("d2734aedb9cfd555ae646fd801963bfa"), c23, B, T0, 5.0, OAP_REQ)
    ((dst, frame),) = a.datagrams_to_send()
    assert dst == B and len(frame) + 4 == 99
    assert frame[:4] == flow.eid.to_bytes(4, "big")  # s_eid
    assert frame[4:12] == bytes(4) + b"O7\x00\x00"  # d_eid and response, which 0.23 ignores: our offer
    assert frame[12:40] == bytes(8) + bytes.fromhex("ffffffff 00000001 00000001 ffffffff 0001d4c0".replace(" ", ""))
    assert frame[40:43] == b"\x01\x00\x00"  # code FLOW_REQ, availability, in_order
    assert frame[43:59] == bytes.fromhex("d2734aedb9cfd555ae646fd801963bfa") and frame[59:] == OAP_REQ


def test_a_reply_names_the_eids_as_each_layer_does() -> None:
    """udp: s_eid is the requester's; eth: s_eid is the responder's (INTEROP-0.23.md §2.1.4, §2.2.4)."""
    for layout, swapped in ((UDP, False), (ETH_DIX, True), (ETH_LLC, True)):
        frame = layout.encode(Kind.FLOW_REPLY, OAP_RESP, **layout.reply_fields(40, 50))
        kind, msg = layout.decode(frame)
        assert kind is Kind.FLOW_REPLY and layout.reply_eids(msg) == (40, 50)
        assert (msg.s_eid, msg.d_eid) == ((50, 40) if swapped else (40, 50))
        assert msg.body == OAP_RESP


def test_header_sizes_and_codes_are_0_23_s() -> None:
    assert UDP.size + 4 == 47 and ETH_DIX.size == 39 and ETH_LLC.size == 37
    assert UDP.codes[Kind.FLOW_REQ] == 1 and UDP.codes[Kind.FLOW_REPLY] == 2
    kinds = (Kind.FLOW_REQ, Kind.FLOW_REPLY, Kind.NAME_QUERY, Kind.NAME_REPLY)
    assert [ETH_DIX.codes[k] for k in kinds] == [0, 1, 2, 3]
    assert ETH_LLC.codes == ETH_DIX.codes
    ours = {Kind.HELLO, Kind.MEMBERS, Kind.NAME_GONE, Kind.DEALLOC, Kind.KEEPALIVE}
    for layout in (UDP, ETH_DIX, ETH_LLC):
        assert len(set(layout.codes.values())) == len(layout.codes), "a code named twice"
        assert all(layout.codes[k] >= 0xB0 for k in ours), "an extension on a code 0.23 might use"


def test_no_management_message_outgrows_what_a_0_23_peer_reads() -> None:
    """A 0.23 udp IPCP copies management datagrams into 2048-byte buffers: never send it more."""
    a = core(A)
    with pytest.raises(ShimWireError, match="at most 2044"):
        a.alloc(PONG, qos.raw, B, T0, 5.0, bytes(2048))
    assert a.flows == {}
    assert ETH_DIX.limited(1496).max_size == 1496


# -- name resolution ----------------------------------------------------------------


def test_a_udp_query_is_answered_by_a_configured_member_and_echoes_the_cookie() -> None:
    net = pong_at(A, core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net.pump()
    assert net.take(B, QueryDone) == [QueryDone(PONG, A)]
    assert net[B].resolved(PONG, net.now) == A
    (query,) = [s for s in net.sent if s.kind is Kind.NAME_QUERY]
    (reply,) = [s for s in net.sent if s.kind is Kind.NAME_REPLY]
    assert reply.msg.body == query.msg.body and len(query.msg.body) == 16 + COOKIE.size


def test_a_query_for_an_unregistered_name_gets_no_reply() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[A].register(OTHER, True)
    net[B].query(PONG, net.now)
    net.pump()
    assert net.count(Kind.NAME_QUERY, src=B, dst=A) == 1
    assert net.count(Kind.NAME_REPLY) == 0
    assert net.take(B, QueryDone) == []


def test_broadcast_resolves_without_any_configured_member() -> None:
    net = Net(core(A), core(B), core(C), broadcast=True)
    net[C].register(PONG, True)
    net[A].query(PONG, net.now)
    net.pump()
    assert net.take(A, QueryDone) == [QueryDone(PONG, C)]


def test_a_name_resolved_outside_the_layer_answers_the_query_waiting() -> None:
    """udp: /etc/hosts (getaddrinfo on the hex MD5) answers beside the query to members."""
    b = core(B, peers=[A])
    b.query(PONG, T0)
    b.learn(PONG, C, T0 + 0.01)
    assert b.next_event() == QueryDone(PONG, C)
    assert b.resolved(PONG, T0 + 1) == C
    b.handle_timer(T0 + QUERY_TIMEOUT + 1)
    assert b.next_event() is None, "the query was still pending"


def test_resolution_is_cached_until_cache_ttl() -> None:
    net = pong_at(A, core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net.pump()
    net.take(B, QueryDone)
    queries = net.count(Kind.NAME_QUERY)
    net.now = T0 + CACHE_TTL - 1
    net[B].query(PONG, net.now)  # a hit: answered at once, nothing sent
    assert net[B].next_event() == QueryDone(PONG, A)
    assert net[B].datagrams_to_send() == []
    net.now = T0 + CACHE_TTL + 0.01  # expired: asks again
    net[B].query(PONG, net.now)
    net.pump()
    assert net.count(Kind.NAME_QUERY) == queries + 1
    assert net.take(B, QueryDone) == [QueryDone(PONG, A)]


def test_a_query_retries_then_times_out_with_no_address() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net.pump()
    net.run(QUERY_TIMEOUT - 0.05)
    assert net.take(B, QueryDone) == [], "timed out early"
    retries = net.count(Kind.NAME_QUERY, src=B)
    expected = 1 + int((QUERY_TIMEOUT - 0.05) / QUERY_RETRY)
    assert expected - 1 <= retries <= expected + 1, f"{retries} query transmissions"
    net.run(0.1)
    assert net.take(B, QueryDone) == [QueryDone(PONG, None)]
    after = net.count(Kind.NAME_QUERY, src=B)
    net.run(2.0)
    assert net.take(B, QueryDone) == [], "QueryDone reported twice"
    assert net.count(Kind.NAME_QUERY, src=B) == after, "still asking after the timeout"


def test_a_udp_reply_with_the_wrong_cookie_or_none_is_ignored() -> None:
    b = core(B, peers=[A])
    b.query(PONG, T0)
    b.datagrams_to_send()
    for body in (PONG + COOKIE.pack(12345), PONG):
        b.receive(UDP.encode(Kind.NAME_REPLY, body), C, T0)
    assert b.next_event() is None
    assert b.resolved(PONG, T0) is None
    assert b.stats["dropped unexpected"] == 2


def test_eth_takes_a_0_23_reply_without_a_cookie_but_not_one_with_a_wrong_cookie() -> None:
    """A 0.23 eth node answers a query with the hash alone (INTEROP-0.23.md §1.3)."""
    a = core(MAC_A, layout=ETH_DIX, hash_len=32)
    digest = bytes(range(32))
    a.query(digest, T0)
    ((dst, frame),) = a.datagrams_to_send()
    kind, msg = ETH_DIX.decode(frame)
    assert dst is None and kind is Kind.NAME_QUERY and msg.body[:32] == digest  # 0.23 reads the hash first
    a.receive(ETH_DIX.encode(Kind.NAME_REPLY, digest + COOKIE.pack(7)), MAC_C, T0)
    assert a.next_event() is None
    a.receive(ETH_DIX.encode(Kind.NAME_REPLY, digest), MAC_B, T0)
    assert a.next_event() == QueryDone(digest, MAC_B)


def test_eth_answers_a_0_23_query_with_the_hash_alone() -> None:
    b = core(MAC_B, layout=ETH_DIX, hash_len=32)
    digest = bytes(range(32))
    b.register(digest, True)
    b.receive(ETH_DIX.encode(Kind.NAME_QUERY, digest), MAC_A, T0)
    ((dst, frame),) = b.datagrams_to_send()
    assert dst == MAC_A and frame == ETH_DIX.encode(Kind.NAME_REPLY, digest)


def test_unregistering_sends_name_gone_which_purges_peer_caches() -> None:
    net = Net(core(A), core(B, peers=[A]), core(C, peers=[A]))
    net.boot()  # A adopts B and C once they echo its cookies
    net[A].register(PONG, True)
    for host in (B, C):
        net[host].query(PONG, net.now)
    net.pump()
    assert net[B].resolved(PONG, net.now) == A and net[C].resolved(PONG, net.now) == A
    net[A].register(PONG, False)
    net.pump()
    assert net.count(Kind.NAME_GONE, src=A, dst=B) == 1 and net.count(Kind.NAME_GONE, src=A, dst=C) == 1
    assert net[B].resolved(PONG, net.now) is None
    assert net[C].resolved(PONG, net.now) is None


def test_name_gone_from_another_host_does_not_purge_the_cache() -> None:
    net = pong_at(A, core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net.pump()
    net[B].receive(UDP.encode(Kind.NAME_GONE, PONG), C, net.now)
    assert net[B].resolved(PONG, net.now) == A


# -- flow allocation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", [qos.raw, qos.best_effort, qos.video, qos.voice, qos.data], ids=["raw", "best", "video", "voice", "data"]
)
@pytest.mark.parametrize("layout", [UDP, ETH_DIX, ETH_LLC], ids=lambda lay: lay.name)
def test_a_flow_request_is_accepted_and_both_ends_know_each_others_eid(spec: QosSpec, layout: Layout) -> None:
    net = Net(core(A, layout=layout), core(B, layout=layout))
    net[A].register(PONG, True)
    flow = net[B].alloc(PONG, spec, A, net.now, 5.0, OAP_REQ)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    assert (req.addr, req.remote_eid, req.digest, req.data) == (B, flow.eid, PONG, OAP_REQ)
    assert req.qos == spec and req.offer == Offer(spec.cypher_s)
    assert net.take(B, AllocDone) == [], "done before the peer decided"
    theirs = net[A].accept(req, net.now, OAP_RESP)
    assert theirs is not None
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, 0, OAP_RESP, Offer())]
    assert net[B].flows[flow.eid].remote_eid == theirs.eid
    assert net[A].flows[theirs.eid].remote_eid == flow.eid
    lo, hi = layout.eids
    assert lo <= flow.eid <= hi and lo <= theirs.eid <= hi
    assert net[A].flows[theirs.eid].ours and net[B].flows[flow.eid].ours


def test_encryption_asked_for_reaches_a_peer_of_ours() -> None:
    net = pong_at(A, core(B))
    spec = dataclasses.replace(qos.data, cypher_s=256)
    net[B].alloc(PONG, spec, A, net.now, 5.0)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    assert req.qos == spec


def test_data_ports_travel_in_fields_0_23_leaves_alone() -> None:
    net = pong_at(A, core(B))
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0, OAP_REQ, port=40001)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    assert req.offer == Offer(0, 40001) and req.data == OAP_REQ
    net[A].accept(req, net.now, OAP_RESP, port=4660)
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, 0, OAP_RESP, Offer(0, 4660))]
    (sent,) = [s for s in net.sent if s.kind is Kind.FLOW_REQ]
    assert sent.msg.qos() == qos.raw  # the QoS a 0.23 peer reads is untouched by the offer


def test_a_plain_0_23_request_gets_a_plain_reply() -> None:
    """No offer, no extension in the answer: the requester may be a C node."""
    a = core(A)
    a.register(PONG, True)
    fields = {"s_eid": 64, "delay": 0xFFFFFFFF, "loss": 1, "ber": 1, "max_gap": 0xFFFFFFFF, "timeout": 120000}
    a.receive(UDP.encode(Kind.FLOW_REQ, PONG + OAP_REQ, **fields), B, T0)
    req = a.next_event()
    assert isinstance(req, FlowRequested) and req.offer is None and req.data == OAP_REQ
    assert req.qos == QosSpec(0xFFFFFFFF, 0, 0, 1, 1, 0, 0xFFFFFFFF, 120000)
    flow = a.accept(req, T0, OAP_RESP, port=999)
    assert flow is not None and not flow.ours
    ((dst, frame),) = a.datagrams_to_send()
    assert dst == B and frame == UDP.encode(Kind.FLOW_REPLY, OAP_RESP, s_eid=64, d_eid=flow.eid)


def test_a_refusal_says_why_with_ouroboros_s_errno_and_forgets_the_flow() -> None:
    net = pong_at(A, core(B))
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0, OAP_REQ)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net[A].refuse(req, "EAUTH")
    net.pump()
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, -1009)]
    (reply,) = [s for s in net.sent if s.kind is Kind.FLOW_REPLY]
    assert reply.msg.body == b"" and reply.size == UDP.size  # 47 bytes with the eid, as 0.23's
    assert flow.eid not in net[B].flows and net[A].flows == {}


def test_a_flow_request_for_a_name_not_registered_there_gets_enoent_and_purges_the_cache() -> None:
    net = pong_at(A, core(B, peers=[A]))
    net[B].query(PONG, net.now)
    net.pump()
    net[A].registered.discard(PONG)  # gone without a NAME_GONE (say it was lost)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    assert net.take(A, FlowRequested) == []
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, ERRNO["ENOENT"])]
    assert net[B].resolved(PONG, net.now) is None, "a stale cache entry survived ENOENT"


def test_an_allocation_to_a_silent_member_retransmits_then_times_out() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net.boot()  # A answers B's HELLO: a member of ours; then it goes silent
    assert net[B].members[A] > 0
    net.cut.add(A)
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 2.0)
    net.pump()
    net.run(1.9)
    assert net.take(B, AllocDone) == []
    sent = net.count(Kind.FLOW_REQ, src=B)
    assert 3 <= sent <= 5, f"{sent} FLOW_REQ transmissions in 1.9 s (retry every {ALLOC_RETRY} s)"
    net.run(0.2)
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, None)]
    assert net[B].flows == {}


def test_an_allocation_to_an_address_not_known_to_be_ours_is_sent_once() -> None:
    """A 0.23 peer would refuse a repeated request as a replay of its OAP header (-1009)."""
    net = Net(core(A), core(B))
    net.cut.add(A)
    net[B].alloc(PONG, qos.raw, A, net.now, 2.0, OAP_REQ)
    net.pump()
    net.run(2.1)
    assert net.count(Kind.FLOW_REQ, src=B) == 1
    assert [e.response for e in net.take(B, AllocDone)] == [None]


def test_a_configured_peer_that_answers_but_never_proves_it_is_ours_gets_each_request_once() -> None:
    """A 0.23 node given as a peer: it answers flow requests, never a HELLO; a repeat would fail its
    OAP replay check, and refuse the flow it had just accepted."""
    net = pong_at(A, core(B, peers=[A]))
    net.drop = lambda s: s.kind is Kind.HELLO
    net.boot()
    net[B].alloc(PONG, qos.raw, A, net.now, 5.0, OAP_REQ)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net[A].refuse(req, "EAUTH")  # an answer, but no word of ours
    net.pump()
    assert [e.response for e in net.take(B, AllocDone)] == [-1009]
    net.cut.add(A)
    net[B].alloc(PONG, qos.raw, A, net.now, 2.0, OAP_REQ)
    net.pump()
    net.run(2.1)
    assert net.count(Kind.FLOW_REQ, src=B) == 2, "a request was repeated to a peer not known to be ours"
    assert net[B].members[A] == 0.0 and A not in net[B].heard


def accepted_answer_lost() -> tuple[Net, ShimFlow, ShimFlow]:
    """B's allocation to A's pong, accepted by A, whose answer is lost: (the net, B's flow, A's)."""
    net = pong_at(A, core(B, peers=[A]))
    net.boot()
    lost = [0]

    def lose_first_reply(s: Sent) -> bool:
        if s.kind is Kind.FLOW_REPLY and lost[0] == 0:
            lost[0] += 1
            return True
        return False

    net.drop = lose_first_reply
    flow = net[B].alloc(PONG, qos.raw, A, net.now, 5.0, OAP_REQ)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    theirs = net[A].accept(req, net.now, OAP_RESP)
    assert theirs is not None
    net.pump()  # that reply is lost
    return net, flow, theirs


def test_a_retransmitted_request_after_the_accept_is_answered_again_with_the_same_eid() -> None:
    net, flow, theirs = accepted_answer_lost()
    assert net.take(B, AllocDone) == []
    net.run(ALLOC_RETRY + 0.1)
    assert net.take(A, FlowRequested) == [], "a retransmission was taken for a new request"
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, 0, OAP_RESP, Offer())]
    assert list(net[A].flows) == [theirs.eid], "the retransmission made a second flow"


def test_a_retransmitted_request_whose_flow_ended_since_gets_its_answer_and_the_end_not_a_new_flow() -> None:
    """The answer lost, then the flow let go at A (its server closed it): the retransmission was taken for
    a new request, whose OAP header the IRMd refused as a replay, and B's allocation failed (-1009). It
    now gets what A answered and, after it, the end of the flow."""
    net, flow, theirs = accepted_answer_lost()
    net[A].dealloc(theirs.eid, net.now)  # A's server lets the flow go
    net.pump()
    net.run(ALLOC_RETRY + 0.1)
    assert net.take(A, FlowRequested) == [], "a retransmission was taken for a new request"
    assert net.take(B, AllocDone) == [AllocDone(flow.eid, 0, OAP_RESP, Offer())]
    assert net.take(B, FlowEnded) == [FlowEnded(flow.eid, down=False)]
    assert net[A].flows == {} and net[B].flows == {}


def test_a_retransmitted_request_while_the_peer_decides_is_not_answered() -> None:
    net = pong_at(A, core(B, peers=[A]))
    net.boot()
    net[B].alloc(PONG, qos.raw, A, net.now, 5.0)
    net.pump()
    (req,) = net.take(A, FlowRequested)
    net.run(ALLOC_RETRY * 2 + 0.1)
    assert net.take(A, FlowRequested) == [] and net.count(Kind.FLOW_REPLY) == 0
    net[A].accept(req, net.now)
    net.pump()
    assert [e.response for e in net.take(B, AllocDone)] == [0]


def test_a_reply_from_another_address_than_the_one_asked_is_ignored() -> None:
    b = core(B)
    flow = b.alloc(PONG, qos.raw, A, T0, 5.0)
    b.receive(UDP.encode(Kind.FLOW_REPLY, s_eid=flow.eid, d_eid=77), C, T0)
    assert b.next_event() is None and b.flows[flow.eid].remote_eid == 0
    b.receive(UDP.encode(Kind.FLOW_REPLY, s_eid=flow.eid, d_eid=77), A, T0)
    assert b.next_event() == AllocDone(flow.eid, 0)


def test_a_reply_for_no_request_or_naming_eid_0_is_not_taken() -> None:
    b = core(B)
    flow = b.alloc(PONG, qos.raw, A, T0, 5.0)
    b.receive(UDP.encode(Kind.FLOW_REPLY, s_eid=flow.eid + 1, d_eid=77), A, T0)
    assert b.next_event() is None
    b.receive(UDP.encode(Kind.FLOW_REPLY, s_eid=flow.eid, d_eid=0), A, T0)
    assert b.next_event() == AllocDone(flow.eid, ERRNO["EPROTO"])


def test_a_freed_eid_is_handed_out_again_only_when_no_other_is_free() -> None:
    b = core(B, layout=ETH_LLC)
    freed = []
    for _ in range(3):
        eid = b.alloc(PONG, qos.raw, MAC_A, T0, 5.0).eid
        b.dealloc(eid, T0)
        freed.append(eid)
    eids = [b.alloc(PONG, qos.raw, MAC_A, T0, 5.0).eid for _ in range(62)]
    assert eids[-3:] == freed, "a freed SAP was taken while others were free, or not the longest freed"
    assert len(set(eids)) == 62
    with pytest.raises(Exception, match="endpoint ids are in use"):
        b.alloc(PONG, qos.raw, MAC_A, T0, 5.0)


@pytest.mark.timeout(10)
def test_an_eid_is_found_even_when_nearly_every_free_one_was_freed_lately() -> None:
    """Draws that keep hitting quarantined eids end: the one freed longest ago is taken."""
    b = core(MAC_B, layout=ETH_DIX)  # 65,535 eids
    lo, hi = b.layout.eids
    for eid in range(lo, hi + 1):
        b._freed[eid] = T0  # (tens of thousands of flows freed within the quarantine)
    eid = b.alloc(PONG, qos.raw, MAC_A, T0, 5.0).eid
    assert eid == lo and eid not in b._freed


def test_the_flow_limit_holds_requests_and_allocations() -> None:
    a = core(A, limits=Limits(flows=3))
    a.register(PONG, True)
    for i in range(5):
        a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=i + 1), B, T0)
    assert len(a._deciding) == 3
    assert [UDP.decode(f)[1].response for _, f in a.datagrams_to_send()] == [ERRNO["EBUSY"]] * 2
    with pytest.raises(Exception, match="endpoint ids are in use"):
        a.alloc(PONG, qos.raw, B, T0, 5.0)
    b = core(B)
    b.handle_timer(T0 + QUARANTINE + 1)
    assert not b._freed


# -- deallocation and liveness -------------------------------------------------------------------


@pytest.mark.parametrize("closer", [A, B])
def test_deallocating_tells_a_peer_of_ours(closer: Hashable) -> None:
    net = pong_at(A, core(B))
    eid_b, eid_a = connect(net, B, A)
    net[closer].dealloc(eid_b if closer == B else eid_a, net.now)
    net.pump()
    other = A if closer == B else B
    assert net.take(other, FlowEnded) == [FlowEnded(eid_a if other == A else eid_b, down=False)]
    assert net[A].flows == {} and net[B].flows == {}


def test_deallocating_a_flow_to_a_0_23_peer_sends_nothing() -> None:
    a = core(A)
    a.register(PONG, True)
    a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=64), B, T0)
    req = a.next_event()
    assert isinstance(req, FlowRequested)
    flow = a.accept(req, T0)
    assert flow is not None
    a.datagrams_to_send()
    a.dealloc(flow.eid, T0)
    assert a.datagrams_to_send() == []


def test_a_dealloc_naming_the_wrong_remote_eid_or_sender_is_ignored() -> None:
    net = pong_at(A, core(B))
    eid_b, eid_a = connect(net, B, A)
    net[A].receive(UDP.encode(Kind.DEALLOC, s_eid=eid_b + 1, d_eid=eid_a), B, net.now)
    net[A].receive(UDP.encode(Kind.DEALLOC, s_eid=eid_b, d_eid=eid_a), C, net.now)
    assert net[A].next_event() is None and eid_a in net[A].flows


def test_keepalives_keep_an_idle_flow_to_a_peer_of_ours_up() -> None:
    net = pong_at(A, core(B))
    connect(net, B, A)
    net.run(PEER_TIMEOUT * 3, step=0.1)
    assert net.take(A, FlowEnded) == [] and net.take(B, FlowEnded) == []
    asked = sum(1 for s in net.sent if s.kind is Kind.KEEPALIVE and s.src == B and s.msg.response)
    assert 0 < asked <= PEER_TIMEOUT * 3 / KEEPALIVE_IDLE + 2


def test_a_silent_peer_of_ours_takes_its_flows_down_after_peer_timeout() -> None:
    net = pong_at(A, core(B))
    eid_b, _ = connect(net, B, A)
    start = net.now
    net.cut.add(A)
    while not (ended := net.take(B, FlowEnded)):
        net.tick(round(net.now + 0.1, 6))
        assert net.now - start < PEER_TIMEOUT + 2, "never went down"
    assert ended == [FlowEnded(eid_b, down=True)]
    assert PEER_TIMEOUT <= net.now - start <= PEER_TIMEOUT + KEEPALIVE_IDLE


def test_a_flow_to_a_0_23_peer_is_never_taken_down_by_the_shim() -> None:
    """As Ouroboros: liveness is end to end (the flows' ends send empty SDUs, the relay carries them)."""
    a = core(A)
    a.register(PONG, True)
    a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=64, timeout=2000), B, T0)
    req = a.next_event()
    assert isinstance(req, FlowRequested)
    flow = a.accept(req, T0)
    assert flow is not None
    flow.relayed = True
    a.established(flow, T0)
    a.datagrams_to_send()
    for step in range(1, 100):
        a.handle_timer(T0 + step)
    assert a.next_event() is None and flow.eid in a.flows
    assert a.datagrams_to_send() == [], "management messages to a 0.23 peer"


def test_data_on_the_relay_stands_in_for_keepalives_of_a_peer_of_ours() -> None:
    net = pong_at(A, core(B))
    eid_b, _ = connect(net, B, A)
    flow = net[B].flows[eid_b]
    flow.relayed = True
    net.cut.add(A)  # no management message gets through, but data does
    for _ in range(int(PEER_TIMEOUT * 3 / 0.1)):
        flow.rx_at = net.now
        net.tick(round(net.now + 0.1, 6))
    assert net.take(B, FlowEnded) == []


# -- members: cookies, gossip, caps (udp) ----------------------------------------------------------


def test_a_configured_peer_and_we_prove_each_other_and_exchange_members() -> None:
    net = Net(core(A), core(B, peers=[A]), core(C, peers=[A]))
    net.boot()
    assert set(net[A].members) == {B, C}, "A adopted its greeters once they echoed its cookies"
    net.run(HELLO_EVERY + 0.5)
    assert C in net[B].members and B in net[C].members, "each learned the other through A"


def test_a_hello_from_a_stranger_gets_a_challenge_only() -> None:
    a = core(A)
    hello = UDP.encode(Kind.HELLO, COOKIE.pack(5) + COOKIE.pack(0), response=1) + bytes(400)
    a.receive(hello, C, T0)
    ((dst, frame),) = a.datagrams_to_send()
    kind, msg = UDP.decode(frame)
    assert dst == C and kind is Kind.HELLO and len(frame) <= len(hello)
    assert COOKIE.unpack_from(msg.body, 8)[0] == 5  # its cookie back, and ours to echo
    assert C not in a.members and a.stats["members adopted"] == 0
    # Echoed from the claimed address, the cookie makes it a member; from elsewhere it does not.
    echo = UDP.encode(Kind.HELLO, COOKIE.pack(0) + msg.body[:8])
    a.receive(echo, B, T0 + 1)
    assert B not in a.members
    a.receive(echo, C, T0 + 1)
    assert C in a.members


def test_a_cookie_goes_stale() -> None:
    a = core(A)
    a.receive(UDP.encode(Kind.HELLO, bytes(16)), C, T0)
    ((_, frame),) = a.datagrams_to_send()
    mine = UDP.decode(frame)[1].body[:8]
    a.receive(UDP.encode(Kind.HELLO, bytes(8) + mine), C, T0 + 120)
    assert C not in a.members


def test_a_members_page_stays_within_three_times_the_request() -> None:
    a = core(A, limits=Limits(members=5000))
    for i in range(3000):
        a.members[(f"10.{i // 250}.{i % 250}.1", 3435)] = T0
    a.members[B] = T0
    for size in (UDP.size + 16, 200, 512, 1400):
        body = bytes(8) + COOKIE.pack(a.cookies.make(B, T0))
        hello = UDP.encode(Kind.HELLO, body, response=1)
        hello += bytes(max(size - len(hello), 0))
        a.receive(hello, B, T0)
        answers = a.datagrams_to_send()
        assert sum(len(f) for _, f in answers) <= AMPLIFICATION * len(hello)
    # Paging through them all learns every one, page after page.
    got: set[Hashable] = set()
    page = 0
    for _ in range(100):
        hello = UDP.encode(Kind.HELLO, bytes(8) + COOKIE.pack(a.cookies.make(B, T0)), response=1, d_eid=page)
        a.receive(hello + bytes(512 - len(hello)), B, T0)
        ((_, frame),) = a.datagrams_to_send()
        _, msg = UDP.decode(frame)
        got |= set(udp.decode_addrs(msg.body))
        page = msg.s_eid + len(udp.decode_addrs(msg.body))
        if page >= msg.d_eid:
            break
    assert len(got) == 3000


def test_members_learned_in_gossip_are_greeted_a_few_at_a_time_and_adopted_only_if_they_answer() -> None:
    net = Net(core(A), core(B, peers=[A]))
    net.boot()
    many = [udp.encode_addr((f"10.77.{i // 200}.{i % 200 + 1}", 3435)) for i in range(60)]
    net[B].receive(UDP.encode(Kind.MEMBERS, b"".join(many) + udp.encode_addr(C), d_eid=61), A, net.now)
    assert len(net[B].candidates) == 61
    assert net[B].members.keys() == {A}, "gossip alone made a member"
    net.tick(net.now)
    greetings = sum(1 for s in net.sent if s.kind is Kind.HELLO and s.src == B and s.dst != A)
    assert greetings == Limits().greet, "greeted everyone at once"
    net.run(4.0)
    greeted = {s.dst for s in net.sent if s.kind is Kind.HELLO and s.src == B} - {A}
    assert len(greeted) == 61 and net[B].members.keys() == {A}  # nobody there answered


def test_only_members_may_send_members() -> None:
    b = core(B)
    b.receive(UDP.encode(Kind.MEMBERS, udp.encode_addr(C)), A, T0)
    assert not b.candidates and b.stats["dropped malformed"] == 1


def test_the_member_table_is_capped_but_configured_peers_always_fit() -> None:
    a = core(A, peers=[B], limits=Limits(members=3))
    for i in range(10):
        src = (f"10.1.0.{i + 10}", 3435)
        a.receive(UDP.encode(Kind.HELLO, bytes(8) + COOKIE.pack(a.cookies.make(src, T0))), src, T0)
    assert len(a.members) == 4 and B in a.members
    assert a.stats["dropped members full"] == 7


def test_one_host_holds_its_share_of_the_member_table_however_many_ports_it_proves() -> None:
    def prove(a: ShimCore, src: tuple[str, int], now: float) -> None:
        a.receive(UDP.encode(Kind.HELLO, bytes(8) + COOKIE.pack(a.cookies.make(src, now))), src, now)

    a = ShimCore(UDP, hash_len=16, own=A, discovery=True, encode_addr=udp.encode_addr,
                 decode_addrs=udp.decode_addrs, peers=[B], limits=Limits(members=8),
                 peer_of=lambda addr: addr[0])  # fmt: skip
    assert Limits(members=8).members_per_peer == 2
    for port in range(40000, 40006):
        prove(a, ("10.1.0.9", port), T0)
    prove(a, ("10.1.0.10", 3435), T0)
    assert sorted(a.members) == sorted([B, ("10.1.0.9", 40000), ("10.1.0.9", 40001), ("10.1.0.10", 3435)])
    assert a.stats["dropped members of one peer"] == 4
    # Its members gone silent, the host's places are its again (a configured peer counts for none).
    a.handle_timer(T0 + MEMBER_TTL + 1)
    for port in range(40010, 40013):
        prove(a, ("10.1.0.9", port), T0 + MEMBER_TTL + 2)
    assert sum(1 for m in a.members if m[0] == "10.1.0.9") == 2 and B in a.members


def test_one_members_gossip_names_its_share_of_the_candidates_and_anothers_still_get_in() -> None:
    a = ShimCore(UDP, hash_len=16, own=A, discovery=True, encode_addr=udp.encode_addr,
                 decode_addrs=udp.decode_addrs, limits=Limits(candidates=40),
                 peer_of=lambda addr: addr[0])  # fmt: skip
    a.members[B] = a.members[C] = T0  # members both (proven, as B's and C's HELLOs would make them)
    for page in range(5):  # B's pages of made-up addresses, sent unasked as fast as it likes
        made_up = [udp.encode_addr((f"10.66.{page}.{i + 1}", 3435)) for i in range(Limits().learn)]
        a.receive(UDP.encode(Kind.MEMBERS, b"".join(made_up), d_eid=10_000), B, T0)
    assert len(a.candidates) == Limits(candidates=40).candidates_per_peer == 10
    real = [(f"10.9.1.{i + 1}", 3435) for i in range(5)]
    a.receive(UDP.encode(Kind.MEMBERS, b"".join(udp.encode_addr(r) for r in real), d_eid=5), C, T0)
    assert all(r in a.candidates for r in real) and a.stats["dropped candidates of one peer"] == 5
    a.handle_timer(T0)  # B's, named first, are greeted first: they leave the table ...
    assert list(a.candidates) == real
    more = [udp.encode_addr((f"10.67.0.{i + 1}", 3435)) for i in range(20)]
    a.receive(UDP.encode(Kind.MEMBERS, b"".join(more), d_eid=10_000), B, T0 + 1)
    assert len(a.candidates) == 5 + 10  # ... and B's gossip may name as many again


def test_a_learned_member_that_goes_silent_is_forgotten_but_a_configured_one_is_kept() -> None:
    net = Net(core(A, peers=[C]), core(B, peers=[A]))
    net.boot()
    assert B in net[A].members and C in net[A].members
    net.cut.add(B)
    net.run(MEMBER_TTL + HELLO_EVERY + 1, step=1.0)
    assert B not in net[A].members and C in net[A].members


# -- an untrusted network --------------------------------------------------------------------------


def test_a_spoofed_flood_adopts_nobody_and_never_amplifies() -> None:
    a = core(A)
    a.register(PONG, True)
    received = sent = 0
    for i in range(5000):
        src = (f"127.{i // 65536}.{i // 256 % 256}.{i % 256}", 40000)
        for frame in (
            UDP.encode(Kind.HELLO, COOKIE.pack(i + 1) + COOKIE.pack(i * 7919)),
            UDP.encode(Kind.NAME_QUERY, PONG + COOKIE.pack(i)),
            UDP.encode(Kind.FLOW_REPLY, s_eid=i + 1, d_eid=5),
        ):
            a.receive(frame, src, T0 + i / 1000)
            received += len(frame)
            answers = a.datagrams_to_send()
            assert sum(len(f) for _, f in answers) <= AMPLIFICATION * len(frame)
            sent += sum(len(f) for _, f in answers)
    assert a.members == {} and a.flows == {} and a.next_event() is None
    assert sent <= received
    assert len(a.rates) <= Limits().sources


def test_a_source_over_its_rate_is_dropped_and_others_are_not() -> None:
    a = core(A)
    a.register(PONG, True)
    query = UDP.encode(Kind.NAME_QUERY, PONG + COOKIE.pack(1))
    for _ in range(500):
        a.receive(query, C, T0)
    assert a.stats["dropped rate"] >= 500 - 2 * Limits().rate
    a.datagrams_to_send()
    a.receive(query, B, T0)
    assert len(a.datagrams_to_send()) == 1


def test_a_proven_members_burst_of_deallocations_all_take_effect_and_a_strangers_are_held_to_its_rate() -> None:
    """A member of ours opening and closing flows quickly was held to a stranger's 50 messages a
    second (bursts of 100): of 150 deallocations sent at once, a third were dropped, and those flows
    stayed at the server until the peer went silent. A proven member's host now has `member_rate`;
    an address that only has flows with us (C proved nothing) keeps the stranger's rate."""
    net = pong_at(A, core(B, peers=[A]), core(C))
    net.boot()
    assert net[A]._adopted(B) and not net[A]._adopted(C)
    flows: dict[Hashable, list[int]] = {B: [], C: []}
    for _ in range(150):
        for host in (B, C):
            flows[host].append(connect(net, host, A)[0])
        net.now += 1 / Limits().rate  # within either's rate
    net.now += 10.0  # every bucket full again
    for host in (B, C):
        for eid in flows[host]:
            net[host].dealloc(eid, net.now)
    net.pump()
    left = {host: sum(1 for f in net[A].flows.values() if f.addr == host) for host in (B, C)}
    assert left[B] == 0, f"{left[B]} of the member's 150 flows left at A"
    assert left[C] == 150 - 2 * Limits().rate, "the stranger's deallocations past its burst are dropped"
    assert net[A].stats["dropped rate"] == left[C]


def test_flow_requests_waiting_for_the_irmd_are_capped_per_source_and_in_all() -> None:
    a = core(A, limits=Limits(deciding=20, deciding_per_source=4))
    a.register(PONG, True)
    for i in range(10):
        a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=i + 1), B, T0)
    assert len(a._deciding) == 4 and a.stats["dropped busy"] == 6
    for i in range(40):
        a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=1), (f"10.2.0.{i}", 3435), T0)
    assert len(a._deciding) == 20


def test_a_reply_larger_than_three_times_the_request_goes_only_to_known_addresses() -> None:
    a = core(A)
    a.register(PONG, True)
    a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=9), C, T0)  # 59 bytes: a reply may take 177
    req = a.next_event()
    assert isinstance(req, FlowRequested)
    assert a.accept(req, T0, bytes(400)) is None
    assert a.datagrams_to_send() == [] and a.flows == {}
    a.learn(OTHER, C, T0)  # once we resolved a name to it, C is more than a claim
    a.receive(UDP.encode(Kind.FLOW_REQ, PONG, s_eid=10), C, T0)
    req = a.next_event()
    assert isinstance(req, FlowRequested) and a.accept(req, T0, bytes(400)) is not None


# -- fuzz ------------------------------------------------------------------------------------------


def _busy_core(layout: Layout) -> ShimCore:
    """A core with a member, a registered name, a pending query and allocation, and a flow."""
    own, peer = (A, B) if layout is UDP else (MAC_A, MAC_B)
    net = Net(
        core(own, peers=[peer] if layout is UDP else [], layout=layout),
        core(peer, peers=[own] if layout is UDP else [], layout=layout),
    )
    net.boot()
    net[own].register(PONG, True)
    net[peer].register(PONG, True)
    connect(net, own, peer)
    net[own].query(OTHER, net.now)
    net[own].alloc(OTHER, qos.raw, peer, net.now, 5.0)
    net[own].datagrams_to_send()
    return net[own]


@pytest.mark.parametrize("layout", [UDP, ETH_DIX, ETH_LLC], ids=lambda lay: lay.name)
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_fuzz_receive_of_arbitrary_bytes_never_raises(layout: Layout, data: bytes) -> None:
    c = _busy_core(layout)
    c.receive(data, C if layout is UDP else MAC_C, T0 + 1)
    c.handle_timer(T0 + 2)
    for _, frame in c.datagrams_to_send():
        layout.decode(frame)


@st.composite
def well_framed(draw: st.DrawFn) -> tuple[Layout, bytes]:
    layout = draw(st.sampled_from([UDP, ETH_DIX, ETH_LLC]))
    kind = draw(st.sampled_from(list(layout.codes)))
    fields = {}
    for name in ("s_eid", "d_eid", "response", "delay", "loss", "timeout"):
        if draw(st.booleans()):
            fields[name] = draw(st.integers(0, 255))
    body = draw(st.sampled_from([b"", PONG, PONG + COOKIE.pack(1), bytes(16)])) + draw(st.binary(max_size=64))
    return layout, layout.encode(kind, body, **fields)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=well_framed(), src=st.sampled_from([A, B, C, MAC_A, MAC_B]))
def test_fuzz_well_framed_messages_never_crash_the_core(msg: tuple[Layout, bytes], src: Hashable) -> None:
    layout, frame = msg
    c = _busy_core(layout)
    c.receive(frame, src, T0 + 1)
    c.handle_timer(T0 + 10)
    assert c.stats["dropped unencodable"] == 0


@given(st.binary(max_size=100))
def test_fuzz_decode_raises_only_shim_wire_error(data: bytes) -> None:
    for layout in (UDP, ETH_DIX, ETH_LLC):
        with contextlib.suppress(ShimWireError):
            layout.decode(data)


@given(
    st.builds(
        QosSpec,
        delay=st.integers(0, 2**32 - 1),
        bandwidth=st.integers(0, 2**64 - 1),
        availability=st.integers(0, 255),
        loss=st.integers(0, 2**32 - 1),
        ber=st.integers(0, 2**32 - 1),
        in_order=st.integers(0, 255),
        max_gap=st.integers(0, 2**32 - 1),
        timeout=st.integers(0, 2**32 - 1),
        cypher_s=st.integers(0, 0xFFFF),
    )
)
def test_qos_survives_the_wire_of_every_layer(spec: QosSpec) -> None:
    for layout in (UDP, ETH_DIX, ETH_LLC):
        a = core(A, layout=layout)
        a.register(PONG, True)
        b = core(B, layout=layout)
        b.alloc(PONG, spec, A, T0, 1.0)
        ((_, frame),) = b.datagrams_to_send()
        a.receive(frame, B, T0)
        req = a.next_event()
        assert isinstance(req, FlowRequested) and req.qos == spec


@given(st.binary(max_size=300))
def test_fuzz_decode_addrs_never_raises(data: bytes) -> None:
    for addr in udp.decode_addrs(data):
        assert isinstance(addr, tuple) and 0 < addr[1] < 65536


def test_get_timer_is_idle_with_nothing_to_do() -> None:
    a = core(MAC_A, layout=ETH_DIX)
    assert a.get_timer() == float("inf")
    a.query(PONG, T0)
    assert a.get_timer() == pytest.approx(T0 + QUERY_RETRY)


# -- wrong-state and out-of-range messages (well formed, but not for this state or layer) ----------


def _request(layout: Layout, s_eid: int, oap: bytes, digest: bytes = PONG) -> bytes:
    return layout.encode(Kind.FLOW_REQ, digest + oap, s_eid=s_eid)


@pytest.mark.parametrize("layout", [UDP, ETH_DIX, ETH_LLC], ids=["udp", "eth-dix", "eth-llc"])
def test_a_0_23_peer_reusing_the_eid_of_a_flow_it_let_go_gets_a_new_flow_not_the_old_answer(layout: Layout) -> None:
    """0.23 takes its eids from its lowest free flow descriptors: the next flow to the same server often
    has the eid of the last. Only a request the same byte for byte is a retransmission; another one (a new
    OAP id and timestamp) is a new flow, however its eid was used before."""
    a = core(A if layout is UDP else MAC_A, layout=layout)
    peer = B if layout is UDP else MAC_B
    a.register(PONG, True)
    first = _request(layout, 3, OAP_REQ)
    a.receive(first, peer, T0)
    (req,) = [e for e in iter(a.next_event, None) if isinstance(e, FlowRequested)]
    old = a.accept(req, T0, OAP_RESP)
    assert old is not None
    ((_, old_reply),) = a.datagrams_to_send()

    a.receive(first, peer, T0 + 0.1)  # a retransmission: the same answer, no new flow
    assert a.datagrams_to_send() == [(peer, old_reply)] and a.next_event() is None

    again = _request(layout, 3, b"\x77" * 16 + bytes(20))  # the peer's next flow, on the same eid
    a.receive(again, peer, T0 + 1.0)
    assert a.datagrams_to_send() == [], "the old flow's answer went back for a new request"
    (new,) = [e for e in iter(a.next_event, None) if isinstance(e, FlowRequested)]
    assert new.data == b"\x77" * 16 + bytes(20) and new.flow.eid != old.eid
    flow = a.accept(new, T0 + 1.0, OAP_RESP)
    assert flow is not None
    ((_, reply),) = a.datagrams_to_send()
    _, msg = layout.decode(reply)
    assert layout.reply_eids(msg) == (3, flow.eid) and msg.response == 0

    a.dealloc(old.eid, T0 + 2.0)  # the old flow goes: the new one's answer is still repeated
    a.datagrams_to_send()
    a.receive(again, peer, T0 + 2.1)
    assert a.datagrams_to_send() == [(peer, reply)] and a.next_event() is None


def test_eth_llc_takes_no_sap_beyond_63_in_a_request_or_a_reply() -> None:
    """eth-llc's endpoints are the SAPs 2 to 63; its header has a byte for them. A flow on SAP 200 would
    hold one of 62 endpoints for data the layer drops (no frame to or from SAP 200 is a flow's)."""
    a = core(MAC_A, layout=ETH_LLC)
    a.register(PONG, True)
    for bad in (64, 200, 255):
        a.receive(_request(ETH_LLC, bad, OAP_REQ), MAC_B, T0)
        assert a.next_event() is None and not a.flows
    assert a.stats["dropped malformed"] == 3

    flow = a.alloc(PONG, qos.raw, MAC_B, T0, 5.0)
    a.datagrams_to_send()
    a.receive(ETH_LLC.encode(Kind.FLOW_REPLY, **ETH_LLC.reply_fields(flow.eid, 200)), MAC_B, T0)
    assert a.next_event() == AllocDone(flow.eid, ERRNO["EPROTO"])

    # A request on a SAP of the layer's range still makes a flow.
    a.receive(_request(ETH_LLC, 63, OAP_REQ), MAC_B, T0)
    (req,) = [e for e in iter(a.next_event, None) if isinstance(e, FlowRequested)]
    assert a.accept(req, T0) is not None and req.remote_eid == 63
