"""A process's connection to its IRMd: flow allocation, acceptance and teardown.

One connection per process, shared by its threads; flows pushed by the IRMd
(for event-driven servers) are queued and signalled on an eventfd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from proto import messages as m
from proto.control import call, open_channel
from proto.errors import FlowError, IrmdUnreachable
from proto.qos import QosSpec, raw
from transports.channel import SyncChannel
from transports.unix import close_fds
from transports.wire import Message

__all__ = ["IrmClient", "call", "default_client", "open_channel"]

REPLY_MARGIN = 5.0  # extra seconds to wait for the IRMd beyond the timeout it enforces
SETTLE_WAIT = 0.2  # how long flow_state waits for the reader to handle what the IRMd sent, before it asks
MAX_ENDED = 4096  # flows whose end the IRMd told us of, kept until asked or closed; past it the oldest
# is dropped (its state is then asked for, as before the notice)


class IrmClient:
    """This process as the IRMd knows it."""

    def __init__(self, path: Path | None = None, *, sock: socket.socket | None = None, prog: str | None = None) -> None:
        """sock: a connection to the IRMd made by another process, whose credentials it carries
        (a server's agent for a client); prog: the program name to announce instead of ours."""
        self.pid = os.getpid()
        self._arrived: deque[tuple[m.FlowReply, int]] = deque()
        self._arrived_lock = threading.Lock()
        self._ended: dict[int, str] = {}  # flow id -> 'dealloc' or 'down', from the IRMd's FlowInfo notices
        self.wakeup_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # A lost IRMd wakes whoever waits on arrivals, so a listening server notices.
        if sock is not None:
            self.channel = SyncChannel(sock, m.CODEC, self._on_notice, self._wake)
        else:
            self.channel = open_channel(path, self._on_notice, self._wake)
        call(self.channel, m.ProcAnnounce(prog or (os.path.abspath(sys.argv[0]) if sys.argv[0] else "python")))

    def close(self) -> None:
        if self.wakeup_fd < 0:
            return
        self.channel.close()
        with self._arrived_lock:
            close_fds([fd for _, fd in self._arrived])
            self._arrived.clear()
        os.close(self.wakeup_fd)
        self.wakeup_fd = -1

    def alloc(
        self, name: str, qos: QosSpec | None, timeout: float | None, join: bool = False
    ) -> tuple[m.FlowReply, int]:
        reply, fds = call(
            self.channel, m.FlowAlloc(name, qos or raw, timeout, join),
            None if timeout is None else timeout + REPLY_MARGIN,
        )  # fmt: skip
        return self._flow_reply(reply, fds)

    def accept(self, timeout: float | None, cypher_s: int = 0) -> tuple[m.FlowReply, int]:
        """The next flow for this process; cypher_s > 0: only encrypted ones (the IRMd refuses the rest)."""
        msg = m.FlowAccept(timeout, cypher_s)
        reply, fds = call(self.channel, msg, None if timeout is None else timeout + REPLY_MARGIN)
        return self._flow_reply(reply, fds)

    def dealloc(self, flow_id: int) -> None:
        """Let go of a flow: a notice, as nothing is to be done if the IRMd refused it (it has gone, or
        dropped the flow already); the IRMd takes it in order, before any later request of ours."""
        with self._arrived_lock:
            self._ended.pop(flow_id, None)
        with contextlib.suppress(OSError):
            self.channel.notify(m.FlowDealloc(flow_id))

    def flow_state(self, flow_id: int) -> str:
        """How the flow stands at the IRMd: told already when it ended (a notice sent before its end
        closed), else asked."""
        told = self._told(flow_id)
        if told is None:
            # The IRMd sends the notice before it ends the flow's socket, so it is often on its way to
            # the reader thread when the end is seen: waiting for it spares a round trip.
            self.channel.settle(SETTLE_WAIT)
            told = self._told(flow_id)
        if told is not None:
            return told
        try:
            reply, _ = call(self.channel, m.FlowInfo(flow_id), REPLY_MARGIN)
        except FlowError:
            return "down"
        return reply.state if isinstance(reply, m.FlowInfo) else "down"

    def _told(self, flow_id: int) -> str | None:
        with self._arrived_lock:
            return self._ended.pop(flow_id, None)

    def flow_counters(self, flow_id: int) -> m.FlowInfo:
        """What the flow's IPCP counted of its SDUs, as the IRMd tells it (m.FlowInfo with counters)."""
        reply, _ = call(self.channel, m.FlowInfo(flow_id, counters=True), REPLY_MARGIN + 3.0)
        if not isinstance(reply, m.FlowInfo):
            raise FlowError(f"the IRMd answered {type(reply).__name__} to FlowInfo")
        return reply

    def peer_addr(self, flow_id: int) -> str:
        """The remote host an accepted flow came from, as its layer vouches for it ("" for a flow from
        this host, or a layer that names no peer): m.FlowPeer."""
        reply, _ = call(self.channel, m.FlowPeer(flow_id), REPLY_MARGIN)
        if not isinstance(reply, m.FlowPeer):
            raise FlowError(f"the IRMd answered {type(reply).__name__} to FlowPeer")
        return reply.addr

    def remote_addr(self, flow_id: int) -> str:
        """`peer_addr`, or "" when the IRMd can no longer say (the flow went meanwhile): a server's limits
        per client then count the flow as one of its layer's."""
        try:
            return self.peer_addr(flow_id)
        except FlowError:
            return ""

    def listen(self, enabled: bool, cypher_s: int = 0) -> None:
        call(self.channel, m.FlowListen(enabled, cypher_s), REPLY_MARGIN)

    def bind(self, name: str) -> None:
        """Bind this process to `name` (`irm bind process PID name NAME`): its flows come here."""
        call(self.channel, m.Bind("process", str(self.pid), name), REPLY_MARGIN)

    def register(self, name: str, layers: Sequence[str]) -> None:
        """Register `name` in `layers` (`irm name register`), so other hosts find it."""
        call(self.channel, m.NameRegister(name, list(layers)), REPLY_MARGIN)

    def take_arrived(self) -> list[tuple[m.FlowReply, int]]:
        """Flows pushed by the IRMd since the last call; raises IrmdUnreachable once it is gone."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.wakeup_fd)
        with self._arrived_lock:
            items = list(self._arrived)
            self._arrived.clear()
        if not items and self.channel.closed:
            raise IrmdUnreachable("lost the IRMd")
        return items

    def _on_notice(self, msg: Message, fds: list[int]) -> None:
        if isinstance(msg, m.FlowReply) and len(fds) == 1:
            with self._arrived_lock:
                self._arrived.append((msg, fds[0]))
            self._wake()
            return
        close_fds(fds)
        if isinstance(msg, m.FlowInfo) and msg.state:
            with self._arrived_lock:
                if len(self._ended) >= MAX_ENDED:
                    del self._ended[next(iter(self._ended))]
                self._ended[msg.flow_id] = msg.state

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wakeup_fd, 1)

    @staticmethod
    def _flow_reply(reply: Message, fds: list[int]) -> tuple[m.FlowReply, int]:
        if not isinstance(reply, m.FlowReply) or len(fds) != 1:
            close_fds(fds)
            raise FlowError(f"the IRMd answered with {type(reply).__name__}")
        return reply, fds[0]


_default: IrmClient | None = None
_default_lock = threading.Lock()


def default_client() -> IrmClient:
    """The process's connection, made on first use (and again in a forked child)."""
    global _default
    with _default_lock:
        if _default is None or _default.channel.closed:
            _default = IrmClient()
        return _default


def _forked() -> None:
    """A forked child makes a connection of its own on first use: the parent's is the parent's (its
    reader thread is not in the child), and the IRMd knows the child by its own credentials."""
    global _default, _default_lock
    _default, _default_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forked)
