"""One netplumb connection, sans-IO, either end: the handshake (session.py), then START and the
channels, from the first byte to the last. Bytes and `now` in, events out, bytes to send queued;
deadlines (the handshake, the linger after EXIT) come out of get_timer() into handle_timer().

Phases and what moves between them are tables; anything else is a named error: ProtocolError for
the peer (answered with ERROR "protocol error: ..."), LocalProtocolError for a driver bug.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from apps.netplumb import wire
from apps.netplumb.keys import Identity
from apps.netplumb.messages import Data, Eof, Exit, Open, SessionMessage, Signal, Start, Started, Unread, Window
from apps.netplumb.session import (
    ClientSession,
    Established,
    Message,
    PeerError,
    ServerKey,
    ServerSession,
    Session,
    SessionError,
)
from apps.netplumb.wire import INITIAL_WINDOW, Fields, WireError
from transports.records import FrozenRecord, Record, frozen_record, record

MAX_CREDIT = 1 << 40  # a sender's window may not grow past this, however often it is granted


class ProtocolError(WireError):
    """The peer sent what the protocol does not allow here."""


class LocalProtocolError(Exception):
    """This end did what the protocol does not allow in its phase (a bug in the driver)."""


# -- channels ------------------------------------------------------------------------------------


@record
class _Channel(Record):
    receives: bool  # the peer sends data on it to us
    sends: bool  # we send data on it to the peer
    credit: int = INITIAL_WINDOW  # what the peer may still send before we grant more
    peer_eof: bool = False  # the peer said EOF: no more data from it (or, if it only receives: it reads no more)
    our_eof: bool = False  # (on a channel we only receive on: we said we read no more)
    window: int = INITIAL_WINDOW  # what we may still send (the peer's grants)


class Channels:
    """The channels of one session as one end sees them: checks each DATA, EOF and WINDOW of the peer
    against them and keeps the credit both ways. Thread-safe (one lock, never held over I/O)."""

    def __init__(self) -> None:
        self._by_ch: dict[int, _Channel] = {}
        self._lock = threading.Lock()

    def add(self, ch: int, receives: bool, sends: bool) -> None:
        with self._lock:
            if ch in self._by_ch:
                raise LocalProtocolError(f"channel {ch} is open already")
            self._by_ch[ch] = _Channel(receives, sends)

    def __contains__(self, ch: int) -> bool:
        return ch in self._by_ch

    def remove(self, ch: int) -> None:
        """Forget a channel done both ways (the peer's EOF came, ours went): the peer sends nothing
        more on it but late grants, which are ignored, so a session's socket connections, however
        many come and go, hold no state once closed."""
        with self._lock:
            self._by_ch.pop(ch, None)

    def received(self, msg: Data | Eof | Window) -> Data | Eof | Window | Unread | None:
        """The peer's message, checked (ProtocolError), or None for a late grant on a channel we
        stopped sending on; an EOF on a channel only we send on is Unread (the peer reads no more)."""
        with self._lock:
            c = self._by_ch.get(msg.ch)
            if isinstance(msg, Window):
                if c is None or not c.sends or c.our_eof:
                    return None
                if c.window + msg.n > MAX_CREDIT:
                    raise ProtocolError(f"window of channel {msg.ch} granted past {MAX_CREDIT} bytes")
                c.window += msg.n
                return msg
            if isinstance(msg, Eof) and c is not None and c.sends and not c.receives:
                if c.peer_eof or c.our_eof:  # said twice, or crossed with our own EOF: nothing to stop
                    return None
                c.peer_eof = True
                return Unread(msg.ch)
            if c is None or not c.receives:
                raise ProtocolError(f"data for channel {msg.ch}, which does not take data")
            if c.peer_eof:
                raise ProtocolError(f"data on channel {msg.ch} after its EOF")
            if isinstance(msg, Eof):
                c.peer_eof = True
                return msg
            if len(msg.data) > c.credit:
                raise ProtocolError(f"the peer overran the window of channel {msg.ch}")
            c.credit -= len(msg.data)
            return msg

    def grant(self, ch: int, n: int) -> None:
        with self._lock:
            self._by_ch[ch].credit += n

    def sending(self, msg: Data | Eof) -> None:
        """Check one of our DATA or EOF (LocalProtocolError): on a channel we send on, before its EOF,
        within the window the peer granted."""
        with self._lock:
            c = self._by_ch.get(msg.ch)
            if isinstance(msg, Eof) and c is not None and c.receives and not c.sends and not c.our_eof:
                c.our_eof = True  # we read no more: the data already on its way is still taken
                return
            if c is None or not c.sends or c.our_eof:
                raise LocalProtocolError(f"cannot send {type(msg).__name__} on channel {msg.ch}")
            if isinstance(msg, Eof):
                c.our_eof = True
            elif len(msg.data) > c.window:
                raise LocalProtocolError(f"{len(msg.data)} bytes on channel {msg.ch}: beyond its window")
            else:
                c.window -= len(msg.data)


# -- a connection, either end ---------------------------------------------------------------------


class Phase(enum.Enum):
    HANDSHAKE = "in the handshake"  # keys agreed, the client proving its key
    AUTHENTICATED = "before START"
    STARTING = "starting"  # START sent or received, its answer not yet
    RUNNING = "running"  # channels open both ways
    EXITED = "after EXIT"  # the command ended; the client closes
    CLOSED = "closed"


# Where each step leads; a step not listed for the current phase is an error.
SERVER_TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.HANDSHAKE, "authenticated"): Phase.AUTHENTICATED,
    (Phase.AUTHENTICATED, "START"): Phase.STARTING,
    (Phase.STARTING, "started"): Phase.RUNNING,
    (Phase.STARTING, "refused"): Phase.CLOSED,
    (Phase.RUNNING, "EXIT"): Phase.EXITED,
    **{(p, "close"): Phase.CLOSED for p in Phase},
}
CLIENT_TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.HANDSHAKE, "START"): Phase.STARTING,  # START goes right behind AUTH, a round trip less
    (Phase.STARTING, "authenticated"): Phase.STARTING,  # the welcome; START's answer comes next
    **{
        (p, step): nxt
        for (p, step), nxt in SERVER_TRANSITIONS.items()
        if step == "close" or p not in (Phase.HANDSHAKE, Phase.AUTHENTICATED)
    },
}

_CHANNEL = frozenset({wire.DATA, wire.EOF, wire.WINDOW})
# What each end takes from its peer in each phase (the handshake is session.py's own table).
SERVER_ACCEPTS: dict[Phase, frozenset[int]] = {
    Phase.AUTHENTICATED: frozenset({wire.START}),
    Phase.RUNNING: _CHANNEL | {wire.SIGNAL},
    Phase.EXITED: _CHANNEL | {wire.SIGNAL},
}
CLIENT_ACCEPTS: dict[Phase, frozenset[int]] = {
    Phase.STARTING: frozenset({wire.START}),
    Phase.RUNNING: _CHANNEL | {wire.OPEN, wire.EXIT},
    Phase.EXITED: _CHANNEL | {wire.OPEN},  # socket connections may outlive the command
}
MESSAGES: dict[int, type[SessionMessage]] = {
    wire.DATA: Data,
    wire.EOF: Eof,
    wire.WINDOW: Window,
    wire.SIGNAL: Signal,
    wire.OPEN: Open,
    wire.EXIT: Exit,
}


@frozen_record
class Authenticated(FrozenRecord):
    """The handshake is done: the peer proved it holds `key` (and was admitted, on the server)."""

    key: bytes


@frozen_record
class StartRequested(FrozenRecord):
    """What the client asks to run (its fields: their meaning is the policy's)."""

    fields: Fields


@frozen_record
class Closed(FrozenRecord):
    """The connection is over: the peer's ERROR, a protocol error, or a timer; `reason` says which."""

    reason: str


Event = (
    Authenticated | ServerKey | StartRequested | Started | Data | Eof | Unread | Window | Open | Exit | Signal | Closed
)


class Connection:
    """What both ends share: the phase table, the channels, sealing and queueing in one order.

    receive() from one thread; the send side from any: packets are sealed and queued under a lock,
    and data_to_send() hands them out in that order.
    """

    ACCEPTS: dict[Phase, frozenset[int]]
    TRANSITIONS: dict[tuple[Phase, str], Phase]
    peer = "peer"

    def __init__(self, session: Session, deadline: float | None, mtu: int) -> None:
        self.session = session
        session.max_packet = mtu
        self.channels = Channels()
        self.phase = Phase.HANDSHAKE
        self._deadline = deadline
        self._lock = threading.Lock()  # the phase
        self._tx = threading.Lock()  # sealing and queueing, so that sequence order is queue order
        self._out: list[bytes] = []

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # -- what comes in ------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Event]:
        if self.closed:
            return []
        try:
            events = self.session.receive(data)
        except SessionError as e:
            self._step("close")
            return [Closed(str(e))]
        out: list[Event] = []
        for ev in events:
            try:
                out += self._event(ev)
            except WireError as e:  # sealed right, but makes no sense: the peer learns why
                return [*out, self.close(f"protocol error: {e}")]
            if self.closed:
                break
        return out

    def _event(self, ev: object) -> list[Event]:
        if isinstance(ev, ServerKey):
            return [ev]
        if isinstance(ev, Established):
            self._step("authenticated")
            return self._authenticated(ev.peer)
        if isinstance(ev, PeerError):
            self._step("close")
            return [Closed(f"the {self.peer} ended the session: {ev.message}")]
        assert isinstance(ev, Message)
        if ev.type not in self.ACCEPTS.get(self.phase, ()):
            raise ProtocolError(f"unexpected {wire.TYPE_NAMES.get(ev.type, ev.type)} packet {self.phase.value}")
        if ev.type == wire.START:
            return self._start(ev.fields)
        msg = MESSAGES[ev.type].from_fields(ev.fields)
        if isinstance(msg, Data | Eof | Window):
            checked = self.channels.received(msg)
            return [] if checked is None else [checked]
        return self._other(msg)

    def _authenticated(self, key: bytes) -> list[Event]:
        return [Authenticated(key)]

    def _start(self, fields: Fields) -> list[Event]:
        raise NotImplementedError

    def _other(self, msg: SessionMessage) -> list[Event]:
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """When handle_timer must be called next, or None."""
        return self._deadline

    def handle_timer(self, now: float) -> list[Event]:
        if self._deadline is None or now < self._deadline:
            return []
        return [self.close(self._timed_out())]

    def _timed_out(self) -> str:
        raise NotImplementedError

    # -- what goes out --------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        with self._tx:
            out, self._out = self.session.data_to_send() + self._out, []
        return out

    def has_output(self) -> bool:
        """Whether something waits in data_to_send() (seen without a lock: a thread that queues
        something sends it itself, so only what this thread queued needs to be seen)."""
        return bool(self._out) or self.session.has_output()

    def add_channel(self, ch: int, receives: bool, sends: bool) -> None:
        self.channels.add(ch, receives, sends)

    def remove_channel(self, ch: int) -> None:
        self.channels.remove(ch)

    def send_data(self, ch: int, data: bytes) -> None:
        """DATA on a channel: one packet, or as many as the bytes take."""
        msg = Data(ch, data)
        plain = wire.encode_pairs(msg.to_fields())
        if len(plain) > self.session.room and len(data) > 1:
            half = len(data) // 2
            self.send_data(ch, data[:half])
            self.send_data(ch, data[half:])
            return
        self.channels.sending(msg)
        self._send(msg, plain)

    def send_eof(self, ch: int) -> None:
        msg = Eof(ch)
        self.channels.sending(msg)
        self._send(msg)

    def grant(self, ch: int, n: int) -> None:
        """We wrote n more bytes of the channel out: the peer may send that much more."""
        self.channels.grant(ch, n)
        self._send(Window(ch, n))

    def close(self, reason: str) -> Closed:
        """End the connection telling the peer why (sealed once keys exist, else in clear)."""
        with self._tx:
            if not self.closed:
                self._step("close")
                self._out.append(self.session.error(reason))
        return Closed(reason)

    def _send(self, msg: SessionMessage, plain: bytes | None = None) -> None:
        """Seal and queue a message (plain: its fields, encoded already)."""
        encoded = wire.encode_pairs(msg.to_fields()) if plain is None else plain
        with self._tx:
            if self.closed:
                raise LocalProtocolError(f"cannot send {type(msg).__name__}: the connection is closed")
            self._out.append(self.session.send(msg.TYPE, encoded))

    def _step(self, step: str) -> None:
        with self._lock:
            nxt = self.TRANSITIONS.get((self.phase, step))
            if nxt is None:
                raise LocalProtocolError(f"{step} is not allowed {self.phase.value}")
            self.phase = nxt
            self._deadline = self._timer(nxt, self._deadline)

    def _timer(self, phase: Phase, deadline: float | None) -> float | None:
        """The deadline in a phase just entered."""
        return None if phase is Phase.CLOSED else deadline


class ServerConnection(Connection):
    """netplumbd's side: the client has login_grace seconds from arrival to authenticate and send
    START, and `linger` after EXIT to close."""

    ACCEPTS = SERVER_ACCEPTS
    TRANSITIONS = SERVER_TRANSITIONS
    peer = "client"

    def __init__(
        self,
        identity: Identity,
        authorize: Callable[[bytes], str | None],
        now: float,
        login_grace: float,
        linger: float,
        mtu: int = wire.MAX_PACKET,
    ) -> None:
        super().__init__(ServerSession(identity, authorize), now + login_grace, mtu)
        self.login_grace = login_grace
        self.linger = linger

    def _start(self, fields: Fields) -> list[Event]:
        self._step("START")
        return [StartRequested(fields)]

    def _other(self, msg: SessionMessage) -> list[Event]:
        assert isinstance(msg, Signal)
        return [msg]

    def _timer(self, phase: Phase, deadline: float | None) -> float | None:
        return deadline if phase in (Phase.HANDSHAKE, Phase.AUTHENTICATED) else None

    def _timed_out(self) -> str:
        if self.phase is Phase.EXITED:
            return "the client did not close after the command ended"
        return f"no command asked for within {self.login_grace:g} s (--login-grace-time)"

    def started(self) -> None:
        self._step("started")
        self._send(Started(True))

    def refuse_start(self, message: str, status: int) -> None:
        self._send(Started(False, message, status))
        self._step("refused")

    def open_connection(self, ch: int, parent: int) -> None:
        """A connection on replicated socket `parent`: a new channel both ways, announced by OPEN."""
        self.channels.add(ch, receives=True, sends=True)
        self._send(Open(ch, parent))

    def exited(self, kind: str, value: int, now: float) -> None:
        self._send(Exit(kind, value))
        self._step("EXIT")
        self._deadline = now + self.linger


class ClientConnection(Connection):
    """plumb's side: START goes out right behind AUTH, once the server proved its key; the handshake
    and START's answer must come within `timeout` seconds."""

    ACCEPTS = CLIENT_ACCEPTS
    TRANSITIONS = CLIENT_TRANSITIONS
    peer = "server"

    def __init__(
        self,
        identity: Identity,
        check_host: Callable[[bytes], object],
        start: Start,
        now: float,
        timeout: float,
        mtu: int = wire.MAX_PACKET,
    ) -> None:
        super().__init__(ClientSession(identity, check_host), now + timeout, mtu)
        self.start = start
        self.timeout = timeout
        self.sockets = {ch for ch, _ in start.sockets}

    def connect(self) -> None:
        assert isinstance(self.session, ClientSession)
        with self._tx:
            self.session.start()

    def _event(self, ev: object) -> list[Event]:
        if isinstance(ev, ServerKey):  # our AUTH is queued
            self._step("START")
            self._send(self.start)
        return super()._event(ev)

    def _start(self, fields: Fields) -> list[Event]:
        answer = Started.from_fields(fields)
        self._step("started" if answer.ok else "refused")
        return [answer]

    def _other(self, msg: SessionMessage) -> list[Event]:
        if isinstance(msg, Open):
            if msg.parent not in self.sockets or msg.ch < wire.FIRST_SERVER_CHANNEL or msg.ch in self.channels:
                raise ProtocolError(f"OPEN of channel {msg.ch} on unknown socket {msg.parent}")
            self.channels.add(msg.ch, receives=True, sends=True)
            return [msg]
        assert isinstance(msg, Exit)
        self._step("EXIT")
        return [msg]

    def _timer(self, phase: Phase, deadline: float | None) -> float | None:
        return deadline if phase in (Phase.HANDSHAKE, Phase.AUTHENTICATED, Phase.STARTING) else None

    def _timed_out(self) -> str:
        return f"no answer within {self.timeout:g} s"

    def signal(self, name: str) -> None:
        self._send(Signal(name))
