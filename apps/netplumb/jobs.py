"""What a session runs: one command, with its stdio on pipes this process holds (the runner,
already the target user). The process gets a process group of its own, so a signal reaches all of
it, in the runner's session, by which netplumbd ends what is left of it once the runner is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Protocol


class Job(Protocol):
    """Our ends of the job's stdio, and how to wait for and signal it."""

    stdin: int
    stdout: int
    stderr: int

    def wait(self) -> int: ...

    def signal(self, sig: int) -> None: ...

    def cancel(self) -> None:
        """Start nothing more (the job is being stopped)."""

    def reap(self) -> None:
        """The job has ended and been reported: reap its processes, and signal nothing from now on."""


def wait_unreaped(proc: subprocess.Popen[bytes]) -> int:
    """Wait for `proc` to end, and leave it unreaped (a zombie) until the job's reap(): until then its
    pid, which is also its process group's id, stays the job's, so a signal for the job cannot reach
    a process that took the number since. Returns the status as Popen does (-N: killed by signal N)."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped already
        return int(proc.wait())
    assert info is not None  # without WNOHANG, waitid returns the child
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


@dataclass(frozen=True)
class Launch:
    """How every process of a job starts: its environment, and its directory (None: ours)."""

    env: dict[str, str]
    cwd: str | None = None

    def popen_kwargs(self) -> dict[str, object]:
        # A group of its own, but no session: the runner's session is how netplumbd finds the job's
        # processes after the runner (privsep.end_session), as sshd hangs up a session's processes.
        return {"env": self.env, "cwd": self.cwd, "process_group": 0, "close_fds": True}


@dataclass(frozen=True)
class Exe:
    """A program of the plan: the path to run, and the file the policy checked it is (None: unchecked)."""

    path: str
    real: str | None = None

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start `argv` from exactly the file the policy checked. The path is opened once, with this
        process's rights; the open file is compared with `real` and is what the kernel executes (through
        /proc/self/fd, as fexecve does, the descriptor inherited so that a script's interpreter can read
        it), so a symlink swapped between the check and the start runs nothing else."""
        fd = os.open(self.path, os.O_PATH | os.O_CLOEXEC)
        try:
            opened = f"/proc/self/fd/{fd}"
            if self.real is not None and (now := os.readlink(opened)) != self.real:
                raise PermissionError(errno.EACCES, f"{self.path} is now {now}, not the {self.real} allowed")
            return subprocess.Popen(argv, executable=opened, pass_fds=(fd,), **kwargs)  # type: ignore[call-overload,no-any-return]
        finally:
            os.close(fd)


PIPE_SIZE = 256 * 1024  # stdin and stdout hold several DATA packets' worth, so reads and writes go whole


def pipes() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(child, ours) for stdin, stdout and stderr."""
    i_r, i_w = os.pipe()
    o_r, o_w = os.pipe()
    e_r, e_w = os.pipe()
    for fd in (i_w, o_r, e_r):
        os.set_inheritable(fd, False)
    for fd in (i_w, o_r):  # counted against the user's own pipe limits; past them, the usual size
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return (i_r, i_w), (o_w, o_r), (e_w, e_r)


class CommandJob:
    """A single program: argv as given, executed from `exe` (the file the policy resolved)."""

    def __init__(self, argv: list[str], exe: Exe, launch: Launch) -> None:
        self._lock = threading.Lock()  # signal() and reap(): no signal once the pid is given back
        self._reaped = False
        (ci, self.stdin), (co, self.stdout), (ce, self.stderr) = pipes()
        try:
            self.proc = exe.popen(argv, stdin=ci, stdout=co, stderr=ce, **launch.popen_kwargs())
        except BaseException:
            for fd in (self.stdin, self.stdout, self.stderr):
                os.close(fd)
            raise
        finally:
            for fd in (ci, co, ce):
                os.close(fd)

    def wait(self) -> int:
        return wait_unreaped(self.proc)

    def signal(self, sig: int) -> None:
        with self._lock:
            if not self._reaped:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, sig)

    def cancel(self) -> None:
        pass

    def reap(self) -> None:
        with self._lock:
            self._reaped = True
            self.proc.wait()


def describe_status(code: int) -> tuple[str, int]:
    """('status', n) for an exit, ('signal', n) for death by signal."""
    return ("signal", -code) if code < 0 else ("status", code)


def signal_number(name: str) -> int | None:
    name = name.upper().removeprefix("SIG")
    if name.isdigit():
        return int(name) if 0 < int(name) < signal.NSIG else None
    sig = getattr(signal, "SIG" + name, None)
    return int(sig) if isinstance(sig, signal.Signals) else None
