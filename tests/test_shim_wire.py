"""The shims' wire against real Ouroboros 0.23 traffic: the captures in tests/captures/ (their
packet numbers are those of the annotated decodes, INTEROP-0.23.md appendix A) parsed, re-encoded
byte for byte, and fed to a ShimCore, which must take C's requests and replies as the C IPCP does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowlib import qos
from ipcp.shim import AllocDone, FlowRequested, ShimCore
from ipcp.shim_wire import ETH_DIX, UDP, Kind, Layout, Mgmt, offer_of, response_code
from proto.qos import QosSpec
from transports import eth, udp

CAPTURES = Path(__file__).parent / "captures"

QOS_RAW = QosSpec(0xFFFFFFFF, 0, 0, 1, 1, 0, 0xFFFFFFFF, 120000)  # C's qos_raw, as captured
QOS_DATA = QosSpec(1000, 0, 0, 0, 1, 1, 2000, 120000)  # C's qos_data: ber sent as 1 (QOS_DISABLE_CRC)


@dataclasses.dataclass(frozen=True)
class Packet:
    n: int  # as numbered in the annotated decodes
    src: object  # (ip, port) or a MAC
    dst: object
    eid: int
    payload: bytes


def udp_packets(name: str) -> Iterator[Packet]:
    from scapy.layers.inet import IP
    from scapy.layers.inet import UDP as ScapyUdp
    from scapy.utils import rdpcap

    for n, pkt in enumerate(rdpcap(str(CAPTURES / name)), 1):
        if ScapyUdp in pkt and pkt[ScapyUdp].dport == 3435:
            data = bytes(pkt[ScapyUdp].payload)
            parsed = udp.UdpFraming.parse(data, (pkt[IP].src, pkt[ScapyUdp].sport))
            assert parsed is not None
            yield Packet(n, parsed[2], (pkt[IP].dst, pkt[ScapyUdp].dport), parsed[0], bytes(parsed[1]))


def eth_packets(name: str) -> Iterator[Packet]:
    from scapy.utils import rdpcap

    for n, pkt in enumerate(rdpcap(str(CAPTURES / name)), 1):
        frame = bytes(pkt)
        if frame[12:14] == b"\xa0\x00":
            parsed = eth.EthFraming(frame[:6]).parse(frame, None)
            assert parsed is not None
            yield Packet(n, parsed[2], frame[:6], parsed[0], bytes(parsed[1]))


def mgmt(packets: Iterator[Packet], layout: Layout) -> dict[int, tuple[Packet, Kind, Mgmt]]:
    return {p.n: (p, *layout.decode(p.payload)) for p in packets if p.eid == 0}


def reencoded(layout: Layout, kind: Kind, msg: Mgmt) -> bytes:
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg) if f.name not in ("code", "body")}
    return layout.encode(kind, msg.body, **fields)


ALL_UDP = [
    "udp4-oping.pcap",
    "udp4-keepalive-dealloc.pcap",
    "udp4-python-probe.pcap",
    "udp4-crc-probe.pcap",
    "udp4-inst2-client.pcap",
]
ALL_ETH = [
    "ethdix-oping.pcap",
    "ethdix-keepalive-dealloc.pcap",
    "ethdix-python-client.pcap",
    "ethdix-python-responder.pcap",
]


@pytest.mark.parametrize("name", ALL_UDP)
def test_every_captured_udp4_management_message_parses_and_encodes_back_to_its_bytes(name: str) -> None:
    found = mgmt(udp_packets(name), UDP)
    assert found, "no management messages in the capture"
    for p, kind, msg in found.values():
        assert kind in (Kind.FLOW_REQ, Kind.FLOW_REPLY), f"#{p.n}"
        assert reencoded(UDP, kind, msg) == p.payload, f"#{p.n}"
        assert offer_of(msg, reply=kind is Kind.FLOW_REPLY) is None, f"#{p.n}: C offered an extension?"


@pytest.mark.parametrize("name", ALL_ETH)
def test_every_captured_eth_dix_management_message_parses_and_encodes_back_to_its_bytes(name: str) -> None:
    found = mgmt(eth_packets(name), ETH_DIX)
    assert found
    for p, kind, msg in found.values():
        assert reencoded(ETH_DIX, kind, msg) == p.payload, f"#{p.n}"


def test_udp4_oping_the_request_and_reply_read_as_the_annotations_say() -> None:
    found = mgmt(udp_packets("udp4-oping.pcap"), UDP)
    p3, kind, req = found[3]
    assert kind is Kind.FLOW_REQ and len(p3.payload) + 4 == 99
    assert req.s_eid == 64 and req.qos() == QOS_RAW
    digest, oap = req.body[:16], req.body[16:]
    assert digest == hashlib.md5(b"pingsrv").digest() and len(oap) == 36
    _, kind, reply = found[4]
    assert kind is Kind.FLOW_REPLY and UDP.reply_eids(reply) == (64, 64) and reply.response == 0
    assert len(reply.body) == 84 and reply.body[:16] == oap[:16]
    assert reply.body[-48:] == hashlib.sha384(oap).digest()
    _, _, req11 = found[11]
    assert req11.qos() == QOS_DATA
    assert UDP.reply_eids(found[12][2]) == (64, 65)  # s_eid the requester's, d_eid the responder's


def test_udp4_refusals_carry_ouroboros_errnos_and_no_oap() -> None:
    found = mgmt(udp_packets("udp4-python-probe.pcap"), UDP)
    for n in (20, 22, 24, 26, 28):
        p, kind, reply = found[n]
        assert kind is Kind.FLOW_REPLY and reply.body == b"" and len(p.payload) + 4 == 47
        assert reply.response == -1009 and response_code(reply.response) == "EAUTH"


def test_ethdix_query_reply_request_and_reply_read_as_the_annotations_say() -> None:
    found = mgmt(eth_packets("ethdix-oping.pcap"), ETH_DIX)
    digest = hashlib.sha3_256(b"pingeth").digest()
    p1, kind, query = found[1]
    assert kind is Kind.NAME_QUERY and query.body == digest and p1.dst == eth.BROADCAST
    assert found[2][1] is Kind.NAME_REPLY and found[2][2].body == digest
    _, kind, req = found[3]
    assert kind is Kind.FLOW_REQ and req.s_eid == 64 and req.qos() == QOS_RAW and len(req.body) == 32 + 36
    _, kind, reply = found[4]
    assert kind is Kind.FLOW_REPLY and ETH_DIX.reply_eids(reply) == (64, 64) and len(reply.body) == 84
    ka = mgmt(eth_packets("ethdix-keepalive-dealloc.pcap"), ETH_DIX)
    assert ETH_DIX.reply_eids(ka[4][2]) == (65, 64)  # seid 64 the responder's, deid 65 the requester's


def test_captured_keepalives_and_frct_data_are_empty_and_non_empty_sdus_on_the_flows_eids() -> None:
    """udp4 ka #7: a 4-byte datagram (the eid alone); eth ka #9: an 18-byte frame of length 0."""
    ka = {p.n: p for p in udp_packets("udp4-keepalive-dealloc.pcap")}
    assert ka[7].eid == 64 and ka[7].payload == b""
    eth_ka = {p.n: p for p in eth_packets("ethdix-keepalive-dealloc.pcap")}
    assert eth_ka[9].eid == 0x41 and eth_ka[9].payload == b""
    oping = {p.n: p for p in udp_packets("udp4-oping.pcap")}
    assert oping[13].eid == 65 and oping[13].payload[:4] == bytes.fromhex("03000000")  # FRCT DATA|DRF


def _core(layout: Layout, own: object, hash_len: int) -> ShimCore:
    if layout is UDP:
        return ShimCore(
            UDP, hash_len=hash_len, own=own, discovery=True, encode_addr=udp.encode_addr, decode_addrs=udp.decode_addrs
        )
    return ShimCore(layout, hash_len=hash_len, own=own, discovery=False)


@pytest.mark.parametrize(("name", "layout", "hash_len", "req_n", "reply_n"), [
    ("udp4-oping.pcap", UDP, 16, 3, 4), ("udp4-oping.pcap", UDP, 16, 11, 12),
    ("ethdix-oping.pcap", ETH_DIX, 32, 3, 4), ("ethdix-keepalive-dealloc.pcap", ETH_DIX, 32, 3, 4),
])  # fmt: skip
def test_a_core_takes_c_s_requests_and_replies(
    name: str, layout: Layout, hash_len: int, req_n: int, reply_n: int
) -> None:
    packets = mgmt((udp_packets if layout is UDP else eth_packets)(name), layout)
    p, _, req = packets[req_n]
    digest, oap = req.body[:hash_len], req.body[hash_len:]
    responder = _core(layout, p.dst, hash_len)  # as the C responder was
    responder.register(digest, True)
    responder.receive(p.payload, p.src, 1000.0)
    ev = responder.next_event()
    assert isinstance(ev, FlowRequested) and ev.offer is None
    assert (ev.addr, ev.remote_eid, ev.digest, ev.data) == (p.src, req.s_eid, digest, oap)
    assert ev.qos == req.qos()
    requester = _core(layout, p.src, hash_len)  # as the C requester was, up to its eid
    flow = requester.alloc(digest, ev.qos, p.dst, 1000.0, 5.0, oap)
    q, _, reply = packets[reply_n]
    req_eid, resp_eid = layout.reply_eids(reply)
    requester.flows[req_eid] = requester.flows.pop(flow.eid)
    requester._allocs[req_eid] = requester._allocs.pop(flow.eid)
    requester.flows[req_eid].eid = req_eid
    requester.receive(q.payload, q.src, 1000.0)
    assert requester.next_event() == AllocDone(req_eid, 0, reply.body, None)
    assert requester.flows[req_eid].remote_eid == resp_eid and not requester.flows[req_eid].ours


def test_qos_data_as_we_send_it_reads_in_c_s_field_order() -> None:
    """Our eth FLOW_REQ of qos data puts loss first, then bandwidth (eth.c's mgmt_msg)."""
    a = _core(ETH_DIX, b"\x02" * 6, 32)
    a.alloc(bytes(32), qos.data, b"\x04" * 6, 0.0, 1.0)
    ((_, frame),) = a.datagrams_to_send()
    assert frame[4:8] == (0).to_bytes(4, "big") and frame[24:28] == (1000).to_bytes(4, "big")  # loss, delay
