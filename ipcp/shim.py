"""The shims' flow allocator and name resolver (udp, eth), sans-IO: bytes and time in, actions out.

Management messages travel on endpoint 0 of the shim's datagram service; the
transport's own header (UDP's eid, Ethernet's eid/length) is not seen here.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import struct
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from proto.qos import QosSpec

log = logging.getLogger(__name__)

Addr = Hashable  # (ip, port) for udp, a MAC address for eth

# -- wire format of management messages -----------------------------------------

MGMT = struct.Struct("!BBHIIQ")  # code, result, body length, s_eid, d_eid, cookie
QOS = struct.Struct("!IQBIIBIIH")  # delay, bandwidth, availability, loss, ber, in_order, max_gap, timeout, cypher_s
FLOW_REQ, FLOW_REPLY, FLOW_DEALLOC, KEEPALIVE, NAME_QUERY, NAME_REPLY, NAME_GONE, HELLO, MEMBERS = range(1, 10)
CODES = range(FLOW_REQ, MEMBERS + 1)
OK, E_NOENT, E_REFUSED = 0, 1, 2
RESULTS = {OK: "ok", E_NOENT: "name not found at the peer", E_REFUSED: "refused by the peer"}
MAX_HASH = 64
MAX_LEARN = 64  # members taken from one MEMBERS message, so one datagram cannot make us greet thousands
KEEPALIVE_ASK = 1  # KEEPALIVE result field: the sender wants one back

# -- timers, in seconds ------------------------------------------------------------

QUERY_RETRY = 0.25
QUERY_TIMEOUT = 1.0
ALLOC_RETRY = 0.5
CACHE_TTL = 30.0
KEEPALIVE_IDLE = 1.0  # ask a peer for a sign of life after this much silence
PEER_TIMEOUT = 5.0  # flows to a peer silent this long go down
HELLO_EVERY = 10.0
MEMBER_TTL = 60.0


class ShimWireError(ValueError):
    """A management message that does not parse."""


class ShimFull(Exception):
    """Every endpoint id of the shim is taken."""


@dataclasses.dataclass(frozen=True)
class Mgmt:
    code: int
    result: int = 0
    s_eid: int = 0
    d_eid: int = 0
    cookie: int = 0
    body: bytes = b""

    def encode(self) -> bytes:
        return MGMT.pack(self.code, self.result, len(self.body), self.s_eid, self.d_eid, self.cookie) + self.body

    @classmethod
    def decode(cls, data: bytes) -> Mgmt:
        if len(data) < MGMT.size:
            raise ShimWireError(f"management message of {len(data)} bytes is truncated")
        code, result, length, s_eid, d_eid, cookie = MGMT.unpack_from(data)
        if code not in CODES:
            raise ShimWireError(f"unknown management code {code}")
        if length != len(data) - MGMT.size:
            raise ShimWireError(f"body length {length} != {len(data) - MGMT.size}")
        return cls(code, result, s_eid, d_eid, cookie, bytes(data[MGMT.size :]))


def encode_qos(q: QosSpec) -> bytes:
    return QOS.pack(min(q.delay, 0xFFFFFFFF), q.bandwidth, min(q.availability, 255), min(q.loss, 0xFFFFFFFF),
                    min(q.ber, 0xFFFFFFFF), min(q.in_order, 255), min(q.max_gap, 0xFFFFFFFF),
                    min(q.timeout, 0xFFFFFFFF), min(q.cypher_s, 0xFFFF))


def decode_qos(data: bytes) -> QosSpec:
    if len(data) < QOS.size:
        raise ShimWireError("qos truncated")
    return QosSpec(*QOS.unpack_from(data))


def check_hash(body: bytes) -> bytes:
    if not 1 <= len(body) <= MAX_HASH:
        raise ShimWireError(f"name hash of {len(body)} bytes")
    return body


# -- events the core hands to its I/O loop ------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueryDone:
    digest: bytes
    addr: Addr | None  # None: nobody answered


@dataclasses.dataclass(frozen=True)
class FlowRequested:
    """A peer asks for a flow; answer with accept() or refuse()."""

    addr: Addr
    remote_eid: int
    digest: bytes
    qos: QosSpec
    endpoint: bytes = b""  # the requester's data endpoint, if the transport has per-flow ones


@dataclasses.dataclass(frozen=True)
class AllocDone:
    eid: int
    result: int  # OK or an error code from RESULTS; -1: no answer in time
    endpoint: bytes = b""  # the peer's data endpoint


@dataclasses.dataclass(frozen=True)
class FlowEnded:
    eid: int
    down: bool  # True: the peer went silent; False: the peer deallocated


Event = QueryDone | FlowRequested | AllocDone | FlowEnded


@dataclasses.dataclass(eq=False)
class ShimFlow:
    eid: int
    addr: Addr
    remote_eid: int = 0  # 0 until the peer answered the request
    flow_id: int = 0
    io: Any = None  # the I/O loop's handle (the IPCP's end of the application socket)
    rx: bool = False  # set by the data path on every SDU from the peer; the timer reads it
    hdr: bytes = b""  # the transport's per-flow header, set by the I/O loop once the peer is known


@dataclasses.dataclass
class _Pending:
    deadline: float
    next_try: float
    msg: Mgmt
    dst: Addr | None  # None: broadcast and members


class ShimCore:
    """Name resolution, flow handshakes and peer liveness for one shim IPCP."""

    def __init__(self, *, eid_bits: int, encode_addr: Callable[[Addr], bytes],
                 decode_addrs: Callable[[bytes], list[Addr]], own: Addr, peers: list[Addr] = ()) -> None:  # type: ignore[assignment]
        self.eid_max = (1 << eid_bits) - 1
        self.encode_addr = encode_addr
        self.decode_addrs = decode_addrs
        self.own = own
        self.static_peers = set(peers)
        self.members: dict[Addr, float] = dict.fromkeys(peers, 0.0)
        self.registered: set[bytes] = set()
        self.cache: dict[bytes, tuple[Addr, float]] = {}
        self.flows: dict[int, ShimFlow] = {}
        self.heard: dict[Addr, float] = {}  # last sign of life per peer with flows
        self.asked: dict[Addr, float] = {}  # last keepalive request per peer
        self._queries: dict[bytes, _Pending] = {}
        self._allocs: dict[int, _Pending] = {}
        # (peer, its eid) -> our reply, or None while the IRMd decides
        self._answered: dict[tuple[Addr, int], Mgmt | None] = {}
        self._out: deque[tuple[Addr | None, bytes]] = deque()
        self._events: deque[Event] = deque()
        self._next_hello = 0.0
        self.dropped = 0

    # -- outputs -------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Addr | None, bytes]]:
        """Management datagrams; a None destination means 'every member and the broadcast'."""
        out = list(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _send(self, dst: Addr | None, msg: Mgmt) -> None:
        self._out.append((dst, msg.encode()))

    # -- names ---------------------------------------------------------------

    def register(self, digest: bytes, on: bool) -> None:
        if on:
            self.registered.add(digest)
        elif digest in self.registered:
            self.registered.discard(digest)
            self._send(None, Mgmt(NAME_GONE, body=digest))

    def query(self, digest: bytes, now: float) -> None:
        """Resolve a hash; a QueryDone event follows (at once if cached)."""
        hit = self.cache.get(digest)
        if hit is not None and hit[1] > now:
            self._events.append(QueryDone(digest, hit[0]))
            return
        if digest in self._queries:
            return
        msg = Mgmt(NAME_QUERY, cookie=random.getrandbits(64), body=digest)
        self._queries[digest] = _Pending(now + QUERY_TIMEOUT, now + QUERY_RETRY, msg, None)
        self._send(None, msg)

    def resolved(self, digest: bytes, now: float) -> Addr | None:
        hit = self.cache.get(digest)
        return hit[0] if hit is not None and hit[1] > now else None

    # -- flows ---------------------------------------------------------------

    def _full(self) -> bool:
        deciding = sum(1 for reply in self._answered.values() if reply is None)
        return len(self.flows) + deciding >= self.eid_max

    def new_eid(self) -> int:
        if self._full():
            raise ShimFull(f"all {self.eid_max} endpoint ids are in use")
        while True:
            eid = random.randint(1, self.eid_max)
            if eid not in self.flows:
                return eid

    def alloc(self, digest: bytes, qos: QosSpec, addr: Addr, now: float, timeout: float,
              endpoint: bytes = b"") -> ShimFlow:
        """Ask `addr` for a flow; an AllocDone event follows."""
        flow = ShimFlow(self.new_eid(), addr)
        self.flows[flow.eid] = flow
        msg = Mgmt(FLOW_REQ, s_eid=flow.eid, body=encode_qos(qos) + bytes([len(digest)]) + digest + endpoint)
        self._allocs[flow.eid] = _Pending(now + timeout, now + ALLOC_RETRY, msg, addr)
        self._send(addr, msg)
        return flow

    def accept(self, req: FlowRequested, now: float, endpoint: bytes = b"") -> ShimFlow:
        self._answered.pop((req.addr, req.remote_eid), None)  # decided: no longer holds an eid back
        flow = ShimFlow(self.new_eid(), req.addr, req.remote_eid)
        self.flows[flow.eid] = flow
        reply = Mgmt(FLOW_REPLY, OK, flow.eid, req.remote_eid, body=endpoint)
        self._answered[(req.addr, req.remote_eid)] = reply
        self.heard[req.addr] = now
        self._send(req.addr, reply)
        return flow

    def refuse(self, req: FlowRequested, result: int) -> None:
        self._answered.pop((req.addr, req.remote_eid), None)
        self._send(req.addr, Mgmt(FLOW_REPLY, result, 0, req.remote_eid))

    def dealloc(self, eid: int) -> ShimFlow | None:
        """The local side let go of a flow: tell the peer and forget it."""
        flow = self._forget(eid)
        if flow is not None and flow.remote_eid:
            self._send(flow.addr, Mgmt(FLOW_DEALLOC, s_eid=eid, d_eid=flow.remote_eid))
        return flow

    def _forget(self, eid: int) -> ShimFlow | None:
        flow = self.flows.pop(eid, None)
        self._allocs.pop(eid, None)
        if flow is not None:
            self._answered.pop((flow.addr, flow.remote_eid), None)
        return flow

    # -- inputs --------------------------------------------------------------

    def receive(self, data: bytes, src: Addr, now: float) -> None:
        """A datagram that arrived on the management endpoint."""
        try:
            msg = Mgmt.decode(data)
            self._dispatch(msg, src, now)
        except (ShimWireError, ValueError) as e:
            self.dropped += 1
            log.debug("dropped management message from %s: %s", src, e)

    def _dispatch(self, msg: Mgmt, src: Addr, now: float) -> None:
        if src in self.members or src in self.heard:
            self._touch(src, now)
        code = msg.code
        if code == NAME_QUERY:
            digest = check_hash(msg.body)
            if digest in self.registered:
                self._send(src, Mgmt(NAME_REPLY, cookie=msg.cookie, body=digest))
        elif code == NAME_REPLY:
            digest = check_hash(msg.body)
            pending = self._queries.get(digest)
            if pending is not None and pending.msg.cookie == msg.cookie:
                del self._queries[digest]
                self.cache[digest] = (src, now + CACHE_TTL)
                self._events.append(QueryDone(digest, src))
        elif code == NAME_GONE:
            digest = check_hash(msg.body)
            hit = self.cache.get(digest)
            if hit is not None and hit[0] == src:
                del self.cache[digest]
        elif code == FLOW_REQ:
            qos = decode_qos(msg.body)
            n = msg.body[QOS.size] if len(msg.body) > QOS.size else 0
            digest = check_hash(msg.body[QOS.size + 1 : QOS.size + 1 + n])
            endpoint = msg.body[QOS.size + 1 + n :]
            key = (src, msg.s_eid)
            if key in self._answered:  # a retransmitted request: repeat the answer, if there is one yet
                if (reply := self._answered[key]) is not None:
                    self._send(src, reply)
            elif digest not in self.registered:
                self._send(src, Mgmt(FLOW_REPLY, E_NOENT, 0, msg.s_eid))
            elif self._full():
                self._send(src, Mgmt(FLOW_REPLY, E_REFUSED, 0, msg.s_eid))
            elif msg.s_eid:
                self._answered[key] = None
                self._events.append(FlowRequested(src, msg.s_eid, digest, qos, endpoint))
        elif code == FLOW_REPLY:
            flow = self.flows.get(msg.d_eid)
            if flow is None or flow.addr != src or msg.d_eid not in self._allocs:
                return
            del self._allocs[msg.d_eid]
            if msg.result == OK and msg.s_eid:
                flow.remote_eid = msg.s_eid
                self.heard[src] = now
            else:
                self._forget(msg.d_eid)
                if msg.result == E_NOENT:
                    self.cache = {h: v for h, v in self.cache.items() if v[0] != src}
            result = msg.result if msg.s_eid or msg.result else E_REFUSED
            self._events.append(AllocDone(msg.d_eid, result, msg.body if result == OK else b""))
        elif code == FLOW_DEALLOC:
            flow = self.flows.get(msg.d_eid)
            if flow is not None and flow.addr == src and flow.remote_eid == msg.s_eid:
                self._forget(msg.d_eid)
                self._events.append(FlowEnded(msg.d_eid, down=False))
        elif code == KEEPALIVE:
            self._touch(src, now)
            if msg.result == KEEPALIVE_ASK:
                self._send(src, Mgmt(KEEPALIVE))
        elif code == HELLO:
            new = src not in self.members
            self.members[src] = now
            self._send(src, Mgmt(MEMBERS, body=b"".join(self.encode_addr(a) for a in self.members if a != src)))
            if new:
                self._send(src, Mgmt(HELLO))
        elif code == MEMBERS:
            if src not in self.members:
                raise ShimWireError("MEMBERS from a stranger")  # we only hear them from whom we greeted
            self.members[src] = now
            for addr in self.decode_addrs(msg.body)[:MAX_LEARN]:
                if addr != self.own and addr not in self.members:
                    self.members[addr] = 0.0
                    self._send(addr, Mgmt(HELLO))

    def _touch(self, src: Addr, now: float) -> None:
        if src in self.members:
            self.members[src] = now
        self.heard[src] = now

    def handle_timer(self, now: float) -> None:
        """Retransmit, time out queries and allocations, keep peers alive, gossip."""
        for digest, p in list(self._queries.items()):
            if now >= p.deadline:
                del self._queries[digest]
                self._events.append(QueryDone(digest, None))
            elif now >= p.next_try:
                p.next_try = now + QUERY_RETRY
                self._send(None, p.msg)
        for eid, p in list(self._allocs.items()):
            if now >= p.deadline:
                self._forget(eid)
                self._events.append(AllocDone(eid, -1))
            elif now >= p.next_try:
                p.next_try = now + ALLOC_RETRY
                self._send(p.dst, p.msg)
        self._check_peers(now)
        if now >= self._next_hello:
            self._next_hello = now + HELLO_EVERY
            for addr, seen in list(self.members.items()):
                if addr not in self.static_peers and now - seen > MEMBER_TTL:
                    del self.members[addr]
                else:
                    self._send(addr, Mgmt(HELLO))

    def _check_peers(self, now: float) -> None:
        for flow in self.flows.values():
            if flow.rx:
                flow.rx = False
                self.heard[flow.addr] = now
        peers = {f.addr for f in self.flows.values() if f.remote_eid}
        for addr in list(self.heard):
            if addr not in peers:
                del self.heard[addr]
                self.asked.pop(addr, None)
        for addr in peers:
            silent = now - self.heard.get(addr, now)
            if silent > PEER_TIMEOUT:
                for flow in [f for f in self.flows.values() if f.addr == addr and f.remote_eid]:
                    self._forget(flow.eid)
                    self._events.append(FlowEnded(flow.eid, down=True))
                self.heard.pop(addr, None)
            elif silent > KEEPALIVE_IDLE and now - self.asked.get(addr, 0.0) > KEEPALIVE_IDLE:
                self.asked[addr] = now
                self._send(addr, Mgmt(KEEPALIVE, KEEPALIVE_ASK))
