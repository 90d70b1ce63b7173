"""The messages of an established netplumb session (START ... SIGNAL), declared once as frozen
dataclasses: their name/value fields both ways, with explicit bounds; a malformed one is a WireError.
"""

from __future__ import annotations

from typing import ClassVar

from apps.netplumb import wire
from apps.netplumb.wire import Fields, WireError
from transports.records import FrozenRecord, frozen_record

MAX_RECIPE = 1 << 16
MAX_GRANT = 1 << 40  # one WINDOW adjustment
MAX_CHANNEL = 1 << 31
# DATA carries its bytes as they are, cut at their NULs (each NUL costs a pair's name, 5 bytes), unless
# more than one in this many is NUL: then base64 (a third more) is the smaller, and one value.
NUL_DENSITY = 16
MAX_PIECES = wire.MAX_PAIRS - 2  # so that a DATA stays within the pair list's bound


class BadStart(WireError):
    """A START whose fields make no sense; refused with this message (status 126), not a protocol error."""


@frozen_record
class Start(FrozenRecord):
    """What to run: a command (argv) or a recipe, as whom, with which of the client's variables, and
    the named pipes and sockets to replicate, by channel."""

    TYPE: ClassVar[int] = wire.START
    argv: tuple[str, ...] = ()
    recipe: str | None = None
    user: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    infifos: tuple[tuple[int, str], ...] = ()
    outfifos: tuple[tuple[int, str], ...] = ()
    sockets: tuple[tuple[int, str], ...] = ()

    def to_fields(self) -> Fields:
        f = Fields()
        for arg in self.argv:
            f.add("arg", arg)
        if self.recipe is not None:
            f.add("recipe", self.recipe)
        if self.user:
            f.add("user", self.user)
        for name, value in self.env:
            f.add("env", f"{name}={value}")
        for kind, table in (("infifo", self.infifos), ("outfifo", self.outfifos), ("socket", self.sockets)):
            for ch, path in table:
                f.add(kind, f"{ch} {path}")
        return f

    @classmethod
    def from_fields(cls, fields: Fields) -> Start:
        argv = tuple(fields.getall("arg"))
        recipe = fields.get("recipe")
        if recipe is not None and len(recipe) > MAX_RECIPE:
            raise BadStart(f"recipe longer than {MAX_RECIPE} bytes")
        if not argv and recipe is None:
            raise BadStart("no command given")
        if argv and recipe is not None:
            raise BadStart("a command and a recipe at once")
        env = []
        for item in fields.getall("env"):
            name, eq, value = item.partition("=")
            if not eq or not name.isidentifier():
                raise BadStart(f"bad environment entry {item[:40]!r} (expected NAME=VALUE)")
            env.append((name, value))
        seen: set[int] = set()
        tables: dict[str, list[tuple[int, str]]] = {"infifo": [], "outfifo": [], "socket": []}
        for kind, table in tables.items():
            for item in fields.getall(kind):
                ch_text, _, path = item.partition(" ")
                if (
                    not ch_text.isascii()
                    or not ch_text.isdigit()
                    or len(ch_text) > 4
                    or not wire.FIRST_CLIENT_CHANNEL <= int(ch_text) < wire.FIRST_SERVER_CHANNEL
                    or not path.startswith("/")
                ):
                    raise BadStart(f"bad {kind} entry {item[:60]!r} (expected CHANNEL /absolute/path)")
                if int(ch_text) in seen:
                    raise BadStart(f"channel {ch_text} is used twice")
                seen.add(int(ch_text))
                table.append((int(ch_text), path))
        return cls(
            argv,
            recipe,
            fields.get("user") or None,
            tuple(env),
            tuple(tables["infifo"]),
            tuple(tables["outfifo"]),
            tuple(tables["socket"]),
        )


@frozen_record
class Started(FrozenRecord):
    """START's answer: it runs (ok), or why not and the status to exit with."""

    TYPE: ClassVar[int] = wire.START
    ok: bool
    message: str = ""
    status: int = 0

    def to_fields(self) -> Fields:
        return Fields.of(ok=1) if self.ok else Fields.of(ok=0, message=self.message, status=self.status)

    @classmethod
    def from_fields(cls, fields: Fields) -> Started:
        if fields.get("ok") == "1":
            return cls(True)
        status = fields.int("status", 1, 255) if fields.get("status") is not None else 255
        return cls(False, fields.get("message") or "refused", status)


@frozen_record
class Data(FrozenRecord):
    """Bytes on a channel. On the wire: the `data` values, joined by NUL, are the bytes (a NUL in them
    ends one value and the next `data` pair goes on), so binary data needs no encoding; bytes with many
    NULs go instead as one `base64` value."""

    TYPE: ClassVar[int] = wire.DATA
    ch: int
    data: bytes

    def to_fields(self) -> Fields:
        fields = Fields.of(ch=self.ch).add_pieces("data", self.data)
        if len(fields.items) // 2 - 2 > min(len(self.data) // NUL_DENSITY, MAX_PIECES - 1):  # too many NULs
            fields = Fields.of(ch=self.ch, base64=wire.b64(self.data))
        return fields

    @classmethod
    def from_fields(cls, fields: Fields) -> Data:
        ch = fields.int("ch", 0, MAX_CHANNEL)
        encoded = fields.rawall("base64") if b"base64" in fields.items[0::2] else []
        pieces = fields.rawall("data") if not encoded else []
        if pieces:
            return cls(ch, b"\0".join(pieces))
        if len(encoded) == 1 and fields.raw("data") is None:
            return cls(ch, wire.unb64(encoded[0], "base64"))
        raise WireError("DATA carries its bytes as `data` values or as one `base64` value")


@frozen_record
class Eof(FrozenRecord):
    """No more data on this channel in this direction (a half-close). Sent by the end that only
    receives on the channel, it means that end reads no more (OpenSSH's eow@openssh.com): its local
    reader went away, so the sender closes what it reads from and its writer gets SIGPIPE."""

    TYPE: ClassVar[int] = wire.EOF
    ch: int

    def to_fields(self) -> Fields:
        return Fields.of(ch=self.ch)

    @classmethod
    def from_fields(cls, fields: Fields) -> Eof:
        return cls(fields.int("ch", 0, MAX_CHANNEL))


@frozen_record
class Unread(FrozenRecord):
    """Not a packet: the peer's EOF on a channel only we send on, i.e. the peer reads no more."""

    ch: int


@frozen_record
class Window(FrozenRecord):
    """The sender of this takes n more bytes on the channel."""

    TYPE: ClassVar[int] = wire.WINDOW
    ch: int
    n: int

    def to_fields(self) -> Fields:
        return Fields.of(ch=self.ch, n=self.n)

    @classmethod
    def from_fields(cls, fields: Fields) -> Window:
        return cls(fields.int("ch", 0, MAX_CHANNEL), fields.int("n", 1, MAX_GRANT))


@frozen_record
class Exit(FrozenRecord):
    """How the command ended: kind "status" (exit code) or "signal" (killed by it)."""

    TYPE: ClassVar[int] = wire.EXIT
    kind: str
    value: int

    def to_fields(self) -> Fields:
        return Fields.of((self.kind, self.value))

    @classmethod
    def from_fields(cls, fields: Fields) -> Exit:
        if fields.get("signal") is not None:
            return cls("signal", fields.int("signal", 1, 255))
        return cls("status", fields.int("status", 0, 255))


@frozen_record
class Open(FrozenRecord):
    """A new connection (channel ch) on the replicated socket of channel parent."""

    TYPE: ClassVar[int] = wire.OPEN
    ch: int
    parent: int

    def to_fields(self) -> Fields:
        return Fields.of(ch=self.ch, parent=self.parent)

    @classmethod
    def from_fields(cls, fields: Fields) -> Open:
        return cls(fields.int("ch", 0, MAX_CHANNEL), fields.int("parent", 0, MAX_CHANNEL))


@frozen_record
class Signal(FrozenRecord):
    """A signal for the command's process group, by name (INT, TERM, ...)."""

    TYPE: ClassVar[int] = wire.SIGNAL
    name: str

    def to_fields(self) -> Fields:
        return Fields.of(sig=self.name)

    @classmethod
    def from_fields(cls, fields: Fields) -> Signal:
        name = fields.need("sig")
        if len(name) > 16:
            raise WireError(f"signal name {name[:20]!r}... is too long")
        return cls(name)


SessionMessage = Start | Started | Data | Eof | Window | Exit | Open | Signal
ChannelMessage = Data | Eof | Window
