"""A depot's limits, declared once (value, default, command-line flag, meaning), and the per-client
connection slots and copy-target rule that enforce the ones about peers.
"""

from __future__ import annotations

import argparse
import fnmatch
import threading
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Every bound a depot puts on its clients; each is a flag of `ibp depot` (see docs/ibp.md)."""

    max_connections: int = 256        # flows and TCP connections at once, all clients together
    client_connections: int = 16      # ... from one client (a uid on this host, an address, a layer)
    idle_timeout: float = 300.0       # a connection silent between requests is closed
    request_timeout: float = 30.0     # a request line, once begun, must end within this
    max_timeout: int = 300            # the longest timeout a client may ask for (longer ones are clamped)
    min_rate: int = 65_536            # bytes/s a STORE or LOAD must at least move, beyond its timeout
    max_allocations: int = 100_000    # live allocations, all clients together
    client_allocations: int = 10_000  # ... made by one client
    client_share: float = 0.5         # the fraction of the capacity one client may hold
    copy_to: tuple[str, ...] = ()     # depots SEND/MCOPY may write to (patterns); () is every flow name

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
)


def add_flags(p: argparse.ArgumentParser) -> None:
    defaults = Limits()
    for name, flag, metavar, text in FLAGS:
        value = getattr(defaults, name)
        p.add_argument(flag, dest=name, type=type(value), default=value, metavar=metavar,
                       help=f"{text} (default {value})")
    p.add_argument("--copy-to", action="append", default=[], metavar="PATTERN",
                   help="a depot SEND/MCOPY may copy to: a name or host:port, * and ? as in a shell (repeatable);"
                        " default: any registered name, no host:port")


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


class Slots:
    """Connection slots, at most `total` in all and `per_client` for any one client."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, client: str) -> str:
        """"" if `client` got a slot, else why not."""
        with self._lock:
            if self.held[client] >= self.per_client:
                return f"{self.per_client} connections from this client already"
            if self.held.total() >= self.total:
                return f"{self.total} connections already"
            self.held[client] += 1
            return ""

    def give(self, client: str) -> None:
        with self._lock:
            self.held[client] -= 1
            if self.held[client] <= 0:
                del self.held[client]

    def count(self) -> int:
        with self._lock:
            return self.held.total()
