"""The unicast layer end to end: IRMds on loopback (one per host), a udp4 layer under them,
unicast layers built with the irm CLI; enrollment, layer keys, multi-hop flows, rerouting
around a dead member, DOWN for flows whose destination died, and recursion.

Each host is its own IRMd on its own socket with a udp4 shim on its own
127.0.0.x address (no root needed). Every IRMd is stopped at teardown, killed
ones included (see unicast_net.Cluster).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import parse_table, wait_for
from unicast_net import Cluster, Host, echo_once

from flowlib.errors import FlowDown, FlowError, FlowTimeout
from flowlib.flow import flow_alloc
from flowlib.irm import IrmClient


def pong_at(host: Host, layer: str = "net") -> None:
    """'pong' served by `oping -l` (started on demand by host's IRMd), registered in `layer`."""
    host.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    host.irm_ok("name", "register", "pong", "layer", layer)


def line(cluster: Cluster, n: int = 3, options: tuple[str, ...] = ()) -> list[Host]:
    """n hosts, unicast layer 'net' in a line n1 - n2 - ... (each enrolls through the previous)."""
    hosts = cluster.start([chr(ord("a") + i) for i in range(n)])
    cluster.udp(hosts)
    hosts[0].irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", *options, "autobind")
    for i, h in enumerate(hosts[1:], start=2):
        h.irm_ok("ipcp", "enroll", "type", "unicast", "name", f"n{i}", "layer", "net", "dst", f"n{i - 1}", "autobind")
        h.irm_ok("ipcp", "connect", "name", f"n{i}", "dst", f"n{i - 1}")
    for h in hosts:
        h.irmd.note_children()
    return hosts


# -- multi-hop ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_line_of_three_oping_across_two_hops(cluster: Cluster) -> None:
    a, b, c = line(cluster)
    pong_at(c)
    took = a.oping_until_ok("pong", within=30)
    r = a.oping("pong", count=5)
    assert "5 packets transmitted, 5 received" in r.stdout, r.stdout + r.stderr
    print(f"first 2-hop oping succeeded {took:.1f} s after the layer formed")
    # the layer is listed on every host, with the udp layer under it
    for h, name in ((a, "n1"), (b, "n2"), (c, "n3")):
        rows = {row["name"]: row for row in parse_table(h.irm_ok("ipcp", "list"))}
        assert rows[name]["type"] == "unicast" and rows[name]["layer"] == "net"
        assert rows[name]["state"] == "operational"
        assert rows["u"]["type"] == "udp4" and rows["u"]["layer"] == "lan"
    assert [row["name"] for row in parse_table(a.irm_ok("ipcp", "list", "layer", "net"))] == ["n1"]
    # a and c share no adjacency: the pings were relayed by n2
    assert a.neighbours("n1") == {"n2"} and b.neighbours("n2") == {"n1", "n3"}
    # IpcpInfo: every IPCP tells its basics; a unicast one its address, routes and counters
    assert {row[0]: row[1] for row in a.info("u")["ipcp"]} == {"name": "u", "type": "udp4", "layer": "lan"}
    routes = {row[0]: row[1] for row in a.info("n1")["forwarding"]}
    assert routes == {str(b.address("n2")): str(b.address("n2")), str(c.address("n3")): str(b.address("n2"))}
    assert b.counter("n2", "forwarded") >= 5 and a.counter("n1", "forged") == 0


@pytest.mark.timeout(120)
def test_connect_answers_once_the_neighbour_is_routed(cluster: Cluster) -> None:
    """`irm ipcp connect` returning means the layer is usable from here: a name lookup right after it
    can ask the neighbour (one that failed at once while routing caught up was a newcomer's first sight)."""
    a, b = line(cluster, 2)
    routes = {row[0] for row in b.info("n2")["forwarding"]}
    assert str(a.address("n1")) in routes
    pong_at(a)
    r = b.oping("pong", count=2)
    assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(120)
def test_line_of_three_still_reaches_two_hops_after_the_lsu_timeout(cluster: Cluster) -> None:
    a, _, c = line(cluster, options=("ls_t_update", "1", "ls_t_timeo", "3"))  # C's 15 s and 60 s, scaled
    pong_at(c)
    a.oping_until_ok("pong", within=30)
    formed = time.monotonic()
    time.sleep(max(0.0, 5 - (time.monotonic() - formed)))  # past ls_t_timeo and a renewal: the subject here
    assert a.field("n1", "members") == "3"
    a.oping_until_ok("pong", within=15)


# -- enrollment -------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_enrolling_twice_fails_saying_already_in_layer(cluster: Cluster) -> None:
    a, b = line(cluster, 2)
    for args in (
        ("ipcp", "enroll", "name", "n2", "layer", "net"),
        ("ipcp", "enroll", "type", "unicast", "name", "n2", "dst", "n1"),
        ("ipcp", "bootstrap", "name", "n2", "layer", "other"),
    ):
        r = b.irm(*args)
        assert r.returncode != 0, args
        assert "already in layer" in r.stderr + r.stdout, (args, r.stderr)
        assert "n2" in r.stderr and "'net'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = a.irm("ipcp", "bootstrap", "name", "n1", "layer", "net")
    assert r.returncode != 0 and "already in layer" in r.stderr + r.stdout
    # still one member each, still working
    assert [row["layer"] for row in parse_table(b.irm_ok("ipcp", "list", "name", "n2"))] == ["net"]
    pong_at(a)
    b.oping_until_ok("pong", within=20)


@pytest.mark.timeout(90)
def test_a_second_ipcp_of_the_same_layer_on_one_host_is_a_member_of_its_own(cluster: Cluster) -> None:
    """As in Ouroboros: one irmd may hold several IPCPs of a layer, each with its own address."""
    _, b = line(cluster, 2)
    b.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2b", "layer", "net", "dst", "n1")
    b.irmd.note_children()
    rows = {row["name"]: row for row in parse_table(b.irm_ok("ipcp", "list", "layer", "net"))}
    assert {n: (r["layer"], r["state"]) for n, r in rows.items()} == {
        "n2": ("net", "operational"),
        "n2b": ("net", "operational"),
    }


@pytest.mark.timeout(90)
def test_enrolling_into_a_missing_layer_fails_clearly_and_can_be_retried(cluster: Cluster) -> None:
    a, b = cluster.start(["a", "b"])
    cluster.udp([a, b])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
    start = time.monotonic()
    r = b.irm("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "nosuch")
    took = time.monotonic() - start
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "nosuch" in out and ("not found" in out or "cannot reach" in out), out
    assert took < 20, f"the failure took {took:.1f} s"
    assert "Traceback" not in out
    # nothing half-joined: n2 is in no layer and may enroll properly now
    rows = parse_table(b.irm_ok("ipcp", "list", "name", "n2"))
    assert [row["layer"] for row in rows] in ([], ["-"])
    b.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "autobind")
    b.irm_ok("ipcp", "connect", "name", "n2", "dst", "n1")
    assert a.irmd.alive() and b.irmd.alive()


@pytest.mark.timeout(150)
def test_layer_key_admits_only_members_that_prove_it(cluster: Cluster) -> None:
    a, b, c = cluster.start(["a", "b", "c"])
    cluster.udp([a, b, c])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "key", "s3cret", "autobind")

    r = b.irm("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net")
    assert r.returncode != 0
    assert "key" in r.stderr + r.stdout, r.stderr  # e.g. "layer 'net' needs a key to enroll"

    r = c.irm("ipcp", "enroll", "type", "unicast", "name", "n3", "layer", "net", "key", "wrong")
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "refused" in out and "key" in out, out
    wait_for(lambda: a.counter("n1", "handshake_auth") == 2, 10, "n1 to count both refusals")
    assert a.counter("n1", "enrollments") == 0

    b.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "key", "s3cret", "autobind")
    b.irm_ok("ipcp", "connect", "name", "n2", "dst", "n1")
    c.irm_ok(
        "ipcp", "enroll", "type", "unicast", "name", "n3", "layer", "net", "dst", "n2", "key", "s3cret", "autobind"
    )
    c.irm_ok("ipcp", "connect", "name", "n3", "dst", "n2")
    for h in (a, b, c):
        h.irmd.note_children()
    pong_at(a)
    c.oping_until_ok("pong", within=30)


def impostor(cluster: Cluster) -> tuple[Host, Host]:
    """n1 in keyed layer 'net' on a; x1 on b bootstraps its own keyless layer of the same name."""
    a, b = cluster.start(["a", "b"])
    cluster.udp([a, b])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "key", "s3cret", "autobind")
    b.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "x1", "layer", "net", "autobind")
    return a, b


@pytest.mark.timeout(120)
def test_layer_key_a_keyless_ipcp_is_not_admitted_as_a_neighbour(cluster: Cluster) -> None:
    a, b = impostor(cluster)
    b.irm("ipcp", "connect", "name", "x1", "dst", "n1")
    wait_for(lambda: a.counter("n1", "handshake_auth") >= 1, 20, "n1 to count the refusal")
    assert a.neighbours("n1") == set() and b.neighbours("x1") == set()
    assert a.irmd.alive() and b.irmd.alive()


@pytest.mark.timeout(120)
def test_layer_key_connect_without_the_key_fails_at_the_connector(cluster: Cluster) -> None:
    _, b = impostor(cluster)
    r = b.irm("ipcp", "connect", "name", "x1", "dst", "n1")
    assert r.returncode != 0 and "key" in r.stderr, r.stderr


# -- failures -------------------------------------------------------------------------------


def ring_of_four(cluster: Cluster) -> list[Host]:
    hosts = cluster.start(["a", "b", "c", "d"])
    cluster.udp(hosts)
    a = hosts[0]
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
    for i, h in enumerate(hosts[1:], start=2):
        h.irm_ok("ipcp", "enroll", "type", "unicast", "name", f"n{i}", "layer", "net", "dst", "n1", "autobind")
    for i, h in enumerate(hosts[1:], start=2):
        h.irm_ok("ipcp", "connect", "name", f"n{i}", "dst", f"n{i - 1}")
    hosts[3].irm_ok("ipcp", "connect", "name", "n4", "dst", "n1")  # closes the ring
    for h in hosts:
        h.irmd.note_children()
    return hosts


@pytest.mark.timeout(180)
@pytest.mark.parametrize("whole_host", [True, False], ids=["host-crash", "irmd-sigkill"])
def test_ring_of_four_reroutes_around_a_killed_member(cluster: Cluster, whole_host: bool) -> None:
    a, b, c, d = ring_of_four(cluster)
    pong_at(c)
    a.oping_until_ok("pong", within=30)
    # a reaches c over b or d (equal cost): link_state takes the lower address. Kill that one.
    via = b if b.address("n2") < d.address("n4") else d
    cluster.kill(via, whole_host=whole_host)
    killed = time.monotonic()
    took = a.oping_until_ok("pong", within=45)
    print(
        f"rerouted around {via.name}: oping a->c works again {time.monotonic() - killed:.1f} s after the kill "
        f"(last attempt loop {took:.1f} s)"
    )
    assert time.monotonic() - killed < 45
    # and the other direction, and the survivors among themselves
    other = d if via is b else b
    pong_name = "pong2"
    other.irm_ok("bind", "program", "oping", "name", pong_name, "auto", "--", "-l")
    other.irm_ok("name", "register", pong_name, "layer", "net")
    a.oping_until_ok(pong_name, within=20)
    c.oping_until_ok(pong_name, within=20)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("whole_host", [True, False], ids=["host-crash", "irmd-sigkill"])
def test_flow_whose_destination_dies_goes_down_in_bounded_time(cluster: Cluster, whole_host: bool) -> None:
    a, b, c = line(cluster)
    c.start_echo("echo")
    wait = time.monotonic() + 30
    while (why := echo_once(a.irmd.sock, "echo", timeout=5)) and time.monotonic() < wait:
        time.sleep(0.5)
    assert not why, why
    irm = IrmClient(a.irmd.sock)
    try:
        flow = flow_alloc("echo", timeout=10, irm=irm)
        flow.write(b"before")
        flow.set_timeout(5)
        assert flow.read() == b"before"
        cluster.kill(c, whole_host=whole_host)
        killed = time.monotonic()
        flow.set_timeout(1)
        outcome: FlowError | None = None
        while time.monotonic() - killed < 45:
            try:
                flow.read()
            except FlowTimeout:
                continue
            except FlowError as e:
                outcome = e
                break
        took = time.monotonic() - killed
        print(f"flow to the killed host ended after {took:.1f} s: {outcome!r}")
        assert isinstance(outcome, FlowDown), f"read gave {outcome!r} within {took:.1f} s"
        with pytest.raises(FlowDown):
            flow.write(b"after")
        flow.close()
    finally:
        irm.close()
    assert a.irmd.alive() and b.irmd.alive()


@pytest.mark.timeout(120)
def test_a_crashed_neighbours_data_flow_is_dropped_without_spinning(cluster: Cluster) -> None:
    _, b, c = line(cluster)
    n2 = b.irmd.ipcp_pid("n2")
    cluster.kill(c, whole_host=True)
    # udp keepalive declares the peer silent after ~5 s; both of n2's flows to n3 must go
    wait_for(lambda: b.neighbours("n2") == {"n1"}, 20, "n2 to drop both its flows to n3")
    before = cpu_seconds(n2)
    time.sleep(5)
    used = cpu_seconds(n2) - before
    assert used < 1.0, f"n2 used {used:.1f} s of CPU in 5 s with nothing to do"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- recursion --------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_unicast_over_unicast_over_udp(cluster: Cluster) -> None:
    a, _, c = line(cluster)
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "t1", "layer", "top", "autobind")
    c.irm_ok("ipcp", "enroll", "type", "unicast", "name", "t3", "layer", "top", "autobind")
    c.irm_ok("ipcp", "connect", "name", "t3", "dst", "t1")
    for h in (a, c):
        h.irmd.note_children()
    pong_at(c, "top")
    took = a.oping_until_ok("pong", within=30)
    print(f"oping over top/net/lan succeeded after {took:.1f} s")
    # pong is in 'top' only, and t3's own flows (to t1) ride on 'net', not straight on udp
    names = {row["name"]: row for row in parse_table(c.irm_ok("name", "list"))}
    assert names["pong"]["layers"] == "top"
    assert names["t3"]["layers"] == "lan,net"  # autobind: the layers below that were up
    flows = [row for row in parse_table(c.irm_ok("flow", "list")) if row["name"] == "t1"]
    assert len(flows) == 2 and all(row["layer"] == "net" and row["ipcp"] == "n3" for row in flows), [
        (r["layer"], r["ipcp"]) for r in flows
    ]
    layers_of = {row["name"]: row["layer"] for row in parse_table(c.irm_ok("ipcp", "list"))}
    assert layers_of == {"u": "lan", "n3": "net", "t3": "top"}
    r = a.oping("pong", count=5)
    assert "5 packets transmitted, 5 received" in r.stdout, r.stdout + r.stderr
