"""SyncChannel.settle: a notice the peer sent before another sign is handled before that sign is acted
on, so that a flow's end is known from the IRMd's notice without asking it again."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from proto import messages as m
from transports.channel import SyncChannel
from transports.unix import recv_frame, send_frame
from transports.wire import NOTICE, Message

pytestmark = pytest.mark.timeout(30)


def _channel(on_notice: object) -> tuple[SyncChannel, socket.socket]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return SyncChannel(ours, m.CODEC, on_notice), peer  # type: ignore[arg-type]


def test_settle_waits_for_a_notice_the_reader_is_still_handling() -> None:
    seen: list[Message] = []
    started = threading.Event()

    def slow(msg: Message, fds: list[int]) -> None:
        started.set()
        time.sleep(0.3)  # a reader thread that has not had the CPU yet
        seen.append(msg)

    chan, peer = _channel(slow)
    try:
        send_frame(peer, m.CODEC.encode(m.FlowInfo(7, "dealloc"), NOTICE))
        chan.settle(5.0)
        assert seen == [m.FlowInfo(7, "dealloc")]
        assert started.is_set()
    finally:
        chan.close()
        peer.close()


def test_settle_waits_for_a_frame_the_reader_took_but_has_not_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader loses the CPU right after the frame left the socket: neither the socket nor a
    handler shows it then, and settle must still wait for it."""
    import transports.channel as channel

    taken = threading.Event()

    def recv_then_stall(sock: socket.socket) -> tuple[bytes, list[int]]:
        frame = recv_frame(sock)
        taken.set()
        time.sleep(0.3)
        return frame

    monkeypatch.setattr(channel, "recv_frame", recv_then_stall)
    seen: list[Message] = []
    chan, peer = _channel(lambda msg, fds: seen.append(msg))
    try:
        send_frame(peer, m.CODEC.encode(m.FlowInfo(7, "dealloc"), NOTICE))
        assert taken.wait(5)
        chan.settle(5.0)
        assert seen == [m.FlowInfo(7, "dealloc")]
    finally:
        chan.close()
        peer.close()


def test_settle_returns_at_once_with_nothing_sent_and_after_its_timeout_with_a_stuck_reader() -> None:
    release = threading.Event()
    chan, peer = _channel(lambda msg, fds: release.wait(10))
    try:
        t0 = time.monotonic()
        chan.settle(5.0)
        assert time.monotonic() - t0 < 1.0  # nothing unread: no wait
        send_frame(peer, m.CODEC.encode(m.FlowInfo(1, "down"), NOTICE))
        t0 = time.monotonic()
        chan.settle(0.3)
        assert 0.25 <= time.monotonic() - t0 < 3.0  # bounded: the caller then asks the IRMd itself
    finally:
        release.set()
        chan.close()
        peer.close()


def test_settle_returns_once_the_peer_is_gone() -> None:
    chan, peer = _channel(lambda msg, fds: None)
    peer.close()
    t0 = time.monotonic()
    chan.settle(5.0)
    assert time.monotonic() - t0 < 2.0
    chan.close()
