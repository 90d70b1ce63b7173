"""Flow encryption (flowlib.crypto) without sockets: key agreement, sealing, and what must not open.

Both ends of a flow are built here from their KeyExchange; every rejected packet must be counted
and must leave the receiver's replay state as it was, so the genuine packet still opens afterwards.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib.crypto import (
    COUNTER,
    HELLO,
    MAGIC,
    OVERHEAD,
    REPLAY_WINDOW,
    TAG,
    VERSION,
    HandshakeError,
    KeyExchange,
    PacketCrypto,
)


def agree() -> tuple[PacketCrypto, PacketCrypto]:
    """(client, server) sessions, as the allocator and the acceptor derive them."""
    client, server = KeyExchange(), KeyExchange()
    c_hello, s_hello = client.hello(), server.hello()
    return client.session(s_hello, client=True), server.session(c_hello, client=False)


# -- key agreement ----------------------------------------------------------------------------------


def test_both_sides_derive_matching_keys() -> None:
    c, s = agree()
    assert c._tx == s._rx and c._rx == s._tx  # what one side seals with, the other opens with
    assert c._tx != c._rx  # one key per direction
    assert len(c._tx) == len(c._rx) == 32


def test_each_agreement_yields_fresh_keys() -> None:
    (c1, _), (c2, _) = agree(), agree()
    assert {c1._tx, c1._rx}.isdisjoint({c2._tx, c2._rx})


def test_the_hello_carries_magic_version_and_the_public_key() -> None:
    kx = KeyExchange()
    msg = kx.hello()
    assert len(msg) == HELLO.size == 37
    magic, version, pk = HELLO.unpack(msg)
    assert (magic, version, pk) == (MAGIC, VERSION, kx.pk)
    assert KeyExchange.peer_key(msg) == kx.pk


@pytest.mark.parametrize("bad", [
    b"",
    b"OUKX",
    HELLO.pack(MAGIC, VERSION, bytes(32))[:-1],
    HELLO.pack(MAGIC, VERSION, bytes(32)) + b"\0",
    HELLO.pack(b"XXXX", VERSION, bytes(32)),
    HELLO.pack(MAGIC, VERSION + 1, bytes(32)),
], ids=["empty", "magic-only", "short", "long", "bad-magic", "bad-version"])
def test_a_malformed_hello_is_refused(bad: bytes) -> None:
    with pytest.raises(HandshakeError):
        KeyExchange().session(bad, client=True)


def test_the_two_sides_must_take_opposite_roles() -> None:
    a, b = KeyExchange(), KeyExchange()
    both_clients = a.session(b.hello(), client=True), b.session(a.hello(), client=True)
    assert both_clients[1].open(both_clients[0].seal(b"x")) is None


# -- sealing and opening ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1400, 8980, 65535])
def test_seal_open_round_trip_both_ways(size: int) -> None:
    c, s = agree()
    plain = random.Random(size).randbytes(size)
    packet = c.seal(plain)
    assert len(packet) == size + OVERHEAD
    assert s.open(packet) == plain
    back = s.seal(plain)
    assert c.open(back) == plain
    assert c.rejected == s.rejected == 0


def test_ciphertext_hides_the_plaintext_and_never_repeats() -> None:
    c, s = agree()
    plain = b"ATTACK AT DAWN " * 100
    p1, p2 = c.seal(plain), c.seal(plain)
    assert b"ATTACK" not in p1 and b"ATTACK" not in p2
    assert p1[COUNTER.size:] != p2[COUNTER.size:]  # a fresh nonce per packet
    assert COUNTER.unpack_from(p1) == (0,) and COUNTER.unpack_from(p2) == (1,)
    assert s.open(p1) == s.open(p2) == plain


def test_every_tampered_byte_is_rejected_and_counted() -> None:
    c, s = agree()
    packet = c.seal(b"integrity matters" * 4)
    for i in range(len(packet)):
        bad = bytearray(packet)
        bad[i] ^= 0x01
        assert s.open(bytes(bad)) is None, f"a flipped bit at byte {i} went unnoticed"
    assert s.rejected == len(packet)
    assert s.open(packet) == b"integrity matters" * 4  # the failures did not poison the replay window


def test_truncated_and_extended_packets_are_rejected() -> None:
    c, s = agree()
    packet = c.seal(b"payload")
    cases = [b"", packet[:COUNTER.size], packet[:OVERHEAD - 1], packet[:-1], packet + b"\0",
             packet[:COUNTER.size + TAG]]
    for bad in cases:
        assert s.open(bad) is None
    assert s.rejected == len(cases)
    assert s.open(packet) == b"payload"


def test_a_packet_for_another_flow_is_rejected() -> None:
    c, _s = agree()
    _c2, s2 = agree()
    assert s2.open(c.seal(b"not yours")) is None
    assert s2.rejected == 1


def test_a_sender_cannot_open_its_own_packets() -> None:
    c, _ = agree()
    assert c.open(c.seal(b"reflected")) is None  # a reflected packet is not the peer's
    assert c.rejected == 1


def test_a_forged_counter_is_rejected_and_does_not_move_the_window() -> None:
    c, s = agree()
    packets = [c.seal(bytes([i])) for i in range(3)]
    forged = COUNTER.pack(2**62) + packets[0][COUNTER.size:]  # the counter is authenticated too
    assert s.open(forged) is None
    assert [s.open(p) for p in packets] == [b"\0", b"\1", b"\2"]
    assert s.rejected == 1


# -- replay protection ------------------------------------------------------------------------------


def test_a_replayed_packet_is_rejected_and_counted() -> None:
    c, s = agree()
    packets = [c.seal(bytes([i]) * 10) for i in range(5)]
    for p in packets:
        assert s.open(p) is not None
    for p in packets + packets:
        assert s.open(p) is None
    assert s.rejected == 10


def test_a_packet_older_than_the_window_is_rejected_even_if_never_seen() -> None:
    c, s = agree()
    packets = [c.seal(i.to_bytes(4, "big")) for i in range(REPLAY_WINDOW + 100)]
    newest = len(packets) - 1
    assert s.open(packets[newest]) is not None
    assert s.open(packets[newest - REPLAY_WINDOW]) is None  # exactly one window behind: too old
    assert s.open(packets[0]) is None
    assert s.rejected == 2
    assert s.open(packets[newest - REPLAY_WINDOW + 1]) is not None  # the oldest still inside
    assert s.open(packets[newest - 1]) is not None


def test_reordered_packets_within_the_window_are_accepted_exactly_once() -> None:
    c, s = agree()
    plains = [i.to_bytes(4, "big") * 8 for i in range(REPLAY_WINDOW)]
    packets = [c.seal(p) for p in plains]
    order = list(range(len(packets)))
    random.Random(5).shuffle(order)
    opened = {i: s.open(packets[i]) for i in order}
    assert all(opened[i] == plains[i] for i in range(len(packets)))
    assert s.rejected == 0
    for i in order[:100]:
        assert s.open(packets[i]) is None
    assert s.rejected == 100


def test_a_tampered_copy_does_not_burn_the_genuine_packets_counter() -> None:
    c, s = agree()
    packet = c.seal(b"genuine")
    bad = bytearray(packet)
    bad[-1] ^= 0xFF
    assert s.open(bytes(bad)) is None
    assert s.open(packet) == b"genuine"
    assert s.open(packet) is None
    assert s.rejected == 2


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 299), min_size=1, max_size=600))
def test_any_arrival_order_opens_each_packet_at_most_once(arrivals: list[int]) -> None:
    c, s = agree()
    packets = [c.seal(i.to_bytes(2, "big")) for i in range(300)]
    accepted = [i for i in arrivals if s.open(packets[i]) is not None]
    assert len(accepted) == len(set(accepted)), "a packet was accepted twice"
    # Within one window of 300 counters, every first arrival is accepted.
    assert sorted(accepted) == sorted(set(arrivals))
    assert s.rejected == len(arrivals) - len(accepted)
