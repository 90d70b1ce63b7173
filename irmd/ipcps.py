"""IPCPs: started as processes of their own and supervised (one that dies takes its flows down);
bootstrapped into or enrolled in a layer, connected to neighbours, listed and destroyed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from irmd import spawn, views
from irmd.coalesce import Coalesced
from irmd.forkserver import Forked
from irmd.identity import proc_start
from irmd.programs import STOP_GRACE, kill
from irmd.reg import Ipcp, Name, ProcBinding
from proto import messages as m
from proto.errors import (
    AlreadyExists,
    FlowError,
    FlowTimeout,
    InvalidArgument,
    IpcpFailed,
    LayerDown,
    NotFound,
    PermissionDenied,
    ProtocolError,
    error_class,
)
from proto.names import DIGESTS, IPCP_TYPES, check_name, is_pattern, name_hash
from transports.channel import ChannelClosed, RemoteError
from transports.unix import close_fds
from transports.wire import Message

if TYPE_CHECKING:
    from irmd.core import Irmd
    from irmd.server import Client

log = logging.getLogger("irmd")

ANNOUNCE_TIMEOUT = 15.0  # a new IPCP process has this long to connect and announce itself
IPCP_OP_TIMEOUT = 30.0
AUTOBIND_TYPES = ("unicast", "broadcast")
# An IPCP's info (irm ipcp info, and flows' counters) is asked of it at most once per INFO_GAP s, all
# callers together: a user's counter queries in a loop once made it build its whole info (flows
# sorted, LSDB digest) some 1,800 times a second, and everyone else's requests waited behind them.
INFO_GAP = 0.01


class Ipcps:
    def __init__(self, irmd: Irmd) -> None:
        self.irmd = irmd
        self.reg = irmd.reg
        self._seq = 0
        self._stopping: set[int] = set()  # pids of IPCPs told to stop
        self._spawning: dict[str, asyncio.Future[None]] = {}  # names whose process is being started
        self.infos: Coalesced[Ipcp, m.IpcpInfo] = Coalesced(self._ask_info, INFO_GAP)

    # -- processes ---------------------------------------------------------

    async def announce(self, c: Client, msg: m.IpcpAnnounce, _: list[int]) -> m.Ok:
        if (spawning := self._spawning.get(msg.name)) is not None:
            await asyncio.shield(spawning)  # a forked IPCP may call before its pid reached us
        ipcp = self.reg.ipcps.get(msg.name)
        # The kernel's pid and start time of the process we started (forked by the fork server, it is
        # not our child: its start time tells it from a later process given its pid).
        if (
            ipcp is None
            or (ipcp.pid, ipcp.start) != (c.pid, c.peer.start)
            or c.uid != self.irmd.uid
            or ipcp.announced.done()
        ):
            raise PermissionDenied(f"no IPCP {msg.name!r} is expected from pid {c.pid}")
        assert c.channel is not None
        c.ipcp = ipcp
        c.channel.unlimit()  # our own IPCP: it serves every flow of its layer on this connection
        ipcp.channel = c.channel
        ipcp.announced.set_result(c.channel)
        return m.Ok()

    async def create(self, c: Client, msg: m.IpcpCreate, _: list[int]) -> m.Ok:
        await self.start(msg.name, msg.type)
        return m.Ok(f"created ipcp {msg.name}")

    async def start(self, name: str, kind: str) -> Ipcp:
        """Start IPCP `name` of type `kind` and wait for it to announce itself."""
        check_name(name, "ipcp name")
        if is_pattern(name):
            raise InvalidArgument(f"bad ipcp name {name!r}: * matches IPCP names in irm commands, so no name has one")
        if kind not in IPCP_TYPES:
            raise InvalidArgument(f"unknown ipcp type {kind!r}: expected one of {'|'.join(IPCP_TYPES)}")
        if name in self.reg.ipcps or name in self._spawning:
            raise AlreadyExists(f"ipcp {name!r} already exists")
        loop = asyncio.get_running_loop()
        self._spawning[name] = spawning = loop.create_future()
        try:
            proc = await spawn.start_ipcp(kind, name, self.irmd.sock_path, self.irmd.output, self.irmd.forks)
            self._seq += 1
            start = proc.start if isinstance(proc, Forked) else proc_start(proc.pid)  # read before it could go
            ipcp = Ipcp(name, kind, proc, loop.create_future(), seq=self._seq, start=start)
            self.reg.ipcps[name] = ipcp
            self.irmd.spawn_task(self._watch(ipcp))
        finally:
            del self._spawning[name]
            spawning.set_result(None)
        waiter: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
        announced: asyncio.Future[Any] = ipcp.announced
        done, _ = await asyncio.wait([announced, waiter], timeout=ANNOUNCE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if ipcp.announced not in done:
            kill(proc, signal.SIGKILL)
            self.reg.ipcps.pop(name, None)
            raise IpcpFailed(f"ipcp {name!r} ({kind}) failed to start; see the IRMd log")
        log.info("created ipcp %s (%s, pid %d)", name, kind, proc.pid)
        return ipcp

    async def _watch(self, ipcp: Ipcp) -> None:
        code = await ipcp.proc.wait()
        if self.reg.ipcps.get(ipcp.name) is not ipcp:
            return
        del self.reg.ipcps[ipcp.name]
        report = log.info if self.irmd.stopping or ipcp.pid in self._stopping else log.warning
        self._stopping.discard(ipcp.pid)
        report("ipcp %s (pid %d) exited with status %s", ipcp.name, ipcp.pid, code)
        self.irmd.flows.ipcp_gone(ipcp)
        self.reg.drop_ipcp(ipcp.name)
        self.infos.forget(ipcp)
        if ipcp.channel is not None:
            ipcp.channel.close()

    def lost(self, ipcp: Ipcp) -> None:
        """Its control channel closed: an IPCP the IRMd cannot reach is stopped."""
        if ipcp.pid in self._stopping:
            return  # going as told
        log.warning("ipcp %s closed its control channel; stopping it", ipcp.name)
        kill(ipcp.proc, signal.SIGKILL)

    async def destroy(self, c: Client, msg: m.IpcpDestroy, _: list[int]) -> m.Ok:
        await self._stop(self.reg.get_ipcp(msg.name))
        return m.Ok(f"destroyed ipcp {msg.name}")

    async def _stop(self, ipcp: Ipcp) -> None:
        """SIGTERM, SIGKILL after STOP_GRACE; returns once it is gone from the registry."""
        self._stopping.add(ipcp.pid)  # asked to go: its exit is no news
        kill(ipcp.proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(ipcp.proc.wait(), STOP_GRACE)
        except TimeoutError:
            kill(ipcp.proc, signal.SIGKILL)
            await ipcp.proc.wait()
        await asyncio.sleep(0)  # let the watcher clean up

    async def request(self, ipcp: Ipcp, msg: Message) -> Message:
        """One request to an IPCP; its failures as the IRMd's errors, naming the IPCP."""
        if ipcp.channel is None or ipcp.channel.closed:
            raise LayerDown(f"ipcp {ipcp.name!r} is not running")
        try:
            reply, fds = await ipcp.channel.request(msg, timeout=IPCP_OP_TIMEOUT)
        except RemoteError as e:
            raise error_class(e.code)(f"ipcp {ipcp.name}: {e.text}") from None
        except (TimeoutError, ChannelClosed) as e:
            raise FlowTimeout(f"ipcp {ipcp.name}: {str(e) or 'no answer'}") from None
        close_fds(fds)
        return reply

    # -- layers ------------------------------------------------------------

    async def join_layer(self, ipcp: Ipcp, msg: Message, autobind: bool, layer: str = "") -> m.Ok:
        """Bootstrap or enroll; with autobind, the IPCP takes flows for its own and its
        layer's name, registered in the layers below (those up before it joined)."""
        if ipcp.layer:
            raise AlreadyExists(f"ipcp {ipcp.name!r} is already in layer {ipcp.layer!r}")
        lower = [i for i in self.reg.operational() if i is not ipcp]
        if isinstance(msg, m.IpcpBootstrapReq) and ipcp.type in ("unicast", "broadcast"):
            # The layer's PDUs ride on flows of the layers below: the smallest MTU bounds them.
            below = [i.mtu for i in lower if i.layer != msg.layer]
            msg.conf.setdefault("mtu", str(min(below, default=1500)))
        info = await self.request(ipcp, msg)
        if not isinstance(info, m.LayerInfo) or info.hash not in DIGESTS:
            raise IpcpFailed(f"ipcp {ipcp.name} answered with {type(info).__name__}")
        if layer and info.layer != layer:
            kill(ipcp.proc, signal.SIGKILL)
            raise InvalidArgument(f"enrolled in layer {info.layer!r}, not {layer!r}; ipcp {ipcp.name} stopped")
        ipcp.layer, ipcp.hash, ipcp.mtu, ipcp.flows = info.layer, info.hash, info.mtu, max(info.flows, 0)
        ipcp.joined = (
            {"bootstrap": info.layer, "conf": {k: v for k, v in msg.conf.items() if k != "mtu"}}
            if isinstance(msg, m.IpcpBootstrapReq) else {"enrol": msg.dst if isinstance(msg, m.IpcpEnrollReq) else ""}
        ) | {"autobind": autobind}  # fmt: skip
        if autobind and ipcp.type not in AUTOBIND_TYPES:  # as Ouroboros: only members of layers above serve names
            log.warning("ipcp %s: a %s IPCP does not autobind", ipcp.name, ipcp.type)
        elif autobind:
            await self._autobind(ipcp, lower)
        return m.Ok(f"ipcp {ipcp.name} is in layer {ipcp.layer}")

    async def _autobind(self, ipcp: Ipcp, lower: list[Ipcp]) -> None:
        """Bind the IPCP to its own name and its layer's, and register both in the layers below it
        (not broadcast layers, which have no directory, nor its own layer)."""
        me = ProcBinding(ipcp.pid, proc_start(ipcp.pid), self.irmd.uid)
        for name in (ipcp.name, ipcp.layer):
            self.reg.bind_proc(name, me)
            entry = self.reg.names[name]
            for below in lower:
                if below.type != "broadcast" and below.layer != ipcp.layer and below.operational:
                    await self.register(below, entry)

    async def register(self, ipcp: Ipcp, entry: Name, register: bool = True) -> None:
        """Register (or unregister) `entry` with `ipcp`; asking for what is so already is no error."""
        if register == (ipcp.name in entry.regs):
            return
        await self.request(ipcp, m.IpcpReg(name_hash(ipcp.hash, entry.name), register))
        (entry.regs.add if register else entry.regs.discard)(ipcp.name)

    def _targets(self, pattern: str, kind: str, create_as: str) -> tuple[list[Ipcp], str]:
        """The IPCPs `pattern` names (of type `kind`, if given); or, when none does, the type to create
        one of (a name without *, and a type to give it)."""
        hits = [i for i in self.reg.matching(pattern) if not kind or i.type == kind]
        if hits:
            return hits, ""
        if is_pattern(pattern):
            raise NotFound(f"no ipcp here matches {pattern!r}")
        existing = self.reg.ipcps.get(pattern)
        if existing is not None:
            raise InvalidArgument(f"ipcp {pattern!r} is of type {existing.type}, not {kind}")
        if not create_as:
            raise NotFound(f"ipcp {pattern!r} not found; give its type to create it")
        return [], create_as

    async def bootstrap(self, c: Client, msg: m.IpcpBootstrap, _: list[int]) -> m.Ok:
        check_name(msg.layer, "layer name")
        ipcps, create = self._targets(msg.name, msg.type, msg.type)
        for ipcp in ipcps:
            if ipcp.layer:
                raise AlreadyExists(f"ipcp {ipcp.name!r} is already in layer {ipcp.layer!r}")
        if create:
            ipcp = await self.start(msg.name, create)
            return await self._or_stop(
                ipcp, self.join_layer(ipcp, m.IpcpBootstrapReq(msg.layer, dict(msg.conf)), msg.autobind)
            )
        done = [
            await self.join_layer(ipcp, m.IpcpBootstrapReq(msg.layer, dict(msg.conf)), msg.autobind) for ipcp in ipcps
        ]
        return m.Ok("\n".join(ok.text for ok in done))

    async def _or_stop(self, ipcp: Ipcp, joining: Coroutine[Any, Any, m.Ok]) -> m.Ok:
        """Join a layer with an IPCP made for the purpose: if that fails, the IPCP goes too (nothing is
        left half made), and the error says so."""
        try:
            return await joining
        except FlowError as e:
            await self._stop(ipcp)
            raise type(e)(f"{e}; ipcp {ipcp.name} stopped") from None

    async def enroll(self, c: Client, msg: m.IpcpEnroll, _: list[int]) -> m.Ok:
        """Enroll the IPCPs `msg.name` names (a unicast one made if none is there and no type is given)."""
        dst = msg.dst or msg.layer
        if not dst:
            raise InvalidArgument("enroll needs a layer or a dst")
        ipcps, create = self._targets(msg.name, msg.type, msg.type or "unicast")
        if create:
            ipcp = await self.start(msg.name, create)
            return await self._or_stop(
                ipcp, self.join_layer(ipcp, m.IpcpEnrollReq(dst, msg.key), msg.autobind, msg.layer)
            )
        done = [await self.join_layer(ipcp, m.IpcpEnrollReq(dst, msg.key), msg.autobind, msg.layer) for ipcp in ipcps]
        return m.Ok("\n".join(ok.text for ok in done))

    async def connect(self, c: Client, msg: m.IpcpConnect, _: list[int]) -> m.Ok:
        ipcp = self.reg.get_ipcp(msg.name)
        await self.request(ipcp, m.IpcpConnectReq(msg.dst, msg.component, msg.qos, msg.connect))
        if msg.connect and msg.dst not in ipcp.conns:
            ipcp.conns.append(msg.dst)
        elif not msg.connect and msg.dst in ipcp.conns:
            ipcp.conns.remove(msg.dst)
        return m.Ok()

    async def info(self, c: Client, msg: m.IpcpInfoReq, _: list[int]) -> m.IpcpInfo:
        """What the IPCP says of itself (irm ipcp show)."""
        return await self.infos.get(self.reg.get_ipcp(msg.name))

    async def _ask_info(self, ipcp: Ipcp) -> m.IpcpInfo:
        """The IPCP's info, asked of it: only through `infos`, which shares each answer among the callers
        waiting for it (each takes what it may see) and spaces the questions."""
        reply = await self.request(ipcp, m.IpcpInfoReq())
        if not isinstance(reply, m.IpcpInfo):
            raise ProtocolError(f"ipcp {ipcp.name}: answered IpcpInfoReq with {type(reply).__name__}")
        return reply

    async def list_ipcps(self, c: Client, msg: m.IpcpList, _: list[int]) -> m.Table:
        rows = (
            (i.order, {"pid": str(i.pid), "name": i.name, "type": i.type, "layer": i.layer or "-",
                     "state": "operational" if i.operational else "init"})
            for i in sorted(self.reg.ipcps.values(), key=lambda i: i.order)
            if (not msg.name or i.name == msg.name) and (not msg.layer or i.layer == msg.layer)
            and (not msg.type or i.type == msg.type)
        )  # fmt: skip
        return views.page(["pid", "name", "type", "layer", "state"], rows, msg.start)
