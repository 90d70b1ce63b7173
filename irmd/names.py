"""Names: created, bound to programs and processes, registered in layers, listed and dumped; each
act checked against who owns the name and who asks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from irmd import policy, spawn, state, views
from irmd.identity import proc_start, proc_uids, program_of
from irmd.reg import Ipcp, Name, ProcBinding
from irmd.secfiles import check_sec
from proto import messages as m
from proto.errors import FlowError, InvalidArgument, NotFound
from proto.names import check_name, is_pattern

log = logging.getLogger("irmd")

if TYPE_CHECKING:
    from irmd.core import Irmd
    from irmd.server import Client


def parse_pid(text: str) -> int:
    if not text.isdigit() or len(text) > 10:
        raise InvalidArgument(f"bad pid {text!r}: expected a number")
    return int(text)


class Names:
    def __init__(self, irmd: Irmd) -> None:
        self.irmd = irmd
        self.reg = irmd.reg

    def seen_by(self, c: Client) -> Iterator[Name]:
        """The names `c` may see, in creation order: an admin all, a user those its processes are bound to."""
        for entry in sorted(self.reg.names.values(), key=lambda e: e.seq):
            if c.caller.admin or any(policy.visible(c.caller, b.uid) for b in entry.procs.values()):
                yield entry

    # -- bindings ------------------------------------------------------------

    async def bind(self, c: Client, msg: m.Bind, _: list[int]) -> m.Ok:
        if msg.bind:
            check_name(msg.name)
        if msg.kind == "program":
            if msg.bind:
                if (
                    not os.path.isabs(msg.target)
                    or not os.path.isfile(msg.target)
                    or not os.access(msg.target, os.X_OK)
                ):
                    raise InvalidArgument(f"program {msg.target!r} is not an executable file's absolute path")
                if msg.auto:  # the IRMd will start it as the binding's owner: only they, or root, may write it
                    who = spawn.run_as(c.uid, self.irmd.uid)
                    try:
                        spawn.check_program(msg.target, self.irmd.uid if who.uid is None else who.uid)
                    except OSError as e:
                        raise InvalidArgument(f"will not start {msg.target!r}: {e.strerror or e}") from None
                self.reg.bind_program(msg.name, msg.target, msg.args, msg.auto, c.uid, program_of(msg.target))
            else:
                self.reg.unbind_program(msg.target, msg.name)
        elif msg.kind in ("process", "ipcp"):
            self._bind_process(msg)
        else:
            raise InvalidArgument(f"cannot bind a {msg.kind!r}: expected program, process or ipcp")
        await self.irmd.notify_acceptors()
        return m.Ok()

    def _bind_process(self, msg: m.Bind) -> None:
        pid = self.reg.get_ipcp(msg.target).pid if msg.kind == "ipcp" else parse_pid(msg.target)
        uids = proc_uids(pid)
        if uids is None:
            raise NotFound(f"no process with pid {pid}")
        if msg.bind:  # this process (its start time: not a later one with its pid), running as this user
            self.reg.bind_proc(msg.name, ProcBinding(pid, proc_start(pid), uids[1]))
        else:
            self.reg.unbind_pid(pid, msg.name)

    # -- names -------------------------------------------------------------------

    async def create(self, c: Client, msg: m.NameCreate, _: list[int]) -> m.Ok:
        """A new name; one that exists is left as it is (its lb and paths too) and no failure, as in
        0.23: a setup script run a second time goes on."""
        if msg.name in self.reg.names:
            log.info("name %r already exists: left as it is", msg.name)
            return m.Ok()
        self.reg.create_name(msg.name, msg.lb).sec = check_sec(msg.sec)
        return m.Ok()

    async def destroy(self, c: Client, msg: m.NameDestroy, _: list[int]) -> m.Ok:
        """Destroy a name; registered, it is unregistered first (as Ouroboros destroys it)."""
        entry = self.reg.get_name(msg.name)
        for ipcp in [self.reg.ipcps[r] for r in sorted(entry.regs) if r in self.reg.ipcps]:
            await self.irmd.ipcps.register(ipcp, entry, False)
        self.reg.destroy_name(msg.name)
        return m.Ok()

    def _reg_targets(self, msg: m.NameRegister) -> list[Ipcp]:
        """The working IPCPs the request names: those in its layers and those it names itself. To
        unregister, a layer or IPCP that is not there is passed over, as 0.23's irm does."""
        targets: dict[str, Ipcp] = {}
        for pattern, by_layer in [*((p, True) for p in msg.layers), *((p, False) for p in msg.ipcps)]:
            found = self.reg.matching(pattern, layer=by_layer)
            hits = [i for i in found if i.operational]
            if not hits:
                if not msg.register:
                    continue
                if by_layer:
                    raise NotFound(f"layer {pattern!r} not found: no IPCP here is in it")
                if found:  # there, but with no directory to register in
                    ipcp = found[0]
                    raise NotFound(
                        f"ipcp {ipcp.name!r} is not running"
                        if ipcp.layer
                        else f"ipcp {ipcp.name!r} is in no layer yet: bootstrap or enroll it first"
                    )
                raise NotFound(
                    f"ipcp {pattern!r} not found" if not is_pattern(pattern) else f"no ipcp here matches {pattern!r}"
                )
            targets.update((i.name, i) for i in hits)
        return list(targets.values())

    async def register(self, c: Client, msg: m.NameRegister, _: list[int]) -> m.Ok:
        """Register a name with IPCPs (making it if need be), or unregister it. Asking for a
        registration that is there already is no error (a config's reg and an autobind may both), nor
        is removing one that is not (as 0.23: a teardown script run twice goes on); the name must be."""
        if not msg.layers and not msg.ipcps:
            raise InvalidArgument("register needs at least one layer or ipcp")
        targets = self._reg_targets(msg)  # first: a refused registration leaves no name behind
        entry = self.reg.create_name(msg.name) if msg.register and msg.name not in self.reg.names else (
            self.reg.get_name(msg.name))  # fmt: skip
        if not msg.register and not any(i.name in entry.regs for i in targets):
            log.info("name %r is not registered in %s: nothing to unregister", msg.name, [*msg.layers, *msg.ipcps])
            return m.Ok()
        bound = entry.procs.get(c.pid)
        own = bound is not None and bound.start == c.peer.start and not entry.programs
        for ipcp in targets:
            new = msg.register and ipcp.name not in entry.regs
            await self.irmd.ipcps.register(ipcp, entry, msg.register)
            if new and own:  # a server registering its own name: for its lifetime
                entry.reg_owner[ipcp.name] = (c.pid, c.peer.start)
            elif not new:
                entry.reg_owner.pop(ipcp.name, None)  # unregistered, or asked for again: nobody's own
        return m.Ok()

    async def process_gone(self, pid: int, start: int) -> None:
        """The registrations process (pid, start) made of a name it served go with it (else flows to
        the name would reach a layer where nobody takes them), unless another process or a program
        still serves the name."""
        for entry in list(self.reg.names.values()):
            owned = [i for i, owner in entry.reg_owner.items() if owner == (pid, start)]
            if not owned:
                continue
            for ipcp_name in owned:
                entry.reg_owner.pop(ipcp_name, None)
            if entry.procs or entry.programs:
                continue
            for ipcp_name in owned:
                ipcp = self.reg.ipcps.get(ipcp_name)
                if ipcp is None:
                    continue
                try:
                    await self.irmd.ipcps.register(ipcp, entry, False)
                    log.info(
                        "name %r unregistered from %s: process %d that registered it is gone",
                        entry.name,
                        ipcp_name,
                        pid,
                    )
                except FlowError as e:  # the IPCP is going too
                    log.info("name %r: unregistering from %s: %s", entry.name, ipcp_name, e)

    async def list_names(self, c: Client, msg: m.NameList, _: list[int]) -> m.Table:
        def row(e: Name) -> dict[str, str]:
            pids = sorted(pid for pid, b in e.procs.items() if policy.visible(c.caller, b.uid))
            programs = e.programs.values() if c.caller.admin else ()  # a user sees their own processes
            return {
                "name": e.name,
                "lb": e.lb,
                "layers": ",".join(self.reg.layers_of(e)) or "-",
                "programs": ",".join(f"{p.path}{' (auto)' if p.auto else ''}" for p in programs) or "-",
                "pids": ",".join(map(str, pids)) or "-",
            }

        entries = (e for e in self.seen_by(c) if e.name.startswith(msg.prefix))
        return views.page(["name", "lb", "layers", "programs", "pids"], ((e.seq, row(e)) for e in entries), msg.start)

    async def dump(self, c: Client, msg: m.Dump, _: list[int]) -> m.Text:
        if msg.offset == 0 or not c.dump:  # a dump is made once, then fetched in parts
            ipcps = list(self.reg.ipcps.values())

            seen = {e.name for e in self.seen_by(c)}

            def shown(entry: Name) -> bool:
                return entry.name in seen

            if msg.what == "config":
                c.dump = state.as_config(ipcps, self.reg, shown)
            elif msg.what in ("text", "dot", "json"):
                c.dump = state.layer_graph(ipcps, self.reg, msg.what, shown)
            else:
                raise InvalidArgument(f"cannot dump {msg.what!r}: expected config, text, dot or json")
        part = views.text_part(c.dump, msg.offset)
        if not part.next:
            c.dump = ""
        return part
