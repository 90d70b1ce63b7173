"""The session's named pipes and unix sockets: made, opened and removed with the rights of whoever
calls (the runner, as the target user), never replacing a file that is not ours to replace.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import threading

LISTEN_BACKLOG = 16
SOCKET_UMASK = 0o177  # a replicated socket is its owner's only: mode 0600


class EndpointError(OSError):
    """A pipe or socket that cannot be made; the message names the path."""


class Endpoints:
    """The paths this session made, removed at its end (and only those)."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def fifo(self, path: str) -> None:
        """A named pipe at `path`: made (0600), or one that is there already."""
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            try:
                ok = stat.S_ISFIFO(os.stat(path).st_mode)
            except OSError as e:
                raise EndpointError(f"{path}: {e.strerror}") from None
            if not ok:
                raise EndpointError(f"{path} exists and is not a named pipe") from None
            return
        except OSError as e:
            raise EndpointError(f"cannot make the named pipe {path}: {e.strerror}") from None
        self.made.append(path)

    def listen(self, path: str) -> socket.socket:
        """A listening unix socket at `path`; a stale socket nobody answers on is replaced."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise EndpointError(f"{path} exists and is not a unix socket")
            if _answers(path):
                raise EndpointError(f"{path} is a unix socket in use")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Made 0600 as it is bound (a chmod after would leave a moment for others to connect), whatever
        # the umask: whoever connects reaches the client's socket (sshd's StreamLocalBindMask 0177).
        # The runner binds before it starts any thread, so the process-wide umask is ours alone.
        old = os.umask(SOCKET_UMASK)
        try:
            lsock.bind(path)
            lsock.listen(LISTEN_BACKLOG)
        except OSError as e:
            lsock.close()
            raise EndpointError(f"cannot listen on {path}: {e.strerror}") from None
        finally:
            os.umask(old)
        self.made.append(path)
        return lsock

    def release(self) -> None:
        """Wake whoever still waits in open() on one of our pipes: open the other end and let go."""
        for path in self.made:
            with contextlib.suppress(OSError):
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    for mode in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                        with contextlib.suppress(OSError):
                            os.close(os.open(path, mode | os.O_CLOEXEC))

    def remove(self) -> None:
        for path in self.made:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.made.clear()


def open_fifo(path: str, write: bool) -> int:
    """Open a named pipe; waits until the other end is opened too, as open(2) does."""
    return os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | os.O_CLOEXEC)


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def open_within(path: str, flags: int, timeout: float) -> int:
    """open(2) of a redirection (files are made 0600); a named pipe waits for its other end at
    most `timeout` s, then TimeoutError. Probing a pipe by opening it would pair with a waiting
    peer, so its type is looked up first."""
    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        fifo = False
    if not fifo:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    write = flags & os.O_ACCMODE != os.O_RDONLY
    got: list[int | OSError] = []

    def opener() -> None:
        try:
            got.append(open_fifo(path, write))
        except OSError as e:
            got.append(e)

    t = threading.Thread(target=opener, daemon=True, name="open-fifo")
    t.start()
    t.join(timeout)
    if t.is_alive():  # be the other end for a moment, so that open() returns, and give up
        with contextlib.suppress(OSError):
            os.close(os.open(path, (os.O_RDONLY if write else os.O_WRONLY) | os.O_NONBLOCK | os.O_CLOEXEC))
        t.join()
        if got and isinstance(got[0], int):
            os.close(got[0])
        raise TimeoutError(f"{path}: nothing opened the other end within {timeout:g} s")
    if isinstance(got[0], OSError):
        raise got[0]
    return got[0]
