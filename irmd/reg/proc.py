"""Processes as acceptors of flows: the process behind a connection, as the kernel describes it,
and whether it may take a name's flows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from irmd.identity import Peer, runs
from irmd.reg.name import Name

# What a process serves of its own, as the IRMd records it ("" if nothing): a name it is bound to by
# pid or was started for, a bound program of a name it runs, an IPCP's name, the IRMd itself.
Serves = Callable[[int, int], str]


@dataclasses.dataclass(frozen=True)
class Acceptor:
    """An application connection that can take flows: the process as the kernel describes it."""

    conn_id: int
    peer: Peer

    @property
    def pid(self) -> int:
        return self.peer.pid


def may_accept(
    entry: Name, peer: Peer, started: tuple[str, int] | None, irmd_uid: int, serves: Serves = lambda pid, start: ""
) -> bool:
    """May `peer` take flows for `entry`?

    - a process bound by pid: the same process (its start time matches), or one it started (a
      descendant running as its user: `oping -l & irm bind process $!` from a shell function binds
      the subshell) that serves nothing of its own, nor descends from such a server on the way to
      the bound one (`serves`: a process bound to or started for a name, running a bound program,
      an IPCP, the IRMd): a server keeps to its own names, and its children are its;
    - a process the IRMd started for this name (`started`: the name and start time it was started
      with); one it started for another name takes only that name's flows (its arguments were that
      name's);
    - a process whose executable is a bound program, running as the binding's owner, root or the
      IRMd's user.
    """
    proc = entry.procs.get(peer.pid)
    if proc is not None and proc.start == peer.start:
        return True
    if started is not None and started[1] == peer.start:
        return started[0] == entry.name
    if descends_from_binding(entry, peer, serves):
        return True
    return runs_bound_program(entry, peer, irmd_uid)


def runs_bound_program(entry: Name, peer: Peer, irmd_uid: int) -> bool:
    """Does `peer` run a program bound to `entry`, as the binding's owner, root or the IRMd's user?"""
    return any(
        peer.uid in (p.owner, 0, irmd_uid) and p.program is not None and runs(p.program, peer)
        for p in entry.programs.values()
    )


def descends_from_binding(entry: Name, peer: Peer, serves: Serves) -> bool:
    """Did a process bound to `entry` start `peer`, running as its user, with no server of its own
    (`peer` itself or a process between them) in the way? The bound ancestor is looked for first:
    asking what a process serves costs more, and most acceptors descend from no binding."""
    between: list[tuple[int, int]] = []
    for pid, start in peer.ancestors:  # nearest first
        proc = entry.procs.get(pid)
        if proc is not None and proc.start == start:
            if proc.uid == peer.uid:
                break
            continue  # a setuid program's child: the binding is its user's, not this one's
        between.append((pid, start))
    else:
        return False
    return not serves(peer.pid, peer.start) and not any(serves(pid, start) for pid, start in between)
