"""netplumb end to end: netplumbd and plumb as processes over a local layer, with their key files."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, children_of, pid_alive, wait_for

from apps.netplumb import wire
from apps.netplumb.keys import Identity, public_line
from apps.netplumb.policy import login_shells
from apps.netplumb.session import ClientSession, Established, Message, PeerError
from apps.netplumb.wire import Fields
from flowlib import Flow, FlowError, flow_alloc, qos
from flowlib.irm import IrmClient

Plumb = Callable[..., subprocess.CompletedProcess[bytes]]


@dataclass
class Host:
    tmp: Path
    env: dict[str, str]
    auth: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def plumb(
        self, *args: str, input: bytes = b"", timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(BIN / "plumb"), *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
        )

    @contextlib.contextmanager
    def remote(self, script: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
        """`plumb host2 sh -c SCRIPT` running, where SCRIPT first echoes its pid; the client is killed after."""
        p = subprocess.Popen(
            [str(BIN / "plumb"), "host2", "sh", "-c", script],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.PIPE,
        )
        try:
            assert p.stdout is not None
            yield p, int(p.stdout.readline())
        finally:
            p.kill()
            p.wait()

    def authorize(self, line: str) -> None:
        with open(self.auth, "a") as f:
            f.write(line + "\n")

    def my_key_line(self) -> str:
        return (self.tmp / "home/.config/netplumb/id.pub").read_text().strip()


@pytest.fixture
def host(irmd: IrmdProc, local_layer: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """netplumbd serving host2; extra options by indirect parametrization."""
    extra: list[str] = getattr(request, "param", [])
    home = tmp_path / "home"
    home.mkdir()
    env = {**irmd.env, "HOME": str(home)}
    env.pop("XDG_CONFIG_HOME", None)
    subprocess.run([str(BIN / "plumb-keygen")], env=env, check=True, capture_output=True, timeout=30)
    auth = tmp_path / "authorized_keys"
    auth.write_text("")
    log = tmp_path / "netplumbd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "netplumbd"),
                "--name",
                "host2",
                "--layer",
                local_layer,
                "--authorized-keys",
                str(auth),
                "--host-key",
                str(tmp_path / "host_key"),
                "--recipe-dir",
                str(tmp_path / "recipes"),
                "-v",
                *extra,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    h = Host(tmp_path, env, auth, proc, log)
    try:
        wait_for(lambda: "serving with key" in log.read_text() or proc.poll() is not None, 15, "netplumbd")
        assert proc.poll() is None, log.read_text()
        yield h
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def authorized(host: Host) -> Host:
    host.authorize(host.my_key_line())
    return host


def test_command_output_stderr_and_exit_status(authorized: Host) -> None:
    r = authorized.plumb("host2", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr.splitlines()[-1]) == (7, b"out\n", b"err")


def test_single_string_command_is_split_like_a_shell(authorized: Host) -> None:
    r = authorized.plumb("host2", "printf '%s|' 'a b' c")
    assert r.stdout == b"a b|c|"


def test_stdin_streams_byte_identical(authorized: Host) -> None:
    data = os.urandom(2_000_000)
    t = time.monotonic()
    r = authorized.plumb("host2", "cat", input=data)
    elapsed = time.monotonic() - t
    assert r.returncode == 0, r.stderr
    assert r.stdout == data
    print(f"2 MB round trip through plumb cat: {elapsed:.2f} s")


def test_first_use_pins_the_server_key_with_a_notice(authorized: Host) -> None:
    first = authorized.plumb("host2", "true")
    assert b"pinned the key of 'host2'" in first.stderr
    known = authorized.tmp / "home/.config/netplumb/known_hosts"
    assert known.read_text().startswith("host2 ed25519 ")
    again = authorized.plumb("host2", "true")
    assert again.returncode == 0 and b"pinned" not in again.stderr


def test_changed_server_key_is_refused_loudly(authorized: Host) -> None:
    known = authorized.tmp / "home/.config/netplumb/known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True)
    known.write_text(f"host2 {public_line(Identity.generate().public)}\n")
    marker = authorized.tmp / "ran"
    r = authorized.plumb("host2", "touch", str(marker))
    assert r.returncode == 255
    assert b"CHANGED" in r.stderr and b"impersonating" in r.stderr
    assert not marker.exists()


def test_unauthorized_key_is_refused(host: Host) -> None:
    marker = host.tmp / "ran"
    r = host.plumb("host2", "touch", str(marker))
    assert r.returncode == 255 and b"not authorized" in r.stderr
    assert not marker.exists()


def test_a_refused_client_gets_the_reason_whatever_it_sent_behind_its_auth(host: Host, irmd: IrmdProc) -> None:
    """START and data right behind an AUTH the server refuses: netplumbd reads and drops them before
    it closes, so that the flow does not lose its ERROR."""
    client = IrmClient(irmd.sock)
    try:
        session = ClientSession(Identity.generate(), lambda key: None)
        flow = flow_alloc("host2", qos=qos.data, timeout=10, irm=client)
        flow.set_timeout(10)
        session.start()
        for data in session.data_to_send():
            flow.write(data)
        session.receive(flow.read())  # the server's hello: our AUTH is queued
        for data in session.data_to_send():
            flow.write(data)
        flow.write(session.send(wire.START, Fields.of(arg="true")))
        for _ in range(100):  # more than the server reads before it has refused us
            flow.write(session.send(wire.DATA, Fields.of(ch=0, data="x" * 60_000)))
        events = _until_peer_error(flow, session)
        assert any(isinstance(ev, PeerError) and "not authorized" in ev.message for ev in events), events
        flow.close()
    finally:
        client.close()


def test_allowlist_limits_the_programs(host: Host) -> None:
    host.authorize(f'allow="echo" {host.my_key_line()}')
    assert host.plumb("host2", "echo", "ok").stdout == b"ok\n"
    marker = host.tmp / "ran"
    r = host.plumb("host2", "touch", str(marker))
    assert r.returncode != 0 and b"allowlist" in r.stderr
    assert not marker.exists()


def test_one_time_key_works_once_for_its_command_only(host: Host) -> None:
    marker = host.tmp / "ran"
    key = host.tmp / "otk"
    made = subprocess.run(
        [str(BIN / "plumb-keygen"), "-f", str(key), "--one-time", f"touch {marker}"],
        env=host.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    host.authorize(made.stdout.strip())
    other = host.plumb("host2", f"-key={key}", "echo", "hi")
    assert other.returncode != 0 and b"may only run" in other.stderr
    assert host.plumb("host2", f"-key={key}", "touch", str(marker)).returncode == 0
    assert marker.exists()
    marker.unlink()
    again = host.plumb("host2", f"-key={key}", "touch", str(marker))
    assert again.returncode == 255 and b"already used" in again.stderr
    assert not marker.exists()


def test_user_switch_refused_unless_allowed(authorized: Host) -> None:
    r = authorized.plumb("host2", "-user=nobody", "id", "-un")
    assert r.returncode != 0 and b"may not run commands as 'nobody'" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_switch_when_allowed(host: Host) -> None:
    host.authorize(f'users="nobody" {host.my_key_line()}')
    r = host.plumb("host2", "-user=nobody", "id", "-un")
    assert r.returncode == 0 and r.stdout == b"nobody\n", r.stderr


@pytest.mark.parametrize("host", [["--accept-env", "NP_A", "--accept-env", "NP_B"]], indirect=True)
def test_export_sends_named_environment(authorized: Host) -> None:
    r = authorized.plumb(
        "host2",
        "-export=NP_A,NP_B",
        "sh",
        "-c",
        'echo "$NP_A/$NP_B/$NP_C"',
        env={"NP_A": "1", "NP_B": "two words", "NP_C": "not sent"},
    )
    assert r.stdout == b"1/two words/\n"


def test_named_pipes_are_replicated(authorized: Host) -> None:
    src = authorized.tmp / "local-in.txt"
    src.write_bytes(b"through the in fifo\n" * 1000)
    dst = authorized.tmp / "local-out.txt"
    rin, rout = authorized.tmp / "remote-in.fifo", authorized.tmp / "remote-out.fifo"
    r = authorized.plumb(
        "host2", f"-infifo={src}:{rin}", f"-outfifo={dst}:{rout}", "sh", "-c", f"tr a-z A-Z <{rin} >{rout}"
    )
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == b"THROUGH THE IN FIFO\n" * 1000
    assert not rin.exists() and not rout.exists()  # the fifos netplumbd made are gone


def test_unopened_fifo_does_not_hang_the_session(authorized: Host) -> None:
    dst = authorized.tmp / "out.txt"
    r = authorized.plumb("host2", f"-outfifo={dst}:{authorized.tmp / 'never.fifo'}", "true", timeout=20)
    assert r.returncode == 0


def test_unix_socket_is_replicated_for_several_connections(authorized: Host) -> None:
    local = authorized.tmp / "local.sock"
    remote = authorized.tmp / "remote.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(local))
    server.listen()

    def serve() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(data.upper())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = (
        "import socket,sys\n"
        "for word in ('first', 'second'):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "    s.sendall(word.encode() * 10000); s.shutdown(socket.SHUT_WR)\n"
        "    got = b''\n"
        "    while c := s.recv(65536): got += c\n"
        "    print(got[:12].decode(), len(got))\n"
    )
    try:
        r = authorized.plumb("host2", f"-socket={local}:{remote}", sys.executable, "-c", client, str(remote))
    finally:
        server.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"FIRSTFIRSTFI 50000\nSECONDSECOND 60000\n"


def test_recipe_runs_remotely(authorized: Host) -> None:
    recipe = authorized.tmp / "r.recipe"
    recipe.write_text(
        "gen: sh -c 'echo b; echo a; echo oops >&2' >%sorter 2>%errs &\nerrs: cat >errs.txt &\nsorter: sort\n"
    )
    r = authorized.plumb("host2", f"-recipe={recipe}")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a\nb\n"
    me = pwd.getpwuid(os.geteuid()).pw_name  # relative names are in the user's own recipe directory
    wait_for(lambda: (authorized.tmp / "recipes" / me / "errs.txt").exists(), 5, "errs.txt")


def test_bad_recipe_is_refused_locally_with_its_line(authorized: Host) -> None:
    recipe = authorized.tmp / "bad.recipe"
    recipe.write_text("echo hi\necho >%nobody\n")
    r = authorized.plumb("host2", f"-recipe={recipe}")
    assert r.returncode == 255 and b"line 2" in r.stderr


def test_missing_program_is_reported(authorized: Host) -> None:
    r = authorized.plumb("host2", "no-such-program-xyz")  # by the remote shell, as ssh
    assert r.returncode == 127 and b"no-such-program-xyz" in r.stderr and b"not found" in r.stderr


def test_remote_signal_death_is_reported(authorized: Host) -> None:
    r = authorized.plumb("host2", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM and b"SIGTERM" in r.stderr


def test_a_closed_stdout_gives_the_remote_command_sigpipe_and_keeps_its_stderr_and_status(
    authorized: Host,
) -> None:
    """`plumb HOST producer | head -1`, as with ssh: the remote producer gets SIGPIPE (not plumb, and
    not a SIGTERM for a lost client), what it says after on stderr arrives, and its status is plumb's."""
    p = subprocess.Popen(
        [str(BIN / "plumb"), "host2", "yes; echo status=$? >&2; exit 5"],
        env=authorized.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == b"y\n"
    p.stdout.close()
    err = p.stderr.read()
    assert (p.wait(30), err.splitlines()[-1:]) == (5, [b"status=141"])
    # `yes` itself killed by SIGPIPE: 141, as in a local pipeline, and no message about it
    q = subprocess.run(
        f'{BIN / "plumb"} host2 yes | head -c 2; echo " ${{PIPESTATUS[0]}}"',
        shell=True,
        executable="/bin/bash",
        env=authorized.env,
        capture_output=True,
        timeout=30,
    )
    assert (q.stdout, b"killed" in q.stderr) == (b"y\n 141\n", False), q.stderr
    # Not a pipe's reader gone (a full disk): the output is dropped, the command not stopped
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [str(BIN / "plumb"), "host2", "echo a; sleep 0.3; echo b; echo end >&2; exit 3"],
            env=authorized.env,
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=30,
        )
    assert (r.returncode, r.stderr.splitlines()[-1:]) == (3, [b"end"])


@pytest.mark.parametrize(
    "closed, script, out, err, status",
    [
        ("<&-", "cat; echo got-eof >&2; exit 3", b"", b"got-eof\n", 3),  # hung: the stdin pump read the flow
        (">&-", "echo out; echo err >&2; exit 4", b"", b"err\n", 4),  # a traceback and status 1
        ("2>&-", "echo out; echo err >&2; exit 5", b"out\n", b"", 5),
    ],
)
def test_a_closed_standard_descriptor_is_dev_null_as_with_ssh(
    authorized: Host, closed: str, script: str, out: bytes, err: bytes, status: int
) -> None:
    """plumb started with stdin, stdout or stderr closed: as OpenSSH's sanitise_stdfd(), that one is
    /dev/null, not the number of the next descriptor plumb opens (its flow)."""
    r = subprocess.run(
        ["/bin/bash", "-c", f'"$0" -q host2 "$1" {closed}', str(BIN / "plumb"), script],
        env=authorized.env,
        capture_output=True,
        timeout=30,
    )
    assert (r.returncode, r.stdout, r.stderr) == (status, out, err)


def test_a_closed_stderr_does_not_change_the_status_plumb_reports(authorized: Host) -> None:
    """Its messages' reader gone, plumb still exits with the command's status (was 141, or 1 and a
    traceback once SIGPIPE was ignored), and with its own 255."""
    for script, status in (("sleep 0.3; kill -TERM $$", 128 + signal.SIGTERM), ("exit 7", 7)):
        r = subprocess.run(
            ["/bin/bash", "-c", '"$0" host2 "$1" 2>&1 | true; echo ${PIPESTATUS[0]}', str(BIN / "plumb"), script],
            env=authorized.env,
            capture_output=True,
            timeout=30,
        )
        assert r.stdout == f"{status}\n".encode(), r.stderr
    r = subprocess.run(
        ["/bin/bash", "-c", '"$0" nohost true 2>&1 | true; echo ${PIPESTATUS[0]}', str(BIN / "plumb")],
        env=authorized.env,
        capture_output=True,
        timeout=30,
    )
    assert r.stdout == b"255\n"


def test_client_going_away_kills_the_remote_command(authorized: Host) -> None:
    with authorized.remote("echo $$; exec sleep 60") as (_, pid):
        assert pid_alive(pid)
    wait_for(lambda: not pid_alive(pid), 10, "the remote command to be killed")


def test_usage_errors(authorized: Host) -> None:
    for args in ([], ["host2"], ["host2", "-bogus=1", "ls"], ["-user=x"]):
        r = authorized.plumb(*args)
        assert r.returncode == 255 and b"usage: plumb" in r.stderr and b"Traceback" not in r.stderr


def test_garbage_from_a_peer_does_not_crash_netplumbd(authorized: Host, irmd: IrmdProc) -> None:
    client = IrmClient(irmd.sock)
    try:
        for junk in (b"hello", b"TAP1" + bytes(13), os.urandom(1000)):
            flow = flow_alloc("host2", qos=qos.data, timeout=10, irm=client)
            flow.write(junk)
            flow.set_timeout(5)
            with contextlib.suppress(FlowError):
                flow.read()
            flow.close()
    finally:
        client.close()
    assert authorized.proc.poll() is None
    assert authorized.plumb("host2", "echo", "still here").stdout == b"still here\n"
    assert "Traceback" not in authorized.log.read_text()
    assert "rejected a packet" in authorized.log.read_text()


def test_interrupt_is_forwarded_to_the_remote_command(authorized: Host) -> None:
    p = subprocess.Popen(
        [
            str(BIN / "plumb"),
            "host2",
            "sh",
            "-c",
            "trap 'echo got-int; exit 3' INT; echo ready; while :; do sleep 0.05; done",
        ],
        env=authorized.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=15)
    finally:
        p.kill()
        p.wait()
    assert out == b"got-int\n" and p.returncode == 3


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_does_not_make_the_server_buffer(authorized: Host) -> None:
    size = 20_000_000
    p = subprocess.Popen(
        [str(BIN / "plumb"), "host2", "head", "-c", str(size), "/dev/zero"],
        env=authorized.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert p.stdout is not None
        first = p.stdout.read(1)  # the command runs; from here on nobody reads for a while
        before = _rss_kib(authorized.proc.pid)
        time.sleep(1.5)
        grown = _rss_kib(authorized.proc.pid) - before
        got = len(first) + len(p.stdout.read())
        p.wait(30)
    finally:
        p.kill()
        p.wait()
    assert got == size and p.returncode == 0
    assert grown < 16 * 1024, f"netplumbd grew by {grown} KiB while its client did not read"


def test_stopping_netplumbd_stops_running_commands(authorized: Host) -> None:
    with authorized.remote("echo $$; exec sleep 60") as (p, pid):
        authorized.proc.terminate()
        authorized.proc.wait(10)
        wait_for(lambda: not pid_alive(pid), 10, "the remote command to be stopped")
        assert p.wait(15) != 0  # the client learns its session is gone


def _session(host: Host, irmd: IrmdProc, client: IrmClient) -> tuple[Flow, ClientSession]:
    """A hand-driven client session to host2 with the user's key, up to a running `cat`."""
    ident = Identity.load(host.tmp / "home/.config/netplumb/id")
    session = ClientSession(ident, lambda key: None)
    flow = flow_alloc("host2", qos=qos.data, timeout=10, irm=client)
    flow.set_timeout(10)
    session.start()
    events: list[object] = []
    while not any(isinstance(ev, Established) for ev in events):
        for data in session.data_to_send():
            flow.write(data)
        events = list(session.receive(flow.read()))
    flow.write(session.send(wire.START, Fields.of(arg="cat")))
    assert session.receive(flow.read())[0] == Message(wire.START, Fields.of(ok=1))
    return flow, session


def _until_peer_error(flow: Flow, session: ClientSession) -> list[object]:
    """What the server answers until it names a protocol error (or the flow ends)."""
    events: list[object] = []
    with contextlib.suppress(FlowError):
        while not any(isinstance(ev, PeerError) for ev in events):
            events = list(session.receive(flow.read()))
    return events


@pytest.mark.parametrize(
    "bogus",
    [
        [Fields.of(ch=77, data="AAAA")],  # no such channel
        [Fields.of(ch=0, base64="not base64!")],
        [Fields.of(ch=0, data="AA", base64="AAAA")],  # both forms at once
        [Fields.of(ch=0)],  # no data
    ],
)
def test_authenticated_nonsense_ends_the_session_with_a_reason(
    authorized: Host, irmd: IrmdProc, bogus: list[Fields]
) -> None:
    client = IrmClient(irmd.sock)
    try:
        flow, session = _session(authorized, irmd, client)
        for fields in bogus:
            flow.write(session.send(wire.DATA, fields))
        events = _until_peer_error(flow, session)
        assert any(isinstance(ev, PeerError) and "protocol error" in ev.message for ev in events), events
        flow.close()
    finally:
        client.close()
    assert authorized.proc.poll() is None
    assert authorized.plumb("host2", "echo", "still here").stdout == b"still here\n"
    assert "Traceback" not in authorized.log.read_text()


def test_data_after_eof_is_a_protocol_error(authorized: Host, irmd: IrmdProc) -> None:
    client = IrmClient(irmd.sock)
    try:
        flow, session = _session(authorized, irmd, client)
        flow.write(session.send(wire.EOF, Fields.of(ch=0)))
        flow.write(session.send(wire.DATA, Fields.of(ch=0, data="AAAA")))
        events = _until_peer_error(flow, session)
        assert any(isinstance(ev, PeerError) and "after its EOF" in ev.message for ev in events), events
        flow.close()
    finally:
        client.close()


def test_a_command_ignoring_sigterm_is_killed_when_netplumbd_stops(authorized: Host) -> None:
    with authorized.remote("trap '' TERM; echo $$; while :; do :; done") as (_, pid):
        t0 = time.monotonic()
        authorized.proc.terminate()
        authorized.proc.wait(10)
        wait_for(lambda: not pid_alive(pid), 10, "the stubborn command to be killed")
        assert time.monotonic() - t0 < 8


# -- plumb like ssh ----------------------------------------------------------------------------------


def test_options_before_the_host_as_with_ssh(authorized: Host) -> None:
    key = str(authorized.tmp / "home/.config/netplumb/id")
    me = pwd.getpwuid(os.geteuid()).pw_name
    for args in (
        ["-i", key, "-l", me, "host2", "id", "-un"],
        [f"{me}@host2", "id", "-un"],
        ["host2", f"-user={me}", "id", "-un"],
        ["-q", "-user=" + me, "host2", "--", "id", "-un"],
    ):
        r = authorized.plumb(*args)
        assert (r.returncode, r.stdout) == (0, f"{me}\n".encode()), (args, r.stderr)


def test_verbosity_levels_show_the_handshake_then_channels_then_packets(authorized: Host) -> None:
    quiet = authorized.plumb("-q", "host2", "echo", "hi")
    assert quiet.stdout == b"hi\n" and quiet.stderr == b""  # not even the notice of the pinned key
    plain = authorized.plumb("host2", "echo", "hi")
    assert b"debug" not in plain.stderr
    levels = [authorized.plumb(v, "host2", "echo", "hi") for v in ("-v", "-vv", "-vvv")]
    for r in levels:
        assert r.returncode == 0 and r.stdout == b"hi\n", r.stderr
    one, two, three = (r.stderr.decode() for r in levels)
    for line in (
        "debug1: allocating a flow to host2",
        "debug1: sent HELLO",
        "debug1: the server proved it holds SHA256:",
        "debug1: server key SHA256:",
        "and START: echo hi",
        "debug1: authenticated",
        "debug1: started",
        "debug1: exit status 0",
    ):
        assert line in one and line in two and line in three, line
    assert "debug2" not in one and "debug3" not in two
    for line in (
        "debug2: channel 0: stdin -> server",
        "debug2: channel 1: server -> stdout",
        "debug2: channel 1: 3 bytes received, then EOF",
    ):
        assert line in two and line in three, line
    for line in (
        "debug3: -> HELLO seq 0",
        "debug3: <- HELLO seq 0",
        "debug3: -> AUTH seq 1",
        "debug3: -> START seq 2",
        "debug3: <- EXIT seq",
    ):
        assert line in three, line


def test_the_command_line_goes_through_the_accounts_shell(authorized: Host) -> None:
    shell = pwd.getpwuid(os.geteuid()).pw_shell
    shell = os.path.basename(shell if shell in login_shells() else "/bin/sh")
    r = authorized.plumb("host2", "echo $0 | tr a-z A-Z; exit 3")  # one argument: a line for the shell
    assert (r.returncode, r.stdout) == (3, f"{shell.upper()}\n".encode()), r.stderr
    r = authorized.plumb("host2", "printf", "%s|", "$HOME", "a b")  # several: they arrive as given
    assert r.stdout == b"$HOME|a b|"


def test_a_recipe_reads_and_writes_the_sessions_pipes_without_deadlock(authorized: Host) -> None:
    src = authorized.tmp / "in.txt"
    src.write_bytes(b"through the pipes\n" * 5000)
    dst = authorized.tmp / "out.txt"
    rin, rout = authorized.tmp / "r-in.fifo", authorized.tmp / "r-out.fifo"
    recipe = authorized.tmp / "pipes.recipe"
    recipe.write_text(f"tr a-z A-Z <{rin} >{rout}\n")
    t0 = time.monotonic()
    r = authorized.plumb("host2", f"-recipe={recipe}", f"-infifo={src}:{rin}", f"-outfifo={dst}:{rout}", timeout=30)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == b"THROUGH THE PIPES\n" * 5000
    assert time.monotonic() - t0 < 20  # no deadlock, and no wait for a timeout either
    recipe.write_text(f"cat <{rin}\n")  # a `<` from the pipe, to the session's stdout
    r = authorized.plumb("host2", f"-recipe={recipe}", f"-infifo={src}:{rin}")
    assert r.returncode == 0 and r.stdout == src.read_bytes(), r.stderr


def test_netplumbd_leaves_no_runner_behind(authorized: Host) -> None:
    assert authorized.plumb("host2", "true").returncode == 0
    wait_for(lambda: children_of(authorized.proc.pid), 10, "the spare runner")  # one waits for the next session
    runners = children_of(authorized.proc.pid)
    authorized.proc.terminate()
    authorized.proc.wait(10)
    wait_for(lambda: not any(pid_alive(p) for p in runners), 10, "the runners to go")
