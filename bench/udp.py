"""The udp suite: flows of a udp4 layer between two irmds on loopback, against raw UDP sockets.

Host A (127.0.0.1) runs the flow server; host B (127.0.0.2, `peer 127.0.0.1`) allocates. The
baseline is a pair of connected UDP sockets between the same two addresses, made with the same
socket options as the IPCP's (transports.udp.open_udp: 8 MiB buffers), served by a peer process
as the flows are. RTT of 64-byte SDUs; one-way throughput of 1,400-byte SDUs as the receiver
counted them (both are lossy under flood: UDP drops at a full receive buffer).

`udp.*` rows are the layer as users get it (each flow its own connected UDP socket, no relay);
`udp.relay.*` rows (no goal, for information) force the IPCPs' relay data path with the
test-only `impair loss=0`: the path every SDU takes over the eth layers.

Not yet in `bench/__main__.py`'s registry (add `udp.SUITE` there); meanwhile
`python -m bench.udp [--runs N] [--out FILE]` runs it through the same harness.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from bench import session
from bench.harness import BenchError, Goal, Row, Suite, median_row
from bench.stack import Stack
from flowlib.flow import Flow
from flowlib.irm import IrmClient
from transports import udp

log = logging.getLogger(__name__)

NAME = "bench-udp"
LAYER = "udpbench"
A_IP, B_IP = "127.0.0.1", "127.0.0.2"
RTT_COUNT = 10_000
RTT_SIZE = 64
TPUT_SIZE = 1400
TPUT_SECONDS = 1.0
ALLOC_TIMEOUT = 10.0
END_RETRY = 0.05  # seconds between END markers while waiting for the sink's counts
END_TRIES = 100
RAW = "raw UDP sockets"

T = TypeVar("T")


def free_port(ips: tuple[str, ...]) -> int:
    """A UDP port free on each of `ips` (checked by binding, then released)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 60000)
        with contextlib.ExitStack() as stack:
            try:
                for ip in ips:
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                    s.bind((ip, port))
            except OSError:
                continue
            return port
    raise BenchError("no free UDP port on the loopback addresses")


def run(runs: int) -> list[Row]:
    return [*_suite(runs, "udp", (), goals=True), *_suite(runs, "udp.relay", RELAY, goals=False)]


RELAY = ("impair", "loss=0")  # any impairment routes data through the relays


def _suite(runs: int, prefix: str, opts: tuple[str, ...], goals: bool) -> list[Row]:
    port = free_port((A_IP, B_IP))
    with Stack() as a:  # every `irm` for A before B's Stack repoints OUROBOROS_SOCK
        a.irm("ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", LAYER,
              "ip", A_IP, "port", str(port), *opts)
        a.spawn([sys.executable, "-m", "bench.peer", "flow", NAME], "flow-server", ready=True)
        a.irm("name", "register", NAME, "layer", LAYER)
        raw = _RawUdpPeer(a)
        try:
            with Stack() as b:
                b.irm("ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", LAYER,
                      "ip", B_IP, "port", str(port), "peer", A_IP, *opts)
                irm = IrmClient(b.sock)
                try:
                    return [*_rtt(irm, raw, runs, prefix, goals),
                            *_throughput(irm, raw, runs, prefix, goals)]
                finally:
                    irm.close()
        finally:
            raw.close()


class _RawUdpPeer:
    """`bench.peer raw`: serves one session per UDP socket passed to it (SCM_RIGHTS)."""

    def __init__(self, stack: Stack) -> None:
        self.ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            stack.spawn(
                [sys.executable, "-m", "bench.peer", "raw", str(theirs.fileno())],
                "raw-udp-server",
                pass_fds=[theirs.fileno()],
            )

    @contextlib.contextmanager
    def session(self) -> Iterator[socket.socket]:
        """A connected UDP socket at B whose peer at A is served by the raw server."""
        server = udp.open_udp(A_IP, 0)
        client = udp.open_udp(B_IP, 0)
        with client:
            with server:
                server.connect(client.getsockname())
                client.connect(server.getsockname())
                server.setblocking(True)
                socket.send_fds(self.ctrl, [b"s"], [server.fileno()])
            client.setblocking(True)
            try:
                yield client
            finally:
                with contextlib.suppress(OSError):  # an empty datagram ends an echo session
                    for _ in range(3):
                        client.send(b"")

    def close(self) -> None:
        self.ctrl.close()


def _alloc(irm: IrmClient) -> Flow:
    reply, fd = irm.alloc(NAME, None, ALLOC_TIMEOUT)
    return Flow(reply, fd, irm)


def _each_way(
    irm: IrmClient,
    raw: _RawUdpPeer,
    run: int,
    measure: Callable[[session.Send, session.Recv, Callable[[float | None], None]], T],
) -> tuple[T, T]:
    """`measure` on a fresh flow and on a fresh raw socket pair, in turns; (flow, raw)."""

    def on_flow() -> T:
        with _alloc(irm) as flow:
            return measure(flow.write, flow.read, flow.set_timeout)

    def on_raw() -> T:
        with raw.session() as sock:
            return measure(sock.send, functools.partial(sock.recv, session.RECV_BUF), sock.settimeout)

    if run % 2:
        raw_result = on_raw()
        return on_flow(), raw_result
    flow_result = on_flow()
    return flow_result, on_raw()


def one_way(
    send: session.Send, recv: session.Recv, set_timeout: Callable[[float | None], None], duration: float, size: int
) -> tuple[float, float]:
    """session.one_way, but the END marker is repeated until the sink answers (it may be dropped)."""
    send(session.SINK)
    if (got := recv()) != session.READY:
        raise BenchError(f"peer answered {session.SINK!r} with {got[:32]!r}")
    sdu = bytes(size)
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        for _ in range(session.BATCH):
            send(sdu)
    set_timeout(END_RETRY)
    for _ in range(END_TRIES):
        send(session.END)
        try:
            answer = recv()
        except TimeoutError:
            continue
        if len(answer) == session.STATS.size:
            break
    else:
        raise BenchError("the sink never answered END")
    count, nbytes, elapsed_ns = session.STATS.unpack(answer)
    if not count or not elapsed_ns:
        raise BenchError("sink peer received nothing")
    return count / elapsed_ns * 1e9, nbytes / elapsed_ns * 1e3


def _rtt(irm: IrmClient, raw: _RawUdpPeer, runs: int, prefix: str, goals: bool) -> list[Row]:
    flows: list[float] = []
    raws: list[float] = []
    for i in range(runs):
        f, r = _each_way(irm, raw, i, lambda send, recv, _: session.rtt_us(send, recv, RTT_COUNT, RTT_SIZE))
        log.info("%s rtt run %d/%d: flow %.1f us, raw %.1f us", prefix, i + 1, runs, f, r)
        flows.append(f)
        raws.append(r)
    goal = Goal("<=", 2.0) if goals else None
    return [median_row(f"{prefix}.rtt_{RTT_SIZE}B", "us", flows, raws, RAW, goal)]


def _throughput(irm: IrmClient, raw: _RawUdpPeer, runs: int, prefix: str, goals: bool) -> list[Row]:
    flows: list[tuple[float, float]] = []
    raws: list[tuple[float, float]] = []
    for i in range(runs):
        f, r = _each_way(irm, raw, i, lambda send, recv, timeout: one_way(
            send, recv, timeout, TPUT_SECONDS, TPUT_SIZE))
        log.info("%s throughput run %d/%d: flow %.0f SDU/s, raw %.0f SDU/s",
                 prefix, i + 1, runs, f[0], r[0])
        flows.append(f)
        raws.append(r)
    goal = Goal(">=", 0.5) if goals else None
    return [
        median_row(f"{prefix}.throughput_{TPUT_SIZE}B", "SDU/s",
                   [f[0] for f in flows], [r[0] for r in raws], RAW, goal),
        median_row(f"{prefix}.throughput_{TPUT_SIZE}B_MB", "MB/s",
                   [f[1] for f in flows], [r[1] for r in raws], RAW, goal),
    ]


SUITE = Suite("udp", "udp4-layer flows (127.0.0.1 <-> 127.0.0.2) vs raw UDP sockets", run)


def main(argv: list[str] | None = None) -> int:
    """Run this suite through the harness's command line (`python -m bench` options)."""
    from bench import __main__ as bench_main

    bench_main.SUITES.setdefault(SUITE.name, SUITE)
    args = sys.argv[1:] if argv is None else argv
    return bench_main.main([SUITE.name, *[a for a in args if a != SUITE.name]])


if __name__ == "__main__":
    sys.exit(main())
