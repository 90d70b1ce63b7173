"""The IRM daemon: owns the registry, spawns and supervises IPCPs, brokers flows.

An asyncio loop serves the control socket; flow data never passes through
here (the IRMd only hands file descriptors along and keeps a copy to tear
flows down when their IPCP dies).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from irmd import state
from irmd.config import ConfigError, Step, apply_config, plan
from irmd.oap import Oap
from irmd.registry import Acceptor, Flow, FlowState, ProgBinding, Registry
from irmd.secfiles import check_sec
from proto import messages as m
from proto.names import DIGESTS, IPCP_TYPES, RegistryError, check_name, name_hash
from transports.channel import AsyncChannel, ChannelClosed, HandlerError, RemoteError
from transports.unix import close_fds, irmd_sock_path
from transports.wire import Message

log = logging.getLogger("irmd")

# Preference when a name is reachable through several layers: the most local first.
TYPE_RANK = {t: i for i, t in enumerate(("local", "unicast", "broadcast", "eth-dix", "eth-llc", "udp4", "udp6"))}
ANNOUNCE_TIMEOUT = 15.0
IPCP_OP_TIMEOUT = 30.0
QUERY_TIMEOUT = 3.0
ALLOC_TIMEOUT = 15.0
ACCEPT_TIMEOUT = 10.0  # how long an arriving flow waits for a process to accept it
STOP_GRACE = 2.0


@dataclasses.dataclass
class Ipcp:
    name: str
    type: str
    proc: asyncio.subprocess.Process
    announced: asyncio.Future[AsyncChannel]
    channel: AsyncChannel | None = None
    layer: str = ""
    hash: str = "SHA3_256"
    mtu: int = 0
    joined: dict[str, Any] = dataclasses.field(default_factory=dict)  # how: bootstrap (conf) or enrol (dst)
    conns: list[str] = dataclasses.field(default_factory=list)  # connected to, as asked

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def operational(self) -> bool:
        return bool(self.layer) and self.channel is not None and not self.channel.closed


@dataclasses.dataclass(eq=False)
class Client:
    conn_id: int
    pid: int
    uid: int
    channel: AsyncChannel | None = None
    prog: str = ""
    ipcp: Ipcp | None = None
    listening: bool = False
    serves: bool = False  # has accepted or listened: a server, not just a client of the name
    cypher_s: int = 0  # takes only encrypted flows (FlowAccept/FlowListen)
    accepts: deque[asyncio.Future[tuple[m.FlowReply, int]]] = dataclasses.field(default_factory=deque)

    @property
    def acceptor(self) -> Acceptor:
        return Acceptor(self.conn_id, self.pid, self.prog)

    @property
    def accepting(self) -> bool:
        return self.listening or any(not f.done() for f in self.accepts)


def _peercred(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    """Signal a child by pid: Process.kill() may reap it behind asyncio's child watcher."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)


def _teardown_fd(fd: int) -> None:
    """Shut the application's end down, so whoever holds it sees the flow end."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        s = socket.socket(fileno=fd)
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()


class Irmd:
    def __init__(self, sock_path: Path) -> None:
        self.sock_path = sock_path
        self.reg = Registry()
        self.oap = Oap(self.reg)
        self.ipcps: dict[str, Ipcp] = {}
        self.clients: dict[int, Client] = {}
        self.programs: dict[int, asyncio.subprocess.Process] = {}
        self._starting: dict[str, float] = {}  # name -> when its auto program was started
        self._conn_ids = 0
        self._admin_client: Client | None = None
        self._server: socket.socket | None = None
        self._acceptors_changed: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._handlers: dict[type[Message], Callable[[Client, Any, list[int]], Awaitable[Any]]] = {
            m.ProcAnnounce: self._proc_announce,
            m.IpcpAnnounce: self._ipcp_announce,
            m.FlowAlloc: self._flow_alloc,
            m.FlowAccept: self._flow_accept,
            m.FlowListen: self._flow_listen,
            m.FlowDealloc: self._flow_dealloc,
            m.FlowInfo: self._flow_info,
            m.FlowReqArrived: self._flow_req_arrived,
            m.FlowPeerDealloc: self._flow_peer_dealloc,
            m.IpcpCreate: self._ipcp_create,
            m.IpcpDestroy: self._ipcp_destroy,
            m.IpcpBootstrap: self._ipcp_bootstrap,
            m.IpcpEnroll: self._ipcp_enroll,
            m.IpcpConnect: self._ipcp_connect,
            m.IpcpList: self._ipcp_list,
            m.IpcpInfoReq: self._ipcp_info,
            m.Bind: self._bind,
            m.NameCreate: self._name_create,
            m.NameDestroy: self._name_destroy,
            m.NameRegister: self._name_register,
            m.NameList: self._name_list,
            m.FlowList: self._flow_list,
            m.Dump: self._dump,
        }
        self._admin = {
            m.IpcpCreate, m.IpcpDestroy, m.IpcpBootstrap, m.IpcpEnroll, m.IpcpConnect, m.IpcpInfoReq,
            m.Bind, m.NameCreate, m.NameDestroy, m.NameRegister,
        }  # fmt: skip
        self._from_ipcp = {m.FlowReqArrived, m.FlowPeerDealloc}

    # -- life cycle ------------------------------------------------------

    async def start(self) -> None:
        self._acceptors_changed = asyncio.Condition()
        path = self.sock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a dead irmd
            else:
                raise SystemExit(f"irmd: another irmd is running on {path}")
            finally:
                probe.close()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        srv.bind(str(path))
        os.chmod(path, 0o666)  # applications of any user may connect; admin is checked per request
        srv.listen(128)
        srv.setblocking(False)
        self._server = srv
        asyncio.get_running_loop().add_reader(srv.fileno(), self._on_connect)
        log.info("irmd listening on %s", path)

    def stop(self) -> None:
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        if self._server is not None:
            loop.remove_reader(self._server.fileno())
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.sock_path.unlink()
        procs = [i.proc for i in self.ipcps.values()] + list(self.programs.values())
        for proc in procs:
            _signal(proc, signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_GRACE)
            for proc in procs:
                if proc.returncode is None:
                    _signal(proc, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=STOP_GRACE)
        for flow in list(self.reg.flows.values()):
            _teardown_fd(flow.fd)
        for client in list(self.clients.values()):
            if client.channel:
                client.channel.close()
        for task in list(self._tasks):
            task.cancel()
        log.info("irmd stopped")

    def _spawn_task(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections -------------------------------------------------------

    def _on_connect(self) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # e.g. EMFILE: keep serving the others
            log.warning("accept failed: %s", e)
            return
        self._conn_ids += 1
        pid, uid = _peercred(conn)
        client = Client(self._conn_ids, pid, uid)

        async def handle(msg: Message, fds: list[int]) -> tuple[Message, Sequence[int]]:
            return await self._dispatch(client, msg, fds)

        client.channel = AsyncChannel(
            conn, m.CODEC, handle, name=f"conn{client.conn_id}/pid{pid}",
            on_close=lambda _: self._spawn_task(self._client_gone(client)),
        )  # fmt: skip
        self.clients[client.conn_id] = client

    async def _dispatch(self, c: Client, msg: Message, fds: list[int]) -> tuple[Message, Sequence[int]]:
        handler = self._handlers.get(type(msg))
        kind = type(msg)
        if kind is not m.FlowReqArrived:
            close_fds(fds)  # only arriving flows carry descriptors
            fds = []
        try:
            if handler is None:
                raise HandlerError(m.EPROTO, f"{kind.__name__} is not a request the IRMd serves")
            if kind in self._admin and c.uid not in (0, os.geteuid()):
                raise HandlerError(m.EPERM, "permission denied: irm needs the IRMd's user or root")
            if kind in self._from_ipcp and c.ipcp is None:
                raise HandlerError(m.EPERM, f"{kind.__name__} is only accepted from IPCPs")
            result = await handler(c, msg, fds)
        except RegistryError as e:
            raise HandlerError(e.code, str(e)) from None
        finally:
            close_fds(fds)
        if isinstance(result, tuple):
            return result
        return result, ()

    async def admin(self, msg: Message) -> Message:
        """Serve an administrative request from within (config boot) as irm would get it served."""
        if self._admin_client is None:
            self._admin_client = Client(conn_id=0, pid=os.getpid(), uid=os.geteuid())
        reply, _ = await self._dispatch(self._admin_client, msg, [])
        return reply

    async def _client_gone(self, c: Client) -> None:
        self.clients.pop(c.conn_id, None)
        for fut in c.accepts:
            fut.cancel()
        for flow in list(self.reg.flows_of(owner=c.conn_id)):
            await self._release(flow)
        if not any(other.pid == c.pid for other in self.clients.values()):
            self.reg.forget_pid(c.pid)  # its process bindings end with its last connection
        if c.ipcp is not None and c.ipcp.channel is c.channel and not self.stopping:
            log.warning("ipcp %s closed its control channel; stopping it", c.ipcp.name)
            _signal(c.ipcp.proc, signal.SIGKILL)

    # -- applications ----------------------------------------------------

    async def _proc_announce(self, c: Client, msg: m.ProcAnnounce, _: list[int]) -> m.Ok:
        c.prog = msg.prog
        await self._notify_acceptors()
        return m.Ok()

    async def _notify_acceptors(self) -> None:
        assert self._acceptors_changed is not None
        async with self._acceptors_changed:
            self._acceptors_changed.notify_all()

    async def _flow_alloc(self, c: Client, msg: m.FlowAlloc, _: list[int]) -> tuple[m.FlowReply, list[int]]:
        check_name(msg.name)
        timeout = msg.timeout if msg.timeout and msg.timeout > 0 else ALLOC_TIMEOUT
        deadline = time.monotonic() + timeout
        error = HandlerError(m.ENOENT, f"name {msg.name!r} not found in any layer")
        if msg.join:
            hits = [i for i in self.ipcps.values() if i.operational and i.type == "broadcast" and i.layer == msg.name]
            if not hits:
                raise HandlerError(m.ENOENT, f"no broadcast layer {msg.name!r} here to join")
        else:
            hits = await self._resolve(msg.name, min(timeout, QUERY_TIMEOUT))
        for ipcp in hits:
            try:
                return await self._alloc_via(c, msg, ipcp, deadline)
            except HandlerError as e:
                # The directory may have been stale, or the layer cannot serve the QoS: try the next one.
                if e.code != m.ENOENT or error.code != m.ENOTSUP:
                    error = e
                if e.code not in (m.ENOENT, m.ENOTSUP):
                    break
        raise error

    async def _alloc_via(self, c: Client, msg: m.FlowAlloc, ipcp: Ipcp, deadline: float,
                         ) -> tuple[m.FlowReply, list[int]]:
        assert ipcp.channel is not None
        digest = name_hash(ipcp.hash, msg.name)
        flow = self.reg.new_flow(
            owner=c.conn_id, pid=c.pid, uid=c.uid, name=msg.name, layer=ipcp.layer, ipcp=ipcp.name,
            qos=msg.qos, role="src",
        )  # fmt: skip
        remaining = max(deadline - time.monotonic(), 0.1)
        attempt = self.oap.request(msg.name, msg.qos, msg.join)
        try:
            reply, fds = await ipcp.channel.request(
                m.IpcpFlowAlloc(flow.flow_id, digest, msg.qos, remaining, attempt.data), timeout=remaining + 1.0
            )
        except RemoteError as e:
            self.reg.flows.pop(flow.flow_id, None)
            raise HandlerError(e.code, f"flow to {msg.name!r} via {ipcp.layer!r}: {e.text}") from None
        except (TimeoutError, ChannelClosed) as e:
            self.reg.flows.pop(flow.flow_id, None)
            why = str(e) or "timed out"
            raise HandlerError(m.ETIMEDOUT, f"flow to {msg.name!r} via {ipcp.layer!r}: {why}") from None
        if not isinstance(reply, m.IpcpFlow) or len(fds) != 1:
            close_fds(fds)
            self.reg.flows.pop(flow.flow_id, None)
            raise HandlerError(m.EIPCP, f"ipcp {ipcp.name} answered the allocation wrongly")
        flow.fd, flow.mtu, flow.state = os.dup(fds[0]), reply.mtu, FlowState.ALLOCATED
        try:
            if c.conn_id not in self.clients:  # the application left while we waited
                raise ChannelClosed("client gone")
            outcome = self.oap.complete(attempt, reply.data)
        except (ChannelClosed, HandlerError):
            close_fds(fds)
            await self._release(flow)
            raise
        return outcome.reply(m.FlowReply(flow.flow_id, flow.layer, flow.mtu, flow.qos, msg.name)), fds

    async def _resolve(self, name: str, timeout: float) -> list[Ipcp]:
        """The operational IPCPs that reach `name`, the most local first."""
        candidates = [i for i in self.ipcps.values() if i.operational]
        if not candidates:
            raise HandlerError(m.ENOENT, f"name {name!r} not found: no layers are up")

        async def query(ipcp: Ipcp) -> Ipcp | None:
            assert ipcp.channel is not None
            try:
                await ipcp.channel.request(m.IpcpQuery(name_hash(ipcp.hash, name)), timeout=timeout)
            except (RemoteError, TimeoutError, ChannelClosed):
                return None
            return ipcp

        # Answers come in any order; stop waiting once no pending layer could rank better.
        pending = {asyncio.ensure_future(query(i)): i for i in candidates}
        hits: list[Ipcp] = []
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del pending[task]
                    if (hit := task.result()) is not None:
                        hits.append(hit)
                best = min((TYPE_RANK[i.type] for i in hits), default=None)
                if best is not None and all(TYPE_RANK[i.type] > best for i in pending.values()):
                    break
        finally:
            for task in pending:
                task.cancel()
        hits.sort(key=lambda i: TYPE_RANK[i.type])
        if not hits:
            raise HandlerError(m.ENOENT, f"name {name!r} not found in any layer")
        return hits

    async def _flow_accept(self, c: Client, msg: m.FlowAccept, _: list[int]) -> tuple[m.FlowReply, list[int]]:
        fut: asyncio.Future[tuple[m.FlowReply, int]] = asyncio.get_running_loop().create_future()
        c.accepts.append(fut)
        c.serves, c.cypher_s = True, msg.cypher_s
        await self._notify_acceptors()
        try:
            reply, fd = await asyncio.wait_for(fut, msg.timeout if msg.timeout and msg.timeout > 0 else None)
        except TimeoutError:
            raise HandlerError(m.ETIMEDOUT, f"no flow arrived within {msg.timeout} s") from None
        finally:
            with contextlib.suppress(ValueError):
                c.accepts.remove(fut)
        return reply, [fd]

    async def _flow_listen(self, c: Client, msg: m.FlowListen, _: list[int]) -> m.Ok:
        c.listening, c.cypher_s = msg.enabled, msg.cypher_s
        c.serves |= msg.enabled
        await self._notify_acceptors()
        return m.Ok()

    async def _flow_dealloc(self, c: Client, msg: m.FlowDealloc, _: list[int]) -> m.Ok:
        flow = self.reg.flows.get(msg.flow_id)
        if flow is None or flow.owner != c.conn_id:
            raise HandlerError(m.ENOENT, f"flow {msg.flow_id} not found")
        await self._release(flow)
        return m.Ok()

    async def _flow_info(self, c: Client, msg: m.FlowInfo, _: list[int]) -> m.FlowInfo:
        flow = self.reg.flows.get(msg.flow_id)
        if flow is None or flow.owner != c.conn_id:
            return m.FlowInfo(msg.flow_id, FlowState.DEALLOC.value)
        return m.FlowInfo(msg.flow_id, flow.state.value)

    async def _release(self, flow: Flow) -> None:
        """The owner is done with the flow: tell its IPCP, then tear our copy down."""
        self.reg.flows.pop(flow.flow_id, None)
        ipcp = self.ipcps.get(flow.ipcp)
        if flow.state is not FlowState.PENDING and ipcp is not None and ipcp.channel is not None and not self.stopping:
            try:
                await ipcp.channel.request(m.IpcpFlowDealloc(flow.flow_id), timeout=QUERY_TIMEOUT)
            except (RemoteError, TimeoutError, ChannelClosed) as e:
                log.debug("dealloc of flow %d at %s: %s", flow.flow_id, ipcp.name, e)
        _teardown_fd(flow.fd)
        flow.fd = -1

    def _end_flow(self, flow: Flow, state: FlowState) -> None:
        """The flow ended under its owner: record how, so it can ask, and tear it down."""
        if flow.state is FlowState.ALLOCATED:
            flow.state = state
        _teardown_fd(flow.fd)
        flow.fd = -1

    # -- flows arriving from IPCPs -----------------------------------------

    async def _flow_req_arrived(self, c: Client, msg: m.FlowReqArrived, fds: list[int]) -> m.IpcpFlowAccepted:
        ipcp = c.ipcp
        assert ipcp is not None
        if len(fds) != 1:
            raise HandlerError(m.EPROTO, "FlowReqArrived must carry exactly one fd")
        entry = self.reg.name_for_hash(ipcp.layer, ipcp.hash, msg.hash)
        if entry is None:
            raise HandlerError(m.ENOENT, "no name with that hash is registered here")
        src = self._local_source(ipcp, msg.src_flow)
        with self.oap.startup(ipcp.layer, f"uid {src.uid}" if src else msg.peer):
            acceptor = await self._wait_acceptor(entry.name)
            answer, outcome = self.oap.serve(entry.name, msg.data, acceptor.cypher_s)
        flow = self.reg.new_flow(
            owner=acceptor.conn_id, pid=acceptor.pid, uid=acceptor.uid, name=entry.name, layer=ipcp.layer,
            ipcp=ipcp.name, qos=msg.qos, role="dst", state=FlowState.ALLOCATED, mtu=msg.mtu,
        )  # fmt: skip
        flow.fd = os.dup(fds[0])
        reply = outcome.reply(m.FlowReply(flow.flow_id, flow.layer, flow.mtu, flow.qos, entry.name,
                                          src.uid if src else -1, src.pid if src else 0))
        waiting = next((f for f in acceptor.accepts if not f.done()), None)
        if waiting is not None:
            waiting.set_result((reply, os.dup(fds[0])))
        elif acceptor.channel is not None:
            acceptor.channel.notify(reply, fds)
        return m.IpcpFlowAccepted(flow.flow_id, answer)

    def _local_source(self, ipcp: Ipcp, src_flow: int) -> Flow | None:
        """The allocating end of a flow that never left this host: only the local IPCP can name it,
        and only a flow that IPCP is serving counts, so an IPCP cannot lend another flow's identity."""
        src = self.reg.flows.get(src_flow) if ipcp.type == "local" and src_flow else None
        return src if src is not None and src.ipcp == ipcp.name and src.role == "src" else None

    async def _wait_acceptor(self, name: str) -> Client:
        """A process to take a flow for `name`, starting the bound program if need be."""
        assert self._acceptors_changed is not None
        entry = self.reg.get_name(name)

        def ready() -> Client | None:
            clients = {c.conn_id: c for c in self.clients.values() if c.accepting}
            pick = self.reg.pick(entry, [c.acceptor for c in clients.values()])
            return clients[pick.conn_id] if pick else None

        if (found := ready()) is not None:
            return found
        # A server of the name is alive: one that accepted before, or a process bound by pid.
        bound_alive = any((c.serves or c.pid in entry.pids) and self.reg.bound(entry, c.acceptor)
                          for c in self.clients.values())
        prog = self.reg.auto_program(entry)
        if not bound_alive:
            if prog is None:
                raise HandlerError(m.ENOENT, f"no process is accepting flows for {name!r}")
            self._start_program(name, prog)
        # Loop: between the wake-up and our turn, another arrival may take the acceptor.
        deadline = time.monotonic() + ACCEPT_TIMEOUT
        while (found := ready()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HandlerError(m.ETIMEDOUT, f"no process accepted the flow for {name!r}")
            with contextlib.suppress(TimeoutError):
                async with self._acceptors_changed:
                    await asyncio.wait_for(self._acceptors_changed.wait(), left)
        return found

    def _start_program(self, name: str, prog: ProgBinding) -> None:
        started = self._starting.get(name)
        if started is not None and time.monotonic() - started < ACCEPT_TIMEOUT:
            return  # one is on its way
        self._starting[name] = time.monotonic()
        self._spawn_task(self._run_program(name, prog))

    async def _run_program(self, name: str, prog: ProgBinding) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                prog.path, *prog.args, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
            )
        except OSError as e:
            log.error("cannot start %s for %r: %s", prog.path, name, e)
            return
        log.info("started %s %s (pid %d) for %r", prog.path, " ".join(prog.args), proc.pid, name)
        self.programs[proc.pid] = proc
        self.reg.started[proc.pid] = name
        code = await proc.wait()
        self.programs.pop(proc.pid, None)
        self.reg.started.pop(proc.pid, None)
        if code:
            self._starting.pop(name, None)  # it failed; the next flow may try again
        log.info("program %s (pid %d) exited with %s", prog.path, proc.pid, code)

    async def _flow_peer_dealloc(self, c: Client, msg: m.FlowPeerDealloc, _: list[int]) -> m.Ok:
        flow = self.reg.flows.get(msg.flow_id)
        if flow is not None and c.ipcp is not None and flow.ipcp == c.ipcp.name:
            self._end_flow(flow, FlowState.DOWN if msg.down else FlowState.DEALLOC)
        return m.Ok()

    # -- IPCPs -------------------------------------------------------------

    async def _ipcp_announce(self, c: Client, msg: m.IpcpAnnounce, _: list[int]) -> m.Ok:
        ipcp = self.ipcps.get(msg.name)
        if ipcp is None or ipcp.pid != c.pid or ipcp.announced.done():
            raise HandlerError(m.EPERM, f"no IPCP {msg.name!r} is expected from pid {c.pid}")
        assert c.channel is not None
        c.ipcp = ipcp
        ipcp.channel = c.channel
        ipcp.announced.set_result(c.channel)
        return m.Ok()

    async def _ipcp_create(self, c: Client, msg: m.IpcpCreate, _: list[int]) -> m.Ok:
        await self._create(msg.name, msg.type)
        return m.Ok(f"created ipcp {msg.name}")

    async def _create(self, name: str, kind: str) -> Ipcp:
        check_name(name, "ipcp name")
        if kind not in IPCP_TYPES:
            raise HandlerError(m.EINVAL, f"unknown ipcp type {kind!r}: expected one of {'|'.join(IPCP_TYPES)}")
        if name in self.ipcps:
            raise HandlerError(m.EEXIST, f"ipcp {name!r} already exists")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ipcp", kind, name, str(self.sock_path),
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        ipcp = Ipcp(name, kind, proc, asyncio.get_running_loop().create_future())
        self.ipcps[name] = ipcp
        self._spawn_task(self._watch_ipcp(ipcp))
        waiter: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
        announced: asyncio.Future[Any] = ipcp.announced
        done, _ = await asyncio.wait([announced, waiter], timeout=ANNOUNCE_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ipcp.announced not in done:
            waiter.cancel()
            _signal(proc, signal.SIGKILL)
            self.ipcps.pop(name, None)
            raise HandlerError(m.EIPCP, f"ipcp {name!r} ({kind}) failed to start; see the IRMd log")
        waiter.cancel()
        log.info("created ipcp %s (%s, pid %d)", name, kind, proc.pid)
        return ipcp

    async def _watch_ipcp(self, ipcp: Ipcp) -> None:
        code = await ipcp.proc.wait()
        if self.ipcps.get(ipcp.name) is not ipcp:
            return
        del self.ipcps[ipcp.name]
        report = log.info if self.stopping else log.warning
        report("ipcp %s (pid %d) exited with status %s", ipcp.name, ipcp.pid, code)
        for flow in self.reg.flows_of(ipcp=ipcp.name):
            self._end_flow(flow, FlowState.DOWN)
        if ipcp.layer and not any(i.layer == ipcp.layer for i in self.ipcps.values()):
            for entry in self.reg.names.values():
                entry.layers.discard(ipcp.layer)
        if ipcp.channel is not None:
            ipcp.channel.close()

    def _ipcp(self, name: str) -> Ipcp:
        ipcp = self.ipcps.get(name)
        if ipcp is None:
            raise HandlerError(m.ENOENT, f"ipcp {name!r} not found")
        return ipcp

    async def _ipcp_destroy(self, c: Client, msg: m.IpcpDestroy, _: list[int]) -> m.Ok:
        ipcp = self._ipcp(msg.name)
        _signal(ipcp.proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(ipcp.proc.wait(), STOP_GRACE)
        except TimeoutError:
            _signal(ipcp.proc, signal.SIGKILL)
            await ipcp.proc.wait()
        await asyncio.sleep(0)  # let the watcher clean up
        return m.Ok(f"destroyed ipcp {msg.name}")

    async def _ipcp_request(self, ipcp: Ipcp, msg: Message) -> Message:
        if ipcp.channel is None or ipcp.channel.closed:
            raise HandlerError(m.ENOTCONN, f"ipcp {ipcp.name!r} is not running")
        try:
            reply, fds = await ipcp.channel.request(msg, timeout=IPCP_OP_TIMEOUT)
        except RemoteError as e:
            raise HandlerError(e.code, f"ipcp {ipcp.name}: {e.text}") from None
        except (TimeoutError, ChannelClosed) as e:
            raise HandlerError(m.ETIMEDOUT, f"ipcp {ipcp.name}: {str(e) or 'no answer'}") from None
        close_fds(fds)
        return reply

    async def _join_layer(self, ipcp: Ipcp, msg: Message, autobind: bool, layer: str = "") -> m.Ok:
        """Bootstrap or enroll; with autobind, the IPCP takes flows for its own and its
        layer's name, registered in the layers below (those up before it joined)."""
        if ipcp.layer:
            raise HandlerError(m.EEXIST, f"ipcp {ipcp.name!r} is already in layer {ipcp.layer!r}")
        lower = [i for i in self.ipcps.values() if i.operational and i is not ipcp]
        if isinstance(msg, m.IpcpBootstrapReq) and ipcp.type in ("unicast", "broadcast"):
            # The layer's PDUs ride on flows of the layers below: the smallest MTU bounds them.
            msg.conf.setdefault("mtu", str(min((i.mtu for i in lower), default=1500)))
        info = await self._ipcp_request(ipcp, msg)
        if not isinstance(info, m.LayerInfo) or info.hash not in DIGESTS:
            raise HandlerError(m.EIPCP, f"ipcp {ipcp.name} answered with {type(info).__name__}")
        if layer and info.layer != layer:
            _signal(ipcp.proc, signal.SIGKILL)
            raise HandlerError(m.EINVAL, f"enrolled in layer {info.layer!r}, not {layer!r}; ipcp {ipcp.name} stopped")
        if any(i.layer == info.layer for i in self.ipcps.values()):
            _signal(ipcp.proc, signal.SIGKILL)  # it joined; it must not stay in the layer unlisted
            raise HandlerError(m.EEXIST, f"layer {info.layer!r} already has an IPCP here; ipcp {ipcp.name} stopped")
        ipcp.layer, ipcp.hash, ipcp.mtu = info.layer, info.hash, info.mtu
        ipcp.joined = (
            {"bootstrap": info.layer, "conf": {k: v for k, v in msg.conf.items() if k != "mtu"}}
            if isinstance(msg, m.IpcpBootstrapReq) else {"enrol": msg.dst if isinstance(msg, m.IpcpEnrollReq) else ""}
        ) | {"autobind": autobind}  # fmt: skip
        if autobind:
            for name in (ipcp.name, ipcp.layer):
                self.reg.bind_pid(name, ipcp.pid)
                entry = self.reg.names[name]
                for below in lower:
                    if below.layer not in entry.layers and below.operational:
                        await self._ipcp_request(below, m.IpcpReg(name_hash(below.hash, name), True))
                        entry.layers.add(below.layer)
        return m.Ok(f"ipcp {ipcp.name} is in layer {ipcp.layer}")

    async def _ipcp_bootstrap(self, c: Client, msg: m.IpcpBootstrap, _: list[int]) -> m.Ok:
        check_name(msg.layer, "layer name")
        named = self.ipcps.get(msg.name)
        if named is not None and named.layer:
            raise HandlerError(m.EEXIST, f"ipcp {msg.name!r} is already in layer {named.layer!r}")
        if any(i.layer == msg.layer for i in self.ipcps.values()):  # before creating anything
            raise HandlerError(m.EEXIST, f"layer {msg.layer!r} already has an IPCP here")
        ipcp = self.ipcps.get(msg.name)
        if ipcp is None:
            if not msg.type:
                raise HandlerError(m.ENOENT, f"ipcp {msg.name!r} not found; give its type to create it")
            ipcp = await self._create(msg.name, msg.type)
        elif msg.type and msg.type != ipcp.type:
            raise HandlerError(m.EINVAL, f"ipcp {msg.name!r} is of type {ipcp.type}, not {msg.type}")
        return await self._join_layer(ipcp, m.IpcpBootstrapReq(msg.layer, msg.conf), msg.autobind)

    async def _ipcp_enroll(self, c: Client, msg: m.IpcpEnroll, _: list[int]) -> m.Ok:
        dst = msg.dst or msg.layer
        if not dst:
            raise HandlerError(m.EINVAL, "enroll needs a layer or a dst")
        ipcp = self.ipcps.get(msg.name)
        if ipcp is None:
            if not msg.type:
                raise HandlerError(m.ENOENT, f"ipcp {msg.name!r} not found; give its type to create it")
            ipcp = await self._create(msg.name, msg.type)
        return await self._join_layer(ipcp, m.IpcpEnrollReq(dst, msg.key), msg.autobind, msg.layer)

    async def _ipcp_connect(self, c: Client, msg: m.IpcpConnect, _: list[int]) -> m.Ok:
        ipcp = self._ipcp(msg.name)
        await self._ipcp_request(ipcp, m.IpcpConnectReq(msg.dst, msg.component, msg.qos, msg.connect))
        if msg.connect and msg.dst not in ipcp.conns:
            ipcp.conns.append(msg.dst)
        elif not msg.connect and msg.dst in ipcp.conns:
            ipcp.conns.remove(msg.dst)
        return m.Ok()

    async def _ipcp_info(self, c: Client, msg: m.IpcpInfoReq, _: list[int]) -> Message:
        """What the IPCP says of itself (irm ipcp show)."""
        ipcp = self._ipcp(msg.name)
        reply = await self._ipcp_request(ipcp, m.IpcpInfoReq())
        if not isinstance(reply, m.IpcpInfo):
            raise HandlerError(m.EPROTO, f"ipcp {ipcp.name}: answered IpcpInfoReq with {type(reply).__name__}")
        return reply

    async def _ipcp_list(self, c: Client, msg: m.IpcpList, _: list[int]) -> m.Table:
        rows = [
            {"pid": str(i.pid), "name": i.name, "type": i.type, "layer": i.layer or "-",
             "state": "operational" if i.operational else "init"}
            for i in self.ipcps.values()
            if (not msg.name or i.name == msg.name) and (not msg.layer or i.layer == msg.layer)
            and (not msg.type or i.type == msg.type)
        ]  # fmt: skip
        return m.Table(["pid", "name", "type", "layer", "state"], rows)

    # -- names and bindings -------------------------------------------------

    async def _bind(self, c: Client, msg: m.Bind, _: list[int]) -> m.Ok:
        if msg.bind:
            check_name(msg.name)
        if msg.kind == "program":
            if msg.bind:
                if not os.path.isabs(msg.target) or not os.access(msg.target, os.X_OK):
                    raise HandlerError(m.EINVAL, f"program {msg.target!r} is not an executable absolute path")
                self.reg.bind_program(msg.name, msg.target, msg.args, msg.auto)
            else:
                self.reg.unbind_program(msg.target, msg.name)
        elif msg.kind in ("process", "ipcp"):
            pid = self._ipcp(msg.target).pid if msg.kind == "ipcp" else self._pid(msg.target)
            if msg.bind:
                self.reg.bind_pid(msg.name, pid)
            else:
                self.reg.unbind_pid(pid, msg.name)
        else:
            raise HandlerError(m.EINVAL, f"cannot bind a {msg.kind!r}: expected program, process or ipcp")
        await self._notify_acceptors()
        return m.Ok()

    @staticmethod
    def _pid(text: str) -> int:
        if not text.isdigit():
            raise HandlerError(m.EINVAL, f"bad pid {text!r}: expected a number")
        pid = int(text)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise HandlerError(m.ENOENT, f"no process with pid {pid}") from None
        except PermissionError:
            pass
        return pid

    async def _name_create(self, c: Client, msg: m.NameCreate, _: list[int]) -> m.Ok:
        if msg.name in self.reg.names:
            raise HandlerError(m.EEXIST, f"name {msg.name!r} already exists")
        self.reg.create_name(msg.name, msg.lb).sec = check_sec(msg.sec)
        return m.Ok()

    async def _name_destroy(self, c: Client, msg: m.NameDestroy, _: list[int]) -> m.Ok:
        self.reg.destroy_name(msg.name)
        return m.Ok()

    async def _name_register(self, c: Client, msg: m.NameRegister, _: list[int]) -> m.Ok:
        if not msg.layers:
            raise HandlerError(m.EINVAL, "register needs at least one layer")
        entry = self.reg.create_name(msg.name) if msg.register and msg.name not in self.reg.names else (
            self.reg.get_name(msg.name))  # fmt: skip
        for layer in msg.layers:
            ipcp = next((i for i in self.ipcps.values() if i.layer == layer and i.operational), None)
            if ipcp is None:
                raise HandlerError(m.ENOENT, f"layer {layer!r} not found: no IPCP here is in it")
            if msg.register == (layer in entry.layers):
                state = "already" if msg.register else "not"
                raise HandlerError(m.EEXIST if msg.register else m.ENOENT,
                                   f"name {msg.name!r} is {state} registered in {layer!r}")
            await self._ipcp_request(ipcp, m.IpcpReg(name_hash(ipcp.hash, msg.name), msg.register))
            (entry.layers.add if msg.register else entry.layers.discard)(layer)
        return m.Ok()

    async def _name_list(self, c: Client, msg: m.NameList, _: list[int]) -> m.Table:
        rows = [
            {"name": e.name, "lb": e.lb, "layers": ",".join(sorted(e.layers)) or "-",
             "programs": ",".join(f"{p.path}{' (auto)' if p.auto else ''}" for p in e.programs.values()) or "-",
             "pids": ",".join(map(str, sorted(e.pids))) or "-"}
            for e in self.reg.names.values()
        ]  # fmt: skip
        return m.Table(["name", "lb", "layers", "programs", "pids"], rows)

    async def _dump(self, c: Client, msg: m.Dump, _: list[int]) -> m.Ok:
        ipcps = list(self.ipcps.values())
        if msg.what == "config":
            return m.Ok(state.as_config(ipcps, self.reg))
        if msg.what in ("text", "dot"):
            return m.Ok(state.layer_graph(ipcps, self.reg, msg.what))
        raise HandlerError(m.EINVAL, f"cannot dump {msg.what!r}: expected config, text or dot")

    async def _flow_list(self, c: Client, msg: m.FlowList, _: list[int]) -> m.Table:
        rows = [
            {"id": str(f.flow_id), "pid": str(f.pid), "name": f.name, "role": f.role,
             "layer": f.layer, "ipcp": f.ipcp, "state": f.state.value, "mtu": str(f.mtu),
             "qos": "reliable" if f.qos.reliable else "best-effort"}
            for f in self.reg.flows.values()
        ]  # fmt: skip
        return m.Table(["id", "pid", "name", "role", "layer", "ipcp", "state", "mtu", "qos"], rows)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(args: argparse.Namespace) -> int:
    steps: list[Step] = []
    if args.config:
        try:  # what the file says is checked before anything starts
            steps = plan(Path(args.config))
        except ConfigError as e:
            log.error("%s", e)
            return 1
    irmd = Irmd(irmd_sock_path(args.sock))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, irmd.stop)
    await irmd.start()
    status = 0
    try:
        if steps:
            try:
                await apply_config(irmd, steps, Path(args.config))
            except ConfigError as e:  # what only running it shows stops the boot too
                log.error("%s", e)
                status = 1
                irmd.stop()
        await irmd.wait_stopped()
    finally:
        await irmd.shutdown()
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="irmd", description="The Ouroboros IPC Resource Manager daemon.")
    parser.add_argument("--sock", help="control socket (default: $OUROBOROS_SOCK or the per-user default)")
    parser.add_argument("--config", metavar="FILE.toml", help="create, bootstrap, bind and register from a file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    _raise_nofile()
    if args.sock:
        os.environ["OUROBOROS_SOCK"] = args.sock  # spawned programs find this irmd
    sys.exit(asyncio.run(_serve(args)))
