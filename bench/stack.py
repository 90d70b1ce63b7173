"""A private IRMd for one suite, in a temporary directory, and every process a suite starts.

`Stack` runs `irm` commands against its IRMd and stops all its processes on exit, whatever happened.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.harness import BenchError, Resource

log = logging.getLogger(__name__)

SOCK_ENV = "OUROBOROS_SOCK"
ROOT = Path(__file__).resolve().parent.parent  # so `python -m bench.peer` resolves in children
START_TIMEOUT = 15.0
STOP_GRACE = 5.0


def tool(name: str) -> str:
    """A console script of this project: the one beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found: install the project first (make bench does)")
    return found


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Stack(Resource):
    """An IRMd on TMP/irmd.sock, with OUROBOROS_SOCK pointing at it while the stack is up.

    With `netns`, the IRMd and every process spawned run inside that network namespace.
    """

    def __init__(self, netns: str | None = None, irmd_args: Sequence[str] = ()) -> None:
        self._prefix = ["ip", "netns", "exec", netns] if netns else []
        self._irmd_args = list(irmd_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="ouroboros-bench-")
        self.dir = Path(self._tmp.name)
        self.sock = self.dir / "irmd.sock"
        self._procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self._saved_env = os.environ.get(SOCK_ENV)

    def open(self) -> None:
        os.environ[SOCK_ENV] = str(self.sock)  # for this process's flowlib and every child
        irmd = self.spawn([tool("irmd"), "--sock", str(self.sock), *self._irmd_args], "irmd")
        self._wait_listening(irmd)

    def irm(self, *words: str) -> str:
        """Run one `irm` command against this stack's IRMd; its output, or BenchError."""
        env = {**os.environ, SOCK_ENV: str(self.sock)}  # this stack's, from any thread
        done = subprocess.run([tool("irm"), *words], capture_output=True, text=True, timeout=60, check=False, env=env)
        if done.returncode != 0:
            raise BenchError(f"irm {' '.join(words)}: {done.stderr.strip() or done.returncode}")
        return done.stdout

    def spawn(
        self, argv: Sequence[str], label: str, pass_fds: Sequence[int] = (), ready: bool = False
    ) -> subprocess.Popen[bytes]:
        """Start a process in its own session (Ctrl-C reaches only us), logging to TMP/label.log.

        With `ready`, wait until it prints a line "ready" on stdout.
        """
        logfile = self.dir / f"{label}.log"
        with logfile.open("wb") as err:
            proc = subprocess.Popen(
                [*self._prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
                stderr=err,
                pass_fds=pass_fds,
                cwd=ROOT,
                start_new_session=True,
            )
        self._procs.append((proc, logfile))
        log.debug("started %s (pid %d): %s", label, proc.pid, " ".join(argv))
        if ready:
            self._wait_ready(proc, label, logfile)
        return proc

    def close(self) -> None:
        """Stop every process, the IRMd last, and remove the directory (idempotent)."""
        while self._procs:
            proc, logfile = self._procs.pop()
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.returncode not in (0, -15):
                log.warning(
                    "%s exited with %s; its log ends:\n%s",
                    logfile.stem,
                    proc.returncode,
                    log_tail(logfile),
                )
        if self._saved_env is None:
            os.environ.pop(SOCK_ENV, None)
        else:
            os.environ[SOCK_ENV] = self._saved_env
        self._tmp.cleanup()

    def _wait_listening(self, irmd: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if irmd.poll() is not None:
                raise BenchError(f"irmd exited with {irmd.returncode}:\n{log_tail(self.dir / 'irmd.log')}")
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(str(self.sock))
                    return
                except OSError:
                    time.sleep(0.05)
        raise BenchError(f"irmd did not listen on {self.sock} within {START_TIMEOUT} s")

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], label: str, logfile: Path) -> None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            raise BenchError(f"{label} did not get ready (exit status {proc.poll()}):\n{log_tail(logfile)}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()
