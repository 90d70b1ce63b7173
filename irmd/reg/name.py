"""Names as the IRMd records them: their load-balancing policy, the programs and processes
bound to them and the layers they are registered in; and which acceptor gets the next flow.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

from irmd.identity import Program
from proto.names import name_hash

LB_ROUND_ROBIN, LB_SPILLOVER = "round-robin", "spillover"
LB_IMPLICIT = LB_SPILLOVER  # the policy of a name made by a bind, a registration or a config's reg, as in Ouroboros


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
    lb: str = LB_ROUND_ROBIN
    seq: int = 0  # creation order: lists page by it
    programs: dict[str, ProgBinding] = dataclasses.field(default_factory=dict)  # real path -> binding
    procs: dict[int, ProcBinding] = dataclasses.field(default_factory=dict)  # pid -> binding
    regs: set[str] = dataclasses.field(default_factory=set)  # the IPCPs it is registered with
    # ipcp -> the bound process (pid, start time) that registered the name there (a server's --layer):
    # the registration is that process's, and goes with it
    reg_owner: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    next_rr: int = 0
    sec: dict[str, str] = dataclasses.field(default_factory=dict)  # security files set at creation (irmd.secfiles)
    # its hash by each layer algorithm asked: an allocation looks names up by hash, twice on one host
    hashes: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def hash_by(self, algo: str) -> bytes:
        """The name's hash by a layer's algorithm (proto.names.name_hash), made once: a name never changes."""
        if (digest := self.hashes.get(algo)) is None:
            digest = self.hashes[algo] = name_hash(algo, self.name)
        return digest

    @property
    def pids(self) -> set[int]:
        return set(self.procs)

    def auto_program(self) -> ProgBinding | None:
        return next((p for p in self.programs.values() if p.auto), None)


def prog_key(path: str) -> str:
    """Program bindings are keyed by the file's real path: two names for one file are one program."""
    return os.path.realpath(path)


T = TypeVar("T")


def lb_pick(entry: Name, ready: list[T]) -> T | None:
    """Which of the processes ready to accept (in the order they came) gets the next flow for
    `entry`: always the first (spillover), or each in turn (round-robin)."""
    if not ready:
        return None
    if entry.lb == LB_SPILLOVER:
        return ready[0]
    choice = ready[entry.next_rr % len(ready)]
    entry.next_rr += 1
    return choice
