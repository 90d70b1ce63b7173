"""What every suite shares: result rows with goals, medians of runs, the table and the JSON file.

A suite is a function from a run count to rows; `Suite` names it for the registry in __main__.
A row's goal comes from bench.goals.GOALS when the table names the row, else from the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

from bench.goals import GOALS, Goal

__all__ = [  # Goal too: suites take it from here
    "RESULTS",
    "BenchError",
    "Goal",
    "Resource",
    "Row",
    "Suite",
    "SuiteFailed",
    "median_row",
    "ops_per_second",
    "pinned",
    "table",
    "write_json",
]

log = logging.getLogger(__name__)

RESULTS = Path(__file__).with_name("results.json")


class BenchError(Exception):
    """A benchmark could not run: a process failed to start, or a peer answered wrongly."""


class SuiteFailed(BenchError):
    """Some figures of a suite could not be measured: `rows` holds those of the others."""

    def __init__(self, why: str, rows: list[Row]) -> None:
        super().__init__(why)
        self.rows = rows


class Resource:
    """A context manager that sets itself up with `open()` and tears itself down with `close()`,
    which must be idempotent: it runs also when `open()` fails half-way."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class Row:
    """One figure: median value, the baseline's median in the same unit, and the median ratio.

    Each run measures both back to back, so the ratio is the median of the runs' own ratios.
    """

    name: str
    value: float
    unit: str
    baseline: float
    ratio: float
    baseline_name: str
    runs: int
    goal: Goal | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name, "value": self.value, "unit": self.unit,
            "baseline": self.baseline, "ratio": round(self.ratio, 4),
            "baseline_name": self.baseline_name, "runs": self.runs,
        }  # fmt: skip
        if self.goal is not None:
            out["goal"] = str(self.goal)
            out["met"] = self.met
        return out

    @property
    def met(self) -> bool | None:
        """Whether the row meets its goal; None without one."""
        return None if self.goal is None else self.goal.met(self.ratio, self.value)


def median_row(
    name: str,
    unit: str,
    values: Sequence[float],
    baselines: Sequence[float],
    baseline_name: str,
    goal: Goal | None = None,
) -> Row:
    """A row from the per-run values of the thing measured and of its baseline, run by run."""
    goal = GOALS.get(name, goal)
    ratios = [v / b for v, b in zip(values, baselines, strict=True)]
    return Row(
        name,
        statistics.median(values),
        unit,
        statistics.median(baselines),
        statistics.median(ratios),
        baseline_name,
        len(ratios),
        goal,
    )


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named group of benchmarks: `run(runs)` measures each figure `runs` times, within `time_limit` s."""

    name: str
    about: str
    run: Callable[[int], list[Row]]
    time_limit: int = 150  # seconds it may run (a hung peer must not hang `make bench`)
    default: bool = True  # run by `python -m bench` without names (else only when named)


def ops_per_second(op: Callable[[], object], duration: float) -> float:
    """Call `op` back to back for about `duration` seconds; how many calls per second."""
    count = 0
    start = time.perf_counter()
    deadline = start + duration
    while (now := time.perf_counter()) < deadline:
        op()
        count += 1
    return count / (now - start)


@contextlib.contextmanager
def pinned(peers: Sequence[int]) -> Iterator[None]:
    """Pin this process to one CPU and the `peers` (pids) to another, for a steady placement.

    With fewer than two CPUs to choose from, placement is left to the scheduler.
    """
    mine = os.sched_getaffinity(0)
    cpus = sorted(mine)
    if len(cpus) < 2:
        log.info("one CPU available: not pinning")
        yield
        return
    os.sched_setaffinity(0, {cpus[0]})
    for pid in peers:
        os.sched_setaffinity(pid, {cpus[1]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)


def _fmt(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _verdict(row: Row) -> str:
    if row.goal is None:
        return "-"
    return f"{row.goal} {'ok' if row.met else 'MISSED'}"


def table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table."""
    head = ("name", "value", "unit", "baseline", "ratio", "goal", "baseline is")
    cells = [
        (
            r.name,
            _fmt(r.value),
            r.unit,
            _fmt(r.baseline),
            f"{r.ratio:.2f}",
            _verdict(r),
            r.baseline_name,
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    numeric = {1, 3, 4}

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def write_json(rows: Sequence[Row], path: Path) -> None:
    path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
