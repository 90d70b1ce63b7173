"""Connection management of a unicast IPCP, sans-IO: the adjacency on each N-1 flow to a
neighbour (its handshake and life), the neighbour table, and the automatic connects.

An adjacency is one component's flow (mgmt or dt) to one neighbour; a neighbour is gone when it
has neither. Automatic connects reach first the member we enrolled through, then members that
LSUs name, the lower address connecting, so two members never cross.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from ipcp.unicast import messages as um
from ipcp.unicast.fsm import Machine
from ipcp.unicast.handshake import Handshake, Peer, Refused

AUTO_NEIGHBOURS = 8  # automatic connects stop at this many neighbours
AUTO_RETRY = 10.0  # seconds before trying a member that could not be reached again
AUTO_CHECK = 0.5  # seconds between two looks for whom to connect next
MAX_NEIGHBOURS = 256  # adjacencies accepted at most (each holds flows and a task)


class AdjState(enum.Enum):
    CONNECTING = enum.auto()
    UP = enum.auto()
    DOWN = enum.auto()
    FAILED = enum.auto()


class AdjEvent(enum.Enum):
    PROVED = enum.auto()
    FAIL = enum.auto()
    CLOSED = enum.auto()


ADJACENCY = {
    (AdjState.CONNECTING, AdjEvent.PROVED): AdjState.UP,
    (AdjState.CONNECTING, AdjEvent.FAIL): AdjState.FAILED,
    (AdjState.CONNECTING, AdjEvent.CLOSED): AdjState.FAILED,
    (AdjState.UP, AdjEvent.CLOSED): AdjState.DOWN,
}


class Adjacency:
    """One N-1 flow to a (would-be) neighbour: the handshake that opens it, then up until closed.

    An acceptor (initiator=False, component "") learns the component from the hello: an
    enrollment is handed on to enroll.Enroller once proved.
    """

    def __init__(self, hs: Handshake) -> None:
        self.machine: Machine[AdjState, AdjEvent] = Machine("adjacency", ADJACENCY, AdjState.CONNECTING)
        self._hs = hs
        if hs.initiator:
            hs.start()

    @property
    def peer(self) -> Peer | None:
        return self._hs.peer

    @property
    def error(self) -> Refused | None:
        return self._hs.error

    @property
    def state(self) -> AdjState:
        return self.machine.state

    @property
    def silent(self) -> bool:
        """An acceptor whose peer has said nothing yet."""
        return self._hs.silent

    @property
    def done(self) -> bool:
        """The handshake is over, one way or the other."""
        return self.machine.state is not AdjState.CONNECTING

    def pop_out(self) -> list[bytes]:
        return self._hs.pop_out()

    def get_timer(self) -> float | None:
        return self._hs.get_timer()

    def handle_timer(self, now: float) -> None:
        self._hs.handle_timer(now)
        if self._hs.error is not None and self.machine.can(AdjEvent.FAIL):
            self.machine.fire(AdjEvent.FAIL)

    def receive(self, sdu: bytes, now: float) -> None:
        if self.machine.state is not AdjState.CONNECTING:
            raise Refused("EPROTO", f"adjacency: a handshake message in state {self.machine.state.name}")
        self._hs.receive(sdu, now)
        if self._hs.error is not None:
            self.machine.fire(AdjEvent.FAIL)
        elif self._hs.peer is not None:
            self.machine.fire(AdjEvent.PROVED)

    def closed(self) -> None:
        if self.machine.state is not AdjState.FAILED:
            self.machine.fire(AdjEvent.CLOSED)


@dataclasses.dataclass(eq=False)
class Neighbour:
    addr: int
    name: str
    links: dict[str, Any] = dataclasses.field(default_factory=dict)  # component -> the driver's flow


class Neighbours:
    """The neighbour table: by address, each with its live adjacencies' flows."""

    def __init__(self) -> None:
        self.by_addr: dict[int, Neighbour] = {}

    def __len__(self) -> int:
        return len(self.by_addr)

    def __iter__(self) -> Any:
        return iter(list(self.by_addr.values()))

    def get(self, addr: int) -> Neighbour | None:
        return self.by_addr.get(addr)

    def add(self, addr: int, name: str, component: str, flow: Any) -> Any:
        """A new adjacency; returns the flow it replaces (to close), if any."""
        nb = self.by_addr.setdefault(addr, Neighbour(addr, name))
        nb.name = name
        old = nb.links.get(component)
        nb.links[component] = flow
        return old

    def remove(self, addr: int, component: str, flow: Any = None) -> Any:
        """The adjacency's flow, removed (only if it is `flow`, when given); None if not there."""
        nb = self.by_addr.get(addr)
        if nb is None or (flow is not None and nb.links.get(component) is not flow):
            return None
        gone = nb.links.pop(component, None)
        if not nb.links:
            del self.by_addr[addr]
        return gone

    def with_link(self, component: str) -> dict[int, Any]:
        """Flows of one component, by neighbour address."""
        return {a: nb.links[component] for a, nb in self.by_addr.items() if component in nb.links}

    def named(self, name: str) -> list[Neighbour]:
        return [nb for nb in self.by_addr.values() if nb.name == name]


class AutoConnect:
    """Whom to connect next on our own (`connect dst auto`), and when to look again."""

    def __init__(self, now: float, most: int = AUTO_NEIGHBOURS, retry: float = AUTO_RETRY) -> None:
        self.enabled = False
        self.busy = False
        self.most = most
        self.retry = retry
        self._next = now
        self._retry_at: dict[str, float] = {}

    def get_timer(self) -> float | None:
        return self._next if self.enabled and not self.busy else None

    def handle_timer(self, now: float, me: int, via: str, neighbours: Neighbours, names: dict[int, str]) -> str | None:
        """The member to connect now (then busy until done()), if any is due."""
        if not self.enabled or self.busy or now < self._next:
            return None
        self._next = now + AUTO_CHECK
        target = self._target(now, me, via, neighbours, names)
        self.busy = target is not None
        return target

    def done(self, name: str, ok: bool, now: float) -> None:
        self.busy = False
        # Only names still held back are kept: the names come from LSUs, and a member renaming itself
        # at every LSU would otherwise leave one entry a failed connect, for good.
        self._retry_at = {n: t for n, t in self._retry_at.items() if t > now}
        if not ok:
            self._retry_at[name] = now + self.retry

    def _target(self, now: float, me: int, via: str, neighbours: Neighbours, names: dict[int, str]) -> str | None:
        def due(name: str) -> bool:
            return self._retry_at.get(name, 0.0) <= now

        if not len(neighbours):  # a bootstrapper waits to be connected to
            return via if via and due(via) else None
        if len(neighbours) >= self.most:
            return None
        linked = {nb.name for nb in neighbours}
        for addr, name in sorted(names.items()):
            if addr > me and neighbours.get(addr) is None and name not in linked and due(name):
                return name
        return None


COMPONENTS = (um.MGMT, um.DT)
