"""A hostile FRCT peer: malformed PCIs, data outside the window, replays, and sequences meant to exhaust
the receiver's memory or CPU. The receiver never crashes, holds at most its window (in PDUs and in bytes),
answers storms with one packet per timer check, and resets the flow when the peer breaks a rule.

First sans-IO (flowlib.frct alone), then a real flow in a separate process whose resident memory is
watched while this process plays the peer on the IPCP's side of its socket.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib.frct import (
    ACK,
    APP_MTU,
    DATA,
    DRF,
    FC,
    FFGM,
    MAX_SACK_BLOCKS,
    MFGM,
    PCI,
    RDVS,
    RQ_SIZE,
    SACK,
    SACK_BLOCK,
    SPAN,
    Frct,
    Pci,
)
from flowlib.recovery import GO_BACK, PROBES, SEQ_MOD

MTU = 1000
PAYLOAD = MTU - PCI.size
BASE = 0x7FFFFF00  # the peer's run starts here: a run near a wrap of the 24-bit edge for good measure


def pdu(flags: int, seq: int, payload: bytes = b"x", ackno: int = 0, rwe: int = 0) -> bytes:
    return Pci(flags, rwe, seq % SEQ_MOD, ackno).pack() + payload


def receiver(**kw: int) -> Frct:
    """A reliable receiver with a run open at BASE (its first SDU taken by the application)."""
    b = Frct(MTU, True, **kw)  # type: ignore[arg-type]
    b.receive(pdu(DATA | DRF, BASE), 0.0)
    b.taken(len(b.sdus.popleft()), 0.0)
    return b


def held(b: Frct) -> int:
    """What the receiver really keeps, counted from its queues (not from its own bookkeeping)."""
    return sum(len(p) for _, p in b.ooo.values()) + sum(len(f) for f in b.fragments) + sum(len(s) for s in b.sdus)


def cpu_per_packet(feed: Callable[[int], None], n: int) -> float:
    start = time.thread_time()  # this thread's CPU: other processes' load does not count
    for i in range(n):
        feed(i)
    return (time.thread_time() - start) / n


# -- memory ---------------------------------------------------------------------------------------------


def test_fragments_forever_reset_the_flow_once_the_sdu_passes_the_application_mtu() -> None:
    b = receiver()
    b.receive(pdu(DATA | FFGM | MFGM, BASE + 1, bytes(PAYLOAD)), 0.1)
    fed = PAYLOAD
    for seq in range(BASE + 2, BASE + 100_000):
        b.receive(pdu(DATA | MFGM, seq, bytes(PAYLOAD)), 0.1)
        if b.error is not None:
            break
        fed += PAYLOAD
        b.handle_timer(0.1)
        b.pdus.clear()
    assert b.error == f"peer broke FRCT: a fragmented SDU grew past the application MTU of {APP_MTU} bytes"
    assert fed <= APP_MTU
    assert held(b) == 0 and not b.pdus
    for seq in range(seq, seq + 1000):  # noqa: B020  (the peer goes on: nothing more is taken)
        b.receive(pdu(DATA | MFGM, seq, bytes(PAYLOAD)), 0.2)
        b.handle_timer(0.2)
    assert held(b) == 0 and not b.pdus and not b.sdus


@pytest.mark.parametrize(("flags", "why"), [
    (DATA | MFGM, "a middle fragment arrived without a first one"),
    (DATA | FFGM | MFGM, "a new fragmented SDU began before the last one ended"),
])  # fmt: skip
def test_fragments_out_of_sequence_reset_the_flow(flags: int, why: str) -> None:
    b = receiver()
    if flags & FFGM:
        b.receive(pdu(DATA | FFGM | MFGM, BASE + 1), 0.1)
    b.receive(pdu(flags, BASE + 1 + bool(flags & FFGM)), 0.1)
    assert b.error == f"peer broke FRCT: {why}"


def test_a_hole_never_filled_holds_at_most_the_window_whatever_follows() -> None:
    b = receiver()
    for seq in range(BASE + 2, BASE + 50_000):
        b.receive(pdu(DATA, seq, bytes(PAYLOAD)), 0.1)
    b.handle_timer(0.1)
    assert len(b.ooo) <= RQ_SIZE and held(b) <= b.rcv_buf
    assert b.counters.out_of_window >= 50_000 - RQ_SIZE - 2
    assert b.error is None
    b.receive(pdu(DATA, BASE + 1, b"!"), 0.2)  # the hole fills: everything held is delivered in order
    assert len(b.sdus) == len(b.ooo) + 1 + RQ_SIZE - 1 - len(b.ooo) and not b.ooo


def test_data_the_application_never_takes_is_bounded_in_pdus_and_bytes() -> None:
    b = receiver()
    for seq in range(BASE + 1, BASE + 20_000):  # in order, ignoring every window we advertise
        b.receive(pdu(DATA, seq, bytes(PAYLOAD)), 0.1)
    assert len(b.sdus) <= RQ_SIZE and held(b) <= b.rcv_buf
    assert b.counters.out_of_window > 0
    # Big PDUs: the byte budget binds before the PDU count does.
    big = receiver(rcv_buf=APP_MTU + 40 * 1000)
    for seq in range(BASE + 1, BASE + 5_000):
        big.receive(pdu(DATA, seq, bytes(PAYLOAD)), 0.1)
    assert held(big) <= big.rcv_buf and len(big.sdus) < RQ_SIZE


def test_an_unreliable_flow_drops_what_its_application_does_not_take() -> None:
    b = Frct(MTU, False, rcv_buf=APP_MTU)
    for seq in range(BASE, BASE + 20_000):
        b.receive(pdu(DATA | DRF, seq, bytes(PAYLOAD)), 0.1)
    assert held(b) <= b.rcv_buf + PAYLOAD
    assert b.counters.dropped >= 20_000 - b.rcv_buf // PAYLOAD - 1


@pytest.mark.timeout(60)
def test_an_unreliable_flow_holds_few_tiny_sdus_however_many_fit_its_bytes() -> None:
    """2-byte SDUs never read: 4 MiB of them were 2 million Python objects, 112 MiB of memory. Now at
    most RQ_SIZE SDUs wait, as the window lets a sender that honours it send."""
    b = Frct(MTU, False)
    for seq in range(BASE, BASE + 20 * RQ_SIZE):
        b.receive(pdu(DATA | DRF, seq, b"ab"), 0.1)
    assert len(b.sdus) == RQ_SIZE and b.counters.dropped == 19 * RQ_SIZE
    # The legitimate use beside it: a sender that honours the window loses nothing to a slow reader.
    a, b = Frct(MTU, False, isn=lambda: BASE), Frct(MTU, False)
    now, sent, most = 0.0, 0, 0
    got: list[bytes] = []
    for step in range(100 * RQ_SIZE):
        if len(got) == 10 * RQ_SIZE:
            break
        now += 0.001
        while sent < 10 * RQ_SIZE and a.can_send(now):
            a.send(sent.to_bytes(2, "big"), now)
            sent += 1
        for p in a.pdus:
            b.receive(p, now)
        a.pdus.clear()
        most = max(most, len(b.sdus))
        if step % 3 == 0 and b.sdus:  # a reader three times slower than the writer
            got.append(b.sdus.popleft())
            b.taken(len(got[-1]), now)
        for p in b.pdus:
            a.receive(p, now)
        b.pdus.clear()
        b.handle_timer(now)
        a.handle_timer(now)
    assert most > RQ_SIZE // 2  # the reader fell behind: the window held the writer back
    assert b.counters.dropped == 0 and [int.from_bytes(x, "big") for x in got] == list(range(10 * RQ_SIZE))


def test_replays_are_dropped_and_acked_once_per_timer_check() -> None:
    b = receiver()
    first = pdu(DATA, BASE + 1, b"once")
    b.receive(first, 0.1)
    for _ in range(10_000):
        b.receive(first, 0.1)
    b.handle_timer(0.1)
    assert list(b.sdus) == [b"once"] and b.counters.duplicates == 10_000
    assert len(b.pdus) == 1  # one ack for the whole storm


def test_rendezvous_storms_get_one_window_update_per_timer_check() -> None:
    b = receiver()
    for _ in range(10_000):
        b.receive(pdu(RDVS, 0, b""), 0.1)
    b.handle_timer(0.1)
    assert len(b.pdus) == 1 and Pci.parse(b.pdus[0]).flags & FC  # (an ack owed anyway carries the window)


def test_drf_in_the_middle_of_a_run_does_not_restart_it() -> None:
    b = receiver()
    rng = random.Random(1)
    for _ in range(1000):
        b.receive(pdu(DATA | DRF, rng.getrandbits(32), b"hijack"), 0.1)
    assert b.rcv_nxt == (BASE + 1) % SEQ_MOD
    assert all(s != b"hijack" for s in b.sdus)
    assert len(b.ooo) <= RQ_SIZE


@pytest.mark.parametrize("reliable", [True, False])
def test_malformed_pcis_are_counted_and_change_nothing(reliable: bool) -> None:
    b = Frct(MTU, reliable)
    for bad in [
        b"",
        b"\x01",
        bytes(PCI.size - 1),
        pdu(DATA | DRF, 5, b""),  # data without payload
        pdu(DATA | DRF, 5, bytes(PAYLOAD + 1)),  # larger than any PDU of this layer
        pdu(DATA | DRF | RDVS, 5),
        pdu(DATA | DRF | SACK, 5),
    ]:
        b.receive(bad, 0.0)
    assert b.counters.malformed == 7
    assert not b.sdus and not b.ooo and b.rcv_nxt == 0


# -- CPU ------------------------------------------------------------------------------------------------

PER_PACKET = 200e-6  # seconds of this thread's CPU a hostile packet may cost at most (a good one: ~10 us)


def sender_in_flight() -> Frct:
    a = Frct(MTU, True, isn=lambda: BASE)
    assert a.recovery is not None
    a.recovery.cc.cwnd = float(SPAN)
    a.receive(pdu(FC, 0, b"", rwe=(BASE + SPAN) & 0xFFFFFF), 0.0)
    now = 0.0
    while a.can_send(now):
        a.send(b"x", now)
    a.pdus.clear()
    return a


def test_forged_sack_storms_cost_bounded_work() -> None:
    a = sender_in_flight()
    rng = random.Random(2)
    nxt = a.snd_nxt

    def feed(_: int) -> None:
        starts = [rng.randrange(1, SPAN) for _ in range(MAX_SACK_BLOCKS)]
        blocks = b"".join(
            SACK_BLOCK.pack((BASE + s) % SEQ_MOD, (BASE + s + rng.randrange(1, SPAN)) % SEQ_MOD) for s in starts
        )
        a.receive(pdu(ACK | SACK, 0, blocks, ackno=BASE), 0.1)
        a.pdus.clear()

    assert cpu_per_packet(feed, 5_000) < PER_PACKET
    assert a.snd_nxt == nxt and a.error is None


def test_acks_for_data_never_sent_cost_nothing_and_ack_nothing() -> None:
    a = sender_in_flight()
    unacked = len(a.unacked)

    def feed(i: int) -> None:
        a.receive(pdu(ACK | FC, 0, b"", ackno=(a.snd_nxt + 1 + i) % SEQ_MOD, rwe=i), 0.1)

    assert cpu_per_packet(feed, 20_000) < PER_PACKET
    assert len(a.unacked) == unacked
    assert a.counters.malformed == 20_000


def test_a_huge_advertised_window_does_not_let_the_sender_past_its_own_bounds() -> None:
    a = Frct(MTU, True, isn=lambda: BASE)
    a.send(b"first", 0.0)
    a.receive(pdu(FC, 0, b"", rwe=(BASE + 0x7FFFFF) & 0xFFFFFF), 0.0)  # "send me 8 million PDUs"
    assert a.recovery is not None
    a.recovery.cc.cwnd = 1e9  # even with congestion control out of the way
    n = 0
    while a.can_send(0.0) and n < 10 * SPAN:
        a.send(b"x", 0.0)
        n += 1
    assert len(a.unacked) == SPAN


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 255),
            st.integers(-40, 400),
            st.integers(-5, 5),
            st.binary(max_size=PAYLOAD + 2),
            st.integers(0, 0xFFFFFF),
        ),
        max_size=200,
    ),
    st.booleans(),
)
def test_any_sequence_of_pcis_keeps_the_receiver_within_its_bounds(
    packets: list[tuple[int, int, int, bytes, int]], reliable: bool
) -> None:
    b = Frct(MTU, reliable, rcv_buf=APP_MTU + 20 * PAYLOAD)
    b.receive(pdu(DATA | DRF, BASE), 0.0)
    for i, (flags, seq_off, ack_off, payload, rwe) in enumerate(packets):
        now = 0.001 * i
        b.receive(pdu(flags, BASE + seq_off, payload, ackno=(b.snd_nxt + ack_off) % SEQ_MOD, rwe=rwe), now)
        b.handle_timer(now)
        if i % 7 == 0 and b.sdus:
            b.taken(len(b.sdus.popleft()), now)
        assert b._held == held(b)  # the bookkeeping is exact
        assert held(b) <= b.rcv_buf + PAYLOAD
        assert len(b.ooo) <= RQ_SIZE
        assert all(len(p) >= PCI.size for p in b.pdus)


# -- a real flow, its process's memory watched -----------------------------------------------------------

VICTIM = r"""
import json, os, socket, sys, time
from flowlib import FlowError, qos
from flowlib.flow import establish
from proto import messages as m

class NoIrmd:
    def dealloc(self, flow_id): pass
    def flow_state(self, flow_id): return "down"

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

flow = establish(m.FlowReply(1, "test", int(sys.argv[2]), qos.data, "peer"), int(sys.argv[1]), NoIrmd(), client=False)
ctl = sys.stdin
print(json.dumps({"rss": rss()}), flush=True)
for line in ctl:
    if line.strip() == "read":
        flow.set_timeout(10)
        try:
            while True:
                flow.read()
        except FlowError as e:
            print(json.dumps({"rss": rss(), "error": f"{type(e).__name__}: {e}"}), flush=True)
    else:
        print(json.dumps({"rss": rss()}), flush=True)
"""


class Victim:
    """A process with one reliable flow whose IPCP side is `peer`, here."""

    def __init__(self, mtu: int) -> None:
        ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-c", VICTIM, str(ours.fileno()), str(mtu)],
            pass_fds=[ours.fileno()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        ours.close()
        self.baseline = self.ask("")["rss"]

    def ask(self, what: str) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if what:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the victim died (exit {self.proc.poll()})"
        return dict(json.loads(line))

    def rss(self) -> int:
        return int(self.ask("rss")["rss"])  # type: ignore[call-overload]

    def send(self, packets: Iterator[bytes], nbytes: int) -> int:
        """Push up to nbytes of packets (blocking as the victim's socket fills); what was accepted."""
        self.peer.settimeout(5.0)
        sent = 0
        try:
            for p in packets:
                if sent >= nbytes:
                    break
                self.peer.send(p)
                sent += len(p)
        except (TimeoutError, OSError):
            pass  # the victim stopped reading (its window is full) or reset the flow
        return sent

    def close(self) -> None:
        self.peer.close()
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def victim() -> Iterator[Victim]:
    v = Victim(8980)
    yield v
    v.close()


def crc(body: bytes) -> bytes:
    from flowlib import crc as c

    return c.add(body)


SLACK = 16 << 20  # what a process may grow by for other reasons (allocator, thread stacks, caches)


@pytest.mark.timeout(120)
def test_a_peer_sending_fragments_forever_leaves_the_receivers_memory_flat(victim: Victim) -> None:
    payload = bytes(8980 - PCI.size - 4)

    def fragments() -> Iterator[bytes]:
        yield crc(pdu(DATA | DRF | FFGM | MFGM, BASE, payload))
        seq = BASE + 1
        while True:
            yield crc(pdu(DATA | MFGM, seq, payload))
            seq += 1

    victim.send(fragments(), 200 << 20)
    reply = victim.ask("read")
    assert reply["error"] == (
        f"FlowReset: flow 1 to peer was reset: peer broke FRCT: a fragmented SDU grew "
        f"past the application MTU of {APP_MTU} bytes"
    )
    assert int(reply["rss"]) - victim.baseline < SLACK  # type: ignore[call-overload]


@pytest.mark.timeout(120)
def test_a_peer_ignoring_the_window_of_a_reader_that_never_reads_leaves_its_memory_flat(victim: Victim) -> None:
    payload = bytes(8980 - PCI.size - 4)

    def stream() -> Iterator[bytes]:
        seq = BASE
        yield crc(pdu(DATA | DRF, seq, payload))
        while True:
            seq += 1
            yield crc(pdu(DATA, seq + 1, payload))  # a hole at BASE + 1 that never fills
            yield crc(pdu(DATA, seq + SPAN, payload))  # and far past any window

    sent = victim.send(stream(), 100 << 20)
    grown = victim.rss() - victim.baseline
    assert sent > 8 * RQ_SIZE * len(payload), "the victim stopped reading its socket: the test tested nothing"
    assert grown < SLACK, f"{grown >> 20} MB more after {sent >> 20} MB from the peer"


@pytest.mark.timeout(60)
def test_an_encrypted_flow_without_frct_holds_no_empty_sdus_and_few_tiny_ones() -> None:
    """The engine's backlog for an application that does not read counted bytes only: sealed empty SDUs
    (the peer has the key) grew it without end, 2-byte ones to half a million Python objects."""
    from typing import cast

    from flowlib import crc as c
    from flowlib import qos
    from flowlib.crypto import AES_256_GCM, PacketCrypto
    from flowlib.engine import BACKLOG_SDUS
    from flowlib.flow import establish
    from flowlib.irm import IrmClient
    from proto import messages as m

    class NoIrmd:
        def dealloc(self, flow_id: int) -> None:
            pass

    key = os.urandom(32)
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reply = m.FlowReply(1, "test", 1400, qos.raw_no_errors, "peer", cipher=AES_256_GCM, key=key)
    flow = establish(reply, ours.detach(), cast(IrmClient, NoIrmd()), client=False)
    sealer = PacketCrypto(AES_256_GCM, key, server=False)
    s = flow._session
    assert s is not None and s.frct is None and s.crypto is not None
    peer.settimeout(10)

    def flood(sdu: bytes, n: int, dropped: int) -> None:
        rejected = s.rejected
        for _ in range(n):
            peer.send(c.add(sealer.seal(sdu)))
        deadline = time.monotonic() + 20  # until the engine has dropped what it will
        while s.rejected - rejected < dropped and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        flood(b"", 3 * BACKLOG_SDUS, 3 * BACKLOG_SDUS)
        assert s.rejected == 3 * BACKLOG_SDUS and not s.backlog
        # The legitimate use beside it: an SDU after them is read at once, the empty ones never.
        flow.set_timeout(5)
        peer.send(c.add(sealer.seal(b"hello")))
        assert flow.read() == b"hello"
        flood(b"ab", 3 * BACKLOG_SDUS, BACKLOG_SDUS)  # (the application's socket takes some)
        assert len(s.backlog) <= BACKLOG_SDUS
        assert flow.read() == b"ab"  # what was kept is read in order
    finally:
        flow.close()
        peer.close()


# -- through a real IRMd, the attacker uid 65534 ---------------------------------------------------------

ROOT_SERVER = r"""
import json, threading
from flowlib import FlowError, flow_accept

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024

def echo(flow):
    try:
        while True:
            flow.write(flow.read())
    except FlowError as e:
        print(json.dumps({"rss": rss(), "error": f"{type(e).__name__}: {e}"}), flush=True)

print(json.dumps({"rss": rss()}), flush=True)
while True:
    threading.Thread(target=echo, args=(flow_accept(timeout=120),), daemon=True).start()
"""

RAW_FRAGMENTS = r"""
import socket, sys
from flowlib.crc import add
from flowlib.frct import DATA, DRF, FFGM, MFGM, PCI, Pci
from flowlib.irm import IrmClient
from proto.qos import data
reply, fd = IrmClient().alloc("sink", data, 10)  # the raw end: no FRCT of ours in the way
s = socket.socket(fileno=fd)
s.settimeout(10)
payload = bytes(min(reply.mtu, 65000) - PCI.size - 4)
seq, sent = 1, 0
try:
    s.send(add(Pci(DATA | DRF | FFGM | MFGM, 0, seq, 0).pack() + payload))
    while sent < int(sys.argv[1]):
        seq, sent = seq + 1, sent + len(payload)
        s.send(add(Pci(DATA | MFGM, 0, seq, 0).pack() + payload))  # more fragments, never the last
except OSError as e:
    print("ended:", e.strerror)
print("sent", sent)
"""

ECHO_ONCE = r"""
from flowlib import flow_alloc, qos
with flow_alloc("sink", qos.data, timeout=10) as f:
    f.write(b"x" * 60_000)  # fragmented below the MTU of the layer, as it should be
    f.set_timeout(10)
    got = b""
    while len(got) < 60_000:
        got += f.read()
print("echoed", len(got))
"""


@pytest.mark.timeout(180)
@pytest.mark.skipif(os.geteuid() != 0, reason="playing uid 65534 against a root server needs root and setpriv")
def test_uid_65534_sending_endless_fragments_to_a_root_server_leaves_its_memory_flat() -> None:
    from helpers import BIN, start_irmd, stop_irmd

    d = Path(tempfile.mkdtemp(prefix="frct-flood-", dir="/tmp"))
    d.chmod(0o755)
    irmd = start_irmd(d)
    srv = None
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        srv = subprocess.Popen([str(BIN / "python"), "-c", ROOT_SERVER], env=irmd.env, stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
        assert srv.stdout is not None
        baseline = json.loads(srv.stdout.readline())["rss"]
        irmd.irm_ok("bind", "process", str(srv.pid), "name", "sink")
        irmd.irm_ok("name", "register", "sink", "layer", "local")
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(BIN / "python"), "-c"]
        env = {**irmd.env, "HOME": "/nonexistent"}
        r = subprocess.run([*nobody, RAW_FRAGMENTS, str(200 << 20)], env=env, capture_output=True, text=True,
                           timeout=120, cwd="/")  # fmt: skip
        assert "sent" in r.stdout, r.stdout + r.stderr
        reply = json.loads(srv.stdout.readline())
        assert reply["error"].endswith(f"peer broke FRCT: a fragmented SDU grew past the application MTU of "
                                       f"{APP_MTU} bytes"), reply  # fmt: skip
        assert reply["rss"] - baseline < SLACK, f"{(reply['rss'] - baseline) >> 20} MB more"
        r = subprocess.run([*nobody, ECHO_ONCE], env=env, capture_output=True, text=True, timeout=60, cwd="/")
        assert "echoed 60000" in r.stdout, r.stdout + r.stderr  # a well-behaved reliable flow, beside
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        stop_irmd(irmd)
        shutil.rmtree(d, ignore_errors=True)


# -- forged acks against loss recovery ----------------------------------------------------------------


class ForgingPeer:
    """Drives a sender with acks and SACKs of its own making, counting the copies each buys."""

    def __init__(self) -> None:
        self.a = Frct(MTU, True, isn=lambda: SEQ_MOD - 600)  # near the 32-bit wrap for good measure
        self.now = 0.0
        self.packets = 0
        for _ in range(40):  # an honest start: instant acks, so srtt is tiny and the window full-grown
            self.fill()
            self.now += 0.0001
            self.ack(self.a.snd_nxt)
        self.fill()

    def ack(self, ackno: int, blocks: list[tuple[int, int]] | None = None) -> None:
        self.packets += 1
        flags = ACK | FC | DRF | (SACK if blocks else 0)
        body = b"".join(SACK_BLOCK.pack(s % SEQ_MOD, e % SEQ_MOD) for s, e in blocks or [])
        self.a.receive(Pci(flags, (ackno + RQ_SIZE * 4) % SEQ_MOD, 0, ackno % SEQ_MOD).pack() + body, self.now)
        self.a.pdus.clear()

    def fill(self) -> None:
        while self.a.can_send(self.now):
            self.a.send(bytes(PAYLOAD), self.now)
        self.a.pdus.clear()

    def copies_per_packet(self, attack: Callable[[], None], seconds: float = 1.0) -> float:
        self.packets, before, end = 0, self.a.counters.retransmitted, self.now + seconds
        while self.now < end and self.a.error is None:
            attack()
        return (self.a.counters.retransmitted - before) / max(self.packets, 1)


def test_an_ack_forged_after_each_timeout_buys_a_few_copies_not_a_window() -> None:
    """Everything sent before a timeout is taken as lost, but resent only as acks pay for it."""
    peer = ForgingPeer()
    a = peer.a
    assert a.recovery is not None and len(a.unacked) > 500

    def attack() -> None:
        peer.now = a.get_timer() or peer.now
        a.handle_timer(peer.now)
        a.pdus.clear()
        if a.recovery is not None and a.recovery.timeouts:  # after a timeout (not a probe): ack one PDU
            peer.ack(a.recovery.una + 1)
            peer.fill()

    # The go-back, two for the PDU acked, the timeout's copy and the probes: not the window (was ~1,000).
    assert peer.copies_per_packet(attack) <= GO_BACK + 2 + 1 + PROBES


def test_sacks_forged_for_each_new_pdu_buy_a_few_copies_not_every_hole() -> None:
    """A fast-acking peer that holds every other PDU and SACKs each new one cannot make every hole
    look lost again on every packet (RACK waits a round trip, and second repairs are paid for)."""
    peer = ForgingPeer()
    a = peer.a
    assert a.recovery is not None
    una = a.recovery.una
    for i in range(1, SPAN, 16):  # holes at every other PDU
        peer.ack(una, [(una + j, una + j + 1) for j in range(i, min(i + 16, SPAN), 2)][:MAX_SACK_BLOCKS])

    def attack() -> None:
        assert a.recovery is not None
        peer.now += 0.0005
        peer.ack(a.recovery.una + 2)
        peer.fill()
        newest = (a.snd_nxt - 1) % SEQ_MOD
        peer.now += 0.0005
        peer.ack(a.recovery.una, [(newest, newest + 1)])
        if (due := a.get_timer()) is not None and due <= peer.now:
            a.handle_timer(peer.now)
            a.pdus.clear()

    assert peer.copies_per_packet(attack) < 5  # (was about 250)


def test_one_forged_sack_of_the_newest_pdus_buys_a_few_copies_not_the_flight() -> None:
    """A PDU is lost once DUP_THRESH PDUs above it are held (not DUP_THRESH places), and each repair is
    paid for by arrivals: SACKing the newest PDUs of a full flight, then or right after a timeout,
    makes the sender resend a few PDUs, not the 1,000 below them."""
    peer = ForgingPeer()
    a = peer.a
    assert a.recovery is not None and len(a.unacked) > 500
    una, newest = a.recovery.una, (a.snd_nxt - 1) % SEQ_MOD
    before = a.counters.retransmitted
    peer.ack(una, [(newest, newest + 1)])
    assert a.counters.retransmitted - before == 0, "one PDU held above proves no loss below it"
    peer.ack(una, [(newest - 3, newest + 1)])
    assert a.counters.retransmitted - before <= 2 * 4 + 16
    peer.now = a.get_timer() or peer.now  # a timeout, then the same forgery again
    a.handle_timer(peer.now)
    a.pdus.clear()
    before = a.counters.retransmitted
    peer.ack(una, [(newest - 7, newest + 1)])
    assert a.counters.retransmitted - before <= 2 * 8 + 16 + GO_BACK
