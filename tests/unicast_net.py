"""Helpers of the unicast end-to-end tests: several IRMds on loopback, one per simulated host.

Each host is its own IRMd (own socket, own log) with a udp4 shim on its own
127.0.0.x address; the first host's shim is every other shim's `peer`, so the
udp layer "lan" forms by gossip. Unicast layers are built on top with the irm
CLI (or, where many are needed, with control messages straight to the IRMd).
`Cluster.stop_all` stops everything, killed hosts included, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from helpers import IrmdProc, descendants_of, free_port, pid_alive, start_irmd, stop_irmd, udp4_bootstrap, wait_for

from flowlib.errors import FlowError
from flowlib.flow import flow_alloc
from flowlib.irm import IrmClient
from proto import messages as m
from transports.wire import Error, Message

UDP_LAYER = "lan"
PARALLEL_STARTS = 8

# An echo server that never reaps idle flows (oecho/oping -l drop a flow after 10 s idle,
# which would hide a flow going DOWN behind a DEALLOC). Bound by pid to its names.
ECHO_SERVER = r"""
import os, sys, threading, time
from flowlib import FlowError, flow_accept
delay = float(os.environ.get("ECHO_ACCEPT_DELAY", "0"))  # a slow acceptor: flows queue up at the IRMd
def serve(flow):
    try:
        while True:
            flow.write(flow.read())
    except FlowError:
        pass
    finally:
        flow.close()
print("ready", flush=True)
while True:
    try:
        f = flow_accept()
    except FlowError as e:
        print("accept:", e, flush=True)
        break
    threading.Thread(target=serve, args=(f,), daemon=True).start()
    time.sleep(delay)
"""


@dataclass
class Host:
    name: str
    ip: str
    irmd: IrmdProc
    killed: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def irm(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.irmd.irm(*args, timeout=timeout)

    def irm_ok(self, *args: str, timeout: float = 60.0) -> str:
        r = self.irm(*args, timeout=timeout)
        assert r.returncode == 0, f"{self.name}: irm {' '.join(args)} failed ({r.returncode}): {r.stderr}{r.stdout}"
        return r.stdout

    def request(self, msg: Message) -> Message:
        reply = self.irmd.request(msg)
        assert not isinstance(reply, Error), f"{self.name}: {type(msg).__name__} failed: {reply.code} {reply.text}"
        return reply

    def log(self) -> str:
        return self.irmd.log_text()

    def info(self, ipcp: str) -> dict[str, list[list[str]]]:
        """What the IPCP tells of itself (IpcpInfo, as `irm ipcp show`): section -> rows."""
        reply = self.request(m.IpcpInfoReq(ipcp))
        assert isinstance(reply, m.IpcpInfo), reply
        return {s.name: s.rows for s in reply.sections}

    def field(self, ipcp: str, name: str, section: str = "ipcp") -> str:
        return dict((row[0], row[1]) for row in self.info(ipcp)[section])[name]

    def counter(self, ipcp: str, name: str) -> int:
        return int(dict((row[0], row[1]) for row in self.info(ipcp)["counters"]).get(name, "0"))

    def neighbours(self, ipcp: str) -> set[str]:
        return {row[1] for row in self.info(ipcp)["neighbours"]}

    def address(self, ipcp: str) -> int:
        """The layer address of a unicast IPCP."""
        return int(self.field(ipcp, "address"))

    def oping(self, name: str, count: int = 3, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return self.irmd.run("oping", "-n", name, "-c", str(count), "-i", "10", timeout=timeout)

    def oping_until_ok(self, name: str, within: float, count: int = 3) -> float:
        """Seconds until `count` of `count` pings come back; fails after `within`."""
        start = time.monotonic()
        last = ""
        while time.monotonic() - start < within:
            try:
                r = self.oping(name, count, timeout=max(5.0, min(20.0, within - (time.monotonic() - start))))
                last = r.stdout[-300:] + r.stderr[-300:]
                if r.returncode == 0 and f"{count} received" in r.stdout:
                    return time.monotonic() - start
            except subprocess.TimeoutExpired:
                last = "oping timed out"
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: oping {name} did not succeed within {within} s; last: {last}")

    def start_echo(
        self, *names: str, layers: Iterable[str] = ("net",), accept_delay: float = 0.0
    ) -> subprocess.Popen[bytes]:
        """An echo server bound to `names`, registered in `layers`."""
        proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER],
            env=self.irmd.env | {"ECHO_ACCEPT_DELAY": str(accept_delay)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"  # flowlib imported; accept() is next
        for name in names:
            self.request(m.Bind("process", str(proc.pid), name))
            self.request(m.NameRegister(name, list(layers)))
        return proc


class Cluster:
    """Hosts on loopback, each its own IRMd and udp4 shim; all stopped by stop_all."""

    def __init__(self, keep: Path) -> None:
        # Not under pytest's tmp_path: a concurrent pytest session prunes old basetemp
        # directories, sockets included. Logs are copied to `keep` at the end.
        self.tmp = Path(tempfile.mkdtemp(prefix="ouro-uc-"))
        self.keep = keep
        self.hosts: dict[str, Host] = {}
        self.port = 0
        self.peer_ip = ""  # the first host's address: every udp shim's peer

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def start(self, names: list[str], parallel: bool = False) -> list[Host]:
        ips = [f"127.0.0.{len(self.hosts) + i + 1}" for i in range(len(names))]
        if not self.port:
            self.port = free_port(sorted({"127.0.0.1", *ips}))
            self.peer_ip = ips[0]
        started: dict[str, Host] = {}

        def one(name: str, ip: str) -> None:
            started[name] = self.hosts[name] = Host(name, ip, start_irmd(self.tmp, name))

        if parallel:  # in batches: fifty Python interpreters starting at once miss the start timeout
            pairs = list(zip(names, ips, strict=True))
            for i in range(0, len(pairs), PARALLEL_STARTS):
                threads = [threading.Thread(target=one, args=pair) for pair in pairs[i : i + PARALLEL_STARTS]]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            missing = [n for n in names if n not in started]
            assert not missing, f"irmds did not start: {missing}"
        else:
            for name, ip in zip(names, ips, strict=True):
                one(name, ip)
        return [started[n] for n in names]

    def udp(self, hosts: Iterable[Host], cli: bool = True, impair: str = "") -> None:
        """A udp4 shim 'u' in layer 'lan' on each host; the first host's address is the peer."""
        first = self.peer_ip
        for h in hosts:
            extra = ([] if h.ip == first else ["peer", first]) + (["impair", impair] if impair else [])
            if cli:
                h.irm_ok(*udp4_bootstrap(UDP_LAYER, h.ip, "port", str(self.port), *extra))
            else:
                conf = {"ip": h.ip, "port": str(self.port)} | ({"peer": first} if h.ip != first else {})
                conf |= {"impair": impair} if impair else {}
                h.request(m.IpcpBootstrap("u", UDP_LAYER, "udp4", False, conf))
            h.irmd.note_children()

    def kill(self, host: Host, whole_host: bool = True) -> None:
        """SIGKILL the host's IRMd; with whole_host, its IPCPs and programs too (a crash)."""
        host.irmd.note_children()
        kids = descendants_of(host.irmd.pid) | host.irmd.spawned
        host.killed = True
        if whole_host:  # freeze everything first: nobody gets to say goodbye
            pids = [host.irmd.pid, *kids, *(p.pid for p in host.procs)]
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            for p in host.procs:
                p.wait()
        host.irmd.proc.kill()
        host.irmd.proc.wait()
        wait_for(lambda: not any(pid_alive(p) for p in kids) or not whole_host, 10, "the host's processes to die")

    def stop_all(self) -> None:
        """Stop every host (the live ones checked for a clean exit) and every helper process."""
        errors = []
        for h in self.hosts.values():
            for p in h.procs:
                if p.poll() is None:
                    p.kill()
                with contextlib.suppress(Exception):
                    p.wait(5)
                if p.stdout is not None:
                    p.stdout.close()
        for h in self.hosts.values():
            try:
                h.irmd.note_children() if h.irmd.alive() else None
                stop_irmd(h.irmd, check=not h.killed)
            except Exception as e:  # stop the others first, then report
                errors.append(f"{h.name}: {e}")
        for log in self.tmp.glob("*.log"):
            with contextlib.suppress(OSError):
                shutil.copy(log, self.keep / log.name)
        shutil.rmtree(self.tmp, ignore_errors=True)
        assert not errors, "unclean shutdown:\n" + "\n".join(errors)


def echo_once(sock: Path, name: str, timeout: float = 10.0) -> str:
    """'' if a flow to `name` (allocated through the IRMd at `sock`) echoes a packet; else why not."""
    irm = None
    try:
        irm = IrmClient(sock)
        with flow_alloc(name, timeout=timeout, irm=irm) as flow:
            payload = os.urandom(16)
            flow.write(payload)
            flow.set_timeout(timeout)
            got = flow.read()
            return "" if got == payload else f"echo mismatch {got!r}"
    except (FlowError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        if irm is not None:
            with contextlib.suppress(Exception):
                irm.close()
