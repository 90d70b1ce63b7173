"""FRCT on C Ouroboros 0.23's wire: our PCI parser against real C captures (tests/fixtures/interop-0.23,
with the independent decodes beside them), our receiver replaying C's traffic, and the shape of every
packet kind we send (INTEROP-0.23.md §4.3): DRF runs, ACK|FC, the 24-bit window, RDVS, the final ACK.
"""

from __future__ import annotations

import itertools
import struct
import zlib

import pytest
from captures import DataPacket, annotated_pcis, data_packets

from flowlib import crc
from flowlib.frct import ACK, DATA, DRF, FC, PCI, RCV_INACT, RDVS, RQ_SIZE, START_WINDOW, Frct, FrctError, Pci
from flowlib.recovery import SEQ_MOD, before

FRCT_CAPTURES = ["udp4-oping", "udp4-keepalive-dealloc", "ethdix-oping", "ethdix-keepalive-dealloc"]
OPING = struct.Struct("!II")  # oping's type and id, big-endian on C's wire


def frct_packets(capture: str) -> list[DataPacket]:
    pcis = annotated_pcis(capture)
    return [p for p in data_packets(capture) if p.no in pcis]


@pytest.mark.parametrize("capture", FRCT_CAPTURES)
def test_every_captured_pci_parses_as_the_decode_annotates_it(capture: str) -> None:
    pcis = annotated_pcis(capture)
    packets = frct_packets(capture)
    assert len(packets) == len(pcis) >= 5
    for p in packets:
        got = Pci.parse(p.sdu)
        assert (got.flags, got.rwe, got.seqno, got.ackno) == tuple(
            pcis[p.no][k] for k in ("flags", "rwe", "seqno", "ackno")
        ), p.no
        assert got.pack() == p.sdu[: PCI.size]


def test_keepalives_in_the_captures_are_empty_sdus_every_quarter_timeout() -> None:
    """udp4-keepalive-dealloc: a raw flow with a 2 s timeout, both ends idle."""
    empty = [p for p in data_packets("udp4-keepalive-dealloc") if not p.sdu and p.src == "10.99.0.1"]
    assert len(empty) >= 3
    gaps = [b.t - a.t for a, b in itertools.pairwise(empty)][:2]
    assert all(0.45 < g < 0.55 for g in gaps), gaps


def replay(packets: list[DataPacket]) -> tuple[Frct, list[bytes]]:
    """Our reliable receiver fed one direction of a captured C FRCT flow."""
    f = Frct(1500, reliable=True)
    got: list[bytes] = []
    for p in packets:
        f.receive(p.sdu, p.t)
        f.handle_timer(p.t + 0.05)
        got.extend(f.sdus)
        f.taken(sum(map(len, f.sdus)), p.t)
        f.sdus.clear()
    return f, got


@pytest.mark.parametrize(("src", "kind", "dups"), [("10.99.0.1", 0, 0), ("10.99.0.2", 1, 2)])
def test_our_receiver_takes_c_traffic_and_drops_its_spurious_retransmissions(src: str, kind: int, dups: int) -> None:
    """udp4-oping #13-#23: requests A->B; replies B->A, two of them resent identically by C (#18, #19)."""
    packets = [p for p in frct_packets("udp4-oping") if p.src == src and Pci.parse(p.sdu).flags & DATA]
    f, got = replay(packets)
    assert [OPING.unpack_from(s) for s in got] == [(kind, 0), (kind, 1), (kind, 2)]
    assert f.counters.duplicates == dups
    last = Pci.parse(packets[-1].sdu)
    assert f.rcv_nxt == last.seqno + 1
    acks = [Pci.parse(p) for p in f.pdus]
    assert acks and all(a.flags == DRF | ACK | FC and a.seqno == f.snd_una for a in acks)
    assert acks[-1].ackno == last.seqno + 1


def test_our_receiver_acks_captured_c_data_as_c_does() -> None:
    """The ack for C's first request (#13) is what C's own receiver sent: ackno seq+1, rwe seq+1+256;
    ours adds DRF and where our run opens (test_an_ack_before_our_first_data_...)."""
    first = frct_packets("udp4-oping")[0]
    pci = Pci.parse(first.sdu)
    assert pci.flags == DATA | DRF
    f = Frct(1500, reliable=True, isn=lambda: 0x567238BC)
    f.receive(first.sdu, 0.0)
    f.taken(len(f.sdus.popleft()), 0.0)
    f.handle_timer(1.0)
    ack = Pci.parse(f.pdus[-1])
    assert ack == Pci(DRF | ACK | FC, (pci.seqno + 1 + RQ_SIZE) & 0xFFFFFF, 0x567238BC, pci.seqno + 1)


# -- what we send ---------------------------------------------------------------------------------


def sent(f: Frct) -> list[Pci]:
    out = [Pci.parse(p) for p in f.pdus]
    f.pdus.clear()
    return out


def test_a_run_opens_with_drf_on_a_random_seqno_without_ack_or_window() -> None:
    a, b = Frct(1500, True), Frct(1500, True)
    a.send(b"x", 0.0)
    b.send(b"y", 0.0)
    pa, pb = sent(a)[0], sent(b)[0]
    assert pa.flags == pb.flags == DATA | DRF
    assert pa.seqno != pb.seqno  # 32 random bits each
    assert a.snd_rwe == (pa.seqno + START_WINDOW) % 2**32


def test_the_first_reply_carries_drf_ack_and_the_24_bit_window() -> None:
    a, b = Frct(1500, True, isn=lambda: 0x4CF70A5F), Frct(1500, True, isn=lambda: 0x567238BC)
    a.send(b"request", 0.0)
    b.receive(a.pdus.popleft(), 0.001)
    b.taken(len(b.sdus.popleft()), 0.001)
    b.send(b"reply", 0.001)
    reply = sent(b)[0]
    # udp4-oping #14, field for field.
    assert reply == Pci(DATA | DRF | ACK | FC, 0xF70B60, 0x567238BC, 0x4CF70A60)


def test_a_second_pdu_in_flight_has_no_drf() -> None:
    a = Frct(1500, True)
    a.send(b"1", 0.0)
    a.send(b"2", 0.0)
    assert [p.flags for p in sent(a)] == [DATA | DRF, DATA]


def test_unreliable_senders_set_drf_on_every_pdu_and_never_ack() -> None:
    a, b = Frct(1500, False), Frct(1500, False)
    for i in range(3):
        a.send(b"%d" % i, 0.0)
    for p in list(a.pdus):
        b.receive(p, 0.0)
    b.send(b"back", 0.0)
    assert [p.flags for p in sent(a)] == [DATA | DRF] * 3
    assert sent(b)[0].flags == DATA | DRF | FC


def test_data_without_drf_is_dropped_while_no_run_is_open() -> None:
    a, b = Frct(1500, True), Frct(1500, True)
    a.send(b"1", 0.0)
    a.send(b"2", 0.0)
    first, second = a.pdus
    b.receive(second, 0.0)  # the first was lost: no run to put the second in (C drops it too)
    assert not b.sdus and b.counters.no_run == 1
    b.receive(first, 0.1)
    b.receive(second, 0.1)
    assert list(b.sdus) == [b"1", b"2"]


def test_a_run_ends_after_the_inactivity_time_and_drf_opens_the_next() -> None:
    a, b = Frct(1500, True), Frct(1500, True)
    a.send(b"1", 0.0)
    b.receive(a.pdus.popleft(), 0.0)
    b.sdus.clear()
    later = RCV_INACT + 20.0
    a.receive(_ack_for(b, later - 1), later - 1)  # a's run is idle, nothing unacked
    a.send(b"2", 200.0)  # past SND_INACT: a new random seqno, DRF
    pdu = a.pdus.popleft()
    assert Pci.parse(pdu).flags & DRF
    b.receive(pdu, 200.0)
    assert list(b.sdus) == [b"2"]


def _ack_for(f: Frct, now: float) -> bytes:
    f.handle_timer(now + 1)
    return f.pdus.popleft()


def test_pure_acks_are_ack_fc_drf_at_our_next_seqno_and_duplicates_are_dropped_and_acked() -> None:
    a, b = Frct(1500, True), Frct(1500, True)
    a.send(b"once", 0.0)
    pdu = a.pdus.popleft()
    b.receive(pdu, 0.0)
    b.handle_timer(1.0)
    first = sent(b)
    b.receive(pdu, 2.0)  # C resends spuriously: the copy is dropped and acked again
    b.handle_timer(2.0)
    again = sent(b)
    assert list(b.sdus) == [b"once"] and b.counters.duplicates == 1
    assert [p.flags for p in first + again] == [DRF | ACK | FC, DRF | ACK | FC]
    assert first[0].seqno == again[0].seqno == b.snd_nxt and again[0].ackno == first[0].ackno


def test_rendezvous_is_answered_with_a_window_update_only() -> None:
    b = Frct(1500, True)
    b.receive(Pci(RDVS, 0, 0, 0).pack(), 0.0)
    b.receive(Pci(RDVS, 0, 0, 0).pack(), 0.0)
    b.handle_timer(0.0)
    assert [p.flags for p in sent(b)] == [DRF | FC]  # one answer however many came in one go


def test_a_closed_window_sends_rendezvous_every_100_ms_until_reopened() -> None:
    a = Frct(1500, True)
    assert a.recovery is not None
    a.recovery.cc.cwnd = 1000.0  # the peer's window, not congestion, is what holds it back here
    now = 0.0
    while a.can_send(now):
        a.send(b"x", now)
    sent(a)
    assert len(a.unacked) == START_WINDOW and not a.can_send(now)  # the peer said nothing yet
    for step in range(1, 4):
        a.handle_timer(now + 0.1 * step + 1e-9)
    assert [p.flags for p in sent(a)].count(DRF | RDVS) == 3  # at the oldest unacknowledged seqno
    edge = (a.snd_nxt + 100) & 0xFFFFFF
    a.receive(Pci(FC, edge, 0, 0).pack(), 0.5)
    assert a.snd_rwe == (a.snd_nxt + 100) % 2**32


def test_the_24_bit_window_edge_rolls_over_into_the_high_byte() -> None:
    a = Frct(1500, True, isn=lambda: 0x01FFFFF0)
    a.send(b"x", 0.0)
    a.receive(Pci(FC, 0x000010, 0, 0).pack(), 0.0)  # past 0x01FFFFFF: the high byte goes up
    assert a.snd_rwe == 0x02000010


def test_close_sends_a_final_ack_flags_ack_only() -> None:
    a, b = Frct(1500, True), Frct(1500, True)
    a.send(b"last", 0.0)
    b.receive(a.pdus.popleft(), 0.0)
    assert not b.close(0.0)  # nothing of b's own to linger for
    assert sent(b) == [Pci(DRF | ACK, 0, b.snd_nxt, b.rcv_nxt)]


class CReceiver:
    """What decides whether C 0.23's receiver takes a PDU (frct.c, __frcti_rcv): any packet counts as
    the sender's activity, a run opens only on DRF after RCV_INACT of none, its edges start at 0, and
    data before the left edge or past the right one is dropped. In order only: enough here."""

    def __init__(self) -> None:
        self.act = -float("inf")
        self.lwe = self.rwe = 0
        self.taken: list[bytes] = []

    def receive(self, pdu: bytes, now: float) -> None:
        pci = Pci.parse(pdu)
        if now - self.act > RCV_INACT:
            if pci.flags & DRF:
                self.lwe, self.rwe = pci.seqno, (pci.seqno + RQ_SIZE) % SEQ_MOD
            elif pci.flags & DATA:
                return
        self.act = now
        if pci.flags & DATA and pci.seqno == self.lwe and before(pci.seqno, self.rwe):
            self.lwe = (self.lwe + 1) % SEQ_MOD
            self.taken.append(pdu[PCI.size :])


@pytest.mark.parametrize("lose_first_reply", [False, True])
def test_an_ack_before_our_first_data_leaves_a_c_receiver_able_to_take_it(lose_first_reply: bool) -> None:
    """A C client's request, our server slower than the delayed ack: the ack reaches C first. Were it
    C's own shape (seqno 0, no DRF), C would count it as our run's activity, never open the run, and
    drop the reply and every copy of it: the flow is dead (seen as C oping's "Server timed out")."""
    client, server, c = Frct(1500, True), Frct(1500, True), CReceiver()
    client.send(b"ping", 0.0)
    server.receive(client.pdus.popleft(), 0.0)
    server.taken(len(server.sdus.popleft()), 0.0)
    server.handle_timer(0.01)
    acks = sent(server)
    assert [p.flags & DATA for p in acks] == [0]  # a pure ack went first
    for pci in acks:
        c.receive(pci.pack(), 0.01)
    server.send(b"pong", 0.05)
    reply = server.pdus.popleft()
    if lose_first_reply:  # more pure acks while the reply is lost: C must still take the copy
        client.send(b"ping again", 0.06)
        server.receive(client.pdus.popleft(), 0.06)
        server.handle_timer(0.1)
        for p in list(server.pdus):
            c.receive(p, 0.1)
        server.pdus.clear()
        server.handle_timer(0.05 + 2.0)  # RTO: the reply again
    else:
        server.pdus.appendleft(reply)
    for p in server.pdus:
        c.receive(p, 2.1)
    assert c.taken == [b"pong"]


def test_a_run_our_acks_kept_open_is_not_reopened_on_a_new_seqno() -> None:
    """Acks alone kept C's receiver from going idle: our next data continues the run they announced."""
    client, server, c = Frct(1500, True), Frct(1500, True), CReceiver()
    for t in range(0, 400, 50):  # a one-way flow for longer than a run's inactivity
        client.send(b"up", float(t))
        server.receive(client.pdus.popleft(), float(t))
        server.taken(len(server.sdus.popleft()), float(t))
        server.handle_timer(t + 0.01)
        for p in server.pdus:
            c.receive(p, t + 0.01)
        server.pdus.clear()
    server.send(b"down", 400.0)
    c.receive(server.pdus.popleft(), 400.0)
    assert c.taken == [b"down"]


def test_close_lingers_while_data_is_unacknowledged() -> None:
    a = Frct(1500, True)
    a.send(b"unacked", 0.0)
    assert a.close(0.0)


def test_pci_parse_rejects_short_pdus() -> None:
    with pytest.raises(FrctError, match="no room for the 12-byte FRCT PCI"):
        Pci.parse(b"\x01" * 11)


def test_crc_trailer_is_zlib_crc32_big_endian_after_everything_else() -> None:
    body = Pci(DATA | DRF, 0, 7, 0).pack() + b"payload"
    packet = crc.add(body)
    assert packet[-4:] == zlib.crc32(body).to_bytes(4, "big")
    assert crc.strip(packet) == body
    assert crc.strip(packet[:-1] + bytes([packet[-1] ^ 1])) is None
    c_sdu = next(iter(data_packets("udp4-crc-probe"))).sdu  # sent without a trailer: C dropped it, as we do
    assert crc.strip(c_sdu) is None
