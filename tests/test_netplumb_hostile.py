"""netplumbd against hostile peers: malformed, replayed, oversized and resource-exhausting TAP1, played
by uid 65534 over real flows while a legitimate client keeps being served. netplumbd must survive
everything, in bounded memory, CPU and threads; and the sans-IO session must only ever raise its own
named error, whatever it is fed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from netplumb_lab import NOBODY, needs_root, running_lab

from apps.netplumb import wire
from apps.netplumb.connection import Closed, ServerConnection
from apps.netplumb.driver import PREAUTH_RCV_BUF
from apps.netplumb.keys import Identity
from apps.netplumb.session import ClientSession, ServerSession
from apps.netplumb.wire import Fields, Packet
from proto.visible import visible

# -- the sans-IO session, fed anything -------------------------------------------------------------

SERVER, CLIENT = Identity.generate(), Identity.generate()


def _server() -> ServerConnection:
    return ServerConnection(SERVER, lambda key: None if key == CLIENT.public else "not authorized", 0.0, 15.0, 30.0)


def _legit_flight() -> list[bytes]:
    """The packets of a well-behaved client up to an established session and a START."""
    c, s = ClientSession(CLIENT, lambda key: None), ServerSession(SERVER, lambda key: None)
    c.start()
    out = []
    for _ in range(2):
        for data in c.data_to_send():
            out.append(data)
            s.receive(data)
        for data in s.data_to_send():
            c.receive(data)
    out.append(c.send(wire.START, Fields.of(arg="true")))
    return out


FLIGHT = _legit_flight()


@st.composite
def hostile_flights(draw: st.DrawFn) -> list[bytes]:
    """A legitimate flight, cut, reordered, replayed, damaged, padded or interleaved with junk."""
    packets = list(FLIGHT)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(packets) - 1))
        how = draw(st.sampled_from(["replay", "drop", "swap", "flip", "junk", "concat", "oversize", "cut"]))
        if how == "replay":
            packets.insert(i, packets[i])
        elif how == "drop" and len(packets) > 1:
            del packets[i]
        elif how == "swap":
            j = draw(st.integers(0, len(packets) - 1))
            packets[i], packets[j] = packets[j], packets[i]
        elif how == "flip" and packets[i]:
            data = bytearray(packets[i])
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            packets[i] = bytes(data)
        elif how == "junk":
            packets.insert(i, draw(st.binary(max_size=300)))
        elif how == "concat" and i + 1 < len(packets):
            packets[i : i + 2] = [packets[i] + packets[i + 1]]
        elif how == "oversize":
            packets.insert(i, wire.HEADER.pack(wire.MAGIC, draw(st.sampled_from([0, 16, 65536, 2**32 - 1])), 0))
        elif how == "cut":
            packets[i] = packets[i][: draw(st.integers(0, len(packets[i])))]
    return packets


@settings(max_examples=400)
@given(hostile_flights())
def test_any_hostile_flight_ends_in_a_reason_never_an_exception(flight: list[bytes]) -> None:
    s = _server()
    for now, data in enumerate(flight):
        events = s.receive(data, float(now))
        s.data_to_send()
        if s.closed:
            assert isinstance(events[-1], Closed) and events[-1].reason
            break
        assert len(s.session._dec._buf) == 0  # one packet per SDU: nothing a peer sends is kept for later
    if not s.closed and s.get_timer() is not None:  # a flight that stopped short: the grace time ends it
        assert s.handle_timer(1e9) == [Closed("no command asked for within 15 s (--login-grace-time)")]


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=wire.MAX_PACKET + 100), max_size=4))
def test_garbage_sdus_are_bounded(sdus: list[bytes]) -> None:
    s = _server()
    for data in sdus:
        s.receive(data, 0.0)
        assert len(s.session._dec._buf) == 0


def test_many_pairs_and_the_largest_packet_are_bounded() -> None:
    pairs = wire.encode_pairs([("x", "")] * (wire.MAX_PAIRS + 1))
    assert _server().receive(wire.encode(Packet(0, wire.HELLO, pairs)), 0.0) == [
        Closed("more than 4096 name/value pairs")
    ]
    (closed,) = _server().receive(wire.HEADER.pack(wire.MAGIC, wire.MAX_PACKET + 1, 0) + bytes(wire.MAX_PACKET), 0.0)
    assert isinstance(closed, Closed) and f"or size {wire.MAX_PACKET + 1}" in closed.reason


# -- netplumbd over real flows -------------------------------------------------------------------

ATTACKS = r"""
import os, socket, sys, threading, time
from apps.netplumb import wire
from apps.netplumb.keys import Identity
from apps.netplumb.session import ClientSession, SessionError
from apps.netplumb.wire import Fields, Packet
from flowlib.frct import RCV_BUF
from flowlib import FlowError, QosSpec, flow_alloc, qos
from flowlib.irm import IrmClient
LOW_ORDER_HELLO = b'OUKX\x01' + bytes(32)  # the former in-band hello, with the all-zero key

STRANGER = Identity.generate()

def flow(q=qos.data):
    f = flow_alloc("host2", qos=q, timeout=10)
    f.set_timeout(3)
    return f

def drain(f):
    try:
        while f.read():
            pass
    except FlowError:
        pass

def pkt(seq, ptype, pairs):
    return wire.encode(Packet(seq, ptype, wire.encode_pairs(pairs)))

def hello(seq=0, eph=None):
    return pkt(seq, wire.HELLO, [("version", "1"), ("eph", wire.b64(eph if eph is not None else os.urandom(32)))])

def handshaken(key=STRANGER):
    # a client through HELLO, its AUTH ready to go
    f = flow()
    c = ClientSession(key, lambda k: None)
    c.start()
    for d in c.data_to_send():
        f.write(d)
    c.receive(f.read())
    return f, c

def one(name, fn):
    t0 = time.monotonic()
    try:
        fn()
        out = "done"
    except Exception as e:
        out = f"{type(e).__name__}: {str(e)[:60]}"
    print(f"{name}: {out} ({time.monotonic() - t0:.1f} s)", flush=True)

def garbage():
    for size in (1, 16, 17, 1000, 65000):
        f = flow(); f.write(os.urandom(size)); drain(f); f.close()

def truncated():
    f = flow(); f.write(wire.HEADER.pack(wire.MAGIC, 100, 0) + b"x" * 20); drain(f); f.close()

def oversized():
    for size in (2**32 - 1, 65536, 0):
        f = flow(); f.write(wire.HEADER.pack(wire.MAGIC, size, 0) + bytes(64)); drain(f); f.close()
    f = flow(); f.write(wire.encode(Packet(0, 200, os.urandom(65535 - 17)))); drain(f); f.close()

def bad_crc_and_seq():
    f = flow(); d = bytearray(hello()); d[-3] ^= 1; f.write(bytes(d)); drain(f); f.close()
    f = flow(); f.write(hello(seq=5)); drain(f); f.close()

def replayed_hello():
    f = flow(); h = hello(); f.write(h); f.write(h); drain(f); f.close()

def hello_flood():
    f = flow()
    try:
        for seq in range(2000):
            f.write(hello(seq))
    except FlowError:
        pass
    drain(f); f.close()

def many_pairs():
    f = flow(); f.write(pkt(0, wire.HELLO, [("version", "1")] + [("x", "y")] * 4200)); drain(f); f.close()

def low_order_keys():
    for eph in (bytes(32), bytes([1]) + bytes(31), bytes([0xe0, 0xeb, 0x7a, 0x7c]) + bytes(28)):
        f = flow(); f.write(hello(eph=eph)); drain(f); f.close()

def auth_garbage():
    f, c = handshaken(); f.write(wire.encode(Packet(1, wire.AUTH, os.urandom(200)))); drain(f); f.close()

def auth_bad_signature():
    f, c = handshaken()
    c.data_to_send()  # its real AUTH goes nowhere: a forged one in its place, same sequence and nonce
    c._tx.counter -= 1
    c._enc.seq -= 1
    f.write(c._packet(wire.AUTH, Fields.of(key=wire.b64(Identity.generate().public), sig=wire.b64(bytes(64)))))
    drain(f); f.close()

def unauthorized_then_spam():
    f, c = handshaken()
    for d in c.data_to_send():
        f.write(d)
    try:
        c.receive(f.read())
    except SessionError:
        pass
    try:
        for _ in range(200):
            f.write(os.urandom(100))
    except FlowError:
        pass
    drain(f); f.close()

def hangups():
    for stage in range(3):
        f = flow()
        if stage >= 1:
            f.write(hello())
        if stage >= 2:
            f.read()
        f.close()

def encrypted_flows():
    irm = IrmClient()
    for hello_bytes in (b"xyz", LOW_ORDER_HELLO, b""):
        reply, fd = irm.alloc("host2", QosSpec(cypher_s=256), 5.0)
        if hello_bytes:
            os.write(fd, hello_bytes)
        time.sleep(0.2)
        os.close(fd)
        irm.dealloc(reply.flow_id)

def burst():
    # many at once: the limits refuse most, with a reason, and nothing piles up (each holds its
    # connection a moment before its garbage, so the ones the IRMd lets through meet at netplumbd)
    def one_garbage():
        try:
            f = flow(); time.sleep(0.5); f.write(os.urandom(50)); drain(f); f.close()
        except FlowError:
            pass
    ts = [threading.Thread(target=one_garbage) for _ in range(30)]
    for t in ts: t.start()
    for t in ts: t.join()

def silent_until_grace():
    fs = [flow() for _ in range(3)]
    time.sleep(float(sys.argv[1]) + 1.5)
    for f in fs:
        drain(f); f.close()

HELPERS = ("flow", "drain", "pkt", "hello", "handshaken", "one")
for name, fn in list(globals().items()):
    if callable(fn) and getattr(fn, "__module__", "") == "__main__" and name not in HELPERS:
        one(name, fn)
print("all attacks played", flush=True)
"""

GRACE = 3.0


def _proc_stat(pid: int) -> tuple[float, int, int]:
    """CPU seconds, RSS in KiB, threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return cpu, rss, int(fields[17])


@needs_root
@pytest.mark.timeout(240)
def test_netplumbd_survives_hostile_peers_and_serves_meanwhile() -> None:
    with running_lab(["--login-grace-time", str(GRACE)]) as lab:
        alice = lab.client("alice")
        assert lab.plumb(alice, "echo", "warm").stdout == b"warm\n"
        assert lab.proc is not None
        pid = lab.proc.pid
        cpu0, rss0, threads0 = _proc_stat(pid)
        peak = [rss0]
        served: list[tuple[int, bytes]] = []
        done = threading.Event()

        def legit() -> None:
            n = 0
            while not done.is_set():
                r = lab.plumb(alice, "echo", f"legit-{n}", timeout=60)
                served.append((r.returncode, r.stdout))
                n += 1

        def sample() -> None:
            while not done.is_set():
                with contextlib.suppress(OSError, StopIteration):
                    peak.append(_proc_stat(pid)[1])
                time.sleep(0.05)

        helpers = [threading.Thread(target=legit), threading.Thread(target=sample)]
        for t in helpers:
            t.start()
        try:
            attack = lab.py(NOBODY, ATTACKS, str(GRACE), timeout=180)
        finally:
            done.set()
            for t in helpers:
                t.join(90)
        assert "all attacks played" in attack.stdout, attack.stdout + attack.stderr
        assert lab.proc.poll() is None, lab.log_text()[-2000:]
        # A legitimate client was served all along, every time.
        assert served and served == [(0, f"legit-{n}\n".encode()) for n in range(len(served))], served
        # And still is; what the attacks took is given back.
        assert lab.plumb(alice, "echo", "after").stdout == b"after\n"
        cpu1, _, _ = _proc_stat(pid)

        def settled() -> bool:
            return _proc_stat(pid)[2] <= threads0 + 2

        deadline = time.monotonic() + 30
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.2)
        _, rss1, threads1 = _proc_stat(pid)
        log = lab.log_text()
        report = (
            f"{len(served)} legit sessions served during the attacks; netplumbd CPU {cpu1 - cpu0:.1f} s, "
            f"RSS {rss0 // 1024} -> peak {max(peak) // 1024} -> {rss1 // 1024} MiB, threads {threads0} -> "
            f"{threads1}\n{attack.stdout}"
        )
        print(report)
        assert threads1 <= threads0 + 2, report
        assert max(peak) - rss0 < 48 * 1024, report
        assert cpu1 - cpu0 < 30, report
        assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
        for needle in (
            "rejected a packet",
            "too many",
            f"no command asked for within {GRACE:g} s",
            "not authorized",
            "could not prove",
        ):
            assert needle in log, needle


@needs_root
def test_a_silent_peer_does_not_hold_up_accept() -> None:
    """The handshake runs off the accept path: a peer saying nothing costs a slot, not the service."""
    with running_lab(["--login-grace-time", "30"]) as lab:
        alice = lab.client("alice")
        hold = lab.popen_py(
            NOBODY,
            "import time\nfrom flowlib import flow_alloc, qos\n"
            "f = [flow_alloc('host2', qos=qos.data, timeout=10) for _ in range(3)]\n"
            "print('holding', flush=True); time.sleep(60)\n",
        )
        try:
            assert hold.stdout is not None and hold.stdout.readline() == "holding\n"
            t0 = time.monotonic()
            r = lab.plumb(alice, "echo", "served")
            assert r.stdout == b"served\n" and time.monotonic() - t0 < 10, r.stderr
        finally:
            hold.kill()
            hold.wait()
        assert lab.proc is not None and lab.proc.poll() is None


OUT_OF_ORDER = r"""
import socket, sys, time
from flowlib.frct import ACK, DATA, DRF, FC, FFGM, MFGM, PCI, SACK, SACK_BLOCK
from flowlib.irm import IrmClient
from proto.qos import data as reliable
irm = IrmClient()
flows, sent, window, sacked = [], 0, 0, 0
for i in range(int(sys.argv[1])):
    reply, fd = irm.alloc("host2", reliable, 10)
    s = socket.socket(fileno=fd)
    payload = b"B" * (reply.mtu - PCI.size)
    # A first fragment opens the run; the PDU after it never comes, so none behind it becomes an SDU.
    s.send(PCI.pack((DRF | DATA | FFGM | MFGM) << 24 | 1024, 1000, 0) + payload)
    for seq in range(1002, 1102):  # past any window: 4 MiB is 64 of them
        s.send(PCI.pack((DATA | MFGM) << 24 | 1024, seq, 0) + payload)
        sent += len(payload)
    flows.append(s)
    # What netplumbd says it takes (its window's edge) and holds (SACK blocks), in PDUs.
    s.settimeout(0.5)
    try:
        while pdu := s.recv(65536):
            word, _, ackno = PCI.unpack_from(pdu)
            if word >> 24 & ACK and word >> 24 & FC:
                window = max(window, (word - ackno) & 0xFFFFFF)
            if word >> 24 & SACK:
                ends = [SACK_BLOCK.unpack_from(pdu, off) for off in range(PCI.size, len(pdu), SACK_BLOCK.size)]
                sacked = max(sacked, sum(end - start for start, end in ends))
    except TimeoutError:
        pass
print("sent", sent >> 20, "window", window, "sacked", sacked, "pdu", len(payload), flush=True)
time.sleep(60)
"""


@needs_root
@pytest.mark.timeout(120)
def test_unauthenticated_peers_hold_a_small_receive_window() -> None:
    """uid 65534, with no key, opens 24 connections (limits raised to let it) and sends each ~6 MB of
    PDUs behind a hole, which never become an SDU: before the handshake netplumbd's FRCT window is a
    packet or two (PREAUTH_RCV_BUF), not RCV_BUF (4 MiB, ~100 MiB for them all), and that is all it
    holds; an authenticated client beside it gets the full window and moves 8 MB."""
    n = 24
    with running_lab(["--max-startups", str(n + 1), "--per-peer-startups", str(n), "--login-grace-time", "60"]) as lab:
        alice = lab.client("alice")
        assert lab.plumb(alice, "echo", "warm").stdout == b"warm\n"
        assert lab.proc is not None
        rss0 = _proc_stat(lab.proc.pid)[1]
        p = lab.popen_py(NOBODY, OUT_OF_ORDER, str(n))
        try:
            assert p.stdout is not None
            words = p.stdout.readline().split()
            assert words[:1] == ["sent"] and int(words[1]) > 100, words or p.communicate(timeout=10)
            window, sacked, pdu = int(words[3]), int(words[5]), int(words[7])
            assert 0 < window * pdu <= PREAUTH_RCV_BUF and sacked * pdu < PREAUTH_RCV_BUF, words
            big = os.urandom(8 << 20)
            r = lab.plumb(alice, "cat", input=big, timeout=60)  # served beside it, at full speed
            assert r.returncode == 0 and r.stdout == big, r.stderr
            grown = (_proc_stat(lab.proc.pid)[1] - rss0) // 1024
        finally:
            p.kill()
            p.wait()
        assert grown < 32, f"netplumbd grew {grown} MiB"


# -- plumb against a hostile server ----------------------------------------------------------------


@given(st.text() | st.sampled_from(["\x1b[2J\r\n\t", "bad \udcff byte", "\u202eevil", "caf\u00e9 \u2026"]))
def test_visible_text_is_one_printable_line_and_printable_text_is_kept(text: str) -> None:
    shown = visible(text)
    assert shown.isprintable()
    assert shown == text or not text.isprintable()


HOSTILE_SERVER = r"""
import sys, time
from apps.netplumb.connection import ServerConnection, StartRequested
from apps.netplumb.keys import Identity
from apps.netplumb.server import _bind
from flowlib import flow_accept
from flowlib.irm import default_client

mode, hold = sys.argv[1], float(sys.argv[2])
irm = default_client()
_bind(irm, "host2", ["local"])
print("ready", flush=True)
f = flow_accept(irm=irm)
core = ServerConnection(Identity.generate(), lambda k: None, time.monotonic(), 15, 30, f.mtu)

def flush():
    for p in core.data_to_send():
        f.write(p)

while not any(isinstance(ev, StartRequested) for ev in core.receive(f.read(), time.monotonic())):
    flush()
flush()
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m\rplumb: fake\n"
if mode == "refuse":
    core.refuse_start("refused " + ESCAPES, 1)
elif mode == "error":
    core.close("ended " + ESCAPES)
elif mode == "exit-before-eof":  # the command's end, its output still open: never to end
    core.add_channel(0, receives=True, sends=False)
    for ch in (1, 2):
        core.add_channel(ch, receives=False, sends=True)
    core.started()
    core.send_data(1, b"out\n")
    core.exited("status", 3, time.monotonic())
elif mode == "open-flood":  # connections asked for on the client's socket (channel 3), again and again
    core.add_channel(0, receives=True, sends=False)
    for ch in (1, 2):
        core.add_channel(ch, receives=False, sends=True)
    core.started()
    for ch in range(1000, 1200):
        core.open_connection(ch, 3)
    flush()
    time.sleep(3)
    for ch in (1, 2):
        core.send_eof(ch)
    core.exited("status", 0, time.monotonic())
flush()
time.sleep(hold)
f.close()
"""


def _against_hostile_server(
    mode: str, *args: str, hold: float = 2.0, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """plumb run against a server (a script that registers host2, as root on its own machine would)
    that answers START as `mode` says and closes the flow `hold` seconds later."""
    with running_lab(None) as lab:
        alice = lab.client("alice", authorize=False)
        server = lab.popen_py(0, HOSTILE_SERVER, mode, str(hold))
        try:
            assert server.stdout is not None
            assert server.stdout.readline() == "ready\n", server.communicate(timeout=10)
            return lab.plumb(alice, *args, timeout=timeout)
        finally:
            server.kill()
            server.communicate(timeout=10)


@needs_root
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("mode", "status", "said"),
    [
        ("refuse", 1, "plumb: host2: refused "),
        ("error", 255, "plumb: host2: the server ended the session: ended "),
    ],
)
def test_plumb_shows_a_servers_words_without_their_terminal_escapes(mode: str, status: int, said: str) -> None:
    """A server's reasons (a refused START, an ERROR) are printed by plumb as its own line: their
    control characters come out as escapes, so the server can neither drive the terminal (title,
    clearing, colours) nor print a line that seems plumb's; the words themselves are all there."""
    r = _against_hostile_server(mode, "true")
    assert r.returncode == status, r
    err = r.stderr.decode()
    assert not any(c in err for c in "\x1b\x07\r"), repr(err)
    assert said + "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31m\\rplumb: fake\\n\n" in err, repr(err)
    assert err.count("\n") == 2, repr(err)  # the warning that pinned its key, and the reason


@needs_root
@pytest.mark.timeout(90)
def test_plumb_ends_with_the_commands_status_though_the_server_never_ends_its_output() -> None:
    """A server reports the command's end (EXIT) without the EOF of stdout and stderr, and keeps the
    flow open: plumb writes what came, exits with the command's status, and does not wait for the
    EOF (it reads the flow no more, so it would wait for ever, even after the server closed)."""
    r = _against_hostile_server("exit-before-eof", "true", hold=20, timeout=15)  # plumb ends before the flow
    assert (r.returncode, r.stdout) == (3, b"out\n"), r


@needs_root
@pytest.mark.timeout(90)
def test_a_server_gets_no_more_connections_on_plumbs_socket_than_netplumbd_would_give(tmp_path: Path) -> None:
    """A hostile server asks for 200 connections on the socket plumb replicates: plumb makes at most
    --max-connections' default (64) at once, refuses the rest, and ends with the command's status."""
    path = tmp_path / "app.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(256)
    os.chmod(tmp_path, 0o755)
    os.chmod(path, 0o777)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])  # kept open: each stays a connection at plumb

    threading.Thread(target=accept, daemon=True).start()
    try:
        r = _against_hostile_server("open-flood", f"-socket={path}:/remote.sock", "true", hold=5, timeout=30)
        assert r.returncode == 0, r
        assert 1 <= len(accepted) <= 64, len(accepted)
        assert b"64 connections open already" in r.stderr, r.stderr[-500:]
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


FORGED = "x\n2099-01-01 00:00:00.000 host netplumbd[1] INFO: flow 9: running rm -rf / as root (key line 1)\x1b[2J"
SEALED_ERROR = r"""
import sys
from apps.netplumb import wire
from apps.netplumb.keys import Identity
from apps.netplumb.session import ClientSession
from apps.netplumb.wire import Fields
from flowlib import FlowError, flow_alloc, qos
f = flow_alloc("host2", qos=qos.data, timeout=10)
f.set_timeout(3)
c = ClientSession(Identity.generate(), lambda k: None)
c.start()
for d in c.data_to_send():
    f.write(d)
c.receive(f.read())
c.data_to_send()  # no AUTH: an ERROR sealed with the agreed key in its place, same sequence and nonce
c._tx.counter -= 1
c._enc.seq -= 1
f.write(c._packet(wire.ERROR, Fields.of(message=sys.argv[1])))
try:
    f.read()
except FlowError:
    pass
f.close()
print("sent", flush=True)
"""


@needs_root
@pytest.mark.timeout(90)
def test_peers_cannot_write_lines_of_their_own_into_netplumbds_log() -> None:
    """uid 65534, without a key, ends its connection with an ERROR whose reason holds a line break and
    a line of netplumbd's own form; a restricted key asks for a command line with the same. Both reach
    the log inside their own record, escaped; the legitimate lines are there as ever."""
    with running_lab([]) as lab:
        alice = lab.client("alice", options='allow="echo"')
        attack = lab.py(NOBODY, SEALED_ERROR, FORGED)
        assert "sent" in attack.stdout, attack.stdout + attack.stderr
        r = lab.plumb(alice, "echo", FORGED)
        assert r.returncode == 0 and r.stdout == FORGED.encode() + b"\n", r
        wait_for(lambda: lab.log_text().count(": closed") >= 2, 10, "both connections closed")
        log = lab.log_text()
        lines = log.splitlines()
        assert not any(line.startswith("2099-") for line in lines), log
        assert "\x1b" not in log, log
        escaped = FORGED.replace("\n", "\\n").replace("\x1b", "\\x1b")
        assert any(line.endswith(f"the client ended the session: {escaped}") for line in lines), log
        assert any("running echo 'x\\n2099-01-01" in line for line in lines), log
        assert "authenticated" in log and "serving with key" in log
