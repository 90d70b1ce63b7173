"""The small tools' servers run as root (`oping -l`, `operf -l`, `oecho -l`, `ocbr -l`) against local users.

Each test plays the attacker as uid 65534 beside root's legitimate use of the same server. They need root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import struct
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, free_port, start_irmd, stop_irmd, udp4_bootstrap, wait_for
from test_irmd_trust import AS_NOBODY, as_nobody_env, irmd_in, public_dir, server  # noqa: F401 (a fixture)

from apps import operf, ovpn
from flowlib import FlowError, flow_accept
from flowlib.identity import Peer
from flowlib.irm import IrmClient
from proto import messages as m
from proto.control import call

pytestmark = [pytest.mark.timeout(120)]
PING = ["-n", "echo", "-c", "2", "-i", "50"]


@pytest.fixture
def host(public_dir: Path) -> Iterator[IrmdProc]:  # noqa: F811 (the fixture it takes)
    """A root IRMd with a local layer, its socket reachable by every user."""
    with irmd_in(public_dir) as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        yield irmd


def nobody_client(
    irmd: IrmdProc, code: str, ready: str, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """A Python client of uid 65534 running `code` until the end of the block; `ready` in its output says
    it has done its harm."""
    return server([*AS_NOBODY, str(BIN / "python"), "-c", textwrap.dedent(code)], irmd.env, log, ready, within=30)


def run_as_user(irmd: IrmdProc, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`argv` (it starts with its setpriv) run to its end, as that user runs a tool against `irmd`."""
    return subprocess.run(argv, env=as_nobody_env(irmd.env), capture_output=True, text=True, timeout=30, cwd="/")


def serving(irmd: IrmdProc, tool: str, name: str) -> None:
    irmd.irm_ok("bind", "program", tool, "name", name)
    irmd.irm_ok("name", "register", name, "layer", "local")


def test_a_client_that_never_reads_its_replies_holds_up_no_other_client_of_a_root_oping(host: IrmdProc) -> None:
    serving(host, "oping", "echo")
    log = host.log.parent
    with server([str(BIN / "oping"), "-l", "-Q"], host.env, log / "srv.log", "started"):
        flood = """
            import struct, time
            from flowlib import FLOWFDEFAULT, FLOWFWNOBLOCK, FLOWSFLAGS, FlowWouldBlock, flow_alloc
            f = flow_alloc("echo", timeout=10)
            f.fccntl(FLOWSFLAGS, FLOWFDEFAULT | FLOWFWNOBLOCK)
            req = struct.pack("!IIQ8x", 0, 0, 0) + bytes(1400)
            end = time.monotonic() + 3
            while time.monotonic() < end:  # requests as fast as the server takes them, no reply read
                try:
                    f.write(req)
                except FlowWouldBlock:
                    time.sleep(0.001)
            print("flooded", flush=True)
            time.sleep(60)
        """
        with nobody_client(host, flood, "flooded", log / "atk.log"):
            r = host.run("oping", "-n", "echo", "-c", "3", "-i", "50", timeout=30)
            assert "3 packets transmitted, 3 received" in r.stdout, r.stdout + r.stderr


def test_a_client_that_never_reads_holds_up_no_other_client_of_a_root_oecho(host: IrmdProc) -> None:
    serving(host, "oecho", "oecho")
    log = host.log.parent
    with server([str(BIN / "oecho"), "-l"], host.env, log / "srv.log", "Starting the server."):
        unread = """
            from flowlib import flow_alloc
            flows = [flow_alloc("oecho", timeout=10) for _ in range(8)]
            for f in flows:
                f.write(b"x" * 65_000)  # its reply waits on us
            print("sent", flush=True)
            import time; time.sleep(60)
        """
        with nobody_client(host, unread, "sent", log / "atk.log"):
            r = host.run("oecho", timeout=30)
            assert "Server replied with Client says hi!" in r.stdout, r.stdout + r.stderr


def test_one_user_holding_flows_leaves_room_at_a_root_oping(host: IrmdProc) -> None:
    serving(host, "oping", "echo")
    log = host.log.parent
    argv = ["prlimit", "--nofile=256:256", str(BIN / "oping"), "-l", "-Q"]  # a root shell's limit, smaller
    with server(argv, host.env, log / "srv.log", "started"):
        hold = """
            from flowlib import flow_alloc
            flows = []
            for _ in range(300):
                flows.append(flow_alloc("echo", timeout=10))
            print("holding", len(flows), flush=True)
            import time; time.sleep(60)
        """
        with nobody_client(host, hold, "holding", log / "atk.log"):
            assert "uid 65534 holds 64 flows" in (log / "srv.log").read_text()
            r = host.run("oping", *PING, timeout=30)
            assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr
            r = run_as_user(
                host, ["setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", str(BIN / "oping"), *PING]
            )  # another user too
            assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr
        refused = (log / "srv.log").read_text().count("refused")
        assert refused == 1, "a refusal is said once, not per flow"


def test_one_user_holding_flows_leaves_room_at_a_root_ocbr(host: IrmdProc) -> None:
    serving(host, "ocbr", "ocbr")
    log = host.log.parent
    with server([str(BIN / "ocbr"), "-l"], host.env, log / "srv.log", "Server started"):
        hold = """
            import time
            from flowlib import flow_alloc
            flows = []
            for _ in range(10):
                flows.append(flow_alloc("ocbr", timeout=5))
            print("holding", len(flows), flush=True)
            while True:  # alive, within the server's timeout (those it refused are let go)
                for f in list(flows):
                    try:
                        f.write(b"x")
                    except Exception:
                        flows.remove(f)
                time.sleep(0.3)
        """
        with nobody_client(host, hold, "holding", log / "atk.log"):
            r = host.run("ocbr", "-n", "ocbr", "-d", "1", "-r", "10000", timeout=30)
            assert r.returncode == 0 and "Failed" not in r.stdout, r.stdout + r.stderr
            text = (log / "srv.log").read_text()
            assert "uid 65534 holds 5 flows" in text, text


ESCAPES = "\x1b]0;owned\x07\x1b[2J\rhi"  # a window title, the screen cleared, the line overwritten


def test_a_clients_words_reach_a_root_oechos_terminal_as_text(host: IrmdProc) -> None:
    serving(host, "oecho", "oecho")
    log = host.log.parent
    with server([str(BIN / "oecho"), "-l"], host.env, log / "srv.log", "Starting the server."):
        r = run_as_user(host, [*AS_NOBODY, str(BIN / "oecho"), "-m", ESCAPES])
        assert "Server replied with \\x1b]0;owned\\x07\\x1b[2J\\rhi" in r.stdout, r.stdout + r.stderr
        r = host.run("oecho", timeout=30)  # the legitimate use: its words as they are
        assert r.stdout == "Server replied with Client says hi!\n", r.stdout + r.stderr
        wait_for(lambda: "Client says hi!" in (log / "srv.log").read_text(), 10, "the server's line")
        text = (log / "srv.log").read_text()
        assert "Message from client is \\x1b]0;owned\\x07\\x1b[2J\\rhi." in text and "\x1b" not in text, text
        assert "Message from client is Client says hi!." in text


@pytest.mark.timeout(20)
def test_an_operf_server_answering_anything_but_its_report_holds_the_client_2_s_at_most() -> None:
    """A server that answered the client's report request with a stream of other SDUs held the client
    for as long as it went on: it gives up after its 2 s, saying it got no report."""

    class Chatty:
        def set_timeout(self, _: float) -> None:
            pass

        def write(self, _: bytes) -> int:
            return 1

        def read(self) -> bytes:
            time.sleep(0.01)
            return b"not a report"

    args = argparse.Namespace(size=operf.MIN_SIZE)
    t0 = time.monotonic()
    assert operf.Client(args, Chatty()).ask() is None  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(20)
def test_a_waiting_ovpn_with_peer_tunnels_with_that_peer_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A remote peer of the layer got root's tunnel, whoever it was: with --peer NAME, ovpn takes only the
    flow whose verified peer is NAME (a plain flow has none), and no local user's, whatever it proves."""

    class Arrival:
        def __init__(self, uid: int | None, name: str | None) -> None:
            self.peer_uid = uid
            self.peer = None if name is None else Peer(name, f"CN={name}", "SHA256:x", "ca", b"")
            self.closed = False

        def close(self) -> None:
            self.closed = True

    arrivals = [Arrival(None, None), Arrival(None, "mallory"), Arrival(65534, "alice"), Arrival(None, "alice")]
    queue = list(arrivals)
    monkeypatch.setattr(ovpn, "flow_accept", lambda timeout=None: queue.pop(0))
    assert ovpn.accept_tunnel(None, "alice") is arrivals[3]
    assert [a.closed for a in arrivals] == [True, True, True, False]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "Refused a flow from an anonymous peer: only alice may tunnel here (--peer).",
        "Refused a flow from peer mallory: only alice may tunnel here (--peer).",
        "Refused a flow from uid 65534: only root tunnels from this host.",
    ]
    queue[:] = [first := Arrival(None, None)]  # without --peer, a remote peer is the layer's to admit, as in 0.23
    assert ovpn.accept_tunnel(None, None) is first


def serve_echo_over_udp(host: IrmdProc) -> str:
    """Root's `oping -l` for `echo` in the local layer and a udp layer on 127.0.0.1; the layer's port."""
    port = str(free_port(["127.0.0.1", "127.0.0.2", "127.0.0.3"]))
    host.irm_ok(*udp4_bootstrap("lan", "127.0.0.1", "port", port))
    host.irm_ok("bind", "program", "oping", "name", "echo")
    host.irm_ok("name", "register", "echo", "layer", "lan")
    host.irm_ok("name", "register", "echo", "layer", "local")
    host.note_children()
    return port


@contextlib.contextmanager
def remote_host(public_dir: Path, ip: str, port: str) -> Iterator[IrmdProc]:  # noqa: F811 (not the fixture)
    """Another host of the udp layer, at `ip`: an IRMd of its own."""
    remote = start_irmd(public_dir, f"remote-{ip}")
    try:
        remote.irm_ok(*udp4_bootstrap("lan", ip, "port", port, "peer", "127.0.0.1"))
        remote.note_children()
        yield remote
    finally:
        stop_irmd(remote, check=False)


@contextlib.contextmanager
def holding_from(remote: IrmdProc) -> Iterator[None]:
    """A process of the remote host allocating 250 flows to `echo` and holding them (a root one there
    is as anonymous here)."""
    hold = subprocess.Popen(
        [str(BIN / "python"), "-c", REMOTE_HOLD],
        env=remote.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert hold.stdout is not None
        line = hold.stdout.readline()
        assert line.startswith("holding"), line + hold.stdout.read()
        yield
    finally:
        hold.kill()
        hold.wait()


@pytest.mark.timeout(120)
def test_peers_proving_no_name_leave_a_root_opings_users_half_its_room(
    host: IrmdProc,
    public_dir: Path,  # noqa: F811 (the fixture it takes)
) -> None:
    """Remote peers that prove no name were one client to the server: one of them holding flows took the
    whole of what users may hold at root's `oping -l`, and a local user got none. A host of them holds a
    client's share now, and all of them together half."""
    port = serve_echo_over_udp(host)
    log = host.log.parent
    argv = ["prlimit", "--nofile=256:256", str(BIN / "oping"), "-l", "-Q"]  # users' room: 192 flows
    with (
        server(argv, host.env, log / "srv.log", "started"),
        remote_host(public_dir, "127.0.0.2", port) as remote,
        holding_from(remote),
    ):
        refused = "host 127.0.0.2 of layer lan holds 64 flows"  # a client's share (PER_CLIENT)
        wait_for(lambda: refused in (log / "srv.log").read_text(), 30, "a refusal")
        r = run_as_user(host, [*AS_NOBODY, str(BIN / "oping"), *PING])
        assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(150)
def test_one_remote_host_proving_no_name_leaves_another_its_room_at_a_root_oping(
    host: IrmdProc,
    public_dir: Path,  # noqa: F811 (the fixture it takes)
) -> None:
    """Every remote peer proving no name was one client of root's `oping -l`: one host of a udp layer
    (127.0.0.2) holding flows took the room of every other (127.0.0.3). Each host is a client of its own
    now, as the layer vouches for it (m.FlowPeer: a udp peer's IP): the other host pings beside it; and
    hosts together hold half of the users' room, so a local user still pings when both hold all they may."""
    port = serve_echo_over_udp(host)
    srv = host.log.parent / "srv.log"
    argv = ["prlimit", "--nofile=256:256", str(BIN / "oping"), "-l", "-Q"]  # users' room 192, hosts' 96
    with (
        server(argv, host.env, srv, "started"),
        remote_host(public_dir, "127.0.0.2", port) as a,
        remote_host(public_dir, "127.0.0.3", port) as b,
        holding_from(a),
    ):
        wait_for(lambda: " refused: " in srv.read_text(), 30, "a's refusal")  # a holds all it may
        r = b.run("oping", *PING)
        assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr
        assert "refused: host 127.0.0.2 of layer lan holds 64 flows" in srv.read_text()
        with holding_from(b):
            wait_for(lambda: "anonymous peers hold 96 flows" in srv.read_text(), 30, "the hosts' refusal")
            assert "host 127.0.0.3 of layer lan holds" not in srv.read_text()  # 32 it got: not its share
            r = run_as_user(host, [*AS_NOBODY, str(BIN / "oping"), *PING])
            assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr


REMOTE_HOLD = """
import time
from apps.oping import ECHO_REQUEST, HDR
from flowlib import flow_alloc
flows, errors = [], set()
for _ in range(250):
    try:
        flows.append(flow_alloc("echo", timeout=10))
    except Exception as e:
        errors.add(str(e))
print("holding", len(flows), sorted(errors), flush=True)
while True:  # a ping on each every 2 s: none is reaped as idle (10 s), each held while the test runs
    time.sleep(2)
    for flow in flows:
        try:
            flow.write(HDR.pack(ECHO_REQUEST, 0, time.monotonic_ns()) + bytes(40))
        except Exception:
            pass  # a flow the server refused
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "argv", [["ocbr", "-n", "deaf", "-d", "1", "-f"], ["operf", "-n", "deaf", "-t", "1", "-f"]], ids=["ocbr", "operf"]
)
def test_a_server_that_never_reads_holds_a_client_past_its_test_2_s_at_most(host: IrmdProc, argv: list[str]) -> None:
    """A server that took the flow and never read from it held `ocbr -n` and `operf -n` in a write for
    good, the test's duration long past: a write now waits at most that duration and 2 s more."""
    server = IrmClient(host.sock)
    try:
        call(server.channel, m.Bind("process", str(os.getpid()), "deaf"), timeout=10)
        call(server.channel, m.NameRegister("deaf", ["local"]), timeout=10)
        server.listen(True)
        t0 = time.monotonic()
        r = host.run(*argv, timeout=60)
        took = time.monotonic() - t0
        assert took < 15, f"{argv[0]} took {took:.1f} s: {r.stdout}{r.stderr}"
        assert "timed out" in r.stderr, r.stdout + r.stderr
    finally:
        for _, fd in server.take_arrived():
            os.close(fd)
        server.close()


@pytest.mark.timeout(90)
def test_a_server_answering_only_with_what_is_no_reply_is_as_silent_to_oping(host: IrmdProc) -> None:
    """Each SDU that was no echo reply (or one for a seq never sent) counted as the server being heard
    from: a server sending such SDUs every 50 ms held `oping -n` for good. It times out as from a silent one."""
    server = IrmClient(host.sock)
    stop = threading.Event()
    try:
        call(server.channel, m.Bind("process", str(os.getpid()), "junk"), timeout=10)
        call(server.channel, m.NameRegister("junk", ["local"]), timeout=10)

        def chatter() -> None:
            with flow_accept(timeout=30, irm=server) as flow:
                while not stop.wait(0.05):
                    with contextlib.suppress(FlowError):
                        flow.write(struct.pack("!IIQ8x", 1, 99, 0) + bytes(40))  # a reply, for a seq never sent

        thread = threading.Thread(target=chatter, daemon=True)
        thread.start()
        t0 = time.monotonic()
        r = host.run("oping", "-n", "junk", "-c", "2", "-i", "100", timeout=60)
        took = time.monotonic() - t0
        assert took < 15 and "Server timed out." in r.stdout, f"{took:.1f} s: {r.stdout[-500:]}{r.stderr}"
    finally:
        stop.set()
        server.close()
