"""What a flow puts on the IPCP's socket and takes from it, without an IRMd: one end of a SOCK_SEQPACKET
pair is the flow's IPCP side, the test plays the peer on the other. C's order in every packet:
FRCT PCI, payload, (encryption,) CRC32 trailer; keepalives are empty records; C's bare FRCT control
packets come without a CRC.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from collections.abc import Iterator
from typing import Any, cast

import pytest

from flowlib import FlowTimeout, qos
from flowlib.crypto import AES_256_GCM, PacketCrypto
from flowlib.events import Event, EventQueue, EventType, FlowSet, fevent
from flowlib.flow import Flow, establish
from flowlib.frct import ACK, DATA, DRF, FC, PCI, Pci
from flowlib.irm import IrmClient
from proto import messages as m
from proto.qos import QosSpec

MTU = 1500


class NoIrmd:
    """Stands in for the IRMd: flows here are never allocated through one."""

    def __init__(self) -> None:
        self.deallocated: list[int] = []

    def dealloc(self, flow_id: int) -> None:
        self.deallocated.append(flow_id)

    def flow_state(self, flow_id: int) -> str:
        return "dealloc"


def open_flow(spec: QosSpec, no_wire: bool = False) -> tuple[Flow, socket.socket]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    reply = m.FlowReply(1, "test", MTU, spec, "peer", no_wire=no_wire)
    flow = establish(reply, ours.detach(), cast(IrmClient, NoIrmd()), client=True)
    peer.settimeout(5.0)
    return flow, peer


@pytest.fixture
def opened() -> Iterator[list[tuple[Flow, socket.socket]]]:
    made: list[tuple[Flow, socket.socket]] = []
    yield made
    for flow, peer in made:
        peer.close()
        flow.close()


def crc_of(body: bytes) -> bytes:
    return zlib.crc32(body).to_bytes(4, "big")


def with_crc(body: bytes) -> bytes:
    return body + crc_of(body)


def test_a_reliable_flow_sends_pci_payload_then_crc(opened: list[Any]) -> None:
    flow, peer = open_flow(qos.data)
    opened.append((flow, peer))
    assert flow.mtu == 65535  # reliable flows fragment: the application sees the FRCT limit
    flow.write(b"hello")
    packet = peer.recv(MTU)
    body, trailer = packet[:-4], packet[-4:]
    assert trailer == crc_of(body)
    pci = Pci.parse(body)
    assert pci.flags == DATA | DRF and body[PCI.size :] == b"hello"


def test_a_c_style_bare_ack_without_crc_is_taken_and_bad_crcs_are_dropped(opened: list[Any]) -> None:
    flow, peer = open_flow(qos.data)
    opened.append((flow, peer))
    flow.write(b"x")
    sent = Pci.parse(peer.recv(MTU)[:-4])
    peer_seq = 0x1000
    # The peer's reply with a corrupted CRC: dropped, never delivered.
    reply = Pci(DATA | DRF | ACK | FC, peer_seq + 256, peer_seq, sent.seqno + 1).pack() + b"pong"
    peer.send(reply + bytes(4))
    # The same reply intact, then C's own ack of it: a bare 12-byte PCI, no CRC (as C sends its acks).
    peer.send(with_crc(reply))
    flow.set_timeout(5.0)
    assert flow.read() == b"pong"
    peer.send(Pci(ACK | FC, peer_seq + 300, 0, sent.seqno + 1).pack())
    session = flow._session
    assert session is not None and session.frct is not None
    deadline = time.monotonic() + 5
    while session.frct.unacked and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not session.frct.unacked, "the bare ack was not taken"
    assert session.rejected == 1


def test_an_empty_record_is_a_keepalive_not_the_end(opened: list[Any]) -> None:
    flow, peer = open_flow(qos.data)
    opened.append((flow, peer))
    peer.send(b"")
    peer.send(with_crc(Pci(DATA | DRF, 0, 7, 0).pack() + b"after"))
    flow.set_timeout(5.0)
    assert flow.read() == b"after"


def test_a_raw_flow_asking_for_no_errors_checks_crcs_in_the_callers_thread(opened: list[Any]) -> None:
    flow, peer = open_flow(qos.raw_no_errors)
    opened.append((flow, peer))
    assert flow._session is None and flow.mtu == MTU - 4
    flow.write(b"raw")
    assert peer.recv(MTU) == with_crc(b"raw")
    peer.send(b"bad" + bytes(4))
    peer.send(b"")
    peer.send(with_crc(b"good"))
    flow.set_timeout(5.0)
    assert flow.read() == b"good"
    assert flow.rejected == 1
    flow.set_timeout(0.2)
    with pytest.raises(FlowTimeout):
        flow.read()


@pytest.mark.parametrize("spec", [qos.data, qos.raw_no_errors], ids=["reliable", "raw"])
def test_a_flow_that_never_leaves_the_host_adds_no_crc(opened: list[Any], spec: QosSpec) -> None:
    """A local layer's flow is a kernel socket end to end: ber 0 still holds, without a trailer."""
    flow, peer = open_flow(spec, no_wire=True)
    opened.append((flow, peer))
    assert flow.qos.ber == 0 and flow.mtu == (MTU if spec is qos.raw_no_errors else flow.mtu)
    flow.write(b"local")
    packet = peer.recv(MTU)
    assert packet.endswith(b"local")  # no trailer after the payload
    body = (Pci(DATA | DRF, 0, 7, 0).pack() if spec is qos.data else b"") + b"back"
    peer.send(body)
    flow.set_timeout(5.0)
    assert flow.read() == b"back"


def test_a_plain_raw_flow_adds_nothing(opened: list[Any]) -> None:
    flow, peer = open_flow(qos.raw)
    opened.append((flow, peer))
    flow.write(b"as is")
    assert peer.recv(MTU) == b"as is"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["crc", "sealed"])
def test_fevent_reports_no_packet_that_does_not_check_out_and_a_read_after_it_never_waits(
    opened: list[Any], kind: str
) -> None:
    """A raw flow with CRCs, or sealed without FRCT, checks its packets in the reader's thread: a
    corrupt or forged one was a FLOW_PKT, and the blocking read that followed it (an event loop
    serving many flows) waited there for the next good packet from that peer, the loop with it."""
    if kind == "crc":
        flow, peer = open_flow(qos.raw_no_errors)
        good, bad = (lambda sdu: with_crc(sdu)), b"forged" + bytes(4)
    else:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        key = os.urandom(32)
        reply = m.FlowReply(1, "test", MTU, qos.raw, "peer", cipher=AES_256_GCM, key=key, seq_iv=True)
        flow = establish(reply, ours.detach(), cast(IrmClient, NoIrmd()), client=True)
        sealer = PacketCrypto(AES_256_GCM, key, server=True, seq_iv=True)
        good, bad = sealer.seal, os.urandom(60)
    opened.append((flow, peer))
    fset, fq = FlowSet(), EventQueue()
    fset.add(flow)
    try:
        peer.send(bad)
        assert fevent(fset, fq, 0.3) == 0  # nothing to read: no event
        peer.send(bad)
        peer.send(b"")  # a keepalive among them
        peer.send(good(b"hello"))
        assert fevent(fset, fq, 5.0) == 1 and fq.next() == Event(flow, EventType.PKT)
        # Not read yet: reported again, as a socket holding an SDU is (fevent checked it, so holds it).
        assert fevent(fset, fq, 0.3) == 1 and fq.next() == Event(flow, EventType.PKT)
        started = time.monotonic()
        assert flow.read() == b"hello"  # blocking, as an event loop reads
        assert time.monotonic() - started < 1.0
        peer.send(bad)
        assert fevent(fset, fq, 0.3) == 0
    finally:
        fset.close()
