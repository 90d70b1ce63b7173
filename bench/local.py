"""The local suite: flows of the local layer against a raw AF_UNIX SOCK_SEQPACKET socketpair.

RTT of 64-byte SDUs, one-way throughput of 1,400-byte SDUs, and flow allocations per second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from bench import peer, session
from bench.harness import Row, Suite, median_row, ops_per_second, pinned
from bench.stack import Stack
from flowlib import flow_alloc

log = logging.getLogger(__name__)

NAME = "bench-echo"
RTT_COUNT = 20_000
RTT_SIZE = 64
TPUT_SIZE = 1400
TPUT_SECONDS = 0.5
ALLOC_SECONDS = 0.4
ALLOC_TIMEOUT = 10.0
SETTLE = 0.05  # seconds after each session, for the IRMd and peers to finish its teardown
RAW = "raw socketpair"
BROKER = "raw broker (SCM_RIGHTS)"

T = TypeVar("T")


def run(runs: int) -> list[Row]:
    with Stack() as stack:
        stack.irm("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        server = stack.spawn([sys.executable, "-m", "bench.peer", "flow", NAME], "flow-server", ready=True)
        stack.irm("name", "register", NAME, "layer", "local")
        with _RawPeers(stack) as raw, pinned([server.pid, *raw.pids]):
            return [*_rtt(raw, runs), *_throughput(raw, runs), _alloc(raw, runs)]


class _RawPeers:
    """The raw server (a fresh socketpair per session) and the allocation broker, as processes."""

    def __init__(self, stack: Stack) -> None:
        self.ctrl, ctrl_peer = _pair()
        self.broker, broker_peer = _pair()
        to_listener, listener_end = _pair()
        with ctrl_peer, broker_peer, to_listener, listener_end:
            procs = [
                stack.spawn(_peer_cmd("raw", ctrl_peer), "raw-server", [ctrl_peer.fileno()]),
                stack.spawn(_peer_cmd("listener", listener_end), "listener", [listener_end.fileno()]),
                stack.spawn(
                    _peer_cmd("broker", broker_peer, to_listener),
                    "broker",
                    [broker_peer.fileno(), to_listener.fileno()],
                ),
            ]
        self.pids = [p.pid for p in procs]

    def __enter__(self) -> _RawPeers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ctrl.close()
        self.broker.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[socket.socket]:
        ours, theirs = _pair()
        with ours:
            with theirs:
                socket.send_fds(self.ctrl, [b"s"], [theirs.fileno()])
            yield ours

    def alloc(self) -> None:
        """One allocation through the broker and its release, as the flow benchmark does."""
        self.broker.send(peer.ALLOC)
        _, fds, _, _ = socket.recv_fds(self.broker, 16, 1)
        socket.socket(fileno=fds[0]).close()
        self.broker.send(peer.DEALLOC)
        self.broker.recv(16)


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _peer_cmd(mode: str, *socks: socket.socket) -> list[str]:
    return [sys.executable, "-m", "bench.peer", mode, *(str(s.fileno()) for s in socks)]


def _each_way(raw: _RawPeers, run: int, measure: Callable[[session.Send, session.Recv], T]) -> tuple[T, T]:
    """`measure` on a fresh flow and on a fresh raw socketpair, in turns; (flow, raw)."""

    def on_flow() -> T:
        with flow_alloc(NAME, timeout=ALLOC_TIMEOUT) as flow:
            result = measure(flow.write, flow.read)
        time.sleep(SETTLE)
        return result

    def on_raw() -> T:
        with raw.session() as sock:
            result = measure(sock.send, functools.partial(sock.recv, session.RECV_BUF))
        time.sleep(SETTLE)
        return result

    if run % 2:
        raw_result = on_raw()
        return on_flow(), raw_result
    flow_result = on_flow()
    return flow_result, on_raw()


def _runs(
    raw: _RawPeers,
    runs: int,
    what: str,
    measure: Callable[[session.Send, session.Recv], T],
    show: Callable[[T], str],
) -> tuple[list[T], list[T]]:
    """`runs` results each way, after one discarded warm-up run (the first after start-up lag)."""
    _each_way(raw, 0, measure)
    flows: list[T] = []
    raws: list[T] = []
    for i in range(runs):
        f, r = _each_way(raw, i, measure)
        log.info("local %s run %d/%d: flow %s, raw %s", what, i + 1, runs, show(f), show(r))
        flows.append(f)
        raws.append(r)
    return flows, raws


def _rtt(raw: _RawPeers, runs: int) -> list[Row]:
    flows, raws = _runs(
        raw,
        runs,
        "rtt",
        lambda send, recv: session.rtt_us(send, recv, RTT_COUNT, RTT_SIZE),
        lambda us: f"{us:.2f} us",
    )
    return [median_row(f"local.rtt_{RTT_SIZE}B", "us", flows, raws, RAW)]


def _throughput(raw: _RawPeers, runs: int) -> list[Row]:
    flows, raws = _runs(
        raw,
        runs,
        "throughput",
        lambda send, recv: session.one_way(send, recv, TPUT_SECONDS, TPUT_SIZE),
        lambda rates: f"{rates[0]:.0f} SDU/s",
    )
    sdus, mbs = [f[0] for f in flows], [f[1] for f in flows]
    raw_sdus, raw_mbs = [r[0] for r in raws], [r[1] for r in raws]
    return [
        median_row(f"local.throughput_{TPUT_SIZE}B", "SDU/s", sdus, raw_sdus, RAW),
        median_row(f"local.throughput_{TPUT_SIZE}B_MB", "MB/s", mbs, raw_mbs, RAW),
    ]


def _alloc(raw: _RawPeers, runs: int) -> Row:
    def flow_op() -> None:
        flow_alloc(NAME, timeout=ALLOC_TIMEOUT).close()

    flows: list[float] = []
    raws: list[float] = []
    for i in range(runs):
        if i % 2:  # in turns, as _each_way does
            r = ops_per_second(raw.alloc, ALLOC_SECONDS)
            f = ops_per_second(flow_op, ALLOC_SECONDS)
        else:
            f = ops_per_second(flow_op, ALLOC_SECONDS)
            r = ops_per_second(raw.alloc, ALLOC_SECONDS)
        log.info("local alloc run %d/%d: flow %.0f/s, raw broker %.0f/s", i + 1, runs, f, r)
        flows.append(f)
        raws.append(r)
    return median_row("local.alloc_dealloc", "flows/s", flows, raws, BROKER)


# Its processes are pinned: under load they cannot move to a free CPU, and the suite takes 1.5-2 minutes.
SUITE = Suite("local", "local-layer flows vs an AF_UNIX SOCK_SEQPACKET socketpair", run, time_limit=240)
