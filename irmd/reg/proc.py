"""Processes as acceptors of flows: the process behind a connection, as the kernel describes it,
and whether it may take a name's flows.
"""

from __future__ import annotations

import dataclasses

from irmd.identity import Peer, runs
from irmd.reg.name import Name


@dataclasses.dataclass(frozen=True)
class Acceptor:
    """An application connection that can take flows: the process as the kernel describes it."""

    conn_id: int
    peer: Peer

    @property
    def pid(self) -> int:
        return self.peer.pid


def may_accept(entry: Name, peer: Peer, started: tuple[str, int] | None, irmd_uid: int) -> bool:
    """May `peer` take flows for `entry`?

    - a process bound by pid: the same process (its start time matches), or one it started (a
      descendant running as its user: `oping -l & irm bind process $!` from a shell function binds
      the subshell);
    - a process the IRMd started for this name (`started`: the name and start time it was started
      with); one it started for another name takes only that name's flows (its arguments were that
      name's);
    - a process whose executable is a bound program, running as the binding's owner, root or the
      IRMd's user.
    """
    proc = entry.procs.get(peer.pid)
    if proc is not None and proc.start == peer.start:
        return True
    for pid, start in peer.ancestors:  # a process the bound one started, running as it does
        proc = entry.procs.get(pid)
        if proc is not None and proc.start == start and proc.uid == peer.uid:
            return True
    if started is not None and started[1] == peer.start:
        return started[0] == entry.name
    return any(peer.uid in (p.owner, 0, irmd_uid) and p.program is not None and runs(p.program, peer)
               for p in entry.programs.values())
