"""Ouroboros wiki Tutorial 02, command for command: a unicast layer of two IPCPs (uni-1 bootstrapped,
uni-2 enrolled) in one irmd over a local layer, an oping server reached first over the local layer
and, once unregistered there, over the unicast layer. Each irm command succeeds silently, as in
Ouroboros; oping's answers are Ouroboros's format.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, parse_table, wait_for

# Tutorial 01 leaves a local layer and an oping server; Tutorial 02 builds the unicast layer over it.
TUTORIAL = [
    "irm ipcp bootstrap type local name local-ipcp layer local-layer",
    "irm ipcp bootstrap type unicast name uni-1 layer unicast-layer",
    "irm bind ipcp uni-1 name uni-1",
    "irm bind ipcp uni-1 name unicast-layer",
    "irm name register uni-1 layer local-layer",
    "irm name register unicast-layer layer local-layer",
    "irm ipcp enroll name uni-2 layer unicast-layer autobind",
    "irm ipcp connect name uni-2 dst uni-1 component mgmt",
    "irm ipcp connect name uni-2 dst uni-1 component dt",
]
PING = re.compile(r"^64 bytes from oping-server: seq=(\d+) time=[\d.]+ (ms|µs)$", re.M)


def run(irmd: IrmdProc, line: str) -> subprocess.CompletedProcess[str]:
    tool, *args = line.split()
    return irmd.run(tool, *args, timeout=60)


def ping(irmd: IrmdProc, count: int) -> str:
    r = run(irmd, f"oping --server-name oping-server --count {count} --interval 100")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(f"Pinging oping-server with 64 bytes of data ({count} packets):\n\n")
    assert [int(seq) for seq, _ in PING.findall(r.stdout)] == list(range(count))
    assert f"{count} packets transmitted, {count} received, 0 out-of-order, 0% packet loss" in r.stdout
    return r.stdout


def via(irmd: IrmdProc) -> set[str]:
    """The layers of the live flows the oping server holds now (as C's, it keeps one its client let go
    until the flow has been idle for 10 s)."""
    return {
        f["layer"]
        for f in irmd.table("flow", "list")
        if f["name"] == "oping-server" and f["role"] == "dst" and f["state"] == "allocated"
    }


@pytest.mark.timeout(120)
def test_tutorial_02_runs_as_written(irmd: IrmdProc, tmp_path: Path) -> None:
    for line in TUTORIAL:
        r = run(irmd, line)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), f"{line}: {r.stdout}{r.stderr}"
        irmd.note_children()
    ipcps = irmd.table("ipcp", "list")
    assert [(i["name"], i["type"], i["layer"]) for i in ipcps] == [
        ("local-ipcp", "local", "local-layer"),
        ("uni-1", "unicast", "unicast-layer"),
        ("uni-2", "unicast", "unicast-layer"),
    ]
    names = {n["name"]: n for n in irmd.table("name", "list")}
    assert names["unicast-layer"]["pids"] == ",".join(sorted((i["pid"] for i in ipcps[1:]), key=int))

    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(BIN / "oping"), "--listen"], env=irmd.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "started" in log.read_text(), 15, "the oping server")
        for line in (
            f"irm bind process {server.pid} name oping-server",
            "irm name register oping-server layer local-layer",  # as Tutorial 01 left it
            "irm name register oping-server layer unicast-layer",
        ):
            r = run(irmd, line)
            assert r.returncode == 0, f"{line}: {r.stderr}"
        rows = parse_table(irmd.irm_ok("name", "list").stdout)
        assert next(n for n in rows if n["name"] == "oping-server")["layers"] == "local-layer,unicast-layer"

        ping(irmd, 3)  # the irmd prefers the local layer
        assert "New flow" in log.read_text() and "Received 64 bytes" in log.read_text()
        run(irmd, "irm name unregister oping-server layer local-layer")
        with subprocess.Popen(
            [str(BIN / "oping"), "--server-name", "oping-server", "--count", "30", "--interval", "100"],
            env=irmd.env,
            stdout=subprocess.PIPE,
            text=True,
        ) as client:
            wait_for(lambda: via(irmd), 30, "the oping flow")
            assert via(irmd) == {"unicast-layer"}  # once unregistered from the local layer
            out, _ = client.communicate(timeout=60)
        assert "30 packets transmitted, 30 received" in out
    finally:
        server.kill()
        server.wait()
