"""What every IPCP process shares: the control channel to its IRMd and its dispatch.

A concrete IPCP subclasses `Ipcp` and implements the layer operations; this
module connects, announces, serves requests and exits when the IRMd goes away.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proto import logs
from proto import messages as m
from proto.qos import UINT64_MAX, QosSpec
from transports.channel import AsyncChannel, HandlerError
from transports.unix import close_fds
from transports.wire import Message

log = logging.getLogger(__name__)

EXIT_FAILED = 70  # the exit status of an IPCP that met an error it did not handle

# Why an IPCP drops a flow's SDUs (the `drops` column of m.FLOW_COUNTERS)
DROP_APP = "queue full: the application did not read"
DROP_NET = "queue full: the network did not take them"


def flow_counters(flow_id: int, dst: str, sent: int, received: int, drops: dict[str, int]) -> list[str]:
    """A flow's row of m.FLOW_COUNTERS: its SDUs as the IPCP counted them; `drops`: reason -> count."""
    why = ", ".join(f"{n} {reason}" for reason, n in drops.items() if n)
    return [str(flow_id) if flow_id else "-", dst, str(sent), str(received), str(sum(drops.values())), why]


def direct_counters(flow_id: int, dst: str) -> list[str]:
    """The row of a flow whose SDUs go between the applications' sockets: nothing here to count."""
    return [str(flow_id) if flow_id else "-", dst, m.DIRECT, m.DIRECT, m.DIRECT, ""]


class Ipcp:
    """Base of all IPCP kinds; subclasses override the layer operations."""

    type = ""
    capacity = 0  # bits/s the layer can carry; 0: not known

    def __init__(self, name: str, irmd_sock: Path) -> None:
        self.name = name
        self.irmd_sock = irmd_sock
        self.layer = ""
        self.channel: AsyncChannel | None = None
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._parked: dict[int, socket.socket] = {}  # ended flows' sockets, kept until the IRMd lets go
        self.failed = False  # an error nothing handled: the process ends with EXIT_FAILED

    # -- the layer operations (override) ------------------------------------

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        raise HandlerError(m.EINVAL, f"a {self.type} IPCP cannot bootstrap")

    async def enroll(self, dst: str, key: str = "") -> m.LayerInfo:
        raise HandlerError(m.EINVAL, f"a {self.type} IPCP cannot enroll; bootstrap it instead")

    async def connect(self, dst: str, component: str, qos: str, connect: bool) -> None:
        raise HandlerError(m.EINVAL, f"a {self.type} IPCP has no components to connect")

    async def reg(self, digest: bytes, register: bool) -> None:
        raise NotImplementedError

    async def query(self, digest: bytes) -> bool:
        raise NotImplementedError

    async def flow_alloc(
        self, flow_id: int, digest: bytes, qos: QosSpec, timeout: float, data: bytes
    ) -> tuple[int, int, bytes]:
        """Allocate, carrying `data` (opaque) to the peer; return (mtu, fd of the application's end,
        the data the peer's answer carried)."""
        raise NotImplementedError

    async def flow_pair(self, flow_id: int, digest: bytes, qos: QosSpec) -> tuple[int, int, int] | None:
        """A flow that stays on this host: (mtu, the allocating application's end, the accepting one's),
        the arrival served by the IRMd at once (no FlowReqArrived round trip); the IRMd, holding both
        ends, tells each when the other lets go and deallocates nothing here. None: allocate through the
        layer (`flow_alloc`)."""
        return None

    def qos_refusal(self, qos: QosSpec) -> str | None:
        """Why this layer cannot serve `qos`, or None.

        Order, retransmission and encryption are end to end (FRCT and crypto in flowlib), so
        a layer refuses only what depends on it: a bandwidth it does not have.
        """
        if self.capacity and UINT64_MAX > qos.bandwidth > self.capacity:  # UINT64_MAX: "all there is"
            return f"{qos.bandwidth:,} b/s asked, the layer carries at most {self.capacity:,} b/s"
        return None

    async def flow_dealloc(self, flow_id: int) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        """Release sockets and flows before the process exits."""

    def info(self) -> list[m.InfoSection]:
        """What `irm ipcp show` tells of this IPCP; subclasses add sections (and rows to "ipcp")."""
        return [
            m.InfoSection(
                "ipcp", ["field", "value"], [["name", self.name], ["type", self.type], ["layer", self.layer or "-"]]
            )
        ]

    # -- services for subclasses ---------------------------------------------

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a coroutine in the background, held until done, cancelled at stop; an error it
        does not handle ends the process (supervised: nothing fails unseen)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        if self._done.is_set():  # stopping: the IRMd or the channel went first
            log.info("%s: a background task ended with the IPCP: %r", self.name, error)
        else:
            log.critical("%s: a background task failed; the IPCP ends", self.name, exc_info=error)
            self.fail()

    def fail(self) -> None:
        """End the process with EXIT_FAILED: the IRMd reports the IPCP dead and its flows DOWN."""
        self.failed = True
        self._done.set()

    async def flow_arrived(
        self, digest: bytes, qos: QosSpec, mtu: int, fd: int, data: bytes = b"", src_flow: int = 0, peer: str = ""
    ) -> tuple[int, bytes]:
        """Hand a flow requested by a peer, with the data its request carried, to the IRMd;
        returns the new flow id and the data to carry back in the answer. `peer`: who asks, as
        the layer knows it (the IRMd limits the allocations in flight per peer).

        The fd is the application's end; the caller keeps (and must close) its copy.
        """
        assert self.channel is not None
        reply, fds = await self.channel.request(m.FlowReqArrived(digest, qos, mtu, src_flow, data, peer), [fd])
        close_fds(fds)
        if not isinstance(reply, m.IpcpFlowAccepted):
            raise HandlerError(m.EPROTO, f"IRMd answered FlowReqArrived with {type(reply).__name__}")
        return reply.flow_id, reply.data

    def flow_ended(self, flow_id: int, down: bool, io: socket.socket | None) -> None:
        """The peer deallocated the flow (or went silent): tell the IRMd.

        Our end of the application's socket stays open: the IRMd records how the
        flow ended and only then shuts the application's end, so the application
        never sees the end before the IRMd can say whether it was DOWN or DEALLOC.
        """
        if self.channel is not None:
            self.channel.notify(m.FlowPeerDealloc(flow_id, down))
        if io is not None:
            self._parked[flow_id] = io

    # -- serving -------------------------------------------------------------

    async def _handle(self, msg: Message, fds: list[int]) -> tuple[Message, Sequence[int]]:
        close_fds(fds)  # the IRMd sends no descriptors to IPCPs
        match msg:
            case m.IpcpBootstrapReq():
                if self.layer:
                    raise HandlerError(m.EEXIST, f"already in layer {self.layer!r}")
                info = await self.bootstrap(msg.layer, msg.conf)
                self.layer = info.layer
                log.info("%s: bootstrapped layer %s", self.name, self.layer)
                return info, ()
            case m.IpcpEnrollReq():
                if self.layer:
                    raise HandlerError(m.EEXIST, f"already in layer {self.layer!r}")
                info = await self.enroll(msg.dst, msg.key)
                self.layer = info.layer
                return info, ()
            case m.IpcpConnectReq():
                await self.connect(msg.dst, msg.component, msg.qos, msg.connect)
                return m.Ok(), ()
            case m.IpcpReg():
                await self.reg(msg.hash, msg.register)
                return m.Ok(), ()
            case m.IpcpQuery():
                if not await self.query(msg.hash):
                    raise HandlerError(m.ENOENT, "name not reachable in this layer")
                return m.Ok(), ()
            case m.IpcpFlowAlloc():
                if (why := self.qos_refusal(msg.qos)) is not None:
                    raise HandlerError(m.ENOTSUP, f"layer {self.layer!r} cannot serve the QoS asked: {why}")
                if (pair := await self.flow_pair(msg.flow_id, msg.hash, msg.qos)) is not None:
                    mtu, src, dst = pair
                    return m.IpcpFlow(mtu), (src, dst)
                mtu, fd, data = await self.flow_alloc(msg.flow_id, msg.hash, msg.qos, msg.timeout or 10.0, msg.data)
                return m.IpcpFlow(mtu, data), (fd,)
            case m.IpcpInfoReq():
                return m.IpcpInfo([dataclasses.replace(s, rows=s.rows[: m.INFO_ROWS]) for s in self.info()]), ()
            case m.IpcpFlowDealloc():
                if (parked := self._parked.pop(msg.flow_id, None)) is not None:
                    parked.close()
                await self.flow_dealloc(msg.flow_id)
                return m.Ok(), ()
        raise HandlerError(m.EPROTO, f"{type(msg).__name__} is not an IPCP request")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._done.set)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(str(self.irmd_sock))
        self.channel = AsyncChannel(
            sock, m.CODEC, self._handle, name=f"ipcp {self.name}", on_close=lambda _: self._done.set()
        )
        await self.channel.request(m.IpcpAnnounce(self.name, self.type), timeout=10)
        await self._done.wait()
        for task in list(self._tasks):
            task.cancel()
        try:
            await self.stop()
        except Exception:
            log.exception("%s: stopping failed", self.name)
            self.failed = True
        self.channel.close()


def run_ipcp(cls: type[Ipcp], name: str, irmd_sock: str, **kw: Any) -> None:
    logs.setup(f"ipcp/{cls.type}/{name}", base=logging.INFO)  # at its IRMd's level, into its IRMd's log
    ipcp = cls(name, Path(irmd_sock), **kw)
    asyncio.run(ipcp.run())
    if ipcp.failed:
        sys.exit(EXIT_FAILED)
