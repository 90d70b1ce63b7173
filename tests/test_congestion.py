"""Congestion avoidance in a unicast layer (`congestion mb-ecn`) end to end: a sender flooding a
raw flow over a slow link is paced down to the link's rate by the marks its receiver echoes.

Two IRMds on loopback over a udp layer whose shims send at 16 Mbit/s (the test-only `impair rate`);
the writers run in this process, the sinks are bound processes counting what arrives.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from unicast_net import Cluster, Host

from flowlib.flow import flow_alloc
from flowlib.irm import IrmClient
from flowlib.qos import raw

SDU = 1000
FLOOD = 3.0  # seconds of writing as fast as the sender can
LINK = "rate=16"
FAST = "rate=1000"

# Counts the SDUs of one flow until it has been quiet for 2 s after the first; prints the count.
SINK = r"""
from flowlib import FlowError, FlowTimeout, flow_accept
print("ready", flush=True)
f = flow_accept()
f.read()
n = 1
f.set_timeout(2)
try:
    while True:
        f.read()
        n += 1
except (FlowTimeout, FlowError):
    pass
print(n, flush=True)
"""


def line(cluster: Cluster, congestion: str, hops: int) -> tuple[Host, Host]:
    """Hosts in a line, `hops` apart, whose last hop is the slow link; the first and the last."""
    hosts = cluster.start([chr(ord("a") + i) for i in range(hops + 1)])
    # Fast links where there are any (impaired too: an impaired shim talks only to its kind), then
    # the slow one: the shim that sends into it waits, and its queue builds at the forwarder before it.
    cluster.udp(hosts[:-2], impair=FAST)
    cluster.udp(hosts[-2:], impair=LINK)
    hosts[0].irm_ok(
        "ipcp", "bootstrap", "type", "unicast", "name", "n0", "layer", "net", "congestion", congestion, "autobind"
    )
    for i, h in enumerate(hosts[1:], start=1):
        h.irm_ok("ipcp", "enroll", "type", "unicast", "name", f"n{i}", "layer", "net", "dst", f"n{i - 1}", "autobind")
        h.irm_ok("ipcp", "connect", "name", f"n{i}", "dst", f"n{i - 1}")
    return hosts[0], hosts[-1]


def flood(cluster: Cluster, congestion: str, flows: int = 1, hops: int = 1) -> list[tuple[int, int]]:
    """(SDUs arrived, SDUs written) of each of `flows` raw flows written at once, as fast as can be."""
    a, b = line(cluster, congestion, hops)
    sinks = []
    for i in range(flows):
        sink = subprocess.Popen([sys.executable, "-c", SINK], env=b.irmd.env, stdout=subprocess.PIPE, text=True)
        b.procs.append(sink)  # type: ignore[arg-type]  # stopped with the cluster
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        b.irm_ok("bind", "process", str(sink.pid), "name", f"sink{i}")
        b.irm_ok("name", "register", f"sink{i}", "layer", "net")
        sinks.append(sink.stdout)
    irm = IrmClient(a.irmd.sock)
    try:
        opened = [flow_alloc(f"sink{i}", qos=raw, timeout=20, irm=irm) for i in range(flows)]
        sent = [0] * flows

        def write(i: int) -> None:
            sdu = bytes(SDU)
            start = time.monotonic()
            while time.monotonic() - start < FLOOD:
                opened[i].write(sdu)
                sent[i] += 1

        writers = [threading.Thread(target=write, args=(i,)) for i in range(flows)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        got = [int(out.readline()) for out in sinks]
        for flow in opened:
            flow.close()
    finally:
        irm.close()
    return list(zip(got, sent, strict=True))


@pytest.mark.timeout(120)
def test_a_flood_over_a_slow_link_is_paced_to_it_with_mb_ecn(cluster: Cluster) -> None:
    ((got, sent),) = flood(cluster, "mb-ecn")
    print(f"congestion mb-ecn: {got} of {sent} SDUs arrived")
    link = FLOOD * 16e6 / 8 / SDU  # SDUs the link can carry while the sender writes
    assert got >= 0.9 * sent, f"{sent - got} of {sent} SDUs lost: the sender was not held back"
    assert got >= 0.35 * link, f"only {got} SDUs of the link's {link:.0f} arrived: the sender starved itself"


@pytest.mark.timeout(120)
def test_without_congestion_avoidance_the_same_flood_mostly_drops(cluster: Cluster) -> None:
    ((got, sent),) = flood(cluster, "none")
    print(f"congestion none: {got} of {sent} SDUs arrived")
    assert got < 0.3 * sent  # what the test above guards against does happen


@pytest.mark.timeout(120)
def test_two_paced_flows_share_the_slow_link(cluster: Cluster) -> None:
    (got1, sent1), (got2, sent2) = flood(cluster, "mb-ecn", flows=2)
    print(f"two flows: {got1} of {sent1} and {got2} of {sent2} SDUs arrived")
    assert got1 + got2 >= 0.9 * (sent1 + sent2)
    assert min(got1, got2) >= 0.15 * (got1 + got2), "one flow starved the other"


@pytest.mark.timeout(150)
def test_a_forwarder_marks_for_a_sender_two_hops_away(cluster: Cluster) -> None:
    """The bottleneck is the middle host's link: only its forwarder sees the queue, and only the
    marks it sets (echoed by the last host) can slow the first one down."""
    ((got, sent),) = flood(cluster, "mb-ecn", hops=2)
    print(f"two hops, mb-ecn: {got} of {sent} SDUs arrived")
    assert got >= 0.8 * sent, f"{sent - got} of {sent} SDUs lost at the forwarder"
