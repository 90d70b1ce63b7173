"""The registry: names, bindings, registrations and flows, free of I/O.

The daemon asks it questions (which name is this hash, who may accept, which
program to start) and records outcomes; everything here is unit-testable.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from irmd.identity import Peer, Program, proc_start
from irmd.reg.flow import Flow
from irmd.reg.ipcp import Ipcp, by_preference
from irmd.reg.name import LB_IMPLICIT, Name, ProcBinding, ProgBinding, lb_pick, prog_key
from irmd.reg.proc import Acceptor, may_accept, runs_bound_program
from proto.errors import Busy, InvalidArgument, NotFound
from proto.names import LB_POLICIES, check_name, wildcard_match


class Registry:
    def __init__(self, irmd_uid: int | None = None) -> None:
        self.irmd_uid = os.geteuid() if irmd_uid is None else irmd_uid
        self.ipcps: dict[str, Ipcp] = {}
        self.names: dict[str, Name] = {}
        self.flows: dict[int, Flow] = {}
        self._flow_ids = itertools.count(1)
        self._flows_by_uid: Counter[int] = Counter()
        self._flows_by_ipcp: dict[str, Counter[int]] = {}  # IPCP name -> uid -> flows of that IPCP
        self._flows_by_remote: Counter[tuple[str, str]] = Counter()  # (IPCP, remote peer) -> flows it asked for
        self._name_seq = itertools.count(1)
        self.started: dict[int, tuple[str, int]] = {}  # pid -> (name it was started for, its start time)
        self.irmd_proc = (os.getpid(), proc_start(os.getpid()))  # the IRMd itself: what it starts is its own

    # -- IPCPs ---------------------------------------------------------

    def get_ipcp(self, name: str) -> Ipcp:
        try:
            return self.ipcps[name]
        except KeyError:
            raise NotFound(f"ipcp {name!r} not found") from None

    def operational(self) -> list[Ipcp]:
        return [i for i in self.ipcps.values() if i.operational]

    def in_layer(self, layer: str, operational: bool = True) -> list[Ipcp]:
        """This IRMd's IPCPs in `layer` (only those working, unless operational is False)."""
        return [i for i in self.ipcps.values() if i.layer == layer and (i.operational or not operational)]

    def matching(self, pattern: str, *, layer: bool = False) -> list[Ipcp]:
        """The IPCPs whose name (or, with layer, whose layer) matches `pattern`, in preference order."""
        return by_preference(i for i in self.ipcps.values() if wildcard_match(pattern, i.layer if layer else i.name))

    # -- names ---------------------------------------------------------

    def create_name(self, name: str, lb: str = LB_IMPLICIT) -> Name:
        check_name(name)
        if lb not in LB_POLICIES:
            raise InvalidArgument(f"unknown lb policy {lb!r}: expected {' or '.join(LB_POLICIES)}")
        entry = self.names.get(name)
        if entry is None:
            entry = self.names[name] = Name(name, lb, next(self._name_seq))
        else:
            entry.lb = lb
        return entry

    def get_name(self, name: str) -> Name:
        try:
            return self.names[name]
        except KeyError:
            raise NotFound(f"name {name!r} not found") from None

    def destroy_name(self, name: str) -> Name:
        entry = self.get_name(name)
        if entry.regs:
            raise Busy(f"name {name!r} is registered in {', '.join(self.layers_of(entry))}; unregister it first")
        return self.names.pop(name)

    def layers_of(self, entry: Name) -> list[str]:
        """The layers `entry` is registered in (through one or more of this IRMd's IPCPs)."""
        return sorted({self.ipcps[r].layer for r in entry.regs if r in self.ipcps})

    def drop_ipcp(self, ipcp: str) -> None:
        """IPCP `ipcp` is gone: so are the registrations it held."""
        for entry in self.names.values():
            entry.regs.discard(ipcp)

    def name_for_hash(self, ipcp: str, algo: str, digest: bytes) -> Name | None:
        """The name registered with IPCP `ipcp` whose hash (by the layer's algorithm) is `digest`."""
        for entry in self.names.values():
            if ipcp in entry.regs and entry.hash_by(algo) == digest:
                return entry
        return None

    # -- bindings ------------------------------------------------------

    def _name(self, name: str) -> Name:
        return self.names[name] if name in self.names else self.create_name(name)

    def bind_program(
        self,
        name: str,
        path: str,
        args: list[str],
        auto: bool,
        owner: int | None = None,
        program: Program | None = None,
    ) -> None:
        owner = self.irmd_uid if owner is None else owner
        self._name(name).programs[prog_key(path)] = ProgBinding(path, list(args), auto, owner, program)

    def unbind_program(self, path: str, name: str = "") -> None:
        key = prog_key(path)
        hits = [e for e in self._scope(name) if e.programs.pop(key, None) is not None]
        if not hits:
            raise NotFound(f"program {path!r} is not bound{f' to {name!r}' if name else ''}")

    def bind_proc(self, name: str, proc: ProcBinding) -> None:
        self._name(name).procs[proc.pid] = proc

    def unbind_pid(self, pid: int, name: str = "", scope: Iterable[Name] | None = None) -> None:
        hits = [e for e in (self._scope(name) if scope is None else scope) if pid in e.procs]
        if not hits:
            raise NotFound(f"process {pid} is not bound{f' to {name!r}' if name else ''}")
        for e in hits:
            del e.procs[pid]

    def forget_proc(self, pid: int, start: int) -> None:
        """Process (pid, start) is gone: its bindings and its record as started for a name go, not
        those of another process with its pid (one started after it, or one whose connection it kept)."""
        for e in self.names.values():
            proc = e.procs.get(pid)
            if proc is not None and proc.start == start:
                del e.procs[pid]
        started = self.started.get(pid)
        if started is not None and started[1] == start:
            del self.started[pid]

    def _scope(self, name: str) -> Iterable[Name]:
        return [self.get_name(name)] if name else list(self.names.values())

    def bound(self, entry: Name, acceptor: Acceptor) -> bool:
        """May `acceptor` take flows for `entry`? (irmd.reg.proc.may_accept)"""
        peer = acceptor.peer
        return may_accept(
            entry,
            peer,
            self.started.get(peer.pid),
            self.irmd_uid,
            lambda pid, start: self.serves(pid, start, peer if pid == peer.pid else None),
        )

    def serves(self, pid: int, start: int, peer: Peer | None = None) -> str:
        """What process (pid, start) serves of its own, "" if nothing: the IRMd itself, an IPCP it
        started, a process started for a name or bound to one by pid, or (`peer`, as the kernel
        describes the process) one running a bound program."""
        if (pid, start) == self.irmd_proc:
            return "the IRMd"
        ipcp = next((i for i in self.ipcps.values() if i.pid == pid and i.start == start), None)
        if ipcp is not None:
            return f"ipcp {ipcp.name}"
        started = self.started.get(pid)
        if started is not None and started[1] == start:
            return f"started for {started[0]}"
        for entry in self.names.values():
            proc = entry.procs.get(pid)
            if proc is not None and proc.start == start:
                return f"bound to {entry.name}"
        if peer is not None:
            for entry in self.names.values():
                if runs_bound_program(entry, peer, self.irmd_uid):
                    return f"runs a program bound to {entry.name}"
        return ""

    def pick(self, entry: Name, acceptors: list[Acceptor]) -> Acceptor | None:
        """The acceptor that gets the next flow for `entry`, by its lb policy."""
        return lb_pick(entry, [a for a in acceptors if self.bound(entry, a)])

    def auto_program(self, entry: Name) -> ProgBinding | None:
        return entry.auto_program()

    # -- flows ---------------------------------------------------------

    def new_flow(self, **kw: object) -> Flow:
        flow = Flow(flow_id=next(self._flow_ids), **kw)  # type: ignore[arg-type]
        self.flows[flow.flow_id] = flow
        self._flows_by_uid[flow.uid] += 1
        self._flows_by_ipcp.setdefault(flow.ipcp, Counter())[flow.uid] += 1
        if flow.remote:
            self._flows_by_remote[flow.ipcp, flow.remote] += 1
        return flow

    def drop_flow(self, flow: Flow) -> None:
        if self.flows.pop(flow.flow_id, None) is not None:
            self._flows_by_uid[flow.uid] -= 1
            if not self._flows_by_uid[flow.uid]:
                del self._flows_by_uid[flow.uid]
            at = self._flows_by_ipcp[flow.ipcp]
            at[flow.uid] -= 1
            if not at[flow.uid]:
                del at[flow.uid]
                if not at:
                    del self._flows_by_ipcp[flow.ipcp]
            if flow.remote:
                key = (flow.ipcp, flow.remote)
                self._flows_by_remote[key] -= 1
                if not self._flows_by_remote[key]:
                    del self._flows_by_remote[key]

    def flows_of(self, *, owner: int | None = None, ipcp: str | None = None) -> Iterator[Flow]:
        for flow in list(self.flows.values()):
            if (owner is None or flow.owner == owner) and (ipcp is None or flow.ipcp == ipcp):
                yield flow

    def flows_of_uid(self, uid: int) -> int:
        return self._flows_by_uid[uid]

    def flows_of_users(self, admin: Callable[[int], bool], ipcp: str | None = None) -> int:
        """Flows held by uids that are not admins (of one IPCP, if named)."""
        counts = self._flows_by_uid if ipcp is None else self._flows_by_ipcp.get(ipcp, Counter())
        return sum(n for uid, n in counts.items() if not admin(uid))

    def flows_of_remote(self, ipcp: str, remote: str) -> int:
        """Flows of the IPCP `ipcp` that the remote peer `remote` asked for, still held here."""
        return self._flows_by_remote[ipcp, remote]

    def flows_of_uid_at(self, uid: int, ipcp: str) -> int:
        """Flows `uid` holds of the IPCP `ipcp`, either end."""
        at = self._flows_by_ipcp.get(ipcp)
        return at[uid] if at is not None else 0
