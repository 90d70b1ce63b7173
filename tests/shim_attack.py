"""Playing the attacker against a shim IPCP: datagrams from thousands of loopback addresses, sent by
an unprivileged process (as nobody when the tests run as root), which counts what comes back; and
the IPCP's CPU time and memory, read from /proc.

Any user may bind a UDP socket to any 127.x.y.z address, so the attacker needs no privilege to
come from thousands of "hosts", and receives every answer the IPCP sends them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from udp_lan import ping

from flowlib import Flow
from flowlib.irm import IrmClient

# Stdlib only: it runs as nobody, outside the project's venv.
ATTACKER = r"""
import json, select, socket, sys, time
job = json.load(sys.stdin)
target = tuple(job["target"])
frames = [bytes.fromhex(f) for f in job["frames"]]
echo = bytes.fromhex(job["echo"])  # if set: answer each challenge with this, then the cookie it carried
sent = received = answered = 0
worst = 0.0
over = {}
for start in range(0, len(job["sources"]), 200):
    socks = {}
    for ip in job["sources"][start : start + 200]:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        s.setblocking(False)
        socks[s] = [0, 0]
    for _ in range(job["repeat"]):
        for s, count in socks.items():
            for f in frames:
                try:
                    s.sendto(f, target)
                    count[0] += len(f)
                except OSError:
                    pass
        time.sleep(job["pause"])
    deadline = time.monotonic() + job["linger"]
    while time.monotonic() < deadline:
        ready, _, _ = select.select(list(socks), [], [], max(deadline - time.monotonic(), 0))
        for s in ready:
            try:
                while True:
                    data = s.recv(65536)
                    socks[s][1] += len(data)
                    if echo and len(data) >= job["cookie_at"] + 8:
                        at = job["cookie_at"]
                        s.sendto(echo + data[at : at + 8], target)
                        socks[s][0] += len(echo) + 8
            except OSError:
                pass
    for s, (out, back) in socks.items():
        sent += out
        received += back
        answered += back > 0
        worst = max(worst, back / out if out else 0.0)
        if out and back / out > job["bound"]:
            over[s.getsockname()[0]] = back / out
        s.close()
print(json.dumps({"sent": sent, "received": received, "answered": answered, "worst": worst, "over": over}))
"""


@dataclasses.dataclass(frozen=True)
class Attack:
    sent: int  # bytes the attacker sent
    received: int  # bytes the target sent back to the attacker's addresses
    answered: int  # sources that got anything back
    worst: float  # the largest bytes-back / bytes-sent of one source
    over: dict[str, float]  # the sources whose bytes-back / bytes-sent exceeded `bound`, and by how much


def nobody() -> list[str]:
    """The command prefix that drops to nobody, when we are root (the attacker holds no privilege)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def attack(
    target: tuple[str, int],
    sources: Sequence[str],
    frames: Sequence[bytes],
    repeat: int = 1,
    pause: float = 0.0,
    linger: float = 0.2,
    echo: bytes = b"",
    cookie_at: int = 0,
    timeout: float = 300.0,
    bound: float = 3.0,
) -> Attack:
    """Each source sends every frame `repeat` times; what came back is counted per source.

    With `echo`, every answer of at least `cookie_at` + 8 bytes is answered with `echo` followed by
    the 8 bytes at `cookie_at`: a source that proves it receives at its address (as a real host would).
    """
    job = {
        "target": list(target),
        "sources": list(sources),
        "frames": [f.hex() for f in frames],
        "repeat": repeat,
        "pause": pause,
        "linger": linger,
        "echo": echo.hex(),
        "cookie_at": cookie_at,
        "bound": bound,
    }
    # The system's python: nobody may not read the one the tests run with (a venv under /root, say).
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    r = subprocess.run(
        [*nobody(), python, "-c", ATTACKER],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
    assert r.returncode == 0, f"the attacker failed: {r.stderr}"
    return Attack(**json.loads(r.stdout))


def loopback_sources(n: int, block: int = 77) -> list[str]:
    """n distinct addresses 127.block.x.y."""
    return [f"127.{block}.{i // 250}.{i % 250 + 1}" for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Usage:
    cpu: float  # seconds of user and system time
    rss: int  # bytes resident


def usage(pid: int) -> Usage:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    return Usage((int(stat[11]) + int(stat[12])) / ticks, rss)


class Watched:
    """A flow to an oping server that must be served all through an attack: pinged twice a second
    from a thread while the attack runs, every echo checked; `rtt_max` is the slowest answer."""

    def __init__(self, client: IrmClient, name: str = "pong") -> None:
        reply, fd = client.alloc(name, None, 20)
        self.flow = Flow(reply, fd, client)
        ping(self.flow)
        self.errors: list[str] = []
        self.rtt_max = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seq = 1
        while not self._stop.wait(0.5):
            start = time.monotonic()
            try:
                ping(self.flow, seq)
            except Exception as e:  # reported by check()
                self.errors.append(f"ping {seq}: {e!r}")
                return
            self.rtt_max = max(self.rtt_max, time.monotonic() - start)
            seq += 1

    def check(self) -> None:
        """Stop pinging; every ping must have been answered, and the flow still be up."""
        self._stop.set()
        self._thread.join(10)
        assert not self.errors, self.errors
        ping(self.flow, 10_000)
        self.flow.close()
