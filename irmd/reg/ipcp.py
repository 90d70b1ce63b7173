"""IPCPs as the IRMd records them (process, control channel, layer), and which layer a flow tries
first when several reach its destination: the most local.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from transports.channel import AsyncChannel

if TYPE_CHECKING:
    from irmd.spawn import Child

# Preference when a name is reachable through several layers: the most local first (Ouroboros's
# order of IPCP types); IPCPs of one type in the order they were made.
PREFERENCE = ("local", "unicast", "broadcast", "eth-llc", "eth-dix", "udp4", "udp6")
TYPE_RANK = {t: i for i, t in enumerate(PREFERENCE)}


@dataclasses.dataclass(eq=False)
class Ipcp:
    name: str
    type: str
    proc: Child
    announced: asyncio.Future[AsyncChannel]
    channel: AsyncChannel | None = None
    layer: str = ""
    hash: str = "SHA3_256"
    mtu: int = 0
    flows: int = 0  # the most flows it holds at once, as it said (LayerInfo); 0: no bound of its own
    joined: dict[str, Any] = dataclasses.field(default_factory=dict)  # how: bootstrap (conf) or enrol (dst)
    conns: list[str] = dataclasses.field(default_factory=list)  # connected to, as asked
    seq: int = 0  # creation order: lists page by it
    start: int = 0  # its process's start time (/proc/PID/stat): it, not a later one with its pid

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def operational(self) -> bool:
        return bool(self.layer) and self.channel is not None and not self.channel.closed

    @property
    def rank(self) -> int:
        return TYPE_RANK.get(self.type, len(TYPE_RANK))

    @property
    def order(self) -> int:
        """Its place in lists: by type as Ouroboros orders them, then as made (a key for pages)."""
        return self.rank << 32 | self.seq


def by_preference(ipcps: Iterable[Ipcp]) -> list[Ipcp]:
    """The IPCPs in the order a flow tries them (and lists show them): the most local type first,
    then as they came."""
    return sorted(ipcps, key=lambda i: (i.rank, i.seq))


def settled(hits: Iterable[Ipcp], pending: Iterable[Ipcp]) -> bool:
    """Need we wait for the IPCPs still `pending` to answer a query? Not once one that answered
    yes ranks before every one of them: none of them would be tried first."""
    best = min((i.rank for i in hits), default=None)
    return best is not None and all(i.rank > best for i in pending)
