"""The eth-dix and eth-llc layers across network namespaces: oping, MTU, bad frames, peer failure.

Hosts are namespaces joined by a veth pair (or a bridge), with no IP configured at all.
"""

from __future__ import annotations

import os
import random
import re
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Host, Lab
from helpers import wait_for

from flowlib import FlowDown, FlowError, InvalidArgument, QosNotSupported, QosSpec
from flowlib.flow import Flow
from flowlib.irm import IrmClient
from proto import messages as m
from transports import eth

pytestmark = pytest.mark.net

KINDS = ["eth-dix", "eth-llc"]
LAYER = "ethlan"
PEER_DOWN_WITHIN = 12.0  # keepalive after 1 s of silence, peer declared dead after 5 s, plus slack


def bootstrap(host: Host, kind: str, name: str = "e", layer: str = LAYER, *opts: str) -> None:
    host.irmd.irm_ok("ipcp", "bootstrap", "type", kind, "name", name, "layer", layer, "dev", host.dev, *opts)


def serve_oping(host: Host, layer: str = LAYER) -> None:
    host.irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    host.irmd.irm_ok("name", "register", "pong", "layer", layer)


def oping(host: Host, count: int = 10, *args: str) -> subprocess.CompletedProcess[str]:
    return host.irmd.run("oping", "-n", "pong", "-c", str(count), "-i", "10", *args)


class FlowPair:
    """A flow from a process on host b to one on host a (both ends are this test process)."""

    def __init__(self, a: Host, b: Host, layer: str = LAYER) -> None:
        a.irmd.irm_ok("bind", "process", str(os.getpid()), "name", "srv")
        a.irmd.irm_ok("name", "register", "srv", "layer", layer)
        self.clients = [IrmClient(a.irmd.sock), IrmClient(b.irmd.sock)]
        accepted: list[Flow] = []

        def accept() -> None:
            reply, fd = self.clients[0].accept(20)
            accepted.append(Flow(reply, fd, self.clients[0]))

        t = threading.Thread(target=accept)
        t.start()
        try:
            reply, fd = self.clients[1].alloc("srv", None, 20)
            self.client = Flow(reply, fd, self.clients[1])
        finally:
            t.join(25)
        assert accepted, "the server end never arrived"
        self.server = accepted[0]
        for f in (self.client, self.server):
            f.set_timeout(10)

    def close(self) -> None:
        for f in (self.client, self.server):
            f.close()
        for c in self.clients:
            c.close()


@pytest.fixture
def flows_over(two_hosts: tuple[Host, Host], request: pytest.FixtureRequest) -> Iterator[FlowPair]:
    a, b = two_hosts
    kind = getattr(request, "param", "eth-dix")
    bootstrap(a, kind)
    bootstrap(b, kind)
    pair = FlowPair(a, b)
    try:
        yield pair
    finally:
        pair.close()


# -- end to end --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_oping_across_two_namespaces(two_hosts: tuple[Host, Host], kind: str) -> None:
    a, b = two_hosts
    bootstrap(a, kind)
    bootstrap(b, kind)
    serve_oping(a)
    r = oping(b, 10)
    assert r.returncode == 0, r.stderr + a.irmd.log_text()
    assert "10 packets transmitted, 10 received" in r.stdout
    assert "0% packet loss" in r.stdout
    rtt = re.search(r"rtt min/avg/max/mdev = \S+ ms", r.stdout)
    assert rtt, r.stdout
    print(f"{kind}: {rtt.group(0)}")


@pytest.mark.timeout(120)
def test_unicast_over_unicast_over_ethernet_carries_oping(two_hosts: tuple[Host, Host]) -> None:
    """Recursion on a real wire: net2 over net over eth-dix, no IP anywhere."""
    a, b = two_hosts
    for h in two_hosts:
        bootstrap(h, "eth-dix")
    a.irmd.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
    b.irmd.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "dst", "n1", "autobind")
    b.irmd.irm_ok("ipcp", "connect", "name", "n2", "dst", "n1")
    a.irmd.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "m1", "layer", "net2", "autobind")
    wait_for(
        lambda: (
            b.irmd.irm(
                "ipcp", "enroll", "type", "unicast", "name", "m2", "layer", "net2", "dst", "m1", "autobind"
            ).returncode
            == 0
        ),
        30,
        "m2 to enroll in net2 over net",
    )
    b.irmd.irm_ok("ipcp", "connect", "name", "m2", "dst", "m1")
    serve_oping(a, "net2")
    r = oping(b, 5)
    assert r.returncode == 0 and "5 received" in r.stdout, r.stdout + r.stderr
    flows = b.irmd.table("flow", "list")
    assert any(f["layer"] == "net" for f in flows) and any(f["layer"] == LAYER for f in flows)
    assert "net2" in b.irmd.irm_ok("dump", "graph").stdout


def test_oping_across_a_bridge_of_three_hosts(bridged_hosts: list[Host]) -> None:
    a, b, c = bridged_hosts
    for h in bridged_hosts:
        bootstrap(h, "eth-dix")
    serve_oping(c)
    for client in (a, b):
        r = oping(client, 5)
        assert r.returncode == 0, r.stderr
        assert "5 packets transmitted, 5 received" in r.stdout


def test_layers_of_different_ethertypes_share_a_wire_without_seeing_each_other(
    two_hosts: tuple[Host, Host],
) -> None:
    a, b = two_hosts
    bootstrap(a, "eth-dix", "e", "lan-a000")
    bootstrap(b, "eth-dix", "e", "lan-a001", "ethertype", "0xA001")
    serve_oping(a, "lan-a000")
    start = time.monotonic()
    r = oping(b, 1)
    assert r.returncode != 0 and "not found" in r.stderr
    assert time.monotonic() - start < 5.0
    bootstrap(a, "eth-dix", "e2", "lan-a001", "ethertype", "0xa001")  # a second layer, same veth
    a.irmd.irm_ok("name", "register", "pong", "layer", "lan-a001")
    r = oping(b, 3)
    assert "3 packets transmitted, 3 received" in r.stdout, r.stderr


def test_the_hash_option_names_the_layer_hash_and_both_ends_must_agree(
    two_hosts: tuple[Host, Host],
) -> None:
    a, b = two_hosts
    bootstrap(a, "eth-dix", "e", LAYER, "hash", "SHA3_384")
    bootstrap(b, "eth-dix", "e", LAYER, "hash", "SHA3_384")
    bootstrap(b, "eth-dix", "e2", "other", "hash", "SHA3_512", "ethertype", "0xA002")
    bootstrap(a, "eth-dix", "e2", "other", "ethertype", "0xA002")  # SHA3_256: disagrees with b
    serve_oping(a)
    a.irmd.irm_ok("name", "register", "pong", "layer", "other")
    r = oping(b, 3)
    assert "3 packets transmitted, 3 received" in r.stdout, r.stderr
    b.irmd.irm_ok("ipcp", "destroy", "name", "e")  # left: only the layer whose hashes disagree
    r = oping(b, 1)
    assert r.returncode != 0 and "not found" in r.stderr


# -- MTU -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dev_mtu", "layer_mtu"),
                         [("eth-dix", 1500, 1496), ("eth-dix", 2000, 1996), ("eth-llc", 1500, 1497),
                          ("eth-llc", 2000, 1497)])  # fmt: skip
def test_the_layer_mtu_fits_the_interface_and_bigger_sdus_are_refused_clearly(
    two_hosts: tuple[Host, Host], kind: str, dev_mtu: int, layer_mtu: int
) -> None:
    a, b = two_hosts
    for h in two_hosts:
        h.ip("link", "set", h.dev, "mtu", str(dev_mtu))
        bootstrap(h, kind)
    pair = FlowPair(a, b)
    try:
        assert pair.client.mtu == pair.server.mtu == layer_mtu
        full = random.randbytes(layer_mtu)
        pair.client.write(full)
        assert pair.server.read() == full  # a full-size frame crosses
        with pytest.raises(InvalidArgument, match=f"1 to {layer_mtu} bytes"):
            pair.client.write(b"x" * (layer_mtu + 1))
        pair.server.write(b"still here")
        assert pair.client.read() == b"still here"
    finally:
        pair.close()


def test_a_flow_asking_more_bandwidth_than_the_link_has_is_refused_clearly(two_hosts: tuple[Host, Host]) -> None:
    a, b = two_hosts
    for h in two_hosts:
        bootstrap(h, "eth-dix")
    speed = int(a.exec("cat", f"/sys/class/net/{a.dev}/speed").stdout) * 1_000_000
    a.irmd.irm_ok("bind", "process", str(os.getpid()), "name", "srv")
    a.irmd.irm_ok("name", "register", "srv", "layer", LAYER)
    client = IrmClient(b.irmd.sock)
    try:
        with pytest.raises(QosNotSupported, match=f"at most {speed:,} b/s"):
            client.alloc("srv", QosSpec(bandwidth=2 * speed), 10)
    finally:
        client.close()


# -- bad input -----------------------------------------------------------------------

INJECT = """
import socket, sys
dev = sys.argv[1]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((dev, 0))
n = 0
for line in sys.stdin:
    if line.strip():
        s.send(bytes.fromhex(line.strip()))
        n += 1
print(n)
"""


def dix_garbage(dst: bytes, src: bytes) -> list[bytes]:
    rnd = random.Random(3)
    hdr = dst + src + struct.pack("!H", eth.DEFAULT_ETHERTYPE)
    layer = eth.dix_layer()

    def dix(eid: int, payload: bytes, length: int | None = None, to: bytes = dst) -> bytes:
        return bytes(layer(dst=eth.mac_str(to), src=eth.mac_str(src), eid=eid, len=length) / payload)

    frames = [hdr, hdr + b"\x00", hdr + b"\x00\x05\x00"]  # truncated before eid/length
    frames += [dix(7, b"short", length=200), dix(0, b"", length=1)]  # length beyond the frame
    frames += [dix(4242, b"for no flow"), dix(1, b"")]  # unknown endpoints
    frames += [dix(0, b""), dix(0, b"\x01"), dix(0, b"\xff" * 40), dix(0, b"\x01\x00\x00\x05abc")]
    frames += [dix(0, rnd.randbytes(rnd.randint(1, 200)), to=eth.BROADCAST) for _ in range(10)]
    frames += [hdr + rnd.randbytes(rnd.randint(0, 300)) for _ in range(20)]
    return frames


def llc_garbage(dst: bytes, src: bytes) -> list[bytes]:
    rnd = random.Random(4)
    mgmt = eth.MGMT_WIRE_SAP

    def llc(length: int, dsap: int, ctrl: int, payload: bytes, to: bytes = dst) -> bytes:
        return to + src + struct.pack("!HBBB", length, dsap, mgmt, ctrl) + payload

    frames = [dst + src + struct.pack("!H", 3), dst + src + struct.pack("!HB", 3, mgmt)]  # truncated
    frames += [llc(100, mgmt, 3, b"short"), llc(2, mgmt, 3, b"")]  # length beyond / below
    frames += [llc(3 + 4, mgmt, 0x13, b"nope")]  # not a UI frame
    frames += [llc(3 + 4, 0x42, 3, b"stp?"), llc(3 + 4, eth.WIRE_SAP[9], 3, b"noflow")]
    frames += [llc(3 + 30, mgmt, 3, b"\x00" * 30), llc(3, mgmt, 3, b"")]  # bad management
    for _ in range(20):
        payload = b"\x00" + rnd.randbytes(rnd.randint(0, 200))  # never 0xFFFF: that is raw 802.3
        frames.append(llc(3 + len(payload), mgmt, 3, payload, to=rnd.choice([dst, eth.BROADCAST])))
    return frames


@pytest.mark.parametrize("kind", KINDS)
def test_bad_frames_are_dropped_counted_and_the_ipcp_keeps_working(two_hosts: tuple[Host, Host], kind: str) -> None:
    a, b = two_hosts
    bootstrap(a, kind)
    bootstrap(b, kind)
    serve_oping(a)
    pid = a.irmd.ipcp_pid("e")
    dst, src = eth.mac_bytes(a.mac), eth.mac_bytes(b.mac)
    frames = dix_garbage(dst, src) if kind == "eth-dix" else llc_garbage(dst, src)
    r = b.exec("python3", "-c", INJECT, b.dev, input="\n".join(f.hex() for f in frames))
    assert r.returncode == 0 and r.stdout.split() == [str(len(frames))], r.stderr

    def counted() -> bool:
        got = re.findall(r"e: dropped (\d+) bad frames", a.irmd.log_text())
        return bool(got) and int(got[-1]) >= len(frames)

    wait_for(counted, 5.0, f"the ipcp to count {len(frames)} dropped frames")
    got = int(re.findall(r"e: dropped (\d+) bad frames", a.irmd.log_text())[-1])
    assert got == len(frames)
    assert a.irmd.ipcp_pid("e") == pid  # the same process, not a restarted one
    r = oping(b, 3)
    assert "3 packets transmitted, 3 received" in r.stdout, r.stderr + a.irmd.log_text()


def test_bootstrap_on_a_missing_or_non_ethernet_device_fails_saying_why(
    two_hosts: tuple[Host, Host],
) -> None:
    a, _ = two_hosts
    r = a.irmd.irm("ipcp", "bootstrap", "type", "eth-dix", "name", "e", "layer", LAYER, "dev", "nosuch0")
    assert r.returncode != 0 and "no interface 'nosuch0'" in r.stderr + r.stdout
    a.ip("tuntap", "add", "dev", "tun0", "mode", "tun")  # IP packets, no Ethernet header
    r = a.irmd.irm("ipcp", "bootstrap", "type", "eth-dix", "name", "e2", "layer", LAYER, "dev", "tun0")
    assert r.returncode != 0 and "not Ethernet" in r.stderr + r.stdout


# -- on a loopback interface, as the Ouroboros tutorial ---------------------------------


@pytest.mark.parametrize(("kind", "mtu"), [("eth-llc", 1497), ("eth-dix", 9000 - 4)])
def test_a_layer_on_lo_reaches_its_own_names_as_in_the_ouroboros_tutorial(lab: Lab, kind: str, mtu: int) -> None:
    """ouroboros-tutorial(7): `irm ipcp bootstrap type eth-llc name llc layer llc dev lo`, a name
    registered, a process bound to it, oping. Every frame on `lo` comes back to its sender, so the
    layer reaches itself; the MTU is C's there (9000 on a loopback interface, 1500 for 802.3)."""
    ns = lab.netns("lo")  # a `lo` of its own: in the root namespace, others' layers would share it
    host = Host(ns, "lo", lab.start_irmd(ns, "t"))
    host.irmd.irm_ok("ipcp", "bootstrap", "type", kind, "name", "llc", "layer", "llc", "dev", "lo")
    host.irmd.irm_ok("name", "reg", "my.oping.server", "layer", "llc")
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, "oping", "-l"],
        env=host.irmd.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: host.irmd.irm("bind", "process", str(server.pid), "name", "my.oping.server").returncode == 0,
            10,
            "oping -l to be bound",
        )  # and to accept: bound as it starts, it may not yet have asked for flows
        wait_for(lambda: " 0% packet loss" in host.exec("oping", "-n", "my.oping.server", "-c", "1").stdout, 20,
                 "oping -l to answer")  # fmt: skip
        r = host.exec("oping", "-n", "my.oping.server", "-c", "3", "-i", "10", "-s", str(mtu))
        assert "3 packets transmitted, 3 received" in r.stdout, r.stdout + r.stderr + host.irmd.log_text()
        r = host.exec("oping", "-n", "my.oping.server", "-c", "1", "-s", str(mtu + 1))
        cut = min(mtu, 1500)  # oping's buffer (0.23's OPING_BUF_SIZE), or the layer's MTU below it
        assert f"Packet size truncated to {cut} bytes" in r.stdout, r.stdout + r.stderr
        info = host.irmd.request(m.IpcpInfoReq("llc"))
        assert isinstance(info, m.IpcpInfo)
        shim = {row[0]: row[1] for s in info.sections if s.name == "shim" for row in s.rows}
        assert shim == {"address": "00:00:00:00:00:00", "mtu": str(mtu), "hash": "SHA3_256"}
    finally:
        server.kill()
        server.wait()


# -- peer failure --------------------------------------------------------------------


def _wait_down(flow: Flow) -> float:
    """Seconds until reading the flow reports it down."""
    start = time.monotonic()
    flow.set_timeout(PEER_DOWN_WITHIN + 5)
    with pytest.raises(FlowDown):
        while True:
            flow.read()
    return time.monotonic() - start


@pytest.mark.parametrize("flows_over", KINDS, indirect=True)
def test_taking_the_link_down_turns_the_flow_down_in_bounded_time(
    two_hosts: tuple[Host, Host], flows_over: FlowPair
) -> None:
    a, b = two_hosts
    flows_over.client.write(b"ping")
    assert flows_over.server.read() == b"ping"
    a.link(False)
    took = _wait_down(flows_over.client)
    assert took < PEER_DOWN_WITHIN
    assert flows_over.client.ended() == "down"
    start = time.monotonic()  # and a new allocation to the vanished peer fails, saying why
    client = IrmClient(b.irmd.sock)
    try:
        with pytest.raises(FlowError, match=r"not found|did not answer|timed out"):
            client.alloc("srv", None, 3)
    finally:
        client.close()
    assert time.monotonic() - start < 6.0


def test_killing_the_peer_host_turns_the_flow_down_in_bounded_time(
    two_hosts: tuple[Host, Host], flows_over: FlowPair
) -> None:
    a, _ = two_hosts
    flows_over.client.write(b"ping")
    assert flows_over.server.read() == b"ping"
    # The irmd and everything it runs in a's namespace, all at once: no goodbyes sent.
    pids = subprocess.run(["ip", "netns", "pids", a.ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        os.kill(int(pid), signal.SIGKILL)
    took = _wait_down(flows_over.client)
    assert took < PEER_DOWN_WITHIN
