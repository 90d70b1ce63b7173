"""Broadcast layers end to end: members enroll and connect as in a unicast layer, and an
SDU written on one joined flow reaches every other joined flow, across hops, once each.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time

import pytest
from helpers import wait_for
from unicast_net import Cluster, Host

from ipcp import broadcast
from ipcp.broadcast import FloodDt
from ipcp.unicast.dt import UniFlow
from ipcp.unicast.pci import Pci, PciFormat, frame

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
    flow.set_timeout(30.0)  # the sender starts once every listener has joined: on a loaded host, seconds later
    try:
        while True:
            print(flow.read().decode(), flush=True)
            flow.set_timeout(3.0)  # then the rest come soon, and so would a duplicate
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


JOIN_AND_WRITE_PAST_THE_MTU = r"""
import os, sys
from flowlib import flow_join
flow = flow_join(sys.argv[1], timeout=10)
os.write(flow.fileno(), bytes(65536))  # past flowlib, which refuses SDUs over the MTU
print("written", flush=True)
"""


@pytest.mark.timeout(180)
def test_a_user_writing_past_the_mtu_on_its_joined_flow_ends_nothing(cluster: Cluster) -> None:
    """Any user may join a broadcast layer, and its flow's socket is its own to write on: one SDU of
    65,536 bytes ended the member's data transfer thread (a PDU's length would not pack), and with it
    the member and every joined flow of every user. It is dropped and counted; root's SDUs still go."""
    a, b = cluster.start(["a", "b"])
    cluster.udp([a, b])
    cluster.tmp.chmod(0o755)  # uid 65534 reaches a's socket
    a.irm_ok("ipcp", "bootstrap", "type", "broadcast", "name", "b1", "layer", "bc", "autobind")
    b.irm_ok("ipcp", "enroll", "type", "broadcast", "name", "b2", "layer", "bc", "autobind")
    b.irm_ok("ipcp", "connect", "name", "b2", "dst", "b1")
    b1 = a.irmd.ipcp_pid("b1")
    listener = member(b)
    env = {**a.irmd.env, "HOME": "/nonexistent"}
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    r = subprocess.run([*nobody, sys.executable, "-c", JOIN_AND_WRITE_PAST_THE_MTU, "bc"],
                       env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.stdout == "written\n", r.stdout + r.stderr
    wait_for(lambda: a.counter("b1", "oversized") == 1, 20, "b1 to drop the oversized SDU")
    sender = member(a, "still")
    assert sender.stdin is not None
    sender.stdin.write("go\n")
    sender.stdin.flush()
    out, _ = listener.communicate(timeout=40)
    assert out.split() == ["still"], out
    sender.stdin.write("done\n")
    sender.stdin.flush()
    sender.wait(timeout=10)
    assert a.irmd.ipcp_pid("b1") == b1


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


def _mesh(n: int) -> tuple[list[FloodDt], socket.socket]:
    """n members' data transfer, every two joined by a data flow, and a hostile neighbour's
    socket to the first; not started: pumped by _pump."""
    fmt = PciFormat()
    dts = [FloodDt(fmt, i + 1, 60, 1 << 16, lambda *_: None, lambda *_: None, lambda *_: None) for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
            dts[i].add_n1(j + 1, a.detach())
            dts[j].add_n1(i + 1, b.detach())
    hostile, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hostile.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    dts[0].add_n1(99, ours.detach())
    return dts, hostile


def _pump(dts: list[FloodDt], seconds: float) -> bool:
    """Carry frames between the members until none is left (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        busy = False
        for dt in dts:
            for link in list(dt.n1.values()):
                frames = []
                with contextlib.suppress(BlockingIOError):
                    while True:
                        frames.append(link.sock.recv(1 << 16))
                if frames:
                    busy = True
                    dt.from_n1(link, frames)
        if not busy:
            return True
    return False


@pytest.mark.timeout(60)
def test_a_flood_of_distinct_pdus_does_not_start_an_endless_storm(monkeypatch: pytest.MonkeyPatch) -> None:
    """More distinct PDUs at once than the duplicate table holds: forgetting the first before their
    copies came back around the mesh flooded every copy again, without end. The table drops what it
    cannot remember instead, so each PDU crosses each link at most once; once the pairs are old
    enough, new PDUs flow again."""
    monkeypatch.setattr(broadcast, "SEEN", 512)
    monkeypatch.setattr(broadcast, "HOLD", 0.5, raising=False)
    dts, hostile = _mesh(4)
    fmt = dts[0].fmt
    try:
        for base in range(0, 1000, 50):
            pdus = [fmt.pack(Pci(99, 0, 255, 0, s)) + b"x" for s in range(base, base + 50)]
            hostile.send(frame(*pdus))
        assert _pump(dts, 10), "the members were still flooding each other"
        forwarded = sum(dt.counters.forwarded for dt in dts)
        assert forwarded <= 9 * 512, forwarded  # in a mesh of 4, a PDU is sent 3 + 3 * 2 times
        time.sleep(0.6)
        before = [dt.counters.forwarded for dt in dts]
        hostile.send(frame(fmt.pack(Pci(98, 0, 60, 0, 1)) + b"later"))
        assert _pump(dts, 10)
        assert [dt.counters.forwarded - b for dt, b in zip(dts, before, strict=True)] == [3, 2, 2, 2]
    finally:
        hostile.close()
        for dt in dts:
            for link in dt.n1.values():
                link.sock.close()


def _joined(dt: FloodDt) -> tuple[UniFlow, socket.socket]:
    """An application's flow joined at `dt`: the member's end, and the application's socket."""
    app, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    app.setblocking(False)
    flow = UniFlow(1, mine)
    dt.add_flow(flow)
    return flow, app


def _read_all(app: socket.socket) -> list[bytes]:
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(app.recv(1 << 16))
    return got


@pytest.mark.timeout(60)
def test_pdus_forged_with_another_members_origin_and_next_seqnos_suppress_none_of_its_own() -> None:
    """A member's seqnos count up, and every member sees them: a neighbour that sent PDUs in its name
    with the next ones had every member, the origin too, drop the real PDUs as duplicates. A PDU is
    one of its copies only with the same SDU, so forgeries suppress nothing the origin writes."""
    dts, hostile = _mesh(3)
    fmt = dts[0].fmt
    joined = [_joined(dt) for dt in dts]
    try:
        hostile.send(frame(*(fmt.pack(Pci(2, 0, 60, 0, s)) + b"forged" for s in range(1, 101))))
        assert _pump(dts, 10)
        for _, app in joined:
            assert len(_read_all(app)) == 100  # (a member may say anything: the layer carries it)
        dts[1].from_app(joined[1][0], [b"real %d" % i for i in range(100)])
        assert _pump(dts, 10)
        for i, (_, app) in enumerate(joined):
            assert _read_all(app) == ([] if i == 1 else [b"real %d" % i for i in range(100)])
        # A copy coming back around the mesh is still dropped: each member delivered each SDU once.
        hostile.send(frame(fmt.pack(Pci(2, 0, 60, 0, 1)) + b"real 0"))
        assert _pump(dts, 10)
        assert all(_read_all(app) == [] for _, app in joined)
    finally:
        hostile.close()
        for flow, app in joined:
            app.close()
            flow.io.close()
        for dt in dts:
            for link in dt.n1.values():
                link.sock.close()
