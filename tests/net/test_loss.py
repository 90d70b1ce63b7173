"""Reliable flows over a lossy path: two namespaces on a veth pair, a udp4 layer, nftables dropping.

The kernel here has no netem; an nftables rule on the receiving veth's ingress hook drops a random
share of the frames (`numgen random mod 100 < N drop`), counted so the test knows the loss happened.
Host B (this test process, through B's irmd) sends 10 MB over qos.data to a sink bound on host A,
which checks them by sha256. Needs root, `ip netns` and `nft` (Debian package nftables); skipped,
saying why, otherwise. The `lab` fixture deletes the namespaces (and with them the rules) and stops
the irmds; the sink process is killed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Host, Lab
from helpers import udp4_bootstrap
from reliable_peer import payload, send_all, start_sink

from flowlib import FlowDown, FlowTimeout, flow_alloc, qos
from flowlib.irm import IrmClient

pytestmark = [pytest.mark.net]

LAYER = "lan"
PORT = 3435
MB = 1_000_000
CHUNK = 1400
BUDGET = 60.0  # seconds a transfer may take
_subnets = itertools.count()


def nft_missing() -> str | None:
    if shutil.which("nft") is None:
        return "nftables' `nft` is not installed (Debian: apt-get install nftables)"
    return None


def subnet() -> str:
    return f"10.{150 + os.getpid() % 50}.{next(_subnets) % 250}"


def nft(host: Host, *args: str) -> str:
    r = subprocess.run(["ip", "netns", "exec", host.ns, "nft", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"nft {' '.join(args)} failed: {r.stderr}"
    return r.stdout


def drop_on_ingress(host: Host, percent: int) -> None:
    """Count every frame arriving on the host's veth, and drop `percent` % of them at random."""
    nft(host, "add", "table", "netdev", "loss")
    nft(host, "add", "chain", "netdev", "loss", "in", f"{{ type filter hook ingress device {host.dev} priority 0; }}")
    nft(host, "add", "rule", "netdev", "loss", "in", "counter")
    nft(
        host,
        "add",
        "rule",
        "netdev",
        "loss",
        "in",
        "numgen",
        "random",
        "mod",
        "100",
        "lt",
        str(percent),
        "counter",
        "drop",
    )


def ingress_counts(host: Host) -> tuple[int, int]:
    """(frames seen, frames dropped) by the rules of drop_on_ingress."""
    rules = [
        item["rule"]
        for item in json.loads(nft(host, "-j", "list", "table", "netdev", "loss"))["nftables"]
        if "rule" in item
    ]
    counters = [e["counter"]["packets"] for r in rules for e in r["expr"] if "counter" in e]
    return counters[0], counters[1]


@pytest.fixture
def lossy(lab: Lab, two_hosts: tuple[Host, Host]) -> Callable[..., tuple[Host, Host]]:
    """`lossy()`: hosts a and b, with addresses and a udp4 layer between them (start_loss makes it lossy)."""
    reason = nft_missing()
    if reason:
        pytest.skip(reason)

    def make() -> tuple[Host, Host]:
        a, b = two_hosts
        net = subnet()
        ip_a, ip_b = f"{net}.1", f"{net}.2"
        a.ip("addr", "add", f"{ip_a}/24", "dev", a.dev)
        b.ip("addr", "add", f"{ip_b}/24", "dev", b.dev)
        a.irmd.irm_ok(*udp4_bootstrap(LAYER, ip_a, "port", str(PORT)))
        b.irmd.irm_ok(*udp4_bootstrap(LAYER, ip_b, "port", str(PORT), "peer", ip_a))
        a.irmd.note_children()
        b.irmd.note_children()
        return a, b

    return make


def start_loss(a: Host, b: Host, percent: int, both_ways: bool) -> None:
    """Applied once the flow is up: the shims' name resolution and allocation are not under test here."""
    if percent:
        drop_on_ingress(a, percent)
        if both_ways:  # the acks too
            drop_on_ingress(b, percent)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("percent", "both_ways"), [(0, False), (5, False), (20, False), (5, True)], ids=["0%", "5%", "20%", "5%-both-ways"]
)
def test_ten_megabytes_over_qos_data_arrive_intact_despite_loss(
    lossy: Callable[..., tuple[Host, Host]],
    tmp_path: Path,
    percent: int,
    both_ways: bool,
    record_property: Callable[[str, object], None],
) -> None:
    a, b = lossy()
    nbytes = 10 * MB
    data = payload(nbytes, seed=percent)
    sink = start_sink(a.irmd, LAYER, "sink", nbytes, tmp_path, read_timeout=BUDGET)
    client = IrmClient(b.irmd.sock)
    try:
        flow = flow_alloc("sink", qos=qos.data, timeout=30, irm=client)
        start_loss(a, b, percent, both_ways)
        t0 = time.monotonic()
        send_all(flow, data, CHUNK)
        flow.close()  # returns once everything is acknowledged
        result = sink.result(timeout=BUDGET + 30)
        seconds = time.monotonic() - t0
        frames, dropped = ingress_counts(a) if percent else (0, 0)
    finally:
        sink.kill()
        with contextlib.suppress(Exception):
            client.close()
    assert result["end"] == "complete", result
    assert result["bytes"] == nbytes
    assert result["sha256"] == hashlib.sha256(data).hexdigest(), "the bytes differ"
    assert result["max_sdu"] == CHUNK
    goodput = nbytes * 8 / seconds / 1e6
    where = "both veths" if both_ways else "the receiving veth"
    print(
        f"\n[figure] goodput at {percent}% loss (nft on {where}): {goodput:.2f} Mb/s, "
        f"{seconds:.1f} s for 10 MB"
        + (f"; {dropped} of {frames} frames dropped ({100 * dropped / frames:.1f}%)" if frames else "")
    )
    record_property(f"goodput_loss{percent}{'_both_ways' if both_ways else ''}_mbps", round(goodput, 3))
    if percent:
        assert frames > nbytes // 9000, "the transfer never crossed the lossy veth"
        assert abs(100 * dropped / frames - percent) < max(2.0, percent / 4), "the loss was not as configured"
    assert seconds < BUDGET, f"10 MB took {seconds:.1f} s at {percent}% loss"


@pytest.mark.timeout(180)
def test_a_peer_cut_off_mid_transfer_gives_flow_down_not_a_hang(
    lossy: Callable[..., tuple[Host, Host]], tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    a, b = lossy()
    sink = start_sink(a.irmd, LAYER, "sink", 10**12, tmp_path, read_timeout=120)
    client = IrmClient(b.irmd.sock)
    try:
        flow = flow_alloc("sink", qos=qos.data, timeout=30, irm=client)
        flow.set_timeout(1.0)
        chunk = bytes(CHUNK)
        for _ in range(500):
            flow.write(chunk)
        nft(a, "add", "table", "netdev", "cut")  # the path goes silent: no ICMP, no EOF, nothing
        nft(
            a,
            "add",
            "chain",
            "netdev",
            "cut",
            "in",
            f"{{ type filter hook ingress device {a.dev} priority 0; policy drop; }}",
        )
        t0 = time.monotonic()
        with pytest.raises(FlowDown):
            while time.monotonic() - t0 < 90:
                with contextlib.suppress(FlowTimeout):
                    flow.write(chunk)
        took = time.monotonic() - t0
        print(f"\n[figure] FlowDown {took:.1f} s after the path was cut")
        record_property("flow_down_after_cut_s", round(took, 1))
        flow.close()
    finally:
        sink.kill()
        with contextlib.suppress(Exception):
            client.close()
    assert took < 60, f"FlowDown only after {took:.1f} s"
