"""A daemon and whoever supervises it (systemd, a test, a script): READY=1 once it serves, sent to
$NOTIFY_SOCKET as sd_notify(3) does; and a stop on SIGTERM or SIGINT, whichever thread takes it."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from transports.unix import readable

NOTIFY_ENV = "NOTIFY_SOCKET"
POLL = 0.1  # seconds between looks at whether the daemon is still alive


def notify_ready(status: str = "") -> bool:
    """Say READY=1 (and a STATUS line); the variable is then removed, so the programs this daemon
    starts do not speak for it. False when nobody listens."""
    where = os.environ.pop(NOTIFY_ENV, "")
    if not where or where[0] not in "/@":
        return False
    address = "\0" + where[1:] if where[0] == "@" else where  # @name: the abstract namespace
    message = "READY=1" + (f"\nSTATUS={status}" if status else "")
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(message.encode(), address)
        return True
    return False


def stop_on_signals() -> None:
    """SIGTERM and SIGINT end a daemon as an exit does (SystemExit(0), raised in the main thread),
    so that its cleanup runs."""

    def stop(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def serve_until_stopped(serve: Callable[[], object], name: str = "serve") -> None:
    """Run `serve` on a thread of its own while this, the main thread, waits for a signal handler
    to raise (a stop: see stop_on_signals) or for `serve` to end (its exception is raised here).

    Python runs signal handlers on the main thread only, and the kernel may give a process's signal to
    any thread: a main thread blocked in a lock or a read would then never see it. So the main thread
    waits on nothing but the wakeup fd, which the C-level handler writes whichever thread it runs on.
    """
    wake_r, wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            serve()
            outcome.append(None)
        except BaseException as e:  # carried to the main thread, which owns this one
            outcome.append(e)
        finally:
            with contextlib.suppress(OSError):
                wake_w.send(b"\0")

    old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    try:
        threading.Thread(target=run, daemon=True, name=name).start()
        while not outcome:
            readable([wake_r], None)  # a handler due runs right after, here
            with contextlib.suppress(BlockingIOError):
                wake_r.recv(4096)
    finally:
        signal.set_wakeup_fd(old_wakeup)
        wake_r.close()
        wake_w.close()
    if outcome[0] is not None:
        raise outcome[0]


class ReadyListener:
    """The supervisor's side: a socket for daemons to say READY=1 on (its path in `env`), and wait()
    for that word, or for the daemon to die first."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))

    @property
    def env(self) -> dict[str, str]:
        return {NOTIFY_ENV: str(self.path)}

    def wait(self, alive: Callable[[], bool], timeout: float) -> bool:
        """True once READY=1 came; False if `alive` says the daemon died, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready = readable([self.sock], min(left, POLL))
            if ready and b"READY=1" in self.sock.recv(4096).split(b"\n"):
                return True
            if not ready and not alive():
                return False
        return False

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def raise_nofile(need: int) -> tuple[int, int]:
    """Raise the soft descriptor limit to `need` (and as root the hard one, if lower) where it is
    less: (the soft limit before, the soft limit now). A daemon that cannot have enough serves fewer
    clients rather than let one client at its limits leave others without descriptors."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need <= before:
        return before, before
    with contextlib.suppress(ValueError, OSError):
        new_hard = max(hard, need) if os.geteuid() == 0 else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, new_hard), new_hard))
    return before, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def nofile_to_hard(ceiling: int | None = None) -> int:
    """The soft descriptor limit raised to the hard one (to `ceiling` at most), as far as it goes,
    never the hard one: the new soft limit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if ceiling is not None and (hard == resource.RLIM_INFINITY or hard > ceiling):
        hard = ceiling
    return raise_nofile(hard)[1]


def lower_nofile(soft: int) -> None:
    """Set the soft descriptor limit back to `soft` (a program started by a daemon that raised its
    own gets what the daemon was given: past FD_SETSIZE, select() writes outside its fd_set)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
