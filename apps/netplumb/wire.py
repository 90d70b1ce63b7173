"""TAP1 framing of netplumb packets, as the seed defines it, and their name/value payloads.

Sans-IO: bytes in, Packet dataclasses out (and back); bad size, CRC or sequence is rejected.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import struct
import zlib
from collections.abc import Iterable
from dataclasses import field

from transports.records import FrozenRecord, Record, frozen_record, record

log = logging.getLogger(__name__)

MAGIC = b"TAP1"
HEADER = struct.Struct(">4sII")  # magic, size of the whole packet, CRC32 of the rest
BODY = struct.Struct(">IB")  # sequence number, packet type
HEADER_SIZE = HEADER.size + BODY.size  # 17
MAX_PACKET = 65535  # one packet per SDU; reliable flows carry SDUs up to 65535 bytes
SEQ_MODULO = 32768  # the sequence number rolls over at 32767
MAX_PAIRS = 4096

# Packet types. Below 10: clear text (the handshake); 10 and up: encrypted and authenticated.
HELLO = 1  # ephemeral keys; the server's reply proves its long-term key
REFUSE = 2  # message: the server will not go on (a limit), said before any key is agreed
AUTH = 10  # the client's long-term key and proof; the reply says welcome
START = 20  # what to run; the reply says started
DATA = 21  # ch, data (base64)
EOF = 22  # ch: no more data on this channel in this direction
WINDOW = 23  # ch, n: the receiver takes n more bytes
EXIT = 24  # status or signal of the remote command
OPEN = 25  # ch, parent: a new connection on a replicated unix socket
SIGNAL = 27  # sig: deliver a signal to the remote command
ERROR = 99  # message: the sender ends the session
ENCRYPTED_FROM = 10
FIRST_SESSION_TYPE = 20  # START and up: the established session's messages

TYPE_NAMES = {
    HELLO: "HELLO",
    REFUSE: "REFUSE",
    AUTH: "AUTH",
    START: "START",
    DATA: "DATA",
    EOF: "EOF",
    WINDOW: "WINDOW",
    EXIT: "EXIT",
    OPEN: "OPEN",
    SIGNAL: "SIGNAL",
    ERROR: "ERROR",
}


# Channels, as SSH's: 0-2 stdio, the client numbers its pipes and sockets from 3, the server its
# socket connections from 1000.
STDIN, STDOUT, STDERR = 0, 1, 2
FIRST_CLIENT_CHANNEL = 3
FIRST_SERVER_CHANNEL = 1000
INITIAL_WINDOW = 1024 * 1024  # each direction of each channel starts with this much credit
MAX_CONNECTIONS = 64  # connections open at once on a session's replicated sockets, at each end (each a channel)


class WireError(ValueError):
    """A packet that is not TAP1, or is damaged, or out of sequence."""


def next_seq(seq: int) -> int:
    return (seq + 1) % SEQ_MODULO


@frozen_record
class Packet(FrozenRecord):
    """One TAP1 packet: its sequence number, type and payload (sealed from type ENCRYPTED_FROM on)."""

    seq: int
    type: int
    payload: bytes

    @property
    def aad(self) -> bytes:
        """What encryption authenticates besides the payload: the magic, sequence and type."""
        return MAGIC + BODY.pack(self.seq, self.type)


def encode(packet: Packet) -> bytes:
    if not 0 <= packet.seq < SEQ_MODULO or not 0 <= packet.type <= 255:
        raise WireError(f"bad sequence {packet.seq} or type {packet.type}")
    size = HEADER_SIZE + len(packet.payload)
    if size > MAX_PACKET:
        raise WireError(f"packet of {size} bytes exceeds {MAX_PACKET}")
    body = BODY.pack(packet.seq, packet.type)
    # The CRC runs on over the payload where it lies: the packet is put together in one copy.
    return b"".join((HEADER.pack(MAGIC, size, zlib.crc32(packet.payload, zlib.crc32(body))), body, packet.payload))


def decode(data: bytes | memoryview) -> Packet:
    """One whole packet; raises WireError on a bad magic, size or CRC."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"packet of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, size, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a TAP1 packet")
    if size != len(data) or size > MAX_PACKET:
        raise WireError(f"bad size {size}: got {len(data)} bytes (at most {MAX_PACKET})")
    view = memoryview(data)
    if zlib.crc32(view[HEADER.size :]) != crc:
        raise WireError("bad CRC32: the packet was damaged")
    seq, ptype = BODY.unpack_from(data, HEADER.size)
    if seq >= SEQ_MODULO:
        raise WireError(f"bad sequence number {seq}: it rolls over at {SEQ_MODULO - 1}")
    return Packet(seq, ptype, bytes(view[HEADER_SIZE:]))


def describe(data: bytes) -> str:
    """One packet in a line, for tracing: its type, sequence number and size (without checking it)."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC:
        return f"{len(data)} bytes that are not a TAP1 packet"
    seq, ptype = BODY.unpack_from(data, HEADER.size)
    return f"{TYPE_NAMES.get(ptype, str(ptype))} seq {seq}, {len(data)} bytes"


class Decoder:
    """Packets from a byte stream, or (whole=True) from SDUs that each hold whole packets, in sequence.

    Everything that fails is logged and raised: a peer that sends garbage loses the session.
    """

    def __init__(self, whole: bool = False) -> None:
        self._buf = bytearray()
        self.expect = 0
        self.whole = whole

    def feed(self, data: bytes) -> list[Packet]:
        if self._buf:  # the rest of a packet a stream cut
            self._buf += data
            data, self._buf = bytes(self._buf), bytearray()
        view = memoryview(data)
        out, pos = [], 0
        while len(data) - pos >= HEADER.size:
            magic, size, _ = HEADER.unpack_from(data, pos)
            if magic != MAGIC or not HEADER_SIZE <= size <= MAX_PACKET:
                self._reject(f"bad magic {bytes(magic)!r} or size {size}")
            if len(data) - pos < size:
                break
            try:
                packet = decode(view[pos : pos + size])
            except WireError as e:
                self._reject(str(e))
            if packet.seq != self.expect:
                self._reject(f"bad sequence number {packet.seq}, expected {self.expect}")
            self.expect = next_seq(self.expect)
            out.append(packet)
            pos += size
        if pos < len(data):
            if self.whole:  # flows keep SDU boundaries: a piece of a packet is garbage
                self._reject(f"{len(data) - pos} bytes that are not a whole packet")
            self._buf += view[pos:]
        return out

    def _reject(self, why: str) -> None:
        self._buf.clear()
        log.info("rejected a packet: %s", why)
        raise WireError(why)


class Encoder:
    """Numbers outgoing packets."""

    def __init__(self) -> None:
        self.seq = 0

    def next(self) -> int:
        seq, self.seq = self.seq, next_seq(self.seq)
        return seq


# -- name/value pairs ---------------------------------------------------------


Value = str | int | bytes


def _raw(value: Value) -> bytes:
    """A name or value as it travels: text in UTF-8 (undecodable bytes kept as they came), numbers in decimal."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _pair(name: Value, value: Value) -> tuple[bytes, bytes]:
    n, v = _raw(name), _raw(value)
    if not n or 0 in n or 0 in v:
        raise WireError(f"pair {_text(n)[:40]!r}: names are non-empty, neither may hold NUL")
    return n, v


@record
class Fields(Record):
    """An ordered list of name/value pairs as they travel: name, value, name, value, ... (bytes, kept
    flat: a DATA has hundreds). A name may repeat (one 'arg' per argument). get() and friends read a
    value as text, raw() and rawall() as the bytes themselves.

    Pairs are checked as they are added (of, add, add_pieces) and as they arrive (decode_pairs)."""

    items: list[bytes] = field(default_factory=list)

    @classmethod
    def of(cls, *pairs: tuple[str, Value], **kw: Value) -> Fields:
        return cls([b for k, v in (*pairs, *kw.items()) for b in _pair(k, v)])

    def add(self, name: str, value: Value) -> Fields:
        self.items += _pair(name, value)
        return self

    def add_pieces(self, name: str, data: bytes) -> Fields:
        """Bytes that may hold NULs, as a run of `name` pairs cut at them: the run's values, joined by
        NUL, are the bytes again."""
        pieces = data.split(b"\0")
        run = [_pair(name, b"")[0]] * (2 * len(pieces))
        run[1::2] = pieces
        self.items += run
        return self

    @property
    def pairs(self) -> list[tuple[bytes, bytes]]:
        return list(zip(self.items[0::2], self.items[1::2], strict=True))

    def raw(self, name: str) -> bytes | None:
        names = self.items[0::2]
        key = _raw(name)
        return self.items[2 * names.index(key) + 1] if key in names else None

    def rawall(self, name: str) -> list[bytes]:
        return list(itertools.compress(self.items[1::2], map(_raw(name).__eq__, self.items[0::2])))

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.raw(name)
        return default if value is None else _text(value)

    def need(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise WireError(f"missing field {name!r}")
        return value

    def int(self, name: str, lo: int = 0, hi: int = 2**63) -> int:
        text = self.need(name)
        digits = text[1:] if text.startswith("-") else text
        # One sign at most, and few enough digits that int() takes them (it refuses over 4300).
        if not text.isascii() or not digits.isdigit() or len(digits) > 20:
            raise WireError(f"field {name!r}: {text[:40]!r} is not a number")
        value = int(text)
        if not lo <= value <= hi:
            raise WireError(f"field {name!r}: {value} out of range {lo}..{hi}")
        return value

    def bin(self, name: str) -> bytes:
        return unb64(self.need(name), name)

    def getall(self, name: str) -> list[str]:
        return [_text(v) for v in self.rawall(name)]

    def text(self) -> list[tuple[str, str]]:
        """The pairs as text (for logs and tests)."""
        return [(_text(k), _text(v)) for k, v in self.pairs]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | bytes, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"field {what!r} is not valid base64") from None


def encode_pairs(pairs: Fields | Iterable[tuple[str, Value]]) -> bytes:
    """name NUL value NUL ... then an empty name (a lone NUL) ends the list."""
    fields = pairs if isinstance(pairs, Fields) else Fields.of(*pairs)
    return b"\0".join(itertools.chain(fields.items, (b"", b"")))  # the last value's NUL, the end mark


def decode_pairs(data: bytes) -> Fields:
    items = data.split(b"\0")
    # A well-formed list splits into name, value, ..., '' (the end mark), '' (after its NUL).
    if len(items) < 2 or items[-1] != b"" or items[-2] != b"" or len(items) % 2:
        raise WireError("name/value list is not NUL-terminated pairs ending with an empty name")
    del items[-2:]
    if len(items) > 2 * MAX_PAIRS:
        raise WireError(f"more than {MAX_PAIRS} name/value pairs")
    if b"" in items[0::2]:
        raise WireError("empty name before the end of the name/value list")
    return Fields(items)
