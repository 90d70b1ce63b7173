"""netplumb across network namespaces: plumb in one, netplumbd (started on demand by its IRMd) in
the other, over a udp4 layer on a veth pair.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import Host
from helpers import BIN

pytestmark = [pytest.mark.net, pytest.mark.timeout(120)]


def test_plumb_across_namespaces(two_hosts: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = two_hosts
    net = f"10.{200 + os.getpid() % 50}.251"
    for host, ip in ((a, f"{net}.1"), (b, f"{net}.2")):
        host.ip("addr", "add", f"{ip}/24", "brd", "+", "dev", host.dev)
        host.irmd.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "lan", "ip", ip)
        host.irmd.note_children()
    home = tmp_path / "home"
    home.mkdir()
    env = {**a.irmd.env, "HOME": str(home)}
    env.pop("XDG_CONFIG_HOME", None)
    subprocess.run([str(BIN / "plumb-keygen")], env=env, check=True, capture_output=True, timeout=30)
    auth = tmp_path / "authorized_keys"
    auth.write_text((home / ".config/netplumb/id.pub").read_text())
    b.irmd.irm_ok(
        "bind",
        "program",
        str(BIN / "netplumbd"),
        "name",
        "host2",
        "auto",
        "--",
        "--name",
        "host2",
        "--authorized-keys",
        str(auth),
        "--host-key",
        str(tmp_path / "host_key"),
    )
    b.irmd.irm_ok("name", "register", "host2", "layer", "lan")

    def plumb(*args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", a.ns, str(BIN / "plumb"), "host2", *args],
            env=env,
            input=data,
            capture_output=True,
            timeout=60,
        )

    r = plumb("sh", "-c", "echo hello-from-b; exit 5")
    assert (r.returncode, r.stdout) == (5, b"hello-from-b\n"), r.stderr
    data = os.urandom(2_000_000)
    r = plumb("cat", data=data)
    assert r.returncode == 0 and r.stdout == data, r.stderr
