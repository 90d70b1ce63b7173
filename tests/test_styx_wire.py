"""The 9P2000 codec: exact bytes of known messages, round trips, a fuzzed decoder,
and agreement with plan9port's C codec (python-9p) in its own venv (tests/third_party.py)."""

from __future__ import annotations

import contextlib
import json
import random
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from third_party import py9p_python

from apps.styx import wire as w


def test_tversion_bytes_are_exactly_the_spec() -> None:
    # size[4]=19 type[1]=100 tag[2]=NOTAG msize[4]=8192 version[s]="9P2000"
    expected = bytes.fromhex("1300000064ffff002000000600") + b"9P2000"
    assert w.encode(w.Tversion(w.NOTAG, 8192, "9P2000")) == expected
    assert w.decode(expected) == w.Tversion(w.NOTAG, 8192, "9P2000")


def test_twalk_and_rwalk_bytes() -> None:
    got = w.encode(w.Twalk(1, 0, 5, ["a", "bc"]))
    assert got == struct.pack("<IBHIIH", len(got), 110, 1, 0, 5, 2) + b"\x01\x00a\x02\x00bc"
    qid = w.Qid(w.QTDIR, 7, 0x0102030405060708)
    got = w.encode(w.Rwalk(1, [qid]))
    assert got == struct.pack("<IBHH", 22, 111, 1, 1) + bytes.fromhex("80070000000807060504030201")


def test_rread_twrite_carry_count_then_data() -> None:
    assert w.encode(w.Rread(3, b"hi")) == struct.pack("<IBHI", 13, 117, 3, 2) + b"hi"
    assert w.encode(w.Twrite(4, 9, 2**40, b"x")) == struct.pack("<IBHIQI", 24, 118, 4, 9, 2**40, 1) + b"x"


def test_rstat_has_two_size_fields() -> None:
    stat = w.Stat(name="f", uid="u", gid="g", muid="m", length=5, mode=0o644)
    rec = stat.encode()
    assert len(rec) == w.STATFIXLEN + 4 and struct.unpack_from("<H", rec)[0] == len(rec) - 2
    msg = w.encode(w.Rstat(1, stat))
    assert msg[7:9] == struct.pack("<H", len(rec)) and msg[9:] == rec
    assert w.decode(msg) == w.Rstat(1, stat)


def test_empty_bodied_replies() -> None:
    for cls, t in [(w.Rflush, 109), (w.Rclunk, 121), (w.Rremove, 123), (w.Rwstat, 127)]:
        assert w.encode(cls(9)) == struct.pack("<IBH", 7, t, 9)


def test_decoder_refusals() -> None:
    good = w.encode(w.Tclunk(1, 2))
    with pytest.raises(w.DecodeError, match="size field"):
        w.decode(good + b"\0")
    with pytest.raises(w.DecodeError, match="shorter"):
        w.decode(good[:5])
    with pytest.raises(w.DecodeError, match="unknown message type"):
        w.decode(struct.pack("<IBH", 7, 106, 0))  # Terror is illegal
    with pytest.raises(w.DecodeError, match="exceeds msize"):
        w.decode(w.encode(w.Twrite(1, 1, 0, bytes(300))), msize=256)
    too_many = struct.pack("<IIH", 0, 1, 17) + b"\x01\x00a" * 17
    with pytest.raises(w.DecodeError, match="at most 16"):
        w.decode(struct.pack("<IBH", 7 + len(too_many), 110, 0) + too_many)
    bad_utf8 = struct.pack("<IIH", 0, w.NOFID, 2) + b"\xff\xfe" + struct.pack("<H", 0)
    with pytest.raises(w.DecodeError, match="UTF-8"):
        w.decode(struct.pack("<IBH", 7 + len(bad_utf8), w.TATTACH, 0) + bad_utf8)
    count_lies = struct.pack("<IQI", 1, 0, 100) + b"abc"
    with pytest.raises(w.DecodeError, match="truncated"):
        w.decode(struct.pack("<IBH", 7 + len(count_lies), 118, 0) + count_lies)
    with pytest.raises(ValueError):
        w.encode(w.Twalk(0, 0, 1, ["x"] * 17))


# -- generated messages -------------------------------------------------------------

u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))
text = st.text(max_size=20)
qids = st.builds(w.Qid, u8, u32, u64)
stats = st.builds(w.Stat, u16, u32, qids, u32, u32, u32, u64, text, text, text, text)
FIELD = {
    "1": u8,
    "2": u16,
    "4": u32,
    "8": u64,
    "s": text,
    "qid": qids,
    "data": st.binary(max_size=200),
    "stat": stats,
    "wname": st.lists(text, max_size=16),
    "wqid": st.lists(qids, max_size=16),
}
messages = st.sampled_from(sorted(w.MESSAGES.values(), key=lambda c: c.TYPE)).flatmap(
    lambda cls: st.builds(cls, u16, **{n: FIELD[k] for n, k in cls.FIELDS})
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_message_round_trips(msg: w.Msg) -> None:
    data = w.encode(msg)
    assert w.message_size(data) == len(data)
    assert w.decode(data) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    with contextlib.suppress(w.DecodeError):
        w.decode(data)


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_corrupted_messages_decode_or_raise_decode_error(msg: w.Msg, data: st.DataObject) -> None:
    raw = bytearray(w.encode(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(u8)
    cut = data.draw(st.integers(0, len(raw)))
    for candidate in (bytes(raw), bytes(raw[:cut])):
        with contextlib.suppress(w.DecodeError):
            w.decode(candidate)


# -- agreement with plan9port's codec (python-9p) --------------------------------------

ROUND_TRIP = """
import json, sys
from py9p.native import decode_message, encode_message
out = []
for h in json.load(sys.stdin):
    try:
        out.append(encode_message(decode_message(bytes.fromhex(h))).hex())
    except Exception as e:
        out.append("error: %s" % e)
print(json.dumps(out))
"""


def sample_messages(n: int, seed: int) -> list[w.Msg]:
    rnd = random.Random(seed)

    def s() -> str:
        return "".join(rnd.choice("abcé/ .9") for _ in range(rnd.randint(0, 12)))

    def q() -> w.Qid:
        return w.Qid(rnd.choice([0, 0x80, 0x40]), rnd.getrandbits(32), rnd.getrandbits(64))

    def value(kind: str) -> object:
        if kind in ("1", "2", "4", "8"):
            return rnd.getrandbits(min(8 * int(kind), 63)) & (0x7F if kind == "1" else -1)
        if kind == "s":
            return s()
        if kind == "qid":
            return q()
        if kind == "data":
            return rnd.randbytes(rnd.randint(0, 40))
        if kind == "stat":
            return w.Stat(
                rnd.getrandbits(16),
                rnd.getrandbits(32),
                q(),
                rnd.getrandbits(32),
                rnd.getrandbits(32),
                rnd.getrandbits(32),
                rnd.getrandbits(63),
                s(),
                s(),
                s(),
                s(),
            )
        if kind == "wname":
            return [s() or "x" for _ in range(rnd.randint(0, 16))]
        return [q() for _ in range(rnd.randint(0, 16))]

    out: list[w.Msg] = []
    for _ in range(n):
        cls = rnd.choice(sorted(w.MESSAGES.values(), key=lambda c: c.TYPE))
        values = {name: value(kind) for name, kind in cls.FIELDS}
        if cls is w.Tversion or cls is w.Rversion:
            values["version"] = "9P2000"
        out.append(cls(rnd.getrandbits(16), **values))
    return out


def test_plan9port_codec_reencodes_our_bytes_identically() -> None:
    python = py9p_python()
    msgs = sample_messages(300, seed=6)
    encoded = [w.encode(m).hex() for m in msgs]
    proc = subprocess.run(
        [python, "-c", ROUND_TRIP], input=json.dumps(encoded), capture_output=True, text=True, timeout=60, check=True
    )
    back = json.loads(proc.stdout)
    mismatches = [(type(m).__name__, b) for m, a, b in zip(msgs, encoded, back, strict=True) if a != b]
    assert not mismatches, mismatches[:5]
