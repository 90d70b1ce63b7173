"""The IRMd: its state (the registry, the connected clients, its limits) and which job serves which
request: the socket server, flows, IPCPs, names and bindings, programs started on demand.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from irmd.flows import Flows
from irmd.forkserver import ForkServer
from irmd.ipcps import Ipcps
from irmd.limits import Limits
from irmd.names import Names
from irmd.oap import Oap
from irmd.programs import Programs
from irmd.reg import Registry
from irmd.server import Client, Server
from irmd.spawn import Output
from proto import messages as m
from transports.wire import Message

log = logging.getLogger("irmd")

Handler = Callable[[Client, Any, list[int]], Awaitable[Any]]


class Irmd:
    def __init__(
        self,
        sock_path: Path,
        limits: Limits | None = None,
        output: Output | None = None,
        forks: ForkServer | None = None,
    ) -> None:
        self.sock_path = Path(os.path.abspath(sock_path))  # what it starts runs in /: no relative path
        self.limits = limits or Limits()
        self.output = output or Output()  # where the IPCPs and programs it starts write: its log
        self.forks = forks  # what forks its IPCPs; without one they are executed
        self.uid = os.geteuid()
        self.reg = Registry(self.uid)
        self.oap = Oap(self.reg)  # flow allocation authentication: headers out, headers in
        self.clients: dict[int, Client] = {}
        self.server = Server(self)
        self.flows = Flows(self)
        self.ipcps = Ipcps(self)
        self.names = Names(self)
        self.programs = Programs(self)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._acceptors_changed: asyncio.Condition | None = None
        self.handlers: dict[type[Message], Handler] = {
            m.ProcAnnounce: self.flows.proc_announce,
            m.FlowAlloc: self.flows.flow_alloc,
            m.FlowAccept: self.flows.flow_accept,
            m.FlowListen: self.flows.flow_listen,
            m.FlowDealloc: self.flows.flow_dealloc,
            m.FlowInfo: self.flows.flow_info,
            m.FlowPeer: self.flows.flow_peer,
            m.FlowList: self.flows.flow_list,
            m.FlowReqArrived: self.flows.flow_req_arrived,
            m.FlowPeerDealloc: self.flows.flow_peer_dealloc,
            m.IpcpAnnounce: self.ipcps.announce,
            m.IpcpCreate: self.ipcps.create,
            m.IpcpDestroy: self.ipcps.destroy,
            m.IpcpBootstrap: self.ipcps.bootstrap,
            m.IpcpEnroll: self.ipcps.enroll,
            m.IpcpConnect: self.ipcps.connect,
            m.IpcpList: self.ipcps.list_ipcps,
            m.IpcpInfoReq: self.ipcps.info,
            m.Bind: self.names.bind,
            m.NameCreate: self.names.create,
            m.NameDestroy: self.names.destroy,
            m.NameRegister: self.names.register,
            m.NameList: self.names.list_names,
            m.Dump: self.names.dump,
            m.ActAs: self.server.act_as,
        }

    # -- life cycle ------------------------------------------------------

    async def start(self) -> None:
        self._acceptors_changed = asyncio.Condition()
        await self.server.start()

    def stop(self) -> None:
        self._stopped.set()

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def shutdown(self) -> None:
        self.server.close()
        await self.programs.stop_all(list(self.reg.ipcps.values()))
        self.flows.tear_down_all()
        self.ipcps.infos.close()
        self.server.close_clients()
        for task in list(self._tasks):
            task.cancel()
        if self.forks is not None:
            self.forks.close()
        log.info("irmd stopped")

    async def admin(self, msg: Message) -> Message:
        """Serve an administrative request from within (config boot) as irm would get it served."""
        reply, _ = await self.server.serve_locally(msg)
        return reply

    # -- services for the jobs -------------------------------------------------

    def spawn_task(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def notify_acceptors(self) -> None:
        """Who may accept changed (a process accepts, listens, announced itself, was bound)."""
        assert self._acceptors_changed is not None
        async with self._acceptors_changed:
            self._acceptors_changed.notify_all()

    async def acceptors_changed(self, timeout: float) -> None:
        assert self._acceptors_changed is not None
        async with self._acceptors_changed:
            await asyncio.wait_for(self._acceptors_changed.wait(), timeout)
