"""Helpers of the suite: running and stopping irmd, the irm CLI, reading its tables, /proc."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from irm_runner import RUNNER

from flowlib.errors import NameNotFound
from flowlib.flow import Flow
from flowlib.irm import IrmClient, call, open_channel
from flowlib.qos import QosSpec
from transports.unix import SO_PASSRIGHTS, close_fds, refuse_rights, seqpacket_pair
from transports.wire import Message

BIN = Path(sys.executable).parent  # the venv's console scripts: irmd, irm, oping
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
T = TypeVar("T")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may contain spaces or parentheses
        out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def fds_on(path: str | Path) -> int:
    """This process's descriptors open on `path` or below it. Not all of them: other threads of a test
    worker (flows lingering, daemons' pipes) open and close their own meanwhile."""
    prefix, n = str(path), 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            n += target == prefix or target.startswith(prefix.rstrip("/") + "/")
    return n


def children_of(pid: int) -> set[int]:
    """Pids whose parent is `pid`."""
    return {kid for kid, parent in _parents().items() if parent == pid}


def descendants_of(pid: int) -> set[int]:
    """Pids below `pid`: for an IRMd, its IPCP fork server, the IPCPs forked there, its programs."""
    parents, found, todo = _parents(), set(), [pid]
    while todo:
        top = todo.pop()
        below = {kid for kid, parent in parents.items() if parent == top} - found
        found |= below
        todo.extend(below)
    return found


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of an `irm ... list` table ('(none)' is no rows)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    if not lines:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[1:]]


@dataclass
class IrmdProc:
    """A running irmd and what a test needs to talk to it."""

    sock: Path
    log: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    spawned: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def irm(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run an irm command against this irmd: the irm tool's own code, in the worker's irm runner
        (tests/irm_runner.py); the tool as a program is run by the tests of its process (test_tools,
        the documents, the tutorials)."""
        return RUNNER.run(list(args), self.sock, self.env.get("PATH"), timeout)

    def request(self, msg: Message) -> Message:
        """Send one control request straight to the irmd (what irm does, without a process)."""
        channel = open_channel(self.sock)
        try:
            reply, fds = call(channel, msg, timeout=30)
        finally:
            channel.close()
        close_fds(fds)
        return reply

    def irm_ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = self.irm(*args)
        assert r.returncode == 0, f"irm {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}"
        return r

    def table(self, *args: str) -> list[dict[str, str]]:
        return parse_table(self.irm_ok(*args).stdout)

    def ipcp_pid(self, name: str) -> int:
        rows = [r for r in self.table("ipcp", "list") if r["name"] == name]
        assert rows, f"no ipcp {name!r} in the list"
        return int(rows[0]["pid"])

    def note_children(self) -> set[int]:
        self.spawned |= descendants_of(self.pid)
        return self.spawned

    def run(self, tool: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run one of the console scripts (oping, ...) against this irmd."""
        return subprocess.run([str(BIN / tool), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaped either way."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def interrupted(proc: subprocess.Popen[str], timeout: float = 20.0) -> tuple[str, float]:
    """Ctrl-C to `proc`: its stdout to the end, and how long it took to end after the signal."""
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=timeout)
    return out, time.monotonic() - t0


def irmd_env(sock: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["OUROBOROS_SOCK"] = str(sock)
    env["OUROBOROS_STATE_DIR"] = str(sock.with_suffix(".state"))  # IPCPs' member keys: per IRMd, not /var/lib
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


def udp4_bootstrap(layer: str, ip: str, *opts: str, name: str = "u") -> list[str]:
    """The `irm` words that bootstrap a udp4 IPCP, as Ouroboros's documentation writes them."""
    return ["ipcp", "bootstrap", "type", "udp4", "name", name, "layer", layer, "ip", ip, *opts]


def start_irmd(tmp: Path, name: str = "irmd", args: Sequence[str] = (), env: dict[str, str] | None = None) -> IrmdProc:
    sock = tmp / f"{name}.sock"
    log = tmp / f"{name}.log"
    env = {**irmd_env(sock), **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "irmd"), "--sock", str(sock), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    irmd = IrmdProc(sock, log, proc, env)
    try:
        wait_for(lambda: proc.poll() is not None or socket_answers(sock), START_TIMEOUT, "the irmd socket")
        assert proc.poll() is None, f"irmd exited with {proc.returncode}:\n{irmd.log_text()}"
    except BaseException:
        stop_irmd(irmd, check=False)
        raise
    return irmd


def stop_irmd(irmd: IrmdProc, check: bool = True) -> None:
    """SIGTERM, then SIGKILL; with check, assert a clean exit, no socket, no children left."""
    proc = irmd.proc
    if proc.poll() is None:
        irmd.note_children()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    leftovers = set()
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not any(pid_alive(p) for p in irmd.spawned), 5.0, "the irmd's children to exit")
    for pid in irmd.spawned:
        if pid_alive(pid):
            leftovers.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if not check:
        return
    assert proc.returncode == 0, f"irmd exited with {proc.returncode}:\n{irmd.log_text()}"
    assert not irmd.sock.exists(), "irmd left its socket behind"
    assert not leftovers, f"irmd left children running: {sorted(leftovers)}"


Pair = tuple[Flow, Flow]


def alloc_when_accepting(client: IrmClient, name: str, qos_spec: QosSpec | None = None) -> Flow:
    """Allocate once the accepting thread has reached the IRMd (until then: 'no process is accepting')."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return Flow(*client.alloc(name, qos_spec, 10), client)
        except NameNotFound as e:
            if "no process is accepting" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def accepted_pair(server: IrmClient, client: IrmClient, name: str, qos_spec: QosSpec | None = None) -> Pair:
    """(client end, server end) of a flow that `server` took with accept."""
    with ThreadPoolExecutor(1) as pool:
        accepted: Future[tuple[object, int]] = pool.submit(server.accept, 10)
        cli = alloc_when_accepting(client, name, qos_spec)
        srv = Flow(*accepted.result(timeout=15), server)  # type: ignore[arg-type]
    return cli, srv


def free_port(ips: Iterable[str]) -> int:
    """A port free for both UDP and TCP on every one of `ips` right now.

    Chosen below the kernel's ephemeral range (32768 up), so no outgoing socket takes it meanwhile,
    and from a slice of its own per xdist worker, so parallel tests never pick the same one.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    slot = int(worker[2:]) % 8 if worker[2:].isdigit() else 0
    low = 20000 + slot * 1500
    for _ in range(200):
        port = random.randint(low, low + 1499)
        socks = []
        try:
            for ip in ips:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    s = socket.socket(socket.AF_INET, kind)
                    socks.append(s)
                    s.bind((ip, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port
    raise RuntimeError("no free port")


def lingering_socket(linger: int) -> tuple[socket.socket, tuple[socket.socket, socket.socket]]:
    """A TCP socket on loopback holding data its peer never reads, with SO_LINGER `linger` s: its
    last close() waits that long. Also the listener and the peer, to keep open meanwhile."""
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the peer's window shuts on a few KB
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c.connect(lst.getsockname())
    peer, _ = lst.accept()
    c.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            c.send(b"x" * 65536)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, linger))
    return c, (lst, peer)


def kernel_refuses_rights() -> bool:
    """Whether this kernel lets a socket refuse descriptors (SO_PASSRIGHTS, Linux 6.16)."""
    a, b = seqpacket_pair(rights=True)
    with a, b:
        refuse_rights(b)
        try:
            return b.getsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS) == 0
        except OSError:  # a kernel without the option
            return False


def serve_tcp(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """Accept on a listening `sock`, one connection after another, each handed to `handle`, until the
    socket is closed; on a daemon thread of its own (a test's fake service)."""

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            handle(conn)

    threading.Thread(target=accept, daemon=True).start()


# A process that accepts flows for sys.argv[1] (registered in the layer named "local") and prints, per
# flow, what the IRMd told it of the allocator: [uid, gid, groups] as JSON; then it hangs up.
WHO_ACCEPTS = r"""
import json, os, sys
from flowlib import flow_accept
from flowlib.irm import IrmClient, call
from proto import messages as m
irm = IrmClient()
call(irm.channel, m.Bind("process", str(os.getpid()), sys.argv[1]), 10)
call(irm.channel, m.NameRegister(sys.argv[1], ["local"]), 10)
print("ready", flush=True)
while True:
    f = flow_accept(irm=irm)
    groups = None if f.peer_groups is None else list(f.peer_groups)
    print(json.dumps([f.peer_uid, f.peer_gid, groups]), flush=True)
    f.close()
"""


# Allocates up to argv[2] flows to argv[1], prints how many it got and why it stopped ("N then CODE
# message"), and holds them for two minutes (or until killed).
HOLD_FLOWS_TO = """
import sys, time
from flowlib import flow_alloc
from proto.errors import FlowError
flows, why = [], "none"
try:
    for _ in range(int(sys.argv[2])):
        flows.append(flow_alloc(sys.argv[1], timeout=10))
except FlowError as e:
    why = f"{e.code} {e}"
print(len(flows), "then", why, flush=True)
time.sleep(120)
"""
