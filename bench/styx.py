"""The styx suite: 9P2000 sequential read and write of a file over a local-layer flow.

Against the baseline of reading and writing the same file directly (os.read/os.write in
iounit-sized chunks, page cache warm), run by run, so the ratio is the cost of 9P over a flow.
The client is the library's, with its defaults (msize, requests in flight).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from bench.harness import BenchError, Goal, Row, Suite, median_row
from bench.stack import Stack, tool

log = logging.getLogger(__name__)

NAME = "bench-styx"
FILE_SIZE = 64 * 1024 * 1024
START_TIMEOUT = 10.0
DIRECT = "direct file I/O"


def run(runs: int) -> list[Row]:
    from apps.styx.client import Client, StyxClientError
    from apps.styx.transport import TransportError, dial
    from flowlib import FlowError

    with Stack() as stack:
        stack.irm("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        export = stack.dir / "export"
        export.mkdir()
        src = export / "big.bin"
        src.write_bytes(os.urandom(FILE_SIZE))
        stack.spawn([tool("styx"), "serve", "--name", NAME, "--root", str(export), "--layer", "local"], "styx")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client = Client(dial(NAME))
                break
            except (StyxClientError, FlowError, TransportError) as e:  # the server is still starting
                if time.monotonic() > deadline:
                    raise BenchError(f"styx serve did not answer: {e}") from None
                time.sleep(0.1)
        with client:
            chunk = client.iounit
            reads: list[float] = []
            direct_reads: list[float] = []
            writes: list[float] = []
            direct_writes: list[float] = []
            client.cat("big.bin")  # warm-up
            for i in range(runs):
                t = time.perf_counter()
                data = client.cat("big.bin")
                reads.append(len(data) / (time.perf_counter() - t) / 1e6)
                if len(data) != FILE_SIZE:
                    raise BenchError(f"9P read returned {len(data)} bytes of {FILE_SIZE}")
                direct_reads.append(_direct_read(src, chunk))
                t = time.perf_counter()
                client.put("copy.bin", data)
                writes.append(FILE_SIZE / (time.perf_counter() - t) / 1e6)
                direct_writes.append(_direct_write(export / "direct.bin", data, chunk))
                log.info(
                    "styx run %d/%d: read %.1f MB/s (direct %.0f), write %.1f MB/s (direct %.0f)",
                    i + 1,
                    runs,
                    reads[-1],
                    direct_reads[-1],
                    writes[-1],
                    direct_writes[-1],
                )
    mb = FILE_SIZE // (1024 * 1024)
    goal = Goal(">=", 0.5)
    return [
        median_row(f"styx.read_{mb}MB", "MB/s", reads, direct_reads, DIRECT, goal),
        median_row(f"styx.write_{mb}MB", "MB/s", writes, direct_writes, DIRECT, goal),
    ]


def _direct_read(path: Path, chunk: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while block := os.read(fd, chunk):
            parts.append(block)
        b"".join(parts)
    finally:
        os.close(fd)
    return FILE_SIZE / (time.perf_counter() - t) / 1e6


def _direct_write(path: Path, data: bytes | bytearray, chunk: int) -> float:
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        for i in range(0, len(data), chunk):
            os.write(fd, view[i : i + chunk])
    finally:
        os.close(fd)
    return FILE_SIZE / (time.perf_counter() - t) / 1e6


SUITE = Suite("styx", "9P2000 read/write of a 64 MB file over a local-layer flow vs direct file I/O", run)
