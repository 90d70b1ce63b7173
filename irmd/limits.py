"""The IRMd's limits on what one user or one connection may hold, with their defaults, and how
`irmd --limit KEY=N` and a config file's [limits] table set them.

Per-user limits bind local users other than root and the IRMd's own user (who can stop the IRMd
anyway); per-connection limits bind every application connection (not the IPCPs').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


class LimitError(ValueError):
    """A limit given with an unknown key or a value out of range."""


@dataclasses.dataclass(frozen=True)
class Limits:
    conns_per_uid: int = 256  # control connections open at once (every flowlib process holds one)
    flows_per_uid: int = 4096  # flows held, allocated or accepted
    accepts_per_conn: int = 64  # flow_accept calls waiting at once
    requests_per_conn: int = 256  # requests being served at once
    queued_bytes_per_conn: int = 4 << 20  # replies and notices not yet read; above it, no more requests are read

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
            if not 1 <= value <= 1 << 40:
                raise LimitError(f"{where}: {key} = {value}: expected a number from 1 to {1 << 40}")
            changes[key] = value
        return dataclasses.replace(self, **changes)


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
