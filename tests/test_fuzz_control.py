"""Fuzzed control frames: every message type of the IRMd's and the unicast layer's codecs, with
fields of the wrong type, huge and negative numbers, nested junk and bent bytes, through the public
encode/decode API. Each frame decodes to a message that encodes again, or raises WireError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import struct
import time
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from fuzzing import ROUNDS, cases, only_raises
from helpers import fds_on, lingering_socket

from ipcp.unicast import messages as um
from proto import messages as m
from transports.wire import HEADER, MAGIC, VERSION, Codec, Error, WireError

CODECS = {"irmd": m.CODEC, "unicast": um.CODEC}


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any shape, leaning on what breaks type checks and arithmetic."""
    pick = rng.randrange(12 if depth < 5 else 8)
    if pick == 0:
        return rng.choice((0, -1, 1, 2**31, 2**32, -(2**63), 2**64, 10**30, -(10**30)))
    if pick == 1:
        return rng.choice((0.5, -1.0, 1e308, -1e308, 1e-308, 2.0**63))
    if pick == 2:
        return rng.choice((True, False, None))
    if pick == 3:
        return rng.choice(("", "a", "00", "0g", "ab" * 40, "\u0000", "\udc80x", "../..", "é" * 10))
    if pick == 4:
        return rng.randbytes(rng.randint(0, 12)).hex()
    if pick == 5:
        return "x" * rng.randint(0, 200)
    if pick in (6, 7):
        return rng.randint(-(2**70), 2**70)
    if pick in (8, 9):
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(("a", "delay", "name", "", "0")): _junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _typed(rng: random.Random, hint: Any, depth: int = 0) -> Any:
    """A value of the field's declared type (edge values mostly), or now and then junk."""
    if rng.random() < 0.15 or depth > 4:
        return _junk(rng)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _typed(rng, rng.choice(args), depth)
    if origin is list:
        return [_typed(rng, args[0], depth + 1) for _ in range(rng.randint(0, 3))]
    if origin is dict:
        return {rng.choice(("", "a", "k" * 50)): _typed(rng, args[1], depth + 1) for _ in range(rng.randint(0, 3))}
    if dataclasses.is_dataclass(hint):
        return {
            name: _typed(rng, h, depth + 1) for name, h in typing.get_type_hints(hint).items() if rng.random() < 0.9
        }
    if hint is int:
        return rng.choice((0, -1, 1, 2**16, 2**31 - 1, 2**32, 2**63, 2**64, -(2**64), rng.randint(-5, 70000)))
    if hint is float:
        return rng.choice((0, -1, 0.0, 1e-9, 1e9, 1e308, -1e308, 2**64, rng.random()))
    if hint is bool:
        return rng.choice((True, False))
    if hint is bytes:
        return rng.randbytes(rng.choice((0, 1, 16, 32, 64, 200))).hex()
    if hint is str:
        return rng.choice(("", "a", "n" * 300, "a/b", "..", "\u0000", "é", "-1", "x" * rng.randint(0, 20)))
    return _junk(rng)


def _frame(code: int, body: bytes, req_id: int = 1) -> bytes:
    return HEADER.pack(MAGIC, VERSION, code, req_id, len(body)) + body


def _frames(codec: Codec, seed: int, n: int) -> list[bytes]:
    """Frames of every registered type whose body has each known field, some junk, some missing."""
    rng = random.Random(seed)
    out = []
    for _ in range(n * ROUNDS):
        code, cls = rng.choice(sorted(codec.types.items()))
        hints = typing.get_type_hints(cls)
        body = {f.name: _typed(rng, hints[f.name]) for f in dataclasses.fields(cls) if rng.random() < 0.95}
        if rng.random() < 0.1:
            body[rng.choice(("x", "TYPE", "__class__"))] = _junk(rng)
        out.append(_frame(code, json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")))
    return out


def _decode_reencode(codec: Codec, data: bytes) -> None:
    frame = codec.decode(data)
    codec.encode(frame.msg, frame.req_id & 0x7FFFFFFF)  # what was taken can be sent on (forwarded, echoed)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_typed_junk_in_every_field_decodes_or_raises_wire_error(name: str) -> None:
    codec = CODECS[name]
    for data in _frames(codec, 1, 600):
        only_raises(lambda d: _decode_reencode(codec, d), data, WireError)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_bent_frames_decode_or_raise_wire_error(name: str) -> None:
    codec = CODECS[name]
    corpus = _frames(codec, 2, 200)
    for data in cases(3, corpus, 1500):
        only_raises(lambda d: _decode_reencode(codec, d), data, WireError)


def test_deep_and_wide_json_is_a_wire_error() -> None:
    code = m.Table.TYPE
    for body in (
        b"[" * 50_000 + b"]" * 50_000,
        b'{"rows":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"columns":["' + b"a" * 60_000 + b'"]}',
        b'{"next":' + b"9" * 5000 + b"}",
        b'{"next":1e999}',
        b'{"next":NaN}',
        b"\xff\xfe",
        b'{"text":"\\ud800"}',
    ):
        only_raises(m.CODEC.decode, _frame(code, body[: 60 * 1024]), WireError)


def test_lying_headers_are_wire_errors() -> None:
    body = b'{"text":""}'
    for req_id, length in ((0, 2**32 - 1), (2**32 - 1, len(body) + 1), (1, 0)):
        data = struct.pack("!2sBHII", MAGIC, VERSION, m.Ok.TYPE, req_id, length) + body
        only_raises(m.CODEC.decode, data, WireError)


def test_fds_of_requests_still_waiting_when_the_connection_drops_are_closed(tmp_path: Path) -> None:
    """Requests carrying fds whose handlers wait, then the peer hangs up: their handlers are cancelled
    where they wait (begun outside any task, each went on as one), and close the fds they own."""
    import asyncio

    from transports.channel import AsyncChannel
    from transports.unix import close_fds, send_frame, seqpacket_pair

    passed = tmp_path / "passed"  # the file whose descriptors ride on the requests
    passed.touch()
    cancelled: list[int] = []

    async def hold(msg: m.Message, fds: list[int]) -> tuple[m.Message, list[int]]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            assert isinstance(msg, m.FlowDealloc)
            cancelled.append(msg.flow_id)
            raise
        finally:
            close_fds(fds)
        raise AssertionError("never set")

    async def run() -> None:
        ours, theirs = seqpacket_pair(rights=True)
        closed = asyncio.Event()
        AsyncChannel(ours, m.CODEC, hold, on_close=lambda _: closed.set())
        with open(passed, "rb") as f:
            for i in range(1, 6):
                send_frame(theirs, m.CODEC.encode(m.FlowDealloc(i), i), [f.fileno()] * 3)
        theirs.close()
        await asyncio.wait_for(closed.wait(), 10)
        for _ in range(5):  # the cancelled handlers' turns
            await asyncio.sleep(0)
        assert sorted(cancelled) == [1, 2, 3, 4, 5]
        assert fds_on(passed) == 0, "fds passed with requests leaked"
        assert ours.fileno() == -1 and theirs.fileno() == -1

    asyncio.run(run())


def test_an_empty_packet_carrying_fds_leaves_none_open(tmp_path: Path) -> None:
    """A zero-length packet reads as the peer's end of the connection; the fds riding on it are closed."""

    from transports.unix import recv_frame, send_frame, seqpacket_pair

    passed = tmp_path / "passed"
    passed.touch()
    ours, theirs = seqpacket_pair(rights=True)
    try:
        with open(passed, "rb") as f:
            send_frame(theirs, b"", [f.fileno()] * 4)
        assert fds_on(passed) == 0  # in flight: the kernel holds them
        assert recv_frame(ours) == (b"", [])
        assert fds_on(passed) == 0  # nothing was left open by the read
    finally:
        ours.close()
        theirs.close()


def test_a_frame_or_fd_list_cut_short_by_the_kernel_is_refused_and_its_fds_closed(tmp_path: Path) -> None:
    """A frame longer than MAX_FRAME, or more fds than MAX_FDS (the kernel drops the rest): the read
    says so (MSG_TRUNC, MSG_CTRUNC) rather than handing on part of either; the next frame reads whole."""
    from transports.unix import recv_frame, send_frame, seqpacket_pair
    from transports.wire import MAX_FDS, MAX_FRAME, WireError

    passed = tmp_path / "passed"
    passed.touch()
    ours, theirs = seqpacket_pair(rights=True)
    try:
        with open(passed, "rb") as f:
            for frame, fds in ((b"x" * (MAX_FRAME + 2), [f.fileno()]), (b"y", [f.fileno()] * (MAX_FDS + 1))):
                send_frame(theirs, frame, fds)
                with pytest.raises(WireError, match="truncated"):
                    recv_frame(ours)
                assert fds_on(passed) == 1  # the file's own: none received was left open
            send_frame(theirs, b"z", [f.fileno()])
            data, got = recv_frame(ours)
        assert data == b"z" and len(got) == 1
        os.close(got[0])
    finally:
        ours.close()
        theirs.close()


@pytest.mark.timeout(30)
def test_a_passed_socket_lingering_on_unsent_data_is_reset_not_waited_on() -> None:
    """close_fds closes what peers passed: a TCP socket with SO_LINGER 20 s and data its peer never
    reads would block a plain close() for 20 s (the reader's thread, or the IRMd's loop)."""
    from transports.unix import close_fds

    c, held = lingering_socket(20)
    try:
        started = time.monotonic()
        close_fds([c.detach()])
        assert time.monotonic() - started < 2
    finally:
        for sock in held:
            sock.close()


def test_a_handler_a_peer_makes_fail_at_will_logs_its_traceback_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every request is answered "internal error"; the log takes the first tracebacks, not all."""
    import asyncio

    from transports.channel import FAILURES, AsyncChannel
    from transports.unix import recv_frame, send_frame, seqpacket_pair

    async def broken(msg: m.Message, fds: list[int]) -> tuple[m.Message, list[int]]:
        raise RuntimeError("a handler's bug")

    async def run() -> list[m.Message]:
        ours, theirs = seqpacket_pair()
        channel = AsyncChannel(ours, m.CODEC, broken)
        loop = asyncio.get_running_loop()
        replies = []
        for i in range(1, 201):
            send_frame(theirs, m.CODEC.encode(m.FlowDealloc(i), i))
            frame, _ = await loop.run_in_executor(None, recv_frame, theirs)
            replies.append(m.CODEC.decode(frame).msg)
        channel.close()
        theirs.close()
        return replies

    FAILURES.tokens = FAILURES.burst  # (a module-wide budget: other tests may have spent some)
    with caplog.at_level(logging.ERROR, logger="transports.channel"):
        replies = asyncio.run(run())
    assert all(isinstance(r, Error) and "a handler's bug" in r.text for r in replies)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert 1 <= len(tracebacks) <= FAILURES.burst + 5
