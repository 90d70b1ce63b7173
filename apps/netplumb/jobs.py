"""What a session runs: one command, with its stdio on pipes this process holds (the runner,
already the target user). The process gets a session of its own, so a signal reaches all of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
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


@dataclass(frozen=True)
class Launch:
    """How every process of a job starts: its environment, and its directory (None: ours)."""

    env: dict[str, str]
    cwd: str | None = None

    def popen_kwargs(self) -> dict[str, object]:
        return {"env": self.env, "cwd": self.cwd, "start_new_session": True, "close_fds": True}


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
    """A single program: argv as given, executed from `exe` (the path the policy resolved)."""

    def __init__(self, argv: list[str], exe: str, launch: Launch) -> None:
        (ci, self.stdin), (co, self.stdout), (ce, self.stderr) = pipes()
        try:
            self.proc = subprocess.Popen(argv, executable=exe, stdin=ci, stdout=co, stderr=ce,
                                         **launch.popen_kwargs())  # type: ignore[call-overload]
        except BaseException:
            for fd in (self.stdin, self.stdout, self.stderr):
                os.close(fd)
            raise
        finally:
            for fd in (ci, co, ce):
                os.close(fd)

    def wait(self) -> int:
        return int(self.proc.wait())

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def cancel(self) -> None:
        pass


def describe_status(code: int) -> tuple[str, int]:
    """('status', n) for an exit, ('signal', n) for death by signal."""
    return ("signal", -code) if code < 0 else ("status", code)


def signal_number(name: str) -> int | None:
    name = name.upper().removeprefix("SIG")
    if name.isdigit():
        return int(name) if 0 < int(name) < signal.NSIG else None
    sig = getattr(signal, "SIG" + name, None)
    return int(sig) if isinstance(sig, signal.Signals) else None
