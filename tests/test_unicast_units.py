"""The unicast IPCP's wire formats, sans-IO: the PDU header (PCI) and the management codec,
round trips, bounds and fuzzing; bytes in, dataclasses out, no process, socket or sleep.
(Routing, directory, handshakes and the flow allocator have their own test modules.)"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib.qos import data
from ipcp.unicast import messages as um
from ipcp.unicast.pci import MGMT_EID, Pci, PciError, PciFormat
from transports.wire import HEADER, MAGIC, VERSION, Message, WireError

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = [1, 2, 4, 8]

# -- PCI -------------------------------------------------------------------------


@pytest.mark.parametrize("addr_size", SIZES)
@pytest.mark.parametrize("eid_size", SIZES)
def test_pci_round_trips_extreme_values_for_every_field_size(addr_size: int, eid_size: int) -> None:
    fmt = PciFormat(addr_size, eid_size)
    assert fmt.size == addr_size + 3 + eid_size
    assert fmt.max_addr == 2 ** (8 * addr_size) - 1 and fmt.max_eid == 2 ** (8 * eid_size) - 1
    for pci in (Pci(0, 0, 0, 0, 0), Pci(fmt.max_addr, 255, 255, 255, fmt.max_eid), Pci(1, 2, 60, 1, MGMT_EID)):
        raw = fmt.pack(pci)
        assert len(raw) == fmt.size
        assert fmt.unpack(raw) == pci
        assert fmt.unpack(raw + b"payload") == pci  # the SDU follows the header
        assert fmt.unpack(memoryview(bytearray(raw))) == pci


def test_pci_default_layout_is_big_endian_dst_qos_ttl_ecn_eid() -> None:
    fmt = PciFormat()
    raw = fmt.pack(Pci(0x01020304, 5, 6, 7, 0x08090A0B0C0D0E0F))
    assert raw == bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    assert raw[fmt.ttl_offset] == 6 and raw[fmt.ecn_offset] == 7


@pytest.mark.parametrize("addr_size", SIZES)
@pytest.mark.parametrize("eid_size", SIZES)
def test_pci_truncated_pdus_raise_pci_error(addr_size: int, eid_size: int) -> None:
    fmt = PciFormat(addr_size, eid_size)
    raw = fmt.pack(Pci(1, 1, 1, 1, 1))
    for n in range(fmt.size):
        with pytest.raises(PciError, match="shorter than"):
            fmt.unpack(raw[:n])


@pytest.mark.parametrize("addr_size, eid_size", [(3, 8), (4, 0), (0, 4), (16, 8), (4, 5)])
def test_pci_rejects_unsupported_field_sizes(addr_size: int, eid_size: int) -> None:
    with pytest.raises(ValueError, match="sizes must be one of"):
        PciFormat(addr_size, eid_size)


@FUZZ
@given(st.sampled_from(SIZES), st.sampled_from(SIZES), st.binary(max_size=40))
def test_fuzz_pci_unpack_raises_only_pci_error(addr_size: int, eid_size: int, blob: bytes) -> None:
    fmt = PciFormat(addr_size, eid_size)
    try:
        pci = fmt.unpack(blob)
    except PciError:
        assert len(blob) < fmt.size
        return
    assert 0 <= pci.dst <= fmt.max_addr and 0 <= pci.eid <= fmt.max_eid
    assert fmt.pack(pci) == blob[: fmt.size]


@FUZZ
@given(st.sampled_from(SIZES), st.sampled_from(SIZES), st.data())
def test_fuzz_pci_pack_unpack_round_trip(addr_size: int, eid_size: int, d: st.DataObject) -> None:
    fmt = PciFormat(addr_size, eid_size)
    byte = st.integers(0, 255)
    pci = Pci(
        d.draw(st.integers(0, fmt.max_addr)),
        d.draw(byte),
        d.draw(byte),
        d.draw(byte),
        d.draw(st.integers(0, fmt.max_eid)),
    )
    assert fmt.unpack(fmt.pack(pci)) == pci


# -- management messages ------------------------------------------------------------

SAMPLES: list[Message] = [
    um.Hello(um.MGMT, "n1", "net", 7, b"\x01" * 32, b"\x05" * 32, b"\x06" * 32),
    um.Hello(um.ENROLL, "n2"),
    um.Proof(b"\xaa" * 32),
    um.Refuse(um.E_AUTH, "the layer needs a key"),
    um.EnrollInfo("net", {"addr": "4", "routing": "lfa"}, [1, 2, 3]),
    um.EnrollInfo("net", {}, [], um.E_REFUSED, "no", "n1"),
    um.Lsu(5, 9, [1, 2, 3], "n5", 1.5, b"\x07" * 32, b"\x08" * 64),
    um.FaReq(1, 99, b"\x03" * 32, data, b"oap request"),
    um.FaReply(2, 5, 99, um.OK, b"oap response"),
    um.FaDealloc(2, 5, 99),
    um.FlowUpdate(2, 5, 40, 1.5e6),
    um.DhtStore(1, b"\x04" * 32, 1, 86400.0, 7, b"\x07" * 32, b"\x08" * 64),
    um.DhtFind(1, b"\x04" * 32, 12345),
    um.DhtFound(2, b"\x04" * 32, 12345, [um.DhtStore(1, b"\x04" * 32, 1, 5.0, 7, b"\x07" * 32, b"\x08" * 64)]),
    um.Echo(4),
]


def frame(code: int, body: bytes, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, code, 0, len(body)) + body


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_management_message_round_trips(msg: Message) -> None:
    assert um.CODEC.decode(um.CODEC.encode(msg)).msg == msg


def test_every_registered_management_type_is_sampled() -> None:
    assert {type(msg) for msg in SAMPLES} >= set(um.CODEC.types.values()) - {um.CODEC.types[1]}


@pytest.mark.parametrize("body, match", [
    (b'{"src":1,"seqno":2}', "missing field 'neighbours'"),
    (b'{"src":1,"seqno":2,"neighbours":[],"x":1}', "unknown fields"),
    (b'{"src":"1","seqno":2,"neighbours":[]}', "expected int"),
    (b'{"src":true,"seqno":2,"neighbours":[]}', "expected int"),
    (b'{"src":1,"seqno":2,"neighbours":[1.5]}', "expected int"),
    (b'{"src":1,"seqno":2,"neighbours":{}}', "expected a list"),
    (b'[1,2]', "not an object"),
    (b'{"src":1,', "not JSON"),
    (b'\xff\xfe', "not JSON"),
])  # fmt: skip
def test_malformed_lsu_bodies_raise_wire_error_naming_the_problem(body: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        um.CODEC.decode(frame(um.Lsu.TYPE, body))


def test_bad_headers_raise_wire_error() -> None:
    good = um.CODEC.encode(um.Echo(1))
    for bad, match in [
        (good[:5], "truncated"),
        (b"XX" + good[2:], "magic"),
        (good + b" ", "body length"),
        (frame(um.Echo.TYPE, b'{"src":1}', version=9), "version"),
        (frame(9999, b"{}"), "unknown message type"),
    ]:
        with pytest.raises(WireError, match=match):
            um.CODEC.decode(bad)


def test_bad_hex_and_bad_qos_raise_wire_error() -> None:
    with pytest.raises(WireError, match="hex"):
        um.CODEC.decode(frame(um.Proof.TYPE, b'{"mac":"zz"}'))
    for qos in (b'{"delay":-1}', b'{"delay":1.5}', b'{"nope":1}', b"[]"):
        with pytest.raises(WireError):
            um.CODEC.decode(frame(um.FaReq.TYPE, b'{"src":1,"s_eid":1,"hash":"00","qos":' + qos + b"}"))


def test_integer_of_5000_digits_raises_wire_error() -> None:
    body = b'{"src":' + b"1" * 5000 + b',"seqno":1,"neighbours":[]}'
    with pytest.raises(WireError):
        um.CODEC.decode(frame(um.Lsu.TYPE, body))


def test_integer_beyond_float_range_in_a_float_field_raises_wire_error() -> None:
    body = b'{"src":1,"key":"00","addr":1,"ttl":' + b"9" * 400 + b"}"
    with pytest.raises(WireError):
        um.CODEC.decode(frame(um.DhtStore.TYPE, body))


# JSON values of every shape; integers bounded (the explicit tests above cover huge ones).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def fields_of(cls: type) -> list[str]:
    return list(cls.__dataclass_fields__)  # type: ignore[attr-defined]


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """A valid header for a known type and a JSON object whose keys are mostly its fields."""
    cls = draw(st.sampled_from(list(um.CODEC.types.values())))
    names = [*fields_of(cls), "bogus"]
    body = draw(st.dictionaries(st.sampled_from(names), JSON | st.just("00ff"), max_size=len(names)))
    return frame(cls.TYPE, json.dumps(body).encode())


def decode_only_wire_error(blob: bytes) -> None:
    try:
        msg = um.CODEC.decode(blob).msg
    except WireError:
        return
    assert um.CODEC.decode(um.CODEC.encode(msg)).msg == msg  # what decodes, re-encodes to itself


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_codec_decode_arbitrary_bytes_raises_only_wire_error(blob: bytes) -> None:
    decode_only_wire_error(blob)


@FUZZ
@given(st.sampled_from(list(um.CODEC.types.values())).map(lambda cls: cls.TYPE), st.binary(max_size=200))
def test_fuzz_codec_decode_valid_header_arbitrary_body_raises_only_wire_error(code: int, body: bytes) -> None:
    decode_only_wire_error(frame(code, body))


@FUZZ
@given(plausible_frames())
def test_fuzz_codec_decode_plausible_json_raises_only_wire_error(blob: bytes) -> None:
    decode_only_wire_error(blob)


@FUZZ
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_codec_decode_mutated_messages_raises_only_wire_error(msg: Message, d: st.DataObject) -> None:
    raw = bytearray(um.CODEC.encode(msg))
    for _ in range(d.draw(st.integers(1, 6))):
        op = d.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = d.draw(st.integers(0, len(raw)))
        if op == "flip" and at < len(raw):
            raw[at] ^= 1 << d.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[at : at + d.draw(st.integers(1, 8))]
        else:
            raw[at:at] = d.draw(st.binary(min_size=1, max_size=8))
    decode_only_wire_error(bytes(raw))
    # and with the header's length fixed up, so the body parser sees the mutation
    if len(raw) >= HEADER.size:
        decode_only_wire_error(
            bytes(raw[: HEADER.size - 4]) + (len(raw) - HEADER.size).to_bytes(4, "big") + bytes(raw[HEADER.size :])
        )
