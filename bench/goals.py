"""The performance goals, by row name: one table for every suite, so a goal is stated once.

A goal bounds a row's ratio to its baseline, or for a value row (local.alloc_dealloc) the value.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class Goal:
    """A bound on a row's ratio (`<= 1.5`) or, with on="value", on its value (`value >= 3000`)."""

    op: Literal["<=", ">="]
    bound: float
    on: Literal["ratio", "value"] = "ratio"

    def met(self, ratio: float, value: float) -> bool:
        x = ratio if self.on == "ratio" else value
        return x <= self.bound if self.op == "<=" else x >= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}" if self.on == "ratio" else f"value {self.op} {self.bound:g}"


def _throughput(prefix: str, bound: float) -> dict[str, Goal]:
    """The same bound on the SDU/s row and on its MB/s twin (both from the same runs)."""
    return {f"{prefix}.throughput_1400B": Goal(">=", bound), f"{prefix}.throughput_1400B_MB": Goal(">=", bound)}


GOALS: dict[str, Goal] = {
    "local.rtt_64B": Goal("<=", 1.5),
    **_throughput("local", 0.8),
    "local.alloc_dealloc": Goal(">=", 3000, on="value"),  # allocation + deallocation cycles per second
    "udp.rtt_64B": Goal("<=", 2.0),
    **_throughput("udp", 0.5),
    "eth.rtt_64B": Goal("<=", 3.0),
    **_throughput("eth", 0.5),
    "unicast.1hop.rtt_64B": Goal("<=", 2.0),
    **_throughput("unicast.1hop", 0.5),
    **_throughput("unicast.3hop", 0.3),
    "frct.goodput_1400B_loss0": Goal(">=", 0.6),
    "frct.goodput_1400B_loss5": Goal(">=", 0.3),
    "frct.encrypted_raw_1400B": Goal(">=", 0.75),
    "styx.read_64MB": Goal(">=", 0.5),
    "styx.write_64MB": Goal(">=", 0.5),
    "ibp.store_32MiB": Goal(">=", 0.7),
    "ibp.load_32MiB": Goal(">=", 0.7),
    "ibp.copy_32MiB": Goal(">=", 0.7),
    "netplumb.cat_20MB": Goal(">=", 0.4),
}
