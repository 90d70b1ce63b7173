"""TAP1 framing of netplumb packets, as the seed defines it, and their name/value payloads.

Sans-IO: bytes in, Packet dataclasses out (and back); bad size, CRC or sequence is rejected.
"""

from __future__ import annotations

import base64
import binascii
import logging
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

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

TYPE_NAMES = {HELLO: "HELLO", REFUSE: "REFUSE", AUTH: "AUTH", START: "START", DATA: "DATA", EOF: "EOF",
              WINDOW: "WINDOW", EXIT: "EXIT", OPEN: "OPEN", SIGNAL: "SIGNAL", ERROR: "ERROR"}


# Channels, as SSH's: 0-2 stdio, the client numbers its pipes and sockets from 3, the server its
# socket connections from 1000.
STDIN, STDOUT, STDERR = 0, 1, 2
FIRST_CLIENT_CHANNEL = 3
FIRST_SERVER_CHANNEL = 1000
INITIAL_WINDOW = 1024 * 1024  # each direction of each channel starts with this much credit


class WireError(ValueError):
    """A packet that is not TAP1, or is damaged, or out of sequence."""


def next_seq(seq: int) -> int:
    return (seq + 1) % SEQ_MODULO


@dataclass(frozen=True)
class Packet:
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
    rest = BODY.pack(packet.seq, packet.type) + packet.payload
    return HEADER.pack(MAGIC, size, zlib.crc32(rest)) + rest


def decode(data: bytes) -> Packet:
    """One whole packet; raises WireError on a bad magic, size or CRC."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"packet of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, size, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}: not a TAP1 packet")
    if size != len(data) or size > MAX_PACKET:
        raise WireError(f"bad size {size}: got {len(data)} bytes (at most {MAX_PACKET})")
    if zlib.crc32(memoryview(data)[HEADER.size:]) != crc:
        raise WireError("bad CRC32: the packet was damaged")
    seq, ptype = BODY.unpack_from(data, HEADER.size)
    if seq >= SEQ_MODULO:
        raise WireError(f"bad sequence number {seq}: it rolls over at {SEQ_MODULO - 1}")
    return Packet(seq, ptype, bytes(data[HEADER_SIZE:]))


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
        self._buf += data
        out = []
        while len(self._buf) >= HEADER.size:
            magic, size, _ = HEADER.unpack_from(self._buf)
            if magic != MAGIC or not HEADER_SIZE <= size <= MAX_PACKET:
                self._reject(f"bad magic {bytes(magic)!r} or size {size}")
            if len(self._buf) < size:
                break
            chunk = bytes(self._buf[:size])
            del self._buf[:size]
            try:
                packet = decode(chunk)
            except WireError as e:
                self._reject(str(e))
            if packet.seq != self.expect:
                self._reject(f"bad sequence number {packet.seq}, expected {self.expect}")
            self.expect = next_seq(self.expect)
            out.append(packet)
        if self.whole and self._buf:  # flows keep SDU boundaries: a piece of a packet is garbage
            self._reject(f"{len(self._buf)} bytes that are not a whole packet")
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


@dataclass
class Fields:
    """An ordered list of name/value pairs; a name may repeat (e.g. one 'arg' per argument)."""

    pairs: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, *pairs: tuple[str, str | int], **kw: str | int) -> Fields:
        return cls([(k, str(v)) for k, v in (*pairs, *kw.items())])

    def add(self, name: str, value: str | int) -> Fields:
        self.pairs.append((name, str(value)))
        return self

    def get(self, name: str, default: str | None = None) -> str | None:
        for k, v in self.pairs:
            if k == name:
                return v
        return default

    def need(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise WireError(f"missing field {name!r}")
        return value

    def int(self, name: str, lo: int = 0, hi: int = 2**63) -> int:
        text = self.need(name)
        if not text.isascii() or not text.lstrip("-").isdigit():
            raise WireError(f"field {name!r}: {text[:40]!r} is not a number")
        value = int(text)
        if not lo <= value <= hi:
            raise WireError(f"field {name!r}: {value} out of range {lo}..{hi}")
        return value

    def bin(self, name: str) -> bytes:
        return unb64(self.need(name), name)

    def getall(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.pairs)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str = "value") -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError(f"field {what!r} is not valid base64") from None


def _text(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def encode_pairs(pairs: Iterable[tuple[str, str]]) -> bytes:
    """name NUL value NUL ... then an empty name (a lone NUL) ends the list."""
    out = bytearray()
    for name, value in pairs:
        n, v = _text(name), _text(value)
        if not n or b"\0" in n or b"\0" in v:
            raise WireError(f"pair {name[:40]!r}: names are non-empty, neither may hold NUL")
        out += n + b"\0" + v + b"\0"
    out += b"\0"
    return bytes(out)


def decode_pairs(data: bytes) -> Fields:
    parts = data.split(b"\0")
    # A well-formed list splits into name, value, ..., '' (the end mark), '' (after its NUL).
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2:
        raise WireError("name/value list is not NUL-terminated pairs ending with an empty name")
    body = parts[:-2]
    if len(body) // 2 > MAX_PAIRS:
        raise WireError(f"more than {MAX_PAIRS} name/value pairs")
    pairs = []
    for i in range(0, len(body), 2):
        if not body[i]:
            raise WireError("empty name before the end of the name/value list")
        pairs.append((body[i].decode("utf-8", "surrogateescape"), body[i + 1].decode("utf-8", "surrogateescape")))
    return Fields(pairs)
