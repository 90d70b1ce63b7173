"""The control-message codecs without sockets: proto.messages.CODEC (MessagePack, the IRMd's control
protocol) and transports.wire.Codec (JSON, the unicast layer's messages between hosts)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import types
import typing
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib import qos
from flowlib.qos import UINT64_MAX, QosSpec
from proto import messages as m
from proto.messages import CODEC
from transports.wire import HEADER, MAGIC, MAX_BODY, PACKED_VERSION, VERSION, Codec, Error, Frame, WireError

MESSAGE_TYPES = sorted(CODEC.types.values(), key=lambda cls: cls.TYPE)
JSON_CODEC = Codec()  # the same messages with JSON bodies, as the unicast layer's codec frames its own
for _cls in MESSAGE_TYPES:
    if _cls is not Error:
        JSON_CODEC.register(_cls)


def frame(
    code: int,
    body: bytes | str,
    req_id: int = 7,
    *,
    magic: bytes = MAGIC,
    version: int = PACKED_VERSION,
    length: int | None = None,
) -> bytes:
    if isinstance(body, str):
        body = body.encode()
    return HEADER.pack(magic, version, code, req_id, len(body) if length is None else length) + body


def packed_frame(cls: type[m.Message], body: Any, req_id: int = 7) -> bytes:
    return frame(cls.TYPE, msgspec.msgpack.encode(body), req_id)


def json_frame(cls: type[m.Message], body: Any, req_id: int = 7) -> bytes:
    return frame(cls.TYPE, json.dumps(body), req_id, version=VERSION)


# -- sample values for every field type -----------------------------------------


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def sample(hint: Any) -> Any:
    """One fixed, non-default value of a field type."""
    if _is_optional(hint):
        return sample(next(a for a in typing.get_args(hint) if a is not type(None)))
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return [sample(item), sample(item)]
    if origin is dict:
        return {"key": sample(typing.get_args(hint)[1])}
    if dataclasses.is_dataclass(hint) and hint is not QosSpec:  # a nested record (IpcpInfo's sections)
        return sample_message(hint)  # type: ignore[arg-type]
    return {str: "wörd-1", int: 4242, bool: True, float: 2.5, bytes: b"\x00\x01\xfe\xff", QosSpec: qos.video}[hint]


def sample_message(cls: type[m.Message]) -> m.Message:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: sample(hints[f.name]) for f in dataclasses.fields(cls)})  # type: ignore[call-overload]


def strategy(hint: Any) -> st.SearchStrategy[Any]:
    """Hypothesis values of a field type (within what JSON carries exactly)."""
    if _is_optional(hint):
        return st.none() | strategy(next(a for a in typing.get_args(hint) if a is not type(None)))
    origin = typing.get_origin(hint)
    if origin is list:
        return st.lists(strategy(typing.get_args(hint)[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), strategy(typing.get_args(hint)[1]), max_size=4)
    if dataclasses.is_dataclass(hint) and hint is not QosSpec:  # a nested record (IpcpInfo's sections)
        return message_strategy(hint)  # type: ignore[arg-type]
    if hint is QosSpec:
        u64 = st.integers(0, UINT64_MAX)
        return st.builds(
            QosSpec,
            delay=u64,
            bandwidth=u64,
            availability=u64,
            loss=u64,
            ber=u64,
            in_order=u64,
            max_gap=u64,
            timeout=u64,
        )
    return {
        str: st.text(max_size=40),
        int: st.integers(-(2**63), 2**64 - 1),
        bool: st.booleans(),
        float: st.floats(allow_nan=False, allow_infinity=False),
        bytes: st.binary(max_size=64),
    }[hint]


# Fields a message bounds more narrowly than their type (a gid, a bounded list of them).
FIELD_STRATEGIES: dict[tuple[type[m.Message], str], st.SearchStrategy[Any]] = {
    (m.FlowReply, "peer_gid"): st.integers(-1, m.GID_MAX),
    (m.FlowReply, "peer_groups"): st.none() | st.lists(st.integers(0, m.GID_MAX), max_size=4),
}


def message_strategy(cls: type[m.Message]) -> st.SearchStrategy[m.Message]:
    hints = typing.get_type_hints(cls)
    return st.builds(
        cls,
        **{f.name: FIELD_STRATEGIES.get((cls, f.name), strategy(hints[f.name])) for f in dataclasses.fields(cls)},
    )


# -- round trips ----------------------------------------------------------------


def test_codec_knows_error_and_every_message_of_the_protocol() -> None:
    assert CODEC.types[Error.TYPE] is Error
    assert {m.FlowAlloc, m.FlowReply, m.IpcpBootstrap, m.FlowReqArrived, m.FlowPeerDealloc} <= set(MESSAGE_TYPES)
    assert len({cls.TYPE for cls in MESSAGE_TYPES}) == len(MESSAGE_TYPES)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_message_type_round_trips_with_all_fields_set(cls: type[m.Message]) -> None:
    msg = sample_message(cls)
    assert CODEC.decode(CODEC.encode(msg, 0xDEADBEEF)) == Frame(0xDEADBEEF, msg)


@pytest.mark.parametrize(
    "cls",
    [
        c
        for c in MESSAGE_TYPES
        if all(
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            for f in dataclasses.fields(c)
        )
    ],
    ids=lambda c: c.__name__,
)
def test_message_with_only_defaults_round_trips(cls: type[m.Message]) -> None:
    msg = cls()
    assert CODEC.decode(CODEC.encode(msg)) == Frame(0, msg)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_generated_messages_round_trip(cls: type[m.Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    req_id = data.draw(st.integers(0, 0xFFFFFFFF))
    assert CODEC.decode(CODEC.encode(msg, req_id)) == Frame(req_id, msg)


def test_omitted_optional_fields_take_their_defaults() -> None:
    got = CODEC.decode(packed_frame(m.FlowAlloc, {"name": "pong", "qos": {}})).msg
    assert got == m.FlowAlloc("pong", QosSpec(), None)


def test_int_is_accepted_for_a_float_field_and_becomes_float() -> None:
    got = CODEC.decode(packed_frame(m.FlowAccept, {"timeout": 3})).msg
    assert isinstance(got, m.FlowAccept)
    assert got.timeout == 3.0 and isinstance(got.timeout, float)


def test_encoding_a_body_over_the_limit_raises_wire_error() -> None:
    with pytest.raises(WireError, match="exceeds"):
        CODEC.encode(m.Ok("x" * (MAX_BODY + 1)))


# -- rejections -----------------------------------------------------------------

VALID = CODEC.encode(m.FlowDealloc(3), 9)


def test_truncated_header_is_rejected() -> None:
    with pytest.raises(WireError, match="truncated"):
        CODEC.decode(VALID[: HEADER.size - 1])


def test_bad_magic_is_rejected() -> None:
    with pytest.raises(WireError, match="magic"):
        CODEC.decode(b"XX" + VALID[2:])


def test_other_protocol_version_is_rejected_naming_it() -> None:
    with pytest.raises(WireError, match="version 1"):  # a JSON peer of old
        CODEC.decode(frame(m.FlowDealloc.TYPE, '{"flow_id":1}', version=1))
    with pytest.raises(WireError, match="version 2"):
        JSON_CODEC.decode(frame(m.FlowDealloc.TYPE, '{"flow_id":1}', version=2))


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_header_length_not_matching_the_body_is_rejected(delta: int) -> None:
    body = msgspec.msgpack.encode({"flow_id": 1})
    with pytest.raises(WireError, match="length"):
        CODEC.decode(frame(m.FlowDealloc.TYPE, body, length=len(body) + delta))


def test_extra_bytes_after_the_body_are_rejected() -> None:
    with pytest.raises(WireError, match="length"):
        CODEC.decode(VALID + b" ")


@pytest.mark.parametrize("code", [0, 9, 999, 0xFFFF])
def test_unknown_message_type_is_rejected(code: int) -> None:
    with pytest.raises(WireError, match=f"unknown message type {code}"):
        CODEC.decode(frame(code, b"\x80"))


@pytest.mark.parametrize(
    "body", [b"{not json", b"", b"\xc1", b"\x81\xa7flow_id", b"\x91" * 100_000 + b"\x01", b"\x81\xa7flow_id\x01\x00"]
)
def test_body_that_is_not_messagepack_is_rejected(body: bytes) -> None:
    with pytest.raises(WireError, match="not MessagePack"):
        CODEC.decode(frame(m.FlowDealloc.TYPE, body))


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe\x00", b'{"flow_id": 1', b"[" * 10_000])
def test_body_that_is_not_json_is_rejected(body: bytes) -> None:
    with pytest.raises(WireError):
        JSON_CODEC.decode(frame(m.FlowDealloc.TYPE, body, version=VERSION))


@pytest.mark.parametrize("body", [[], 1, "text", None, True, b"bin"])
def test_body_that_is_not_an_object_is_rejected(body: Any) -> None:
    with pytest.raises(WireError, match="not an object"):
        CODEC.decode(packed_frame(m.FlowDealloc, body))
    if not isinstance(body, bytes):
        with pytest.raises(WireError, match="not an object"):
            JSON_CODEC.decode(json_frame(m.FlowDealloc, body))


@pytest.mark.parametrize(
    ("cls", "body", "field"),
    [
        (m.FlowDealloc, {"flow_id": "1"}, "flow_id"),
        (m.FlowDealloc, {"flow_id": 1.5}, "flow_id"),
        (m.FlowDealloc, {"flow_id": None}, "flow_id"),
        (m.ProcAnnounce, {"prog": 5}, "prog"),
        (m.FlowListen, {"enabled": "yes"}, "enabled"),
        (m.FlowAccept, {"timeout": "3"}, "timeout"),
        (m.NameRegister, {"name": "n", "layers": "local"}, "layers"),
        (m.NameRegister, {"name": "n", "layers": ["local", 3]}, "layers"),
        (m.IpcpBootstrap, {"name": "n", "layer": "l", "conf": {"ip": 1}}, "conf"),
        (m.IpcpBootstrap, {"name": "n", "layer": "l", "conf": ["ip"]}, "conf"),
        (m.FlowAlloc, {"name": "n", "qos": "raw"}, "qos"),
        (m.FlowAlloc, {"name": "n", "qos": {"delay": "1"}}, "qos"),
        (m.IpcpReg, {"hash": 1234}, "hash"),
        (m.Table, {"rows": [{"a": 1}]}, "rows"),
    ],
)
def test_field_of_the_wrong_type_is_rejected_naming_the_field(cls: type[m.Message], body: Any, field: str) -> None:
    with pytest.raises(WireError, match=f"{cls.__name__}.{field}"):
        CODEC.decode(packed_frame(cls, body))
    with pytest.raises(WireError, match=f"{cls.__name__}.{field}"):
        JSON_CODEC.decode(json_frame(cls, body))


@pytest.mark.parametrize(
    ("cls", "body", "field"),
    [
        (m.IpcpReg, {"hash": "00ff"}, "hash"),  # bytes travel as bytes, not text
        (m.ProcAnnounce, {"prog": b"x"}, "prog"),
        (m.FlowAccept, {"timeout": float("nan")}, "timeout"),
        (m.FlowAccept, {"timeout": float("inf")}, "timeout"),
        (m.IpcpBootstrap, {"name": "n", "layer": "l", "conf": {1: "x"}}, "conf"),
        (m.IpcpInfo, {"sections": [{"name": "s", "evil": 1}]}, "sections"),
        (m.IpcpInfo, {"sections": [{"columns": []}]}, "sections"),
    ],
)
def test_packed_field_of_the_wrong_kind_is_rejected_naming_the_field(
    cls: type[m.Message], body: Any, field: str
) -> None:
    with pytest.raises(WireError, match=f"{cls.__name__}.{field}"):
        CODEC.decode(packed_frame(cls, body))


def test_bool_is_not_accepted_as_an_int() -> None:
    with pytest.raises(WireError, match="flow_id: expected int, got bool"):
        CODEC.decode(packed_frame(m.FlowDealloc, {"flow_id": True}))
    with pytest.raises(WireError, match="flow_id: expected int, got bool"):
        JSON_CODEC.decode(json_frame(m.FlowDealloc, {"flow_id": True}))


def test_bool_is_not_accepted_as_a_float() -> None:
    with pytest.raises(WireError, match="timeout"):
        CODEC.decode(packed_frame(m.FlowAccept, {"timeout": False}))
    with pytest.raises(WireError, match="timeout"):
        JSON_CODEC.decode(json_frame(m.FlowAccept, {"timeout": False}))


def test_int_is_not_accepted_as_a_bool() -> None:
    with pytest.raises(WireError, match="enabled: expected bool, got int"):
        CODEC.decode(packed_frame(m.FlowListen, {"enabled": 1}))
    with pytest.raises(WireError, match="enabled: expected bool, got int"):
        JSON_CODEC.decode(json_frame(m.FlowListen, {"enabled": 1}))


def test_bool_is_not_accepted_as_a_qos_int() -> None:
    with pytest.raises(WireError, match="qos"):
        CODEC.decode(packed_frame(m.FlowAlloc, {"name": "n", "qos": {"loss": True}}))
    with pytest.raises(WireError, match="qos"):
        JSON_CODEC.decode(json_frame(m.FlowAlloc, {"name": "n", "qos": {"loss": True}}))


def test_missing_required_field_is_rejected_naming_it() -> None:
    with pytest.raises(WireError, match="missing field 'flow_id'"):
        CODEC.decode(packed_frame(m.FlowDealloc, {}))
    with pytest.raises(WireError, match="missing field 'flow_id'"):
        JSON_CODEC.decode(json_frame(m.FlowDealloc, {}))


def test_unknown_field_is_rejected_naming_it() -> None:
    with pytest.raises(WireError, match=r"unknown fields.*'bogus'"):
        CODEC.decode(packed_frame(m.FlowDealloc, {"flow_id": 1, "bogus": 2}))
    with pytest.raises(WireError, match=r"unknown fields.*'bogus'"):
        JSON_CODEC.decode(json_frame(m.FlowDealloc, {"flow_id": 1, "bogus": 2}))


def test_a_field_swapped_for_an_unknown_one_is_rejected_as_many_fields_as_expected() -> None:
    """As many keys as the record has fields, one of them not a field: unknown, whatever the count."""
    with pytest.raises(WireError, match=r"unknown fields.*'bogus'"):
        CODEC.decode(packed_frame(m.FlowDealloc, {"bogus": 1}))
    full = {f.name: getattr(qos.raw, f.name) for f in dataclasses.fields(qos.raw)}
    swapped = {**{k: v for k, v in full.items() if k != "timeout"}, "speed": 1}
    with pytest.raises(WireError, match=r"FlowAlloc.qos: unknown fields.*'speed'"):
        CODEC.decode(packed_frame(m.FlowAlloc, {"name": "n", "qos": swapped}))
    assert CODEC.decode(packed_frame(m.FlowAlloc, {"name": "n", "qos": full})).msg == m.FlowAlloc("n", qos.raw)


def test_unknown_field_in_a_nested_qos_spec_is_rejected() -> None:
    with pytest.raises(WireError, match=r"unknown fields.*'speed'"):
        CODEC.decode(packed_frame(m.FlowAlloc, {"name": "n", "qos": {"speed": 1}}))
    with pytest.raises(WireError, match=r"unknown fields.*'speed'"):
        JSON_CODEC.decode(json_frame(m.FlowAlloc, {"name": "n", "qos": {"speed": 1}}))


@pytest.mark.parametrize("value", [-1, -(2**63)])
def test_qos_value_out_of_range_is_rejected(value: int) -> None:
    with pytest.raises(WireError, match="qos"):
        CODEC.decode(packed_frame(m.FlowAlloc, {"name": "n", "qos": {"delay": value}}))
    with pytest.raises(WireError, match="qos"):
        JSON_CODEC.decode(json_frame(m.FlowAlloc, {"name": "n", "qos": {"delay": value}}))


REPLY_BODY = {"flow_id": 1, "layer": "local", "mtu": 1400, "qos": {}}


def test_a_flow_reply_carries_the_peers_gid_and_every_group_up_to_the_bound() -> None:
    """The most groups a reply carries, each as large as a gid gets, beside a certificate: one frame."""
    groups = list(range(m.GID_MAX - m.MAX_PEER_GROUPS + 1, m.GID_MAX + 1))
    msg = m.FlowReply(
        1, "local", 1400, qos.raw, "n", 5, 6, peer_crt=bytes(4096), peer_gid=m.GID_MAX, peer_groups=groups
    )
    assert CODEC.decode(CODEC.encode(msg)).msg == msg
    dropped_all = m.FlowReply(1, "l", 1, qos.raw, peer_gid=0, peer_groups=[])  # no groups: not the same as None
    assert JSON_CODEC.decode(JSON_CODEC.encode(dropped_all)).msg == dropped_all


def test_a_flow_reply_without_the_peers_gid_and_groups_knows_neither() -> None:
    """A reply of a remote flow, or of an IRMd before them: no gid, and groups not known (not none)."""
    got = CODEC.decode(packed_frame(m.FlowReply, REPLY_BODY)).msg
    assert isinstance(got, m.FlowReply) and (got.peer_gid, got.peer_groups) == (-1, None)


OUT_OF_BOUNDS = [
    ({"peer_groups": list(range(m.MAX_PEER_GROUPS + 1))}, f"{m.MAX_PEER_GROUPS + 1} groups, at most"),
    ({"peer_groups": [4242, -1]}, "out of range"),
    ({"peer_groups": [m.GID_MAX + 1]}, "out of range"),
    ({"peer_gid": -2}, "no gid"),
    ({"peer_gid": m.GID_MAX + 1}, "no gid"),
]


@pytest.mark.parametrize(
    ("fields", "says"),
    [*OUT_OF_BOUNDS, ({"peer_groups": [True]}, "peer_groups"), ({"peer_groups": "1"}, "peer_groups")],
)
def test_a_flow_reply_with_a_gid_or_groups_out_of_bounds_is_rejected(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(WireError, match=f"FlowReply.*{says}"):
        CODEC.decode(packed_frame(m.FlowReply, {**REPLY_BODY, **fields}))
    with pytest.raises(WireError, match=f"FlowReply.*{says}"):
        JSON_CODEC.decode(json_frame(m.FlowReply, {**REPLY_BODY, **fields}))


@pytest.mark.parametrize(("fields", "says"), OUT_OF_BOUNDS)
def test_a_flow_reply_out_of_bounds_is_not_made(fields: dict[str, Any], says: str) -> None:
    """The IRMd cannot send one either: it fails where it is made, not at the application."""
    with pytest.raises(ValueError, match=says):
        m.FlowReply(1, "local", 1400, qos.raw, **fields)


@pytest.mark.parametrize("text", ["zz", "abc", "0x12"])
def test_bytes_field_that_is_not_hex_is_rejected(text: str) -> None:
    with pytest.raises(WireError, match="hex"):
        JSON_CODEC.decode(json_frame(m.IpcpReg, {"hash": text}))


def test_deep_nesting_in_a_field_is_rejected() -> None:
    nested: Any = "x"
    for _ in range(10):
        nested = [nested]
    with pytest.raises(WireError):
        CODEC.decode(packed_frame(m.NameRegister, {"name": "n", "layers": nested}))
    with pytest.raises(WireError):
        JSON_CODEC.decode(json_frame(m.NameRegister, {"name": "n", "layers": nested}))


def test_integer_too_large_for_a_float_field_is_rejected_as_wire_error() -> None:
    body = '{"timeout":1' + "0" * 400 + "}"
    with pytest.raises(WireError):
        JSON_CODEC.decode(frame(m.FlowAccept.TYPE, body, version=VERSION))


def test_integer_with_too_many_digits_is_rejected_as_wire_error() -> None:
    body = '{"flow_id":' + "1" * 5000 + "}"
    with pytest.raises(WireError):
        JSON_CODEC.decode(frame(m.FlowDealloc.TYPE, body, version=VERSION))


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_integer_beyond_64_bits_is_no_message(value: int) -> None:
    with pytest.raises(WireError):
        CODEC.encode(m.FlowDealloc(value))
    with pytest.raises(WireError):  # the largest MessagePack carries, as a float field's value
        CODEC.decode(frame(m.FlowDealloc.TYPE, b"\x81\xa7flow_id\xcf" + b"\xff" * 8 + b"\x00"))


# -- fuzzing: decode raises WireError and nothing else ---------------------------


def decode_or_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        CODEC.decode(data)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_only_raises_wire_error(data: bytes) -> None:
    decode_or_wire_error(data)


@settings(max_examples=400)
@given(code=st.sampled_from([cls.TYPE for cls in MESSAGE_TYPES]), body=st.binary(max_size=300))
def test_decoding_arbitrary_bodies_under_a_valid_header_only_raises_wire_error(code: int, body: bytes) -> None:
    decode_or_wire_error(frame(code, body))


# JSON values bounded to what a sane frame holds (huge integers are covered by the tests above).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300)
@given(data=st.data())
def test_decoding_json_bodies_with_real_field_names_only_raises_wire_error(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from(MESSAGE_TYPES))
    names = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
    body = data.draw(st.dictionaries(st.sampled_from(names), JSON, max_size=len(names)))
    decode_or_wire_error(json_frame(cls, body))
    with contextlib.suppress(OverflowError):  # integers beyond what MessagePack carries
        decode_or_wire_error(packed_frame(cls, body))


@settings(max_examples=400)
@given(
    data=st.data(),
    cls=st.sampled_from(MESSAGE_TYPES),
    fix_length=st.booleans(),
)
def test_decoding_mutated_valid_frames_only_raises_wire_error(
    data: st.DataObject, cls: type[m.Message], fix_length: bool
) -> None:
    raw = bytearray(CODEC.encode(data.draw(message_strategy(cls)), 1))
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[pos : pos + data.draw(st.integers(1, 8))]
        elif op == "truncate":
            del raw[pos:]
    if fix_length and len(raw) >= HEADER.size:
        # Keep the header consistent so mutations reach the body parser.
        _, _, code, req_id, _ = HEADER.unpack_from(raw)
        raw[: HEADER.size] = HEADER.pack(MAGIC, PACKED_VERSION, code, req_id, len(raw) - HEADER.size)
    decode_or_wire_error(bytes(raw))
