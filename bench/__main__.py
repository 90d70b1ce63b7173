"""`python -m bench [SUITE...]`: run the registered suites (all but the opt-in ones by default), print and save rows.

Each suite starts and stops its own processes; a failing suite is logged and the others still run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench import c, eth, frct, ibp, local, netplumb, styx, udp, unicast, unicast_scale
from bench.harness import RESULTS, Row, Suite, SuiteFailed, table, write_json

log = logging.getLogger("bench")

SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        local.SUITE,
        udp.SUITE,
        eth.SUITE,
        unicast.SUITE,
        unicast_scale.FLOWS_SUITE,
        unicast_scale.CONVERGE_SUITE,
        unicast_scale.SIM_SUITE,
        frct.SUITE,
        styx.SUITE,
        ibp.SUITE,
        netplumb.SUITE,
        c.SUITE,
    )
}


class SuiteTimeout(Exception):
    """A suite ran past its time limit (Suite.time_limit)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise SuiteTimeout("suite ran past its time limit")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=f"suites to run: {', '.join(SUITES)} (default all but "
        f"{', '.join(n for n, s in SUITES.items() if not s.default) or 'none'})",
    )
    p.add_argument("--runs", type=int, default=7, help="runs per figure; rows hold medians (default 7)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS})")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = p.parse_args(argv)
    if args.list:
        for s in SUITES.values():
            print(f"{s.name:12} {s.about}")
        return 0
    unknown = [n for n in args.suites if n not in SUITES]
    if unknown:
        p.error(f"unknown suite {', '.join(unknown)}: expected some of {', '.join(SUITES)}")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # SIGTERM and Ctrl-C both unwind through every Stack's cleanup.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        rows, failed = _run(args.suites or [n for n, s in SUITES.items() if s.default], args.runs)
    except KeyboardInterrupt:
        log.error("interrupted; every process the suite started is stopped")
        return 130
    if rows:
        print(table(rows))
    write_json(rows, args.out)  # even empty: never leave an older run's rows behind
    log.info("wrote %d rows to %s", len(rows), args.out)
    if failed:
        log.error("failed suites: %s", ", ".join(failed))
    return 1 if failed or not rows else 0


def _why(e: BaseException) -> str:
    """An error in a few words, for the last line of the run (all a caller that keeps only its tail sees)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _run(names: list[str], runs: int) -> tuple[list[Row], list[str]]:
    """Run each suite under the time limit; the rows, and the names of the suites that failed."""
    rows: list[Row] = []
    failed: list[str] = []
    for name in names:
        start = time.monotonic()
        log.info("suite %s: %s", name, SUITES[name].about)
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
        if load > cpus / 2:
            log.warning("load average %.1f on %d CPUs: other work competes, figures will be noisy", load, cpus)
        signal.alarm(SUITES[name].time_limit)
        try:
            rows += SUITES[name].run(runs)
        except SuiteFailed as e:
            log.error("suite %s failed in part: %s", name, e)
            rows += e.rows
            failed.append(f"{name} ({_why(e)})")
        except Exception as e:
            log.exception("suite %s failed", name)
            failed.append(f"{name} ({_why(e)})")
        finally:
            signal.alarm(0)
        log.info("suite %s took %.1f s", name, time.monotonic() - start)
    return rows, failed


if __name__ == "__main__":
    sys.exit(main())
