"""Unix-domain socket plumbing: the IRMd socket path and frames with passed fds.

One SOCK_SEQPACKET packet carries one control frame; file descriptors ride
along as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from transports.wire import MAX_FDS, MAX_FRAME, WireError

SOCK_ENV = "OUROBOROS_SOCK"
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def irmd_sock_path(explicit: str | None = None) -> Path:
    """The IRMd socket: --sock, else $OUROBOROS_SOCK, else the per-user default."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(SOCK_ENV):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/ouroboros/irmd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/ouroboros-{os.geteuid()}"
    return Path(runtime) / "ouroboros" / "irmd.sock"


def seqpacket_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_frame(sock: socket.socket, frame: bytes, fds: Sequence[int] = ()) -> None:
    """Send one frame (and fds); raises BlockingIOError on a full non-blocking socket."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sock.sendmsg([frame], anc)
    else:
        sock.send(frame)


def recv_frame(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one frame and its fds; b'' means the peer closed.

    Truncated frames or fd lists raise WireError after closing any fds received.
    """
    data, anc, flags, _ = sock.recvmsg(MAX_FRAME + 1, _FD_SPACE)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_FRAME:
        close_fds(fds)
        raise WireError("frame or fd list truncated")
    return data, fds


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


SDU_LOOKAHEAD = 16  # records read past an empty one once the peer hung up, looking for data behind it


def recv_record(sock: socket.socket, bufsize: int, recv: Callable[[int], bytes] | None = None) -> bytes | None:
    """One record of a flow's SOCK_SEQPACKET socket: an SDU, b'' for an empty record (a keepalive, as
    on C's wire), or None once the flow has ended. Raises BlockingIOError when nothing is queued.
    `recv` (default sock.recv) may decode what it reads, if it passes empty records on as b''.

    recv says b'' both for an empty record and at the end, which then repeats for ever: only a hang-up
    tells them apart, and records still queued behind an empty one are read before calling it the end.
    """
    recv = recv or sock.recv
    data = recv(bufsize)
    if data or not hung_up(sock):
        return data
    for _ in range(SDU_LOOKAHEAD):
        try:
            data = recv(bufsize)  # the socket never blocks once hung up; a decoder may still say EAGAIN
        except BlockingIOError:
            return None
        if data:
            return data
    return None


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed its end or either end was shut down (nothing more will arrive)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in poller.poll(0))
