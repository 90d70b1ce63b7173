"""No peer can end or stall an accept loop: the IBP depot, Styx, netplumbd and `oping -l` each
take a low-order key, a garbage hello, a silent flow and a close mid-allocation from uid 65534,
while a legitimate client is served at the same moment; memory stays bounded.

Encryption keys come from the IRMds' OAP exchange, so none of this input reaches a key
agreement in the server: it arrives as packets that do not open, or as flows that end."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, start_irmd, stop_irmd, wait_for

ROOT = Path(__file__).resolve().parent.parent
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SERVED_WITHIN = 10.0  # seconds a legitimate request may take while an attack is under way (loaded CI)
RSS_GROWTH_MB = 40.0

ATTACK = r"""
import os, sys, time
from flowlib.irm import IrmClient
from proto.qos import QosSpec
mode, name = sys.argv[1], sys.argv[2]
irm = IrmClient()
if mode == "midalloc":  # ask for a flow and vanish before it is answered
    import threading
    threading.Thread(target=irm.alloc, args=(name, QosSpec(cypher_s=256), 5.0), daemon=True).start()
    time.sleep(0.01)
    os._exit(0)
reply, fd = irm.alloc(name, QosSpec(cypher_s=256), 5.0)
print("allocated", reply.flow_id, flush=True)
if mode == "lowkey":  # the old in-band hello with the all-zero X25519 key, then a zero 'packet'
    os.write(fd, b"OUKX\x01" + bytes(32))
    os.write(fd, bytes(60))
elif mode == "garbage":
    os.write(fd, b"xyz")
    os.write(fd, os.urandom(900))
time.sleep(float(sys.argv[3]) if len(sys.argv) > 3 else 0.3)
os.close(fd)
"""


@dataclass
class Lab:
    tmp: Path
    irmd: IrmdProc
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    legit: dict[str, Callable[[], tuple[bool, str]]] = field(default_factory=dict)

    def run(
        self, argv: list[str], timeout: float = 30, nobody: bool = False, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*(AS_NOBODY if nobody else []), *argv], env=env or self.irmd.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.tmp)  # fmt: skip

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.tmp / f"{name}.log", "wb") as out:
            self.servers[name] = subprocess.Popen(argv, env=env or self.irmd.env, stdout=out, stderr=subprocess.STDOUT,
                                                  cwd=self.tmp)  # fmt: skip

    def attack(self, mode: str, name: str, hold: float = 0.3) -> subprocess.Popen[str]:
        env = dict(self.irmd.env, PYTHONPATH=str(ROOT))
        return subprocess.Popen([*AS_NOBODY, sys.executable, "-c", ATTACK, mode, name, str(hold)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.tmp)  # fmt: skip


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    tmp = Path(tempfile.mkdtemp(prefix="accept-", dir="/tmp"))
    tmp.chmod(0o755)  # the attacker (uid 65534) must reach the IRMd's socket
    irmd = start_irmd(tmp, env={"OUROBOROS_SECURITY_DIR": str(tmp / "security")})
    lab = Lab(tmp, irmd)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        (tmp / "root").mkdir()
        (tmp / "root" / "hello.txt").write_text("hello\n")
        lab.start("depot1", [str(BIN / "ibp"), "depot", "--name", "depot1", "--dir", str(tmp / "depot"),
                             "--layer", "local"])  # fmt: skip
        lab.start("files", [str(BIN / "styx"), "serve", "--name", "files", "--root", str(tmp / "root"),
                            "--layer", "local"])  # fmt: skip
        home = tmp / "home"
        home.mkdir()
        np_env = {**irmd.env, "HOME": str(home)}
        np_env.pop("XDG_CONFIG_HOME", None)
        subprocess.run([str(BIN / "plumb-keygen")], env=np_env, check=True, capture_output=True, timeout=30)
        (tmp / "authorized_keys").write_text((home / ".config/netplumb/id.pub").read_text())
        lab.start("host1", [str(BIN / "netplumbd"), "--name", "host1", "--layer", "local", "--authorized-keys",
                            str(tmp / "authorized_keys"), "--host-key", str(tmp / "host_key"),
                            "--recipe-dir", str(tmp / "recipes")], env=np_env)  # fmt: skip
        irmd.irm_ok("bind", "program", str(BIN / "oping"), "name", "pong")
        irmd.irm_ok("name", "register", "pong", "layer", "local")
        lab.start("pong", [str(BIN / "oping"), "-l"])

        def cli(argv: list[str], expect: str = "", env: dict[str, str] | None = None) -> Callable[[], tuple[bool, str]]:
            def go() -> tuple[bool, str]:
                r = lab.run(argv, env=env)
                return r.returncode == 0 and expect in r.stdout, (r.stderr or r.stdout).strip()[-160:]

            return go

        lab.legit = {
            "depot1": cli([str(BIN / "ibp"), "status", "depot1", "--timeout", "5"]),
            "files": cli([str(BIN / "styx"), "cat", "files:/hello.txt"], "hello"),
            "host1": cli([str(BIN / "plumb"), "host1", "echo", "alive"], "alive", np_env),
            "pong": cli([str(BIN / "oping"), "-n", "pong", "-c", "1", "--timeout", "5"]),
        }
        for name, check in lab.legit.items():  # all four up and serving (startup may take a while)
            wait_for(lambda c=check, n=name: c()[0] or lab.servers[n].poll() is not None, 60, f"{name} to serve")
            assert lab.servers[name].poll() is None, (tmp / f"{name}.log").read_text()[-500:]
        yield lab
    finally:
        for proc in lab.servers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in lab.servers.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        stop_irmd(irmd, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("server", ["depot1", "files", "host1", "pong"])
def test_a_server_survives_every_attack_while_serving_a_legitimate_client(lab: Lab, server: str) -> None:
    proc = lab.servers[server]
    rss_before = rss_mb(proc.pid)
    with ThreadPoolExecutor(2) as pool:
        for mode in ("lowkey", "garbage", "silent", "midalloc"):
            attacks = [lab.attack(mode, server, 3.0 if mode == "silent" else 0.3) for _ in range(3)]
            t0 = time.monotonic()
            ok, why = pool.submit(lab.legit[server]).result(60)  # served while the attack is in flight
            took = time.monotonic() - t0
            for a in attacks:
                out, _ = a.communicate(timeout=30)
                assert mode == "midalloc" or (a.returncode == 0 and "allocated" in out), f"{mode} attack: {out}"
            assert proc.poll() is None, f"{server} died on {mode}: {(lab.tmp / f'{server}.log').read_text()[-400:]}"
            assert ok, f"{server} did not serve a legitimate client during {mode}: {why}"
            assert took < SERVED_WITHIN, f"{server} took {took:.1f} s to serve during {mode}"
    assert lab.legit[server]()[0], f"{server} does not serve after the attacks"
    assert rss_mb(proc.pid) - rss_before < RSS_GROWTH_MB
    assert lab.irmd.alive()
