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

from irmd.identity import Peer, Program, runs
from proto.errors import Busy, InvalidArgument, NotFound
from proto.names import LB_POLICIES, check_name, name_hash
from proto.qos import QosSpec


@dataclasses.dataclass
class ProgBinding:
    """`irm bind program`: processes running `program` (as its owner, root or the IRMd's user) accept."""

    path: str
    args: list[str]
    auto: bool
    owner: int = 0  # the uid that bound it; auto-started instances run as this uid
    program: Program | None = None  # what the kernel runs for path, read when it was bound

    def __post_init__(self) -> None:
        if self.program is None:
            self.program = Program(self.path, os.path.realpath(self.path))


@dataclasses.dataclass(frozen=True)
class ProcBinding:
    """`irm bind process`: this one process (its pid and start time: pids are reused)."""

    pid: int
    start: int
    uid: int


@dataclasses.dataclass
class Name:
    name: str
    lb: str = "round-robin"
    owner: int = 0  # the uid that created it (by create, bind or register)
    seq: int = 0  # creation order: lists page by it
    programs: dict[str, ProgBinding] = dataclasses.field(default_factory=dict)  # real path -> binding
    procs: dict[int, ProcBinding] = dataclasses.field(default_factory=dict)  # pid -> binding
    layers: set[str] = dataclasses.field(default_factory=set)
    next_rr: int = 0

    @property
    def pids(self) -> set[int]:
        return set(self.procs)


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


@dataclasses.dataclass(frozen=True)
class Acceptor:
    """An application connection that can take flows: the process as the kernel describes it."""

    conn_id: int
    peer: Peer

    @property
    def pid(self) -> int:
        return self.peer.pid


def prog_key(path: str) -> str:
    """Program bindings are keyed by the file's real path: two names for one file are one program."""
    return os.path.realpath(path)


class Registry:
    def __init__(self, irmd_uid: int | None = None) -> None:
        self.irmd_uid = os.geteuid() if irmd_uid is None else irmd_uid
        self.names: dict[str, Name] = {}
        self.flows: dict[int, Flow] = {}
        self._flow_ids = itertools.count(1)
        self._name_seq = itertools.count(1)
        self.started: dict[int, tuple[str, int]] = {}  # pid -> (name it was started for, its start time)

    # -- names ---------------------------------------------------------

    def create_name(self, name: str, lb: str = "round-robin", owner: int | None = None) -> Name:
        check_name(name)
        if lb not in LB_POLICIES:
            raise InvalidArgument(f"unknown lb policy {lb!r}: expected {' or '.join(LB_POLICIES)}")
        entry = self.names.get(name)
        if entry is None:
            owner = self.irmd_uid if owner is None else owner
            entry = self.names[name] = Name(name, lb, owner, next(self._name_seq))
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
        if entry.layers:
            raise Busy(f"name {name!r} is registered in {', '.join(sorted(entry.layers))}; unregister it first")
        return self.names.pop(name)

    def names_of(self, uid: int) -> int:
        return sum(1 for e in self.names.values() if e.owner == uid)

    def name_for_hash(self, layer: str, algo: str, digest: bytes) -> Name | None:
        for entry in self.names.values():
            if layer in entry.layers and name_hash(algo, entry.name) == digest:
                return entry
        return None

    # -- bindings ------------------------------------------------------

    def _name(self, name: str, owner: int | None) -> Name:
        return self.names[name] if name in self.names else self.create_name(name, owner=owner)

    def bind_program(self, name: str, path: str, args: list[str], auto: bool, owner: int | None = None,
                     program: Program | None = None) -> None:
        owner = self.irmd_uid if owner is None else owner
        self._name(name, owner).programs[prog_key(path)] = ProgBinding(path, list(args), auto, owner, program)

    def unbind_program(self, path: str, name: str = "") -> None:
        key = prog_key(path)
        hits = [e for e in self._scope(name) if e.programs.pop(key, None) is not None]
        if not hits:
            raise NotFound(f"program {path!r} is not bound{f' to {name!r}' if name else ''}")

    def bind_proc(self, name: str, proc: ProcBinding, owner: int | None = None) -> None:
        self._name(name, owner).procs[proc.pid] = proc

    def unbind_pid(self, pid: int, name: str = "", scope: Iterable[Name] | None = None) -> None:
        hits = [e for e in (self._scope(name) if scope is None else scope) if pid in e.procs]
        if not hits:
            raise NotFound(f"process {pid} is not bound{f' to {name!r}' if name else ''}")
        for e in hits:
            del e.procs[pid]

    def forget_pid(self, pid: int) -> None:
        for e in self.names.values():
            e.procs.pop(pid, None)
        self.started.pop(pid, None)

    def _scope(self, name: str) -> Iterable[Name]:
        return [self.get_name(name)] if name else list(self.names.values())

    def bound(self, entry: Name, acceptor: Acceptor) -> bool:
        """May `acceptor` take flows for `entry`? A process bound by pid (the same process: its start
        time matches); one the IRMd started for this name; or one whose executable is a bound program
        and that runs as the binding's owner, root or the IRMd's user. A process the IRMd started for
        another name takes only that name's flows (its arguments were that name's)."""
        peer = acceptor.peer
        proc = entry.procs.get(peer.pid)
        if proc is not None and proc.start == peer.start:
            return True
        started = self.started.get(peer.pid)
        if started is not None and started[1] == peer.start:
            return started[0] == entry.name
        return any(peer.uid in (p.owner, 0, self.irmd_uid) and p.program is not None and runs(p.program, peer)
                   for p in entry.programs.values())

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

    def flows_of_uid(self, uid: int) -> int:
        return sum(1 for f in self.flows.values() if f.uid == uid)
