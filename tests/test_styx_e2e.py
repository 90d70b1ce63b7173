"""Styx over real flows: the CLI against a served directory, the bridge with a third-party
client (python-9p), the IRMd driven through its files, and a flow made through net/."""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, start_irmd, stop_irmd, wait_for
from third_party import p9fs_python, py9p_python

from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import FlowTransport, StreamTransport, TransportTimeout, dial
from flowlib import Flow, flow_accept, flow_alloc, qos
from flowlib.irm import IrmClient, call
from proto import messages as m

Styx = Callable[..., subprocess.CompletedProcess[str]]


def start(irmd: IrmdProc, *args: str, log: Path, hold_fds: int = 0) -> subprocess.Popen[bytes]:
    """The styx command; `hold_fds` descriptors passed to it open, so that those it makes are numbered
    past them (past 1023: where select() fails)."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(hold_fds)]
    try:
        with open(log, "wb") as out:
            return subprocess.Popen(
                [str(BIN / "styx"), *args],
                env=irmd.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                pass_fds=held,
            )
    finally:
        for fd in held:
            os.close(fd)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def styx(irmd: IrmdProc) -> Styx:
    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "styx"), *args], env=irmd.env, input=stdin, capture_output=True, text=True, timeout=30
        )

    return run


@pytest.fixture
def export(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "hello.txt").write_text("hello styx\n")
    (tmp_path / "secret.txt").write_text("outside")
    return d


@pytest.fixture
def files(irmd: IrmdProc, local_layer: str, export: Path, tmp_path: Path, styx: Styx) -> Iterator[str]:
    proc = start(
        irmd, "serve", "--name", "files", "--root", str(export), "--layer", local_layer, log=tmp_path / "serve.log"
    )
    try:
        wait_for(lambda: proc.poll() is not None or styx("ls", "files:/").returncode == 0, 15, "styx serve")
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        yield "files"
    finally:
        stop(proc)


def test_cli_reads_writes_lists_and_removes(files: str, export: Path, styx: Styx) -> None:
    assert styx("cat", "files:/hello.txt").stdout == "hello styx\n"
    assert styx("put", "files:/new.txt", stdin="x" * 100_000).returncode == 0  # many iounits
    assert (export / "new.txt").read_text() == "x" * 100_000
    assert styx("put", "files:/new.txt", stdin="short").returncode == 0  # truncates
    assert (export / "new.txt").read_text() == "short"
    assert styx("mkdir", "files:/d").returncode == 0 and (export / "d").is_dir()
    assert styx("put", "files:/d/inner", stdin="in").returncode == 0
    assert styx("ls", "files:/").stdout.split() == ["d/", "hello.txt", "new.txt"]
    assert styx("cat", "files:/").stdout.split() == ["d/", "hello.txt", "new.txt"]  # a directory lists
    long = styx("ls", "-l", "files:/d").stdout
    assert long.startswith("-rw-r--r--") and long.rstrip().endswith("inner")
    stat = styx("stat", "files:/new.txt").stdout
    assert "length 5" in stat and "name   new.txt" in stat
    assert styx("rm", "files:/new.txt").returncode == 0 and not (export / "new.txt").exists()
    r = styx("rm", "files:/d")
    assert r.returncode == 1 and r.stderr.rstrip().endswith("d' directory is not empty"), r.stderr


def test_cli_cannot_leave_the_root_and_fails_in_one_line(files: str, styx: Styx) -> None:
    for target in ["files:/../../etc/passwd", "files:/../secret.txt", "files:/nope"]:
        r = styx("cat", target)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    r = styx("cat", "nosuchname:/x")
    assert r.returncode == 1 and "not found" in r.stderr
    assert styx("cat", "no-colon").returncode == 1


def test_cli_shows_a_servers_names_and_errors_escaped_never_as_terminal_control(
    files: str, export: Path, styx: Styx
) -> None:
    """A server's names and Rerrors are its own words: one with a line break forges a listing row,
    one with ESC drives the user's terminal. Shown escaped, as OpenSSH shows a server's text."""
    evil = "x\n-rw-r--r-- root root 0 forged\x1b[2J\u202e"
    (export / evil).write_text("data")
    for argv in (["ls", "files:/"], ["ls", "-l", "files:/"], ["cat", "files:/"], ["stat", f"files:/{evil}"]):
        r = styx(*argv)
        assert r.returncode == 0 and "\x1b" not in r.stdout and "\u202e" not in r.stdout, (argv, r.stdout)
        assert not any(line.startswith("-rw-r--r-- root root 0 forged") for line in r.stdout.splitlines())
        assert "x\\n-rw-r--r-- root root 0 forged\\x1b[2J\\u202e" in r.stdout, (argv, r.stdout)
    assert styx("ls", "files:/").stdout.count("\n") == 2  # hello.txt and the one escaped name
    r = styx("cat", "files:/nope\x1b[2J\nstyx: all is well")
    assert r.returncode == 1 and "\x1b" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


THIRD_PARTY = """
import sys, json
from py9p import Client, OREAD, OWRITE
from py9p.client import RemoteError
from py9p.native import decode_dir
from py9p.messages import Dir
kind, where = sys.argv[1].split(':', 1)
connect = Client.connect_tcp('127.0.0.1', int(where)) if kind == 'tcp' else Client.connect_unix(where)
out = {}
with connect as c:
    c.negotiate(); c.attach(fid=0, uname=sys.argv[2])
    c.walk(fid=0, newfid=1, path='')
    c.open(fid=1, mode=int(OREAD))
    data = c.read(fid=1, count=4096)
    names = []
    while data:
        n = int.from_bytes(data[:2], 'little') + 2
        names.append(decode_dir(data[:n]).name); data = data[n:]
    out['ls'] = sorted(names)
    c.walk(fid=0, newfid=2, path='hello.txt'); c.open(fid=2, mode=int(OREAD))
    out['read'] = c.read(fid=2, count=4096).decode()
    st = c.stat(2)
    out['stat'] = [st.name, st.length, st.uid]
    out['escape'] = len(c.walk(fid=0, newfid=6, path='../../etc/passwd'))  # a partial walk
    c.walk(fid=0, newfid=3, path='')
    try:
        c.create(fid=3, name='made.txt', perm=0o644, mode=int(OWRITE))
    except RemoteError as e:
        out['create'] = str(e)
    else:
        out['wrote'] = c.write(fid=3, data=b'from py9p', offset=0)
        c.clunk(3)
        c.walk(fid=0, newfid=4, path='made.txt'); out['made'] = c.stat(4).length
        c.walk(fid=0, newfid=5, path='hello.txt'); c.remove(5)
print(json.dumps(out))
"""


@pytest.fixture
def bridge_port(irmd: IrmdProc, files: str, tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start(irmd, "bridge", "--name", files, "--listen", f"tcp!127.0.0.1!{port}", log=tmp_path / "bridge.log")
    try:
        wait_for(lambda: proc.poll() is not None or "bridging" in (tmp_path / "bridge.log").read_text(), 10, "bridge")
        yield port
    finally:
        stop(proc)


@pytest.fixture
def bridge_unix(irmd: IrmdProc, files: str, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "9p.sock"
    proc = start(irmd, "bridge", "--name", files, "--listen", f"unix!{path}", log=tmp_path / "ubridge.log")
    try:
        wait_for(lambda: proc.poll() is not None or path.exists(), 10, "the unix bridge")
        yield path
    finally:
        stop(proc)


def third_party(where: str, uname: str) -> dict[str, object]:
    r = subprocess.run([py9p_python(), "-c", THIRD_PARTY, where, uname], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_third_party_client_over_a_unix_socket_works_as_itself(bridge_unix: Path, export: Path) -> None:
    out = third_party(f"unix:{bridge_unix}", "any-label")  # SO_PEERCRED: it is root, whatever it claims
    assert out["ls"] == ["hello.txt"] and out["read"] == "hello styx\n"
    assert out["stat"] == ["hello.txt", 11, pwd.getpwuid(export.stat().st_uid).pw_name]
    assert out["wrote"] == 9 and out["made"] == 9 and (export / "made.txt").read_text() == "from py9p"
    assert not (export / "hello.txt").exists()
    assert out["escape"] == 2  # '..' twice stays at the root; 'etc' is not there


def test_third_party_client_over_tcp_is_anonymous_and_reads_only(bridge_port: int, export: Path) -> None:
    out = third_party(f"tcp:{bridge_port}", "root")  # no identity over TCP: claiming root changes nothing
    assert out["ls"] == ["hello.txt"] and out["read"] == "hello styx\n"
    assert "permission denied" in str(out["create"])
    assert sorted(p.name for p in export.iterdir()) == ["hello.txt"]


def test_bridge_survives_garbage_and_answers_bad_messages(bridge_port: int) -> None:
    with socket.create_connection(("127.0.0.1", bridge_port), timeout=10) as s:
        s.sendall(struct.pack("<I", 3))  # a size below the header: the bridge hangs up
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", bridge_port), timeout=10) as s:
        s.sendall(struct.pack("<IBH", 9, 200, 1) + b"zz")  # well framed, unknown type
        reply = w.decode(s.recv(1000))
        assert isinstance(reply, w.Rerror) and "unknown message type" in reply.ename
    with socket.create_connection(("127.0.0.1", bridge_port), timeout=10) as s:  # still serving
        client = Client(StreamTransport(s))
        assert client.cat("hello.txt") == b"hello styx\n"


P9FS_CLIENT = """
import sys, json
from p9fs import P9FileSystem
fs = P9FileSystem(host='127.0.0.1', port=int(sys.argv[1]), username=sys.argv[2], version='9P2000')
out = {'ls': sorted(fs.ls('', detail=False)), 'cat': fs.cat_file('hello.txt').decode(),
       'info': fs.info('hello.txt')['size']}
try:
    fs.pipe_file('made.txt', b'from p9fs')
except Exception as e:
    out['pipe'] = str(e)
print(json.dumps(out))
"""


def test_p9fs_client_through_the_tcp_bridge(bridge_port: int, export: Path) -> None:
    python = p9fs_python()
    r = subprocess.run(
        [python, "-c", P9FS_CLIENT, str(bridge_port), pwd.getpwuid(export.stat().st_uid).pw_name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ls"] == ["/hello.txt"] and out["cat"] == "hello styx\n" and out["info"] == 11
    assert "permission denied" in out["pipe"]
    assert sorted(p.name for p in export.iterdir()) == ["hello.txt"]


def test_our_cli_against_py9p_server(export: Path, tmp_path: Path, styx: Styx) -> None:
    python = p9fs_python()
    port = free_port()
    with open(tmp_path / "py9p.log", "wb") as log:
        server = subprocess.Popen(
            [python, "-m", "py9p", "-w", "-p", str(port), "-a", "127.0.0.1", "-r", str(export)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
    try:
        at = f"tcp!127.0.0.1!{port}:"
        wait_for(lambda: server.poll() is not None or styx("ls", at + "/").returncode == 0, 15, "py9p server")
        assert styx("ls", at + "/").stdout.split() == ["hello.txt"]
        assert styx("cat", at + "/hello.txt").stdout == "hello styx\n"
        assert styx("put", at + "/new.txt", stdin="one").returncode == 0
        assert styx("put", at + "/new.txt", stdin="two!").returncode == 0
        assert (export / "new.txt").read_text() == "two!"
        assert "length 4" in styx("stat", at + "/new.txt").stdout
        assert styx("mkdir", at + "/d").returncode == 0 and (export / "d").is_dir()
        assert styx("rm", at + "/new.txt").returncode == 0 and not (export / "new.txt").exists()
        assert styx("cat", at + "/../../etc/hostname").returncode == 1
    finally:
        stop(server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unix_socket_bridge_with_our_client(bridge_unix: Path, export: Path, styx: Styx) -> None:
    r = styx("cat", f"unix!{bridge_unix}:/hello.txt")
    assert r.stdout == "hello styx\n", r.stderr
    assert styx("put", f"unix!{bridge_unix}:/new.txt", stdin="via unix").returncode == 0
    assert (export / "new.txt").read_text() == "via unix"
    data = os.urandom(2 * w.MSIZE_DEFAULT + 777)  # large messages, split into SDUs by the bridge
    with Client(dial(f"unix!{bridge_unix}"), msize=1 << 20) as c:
        assert c.msize == w.MSIZE_DEFAULT  # the bridge asked no more than it frames
        c.put("big.bin", data)
        assert c.cat("big.bin") == data
    assert (export / "big.bin").read_bytes() == data


# -- the IRMd as files, and net/ -------------------------------------------------------------------


@pytest.fixture
def irmfs(
    request: pytest.FixtureRequest, irmd: IrmdProc, local_layer: str, tmp_path: Path, styx: Styx
) -> Iterator[str]:
    hold = getattr(request, "param", 0)  # descriptors the server is started with
    proc = start(
        irmd, "serve", "--name", "irm", "--irm", "--layer", local_layer, log=tmp_path / "irm.log", hold_fds=hold
    )
    try:
        wait_for(lambda: proc.poll() is not None or styx("ls", "irm:/").returncode == 0, 15, "styx serve --irm")
        assert proc.poll() is None, (tmp_path / "irm.log").read_text()
        yield "irm"
    finally:
        stop(proc)
        irmd.note_children()


def test_irmd_tree_lists_and_prints(irmfs: str, styx: Styx) -> None:
    assert styx("ls", "irm:/").stdout.split() == ["ctl", "flow/", "ipcp/", "layer/", "name/", "net/"]
    assert styx("cat", "irm:/ipcp/lo").stdout.split() == ["ctl", "layer", "show", "status"]
    assert styx("ls", "irm:/ipcp").stdout.split() == ["ctl", "lo/"]
    assert styx("ls", "irm:/ipcp/lo").stdout.split() == ["ctl", "layer", "show", "status"]
    show = styx("cat", "irm:/ipcp/lo/show").stdout
    assert show.startswith("ipcp:\n+") and "| layer | local |" in show.replace("  ", " ").replace("  ", " ")
    status = styx("cat", "irm:/ipcp/lo/status").stdout
    assert "type local" in status and "state operational" in status
    assert styx("cat", "irm:/ipcp/lo/layer").stdout == "local\n"
    assert "irm" in styx("cat", "irm:/layer/local/names").stdout.split()
    assert "layers local" in styx("cat", "irm:/name/irm/status").stdout
    assert styx("ls", "irm:/flow").stdout.split()  # this very ls is a flow


def test_irmd_driven_through_ctl_files(irmd: IrmdProc, irmfs: str, styx: Styx) -> None:
    assert styx("put", "irm:/ctl", stdin="ipcp bootstrap name lo2 type local layer other\n").returncode == 0
    irmd.note_children()
    assert "lo2/" in styx("ls", "irm:/ipcp").stdout.split()
    assert styx("put", "irm:/name/ctl", stdin="create svc").returncode == 0
    assert styx("put", "irm:/name/svc/ctl", stdin="register layer other").returncode == 0
    assert "layers other" in styx("cat", "irm:/name/svc/status").stdout
    assert any(r["name"] == "svc" and r["layers"] == "other" for r in irmd.table("name", "list"))
    bad = styx("put", "irm:/ipcp/lo2/ctl", stdin="explode")
    assert bad.returncode == 1 and "explode" in bad.stderr
    assert styx("put", "irm:/ipcp/lo2/ctl", stdin="destroy").returncode == 0
    assert not any(r["name"] == "lo2" for r in irmd.table("ipcp", "list"))


def ctl_open(c: Client, path: str) -> tuple[int, str]:
    """A net file opened for reading and writing (a clone, a listen), and the conversation it names."""
    fid = c.walk(path)
    c.open(fid, w.ORDWR)
    return fid, c.read(fid, 0, 64).decode()


# A server with many clients hands out descriptors past 1023, where select() fails: its flows work there too.
@pytest.mark.parametrize("irmfs", [0, 1100], indirect=True, ids=["few-fds", "fds-past-1023"])
def test_a_flow_made_and_used_through_net_files(irmd: IrmdProc, irmfs: str, default_client: None) -> None:
    with Client(dial("irm")) as c:
        ann, n = ctl_open(c, "net/clone")
        c.write(ann, 0, b"announce netecho local")
        assert c.cat(f"net/{n}/status").startswith(b"announced local netecho ")
        con, conv_m = ctl_open(c, "net/clone")
        c.write(con, 0, b"connect netecho")
        assert b"connected" in c.cat(f"net/{conv_m}/status")
        _, k = ctl_open(c, f"net/{n}/listen")  # the open waits for the flow to arrive
        out = c.walk(f"net/{conv_m}/data")
        c.open(out, w.ORDWR)
        inp = c.walk(f"net/{k}/data")
        c.open(inp, w.ORDWR)
        c.write(out, 0, b"hello through files")
        assert c.read(inp, 0, 100) == b"hello through files"
        c.write(inp, 0, b"and back")
        assert c.read(out, 0, 4) == b"and "  # a short read leaves the rest of the SDU
        assert c.read(out, 0, 100) == b"back"
        c.clunk(out)
        c.clunk(con)  # the last open file of conversation m: its flow is deallocated
        assert c.read(inp, 0, 100) == b""  # end of file at the other end
        names = [s.name for s in c.ls("net")]
        assert conv_m not in names and k in names and "clone" in names
        bad, _ = ctl_open(c, "net/clone")
        with pytest.raises(StyxClientError, match="unknown ctl command"):
            c.write(bad, 0, b"dance")
        with pytest.raises(StyxClientError, match="own name"):
            c.write(bad, 0, b"announce irm")


def test_a_listener_written_as_for_plan_9_accepts_and_rejects_calls(
    irmd: IrmdProc, irmfs: str, default_client: None
) -> None:
    """What announce(2), listen(2), accept(2) and reject(2) write and read: a conversation number
    without a newline, `accept N` and `reject N CAUSE` on the ctl the listen opened; netstat(1)
    takes the first word of status as the state."""
    with Client(dial("irm")) as c:

        def data(n: str) -> int:
            fid = c.walk(f"net/{n}/data")
            c.open(fid, w.ORDWR)
            return fid

        ann, adir = ctl_open(c, "net/clone")
        c.write(ann, 0, b"announce plan9echo local")
        assert c.cat(f"net/{adir}/status").split()[0] == b"announced"
        caller, cdir = ctl_open(c, "net/clone")
        c.write(caller, 0, b"connect plan9echo")
        assert c.cat(f"net/{cdir}/status").split()[0] == b"connected"
        with pytest.raises(StyxClientError, match="no incoming call"):
            c.write(caller, 0, f"accept {cdir}".encode())  # a call we made is not ours to accept
        with pytest.raises(StyxClientError, match=f"conversation {cdir} is connected: cannot listen"):
            c.open(c.walk(f"net/{cdir}/listen"), w.ORDWR)
        lcfd, ldir = ctl_open(c, f"net/{adir}/listen")
        assert ldir.isdigit()
        c.write(lcfd, 0, f"accept {ldir}".encode())
        dfd, out = data(ldir), data(cdir)
        c.write(out, 0, b"ping")
        assert c.read(dfd, 0, 100) == b"ping"

        caller2, cdir2 = ctl_open(c, "net/clone")
        c.write(caller2, 0, b"connect plan9echo")
        lcfd2, ldir2 = ctl_open(c, f"net/{adir}/listen")
        c.write(lcfd2, 0, f"reject {ldir2} busy".encode())
        assert c.cat(f"net/{ldir2}/status").split()[0] == b"closed"
        assert c.read(data(cdir2), 0, 100) == b""  # the caller sees its call end
        waiting = c.walk(f"net/{adir}/listen")
        tag = c._send(w.Topen(0, waiting, w.ORDWR))  # parked until a call comes
        c.write(ann, 0, b"hangup")
        reply = c._receive(10)
        assert reply.tag == tag and isinstance(reply, w.Rerror)
        assert reply.ename == f"conversation {adir} is closed: cannot listen"


def test_a_net_write_the_window_cannot_take_whole_waits_and_is_never_short(
    irmd: IrmdProc, irmfs: str, default_client: None
) -> None:
    """Plan 9's mount driver hands a short Rwrite to the program, which takes it for a failed write
    (`write error`): a data write the flow's window takes only part of waits, and is answered whole
    once the peer has read enough for the rest to go."""
    with Client(dial("irm")) as c:
        ann, n = ctl_open(c, "net/clone")
        c.write(ann, 0, b"announce slowreader local")
        con, m = ctl_open(c, "net/clone")
        c.write(con, 0, b"connect slowreader")
        _, k = ctl_open(c, f"net/{n}/listen")
        out, inp = c.walk(f"net/{m}/data"), c.walk(f"net/{k}/data")
        c.open(out, w.ORDWR)
        c.open(inp, w.ORDWR)
        # Three SDUs a write: the window (a power of two, of SDUs or bytes) fills within one.
        mtu = int(c.cat(f"net/{m}/status").split()[-1])
        chunk = bytes(range(256)) * (2 * mtu // 256) + b"!" * (2 * mtu % 256 + 1)
        assert len(chunk) <= c.iounit
        written, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 60:  # until the peer's window is full: a write left waiting
            tag = c._send(w.Twrite(0, out, 0, chunk))
            try:
                reply = c._receive(2)
            except TransportTimeout:
                break
            assert isinstance(reply, w.Rwrite) and reply.count == len(chunk), reply
            written += reply.count
        else:
            pytest.fail("the flow's window never filled")
        got = 0
        answered = None
        while answered is None or got < written + len(chunk):  # read at the other end: the write goes on
            rtag = c._send(w.Tread(0, inp, 0, c.iounit))
            while True:
                reply = c._receive(10)
                if reply.tag == tag:
                    answered = reply
                    continue
                assert reply.tag == rtag and isinstance(reply, w.Rread)
                got += len(reply.data)
                break
        assert isinstance(answered, w.Rwrite) and answered.count == len(chunk), answered
        assert got == written + len(chunk)


# -- mount (FUSE) --------------------------------------------------------------------------------


def fuse_usable() -> str:
    """Why FUSE cannot be used here, or '' if it can."""
    if importlib.util.find_spec("mfusepy") is None:
        return "mfusepy is not installed"
    if not Path("/dev/fuse").exists() or shutil.which("fusermount3") is None:
        return "no /dev/fuse or fusermount3"
    return ""


@pytest.mark.skipif(bool(fuse_usable()), reason=fuse_usable() or "fuse")
def test_mount_makes_ordinary_tools_work_and_unmounts_on_sigterm(
    irmd: IrmdProc, files: str, export: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = start(irmd, "mount", files, str(mnt), log=tmp_path / "mount.log")
    try:
        wait_for(lambda: proc.poll() is not None or os.path.ismount(mnt), 15, "the mount")
        assert os.path.ismount(mnt), (tmp_path / "mount.log").read_text()
        assert sorted(os.listdir(mnt)) == ["hello.txt"]
        assert (mnt / "hello.txt").read_text() == "hello styx\n"
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
        line = next(m for m in mounts if m.split()[4] == str(mnt))
        assert line.split(" - ")[1].split()[:2] == ["fuse.styx", "styx\\043files"]  # styx#files in mount, df -a
        assert os.statvfs(mnt).f_bsize == w.MSIZE_DEFAULT - w.IOHDRSZ  # tools are told to use the iounit
        (export / "big.bin").write_bytes(os.urandom(3_000_000))
        with open(mnt / "big.bin", "rb", buffering=0) as f:  # small reads, served by the read-ahead
            assert b"".join(iter(lambda: f.read(4096), b"")) == (export / "big.bin").read_bytes()
        assert (mnt / "big.bin").stat().st_blocks == (3_000_000 + 511) // 512
        (export / "big.bin").unlink()
        (mnt / "new.txt").write_bytes(b"z" * 200_000)
        assert (export / "new.txt").read_bytes() == b"z" * 200_000
        subprocess.run(["cp", str(mnt / "new.txt"), str(mnt / "copy.txt")], check=True, timeout=20)
        assert (export / "copy.txt").stat().st_size == 200_000
        (mnt / "d").mkdir()
        os.rename(mnt / "copy.txt", mnt / "moved.txt")
        assert sorted(os.listdir(export)) == ["d", "hello.txt", "moved.txt", "new.txt"]
        os.unlink(mnt / "moved.txt")
        (mnt / "d").rmdir()
        with pytest.raises(FileNotFoundError):
            (mnt / "nope").read_text()
        proc.terminate()
        assert proc.wait(10) == 0
        assert not os.path.ismount(mnt)
    finally:
        stop(proc)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], timeout=10, check=False)


@pytest.mark.skipif(bool(fuse_usable()), reason=fuse_usable() or "fuse")
def test_mounted_irmd_files_read_and_take_commands(irmd: IrmdProc, irmfs: str, tmp_path: Path) -> None:
    mnt = tmp_path / "irm"
    mnt.mkdir()
    proc = start(irmd, "mount", irmfs, str(mnt), log=tmp_path / "mount.log")
    try:
        wait_for(lambda: proc.poll() is not None or os.path.ismount(mnt), 15, "the mount")
        assert "state operational" in (mnt / "ipcp" / "lo" / "status").read_text()  # length 0, still read
        (mnt / "name" / "ctl").write_text("create viafuse\n")
        assert "viafuse" in os.listdir(mnt / "name")
    finally:
        stop(proc)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], timeout=10, check=False)


def test_started_by_the_irmd_on_demand(irmd: IrmdProc, local_layer: str, export: Path, styx: Styx) -> None:
    irmd.irm_ok(
        "bind",
        "program",
        str(BIN / "styx"),
        "name",
        "ondemand",
        "auto",
        "--",
        "serve",
        "--name",
        "ondemand",
        "--root",
        str(export),
    )
    irmd.irm_ok("name", "register", "ondemand", "layer", local_layer)
    r = styx("cat", "ondemand:/hello.txt")
    irmd.note_children()
    assert r.stdout == "hello styx\n", r.stderr
    assert styx("put", "ondemand:/x", stdin="y").returncode == 0 and (export / "x").read_text() == "y"


def test_many_clients_at_once(files: str, export: Path, default_client: None) -> None:
    def work(i: int) -> bytes:
        with Client(dial(files)) as c:
            c.put(f"f{i}", bytes([i]) * 50_000)
            return c.cat(f"f{i}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(16)))
    assert results == [bytes([i]) * 50_000 for i in range(16)]
    assert len(list(export.iterdir())) == 17


def test_reliable_flows_carry_large_messages_and_others_one_sdu_each(
    files: str, export: Path, default_client: None
) -> None:
    data = os.urandom(3 * w.MSIZE_DEFAULT + 12345)
    with Client(dial(files)) as c:  # a reliable flow: messages of several SDUs each
        assert c.msize == w.MSIZE_DEFAULT
        c.put("big.bin", data)
        assert c.cat("big.bin") == data
    assert (export / "big.bin").read_bytes() == data
    with Client(FlowTransport(flow_alloc(files, qos=qos.raw, timeout=10))) as c:  # a message is an SDU
        assert c.msize == c.transport.flow.mtu  # type: ignore[attr-defined]
        assert c.cat("big.bin") == data
        c.put("again.bin", data[::-1])
    assert (export / "again.bin").read_bytes() == data[::-1]


def test_server_and_bridge_end_with_their_irmd(tmp_path: Path, export: Path) -> None:
    own = start_irmd(tmp_path, "solo")
    procs = []
    try:
        own.request(m.IpcpBootstrap("lo", "local", "local"))
        own.note_children()
        procs.append(
            start(own, "serve", "--name", "f", "--root", str(export), "--layer", "local", log=tmp_path / "s.log")
        )
        procs.append(
            start(own, "bridge", "--name", "f", "--listen", f"tcp!127.0.0.1!{free_port()}", log=tmp_path / "b.log")
        )
        wait_for(lambda: all("styx:" in (tmp_path / f).read_text() for f in ("s.log", "b.log")), 10, "start")
    finally:
        stop_irmd(own)
    try:
        assert [p.wait(10) for p in procs] == [1, 1]
        assert "lost the IRMd" in (tmp_path / "b.log").read_text()
    finally:
        for p in procs:
            stop(p)


@pytest.mark.parametrize("answer", ["nothing", "echo"])
def test_a_name_that_does_not_speak_9p_fails_fast_and_says_so(
    irmd: IrmdProc, local_layer: str, styx: Styx, client_factory: Callable[[], IrmClient], answer: str
) -> None:
    irm = client_factory()
    call(irm.channel, m.Bind("process", str(os.getpid()), "notnine"), timeout=10)
    call(irm.channel, m.NameRegister("notnine", [local_layer]), timeout=10)
    held: list[Flow] = []

    def serve_one() -> None:
        flow = flow_accept(irm=irm)
        held.append(flow)
        if answer == "echo":
            flow.write(flow.read())  # a Tversion back is no Rversion

    t = threading.Thread(target=serve_one, daemon=True)
    t.start()
    t0 = time.monotonic()
    r = styx("ls", "notnine:/")
    took = time.monotonic() - t0
    for f in held:
        f.close()
    assert r.returncode == 1 and r.stderr.startswith("styx: notnine: not a 9P service"), r.stderr
    assert took < 8, f"took {took:.1f} s"  # the Tversion wait (3 s), not the flow's timeout


def test_bridge_limits_connections_per_user_with_an_rerror(irmd: IrmdProc, files: str, tmp_path: Path) -> None:
    port = free_port()
    proc = start(
        irmd,
        "bridge",
        "--name",
        files,
        "--listen",
        f"tcp!127.0.0.1!{port}",
        "--max-conns-per-user",
        "2",
        log=tmp_path / "bridge.log",
    )
    socks: list[socket.socket] = []
    try:
        wait_for(lambda: "bridging" in (tmp_path / "bridge.log").read_text(), 10, "the bridge")
        for _ in range(2):  # all TCP clients are the one user none
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            Client(StreamTransport(socks[-1]))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(w.encode(w.Tversion(w.NOTAG, 8192, "9P2000")))
            reply = w.decode(s.recv(1000))
            assert reply == w.Rerror(w.NOTAG, "too many connections from user none (limit 2)")
            assert s.recv(100) == b""  # and hung up
        socks.pop().close()
        wait_for(lambda: _serves(port), 10, "room for a client again")
    finally:
        for s in socks:
            s.close()
        stop(proc)


def _serves(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            return Client(StreamTransport(s)).cat("hello.txt") == b"hello styx\n"
        except StyxClientError:
            return False
