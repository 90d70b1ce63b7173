"""Keepalives and peer liveness (flowlib.liveness, driven by the flow engine), as C's dev.c: an idle end
sends an empty SDU every quarter of the QoS timeout, from the engine's thread even while its process
sleeps; a peer silent for the whole timeout raises FLOW_PEER, after which reads and writes fail with
FlowPeer; a timeout of 0 turns both off; FLOWFDOWN set and cleared gives FLOW_DOWN and FLOW_UP.

Sans-IO first, then flows over a local layer to peers in other processes (stopped with SIGSTOP).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import IrmdProc
from test_reliable_flows import Net, make_net, teardown
from unicast_net import Cluster

from flowlib import (
    EventQueue,
    EventType,
    Flow,
    FlowDown,
    FlowError,
    FlowPeer,
    FlowSet,
    FlowTimeout,
    fevent,
    flow_alloc,
    qos,
)
from flowlib.flow import FLOWFDOWN, Fccntl
from flowlib.irm import IrmClient
from flowlib.liveness import Action, Liveness
from proto.qos import QosSpec

T = 1000  # ms: the QoS timeout of these flows
_names = itertools.count()


# -- sans-IO ----------------------------------------------------------------------------------------


def test_an_idle_flow_sends_a_keepalive_every_quarter_timeout() -> None:
    live = Liveness(T, 0.0)
    assert live.get_timer() == 0.25
    assert live.handle_timer(0.2) is None
    assert live.handle_timer(0.25) is Action.KEEPALIVE
    assert live.get_timer() == 0.5
    live.received(0.4)
    assert live.handle_timer(0.5) is Action.KEEPALIVE


def test_writing_holds_keepalives_back() -> None:
    live = Liveness(T, 0.0)
    live.received(0.2)
    live.wrote = True
    assert live.handle_timer(0.25) is None  # the write counts as sending
    assert live.handle_timer(0.5) is Action.KEEPALIVE


def test_a_silent_peer_is_flow_peer_after_the_timeout_and_this_side_goes_quiet() -> None:
    live = Liveness(T, 0.0)
    for t in (0.25, 0.5, 0.75):
        assert live.handle_timer(t) is Action.KEEPALIVE
    assert live.handle_timer(1.0) is Action.PEER
    assert live.peer and live.get_timer() is None
    assert live.handle_timer(5.0) is None  # no more keepalives, as C


def test_a_timeout_of_zero_turns_it_all_off() -> None:
    live = Liveness(0, 0.0)
    assert live.get_timer() is None and live.handle_timer(1e6) is None


def test_a_flow_down_is_not_checked_and_coming_up_gives_the_peer_a_whole_timeout() -> None:
    live = Liveness(T, 0.0)
    live.set_down(True, 0.1)
    assert live.get_timer() is None and live.handle_timer(10.0) is None
    live.set_down(False, 10.0)
    assert live.handle_timer(10.5) is Action.KEEPALIVE
    assert live.handle_timer(10.6) is None
    assert live.handle_timer(10.99) is Action.KEEPALIVE  # not FLOW_PEER: the time down does not count
    assert live.handle_timer(11.0) is Action.PEER


# -- flows to peers in other processes --------------------------------------------------------------

PEER = r"""
import sys, time
from flowlib import FlowError, flow_accept
print("accepting", flush=True)
flow = flow_accept(timeout=30)
print("accepted", flush=True)
mode = sys.argv[1]
try:
    if mode == "sleep":
        time.sleep(600)
    elif mode == "watch":  # wait for events without reading: says whether our flow's peer went silent
        from flowlib import EventQueue, EventType, FlowSet, fevent
        fset, q = FlowSet(), EventQueue()
        fset.add(flow)
        while True:
            fevent(fset, q, 1.0)
            for e in q:
                print(f"event {e.type}", flush=True)
    elif mode == "echo":
        while True:
            flow.write(flow.read())
except FlowError as e:
    print(f"{type(e).__name__}: {e}", flush=True)
"""


@dataclasses.dataclass
class Peer:
    proc: subprocess.Popen[str]
    name: str

    def line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def end(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def start_peer(irmd: IrmdProc, layer: str, mode: str) -> Peer:
    """A peer process on `irmd`, bound to a fresh name registered in `layer`, accepting one flow."""
    name = f"peer{next(_names)}"
    irmd.irm_ok("name", "register", name, "layer", layer)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER, mode],
        env={**irmd.env, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peer = Peer(proc, name)
    try:
        assert peer.line() == "accepting"
        irmd.irm_ok("bind", "process", str(proc.pid), "name", name)
    except BaseException:
        peer.end()
        raise
    return peer


@pytest.fixture
def peers(irmd: IrmdProc, local_layer: str) -> Iterator[Callable[[str], Peer]]:
    made: list[Peer] = []

    def start(mode: str) -> Peer:
        made.append(start_peer(irmd, local_layer, mode))
        return made[-1]

    yield start
    for p in made:
        p.end()


@pytest.fixture
def alloc(client_factory: Callable[[], IrmClient]) -> Iterator[Callable[[Peer, QosSpec, bool], Flow]]:
    flows: list[Flow] = []

    def make(peer: Peer, spec: QosSpec, encrypt: bool = False) -> Flow:
        flow = flow_alloc(peer.name, qos=spec, timeout=20, encrypt=encrypt, irm=client_factory())
        assert peer.line() == "accepted"
        flows.append(flow)
        return flow

    yield make
    for f in flows:
        f.close()


def events_for(flows: list[Flow], seconds: float) -> dict[Flow, list[EventType]]:
    fset, q = FlowSet(), EventQueue()
    for f in flows:
        fset.add(f)
    seen: dict[Flow, list[EventType]] = {f: [] for f in flows}
    end = time.monotonic() + seconds
    try:
        while (left := end - time.monotonic()) > 0:
            fevent(fset, q, left)
            for e in q:
                seen[e.flow].append(e.type)
    finally:
        fset.close()
    return seen


def with_timeout(spec: QosSpec, ms: int = T) -> QosSpec:
    return dataclasses.replace(spec, timeout=ms)


KINDS = [
    pytest.param(qos.raw, False, id="raw"),
    pytest.param(qos.data, False, id="frct"),
    pytest.param(qos.raw, True, id="encrypted"),
    pytest.param(qos.raw_no_errors, False, id="crc"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("spec", "encrypt"), KINDS)
def test_a_stopped_peer_raises_flow_peer_then_reads_and_writes_fail(
    peers: Callable[[str], Peer], alloc: Callable[..., Flow], spec: QosSpec, encrypt: bool
) -> None:
    peer = peers("sleep")
    flow = alloc(peer, with_timeout(spec), encrypt)
    peer.stop()
    started = time.monotonic()
    seen = events_for([flow], 4 * T / 1000)
    assert EventType.PEER in seen[flow], seen
    assert time.monotonic() - started >= T / 1000
    with pytest.raises(FlowPeer, match="the peer was silent for 1 s"):
        flow.read()
    with pytest.raises(FlowPeer):
        flow.write(b"anyone?")
    assert isinstance(FlowPeer("x"), FlowDown)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("spec", "encrypt"), KINDS)
def test_a_live_peer_asleep_without_reading_never_raises_flow_peer(
    peers: Callable[[str], Peer], alloc: Callable[..., Flow], spec: QosSpec, encrypt: bool
) -> None:
    peer = peers("sleep")
    flow = alloc(peer, with_timeout(spec), encrypt)
    seen = events_for([flow], 4 * T / 1000)
    assert seen[flow] == [], "keepalives are no events, and the sleeping peer's engine still sends them"
    flow.write(b"still there")  # and the flow works


@pytest.mark.timeout(60)
def test_a_busy_peer_never_raises_flow_peer_on_either_side(
    peers: Callable[[str], Peer], alloc: Callable[..., Flow]
) -> None:
    peer = peers("echo")
    flow = alloc(peer, with_timeout(qos.raw))
    flow.set_timeout(5.0)
    end = time.monotonic() + 4 * T / 1000
    n = 0
    while time.monotonic() < end:
        flow.write(b"ping %d" % n)
        assert flow.read() == b"ping %d" % n
        n += 1
    assert peer.proc.poll() is None, peer.line()
    assert n > 100


@pytest.mark.timeout(60)
def test_keepalives_are_empty_records_every_quarter_timeout(
    peers: Callable[[str], Peer], alloc: Callable[..., Flow]
) -> None:
    peer = peers("sleep")
    flow = alloc(peer, with_timeout(qos.raw))
    sock = flow._sock  # the records themselves, under the Flow
    arrivals: list[tuple[float, bytes]] = []
    start = time.monotonic()
    while time.monotonic() - start < 2.0:
        if select.select([sock], [], [], 0.1)[0]:
            arrivals.append((time.monotonic() - start, sock.recv(100)))
            flow._live.heard = True  # what Flow.read does: reading the socket past it, we must too
    assert all(record == b"" for _, record in arrivals)
    assert 5 <= len(arrivals) <= 12, arrivals  # every 0.25 s for 2 s


@pytest.mark.timeout(60)
def test_a_timeout_of_zero_sends_no_keepalives_and_never_raises_flow_peer(
    peers: Callable[[str], Peer], alloc: Callable[..., Flow]
) -> None:
    peer = peers("sleep")
    flow = alloc(peer, with_timeout(qos.raw, 0))
    assert not select.select([flow.fd], [], [], 1.0)[0], "a keepalive arrived on a flow without a timeout"
    peer.stop()
    assert events_for([flow], 2.0)[flow] == []


@pytest.mark.timeout(60)
def test_a_read_is_not_woken_by_keepalives(peers: Callable[[str], Peer], alloc: Callable[..., Flow]) -> None:
    peer = peers("sleep")
    flow = alloc(peer, with_timeout(qos.raw))
    flow.set_timeout(1.5)
    with pytest.raises(FlowTimeout):
        flow.read()


@pytest.mark.timeout(60)
def test_flowfdown_set_and_cleared_gives_flow_down_then_flow_up(
    peers: Callable[[str], Peer], alloc: Callable[..., Flow]
) -> None:
    peer = peers("echo")
    flow = alloc(peer, with_timeout(qos.raw))
    fset, q = FlowSet(), EventQueue()
    fset.add(flow)
    flags = flow.fccntl(Fccntl.GFLAGS)
    flow.fccntl(Fccntl.SFLAGS, flags | FLOWFDOWN)  # as C's eth IPCP does when its link goes
    assert fevent(fset, q, 5) == 1 and [e.type for e in q] == [EventType.DOWN]
    assert flow.fccntl(Fccntl.GFLAGS) & FLOWFDOWN
    with pytest.raises(FlowDown, match="is down"):
        flow.write(b"x")
    flow.set_timeout(0.5)
    with pytest.raises(FlowDown, match="is down"):
        flow.read()
    flow.fccntl(Fccntl.SFLAGS, flags & ~FLOWFDOWN)
    assert fevent(fset, q, 5) == 1 and [e.type for e in q] == [EventType.UP]
    flow.set_timeout(5.0)
    flow.write(b"back")
    assert flow.read() == b"back"
    fset.close()


# -- over a udp4 layer: the IPCPs carry keepalives -------------------------------------------------


@pytest.fixture(params=["direct", "relayed"])
def udp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Net]:
    """A udp layer whose flows are sockets of their own, or relayed by the IPCP (as with an impairment)."""
    net = make_net(tmp_path, None if request.param == "direct" else "loss=0")
    try:
        yield net
    finally:
        teardown(net)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("spec", "encrypt"), KINDS[:3])
def test_keepalives_cross_a_udp_layer_and_a_stopped_peer_is_still_found(udp: Net, spec: QosSpec, encrypt: bool) -> None:
    peer = start_peer(udp.a, udp.layer, "watch")
    try:
        flow = udp.alloc(peer.name, with_timeout(spec), encrypt)
        keepalives_cross_then_a_stopped_peer_is_found(flow, peer)
    finally:
        peer.end()


def keepalives_cross_then_a_stopped_peer_is_found(flow: Flow, peer: Peer) -> None:
    """With a peer that watches its flow without reading: neither side misses the other, until it stops."""
    assert peer.line() == "accepted"
    assert events_for([flow], 3 * T / 1000)[flow] == [], "the peer's keepalives did not arrive"
    assert not select.select([peer.proc.stdout], [], [], 0)[0], peer.line()  # nor ours at the peer
    peer.stop()
    assert EventType.PEER in events_for([flow], 3 * T / 1000)[flow]
    flow.close()


# -- over a unicast layer: its DT carries keepalives end to end ----------------------------------------


@pytest.mark.timeout(180)
def test_keepalives_cross_a_unicast_layer_and_a_stopped_peer_is_still_found(cluster: Cluster) -> None:
    a, b = cluster.start(["a", "b"])
    cluster.udp([a, b])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
    b.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "dst", "n1", "autobind")
    b.irm_ok("ipcp", "connect", "name", "n2", "dst", "n1")
    peer = start_peer(b.irmd, "net", "watch")
    client = IrmClient(a.irmd.sock)
    try:
        deadline = time.monotonic() + 60
        while True:  # until the directory has the name
            try:
                flow = flow_alloc(peer.name, qos=with_timeout(qos.raw), timeout=5, irm=client)
                break
            except FlowError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        keepalives_cross_then_a_stopped_peer_is_found(flow, peer)
    finally:
        peer.end()
        client.close()
