"""Simulated hosts on loopback for the network suites: stacks, udp shims, flow and raw UDP peers.

Also the measurements the udp, unicast, frct and eth suites share, on a flow or on a raw socket.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from bench import session
from bench.harness import BenchError, Goal, Row, median_row
from bench.stack import SOCK_ENV, Stack
from flowlib import FlowError, FlowTimeout
from flowlib.flow import Flow, flow_alloc
from flowlib.irm import IrmClient
from flowlib.qos import QosSpec
from transports import udp as udp_transport

log = logging.getLogger(__name__)

NAME = "bench-peer"
UDP_LAYER = "lan"
RTT_COUNT = 2_000
RTT_SIZE = 64
TPUT_SIZE = 1400
TPUT_SECONDS = 1.0
ALLOC_TIMEOUT = 5.0
CONVERGE_TIMEOUT = 40.0  # seconds for a fresh layer to route a flow end to end
END_RETRY = 0.05
END_WAIT = 30.0  # seconds the sender keeps repeating END (it may be lost; a reliable flow may lag)
RAW = "raw UDP sockets"


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


T = TypeVar("T")
Measure = Callable[[session.Send, session.Recv, Callable[[float | None], None]], T]


@contextlib.contextmanager
def pointing(stack: Stack) -> Iterator[Stack]:
    """OUROBOROS_SOCK at `stack`'s IRMd for a while: for `irm` commands and spawned processes.

    With several Stacks up, the environment points at the last one entered.
    """
    saved = os.environ.get(SOCK_ENV)
    os.environ[SOCK_ENV] = str(stack.sock)
    try:
        yield stack
    finally:
        if saved is None:
            os.environ.pop(SOCK_ENV, None)
        else:
            os.environ[SOCK_ENV] = saved


def irm_at(stack: Stack, *words: str) -> str:
    with pointing(stack):
        return stack.irm(*words)


def flow_server(stack: Stack, layer: str, name: str = NAME) -> None:
    """`bench.peer flow NAME` under `stack`, its name registered in `layer`."""
    with pointing(stack):
        stack.spawn([sys.executable, "-m", "bench.peer", "flow", name], "flow-server", ready=True)
        stack.irm("name", "register", name, "layer", layer)


def udp_shim(stack: Stack, ip: str, port: int, peer: str | None, *opts: str) -> None:
    extra = ("peer", peer) if peer else ()
    irm_at(stack, "ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", UDP_LAYER,
           "ip", ip, "port", str(port), *extra, *opts)  # fmt: skip


def udp_pair(ex: contextlib.ExitStack, a_ip: str, b_ip: str, *opts: str) -> tuple[Stack, Stack, IrmClient]:
    """Hosts A and B with a udp4 layer between them, the flow server at A; (A, B, a client at B)."""
    port = free_port((a_ip, b_ip))
    a, b = ex.enter_context(Stack()), ex.enter_context(Stack())
    udp_shim(a, a_ip, port, None, *opts)
    udp_shim(b, b_ip, port, a_ip, *opts)
    flow_server(a, UDP_LAYER)
    irm = IrmClient(b.sock)
    ex.callback(irm.close)
    wait_route(irm)
    return a, b, irm


class RawServer:
    """`bench.peer raw` under `stack`: it serves one session on each socket handed to it."""

    def __init__(self, stack: Stack) -> None:
        self.ctrl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            stack.spawn(
                [sys.executable, "-m", "bench.peer", "raw", str(theirs.fileno())],
                "raw-server",
                pass_fds=[theirs.fileno()],
            )

    def hand(self, sock: socket.socket, note: bytes = b"s") -> None:
        socket.send_fds(self.ctrl, [note], [sock.fileno()])

    def close(self) -> None:
        self.ctrl.close()


class RawUdpPeer(RawServer):
    """Sessions on connected UDP socket pairs: served at `server_ip`, opened from `client_ip`."""

    def __init__(self, stack: Stack, server_ip: str, client_ip: str) -> None:
        super().__init__(stack)
        self.server_ip, self.client_ip = server_ip, client_ip

    @contextlib.contextmanager
    def session(self) -> Iterator[socket.socket]:
        server = udp_transport.open_udp(self.server_ip, 0)
        client = udp_transport.open_udp(self.client_ip, 0)
        with client:
            with server:
                server.connect(client.getsockname())
                client.connect(server.getsockname())
                server.setblocking(True)
                self.hand(server)
            client.setblocking(True)
            try:
                yield client
            finally:
                with contextlib.suppress(OSError):  # an empty datagram ends an echo session
                    for _ in range(3):
                        client.send(b"")

    def run(self, measure: Measure[T]) -> T:
        with self.session() as sock:
            return on_sock(sock, measure)


def alloc(irm: IrmClient, qos: QosSpec | None = None, encrypt: bool = False, name: str = NAME) -> Flow:
    return flow_alloc(name, qos, ALLOC_TIMEOUT, encrypt=encrypt, irm=irm)


def wait_route(irm: IrmClient, within: float = CONVERGE_TIMEOUT, name: str = NAME) -> float:
    """Allocate (and release) flows to `name` until one works; seconds it took."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < within:
        try:
            with alloc(irm, name=name) as flow:
                flow.set_timeout(2.0)
                flow.write(session.ECHO)  # an answer proves the path both ways
                if flow.read() != session.READY:
                    raise BenchError("the flow server answered wrongly")
            return time.monotonic() - start
        except FlowError as e:
            last = e
            time.sleep(0.5)
    raise BenchError(f"no flow to {name} within {within:.0f} s: {last}")


def one_way(
    send: session.Send, recv: session.Recv, set_timeout: Callable[[float | None], None], duration: float, size: int
) -> tuple[float, float]:
    """session.one_way over a lossy path: (SDU/s, MB/s) as the sink counted them (see `sink`)."""
    count, nbytes, elapsed_ns = sink(send, recv, set_timeout, duration, size)
    return count / elapsed_ns * 1e9, nbytes / elapsed_ns * 1e3


def sink(
    send: session.Send, recv: session.Recv, set_timeout: Callable[[float | None], None], duration: float, size: int
) -> tuple[int, int, int]:
    """A sink session over a lossy path: SDUs, bytes and ns from the first SDU to END, as the sink
    counted them. SINK and END are repeated until answered (either, or the answer, may be lost),
    END for up to END_WAIT s (a reliable flow may lag behind the sender)."""
    set_timeout(END_RETRY)
    _ask(send, recv, session.SINK, lambda answer: answer == session.READY)
    set_timeout(None)  # a reliable flow's writes may block on its window
    sdu = bytes(size)
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        for _ in range(session.BATCH):
            send(sdu)
    set_timeout(END_RETRY)
    answer = _ask(send, recv, session.END, lambda answer: len(answer) == session.STATS.size)
    count, nbytes, elapsed_ns = session.STATS.unpack(answer)
    if not count or not elapsed_ns:
        raise BenchError("sink peer received nothing")
    return count, nbytes, elapsed_ns


def _ask(send: session.Send, recv: session.Recv, question: bytes, is_answer: Callable[[bytes], bool]) -> bytes:
    """Send `question` until an SDU that `is_answer` comes back (skipping late answers to earlier questions)."""
    give_up = time.monotonic() + END_WAIT
    while time.monotonic() < give_up:
        with contextlib.suppress(TimeoutError, FlowTimeout):
            send(question)
        try:
            answer = recv()
        except (TimeoutError, FlowTimeout):
            continue
        if is_answer(answer):
            return answer
    raise BenchError(f"the peer never answered {question!r} within {END_WAIT:.0f} s")


def on_flow(flow: Flow, measure: Measure[T]) -> T:
    with flow:
        return measure(flow.write, flow.read, flow.set_timeout)


def on_sock(sock: socket.socket, measure: Measure[T]) -> T:
    return measure(sock.send, functools.partial(sock.recv, session.RECV_BUF), sock.settimeout)


def in_turns(run: int, first: Callable[[], T], second: Callable[[], T]) -> tuple[T, T]:
    """Both, the order alternating with `run`; (first's result, second's)."""
    if run % 2:
        b = second()
        return first(), b
    a = first()
    return a, second()


def rtt(send: session.Send, recv: session.Recv, _: Callable[[float | None], None], count: int = RTT_COUNT) -> float:
    return session.rtt_us(send, recv, count, RTT_SIZE)


def tput(send: session.Send, recv: session.Recv, timeout: Callable[[float | None], None]) -> tuple[float, float]:
    return one_way(send, recv, timeout, TPUT_SECONDS, TPUT_SIZE)


class RawPeer(Protocol):
    """A baseline: runs a measurement on a fresh pair of raw sockets."""

    def run(self, measure: Measure[T]) -> T: ...


def measure_runs(irm: IrmClient, raw: RawPeer, runs: int, measure: Measure[T], what: str) -> list[tuple[T, T]]:
    """`measure` on a fresh flow and on `raw`, `runs` times in turns; [(flow, raw)]."""
    out: list[tuple[T, T]] = []
    for i in range(runs):
        pair = in_turns(i, lambda: on_flow(alloc(irm), measure), lambda: raw.run(measure))
        log.info("%s run %d/%d: flow %s, raw %s", what, i + 1, runs, _fmt(pair[0]), _fmt(pair[1]))
        out.append(pair)
    return out


def _fmt(value: object) -> str:
    if isinstance(value, tuple):  # (SDU/s, MB/s)
        return f"{value[0]:.0f} SDU/s"
    return f"{value:.1f} us"


def rows(
    prefix: str,
    rtts: list[tuple[float, float]],
    tputs: list[tuple[tuple[float, float], tuple[float, float]]],
    rtt_goal: Goal | None,
    tput_goal: Goal | None,
    raw: str = RAW,
) -> list[Row]:
    """The rtt and throughput (SDU/s and MB/s) rows of a flow against its raw baseline."""
    return [
        median_row(f"{prefix}.rtt_{RTT_SIZE}B", "us", [f for f, _ in rtts], [r for _, r in rtts], raw, rtt_goal),
        median_row(f"{prefix}.throughput_{TPUT_SIZE}B", "SDU/s",
                   [f[0] for f, _ in tputs], [r[0] for _, r in tputs], raw, tput_goal),
        median_row(f"{prefix}.throughput_{TPUT_SIZE}B_MB", "MB/s",
                   [f[1] for f, _ in tputs], [r[1] for _, r in tputs], raw, tput_goal),
    ]  # fmt: skip
