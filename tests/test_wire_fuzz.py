"""What a hostile-peer fuzz hunt found in the wire decoders, kept as explicit cases, with a small
seeded fuzz loop for each decoder the other fuzz files did not reach. Each decoder returns a message
or raises its own error type; never another exception, never a value its checks exist to refuse.
"""

from __future__ import annotations

import json
import math
import random
import struct
import tracemalloc

import pytest
from fuzzing import cases, only_raises

from apps.ibp.exnode import BadExnode, ExNode, Mapping, from_xml, to_xml
from apps.netplumb import privsep as ps
from apps.netplumb.messages import MAX_RECIPE
from apps.netplumb.policy import Account, Plan, Step
from apps.netplumb.recipe import RecipeError, parse_recipe
from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.routing import Lsdb
from proto import messages as m
from proto.qos import QosSpec
from transports.wire import HEADER, ID_MASK, MAGIC, MAX_BODY, PACKED_VERSION, VERSION, Codec, WireError

# -- the unicast layer's JSON codec: floats ------------------------------------------------------


def _json_frame(cls: type[um.Message], body: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, cls.TYPE, 0, len(body)) + body


FLOAT_FIELDS = [
    (um.FlowUpdate, b'{"src":1,"eid":2,"ece":3,"rate":%s}'),
    (um.DhtStore, b'{"src":1,"key":"00","addr":1,"ttl":%s}'),
    (um.Lsu, b'{"src":1,"seqno":1,"neighbours":[],"since":%s}'),
]


@pytest.mark.parametrize("number", [b"1e999", b"-1e999", b"1" + b"0" * 400 + b".0"])
@pytest.mark.parametrize(("cls", "body"), FLOAT_FIELDS, ids=lambda x: getattr(x, "__name__", ""))
def test_a_float_json_reads_as_infinite_is_a_wire_error(cls: type[um.Message], body: bytes, number: bytes) -> None:
    """Infinity and NaN were refused as constants, but 1e999 (or 400 digits) parsed to inf and reached
    the components as a rate, a TTL or a start time."""
    with pytest.raises(WireError, match="not a number the protocol carries"):
        um.CODEC.decode(_json_frame(cls, body % number))


@pytest.mark.parametrize(("cls", "body"), FLOAT_FIELDS, ids=lambda x: getattr(x, "__name__", ""))
def test_bent_float_fields_decode_finite_or_raise_wire_error(cls: type[um.Message], body: bytes) -> None:
    numbers = [b"0", b"1.5", b"-2", b"1e308", b"1e-400", b"123456789"]
    corpus = [_json_frame(cls, body % n) for n in numbers]
    for data in cases(201, corpus, 3000):
        frame = only_raises(um.CODEC.decode, data, WireError)
        if frame is not None:
            assert all(math.isfinite(v) for v in vars(frame.msg).values() if isinstance(v, float))


# -- netplumbd <- session runner (the runner runs as the user: hostile) -----------------------------

PLAN = Plan(
    Account("alice", 1000, 1000, (1000,), "/home/alice", "/bin/sh"),
    (Step(("true",), "/bin/true"),),
    (),
    infifos=((3, "/tmp/in"),),
    outfifos=((4, "/tmp/out"),),
    sockets=((5, "/tmp/sock"),),
)
RUNNER_MESSAGES = [
    json.dumps(body).encode()
    for body in (
        {"started": [5]},
        {"fifo": 3},
        {"refused": "no such program", "status": 127},
        {"exit": "status", "value": 0},
        {"exit": "signal", "value": 9},
    )
]


@pytest.mark.parametrize("data", [b"[" * 3000, b"[{}," * 1000, b"[" * (ps.MAX_MESSAGE - 1) + b"]"])
def test_deeply_nested_runner_json_is_a_runner_error(data: bytes) -> None:
    """JSON nested ~1000 deep (it fits in one 4 KiB message) raised RecursionError out of the decoder:
    the reader thread died with it, leaving the message's fds open in netplumbd and the runner alive."""
    with pytest.raises(ps.RunnerError):
        ps.decode_from_runner(data, 0, PLAN)


def test_bent_runner_messages_decode_or_raise_runner_error() -> None:
    rng = random.Random(211)
    for data in cases(212, RUNNER_MESSAGES, 4000):
        only_raises(ps.decode_from_runner, data, ps.RunnerError, rng.choice((0, 1, 4, 67)), PLAN)


# -- exNodes (files users pass each other) ----------------------------------------------------------


def _exnode_with_function(levels: int) -> bytes:
    text = to_xml(ExNode("f", 50, "", [Mapping(0, 50, 0, 50, "ibp://d:6714/0#k/r/READ")])).decode()
    fn = f'<exnode:function name="x">{"<a>" * levels}{"</a>" * levels}</exnode:function>'
    return text.replace("</exnode:read>", "</exnode:read>" + fn).encode()


def test_an_exnode_nested_deeper_than_its_bound_is_a_bad_exnode() -> None:
    """A <function> nested 5000 deep (40 KB) parsed, then raised RecursionError when kept (ET.tostring)."""
    assert from_xml(_exnode_with_function(8)).mappings[0].conditioning == "x"
    with pytest.raises(BadExnode, match="nested"):
        from_xml(_exnode_with_function(5000))


# -- what a codec decodes encodes again ---------------------------------------------------------------


def _padded(cls: type[um.Message], head: bytes, fill: bytes, tail: bytes, version: int = VERSION) -> bytes:
    """A frame of `cls` whose body is head, `fill` repeated to MAX_BODY, tail."""
    body = head + fill * ((MAX_BODY - len(head) - len(tail)) // len(fill)) + tail
    return HEADER.pack(MAGIC, version, cls.TYPE, 0, len(body)) + body


GROWING = {
    # defaults left out and 1e15 (1000000000000000.0): Lsdb.receive raised WireError from its
    # signature check (signed_part encodes), a WireError out of the IPCP's management loop
    "lsu": _padded(um.Lsu, b'{"src":5,"seqno":1,"neighbours":[],"since":1e15,"key":"', b"ab", b'"}'),
    # "qos":{} comes back as nine fields: the flow allocator's signature check did the same
    "fa_req": _padded(um.FaReq, b'{"src":5,"s_eid":1,"qos":{},"hash":"', b"ab", b'"}'),
    # non-ASCII text comes back as \u escapes, three times its UTF-8
    "enroll": _padded(um.EnrollInfo, b'{"layer":"l","conf":{"k":"', "é".encode(), b'"}}'),
}


@pytest.mark.parametrize("name", sorted(GROWING))
def test_a_message_whose_encoding_outgrows_the_limit_is_a_wire_error(name: str) -> None:
    with pytest.raises(WireError, match="encodes to"):
        um.CODEC.decode(GROWING[name])


def test_the_lsu_that_outgrew_the_limit_no_longer_reaches_the_lsdb() -> None:
    """What the old decoder returned for GROWING["lsu"] raised WireError in Lsdb.receive, whose
    contract is auth.Forged; any LSU decoded now is signed-checked without raising anything else."""
    lsu = um.Lsu(5, 1, [], since=1e15, key=b"\xab" * ((MAX_BODY - 200) // 2))
    assert len(um.CODEC.encode(lsu)) <= HEADER.size + MAX_BODY
    with pytest.raises(auth.Forged):
        Lsdb(1).receive(lsu, 0.0)


def test_the_irmd_codec_refuses_a_body_whose_encoding_outgrows_the_limit() -> None:
    # FlowAlloc at MAX_BODY with its timeout a float32, which comes back as a float64 (4 bytes more)
    tail = b"\xa3qos\x80\xa7timeout\xca" + struct.pack(">f", 1.5)
    name = b"n" * (MAX_BODY - 9 - len(tail))
    body = b"\x83\xa4name\xda" + len(name).to_bytes(2, "big") + name + tail
    frame = HEADER.pack(MAGIC, PACKED_VERSION, m.FlowAlloc.TYPE, 1, len(body)) + body
    assert len(body) <= MAX_BODY
    with pytest.raises(WireError, match="encodes to"):
        m.CODEC.decode(frame)


@pytest.mark.parametrize("codec", [um.CODEC, m.CODEC], ids=["unicast", "irmd"])
def test_bent_big_frames_decode_to_messages_that_encode_again(codec: Codec) -> None:
    corpus = [*GROWING.values(), um.CODEC.encode(um.Lsu(5, 1, [2, 3], "n", 1.0, b"k" * 20000))]
    corpus += [m.CODEC.encode(m.FlowAlloc("é" * 9000, QosSpec()))]
    for data in cases(221, corpus, 300):
        frame = only_raises(codec.decode, data, WireError)
        if frame is not None:
            codec.encode(frame.msg, frame.req_id & ID_MASK)  # raises nothing, WireError included


# -- netplumb recipes (a client's START, parsed by netplumbd as root) -----------------------------


@pytest.mark.parametrize("line", ["a|", "a;", "a&", "x: a 2>f |"])
def test_a_recipe_over_its_command_bound_is_refused_before_it_is_built(line: str) -> None:
    """The bound was checked once a line, after the whole line was tokenized: one 64 KiB line of
    'a|' took 16 MB (a token and a command each) before the refusal. Now it stops at command 257."""
    text = line * (MAX_RECIPE // len(line))
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError, match="more than"):
            parse_recipe(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_bent_recipes_parse_or_raise_recipe_error() -> None:
    corpus = [b'x: a \'q w\' "e\\"r" >f 2>&1 | b <in &\ny: c >%x; d 2>>log # c', b"a|b|c\nd >>o 2>%e\ne: f"]
    for data in cases(231, corpus, 3000):
        only_raises(parse_recipe, data.decode("utf-8", "replace"), RecipeError)
