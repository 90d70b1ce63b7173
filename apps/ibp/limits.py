"""A depot's limits, declared once (value, default, command-line flag, meaning), and what enforces
the ones about peers: the pace of transfers, per-client connection slots, the copy-target rule.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from apps.ibp.client import tcp_address
from apps.ibp.peer import unmapped


@dataclass(frozen=True)
class Limits:
    """Every bound a depot puts on its clients; each is a flag of `ibp depot` (see docs/ibp.md)."""

    max_connections: int = 256  # flows and TCP connections at once, all clients together
    client_connections: int = 16  # ... from one client (a uid on this host, an address, a layer)
    idle_timeout: float = 300.0  # a connection silent between requests is closed
    request_timeout: float = 30.0  # a request line, once begun, must end within this
    max_timeout: int = 300  # the longest timeout a client may ask for (longer ones are clamped)
    min_rate: int = 65_536  # bytes/s a STORE or LOAD must at least move on average, after its timeout
    max_allocations: int = 100_000  # live allocations, all clients together
    client_allocations: int = 10_000  # ... made by one client
    client_share: float = 0.5  # the fraction of the capacity one client may hold
    copy_to: tuple[str, ...] = ()  # depots SEND/MCOPY/PUSH/PULL may reach (patterns); () is every flow name
    client_copies: int = 2  # SEND/MCOPY/PUSH/PULL requests of one client in progress at once

    def timeout(self, asked: int) -> float:
        """A client's timeout as the depot applies it: 0 is 2 s (as L-Store, for LoRS), at most max_timeout."""
        return float(min(asked or 2, self.max_timeout))

    def pace(self, asked: int) -> Pace:
        """The slowest a STORE or LOAD with timeout field `asked` may go, from now."""
        return Pace(time.monotonic(), self.timeout(asked), max(1, self.min_rate))


@dataclass(frozen=True)
class Pace:
    """A transfer's minimum rate: after `grace` seconds from `start` (monotonic), at least `rate` bytes
    a second on average, so a peer dribbling a byte now and then cannot hold a connection for the
    whole of a large LENGTH. Checked as bytes arrive and by the timer of every wait for them."""

    start: float
    grace: float
    rate: int

    def deadline(self, moved: int) -> float:
        """By when more than `moved` bytes must have moved."""
        return self.start + self.grace + moved / self.rate


# (field, flag, metavar, help): the command line of `ibp depot` is made from this table.
FLAGS: tuple[tuple[str, str, str, str], ...] = (
    ("max_connections", "--max-connections", "N", "connections at once, all clients together"),
    ("client_connections", "--client-connections", "N", "connections at once from one client"),
    ("idle_timeout", "--idle-timeout", "S", "close a connection idle this long between requests"),
    ("request_timeout", "--request-timeout", "S", "a request line, once begun, must arrive within this"),
    ("max_timeout", "--max-timeout", "S", "clamp the timeouts clients ask for to this"),
    ("min_rate", "--min-rate", "B/S", "the slowest STORE or LOAD served, bytes/s on average after its timeout"),
    ("max_allocations", "--max-allocations", "N", "live allocations, all clients together"),
    ("client_allocations", "--client-allocations", "N", "live allocations of one client"),
    ("client_share", "--client-share", "F", "the fraction of the capacity one client may hold (0-1]"),
    ("client_copies", "--client-copies", "N", "SEND/MCOPY/PUSH/PULL requests of one client in progress at once"),
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
        help="a depot SEND/MCOPY/PUSH/PULL may reach: a name or host:port, * and ? as in a shell, matched against"
        " the addresses a host resolves to (repeatable); default: any registered name, no host:port",
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


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` stands for, looked up once (an address stands for itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def copy_target(dest: str, patterns: tuple[str, ...], resolver: Resolver | None = None) -> str | None:
    """Where a copy to `dest` (a flow name, or host:port over TCP) connects, or None if not allowed.

    With no patterns, every registered name: a flow reaches only what registered the name in a
    layer. A host:port needs a pattern with a port (`[ADDR]:PORT` for IPv6), so no client can aim
    the depot at any TCP service. As OpenSSH's PermitOpen: a pattern's host with `*`, `?` or `[`
    matches addresses only, never names; one without them is an address or a name matched exactly.
    The host is resolved once, here; the answer is the first address a pattern allows (or the
    address an allowed name resolved to), as `ADDR:PORT`: the copy connects there and resolves
    nothing again, so a name cannot pass as an address (`10.1.2.*` against `10.1.2.evil.example`)
    nor change its answer between the check and the connection.
    """
    addr = tcp_address(dest)
    if addr is None:
        return dest if ":" not in dest and (not patterns or _any_name(dest, patterns)) else None
    host, port = addr
    tcp_rules = (_rule(p) for p in patterns if ":" in p)
    rules = [(h, wild) for h, ports, wild in tcp_rules if fnmatch.fnmatchcase(str(port), ports)]
    if not rules:
        return None
    try:
        found = [unmapped(a) for a in (resolver or resolve)(host, port)]
    except (OSError, UnicodeError, ValueError):
        return None
    for address in found:
        shown = str(address)
        for rule, wild in rules:
            if fnmatch.fnmatchcase(shown, rule) if wild else rule in (shown, host.lower()):
                return f"[{shown}]:{port}" if address.version == 6 else f"{shown}:{port}"
    return None


def _any_name(dest: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(dest, p) for p in patterns if ":" not in p)


def _rule(pattern: str) -> tuple[str, str, bool]:
    """(host, port pattern, whether the host is a pattern) of `HOST:PORT`; a literal address in the
    form the resolver writes it, a name in lower case."""
    host, _, port = pattern.rpartition(":")
    host = host.strip("[]")
    wild = any(c in host for c in "*?[")
    if not wild:
        with contextlib.suppress(ValueError):
            return str(unmapped(host)), port, False
    return host.lower(), port, wild


IDLE_GRACE = 0.05  # s: a shared identity's connection idle this long gives way (not one between two requests)


def shared_identity(client: str) -> bool:
    """Whether `client` stands for many users (a layer, a remote address), not one uid of this host."""
    return not client.startswith("uid:")


class Busy(Exception):
    """No slot for this client: why."""


@dataclass(eq=False)
class Ticket:
    """One connection's slot: whose, since when it waits for a request (None: it is in one), whether
    it gave way to a newer connection of the same shared identity, and how to end its wait then."""

    client: str
    idle_since: float | None = None
    evicted: bool = False
    wake: Callable[[], None] | None = None


class Slots:
    """Connection slots, at most `total` in all and `per_client` for any one client.

    Identities many users share (a layer, a remote address) cannot tell one user from another, so
    one of them could hold all of its slots for everyone: there a new connection takes the slot of
    the one idle longest (at least IDLE_GRACE), which is woken and closes; only connections busy in
    a request (from their first byte) keep theirs. A ticket counts towards `total` until given back,
    when its connection's thread ends, so `total` bounds the depot's threads and sockets: a slot is
    taken over only while there is room for both connections."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.held: dict[str, list[Ticket]] = {}  # every ticket not given back, those giving way too
        self._count = 0
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> Ticket:
        """A slot for `client` (Busy if none), idle until it marks itself busy."""
        now = time.monotonic() if now is None else now
        victim = None
        with self._lock:
            mine = self.held.setdefault(client, [])
            live = [t for t in mine if not t.evicted]
            why = ""
            if len(live) >= self.per_client:
                why = f"{self.per_client} connections from this client already"
            elif self._count >= self.total:
                why = f"{self.total} connections already"
            if why:
                idle = [t for t in live if t.idle_since is not None and now - t.idle_since >= IDLE_GRACE]
                if not idle or not shared_identity(client) or self._count >= self.total:
                    if not mine:
                        del self.held[client]
                    raise Busy(why)
                victim = min(idle, key=lambda t: t.idle_since or 0.0)
                victim.evicted = True
            ticket = Ticket(client, now)
            mine.append(ticket)
            self._count += 1
        if victim is not None and victim.wake is not None:
            victim.wake()
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
                self._count -= 1
            if not mine:
                self.held.pop(ticket.client, None)

    def count(self) -> int:
        with self._lock:
            return self._count
