"""A daemon's word to whoever supervises it (systemd's Type=notify, a test, a script): READY=1 once it
serves, sent to $NOTIFY_SOCKET as sd_notify(3) does; nothing without one."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

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
            ready, _, _ = select.select([self.sock], [], [], min(left, POLL))
            if ready and b"READY=1" in self.sock.recv(4096).split(b"\n"):
                return True
            if not ready and not alive():
                return False
        return False

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
