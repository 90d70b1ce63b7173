"""Flow encryption (flowlib.crypto) without sockets: 0.23's packet format, key rotation, and what
must not open. Every rejected packet is counted and leaves the receiver's state as it was, so the
genuine packet still opens afterwards. (Conformance with C's own code: tests/test_c_crypt.py.)"""

from __future__ import annotations

import os
import queue
import random
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib.crypto import CIPHERS, COUNTER, OVERHEAD, PHASE, REPLAY_WINDOW, SERVER, TAG, PacketCrypto

GCM, CHACHA, GCM128, CTR = 901, 1018, 895, 906


def pair(cipher: int = GCM, seq_iv: bool = True, rotation_bit: int = 20) -> tuple[PacketCrypto, PacketCrypto]:
    """(client, server) ends of one flow, as the allocator and the acceptor build them from OAP's key."""
    key = os.urandom(32)
    return (PacketCrypto(cipher, key, server=False, seq_iv=seq_iv, rotation_bit=rotation_bit),
            PacketCrypto(cipher, key, server=True, seq_iv=seq_iv, rotation_bit=rotation_bit))  # fmt: skip


# -- the packet format --------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
@pytest.mark.parametrize("size", [0, 1, 1400, 65535])
def test_seal_open_round_trip_both_ways(cipher: int, size: int) -> None:
    c, s = pair(cipher)
    plain = random.Random(size).randbytes(size)
    packet = c.seal(plain)
    assert len(packet) == size + c.overhead == size + sum(CIPHERS[cipher][:2])
    assert s.open(packet) == plain
    assert c.open(s.seal(plain)) == plain
    assert c.rejected == s.rejected == 0


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
def test_any_buffer_is_sealed_as_its_bytes(cipher: int) -> None:
    c, s = pair(cipher)
    plain = os.urandom(300)
    for sdu in (bytearray(plain), memoryview(plain), memoryview(b"xx" + plain)[2:]):
        assert s.open(c.seal(sdu)) == plain


def test_the_aead_packet_is_iv_ciphertext_tag_as_0_23_lays_it_out() -> None:
    key = os.urandom(32)
    c = PacketCrypto(GCM, key, server=False)
    packet = c.seal(b"hello")
    iv, body = packet[:12], packet[12:]
    assert len(body) == 5 + TAG and OVERHEAD == 12 + TAG
    assert AESGCM(key).decrypt(iv, body, None) == b"hello"  # no associated data, tag last


def test_ivs_carry_the_key_phase_the_role_and_a_packet_number() -> None:
    c, s = pair()
    a, b = c.seal(b"x"), c.seal(b"x")
    assert a[0] & PHASE == 0 and a[0] & SERVER == 0 and s.seal(b"x")[0] & SERVER
    assert COUNTER.unpack_from(a, 4) == (0,) and COUNTER.unpack_from(b, 4) == (1,)
    assert a[1:4] == b[1:4]  # the random part stays; the number makes each IV unique


def test_a_peer_with_random_ivs_is_understood_as_0_23_sends_them() -> None:
    key = os.urandom(32)
    ours = PacketCrypto(GCM, key, server=True, seq_iv=False)
    for _ in range(50):
        iv = bytearray(os.urandom(12))
        iv[0] &= 0x7F  # phase 0
        assert ours.open(bytes(iv) + AESGCM(key).encrypt(bytes(iv), b"from C", None)) == b"from C"


def test_ciphertext_hides_the_plaintext_and_never_repeats() -> None:
    c, s = pair()
    plain = b"ATTACK AT DAWN " * 100
    p1, p2 = c.seal(plain), c.seal(plain)
    assert b"ATTACK" not in p1 and b"ATTACK" not in p2 and p1[12:] != p2[12:]
    assert s.open(p1) == s.open(p2) == plain


def test_aes_ctr_works_as_0_23_offers_it_without_integrity() -> None:
    c, s = pair(CTR)
    packet = c.seal(b"no tag")
    assert len(packet) == 16 + 6 and packet[-4 - 6 : -6] == bytes(4)  # the block counter starts at 0
    assert s.open(packet) == b"no tag"


# -- what must not open -----------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", [GCM, CHACHA, GCM128])
def test_every_tampered_byte_is_rejected_and_counted(cipher: int) -> None:
    c, s = pair(cipher)
    packet = c.seal(b"integrity matters" * 4)
    for i in range(len(packet)):
        bad = bytearray(packet)
        bad[i] ^= 0x01
        assert s.open(bytes(bad)) is None, f"a flipped bit at byte {i} went unnoticed"
    assert s.rejected == len(packet)
    assert s.open(packet) == b"integrity matters" * 4  # the failures did not poison the replay window


def test_truncated_and_extended_packets_are_rejected() -> None:
    c, s = pair()
    packet = c.seal(b"payload")
    cases = [b"", packet[:12], packet[: OVERHEAD - 1], packet[:-1], packet + b"\0", b"xyz", bytes(37)]
    for bad in cases:
        assert s.open(bad) is None
    assert s.rejected == len(cases)
    assert s.open(packet) == b"payload"


def test_a_packet_for_another_flow_is_rejected() -> None:
    c, _ = pair()
    _, s2 = pair()
    assert s2.open(c.seal(b"not yours")) is None and s2.rejected == 1


def test_a_forged_packet_number_is_rejected_and_does_not_move_the_window() -> None:
    c, s = pair()
    packets = [c.seal(bytes([i])) for i in range(3)]
    forged = packets[0][:4] + COUNTER.pack(2**62) + packets[0][12:]  # the IV is authenticated too
    assert s.open(forged) is None
    assert [s.open(p) for p in packets] == [b"\0", b"\1", b"\2"]
    assert s.rejected == 1


def test_keys_other_than_32_bytes_and_unknown_ciphers_are_refused() -> None:
    with pytest.raises(ValueError, match="32"):
        PacketCrypto(GCM, b"k" * 16, server=False)
    with pytest.raises(ValueError, match="NID"):
        PacketCrypto(4242, bytes(32), server=False)


# -- replay protection (both ends number their IVs) ---------------------------------------------------


def test_a_replayed_packet_is_rejected_and_counted() -> None:
    c, s = pair()
    packets = [c.seal(bytes([i]) * 10) for i in range(5)]
    assert all(s.open(p) is not None for p in packets)
    assert all(s.open(p) is None for p in packets + packets)
    assert s.rejected == 10


def test_without_numbered_ivs_replays_open_as_in_0_23() -> None:
    c, s = pair(seq_iv=False)
    packet = c.seal(b"again")
    assert s.open(packet) == s.open(packet) == b"again"


def test_a_packet_older_than_the_window_is_rejected_even_if_never_seen() -> None:
    c, s = pair()
    packets = [c.seal(i.to_bytes(4, "big")) for i in range(REPLAY_WINDOW + 100)]
    newest = len(packets) - 1
    assert s.open(packets[newest]) is not None
    assert s.open(packets[newest - REPLAY_WINDOW]) is None
    assert s.open(packets[0]) is None
    assert s.open(packets[newest - REPLAY_WINDOW + 1]) is not None
    assert s.rejected == 2


def test_our_own_packets_sent_back_to_us_are_rejected_and_move_nothing() -> None:
    """One key serves both directions, so a packet of ours opens for us too: the network sent back one
    numbered past the peer's count and every packet the peer sent after that was refused as too old."""
    c, s = pair()
    for _ in range(5 * REPLAY_WINDOW):
        ours = c.seal(b"mine")
    assert c.open(ours) is None and c.open(c.seal(b"mine")) is None
    assert c.rejected == 2
    # The legitimate use beside it: the peer's packets, fewer than ours, open in any order.
    theirs = [s.seal(bytes([i])) for i in range(5)]
    assert [c.open(p) for p in reversed(theirs)] == [bytes([i]) for i in reversed(range(5))]
    assert s.open(c.seal(b"to the peer")) == b"to the peer"


def test_a_tampered_copy_does_not_burn_the_genuine_packets_number() -> None:
    c, s = pair()
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
    c, s = pair()
    packets = [c.seal(i.to_bytes(2, "big")) for i in range(300)]
    accepted = [i for i in arrivals if s.open(packets[i]) is not None]
    assert len(accepted) == len(set(accepted)), "a packet was accepted twice"
    assert sorted(accepted) == sorted(set(arrivals))
    assert s.rejected == len(arrivals) - len(accepted)


# -- key rotation (every 2^ROTATION_BIT packets; 2^4 here) ------------------------------------------------


@pytest.mark.parametrize("cipher", [GCM, CHACHA, GCM128])
def test_both_ends_follow_each_others_key_rotations_in_any_traffic_mix(cipher: int) -> None:
    c, s = pair(cipher, rotation_bit=4)
    first = c._key
    rng = random.Random(cipher)
    phases = set()
    for i in range(2000):
        sender, receiver = (c, s) if rng.random() < 0.7 else (s, c)
        packet = sender.seal(i.to_bytes(4, "big"))
        phases.add(packet[0] & PHASE)
        assert receiver.open(packet) == i.to_bytes(4, "big"), f"packet {i} did not open after a rotation"
    assert phases == {0, PHASE} and c.rejected == s.rejected == 0
    assert c._key != first and s._key != first  # 2000 packets: many rotations
    assert c._key in (s._key, s._next_key()[0]) or s._key == c._next_key()[0]  # at most one rotation apart


def test_aes_ctr_follows_the_phase_bit_one_way() -> None:
    """Without a tag only the phase bit tells keys apart, as in 0.23 (which is why CTR ranks lowest)."""
    c, s = pair(CTR, rotation_bit=4)
    assert all(s.open(c.seal(b"%d" % i)) == b"%d" % i for i in range(200))


def test_the_previous_key_still_opens_late_packets_during_its_grace() -> None:
    c, s = pair(rotation_bit=4)
    late = [c.seal(b"old %d" % i) for i in range(16)]  # the 16th sealing rotates the sender's key
    assert c._phase == 1
    assert s.open(c.seal(b"new")) == b"new"  # the receiver follows on the phase bit
    assert [s.open(p) for p in late[-4:]] == [b"old %d" % i for i in range(12, 16)]


def test_forgeries_with_the_other_phase_cannot_rotate_the_receivers_key() -> None:
    c, s = pair(rotation_bit=4)
    for i in range(13):  # far enough into the epoch for a real rotation to be followed
        assert s.open(c.seal(bytes([i]))) is not None
    key = s._key
    for _ in range(100):
        forged = bytearray(os.urandom(40))
        forged[0] |= PHASE
        assert s.open(bytes(forged)) is None
    assert s._key == key and s._phase == 0
    assert s.open(c.seal(b"still in step")) == b"still in step"


def test_sealing_and_opening_in_four_threads_across_rotations() -> None:
    """Each end writes in one thread and reads in another, as a raw flow's application may. The
    previous key's grace, half an epoch (512 packets here, sent and opened), must outlast what is in
    flight; as in 0.23, a packet sealed and then held back longer than that does not open, so each
    end's writer keeps within 64 packets of its own reader (a stalled direction is another test)."""
    c, s = pair(rotation_bit=10)
    first = c._key
    for _ in range(1023):  # c's first seal in the threads crosses a multiple of 1,024: a rotation
        c.seal(b"")  # (later ones may be crossed by opens, which do not rotate, as in 0.23)
    count, errors = 4000, []
    to_s: queue.Queue[bytes] = queue.Queue(8)
    to_c: queue.Queue[bytes] = queue.Queue(8)
    opened = {id(c): 0, id(s): 0}
    moved = threading.Condition()

    def write(end: PacketCrypto, q: queue.Queue[bytes]) -> None:
        for i in range(count):
            with moved:
                assert moved.wait_for(lambda i=i: opened[id(end)] >= i - 64, 30)
            q.put(end.seal(i.to_bytes(4, "big")))

    def read(end: PacketCrypto, q: queue.Queue[bytes]) -> None:
        for i in range(count):
            if end.open(q.get(timeout=30)) != i.to_bytes(4, "big"):
                errors.append(i)
            with moved:
                opened[id(end)] += 1
                moved.notify_all()

    threads = [threading.Thread(target=f, args=a) for f, a in
               ((write, (c, to_s)), (read, (s, to_s)), (write, (s, to_c)), (read, (c, to_c)))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert opened == {id(c): count, id(s): count}
    assert not errors and c.rejected == s.rejected == 0
    assert c._key != first and s._key != first
