"""The I/O loop shared by the shim IPCPs: ShimCore driven by asyncio, data by a Relay thread.

A subclass opens its transport in `open_transport` and frames per-flow headers;
everything else (queries, handshakes, keepalives, teardown) is common.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Hashable
from typing import Any

from ipcp.base import Ipcp
from ipcp.shim import (
    E_NOENT,
    E_REFUSED,
    OK,
    RESULTS,
    AllocDone,
    FlowEnded,
    FlowRequested,
    QueryDone,
    ShimCore,
    ShimFlow,
    ShimFull,
)
from proto import messages as m
from proto.qos import QosSpec
from transports.channel import HandlerError, RemoteError
from transports.impair import ImpairedFraming, Impairment
from transports.relay import Framing, Relay
from transports.unix import seqpacket_pair

log = logging.getLogger(__name__)

TICK = 0.1
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
        self._allocs: dict[int, asyncio.Future[AllocDone]] = {}
        self._by_flow_id: dict[int, ShimFlow] = {}
        self.hash_algo = "SHA3_256"

    # -- what a transport provides ------------------------------------------

    async def open_transport(self, layer: str, conf: dict[str, str]) -> tuple[ShimCore, Relay]:
        raise NotImplementedError

    def send_mgmt(self, dst: Hashable | None, frame: bytes) -> None:
        """Send a management frame; None means every member and the broadcast."""
        raise NotImplementedError

    def flow_header(self, flow: ShimFlow) -> bytes:
        raise NotImplementedError

    # -- layer operations ----------------------------------------------------

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        self.loop = asyncio.get_running_loop()
        self.core, self.relay = await self.open_transport(layer, conf)
        self.relay.start()
        self.spawn(self._tick())
        self.spawn(self._report_drops())
        self._flush()
        return m.LayerInfo(layer, self.hash_algo, self.mtu)

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
        fut: asyncio.Future[Hashable | None] = asyncio.get_running_loop().create_future()
        self._queries.setdefault(digest, []).append(fut)
        core.query(digest, time.monotonic())
        self._flush()
        return await fut

    async def flow_alloc(self, flow_id: int, digest: bytes, qos: QosSpec, timeout: float,
                         data: bytes) -> tuple[int, int, bytes]:
        core = self._core()
        addr = await self._resolve(digest)
        if addr is None:
            raise HandlerError(m.ENOENT, "name not found in this layer")
        handle, endpoint = self.open_endpoint()
        try:
            flow = core.alloc(digest, qos, addr, time.monotonic(), timeout, endpoint)
        except ShimFull as e:
            self.close_endpoint(handle)
            raise HandlerError(m.EIPCP, f"{self.name}: {e}") from None
        flow.flow_id = flow_id
        done: asyncio.Future[AllocDone] = asyncio.get_running_loop().create_future()
        self._allocs[flow.eid] = done
        self._flush()
        try:
            reply = await done
            if reply.result != OK:
                code = m.ENOENT if reply.result == E_NOENT else m.ETIMEDOUT if reply.result < 0 else m.EIPCP
                raise HandlerError(code, RESULTS.get(reply.result, "the peer did not answer"))
            app_fd = self.connect_endpoint(handle, addr, reply.endpoint)
        except BaseException:
            core.dealloc(flow.eid)
            self._flush()
            self.close_endpoint(handle)
            raise
        self.bind_endpoint(flow, handle)
        self._by_flow_id[flow_id] = flow
        return self.mtu, app_fd, b""  # TODO(shim): carry the piggyback on the wire

    # -- data endpoints: by default the relay's socketpair; transports may do better --------

    def open_endpoint(self) -> tuple[Any, bytes]:
        """A data endpoint for a new flow: a handle, and what the peer needs to reach it."""
        return seqpacket_pair(), b""

    def connect_endpoint(self, handle: Any, addr: Hashable, peer: bytes) -> int:
        """Point the endpoint at the peer's; returns an fd for the application (the caller closes it)."""
        app_end, _ = handle
        return int(os.dup(app_end.fileno()))

    def bind_endpoint(self, flow: ShimFlow, handle: Any) -> None:
        """The flow is established: the IPCP's side of the endpoint starts relaying."""
        app_end, flow.io = handle
        app_end.close()
        flow.hdr = self.flow_header(flow)
        assert self.relay is not None
        self.relay.add(flow)

    def close_endpoint(self, handle: Any) -> None:
        for sock in handle:
            sock.close()

    async def flow_dealloc(self, flow_id: int) -> None:
        flow = self._by_flow_id.pop(flow_id, None)
        if flow is not None and self.core is not None:
            self.core.dealloc(flow.eid)
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
                self.core.dealloc(flow.eid)
            self._flush()
        if self.relay is not None:
            self.relay.stop()

    # -- driving the core ----------------------------------------------------

    def on_mgmt(self, frame: bytes, src: Hashable) -> None:
        """From the relay thread: a management frame."""
        self.loop.call_soon_threadsafe(self._receive, frame, src)

    def _receive(self, frame: bytes, src: Hashable) -> None:
        if self.core is not None:
            self.core.receive(frame, src, time.monotonic())
            self._flush()

    async def _report_drops(self) -> None:
        """Log the drop counters whenever they moved: bad input never passes silently."""
        seen = (0, 0)
        while True:
            await asyncio.sleep(STATS_EVERY)
            if self.relay is None or self.core is None:
                continue
            now = (self.relay.dropped + self.core.dropped, self.relay.overflow)
            if now != seen:
                seen = now
                log.info("%s: dropped %d bad frames so far (%d malformed, for no flow or from the"
                         " wrong peer; %d bad management messages); %d SDUs overflowed",
                         self.name, now[0], self.relay.dropped, self.core.dropped, self.relay.overflow)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if self.core is not None:
                self.core.handle_timer(time.monotonic())
                self._flush()

    def _flush(self) -> None:
        core = self.core
        if core is None:
            return
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
                case AllocDone():
                    done = self._allocs.pop(ev.eid, None)
                    if done is not None and not done.done():
                        done.set_result(ev)
                case FlowRequested():
                    self.spawn(self._arrived(ev))
                case FlowEnded():
                    flow = next((f for f in self._by_flow_id.values() if f.eid == ev.eid), None)
                    if flow is not None:
                        del self._by_flow_id[flow.flow_id]
                        if flow.io is not None and self.relay is not None:
                            self.relay.remove(flow)
                        self.flow_ended(flow.flow_id, ev.down, flow.io)
                        log.info("flow %d %s", flow.flow_id, "down: peer silent" if ev.down else "deallocated by peer")

    async def _arrived(self, req: FlowRequested) -> None:
        core = self._core()
        handle, endpoint = self.open_endpoint()
        try:
            app_fd = self.connect_endpoint(handle, req.addr, req.endpoint)
            try:
                flow_id, _ = await self.flow_arrived(req.digest, req.qos, self.mtu, app_fd)
            finally:
                os.close(app_fd)
        except (RemoteError, HandlerError, OSError) as e:
            self.close_endpoint(handle)
            core.refuse(req, E_NOENT if getattr(e, "code", "") == m.ENOENT else E_REFUSED)
            self._flush()
            return
        flow = core.accept(req, time.monotonic(), endpoint)
        flow.flow_id = flow_id
        self.bind_endpoint(flow, handle)
        self._by_flow_id[flow_id] = flow
        self._flush()
