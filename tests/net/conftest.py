"""Fixtures for tests across network namespaces: hosts joined by a veth pair or a bridge, one irmd each.

Everything a fixture makes (namespaces, links, irmds and what they spawned) is torn down even when
the test fails; without root or `ip netns` the tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import BIN, START_TIMEOUT, IrmdProc, irmd_env, socket_answers, stop_irmd, wait_for

_ids = itertools.count()


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


@functools.cache
def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces and veth pairs"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"otprobe{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def unique(prefix: str) -> str:
    """A name no other test run uses at the same time; short enough for an interface (15)."""
    return f"{prefix}{os.getpid() % 100000}x{next(_ids)}"


@dataclass
class Host:
    """A network namespace with one interface towards the others and its own irmd."""

    ns: str
    dev: str
    irmd: IrmdProc

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "-n", self.ns, *args, check=check)

    def exec(self, *argv: str, input: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace (with the host's irmd in its environment)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            env=self.irmd.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def mac(self) -> str:
        info = json.loads(self.ip("-j", "link", "show", "dev", self.dev).stdout)
        return str(info[0]["address"])

    def link(self, up: bool) -> None:
        self.ip("link", "set", self.dev, "up" if up else "down")


@dataclass
class Lab:
    """Namespaces and irmds made for one test; `close` undoes all of it."""

    tmp: Path
    namespaces: list[str] = field(default_factory=list)
    irmds: list[IrmdProc] = field(default_factory=list)
    root_links: list[str] = field(default_factory=list)  # links created in the root namespace

    def netns(self, tag: str) -> str:
        ns = unique(f"ot{tag}")
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def veth(self, ns_a: str, ns_b: str) -> tuple[str, str]:
        """A veth pair with one end in each namespace, both up; returns the two names."""
        a, b = unique("va"), unique("vb")
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self.root_links.append(a)
        for dev, ns in ((a, ns_a), (b, ns_b)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        return a, b

    def start_irmd(self, ns: str, name: str, *args: str, env: dict[str, str] | None = None) -> IrmdProc:
        """An irmd inside `ns` (ip netns exec execs it: the pid is the irmd's); `args` for it,
        `env` added to its environment. Its log is appended to, so a restarted host keeps one."""
        sock = self.tmp / f"{name}.sock"
        log = self.tmp / f"{name}.log"
        env = {**irmd_env(sock), **(env or {})}
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, "env", f"OUROBOROS_SOCK={sock}", str(BIN / "irmd"),
                 "--sock", str(sock), *args],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        irmd = IrmdProc(sock, log, proc, env)
        self.irmds.append(irmd)
        wait_for(lambda: proc.poll() is not None or socket_answers(sock), START_TIMEOUT, f"the irmd socket in {ns}")
        assert proc.poll() is None, f"irmd in {ns} exited with {proc.returncode}:\n{irmd.log_text()}"
        return irmd

    def host(self, ns: str, dev: str, name: str) -> Host:
        return Host(ns, dev, self.start_irmd(ns, name))

    def bridge(self, tags: str) -> list[tuple[str, str]]:
        """A namespace per tag, each with a veth into one bridge (in a namespace of its own);
        [(namespace, interface)]."""
        switch = self.netns("sw")
        bridge = unique("br")
        _run("ip", "-n", switch, "link", "add", bridge, "type", "bridge", "forward_delay", "0")
        _run("ip", "-n", switch, "link", "set", bridge, "up")
        ends = []
        for tag in tags:
            ns = self.netns(tag)
            dev, port = self.veth(ns, switch)
            _run("ip", "-n", switch, "link", "set", port, "master", bridge)
            ends.append((ns, dev))
        return ends

    def close(self) -> None:
        for irmd in self.irmds:
            with contextlib.suppress(Exception):
                stop_irmd(irmd, check=False)
        for ns in self.namespaces:
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns, check=False)
        for link in self.root_links:  # only if moving it into a namespace failed
            if Path(f"/sys/class/net/{link}").exists():
                _run("ip", "link", "del", link, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    # A directory of its own, not pytest's tmp_path: concurrent pytest sessions prune each
    # other's old tmp_path trees, which would pull the sockets from under running irmds.
    lab = Lab(Path(tempfile.mkdtemp(prefix="ouro-net-")))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def two_hosts(lab: Lab) -> tuple[Host, Host]:
    """Hosts a and b, each a namespace with its own irmd, joined by a veth pair; no IP configured."""
    ns_a, ns_b = lab.netns("a"), lab.netns("b")
    dev_a, dev_b = lab.veth(ns_a, ns_b)
    return lab.host(ns_a, dev_a, "a"), lab.host(ns_b, dev_b, "b")


@pytest.fixture
def bridged_hosts(lab: Lab) -> list[Host]:
    """Hosts a, b and c, each with a veth into one bridge (in a namespace of its own)."""
    return [lab.host(ns, dev, tag) for (ns, dev), tag in zip(lab.bridge("abc"), "abc", strict=True)]
