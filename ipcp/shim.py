"""The shims' flow allocator, name resolver and peer liveness (udp, eth), sans-IO: management
datagrams and time in; datagrams, events and one timer out.

It speaks Ouroboros 0.23's management messages (ipcp/shim_wire.py) with any peer, and our
extensions (members and their gossip, name queries over udp, deallocation notices, peer
keepalives, per-flow data ports) only with peers that showed they are ours. Nothing a peer says
is taken on trust: members are adopted after a cookie round trip, every table is capped, each
source is rate-limited, and no answer exceeds AMPLIFICATION times the datagram that caused it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from ipcp.shim_guard import Cookies, RateLimits
from ipcp.shim_wire import (
    COOKIE,
    ERRNO,
    KEEPALIVE_ASK,
    NO_COOKIE,
    WANT_MEMBERS,
    Kind,
    Layout,
    Mgmt,
    Offer,
    ShimWireError,
    offer_fields,
    offer_of,
    qos_fields,
)
from proto import messages as m
from proto.qos import QosSpec

log = logging.getLogger(__name__)

Addr = Hashable  # (ip, port) for udp, a MAC address for eth

# -- timers, in seconds ------------------------------------------------------------

QUERY_RETRY = 0.25
QUERY_TIMEOUT = 1.0
ALLOC_RETRY = 0.5  # only towards peers known to be ours: a 0.23 peer would take a repeat as a replay
CACHE_TTL = 30.0
KEEPALIVE_IDLE = 1.0  # ask a peer of ours for a sign of life after this much silence
PEER_TIMEOUT = 5.0  # flows to a peer of ours silent this long go down
HELLO_EVERY = 10.0
MEMBER_TTL = 60.0
GREET_EVERY = 0.5  # candidates are greeted a few at a time, not all at once
QUARANTINE = 30.0  # a freed eid waits this long before reuse, if others are free: its peer may still send
MAX_QUARANTINE = 65536  # freed eids remembered at most
EID_DRAWS = 64  # random draws for a free eid in a wide space before looking in order

# -- limits ---------------------------------------------------------------------------

AMPLIFICATION = 3  # no answer is larger than this many times the datagram that caused it
HELLO_SIZE = 512  # a HELLO asking for members is padded to this, so that a page of ~200 fits the answer


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what the network can make a shim hold or do (docs/security/shims.md)."""

    members: int = 1024  # adopted members (configured peers always fit)
    candidates: int = 1024  # addresses heard of in gossip, waiting to be greeted
    # The share of each table one peer (as the layer names hosts: an IP, an IPv6 /64) holds at most, of
    # members those it proved, of candidates those its gossip named: a host proves as many addresses as
    # it has ports, and names as many as it likes, and once held every place of either, so that no host
    # that came after it was adopted, or one its gossip told of greeted (and none of their names found).
    peer_share: float = 0.25
    greet: int = 10  # candidates greeted per GREET_EVERY
    learn: int = 64  # addresses taken from one MEMBERS page
    flows: int = 4096  # flows, and requests waiting for the IRMd, in all
    deciding: int = 64  # flow requests waiting for the IRMd, in all
    deciding_per_source: int = 8
    queries: int = 256  # name queries outstanding
    cache: int = 4096  # resolved names
    rate: float = 50.0  # management messages per second from one source (burst: twice that)
    strangers_rate: float = 2000.0  # ... from all sources not known to us together
    # ... from the addresses of one host (`peer_of`) that proved itself a member, together: a host of
    # ours opening and closing ~30 flows a second sends past `rate`, and had its deallocations dropped
    member_rate: float = 500.0
    sources: int = 4096  # sources whose rates are tracked

    @property
    def members_per_peer(self) -> int:
        return max(1, int(self.members * self.peer_share))

    @property
    def candidates_per_peer(self) -> int:
        return max(1, int(self.candidates * self.peer_share))


def _uncount(counter: Counter[Hashable], key: Hashable) -> None:
    """One fewer for `key`; a key counted no more leaves the counter (its size stays the keys held)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _fingerprint(digest: bytes, data: bytes) -> bytes:
    """What tells a retransmitted flow request from a new one on the same eid: its hash and piggyback
    (an OAP request, whose id and timestamp are new for every flow)."""
    return hashlib.blake2b(digest + data, digest_size=16).digest()


class ShimFull(Exception):
    """Every endpoint id of the shim is taken."""


# -- events the core hands to its I/O loop ------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueryDone:
    digest: bytes
    addr: Addr | None  # None: nobody answered


@dataclasses.dataclass(frozen=True)
class AllocDone:
    eid: int
    response: int | None  # 0: accepted; < 0: refused (an errno); None: no answer in time
    data: bytes = b""  # the responder's piggyback
    offer: Offer | None = None  # set when the responder is ours


@dataclasses.dataclass(frozen=True)
class FlowEnded:
    eid: int
    down: bool  # True: the peer went silent; False: the peer deallocated


@dataclasses.dataclass(eq=False)
class ShimFlow:
    eid: int
    addr: Addr
    remote_eid: int = 0  # 0 until the peer answered the request
    flow_id: int = 0
    ours: bool = False  # the peer speaks our extensions
    relayed: bool = False  # data goes through the relay, which stamps rx_at and tx_at
    rx_at: float = 0.0
    tx_at: float = 0.0
    io: Any = None  # the I/O loop's handle (the IPCP's end of the application socket)
    sent: int = 0  # relayed SDUs (transports.relay counts them): sent to the peer,
    received: int = 0  # ... handed to the application,
    dropped_app: int = 0  # ... dropped as the application's queue was full,
    dropped_net: int = 0  # ... dropped as the network's was
    queue: int = 0  # bytes of queue the relay gave its application socket
    hdr: bytes = b""  # the transport's per-flow header, set by the I/O loop once the peer is known


@dataclasses.dataclass(frozen=True)
class FlowRequested:
    """A peer asks for a flow; answer with accept() or refuse(). The flow's eid is held meanwhile."""

    flow: ShimFlow  # not established until accepted
    digest: bytes
    qos: QosSpec
    data: bytes  # the requester's piggyback (its IRMd's OAP request), opaque here
    offer: Offer | None  # None: a plain Ouroboros 0.23 request
    budget: int  # bytes the reply may take before it amplifies a spoofed request

    @property
    def addr(self) -> Addr:
        return self.flow.addr

    @property
    def remote_eid(self) -> int:
        return self.flow.remote_eid


@dataclasses.dataclass
class _Pending:
    deadline: float
    next_try: float
    frame: bytes
    dst: Addr | None  # None: every member and the broadcast
    cookie: int = NO_COOKIE
    retry: bool = True


Event = QueryDone | FlowRequested | AllocDone | FlowEnded


class ShimCore:
    """Name resolution, flow handshakes, members and peer liveness for one shim IPCP."""

    def __init__(
        self,
        layout: Layout,
        *,
        hash_len: int,
        own: Addr,
        discovery: bool,
        encode_addr: Callable[[Addr], bytes] | None = None,
        decode_addrs: Callable[[bytes], list[Addr]] | None = None,
        peers: Iterable[Addr] = (),
        limits: Limits = Limits(),
        cookies: Cookies | None = None,
        peer_of: Callable[[Addr], Hashable] = lambda addr: addr,
    ) -> None:
        """`peer_of`: the host an address is one of (udp: its IP, an IPv6 address its /64), whose
        adopted members, and the candidates its gossip named, are held to `limits.peer_share`."""
        self.layout = layout
        self.hash_len = hash_len
        self.own = own
        self.discovery = discovery  # udp: members, gossip and our name queries; eth: 0.23's broadcast queries
        if discovery and (encode_addr is None or decode_addrs is None):
            raise ValueError("a layer with members needs an address codec")
        self.encode_addr = encode_addr or (lambda _: b"")
        self.decode_addrs = decode_addrs or (lambda _: [])
        self.limits = limits
        self.static_peers = {p for p in peers if p != own}
        self.members: dict[Addr, float] = dict.fromkeys(self.static_peers, 0.0)
        self.peer_of = peer_of
        self._adopted_of: Counter[Hashable] = Counter()  # adopted members (configured peers not) per peer
        self.candidates: OrderedDict[Addr, Hashable] = OrderedDict()  # -> the peer whose gossip named it
        self._named_by: Counter[Hashable] = Counter()  # candidates per peer that named them
        self._greeted: OrderedDict[Addr, float] = OrderedDict()
        self._echo: dict[Addr, int] = {}  # a member's latest cookie for us, to prove ourselves without a round trip
        self._page: dict[Addr, int] = {}  # the page of its members to ask a member for next
        self.cookies = cookies or Cookies()
        self.rates = RateLimits(limits.rate, limits.strangers_rate, limits.member_rate, limits.sources)
        self.registered: set[bytes] = set()
        self.cache: dict[bytes, tuple[Addr, float]] = {}
        self.flows: dict[int, ShimFlow] = {}
        self._peers: Counter[Addr] = Counter()  # flows per peer address
        self.heard: dict[Addr, float] = {}  # last sign of life of peers of ours we have flows with
        self.asked: dict[Addr, float] = {}
        self._freed: OrderedDict[int, float] = OrderedDict()  # eids freed lately, the oldest first
        self._queries: dict[bytes, _Pending] = {}
        self._allocs: dict[int, _Pending] = {}
        # Flow requests by (peer, its eid): the eids held while the IRMd decides, then the answers
        # of accepted ones (our eid, the request's fingerprint, the answer), repeated if the same
        # request comes again (its answer was lost).
        self._deciding: dict[tuple[Addr, int], int] = {}
        self._answered: dict[tuple[Addr, int], tuple[int, bytes, bytes]] = {}
        # ... and for a while the answers of accepted flows that ended since (fingerprint, the reply, the
        # DEALLOC sent, when): a retransmission whose answer was lost finds out how its flow went, and is
        # not taken for a new request (its OAP header a replay, refused, would fail the peer's allocation).
        self._ended: OrderedDict[tuple[Addr, int], tuple[bytes, bytes, bytes | None, float]] = OrderedDict()
        self._out: deque[tuple[Addr | None, bytes]] = deque()
        self._events: deque[Event] = deque()
        self._budget = 0  # bytes left to answer the datagram being handled
        self._next_hello = 0.0
        self._next_greet = math.inf
        self._next_live = math.inf
        self.stats: Counter[str] = Counter()
        self.version = 0  # moves whenever the addresses `known()` returns may have changed
        self._handlers: dict[Kind, Callable[[Mgmt, Addr, float], None]] = {
            Kind.FLOW_REQ: self._on_flow_req, Kind.FLOW_REPLY: self._on_flow_reply,
            Kind.NAME_QUERY: self._on_name_query, Kind.NAME_REPLY: self._on_name_reply,
            Kind.NAME_GONE: self._on_name_gone, Kind.HELLO: self._on_hello, Kind.MEMBERS: self._on_members,
            Kind.DEALLOC: self._on_dealloc, Kind.KEEPALIVE: self._on_keepalive,
        }  # fmt: skip

    # -- outputs -------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Addr | None, bytes]]:
        """Management datagrams; a None destination means 'every member and the broadcast'."""
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        """When handle_timer wants to run next (math.inf: nothing to do until something arrives)."""
        when = min(self._next_hello if self.members or self.candidates else math.inf, self._next_greet, self._next_live)
        for p in (*self._queries.values(), *self._allocs.values()):
            when = min(when, p.deadline, p.next_try if p.retry else math.inf)
        return when

    def _encode(self, kind: Kind, body: bytes = b"", /, **fields: int) -> bytes | None:
        try:
            return self.layout.encode(kind, body, **fields)
        except ShimWireError as e:  # a value of ours that does not fit: a bug, but never a crash
            self._drop("unencodable", e)
            return None

    def _send(self, dst: Addr | None, frame: bytes | None) -> None:
        if frame is not None:
            self.stats["sent"] += 1
            self._out.append((dst, frame))

    def _answer(self, dst: Addr, kind: Kind, body: bytes = b"", /, **fields: int) -> None:
        """Answer the datagram being handled, within its amplification budget."""
        frame = self._encode(kind, body, **fields)
        if frame is None:
            return
        if len(frame) > self._budget:
            self._drop("amplification", f"{kind.value} of {len(frame)} bytes to {dst}")
            return
        self._budget -= len(frame)
        self._send(dst, frame)

    def _drop(self, reason: str, why: object = "") -> None:
        self.stats["dropped " + reason] += 1
        log.debug("dropped (%s): %s", reason, why)

    # -- names ---------------------------------------------------------------

    def register(self, digest: bytes, on: bool) -> None:
        if on:
            self.registered.add(digest)
        elif digest in self.registered:
            self.registered.discard(digest)
            if self.discovery:
                self._send(None, self._encode(Kind.NAME_GONE, digest))

    def query(self, digest: bytes, now: float) -> None:
        """Resolve a hash; a QueryDone event follows (at once if cached)."""
        if (addr := self.resolved(digest, now)) is not None:
            self._events.append(QueryDone(digest, addr))
            return
        if digest in self._queries:
            return
        if len(self._queries) >= self.limits.queries:
            self._events.append(QueryDone(digest, None))
            return
        cookie = random.getrandbits(64) or 1
        # eth: 0.23's query, with our cookie after the hash (a 0.23 node reads the hash and answers without it)
        frame = self._encode(Kind.NAME_QUERY, digest + COOKIE.pack(cookie))
        if frame is not None:
            self._queries[digest] = _Pending(now + QUERY_TIMEOUT, now + QUERY_RETRY, frame, None, cookie)
            self._send(None, frame)

    def learn(self, digest: bytes, addr: Addr, now: float) -> None:
        """A name resolved outside the core (DNS, /etc/hosts): cache it and answer the query waiting."""
        self._cache(digest, addr, now)
        if self._queries.pop(digest, None) is not None:
            self._events.append(QueryDone(digest, addr))

    def _cache(self, digest: bytes, addr: Addr, now: float) -> None:
        self.cache.pop(digest, None)
        while len(self.cache) >= self.limits.cache:
            del self.cache[next(iter(self.cache))]  # the oldest
        self.cache[digest] = (addr, now + CACHE_TTL)

    def resolved(self, digest: bytes, now: float) -> Addr | None:
        hit = self.cache.get(digest)
        return hit[0] if hit is not None and hit[1] > now else None

    # -- flows ---------------------------------------------------------------

    @property
    def flow_capacity(self) -> int:
        """The most flows the shim holds at once: its endpoint ids (eth-llc's 62 SAPs), or its flow cap."""
        lo, hi = self.layout.eids
        return min(hi - lo + 1, self.limits.flows)

    def _free_eids(self) -> int:
        return self.flow_capacity - len(self.flows) - len(self._deciding)

    def new_eid(self) -> int:
        """A free eid, and not one freed lately while others are free: its peer may still send to it."""
        if self._free_eids() <= 0:
            raise ShimFull(f"all {self.flow_capacity} endpoint ids are in use")
        lo, hi = self.layout.eids
        held = self.flows.keys() | set(self._deciding.values())
        if hi - lo < 4096:  # eth-llc's SAPs: pick among the free ones
            fresh = [e for e in range(lo, hi + 1) if e not in held and e not in self._freed]
            eid = random.choice(fresh) if fresh else next(e for e in self._freed if e not in held)
        else:  # at most 4,096 of 65,535 or more taken: a few draws
            held = set(self._deciding.values())
            for _ in range(EID_DRAWS):
                eid = random.randint(lo, hi)
                if eid not in self.flows and eid not in held and eid not in self._freed:
                    break
            else:  # nearly every free eid was freed lately (by the ten thousand): the one freed longest ago
                taken = self.flows.keys() | held
                found = next((e for e in self._freed if e not in taken), None)
                eid = found if found is not None else next(e for e in range(lo, hi + 1) if e not in taken)
        self._freed.pop(eid, None)
        return eid

    def known(self) -> frozenset[Addr]:
        """The addresses that are more than a claim (see _known), for the data path to favour."""
        return frozenset(self.members.keys() | self.heard.keys() | self._peers.keys())

    def _known(self, addr: Addr, resolved: bool = False) -> bool:
        """Whether `addr` is more than a claim: a member or configured peer, a peer of flows of ours,
        or (with `resolved`, a linear search) an address we resolved a name to."""
        return (
            addr in self.members
            or addr in self.heard
            or addr in self._peers
            or (resolved and any(hit[0] == addr for hit in self.cache.values()))
        )

    def alloc(
        self, digest: bytes, qos: QosSpec, addr: Addr, now: float, timeout: float, data: bytes = b"", port: int = 0
    ) -> ShimFlow:
        """Ask `addr` for a flow, carrying `data`; an AllocDone event follows."""
        flow = ShimFlow(self.new_eid(), addr)
        fields = {"s_eid": flow.eid, **qos_fields(qos), **offer_fields(Offer(qos.cypher_s, port), reply=False)}
        frame = self.layout.encode(Kind.FLOW_REQ, digest + data, **fields)
        self._add(flow)
        # A 0.23 peer takes a repeated request as a replay of its OAP: repeat only to peers proven ours.
        ours = self._adopted(addr) or addr in self.heard
        self._allocs[flow.eid] = _Pending(now + timeout, now + ALLOC_RETRY, frame, addr, retry=ours)
        self._send(addr, frame)
        return flow

    def accept(self, req: FlowRequested, now: float, data: bytes = b"", port: int = 0) -> ShimFlow | None:
        """Accept a requested flow, answering with `data`; None if the answer may not be sent
        (larger than the request allows, to an address nothing vouches for)."""
        key = (req.addr, req.remote_eid)
        if self._deciding.pop(key, None) != req.flow.eid:  # forgotten meanwhile (the shim stopped)
            return None
        ext = offer_fields(Offer(port=port), reply=True) if req.offer is not None else {}
        fields = self.layout.reply_fields(req.remote_eid, req.flow.eid)
        frame = self._encode(Kind.FLOW_REPLY, data, **fields, **ext)
        if frame is None or (len(frame) > req.budget and not self._known(req.addr, resolved=True)):
            self._drop(
                "amplification",
                f"a flow reply of {len(frame or b'')} bytes to {req.addr}, which sent"
                f" {req.budget // AMPLIFICATION}: configure it as a peer",
            )
            return None
        flow = req.flow
        flow.ours, flow.rx_at, flow.tx_at = req.offer is not None, now, now
        self._add(flow)
        self._answered[key] = (flow.eid, _fingerprint(req.digest, req.data), frame)
        if flow.ours:
            self.heard[req.addr] = now
        self._send(req.addr, frame)
        self._schedule_live(now)
        return flow

    def refuse(self, req: FlowRequested, code: str) -> None:
        """Refuse a requested flow with one of our error names (sent as Ouroboros's errno)."""
        self._deciding.pop((req.addr, req.remote_eid), None)
        fields = self.layout.reply_fields(req.remote_eid, 0)
        self._send(req.addr, self._encode(Kind.FLOW_REPLY, response=ERRNO.get(code, -1), **fields))

    def established(self, flow: ShimFlow, now: float) -> None:
        """The I/O loop set the flow up: its liveness clock starts."""
        flow.rx_at = flow.tx_at = now
        self._schedule_live(now)

    def dealloc(self, eid: int, now: float) -> ShimFlow | None:
        """The local side let go of a flow: tell a peer of ours (a 0.23 peer learns from the silence)."""
        flow = self._forget(eid, now)
        if flow is not None and flow.remote_eid and flow.ours:
            self._send(flow.addr, self._encode(Kind.DEALLOC, s_eid=eid, d_eid=flow.remote_eid))
        return flow

    def _add(self, flow: ShimFlow) -> None:
        self.flows[flow.eid] = flow
        self._peers[flow.addr] += 1
        self.version += 1

    def _forget(self, eid: int, now: float) -> ShimFlow | None:
        flow = self.flows.pop(eid, None)
        self._allocs.pop(eid, None)
        if flow is not None:
            _uncount(self._peers, flow.addr)
            self.version += 1
            key = (flow.addr, flow.remote_eid)
            answered = self._answered.get(key)
            if answered is not None and answered[0] == eid:  # not a later flow's, on an eid the peer reused
                del self._answered[key]
                bye = self._encode(Kind.DEALLOC, s_eid=eid, d_eid=flow.remote_eid) if flow.ours else None
                self._ended[key] = (answered[1], answered[2], bye, now)
                self._ended.move_to_end(key)
                if len(self._ended) > self.limits.flows:
                    self._ended.popitem(last=False)
            self._freed[eid] = now
            if len(self._freed) > MAX_QUARANTINE:
                self._freed.popitem(last=False)
        return flow

    # -- inputs --------------------------------------------------------------

    def receive(self, data: bytes, src: Addr, now: float) -> None:
        """A datagram that arrived on the management endpoint."""
        self.stats["received"] += 1
        known, member = self._known(src), self._adopted(src)
        # A member's addresses share one bucket: a host proves as many as it has ports.
        if not self.rates.allow(("host", self.peer_of(src)) if member else src, known, now, member):
            self._drop("rate", src)
            return
        self._budget = AMPLIFICATION * len(data)
        try:
            if len(data) > self.layout.max_size:  # what a frame may hold is the link's, not the layer's
                raise ShimWireError(f"management message of {len(data)} bytes: at most {self.layout.max_size}")
            kind, msg = self.layout.decode(data)
            self._touch(src, now)
            self._handlers[kind](msg, src, now)
        except ShimWireError as e:
            self._drop("malformed", f"from {src}: {e}")

    def _digest(self, body: bytes) -> tuple[bytes, bytes]:
        """(hash, what follows it) of a body that starts with a name hash."""
        if len(body) < self.hash_len:
            raise ShimWireError(f"name hash of {len(body)} bytes, the layer's are {self.hash_len}")
        return body[: self.hash_len], body[self.hash_len :]

    def _valid_eid(self, eid: int) -> bool:
        """An endpoint id the layer hands out: eth-llc's header has a byte for a SAP, which is 2 to 63."""
        lo, hi = self.layout.eids
        return lo <= eid <= hi

    def _on_flow_req(self, msg: Mgmt, src: Addr, now: float) -> None:
        digest, data = self._digest(msg.body)
        if not self._valid_eid(msg.s_eid):
            raise ShimWireError(f"flow request with endpoint id {msg.s_eid}")
        key = (src, msg.s_eid)
        if key in self._deciding:  # a retransmission while the IRMd decides
            return
        fingerprint = _fingerprint(digest, data)
        answered, ended = self._answered.get(key), self._ended.get(key)
        if answered is not None and answered[1] == fingerprint:  # the answer was lost
            self._repeat(src, answered[2])
            return
        if ended is not None and ended[0] == fingerprint:  # lost, and the flow ended since
            self._repeat(src, ended[1], ended[2])  # accepted, as it was, and let go, as it was since
            return
        # Another request on the eid of a flow we accepted: a new flow. 0.23 takes its eids from its
        # lowest free flow descriptors, so its next flow to us often has the eid of one it let go
        # (which we keep until it times out: nothing in an unauthenticated request may end a flow).
        if digest not in self.registered:
            # udp: refused at once. Ethernet is shared (on `lo` every IPCP has the same address), so
            # as 0.23's eth IPCP we leave a request for a name we do not hold to whoever holds it.
            if self.discovery:
                self._answer(src, Kind.FLOW_REPLY, response=ERRNO[m.ENOENT], **self.layout.reply_fields(msg.s_eid, 0))
            else:
                self._drop("unexpected", f"flow request from {src} for a name not registered here")
            return
        from_src = sum(1 for a, _ in self._deciding if a == src)
        if len(self._deciding) >= self.limits.deciding or from_src >= self.limits.deciding_per_source:
            self._drop("busy", f"flow request from {src}: {len(self._deciding)} undecided")
            return
        if self._free_eids() <= 0:
            self._answer(src, Kind.FLOW_REPLY, response=ERRNO["EBUSY"], **self.layout.reply_fields(msg.s_eid, 0))
            return
        offer = offer_of(msg, reply=False)
        qos = msg.qos()
        if offer is not None:
            qos = dataclasses.replace(qos, cypher_s=offer.cypher_s)
        flow = ShimFlow(self.new_eid(), src, msg.s_eid)
        self._deciding[key] = flow.eid
        self._events.append(FlowRequested(flow, digest, qos, data, offer, self._budget))

    def _repeat(self, src: Addr, *frames: bytes | None) -> None:
        """Send again what answered a request that came again, within its budget (unless a member)."""
        sent = [f for f in frames if f is not None]
        if sum(map(len, sent)) <= self._budget or self._known(src, resolved=True):
            for frame in sent:
                self._send(src, frame)

    def _on_flow_reply(self, msg: Mgmt, src: Addr, now: float) -> None:
        req_eid, resp_eid = self.layout.reply_eids(msg)
        flow = self.flows.get(req_eid)
        if flow is None or req_eid not in self._allocs or flow.addr != src:
            self._drop("unexpected", f"flow reply for endpoint {req_eid} from {src}")
            return
        del self._allocs[req_eid]
        if msg.response == 0 and not self._valid_eid(resp_eid):
            msg = dataclasses.replace(msg, response=ERRNO[m.EPROTO])
        if msg.response != 0:
            self._forget(req_eid, now)
            if msg.response == ERRNO[m.ENOENT]:  # our cache sent us to the wrong place
                self.cache = {h: v for h, v in self.cache.items() if v[0] != src}
            self._events.append(AllocDone(req_eid, msg.response))
            return
        offer = offer_of(msg, reply=True)
        flow.remote_eid, flow.ours = resp_eid, offer is not None
        if flow.ours:
            self.heard[src] = now
        self._events.append(AllocDone(req_eid, 0, msg.body, offer))

    def _on_name_query(self, msg: Mgmt, src: Addr, now: float) -> None:
        digest, cookie = self._digest(msg.body)
        if digest in self.registered:  # the cookie, if any, goes back as it came (a 0.23 querier sends none)
            self._answer(src, Kind.NAME_REPLY, digest + cookie[: COOKIE.size])

    def _on_name_reply(self, msg: Mgmt, src: Addr, now: float) -> None:
        digest, rest = self._digest(msg.body)
        pending = self._queries.get(digest)
        if pending is None:
            self._drop("unexpected", f"name reply from {src} for no query")
            return
        # Our nodes echo the query's cookie; a 0.23 eth node answers with the hash alone.
        cookie = COOKIE.unpack_from(rest)[0] if len(rest) >= COOKIE.size else None
        if cookie != pending.cookie and (cookie is not None or self.discovery):
            self._drop("unexpected", f"name reply from {src} with the wrong cookie")
            return
        del self._queries[digest]
        self._cache(digest, src, now)
        self._events.append(QueryDone(digest, src))

    def _on_name_gone(self, msg: Mgmt, src: Addr, now: float) -> None:
        digest, _ = self._digest(msg.body)
        hit = self.cache.get(digest)
        if hit is not None and hit[0] == src:
            del self.cache[digest]

    def _on_dealloc(self, msg: Mgmt, src: Addr, now: float) -> None:
        flow = self.flows.get(msg.d_eid)
        if flow is not None and flow.addr == src and flow.ours and flow.remote_eid == msg.s_eid:
            self._forget(msg.d_eid, now)
            self._events.append(FlowEnded(msg.d_eid, down=False))
        else:
            self._drop("unexpected", f"dealloc of endpoint {msg.d_eid} from {src}")

    def _on_keepalive(self, msg: Mgmt, src: Addr, now: float) -> None:
        if msg.response == KEEPALIVE_ASK and src in self.heard:
            self._answer(src, Kind.KEEPALIVE)

    # -- members (udp) -------------------------------------------------------------

    def _hello(self, dst: Addr, now: float, want: bool, pad: bool = True) -> bytes | None:
        """A HELLO of ours: our cookie for `dst`, its latest for us; asking for members, padded so that
        the answer may carry a page of them (HELLO_SIZE)."""
        body = COOKIE.pack(self.cookies.make(dst, now)) + COOKIE.pack(self._echo.get(dst, NO_COOKIE))
        if not want:
            return self._encode(Kind.HELLO, body)
        frame = self._encode(Kind.HELLO, body, response=WANT_MEMBERS, d_eid=self._page.get(dst, 0))
        return None if frame is None or not pad else frame + bytes(max(HELLO_SIZE - len(frame), 0))

    def _on_hello(self, msg: Mgmt, src: Addr, now: float) -> None:
        if not self.discovery:
            raise ShimWireError("HELLO on a layer without members")
        if len(msg.body) < 2 * COOKIE.size:
            raise ShimWireError(f"HELLO body of {len(msg.body)} bytes")
        theirs, echo = COOKIE.unpack_from(msg.body)[0], COOKIE.unpack_from(msg.body, COOKIE.size)[0]
        proven = self.cookies.check(src, echo, now)
        self.stats["cookies proven" if proven else "cookies unproven"] += 1
        if proven:
            self._adopt(src, now)
            if src in self.members and theirs:
                self._echo[src] = theirs
        if not proven or theirs:
            # The challenge (or our proof) costs no state: the cookie is computed again when it comes back.
            # To a member, it also asks for a page of members (as large as the member's answer allows).
            mine = NO_COOKIE if proven else self.cookies.make(src, now)
            self.stats["cookies sent"] += not proven
            want = {"response": WANT_MEMBERS, "d_eid": self._page.get(src, 0)} if src in self.members else {}
            self._answer(src, Kind.HELLO, COOKIE.pack(mine) + COOKIE.pack(theirs), **want)
        if proven and src in self.members and msg.response & WANT_MEMBERS:
            self._answer_members(src, msg.d_eid)

    def _adopt(self, src: Addr, now: float) -> None:
        new = src not in self.members
        if new and len(self.members) >= self.limits.members + len(self.static_peers):
            self._drop("members full", src)
            return
        if new:
            peer = self.peer_of(src)
            if self._adopted_of[peer] >= self.limits.members_per_peer:
                self._drop("members of one peer", src)
                return
            self._adopted_of[peer] += 1
        self.members[src] = now
        self._forget_candidate(src)
        if new:
            self.version += 1
            self.stats["members adopted"] += 1
            log.info("member %s adopted", src)
            # It answered our cookie: ask it for its first members at once (unpadded, as this follows
            # from its datagram: what it gets for it stays within 3x; full pages come with the rounds).
            self._send(src, self._hello(src, now, want=True, pad=False))

    def _answer_members(self, src: Addr, offset: int) -> None:
        """A page of members, from `offset`, as much as the request's budget allows."""
        others = [a for a in self.members if a != src]
        head = self.layout.size
        entries: list[bytes] = []
        room = self._budget - head
        for addr in others[offset : offset + self.limits.learn * 4]:
            entry = self.encode_addr(addr)
            if len(entry) > room:
                break
            entries.append(entry)
            room -= len(entry)
        self._answer(src, Kind.MEMBERS, b"".join(entries), s_eid=min(offset, len(others)), d_eid=len(others))

    def _on_members(self, msg: Mgmt, src: Addr, now: float) -> None:
        if not self.discovery or src not in self.members:
            raise ShimWireError(f"MEMBERS from {src}, not a member")  # we only ask members
        addrs = self.decode_addrs(msg.body)
        # The next HELLO asks for the page after this one, and from the start once all were seen.
        after = msg.s_eid + len(addrs)
        self._page[src] = after if addrs and after < msg.d_eid else 0
        teller = self.peer_of(src)
        for addr in addrs[: self.limits.learn]:
            if addr == self.own or addr in self.members or addr in self.candidates or addr in self._greeted:
                continue
            if len(self.candidates) >= self.limits.candidates:
                self._drop("candidates full", addr)
                break
            if self._named_by[teller] >= self.limits.candidates_per_peer:
                self._drop("candidates of one peer", addr)
                break
            self.candidates[addr] = teller
            self._named_by[teller] += 1
        if self.candidates and self._next_greet == math.inf:
            self._next_greet = now

    # -- liveness --------------------------------------------------------------------

    def _adopted(self, addr: Addr) -> bool:
        """A member that proved itself ours: a configured peer stays at 0.0 until its first proven
        HELLO, as it may be a 0.23 node, whose answers say nothing of whether it speaks our protocol."""
        return self.members.get(addr, 0.0) > 0.0

    def _touch(self, src: Addr, now: float) -> None:
        if self._adopted(src):
            self.members[src] = now
            self.heard[src] = now
        elif src in self.heard:
            self.heard[src] = now

    def _schedule_live(self, now: float) -> None:
        self._next_live = min(self._next_live, now)

    def handle_timer(self, now: float) -> None:
        """Retransmit, time out queries and allocations, keep flows and peers alive, greet members."""
        for digest, p in list(self._queries.items()):
            if now >= p.deadline:
                del self._queries[digest]
                self._events.append(QueryDone(digest, None))
            elif now >= p.next_try:
                p.next_try = now + QUERY_RETRY
                self._send(p.dst, p.frame)
        for eid, p in list(self._allocs.items()):
            if now >= p.deadline:
                self._forget(eid, now)
                self._events.append(AllocDone(eid, None))
            elif p.retry and now >= p.next_try:
                p.next_try = now + ALLOC_RETRY
                self._send(p.dst, p.frame)
        while self._freed and now - next(iter(self._freed.values())) >= QUARANTINE:
            self._freed.popitem(last=False)
        while self._ended and now - next(iter(self._ended.values()))[3] >= QUARANTINE:
            self._ended.popitem(last=False)
        if now >= self._next_live:
            self._next_live = self._check_flows(now)
        if now >= self._next_greet:
            self._greet(now)
        if self.discovery and now >= self._next_hello:
            self._next_hello = now + HELLO_EVERY
            for addr, seen in list(self.members.items()):
                if addr not in self.static_peers and now - seen > MEMBER_TTL:
                    del self.members[addr]
                    _uncount(self._adopted_of, self.peer_of(addr))
                    self._echo.pop(addr, None)
                    self._page.pop(addr, None)
                    self.version += 1
                else:
                    self._send(addr, self._hello(addr, now, want=True))

    def _forget_candidate(self, addr: Addr) -> None:
        teller = self.candidates.pop(addr, None)
        if teller is not None:
            _uncount(self._named_by, teller)

    def _greet(self, now: float) -> None:
        for _ in range(min(self.limits.greet, len(self.candidates))):
            addr = next(iter(self.candidates))
            self._forget_candidate(addr)
            self._greeted[addr] = now
            self._send(addr, self._hello(addr, now, want=False))
        while self._greeted and now - next(iter(self._greeted.values())) > MEMBER_TTL:
            self._greeted.popitem(last=False)
        while len(self._greeted) > self.limits.candidates:
            self._greeted.popitem(last=False)
        self._next_greet = now + GREET_EVERY if self.candidates else math.inf

    def _check_flows(self, now: float) -> float:
        """Keepalives between us and the peers of ours we have flows with; when to look again.

        Flows to 0.23 peers are kept alive end to end, as in Ouroboros: their empty SDUs pass
        through like data, and the peers' applications tell when the other end went silent.
        """
        for flow in self.flows.values():
            if flow.relayed and flow.ours and flow.rx_at:  # data heard on the relay counts too
                self.heard[flow.addr] = max(self.heard.get(flow.addr, 0.0), flow.rx_at)
        peers = {f.addr for f in self.flows.values() if f.remote_eid and f.ours}
        for addr in [a for a in self.heard if a not in peers]:
            del self.heard[addr]
            self.asked.pop(addr, None)
        for addr in peers:
            silent = now - self.heard.setdefault(addr, now)
            if silent > PEER_TIMEOUT:
                for flow in [f for f in self.flows.values() if f.addr == addr and f.remote_eid and f.ours]:
                    self._forget(flow.eid, now)
                    self._events.append(FlowEnded(flow.eid, down=True))
                del self.heard[addr]
            elif silent > KEEPALIVE_IDLE and now - self.asked.get(addr, 0.0) > KEEPALIVE_IDLE:
                self.asked[addr] = now
                self._send(addr, self._encode(Kind.KEEPALIVE, response=KEEPALIVE_ASK))
        return now + KEEPALIVE_IDLE / 2 if peers else math.inf

    def counters(self) -> dict[str, int]:
        """Counters and table sizes, for the logs (and `irm ipcp show`)."""
        return {
            **self.stats,
            "flows": len(self.flows),
            "members": len(self.members),
            "candidates": len(self.candidates),
            "rate-tracked sources": len(self.rates),
            "undecided requests": len(self._deciding),
            "cached names": len(self.cache),
        }
