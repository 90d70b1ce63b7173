"""Ouroboros 0.23's own documentation, replayed: the command sequences of ouroboros-tutorial(7), the
wiki's tutorials and the 0.20 release notes that run on one host (eth-llc and eth-dix on lo, udp4
on 127.0.0.1, local), typed as written, checked by what a user looks at: oping's replies and the
irm lists. (Tutorial 02, unicast over local, is tests/test_irm_tutorial.py.)

The Ethernet and UDP ones run in a network namespace of their own, so that the fixed UDP port and
the frames on lo are theirs alone; they need root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, irmd_env, parse_table, socket_answers, stop_irmd, terminate, wait_for

NEEDS_NETNS = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="Ethernet IPCPs on lo and a fixed UDP port need root and a network namespace",
)


@contextlib.contextmanager
def namespace(tmp_path: Path, config: Path | None = None) -> Iterator[tuple[IrmdProc, list[str]]]:
    """An irmd in a fresh network namespace (lo up), and the prefix that runs a command in there.
    The namespace, the irmd and whatever it started are gone afterwards, whatever happened."""
    ns = f"o7sdocs{os.getpid()}x{tmp_path.name[-12:]}"
    inside = ["ip", "netns", "exec", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    irmd: IrmdProc | None = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        sock, log = tmp_path / "irmd.sock", tmp_path / "irmd.log"
        args = ["--config", str(config)] if config else []
        with open(log, "wb") as out:  # ip netns exec execs the irmd: its pid is the irmd's
            proc = subprocess.Popen(
                [*inside, str(BIN / "irmd"), "--sock", str(sock), *args],
                env=irmd_env(sock),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        irmd = IrmdProc(sock, log, proc, irmd_env(sock))
        ready = (lambda: "applied" in irmd.log_text()) if config else (lambda: socket_answers(sock))
        wait_for(lambda: proc.poll() is not None or ready(), 60, "the irmd")
        assert proc.poll() is None, irmd.log_text()
        yield irmd, inside
    finally:
        if irmd is not None:
            stop_irmd(irmd, check=False)
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def typed(irmd: IrmdProc, inside: list[str], line: str) -> subprocess.CompletedProcess[str]:
    """Run a command line as the documentation writes it (`$ irm ...`, `$ oping ...`)."""
    tool, *args = line.split()
    return subprocess.run([*inside, str(BIN / tool), *args], env=irmd.env, capture_output=True, text=True, timeout=60)


def ok(irmd: IrmdProc, inside: list[str], *lines: str) -> None:
    """Each line succeeds silently, as Ouroboros's irm does."""
    for line in lines:
        r = typed(irmd, inside, line)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), f"{line}: {r.returncode} {r.stdout}{r.stderr}"
        irmd.note_children()


@contextlib.contextmanager
def server(irmd: IrmdProc, inside: list[str], tmp_path: Path, line: str = "oping --listen") -> Iterator[int]:
    """`$ oping -l &`: a server in the background, its pid, stopped afterwards."""
    log = tmp_path / "server.log"
    tool, *args = line.split()
    with open(log, "w") as out:
        proc = subprocess.Popen([*inside, str(BIN / tool), *args], env=irmd.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or "started" in log.read_text(), 30, "the oping server")
        assert proc.poll() is None, log.read_text()
        yield proc.pid
    finally:
        terminate(proc)


def pinged(irmd: IrmdProc, inside: list[str], line: str, name: str, count: int) -> None:
    """oping's answer, as 0.23's oping prints it: every reply, in order, and nothing lost."""
    r = typed(irmd, inside, line)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"Pinging {name} with 64 bytes of data ({count} packets):\n\n"), r.stdout
    replies = re.findall(rf"^64 bytes from {re.escape(name)}: seq=(\d+) time=[\d.]+ (?:ms|µs)$", r.stdout, re.M)
    assert [int(seq) for seq in replies] == list(range(count)), r.stdout
    assert f"--- {name} ping statistics ---" in r.stdout
    assert f"{count} packets transmitted, {count} received, 0 out-of-order, 0% packet loss" in r.stdout


def ipcps(irmd: IrmdProc) -> list[tuple[str, str, str, str]]:
    return [(i["name"], i["type"], i["layer"], i["state"]) for i in irmd.table("ipcp", "list")]


def names(irmd: IrmdProc) -> dict[str, dict[str, str]]:
    return {n["name"]: n for n in parse_table(irmd.irm_ok("name", "list").stdout)}


@NEEDS_NETNS
@pytest.mark.timeout(90)
def test_ouroboros_tutorial_7_pings_over_eth_llc_on_lo(tmp_path: Path) -> None:
    with namespace(tmp_path) as (irmd, inside):
        # The page's two lines in the words of an irm before 0.23: refused, as 0.23 refuses them,
        # saying how 0.23 spells them; nothing is done.
        for line, hint in (
            ("irm ipcp bootstrap type eth-llc name llc layer llc if lo", '"dev <interface name>"'),
            ("irm reg name my.oping.server layer llc", '"irm name register <name> layer <layer>"'),
        ):
            r = typed(irmd, inside, line)
            assert r.returncode == 1 and hint in r.stderr, r.stderr
        assert irmd.irm_ok("ipcp", "list").stdout == "No IPCPs in system.\n\n"

        ok(
            irmd,
            inside,
            "irm ipcp bootstrap type eth-llc name llc layer llc dev lo",
            "irm name register my.oping.server layer llc",
        )
        assert ipcps(irmd) == [("llc", "eth-llc", "llc", "operational")]
        with server(irmd, inside, tmp_path, "oping -l") as pid:
            ok(irmd, inside, f"irm bind process {pid} name my.oping.server")
            assert names(irmd)["my.oping.server"]["layers"] == "llc"
            assert names(irmd)["my.oping.server"]["pids"] == str(pid)
            pinged(irmd, inside, "oping -n my.oping.server -c 3", "my.oping.server", 3)


def test_tutorial_01_pings_over_a_local_layer(irmd: IrmdProc, tmp_path: Path) -> None:
    ok(irmd, [], "irm ipcp create type local name local-ipcp")
    assert ipcps(irmd) == [("local-ipcp", "local", "-", "init")]
    ok(irmd, [], "irm ipcp bootstrap type local name local-ipcp layer local-layer")
    assert ipcps(irmd) == [("local-ipcp", "local", "local-layer", "operational")]
    with server(irmd, [], tmp_path) as pid:
        ok(irmd, [], f"irm bind process {pid} name oping-server", "irm name register oping-server layer local-layer")
        pinged(irmd, [], "oping --server-name oping-server --count 3 --interval 100", "oping-server", 3)


@NEEDS_NETNS
@pytest.mark.timeout(90)
def test_tutorial_4_pings_over_eth_dix_on_lo(tmp_path: Path) -> None:
    """Tutorial 4's Ethernet layer, with both hosts' commands on one (lo as the interface)."""
    with namespace(tmp_path) as (irmd, inside):
        ok(
            irmd,
            inside,
            "irm ipcp bootstrap type eth-dix name eth layer eth-layer dev lo",
            "irm bind program oping name oping-server auto -- --listen",
            "irm name register oping-server layer eth-layer",
        )
        assert ipcps(irmd) == [("eth", "eth-dix", "eth-layer", "operational")]
        assert names(irmd)["oping-server"]["programs"] == f"{BIN / 'oping'} (auto)"
        pinged(irmd, inside, "oping --server-name oping-server --count 3 --interval 100", "oping-server", 3)


@NEEDS_NETNS
@pytest.mark.timeout(90)
def test_the_0_20_release_notes_abbreviated_commands_serve_over_udp(tmp_path: Path) -> None:
    """`irm i b t udp n udp l udp ip ADDR` and friends: every word a prefix, taken as 0.23 takes it
    (i = ipcp, b = bootstrap, t = type, udp = udp4, n = name, l = layer, prog = program)."""
    with namespace(tmp_path) as (irmd, inside):
        ok(
            irmd,
            inside,
            "irm i b t udp n udp l udp ip 127.0.0.1",
            "irm n r ouroboros.rocks.oping l udp",
            "irm b prog oping n ouroboros.rocks.oping auto -- -l",
        )
        assert ipcps(irmd) == [("udp", "udp4", "udp", "operational")]
        entry = names(irmd)["ouroboros.rocks.oping"]
        assert (entry["layers"], entry["programs"]) == ("udp", f"{BIN / 'oping'} (auto)")
        pinged(irmd, inside, "oping -n ouroboros.rocks.oping -c 3 -i 100", "ouroboros.rocks.oping", 3)


@NEEDS_NETNS
@pytest.mark.timeout(90)
def test_tutorial_05_config_serves_two_names_over_udp_on_loopback(tmp_path: Path) -> None:
    """Tutorial 05's server configuration on one machine ("set 127.0.0.1 for the SERVER IP ADDRESS"),
    with oping where this host has it; its [udp.*] table is the 0.20 spelling of [udp4.*]."""
    conf = tmp_path / "tut05.conf"
    conf.write_text(
        f'[name."oping-server"]\nprog=["{BIN / "oping"}"]\nargs=["--listen"]\nlb="round-robin"\n\n'
        f'[name."oping-server2"]\nprog=["{BIN / "oping"}"]\nargs=["--listen"]\n\n'
        '[udp.wifi1]\nbootstrap="wifi-network"\nip="127.0.0.1"\nreg=["oping-server", "oping-server2"]\n'
    )
    with namespace(tmp_path, conf) as (irmd, inside):
        assert ipcps(irmd) == [("wifi1", "udp4", "wifi-network", "operational")]
        listed = names(irmd)
        assert {n: (listed[n]["lb"], listed[n]["layers"]) for n in ("oping-server", "oping-server2")} == {
            "oping-server": ("round-robin", "wifi-network"),
            "oping-server2": ("spillover", "wifi-network"),
        }
        pinged(irmd, inside, "oping --server-name oping-server --count 3 --interval 100", "oping-server", 3)
        pinged(irmd, inside, "oping --server-name oping-server2 --count 3 --interval 100", "oping-server2", 3)


@pytest.mark.timeout(60)
def test_ouroboros_8_broadcast_layer_with_its_hash_reaches_a_reader(irmd: IrmdProc) -> None:
    """ouroboros(8): a broadcast IPCP takes [hash policy], the hash of the layer name; obc joins it."""
    ok(irmd, [], "irm ipcp bootstrap type broadcast name bc-ipcp layer bc hash SHA3_512 autobind")
    assert ipcps(irmd) == [("bc-ipcp", "broadcast", "bc", "operational")]
    reader = subprocess.Popen(
        [str(BIN / "obc"), "--listen", "--name", "bc"],
        env=irmd.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert [reader.stdout.readline().strip() for _ in range(2)] == ["Starting a reader.", "New flow."]
        r = typed(irmd, [], "obc --name bc --message hello")
        assert r.returncode == 0, r.stdout + r.stderr
        assert reader.stdout.readline().strip() == "Message is hello."
    finally:
        reader.kill()
        reader.wait()
