"""IBP across hosts: three IRMds on loopback joined by a udp4 layer, a depot on each; a client on
one host stores, copies depot to depot across the layer, and spreads an exNode over all three.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN
from unicast_net import UDP_LAYER, Cluster, Host

pytestmark = pytest.mark.timeout(120)


def ibp(host: Host, tool: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / tool), *args], env=host.irmd.env, input=stdin, capture_output=True, timeout=60)


def start_depot(host: Host, name: str, tmp: Path) -> None:
    proc = subprocess.Popen(
        [str(BIN / "ibp"), "depot", "--name", name, "--dir", str(tmp / name), "--layer", UDP_LAYER],
        env=host.irmd.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    host.procs.append(proc)  # killed by Cluster.stop_all


def wait_reachable(host: Host, name: str, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while True:
        r = ibp(host, "ibp", "status", name, "--timeout", "3")
        if r.returncode == 0:
            return
        assert time.monotonic() < deadline, f"depot {name} unreachable from {host.name}: {r.stderr!r}"
        time.sleep(0.5)


def test_three_hosts_store_copy_and_exnode(cluster: Cluster, tmp_path: Path) -> None:
    hosts = cluster.start(["h1", "h2", "h3"])
    cluster.udp(hosts)
    for h in hosts:
        start_depot(h, f"depot-{h.name}", tmp_path)
    for h in hosts:
        wait_reachable(hosts[0], f"depot-{h.name}")
    client = hosts[0]
    data = os.urandom(600_000)
    c2 = ibp(client, "ibp", "allocate", "depot-h2", "--size", "1M", "--duration", "10m").stdout.decode().split()
    c3 = ibp(client, "ibp", "allocate", "depot-h3", "--size", "1M", "--duration", "10m").stdout.decode().split()
    assert len(c2) == 3 and len(c3) == 3
    assert ibp(client, "ibp", "store", c2[1], stdin=data).returncode == 0
    r = ibp(client, "ibp", "copy", c2[0], c3[1])  # h2's depot pushes to h3's over the udp layer
    assert r.returncode == 0, r.stderr
    assert ibp(client, "ibp", "load", c3[0]).stdout == data

    src = tmp_path / "f.bin"
    src.write_bytes(data)
    xnd = tmp_path / "f.xnd"
    r = ibp(
        client,
        "exnode",
        "upload",
        str(src),
        "--depots",
        "depot-h1,depot-h2,depot-h3",
        "--stripe",
        "200k",
        "--replicas",
        "2",
        "-o",
        str(xnd),
    )
    assert r.returncode == 0, r.stderr
    r = ibp(hosts[2], "exnode", "download", str(xnd), "-o", "-")  # from another host
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
