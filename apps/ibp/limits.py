"""A depot's limits, declared once (value, default, command-line flag, meaning), and the per-client
connection slots and copy-target rule that enforce the ones about peers.
"""

from __future__ import annotations

import argparse
import fnmatch
import threading
import time
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Every bound a depot puts on its clients; each is a flag of `ibp depot` (see docs/ibp.md)."""

    max_connections: int = 256  # flows and TCP connections at once, all clients together
    client_connections: int = 16  # ... from one client (a uid on this host, an address, a layer)
    idle_timeout: float = 300.0  # a connection silent between requests is closed
    request_timeout: float = 30.0  # a request line, once begun, must end within this
    max_timeout: int = 300  # the longest timeout a client may ask for (longer ones are clamped)
    min_rate: int = 65_536  # bytes/s a STORE or LOAD must at least move, beyond its timeout
    max_allocations: int = 100_000  # live allocations, all clients together
    client_allocations: int = 10_000  # ... made by one client
    client_share: float = 0.5  # the fraction of the capacity one client may hold
    copy_to: tuple[str, ...] = ()  # depots SEND/MCOPY may write to (patterns); () is every flow name
    client_copies: int = 2  # SEND/MCOPY requests of one client in progress at once

    def timeout(self, asked: int) -> float:
        """A client's timeout as the depot applies it: 0 is 2 s (as L-Store, for LoRS), at most max_timeout."""
        return float(min(asked or 2, self.max_timeout))

    def transfer_time(self, asked: int, length: int) -> float:
        """The most a STORE or LOAD of `length` bytes may take: its timeout, plus length at min_rate."""
        return self.timeout(asked) + length / max(1, self.min_rate)


# (field, flag, metavar, help): the command line of `ibp depot` is made from this table.
FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("max_connections", "--max-connections", "N", "connections at once, all clients together"),
    ("client_connections", "--client-connections", "N", "connections at once from one client"),
    ("idle_timeout", "--idle-timeout", "S", "close a connection idle this long between requests"),
    ("request_timeout", "--request-timeout", "S", "a request line, once begun, must arrive within this"),
    ("max_timeout", "--max-timeout", "S", "clamp the timeouts clients ask for to this"),
    ("min_rate", "--min-rate", "B/S", "the slowest STORE or LOAD served beyond its timeout, bytes/s"),
    ("max_allocations", "--max-allocations", "N", "live allocations, all clients together"),
    ("client_allocations", "--client-allocations", "N", "live allocations of one client"),
    ("client_share", "--client-share", "F", "the fraction of the capacity one client may hold (0-1]"),
    ("client_copies", "--client-copies", "N", "SEND/MCOPY requests of one client in progress at once"),
)


def add_flags(p: argparse.ArgumentParser) -> None:
    defaults = Limits()
    for name, flag, metavar, text in FLAGS:
        value = getattr(defaults, name)
        p.add_argument(
            flag, dest=name, type=type(value), default=value, metavar=metavar, help=f"{text} (default {value})"
        )
    p.add_argument(
        "--copy-to",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a depot SEND/MCOPY may copy to: a name or host:port, * and ? as in a shell (repeatable);"
        " default: any registered name, no host:port",
    )


def from_args(args: argparse.Namespace) -> Limits:
    values: dict[str, Any] = {name: getattr(args, name) for name, *_ in FLAGS}
    limits = Limits(**values, copy_to=tuple(args.copy_to))
    for f in fields(limits):
        value = getattr(limits, f.name)
        if isinstance(value, int | float) and value <= 0:
            raise ValueError(f"--{f.name.replace('_', '-')} must be positive")
    if limits.client_share > 1:
        raise ValueError("--client-share is a fraction of the capacity, at most 1")
    return limits


def copy_allowed(dest: str, patterns: tuple[str, ...]) -> bool:
    """May a depot copy to `dest` (a flow name, or host:port over TCP)?

    With no patterns, every registered name: a flow reaches only what registered the name in a
    layer. An address needs a pattern with a port, so no client can aim the depot at any TCP service.
    """
    tcp = ":" in dest
    if not patterns:
        return not tcp
    return any(fnmatch.fnmatchcase(dest, p) for p in patterns if (":" in p) == tcp)


IDLE_GRACE = 0.05  # s: a shared identity's connection idle this long gives way (not one between two requests)


def shared_identity(client: str) -> bool:
    """Whether `client` stands for many users (a layer, a remote address), not one uid of this host."""
    return not client.startswith("uid:")


class Busy(Exception):
    """No slot for this client: why."""


@dataclass(eq=False)
class Ticket:
    """One connection's slot: whose, since when it waits for a request (None: it is in one), and
    whether it gave way to a newer connection of the same shared identity."""

    client: str
    idle_since: float | None = None
    evicted: bool = False


class Slots:
    """Connection slots, at most `total` in all and `per_client` for any one client.

    Identities many users share (a layer, a remote address) cannot tell one user from another, so
    one of them could hold all of its slots for everyone: there a new connection takes the slot of
    the one idle longest (at least IDLE_GRACE), which notices and closes; only connections busy in a
    request keep theirs."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.held: dict[str, list[Ticket]] = {}
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> Ticket:
        """A slot for `client` (Busy if none), idle until it marks itself busy."""
        now = time.monotonic() if now is None else now
        with self._lock:
            mine = self.held.setdefault(client, [])
            why = ""
            if len(mine) >= self.per_client:
                why = f"{self.per_client} connections from this client already"
            elif sum(map(len, self.held.values())) >= self.total:
                why = f"{self.total} connections already"
            if why:
                idle = [t for t in mine if t.idle_since is not None and now - t.idle_since >= IDLE_GRACE]
                if not idle or not shared_identity(client):
                    if not mine:
                        del self.held[client]
                    raise Busy(why)
                oldest = min(idle, key=lambda t: t.idle_since or 0.0)
                oldest.evicted = True
                mine.remove(oldest)
            ticket = Ticket(client, now)
            mine.append(ticket)
            return ticket

    def busy(self, ticket: Ticket) -> bool:
        """Mark `ticket` in a request; False if it gave way meanwhile (its connection is to close)."""
        with self._lock:
            ticket.idle_since = None
            return not ticket.evicted

    def idle(self, ticket: Ticket, now: float | None = None) -> None:
        with self._lock:
            ticket.idle_since = time.monotonic() if now is None else now

    def give(self, ticket: Ticket) -> None:
        with self._lock:
            mine = self.held.get(ticket.client, [])
            if ticket in mine:
                mine.remove(ticket)
            if not mine:
                self.held.pop(ticket.client, None)

    def count(self) -> int:
        with self._lock:
            return sum(map(len, self.held.values()))
