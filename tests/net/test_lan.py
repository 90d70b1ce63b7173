"""A LAN overlay booted only from config files: four hosts on one Ethernet bridge, each an
irmd started with configs/lan-first.toml (h1) or configs/lan-member.toml (h2..h4), unchanged.

The members find the layer by its name on the LAN, enroll, connect to their neighbours by
themselves, and every host reaches every other host's service by name; a host killed and
booted again from the same file rejoins by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Lab, _run
from helpers import IrmdProc

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TAGS = "1234"
BOOT_WITHIN = 120.0  # seconds for the layer to form and every pair to answer
REJOIN_WITHIN = 120.0


def boot(lab: Lab, ns: str, tag: str) -> IrmdProc:
    config = CONFIGS / ("lan-first.toml" if tag == "1" else "lan-member.toml")
    return lab.start_irmd(ns, f"h{tag}", "--config", str(config), env={"HOSTNAME": f"h{tag}"})


def eth0(ns: str, dev: str) -> None:
    """Rename the host's end of its veth to eth0, as the config files expect of a LAN host."""
    _run("ip", "-n", ns, "link", "set", "dev", dev, "down")
    _run("ip", "-n", ns, "link", "set", "dev", dev, "name", "eth0")
    _run("ip", "-n", ns, "link", "set", "dev", "eth0", "up")


def ping(irmd: IrmdProc, name: str) -> str | None:
    """None if `name` answered one ping through `irmd`, else why not."""
    try:
        done = subprocess.run(["oping", "-n", name, "-c", "1", "--timeout", "5", "-Q"], env=irmd.env,
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "oping hung"
    if done.returncode == 0 and " 0% packet loss" in done.stdout:
        return None
    return (done.stderr or done.stdout).strip().splitlines()[-1:][0] if (done.stderr or done.stdout) else "no output"


def reach_all(irmds: dict[str, IrmdProc], within: float, what: str) -> float:
    """Poll until every host has pinged every other host's pong; seconds it took."""
    start = time.monotonic()
    pending = {(a, b) for a in irmds for b in irmds if a != b}
    why: dict[tuple[str, str], str] = {}
    while pending:
        for a, b in sorted(pending):
            err = ping(irmds[a], f"pong-h{b}")
            if err is None:
                pending.discard((a, b))
            else:
                why[(a, b)] = err
        if pending:
            assert time.monotonic() - start < within, (
                f"{what}: {len(pending)} pairs still failing after {within} s: "
                f"{ {p: why[p] for p in sorted(pending)[:4]} }\n"
                + "\n".join(f"--- h{t} log tail:\n{irmds[t].log_text()[-1500:]}" for t in sorted(irmds)))
            time.sleep(1.0)
    return time.monotonic() - start


def kill_host(lab: Lab, ns: str, irmd: IrmdProc) -> None:
    """A crash: every process of the host's namespace killed at once, nothing cleaned up."""
    for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    irmd.proc.wait(10)


@pytest.mark.net
@pytest.mark.timeout(420)
def test_four_hosts_boot_a_lan_overlay_from_config_files_and_a_killed_host_rejoins(lab: Lab) -> None:
    ends = dict(zip(TAGS, lab.bridge(TAGS), strict=True))
    for ns, dev in ends.values():
        eth0(ns, dev)
    irmds = {tag: boot(lab, ns, tag) for tag, (ns, _) in ends.items()}
    took = reach_all(irmds, BOOT_WITHIN, "boot")
    print(f"4 hosts: every pair reachable {took:.1f} s after the first ping round")

    kill_host(lab, ends["3"][0], irmds["3"])
    irmds["3"].sock.unlink(missing_ok=True)  # a crashed host leaves its socket; a reboot starts clean
    irmds["3"] = boot(lab, ends["3"][0], "3")
    took = reach_all(irmds, REJOIN_WITHIN, "rejoin")
    print(f"h3 killed and booted again: every pair reachable after {took:.1f} s")
