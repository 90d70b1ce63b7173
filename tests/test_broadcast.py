"""Broadcast layers end to end: members enroll and connect as in a unicast layer, and an
SDU written on one joined flow reaches every other joined flow, across hops, once each.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from unicast_net import Cluster, Host

# Joins the layer, says "joined", then either writes argv[2] or prints every SDU it reads.
MEMBER = r"""
import sys
from flowlib import FlowTimeout, flow_join
flow = flow_join(sys.argv[1], timeout=10)
print("joined", flush=True)
if len(sys.argv) > 2:
    sys.stdin.readline()  # go
    for word in sys.argv[2:]:
        flow.write(word.encode())
    sys.stdin.readline()  # done
else:
    flow.set_timeout(3.0)
    try:
        while True:
            print(flow.read().decode(), flush=True)
    except FlowTimeout:
        pass
flow.close()
"""


def member(host: Host, *words: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", MEMBER, "bc", *words],
        env=host.irmd.env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    host.procs.append(proc)  # type: ignore[arg-type]
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "joined"
    return proc


@pytest.mark.timeout(180)
def test_a_write_on_one_joined_flow_reaches_every_other_member_once(cluster: Cluster) -> None:
    a, b, c = cluster.start(["a", "b", "c"])
    cluster.udp([a, b, c])
    a.irm_ok("ipcp", "bootstrap", "type", "broadcast", "name", "b1", "layer", "bc", "autobind")
    b.irm_ok("ipcp", "enroll", "type", "broadcast", "name", "b2", "layer", "bc", "autobind")
    b.irm_ok("ipcp", "connect", "name", "b2", "dst", "b1")
    c.irm_ok("ipcp", "enroll", "type", "broadcast", "name", "b3", "layer", "bc", "dst", "b2", "autobind")
    c.irm_ok("ipcp", "connect", "name", "b3", "dst", "b2")  # a line: a's SDUs reach c through b
    c.irm_ok("ipcp", "connect", "name", "b3", "dst", "b1")  # and a triangle: duplicates must be dropped
    listeners = [member(h) for h in (a, b, c)]
    sender = member(a, "one", "two", "three")
    assert sender.stdin is not None
    sender.stdin.write("go\n")
    sender.stdin.flush()
    for proc in listeners:
        out, _ = proc.communicate(timeout=30)
        assert out.split() == ["one", "two", "three"], out  # each SDU once, in order, and not the sender's own
    sender.stdin.write("done\n")
    sender.stdin.flush()
    sender.wait(timeout=10)


@pytest.mark.timeout(60)
def test_joining_a_layer_that_is_not_here_fails_clearly(cluster: Cluster) -> None:
    (a,) = cluster.start(["a"])
    cluster.udp([a])
    r = subprocess.run(
        [sys.executable, "-c", "from flowlib import flow_join; flow_join('nosuch', timeout=5)"],
        env=a.irmd.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "no broadcast layer 'nosuch' here to join" in r.stderr


@pytest.mark.timeout(60)
def test_joining_with_a_qos_only_one_peer_can_serve_is_refused_clearly(cluster: Cluster) -> None:
    (a,) = cluster.start(["a"])
    cluster.udp([a])
    a.irm_ok("ipcp", "bootstrap", "type", "broadcast", "name", "b1", "layer", "bc")
    code = (
        "from flowlib import QosNotSupported, flow_join, qos\n"
        "try:\n    flow_join('bc', qos=qos.data, timeout=5)\nexcept QosNotSupported as e:\n    print(e)\n"
        "flow_join('bc', qos=qos.raw, timeout=5).close()\nprint('raw joined')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=a.irmd.env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "cannot serve the QoS asked" in r.stdout and "raw flows only" in r.stdout and "raw joined" in r.stdout


@pytest.mark.timeout(60)
def test_names_cannot_be_registered_in_a_broadcast_layer(cluster: Cluster) -> None:
    (a,) = cluster.start(["a"])
    cluster.udp([a])
    a.irm_ok("ipcp", "bootstrap", "type", "broadcast", "name", "b1", "layer", "bc")
    r = a.irm("name", "register", "pong", "layer", "bc")
    assert r.returncode != 0
    assert "applications join it" in r.stderr
