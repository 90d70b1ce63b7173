"""The eth shims' frame formats without sockets: fuzzed parsers, and scapy agreeing with struct.

EthFraming/LlcFraming parse whatever arrives; the scapy layer and the struct layout must be one format.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from transports import eth

OWN = bytes.fromhex("02000000aa01")
PEER = bytes.fromhex("02000000bb02")
macs = st.binary(min_size=6, max_size=6)
payloads = st.binary(max_size=1600)
DIX = eth.EthFraming(OWN, eth.DEFAULT_ETHERTYPE)
LLC = eth.LlcFraming(OWN)


class Captured:
    """Stands in for the AF_PACKET socket: keeps what a framing sends."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def sendmsg(self, buffers: Any) -> int:
        self.frames.append(b"".join(bytes(b) for b in buffers))
        return len(self.frames[-1])

    def send(self, data: bytes) -> int:
        self.frames.append(bytes(data))
        return len(data)


class FakeFlow:
    def __init__(self, hdr: bytes) -> None:
        self.hdr = hdr


def sent(framing: eth.EthFraming | eth.LlcFraming, hdr: bytes, sdu: bytes) -> bytes:
    sock = Captured()
    framing.send(sock, FakeFlow(hdr), sdu)  # type: ignore[arg-type]
    return sock.frames[0]


def check_parsed(got: object, frame: bytes, eid_max: int) -> None:
    """None, or (eid, payload view, 6-byte source MAC) that lies inside the frame."""
    if got is None:
        return
    assert isinstance(got, tuple) and len(got) == 3
    eid, sdu, peer = got
    assert isinstance(eid, int) and 0 <= eid <= eid_max
    assert isinstance(sdu, memoryview) and bytes(sdu) in frame
    assert peer == frame[6:12]


# -- the parsers never raise ------------------------------------------------------


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_dix_parse_of_any_bytes_is_none_or_a_valid_tuple(frame: bytes) -> None:
    check_parsed(DIX.parse(frame, ("veth0", 0xA000, 0, 1, PEER)), frame, 0xFFFF)


@settings(max_examples=2000)
@given(st.binary(max_size=200))
def test_llc_parse_of_any_bytes_is_none_or_a_valid_tuple(frame: bytes) -> None:
    check_parsed(LLC.parse(frame, None), frame, eth.MAX_SAPS - 1)
    got = LLC.parse(frame, None)
    assert got is None or got[0] == 0 or got[0] >= 2  # SAP 1 is management, eid 0


@settings(max_examples=1000)
@given(st.sampled_from([OWN, eth.BROADCAST]), macs, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
       st.binary(max_size=300))  # fmt: skip
def test_dix_parse_of_frames_with_our_header_and_any_length_never_raises(
    dst: bytes, src: bytes, eid: int, length: int, rest: bytes
) -> None:
    frame = eth.DIX.pack(dst, src, eth.DEFAULT_ETHERTYPE, eid, length) + rest
    got = DIX.parse(frame, None)
    if length <= len(rest) and eth.unicast_peer(src, OWN):
        assert got is not None and got[0] == eid and bytes(got[1]) == rest[:length]
    else:
        assert got is None  # truncated: never read past the end


@settings(max_examples=1000)
@given(st.sampled_from([OWN, eth.BROADCAST]), macs, st.integers(0, 0xFFFF), st.integers(0, 255),
       st.integers(0, 255), st.integers(0, 255), st.binary(max_size=300))  # fmt: skip
def test_llc_parse_of_frames_with_any_header_fields_never_raises(
    dst: bytes, src: bytes, length: int, dsap: int, ssap: int, ctrl: int, rest: bytes
) -> None:
    frame = eth.LLC.pack(dst, src, length, dsap, ssap, ctrl) + rest
    got = LLC.parse(frame, None)
    check_parsed(got, frame, eth.MAX_SAPS - 1)
    if got is not None:
        plain = eth.WIRE_SAP[dsap]
        assert ctrl == eth.LLC_UI and got[0] == (0 if plain == eth.MGMT_SAP else plain)
        assert bytes(got[1]) == rest[: length - eth.LLC_EXTRA]


# -- what the parsers accept ----------------------------------------------------


@given(st.integers(0, 0xFFFF), payloads, st.binary(max_size=46))
def test_dix_frames_sent_parse_back_even_with_ethernet_padding(eid: int, sdu: bytes, pad: bytes) -> None:
    frame = sent(DIX, eth.EthFraming(PEER).header(OWN, eid), sdu)
    got = DIX.parse(frame + pad, None)
    assert got is not None
    assert (got[0], bytes(got[1]), got[2]) == (eid, sdu, PEER)


@given(st.integers(2, eth.MAX_SAPS - 1), st.integers(2, eth.MAX_SAPS - 1),
       st.binary(max_size=1497), st.binary(max_size=46))  # fmt: skip
def test_llc_frames_sent_parse_back_even_with_ethernet_padding(local: int, remote: int, sdu: bytes, pad: bytes) -> None:
    frame = sent(LLC, eth.LlcFraming(PEER).header(OWN, local, remote), sdu)
    got = LLC.parse(frame + pad, None)
    assert got is not None
    assert (got[0], bytes(got[1]), got[2]) == (remote, sdu, PEER)


def test_frames_for_other_hosts_other_ethertypes_or_multicast_are_dropped() -> None:
    other = bytes.fromhex("02000000cc03")
    assert DIX.parse(sent(DIX, eth.EthFraming(PEER).header(other, 5), b"x"), None) is None
    assert DIX.parse(sent(DIX, eth.EthFraming(PEER, 0xA001).header(OWN, 5), b"x"), None) is None
    multicast = bytes.fromhex("01005e000001")
    assert DIX.parse(sent(DIX, eth.EthFraming(PEER).header(multicast, 5), b"x"), None) is None
    assert LLC.parse(sent(LLC, eth.LlcFraming(PEER).header(other, 2, 3), b"x"), None) is None


def test_frames_from_a_group_zero_or_our_own_source_address_are_dropped() -> None:
    """A flow to a broadcast or multicast source would answer every host on the link."""
    for src in (eth.BROADCAST, bytes.fromhex("01005e000001"), bytes(6), OWN):
        assert DIX.parse(sent(DIX, eth.EthFraming(src).header(OWN, 0), b"x"), None) is None
        assert LLC.parse(sent(LLC, eth.LlcFraming(src).header(OWN, 2, 3), b"x"), None) is None
    assert DIX.parse(sent(DIX, eth.EthFraming(PEER).header(OWN, 0), b"x"), None) is not None
    on_lo = eth.EthFraming(eth.ZERO_MAC)  # a loopback interface: every end is all zeros
    assert on_lo.parse(sent(on_lo, eth.EthFraming(eth.ZERO_MAC).header(eth.ZERO_MAC, 0), b"x"), None) is not None
    assert on_lo.parse(sent(on_lo, eth.EthFraming(eth.BROADCAST).header(eth.ZERO_MAC, 0), b"x"), None) is None


def test_the_llc_saps_are_ouroboros_s_individual_and_bit_reversed_on_the_wire() -> None:
    assert eth.MGMT_WIRE_SAP == 0x80  # 0x01 bit-reversed, as Ouroboros writes it
    assert len(set(eth.WIRE_SAP)) == 256 and all(eth.WIRE_SAP[eth.WIRE_SAP[b]] == b for b in range(256))
    assert all(eth.WIRE_SAP[sap] & 1 == 0 for sap in range(2, eth.MAX_SAPS))  # I/G bit clear: individual
    # A 0.23 data frame from SAP 2 to SAP 3 (eth.c: dsap = reverse_bits(r_sap), ssap = reverse_bits(sap)):
    frame = PEER[::-1] + PEER + b"\x00\x04" + bytes((0xC0, 0x40, 0x03)) + b"x"
    got = eth.LlcFraming(PEER[::-1]).parse(frame, None)
    assert got is not None and got[0] == 3 and bytes(got[1]) == b"x"


def test_header_sizes_are_ouroboros_s() -> None:
    assert eth.DIX.size == 18 and eth.DIX_EXTRA == 4  # the layer MTU is the interface's - 4
    assert eth.LLC.size == 17 and eth.LLC_EXTRA == 3


# -- scapy and struct: one format -----------------------------------------------


@settings(max_examples=300)
@given(macs, macs, st.integers(0x0600, 0xFFFE), st.integers(0, 0xFFFF), payloads)
def test_the_scapy_layer_builds_what_struct_packs(dst: bytes, src: bytes, etype: int, eid: int, sdu: bytes) -> None:
    layer = eth.dix_layer()
    built = bytes(layer(dst=eth.mac_str(dst), src=eth.mac_str(src), type=etype, eid=eid) / sdu)
    assert built == sent(DIX, eth.EthFraming(src, etype).header(dst, eid), sdu)
    assert built == eth.DIX.pack(dst, src, etype, eid, len(sdu)) + sdu


@settings(max_examples=300)
@given(st.integers(0, 0xFFFF), payloads, st.binary(max_size=46))
def test_scapy_dissects_what_the_data_path_sends(eid: int, sdu: bytes, pad: bytes) -> None:
    frame = sent(DIX, eth.EthFraming(PEER).header(OWN, eid), sdu)
    pkt = eth.dix_layer()(frame + pad)
    assert (pkt.dst, pkt.src) == (eth.mac_str(OWN), eth.mac_str(PEER))
    assert (pkt.type, pkt.eid, pkt.len) == (eth.DEFAULT_ETHERTYPE, eid, len(sdu))
    assert bytes(pkt.payload)[: len(sdu)] == sdu


@settings(max_examples=200)
@given(st.integers(2, eth.MAX_SAPS - 1), st.integers(2, eth.MAX_SAPS - 1), st.binary(max_size=1497))
def test_scapy_dissects_llc_frames_the_data_path_sends(local: int, remote: int, sdu: bytes) -> None:
    from scapy.layers.l2 import LLC as ScapyLlc
    from scapy.layers.l2 import Dot3

    pkt = Dot3(sent(LLC, eth.LlcFraming(PEER).header(OWN, local, remote), sdu))
    assert pkt.len == 3 + len(sdu)
    llc = pkt[ScapyLlc]
    assert (llc.dsap, llc.ssap, llc.ctrl) == (eth.WIRE_SAP[remote], eth.WIRE_SAP[local], eth.LLC_UI)


@given(st.sampled_from([OWN, eth.BROADCAST]), st.binary(min_size=1, max_size=300))
def test_management_frames_built_with_scapy_parse_on_endpoint_0(dst: bytes, body: bytes) -> None:
    for sender, receiver in ((eth.EthFraming(PEER), DIX), (eth.LlcFraming(PEER), LLC)):
        got = receiver.parse(sender.mgmt_frame(dst, body), None)
        assert got is not None and (got[0], bytes(got[1]), got[2]) == (0, body, PEER)


def test_importing_the_eth_ipcp_or_the_tools_does_not_import_scapy() -> None:
    code = (
        "import sys, ipcp.eth, transports.eth, irmd.daemon, irmd.cli, flowlib; "
        "print(sorted(m for m in sys.modules if m.startswith('scapy')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
