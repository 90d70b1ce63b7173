"""The udp4 layer across network namespaces: names found by subnet broadcast, no `peer` configured.

Uses the namespace fixtures of tests/net/conftest.py (`lab`, `two_hosts`, `bridged_hosts`): each
host is a namespace with its own irmd, joined by a veth pair or a bridge; the fixtures always
delete the namespaces. Only the 10.x.y.0/24 addresses assigned here are ever addressed.
(Not named test_udp.py: that basename is taken by tests/test_udp.py, and pytest's default import
mode cannot hold two test modules of one basename in package-less directories.)
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import Host, Lab
from helpers import udp4_bootstrap

from flowlib import EventQueue, EventType, FlowSet, fevent
from flowlib.flow import Flow
from flowlib.irm import IrmClient
from ipcp import shim

pytestmark = [pytest.mark.net, pytest.mark.timeout(120)]

LAYER = "lan"
PORT = 3435
_subnets = itertools.count()


def subnet() -> str:
    """A /24 of 10/8 for this test: '10.X.Y' (X from the pid, Y counting)."""
    return f"10.{200 + os.getpid() % 50}.{next(_subnets) % 250}"


def address(host: Host, ip: str, brd: bool = True) -> None:
    host.ip("addr", "add", f"{ip}/24", *(["brd", "+"] if brd else []), "dev", host.dev)


def bootstrap(host: Host, ip: str, *opts: str) -> None:
    host.irmd.irm_ok(
        "ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", LAYER, "ip", ip, "port", str(PORT), *opts
    )
    host.irmd.note_children()


def serve(host: Host, name: str = "pong", prog: str = "oping") -> None:
    host.irmd.irm_ok("bind", "program", prog, "name", name, "auto", "--", "-l")
    host.irmd.irm_ok("name", "register", name, "layer", LAYER)


def oping(host: Host, name: str = "pong", count: int = 10) -> tuple[int, str]:
    r = host.irmd.run("oping", "-n", name, "-c", str(count), "-i", "10", "--timeout", "10")
    return r.returncode, r.stdout + r.stderr


def assert_oping(host: Host, name: str = "pong", count: int = 10, logs: tuple[Host, ...] = ()) -> str:
    code, out = oping(host, name, count)
    if not (code == 0 and f"{count} packets transmitted, {count} received" in out):
        tails = "".join(f"\n--- irmd log of {h.ns} ---\n{h.irmd.log_text()[-2500:]}" for h in logs)
        raise AssertionError(f"oping -n {name} from {host.ns} failed ({code}):\n{out}{tails}")
    return out


def veth_pair(two_hosts: tuple[Host, Host], brd: bool = True) -> tuple[Host, Host, str, str]:
    a, b = two_hosts
    net = subnet()
    ip_a, ip_b = f"{net}.1", f"{net}.2"
    address(a, ip_a, brd)
    address(b, ip_b, brd)
    return a, b, ip_a, ip_b


def test_oping_across_a_veth_pair_resolving_by_broadcast(two_hosts: tuple[Host, Host]) -> None:
    a, b, ip_a, ip_b = veth_pair(two_hosts)
    bootstrap(a, ip_a)
    bootstrap(b, ip_b)  # no peer: the name is found by a query to the subnet's broadcast address
    serve(a)
    out = assert_oping(b)
    assert "0% packet loss" in out
    assert re.search(r"rtt min/avg/max/mdev = [\d.]+/", out)
    serve(b, "pong-b")  # and the other way
    assert_oping(a, "pong-b", count=3)


def test_operf_paced_across_a_veth_pair_loses_nothing(two_hosts: tuple[Host, Host]) -> None:
    a, b, ip_a, ip_b = veth_pair(two_hosts)
    bootstrap(a, ip_a)
    bootstrap(b, ip_b)
    serve(a, "perf", "operf")
    r = b.irmd.run("operf", "-n", "perf", "-d", "2s", "-s", "1400", "-r", "40M", "--report")
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"(\d+) SDUs sent, (\d+) received, (-?\d+) lost\b.*?(\d+) corrupt", r.stdout)
    assert m, r.stdout
    sent, rcvd, _lost, corrupt = map(int, m.groups())
    assert sent > 1000 and rcvd == sent and corrupt == 0, r.stdout


def test_broadcast_resolution_works_when_the_address_was_added_without_brd(two_hosts: tuple[Host, Host]) -> None:
    a, b, ip_a, ip_b = veth_pair(two_hosts, brd=False)
    bootstrap(a, ip_a)
    bootstrap(b, ip_b)
    serve(a)
    assert_oping(b, count=3)


def test_an_unreachable_configured_peer_does_not_stop_broadcast_resolution(two_hosts: tuple[Host, Host]) -> None:
    a, b, ip_a, ip_b = veth_pair(two_hosts)
    bootstrap(a, ip_a)
    unroutable = f"10.{200 + os.getpid() % 50}.251.1"  # no route to it from b: sendto fails at once
    bootstrap(b, ip_b, "peer", unroutable)
    serve(a)
    assert_oping(b, count=3)


def test_taking_the_link_down_takes_the_flow_down(two_hosts: tuple[Host, Host]) -> None:
    a, b, ip_a, ip_b = veth_pair(two_hosts)
    bootstrap(a, ip_a)
    bootstrap(b, ip_b)
    serve(a)
    assert_oping(b, count=2)
    client = IrmClient(b.irmd.sock)
    try:
        reply, fd = client.alloc("pong", None, 10.0)
        flow = Flow(reply, fd, client)
        flow.write(bytes(64))
        flow.set_timeout(5)
        flow.read()
        a.link(False)  # the peer vanishes from b's point of view
        start = time.monotonic()
        fset, queue = FlowSet(client), EventQueue()
        fset.add(flow)
        events: list[EventType] = []
        while not events and time.monotonic() - start < 15:
            fevent(fset, queue, 0.5)
            events += [ev.type for ev in queue]
        took = time.monotonic() - start
        assert events == [EventType.DOWN], f"{events} after {took:.1f} s"
        assert took < shim.PEER_TIMEOUT + 3, f"down only after {took:.1f} s"
        fset.close()
        flow.close()
    finally:
        client.close()


def test_three_hosts_on_a_bridge_find_each_other_by_broadcast(bridged_hosts: list[Host]) -> None:
    net = subnet()
    ips = [f"{net}.{i + 1}" for i in range(3)]
    for host, ip in zip(bridged_hosts, ips, strict=True):
        address(host, ip)
        bootstrap(host, ip)
    a, b, c = bridged_hosts
    serve(a)
    serve(c, "pong-c")
    hosts = (a, b, c)
    assert_oping(b, count=5, logs=hosts)
    assert_oping(c, count=5, logs=hosts)
    assert_oping(a, "pong-c", count=3, logs=hosts)
    assert_oping(b, "pong-c", count=3, logs=hosts)
    # unregistering is heard by everyone (NAME_GONE to the broadcast): nobody reaches it any more
    a.irmd.irm_ok("name", "unregister", "pong", "layer", LAYER)
    for host in (b, c):
        code, out = oping(host, count=1)
        assert code != 0 and "not found" in out, out


def test_names_resolve_through_etc_hosts_as_ouroboros_0_23_does(lab: Lab) -> None:
    """No broadcast (loopback), no peer: only /etc/hosts, where the name is the hex MD5 of it.
    Bootstrapped with 0.23's own words, `hash` and `dns` included (a udp layer uses MD5 regardless)."""
    ns = lab.netns("h")
    etc = Path("/etc/netns") / ns
    try:
        etc.mkdir(parents=True)
        md5 = {n: hashlib.md5(n.encode()).hexdigest() for n in ("pong", "ghost")}
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {md5['pong']}\n127.0.0.3 {md5['ghost']}\n")
        a, b = (Host(ns, "lo", lab.start_irmd(ns, name)) for name in "ab")
        for host, ip in ((a, "127.0.0.1"), (b, "127.0.0.2")):
            host.irmd.irm_ok(*udp4_bootstrap(LAYER, ip, "hash", "SHA3_512", "dns", "127.0.0.53"))
        serve(a)
        assert_oping(b, count=3, logs=(a, b))
        assert "no dynamic DNS here" in b.irmd.log_text()
        code, out = oping(b, "ghost", count=1)  # resolved, but nobody answers at 127.0.0.3
        assert code != 0 and "did not answer" in out, out
        code, out = oping(b, "nobody", count=1)
        assert code != 0 and "not found" in out, out
    finally:
        shutil.rmtree(etc, ignore_errors=True)
