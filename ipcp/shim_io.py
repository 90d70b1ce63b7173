"""The I/O loop shared by the shim IPCPs: ShimCore driven by asyncio (one timer, from get_timer),
data moved by a Relay thread, or by the application itself on a flow's own socket.

A subclass opens its transport in `open_transport` and frames per-flow headers;
everything else (queries, handshakes, keepalives, teardown) is common.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Hashable

from ipcp.base import DROP_APP, DROP_NET, Ipcp, direct_counters, flow_counters
from ipcp.lookups import LookupsBusy
from ipcp.shim import (
    AllocDone,
    FlowEnded,
    FlowRequested,
    QueryDone,
    ShimCore,
    ShimFlow,
    ShimFull,
)
from ipcp.shim_guard import Bucket
from ipcp.shim_wire import ShimWireError, response_code
from proto import messages as m
from proto.qos import QosSpec
from transports.channel import HandlerError, RemoteError
from transports.impair import ImpairedFraming, Impairment
from transports.ratelog import RateLog
from transports.relay import Framing, Relay
from transports.unix import seqpacket_pair

log = logging.getLogger(__name__)
REFUSALS = RateLog(logger=log)  # flow requests refused: any peer can send them
LOOKUPS_REFUSED = RateLog(rate=1.0, burst=5, logger=log)  # names not looked up: any local user can cause them
# Flows a peer ended (or that went down): a peer allocating and deallocating in a loop wrote a line per
# flow, as fast as it went; the counters keep them all.
ENDED = RateLog(rate=2.0, burst=10, logger=log)
UNASKED_KEPT = 256  # names not looked up, remembered to say so (as many as name queries)

MGMT_QUEUE = 1024  # management frames from strangers waiting for the loop; beyond this the relay drops them
KNOWN_QUEUE = 4096  # ... from members and flows' peers, which go first
MGMT_BATCH = 128  # frames handled per turn of the loop, so flows' timers are not starved by a flood
STATS_EVERY = 1.0  # seconds between looks at the drop counters (logged when they change)


def impaired(framing: Framing, spec: str | None) -> Framing:
    """The framing, wrapped in the test-only impairment if the layer asked for it."""
    if not spec:
        return framing
    try:
        impairment = Impairment.parse(spec)
    except ValueError as e:
        raise HandlerError(m.EINVAL, str(e)) from None
    log.warning("impairment on (test only): %s", impairment)
    return ImpairedFraming(framing, impairment)


class ShimIpcp(Ipcp):
    """Base of udp and eth IPCPs."""

    mtu = 1500
    loops_back = True  # the transport delivers to our own address: names here are reachable

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.core: ShimCore | None = None
        self.relay: Relay | None = None
        self._queries: dict[bytes, list[asyncio.Future[Hashable | None]]] = {}
        self._look_ups: dict[bytes, asyncio.Task[None]] = {}  # outside lookups of the queries under way
        self._unasked: dict[bytes, None] = {}  # names lately not looked up (the resolver busy), oldest first
        self._allocs: dict[int, asyncio.Future[AllocDone]] = {}
        self._by_flow_id: dict[int, ShimFlow] = {}
        # Frames from the relay thread: members' and flows' peers' first, strangers' after, and only
        # as many as the strangers' budget lets through, so that a flood cannot crowd a member out.
        self._known: frozenset[Hashable] = frozenset()
        self._known_version = -1
        self._inbox_known: deque[tuple[bytes, Hashable]] = deque()
        self._inbox: deque[tuple[bytes, Hashable]] = deque()
        self._strangers: Bucket | None = None
        self._draining = False
        self.inbox_dropped = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.hash_algo = "SHA3_256"

    # -- what a transport provides ------------------------------------------

    async def open_transport(self, layer: str, conf: dict[str, str]) -> tuple[ShimCore, Relay]:
        raise NotImplementedError

    def send_mgmt(self, dst: Hashable | None, frame: bytes) -> None:
        """Send a management frame; None means every member and the broadcast."""
        raise NotImplementedError

    def flow_header(self, flow: ShimFlow) -> bytes:
        raise NotImplementedError

    def data_socket(self) -> tuple[socket.socket, int] | None:
        """A socket of its own for a flow's data, and its port, if the transport has them (udp)."""
        return None

    def known(self, digest: bytes) -> Hashable | None:
        """A hash's address known here without asking anyone (udp: /etc/hosts), or None."""
        return None

    async def lookup(self, digest: bytes) -> Hashable | None:
        """Resolve a hash outside the layer's own protocol (udp: DNS), or None; LookupsBusy when the
        resolver has too many names waiting already."""
        return None

    # -- layer operations ----------------------------------------------------

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        self.loop = asyncio.get_running_loop()
        self.core, self.relay = await self.open_transport(layer, conf)
        limits = self.core.limits
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < min(hard, 2 * limits.flows):  # a relayed flow holds a socket here
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * limits.flows), hard))
        self._strangers = Bucket(2 * limits.strangers_rate, 4 * limits.strangers_rate, time.monotonic())
        self.relay.start()
        self.spawn(self._report_drops())
        self._flush()
        return m.LayerInfo(layer, self.hash_algo, self.mtu, self.core.flow_capacity)

    def _core(self) -> ShimCore:
        if self.core is None:
            raise HandlerError(m.ENOTCONN, f"ipcp {self.name} is not bootstrapped")
        return self.core

    async def reg(self, digest: bytes, register: bool) -> None:
        self._core().register(digest, register)
        self._flush()

    async def query(self, digest: bytes) -> bool:
        return await self._resolve(digest) is not None

    async def _resolve(self, digest: bytes) -> Hashable | None:
        core = self._core()
        if self.loops_back and digest in core.registered:
            return core.own  # a name of this very host: the flow loops through our own socket
        if (addr := core.resolved(digest, time.monotonic())) is not None:
            return addr
        if (addr := self.known(digest)) is not None:  # /etc/hosts: never behind the resolver's queue
            core.learn(digest, addr, time.monotonic())
            self._flush()
            return addr
        fut: asyncio.Future[Hashable | None] = asyncio.get_running_loop().create_future()
        self._queries.setdefault(digest, []).append(fut)
        core.query(digest, time.monotonic())
        self._flush()
        if digest in self._queries and digest not in self._look_ups:  # still asked, and not looked up yet
            self._unasked.pop(digest, None)
            self._look_ups[digest] = self.spawn(self._look_up(digest))
        return await fut

    async def _look_up(self, digest: bytes) -> None:
        """The outside resolver runs beside the layer's own query; whichever answers first wins. The
        query's end (QueryDone) cancels it: a lookup nobody waits for leaves the resolver's queue."""
        try:
            addr = await self.lookup(digest)
        except LookupsBusy as e:
            self._unasked[digest] = None
            while len(self._unasked) > UNASKED_KEPT:
                del self._unasked[next(iter(self._unasked))]
            LOOKUPS_REFUSED.log("%s: a name not looked up: %s", self.name, e)
            return
        finally:
            if self._look_ups.get(digest) is asyncio.current_task():
                del self._look_ups[digest]
        if addr is not None and self.core is not None:
            self.core.learn(digest, addr, time.monotonic())
            self._flush()

    async def flow_alloc(
        self, flow_id: int, digest: bytes, qos: QosSpec, timeout: float, data: bytes
    ) -> tuple[int, int, bytes]:
        core = self._core()
        addr = await self._resolve(digest)
        if addr is None:
            busy = digest in self._unasked
            why = " (nor looked up: the system's resolver has too many names waiting)" if busy else ""
            raise HandlerError(m.ENOENT, f"name not found in this layer{why}")
        own = self.data_socket()
        try:
            flow = core.alloc(digest, qos, addr, time.monotonic(), timeout, data, own[1] if own else 0)
        except (ShimFull, ShimWireError) as e:
            if own:
                own[0].close()
            raise HandlerError(m.EIPCP if isinstance(e, ShimFull) else m.EINVAL, f"{self.name}: {e}") from None
        flow.flow_id = flow_id
        done: asyncio.Future[AllocDone] = asyncio.get_running_loop().create_future()
        self._allocs[flow.eid] = done
        self._flush()
        try:
            reply = await done
            if reply.response is None:
                raise HandlerError(m.ETIMEDOUT, "the peer did not answer")
            if reply.response != 0:
                raise HandlerError(response_code(reply.response), f"refused by the peer ({reply.response})")
            port = reply.offer.port if reply.offer is not None else 0
            app_fd = self._data_end(flow, own if port else None, port)
        except BaseException:
            core.dealloc(flow.eid, time.monotonic())
            self._flush()
            raise
        finally:
            if own:
                own[0].close()  # the application has its own copy, if it got the socket
        self._start(flow)
        self._by_flow_id[flow_id] = flow
        core.established(flow, time.monotonic())
        self._flush()
        return self.mtu, app_fd, reply.data

    # -- data: a flow's own socket (ours, udp) or the relay's socketpair --------------------

    def _data_end(self, flow: ShimFlow, own: tuple[socket.socket, int] | None, peer_port: int) -> int:
        """The application's end of the flow (the caller closes it once passed on).

        With a socket of its own (both ends ours), the application gets that socket, connected to the
        peer's: no process relays its SDUs. Otherwise the relay carries them over the layer's socket.
        """
        if own is not None:
            sock = own[0]
            sock.connect((self._ip_of(flow.addr), peer_port))
            sock.setblocking(True)
            return os.dup(sock.fileno())
        app_end, flow.io = seqpacket_pair()
        flow.relayed = True
        flow.hdr = self.flow_header(flow)
        try:
            return os.dup(app_end.fileno())
        finally:
            app_end.close()

    def _start(self, flow: ShimFlow) -> None:
        """The flow is established: the relay takes its SDUs (those the application wrote meanwhile too)."""
        if flow.relayed and self.relay is not None:
            self.relay.add(flow)

    def _ip_of(self, addr: Hashable) -> str:
        raise NotImplementedError

    async def flow_dealloc(self, flow_id: int) -> None:
        flow = self._by_flow_id.pop(flow_id, None)
        if flow is not None and self.core is not None:
            self.core.dealloc(flow.eid, time.monotonic())
            self._drop(flow)
            self._flush()

    def _drop(self, flow: ShimFlow) -> None:
        if flow.io is not None:
            if self.relay is not None:
                self.relay.remove(flow)
            flow.io.close()

    async def stop(self) -> None:
        if self.core is not None:
            for flow in list(self.core.flows.values()):
                self.core.dealloc(flow.eid, time.monotonic())
            self._flush()
        if self.relay is not None:
            self.relay.stop()

    # -- driving the core ----------------------------------------------------

    def on_mgmt(self, frame: bytes, src: Hashable) -> None:
        """From the relay thread: a management frame, queued for the loop (bounded queues)."""
        if src in self._known:
            inbox, limit = self._inbox_known, KNOWN_QUEUE
        elif self._strangers is not None and not self._strangers.take(time.monotonic()):
            self.inbox_dropped += 1
            return
        else:
            inbox, limit = self._inbox, MGMT_QUEUE
        if len(inbox) >= limit:
            self.inbox_dropped += 1
            return
        inbox.append((frame, src))
        if not self._draining:
            self._draining = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._draining = False
        core = self.core
        for _ in range(MGMT_BATCH):
            inbox = self._inbox_known or self._inbox
            if not inbox:
                break
            frame, src = inbox.popleft()
            if core is not None:
                self._receive(core, frame, src)
        if (self._inbox_known or self._inbox) and not self._draining:
            self._draining = True
            self.loop.call_soon(self._drain)
        self._flush()

    def _receive(self, core: ShimCore, frame: bytes, src: Hashable) -> None:
        try:
            core.receive(frame, src, time.monotonic())
        except Exception:  # a bug the network can trigger must not end the IPCP: count it, say where
            self._internal_error(core, f"management frame from {src}")

    def _internal_error(self, core: ShimCore, what: str) -> None:
        """A bug a peer's packet reached (called where it was caught): counted, the first few logged
        with where it was."""
        core.stats["dropped internal error"] += 1
        if core.stats["dropped internal error"] <= 3:
            log.exception("%s: %s", self.name, what)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, math.inf
        if self.core is not None:
            self.core.handle_timer(time.monotonic())
            self._flush()

    def _arm(self) -> None:
        """One timer, at the core's next deadline (asyncio's clock is time.monotonic)."""
        when = self.core.get_timer() if self.core is not None else math.inf
        if when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer) if when < math.inf else None

    async def _report_drops(self) -> None:
        """Log the drop counters whenever they moved: bad input never passes silently."""
        seen: dict[str, int] = {}
        while True:
            await asyncio.sleep(STATS_EVERY)
            drops = {k: v for k, v in self.counters().items() if k.startswith("dropped") and v}
            if drops != seen:
                seen = drops
                log.info(
                    "%s: dropped %d bad frames so far (%s)",
                    self.name,
                    sum(drops.values()),
                    ", ".join(f"{k.removeprefix('dropped ')} {v}" for k, v in sorted(drops.items())),
                )

    def info(self) -> list[m.InfoSection]:
        """`irm ipcp show`: the layer's address and MTU, the counters, the flows and (udp) the members."""
        sections = super().info()
        core = self.core
        if core is None:
            return sections
        now = time.monotonic()
        flows = [
            [
                *self.flow_counters(f),
                str(f.eid),
                str(f.remote_eid) if f.remote_eid else "-",
                "ours" if f.ours else "0.23",
                "relay" if f.relayed else "own socket",
            ]
            for f in sorted(core.flows.values(), key=lambda f: f.eid)
        ][: m.INFO_ROWS]
        sections += [
            m.InfoSection(
                "shim",
                ["field", "value"],
                [["address", self.show_addr(core.own)], ["mtu", str(self.mtu)], ["hash", self.hash_algo]],
            ),
            m.InfoSection("counters", ["counter", "value"], [[k, str(v)] for k, v in sorted(self.counters().items())]),
            m.InfoSection("flows", [*m.FLOW_COUNTERS, "eid", "peer eid", "peer speaks", "data"], flows),
        ]
        if core.discovery:
            members = [
                [
                    self.show_addr(a),
                    "configured" if a in core.static_peers else "proven",
                    f"{now - seen:.0f} s ago" if seen else "never",
                ]
                for a, seen in core.members.items()
            ]
            sections.append(m.InfoSection("members", ["member", "how", "last heard"], members))
        return sections

    def show_addr(self, addr: Hashable) -> str:
        return str(addr)

    def peer_of(self, addr: Hashable) -> str:
        """Who a peer at `addr` is to the IRMd's limits per peer (a host, not one of its ports)."""
        return self.show_addr(addr)

    def flow_counters(self, flow: ShimFlow) -> list[str]:
        """A flow's m.FLOW_COUNTERS: the relay counts its SDUs; on a socket of its own none pass here."""
        peer = self.show_addr(flow.addr)
        if not flow.relayed:
            return direct_counters(flow.flow_id, peer)
        return flow_counters(
            flow.flow_id, peer, flow.sent, flow.received, {DROP_APP: flow.dropped_app, DROP_NET: flow.dropped_net}
        )

    def counters(self) -> dict[str, int]:
        """The shim's counters: what it sent and received, what it dropped and why, its tables."""
        out = self.core.counters() if self.core is not None else {}
        if self.relay is not None:
            out |= {
                "dropped data (malformed, no flow, wrong peer)": self.relay.dropped,
                "dropped data (application slow)": self.relay.overflow,
                "dropped data (past the MTU)": self.relay.oversized,
                "keepalives received": self.relay.keepalives,
            }
        out["dropped management (queue full)"] = self.inbox_dropped
        return out

    def _flush(self) -> None:
        core = self.core
        if core is None:
            return
        if core.version != self._known_version:
            self._known_version, self._known = core.version, core.known()
        for dst, frame in core.datagrams_to_send():
            try:
                self.send_mgmt(dst, frame)
            except OSError as e:
                log.debug("management send to %s failed: %s", dst, e)
        while (ev := core.next_event()) is not None:
            match ev:
                case QueryDone():
                    for fut in self._queries.pop(ev.digest, []):
                        if not fut.done():
                            fut.set_result(ev.addr)
                    if (task := self._look_ups.pop(ev.digest, None)) is not None:
                        task.cancel()  # nobody waits for its answer any more
                case AllocDone():
                    done = self._allocs.pop(ev.eid, None)
                    if done is not None and not done.done():
                        done.set_result(ev)
                case FlowRequested():
                    self.spawn(self._arrived(ev))
                case FlowEnded():
                    self._ended(ev)
        self._arm()

    def _ended(self, ev: FlowEnded) -> None:
        flow = next((f for f in self._by_flow_id.values() if f.eid == ev.eid), None)
        if flow is None:
            return
        del self._by_flow_id[flow.flow_id]
        if flow.io is not None and self.relay is not None:
            self.relay.remove(flow)
        self.flow_ended(flow.flow_id, ev.down, flow.io)
        ENDED.log("flow %d %s", flow.flow_id, "down: peer silent" if ev.down else "deallocated by peer")

    async def _arrived(self, req: FlowRequested) -> None:
        """A peer's flow request, handed to the IRMd and answered. Whatever fails on the way (the IRMd's
        refusal, the process's descriptors, a bug a request can reach) refuses this flow, never ends the
        IPCP: a task's error nothing handles would, and every flow of the layer with it."""
        core = self._core()
        flow = req.flow
        port = req.offer.port if req.offer is not None else 0
        own: tuple[socket.socket, int] | None = None
        try:
            try:
                own = self.data_socket() if port else None
                app_fd = self._data_end(flow, own, port)
                try:
                    flow_id, data = await self.flow_arrived(
                        req.digest, req.qos, self.mtu, app_fd, data=req.data, peer=self.peer_of(req.addr)
                    )
                finally:
                    os.close(app_fd)
            finally:
                if own:
                    own[0].close()  # the application holds it now, or nobody does
        except Exception as e:
            code = m.EIPCP
            if isinstance(e, RemoteError | HandlerError | OSError):  # peers and users cause these
                REFUSALS.log("%s: flow request from %s refused: %s", self.name, req.addr, e)
                code = getattr(e, "code", m.EIPCP)
            else:  # a bug a peer's request can reach: count it, say where
                self._internal_error(core, f"flow request from {req.addr}")
            self._drop(flow)
            core.refuse(req, code)
            self._flush()
            return
        if core.accept(req, time.monotonic(), data, own[1] if own else 0) is None:
            self._drop(flow)
            self.flow_ended(flow_id, True, None)
        else:
            flow.flow_id = flow_id
            self._start(flow)
            self._by_flow_id[flow_id] = flow
        self._flush()
