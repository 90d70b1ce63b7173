"""Reliable (FRCT) and encrypted flows end to end, over a loopback udp4 layer between two irmds.

Like ../shared/checks/5-frct: host A (127.0.0.1) and host B (127.0.0.2) each run an irmd with a
udp4 IPCP in layer 'lan'; no root needed, except for the capture test (AF_PACKET on `lo`), which
is skipped otherwise. Bulk transfers use tests/reliable_peer.py: the sink is a separate process on
A (bound to its name by pid), the sender is this test process on B, and the sink checks what it got
by sha256. Tests taking the `layer` fixture also run over a local layer (one irmd). The test-only
shim impairment (`impair loss=..,dup=..,reorder=..`) makes a lossy path without root;
tests/net/test_loss.py does the same with nftables across namespaces.

Figures (goodput, encrypted/plain ratios) are printed (-s) and recorded as junit properties.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import BIN, IrmdProc, free_port, start_irmd, stop_irmd, udp4_bootstrap
from reliable_peer import Sink, payload, send_all, start_sink

from flowlib import Flow, FlowDown, FlowError, FlowTimeout, InvalidArgument, flow_alloc, qos
from flowlib.crypto import OVERHEAD
from flowlib.engine import APP_MTU, HUP_GIVE_UP
from flowlib.irm import IrmClient

LAYER = "lan"
A_IP, B_IP = "127.0.0.1", "127.0.0.2"
MB = 1_000_000
CHUNK = 1400
_names = itertools.count(1)


@dataclass
class Net:
    """Two irmds, a udp4 layer between them; A serves, B allocates."""

    tmp: Path
    a: IrmdProc
    b: IrmdProc
    port: int
    layer: str = LAYER
    kind: str = "udp"
    clients: list[IrmClient] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)

    def client(self) -> IrmClient:
        c = IrmClient(self.b.sock)
        self.clients.append(c)
        return c

    def alloc(self, name: str, spec: qos.QosSpec = qos.data, encrypt: bool = False, timeout: float = 20.0) -> Flow:
        return flow_alloc(name, qos=spec, timeout=timeout, encrypt=encrypt, irm=self.client())

    def serve(self, name: str, prog: str) -> None:
        self.a.irm_ok("bind", "program", str(BIN / prog), "name", name, "auto", "--", "-l")
        self.a.irm_ok("name", "register", name, "layer", self.layer)

    def sink(self, nbytes: int, delay_read: float = 0.0, read_timeout: float = 30.0) -> Sink:
        sink = start_sink(self.a, self.layer, f"sink{next(_names)}", nbytes, self.tmp, delay_read, read_timeout)
        self.sinks.append(sink)
        return sink

    def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.close()
        for sink in self.sinks:
            sink.kill()


def make_net(tmp: Path, impair: str | None = None) -> Net:
    port = free_port([A_IP, B_IP])
    a = start_irmd(tmp, "a")
    try:
        b = start_irmd(tmp, "b")
    except BaseException:
        stop_irmd(a, check=False)
        raise
    net = Net(tmp, a, b, port)
    extra = ["impair", impair] if impair else []
    a.irm_ok(*udp4_bootstrap(LAYER, A_IP, "port", str(port), *extra))
    b.irm_ok(*udp4_bootstrap(LAYER, B_IP, "port", str(port), "peer", A_IP, *extra))
    a.note_children()
    b.note_children()
    return net


def teardown(net: Net) -> None:
    """Stop everything; then fail if an irmd or IPCP logged a traceback (a crash is never fine)."""
    net.close()
    errors: list[BaseException] = []
    for irmd in {id(net.a): net.a, id(net.b): net.b}.values():
        try:
            stop_irmd(irmd, check=False)
        except BaseException as e:
            errors.append(e)
        log = irmd.log_text()
        if "Traceback" in log:
            errors.append(AssertionError(f"a traceback in {irmd.log.name}:\n{log[-3000:]}"))
    if errors:
        raise errors[0]


@pytest.fixture
def udp(tmp_path: Path) -> Iterator[Net]:
    net = make_net(tmp_path)
    try:
        yield net
    finally:
        teardown(net)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Net]:
    """One irmd with a local layer: the sink and this process are both its clients."""
    irmd = start_irmd(tmp_path, "local")
    net = Net(tmp_path, irmd, irmd, 0, layer="local", kind="local")
    try:
        irmd.irm_ok("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local")
        irmd.note_children()
        yield net
    finally:
        teardown(net)


@pytest.fixture(params=["local", "udp"])
def layer(request: pytest.FixtureRequest) -> Net:
    """Each test using it runs over the local layer and over the loopback udp4 layer."""
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


@pytest.fixture
def impaired(tmp_path: Path) -> Iterator[Callable[[str], Net]]:
    """`impaired("loss=5,dup=1,reorder=2")`: a udp layer whose shims impair what they send."""
    nets: list[Net] = []

    def make(spec: str) -> Net:
        net = make_net(tmp_path, spec)
        nets.append(net)
        return net

    yield make
    for net in nets:
        teardown(net)


def figure(record_property: Callable[[str, object], None], key: str, value: float, unit: str) -> None:
    print(f"\n[figure] {key} = {value:.3f} {unit}")
    record_property(key, round(value, 3))


def transfer(
    net: Net,
    nbytes: int,
    *,
    encrypt: bool = False,
    chunk: int = CHUNK,
    spec: qos.QosSpec = qos.data,
    delay_read: float = 0.0,
    seed: int = 1,
) -> tuple[dict[str, Any], str, float]:
    """Send nbytes from this process to a fresh sink on A; (sink result, sent sha256, seconds)."""
    data = payload(nbytes, seed)
    sink = net.sink(nbytes, delay_read=delay_read)
    flow = net.alloc(sink.name, spec, encrypt=encrypt)
    t0 = time.monotonic()
    send_all(flow, data, chunk)
    flow.close()  # returns once FRCT has every PDU acknowledged
    result = sink.result()
    return result, hashlib.sha256(data).hexdigest(), time.monotonic() - t0


def oping_out(net: Net, *args: str, timeout: float = 90.0) -> str:
    r = net.b.run("oping", *args, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"oping {' '.join(args)} failed ({r.returncode}):\n{out}"
    return out


def operf_counts(out: str) -> tuple[int, int, int, int, int]:
    m = re.search(r"(\d+) SDUs sent, (\d+) received, (-?\d+) lost .*?(\d+) out-of-order, (\d+) corrupt", out)
    assert m, f"no statistics in operf's output:\n{out}"
    sent, rcvd, lost, reordered, corrupt = map(int, m.groups())
    return sent, rcvd, lost, reordered, corrupt


# -- the tools -------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_oping_over_qos_data_gets_every_reply(udp: Net) -> None:
    udp.serve("pong", "oping")
    out = oping_out(udp, "-n", "pong", "-q", "data", "-c", "200", "-i", "1", "-Q", "--timeout", "10")
    assert "200 packets transmitted, 200 received, 0 out-of-order, 0% packet loss" in out, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", ["raw", "data"])
def test_oping_encrypted_gets_every_reply(udp: Net, spec: str) -> None:
    udp.serve("pong", "oping")
    out = oping_out(udp, "-n", "pong", "-q", spec, "--encrypt", "-c", "10", "-i", "10", "--timeout", "10")
    assert "10 packets transmitted, 10 received" in out, out
    assert out.count("64 bytes from pong: seq=") == 10


@pytest.mark.timeout(120)
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_operf_over_qos_data_loses_and_corrupts_nothing(
    udp: Net, encrypt: bool, record_property: Callable[[str, object], None]
) -> None:
    udp.serve("perf", "operf")
    r = udp.b.run(
        "operf",
        "-n",
        "perf",
        "-q",
        "data",
        "-d",
        "3s",
        "-f",
        "-s",
        "1400",
        "--timeout",
        "10",
        "--report",
        *(["--encrypt"] if encrypt else []),
        timeout=90,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"operf failed ({r.returncode}):\n{out}"
    sent, rcvd, lost, reordered, corrupt = operf_counts(out)
    assert sent > 100 and rcvd == sent and lost == 0 and reordered == 0 and corrupt == 0, out
    m = re.search(r"receiver: ([\d.]+) Mb/s", out)
    assert m
    figure(record_property, f"operf_qos_data_{'encrypted' if encrypt else 'plain'}_udp_mbps", float(m.group(1)), "Mb/s")


# -- bulk transfers --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_ten_megabytes_over_qos_data_arrive_byte_identical(
    udp: Net, record_property: Callable[[str, object], None]
) -> None:
    result, sha, seconds = transfer(udp, 10 * MB)
    assert result["end"] == "complete", result
    assert result["bytes"] == 10 * MB and result["sdus"] == -(-10 * MB // CHUNK)
    assert result["max_sdu"] == CHUNK, "SDU boundaries were not kept"
    assert result["sha256"] == sha
    figure(record_property, "goodput_qos_data_udp_loopback_mbps", 10 * MB * 8 / seconds / 1e6, "Mb/s")


@pytest.mark.timeout(120)
def test_an_encrypted_reliable_flow_carries_data_intact(udp: Net) -> None:
    result, sha, _ = transfer(udp, 2 * MB, encrypt=True)
    assert result["end"] == "complete", result
    assert "cypher_s=256" in result["qos"], "the acceptor's flow is not encrypted"
    assert result["bytes"] == 2 * MB and result["sha256"] == sha


@pytest.mark.timeout(60)
def test_an_encrypted_raw_flow_exchanges_data_with_an_echo_server(udp: Net) -> None:
    from apps.oping import ECHO_REPLY, ECHO_REQUEST, HDR

    udp.serve("pong", "oping")
    flow = udp.alloc("pong", qos.raw, encrypt=True)
    try:
        assert flow.qos.cypher_s == 256
        assert flow.mtu == 8976 - OVERHEAD  # room for the counter and the tag
        flow.set_timeout(5.0)
        rng = random.Random(3)
        for seq, size in enumerate([64, 1000, 4096, flow.mtu]):
            body = rng.randbytes(size - HDR.size)
            flow.write(HDR.pack(ECHO_REQUEST, seq, 0) + body)
            reply = flow.read()
            assert HDR.unpack_from(reply)[:2] == (ECHO_REPLY, seq)
            assert reply[HDR.size :] == body
    finally:
        flow.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_sdus_far_over_the_layer_mtu_arrive_whole_on_reliable_flows(udp: Net, encrypt: bool) -> None:
    sizes = [60_000] * 20 + [8_981, 17_937, 1, APP_MTU]
    data = payload(sum(sizes), 7)
    sink = udp.sink(len(data))
    flow = udp.alloc(sink.name, qos.data, encrypt=encrypt)
    try:
        assert flow.mtu == APP_MTU
        view, at = memoryview(data), 0
        for n in sizes:
            flow.write(view[at : at + n])
            at += n
        with pytest.raises(InvalidArgument):
            flow.write(bytes(APP_MTU + 1))
    finally:
        flow.close()
    result = sink.result()
    assert result["end"] == "complete", result
    assert result["sdus"] == len(sizes), "fragments were delivered as SDUs of their own"
    assert result["max_sdu"] == APP_MTU
    assert result["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_a_raw_flow_refuses_sdus_over_its_mtu(udp: Net, encrypt: bool) -> None:
    udp.serve("pong", "oping")
    flow = udp.alloc("pong", qos.raw, encrypt=encrypt)
    try:
        mtu = 8976 - (OVERHEAD if encrypt else 0)
        assert flow.mtu == mtu
        for size in (mtu + 1, 60_000):
            with pytest.raises(InvalidArgument, match=f"carries 1 to {mtu} bytes"):
                flow.write(bytes(size))
    finally:
        flow.close()


# -- lossy paths (test-only shim impairment, no root) ----------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("loss", [5, 20])
def test_reliable_transfer_over_a_lossy_duplicating_reordering_layer(
    impaired: Callable[[str], Net], loss: int, record_property: Callable[[str, object], None]
) -> None:
    net = impaired(f"loss={loss},dup=2,reorder=3")  # both shims impair: data and acks suffer
    nbytes = 3 * MB if loss <= 5 else 1 * MB
    result, sha, seconds = transfer(net, nbytes)
    assert result["end"] == "complete", result
    assert result["bytes"] == nbytes and result["sha256"] == sha
    figure(record_property, f"goodput_qos_data_udp_impaired_loss{loss}_mbps", nbytes * 8 / seconds / 1e6, "Mb/s")


@pytest.mark.timeout(180)
def test_encrypted_allocations_survive_a_lossy_layer(impaired: Callable[[str], Net]) -> None:
    net = impaired("loss=30")
    net.serve("pong", "oping")
    for i in range(6):
        flow = net.alloc("pong", qos.data, encrypt=True, timeout=30)
        flow.close()
        print(f"allocation {i} succeeded")


# -- the peer going away ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["process", "host"])
def test_a_peer_that_dies_gives_flow_down_not_a_hang(udp: Net, how: str) -> None:
    sink = udp.sink(10**12)
    flow = udp.alloc(sink.name, qos.data)
    flow.set_timeout(5.0)
    chunk = bytes(CHUNK)
    for _ in range(200):
        flow.write(chunk)
    if how == "process":
        sink.proc.kill()
    else:  # the whole host vanishes: its irmd, its IPCP and the sink, without a word
        udp.a.note_children()
        for pid in udp.a.spawned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sink.proc.kill()
        udp.a.proc.kill()
    t0 = time.monotonic()
    with pytest.raises(FlowDown):
        while time.monotonic() - t0 < 60:
            try:
                flow.write(chunk)
            except FlowTimeout:
                continue  # the window is shut: FRCT keeps retrying until it gives up
    took = time.monotonic() - t0
    assert took < 45, f"FlowDown took {took:.1f} s"
    flow.close()


# -- flow control and the end of a transfer ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_slow_reader_gets_every_byte_after_the_sender_closed(layer: Net) -> None:
    result, sha, _ = transfer(layer, 3 * MB, delay_read=3.0)
    assert result["bytes"] == 3 * MB, f"only {result['bytes']} of {3 * MB} bytes arrived ({result['end']})"
    assert result["sha256"] == sha


@pytest.mark.timeout(120)
def test_the_reader_sees_flow_down_once_the_sender_closed(layer: Net) -> None:
    # (On udp the flow fd is a connected UDP socket: its shutdown gives EPOLLHUP and EAGAIN, not EOF.)
    sink = layer.sink(10**12, read_timeout=8.0)  # reads until the flow ends
    flow = layer.alloc(sink.name, qos.data)
    send_all(flow, payload(50 * CHUNK), CHUNK)
    flow.close()
    result = sink.result()
    assert result["bytes"] == 50 * CHUNK
    assert result["end"] == "down", f"the sink's read ended with {result['end']!r}, not FlowDown"


@pytest.mark.timeout(120)
def test_a_receiver_that_does_not_read_holds_the_sender_back(udp: Net) -> None:
    sink = udp.sink(30 * MB, delay_read=20.0)
    flow = udp.alloc(sink.name, qos.data)
    flow.set_timeout(2.0)
    chunk, written = bytes(CHUNK), 0
    try:
        while written < 30 * MB:
            flow.write(chunk)
            written += CHUNK
    except FlowTimeout:
        pass
    finally:
        sink.proc.kill()
        with contextlib.suppress(FlowError):
            flow.close()
    # What may be in transit: the window (1024 PDUs) plus socket buffers, a few MB at most.
    assert written < 8 * MB, f"{written / MB:.1f} MB written while the receiver read nothing"


@pytest.mark.timeout(120)
def test_closing_on_data_a_shut_window_holds_back_neither_spins_nor_waits_for_ever(udp: Net) -> None:
    """Its application gone, the engine takes what is left as the window opens: the receiver that
    starts reading late gets every byte; while the window stays shut the engine sleeps (a hung-up
    socket is readable to epoll for good); a window that never opens fails the flow, not the close."""
    late = udp.sink(30 * MB, delay_read=4.0)
    flow = udp.alloc(late.name, qos.data)
    flow.set_timeout(1.0)
    data, written = payload(30 * MB, 3), 0
    with contextlib.suppress(FlowTimeout):  # until the shut window fills the flow's socket too
        while True:
            flow.write(data[written : written + CHUNK])
            written += CHUNK
    cpu = time.process_time()
    flow.close()  # with SDUs in its socket the window holds back, until the late reader took them
    assert time.process_time() - cpu < 2.0, "the engine spun while the window was shut"
    result = late.result()
    assert result["bytes"] == written and result["sha256"] == hashlib.sha256(data[:written]).hexdigest()

    never = udp.sink(30 * MB, delay_read=60.0)
    flow = udp.alloc(never.name, qos.data)
    flow.set_timeout(2.0)
    with contextlib.suppress(FlowTimeout):
        send_all(flow, bytes(30 * MB), CHUNK)
    t0, cpu = time.monotonic(), time.process_time()
    flow.close()
    assert time.monotonic() - t0 < HUP_GIVE_UP + 10, "the close waited past the give-up"
    assert time.process_time() - cpu < 3.0, "the engine spun while the window was shut"
    never.kill()


# -- ciphertext on the wire ------------------------------------------------------------------------


SO_RCVBUFFORCE = 33  # Linux's (asm-generic/socket.h); Python does not name it


class Sniffer:
    """Captures the UDP/IPv4 payloads on `lo` (AF_PACKET, needs root); `payloads(ports)` filters them."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, int, bytes]] = []  # (source port, destination port, UDP payload)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        # Room for a whole burst while this thread waits for a CPU (a loaded runner): the default
        # buffer held a few packets, and a capture of none failed the test (root may force it).
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(70000)
            except TimeoutError:
                continue
            if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14 + 9] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            self.frames.append((sport, dport, frame[14 + ihl + 8 :]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def payloads(self, ports: set[int]) -> list[bytes]:
        return [p for sport, dport, p in self.frames if sport in ports or dport in ports]

    def everything(self) -> bytes:
        return b"".join(p for _, _, p in self.frames)


def flow_ports(flow: Flow, layer_port: int) -> set[int]:
    """The UDP ports a flow's PDUs use: the layer's, and the flow's own socket's if it has one."""
    ports = {layer_port}
    sock = flow._session.outer if flow._session is not None else flow._sock  # engine-run, or sealed in place
    if sock.family == socket.AF_INET:
        ports.add(sock.getsockname()[1])
        with contextlib.suppress(OSError):
            ports.add(sock.getpeername()[1])
    return ports


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", ["data", "raw"])
def test_an_encrypted_flow_puts_only_ciphertext_on_the_wire(udp: Net, spec: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("capturing on lo needs root (AF_PACKET)")
    marker = b"PLAINTEXT-MARKER-" + os.urandom(6).hex().encode() + b"|"
    sdu = (marker * (CHUNK // len(marker) + 1))[:CHUNK]
    for encrypt in (False, True):  # the unencrypted run proves the capture sees flow payloads
        sink = udp.sink(100 * CHUNK)
        sniffer = Sniffer()
        try:
            flow = udp.alloc(sink.name, qos.by_name(spec), encrypt=encrypt)
            ports = flow_ports(flow, udp.port)
            for _ in range(100):
                flow.write(sdu)
            flow.close()
            result = sink.result()
        finally:
            sniffer.stop()
        assert result["bytes"] == 100 * CHUNK and result["sha256"] == hashlib.sha256(sdu * 100).hexdigest()
        data = [p for p in sniffer.payloads(ports) if len(p) >= CHUNK]
        # The capture's own socket may overrun in a burst; half the packets are plenty to look at.
        assert len(data) >= 50, f"captured only {len(data)} data packets of the flow (ports {sorted(ports)})"
        seen = b"".join(data)
        if encrypt:
            assert marker not in sniffer.everything(), "plaintext of an encrypted flow seen on the wire"
            assert marker[:8] not in seen
        else:
            assert marker in seen, "the capture missed the plaintext flow's payload"
