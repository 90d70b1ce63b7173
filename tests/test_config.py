"""irmd --config: a TOML file with the tables of Ouroboros's irmd.conf boots a working IRMd,
and a bad file stops the boot with a message naming the file and the table.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, irmd_env, start_irmd, stop_irmd, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_the_demo_config_boots_a_local_layer_with_programs_started_on_demand(tmp_path: Path) -> None:
    irmd = start_irmd(tmp_path, args=["--config", str(ROOT / "configs" / "demo.toml")])
    try:
        wait_for(lambda: any(r["layer"] == "local" for r in irmd.table("ipcp", "list")), 15, "the local layer")
        names = {r["name"]: r for r in irmd.table("name", "list")}
        assert {"pong", "oecho", "sink"} <= set(names)
        assert names["pong"]["layers"] == "local" and "(auto)" in names["pong"]["programs"]
        out = irmd.run("oping", "-n", "pong", "-c", "2", "-i", "10")
        assert out.returncode == 0 and "2 received" in out.stdout, out.stdout + out.stderr
    finally:
        stop_irmd(irmd)


@pytest.mark.timeout(120)
def test_an_irmd_conf_style_pair_of_files_builds_a_unicast_layer(tmp_path: Path) -> None:
    port = random.randint(20000, 60000)
    first = tmp_path / "first.toml"
    first.write_text(f"""
[name.pong]
prog = ["oping"]
args = ["-l"]
lb = "spill"

[udp4.u1]
bootstrap = "lan"
ip = "127.0.0.1"
port = {port}

[unicast.n1]
bootstrap = "net"
autobind = true
routing = "link-state"
addr_size = 4
max_ttl = 30
reg = ["pong"]
""")
    member = tmp_path / "member.toml"
    member.write_text(f"""
[udp4.u2]
bootstrap = "lan"
ip = "127.0.0.2"
port = {port}
peer = "127.0.0.1"

[unicast.n2]
enrol = "net"
conn = ["n1"]
autobind = true
""")
    a = start_irmd(tmp_path, "a", ["--config", str(first)])
    b = None
    try:
        wait_for(lambda: any(r["layer"] == "net" for r in a.table("ipcp", "list")), 20, "layer net at a")
        b = start_irmd(tmp_path, "b", ["--config", str(member)])
        wait_for(lambda: any(r["layer"] == "net" for r in b.table("ipcp", "list")), 30, "layer net at b")

        def pong_reachable() -> bool:
            out = b.run("oping", "-n", "pong", "-c", "2", "-i", "10", timeout=20)
            return out.returncode == 0 and "2 received" in out.stdout

        wait_for(pong_reachable, 40, "pong over the unicast layer", interval=1.0)
        assert [r["lb"] for r in a.table("name", "list") if r["name"] == "pong"] == ["spillover"]
    finally:
        if b is not None:
            stop_irmd(b)
        stop_irmd(a)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("text", "words"), [
    ("[frobnicate.x]\nbootstrap = 'l'\n", ["unknown table [frobnicate]"]),
    ("[local.lo]\nbootstrap = 'l'\ncolour = 'red'\n", ["[local.lo]", "colour"]),
    ("[name.x]\nprog = ['nosuchprogram']\n", ["[name.x] prog", "not found"]),
    ("[local.lo\n", ["bad.toml"]),
    ("[udp4.u]\nbootstrap = 'l'\nip = 'not an ip'\n", ["[udp4.u]", "IPv4"]),
])
def test_a_bad_config_stops_the_boot_naming_file_and_table(tmp_path: Path, text: str, words: list[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    sock = tmp_path / "irmd.sock"
    r = subprocess.run([str(BIN / "irmd"), "--sock", str(sock), "--config", str(bad)], env=irmd_env(sock),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    for word in words:
        assert word in r.stderr, r.stderr
    assert not sock.exists()  # checked before anything started


@pytest.mark.timeout(60)
def test_a_config_that_fails_when_applied_stops_the_irmd_and_its_ipcps(tmp_path: Path) -> None:
    bad = tmp_path / "late.toml"
    bad.write_text("[local.lo]\nbootstrap = 'l'\n\n[local.lo2]\nbootstrap = 'l'\n")  # two IPCPs, one layer
    sock = tmp_path / "irmd.sock"
    r = subprocess.run([str(BIN / "irmd"), "--sock", str(sock), "--config", str(bad)], env=irmd_env(sock),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "[local.lo2]" in r.stderr and "already has an IPCP" in r.stderr, r.stderr
    assert not sock.exists()
