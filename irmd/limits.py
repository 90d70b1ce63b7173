"""The IRMd's limits on what one user or one connection may hold, with their defaults, and how
`irmd --limit KEY=N` and a config file's [limits] table set them.

Per-user and total limits bind local users other than root and the IRMd's own user (who can stop
the IRMd anyway), so that a reserve of descriptors is always left for the admins; per-connection
limits bind every application connection (not the IPCPs').
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

log = logging.getLogger("irmd")

# Descriptors the users' limits leave to the admins (their irm, IPCPs, bound programs) and to the
# IRMd itself (its socket, logs, spawning).
ADMIN_RESERVE = 256


PERCENTS = frozenset({"ipcp_share_per_uid", "ipcp_share_users"})  # limits given in percent


def share(capacity: int, percent: int) -> int:
    """`percent` of `capacity`, rounded down, and at least one."""
    return max(capacity * percent // 100, 1)


class LimitError(ValueError):
    """A limit given with an unknown key or a value out of range."""


@dataclasses.dataclass(frozen=True)
class Limits:
    conns_per_uid: int = 256  # control connections open at once (every flowlib process holds one)
    conns_total: int = 1024  # control connections of all users together
    flows_per_uid: int = 4096  # flows held, allocated or accepted
    flows_total: int = 8192  # flows of all users together (the IRMd holds a descriptor for each)
    # Allocations under way (the name being resolved, the IPCP's answer awaited): each holds a place in
    # a pool its IPCP shares among all users (a shim's name queries, 256; a unicast layer's lookups).
    allocs_per_uid: int = 32
    allocs_total: int = 128  # of all users together: the rest of those pools is the admins'
    # Percent of each IPCP's own flow capacity (a shim's endpoints: eth-llc's 62, udp's 4,096) that one
    # user, and all users together, may hold: one user's flows once took every endpoint of a shim.
    ipcp_share_per_uid: int = 50
    ipcp_share_users: int = 75
    # Flows one remote peer (as its layer names it: a unicast member's address, a shim's source address)
    # holds at once, whoever accepted them (admins' servers too): one peer once took every flow of a udp
    # shim through a server that accepts all. (Not a share of a shim's flows: one host's users together
    # may hold most of a small shim's, eth-llc's 62, at another host.)
    flows_per_peer: int = 1024
    accepts_per_conn: int = 64  # flow_accept calls waiting at once
    # flow_accept calls a user's connections together have waiting (each holds the IRMd's memory), and
    # all users': without them, a user's connections parked accepts_per_conn x conns_per_uid (16,384).
    accepts_per_uid: int = 256
    accepts_total: int = 2048
    requests_per_conn: int = 256  # requests being served at once
    queued_bytes_per_conn: int = 1 << 20  # replies and notices not yet read; above it, no more requests are read

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def with_values(self, values: Mapping[str, object], where: str = "limit") -> Limits:
        """These limits with `values` (key -> number, or text of one) applied."""
        changes: dict[str, int] = {}
        for key, raw in values.items():
            if key not in self.keys():
                raise LimitError(f"{where}: unknown limit {key!r}: expected one of {', '.join(self.keys())}")
            try:
                value = raw if isinstance(raw, int) and not isinstance(raw, bool) else int(str(raw), 0)
            except ValueError:
                raise LimitError(f"{where}: {key} = {raw!r}: expected a whole number") from None
            top = 100 if key in PERCENTS else 1 << 40
            if not 1 <= value <= top:
                raise LimitError(f"{where}: {key} = {value}: expected a number from 1 to {top}")
            changes[key] = value
        return dataclasses.replace(self, **changes)

    def fit_descriptors(self, nofile: int) -> Limits:
        """These limits, the totals lowered so that users together leave ADMIN_RESERVE of the
        IRMd's `nofile` descriptors free: however many users there are, root's irm is served."""
        room = max(nofile - ADMIN_RESERVE, 2)
        if self.conns_total + self.flows_total <= room:
            return self
        conns = max(1, min(self.conns_total, room // 8))
        flows = max(1, min(self.flows_total, room - conns))
        log.warning(
            "%d descriptors (RLIMIT_NOFILE) leave room for %d of users' connections and flows: "
            "conns_total=%d flows_total=%d (raise the limit to serve more)",
            nofile,
            room,
            conns,
            flows,
        )
        return dataclasses.replace(self, conns_total=conns, flows_total=flows)


def option_values(words: list[str]) -> dict[str, str]:
    """`--limit KEY=N` options (each one KEY=N) as key -> value, checked."""
    values: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            raise LimitError(f"--limit {word!r}: expected KEY=N, KEY one of {', '.join(Limits.keys())}")
        values[key.strip()] = value.strip()
    Limits().with_values(values, "--limit")
    return values


def parse_options(words: list[str], base: Limits | None = None) -> Limits:
    return (base or Limits()).with_values(option_values(words), "--limit")
