"""The control-channel client: connect to an IRMd's socket and make one request at a time,
with failures raised as the flow API's exceptions (shared by flowlib, irm and the apps' admin code)."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from proto import messages as m
from proto.errors import FlowTimeout, IrmdUnreachable, from_remote
from transports.channel import ChannelClosed, RemoteError, SyncChannel
from transports.unix import irmd_sock_path
from transports.wire import Message


def open_channel(path: Path | None = None, on_notice: object = None, on_close: object = None) -> SyncChannel:
    """Connect to the IRMd's control socket, with a clear error if none is there."""
    path = path or irmd_sock_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise IrmdUnreachable(f"cannot reach the IRMd at {path}: {e.strerror or e}") from None
    return SyncChannel(sock, m.CODEC, on_notice, on_close)  # type: ignore[arg-type]


def call(channel: SyncChannel, msg: Message, timeout: float | None = None,
         fds: Sequence[int] = ()) -> tuple[Message, list[int]]:
    """One request to the IRMd, with its failures as flow API exceptions."""
    try:
        return channel.request(msg, fds, timeout)
    except RemoteError as e:
        raise from_remote(e.code, e.text) from None
    except ChannelClosed as e:
        raise IrmdUnreachable(f"lost the IRMd: {e}") from None
    except TimeoutError as e:
        raise FlowTimeout(str(e)) from None
