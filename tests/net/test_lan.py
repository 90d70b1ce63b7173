"""A LAN overlay booted only from config files: four hosts on one Ethernet bridge, each an
irmd started with configs/lan-first.toml (h1) or configs/lan-member.toml (h2..h4), unchanged,
plus one service table per host: a Styx file service on h1, an IBP depot on h2, netplumbd on h3.

The members find the layer by its name on the LAN, enroll, connect to their neighbours by
themselves, and every host reaches every other host's services by name; a member killed and
booted again from the same file rejoins by itself, and so does the first host (join=).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Lab, _run
from helpers import BIN, IrmdProc

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TAGS = "1234"
BOOT_WITHIN = 120.0  # seconds for the layer to form and every pair to answer
REJOIN_WITHIN = 120.0


SERVICES = {
    "1": '[name.files]\nprog = ["styx"]\nargs = ["serve --name files --root ${LAN_DIR}/files"]\n',
    "2": '[name.depot2]\nprog = ["ibp"]\nargs = ["depot --name depot2 --dir ${LAN_DIR}/depot2"]\n',
    "3": '[name.host3]\nprog = ["netplumbd"]\nargs = ["--name host3 --authorized-keys ${LAN_DIR}/authorized_keys"]\n',
    "4": "",
}
SERVICE_NAMES = {"1": "files", "2": "depot2", "3": "host3"}


def boot(lab: Lab, ns: str, tag: str, env: dict[str, str]) -> IrmdProc:
    """The host's irmd from the shipped file for its role, with its service's table added."""
    base = (CONFIGS / ("lan-first.toml" if tag == "1" else "lan-member.toml")).read_text()
    config = lab.tmp / f"h{tag}.toml"
    service = SERVICE_NAMES.get(tag)
    text = base + "\n" + SERVICES[tag]
    if service:  # registered where the host's own pong is: the same reg list
        text = text.replace('reg = ["pong-${HOSTNAME}"]', f'reg = ["pong-${{HOSTNAME}}", "{service}"]')
    config.write_text(text)
    return lab.start_irmd(ns, f"h{tag}", "--config", str(config), env={**env, "HOSTNAME": f"h{tag}"})


def eth0(ns: str, dev: str) -> None:
    """Rename the host's end of its veth to eth0, as the config files expect of a LAN host."""
    _run("ip", "-n", ns, "link", "set", "dev", dev, "down")
    _run("ip", "-n", ns, "link", "set", "dev", dev, "name", "eth0")
    _run("ip", "-n", ns, "link", "set", "dev", "eth0", "up")


def ping(irmd: IrmdProc, name: str) -> str | None:
    """None if `name` answered one ping through `irmd`, else why not."""
    try:
        done = subprocess.run(
            ["oping", "-n", name, "-c", "1", "--timeout", "5", "-Q"],
            env=irmd.env,
            capture_output=True,
            text=True,
            timeout=20,
        )
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
                + "\n".join(f"--- h{t} log tail:\n{irmds[t].log_text()[-1500:]}" for t in sorted(irmds))
            )
            time.sleep(1.0)
    return time.monotonic() - start


def use_services(irmds: dict[str, IrmdProc], env: dict[str, str], lan_dir: Path) -> list[str]:
    """Every host uses every service once, by name; what failed."""
    failures = []
    checks = {
        "files": (["styx", "cat", "files:/hello.txt"], "hello over the LAN"),
        "depot2": (["ibp", "status", "depot2"], "capacity"),
        "host3": (["plumb", "host3", "echo", "plumbed"], "plumbed"),
    }
    for tag, irmd in irmds.items():
        for service, (argv, expect) in checks.items():
            try:
                done = subprocess.run(
                    argv, env={**irmd.env, "HOME": env["HOME"]}, capture_output=True, text=True, timeout=60
                )
            except subprocess.TimeoutExpired:
                failures.append(f"h{tag} {service}: hung")
                continue
            if done.returncode != 0 or expect not in done.stdout:
                failures.append(f"h{tag} {service}: {done.returncode} {(done.stderr or done.stdout).strip()[-200:]}")
    return failures


def store_and_load(irmd: IrmdProc, lan_dir: Path) -> None:
    data = os.urandom(1_000_000)
    caps = subprocess.run(
        ["ibp", "allocate", "depot2", "--size", "2M", "--duration", "10m"],
        env=irmd.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert caps.returncode == 0, caps.stderr
    read, write = (next(w for w in caps.stdout.split() if w.endswith(right)) for right in ("/READ", "/WRITE"))
    stored = subprocess.run(["ibp", "store", write], env=irmd.env, input=data, capture_output=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    loaded = subprocess.run(["ibp", "load", read], env=irmd.env, capture_output=True, timeout=60)
    assert loaded.returncode == 0 and loaded.stdout == data, loaded.stderr


def kill_host(lab: Lab, ns: str, irmd: IrmdProc) -> None:
    """A crash: every process of the host's namespace killed at once, nothing cleaned up."""
    for pid in _run("ip", "netns", "pids", ns, check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError):  # it exited between the listing and the kill
            os.kill(int(pid), signal.SIGKILL)
    irmd.proc.wait(10)


@pytest.mark.net
@pytest.mark.timeout(420)
def test_four_hosts_boot_a_lan_overlay_from_config_files_and_a_killed_host_rejoins(lab: Lab) -> None:
    lan_dir = lab.tmp / "lan"
    for sub in ("files", "depot2", "home"):
        (lan_dir / sub).mkdir(parents=True)
    (lan_dir / "files" / "hello.txt").write_text("hello over the LAN\n")
    env = {"LAN_DIR": str(lan_dir), "HOME": str(lan_dir / "home")}
    subprocess.run([str(BIN / "plumb-keygen")], env={**os.environ, **env}, check=True, capture_output=True, timeout=30)
    (lan_dir / "authorized_keys").write_text((lan_dir / "home" / ".config" / "netplumb" / "id.pub").read_text())
    ends = dict(zip(TAGS, lab.bridge(TAGS), strict=True))
    for ns, dev in ends.values():
        eth0(ns, dev)
    irmds = {tag: boot(lab, ns, tag, env) for tag, (ns, _) in ends.items()}
    took = reach_all(irmds, BOOT_WITHIN, "boot")
    print(f"4 hosts: every pair reachable {took:.1f} s after the first ping round")
    assert use_services(irmds, env, lan_dir) == []
    store_and_load(irmds["4"], lan_dir)  # 1 MB from h4 into the depot on h2 and back, across the bridge

    for tag in ("3", "1"):  # a member, then the first host: each rejoins the layer it left
        kill_host(lab, ends[tag][0], irmds[tag])
        irmds[tag].sock.unlink(missing_ok=True)  # a crashed host leaves its socket; a reboot starts clean
        irmds[tag] = boot(lab, ends[tag][0], tag, env)
        took = reach_all(irmds, REJOIN_WITHIN, "rejoin")
        print(f"h{tag} killed and booted again: every pair reachable after {took:.1f} s")
    assert "joined layer net through a member" in irmds["1"].log_text()  # not a second layer "net"
    assert use_services(irmds, env, lan_dir) == []
