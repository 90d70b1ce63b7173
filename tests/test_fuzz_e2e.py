"""The fuzzers' inputs against running servers, from uid 65534: bent and typed-junk control frames
(some carrying fds where none belong) at the IRMd's socket, and hostile 9P requests (names with
NUL, offsets past 2^63, bent messages) at a Styx server over a flow. Each server lives on, leaks no
descriptors, and serves a legitimate client afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, start_irmd, stop_irmd, terminate, wait_for

ROOT = Path(__file__).resolve().parent.parent
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to attack as uid 65534"
    ),
]

CONTROL_ATTACK = r"""
import os, random, socket, sys
from proto import messages as m
from fuzzing import cases
from test_fuzz_control import _frames
from transports.unix import send_frame

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(os.environ["OUROBOROS_SOCK"])
    s.setblocking(False)
    return s

rng = random.Random(1)
s, sent, connections = connect(), 0, 1
typed = _frames(m.CODEC, 3, 1500)  # most decode: they reach the policy and the handlers
for data in [*typed, *cases(2, typed[:300], 1200)]:
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(rng.choice((0, 0, 0, 1, 4, 6)))]
    try:
        send_frame(s, data, fds)
        sent += 1
        while s.recv(70000):  # replies, if any came already; b"": dropped, as it may
            pass
        s.close()
        s, connections = connect(), connections + 1
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        s, connections = connect(), connections + 1
    finally:
        for fd in fds:
            os.close(fd)
print("sent", sent, "connections", connections, flush=True)
"""

STYX_ATTACK = r"""
import sys
from apps.styx import wire as w
from apps.styx.transport import dial

MAX = 2**64 - 1
t = dial("files")
def rpc(msg):
    t.send(w.encode(msg) if isinstance(msg, w.Msg) else msg)
    return w.decode(t.recv(timeout=10))
assert isinstance(rpc(w.Tversion(w.NOTAG, 8192, "9P2000")), w.Rversion)
assert isinstance(rpc(w.Tattach(1, 0, w.NOFID, "nobody", "")), w.Rattach)
assert isinstance(rpc(w.Twalk(1, 0, 1, ["hello.txt"])), w.Rwalk)
assert isinstance(rpc(w.Topen(1, 1, w.OREAD)), w.Ropen)
hostile = [w.Tcreate(1, 0, "x\0y", 0o644, w.OWRITE), w.Twalk(1, 0, 2, ["hello.txt\0"]), w.Tread(1, 1, MAX, 10),
           w.Tread(1, 1, 2**63, 10), w.Twrite(1, 1, MAX, b"x")]
st = w.Stat.dont_touch()
st.length = MAX - 1
hostile.append(w.Twstat(1, 1, st))
for msg in hostile:
    reply = rpc(msg)
    assert isinstance(reply, w.Rerror) and "internal error" not in reply.ename, (msg, reply)
from test_fuzz_styx import requests, _fixed
from fuzzing import cases
answered = 0
for data in cases(5, requests(4, 200), 400):
    if len(data) < w.HEADER:
        continue  # a flow carries no empty SDU, and a piece this short waits for the rest of its message
    t.send(_fixed(data))
    reply = w.decode(t.recv(timeout=10))
    assert not (isinstance(reply, w.Rerror) and "internal error" in reply.ename), (data, reply)
    answered += 1
print("answered", answered, flush=True)
"""


@dataclass
class Lab:
    tmp: Path
    irmd: IrmdProc
    styx: subprocess.Popen[bytes]

    def attack(self, script: str) -> subprocess.CompletedProcess[str]:
        env = dict(self.irmd.env, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
        return subprocess.run([*AS_NOBODY, sys.executable, "-c", script], env=env, capture_output=True, text=True,
                              timeout=120, cwd=self.tmp)  # fmt: skip

    def cat(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AS_NOBODY, str(BIN / "styx"), "cat", "files:/hello.txt"], env=self.irmd.env,
                              capture_output=True, text=True, timeout=60, cwd=self.tmp)  # fmt: skip


def fds_of(pid: int) -> int:
    """How many of `pid`'s descriptors are /dev/null: what the attack passes (the IRMd's other
    descriptors come and go with the clients and IPCPs of the lab)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    return count


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-", dir="/tmp"))
    tmp.chmod(0o755)  # the attacker (uid 65534) must reach the IRMd's socket
    irmd = start_irmd(tmp, env={"OUROBOROS_SECURITY_DIR": str(tmp / "security")})
    styx: subprocess.Popen[bytes] | None = None
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        (tmp / "root").mkdir()
        (tmp / "root" / "hello.txt").write_text("hello\n")
        with open(tmp / "styx.log", "wb") as out:
            styx = subprocess.Popen(
                [str(BIN / "styx"), "serve", "--name", "files", "--root", str(tmp / "root"), "--layer", "local"],
                env=irmd.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        lab = Lab(tmp, irmd, styx)
        wait_for(lambda: styx.poll() is not None or lab.cat().returncode == 0, 60, "styx to serve")
        assert styx.poll() is None, (tmp / "styx.log").read_text()[-500:]
        yield lab
    finally:
        if styx is not None and styx.poll() is None:
            terminate(styx)
        stop_irmd(irmd, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_irmd_survives_fuzzed_control_frames_and_serves_after(lab: Lab) -> None:
    fds_before = fds_of(lab.irmd.pid)
    r = lab.attack(CONTROL_ATTACK)
    assert r.returncode == 0 and "sent" in r.stdout, r.stderr[-2000:]
    assert lab.irmd.alive(), lab.irmd.log_text()[-2000:]
    assert [row["name"] for row in lab.irmd.table("ipcp", "list")] == ["lo"]
    wait_for(lambda: fds_of(lab.irmd.pid) <= fds_before, 10, "the irmd to close the fds the attack passed it")
    assert lab.cat().stdout == "hello\n"  # a flow allocated by uid 65534 right after


def test_a_styx_server_answers_hostile_9p_and_serves_after(lab: Lab) -> None:
    r = lab.attack(STYX_ATTACK)
    assert r.returncode == 0 and "answered" in r.stdout, r.stderr[-3000:]
    assert lab.styx.poll() is None, (lab.tmp / "styx.log").read_text()[-2000:]
    assert lab.cat().stdout == "hello\n"
    assert "internal error" not in (lab.tmp / "styx.log").read_text()
