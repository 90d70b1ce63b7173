"""The IRMd process: defensive parsing of control frames, life cycle, supervision of IPCPs."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import msgspec
import pytest
from helpers import (
    BIN,
    IrmdProc,
    accepted_pair,
    children_of,
    irmd_env,
    pid_alive,
    start_irmd,
    stop_irmd,
    wait_for,
)

from flowlib.errors import FlowDown, FlowError, IrmdUnreachable, NameNotFound
from flowlib.events import EventQueue, EventType, FlowSet, fevent
from flowlib.irm import IrmClient
from proto import messages as m
from proto.control import bind_and_register
from transports.unix import recv_frame, send_frame
from transports.wire import HEADER, MAGIC, MAX_FRAME, PACKED_VERSION, REPLY, Error, Message

RAW_TIMEOUT = 5.0


class RawConn:
    """A bare SOCK_SEQPACKET connection to the irmd, for frames flowlib would never send."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(path))
        self.sock.settimeout(RAW_TIMEOUT)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        send_frame(self.sock, data, fds)

    def recv(self) -> bytes:
        """The next frame; b'' if the irmd closed the connection."""
        data, fds = recv_frame(self.sock)
        for fd in fds:
            os.close(fd)
        return data

    def reply(self) -> Message:
        data = self.recv()
        assert data, "the irmd closed the connection instead of replying"
        return m.CODEC.decode(data).msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(irmd: IrmdProc) -> Iterator[Callable[[], RawConn]]:
    conns: list[RawConn] = []

    def make() -> RawConn:
        conns.append(RawConn(irmd.sock))
        return conns[-1]

    yield make
    for c in conns:
        c.close()


def frame(code: int, body: bytes | str, req_id: int = 77, length: int | None = None) -> bytes:
    body = body.encode() if isinstance(body, str) else body
    return HEADER.pack(MAGIC, PACKED_VERSION, code, req_id, len(body) if length is None else length) + body


def still_serving(irmd: IrmdProc) -> None:
    """The irmd is alive, answers irm, and logged no traceback."""
    assert irmd.alive(), f"irmd died:\n{irmd.log_text()}"
    irmd.irm_ok("ipcp", "list")
    assert "Traceback" not in irmd.log_text(), irmd.log_text()


def pipe_end_closed_by_irmd(read_end: int) -> bool:
    """True once every copy of the pipe's write end is closed (the read end sees EOF)."""
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


# -- malformed control frames ---------------------------------------------------------


@pytest.mark.parametrize("garbage", [b"x", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)), b"\x00" * 13])
def test_garbage_bytes_get_an_error_reply_at_most_and_the_connection_serves_on(
    irmd: IrmdProc, raw: Callable[[], RawConn], garbage: bytes
) -> None:
    conn = raw()
    conn.send(garbage)
    conn.send(m.CODEC.encode(m.IpcpList(), 0x5151))
    while True:
        got = m.CODEC.decode(conn.recv())
        if got.req_id == 0x5151 | REPLY:
            break
        assert isinstance(got.msg, Error) and got.msg.code == "EPROTO"
    assert isinstance(got.msg, m.Table)
    still_serving(irmd)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "not MessagePack"),
        (b"\xc1", "not MessagePack"),
        (b"\x91" * 50_000 + b"\x01", "not MessagePack"),
        (msgspec.msgpack.encode([]), "not an object"),
        (msgspec.msgpack.encode({"flow_id": "3"}), "expected int"),
        (msgspec.msgpack.encode({"flow_id": True}), "expected int, got bool"),
        (msgspec.msgpack.encode({}), "missing field"),
        (msgspec.msgpack.encode({"flow_id": 3, "evil": 1}), "unknown fields"),
    ],
)
def test_valid_header_with_a_bad_body_gets_an_eproto_reply(
    irmd: IrmdProc, raw: Callable[[], RawConn], body: bytes, says: str
) -> None:
    conn = raw()
    conn.send(frame(m.FlowDealloc.TYPE, body, req_id=4242))
    data = conn.recv()
    got = m.CODEC.decode(data)
    assert got.req_id == 4242 | REPLY
    assert isinstance(got.msg, Error) and got.msg.code == "EPROTO" and says in got.msg.text
    still_serving(irmd)


def test_connection_stays_usable_after_a_malformed_frame(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(frame(m.FlowDealloc.TYPE, b"\xc1oops"))
    assert isinstance(conn.reply(), Error)
    conn.send(m.CODEC.encode(m.IpcpList(), 5))
    assert isinstance(conn.reply(), m.Table)


def test_unknown_message_type_gets_an_eproto_reply(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(frame(4321, b"\x80"))
    msg = conn.reply()
    assert isinstance(msg, Error) and msg.code == "EPROTO" and "unknown message type 4321" in msg.text
    still_serving(irmd)


def test_header_claiming_a_huge_body_gets_an_eproto_reply(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(frame(m.IpcpList.TYPE, b"\x80", length=0xFFFFFFFF))
    msg = conn.reply()
    assert isinstance(msg, Error) and "length" in msg.text
    still_serving(irmd)


def test_frame_larger_than_the_maximum_closes_the_connection(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(frame(m.IpcpList.TYPE, b" " * (MAX_FRAME + 100)))
    assert conn.recv() == b""
    still_serving(irmd)


def test_reply_types_sent_as_requests_are_refused(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(m.CODEC.encode(m.Table(), 9))
    msg = conn.reply()
    assert isinstance(msg, Error) and "not a request the IRMd serves" in msg.text
    still_serving(irmd)


def test_an_unsolicited_reply_is_ignored(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(m.CODEC.encode(Error("EIO", "boo"), 12 | REPLY))
    conn.send(m.CODEC.encode(m.Ok(), 13 | REPLY))
    conn.send(m.CODEC.encode(m.IpcpList(), 14))
    got = m.CODEC.decode(conn.recv())
    assert got.req_id == 14 | REPLY and isinstance(got.msg, m.Table)
    still_serving(irmd)


def test_replies_carry_the_request_id_with_the_reply_flag(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(m.CODEC.encode(m.IpcpList(), 0x1234))
    assert m.CODEC.decode(conn.recv()).req_id == 0x1234 | REPLY


def test_an_error_frame_sent_as_a_request_is_refused(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(m.CODEC.encode(Error("EIO", "boo"), 12))
    msg = conn.reply()
    assert isinstance(msg, Error) and msg.code == "EPROTO"
    still_serving(irmd)


def test_fds_attached_to_a_non_flow_message_are_closed_by_the_irmd(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    r, w = os.pipe()
    try:
        conn = raw()
        conn.send(m.CODEC.encode(m.IpcpList(), 3), [w, w])
        os.close(w)
        assert isinstance(conn.reply(), m.Table)
        wait_for(lambda: pipe_end_closed_by_irmd(r), 5, "the irmd to close the fds it was sent")
    finally:
        os.close(r)
    still_serving(irmd)


def test_ipcp_only_requests_from_an_application_are_refused_and_their_fd_closed(
    irmd: IrmdProc, raw: Callable[[], RawConn]
) -> None:
    r, w = os.pipe()
    try:
        conn = raw()
        conn.send(m.CODEC.encode(m.FlowReqArrived(b"\x01" * 32, m.QosSpec(), 1500), 3), [w])
        os.close(w)
        msg = conn.reply()
        assert isinstance(msg, Error) and msg.code == "EPERM"
        wait_for(lambda: pipe_end_closed_by_irmd(r), 5, "the irmd to close the fd it was sent")
    finally:
        os.close(r)
    still_serving(irmd)


def test_an_application_cannot_announce_itself_as_an_ipcp(irmd: IrmdProc, raw: Callable[[], RawConn]) -> None:
    conn = raw()
    conn.send(m.CODEC.encode(m.IpcpAnnounce("lo", "local"), 3))
    msg = conn.reply()
    assert isinstance(msg, Error) and msg.code == "EPERM"
    still_serving(irmd)


@pytest.mark.parametrize(
    ("cls", "body"),
    [
        (m.FlowDealloc, '{"flow_id":' + "9" * 5000 + "}"),  # beyond Python's int-from-text limit
        (m.FlowAccept, '{"timeout":1' + "0" * 400 + "}"),
    ],  # beyond float range
    ids=["5000-digit-int", "int-beyond-float"],
)
def test_huge_integer_gets_an_eproto_reply(
    irmd: IrmdProc, raw: Callable[[], RawConn], cls: type[Message], body: str
) -> None:
    conn = raw()
    conn.send(frame(cls.TYPE, body, req_id=55))
    got = m.CODEC.decode(conn.recv())
    assert got.req_id == 55 | REPLY and isinstance(got.msg, Error) and got.msg.code == "EPROTO"
    still_serving(irmd)


def test_many_connections_that_come_and_go_do_not_hurt_the_irmd(irmd: IrmdProc) -> None:
    for i in range(200):
        conn = RawConn(irmd.sock)
        if i % 2:
            conn.send(m.CODEC.encode(m.ProcAnnounce("x"), 1))
        conn.close()
    still_serving(irmd)


HIT_AND_RUN = """
import socket, sys
from proto import messages as m
from proto.control import bind_and_register
from transports.unix import send_frame
for _ in range(int(sys.argv[3])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    send_frame(s, m.CODEC.encode(m.ProcAnnounce("hit-and-run"), 1))
    send_frame(s, m.CODEC.encode(m.FlowAlloc(sys.argv[2], m.QosSpec(), 5.0), 2))
    s.close()
"""


def test_client_that_allocates_and_disconnects_at_once_leaves_no_flow_behind(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    server = FlowSet(client_factory())
    server.listen()
    # A separate client process that vanishes right after asking.
    subprocess.run(
        [str(BIN / "python"), "-c", HIT_AND_RUN, str(irmd.sock), bound_name, "20"], env=irmd.env, check=True, timeout=30
    )
    # Whether or not a flow got to the server before its client vanished, each that did must end.
    q, arrived, ended = EventQueue(), 0, 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline or arrived != ended:
        assert time.monotonic() < deadline + 5, f"{arrived - ended} flows of the vanished client never ended"
        fevent(server, q, 0.1)
        for ev in q:
            if ev.type is EventType.ALLOC:
                arrived += 1
            elif ev.type in (EventType.DEALLOC, EventType.DOWN):
                ended += 1
                ev.flow.close()
    assert irmd.table("flow", "list") == []
    server.close()
    still_serving(irmd)


ACCEPT_AND_RUN = """
import socket, sys, os
from proto import messages as m
from proto.control import bind_and_register
from transports.unix import send_frame, recv_frame
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
send_frame(s, m.CODEC.encode(m.ProcAnnounce("accept-and-run"), 1))
recv_frame(s)
print(os.getpid(), flush=True)
sys.stdin.readline()  # bound now
send_frame(s, m.CODEC.encode(m.FlowAccept(None), 2))
s.close()
"""


def test_flows_are_not_handed_to_a_client_that_accepted_and_disconnected(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    proc = subprocess.Popen(
        [str(BIN / "python"), "-c", ACCEPT_AND_RUN, str(irmd.sock)],
        env=irmd.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    pid = proc.stdout.readline().strip()
    irmd.irm_ok("bind", "process", pid, "name", "ghost")
    irmd.irm_ok("name", "register", "ghost", "layer", local_layer)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.wait(10) == 0
    start = time.monotonic()
    with pytest.raises(NameNotFound, match="no process is accepting"):
        client_factory().alloc("ghost", None, 5)
    assert time.monotonic() - start < 5
    still_serving(irmd)


# -- life cycle -----------------------------------------------------------------------


def test_irmd_refuses_to_start_on_a_socket_another_irmd_serves(irmd: IrmdProc) -> None:
    second = subprocess.run(
        [str(BIN / "irmd"), "--sock", str(irmd.sock)], env=irmd.env, capture_output=True, text=True, timeout=20
    )
    assert second.returncode != 0
    assert "another irmd is running" in second.stderr
    assert irmd.sock.exists()
    still_serving(irmd)


def test_irmd_replaces_a_stale_socket_of_a_dead_irmd(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "irmd.sock"))
    stale.close()  # the file stays, nobody listens
    irmd = start_irmd(tmp_path)
    try:
        irmd.irm_ok("ipcp", "list")
    finally:
        stop_irmd(irmd)


def test_irmd_honours_ouroboros_sock_without_sock_option(tmp_path: Path) -> None:
    sock = tmp_path / "env.sock"
    proc = subprocess.Popen(
        [str(BIN / "irmd")], env=irmd_env(sock), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(sock.exists, 10, "the socket named by OUROBOROS_SOCK")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert not sock.exists()


def test_sigterm_stops_the_ipcps_and_programs_and_removes_the_socket(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local")
    irmd.irm_ok("ipcp", "create", "name", "spare", "type", "local")
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", "local")
    assert "1 received" in irmd.run("oping", "-n", "pong", "-c", "1").stdout
    children = irmd.note_children()
    ipcps = {irmd.ipcp_pid("lo"), irmd.ipcp_pid("spare")}
    # two IPCPs, the fork server they were forked by (not the IRMd's children) and the oping server
    assert ipcps < children and len(children) == 4 and ipcps.isdisjoint(children_of(irmd.pid))

    irmd.proc.send_signal(signal.SIGTERM)

    assert irmd.proc.wait(10) == 0
    wait_for(lambda: not any(pid_alive(p) for p in children), 5, "the IPCPs and programs to exit")
    assert not irmd.sock.exists()


def test_a_listening_server_learns_that_the_irmd_is_gone(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient]
) -> None:
    fset = FlowSet(client_factory())
    fset.listen()
    stop_irmd(irmd)
    deadline = time.monotonic() + 5
    with pytest.raises(IrmdUnreachable):
        while time.monotonic() < deadline:
            fevent(fset, EventQueue(), 0.2)
    with contextlib.suppress(FlowError):
        fset.close()


def test_a_listening_set_closes_cleanly_after_the_irmd_is_gone(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient]
) -> None:
    fset = FlowSet(client_factory())
    fset.listen()
    stop_irmd(irmd)
    try:
        fset.close()
    finally:
        assert fset._epoll.closed


def test_stopping_the_irmd_ends_the_flows_it_brokered(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    cli, srv = accepted_pair(client_factory(), client_factory(), bound_name)
    stop_irmd(irmd)
    srv.set_timeout(5)
    with pytest.raises(FlowDown):
        srv.read()
    cli.close()
    srv.close()


def test_ipcps_exit_when_their_irmd_is_killed(tmp_path: Path) -> None:
    irmd = start_irmd(tmp_path)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local")
        pid = irmd.ipcp_pid("lo")
        irmd.note_children()
        irmd.proc.kill()
        irmd.proc.wait(10)
        wait_for(lambda: not pid_alive(pid), 10, "the orphaned IPCP to exit")
    finally:
        stop_irmd(irmd, check=False)


def test_irmd_logs_an_ipcp_that_dies(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
    os.kill(irmd.ipcp_pid("lo"), signal.SIGKILL)
    # The status itself is not checked: the IRMd sometimes reaps the IPCP in proc.kill() (Popen.poll)
    # before asyncio's child watcher, which then reports 255 instead of -9.
    wait_for(
        lambda: re.search(r"ipcp lo \(pid \d+\) exited with status", irmd.log_text()),
        5,
        "the irmd to report the dead IPCP",
    )
    assert irmd.table("ipcp", "list") == []
    still_serving(irmd)


def test_frames_are_versioned_messagepack_as_documented() -> None:
    data = m.CODEC.encode(m.FlowDealloc(5), 9)
    magic, version, code, req_id, length = HEADER.unpack_from(data)
    assert (magic, version, code, req_id, length) == (b"OU", 2, m.FlowDealloc.TYPE, 9, len(data) - HEADER.size)
    assert msgspec.msgpack.decode(data[HEADER.size :]) == {"flow_id": 5}


def test_a_server_binds_and_registers_in_one_call_tolerating_a_registration_already_there(
    irmd: IrmdProc, local_layer: str, client_factory: Callable[[], IrmClient]
) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo2", "type", "local", "layer", "local2")
    irmd.note_children()
    irmd.irm_ok("name", "register", "srv", "layer", "local")  # an admin registered it in the first layer
    client = client_factory()
    bind_and_register(client.channel, os.getpid(), "srv", ["local", "local2"])
    row = next(r for r in irmd.table("name", "list") if r["name"] == "srv")
    assert (row["layers"], row["pids"]) == ("local,local2", str(os.getpid()))
    with pytest.raises(NameNotFound, match="layer 'nosuch' not found"):  # anything else still fails
        bind_and_register(client.channel, os.getpid(), "srv", ["nosuch"])


def test_irmd_prints_its_version_and_refuses_a_bad_command_line_with_its_usage() -> None:
    r = subprocess.run([str(BIN / "irmd"), "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("Ouroboros version 0.23.0 (ouroboros-py ")
    r = subprocess.run([str(BIN / "irmd"), "--bogus"], capture_output=True, text=True, timeout=30)
    # the usage on stdout, ending with an empty line, as 0.23's irmd prints it; what was wrong on stderr
    assert r.returncode == 1 and r.stdout.startswith("Usage: irmd") and "[--stdout" in r.stdout
    assert r.stdout.endswith(")]\n\n") and r.stderr == "irmd: unrecognized arguments: --bogus\n"


def test_irmd_stdout_sends_its_log_and_its_ipcps_to_stdout(tmp_path: Path) -> None:
    sock = tmp_path / "irmd.sock"
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [str(BIN / "irmd"), "--sock", str(sock), "--stdout"], env=irmd_env(sock), stdout=o, stderr=e
        )
    irmd = IrmdProc(sock, out, proc, irmd_env(sock))
    try:
        wait_for(lambda: sock.exists(), 15, "the irmd socket")
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        wait_for(lambda: "ipcp/local/lo[" in out.read_text(), 10, "the IPCP's log on stdout")
        assert "irmd listening" in out.read_text()
    finally:
        stop_irmd(irmd)
    assert err.read_text() == ""
