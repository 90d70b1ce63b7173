"""Fuzzed netplumb: TAP1 packets and streams bent at the byte level, name/value lists, every
session message built from hostile fields (signs, huge numbers, NULs, missing and repeated names),
and a running session's server fed sealed packets of them. Parsers raise only WireError; the
connection core turns everything into events or a Closed with its reason, never an exception.
"""

from __future__ import annotations

import random
import zlib

import pytest
from fuzzing import ROUNDS, cases, only_raises
from test_netplumb_connection import running

from apps.netplumb import wire
from apps.netplumb.connection import MESSAGES, Closed
from apps.netplumb.wire import Decoder, Fields, Packet, WireError

NAMES = (
    "ch",
    "n",
    "data",
    "base64",
    "arg",
    "recipe",
    "user",
    "env",
    "infifo",
    "outfifo",
    "socket",
    "ok",
    "message",
    "status",
    "signal",
    "sig",
    "parent",
    "x",
)
VALUES = (
    "",
    "0",
    "1",
    "3",
    "-1",
    "--5",
    "-",
    "+1",
    " 1",
    "1e3",
    "9" * 25,
    "9" * 5000,
    "2147483648",
    "٣",
    "\x00",
    "3 /tmp/x",
    "3 rel",
    "99999 /a",
    "A=b",
    "=b",
    "1a=b",
    "INT",
    "TERM" * 10,
    "AAAA",
    "!!!!",
    "ls",
    "/bin/true",
)


def _fields(rng: random.Random) -> Fields:
    f = Fields()
    names = rng.sample(NAMES, 3)  # a few names, some repeated: each message finds its own often
    for _ in range(rng.randint(0, 6)):
        value = rng.choice(VALUES)
        f.items += [rng.choice(names).encode(), value.replace("\0", "").encode("utf-8", "surrogateescape")]
    return f


def test_bent_packets_decode_or_raise_wire_error() -> None:
    corpus = [
        wire.encode(Packet(i, t, wire.encode_pairs([("ch", "1"), ("data", "x" * i)])))
        for i, t in enumerate((wire.HELLO, wire.DATA, wire.WINDOW, wire.ERROR))
    ]
    for data in cases(91, corpus, 3000):
        only_raises(wire.decode, data, WireError)
        only_raises(wire.describe, data, ())
        for whole in (False, True):
            only_raises(Decoder(whole).feed, data, WireError)
        body = data[wire.HEADER.size :]  # with a CRC that holds, the body's damage is what is tested
        fixed = wire.HEADER.pack(wire.MAGIC, len(data), zlib.crc32(body)) + body
        only_raises(wire.decode, fixed, WireError)


def test_bent_pair_lists_decode_or_raise_wire_error() -> None:
    corpus = [wire.encode_pairs([("ch", "1"), ("data", "abc"), ("data", "")]), b"\0\0", b"a\0b\0\0\0"]
    for data in cases(92, corpus, 4000):
        only_raises(wire.decode_pairs, data, WireError)


def test_every_message_from_hostile_fields_is_built_or_a_wire_error() -> None:
    rng = random.Random(93)
    for _ in range(3000 * ROUNDS):
        fields = _fields(rng)
        for cls in MESSAGES.values():
            msg = only_raises(cls.from_fields, fields, WireError)
            if msg is not None:
                assert type(msg).from_fields(msg.to_fields()) == msg  # what was taken means what it says


@pytest.mark.parametrize("end", ["server", "client"])
def test_a_running_session_turns_hostile_messages_into_events_or_a_reason(end: str) -> None:
    """The server facing a hostile (authorized) client, or the client a hostile server."""
    rng = random.Random(94 if end == "server" else 95)
    # Every type, and the running phase's own more often: most others close the session at once.
    own = wire.SIGNAL if end == "server" else wire.EXIT
    types = sorted(wire.TYPE_NAMES) + [wire.DATA, wire.EOF, wire.WINDOW, wire.OPEN, own] * 4
    for round_ in range(1000 * ROUNDS):
        c, s = running(float(round_))
        sender, receiver = (c, s) if end == "server" else (s, c)
        for step in range(rng.randint(1, 30)):
            if rng.random() < 0.9:
                packet = sender.session.send(rng.choice(types), _fields(rng))
            else:  # a packet bent after sealing: the session refuses it
                packet = bytearray(sender.session.send(wire.DATA, Fields.of(ch=0, data="x")))
                packet[rng.randrange(len(packet))] ^= 0xFF
            events = receiver.receive(bytes(packet), float(round_) + step)
            if receiver.closed:
                assert events and isinstance(events[-1], Closed), events
                break
