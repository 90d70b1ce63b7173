"""netplumb TAP1 framing and name/value pairs: round trips, rejection of bad input, fuzz."""

from __future__ import annotations

import contextlib
import logging
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.netplumb import wire
from apps.netplumb.wire import Decoder, Fields, Packet, WireError


def test_header_layout_is_the_seeds() -> None:
    data = wire.encode(Packet(5, wire.DATA, b"xyz"))
    assert data[:4] == b"TAP1"
    size, crc, seq, ptype = struct.unpack(">IIIB", data[4:17])
    assert size == len(data) == 20
    assert crc == zlib.crc32(data[12:])
    assert (seq, ptype) == (5, wire.DATA)
    assert data[17:] == b"xyz"


def test_round_trip() -> None:
    p = Packet(32767, 99, bytes(range(256)))
    assert wire.decode(wire.encode(p)) == p


@pytest.mark.parametrize("damage", [0, 5, 9, 13, 16, 19])
def test_any_flipped_byte_is_rejected(damage: int) -> None:
    data = bytearray(wire.encode(Packet(1, wire.DATA, b"abc")))
    data[damage] ^= 0x40
    with pytest.raises(WireError):
        wire.decode(bytes(data))


def test_bad_crc_is_rejected_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    data = bytearray(wire.encode(Packet(0, wire.DATA, b"abc")))
    data[-1] ^= 1
    caplog.set_level(logging.INFO)  # a peer's garbage is news, not a warning
    with pytest.raises(WireError, match="CRC"):
        Decoder().feed(bytes(data))
    assert "rejected a packet" in caplog.text


def test_oversized_and_truncated_are_rejected() -> None:
    with pytest.raises(WireError, match="exceeds"):
        wire.encode(Packet(0, 1, bytes(wire.MAX_PACKET)))
    data = wire.encode(Packet(0, 1, b"abcdef"))
    with pytest.raises(WireError, match="size"):
        wire.decode(data[:-1])
    with pytest.raises(WireError, match="size"):
        Decoder().feed(b"TAP1" + struct.pack(">II", 1 << 30, 0))


def test_sequence_must_follow_and_rolls_over_at_32767() -> None:
    enc, dec = wire.Encoder(), Decoder()
    enc.seq = dec.expect = 32766
    got = [dec.feed(wire.encode(Packet(enc.next(), 1, b"")))[0].seq for _ in range(3)]
    assert got == [32766, 32767, 0]
    with pytest.raises(WireError, match="sequence"):
        dec.feed(wire.encode(Packet(5, 1, b"")))


def test_replayed_packet_is_rejected() -> None:
    dec = Decoder()
    first = wire.encode(Packet(0, 1, b"a"))
    dec.feed(first)
    with pytest.raises(WireError, match="sequence"):
        dec.feed(first)


def test_stream_decoder_reassembles_split_packets() -> None:
    data = wire.encode(Packet(0, 1, b"hello")) + wire.encode(Packet(1, 2, b"world"))
    dec = Decoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert [p.payload for p in out] == [b"hello", b"world"]


def test_whole_mode_rejects_a_piece_of_a_packet() -> None:
    data = wire.encode(Packet(0, 1, b"hello"))
    with pytest.raises(WireError, match="not a whole packet"):
        Decoder(whole=True).feed(data[:-1])
    with pytest.raises(WireError, match="not a whole packet"):
        Decoder(whole=True).feed(b"TAP")
    assert len(Decoder(whole=True).feed(data)) == 1


def test_pairs_are_nul_terminated_and_end_with_an_empty_name() -> None:
    raw = wire.encode_pairs([("arg", "echo"), ("arg", ""), ("user", "x y ")])
    assert raw == b"arg\0echo\0arg\0\0user\0x y \0\0"
    f = wire.decode_pairs(raw)
    assert f.getall("arg") == ["echo", ""] and f.get("user") == "x y "


@pytest.mark.parametrize("bad", [b"", b"a\0b\0", b"a\0\0b\0\0", b"\0\0", b"a\0b\0c\0\0"])
def test_malformed_pair_lists_are_rejected(bad: bytes) -> None:
    with pytest.raises(WireError):
        wire.decode_pairs(bad)


def test_nul_in_a_value_cannot_be_encoded() -> None:
    with pytest.raises(WireError):
        wire.encode_pairs([("data", "a\0b")])


def test_binary_values_travel_base64() -> None:
    f = wire.decode_pairs(wire.encode_pairs(Fields.of(data=wire.b64(b"\0\1\2"))))
    assert f.bin("data") == b"\0\1\2"
    with pytest.raises(WireError, match="base64"):
        Fields.of(data="!!").bin("data")


def test_numbers_are_checked() -> None:
    f = Fields.of(ch="12", n="x", big="99999")
    assert f.int("ch") == 12
    with pytest.raises(WireError):
        f.int("n")
    with pytest.raises(WireError):
        f.int("big", 0, 100)
    with pytest.raises(WireError):
        f.int("missing")


pair_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=20)


@settings(max_examples=200)
@given(st.lists(st.tuples(pair_text.filter(bool), pair_text), max_size=10))
def test_pairs_round_trip(pairs: list[tuple[str, str]]) -> None:
    assert wire.decode_pairs(wire.encode_pairs(pairs)).text() == pairs


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_fuzz_decoders_only_raise_wire_errors(data: bytes) -> None:
    for fn in (wire.decode, wire.decode_pairs, Decoder().feed, Decoder(whole=True).feed):
        with contextlib.suppress(WireError):
            fn(data)


@settings(max_examples=200)
@given(st.integers(0, 32767), st.integers(0, 255), st.binary(max_size=200), st.integers(0, 10**6))
def test_fuzz_mutated_packets(seq: int, ptype: int, payload: bytes, where: int) -> None:
    data = bytearray(wire.encode(Packet(seq, ptype, payload)))
    data[where % len(data)] ^= 1 + where % 255
    with pytest.raises(WireError):
        wire.decode(bytes(data))
