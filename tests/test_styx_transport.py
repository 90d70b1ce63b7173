"""How 9P messages ride on flows: one SDU each, or on a reliable flow in SDU-sized pieces put
back together within the msize; and the bridge's cap on what a client may negotiate."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from apps.styx import wire as w
from apps.styx.bridge import capped
from apps.styx.transport import Reassembly, TransportError, flow_msize, send_message
from flowlib import qos
from proto.qos import QosSpec


@dataclass
class FakeFlow:
    """What send_message and flow_msize look at: mtu, qos, and the SDUs written."""

    qos: QosSpec
    mtu: int = 65535
    sdus: list[bytes] = field(default_factory=list)

    def write(self, sdu: bytes | memoryview) -> int:
        assert 0 < len(sdu) <= self.mtu
        self.sdus.append(bytes(sdu))
        return len(sdu)


def big_write(n: int) -> bytes:
    return w.encode(w.Twrite(1, 2, 0, os.urandom(n)))


def test_a_message_that_fits_an_sdu_is_one_sdu() -> None:
    flow = FakeFlow(qos.data)
    msg = big_write(65535 - w.IOHDRSZ + 1)
    send_message(flow, msg)  # type: ignore[arg-type]
    assert flow.sdus == [msg]


def test_a_longer_message_goes_in_pieces_and_comes_back_whole() -> None:
    flow = FakeFlow(qos.data)
    msg = big_write(w.MSIZE_DEFAULT - w.IOHDRSZ)
    send_message(flow, msg)  # type: ignore[arg-type]
    assert [len(s) for s in flow.sdus] == [w.PIECE] * 3 + [w.PIECE - 1]
    pieces = Reassembly()
    out = [pieces.feed(s, w.MSIZE_DEFAULT) for s in flow.sdus]
    assert out == [None, None, None, msg]
    assert pieces.feed(b"next", w.MSIZE_DEFAULT) == b"next"  # the next SDU begins a message again


def test_only_reliable_flows_carry_messages_longer_than_an_sdu() -> None:
    assert flow_msize(FakeFlow(qos.data), 1 << 20) == 1 << 20  # type: ignore[arg-type]
    assert flow_msize(FakeFlow(qos.raw, mtu=1400), 1 << 20) == 1400  # type: ignore[arg-type]
    assert flow_msize(FakeFlow(qos.best_effort), 8192) == 8192  # type: ignore[arg-type]


def test_a_message_said_to_be_longer_than_the_limit_is_not_waited_for() -> None:
    pieces = Reassembly()
    sdu = big_write(100)[:50]
    assert pieces.feed(sdu, 100) == sdu  # passed on as it is: the decoder refuses it
    with pytest.raises(w.DecodeError, match="size field says"):
        w.decode(sdu, 100)
    assert pieces.feed(b"ab", 100) == b"ab"  # too short to say a size: passed on too


def test_an_sdu_past_the_end_of_its_message_loses_the_framing() -> None:
    pieces = Reassembly()
    msg = big_write(1000)
    assert pieces.feed(msg[:600], 4096) is None
    with pytest.raises(TransportError, match="past the end"):
        pieces.feed(msg[600:] + b"extra", 4096)


def test_a_message_in_tiny_pieces_costs_its_size_not_a_multiple() -> None:
    """A peer may cut a message into 1-byte SDUs: what it makes the server hold is the message's size."""
    import tracemalloc

    msg = big_write(260_000)
    pieces = Reassembly()
    tracemalloc.start()
    try:
        assert pieces.feed(msg[:4], len(msg)) is None
        cuts = range(4, len(msg), 2)
        for i in cuts[:-1]:
            assert pieces.feed(msg[i : i + 2], len(msg)) is None
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2 * len(msg), f"{held} bytes held for a {len(msg)}-byte message"
    assert pieces.feed(msg[cuts[-1] :], len(msg)) == msg


def test_the_bridge_caps_the_msize_a_client_asks_for() -> None:
    ask = w.encode(w.Tversion(w.NOTAG, 1 << 20, "9P2000"))
    assert w.decode(capped(ask, 8192)) == w.Tversion(w.NOTAG, 8192, "9P2000")
    small = w.encode(w.Tversion(w.NOTAG, 4096, "9P2000"))
    assert capped(small, 8192) == small
    other = w.encode(w.Tclunk(1, 2))
    assert capped(other, 8192) == other
    with pytest.raises(w.DecodeError):
        capped(w.encode(w.Tversion(w.NOTAG, 1 << 20, "9P2000"))[:-2], 8192)
