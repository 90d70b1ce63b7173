"""What netplumbd runs for a session: one command, with its stdio on pipes this process holds.

The process gets a session (process group) of its own, so a signal or a kill reaches all of it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
from dataclasses import dataclass, field
from typing import Protocol


class Job(Protocol):
    """Our ends of the job's stdio, and how to wait for and signal it."""

    stdin: int
    stdout: int
    stderr: int

    def wait(self) -> int: ...

    def signal(self, sig: int) -> None: ...


@dataclass
class RunAs:
    """Who a job runs as, and the environment it gets."""

    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def popen_kwargs(self) -> dict[str, object]:
        entry = pwd.getpwnam(self.user) if self.user else pwd.getpwuid(os.getuid())
        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": entry.pw_dir,
               "USER": entry.pw_name, "LOGNAME": entry.pw_name, "SHELL": entry.pw_shell or "/bin/sh"}
        if "LANG" in os.environ:
            env["LANG"] = os.environ["LANG"]
        env.update(self.env)
        kwargs: dict[str, object] = {"env": env, "start_new_session": True,
                                     "cwd": entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"}
        if self.user and entry.pw_uid != os.geteuid():
            kwargs.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        return kwargs


def pipes() -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(child, ours) for stdin, stdout and stderr."""
    i_r, i_w = os.pipe()
    o_r, o_w = os.pipe()
    e_r, e_w = os.pipe()
    for fd in (i_w, o_r, e_r):
        os.set_inheritable(fd, False)
    return (i_r, i_w), (o_w, o_r), (e_w, e_r)


class CommandJob:
    """A single command (argv, no shell)."""

    def __init__(self, argv: list[str], run_as: RunAs) -> None:
        (ci, self.stdin), (co, self.stdout), (ce, self.stderr) = pipes()
        try:
            self.proc = subprocess.Popen(argv, stdin=ci, stdout=co, stderr=ce, close_fds=True,
                                         **run_as.popen_kwargs())  # type: ignore[call-overload]
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


def describe_status(code: int) -> tuple[str, int]:
    """('status', n) for an exit, ('signal', n) for death by signal."""
    return ("signal", -code) if code < 0 else ("status", code)


def signal_number(name: str) -> int | None:
    name = name.upper().removeprefix("SIG")
    if name.isdigit():
        return int(name) if 0 < int(name) < signal.NSIG else None
    sig = getattr(signal, "SIG" + name, None)
    return int(sig) if isinstance(sig, signal.Signals) else None
