"""Styx against an unprivileged local attacker (uid 65534 through setpriv), each attack beside
the legitimate use it must not disturb: the IRMd's files and net/ judged as the flow's peer,
the unix bridge carrying the peer, TCP clients as none, a root file server working as each
client with the ids the kernel vouches for (not its account's groups), and a symlink-swap race
that must never lead outside the served root."""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, start_irmd, stop_irmd, wait_for
from test_styx_e2e import free_port, start, stop

from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import FlowTransport, dial
from flowlib import flow_alloc, qos
from flowlib.irm import IrmClient
from proto import messages as m

CHECKOUT = Path(__file__).resolve().parents[1]
NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="playing the attacker as uid 65534 needs root and setpriv (CI runs as root)",
)
pytestmark = needs_root


@pytest.fixture
def lab() -> Iterator[Path]:
    """A directory uid 65534 can reach (pytest's own tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="styx-trust-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def open_irmd(lab: Path) -> Iterator[IrmdProc]:
    """An IRMd (with a local layer) whose socket the attacker can reach."""
    irmd = start_irmd(lab)
    try:
        irmd.request(m.IpcpBootstrap("lo", "local", "local"))
        irmd.note_children()
        yield irmd
    finally:
        stop_irmd(irmd)


def popen_nobody(irmd: IrmdProc, code: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    """Start Python code as uid 65534 against `irmd`, its output on pipes (and its input, with `stdin`)."""
    return subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", code, *args],
        env=dict(irmd.env, PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1"),
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def as_nobody(irmd: IrmdProc, code: str, *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
    """Run Python code as uid 65534 against `irmd`."""
    env = dict(irmd.env, PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def as_ids(irmd: IrmdProc, ids: list[str], code: str, *args: str, timeout: float = 40) -> dict[str, object]:
    """The result of Python code run with the ids `ids` (setpriv's options) against `irmd`."""
    env = dict(irmd.env, PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1")
    argv = ["setpriv", *ids, sys.executable, "-c", code, *args]
    return result(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd="/"))


def result(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def serve(irmd: IrmdProc, lab: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """`styx serve --name NAME ARGS` as root, up and answering."""
    log = lab / f"{name}.log"
    proc = start(irmd, "-v", "serve", "--name", name, "--layer", "local", *args, log=log)

    def up() -> bool:
        if proc.poll() is not None:
            return True
        return any(r["name"] == name and "local" in r["layers"] for r in irmd.table("name", "list"))

    wait_for(up, 15, f"styx serve {name}")
    assert proc.poll() is None, log.read_text()
    return proc


@pytest.fixture
def irm_server(open_irmd: IrmdProc, lab: Path) -> Iterator[str]:
    proc = serve(open_irmd, lab, "irm", "--irm")
    try:
        yield "irm"
    finally:
        stop(proc)


def names(irmd: IrmdProc) -> dict[str, dict[str, str]]:
    return {r["name"]: r for r in irmd.table("name", "list")}


# The start of a script serving the name argv[1] on the local layer: bound and registered through its
# IrmClient `irm`, "ready" printed; what it does with each flow follows.
SERVE_LOCAL_NAME = r"""
import os, sys, time
from flowlib import flow_accept
from flowlib.irm import IrmClient, call
from proto import messages as m
irm = IrmClient()
call(irm.channel, m.Bind("process", str(os.getpid()), sys.argv[1]), 10)
call(irm.channel, m.NameRegister(sys.argv[1], ["local"]), 10)
print("ready", flush=True)
flows = []
"""

PROBE = (
    SERVE_LOCAL_NAME
    + r"""
while True:
    flows.append(flow_accept(irm=irm))
    print(flows[-1].peer_uid, flush=True)
"""
)


class Probe:
    """A name served by a process of its own (not an ancestor of the servers the tests start, which
    a process binding would let take its flows): records who each flow's peer is, as the IRMd vouches."""

    def __init__(self, irmd: IrmdProc, name: str = "probe") -> None:
        env = dict(irmd.env, PYTHONPATH=str(CHECKOUT))
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, name], env=env, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self._lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: self._lines or self.proc.poll() is not None, 30, "the probe to serve")
        assert self._lines[:1] == ["ready"], f"the probe exited with {self.proc.returncode}"

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            self._lines.append(line.strip())

    @property
    def peers(self) -> list[int]:
        return [int(line) for line in self._lines[1:]]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def probe(open_irmd: IrmdProc) -> Iterator[Probe]:
    p = Probe(open_irmd)
    try:
        yield p
    finally:
        p.close()


@contextlib.contextmanager
def root_client(irmd: IrmdProc, target: str) -> Iterator[Client]:
    """A client of this (root) test process, on a flow allocated through `irmd`."""
    irm = IrmClient(irmd.sock)
    try:
        with Client(FlowTransport(flow_alloc(target, qos=qos.data, timeout=10, irm=irm))) as c:
            yield c
    finally:
        irm.close()


# -- the IRMd's files: judged as the flow's peer ---------------------------------------------------

CTL_ATTACK = r"""
import json, sys
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user="root") as c:   # the attach name claims root
    for key, path, cmd in [("bind", "ctl", "bind program /bin/sh name pwn auto -- -c id"),
                           ("create", "name/ctl", "create stolen"),
                           ("bootstrap", "ipcp/ctl", "bootstrap name evil type local layer evil")]:
        try:
            out[key] = c.command(path, cmd)
        except StyxClientError as e:
            out[key] = "error: " + str(e)
    out["status"] = c.cat("ipcp/lo/status").decode()
    out["ls"] = sorted(s.name for s in c.ls("/"))
print(json.dumps(out))
"""


def test_ctl_writes_are_the_peers_and_the_irmd_refuses_them(open_irmd: IrmdProc, irm_server: str) -> None:
    out = result(as_nobody(open_irmd, CTL_ATTACK, irm_server))
    for key in ("bind", "create", "bootstrap"):
        assert str(out[key]).startswith("error: ") and "permission denied" in str(out[key]), out
    assert "type local" in str(out["status"])  # reading is fine
    assert "net" in out["ls"]  # a local user may use flows through net/
    table = names(open_irmd)
    assert "pwn" not in table and "stolen" not in table
    assert not any(r["name"] == "evil" for r in open_irmd.table("ipcp", "list"))
    with root_client(open_irmd, irm_server) as c:  # root's own use beside it
        c.command("name/ctl", "create legit")
    assert "legit" in names(open_irmd)


NET_ATTACK = r"""
import json, sys, time
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user="root") as c:
    def conv(cmd):
        fid = c.walk("net/clone")
        c.open(fid, w.ORDWR)
        n = c.read(fid, 0, 32).decode()
        try:
            c.write(fid, 0, cmd.encode())
            return fid, n, "ok"
        except StyxClientError as e:
            return fid, n, "error: " + str(e)
    _, _, out["announce"] = conv("announce stolen local")
    fid, n, out["connect"] = conv("connect probe")
    out["status"] = c.cat(f"net/{n}/status").decode()
    time.sleep(0.5)
print(json.dumps(out))
"""


def test_net_flows_are_allocated_and_announced_as_the_peer(open_irmd: IrmdProc, irm_server: str, probe: Probe) -> None:
    out = result(as_nobody(open_irmd, NET_ATTACK, irm_server))
    assert "permission denied" in str(out["announce"]), out
    assert "stolen" not in names(open_irmd)
    assert out["connect"] == "ok" and "connected" in str(out["status"])
    wait_for(lambda: probe.peers, 10, "the probe's flow")
    assert probe.peers == [NOBODY]  # the flow was the attacker's own, not the server's (root)


def test_anonymous_clients_see_read_only_irmd_files(open_irmd: IrmdProc, irm_server: str, lab: Path) -> None:
    port = free_port()
    bridge = start(
        open_irmd, "bridge", "--name", irm_server, "--listen", f"tcp!127.0.0.1!{port}", log=lab / "bridge.log"
    )
    try:
        wait_for(lambda: "bridging" in (lab / "bridge.log").read_text(), 10, "the bridge")
        with Client(dial(f"tcp!127.0.0.1!{port}"), user="root") as c:  # over TCP nobody is anybody
            listing = {s.name: s for s in c.ls("/")}
            assert "net" not in listing and listing["ctl"].mode & 0o222 == 0
            assert "type local" in c.cat("ipcp/lo/status").decode()
            with pytest.raises(StyxClientError, match="permission denied"):
                c.command("name/ctl", "create via-tcp")
            fid = c.walk("ctl")
            with pytest.raises(StyxClientError, match="permission denied"):
                c.open(fid, w.OWRITE)
        assert "via-tcp" not in names(open_irmd)
    finally:
        stop(bridge)


TCP_HOLDER = r"""
import socket, struct, sys, time
from apps.styx import wire as w
port, n = int(sys.argv[1]), int(sys.argv[2])
def rpc(s, msg):
    s.sendall(w.encode(msg))
    size = struct.unpack("<I", s.recv(4, socket.MSG_WAITALL))[0]
    return w.decode(struct.pack("<I", size) + s.recv(size - 4, socket.MSG_WAITALL))
held = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    rpc(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    r = rpc(s, w.Tattach(1, 0, w.NOFID, "none", ""))
    held.append(s)
print("attached", len(held), type(r).__name__, flush=True)
time.sleep(120)
"""


def test_tcp_clients_of_a_root_bridge_hold_no_slots_of_the_bridges_user(open_irmd: IrmdProc, lab: Path) -> None:
    """The bridge allocates its anonymous clients' flows as the anonymous account: however many the
    attacker holds (attached, then silent), they are counted there and root's own clients are served."""
    export = lab / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello\n")
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    port = free_port()
    bridge = start(open_irmd, "bridge", "--name", "files", "--listen", f"tcp!127.0.0.1!{port}", log=lab / "bridge.log")
    holder = None
    try:
        wait_for(lambda: "bridging" in (lab / "bridge.log").read_text(), 10, "the bridge")
        env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1")
        holder = subprocess.Popen(
            [*AS_NOBODY, sys.executable, "-c", TCP_HOLDER, str(port), "16"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().startswith("attached 16 Rattach")
        log = (lab / "files.log").read_text()
        assert log.count(" from nobody via layer local") == 16 and " from root via" not in log, log
        with root_client(open_irmd, "files") as c:  # root, beside the 16, on a local flow
            assert c.cat("hello.txt") == b"hello\n"
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        stop(bridge)
        stop(proc)


IDLE_ANON = TCP_HOLDER.replace(
    "time.sleep(120)",
    """
t0 = time.monotonic()
held[0].settimeout(30)
print("closed", held[0].recv(100) == b"", round(time.monotonic() - t0, 1), flush=True)
""",
)


def test_anonymous_clients_keep_no_slot_for_nothing(open_irmd: IrmdProc, lab: Path) -> None:
    """An anonymous client (over the TCP bridge, attached as none) that asks nothing is closed after
    --anon-idle-timeout; root's idle local client stays attached and is served after longer."""
    export = lab / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello\n")
    proc = serve(open_irmd, lab, "files", "--root", str(export), "--anon-idle-timeout", "2")
    port = free_port()
    bridge = start(open_irmd, "bridge", "--name", "files", "--listen", f"tcp!127.0.0.1!{port}", log=lab / "bridge.log")
    try:
        wait_for(lambda: "bridging" in (lab / "bridge.log").read_text(), 10, "the bridge")
        with root_client(open_irmd, "files") as c:
            assert c.cat("hello.txt") == b"hello\n"
            out = as_nobody(open_irmd, IDLE_ANON, str(port), "1").stdout.split()
            assert out[:5] == ["attached", "1", "Rattach", "closed", "True"], out
            assert 1.5 <= float(out[5]) < 15, out
            assert c.cat("hello.txt") == b"hello\n"  # idle as long, not anonymous: still attached
        assert "asked nothing, anonymous, for 2 s: closed" in (lab / "files.log").read_text()
    finally:
        stop(bridge)
        stop(proc)


UNIX_ATTACK = r"""
import json, sys, time
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user="root") as c:
    try:
        out["create"] = c.command("name/ctl", "create via-unix")
    except StyxClientError as e:
        out["create"] = "error: " + str(e)
    fid = c.walk("net/clone")
    c.open(fid, w.ORDWR)
    c.write(fid, 0, b"connect probe")
    time.sleep(0.5)
print(json.dumps(out))
"""


def test_unix_bridge_relays_each_client_as_itself(
    open_irmd: IrmdProc, irm_server: str, lab: Path, probe: Probe
) -> None:
    path = lab / "irm.9p"
    bridge = start(open_irmd, "bridge", "--name", irm_server, "--listen", f"unix!{path}", log=lab / "ubridge.log")
    try:
        wait_for(path.exists, 10, "the unix bridge")
        assert path.stat().st_mode & 0o777 == 0o666  # anyone may connect: each is served as itself
        out = result(as_nobody(open_irmd, UNIX_ATTACK, f"unix!{path}"))
        assert "permission denied" in str(out["create"]) and "via-unix" not in names(open_irmd)
        wait_for(lambda: probe.peers, 10, "the probe's flow")
        assert probe.peers == [NOBODY]  # the bridge allocated it with the client's credentials
        with Client(dial(f"unix!{path}")) as c:  # root through the same socket
            c.command("name/ctl", "create root-via-unix")
        assert "root-via-unix" in names(open_irmd)
    finally:
        stop(bridge)


# -- a root file server works as each client -------------------------------------------------------

FILES_ATTACK = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user="root") as c:
    def attempt(key, fn, *args):
        try:
            r = fn(*args)
            out[key] = r.decode() if isinstance(r, (bytes, bytearray)) else "ok"
        except StyxClientError as e:
            out[key] = "error: " + str(e)
    attempt("secret", c.cat, "secret.txt")
    attempt("shared", c.cat, "shared.txt")
    attempt("put-root-dir", c.put, "evil.txt", b"x")
    attempt("overwrite", c.put, "shared.txt", b"defaced")
    attempt("put-own-dir", c.put, "drop/mine.txt", b"mine")
    st = w.Stat.dont_touch()
    st.mode = 0o666
    attempt("chmod", c.wstat_fid, c.walk("secret.txt"), st)
print(json.dumps(out))
"""


def test_root_file_server_does_each_clients_file_access_as_that_client(open_irmd: IrmdProc, lab: Path) -> None:
    export = lab / "export"
    export.mkdir()
    (export / "secret.txt").write_text("root only\n")
    os.chmod(export / "secret.txt", 0o600)
    (export / "shared.txt").write_text("everyone reads\n")
    (export / "drop").mkdir()
    os.chown(export / "drop", NOBODY, NOBODY)
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    try:
        out = result(as_nobody(open_irmd, FILES_ATTACK, "files"))
        assert out["secret"] == "error: 'secret.txt' permission denied", out
        assert out["shared"] == "everyone reads\n"
        assert str(out["put-root-dir"]).startswith("error") and not (export / "evil.txt").exists()
        assert str(out["overwrite"]).startswith("error") and (export / "shared.txt").read_text() == "everyone reads\n"
        assert str(out["chmod"]).startswith("error") and (export / "secret.txt").stat().st_mode & 0o777 == 0o600
        assert out["put-own-dir"] == "ok"
        made = (export / "drop" / "mine.txt").stat()
        assert (made.st_uid, made.st_gid) == (NOBODY, NOBODY)  # created by the client, not by root
        with root_client(open_irmd, "files") as c:  # root, beside it, reads and writes anything
            assert c.cat("secret.txt") == b"root only\n"
            c.put("drop/roots.txt", b"r")
        assert (export / "drop" / "roots.txt").stat().st_uid == 0
    finally:
        stop(proc)


ANON_WRITES = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user=sys.argv[2]) as c:
    def attempt(key, fn, *args):
        try:
            r = fn(*args)
            out[key] = r.decode() if isinstance(r, (bytes, bytearray)) else "ok"
        except StyxClientError as e:
            out[key] = "error: " + str(e)
    def wstat(path, **changes):
        st = w.Stat.dont_touch()
        for k, v in changes.items():
            setattr(st, k, v)
        fid = c.walk(path)
        try:
            c.wstat_fid(fid, st)
        finally:
            c.clunk(fid)
    def rclose(path):
        fid = c.walk(path)
        c.open(fid, w.OREAD | w.ORCLOSE)
        c.clunk(fid)
    attempt("read", c.cat, "pub/shared.txt")
    attempt("create", c.put, "pub/" + sys.argv[3], b"x")
    attempt("overwrite", c.put, "pub/shared.txt", b"defaced")
    attempt("remove", c.remove, "pub/victim.txt")
    attempt("rclose", rclose, "pub/victim.txt")
    attempt("rename", lambda: wstat("pub/victim.txt", name="renamed.txt"))
    attempt("truncate", lambda: wstat("pub/shared.txt", length=0))
    attempt("mkdir", c.mkdir, "pub/d-" + sys.argv[3], 0o777)
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_anonymous_clients_of_a_root_file_server_change_nothing(open_irmd: IrmdProc, lab: Path) -> None:
    """None is anyone (a bridge's TCP client, a peer of another host): it reads what the modes give
    others, and writes, makes, removes and renames nothing, even where the anonymous account could.
    The same local user attached as itself still writes there."""
    export = lab / "export"
    (export / "pub").mkdir(parents=True)
    os.chmod(export / "pub", 0o777)
    for n in ("shared.txt", "victim.txt"):
        (export / "pub" / n).write_text("root's\n")
        os.chmod(export / "pub" / n, 0o666)
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    try:
        out = result(as_nobody(open_irmd, ANON_WRITES, "files", "none", "anon.txt"))
        assert out.pop("read") == "root's\n", out
        assert all(str(v).startswith("error") and str(v).endswith("permission denied") for v in out.values()), out
        assert sorted(os.listdir(export / "pub")) == ["shared.txt", "victim.txt"]
        assert (export / "pub" / "shared.txt").read_text() == "root's\n"
        mine = result(as_nobody(open_irmd, ANON_WRITES, "files", "anyone", "mine.txt"))  # uid 65534 as itself
        assert mine["create"] == mine["overwrite"] == mine["remove"] == mine["mkdir"] == "ok", mine
        assert (export / "pub" / "mine.txt").stat().st_uid == NOBODY
    finally:
        stop(proc)


# -- a root file server works with the client's ids as the kernel has them, not its account's groups -----


@dataclasses.dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int  # its primary group (its own)
    member_of: int  # a group the accounts database lists it in


@pytest.fixture
def account() -> Iterator[Account]:
    """A system user made for the test, that /etc/group lists as a member of a group made for it
    too; both removed after."""
    if shutil.which("useradd") is None or shutil.which("groupadd") is None:
        pytest.skip("making a test account needs useradd and groupadd (shadow-utils)")
    tag = f"{os.getpid()}{threading.get_native_id()}"[-12:]
    user, group = f"styxu{tag}", f"styxg{tag}"

    def run(*argv: str) -> None:
        deadline = time.monotonic() + 20
        while (r := subprocess.run(argv, capture_output=True, text=True, timeout=60)).returncode != 0:
            # busy: the database locked by another tool, or (userdel) a session's agent not yet gone
            assert time.monotonic() < deadline, f"{argv}: {r.stderr}"
            time.sleep(0.2)

    run("groupadd", "--system", group)
    try:
        run("useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--groups", group, user)  # fmt: skip
        try:
            pw = pwd.getpwnam(user)
            member_of = grp.getgrnam(group).gr_gid
            assert member_of in os.getgrouplist(user, pw.pw_gid)
            yield Account(user, pw.pw_uid, pw.pw_gid, member_of)
        finally:
            run("userdel", user)  # its own group goes with it
            with contextlib.suppress(KeyError):
                grp.getgrnam(user)
                run("groupdel", user)
    finally:
        run("groupdel", group)


READS = r"""
import json, sys
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user="root") as c:
    for path in sys.argv[2:]:
        try:
            if path.startswith("+"):  # a file to make
                c.put(path[1:], b"made")
                out[path] = "made"
            else:
                out[path] = c.cat(path).decode()
        except StyxClientError as e:
            out[path] = "error: " + str(e)
print(json.dumps(out))
"""


def group_export(lab: Path, who: Account) -> Path:
    """Files only a group may read: one of the group the account is listed in, one of its primary
    group; and a directory the account may write to."""
    export = lab / "export"
    export.mkdir()
    for name, gid in (("member.txt", who.member_of), ("primary.txt", who.gid)):
        (export / name).write_text(f"{name} group only\n")
        os.chown(export / name, 0, gid)
        os.chmod(export / name, 0o640)
    (export / "drop").mkdir()
    os.chown(export / "drop", who.uid, who.gid)
    return export


DENIED = "error: 'member.txt' permission denied"


@pytest.mark.timeout(120)
def test_a_client_that_dropped_a_group_gets_none_of_its_files(open_irmd: IrmdProc, lab: Path, account: Account) -> None:
    """The accounts database lists the user in a group; a process of that user without it (setpriv
    --clear-groups, a service started with fewer groups) is served without it, as the kernel would
    judge the process itself; the same user with the group, beside it, reads the group's file."""
    export = group_export(lab, account)
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    try:
        user = [f"--reuid={account.uid}", f"--regid={account.gid}"]
        dropped = as_ids(open_irmd, [*user, "--clear-groups"], READS, "files", "member.txt", "primary.txt")
        assert dropped == {"member.txt": DENIED, "primary.txt": "primary.txt group only\n"}
        member = as_ids(open_irmd, [*user, f"--groups={account.member_of}"], READS, "files", "member.txt")
        assert member == {"member.txt": "member.txt group only\n"}
    finally:
        stop(proc)


@pytest.mark.timeout(120)
def test_a_client_is_served_with_the_gid_it_runs_with_not_its_accounts(
    open_irmd: IrmdProc, lab: Path, account: Account
) -> None:
    """A process of the user running with another gid (and no groups) has none of the rights of its
    account's primary group, and what it makes is its gid's; one running with the gid of a group it
    is not listed in (a setgid program's) has that group's."""
    export = group_export(lab, account)
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    try:
        other = [f"--reuid={account.uid}", f"--regid={NOBODY}", "--clear-groups"]
        out = as_ids(open_irmd, other, READS, "files", "primary.txt", "+drop/made.txt")
        assert out == {"primary.txt": "error: 'primary.txt' permission denied", "+drop/made.txt": "made"}
        made = (export / "drop" / "made.txt").stat()
        assert (made.st_uid, made.st_gid) == (account.uid, NOBODY)
        os.chown(export / "member.txt", 0, NOBODY)  # now of the gid it runs with, a group it is not listed in
        assert as_ids(open_irmd, other, READS, "files", "member.txt") == {"member.txt": "member.txt group only\n"}
    finally:
        stop(proc)


@pytest.mark.timeout(120)
def test_the_unix_bridge_carries_the_groups_its_client_has_not_its_accounts(
    open_irmd: IrmdProc, lab: Path, account: Account
) -> None:
    """The bridge's flow for a client is allocated with the client's kernel ids (SO_PEERCRED and
    SO_PEERGROUPS of its unix socket), not with its account's groups."""
    export = group_export(lab, account)
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    path = lab / "files.9p"
    bridge = start(open_irmd, "bridge", "--name", "files", "--listen", f"unix!{path}", log=lab / "gbridge.log")
    try:
        wait_for(path.exists, 10, "the unix bridge")
        user = [f"--reuid={account.uid}", f"--regid={account.gid}"]
        dropped = as_ids(open_irmd, [*user, "--clear-groups"], READS, f"unix!{path}", "member.txt", "primary.txt")
        assert dropped == {"member.txt": DENIED, "primary.txt": "primary.txt group only\n"}
        member = as_ids(open_irmd, [*user, f"--groups={account.member_of}"], READS, f"unix!{path}", "member.txt")
        assert member == {"member.txt": "member.txt group only\n"}
    finally:
        stop(bridge)
        stop(proc)


@pytest.mark.timeout(120)
def test_a_users_server_lends_its_groups_to_none_of_its_users_processes_that_dropped_them(
    open_irmd: IrmdProc, lab: Path, account: Account
) -> None:
    """A server of the user, not root, cannot switch ids: it works as itself for that user only when
    the client holds every group the server does; a process of the user without one is judged by
    Plan 9's rules with its own groups. The user with the group, beside it, is the server's own."""
    export = group_export(lab, account)
    user = [f"--reuid={account.uid}", f"--regid={account.gid}"]
    member = [*user, f"--groups={account.member_of}"]
    with open(lab / "u.log", "wb") as log:
        proc = subprocess.Popen(
            ["setpriv", *member, str(BIN / "styx"), "serve", "--root", str(export)],
            env=open_irmd.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: b"serving" in (lab / "u.log").read_bytes() or proc.poll() is not None, 30, "styx serve")
        assert proc.poll() is None, (lab / "u.log").read_text()
        open_irmd.irm_ok("bind", "process", str(proc.pid), "name", "ufiles")
        open_irmd.irm_ok("name", "register", "ufiles", "layer", "local")
        dropped = as_ids(open_irmd, [*user, "--clear-groups"], READS, "ufiles", "member.txt", "primary.txt")
        assert dropped == {"member.txt": DENIED, "primary.txt": "primary.txt group only\n"}
        assert as_ids(open_irmd, member, READS, "ufiles", "member.txt") == {"member.txt": "member.txt group only\n"}
    finally:
        stop(proc)


OPEN_AS_CLIENT = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1]), user="root") as c:
    for key, path, mode in json.loads(sys.argv[2]):
        try:
            fid = c.walk(path)
            if key.startswith("touch"):
                st = w.Stat.dont_touch()
                st.atime = st.mtime = 1_000_000_000
                c.wstat_fid(fid, st)
            else:
                c.open(fid, mode)
            c.clunk(fid)
            out[key] = "ok"
        except StyxClientError as e:
            out[key] = "error: " + str(e)
print(json.dumps(out))
"""


def files_as_nobody(irmd: IrmdProc, lab: Path, export: Path, attempts: list[tuple[str, str, int]]) -> dict[str, object]:
    """Each attempt (key, path, open mode; a key "touch..." sets both times) made by uid 65534
    against a root file server of `export`, which the kernel judges with the client's credentials."""
    proc = serve(irmd, lab, "files", "--root", str(export))
    try:
        return result(as_nobody(irmd, OPEN_AS_CLIENT, "files", json.dumps(attempts)))
    finally:
        stop(proc)


def test_touch_by_a_local_user_sets_its_own_files_times_and_no_one_elses(open_irmd: IrmdProc, lab: Path) -> None:
    export = lab / "export"
    export.mkdir()
    (export / "roots.txt").write_text("r")
    os.chmod(export / "roots.txt", 0o666)  # writable by anyone, but not anyone's to set times of
    (export / "mine.txt").write_text("m")
    os.chown(export / "mine.txt", NOBODY, NOBODY)
    out = files_as_nobody(open_irmd, lab, export, [("touch-roots", "roots.txt", 0), ("touch-mine", "mine.txt", 0)])
    assert out["touch-roots"] == "error: permission denied", out
    assert int((export / "roots.txt").stat().st_mtime) != 1_000_000_000
    assert out["touch-mine"] == "ok"
    assert int((export / "mine.txt").stat().st_atime) == int((export / "mine.txt").stat().st_mtime) == 1_000_000_000


def test_an_oexec_open_by_a_local_user_needs_execute_permission(open_irmd: IrmdProc, lab: Path) -> None:
    export = lab / "export"
    export.mkdir()
    (export / "data.txt").write_text("readable, not executable")
    os.chmod(export / "data.txt", 0o644)
    (export / "tool").write_text("#!/bin/sh\n")
    os.chmod(export / "tool", 0o755)
    out = files_as_nobody(
        open_irmd, lab, export, [("exec-data", "data.txt", w.OEXEC), ("read-data", "data.txt", w.OREAD),
                                 ("exec-tool", "tool", w.OEXEC)]
    )  # fmt: skip
    assert out == {"exec-data": "error: permission denied", "read-data": "ok", "exec-tool": "ok"}, out


def test_orclose_by_a_local_user_is_refused_at_the_open_where_it_may_not_remove(open_irmd: IrmdProc, lab: Path) -> None:
    export = lab / "export"
    export.mkdir()
    (export / "shared.txt").write_text("everyone writes, root's directory")
    os.chmod(export / "shared.txt", 0o666)
    (export / "drop").mkdir()
    os.chown(export / "drop", NOBODY, NOBODY)
    (export / "drop" / "scratch.txt").write_text("the client's to remove")
    (export / "tmp").mkdir()
    os.chmod(export / "tmp", 0o1777)  # sticky: only a file's owner removes it
    (export / "tmp" / "roots.txt").write_text("root's")
    os.chmod(export / "tmp" / "roots.txt", 0o666)
    out = files_as_nobody(
        open_irmd, lab, export, [("rclose-shared", "shared.txt", w.ORDWR | w.ORCLOSE),
                                 ("rclose-sticky", "tmp/roots.txt", w.ORDWR | w.ORCLOSE),
                                 ("rclose-scratch", "drop/scratch.txt", w.OREAD | w.ORCLOSE)]
    )  # fmt: skip
    assert out["rclose-shared"] == "error: permission denied", out
    assert out["rclose-sticky"] == "error: permission denied", out
    assert (export / "shared.txt").exists() and (export / "tmp" / "roots.txt").exists()
    assert out["rclose-scratch"] == "ok" and not (export / "drop" / "scratch.txt").exists()


PROC_ATTACK = r"""
import json, subprocess, sys
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
roots, own = sys.argv[2], subprocess.Popen(["sleep", "30"])
out = {}
try:
    with Client(dial(sys.argv[1]), user="root") as c:
        for key, path in [("own-maps", f"{own.pid}/maps"), ("roots-maps", f"{roots}/maps"),
                          ("roots-status", f"{roots}/status")]:
            try:
                out[key] = c.cat(path).decode()
            except StyxClientError as e:
                out[key] = "error: " + str(e)
finally:
    own.kill()
print(json.dumps(out))
"""


@pytest.mark.timeout(90)
def test_a_root_servers_work_for_a_local_user_has_none_of_roots_capabilities(open_irmd: IrmdProc, lab: Path) -> None:
    """A file whose mode lets a user in may still ask the kernel for a capability: /proc/PID/maps
    is readable by anyone with CAP_SYS_PTRACE or PID's own user. A root server working for a
    local user (here one serving /proc, as one serving / does) must have none of root's."""
    roots = subprocess.Popen(["sleep", "60"])
    proc = serve(open_irmd, lab, "files", "--root", "/proc")
    try:
        out = result(as_nobody(open_irmd, PROC_ATTACK, "files", str(roots.pid)))
    finally:
        stop(proc)
        roots.kill()
        roots.wait()
    assert "r-xp" in str(out["own-maps"]), out  # the client's own process: yes
    assert "sleep" in str(out["roots-status"]), out  # what /proc shows anyone: yes
    assert out["roots-maps"] == f"error: '{roots.pid}/maps' permission denied", out


SYSCTL = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1])) as c:
    path = sys.argv[2]
    value = c.cat(path)
    out["read"] = value.decode()
    try:
        fid = c.walk(path)
        c.open(fid, w.OWRITE)
        out["write"] = c.write(fid, 0, value)  # the value it has: nothing changes if it goes through
        c.clunk(fid)
    except StyxClientError as e:
        out["write"] = "error: " + str(e)
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_a_root_servers_client_writes_no_sysctl(open_irmd: IrmdProc, lab: Path) -> None:
    """Sysctl files are judged by the effective uid, not the file system one: a root server that
    switched only its thread's fsuid let uid 65534 write root's /proc/sys (kernel.core_pattern runs a
    program as root). The thread works with the client's effective ids too; the client still reads
    what /proc/sys shows it, and root, served as root, still writes."""
    path = "sys/kernel/printk_ratelimit"  # 0644 root; written back with the value it has
    before = Path("/proc", path).read_text()
    proc = serve(open_irmd, lab, "files", "--root", "/proc")
    try:
        kernel = subprocess.run([*AS_NOBODY, "sh", "-c", f"echo {before.strip()} > /proc/{path}"], capture_output=True)
        assert kernel.returncode != 0  # what the kernel refuses uid 65534 ...
        out = result(as_nobody(open_irmd, SYSCTL, "files", path))
        assert out["read"] == before, out
        assert str(out["write"]).startswith("error") and str(out["write"]).endswith("permission denied"), out
        mine = as_ids(open_irmd, ["--reuid=0"], SYSCTL, "files", path)  # root, as root
        assert mine["write"] == len(before), mine
    finally:
        stop(proc)
    assert Path("/proc", path).read_text() == before


OWN_PROC = r"""
import json, os, subprocess, sys
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
own = subprocess.Popen(["sleep", "30"])
link = sys.argv[3]
os.symlink(os.path.relpath("/proc/self/maps", os.path.dirname(link)), link)  # the client's, where it may write
out = {}
try:
    with Client(dial(sys.argv[1])) as c:
        for path in [*sys.argv[2].split(","), f"proc/{own.pid}/maps"]:
            try:
                out[path] = c.cat(path).decode(errors="replace")
            except StyxClientError as e:
                out[path] = "error: " + str(e)
finally:
    own.kill()
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_a_root_servers_own_process_is_not_served_from_proc(open_irmd: IrmdProc, lab: Path) -> None:
    """The kernel lets a process's threads into its own /proc entries whatever their credentials
    (ptrace's same-thread-group rule): a root server serving / read its own maps and memory figures
    for uid 65534 (through /proc/self, /proc/thread-self, /proc/PID, or a link the client made to
    them), which that user may not read of root's processes. They are not served; the client's own
    process's are, as is the rest of /proc."""
    proc = serve(open_irmd, lab, "files", "--root", "/")
    try:
        pid = proc.pid
        (lab / "drop").mkdir()
        os.chown(lab / "drop", NOBODY, NOBODY)
        link = lab / "drop" / "maps"
        paths = [f"proc/{pid}/maps", "proc/self/maps", "proc/thread-self/maps", f"proc/{pid}/smaps_rollup",
                 f"proc/{pid}/task/{pid}/maps", "etc/mtab", str(link).lstrip("/"), "proc/1/status",
                 "proc/uptime"]  # fmt: skip
        kernel = subprocess.run([*AS_NOBODY, "cat", f"/proc/{pid}/maps"], capture_output=True)
        assert kernel.returncode != 0  # what the kernel refuses uid 65534 ...
        out = result(as_nobody(open_irmd, OWN_PROC, "files", ",".join(paths), str(link)))
    finally:
        stop(proc)
    for path in paths[:-2]:  # ... and Styx, working as it, too
        assert str(out[path]).startswith("error") and "r-xp" not in str(out[path]), out
    own = [v for p, v in out.items() if p not in paths]
    assert "r-xp" in str(own[0]), out  # the client's own process: yes
    assert "Name:" in str(out["proc/1/status"]) and not str(out["proc/uptime"]).startswith("error"), out  # the rest


# -- a server of an ordinary user: its symlinks lead others past nothing it does not check ------------

S = 1  # the serving user (daemon)

READER = r"""
import json, sys
from apps.styx.client import Client, StyxClientError
out = {}
for aname, path in [("", "pub/readme.txt"), ("", "pub/latest"), ("", "pub/also"), ("", "private/draft.txt"),
                    ("private", "draft.txt")]:
    try:
        from apps.styx.transport import dial
        with Client(dial(sys.argv[1]), aname=aname) as c:
            out[aname + ":" + path] = c.cat(path).decode()
    except StyxClientError as e:
        out[aname + ":" + path] = "error: " + str(e)
print(json.dumps(out))
"""


def as_uid(uid: int, irmd: IrmdProc, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(irmd.env, PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
        cwd="/",
    )


def test_a_users_server_follows_no_symlink_for_others(open_irmd: IrmdProc, lab: Path) -> None:
    """A server of user S checks Plan 9 permissions itself for other users: a symlink (or an attach
    name) must not take them through a directory they may not search. S's own clients, whom the
    kernel judges, still follow S's symlinks."""
    export = lab / "export"
    (export / "pub").mkdir(parents=True)
    (export / "private").mkdir(mode=0o700)
    (export / "pub" / "readme.txt").write_text("public\n")
    (export / "private" / "draft.txt").write_text("S's draft\n")
    os.symlink("../private/draft.txt", export / "pub" / "latest")
    os.symlink("readme.txt", export / "pub" / "also")
    for dirpath, dirnames, filenames in os.walk(export):
        for n in (dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)):
            os.lchown(n, S, S)
    os.chmod(export / "private" / "draft.txt", 0o644)
    with open(lab / "s.log", "wb") as log:
        proc = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={S}",
                f"--regid={S}",
                "--clear-groups",
                str(BIN / "styx"),
                "serve",
                "--root",
                str(export),
            ],
            env=open_irmd.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: b"serving" in (lab / "s.log").read_bytes() or proc.poll() is not None, 30, "styx serve")
        assert proc.poll() is None, (lab / "s.log").read_text()
        open_irmd.irm_ok("bind", "process", str(proc.pid), "name", "sfiles")
        open_irmd.irm_ok("name", "register", "sfiles", "layer", "local")
        kernel = subprocess.run([*AS_NOBODY, "cat", str(export / "pub" / "latest")], capture_output=True)
        assert kernel.returncode != 0  # what the kernel refuses uid 65534 ...
        out = result(as_nobody(open_irmd, READER, "sfiles"))
        assert out[":pub/readme.txt"] == "public\n", out  # ... Styx refuses it too, and serves the rest
        assert str(out[":pub/latest"]).startswith("error") and "draft" not in str(out[":pub/latest"]), out
        assert str(out[":private/draft.txt"]).startswith("error"), out
        assert str(out["private:draft.txt"]).endswith("permission denied"), out
        assert str(out[":pub/also"]).startswith("error"), out  # no symlink at all for them (Plan 9 has none)
        mine = result(as_uid(S, open_irmd, READER, "sfiles"))  # S itself: the kernel judges, links work
        assert mine[":pub/latest"] == mine["private:draft.txt"] == "S's draft\n", mine
        assert mine[":pub/also"] == "public\n", mine
    finally:
        stop(proc)


STICKY_ATTACK = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1])) as c:
    def attempt(key, fn, *args):
        try:
            fn(*args)
            out[key] = "ok"
        except StyxClientError as e:
            out[key] = "error: " + str(e)
    def rename(path, new):
        st = w.Stat.dont_touch()
        st.name = new
        fid = c.walk(path)
        try:
            c.wstat_fid(fid, st)
        finally:
            c.clunk(fid)
    def rclose(path):
        fid = c.walk(path)
        c.open(fid, w.OREAD | w.ORCLOSE)
        c.clunk(fid)
    for key, fn, *args in json.loads(sys.argv[2]):
        attempt(key, {"remove": c.remove, "rename": rename, "rclose": rclose, "put": c.put}[fn],
                *[a.encode() if fn == "put" and i else a for i, a in enumerate(args)])
print(json.dumps(out))
"""


@contextlib.contextmanager
def users_server(irmd: IrmdProc, lab: Path, export: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """`styx serve --root EXPORT` run by user S, registered as `name`; stopped however the test ends."""
    with open(lab / "s.log", "wb") as log:
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={S}", f"--regid={S}", "--clear-groups", str(BIN / "styx"), "serve", "--root",
             str(export)],
            env=irmd.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_for(lambda: b"serving" in (lab / "s.log").read_bytes() or proc.poll() is not None, 30, "styx serve")
        assert proc.poll() is None, (lab / "s.log").read_text()
        irmd.irm_ok("bind", "process", str(proc.pid), "name", name)
        irmd.irm_ok("name", "register", name, "layer", "local")
        yield proc
    finally:
        stop(proc)


@pytest.mark.timeout(120)
def test_a_users_server_keeps_a_sticky_directorys_files_to_their_owners(open_irmd: IrmdProc, lab: Path) -> None:
    """S's sticky directory (1777, as /tmp): S may remove or rename anything in it, other users only
    their own. A server of S that checks Plan 9 permissions for them (there is no sticky bit in 9P) let
    any of them remove and rename the files of every other user there. They still make files in it,
    and remove them where the directory is not sticky; S itself still removes anything."""
    export = lab / "export"
    (export / "tmp").mkdir(parents=True)
    (export / "drop").mkdir()
    for n in ("roots.txt", "roots2.txt", "roots3.txt"):
        (export / "tmp" / n).write_text("root's\n")  # written there by root (another user of the host)
    (export / "drop" / "scratch.txt").write_text("anyone's to remove")
    for dirpath, dirnames, _ in os.walk(export):
        for n in (dirpath, *(os.path.join(dirpath, d) for d in dirnames)):
            os.chown(n, S, S)
    os.chmod(export / "tmp", 0o1777)
    os.chmod(export / "drop", 0o777)
    kernel = subprocess.run([*AS_NOBODY, "rm", "-f", str(export / "tmp" / "roots.txt")], capture_output=True)
    assert kernel.returncode != 0  # what the kernel refuses uid 65534 ...
    attempts = [["remove", "remove", "tmp/roots.txt"], ["rename", "rename", "tmp/roots2.txt", "gone.txt"],
                ["rclose", "rclose", "tmp/roots3.txt"], ["create", "put", "tmp/mine.txt", "mine"],
                ["remove-unsticky", "remove", "drop/scratch.txt"]]  # fmt: skip
    with users_server(open_irmd, lab, export, "sfiles"):
        out = result(as_nobody(open_irmd, STICKY_ATTACK, "sfiles", json.dumps(attempts)))
        for key in ("remove", "rename", "rclose"):  # ... Styx refuses it too
            assert str(out[key]).endswith("permission denied"), out
        assert sorted(os.listdir(export / "tmp")) == ["mine.txt", "roots.txt", "roots2.txt", "roots3.txt"]
        assert out["create"] == out["remove-unsticky"] == "ok", out
        assert not (export / "drop" / "scratch.txt").exists()
        mine = result(as_uid(S, open_irmd, STICKY_ATTACK, "sfiles", json.dumps(attempts[:2])))  # S: the kernel judges
        assert mine == {"remove": "ok", "rename": "ok"}, mine
        assert sorted(os.listdir(export / "tmp")) == ["gone.txt", "mine.txt", "roots3.txt"]


# -- confinement: a symlink swapped in while a client walks ------------------------------------------

SWAPPER = r"""
import os, sys, time
d, real, escape, until = sys.argv[1], sys.argv[2], sys.argv[3], time.monotonic() + float(sys.argv[4])
swaps = 0
while time.monotonic() < until:
    os.rename(d, real)          # the directory goes ...
    os.symlink(escape, d)       # ... a link out of the root takes its place ...
    os.unlink(d)
    os.rename(real, d)          # ... and back
    swaps += 1
print(swaps)
"""


def test_symlink_swaps_never_lead_a_client_outside_the_root(open_irmd: IrmdProc, lab: Path) -> None:
    export = lab / "export"
    shared = export / "shared"  # the attacker's own corner of the export
    d = shared / "d"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "hostname").write_text("inside\n")
    (d / "tmp").mkdir()
    for p in [shared, d, d / "etc", d / "tmp"]:
        os.chown(p, NOBODY, NOBODY)
    os.chmod(d / "tmp", 0o777)
    marker = f"styx-race-{os.getpid()}"
    outside_etc = Path("/etc/hostname").read_text()
    proc = serve(open_irmd, lab, "files", "--root", str(export))
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    swapper = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", SWAPPER, str(d), str(shared / "real"), "/", "8"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    reads = writes = refused = 0
    try:
        with root_client(open_irmd, "files") as c:  # root: only the server's confinement stands in the way
            end = time.monotonic() + 6
            i = 0
            while time.monotonic() < end:
                i += 1
                try:
                    data = c.cat("shared/d/etc/hostname")
                    assert data == b"inside\n", f"read outside the root: {data!r}"
                    reads += 1
                except StyxClientError:
                    refused += 1
                try:
                    c.put(f"shared/d/tmp/{marker}-{i}", b"w")
                    writes += 1
                except StyxClientError:
                    refused += 1
        swaps = int(swapper.communicate(timeout=20)[0] or 0)
    finally:
        if swapper.poll() is None:
            swapper.kill()
        stop(proc)
    assert not list(Path("/tmp").glob(f"{marker}-*")), "a write landed outside the root"
    assert Path("/etc/hostname").read_text() == outside_etc
    assert swaps > 100 and reads > 0 and writes > 0, (swaps, reads, writes, refused)
    assert len(list((d / "tmp").glob(f"{marker}-*"))) == writes  # every write that succeeded is inside


# -- the limits, against the attacker ---------------------------------------------------------------

HOG = r"""
import json, sys, time
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {"held": 0}
clients = []
for _ in range(int(sys.argv[2])):
    try:
        clients.append(Client(dial(sys.argv[1])))
    except StyxClientError as e:
        out["refused"] = str(e)
        break
c = clients[0]
try:
    while True:
        fid = c.walk("hello.txt")
        c.open(fid, w.OREAD)
        out["held"] += 1
except StyxClientError as e:
    out["fids"] = str(e)
print(json.dumps(out), flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_a_client_at_its_limits_gets_errors_and_others_are_served(open_irmd: IrmdProc, lab: Path) -> None:
    export = lab / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello\n")
    proc = serve(open_irmd, lab, "files", "--root", str(export), "--max-fids", "20", "--max-conns-per-user", "3")
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    hog = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", HOG, "files", "5", "6"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert hog.stdout is not None
        out = json.loads(hog.stdout.readline() or "{}")
        assert "too many connections from user nobody (limit 3)" in out.get("refused", ""), out
        assert out["held"] == 19 and "too many fids" in out["fids"]  # the root fid is the 20th
        with root_client(open_irmd, "files") as c:  # meanwhile, another user
            assert c.cat("hello.txt") == b"hello\n"
    finally:
        hog.kill()
        hog.wait()
        stop(proc)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(x) for x in f.read().split()]  # (a thread that ended since the listing has none)
    return out


LS_IPCP = r"""
import sys
from apps.styx.client import Client
from apps.styx.transport import dial
for _ in range(int(sys.argv[2])):
    with Client(dial(sys.argv[1])) as c:
        c.ls("ipcp")  # made by the session's agent
"""


def test_sessions_leave_no_agents_or_descriptors_behind(open_irmd: IrmdProc, lab: Path) -> None:
    proc = serve(open_irmd, lab, "irm2", "--irm")
    try:
        warmup = as_nobody(open_irmd, LS_IPCP, "irm2", "1")
        assert warmup.returncode == 0, warmup.stderr
        wait_for(lambda: not children(proc.pid), 10, "the first agent to go")
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        r = as_nobody(open_irmd, LS_IPCP, "irm2", "15")
        assert r.returncode == 0, r.stderr
        wait_for(lambda: not children(proc.pid), 10, "every agent to be reaped")  # no zombies either
        wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) <= fds, 10, "the descriptors to be closed")
    finally:
        stop(proc)


MANY_ATTACHES = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {"connected": 0, "refused": []}
with Client(dial(sys.argv[1])) as c:
    roots = [c.root]
    for fid in range(1000, 1000 + int(sys.argv[2]) - 1):  # more attaches on the same connection
        c.rpc(w.Tattach(0, fid, w.NOFID, "x", ""), w.Rattach)
        roots.append(fid)
    for root in roots:
        for _ in range(int(sys.argv[3])):
            fid = c.walk("net/clone", fid=root)
            c.open(fid, w.ORDWR)
            try:
                c.write(fid, 0, b"connect probe")
                out["connected"] += 1
            except StyxClientError as e:
                out["refused"].append(str(e))
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # hold them until told
"""


def test_net_flows_are_limited_per_connection_however_many_attaches_it_makes(
    open_irmd: IrmdProc, lab: Path, probe: Probe
) -> None:
    """--max-flows bounds a connection's net/ flows (and so the descriptors the server budgets for
    it): attaching again on the same connection gives no net/ of its own, with room for more."""
    proc = serve(open_irmd, lab, "irm3", "--irm", "--max-flows", "2")
    hog = popen_nobody(open_irmd, MANY_ATTACHES, "irm3", "4", "2", stdin=True)
    try:
        assert hog.stdout is not None
        line = hog.stdout.readline()
        assert line, hog.communicate(timeout=10)[1]
        out = json.loads(line)
        assert out["connected"] == 2, out  # the connection's two, in the first attach
        assert len(out["refused"]) == 6 and all("too many flows (limit 2)" in e for e in out["refused"]), out
        wait_for(lambda: len(probe.peers) == 2, 10, "the probe's flows")
        assert probe.peers == [NOBODY, NOBODY]
        # Another connection of the same user has two of its own.
        r = as_nobody(open_irmd, MANY_ATTACHES.replace("sys.stdin.readline()", "pass"), "irm3", "1", "2")
        assert result(r)["connected"] == 2
    finally:
        hog.kill()
        hog.wait()
        stop(proc)


TEXT_HOARD = r"""
import json, sys
from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {"held": 0, "files": 0}
with Client(dial(sys.argv[1])) as c:
    fids = []
    for _ in range(200):  # open files, each keeping what it read: the connection's text
        fid = c.walk("ctl")
        c.open(fid, w.ORDWR)
        fids.append(fid)
        try:
            out["held"] += len(c.read(fid, 0, 8192))
            out["files"] += 1
        except StyxClientError as e:
            out["refused"] = str(e)
            break
    try:  # a command's answer would be kept too: refused before the command runs
        c.write(fids[-1], 0, b"ipcp list")
    except StyxClientError as e:
        out["command"] = str(e)
    c.clunk(fids.pop(0))  # with one let go, the next read is served
    out["after_clunk"] = len(c.read(fids[-1], 0, 8192))
    with Client(dial(sys.argv[1])) as other:  # another connection of the same user has room of its own
        out["other"] = other.cat("ctl").decode()[:5]
print(json.dumps(out))
"""


def test_the_text_a_connections_open_files_keep_is_limited(open_irmd: IrmdProc, lab: Path) -> None:
    """Each open file of the IRMd's tree keeps a snapshot of what it read (a page of `flow list`, a
    command's answer) until it is clunked: 256 fids on each of a user's 16 connections kept as many
    pages in a root server. --max-text bounds the bytes a connection's open files keep."""
    limit = 4096
    proc = serve(open_irmd, lab, "irm4", "--irm", "--max-text", str(limit))
    try:
        out = result(as_nobody(open_irmd, TEXT_HOARD, "irm4"))
        each = out["held"] // out["files"]  # type: ignore[operator]
        assert limit <= out["held"] < limit + each, out  # the limit, and the snapshot that reached it
        assert f"limit {limit}" in str(out.get("refused")), out
        assert f"limit {limit}" in str(out.get("command")), out
        assert out["after_clunk"] == each and out["other"] == "write", out
        with root_client(open_irmd, "irm4") as c:  # root is served beside it
            assert c.cat("ctl").startswith(b"write")
    finally:
        stop(proc)


PATH_PROBE = r"""
import json, sys
from apps.styx.client import Client, StyxClientError
from apps.styx.transport import dial
out = {}
with Client(dial(sys.argv[1])) as c:
    for key, path, cmd in json.loads(sys.argv[2]):
        try:
            out[key] = c.command(path, cmd)
        except StyxClientError as e:
            out[key] = "error: " + str(e)
print(json.dumps(out))
"""


def test_paths_in_ctl_commands_are_looked_up_as_the_client(open_irmd: IrmdProc, irm_server: str, lab: Path) -> None:
    """`bind program PATH` and `name create ... skeypath FILE` name files the command line resolves
    (in $PATH, realpath): the server resolves them as the client, not as root, so no answer tells a
    user what a directory it cannot search holds; root's own commands find the files."""
    private = lab / "private"
    private.mkdir(mode=0o700)
    (private / "tool").write_text("#!/bin/sh\n")
    os.chmod(private / "tool", 0o755)
    (private / "key.pem").write_text("secret\n")
    os.chmod(private / "key.pem", 0o600)
    probes = [
        ("tool", "name/ctl", f"create probed skeypath {private}/tool"),  # a file that is there
        ("absent", "name/ctl", f"create probed skeypath {private}/absent"),  # one that is not
        ("bind-tool", "ctl", f"bind program {private}/tool name probed"),
        ("bind-absent", "ctl", f"bind program {private}/absent name probed"),
    ]
    out = result(as_nobody(open_irmd, PATH_PROBE, irm_server, json.dumps(probes)))
    assert out["tool"] == out["absent"].replace("absent", "tool"), out  # the same answer: nothing learnt
    assert out["bind-tool"] == out["bind-absent"].replace("absent", "tool"), out
    assert all(str(v).startswith("error: ") for v in out.values()), out
    assert "probed" not in names(open_irmd)
    with root_client(open_irmd, irm_server) as c:  # root's commands, through the same server
        c.command("name/ctl", f"create legit skeypath {private}/key.pem")
        c.command("ctl", f"bind program {private}/tool name legit")
    assert f"{private}/tool" in names(open_irmd)["legit"]["programs"]


HOLDER = r"""
import os, sys
from flowlib import flow_alloc, qos
from flowlib.irm import IrmClient
irm = IrmClient()
flow = flow_alloc(sys.argv[1], qos=qos.data, timeout=10, irm=irm)
print(flow.flow_id, flush=True)
sys.stdin.readline()
"""


def test_clients_that_cannot_act_see_no_one_elses_flows_or_names(
    open_irmd: IrmdProc, irm_server: str, lab: Path, probe: Probe
) -> None:
    """An anonymous client is read the IRMd through an agent as the anonymous account (nobody): what
    the IRMd shows that account as its own (the flows and names of the host's processes running as
    nobody) is not the client's. It sees the IRMd's public tables only; a local client running as
    nobody, which acts as itself, sees its own flows."""
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1")
    service = subprocess.Popen(  # a service of the host running as nobody, with a flow and a name
        [*AS_NOBODY, sys.executable, "-c", HOLDER, "probe"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    port = free_port()
    bridge = start(
        open_irmd, "bridge", "--name", irm_server, "--listen", f"tcp!127.0.0.1!{port}", log=lab / "bridge.log"
    )
    try:
        assert service.stdout is not None
        flow_id = service.stdout.readline().strip()
        assert flow_id.isdigit()
        open_irmd.request(m.Bind("process", str(service.pid), "nobodys-service"))
        wait_for(lambda: "bridging" in (lab / "bridge.log").read_text(), 10, "the bridge")
        with Client(dial(f"tcp!127.0.0.1!{port}")) as c:  # anonymous
            assert [s.name for s in c.ls("flow")] == []
            assert [s.name for s in c.ls("name") if s.name != "ctl"] == []
            assert c.cat("layer/local/names") == b""
            assert "type local" in c.cat("ipcp/lo/status").decode()  # the public tables are read
        # nobody itself, on a flow of its own, sees its own
        r = as_nobody(
            open_irmd,
            "import json, sys\nfrom apps.styx.client import Client\nfrom apps.styx.transport import dial\n"
            "with Client(dial(sys.argv[1])) as c:\n"
            "    print(json.dumps({'flows': [s.name for s in c.ls('flow')], 'names': [s.name for s in c.ls('name')]}))",
            irm_server,
        )
        out = result(r)
        assert flow_id in out["flows"] and "nobodys-service" in out["names"], out
    finally:
        stop(bridge)
        service.kill()
        service.wait()
