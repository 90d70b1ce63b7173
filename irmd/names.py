"""Names: created, bound to programs and processes, registered in layers, listed and dumped; each
act checked against who owns the name and who asks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from irmd import policy, state, views
from irmd.identity import proc_start, proc_uids, program_of
from irmd.reg import Ipcp, Name, ProcBinding
from irmd.reg.ipcp import is_pattern
from irmd.reg.name import LB_IMPLICIT
from proto import messages as m
from proto.errors import AlreadyExists, InvalidArgument, LimitReached, NotFound
from proto.names import check_name

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

    def new_name(self, c: Client, name: str, lb: str = LB_IMPLICIT) -> Name:
        """A name `c` creates (by create, bind or register): it owns it; a user has a limited number."""
        check_name(name)
        if not c.caller.admin:
            held, limit = self.reg.names_of(c.uid), self.irmd.limits.names_per_uid
            if held >= limit:
                raise LimitReached(f"uid {c.uid} has made {held} names (limit names_per_uid={limit})")
        return self.reg.create_name(name, lb, owner=c.uid)

    def own_name(self, c: Client, name: str, create: bool = False) -> Name:
        """Name `name`, which `c` may act on (theirs, or any for an admin); created as theirs if missing."""
        entry = self.reg.names.get(name)
        if entry is None and create:
            return self.new_name(c, name)
        if entry is None:
            entry = self.reg.get_name(name)  # raises: not found
        policy.check_name(c.caller, entry.owner, name)
        return entry

    def seen_by(self, c: Client) -> Iterator[Name]:
        """The names `c` may see, in creation order: an admin all, a user their own."""
        return (e for e in sorted(self.reg.names.values(), key=lambda e: e.seq) if policy.visible(c.caller, e.owner))

    # -- bindings ------------------------------------------------------------

    async def bind(self, c: Client, msg: m.Bind, _: list[int]) -> m.Ok:
        if msg.bind:
            check_name(msg.name)
        if msg.kind == "program":
            policy.check_bind(c.caller, "program", None)
            if msg.bind:
                self._bind_program(c, msg)
            else:
                self.reg.unbind_program(msg.target, msg.name)
        elif msg.kind in ("process", "ipcp"):
            self._bind_process(c, msg)
        else:
            raise InvalidArgument(f"cannot bind a {msg.kind!r}: expected program, process or ipcp")
        await self.irmd.notify_acceptors()
        return m.Ok()

    def _bind_program(self, c: Client, msg: m.Bind) -> None:
        if not os.path.isabs(msg.target) or not os.access(msg.target, os.X_OK):
            raise InvalidArgument(f"program {msg.target!r} is not an executable absolute path")
        existing = self.reg.names.get(msg.name)
        if existing is not None:
            policy.check_admin_name(c.caller, existing.owner, msg.name, self.irmd.uid)
        entry = self.own_name(c, msg.name, create=True)
        self.reg.bind_program(entry.name, msg.target, msg.args, msg.auto, c.uid, program_of(msg.target))

    def _bind_process(self, c: Client, msg: m.Bind) -> None:
        pid = self.reg.get_ipcp(msg.target).pid if msg.kind == "ipcp" else parse_pid(msg.target)
        uids = proc_uids(pid)
        if uids is None:
            raise NotFound(f"no process with pid {pid}")
        # A user's own process: it runs as them, really and effectively (not a setuid program they started).
        policy.check_bind(c.caller, msg.kind, uids[1] if uids[0] == uids[1] else -1)
        if msg.bind:
            entry = self.own_name(c, msg.name, create=True)
            self.reg.bind_proc(entry.name, ProcBinding(pid, proc_start(pid), uids[1]))
        elif msg.name:
            self.own_name(c, msg.name)
            self.reg.unbind_pid(pid, msg.name)
        else:  # from every name the caller may act on
            self.reg.unbind_pid(pid, scope=list(self.seen_by(c)))

    # -- names -------------------------------------------------------------------

    async def create(self, c: Client, msg: m.NameCreate, _: list[int]) -> m.Ok:
        if msg.name in self.reg.names:
            raise AlreadyExists(f"name {msg.name!r} already exists")
        self.new_name(c, msg.name, msg.lb)
        return m.Ok()

    async def destroy(self, c: Client, msg: m.NameDestroy, _: list[int]) -> m.Ok:
        """Destroy a name; registered, it is unregistered first (as Ouroboros destroys it)."""
        entry = self.own_name(c, msg.name)
        for ipcp in [self.reg.ipcps[r] for r in sorted(entry.regs) if r in self.reg.ipcps]:
            await self.irmd.ipcps.register(ipcp, entry, False)
        self.reg.destroy_name(msg.name)
        return m.Ok()

    def _reg_targets(self, msg: m.NameRegister) -> list[Ipcp]:
        """The working IPCPs the request names: those in its layers and those it names itself."""
        targets: dict[str, Ipcp] = {}
        for pattern, by_layer in [*((p, True) for p in msg.layers), *((p, False) for p in msg.ipcps)]:
            hits = [i for i in self.reg.matching(pattern, layer=by_layer) if i.operational]
            if not hits:
                what = f"layer {pattern!r} not found: no IPCP here is in it" if by_layer else (
                    f"ipcp {pattern!r} not found" if not is_pattern(pattern) else f"no ipcp here matches {pattern!r}")
                raise NotFound(what)
            targets.update((i.name, i) for i in hits)
        return list(targets.values())

    async def register(self, c: Client, msg: m.NameRegister, _: list[int]) -> m.Ok:
        """Register a name with IPCPs (making it if need be), or unregister it. Asking for a
        registration that is there already is no error (a config's reg and an autobind may both)."""
        if not msg.layers and not msg.ipcps:
            raise InvalidArgument("register needs at least one layer or ipcp")
        entry = self.own_name(c, msg.name, create=msg.register)
        targets = self._reg_targets(msg)
        if not msg.register and not any(i.name in entry.regs for i in targets):
            where = ", ".join([*msg.layers, *msg.ipcps])
            raise NotFound(f"name {msg.name!r} is not registered in {where!r}")
        for ipcp in targets if msg.register else ():  # taking a name of theirs off a layer is always theirs
            policy.check_register(c.caller, ipcp.type, ipcp.layer)
        for ipcp in targets:
            await self.irmd.ipcps.register(ipcp, entry, msg.register)
        return m.Ok()

    async def list_names(self, c: Client, msg: m.NameList, _: list[int]) -> m.Table:
        rows = (
            (e.seq, {"name": e.name, "lb": e.lb, "layers": ",".join(self.reg.layers_of(e)) or "-",
                     "programs": ",".join(f"{p.path}{' (auto)' if p.auto else ''}" for p in e.programs.values()) or "-",
                     "pids": ",".join(map(str, sorted(e.procs))) or "-"})
            for e in self.seen_by(c)
        )  # fmt: skip
        return views.page(["name", "lb", "layers", "programs", "pids"], rows, msg.start)

    async def dump(self, c: Client, msg: m.Dump, _: list[int]) -> m.Text:
        if msg.offset == 0 or not c.dump:  # a dump is made once, then fetched in parts
            ipcps = list(self.reg.ipcps.values())

            def shown(entry: Name) -> bool:
                return policy.visible(c.caller, entry.owner)

            if msg.what == "config":
                c.dump = state.as_config(ipcps, self.reg, shown)
            elif msg.what in ("text", "dot"):
                c.dump = state.layer_graph(ipcps, self.reg, msg.what, shown)
            else:
                raise InvalidArgument(f"cannot dump {msg.what!r}: expected config, text or dot")
        part = views.text_part(c.dump, msg.offset)
        if not part.next:
            c.dump = ""
        return part
