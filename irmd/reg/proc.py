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
    """May `peer` take flows for `entry`? A process bound by pid (the same process: its start time
    matches); one the IRMd started for this name (`started`: the name and start time it was started
    with); or one whose executable is a bound program and that runs as the binding's owner, root or
    the IRMd's user. A process the IRMd started for another name takes only that name's flows (its
    arguments were that name's)."""
    proc = entry.procs.get(peer.pid)
    if proc is not None and proc.start == peer.start:
        return True
    if started is not None and started[1] == peer.start:
        return started[0] == entry.name
    return any(peer.uid in (p.owner, 0, irmd_uid) and p.program is not None and runs(p.program, peer)
               for p in entry.programs.values())
