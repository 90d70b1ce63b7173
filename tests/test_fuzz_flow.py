"""Fuzzed flow wire: FRCT PDUs bent and injected into a live exchange, the CRC and encryption
layers' packets, the unicast layer's frames and seals, the shims' management headers. None may
raise anything but its declared error, nor let a peer make a receiver hold unbounded state.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
from fuzzing import ROUNDS, cases, mutate, only_raises

from flowlib import crc
from flowlib.crypto import CIPHERS, KEY_SIZE, PacketCrypto
from flowlib.frct import PCI, RQ_SIZE, Frct, FrctError, Pci
from ipcp import shim_wire
from ipcp.shim import ShimCore
from ipcp.unicast import auth
from ipcp.unicast.pci import frame, unframe


def _pair(reliable: bool, seed: int) -> tuple[Frct, Frct]:
    rng = random.Random(seed)
    a = Frct(1400, reliable, isn=lambda: rng.getrandbits(32), rcv_buf=256 * 1024)
    b = Frct(1400, reliable, isn=lambda: rng.getrandbits(32), rcv_buf=256 * 1024)
    return a, b


@pytest.mark.parametrize("reliable", [True, False])
def test_bent_pdus_in_a_live_exchange_never_raise_nor_overfill(reliable: bool) -> None:
    """A sender and receiver talk; an attacker replays bent copies of every PDU it saw into both."""
    rng = random.Random(11 + reliable)
    a, b = _pair(reliable, 5)
    seen: list[bytes] = []
    now = 1.0
    for step in range(1500 * ROUNDS):
        now += rng.choice((0.0, 0.001, 0.05, 1.0))
        if a.can_send(now) and rng.random() < 0.5:
            a.send(rng.randbytes(rng.choice((0, 1, 1388, 3000 if reliable else 100))), now)
        for src, dst in ((a, b), (b, a)):
            while src.pdus:
                pdu = src.pdus.popleft()
                seen.append(pdu)
                if rng.random() < 0.9:
                    dst.receive(pdu, now)
        for end in (a, b):
            if rng.random() < 0.3 and seen:  # the attacker: a bent copy of anything seen so far
                end.receive(mutate(rng, rng.choice(seen[-200:]), seen[-50:]), now)
            if rng.random() < 0.05:
                end.receive(rng.randbytes(rng.randint(0, 40)), now)
            end.handle_timer(now)
            while end.sdus and rng.random() < 0.8:
                sdu = end.sdus.popleft()
                end.taken(len(sdu), now)
            assert len(end.ooo) <= 4 * RQ_SIZE, step
            assert end._held <= end.rcv_buf + end.max_payload, step
        if a.error or b.error:  # a broken peer resets the flow: start a fresh pair, as a new allocation
            a, b = _pair(reliable, step)


def test_pci_parses_any_twelve_bytes_and_refuses_fewer() -> None:
    for data in cases(12, [Pci(0xFF, 0xFFFFFF, 2**32 - 1, 0).pack(), b""], 2000):
        pci = only_raises(Pci.parse, data, FrctError)
        assert (pci is None) == (len(data) < PCI.size)


@pytest.mark.parametrize("cipher", sorted(CIPHERS))
def test_bent_encrypted_packets_are_refused_and_change_nothing(cipher: int) -> None:
    rng = random.Random(cipher)
    key = rng.randbytes(KEY_SIZE)
    for seq_iv in (False, True):
        tx = PacketCrypto(cipher, key, server=False, seq_iv=seq_iv)
        rx = PacketCrypto(cipher, key, server=True, seq_iv=seq_iv)
        sealed = [tx.seal(rng.randbytes(n)) for n in (0, 1, 64, 200)]
        for data in cases(cipher, sealed, 300):
            plain = only_raises(rx.open, data, ())
            if plain is not None and data not in sealed:
                assert not CIPHERS[cipher][1], "an AEAD cipher opened a bent packet"
        assert rx.open(tx.seal(b"after the noise")) == b"after the noise"


def test_crc_strip_takes_only_its_own_trailer() -> None:
    good = [crc.add(b""), crc.add(b"x" * 100)]
    for data in cases(21, good, 2000):
        body = only_raises(crc.strip, data, ())
        assert body is None or crc.add(body) == data


def test_unicast_frames_split_or_report_malformed() -> None:
    corpus = [frame(b"a"), frame(b"x" * 300, b"y"), frame(*[bytes([i]) * i for i in range(1, 20)])]
    for data in cases(31, corpus, 3000):
        pdus, _ = only_raises(unframe, data, ())
        assert sum(len(p) + 2 for p in pdus) <= len(data)


def test_sealed_unicast_pdus_open_only_untouched() -> None:
    key = bytes(range(32))
    sealer = auth.Sealer(key)
    sealed = [sealer.seal_bytes(b"pdu %d" % i) for i in range(8)]
    opener = auth.Opener(key)
    for data in cases(41, sealed, 2000):
        view = only_raises(opener.open, data, auth.AuthError)
        assert view is None or data in sealed


@pytest.mark.parametrize("layout", [shim_wire.UDP, shim_wire.ETH_DIX, shim_wire.ETH_LLC], ids=lambda x: x.name)
def test_shim_management_headers_decode_or_raise(layout: shim_wire.Layout) -> None:
    corpus = [
        layout.encode(kind, b"name", s_eid=1, d_eid=0)
        for kind in layout.codes
        if kind in shim_wire.Kind.__members__.values()
    ]
    for data in cases(51, corpus, 2000):
        out = only_raises(layout.decode, data, shim_wire.ShimWireError)
        if out is not None:
            kind, msg = out
            msg.qos() if kind is shim_wire.Kind.FLOW_REQ else None  # a request's QoS is always a valid spec
            shim_wire.offer_of(msg, kind is shim_wire.Kind.FLOW_REPLY)


@pytest.mark.parametrize("layout", [shim_wire.UDP, shim_wire.ETH_DIX, shim_wire.ETH_LLC], ids=lambda x: x.name)
def test_bent_shim_traffic_never_crashes_a_busy_core(layout: shim_wire.Layout) -> None:
    """What two shim cores said to each other (hellos, members, queries, a flow), bent, from a
    member and from a stranger, into a core with a member, a name, a query, an allocation and a flow."""
    from tests.test_shim_core import MAC_A, MAC_B, MAC_C, T0, A, B, C, _busy_core

    corpus: list[bytes] = []
    own, peer = (A, B) if layout is shim_wire.UDP else (MAC_A, MAC_B)
    original = ShimCore.receive

    def record(self: ShimCore, data: bytes, src: Hashable, now: float) -> None:
        corpus.append(bytes(data))
        original(self, data, src, now)

    with pytest.MonkeyPatch.context() as mp:  # every datagram the two cores exchange, recorded
        mp.setattr(ShimCore, "receive", record)
        busy = _busy_core(layout)
        busy.handle_timer(T0 + 30)
    corpus += [out for _, out in busy.datagrams_to_send()]  # its hellos and keepalives
    assert len(corpus) >= 2
    c = _busy_core(layout)
    rng = random.Random(61)
    now = T0 + 1
    for data in cases(62, corpus, 1500):
        now += rng.choice((0.0, 0.1, 5.0))
        c.receive(data, rng.choice((peer, C if layout is shim_wire.UDP else MAC_C, own)), now)
        if rng.random() < 0.1:
            c.handle_timer(now)
        for _, out in c.datagrams_to_send():
            layout.decode(out)  # everything it answers parses
    assert c.stats["dropped unencodable"] == 0


def test_bent_data_frames_and_member_lists_parse_or_are_dropped() -> None:
    from transports import eth, udp

    own, peer = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
    dix, llc = eth.EthFraming(own), eth.LlcFraming(own)
    llc_hdr = eth.LlcFraming(peer).header(own, 5, 6)  # the length goes between the addresses and the SAPs
    members = b"".join(udp.encode_addr(a) for a in (("10.0.0.1", 3435), ("::1", 1), ("224.0.0.1", 5)))
    corpus = [
        eth.EthFraming(peer).header(own, 7) + eth.LEN.pack(3) + b"abc",
        llc_hdr[:12] + eth.LEN.pack(63) + llc_hdr[12:] + b"xyz" * 20,
        udp.EID.pack(9) + b"sdu",
        members,
    ]
    assert dix.parse(corpus[0], peer) and llc.parse(corpus[1], peer) and len(udp.decode_addrs(members)) == 2
    for data in cases(71, corpus, 3000):
        for framing in (dix, llc):
            parsed = only_raises(framing.parse, data, (), peer)
            assert parsed is None or len(parsed[1]) <= len(data)
        only_raises(udp.UdpFraming.parse, data, (), ("10.0.0.1", 3435))
        only_raises(udp.decode_addrs, data, ())
