"""The IRMd's bookkeeping: names, bindings, registrations and flows, free of I/O.

The daemon asks it questions (which name is this hash, who may accept, which
program to start) and records outcomes; everything here is unit-testable.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import os
from collections.abc import Iterable, Iterator

from proto.names import LB_POLICIES, RegistryError, check_name, name_hash
from proto.qos import QosSpec


def prog_key(path: str) -> str:
    """Programs are matched by base name, as `irm bind program oping` names them."""
    return os.path.basename(path.rstrip("/")) or path


@dataclasses.dataclass
class ProgBinding:
    path: str
    args: list[str]
    auto: bool


@dataclasses.dataclass
class Name:
    name: str
    lb: str = "round-robin"
    programs: dict[str, ProgBinding] = dataclasses.field(default_factory=dict)
    pids: set[int] = dataclasses.field(default_factory=set)
    layers: set[str] = dataclasses.field(default_factory=set)
    next_rr: int = 0
    sec: dict[str, str] = dataclasses.field(default_factory=dict)  # security files set at creation (irmd.secfiles)


class FlowState(enum.Enum):
    PENDING = "pending"
    ALLOCATED = "allocated"
    DEALLOC = "dealloc"  # the peer deallocated
    DOWN = "down"  # the layer or IPCP failed


@dataclasses.dataclass
class Flow:
    flow_id: int
    owner: int  # connection id of the owning application
    pid: int
    name: str
    layer: str
    ipcp: str
    qos: QosSpec
    role: str  # "src" or "dst"
    state: FlowState = FlowState.PENDING
    mtu: int = 0
    uid: int = -1  # the owner's uid, from SO_PEERCRED
    fd: int = -1  # the IRMd's copy of the application's end, to tear the flow down


@dataclasses.dataclass
class Acceptor:
    """An application connection that can take flows: the bound pid, its program."""

    conn_id: int
    pid: int
    prog: str


class Registry:
    def __init__(self) -> None:
        self.names: dict[str, Name] = {}
        self.flows: dict[int, Flow] = {}
        self._flow_ids = itertools.count(1)
        self.started: dict[int, str] = {}  # pid -> the name the IRMd started that program for

    # -- names ---------------------------------------------------------

    def create_name(self, name: str, lb: str = "round-robin") -> Name:
        check_name(name)
        if lb not in LB_POLICIES:
            raise RegistryError("EINVAL", f"unknown lb policy {lb!r}: expected {' or '.join(LB_POLICIES)}")
        entry = self.names.get(name)
        if entry is None:
            entry = self.names[name] = Name(name, lb)
        else:
            entry.lb = lb
        return entry

    def get_name(self, name: str) -> Name:
        try:
            return self.names[name]
        except KeyError:
            raise RegistryError("ENOENT", f"name {name!r} not found") from None

    def destroy_name(self, name: str) -> Name:
        entry = self.get_name(name)
        if entry.layers:
            raise RegistryError(
                "EBUSY", f"name {name!r} is registered in {', '.join(sorted(entry.layers))}; unregister it first"
            )
        return self.names.pop(name)

    def name_for_hash(self, layer: str, algo: str, digest: bytes) -> Name | None:
        for entry in self.names.values():
            if layer in entry.layers and name_hash(algo, entry.name) == digest:
                return entry
        return None

    # -- bindings ------------------------------------------------------

    def bind_program(self, name: str, path: str, args: list[str], auto: bool) -> None:
        self.create_name(name) if name not in self.names else None
        self.names[name].programs[prog_key(path)] = ProgBinding(path, list(args), auto)

    def unbind_program(self, path: str, name: str = "") -> None:
        key = prog_key(path)
        hits = [e for e in self._scope(name) if e.programs.pop(key, None) is not None]
        if not hits:
            raise RegistryError("ENOENT", f"program {path!r} is not bound{f' to {name!r}' if name else ''}")

    def bind_pid(self, name: str, pid: int) -> None:
        if name not in self.names:
            self.create_name(name)
        self.names[name].pids.add(pid)

    def unbind_pid(self, pid: int, name: str = "") -> None:
        hits = [e for e in self._scope(name) if pid in e.pids]
        if not hits:
            raise RegistryError("ENOENT", f"process {pid} is not bound{f' to {name!r}' if name else ''}")
        for e in hits:
            e.pids.discard(pid)

    def forget_pid(self, pid: int) -> None:
        for e in self.names.values():
            e.pids.discard(pid)
        self.started.pop(pid, None)

    def _scope(self, name: str) -> Iterable[Name]:
        return [self.get_name(name)] if name else list(self.names.values())

    def bound(self, entry: Name, acceptor: Acceptor) -> bool:
        """Bound by pid; or by program, unless the IRMd started the process for another name
        (its arguments were that name's: several depots of one program must not mix)."""
        if acceptor.pid in entry.pids:
            return True
        started_for = self.started.get(acceptor.pid)
        return prog_key(acceptor.prog) in entry.programs and started_for in (None, entry.name)

    def pick(self, entry: Name, acceptors: list[Acceptor]) -> Acceptor | None:
        """The acceptor that gets the next flow for `entry`, by its lb policy."""
        ready = [a for a in acceptors if self.bound(entry, a)]
        if not ready:
            return None
        if entry.lb == "spillover":
            return ready[0]
        choice = ready[entry.next_rr % len(ready)]
        entry.next_rr += 1
        return choice

    def auto_program(self, entry: Name) -> ProgBinding | None:
        return next((p for p in entry.programs.values() if p.auto), None)

    # -- flows ---------------------------------------------------------

    def new_flow(self, **kw: object) -> Flow:
        flow = Flow(flow_id=next(self._flow_ids), **kw)  # type: ignore[arg-type]
        self.flows[flow.flow_id] = flow
        return flow

    def flows_of(self, *, owner: int | None = None, ipcp: str | None = None) -> Iterator[Flow]:
        for flow in list(self.flows.values()):
            if (owner is None or flow.owner == owner) and (ipcp is None or flow.ipcp == ipcp):
                yield flow
