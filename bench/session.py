"""The session protocol between a benchmark client and its peer, over any send/recv pair.

The first SDU names the mode (echo or sink); the peer answers "ready", then the client measures.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable

from bench.harness import BenchError

log = logging.getLogger(__name__)

Send = Callable[[bytes], object]
Recv = Callable[[], bytes]  # one SDU; b"" (or an exception) when the stream ended

ECHO = b"echo"
SINK = b"sink"
READY = b"ready"
END = b"end"  # closes a sink session; data SDUs are never this short, nor a repeated SINK
STATS = struct.Struct("!QQQ")  # the sink's answer: SDUs, bytes, ns from the first SDU to END
RECV_BUF = 65535  # what Flow.read asks of its socket (the local MTU); raw peers use the same
WARMUP = 1000  # untimed round trips before an RTT measurement
BATCH = 256  # SDUs sent between two looks at the clock


def serve(recv: Recv, send: Send) -> None:
    """The peer's side of one session."""
    mode = recv()
    if mode not in (ECHO, SINK):
        if mode:
            log.warning("unknown session mode %r", mode[:32])
        return
    send(READY)
    if mode == ECHO:
        while data := recv():
            send(data)
        return
    count = nbytes = start = 0
    while (data := recv()) and data != END:
        if data == SINK:  # on a lossy path our READY was lost: the client asks again
            send(READY)
            continue
        if not count:
            start = time.perf_counter_ns()  # from the first data SDU's arrival
        count += 1
        nbytes += len(data)
    if data:
        stats = STATS.pack(count, nbytes, time.perf_counter_ns() - start)
        send(stats)
        while data := recv():  # on a lossy path the answer may be lost: answer every END again
            if data == END:
                send(stats)


def _open(send: Send, recv: Recv, mode: bytes) -> None:
    send(mode)
    if (got := recv()) != READY:
        raise BenchError(f"peer answered {mode!r} with {got[:32]!r}")


def rtt_us(send: Send, recv: Recv, count: int, size: int) -> float:
    """Mean round-trip time in microseconds of `count` echoes of `size`-byte SDUs."""
    _open(send, recv, ECHO)
    sdu = bytes(size)
    for _ in range(WARMUP):
        send(sdu)
        recv()
    reply = b""
    start = time.perf_counter_ns()
    for _ in range(count):
        send(sdu)
        reply = recv()
    elapsed = time.perf_counter_ns() - start
    if reply != sdu:
        raise BenchError(f"echo peer answered {len(reply)} bytes instead of {size}")
    return elapsed / count / 1e3


def one_way(send: Send, recv: Recv, duration: float, size: int) -> tuple[float, float]:
    """Send `size`-byte SDUs for `duration` seconds; (SDUs/s, MB/s) as the receiver counted them."""
    if size <= len(END):
        raise ValueError(f"SDUs of {size} bytes would look like the end marker")
    _open(send, recv, SINK)
    sdu = bytes(size)
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        for _ in range(BATCH):
            send(sdu)
    send(END)
    answer = recv()
    if len(answer) != STATS.size:
        raise BenchError(f"sink peer answered {answer[:32]!r} instead of its counts")
    count, nbytes, elapsed_ns = STATS.unpack(answer)
    if not count or not elapsed_ns:
        raise BenchError("sink peer received nothing")
    return count / elapsed_ns * 1e9, nbytes / elapsed_ns * 1e3
