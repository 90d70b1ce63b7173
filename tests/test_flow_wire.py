"""What a flow puts on the IPCP's socket and takes from it, without an IRMd: one end of a SOCK_SEQPACKET
pair is the flow's IPCP side, the test plays the peer on the other. C's order in every packet:
FRCT PCI, payload, (encryption,) CRC32 trailer; keepalives are empty records; C's bare FRCT control
packets come without a CRC.
"""

from __future__ import annotations

import socket
import time
import zlib
from collections.abc import Iterator
from typing import Any, cast

import pytest

from flowlib import FlowTimeout, qos
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
