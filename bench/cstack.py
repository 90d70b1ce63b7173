"""The C Ouroboros 0.23 reference beside ours: a C build's IRMd in namespaces of its own, and its tools.

The C irmd keeps its socket in /var/run/ouroboros and its packet buffers in /dev/shm, by fixed
paths, so each one runs under `ip netns exec NS unshare -m` with private tmpfs mounts on both;
its tools join those namespaces through nsenter. Closing kills every process in its mount namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.harness import BenchError, Resource
from bench.stack import log_tail, stop_process

log = logging.getLogger(__name__)

BUILD_TOOL = "../shared/tools/build-ouroboros-c"
START_TIMEOUT = 15.0
STOP_GRACE = 5.0
IRM_TIMEOUT = 30.0
SOCK = Path("/var/run/ouroboros/irm.sock")  # the C irmd's, inside its mount namespace
# Run inside the new mount namespace: private tmpfs where the C irmd expects its files, then the irmd.
_START = ("mount -t tmpfs tmpfs /dev/shm && mkdir -p /var/run/ouroboros"
          " && mount -t tmpfs tmpfs /var/run/ouroboros && exec irmd --stdout")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class CBuild:
    """An installed C Ouroboros tree, built with or without the IRMd's direct IPC short-cut.

    With direct IPC (0.23's default) a flow to a process of the same IRMd skips every IPCP and
    layer: the two processes share the packet buffers. `build-ouroboros-c PREFIX --no-direct-ipc`
    builds the tree without it, so local flows really cross the local IPCP.
    """

    prefix: Path
    direct_ipc: bool

    @property
    def label(self) -> str:
        return f"direct IPC {'on' if self.direct_ipc else 'off'}"

    def missing(self) -> str | None:
        """Why this build cannot run, or None."""
        if not (self.prefix / "sbin" / "irmd").is_file():
            flag = "" if self.direct_ipc else " --no-direct-ipc"
            return f"no C build at {self.prefix} (build it with {BUILD_TOOL} {self.prefix}{flag})"
        return None

    def env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.prefix}/sbin:{self.prefix}/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LD_LIBRARY_PATH": f"{self.prefix}/lib:{self.prefix}/lib64",
            "HOME": os.environ.get("HOME", "/root"),
        }


DIRECT = CBuild(Path("/opt/ouroboros-c-0.23"), direct_ipc=True)
NODIRECT = CBuild(Path("/opt/ouroboros-c-0.23-nodirect"), direct_ipc=False)


def unavailable() -> str | None:
    """Why C IRMds cannot be run here (whatever the builds), or None."""
    if os.geteuid() != 0:
        return "needs root for network and mount namespaces"
    for tool in ("ip", "unshare", "nsenter", "stdbuf", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def why_not(build: CBuild = DIRECT) -> str | None:
    """Why `build`'s IRMd cannot be run here (no root or tools, or no such build), or None."""
    return unavailable() or build.missing()


def name_hash(name: str) -> str:
    """How a C udp4 IPCP looks a name up without DNS: the lowercase hex MD5 of the name, in /etc/hosts."""
    return hashlib.md5(name.encode()).hexdigest()


class CStack(Resource):
    """A C IRMd of `build` in network namespace `ns` (which must exist), with its own mounts.

    `hosts` maps remote names to addresses: they go to /etc/netns/NS/hosts as MD5 host names,
    which `ip netns exec` mounts over /etc/hosts for the IRMd and its udp4 IPCPs, and the IRMd
    is told of them (`know`).
    """

    def __init__(self, build: CBuild, ns: str, logdir: Path, hosts: Mapping[str, str] | None = None) -> None:
        self.build, self.ns, self.logdir = build, ns, logdir
        self._hosts = dict(hosts or {})
        self._etc = Path("/etc/netns") / ns
        self._irmd: subprocess.Popen[bytes] | None = None
        self._mnt = ""  # the irmd's mount namespace, as readlink /proc/PID/ns/mnt shows it
        # Held open until close: a namespace gone frees its number for the next one made (an `ip -n`'s),
        # whose processes close would then have killed as the irmd's leftovers.
        self._mnt_fd = -1
        self._servers: dict[str, subprocess.Popen[bytes]] = {}  # by the first name each is bound to

    @property
    def label(self) -> str:
        return f"c-{self.ns}"

    def open(self) -> None:
        if self._hosts:
            self._etc.mkdir(parents=True, exist_ok=True)
            lines = ["127.0.0.1 localhost", *(f"{ip} {name_hash(n)}" for n, ip in self._hosts.items())]
            (self._etc / "hosts").write_text("\n".join(lines) + "\n")
        logfile = self.logdir / f"{self.label}-irmd.log"
        with logfile.open("wb") as out:
            self._irmd = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private", "sh", "-c", _START],
                env=self.build.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        # Seen through its mounts; /var/run is often a symlink to /run, which would lead back to ours.
        sock = Path(f"/proc/{self._irmd.pid}/root") / SOCK.resolve().relative_to("/")
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if self._irmd.poll() is not None:
                raise BenchError(f"C irmd exited with {self._irmd.returncode}:\n{log_tail(logfile)}")
            if time.monotonic() > deadline:
                raise BenchError(f"C irmd made no socket within {START_TIMEOUT:.0f} s:\n{log_tail(logfile)}")
            time.sleep(0.05)
        self._mnt_fd = os.open(f"/proc/{self._irmd.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self._mnt = os.readlink(f"/proc/{self._irmd.pid}/ns/mnt")
        self.know(*self._hosts)
        log.debug("C irmd (%s) pid %d in %s, %s", self.build.label, self._irmd.pid, self.ns, self._mnt)

    def _enter(self) -> list[str]:
        assert self._irmd is not None
        return ["nsenter", "-t", str(self._irmd.pid), "-m", "-n", "--"]

    def run(self, argv: Sequence[str], timeout: float) -> str:
        """Run a C tool in the IRMd's namespaces; its stdout, or BenchError (with its output)."""
        try:
            done = subprocess.run([*self._enter(), *argv], env=self.build.env(), capture_output=True, text=True,
                                  timeout=timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"C {' '.join(argv)}: no answer within {timeout:.0f} s") from e
        if done.returncode != 0:
            raise BenchError(f"C {' '.join(argv)}: status {done.returncode}: {(done.stdout + done.stderr).strip()}")
        return done.stdout

    def irm(self, *words: str) -> str:
        """`irm WORDS`. An IPCP that lost 0.23's start-up race (it told the irmd it was up before
        the irmd had recorded it, "failed to boot", as a loaded machine makes it) is made once more;
        a failure carries the irmd's log."""
        logfile = self.logdir / f"{self.label}-irmd.log"
        for attempt in range(2):
            seen = _size(logfile)
            try:
                return self.run(["irm", *words], IRM_TIMEOUT)
            except BenchError as e:
                news = _read_from(logfile, seen)
                if attempt == 0 and words[:1] == ("ipcp",) and "failed to boot" in news:
                    log.info("C IPCP failed to boot; once more: irm %s", " ".join(words))
                    continue
                raise BenchError(f"{e}\nC irmd's log:\n{log_tail(logfile)}") from None
        raise AssertionError("unreachable")

    def know(self, *names: str) -> None:
        """Tell the IRMd of remote names: a C IRMd allocates flows only to names it has."""
        for name in names:
            self.irm("name", "create", name)

    def serve(self, argv: Sequence[str], name: str, *where: str) -> Path:
        """Start a C server, wait for it to say it started (it has made itself known to the IRMd),
        bind it to `name` and register `name` `where` ("layer L" or "ipcp I"); the server's log
        (line-buffered, so it is current)."""
        logfile = self.logdir / f"{self.label}-{name}.log"
        with logfile.open("wb") as out:
            proc = subprocess.Popen([*self._enter(), "stdbuf", "-oL", *argv], env=self.build.env(),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        self._servers[name] = proc  # nsenter and stdbuf exec: the pid is the server's
        deadline = time.monotonic() + START_TIMEOUT
        while b"started" not in logfile.read_bytes().lower():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"C {argv[0]} did not start (status {proc.poll()}):\n{log_tail(logfile)}")
            time.sleep(0.02)
        self.alias(name, name, *where)
        return logfile

    def alias(self, name: str, alias: str, *where: str) -> None:
        """Bind the server of `name` to `alias` (as well), and register `alias` `where`."""
        self.irm("bind", "process", str(self._servers[name].pid), "name", alias)
        self.irm("name", "reg", alias, *where)

    def close(self) -> None:
        """Stop the IRMd, then kill whatever is left in its mount namespace (idempotent)."""
        for proc in self._servers.values():
            stop_process(proc)
        self._servers.clear()
        if self._irmd is not None:
            stop_process(self._irmd)
            if self._mnt:
                for pid in _pids_in(self._mnt):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self._irmd = None
        if self._mnt_fd >= 0:
            os.close(self._mnt_fd)
            self._mnt_fd = -1
        if self._hosts:
            shutil.rmtree(self._etc, ignore_errors=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """What `path` gained past `offset` ("" if it cannot be read)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _pids_in(mnt: str) -> list[int]:
    """The processes whose mount namespace is `mnt`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == mnt:
                    pids.append(int(entry.name))
    return pids
