"""Unix-domain socket plumbing: the IRMd socket path and frames with passed fds.

One SOCK_SEQPACKET packet carries one control frame; file descriptors ride
along as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Sequence
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
