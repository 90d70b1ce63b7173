"""netplumb connections, sans-IO: both ends driven by hand with a clock that is only a number; the
phase table, the timers (grace, linger), the channels' checks, and the messages' fields."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.netplumb import wire
from apps.netplumb.connection import (
    CLIENT_ACCEPTS,
    CLIENT_TRANSITIONS,
    MAX_CREDIT,
    SERVER_ACCEPTS,
    SERVER_TRANSITIONS,
    Authenticated,
    ClientConnection,
    Closed,
    Connection,
    LocalProtocolError,
    Phase,
    ServerConnection,
    StartRequested,
)
from apps.netplumb.keys import Identity
from apps.netplumb.messages import (
    BadStart,
    Data,
    Eof,
    Exit,
    Open,
    SessionMessage,
    Signal,
    Start,
    Started,
    Unread,
    Window,
)
from apps.netplumb.session import ServerKey
from apps.netplumb.wire import INITIAL_WINDOW, Fields, WireError

CLIENT, SERVER = Identity.generate(), Identity.generate()
START = Start(("cat",), sockets=((3, "/tmp/s"),))
GRACE, LINGER, TIMEOUT = 15.0, 30.0, 30.0


def pair(now: float = 0.0, allowed: bool = True) -> tuple[ClientConnection, ServerConnection]:
    c = ClientConnection(CLIENT, lambda key: None, START, now, TIMEOUT)
    s = ServerConnection(SERVER, lambda key: None if allowed else "not authorized", now, GRACE, LINGER)
    return c, s


def deliver(a: Connection, b: Connection, now: float = 0.0) -> list[object]:
    """What a queued, into b; b's events."""
    events: list[object] = []
    for data in a.data_to_send():
        events += b.receive(data, now)
    return events


def running(now: float = 0.0) -> tuple[ClientConnection, ServerConnection]:
    """Both ends with the command started: stdin, stdout and stderr open."""
    c, s = pair(now)
    c.connect()
    assert deliver(c, s, now) == []
    assert deliver(s, c, now) == [ServerKey(SERVER.public)]
    auth, req = deliver(c, s, now)  # START right behind AUTH
    assert auth == Authenticated(CLIENT.public)
    assert isinstance(req, StartRequested) and Start.from_fields(req.fields) == START
    assert deliver(s, c, now) == [Authenticated(SERVER.public)]
    for end, sends in ((s, (1, 2)), (c, (0,))):
        for ch in (0, 1, 2):
            end.add_channel(ch, receives=ch not in sends, sends=ch in sends)
    s.started()
    assert deliver(s, c, now) == [Started(True)]
    assert c.phase is s.phase is Phase.RUNNING
    return c, s


def test_a_whole_session() -> None:
    c, s = running()
    c.send_data(0, b"in")
    assert deliver(c, s) == [Data(0, b"in")]
    s.grant(0, 2)
    s.send_data(1, b"out")
    s.send_eof(1)
    assert deliver(s, c) == [Window(0, 2), Data(1, b"out"), Eof(1)]
    c.send_eof(0)
    assert deliver(c, s) == [Eof(0)]
    s.exited("status", 3, now=1.0)
    assert deliver(s, c) == [Exit("status", 3)]
    assert c.phase is s.phase is Phase.EXITED


def test_a_refused_start_closes_both_ends_with_its_reason() -> None:
    c, s = pair()
    c.connect()
    for a, b in ((c, s), (s, c), (c, s), (s, c), (c, s)):
        deliver(a, b)
    s.refuse_start("this key may only run: true", 126)
    assert deliver(s, c) == [Started(False, "this key may only run: true", 126)]
    assert c.closed and s.closed


def test_an_unauthorized_client_is_told_why() -> None:
    c, s = pair(allowed=False)
    c.connect()
    deliver(c, s)
    deliver(s, c)
    assert deliver(c, s) == [Closed("not authorized")]
    assert deliver(s, c) == [Closed("the server ended the session: not authorized")]


# -- the phase table --------------------------------------------------------------------------

STEPS = sorted({step for _, step in [*SERVER_TRANSITIONS, *CLIENT_TRANSITIONS]})


@pytest.mark.parametrize(
    "end, phase, step",
    [
        (end, p, st)
        for end, table in (("server", SERVER_TRANSITIONS), ("client", CLIENT_TRANSITIONS))
        for p in Phase
        for st in STEPS
        if (p, st) not in table
    ],
)
def test_a_step_outside_the_table_is_a_named_error(end: str, phase: Phase, step: str) -> None:
    c, s = pair()
    conn: Connection = s if end == "server" else c
    conn.phase = phase
    with pytest.raises(LocalProtocolError, match=f"{step} is not allowed"):
        conn._step(step)


def test_the_client_sends_start_behind_auth_and_the_server_takes_it_only_after() -> None:
    c, s = pair()
    c.connect()
    deliver(c, s)
    deliver(s, c)
    auth, start = c.data_to_send()  # both sealed before the server welcomed us
    assert c.phase is Phase.STARTING
    assert s.receive(auth, 0.0) == [Authenticated(CLIENT.public)] and s.phase is Phase.AUTHENTICATED
    (req,) = s.receive(start, 0.0)
    assert isinstance(req, StartRequested) and s.phase is Phase.STARTING


def test_a_refused_client_has_its_start_go_unread() -> None:
    c, s = pair(allowed=False)
    c.connect()
    deliver(c, s)
    deliver(s, c)
    assert deliver(c, s) == [Closed("not authorized")]  # START came too: nothing of it was read
    assert s.closed and s.phase is Phase.CLOSED


def test_every_phase_but_closed_can_close_and_closing_twice_is_harmless() -> None:
    for phase in Phase:
        assert SERVER_TRANSITIONS[(phase, "close")] is CLIENT_TRANSITIONS[(phase, "close")] is Phase.CLOSED
    c, s = running()
    assert s.close("bye") == Closed("bye") and s.close("again") == Closed("again")
    assert deliver(s, c) == [Closed("the server ended the session: bye")]


SEALED = [wire.START, wire.DATA, wire.EOF, wire.WINDOW, wire.EXIT, wire.OPEN, wire.SIGNAL, 30, 98]


def _fields(ptype: int, ch: int) -> Fields:
    """A well-formed message of the type, on a channel the receiver takes data on."""
    return {
        wire.START: START.to_fields(),
        wire.DATA: Data(ch, b"x").to_fields(),
        wire.EOF: Eof(ch).to_fields(),
        wire.WINDOW: Window(1, 5).to_fields(),
        wire.EXIT: Exit("status", 0).to_fields(),
        wire.OPEN: Open(1000, 3).to_fields(),
        wire.SIGNAL: Signal("INT").to_fields(),
    }.get(ptype, Fields())


@pytest.mark.parametrize("phase", [Phase.AUTHENTICATED, Phase.RUNNING, Phase.EXITED])
@pytest.mark.parametrize("ptype", SEALED)
def test_the_server_takes_only_what_its_table_lists(phase: Phase, ptype: int) -> None:
    c, s = running()
    s.phase = phase
    events = s.receive(c.session.send(ptype, _fields(ptype, 0)), 0.0)
    if ptype in SERVER_ACCEPTS[phase]:
        assert not any(isinstance(e, Closed) for e in events), events
    else:
        name = wire.TYPE_NAMES.get(ptype, ptype)
        assert events == [Closed(f"protocol error: unexpected {name} packet {phase.value}")]
        assert deliver(s, c)[-1] == Closed(
            f"the server ended the session: protocol error: unexpected {name} packet {phase.value}"
        )


@pytest.mark.parametrize("phase", [Phase.STARTING, Phase.RUNNING, Phase.EXITED])
@pytest.mark.parametrize("ptype", SEALED)
def test_the_client_takes_only_what_its_table_lists(phase: Phase, ptype: int) -> None:
    c, s = running()
    c.phase = phase
    events = c.receive(s.session.send(ptype, _fields(ptype, 1)), 0.0)
    closed = [e for e in events if isinstance(e, Closed)]
    if ptype in CLIENT_ACCEPTS[phase]:
        assert not closed, events
    else:
        assert closed and "unexpected" in closed[0].reason


# -- timers -------------------------------------------------------------------------------------


def test_login_grace_ends_a_silent_client_in_clear() -> None:
    c, s = pair(now=100.0)
    assert s.get_timer() == 100.0 + GRACE
    assert s.handle_timer(100.0 + GRACE - 0.1) == []
    why = f"no command asked for within {GRACE:g} s (--login-grace-time)"
    assert s.handle_timer(100.0 + GRACE) == [Closed(why)]
    (refusal,) = s.data_to_send()
    assert wire.decode(refusal).type == wire.REFUSE  # no key agreed: said in clear
    c.connect()
    assert c.receive(refusal, 100.0) == [Closed(f"the server ended the session: {why}")]


def test_login_grace_covers_authentication_and_stops_at_start() -> None:
    c, s = pair()
    c.connect()
    for a, b in ((c, s), (s, c)):
        deliver(a, b)
    auth, _ = c.data_to_send()  # a client that proves its key but asks for nothing
    s.receive(auth, 0.0)
    assert s.phase is Phase.AUTHENTICATED and s.get_timer() == GRACE  # authenticated, no START yet
    assert s.handle_timer(GRACE) == [Closed(f"no command asked for within {GRACE:g} s (--login-grace-time)")]
    assert wire.decode(s.data_to_send()[-1]).type == wire.ERROR  # after the welcome; keys agreed: sealed
    c, s = running()
    assert s.get_timer() is None


def test_linger_after_exit() -> None:
    _, s = running()
    s.exited("status", 0, now=50.0)
    assert s.get_timer() == 50.0 + LINGER
    assert s.handle_timer(50.0 + LINGER) == [Closed("the client did not close after the command ended")]


def test_client_gives_up_waiting_for_the_answer() -> None:
    c, _ = pair(now=10.0)
    c.connect()
    assert c.get_timer() == 10.0 + TIMEOUT
    assert c.handle_timer(10.0 + TIMEOUT) == [Closed(f"no answer within {TIMEOUT:g} s")]
    c, _ = running()
    assert c.get_timer() is None


# -- channels ------------------------------------------------------------------------------------


def test_the_peer_cannot_overrun_a_window_and_grants_restore_it() -> None:
    c, s = running()
    c.channels._by_ch[0].window = INITIAL_WINDOW * 2  # a client that ignores the window it got
    chunk = b"\xff" * (INITIAL_WINDOW // 32)
    for _ in range(32):
        assert s.receive(c.session.send(wire.DATA, Data(0, chunk).to_fields()), 0.0) == [Data(0, chunk)]
    s.grant(0, 1)
    assert s.receive(c.session.send(wire.DATA, Data(0, b"x").to_fields()), 0.0) == [Data(0, b"x")]
    assert s.receive(c.session.send(wire.DATA, Data(0, b"y").to_fields()), 0.0) == [
        Closed("protocol error: the peer overran the window of channel 0")
    ]


@pytest.mark.parametrize(
    "msgs, why",
    [
        ([Data(1, b"x")], "data for channel 1, which does not take data"),  # stdout: ours to send
        ([Data(7, b"x")], "data for channel 7, which does not take data"),
        ([Eof(0), Data(0, b"x")], "data on channel 0 after its EOF"),
        ([Eof(0), Eof(0)], "data on channel 0 after its EOF"),
        ([Window(1, MAX_CREDIT)], f"window of channel 1 granted past {MAX_CREDIT} bytes"),
    ],
)
def test_channel_nonsense_is_a_protocol_error(msgs: list[SessionMessage], why: str) -> None:
    c, s = running()
    events: list[object] = []
    for m in msgs:
        events += s.receive(c.session.send(m.TYPE, m.to_fields()), 0.0)
    assert events[-1] == Closed(f"protocol error: {why}")


def test_a_late_grant_is_ignored() -> None:
    c, s = running()
    s.send_eof(1)
    assert s.receive(c.session.send(wire.WINDOW, Window(1, 10).to_fields()), 0.0) == []
    assert s.receive(c.session.send(wire.WINDOW, Window(99, 10).to_fields()), 0.0) == []


def test_eof_from_the_receiving_end_says_it_reads_no_more() -> None:
    """plumb's stdout reader went away (`plumb HOST yes | head -1`): the client says EOF on channel 1,
    which the server only sends on, and the server learns to stop reading the command's stdout (as
    OpenSSH's eow@openssh.com), its stderr and EXIT still going."""
    c, s = running()
    c.send_eof(1)
    assert deliver(c, s) == [Unread(1)]
    for mistake in (lambda: c.send_eof(1), lambda: c.send_data(1, b"x")):  # said once; never data
        with pytest.raises(LocalProtocolError, match=r"cannot send .* on channel 1"):
            mistake()
    assert s.receive(c.session.send(wire.EOF, Eof(1).to_fields()), 0.0) == []  # a repeat is nothing more
    s.send_data(1, b"in flight")  # what was on its way still arrives
    s.send_data(2, b"err")
    s.send_eof(1)
    assert deliver(s, c) == [Data(1, b"in flight"), Data(2, b"err"), Eof(1)]


def test_our_own_mistakes_are_local_errors() -> None:
    _, s = running()
    with pytest.raises(LocalProtocolError, match="cannot send Data on channel 0"):
        s.send_data(0, b"x")  # stdin: the client's to send
    with pytest.raises(LocalProtocolError, match="beyond its window"):
        s.send_data(1, bytes(INITIAL_WINDOW + 1))
    s.send_eof(2)
    with pytest.raises(LocalProtocolError, match="cannot send Eof on channel 2"):
        s.send_eof(2)
    s.close("bye")
    with pytest.raises(LocalProtocolError, match="the connection is closed"):
        s.send_data(1, b"x")


def test_open_makes_a_channel_both_ways_on_a_socket_the_client_asked_for() -> None:
    c, s = running()
    s.open_connection(1000, 3)
    assert deliver(s, c) == [Open(1000, 3)]
    c.send_data(1000, b"to the server")
    s.send_data(1000, b"to the client")
    assert deliver(c, s) == [Data(1000, b"to the server")]
    assert deliver(s, c) == [Data(1000, b"to the client")]


def test_a_socket_connection_done_both_ways_is_forgotten() -> None:
    c, s = running()
    s.open_connection(1000, 3)
    deliver(s, c)
    s.send_eof(1000)
    c.send_eof(1000)
    deliver(s, c)
    deliver(c, s)
    s.remove_channel(1000)
    c.remove_channel(1000)
    assert 1000 not in s.channels and 1000 not in c.channels
    assert s.receive(c.session.send(wire.WINDOW, Window(1000, 10).to_fields()), 0.0) == []  # late: ignored
    s.open_connection(1001, 3)
    assert deliver(s, c) == [Open(1001, 3)]


@pytest.mark.parametrize("ch, parent", [(1000, 4), (5, 3)])
def test_open_on_a_socket_not_asked_for_is_a_protocol_error(ch: int, parent: int) -> None:
    c, s = running()
    events = c.receive(s.session.send(wire.OPEN, Open(ch, parent).to_fields()), 0.0)
    assert events == [Closed(f"protocol error: OPEN of channel {ch} on unknown socket {parent}")]


# -- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Start(("tar", "x"), None, "nobody", (("A", "1"),), ((3, "/a"),), ((4, "/b"),), ((5, "/c"),)),
        Start(recipe="cat\n"),
        Data(7, bytes(range(256))),
        Eof(0),
        Window(1, 1 << 20),
        Exit("status", 0),
        Exit("signal", 9),
        Open(1000, 3),
        Signal("INT"),
        Started(True),
        Started(False, "no", 127),
    ],
)
def test_messages_round_trip_through_their_fields(msg: SessionMessage) -> None:
    assert type(msg).from_fields(wire.decode_pairs(wire.encode_pairs(msg.to_fields()))) == msg


@pytest.mark.parametrize(
    "data, form",
    [
        (b"", "data"),
        (b"plain text, no NUL\n" * 100, "data"),
        (bytes(range(256)) * 200, "data"),
        (b"\0" + b"x" * 15, "data"),
        (b"\0" + b"x" * 14, "base64"),
        (bytes(5000), "base64"),
        (b"\0\0x" * 100, "base64"),
    ],
)
def test_data_goes_as_it_is_cut_at_nuls_or_as_base64_when_nuls_are_dense(data: bytes, form: str) -> None:
    fields = Data(3, data).to_fields()
    assert {k for k, _ in fields.pairs} == {b"ch", form.encode()}
    encoded = wire.encode_pairs(fields)
    if form == "data":  # the bytes themselves, each NUL costing one `data` name
        assert len(encoded) == len(b"ch\x003\x00") + len(data) + 5 * data.count(0) + len(b"data\0\0\0")
    assert Data.from_fields(wire.decode_pairs(encoded)) == Data(3, data)


@settings(max_examples=100)
@given(st.binary(max_size=3000))
def test_data_round_trips_whatever_the_bytes(data: bytes) -> None:
    assert Data.from_fields(wire.decode_pairs(wire.encode_pairs(Data(0, data).to_fields()))) == Data(0, data)


@pytest.mark.parametrize(
    "data, mtu",
    [
        (bytes(range(256)) * 256, wire.MAX_PACKET),  # 64 KiB, NULs sparse: two packets
        (bytes(60 * 1024), wire.MAX_PACKET),  # NULs only: base64, a third larger
        (bytes(range(256)) * 40, 1400),  # a flow of a small MTU
    ],
)
def test_data_too_large_for_one_packet_goes_in_several_in_order(data: bytes, mtu: int) -> None:
    c, s = running()
    c.session.max_packet = mtu
    c.send_data(0, data)
    packets = c.data_to_send()
    assert len(packets) > 1 and all(len(p) <= mtu for p in packets)
    got = [ev for p in packets for ev in s.receive(p, 0.0)]
    assert all(isinstance(ev, Data) and ev.ch == 0 for ev in got)
    assert b"".join(ev.data for ev in got if isinstance(ev, Data)) == data


@pytest.mark.parametrize(
    "cls, pairs",
    [
        (Window, [("ch", "1"), ("n", "0")]),
        (Window, [("ch", "1"), ("n", str(1 << 41))]),
        (Data, [("ch", "-1"), ("data", "")]),
        (Data, [("ch", "1")]),
        (Data, [("ch", "1"), ("base64", "!")]),
        (Data, [("ch", "1"), ("data", "x"), ("base64", "eA==")]),
        (Data, [("ch", "1"), ("base64", "eA=="), ("base64", "eA==")]),
        (Exit, [("status", "256")]),
        (Signal, [("sig", "X" * 17)]),
        (Open, [("ch", "x"), ("parent", "3")]),
    ],
)
def test_malformed_messages_are_wire_errors(cls: type[SessionMessage], pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(WireError):
        cls.from_fields(Fields.of(*pairs))


@pytest.mark.parametrize(
    "pairs, why",
    [
        ([], "no command given"),
        ([("arg", "x"), ("recipe", "y")], "a command and a recipe at once"),
        ([("recipe", "x" * 70000)], "recipe longer than"),
        ([("arg", "x"), ("env", "NOEQUALS")], "bad environment entry"),
        ([("arg", "x"), ("env", "1X=y")], "bad environment entry"),
        ([("arg", "x"), ("infifo", "3 relative")], "expected CHANNEL /absolute/path"),
        ([("arg", "x"), ("infifo", "2 /a")], "expected CHANNEL"),  # stdio's channels
        ([("arg", "x"), ("socket", "1000 /a")], "expected CHANNEL"),  # the server's
        ([("arg", "x"), ("outfifo", "٣ /a")], "expected CHANNEL"),  # a digit, but not ASCII
        ([("arg", "x"), ("infifo", "3 /a"), ("outfifo", "3 /b")], "channel 3 is used twice"),
    ],
)
def test_bad_start_fields_are_refused_with_a_reason(pairs: list[tuple[str, str]], why: str) -> None:
    with pytest.raises(BadStart, match=why):
        Start.from_fields(Fields.of(*pairs))


# -- anything at all, after the handshake -------------------------------------------------------

ANY_MESSAGE = st.one_of(
    st.builds(Data, st.integers(0, 1100), st.binary(max_size=64)),
    st.builds(Eof, st.integers(0, 1100)),
    st.builds(Window, st.integers(0, 1100), st.integers(1, 1 << 40)),
    st.builds(Signal, st.sampled_from(["INT", "x"])),
    st.builds(Exit, st.just("status"), st.integers(0, 255)),
    st.builds(Open, st.integers(0, 1100), st.integers(0, 9)),
    st.just(START),
)


@settings(max_examples=300)
@given(st.lists(ANY_MESSAGE, max_size=12), st.sampled_from([Phase.AUTHENTICATED, Phase.RUNNING, Phase.EXITED]))
def test_any_sequence_ends_in_events_or_a_reason_never_an_exception(msgs: list[SessionMessage], phase: Phase) -> None:
    c, s = running()
    s.phase = phase
    for m, now in zip(msgs, itertools.count(), strict=False):
        events = s.receive(c.session.send(m.TYPE, m.to_fields()), float(now))
        if s.closed:
            assert isinstance(events[-1], Closed) and events[-1].reason.startswith("protocol error: ")
            return
