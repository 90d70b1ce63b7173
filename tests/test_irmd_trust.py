"""Trust on one host: the IRMd takes rights from the kernel's word (SO_PEERCRED, /proc, file owners and
modes), bounds what each user and connection holds, and runs what it starts cleanly.

Each test plays the attacker as uid 65534 (setpriv) and checks that the attack fails while the
legitimate use beside it still works. They need root.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import udp_lan
from helpers import (
    BIN,
    HOLD_FLOWS_TO,
    WHO_ACCEPTS,
    IrmdProc,
    free_port,
    kernel_refuses_rights,
    parse_table,
    start_irmd,
    stop_irmd,
    udp4_bootstrap,
    wait_for,
)

from flowlib.flow import Flow, flow_alloc
from flowlib.irm import IrmClient
from proto import messages as m
from proto.control import call
from proto.errors import FlowError, LimitReached
from proto.login import login_umask
from transports.unix import recv_frame, send_frame, seqpacket_fds
from transports.wire import REPLY, Error

NOBODY = 65534
SO_PASSRIGHTS_WORKS = kernel_refuses_rights()
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="playing an unprivileged attacker needs root and setpriv (util-linux)",
)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="irmd-trust-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def irmd_in(d: Path, *args: str) -> Iterator[IrmdProc]:
    irmd = start_irmd(d, args=args)
    try:
        yield irmd
    finally:
        stop_irmd(irmd)


@pytest.fixture
def host(public_dir: Path) -> Iterator[IrmdProc]:
    """A root IRMd with a local layer, its socket reachable by every user."""
    with irmd_in(public_dir) as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        yield irmd


def as_nobody_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a process of uid 65534: its own home, not root's."""
    return {**{k: v for k, v in env.items() if k != "XDG_CONFIG_HOME"}, "HOME": "/nonexistent"}


def nobody(irmd: IrmdProc, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_NOBODY, *argv], env=as_nobody_env(irmd.env), capture_output=True, text=True, timeout=timeout, cwd="/"
    )


def nobody_irm(irmd: IrmdProc, *args: str) -> subprocess.CompletedProcess[str]:
    return nobody(irmd, str(BIN / "irm"), *args)


def nobody_py(irmd: IrmdProc, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return nobody(irmd, str(BIN / "python"), "-c", textwrap.dedent(code), *args, timeout=timeout)


@contextlib.contextmanager
def server(
    argv: list[str], env: dict[str, str], log: Path, ready: str, within: float = 15
) -> Iterator[subprocess.Popen[bytes]]:
    """A process that serves until the end of the block; `ready` in its log (within `within` s) says it is up."""
    if argv[:1] == AS_NOBODY[:1]:
        env = as_nobody_env(env)
    with open(log, "wb") as out:
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    try:
        wait_for(lambda: ready in log.read_text() or p.poll() is not None, within, f"{argv[-2:]} to start")
        assert p.poll() is None, log.read_text()
        yield p
    finally:
        p.kill()
        p.wait()


def echo_service(irmd: IrmdProc, name: str) -> None:
    irmd.irm_ok("bind", "program", "oping", "name", name)
    irmd.irm_ok("name", "register", name, "layer", "local")


# -- rights: what a user may and may not do --------------------------------------------------


def test_a_user_uses_flows_but_cannot_bind_a_program_to_run_as_root(host: IrmdProc) -> None:
    echo_service(host, "echo")
    with server([str(BIN / "oping"), "-l"], host.env, host.log.parent / "srv.log", "started"):
        r = nobody(host, str(BIN / "oping"), "-n", "echo", "-c", "1")
        assert "1 received" in r.stdout, r.stdout + r.stderr  # the legitimate use
        r = nobody_irm(host, "bind", "program", "/bin/sh", "name", "pwn", "auto", "--", "-c", "id > /tmp/pwned")
        assert r.returncode == 1 and "permission denied" in r.stderr
        assert not any(row["name"] == "pwn" for row in host.table("name", "list"))


@pytest.mark.parametrize(
    "attack",
    [
        ["bind", "process", "{pid}", "name", "echo"],  # take the host's name over with its own process
        ["bind", "process", "{pid}", "name", "mine"],  # or serve a name of its own
        ["name", "create", "mine"],
        ["name", "register", "mine", "layer", "local"],
        ["name", "unregister", "echo", "layer", "local"],
        ["name", "register", "echo", "layer", "local"],
        ["name", "destroy", "echo"],
        ["unbind", "program", "oping"],
        ["unbind", "program", "oping", "name", "echo"],
        ["bind", "ipcp", "lo", "name", "mine"],
        ["bind", "process", "1", "name", "mine"],  # someone else's process (init) under its name
        ["ipcp", "create", "name", "x", "type", "local"],
        ["ipcp", "bootstrap", "name", "x", "type", "local", "layer", "l2"],
        ["ipcp", "destroy", "name", "lo"],
        ["ipcp", "connect", "name", "lo", "dst", "x"],
    ],
)
def test_a_user_cannot_touch_the_hosts_names_ipcps_or_others_processes(host: IrmdProc, attack: list[str]) -> None:
    echo_service(host, "echo")
    with server([str(BIN / "oping"), "-l"], host.env, host.log.parent / "srv.log", "started"):
        holder = subprocess.Popen([*AS_NOBODY, "sleep", "60"])
        try:
            args = [a.format(pid=holder.pid) for a in attack]
            r = nobody_irm(host, *args)
            assert r.returncode == 1 and "permission denied" in r.stderr, r.stderr
            row = next(r for r in host.table("name", "list") if r["name"] == "echo")
            assert row["layers"] == "local" and "oping" in row["programs"] and row["pids"] == "-"
            assert [i["name"] for i in host.table("ipcp", "list")] == ["lo"]
            r = host.run("oping", "-n", "echo", "-c", "1")
            assert "1 received" in r.stdout, r.stdout + r.stderr  # the host's service still works
        finally:
            holder.kill()
            holder.wait()


SERVE_MINE = """
import json, os, sys
from flowlib.flow import Flow
from flowlib.irm import IrmClient
client = IrmClient()
print("ready", flush=True)
reply, fd = client.accept(20)
with Flow(reply, fd, client) as flow:
    flow.write(json.dumps([flow.peer_uid, flow.peer_pid, os.geteuid()]).encode())
    flow.set_timeout(10)
    flow.read()
"""


def test_a_users_server_an_admin_bound_serves_and_learns_who_allocated(host: IrmdProc) -> None:
    log = host.log.parent / "mine.log"
    with server([*AS_NOBODY, str(BIN / "python"), "-c", SERVE_MINE], host.env, log, "ready") as srv:
        host.irm_ok("bind", "process", str(srv.pid), "name", "mine")  # the admin binds the user's process
        host.irm_ok("name", "register", "mine", "layer", "local")
        rows = parse_table(nobody_irm(host, "name", "list").stdout)
        assert [(r["name"], r["pids"]) for r in rows] == [("mine", str(srv.pid))]  # its own, not the host's
        client = IrmClient(host.sock)
        try:
            reply, fd = client.alloc("mine", None, 10)
            with Flow(reply, fd, client) as flow:
                flow.set_timeout(10)
                peer_uid, peer_pid, served_by = json.loads(flow.read())
                flow.write(b"bye")
        finally:
            client.close()
        assert (peer_uid, peer_pid, served_by) == (0, os.getpid(), NOBODY)
        assert any(r["name"] == "mine" for r in host.table("name", "list"))


ALLOC_AND_HOLD = """
import os, sys, time
from flowlib import flow_alloc
flow = flow_alloc(sys.argv[1], timeout=10)
print(os.getpid(), flush=True)
time.sleep(30)
"""


@contextlib.contextmanager
def nobody_allocates_to_root(host: IrmdProc, name: str) -> Iterator[tuple[subprocess.Popen[bytes], Flow]]:
    """Root serves `name` from this process; uid 65534 allocates a flow to it and holds it: (the
    allocating process, root's end of the flow)."""
    client = IrmClient(host.sock)
    try:
        call(client.channel, m.Bind("process", str(os.getpid()), name), timeout=10)
        call(client.channel, m.NameRegister(name, ["local"]), timeout=10)
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(client.accept, 20)
            with server(
                [*AS_NOBODY, str(BIN / "python"), "-c", ALLOC_AND_HOLD, name],
                host.env,
                host.log.parent / "alloc.log",
                "\n",
            ) as p:
                reply, fd = accepted.result(20)
                with Flow(reply, fd, client) as flow:
                    yield p, flow
    finally:
        client.close()


LEAVE_A_CONNECTION = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])  # the IRMd knows it by this process's pid, which is given up below
if os.fork() == 0:
    print(os.getpid(), flush=True)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(60)  # the connection lives on here
    os._exit(0)
time.sleep(0.5)
print(os.getpid(), flush=True)
"""
REGISTER_MY_NAME = """
import sys
from flowlib.irm import IrmClient
from proto import messages as m
from proto.control import call
client = IrmClient()
print("bind me", flush=True)
sys.stdin.readline()
call(client.channel, m.NameRegister("svc", ["local"]), timeout=10)  # its own name, for its lifetime
print("registered", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("left_behind", [False, True])
def test_a_connection_left_by_a_process_gone_does_not_speak_for_the_next_process_with_its_pid(
    host: IrmdProc, left_behind: bool
) -> None:
    """uid 65534 connects and exits, a child keeping the connection. Root's server started later gets
    that pid, is bound to a name and registers it; when it ends, its registration goes with it, as
    for any server (uid 65534's old connection is another process's, though its pid is the same)."""
    holder, pid = 0, 0
    if left_behind:
        left = nobody(host, str(BIN / "python"), "-c", LEAVE_A_CONNECTION, str(host.sock), timeout=20)
        holder, pid = (int(line) for line in left.stdout.split())
    srv = None
    try:
        for _ in range(50):  # others on the machine may take the pid first: try again
            if pid:
                Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
            srv = subprocess.Popen([str(BIN / "python"), "-c", REGISTER_MY_NAME], env=host.env, cwd="/",
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
            if srv.pid == pid or not pid:
                pid = srv.pid
                break
            srv.kill()
            srv.wait()
        assert srv is not None and srv.pid == pid, "no process got the pid again"
        assert srv.stdin is not None and srv.stdout is not None
        assert srv.stdout.readline() == "bind me\n"
        host.irm_ok("bind", "process", str(pid), "name", "svc")
        srv.stdin.write("\n")
        srv.stdin.flush()
        assert srv.stdout.readline() == "registered\n"
        assert [r["layers"] for r in host.table("name", "list") if r["name"] == "svc"] == ["local"]
        srv.stdin.write("\n")
        srv.stdin.flush()
        assert srv.wait(10) == 0
        wait_for(lambda: [r["layers"] for r in host.table("name", "list") if r["name"] == "svc"] == ["-"], 10,
                 "the server's registration to go with it")  # fmt: skip
    finally:
        if srv is not None and srv.poll() is None:
            srv.kill()
            srv.wait()
        if holder:
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder, 9)


def test_the_acceptor_learns_the_kernels_uid_and_pid_of_a_user_that_allocated(host: IrmdProc) -> None:
    with nobody_allocates_to_root(host, "hostsrv") as (p, flow):
        assert (flow.peer_uid, flow.peer_pid) == (NOBODY, p.pid)
        flows = parse_table(nobody_irm(host, "flow", "list").stdout)
        assert [f["role"] for f in flows] == ["src"]  # its own end only, not the host's


def test_a_program_binding_is_not_served_by_that_program_run_by_another_user(host: IrmdProc) -> None:
    echo_service(host, "echo")
    with server([*AS_NOBODY, str(BIN / "oping"), "-l"], host.env, host.log.parent / "nobody.log", "started"):
        r = host.run("oping", "-n", "echo", "-c", "1", timeout=60)
        assert "1 received" not in r.stdout  # uid 65534 running oping takes no flow meant for root's oping
        assert "no process is accepting" in r.stderr + r.stdout
        with server([str(BIN / "oping"), "-l"], host.env, host.log.parent / "root.log", "started"):
            r = host.run("oping", "-n", "echo", "-c", "1")
            assert "1 received" in r.stdout, r.stdout + r.stderr
        assert "New flow" not in (host.log.parent / "nobody.log").read_text()


CLAIM_OPING = """
import sys
sys.argv[0] = sys.argv[1]  # announce itself as oping
from flowlib.irm import IrmClient
from proto.errors import FlowTimeout
client = IrmClient()
print("ready", flush=True)
try:
    client.accept(3)
    print("GOT A FLOW")
except FlowTimeout:
    print("no flow")
"""


def test_announcing_a_programs_name_does_not_make_a_process_that_program(host: IrmdProc) -> None:
    echo_service(host, "echo")
    log = host.log.parent / "claim.log"
    with server([str(BIN / "python"), "-c", CLAIM_OPING, str(BIN / "oping")], host.env, log, "ready") as p:
        r = host.run("oping", "-n", "echo", "-c", "1", timeout=60)
        assert "1 received" not in r.stdout and "no process is accepting" in r.stderr + r.stdout
        p.wait(20)
    assert "no flow" in log.read_text()


def test_users_see_their_own_flows_and_names_and_nobody_sees_a_layer_key(host: IrmdProc) -> None:
    host.irm_ok("ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net", "key", "s3cret-k3y")
    host.note_children()
    echo_service(host, "echo")
    dump = host.irm_ok("dump", "config").stdout
    assert "s3cret-k3y" not in dump and "[unicast.n1] key: a secret, never dumped" in dump and "[name.echo]" in dump
    holder = subprocess.Popen([*AS_NOBODY, "sleep", "60"])
    try:  # the binding is the user's the process runs as: once setpriv has become nobody
        wait_for(lambda: os.stat(f"/proc/{holder.pid}").st_uid == 65534, 10, "the holder to run as nobody")
        host.irm_ok("bind", "process", str(holder.pid), "name", "nobodys")
        theirs = nobody_irm(host, "dump", "config").stdout
        assert "s3cret-k3y" not in theirs and "[name.nobodys]" in theirs and "echo" not in theirs
    finally:
        holder.kill()
        holder.wait()
    assert "s3cret-k3y" not in nobody_irm(host, "dump", "graph").stdout
    assert "s3cret-k3y" not in host.log_text()


ALLOC_TO_A_PATH = """
import sys, time
from flowlib import flow_alloc
from proto.errors import FlowError
start = time.monotonic()
try:
    flow_alloc(sys.argv[1], timeout=3).close()
    print("allocated")
except FlowError as e:
    print(type(e).__name__, round(time.monotonic() - start, 1))
"""


def test_a_name_cannot_point_the_irmd_at_a_users_files(host: IrmdProc, public_dir: Path) -> None:
    """A name is a path under the security directory: one of a user's making (absolute, or with ..)
    once made the root IRMd open the user's FIFO as enc.conf, and stall until someone wrote to it."""
    trap = public_dir / "trap"
    trap.mkdir()
    os.chown(trap, NOBODY, NOBODY)
    assert nobody(host, "mkfifo", str(trap / "enc.conf")).returncode == 0
    for name in (str(trap), "../../" + str(trap).lstrip("/")):
        r = nobody_py(host, ALLOC_TO_A_PATH, name, timeout=20)
        assert r.returncode == 0 and r.stdout.split()[0] in ("NotFound", "FlowTimeout"), r.stdout + r.stderr
        assert float(r.stdout.split()[1]) < 5
        assert host.irm_ok("ipcp", "list").returncode == 0  # the IRMd still answers
    assert "enc.conf" not in host.log_text()


# -- limits -------------------------------------------------------------------------------------


@pytest.fixture
def tight(public_dir: Path) -> Iterator[IrmdProc]:
    limits = ["conns_per_uid=3", "flows_per_uid=2", "accepts_per_conn=2", "requests_per_conn=4"]
    with irmd_in(public_dir, *(a for limit in limits for a in ("--limit", limit))) as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        yield irmd


HOLD_CONNECTIONS = """
from flowlib.irm import IrmClient
from proto.errors import LimitReached
held = []
try:
    for _ in range(5):
        held.append(IrmClient())
    print("all 5")
except LimitReached as e:
    print(len(held), "then", e)
"""


def test_connections_per_user_are_limited_and_others_still_connect(tight: IrmdProc) -> None:
    r = nobody_py(tight, HOLD_CONNECTIONS)
    assert r.stdout.startswith("3 then uid 65534 has 3 connections"), r.stdout + r.stderr
    clients = [IrmClient(tight.sock) for _ in range(5)]  # root is not limited
    for c in clients:
        c.close()
    assert nobody_py(tight, HOLD_CONNECTIONS).stdout.startswith("3 then")  # the first three were released


HOLD_FLOWS = """
import sys
from flowlib import flow_alloc
from proto.errors import LimitReached
flows = []
try:
    for _ in range(4):
        flows.append(flow_alloc("sink", timeout=10))
    print("all 4")
except LimitReached as e:
    print(len(flows), "then", e, flush=True)
if sys.argv[1:]:
    import time
    time.sleep(float(sys.argv[1]))  # and hold them
"""


def test_flows_per_user_are_limited_and_others_still_allocate(tight: IrmdProc) -> None:
    srv = IrmClient(tight.sock)
    try:
        call(srv.channel, m.Bind("process", str(os.getpid()), "sink"), timeout=10)
        call(srv.channel, m.NameRegister("sink", ["local"]), timeout=10)
        srv.listen(True)  # take every flow as it comes
        r = nobody_py(tight, HOLD_FLOWS)
        assert r.stdout.startswith("2 then uid 65534 holds 2 flows"), r.stdout + r.stderr
        mine = [Flow(*IrmClient.alloc(srv, "sink", None, 10), srv) for _ in range(4)]
        for flow in mine:
            flow.close()
    finally:
        srv.close()


def test_users_flows_in_all_are_limited_and_root_still_allocates(public_dir: Path) -> None:
    with irmd_in(public_dir, "--limit", "flows_per_uid=2", "--limit", "flows_total=3") as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        srv = IrmClient(irmd.sock)
        try:
            call(srv.channel, m.Bind("process", str(os.getpid()), "sink"), timeout=10)
            call(srv.channel, m.NameRegister("sink", ["local"]), timeout=10)
            srv.listen(True)
            a_log, b_log = public_dir / "a.log", public_dir / "b.log"
            with (server([*AS_NOBODY, str(BIN / "python"), "-c", HOLD_FLOWS, "60"], irmd.env, a_log, "then"),
                  server(["setpriv", f"--reuid={NOBODY - 1}", f"--regid={NOBODY - 1}", "--clear-groups",
                          str(BIN / "python"), "-c", HOLD_FLOWS, "60"], irmd.env, b_log, "then")):  # fmt: skip
                assert a_log.read_text().startswith("2 then uid 65534 holds 2 flows"), a_log.read_text()
                assert b_log.read_text().startswith("1 then users hold 3 flows (limit flows_total=3)"), (
                    b_log.read_text()
                )
                mine = [Flow(*IrmClient.alloc(srv, "sink", None, 10), srv) for _ in range(3)]  # root's are not
                for flow in mine:
                    flow.close()
        finally:
            srv.close()


ALLOC_AT_ONCE = """
import socket, sys, time
from proto import messages as m
from proto.qos import QosSpec
from transports.unix import recv_frame, send_frame
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
s.settimeout(10)
for req in range(1, 9):  # sent at once: the IRMd resolves them all together
    send_frame(s, m.CODEC.encode(m.FlowAlloc("sink", QosSpec(), 10), req))
got = [m.CODEC.decode(recv_frame(s)[0]).msg for _ in range(8)]
print(sum(isinstance(g, m.FlowReply) for g in got), sorted({g.code for g in got if not isinstance(g, m.FlowReply)}),
      flush=True)
time.sleep(30)  # holding what it got
"""


def test_allocations_sent_at_once_through_several_layers_keep_to_flows_per_uid(public_dir: Path) -> None:
    with irmd_in(public_dir, "--limit", "flows_per_uid=2") as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo2", "type", "local", "layer", "local2")
        irmd.note_children()
        srv = IrmClient(irmd.sock)
        try:
            call(srv.channel, m.Bind("process", str(os.getpid()), "sink"), timeout=10)
            call(srv.channel, m.NameRegister("sink", ["local", "local2"]), timeout=10)  # two layers to ask
            srv.listen(True)
            argv = [*AS_NOBODY, str(BIN / "python"), "-c", ALLOC_AT_ONCE, str(irmd.sock)]
            with server(argv, irmd.env, public_dir / "at-once.log", "]"):
                assert (public_dir / "at-once.log").read_text().startswith("2 ['EDQUOT']")
                users = [f for f in irmd.table("flow", "list") if f["role"] == "src" and f["pid"] != str(os.getpid())]
                assert len(users) == 2, users
                mine = [Flow(*IrmClient.alloc(srv, "sink", None, 10), srv) for _ in range(3)]  # root's are not
                for flow in mine:
                    flow.close()
        finally:
            srv.close()


ALLOC_UNANSWERED = """
import os, selectors, socket, sys, time
from proto import messages as m
from proto.qos import QosSpec
from transports.unix import recv_frame, send_frame
sel, codes, req = selectors.DefaultSelector(), {}, 0
def fire(s):  # an allocation to a name nobody has: the IPCP asks the layer for it until its query times out
    global req
    req += 1
    send_frame(s, m.CODEC.encode(m.FlowAlloc(os.urandom(8).hex(), QosSpec(), 5), req))
for _ in range(3):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    for _ in range(150):
        fire(s)
    sel.register(s, selectors.EVENT_READ)
print("flooding", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # each answer (ENOENT after the query, or a refusal) sends another
    for key, _ in sel.select(0.5):
        data, fds = recv_frame(key.fileobj)
        for fd in fds:
            os.close(fd)
        msg = m.CODEC.decode(data).msg
        codes[getattr(msg, "code", type(msg).__name__)] = codes.get(getattr(msg, "code", type(msg).__name__), 0) + 1
        fire(key.fileobj)
print("done", sorted(codes.items()), flush=True)
"""


@pytest.mark.timeout(180)
def test_a_users_allocations_to_names_nobody_has_leave_the_layer_resolving_others_names(public_dir: Path) -> None:
    """uid 65534 keeps 450 allocations to made-up names under way through a udp4 IPCP: each held one of
    the IPCP's outstanding name queries (256, shared by all users) for its second, and root's
    allocations to names another host serves came back `name not found in this layer`. A user's
    allocations under way are limited (allocs_per_uid); past them it gets EDQUOT, and root's names
    resolve and are reached."""
    names = [f"served{i}" for i in range(5)]
    with udp_lan.lan(public_dir) as make:
        a = make(udp_lan.A_IP)
        b = make(udp_lan.B_IP, peer=udp_lan.A_IP)
        srv = a.client()
        for name in names:
            call(srv.channel, m.Bind("process", str(os.getpid()), name), timeout=10)
            call(srv.channel, m.NameRegister(name, [udp_lan.LAYER]), timeout=10)
        srv.listen(True)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    _, fd = srv.accept(0.5)
                    os.close(fd)

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        log = public_dir / "flood.log"
        argv = [*AS_NOBODY, str(BIN / "python"), "-c", ALLOC_UNANSWERED, str(b.irmd.sock), "20"]
        try:
            with server(argv, b.irmd.env, log, "flooding") as flood:
                time.sleep(2)  # the flood under way: the queries of its first allocations have timed out
                reached, failed = [], []
                for name in names:  # each a name B has not resolved yet: B's IPCP must ask the layer
                    try:
                        b.alloc(name, timeout=10).close()
                        reached.append(name)
                    except FlowError as e:
                        failed.append(f"{name}: {e}")
                flood.wait(60)
            assert not failed, f"root's allocations failed beside uid 65534's flood: {failed}"
            assert reached == names
            summary = log.read_text().splitlines()[-1]
            assert summary.startswith("done") and "EDQUOT" in summary, summary
        finally:
            stop.set()
            acceptor.join(5)


@pytest.mark.timeout(180)
def test_a_user_holds_a_share_of_a_udp_ipcps_flows_and_root_allocates_beside_it(public_dir: Path) -> None:
    """A udp4 IPCP tells the IRMd it holds 4,096 flows; uid 65534 allocating flows that root's server
    at another host accepts holds ipcp_share_per_uid percent of them (1% here: 40), then gets EDQUOT
    naming the IPCP; root's allocations through the same IPCP go on. (tests/net/test_shim_share.py plays
    it on eth-llc's 62 endpoints, with the default shares.)"""
    limits = ("--limit", "ipcp_share_per_uid=1", "--limit", "ipcp_share_users=2")
    with udp_lan.lan(public_dir) as make:
        a = make(udp_lan.A_IP, args=limits)
        b = make(udp_lan.B_IP, peer=udp_lan.A_IP, args=limits)
        srv = a.client()
        call(srv.channel, m.Bind("process", str(os.getpid()), "sink"), timeout=10)
        call(srv.channel, m.NameRegister("sink", [udp_lan.LAYER]), timeout=10)
        srv.listen(True)  # every flow taken as it comes
        log = public_dir / "hold.log"
        argv = [*AS_NOBODY, str(BIN / "python"), "-c", HOLD_FLOWS_TO, "sink", "45"]
        with server(argv, b.irmd.env, log, "then"):
            got = log.read_text()
            assert got.startswith("40 then EDQUOT uid 65534 holds 40 flows of ipcp 'u' (layer 'lan')"), got
            assert "which holds 4096 flows at most (limit ipcp_share_per_uid=1%: 40)" in got, got
            mine = [b.alloc("sink") for _ in range(3)]  # root's: not counted
            for flow in mine:
                flow.close()


COUNTER_FLOOD = """
import os, socket, sys, time
from proto import messages as m
from proto.qos import QosSpec
from transports.unix import recv_frame, send_frame
from transports.wire import REPLY
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])
def reply():
    while True:
        data, fds = recv_frame(s)
        for fd in fds:
            os.close(fd)
        frame = m.CODEC.decode(data)
        if frame.req_id & REPLY:
            return frame.msg
send_frame(s, m.CODEC.encode(m.FlowAlloc(sys.argv[2], QosSpec(), 10.0), 1))
flow = reply()
print("holding", flow.flow_id, flush=True)
ask = [m.FlowInfo(flow.flow_id, "", counters=True), m.FlowList()]
sent = answered = counted = 0
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end or answered < sent:
    while sent - answered < 128 and time.monotonic() < end:  # as many at once as the IRMd serves
        sent += 1
        send_frame(s, m.CODEC.encode(ask[sent % 2], sent + 1))
    got = reply()
    answered += 1
    counted += getattr(got, "data", "") == "ipcp"
print("done", answered, counted, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_users_counter_queries_in_a_loop_reach_the_ipcp_spaced_and_root_gets_fresh_counters(
    public_dir: Path,
) -> None:
    """uid 65534, holding a flow of a unicast layer, asks its counters (FlowInfo) and its flow list as
    fast as the IRMd answers, 128 at a time: each once made the IPCP build its whole info, and root's
    requests waited behind some 1,800 of them a second. Now the IPCP is asked once per 10 ms at most,
    all callers sharing the answer: it stays mostly idle, uid 65534 still gets its own counters, and
    root's `irm ipcp show` and pings are served, with counters that count what root saw happen."""
    with irmd_in(public_dir) as irmd:
        port = free_port(["127.0.0.1"])
        irmd.irm_ok(*udp4_bootstrap("lan", "127.0.0.1", "port", str(port)))
        irmd.irm_ok("ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net", "autobind")
        irmd.irm_ok("bind", "program", str(BIN / "oping"), "name", "echo", "auto", "--", "-l")
        irmd.irm_ok("name", "register", "echo", "layer", "net")
        ipcp = irmd.ipcp_pid("n1")
        log = public_dir / "flood.log"
        argv = [*AS_NOBODY, str(BIN / "python"), "-c", COUNTER_FLOOD, str(irmd.sock), "echo", "6"]
        with server(argv, irmd.env, log, "holding") as flood:
            root = IrmClient(irmd.sock)
            try:
                reply, fd = root.alloc("echo", None, 10)
                flow = Flow(reply, fd, root)
                used, t0 = cpu_seconds(ipcp), time.monotonic()
                for seq in range(20):
                    udp_lan.ping(flow, seq)
                    counted = root.flow_counters(flow.flow_id)  # asked after the reply came: it counts it
                    assert counted.data == "ipcp" and counted.sent >= seq + 1 and counted.received >= seq + 1
                    shown = irmd.request(m.IpcpInfoReq("n1"))
                    assert isinstance(shown, m.IpcpInfo) and shown.sections
                flood.wait(30)
                used, took = cpu_seconds(ipcp) - used, time.monotonic() - t0
                flow.close()
            finally:
                root.close()
        summary = log.read_text().splitlines()[-1].split()
        assert summary[0] == "done" and int(summary[1]) > 1000 and int(summary[2]) > 0, summary
        assert used < 0.1 * took, f"the IPCP used {used:.2f} s of CPU in {took:.2f} s of uid 65534's queries"


def raw_conn(irmd: IrmdProc) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(irmd.sock))
    s.settimeout(10)
    return s


def replies(s: socket.socket, n: int) -> dict[int, m.Message]:
    got: dict[int, m.Message] = {}
    while len(got) < n:
        data, fds = recv_frame(s)
        for fd in fds:
            os.close(fd)
        frame = m.CODEC.decode(data)
        got[frame.req_id & ~REPLY] = frame.msg
    return got


def test_pending_accepts_per_connection_are_limited(tight: IrmdProc) -> None:
    s = raw_conn(tight)
    with s:
        for req in (1, 2, 3):
            send_frame(s, m.CODEC.encode(m.FlowAccept(30), req))
        got = replies(s, 1)
        assert isinstance(got[3], Error) and got[3].code == "EDQUOT" and "accepts_per_conn=2" in got[3].text


PARK_ACCEPTS = """
import socket, sys
from proto import messages as m
from transports.unix import recv_frame, send_frame
conns = []
for _ in range(int(sys.argv[2])):  # connections, each parking accepts_per_conn=2 accepts
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(sys.argv[1])
    s.settimeout(1)
    conns.append(s)
    for req in (1, 2):
        send_frame(s, m.CODEC.encode(m.FlowAccept(30), req))
refused = []
for s in conns:
    try:
        while True:  # the refusals come at once; parked accepts answer nothing yet
            refused.append(m.CODEC.decode(recv_frame(s)[0]).msg.text)
    except TimeoutError:
        pass
print(len(conns) * 2 - len(refused), "parked;", "; ".join(refused), flush=True)
sys.stdin.read()  # they stay parked until the test is done
"""


@pytest.mark.timeout(60)
def test_pending_accepts_per_user_are_limited_and_roots_are_not(public_dir: Path) -> None:
    """uid 65534's connections, each within accepts_per_conn, together parked accepts_per_conn x
    conns_per_uid flow_accept calls in the IRMd (16,384 by default), each holding its memory. A user's
    waiting accepts are limited (accepts_per_uid) and all users' (accepts_total): past them, EDQUOT
    naming the limit; root's accepts, beside them and past both, wait for their flows."""
    limits = ["conns_per_uid=3", "accepts_per_conn=2", "accepts_per_uid=3", "accepts_total=4"]
    with irmd_in(public_dir, *(a for limit in limits for a in ("--limit", limit))) as irmd:
        env = as_nobody_env(irmd.env)
        code = textwrap.dedent(PARK_ACCEPTS)
        with contextlib.ExitStack() as stack:

            def park(uid: int, conns: int) -> str:
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", str(BIN / "python")]
                p = subprocess.Popen(
                    [*argv, "-c", code, str(irmd.sock), str(conns)],
                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
                )  # fmt: skip
                stack.callback(p.wait, 10)
                stack.callback(p.stdin.close)  # type: ignore[union-attr]
                return p.stdout.readline().strip()  # type: ignore[union-attr]

            line = park(NOBODY, 3)
            assert line.startswith("3 parked;"), line
            assert line.count("uid 65534 has 3 accepts waiting (limit accepts_per_uid=3)") == 3, line
            line = park(NOBODY - 1, 2)  # another user: the one place left of accepts_total
            assert line.startswith("1 parked;"), line
            assert line.count("users have 4 accepts waiting (limit accepts_total=4)") == 3, line
            socks = [stack.enter_context(raw_conn(irmd)) for _ in range(3)]
            for s in socks:
                for req in (1, 2):
                    send_frame(s, m.CODEC.encode(m.FlowAccept(1), req))
            for s in socks:  # each of root's six waited its second for a flow, refused none
                got = replies(s, 2)
                assert all(isinstance(r, Error) and r.code == "ETIMEDOUT" for r in got.values()), got


def test_requests_at_once_per_connection_are_limited(public_dir: Path) -> None:
    with irmd_in(public_dir, "--limit", "requests_per_conn=4") as irmd:
        s = raw_conn(irmd)
        with s:
            for req in range(1, 6):
                send_frame(s, m.CODEC.encode(m.FlowAccept(30), req))
            got = replies(s, 1)
            assert isinstance(got[5], Error) and got[5].code == "EBUSY"
            irmd.irm_ok("ipcp", "list")


def test_a_client_that_never_reads_its_replies_holds_little_and_others_are_served(public_dir: Path) -> None:
    with irmd_in(public_dir, "--limit", "queued_bytes_per_conn=16384") as irmd:
        for i in range(50):
            irmd.request(m.NameCreate(f"name-with-a-long-enough-name-{i:03}"))
        hog = raw_conn(irmd)
        hog.setblocking(False)
        sent = 0
        with hog:
            with contextlib.suppress(BlockingIOError):
                for req in range(1, 20_000):
                    send_frame(hog, m.CODEC.encode(m.NameList(), req))
                    sent += 1
            t0 = time.monotonic()
            assert len(irmd.table("name", "list")) == 50
            assert time.monotonic() - t0 < 10
            rss = int(
                next(
                    line
                    for line in Path(f"/proc/{irmd.pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS")
                ).split()[1]
            )
            assert rss < 200_000, f"the irmd holds {rss} kB"  # 20,000 unread lists would be ~100 MB
        assert sent > 0
        irmd.irm_ok("name", "list")


# -- sockets and directories ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "owner", "says"),
    [
        (0o777, 0, "writable by others"),
        (0o775, 0, "writable by others"),
        (0o755, NOBODY, "belongs to uid 65534"),
    ],
)
def test_the_irmd_refuses_a_socket_directory_others_control(public_dir: Path, mode: int, owner: int, says: str) -> None:
    d = public_dir / "run"
    d.mkdir()
    d.chmod(mode)
    os.chown(d, owner, owner)
    r = subprocess.run([str(BIN / "irmd"), "--sock", str(d / "irmd.sock")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "will not serve from" in r.stderr and says in r.stderr
    assert not (d / "irmd.sock").exists()


def test_the_irmd_makes_its_socket_directory_open_to_reach_closed_to_write(public_dir: Path) -> None:
    d = public_dir / "made" / "ouroboros"
    sock = d / "irmd.sock"
    env = dict(os.environ, OUROBOROS_SOCK=str(sock))
    p = subprocess.Popen(
        [str(BIN / "irmd"), "--sock", str(sock)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: sock.exists() or p.poll() is not None, 15, "the irmd's socket")
        for made in (d, d.parent):
            assert (made.stat().st_mode & 0o7777, made.stat().st_uid) == (0o755, 0)
        assert sock.stat().st_mode & 0o777 == 0o666
        r = nobody(IrmdProc(sock, public_dir / "none", p, env), str(BIN / "irm"), "ipcp", "list")
        assert r.returncode == 0, r.stderr  # any user's applications reach it
    finally:
        p.terminate()
        assert p.wait(15) == 0


def test_a_client_refuses_a_socket_another_user_put_there(public_dir: Path) -> None:
    fake = public_dir / "irmd.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with listener:
        listener.bind(str(fake))
        listener.listen(1)
        os.chown(fake, NOBODY, NOBODY)  # as if uid 65534 made it, waiting for root's irm
        env = dict(os.environ, OUROBOROS_SOCK=str(fake))
        r = subprocess.run([str(BIN / "irm"), "ipcp", "list"], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "refusing the IRMd socket" in r.stderr and "uid 65534" in r.stderr
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            listener.accept()  # irm never even connected


# -- what the irmd starts ------------------------------------------------------------------------

EVIL = "import os, pathlib; (pathlib.Path({marker!r}) / str(os.getpid())).write_text('ran')\n"

REPORT = """#!{python}
import json, os, sys
from flowlib import flow_accept
with open(sys.argv[1], "w") as f:
    json.dump({{"env": dict(os.environ), "cwd": os.getcwd(), "uid": os.geteuid()}}, f)
with flow_accept() as flow:
    flow.write(b"hi")
"""


def test_ipcps_and_programs_started_ignore_the_irmds_working_directory_and_environment(public_dir: Path) -> None:
    marker = public_dir / "evil-ran"  # a file per process that ran the admin's PYTHONPATH
    marker.mkdir()
    evil = public_dir / "evil"
    for pkg in ("ipcp", "flowlib"):
        (evil / pkg).mkdir(parents=True)
        (evil / pkg / "__init__.py").write_text(EVIL.format(marker=str(marker)))
        (evil / pkg / "__main__.py").write_text(EVIL.format(marker=str(marker)))
    (evil / "sitecustomize.py").write_text(EVIL.format(marker=str(marker)))
    prog = public_dir / "report"
    prog.write_text(REPORT.format(python=sys.executable))
    prog.chmod(0o755)
    out = public_dir / "report.json"
    env = {
        "PYTHONPATH": str(evil),
        "PYTHONSTARTUP": str(evil / "sitecustomize.py"),
        "LD_PRELOAD": "",
        "SECRET_OF_THE_ADMIN": "x",
    }
    irmd = start_irmd(public_dir, env=env)
    irmd.env = {k: v for k, v in irmd.env.items() if k not in env}  # our own irm commands run without it
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("bind", "program", str(prog), "name", "report", "auto", "--", str(out))
        irmd.irm_ok("name", "register", "report", "layer", "local")
        r = subprocess.run(
            [
                sys.executable,
                "-I",
                "-c",
                "from flowlib import flow_alloc\n"
                "f = flow_alloc('report', timeout=20); f.set_timeout(10); print(f.read().decode())",
            ],
            env={"OUROBOROS_SOCK": str(irmd.sock)},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        assert r.stdout.strip() == "hi", r.stderr
        got = json.loads(out.read_text())
        assert got["cwd"] == "/" and got["uid"] == 0
        assert not {"PYTHONPATH", "PYTHONSTARTUP", "LD_PRELOAD", "SECRET_OF_THE_ADMIN"} & set(got["env"])
        assert got["env"]["OUROBOROS_SOCK"] == str(irmd.sock)
        irmd.note_children()
    finally:
        stop_irmd(irmd)
    ran = {int(p.name) for p in marker.iterdir()}
    assert ran <= {irmd.pid}, "code from the irmd's PYTHONPATH ran in an IPCP or a started program"


UMASK_REPORT = """#!/bin/sh
echo made > {out}/made.txt
echo "$(umask) $(ulimit -n)" > {out}/status
"""


@pytest.mark.timeout(90)
def test_a_program_the_irmd_starts_makes_files_as_a_login_would(public_dir: Path) -> None:
    """An IRMd started under umask 0 (as some service managers start it) passed it on: every file a
    program it started made was uid 65534's to rewrite. A program gets a login's umask now, and the
    descriptor limit the IRMd was given (it raises its own to the hard limit; a program using select()
    past 1,024 descriptors writes past its fd_set)."""
    out = public_dir / "out"
    out.mkdir(mode=0o755)
    prog = public_dir / "made"
    prog.write_text(UMASK_REPORT.format(out=out))
    prog.chmod(0o755)
    old_umask = os.umask(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        irmd = start_irmd(public_dir)
    finally:
        os.umask(old_umask)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("bind", "program", str(prog), "name", "made", "auto")
        irmd.irm_ok("name", "register", "made", "layer", "local")
        irmd.note_children()
        irmd.run("oping", "-n", "made", "-c", "1", "--timeout", "3")  # it serves no flow: it is started
        wait_for(lambda: (out / "status").exists() and (out / "status").read_text().strip(), 20, "the program")
        assert (out / "status").read_text().split() == [f"{login_umask():04o}", "1024"]
        r = nobody(irmd, "sh", "-c", f"echo rewritten > {out}/made.txt")
        assert r.returncode != 0 and (out / "made.txt").read_text() == "made\n", r.stderr
    finally:
        stop_irmd(irmd)


def test_ten_thousand_flows_list_in_pages(public_dir: Path) -> None:
    with irmd_in(public_dir) as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        srv, cli = IrmClient(irmd.sock), IrmClient(irmd.sock)
        flows: list[int] = []
        try:
            call(srv.channel, m.Bind("process", str(os.getpid()), "many"), timeout=10)
            call(srv.channel, m.NameRegister("many", ["local"]), timeout=10)
            srv.listen(True)
            with ThreadPoolExecutor(8) as pool:
                flows = [fd for _, fd in pool.map(lambda _: cli.alloc("many", None, 30), range(5000))]
            t0 = time.monotonic()
            rows = irmd.table("flow", "list")
            took = time.monotonic() - t0
            assert len(rows) == 10_000 and len({r["id"] for r in rows}) == 10_000
            assert took < 30, f"irm flow list took {took:.1f} s"
        finally:
            for fd in flows:
                os.close(fd)
            for _, fd in srv.take_arrived():
                os.close(fd)
            srv.close()
            cli.close()


def test_a_limit_reached_is_its_own_error_class() -> None:
    from proto.errors import from_remote

    assert isinstance(from_remote("EDQUOT", "x"), LimitReached)


@pytest.mark.parametrize(
    ("mode", "owner", "says"),
    [
        (0o666, 0, "writable by others"),
        (0o644, NOBODY, "belongs to uid 65534"),
    ],
)
def test_the_irmd_boots_from_no_config_another_user_could_have_written(
    public_dir: Path, mode: int, owner: int, says: str
) -> None:
    conf = public_dir / "irmd.conf"
    conf.write_text('[name.pwn]\nprog = ["/bin/sh"]\nargs = ["-c id"]\n')  # root would run it on demand
    conf.chmod(mode)
    os.chown(conf, owner, owner)
    sock = public_dir / "irmd.sock"
    r = subprocess.run(
        [str(BIN / "irmd"), "--sock", str(sock), "--config", str(conf)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1 and "will not boot from it" in r.stderr and says in r.stderr
    conf.chmod(0o644)
    os.chown(conf, 0, 0)  # the same file as root's own: it boots
    with irmd_in(public_dir, "--config", str(conf)) as irmd:
        wait_for(lambda: "applied" in irmd.log_text(), 15, "the config to be applied")
        assert any(r["name"] == "pwn" for r in irmd.table("name", "list"))


def test_a_root_server_working_for_a_user_gets_that_users_rights_for_good(host: IrmdProc) -> None:
    from proto.control import act_as
    from proto.errors import PermissionDenied

    client = IrmClient(host.sock)
    try:
        act_as(client.channel, NOBODY)
        for msg in (m.Bind("program", "/bin/sh", "pwn", True), m.NameCreate("for-nobody")):
            with pytest.raises(PermissionDenied):  # what uid 65534 may not do, its server may not do for it
                call(client.channel, msg, timeout=10)
        with pytest.raises(PermissionDenied, match="cannot act as uid 0"):
            act_as(client.channel, 0)  # no way back
        reply, _ = call(client.channel, m.FlowList(), timeout=10)
        assert isinstance(reply, m.Table) and reply.rows == []  # root's flows are not its to see
    finally:
        client.close()
    assert "for-nobody" not in {r["name"] for r in host.table("name", "list")}
    r = nobody_py(
        host, "from flowlib.irm import IrmClient\nfrom proto.control import act_as\nact_as(IrmClient().channel, 0)"
    )
    assert r.returncode != 0 and "uid 65534 cannot act as uid 0" in r.stderr


@pytest.mark.timeout(60)
def test_a_root_server_working_for_a_user_takes_none_of_its_own_names_flows_for_it(host: IrmdProc) -> None:
    """A root server bound by pid to a name acts as uid 65534 on a second connection (to serve that
    user): what it asks there is the user's, and the user is bound to nothing, so an accept made for
    the user takes none of the server's flows; the server's own connection takes them all."""
    from proto.control import act_as

    own, for_user = IrmClient(host.sock), IrmClient(host.sock)
    try:
        call(own.channel, m.Bind("process", str(os.getpid()), "svc"), timeout=10)
        call(own.channel, m.NameRegister("svc", ["local"]), timeout=10)
        act_as(for_user.channel, NOBODY)
        with ThreadPoolExecutor(1) as pool:
            users = pool.submit(for_user.accept, 3)  # alone: it would be given the flow
            time.sleep(0.3)
            alloc = subprocess.Popen([*AS_NOBODY, str(BIN / "python"), "-c", ALLOC_AND_HOLD, "svc"],
                                     env=as_nobody_env(host.env), stdout=subprocess.DEVNULL, cwd="/")  # fmt: skip
            try:
                with pytest.raises(FlowError):
                    reply, fd = users.result(10)
                    os.close(fd)
                    pytest.fail(f"the connection acting as uid 65534 took flow {reply.flow_id} of root's server")
                reply, fd = own.accept(10)  # the server's own connection takes it
                Flow(reply, fd, own).close()
            finally:
                alloc.kill()
                alloc.wait()
    finally:
        own.close()
        for_user.close()


# -- who allocated a flow: the kernel's ids, never the account's ------------------------------------------

ALLOCATES = r"""
import sys
from flowlib import flow_alloc, qos
from flowlib.irm import IrmClient
from proto.control import act_as
irm = IrmClient()
if len(sys.argv) > 2:
    act_as(irm.channel, int(sys.argv[2]))
flow_alloc(sys.argv[1], qos=qos.raw, timeout=10, irm=irm).close()
"""


@pytest.mark.timeout(90)
def test_a_flow_carries_the_gid_and_groups_its_allocator_has_not_its_accounts(host: IrmdProc) -> None:
    """SO_PEERCRED's gid and SO_PEERGROUPS, as the process holds them: one that dropped its groups
    (or runs with another gid) is carried so; a root server acting as a user carries no kernel ids."""
    acceptor = subprocess.Popen(
        [str(BIN / "python"), "-c", WHO_ACCEPTS, "who"], env=host.env, stdout=subprocess.PIPE, text=True, cwd="/"
    )
    try:
        assert acceptor.stdout is not None and acceptor.stdout.readline() == "ready\n"
        allocators = [  # (setpriv ids, extra arguments) -> what the acceptor learns
            ([f"--regid={NOBODY}", "--clear-groups"], (), [NOBODY, NOBODY, []]),
            (["--regid=4242", "--groups=4243,3000000000"], (), [NOBODY, 4242, [4243, 3000000000]]),
            ([f"--regid={NOBODY}", "--groups=0"], (), [NOBODY, NOBODY, [0]]),
        ]
        for ids, extra, want in allocators:
            r = subprocess.run(
                ["setpriv", f"--reuid={NOBODY}", *ids, str(BIN / "python"), "-c", ALLOCATES, "who", *extra],
                env=as_nobody_env(host.env), capture_output=True, text=True, timeout=30, cwd="/",
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert json.loads(acceptor.stdout.readline()) == want, ids
        # root acting as uid 65534 (a server for a user it authenticated): the kernel's ids are root's
        r = subprocess.run(
            [str(BIN / "python"), "-c", ALLOCATES, "who", str(NOBODY)],
            env=host.env, capture_output=True, text=True, timeout=30, cwd="/",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(acceptor.stdout.readline()) == [NOBODY, None, None]
    finally:
        acceptor.kill()
        acceptor.wait()


# -- the general rule: whatever a user may not ask is refused, new kinds included -------------------------


PROBE_EVERY_KIND = r"""
import dataclasses, json, os, sys, typing
from flowlib.irm import open_channel
from proto import messages as m
from proto.control import call

AIMED = {"name": "echo", "layer": "local", "layers": ["local"], "type": "local", "kind": "process",
         "target": str(os.getpid()), "dst": "lo", "uid": 0, "ipcps": ["lo"]}  # what would hurt if it passed


def sample(hint):
    origin = typing.get_origin(hint) or hint
    if dataclasses.is_dataclass(origin):
        return origin(**{f.name: sample(h) for f, h in zip(dataclasses.fields(origin),
                         typing.get_type_hints(origin).values()) if f.init and not has_default(f)})
    return {str: "x", int: 1, bool: False, bytes: b"", float: 1.0, list: [], dict: {}, tuple: ()}.get(origin)


def has_default(f):
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def build(cls):
    hints = typing.get_type_hints(cls)
    args = {f.name: AIMED[f.name] if f.name in AIMED else sample(hints[f.name])
            for f in dataclasses.fields(cls) if f.init and (f.name in AIMED or not has_default(f))}
    return cls(**args)


out = {}
for name in sys.argv[1:]:
    channel = open_channel(None)
    try:
        reply, _ = call(channel, build(getattr(m, name)), 10)
        out[name] = ["ANSWERED", type(reply).__name__]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
    finally:
        channel.close()
print(json.dumps(out))
"""


def test_every_request_a_user_may_not_make_is_refused_to_uid_65534(host: IrmdProc) -> None:
    """Table-driven over every message kind proto.messages declares (so a kind added later is in the
    table by itself): each one users may not ask is refused to uid 65534 at a real IRMd, aimed at the
    host's name, IPCP and layer; acting as root is refused; the host and its service are untouched."""
    from test_irmd_policy import USERS_MAY

    kinds = sorted(cls.__name__ for cls in m.CODEC.types.values() if cls.__module__ == m.__name__
                   and cls not in USERS_MAY)  # fmt: skip
    assert len(kinds) > 20 and "IpcpDestroy" in kinds and "FlowReqArrived" in kinds
    echo_service(host, "echo")
    with server([str(BIN / "oping"), "-l"], host.env, host.log.parent / "srv.log", "started"):
        r = nobody_py(host, PROBE_EVERY_KIND, *kinds, "ActAs", timeout=120)
        answers = json.loads(r.stdout.splitlines()[-1]) if r.stdout else {}
        assert set(answers) == {*kinds, "ActAs"}, r.stdout + r.stderr
        let_through = {
            k: v
            for k, v in answers.items()
            if k != "ActAs" and (v[0] != "PermissionDenied" or "needs root or the IRMd's user" not in v[1])
        }
        assert not let_through, let_through
        assert answers["ActAs"] == ["PermissionDenied", "permission denied: uid 65534 cannot act as uid 0"]
        assert [i["name"] for i in host.table("ipcp", "list")] == ["lo"]
        assert [(n["name"], n["layers"]) for n in host.table("name", "list")] == [("echo", "local")]
        r = nobody(host, str(BIN / "oping"), "-n", "echo", "-c", "1")
        assert "1 received" in r.stdout, r.stdout + r.stderr  # what users may do still works for them


# -- program bindings against what a process says it is ---------------------------------------------------


CLAIMING_THIEF = r"""
import json, sys
from flowlib import flow_accept
from flowlib.irm import IrmClient
irm = IrmClient(prog=sys.argv[1])  # a claim: this process is python, run by uid 65534
print("ready", flush=True)
stolen = 0
try:
    while True:
        flow_accept(timeout=30, irm=irm)
        stolen += 1
        print(json.dumps({"stolen": stolen}), flush=True)
except Exception as e:
    print(json.dumps({"stolen": stolen, "end": type(e).__name__}), flush=True)
"""


SIX_FLOWS = r"""
import json, sys
from flowlib import flow_alloc
out = []
for _ in range(6):  # round robin among the acceptors a binding lets take them
    with flow_alloc("pong", timeout=10, encrypt=bool(sys.argv[1])) as f:
        out.append([f.peer and f.peer.verified, f.qos.cypher_s])
print(json.dumps(out))
"""


@pytest.mark.parametrize("secured", [False, True], ids=["plain", "ca-certified-encrypted"])
def test_uid_65534_announcing_a_bound_programs_name_takes_none_of_its_flows(public_dir: Path, secured: bool) -> None:
    """Root's `oping -l` serves `pong` (a program binding); uid 65534 announces itself as that oping
    and accepts beside it. Every ping root sends reaches root's oping, none the claimant; with a
    CA-certified name that takes only encrypted flows, the client sees the CA's identity for it."""
    from tests.pki import Pki

    env = {}
    if secured:
        pki = Pki(public_dir / "security")
        pki.trust()
        pki.serve_as("pong", *pki.issue("pong"))
        pki.enc_conf("pong", "")
        env = {"OUROBOROS_SECURITY_DIR": str(pki.base)}
    irmd = start_irmd(public_dir, env=env)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        echo_service(irmd, "pong")
        thief_log = public_dir / "thief.log"
        with (server([*AS_NOBODY, str(BIN / "python"), "-c", CLAIMING_THIEF, str(BIN / "oping")], irmd.env,
                     thief_log, "ready"),
              server([str(BIN / "oping"), "-l"], irmd.env, public_dir / "oping.log", "started")):  # fmt: skip
            r = subprocess.run([str(BIN / "python"), "-c", SIX_FLOWS, "1" if secured else ""], env=irmd.env,
                               capture_output=True, text=True, timeout=90)  # fmt: skip
            assert json.loads(r.stdout) == [["ca", 256] if secured else [None, 0]] * 6, r.stdout + r.stderr
            r = irmd.run("oping", "-n", "pong", "-c", "2", "-i", "50", *(["--encrypt"] if secured else []))
            assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr
        assert '"stolen": 1' not in thief_log.read_text() and "ready" in thief_log.read_text()
    finally:
        stop_irmd(irmd)


# -- lists: a user's own ---------------------------------------------------------------------------------


LIST_PROBE = r"""
import json
from flowlib.irm import open_channel
from proto import messages as m
from proto.control import call
channel = open_channel(None)
print(json.dumps({type(msg).__name__: call(channel, msg, 10)[0].rows for msg in (m.FlowList(), m.NameList())}))
"""


def test_flow_and_name_lists_show_uid_65534_its_own_and_nothing_of_roots(host: IrmdProc) -> None:
    with nobody_allocates_to_root(host, "payroll-db") as (mine, _):
        r = nobody_py(host, LIST_PROBE)
        seen = json.loads(r.stdout)
        assert [row["pid"] for row in seen["FlowList"]] == [str(mine.pid)], seen  # its own end only
        assert seen["NameList"] == [], seen  # root's binding is not its to see
        assert not re.search(rf"\b{os.getpid()}\b", r.stdout), r.stdout  # root's pid, as a whole number
        rows = host.table("flow", "list")  # root sees both ends
        assert {row["pid"] for row in rows} == {str(os.getpid()), str(mine.pid)}


PEER_PROBE = r"""
import sys
from flowlib.irm import open_channel
from proto import messages as m
from proto.control import call
from proto.errors import FlowError
try:
    print(call(open_channel(None), m.FlowPeer(int(sys.argv[1])), 10)[0])
except FlowError as e:
    print(type(e).__name__)
"""


def test_who_a_flow_came_from_is_told_its_holder_alone(host: IrmdProc) -> None:
    """FlowPeer answers the connection that holds the flow (a local one came from no remote host);
    uid 65534 asking of root's end learns nothing, not even that it exists."""
    with nobody_allocates_to_root(host, "payroll-db") as (_, roots):
        assert roots._irm.peer_addr(roots.flow_id) == ""
        r = nobody_py(host, PEER_PROBE, str(roots.flow_id))
        assert r.stdout.strip() == "NotFound", r.stdout + r.stderr


# -- descriptors: connections in all, and an IRMd out of them ------------------------------------------------


HOLD_AND_HAMMER = r"""
import json, sys, time
from flowlib.irm import IrmClient
from proto.errors import FlowError
held, refused, why = [], 0, ""
for _ in range(int(sys.argv[1])):
    try:
        held.append(IrmClient())
    except FlowError as e:
        refused, why = refused + 1, str(e)
        if refused >= 5:
            break
print(json.dumps({"held": len(held), "refused": refused, "why": why}), flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # and then knock again and again
    try:
        held.append(IrmClient())
    except (FlowError, OSError):
        pass
time.sleep(60)
"""


def hold(
    irmd: IrmdProc, uid: int, n: int, hammer: float, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    argv = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        str(BIN / "python"),
        "-c",
        HOLD_AND_HAMMER,
        str(n),
        str(hammer),
    ]
    return server(argv, irmd.env, log, '"held"')


def held(log: Path) -> dict[str, object]:
    return dict(json.loads(next(ln for ln in log.read_text().splitlines() if ln.startswith("{"))))


def test_users_connections_in_all_are_limited_and_admins_still_connect(public_dir: Path) -> None:
    with (
        irmd_in(public_dir, "--limit", "conns_per_uid=3", "--limit", "conns_total=4") as irmd,
        hold(irmd, NOBODY, 10, 0, public_dir / "a.log"),
        hold(irmd, NOBODY - 1, 10, 0, public_dir / "b.log"),
    ):
        a, b = held(public_dir / "a.log"), held(public_dir / "b.log")
        assert (a["held"], b["held"]) == (3, 1), (a, b)  # uid 65534 first, to its own limit; 65533 then
        assert "uid 65534 has 3 connections" in str(a["why"]) and "(limit conns_total=4)" in str(b["why"]), (a, b)
        clients = [IrmClient(irmd.sock) for _ in range(6)]  # root is never refused
        for c in clients:
            c.close()
        irmd.irm_ok("ipcp", "list")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int) -> int:
    """The process's descriptors once those of its last request have closed: the same count twice,
    a moment apart."""
    counts = [fds(pid)]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        counts.append(fds(pid))
        if counts[-1] == counts[-2]:
            return counts[-1]
    raise AssertionError(f"pid {pid}'s descriptors did not settle in 10 s: {counts}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(180)
def test_an_irmd_out_of_descriptors_serves_root_refuses_users_and_neither_spins_nor_floods_its_log(
    public_dir: Path,
) -> None:
    with irmd_in(public_dir, "--limit", "conns_per_uid=5000", "--limit", "conns_total=5000") as irmd:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        nofile = settled_fds(irmd.pid) + 40  # so that 40 descriptors are all one user needs to take them all
        subprocess.run(["prlimit", "--pid", str(irmd.pid), f"--nofile={nofile}:{nofile}"], check=True)
        log = public_dir / "attacker.log"
        with hold(irmd, NOBODY, 200, 8, log):
            got = held(log)
            assert got["refused"] and "out of descriptors" in str(got["why"]), got
            assert int(got["held"]) <= 40  # type: ignore[call-overload]
            size0, cpu0 = irmd.log.stat().st_size, cpu_seconds(irmd.pid)
            for _ in range(3):  # root's irm, while uid 65534 knocks again and again
                irmd.irm_ok("ipcp", "list")
            time.sleep(2.0)
            grown = irmd.log.stat().st_size - size0
            assert grown < 16_000, f"the log grew {grown} bytes in {2:.0f} s and three irm calls"
            admins = []
            try:  # root takes the whole reserve too: now nobody can be accepted, and the IRMd waits
                for _ in range(8):
                    admins.append(IrmClient(irmd.sock))
                stuck = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                stuck.connect(str(irmd.sock))  # in the backlog, not accepted
                cpu0 = cpu_seconds(irmd.pid)
                time.sleep(2.0)
                busy = (cpu_seconds(irmd.pid) - cpu0) / 2.0
                assert busy < 0.25, f"the IRMd used {busy:.0%} of a CPU waiting for a descriptor"
                stuck.close()
            finally:
                for c in admins:
                    c.close()
            wait_for(lambda: irmd.irm("ipcp", "list").returncode == 0, 20, "root's irm to be served again")
        wait_for(lambda: nobody_irm(irmd, "ipcp", "list").returncode == 0, 20, "users to be served again")
        assert "accept failed" in irmd.log_text() or "out of descriptors" in irmd.log_text()


LINGERING = """
import socket, struct, sys, time
sys.path.insert(0, sys.argv[2])
from helpers import lingering_socket
from transports.unix import send_frame, recv_frame, irmd_sock_path
from proto import messages as m

keep, refused = [], 0
for i in range(5):
    c, peer = lingering_socket(60)
    keep.append(peer)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(irmd_sock_path()))
    keep.append(s)
    send_frame(s, m.CODEC.encode(m.FlowInfo(flow_id=1), 6))
    recv_frame(s)  # answered: accepted, so the irmd has had its say on what this connection may pass
    try:
        send_frame(s, m.CODEC.encode(m.FlowInfo(flow_id=1), 7), [c.fileno()])
    except PermissionError:
        refused += 1
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # ours to close, at once
    c.close()  # else the irmd would hold the last reference
print("refused", refused, flush=True)
time.sleep(float(sys.argv[1]))
"""


def test_a_users_passed_socket_cannot_stall_the_irmd_and_root_is_served(host: IrmdProc, public_dir: Path) -> None:
    """uid 65534 passes the irmd sockets whose close would wait 60 s for a peer that never reads:
    its connections refuse descriptors (the kernel says EPERM), and one that arrives anyway is
    reset, not waited on. Root's requests are answered at once all along."""
    log = public_dir / "lingering.log"
    tests = str(Path(__file__).parent)
    with server([*AS_NOBODY, str(BIN / "python"), "-c", LINGERING, "20", tests], host.env, log, "refused"):
        if SO_PASSRIGHTS_WORKS:
            assert "refused 5" in log.read_text()
        for _ in range(3):
            started = time.monotonic()
            host.irm_ok("ipcp", "list")
            assert time.monotonic() - started < 5
            time.sleep(0.5)


@pytest.mark.skipif(
    not SO_PASSRIGHTS_WORKS, reason="this kernel has no SO_PASSRIGHTS (Linux 6.16): sockets cannot refuse descriptors"
)
def test_a_flows_peer_cannot_pass_descriptors_over_the_flow(host: IrmdProc) -> None:
    """A flow's socket refuses SCM_RIGHTS at both ends: what a peer passes would be closed by the
    reader's recv, and a lingering socket's close would stall a server's one thread."""
    echo_service(host, "fd-echo")
    irm = IrmClient(host.sock)
    try:
        with (
            server([str(BIN / "oping"), "-l"], host.env, host.log.parent / "srv.log", "started"),
            flow_alloc("fd-echo", timeout=10, irm=irm) as flow,
            open(os.devnull, "rb") as passed,
        ):
            sock = socket.socket(fileno=os.dup(flow.fd))
            with sock, pytest.raises(PermissionError):
                sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed.fileno()]))])
            flow.write(b"still a flow")
    finally:
        irm.close()


@pytest.mark.skipif(
    not SO_PASSRIGHTS_WORKS, reason="this kernel has no SO_PASSRIGHTS (Linux 6.16): sockets cannot refuse descriptors"
)
def test_the_pair_the_irmd_makes_for_a_local_flow_refuses_descriptors_at_both_ends() -> None:
    """Direct IPC's pair is made as bare descriptors (seqpacket_fds): both ends still refuse
    SCM_RIGHTS, and carry SDUs."""
    a, b = seqpacket_fds()
    with socket.socket(fileno=a) as sa, socket.socket(fileno=b) as sb, open(os.devnull, "rb") as passed:
        for end in (sa, sb):
            with pytest.raises(PermissionError):
                end.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [passed.fileno()]))])
        sa.send(b"sdu")
        assert sb.recv(16) == b"sdu"
        assert sa.type == socket.SOCK_SEQPACKET and sa.family == socket.AF_UNIX


FLOODER = """
import msgspec, socket, struct, sys
from transports.unix import irmd_sock_path, recv_frame
from transports.wire import HEADER, MAGIC
from proto import messages as m

s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(str(irmd_sock_path()))
answers = []
for i in range(1, 101):  # a known type, with an unknown field named by 30,000 characters
    body = msgspec.msgpack.encode({"flow_id": 1, "x" * 30000: 1})
    s.send(HEADER.pack(MAGIC, m.CODEC.version, m.FlowInfo.TYPE, i, len(body)) + body)
    answers.append(len(recv_frame(s)[0]))
big = m.CODEC.encode(m.FlowAlloc("\\x01" * 16000, None, 1.0), 99)  # a name its refusal would quote whole
s.send(big)
reply = m.CODEC.decode(recv_frame(s)[0]).msg
print("answers", len(answers), max(answers), type(reply).__name__, len(reply.text), flush=True)
"""


def test_a_user_cannot_flood_the_irmds_log_or_make_it_answer_more_than_it_was_sent(host: IrmdProc) -> None:
    """Malformed messages are answered each time and logged for the first few of a connection;
    errors quote what a client sent only in part, so an answer is never bigger than a few hundred
    bytes and a refusal of a 16,000-character name still comes."""
    before = host.log.stat().st_size
    r = nobody_py(host, FLOODER, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    _, count, longest, kind, text = r.stdout.split()
    assert (count, kind) == ("100", "Error") and int(longest) < 1000 and int(text) <= 500
    assert host.log.stat().st_size - before < 4_000  # 3 lines of 100 malformed messages, not 100
    host.irm_ok("ipcp", "list")


RECONNECT_FLOODER = """
import socket, sys, time
end, n = time.monotonic() + 2, 0
while time.monotonic() < end:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(sys.argv[1])
        for _ in range(3):
            s.send(bytes(20))  # malformed: logged for the first 3 of a connection
        s.send(bytes(70000))  # past a frame: the connection is dropped, saying why
        s.settimeout(1)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    n += 1
print(n)
"""


@pytest.mark.timeout(60)
def test_a_user_connecting_again_and_again_with_bad_frames_cannot_flood_the_irmds_log(host: IrmdProc) -> None:
    """What a connection logs of its peer's bad frames is bounded per connection; a peer that connects
    again for each is bounded by one rate for all: ~1,200 connections in 2 s wrote 470 kB before."""
    before = host.log.stat().st_size
    r = nobody_py(host, RECONNECT_FLOODER, str(host.sock), timeout=30)
    assert r.returncode == 0 and int(r.stdout) > 100, r.stdout + r.stderr
    time.sleep(0.2)
    grew = host.log.stat().st_size - before
    assert grew < 16_000, f"{int(r.stdout)} connections wrote {grew} bytes to the log"
    host.irm_ok("ipcp", "list")  # root is served


ALLOC_SVC = """
from flowlib import flow_alloc
try:
    flow_alloc("svc", timeout=3)
except Exception:
    pass
"""


def test_a_program_started_as_root_is_one_no_other_user_could_have_written(host: IrmdProc, public_dir: Path) -> None:
    """`bind program ... auto` has the IRMd start the program as the binding's owner (root) at a
    flow: a program file another user may write (theirs, or writable by others, or reached through
    a directory they may write) would run their code as root. Refused at the bind, and checked
    again at each start; a program only root could have written starts."""
    ran = public_dir / "ran"
    script = f"#!/bin/sh\nid -u >> {ran}\n"
    theirs = public_dir / "theirs"
    theirs.write_text(script)
    theirs.chmod(0o755)
    os.chown(theirs, NOBODY, NOBODY)
    r = host.irm("bind", "program", str(theirs), "name", "svc", "auto")
    assert r.returncode != 0 and f"{theirs} belongs to uid {NOBODY}" in r.stderr, r.stderr
    ours = public_dir / "ours"
    ours.write_text(script)
    ours.chmod(0o755)
    host.irm_ok("bind", "program", str(ours), "name", "svc", "auto")
    host.irm_ok("name", "register", "svc", "layer", "local")
    _refused_at_start_while_open(host, ours, 0o757, f"{ours} is writable by others", ran)  # the user rewrites it


ALLOC_SVC_AGAIN_AND_AGAIN = """
import sys, time
from flowlib import flow_alloc
from proto.errors import FlowError
end = time.monotonic() + float(sys.argv[1])
asked = 0
while time.monotonic() < end:  # each allocation waits for its server a moment only
    asked += 1
    try:
        flow_alloc("svc", timeout=0.05).close()
    except FlowError:
        pass
print("asked", asked, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_program_that_fails_is_not_started_again_for_every_flow_anyone_asks_for(
    host: IrmdProc, public_dir: Path
) -> None:
    """A program bound `auto` that fails at its start (here it exits 1 until an admin fixes it) was
    started again at every arrival: uid 65534 asking in a loop had root's program started ~20 times a
    second, two lines of the IRMd's log each. After a failure the program is held back (1 s, doubling
    to 60 s); the flows waiting when the time is up start it, and once it works it serves them."""
    starts, fixed = public_dir / "starts", public_dir / "fixed"
    prog = public_dir / "svc"
    prog.write_text(f"#!/bin/sh\necho started >> {starts}\n[ -e {fixed} ] && exec {BIN / 'oping'} -l\nexit 1\n")
    prog.chmod(0o755)
    host.irm_ok("bind", "program", str(prog), "name", "svc", "auto")
    host.irm_ok("name", "register", "svc", "layer", "local")
    before = host.log.stat().st_size
    r = nobody_py(host, ALLOC_SVC_AGAIN_AND_AGAIN, "4")
    assert r.returncode == 0 and r.stdout.startswith("asked"), r.stderr
    asked = int(r.stdout.split()[1])
    time.sleep(0.5)
    started = starts.read_text().count("started") if starts.exists() else 0
    assert asked >= 20, f"uid 65534 asked only {asked} times"
    assert 1 <= started <= 5, f"the failing program was started {started} times for {asked} allocations"
    logged = host.log.read_text(errors="replace")[before:]
    assert logged.count("exited with status 1") == started and "not started again for" in logged
    fixed.touch()  # the admin's fix: started at the next flow once its time is up, it serves it
    client = IrmClient(host.sock)
    try:
        flow = wait_for(lambda: _alloc_or_none(client, "svc"), 60, "the fixed program to serve a flow")
        flow.close()
    finally:
        client.close()


def _alloc_or_none(client: IrmClient, name: str) -> Flow | None:
    try:
        return Flow(*client.alloc(name, None, 10), client)
    except FlowError:
        return None


@pytest.mark.timeout(60)
def test_a_program_started_as_root_runs_no_interpreter_another_user_could_have_written(
    host: IrmdProc, public_dir: Path
) -> None:
    """A script's `#!` line names what the kernel runs first: the interpreter (itself maybe a script
    with an interpreter of its own, or a program `#!/usr/bin/env` finds). Root's own script behind an
    interpreter another user may write ran that user's code as root at the next flow. Refused at the
    bind and at each start, as for the program itself; a root-only interpreter, and one env finds in
    the safe PATH, start."""
    ran, pwned = public_dir / "ran", public_dir / "pwned"
    theirs = public_dir / "interp"  # uid 65534's, forwarding to /bin/sh after its own work
    theirs.write_text(f'#!/bin/sh\nid -u >> {pwned}\nexec /bin/sh "$@"\n')
    theirs.chmod(0o755)
    os.chown(theirs, NOBODY, NOBODY)
    ours = public_dir / "ours"  # root's, 0755: only its interpreter is another user's
    ours.write_text(f"#!{theirs}\nid -u >> {ran}\n")
    ours.chmod(0o755)
    r = host.irm("bind", "program", str(ours), "name", "svc", "auto")
    assert r.returncode != 0 and f"{theirs} belongs to uid {NOBODY}" in r.stderr, r.stderr
    nested = public_dir / "nested"  # root's script whose interpreter is root's script run by theirs
    nested.write_text(f"#!{ours}\n")
    nested.chmod(0o755)
    r = host.irm("bind", "program", str(nested), "name", "svc", "auto")
    assert r.returncode != 0 and f"{theirs} belongs to uid {NOBODY}" in r.stderr, r.stderr
    os.chown(theirs, 0, 0)  # root's now: the bind is taken
    host.irm_ok("bind", "program", str(ours), "name", "svc", "auto")
    host.irm_ok("name", "register", "svc", "layer", "local")
    os.chown(theirs, NOBODY, NOBODY)  # given to the user after the bind: checked again at the start
    nobody_py(host, ALLOC_SVC)
    wait_for(lambda: "will not start" in host.log.read_text(), 10, "the refusal to start it")
    assert f"{theirs} belongs to uid {NOBODY}" in host.log.read_text()
    assert not ran.exists() and not pwned.exists()
    host.irm_ok("unbind", "program", str(ours))
    env_sh = public_dir / "env-sh"  # found by env in the IRMd's safe PATH: root's /bin/sh
    env_sh.write_text(f"#!/usr/bin/env sh\nid -u >> {ran}\n")
    env_sh.chmod(0o755)
    host.irm_ok("bind", "program", str(env_sh), "name", "svc", "auto")
    nobody_py(host, ALLOC_SVC)
    wait_for(ran.exists, 10, "the program to run")
    assert ran.read_text().split() == ["0"] and not pwned.exists()


@pytest.mark.timeout(60)
def test_a_program_started_as_root_is_reached_through_no_link_another_user_could_turn(
    host: IrmdProc, public_dir: Path
) -> None:
    """The program's path was checked as written and as its links finally lead, not through the links
    on the way: root's link to uid 65534's link to root's program passed, as did that user's own link
    in a sticky directory, and the user turned its link to a script of its own between the check at a
    start and the exec (won within seconds, a flow asked for at a time). Every directory and link the
    path leads through must now be root's (or, in a sticky directory, the entry root's); a program
    behind root's own links starts."""
    ran = public_dir / "ran"
    real = public_dir / "real"
    real.mkdir(mode=0o755)
    (real / "svc").write_text(f"#!/bin/sh\nid -u >> {ran}\n")
    (real / "svc").chmod(0o755)
    theirs = public_dir / "theirs"  # uid 65534's directory, holding its link to root's program
    theirs.mkdir(mode=0o755)
    os.symlink(real / "svc", theirs / "link")
    os.lchown(theirs / "link", NOBODY, NOBODY)
    os.chown(theirs, NOBODY, NOBODY)
    bindir = public_dir / "bin"
    bindir.mkdir(mode=0o755)
    os.symlink(theirs / "link", bindir / "through-theirs")
    r = host.irm("bind", "program", str(bindir / "through-theirs"), "name", "svc", "auto")
    assert r.returncode != 0 and f"directory {theirs} belongs to uid {NOBODY}" in r.stderr, r.stderr
    sticky = public_dir / "sticky"  # as /tmp: the user's own link in it is the user's to turn
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.symlink(real / "svc", sticky / "link")
    os.lchown(sticky / "link", NOBODY, NOBODY)
    r = host.irm("bind", "program", str(sticky / "link"), "name", "svc", "auto")
    assert r.returncode != 0 and f"{sticky / 'link'} belongs to uid {NOBODY}" in r.stderr, r.stderr
    os.symlink("../real/svc", bindir / "svc")  # root's own links, relative and through a sticky directory
    os.symlink(bindir / "svc", sticky / "roots")
    host.irm_ok("bind", "program", str(sticky / "roots"), "name", "svc", "auto")
    host.irm_ok("name", "register", "svc", "layer", "local")
    nobody_py(host, ALLOC_SVC)
    wait_for(ran.exists, 10, "the program to run")
    assert ran.read_text().split() == ["0"]


WRITE_UID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    FILE *f = argc > 1 ? fopen(argv[1], "a") : NULL;
    return f && fprintf(f, "%d\n", (int)getuid()) > 0 && fclose(f) == 0 ? 0 : 1;
}
"""


@pytest.mark.timeout(60)
def test_a_program_started_as_root_loads_no_library_from_where_another_user_could_write(
    host: IrmdProc, public_dir: Path
) -> None:
    """Root's own ELF program whose RUNPATH names a directory another user may write (theirs, or one
    they may make) has the loader run that user's library as root at the next flow: the program and
    its interpreters' were checked, not what the loader takes for them. Refused at the bind and at
    each start; the same program with a RUNPATH only root may write starts."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc or gcc) to build a program with a RUNPATH")
    ran = public_dir / "ran"
    source = public_dir / "svc.c"
    source.write_text(WRITE_UID_C)
    theirs = public_dir / "theirs"  # uid 65534's: a libc.so.6 of its own there runs as root
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    ours = public_dir / "lib"
    ours.mkdir(mode=0o755)
    for name, runpath in (("untrusted", theirs), ("later", theirs / "lib"), ("trusted", ours)):
        out = public_dir / name
        subprocess.run([cc, "-o", str(out), str(source), f"-Wl,-rpath,{runpath}", "-Wl,--enable-new-dtags"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        out.chmod(0o755)
    for name in ("untrusted", "later"):
        r = host.irm("bind", "program", str(public_dir / name), "name", "svc", "auto", "--", str(ran))
        assert r.returncode != 0 and f"directory {theirs} belongs to uid {NOBODY}" in r.stderr, r.stderr
        assert f"a RUNPATH directory of {public_dir / name}" in r.stderr, r.stderr
    host.irm_ok("bind", "program", str(public_dir / "trusted"), "name", "svc", "auto", "--", str(ran))
    host.irm_ok("name", "register", "svc", "layer", "local")
    _refused_at_start_while_open(host, ours, 0o777, f"directory {ours} is writable by others", ran)


def _refused_at_start_while_open(host: IrmdProc, path: Path, mode: int, why: str, ran: Path) -> None:
    """`path` (a bound program's part) opened to others with `mode` after the bind: a user's flow to
    the name does not start it (`why` logged); back as root left it, the next flow starts it as root."""
    path.chmod(mode)
    r = nobody_py(host, ALLOC_SVC)  # a user asks for the name
    assert r.returncode == 0, r.stderr
    wait_for(lambda: "will not start" in host.log.read_text(), 10, "the refusal to start it")
    assert why in host.log.read_text() and not ran.exists()
    path.chmod(0o755)
    nobody_py(host, ALLOC_SVC)
    wait_for(ran.exists, 10, "the program to run")
    assert ran.read_text().split() == ["0"]


CONNECT_THEN_LEAVE = """
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sys.argv[1])  # queued: the IRMd is busy, and reads this pid's /proc only when it accepts
child = os.fork()
if child == 0:
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    from flowlib.irm import IrmClient
    try:
        reply, fd = IrmClient(sock=s).accept(6)
        print("took flow", reply.flow_id, flush=True)
    except Exception as e:
        print("took none:", e, flush=True)
    os._exit(0)
print(os.getpid(), child, flush=True)  # gone: the connection lives on in the child
"""
SERVE_SVC = """
from flowlib.flow import Flow
from flowlib.irm import IrmClient
client = IrmClient()
print("up", flush=True)
held = []
while True:
    reply, fd = client.accept(30)
    held.append(Flow(reply, fd, client))
    print("accepted", flush=True)
"""


@pytest.mark.timeout(90)
def test_a_connection_queued_before_its_process_left_takes_no_flows_of_the_process_that_got_its_pid(
    host: IrmdProc, public_dir: Path
) -> None:
    """uid 65534 connects while the IRMd is busy and exits, a child keeping the connection; root's
    server started next gets its pid and is bound by pid. The IRMd, reading /proc for the queued
    connection only then, must not take it for root's server: root's flows all reach root's server."""
    go, srv_log = public_dir / "go", public_dir / "svc.log"
    attacker = srv = None
    keeper = 0
    os.kill(host.pid, signal.SIGSTOP)  # a busy IRMd: connections wait in its backlog
    try:
        attacker = subprocess.Popen(
            [*AS_NOBODY, str(BIN / "python"), "-c", CONNECT_THEN_LEAVE, str(host.sock), str(go)],
            env=as_nobody_env(host.env), stdout=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip
        assert attacker.stdout is not None
        pid, keeper = (int(n) for n in attacker.stdout.readline().split())
        assert attacker.wait(10) == 0  # reaped: its pid is free
        for _ in range(50):  # others on the machine may take the pid first: try again
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
            with open(srv_log, "wb") as out:
                srv = subprocess.Popen([str(BIN / "python"), "-c", SERVE_SVC], env=host.env, cwd="/",
                                       stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
            if srv.pid == pid:
                break
            srv.kill()
            srv.wait()
        assert srv is not None and srv.pid == pid, "no process got the pid again"
        wait_for(lambda: "python" in os.readlink(f"/proc/{pid}/exe"), 10, "root's server to run")
    finally:
        os.kill(host.pid, signal.SIGCONT)
    try:
        wait_for(lambda: "up" in srv_log.read_text() or srv.poll() is not None, 15, "root's server to connect")
        host.irm_ok("bind", "process", str(pid), "name", "svc")
        host.irm_ok("name", "register", "svc", "layer", "local")
        go.touch()  # uid 65534's connection asks for flows, before root's server is served any
        time.sleep(0.5)
        client = IrmClient(host.sock)
        try:
            flows = [flow_alloc("svc", timeout=10, irm=client) for _ in range(2)]
            with contextlib.suppress(AssertionError):  # root's flows reach root's server
                wait_for(lambda: srv_log.read_text().count("accepted") == 2, 10, "root's server to accept")
            for f in flows:
                f.close()
        finally:
            client.close()
        took = attacker.stdout.readline()
        assert took.startswith("took none"), f"uid 65534 {took!r} of root's server"
        assert srv_log.read_text().count("accepted") == 2, srv_log.read_text()
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        if attacker is not None:
            attacker.kill()
            attacker.wait()
            assert attacker.stdout is not None
            attacker.stdout.close()
        if keeper:
            with contextlib.suppress(ProcessLookupError):
                os.kill(keeper, signal.SIGKILL)
