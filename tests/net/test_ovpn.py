"""ovpn: IP over a flow through TUN devices, as C Ouroboros 0.23's ovpn. Two network namespaces joined by
a veth pair carry a udp4 layer, a unicast layer over it, and an ovpn tunnel over that: a ping between
the tunnel's addresses crosses the whole stack. Needs root (TUN devices, namespaces); skipped otherwise.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import Host, Lab
from helpers import BIN

pytestmark = [pytest.mark.net, pytest.mark.timeout(180)]

PORT = 3435
TUN_NET = f"10.{150 + os.getpid() % 40}.77"


class Proc:
    """A command in a namespace, its output read line by line by a thread."""

    def __init__(self, host: Host, *argv: str) -> None:
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", host.ns, *argv],
            env=host.irmd.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, want: str, timeout: float) -> list[str]:
        """Lines up to one equal to `want`; fails on exit or timeout, showing them."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if line == want:
                return self.seen
        raise AssertionError(f"no {want!r} (exit {self.popen.poll()}):\n" + "\n".join(self.seen))

    def end(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@pytest.fixture
def unicast_pair(two_hosts: tuple[Host, Host]) -> tuple[Host, Host]:
    """a and b: a udp4 layer 'lan' on their veth, a unicast layer 'net' over it (a bootstraps, b enrolls)."""
    a, b = two_hosts
    net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 200 + 1}"
    for host, ip in ((a, f"{net}.1"), (b, f"{net}.2")):
        host.ip("addr", "add", f"{ip}/24", "brd", "+", "dev", host.dev)
        host.irmd.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "lan", "ip", ip, "port", str(PORT))
    a.irmd.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
    b.irmd.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "dst", "n1", "autobind")
    b.irmd.irm_ok("ipcp", "connect", "name", "n2", "dst", "n1")
    for host in (a, b):
        host.irmd.note_children()
    return a, b


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    yield made
    for p in made:
        p.end()


def test_a_ping_crosses_an_ovpn_tunnel_over_a_unicast_layer(unicast_pair: tuple[Host, Host], procs: list[Proc]) -> None:
    if shutil.which("ping") is None:
        pytest.skip("needs ping (Debian's iputils-ping: `make sysdeps` as root installs it)")
    a, b = unicast_pair
    server = Proc(a, str(BIN / "ovpn"), "-i", f"{TUN_NET}.1", "-m", "255.255.255.0", "--dev", "ovpnA")
    procs.append(server)
    server.wait_line("Waiting for a new flow...", 30)
    a.irmd.irm_ok("bind", "process", str(server.popen.pid), "name", "vpn")
    a.irmd.irm_ok("name", "register", "vpn", "layer", "net")
    deadline = time.monotonic() + 60
    while True:  # until the layer's directory has the name
        client = Proc(
            b,
            str(BIN / "ovpn"),
            "-n",
            "vpn",
            "-i",
            f"{TUN_NET}.2",
            "-m",
            "255.255.255.0",
            "--dev",
            "ovpnB",
            "--timeout",
            "10",
        )
        procs.append(client)
        try:
            client.wait_line("Starting read/write threads.", 30)
            break
        except AssertionError:
            if client.popen.poll() is None or time.monotonic() > deadline:
                raise
            time.sleep(1)
    out = server.wait_line("Starting read/write threads.", 30)
    assert "Tunnel device name is ovpnA." in out
    addr = a.ip("-4", "addr", "show", "dev", "ovpnA").stdout
    assert f"inet {TUN_NET}.1/24" in addr
    ping = b.exec("ping", "-c", "3", "-W", "3", f"{TUN_NET}.1", timeout=60)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "3 received" in ping.stdout
    ping = a.exec("ping", "-c", "2", "-W", "3", "-s", "1000", f"{TUN_NET}.2", timeout=60)
    assert "2 received" in ping.stdout, ping.stdout + ping.stderr


def test_ovpn_refuses_bad_addresses_and_non_root_users(two_hosts: tuple[Host, Host]) -> None:
    a, _ = two_hosts
    r = a.exec(str(BIN / "ovpn"), "-i", "10.0.0.1", "-m", "255.0.255.0")
    # C's EXIT_FAILURE, its words and its usage on stdout
    assert r.returncode == 1 and r.stdout.startswith("Invalid subnet mask: 255.0.255.0.\n\nUsage: ovpn"), r.stdout
    r = a.exec(str(BIN / "ovpn"), "-i", "300.0.0.1", "-m", "255.255.255.0")
    assert r.returncode == 1 and r.stdout.startswith("Invalid IP address: 300.0.0.1.\n\nUsage: ovpn"), r.stdout
    r = a.exec(
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        str(BIN / "ovpn"),
        "-i",
        "10.0.0.1",
        "-m",
        "255.255.255.0",
    )
    assert r.returncode == 1 and "ovpn must be run as root." in r.stdout


TUNNEL_PROBE = """
import ipaddress, sys
from apps.ovpn import Tunnel, tun_open
from flowlib import FlowError

ip = ipaddress.IPv4Address(sys.argv[1])
ping = bytes.fromhex("4500001c00000000400100000a000001") + ip.packed + bytes.fromhex("0800f7ff00000000")


class Flow:
    def __init__(self) -> None:
        self.sdus = [b"", b"\\x00", b"\\xff" * 40, ping]
        self.reads = 0

    def read(self) -> bytes:
        self.reads += 1
        if not self.sdus:
            raise FlowError("over")
        return self.sdus.pop(0)


fd, _ = tun_open("ovpnP", ip, ipaddress.IPv4Address("255.255.255.0"), 1400)
flow = Flow()
tunnel = Tunnel(flow, fd)
tunnel.from_flow()
print(flow.reads, tunnel.refused)
"""


@pytest.mark.timeout(60)
def test_a_peers_sdus_that_are_not_ip_packets_are_dropped_not_the_tunnel(two_hosts: tuple[Host, Host]) -> None:
    """The peer may send anything: empty or non-IP SDUs, which the device refuses (EINVAL), cost
    only themselves; the IP packet after them still goes to the device."""
    a, _ = two_hosts
    r = a.exec(sys.executable, "-c", TUNNEL_PROBE, f"{TUN_NET}.1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].split() == ["5", "3"], r.stdout + r.stderr


CONFINE_PROBE = """
import ipaddress, socket, subprocess, sys, time
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, ICMPv6ND_RA, ICMPv6NDOptPrefixInfo
from apps.ovpn import Tunnel, tun_open
from flowlib import FlowError

ip, peer, port = ipaddress.IPv4Address(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ra = IPv6(src="fe80::1", dst="ff02::1", hlim=255) / ICMPv6ND_RA(routerlifetime=1800)
ra /= ICMPv6NDOptPrefixInfo(prefix="2001:db8:66::", prefixlen=64)
spoofed = IP(src="192.0.2.7", dst=str(ip)) / UDP(sport=7, dport=port) / b"spoofed"
legit = IP(src=peer, dst=str(ip)) / UDP(sport=7, dport=port) / b"legit"


class Flow:
    def __init__(self) -> None:
        self.sdus = [bytes(ra), bytes(spoofed), bytes(legit)]

    def read(self) -> bytes:
        if not self.sdus:
            raise FlowError("over")
        return self.sdus.pop(0)


listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listener.bind(("0.0.0.0", port))
listener.settimeout(1.0)
fd, dev = tun_open("ovpnC", ip, ipaddress.IPv4Address("255.255.255.0"), 1400)
time.sleep(2.5)  # the device's link-local address settled, had it one
Tunnel(Flow(), fd).from_flow()
got = []
try:
    while True:
        got.append(listener.recv(100).decode())
except TimeoutError:
    pass
print("routes:", subprocess.run(["ip", "-6", "route"], capture_output=True, text=True).stdout.replace("\\n", ";"))
print("addrs:", subprocess.run(["ip", "-6", "addr"], capture_output=True, text=True).stdout.replace("\\n", ";"))
print("got:", ",".join(got))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sysctls", ["writable", "read-only"])
def test_a_peer_neither_configures_the_host_nor_speaks_for_its_lan(two_hosts: tuple[Host, Host], sysctls: str) -> None:
    """The peer's router advertisement gave the host an IPv6 address and a default route through the
    tunnel; its packets from an address of the host's LAN reached the host's services. Only IPv4
    packets from addresses routed through the tunnel pass now, and the legitimate one still does.
    Where the device's settings cannot be written (a container's read-only /proc/sys), the tunnel
    still works and the peer's IPv6 is still dropped."""
    a, _ = two_hosts
    a.ip("addr", "add", "192.0.2.1/24", "dev", a.dev)  # the host's LAN
    probe = [sys.executable, "-c", CONFINE_PROBE, f"{TUN_NET}.1", f"{TUN_NET}.2", "9555"]
    if sysctls == "read-only":
        probe = ["unshare", "-m", "sh", "-c", 'mount -o bind,ro /proc/sys /proc/sys && exec "$@"', "-", *probe]
    r = a.exec(*probe, timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert "default" not in out["routes"] and "2001:db8:66" not in out["addrs"], r.stdout
    if sysctls == "writable":
        assert out["got"] == "legit", r.stdout
    else:
        assert "legit" in out["got"].split(","), r.stdout
        assert "cannot set" in r.stderr, r.stderr


LOCAL_INJECTOR = """
import socket, sys, time
from flowlib import flow_alloc
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


def checksum(b: bytes) -> int:
    s = sum(int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF


payload = b"from uid 65534"
udp = (7).to_bytes(2, "big") + port.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big") + bytes(2) + payload
hdr = bytes.fromhex("4500") + (20 + len(udp)).to_bytes(2, "big") + bytes.fromhex("000040004011") + bytes(2)
hdr += socket.inet_aton(src) + socket.inet_aton(dst)
packet = hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:] + udp
flow = flow_alloc("vpn", timeout=10)
print("allocated", flush=True)
for _ in range(20):
    flow.write(packet)
    time.sleep(0.25)
"""

UDP_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    print("got", s.recv(100).decode(), flush=True)
"""


@pytest.mark.timeout(120)
def test_a_local_user_opens_no_tunnel_into_a_root_ovpns_network(
    lab: Lab, two_hosts: tuple[Host, Host], procs: list[Proc]
) -> None:
    """Any local user allocating a flow to root's ovpn had its packets put on the host's network, sources
    of its choosing: ovpn takes the first flow from root or a remote peer, and refuses a local user's."""
    a, _ = two_hosts
    lab.tmp.chmod(0o755)  # the irmd's socket within every user's reach
    a.irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    a.irmd.note_children()
    listener = Proc(a, sys.executable, "-c", UDP_LISTENER, "9556")
    procs.append(listener)
    listener.wait_line("listening", 30)
    server = Proc(a, str(BIN / "ovpn"), "-i", f"{TUN_NET}.1", "-m", "255.255.255.0", "--dev", "ovpnS")
    procs.append(server)
    server.wait_line("Waiting for a new flow...", 30)
    a.irmd.irm_ok("bind", "process", str(server.popen.pid), "name", "vpn")
    a.irmd.irm_ok("name", "register", "vpn", "layer", "local")
    nobody = Proc(
        a,
        *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
        *(sys.executable, "-c", LOCAL_INJECTOR, f"{TUN_NET}.2", f"{TUN_NET}.1", "9556"),
    )
    procs.append(nobody)
    nobody.wait_line("allocated", 30)
    server.wait_line("Refused a flow from uid 65534: only root tunnels from this host.", 30)
    client = Proc(
        a, str(BIN / "ovpn"), "-n", "vpn", "-i", f"{TUN_NET}.2", "-m", "255.255.255.0", "--dev", "ovpnR"
    )  # root's own, beside it
    procs.append(client)
    client.wait_line("Starting read/write threads.", 30)
    server.wait_line("Starting read/write threads.", 30)
    time.sleep(2)  # what the user still writes has nowhere to go
    assert not any(line.startswith("got") for line in listener.seen), listener.seen
    while not listener.lines.empty():
        assert not str(listener.lines.get()).startswith("got"), "a packet of uid 65534 reached the host"
