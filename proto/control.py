"""The control-channel client: connect to an IRMd's socket and make one request at a time,
with failures raised as the flow API's exceptions (shared by flowlib, irm and the apps' admin code)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import Sequence
from pathlib import Path

from proto import messages as m
from proto.errors import AlreadyExists, FlowTimeout, IrmdUnreachable, ProtocolError, from_remote
from transports.channel import ChannelClosed, RemoteError, SyncChannel
from transports.unix import TrustError, check_socket, irmd_sock_path
from transports.wire import Message


def open_channel(path: Path | None = None, on_notice: object = None, on_close: object = None) -> SyncChannel:
    """Connect to the IRMd's control socket, with a clear error if none is there, or if the socket
    (or a directory above it) belongs to someone other than root or us: then it is no IRMd to trust."""
    path = path or irmd_sock_path()
    try:
        check_socket(path)
    except TrustError as e:
        if e.errno:  # missing, unreadable: no IRMd there
            raise IrmdUnreachable(f"cannot reach the IRMd at {path}: {e.strerror}") from None
        raise IrmdUnreachable(f"refusing the IRMd socket {path}: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise IrmdUnreachable(f"cannot reach the IRMd at {path}: {e.strerror or e}") from None
    return SyncChannel(sock, m.CODEC, on_notice, on_close)  # type: ignore[arg-type]


def call(
    channel: SyncChannel, msg: Message, timeout: float | None = None, fds: Sequence[int] = ()
) -> tuple[Message, list[int]]:
    """One request to the IRMd, with its failures as flow API exceptions."""
    try:
        return channel.request(msg, fds, timeout)
    except RemoteError as e:
        raise from_remote(e.code, e.text) from None
    except ChannelClosed as e:
        raise IrmdUnreachable(f"lost the IRMd: {e}") from None
    except TimeoutError as e:
        raise FlowTimeout(str(e)) from None


MAX_PARTS = 100_000  # a list or text of more parts than this is no answer to wait for


def request_all(channel: SyncChannel, msg: Message, timeout: float | None = None) -> Message:
    """A request whose answer may come in parts (lists: Table pages; dumps: Text parts), joined."""
    reply, _ = call(channel, msg, timeout)
    for _ in range(MAX_PARTS):
        if isinstance(reply, m.Table) and reply.next:
            more, _ = call(channel, dataclasses.replace(msg, start=reply.next), timeout)  # type: ignore[type-var]
            if not isinstance(more, m.Table) or (more.next and more.next <= reply.next):
                raise ProtocolError("the IRMd answered a list page out of order")
            reply = m.Table(reply.columns, reply.rows + more.rows, more.next)
        elif isinstance(reply, m.Text) and reply.next:
            more, _ = call(channel, dataclasses.replace(msg, offset=reply.next), timeout)  # type: ignore[type-var]
            if not isinstance(more, m.Text) or (more.next and more.next <= reply.next):
                raise ProtocolError("the IRMd answered a text part out of order")
            reply = m.Text(reply.text + more.text, more.next)
        else:
            return reply
    raise ProtocolError(f"the IRMd's answer has more than {MAX_PARTS} parts")


def bind_and_register(
    channel: SyncChannel, pid: int, name: str, layers: Sequence[str], timeout: float | None = 10.0
) -> None:
    """What a server does at start: bind its process `pid` to `name` (creating the name) and register
    `name` in each of `layers`. A registration already there (made by an admin, or by an earlier run)
    is no failure, and does not keep the name from the layers after it; anything else raises."""
    call(channel, m.Bind("process", str(pid), name), timeout)
    for layer in layers:
        with contextlib.suppress(AlreadyExists):
            call(channel, m.NameRegister(name, [layer]), timeout)


def act_as(channel: SyncChannel, uid: int, timeout: float | None = 10.0) -> None:
    """Make this connection user `uid`'s, for good: what a root server does before it works for a
    user it authenticated, so the IRMd grants that user's rights, not root's."""
    call(channel, m.ActAs(uid), timeout)
