"""Control-message framing: a fixed binary header plus a typed, validated body (JSON or MessagePack).

Sans-IO: bytes in, message dataclasses out; every limit explicit and every
field type-checked, so a malformed frame raises `WireError`, never anything else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast, get_args, get_origin

import msgspec

from transports.records import FrozenRecord, Record, frozen_record, record

MAGIC = b"OU"
VERSION = 1  # JSON bodies (Codec)
PACKED_VERSION = 2  # MessagePack bodies (PackedCodec)
HEADER = struct.Struct("!2sBHII")  # magic, version, msg type, request id, body length
MAX_BODY = 60 * 1024
MAX_FRAME = HEADER.size + MAX_BODY
MAX_FDS = 4
MAX_DEPTH = 4
MAX_QUOTED = 40  # characters of a peer's text an error repeats
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # what the wire carries of an integer: 64 bits, as MessagePack
NOTICE = 0  # request id of one-way notices, which get no reply
REPLY = 0x80000000  # set in the request id of a reply; requests number below it
ID_MASK = REPLY - 1


class WireError(ValueError):
    """A frame that does not follow the control protocol."""


class Message(Record):
    """Base of all control messages; subclasses are dataclasses with a unique TYPE (`record`s, or
    dataclasses of their own)."""

    TYPE: ClassVar[int] = 0


M = TypeVar("M", bound=type[Message])


@record
class Error(Message):
    """The reply to a request that failed; `code` is an errno-like symbol."""

    TYPE: ClassVar[int] = 1
    code: str
    text: str


@frozen_record
class Frame(FrozenRecord):
    """A decoded frame: its request id and its message."""

    req_id: int
    msg: Message


class Codec:
    """Encodes and decodes the message classes registered with it: JSON bodies, bytes as hex,
    each field checked in Python (the unicast layer's messages between hosts)."""

    version: ClassVar[int] = VERSION
    # A message taken is encoded again (forwarded; signed, as a signature covers its encoding), and
    # its encoding can outgrow the bytes it came in: defaults filled in, non-ASCII text as \u escapes
    # (3 times), 1e15 as 1000000000000000.0. A body longer than this is encoded once more as it is
    # decoded, and refused if that exceeds MAX_BODY: encode never fails on a message decode returned.
    # JSON grows at most about 3 times, so a quarter of MAX_BODY spares small bodies the ~35 us.
    reencode_above: ClassVar[int] = MAX_BODY // 4

    def __init__(self) -> None:
        self._types: dict[int, type[Message]] = {}
        self.register(Error)

    def register(self, cls: M) -> M:
        code = cls.TYPE
        if not 0 < code < 0x10000 or code in self._types:
            raise ValueError(f"{cls.__name__}: bad or duplicate TYPE {code}")
        self._types[code] = cls  # field types are resolved when first decoded: a process decodes few types
        return cls

    @property
    def types(self) -> dict[int, type[Message]]:
        return dict(self._types)

    def encode(self, msg: Message, req_id: int = NOTICE) -> bytes:
        body = self._body(msg)
        if len(body) > MAX_BODY:
            raise WireError(f"{type(msg).__name__}: body of {len(body)} bytes exceeds {MAX_BODY}")
        return HEADER.pack(MAGIC, self.version, msg.TYPE, req_id, len(body)) + body

    def decode(self, frame: bytes) -> Frame:
        if len(frame) < HEADER.size:
            raise WireError(f"truncated header: {len(frame)} bytes")
        magic, version, code, req_id, length = HEADER.unpack_from(frame)
        if magic != MAGIC:
            raise WireError("bad magic")
        if version != self.version:
            raise WireError(f"unsupported protocol version {version} (speaks {self.version})")
        if length != len(frame) - HEADER.size:
            raise WireError(f"body length {length} != {len(frame) - HEADER.size} bytes received")
        cls = self._types.get(code)
        if cls is None:
            raise WireError(f"unknown message type {code}")
        msg = self._message(cls, memoryview(frame)[HEADER.size :])
        if length > self.reencode_above and len(body := self._body(msg)) > MAX_BODY:
            raise WireError(f"{cls.__name__}: encodes to {len(body)} bytes, over {MAX_BODY}")
        return Frame(req_id, msg)

    # -- the body: JSON ------------------------------------------------------

    def _body(self, msg: Message) -> bytes:
        return json.dumps(_to_json(msg), separators=(",", ":")).encode()

    def _message(self, cls: type[Message], body: memoryview) -> Message:
        try:
            raw = json.loads(bytes(body), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:  # ValueError: bad JSON, UTF-8 or an oversized number
            raise WireError(f"{cls.__name__}: body is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise WireError(f"{cls.__name__}: body is not an object")
        try:
            return self._build(cls, raw)
        except OverflowError as e:
            raise WireError(f"{cls.__name__}: {e}") from None

    def _build(self, cls: type[Message], raw: dict[str, Any]) -> Message:
        hints = _hints_of(cast(Any, cls))  # cast: a dataclass type is hashable, whatever mypy says of Message
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise WireError(f"{cls.__name__}: missing field {f.name!r}")
                continue
            kwargs[f.name] = _check(raw[f.name], hints[f.name], f"{cls.__name__}.{f.name}", 0)
        unknown = set(raw) - set(kwargs) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise WireError(f"{cls.__name__}: unknown fields {_names(unknown)}")
        try:
            return cls(**kwargs)
        except ValueError as e:  # what the message's __post_init__ refuses
            raise WireError(f"{cls.__name__}: {e}") from None


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """A peer's text as an error repeats it: its repr, cut to `limit` characters (errors are logged)."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _names(names: set[str]) -> str:
    """Names a peer sent, as an error quotes them: a few, each cut short."""
    shown = [quoted(n) for n in sorted(names)[:4]]
    return "[" + ", ".join(shown) + (", ..." if len(names) > 4 else "") + "]"


@frozen_record
class _Shape(FrozenRecord):
    """What the packed codec checks of a dataclass before msgspec converts it: its field names,
    the required ones, its float fields, and the shapes of the dataclasses nested in it."""

    names: frozenset[str]
    required: frozenset[str]
    floats: frozenset[str]
    nested: tuple[tuple[str, _Shape], ...]

    @classmethod
    def of(cls, dc: Any) -> _Shape:
        hints = _hints_of(dc)
        fields = dataclasses.fields(dc)
        required = {
            f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        floats, nested = set(), []
        for f in fields:
            inner = _dataclass_in(hints[f.name])
            if inner is not None:
                nested.append((f.name, cls.of(inner)))
            elif float in (hints[f.name], *get_args(hints[f.name])):
                floats.add(f.name)
        return cls(frozenset(f.name for f in fields), frozenset(required), frozenset(floats), tuple(nested))

    def check(self, raw: dict[Any, Any], where: str) -> None:
        """Refuse unknown and missing fields and non-finite floats, here and in nested records; the
        types of the values are msgspec's to check."""
        keys = raw.keys()
        if keys != self.names:  # (a record with every field, as msgspec encodes one, is neither)
            if unknown := keys - self.names:
                raise WireError(f"{where}: unknown fields {_names({str(u) for u in unknown})}")
            if missing := self.required - keys:
                raise WireError(f"{where}: missing field {min(missing)!r}")
        for name in self.floats:
            value = raw.get(name)
            if isinstance(value, float) and not math.isfinite(value):
                raise WireError(f"{where}.{name}: {value} is not a number the protocol carries")
        for name, shape in self.nested:
            value = raw.get(name)
            if isinstance(value, dict):
                shape.check(value, f"{where}.{name}")
            elif isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        shape.check(item, f"{where}.{name}[]")


def _dataclass_in(hint: Any) -> Any:
    """The dataclass a field holds (directly, optionally, or as list items), or None."""
    for candidate in (hint, *get_args(hint)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


class PackedCodec(Codec):
    """MessagePack bodies, parsed and type-checked in C (msgspec) with the bounds of the JSON codec:
    64-bit integers, no bool for an int, finite floats, no unknown or missing fields. The IRMd's
    control protocol: a JSON body costs it ~40 us to check in Python, this one a few."""

    version: ClassVar[int] = PACKED_VERSION
    reencode_above: ClassVar[int] = 0  # a list of records sent as [{}, {}, ...] grows without bound; ~1 us

    def __init__(self) -> None:
        self._shapes: dict[type[Message], _Shape] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder()  # untyped: the shape check comes between
        super().__init__()

    def _body(self, msg: Message) -> bytes:
        try:
            return self._encoder.encode(msg)
        except (OverflowError, TypeError) as e:  # e.g. an integer beyond 64 bits
            raise WireError(f"{type(msg).__name__}: {e}") from None

    def _message(self, cls: type[Message], body: memoryview) -> Message:
        name = cls.__name__
        try:
            raw = self._decoder.decode(body)
        except (msgspec.DecodeError, RecursionError, ValueError) as e:
            raise WireError(f"{name}: body is not MessagePack: {e}") from None
        if not isinstance(raw, dict):
            raise WireError(f"{name}: body is not an object")
        if (shape := self._shapes.get(cls)) is None:
            shape = self._shapes[cls] = _Shape.of(cls)
        shape.check(raw, name)
        try:
            # bytes are MessagePack's own: no base64 text taken for them
            msg: Message = msgspec.convert(raw, cls, builtin_types=(bytes,))
        except msgspec.ValidationError as e:  # also what __post_init__ refuses (QosSpec's ranges)
            text, _, at = str(e).partition(" - at ")
            key, _, path = at.replace("`", "").rpartition("$")  # "key in $.conf": one of conf's keys
            what = "a key: " if key else ""
            raise WireError(f"{name}{path}: {what}{text[:1].lower()}{text[1:]}".replace("`", "")) from None
        return msg


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the protocol carries")


@functools.cache
def _hints_of(cls: Any) -> dict[str, Any]:
    """Resolved field types of a message or a dataclass nested in one (~150 us to resolve, so once)."""
    return typing.get_type_hints(cls)


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


_SCALARS: dict[Any, Callable[[Any], bool]] = {
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool) and INT_MIN <= v <= INT_MAX,
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    Any: lambda v: isinstance(v, str | int | float | bool) or v is None,
}


def _check(value: Any, hint: Any, where: str, depth: int) -> Any:
    """Return `value` converted to `hint`, or raise WireError."""
    if depth > MAX_DEPTH:
        raise WireError(f"{where}: nested too deeply")
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _check(value, inner[0], where, depth)
    if hint is bytes:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected hex bytes")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise WireError(f"{where}: bad hex") from None
    if origin is list:
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list")
        (item,) = get_args(hint)
        return [_check(v, item, f"{where}[]", depth + 1) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected an object")
        _, item = get_args(hint)
        return {k: _check(v, item, f"{where}.{str(k)[:MAX_QUOTED]}", depth + 1) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected an object")
        hints = _hints_of(hint)
        names = {f.name for f in dataclasses.fields(hint)}
        if set(value) - names:
            raise WireError(f"{where}: unknown fields {_names(set(value) - names)}")
        cls: Any = hint
        try:
            return cls(**{k: _check(v, hints[k], f"{where}.{k}", depth + 1) for k, v in value.items()})
        except (TypeError, ValueError) as e:
            raise WireError(f"{where}: {e}") from None
    check = _SCALARS.get(hint)
    if check is None:
        raise TypeError(f"{where}: unsupported field type {hint!r}")
    if not check(value):
        raise WireError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
    if hint is float:
        value = float(value)  # an int too wide for a float: OverflowError, a WireError in _message
        if not math.isfinite(value):  # parse_constant refuses Infinity and NaN, but json reads 1e999 as inf
            raise WireError(f"{where}: {value} is not a number the protocol carries")
    return value
