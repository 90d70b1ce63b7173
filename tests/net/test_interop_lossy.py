# ruff: noqa: F811 (the fixtures imported from test_interop are parameters here)
"""Reliable (qos data) flows between C Ouroboros 0.23 and ours over a veth that loses and reorders
packets, as a real network does: byte streams both ways, FRCT's flow control against a slow reader
on either side, and deallocation with data not yet acknowledged (linger).

The kernel here has no netem. In each namespace an nftables table drops a share of the udp4 data
datagrams arriving (eid not 0: allocation is not under test) and marks a share of those leaving for
an HTB class slowed to a few Mb/s, so they arrive behind later ones. Both go with the namespaces;
the fixture also removes them first. The C end is tests/net/c/o7s_peer.c (sink and source), ours is
this process. Needs root, the C build and nftables; skipped, saying why, otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for

from flowlib import flow_accept, flow_alloc, qos
from flowlib.flow import Flow
from flowlib.irm import IrmClient
from proto.errors import FlowTimeout

pytest.importorskip("test_interop", reason="needs the C interop harness (tests/net/test_interop.py)")
from test_interop import LAYER, Pair, c_alloc, c_ouroboros, c_peer, pair, udp_layer  # noqa: F401 (fixtures)

# Not passing, because of C 0.23 itself (docs/interop.md, "Reliable flows over a lossy path"; two C nodes
# fail the same ways): a C receiver's two readers of its rx ring race (ssm_rbuff_read tests for emptiness
# outside the mutex), read stale packets and crash the sink; a C writer and its retransmission thread both
# wait for a pool block that only the latter would free (RXM_BLOCKING). Not run by the suite (each stalls
# for minutes); kept as the specification of what is to work: `pytest --runxfail` runs them, and
# OUROBOROS_C=<a 0.23 with the rx ring's read fixed> shows ours -> C passing.
pytestmark = [
    pytest.mark.net,
    pytest.mark.xfail(
        reason="C 0.23 crashes (rx ring race) or deadlocks (pool) under loss, C <-> C alike (not run)", run=False
    ),
]

log = logging.getLogger(__name__)

PORT = 3435  # both udp4 IPCPs' port: every data datagram goes to it
TABLE = "o7impair"
SLOW_CLASS = "1:20"  # the HTB class a reordered packet waits in
SLOW_RATE = "8mbit"


def pattern(start: int, n: int) -> bytes:
    """Bytes start..start+n of o7s_peer.c's stream: byte i is byte i % 4 of the big-endian i // 4."""
    first, last = start // 4, (start + n + 3) // 4
    words = struct.pack(f"!{last - first}I", *(k & 0xFFFFFFFF for k in range(first, last)))
    return words[start % 4 : start % 4 + n]


# -- the impaired veth ------------------------------------------------------------------------------


def _nft(ns: str, *args: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"nft {' '.join(args)} in {ns} failed: {r.stderr}"
    return r.stdout


def _tc(ns: str, *args: str) -> None:
    r = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"tc {' '.join(args)} in {ns} failed: {r.stderr}"


@dataclasses.dataclass
class Impaired:
    """The pair, with loss and reordering on both ends' veths (applied by `start`)."""

    pair: Pair
    sides: list[tuple[str, str]]  # (namespace, device)

    def start(self, loss: int, reorder: int, control_loss: int = 0) -> None:
        """Drop `loss` % of the data datagrams arriving at each end and delay `reorder` % of those
        leaving it; with `control_loss`, drop that % of FRCT packets without data too (flags byte,
        the first after the 4-byte eid, without DATA), which only a lossy path's acks meet."""
        data = ("udp", "dport", str(PORT), "@th,64,32", "!=", "0")  # eid 0 is management
        for ns, dev in self.sides:
            _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q", "100000")
            _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")
            _tc(ns, "class", "add", "dev", dev, "parent", "1:", "classid", SLOW_CLASS, "htb", "rate", SLOW_RATE)
            _nft(ns, "add", "table", "inet", TABLE)
            _nft(ns, "add", "chain", "inet", TABLE, "in", "{ type filter hook input priority 0; }")
            _nft(ns, "add", "chain", "inet", TABLE, "out", "{ type filter hook output priority 0; }")
            _nft(ns, "add", "rule", "inet", TABLE, "in", *data, "counter")
            # Dropped on arrival: a drop on output would fail the sender's sendto (EPERM).
            _nft(ns, "add", "rule", "inet", TABLE, "in", *data, "numgen", "random", "mod", "100", "<", str(loss),
                 "counter", "drop")  # fmt: skip
            if control_loss:
                _nft(ns, "add", "rule", "inet", TABLE, "in", *data, "@th,96,8", "&", "1", "==", "0",
                     "numgen", "random", "mod", "100", "<", str(control_loss), "counter", "drop")  # fmt: skip
            # HTB takes a packet's priority naming one of its classes as that class.
            _nft(ns, "add", "rule", "inet", TABLE, "out", *data, "numgen", "random", "mod", "100", "<",
                 str(reorder), "counter", "meta", "priority", "set", SLOW_CLASS)  # fmt: skip

    def counts(self) -> dict[str, int]:
        """Data datagrams seen arriving, dropped and delayed, over both ends."""
        total = {"seen": 0, "dropped": 0, "delayed": 0}
        for ns, _ in self.sides:
            out = json.loads(_nft(ns, "-j", "list", "table", "inet", TABLE))["nftables"]
            for item in out:
                if "rule" not in item:
                    continue
                rule = item["rule"]
                packets = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
                if rule["chain"] == "out":
                    total["delayed"] += packets
                elif any("drop" in e for e in rule["expr"]):
                    total["dropped"] += packets
                else:
                    total["seen"] += packets
        return total

    def stop(self) -> None:
        for ns, dev in self.sides:
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", TABLE], capture_output=True)
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], capture_output=True)


@pytest.fixture
def lossy(pair: Pair) -> Iterator[Impaired]:
    """The C node and ours in a udp4 layer, its veth ready to lose and reorder (`start`)."""
    for tool in ("nft", "tc"):
        if shutil.which(tool) is None:
            pytest.skip(f"`{tool}` is not installed (Debian: nftables, iproute2)")
    udp_layer(pair)
    imp = Impaired(pair, [(pair.c.ns, pair.c_dev), (pair.ours.ns, pair.ours.dev)])
    try:
        yield imp
    finally:
        imp.stop()


def assert_impaired(imp: Impaired, min_drops: int = 1) -> None:
    c = imp.counts()
    assert c["dropped"] >= min_drops and c["delayed"] >= 1, f"the veth was not impaired: {c}"
    log.info("impairment: %s", c)


# -- the two ends -----------------------------------------------------------------------------------


def c_sink(p: Pair, c_peer: Path, nbytes: int, delay_us: int = 0, hold_ms: int = 3000) -> Path:
    """o7s_peer sink, bound to c-peer and registered in the layer."""
    out = p.c_spawn("c-sink", str(c_peer), "sink", str(nbytes), str(delay_us), str(hold_ms), bind="c-peer")
    p.c.ok("irm", "name", "reg", "c-peer", "layer", LAYER)
    return out


def our_name(p: Pair) -> IrmClient:
    """This process bound to py-peer, registered in the layer and known to the C node."""
    p.ours.irmd.irm_ok("bind", "process", str(os.getpid()), "name", "py-peer")
    p.ours.irmd.irm_ok("name", "register", "py-peer", "layer", LAYER)
    p.c.ok("irm", "name", "create", "py-peer")  # 0.23 allocates only to names it knows
    return IrmClient(p.ours.irmd.sock)


def accept_from_c(p: Pair, c_peer: Path, irm: IrmClient, nbytes: int, sdu: int) -> tuple[Flow, Path]:
    """o7s_peer source started towards py-peer, and our end of its flow."""
    out = p.c_spawn("c-source", str(c_peer), "source", "py-peer", str(nbytes), str(sdu))
    try:
        flow = flow_accept(None, 30, irm=irm)
    except FlowTimeout:
        raise AssertionError(f"no flow from the C source:\n{out.read_text()}{p.logs()}") from None
    return flow, out


def receive(flow: Flow, nbytes: int, budget: float, pause: float = 0.0) -> bytes:
    """Read nbytes (sleeping `pause` before each read: a slow reader) within `budget` seconds."""
    got = bytearray()
    end = time.monotonic() + budget
    flow.set_timeout(1.0)
    while len(got) < nbytes and time.monotonic() < end:
        if pause:
            time.sleep(pause)
        with contextlib.suppress(FlowTimeout):
            got += flow.read()
    return bytes(got)


def first_difference(got: bytes, want: bytes) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return f"{len(got)} of {len(want)} bytes, first difference at byte {n}"


def wait_text(out: Path, words: str, seconds: float, what: str, p: Pair) -> str:
    wait_for(lambda: words in out.read_text() or " failed" in out.read_text(), seconds, what + p.logs())
    return out.read_text()


def c_to_ours(imp: Impaired, c_peer: Path, nbytes: int, sdu: int, budget: float, pause: float = 0.0) -> None:
    """The C source's stream arrives here whole, in order, once, within `budget`; the C end, which
    deallocates as soon as it has written, returns from flow_dealloc once we acknowledged it all."""
    p = imp.pair
    irm = our_name(p)
    try:
        flow, out = accept_from_c(p, c_peer, irm, nbytes, sdu)
        t0 = time.monotonic()
        got = receive(flow, nbytes, budget, pause)
        took = time.monotonic() - t0
        want = pattern(0, nbytes)
        assert got == want, f"C -> ours: {first_difference(got, want)} in {took:.1f} s\n{out.read_text()}{p.logs()}"
        # Open until the C end let go: its copies of data whose ack was lost are acked again.
        text = wait_text(out, "source deallocated", 30, "the C source to deallocate", p)
        extra = receive(flow, 1, 0.5)
        flow.close()
    finally:
        irm.close()
    assert "source deallocated" in text, text
    assert not extra, f"{len(extra)} bytes more than the C source wrote"
    assert took < budget, f"the stream took {took:.1f} s"


def ours_to_c(imp: Impaired, c_peer: Path, nbytes: int, sdu: int, budget: float, delay_us: int = 0) -> None:
    """Our stream reaches the C sink whole, in order, once, within `budget`; our close, right after
    the last write, returns once the C end acknowledged it all."""
    p = imp.pair
    out = c_sink(p, c_peer, nbytes, delay_us)
    client = IrmClient(p.ours.irmd.sock)
    try:
        flow = c_alloc(lambda: flow_alloc("c-peer", qos=qos.data, timeout=10, irm=client))
        data = pattern(0, nbytes)
        t0 = time.monotonic()
        for i in range(0, nbytes, sdu):
            flow.write(data[i : i + sdu])
        flow.close()
        took = time.monotonic() - t0
    finally:
        client.close()
    text = wait_text(out, "sink deallocated", 30, "the C sink to finish", p)
    assert f"sink ok {nbytes} bytes" in text, f"ours -> C after {took:.1f} s:\n{text}{p.logs()}"
    assert "sink extra" not in text, text
    assert took < budget, f"the stream and our close took {took:.1f} s"


# -- streams ----------------------------------------------------------------------------------------

MB = 1 << 20
# 0.23's sender keeps a pool block for each PDU not yet acknowledged, and its retransmission thread
# frees them only as it runs; under loss, with its window of 256 PDUs of 1 KiB, it waits for a block
# of its own 2 KiB class (384 of them) that only it could free, and the flow stops for good, whatever
# the peer (RXM_BLOCKING, timerwheel.c:226-232; SSM_GSPP_2K_BLOCKS). SDUs of 200 bytes take blocks of
# 512 bytes, of which it has 768: a whole window and its copies fit.
SDU = 200
LOSS, REORDER = 5, 10  # % of data datagrams, each way


@pytest.mark.timeout(150)
def test_a_c_stream_arrives_whole_and_in_order_over_a_lossy_reordering_path(lossy: Impaired, c_peer: Path) -> None:
    lossy.start(LOSS, REORDER)
    c_to_ours(lossy, c_peer, MB // 2, SDU, budget=60)
    assert_impaired(lossy, min_drops=20)


@pytest.mark.timeout(150)
def test_our_stream_reaches_c_whole_and_in_order_over_a_lossy_reordering_path(lossy: Impaired, c_peer: Path) -> None:
    lossy.start(LOSS, REORDER)
    ours_to_c(lossy, c_peer, MB // 2, SDU, budget=60)
    assert_impaired(lossy, min_drops=20)


# -- flow control -----------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_c_sender_resumes_after_our_slow_reader_reopens_its_window_under_loss(lossy: Impaired, c_peer: Path) -> None:
    """Our reader is slower than the C writer, so our window closes again and again. A blocking C
    writer at a closed window sends no rendez-vous (frct.c:559-575 waits without a timeout) and,
    everything it sent being acknowledged, has nothing to resend: only our window update wakes it,
    and the path loses some of them."""
    lossy.start(LOSS, REORDER, control_loss=30)
    c_to_ours(lossy, c_peer, MB // 4, SDU, budget=60, pause=0.001)


@pytest.mark.timeout(150)
def test_our_sender_keeps_to_the_window_of_a_slow_c_reader_under_loss(lossy: Impaired, c_peer: Path) -> None:
    """The C sink reads one SDU each 2 ms: its window (256 PDUs past what it has read, frct.c:615-622)
    closes, our sender asks with rendez-vous and resumes on its window updates; nothing is lost,
    repeated or sent past its window."""
    lossy.start(LOSS, REORDER)
    ours_to_c(lossy, c_peer, MB // 4, SDU, budget=60, delay_us=1000)


# -- deallocation with data unacknowledged ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_c_writer_that_deallocates_at_once_still_delivers_everything_to_us(lossy: Impaired, c_peer: Path) -> None:
    """o7s_peer source deallocates right after its last write: 0.23 lingers, retransmitting, until
    we acknowledged it all (frct.c:654-683, dev.c's flow_dealloc), and returns then, not after its R timer."""
    lossy.start(20, REORDER)
    c_to_ours(lossy, c_peer, 256 * SDU, SDU, budget=30)
    text = (lossy.pair.lab.tmp / "c-source.out").read_text()
    m = re.search(r"source deallocated after (\d+) ms", text)
    assert m and int(m.group(1)) < 20000, text


@pytest.mark.timeout(120)
def test_our_close_with_data_unacknowledged_delivers_everything_to_c(lossy: Impaired, c_peer: Path) -> None:
    """Our close right after the last write lingers, retransmitting, until the C end acknowledged
    everything: at 20% loss many of the last PDUs are still in flight when it begins."""
    lossy.start(20, REORDER)
    ours_to_c(lossy, c_peer, 256 * SDU, SDU, budget=30)
