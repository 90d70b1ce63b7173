"""The ibp suite: IBP store, load and depot-to-depot copy over local-layer flows, against a raw
reliable (qos.data) flow's one-way throughput measured in the same run.

The load reads into one buffer used by every run (Connection.load_into), as the raw flow's reader
reuses its memory: fresh memory would add its page faults, not IBP's work, to the figure.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from apps.ibp import wire as w
from apps.ibp.client import Connection
from bench import session
from bench.harness import BenchError, Goal, Row, Suite, median_row
from bench.stack import Stack, tool
from flowlib import flow_alloc, qos

log = logging.getLogger(__name__)

NAME = "bench-sink"
DEPOTS = ("bench-depot1", "bench-depot2")
PAYLOAD = 32 * 1024 * 1024
RAW_SIZE = 65_000  # the SDU size IBP's streams use on flows
RAW_SECONDS = 1.0
TIMEOUT = 60.0
RAW = "raw qos.data flow"
DISK = "write + fsync of the same bytes on the depot's disk"


def run(runs: int) -> list[Row]:
    with Stack() as stack:
        stack.irm("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        stack.spawn([sys.executable, "-m", "bench.peer", "flow", NAME], "flow-server", ready=True)
        stack.irm("name", "register", NAME, "layer", "local")
        for d in DEPOTS:
            stack.spawn(
                [
                    tool("ibp"),
                    "depot",
                    "--name",
                    d,
                    "--dir",
                    str(stack.dir / d),
                    "--layer",
                    "local",
                    "--capacity",
                    "8G",
                ],
                d,
            )
        for d in DEPOTS:
            _wait_depot(d)
        data = os.urandom(PAYLOAD)
        buf = bytearray(PAYLOAD)
        stores, loads, copies, raws, disks = [], [], [], [], []
        for i in range(runs):
            raws.append(_raw())
            disks.append(_disk(stack.dir / DEPOTS[0], data))
            s, ld, c = _ibp(data, buf)
            log.info("ibp run %d/%d: store %.0f, load %.0f, copy %.0f, raw %.0f MB/s", i + 1, runs, s, ld, c, raws[-1])
            stores.append(s)
            loads.append(ld)
            copies.append(c)
    goal = Goal(">=", 0.7)
    return [
        median_row(f"ibp.store_{PAYLOAD >> 20}MiB", "MB/s", stores, raws, RAW, goal),
        median_row(f"ibp.load_{PAYLOAD >> 20}MiB", "MB/s", loads, raws, RAW, goal),
        median_row(f"ibp.copy_{PAYLOAD >> 20}MiB", "MB/s", copies, raws, RAW, goal),
        # A store is acknowledged once on disk (fsync): how near it comes to what the disk takes then.
        median_row(f"ibp.store_vs_disk_{PAYLOAD >> 20}MiB", "MB/s", stores, disks, DISK),
    ]


def _wait_depot(name: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with Connection(name, timeout=2) as c:
                c.status()
                return
        except w.IbpError as e:
            if time.monotonic() > deadline:
                raise BenchError(f"depot {name} did not start: {e}") from None
            time.sleep(0.2)


def _disk(where: Path, data: bytes) -> float:
    """MB/s of writing `data` to a new file in `where` and fsyncing it, as a depot's store does."""
    path = where / "bench-disk.tmp"
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return len(data) / elapsed / 1e6


def _raw() -> float:
    with flow_alloc(NAME, qos=qos.data, timeout=TIMEOUT) as flow:
        _, mbs = session.one_way(flow.write, flow.read, RAW_SECONDS, RAW_SIZE)
    time.sleep(0.05)
    return mbs


def _ibp(data: bytes, buf: bytearray) -> tuple[float, float, float]:
    """MB/s of one store, one load (into `buf`) and one depot-to-depot copy of `data`."""
    with Connection(DEPOTS[0], TIMEOUT) as c1, Connection(DEPOTS[1], TIMEOUT) as c2:
        r, wcap, m = c1.allocate(len(data), 600)
        t0 = time.perf_counter()
        c1.store(wcap, [data], len(data))
        t1 = time.perf_counter()
        n = c1.load_into(r, buf)
        t_load = time.perf_counter()  # the check below is the benchmark's, not part of the load
        if n != len(data) or buf != data:
            raise BenchError("IBP load returned other bytes than were stored")
        _, w2, m2 = c2.allocate(len(data), 600)
        t2 = time.perf_counter()
        c1.copy(r, w2, length=len(data))
        t3 = time.perf_counter()
        for conn, cap in ((c1, m), (c2, m2)):
            conn.manage(cap, w.IBP_DECR, w.IBP_READCAP)  # free the space for the next run
    mb = len(data) / 1e6
    return mb / (t1 - t0), mb / (t_load - t1), mb / (t3 - t2)


SUITE = Suite("ibp", "IBP store/load/copy over local flows vs a raw qos.data flow", run)
