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
from conftest import Host
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
    assert r.returncode == 1 and "Invalid subnet mask: 255.0.255.0." in r.stderr  # C's EXIT_FAILURE, its usage
    r = a.exec(str(BIN / "ovpn"), "-i", "300.0.0.1", "-m", "255.255.255.0")
    assert r.returncode == 1 and "Invalid IP address: 300.0.0.1." in r.stderr
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
