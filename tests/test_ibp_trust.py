"""Each trust property of a depot, attacked by uid 65534 (setpriv) while root uses the depot:
private files, a leaked journal, copies to arbitrary addresses, what a copy target sends back,
per-client connection slots, clamped timeouts and durations.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import udp_lan
from helpers import BIN, WHO_ACCEPTS, free_port, serve_tcp, terminate, wait_for
from test_ibp_hostile import AS_NOBODY, LEGIT_WAIT, LIMITS, PRELUDE, Depot, open_dir, run_depot  # noqa: F401 - fixture

from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import Connection
from apps.ibp.exnode import ExNode, to_xml
from apps.ibp.limits import IDLE_GRACE
from flowlib.irm import IrmClient
from proto.errors import FlowError

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacker runs as uid 65534 through setpriv: needs root")


@pytest.fixture
def depot(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:  # noqa: F811
    yield from run_depot(open_dir, monkeypatch)


READ_FILES = r"""
import os, sys
d = sys.argv[4]
for path in [d, d + '/journal.log', d + '/admin.key', d + '/data', d + '/settings.json']:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, 'rb').read()
        print(path, 'READ')
    except OSError as e:
        print(path, type(e).__name__)
"""


def test_depot_files_are_the_depots_alone(depot: Depot) -> None:
    with Connection(depot.name, timeout=5) as c:
        r, wcap, _ = c.allocate(100, 60)
        c.store(wcap, [b"private"], 7)
    r_ = depot.attack(READ_FILES, str(depot.dir))
    assert "READ" not in r_.stdout and r_.stdout.count("PermissionError") >= 1, r_.stdout + r_.stderr
    assert stat.S_IMODE(depot.dir.stat().st_mode) == 0o700
    for p in depot.dir.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p
    with Connection(depot.name, timeout=5) as c:
        assert c.load_bytes(r) == b"private"


LEAKED = (
    PRELUDE
    + r"""
hashes = sys.argv[4].split(',')
s = conn()
answers = set()
for key in hashes:
    for typekey in hashes:
        s.sendall(('1 8 0#%s %s 0 0 5\n' % (key, typekey)).encode())
        answers.add(first_line(s).split(' ')[0])
print(' '.join(sorted(answers)))
"""
)


def test_a_leaked_journal_yields_no_capability(depot: Depot) -> None:
    """Everything 64-hex-long in the journal, tried as key and right key by uid 65534: nothing opens,
    while the real capability still does."""
    with Connection(depot.addr, timeout=5) as c:
        r, wcap, _ = c.allocate(100, 60)
        c.store(wcap, [b"secret"], 6)
    journal = (depot.dir / "journal.log").read_text()
    leaked = sorted(set(re.findall(r"[0-9a-f]{64}", journal)))
    assert len(leaked) >= 4 and r.key not in leaked and r.typekey not in leaked
    out = depot.attack(LEAKED, ",".join(leaked))
    assert out.stdout.split() and all(int(s) < 0 for s in out.stdout.split()), out.stdout + out.stderr
    with Connection(depot.addr, timeout=5) as c:
        assert c.load_bytes(r) == b"secret"


class FakeTarget:
    """A TCP service root runs: it records who connects and what each sent first, and answers with
    `reply` (a secret inside), or (None) never answers and keeps the connection."""

    def __init__(self, reply: bytes | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", free_port(["127.0.0.1"])))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.connections = 0
        self.received: list[bytes] = []
        self.held: list[socket.socket] = []
        serve_tcp(self.sock, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        self.connections += 1
        conn.settimeout(2 if self.reply is not None else 10)
        try:
            self.received.append(conn.recv(4096))
            if self.reply is not None:
                conn.sendall(self.reply)
                time.sleep(0.2)
        except OSError:
            pass
        if self.reply is None:
            self.held.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.held:
            c.close()


STORED = (
    PRELUDE
    + r"""
s = conn()
s.sendall(b'1 1 0 1 1 60 100 5\n')
caps = first_line(s).split()[1:]
key, rkey, wkey = caps[0].split('/')[3], caps[0].split('/')[4], caps[1].split('/')[4]
s.sendall(('1 2 %s %s 5 5\n' % (key, wkey)).encode() + b'hello')
first_line(s); first_line(s)
def send_line(target):
    return ('1 5 %s ibp://%s/0#%s/%s/WRITE %s 0 5 3 3 3\n' % (key, target, 'k' * 64, 'k' * 64, rkey)).encode()
"""
)  # uid 65534's allocation with b'hello' in it, and send_line(target): a SEND of it

COPY = (
    STORED
    + r"""
for t in sys.argv[4].split(','):
    s.sendall(send_line(t))
    print(t, '->', first_line(s))
"""
)


def test_copies_reach_only_allowed_depots_and_never_echo_a_target(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = FakeTarget(b"SSH-2.0-OpenSSH SECRET-BANNER\r\n")  # a service no copy may reach
    refusing = FakeTarget(b"-19 SECRET-WORDS from the target\n")  # a listed depot that refuses
    garbage = FakeTarget(b"HTTP/1.1 200 OK SECRET-PAGE\r\n\r\n")  # a listed address that is no depot
    try:
        allow = [f"--copy-to=127.0.0.1:{refusing.port}", f"--copy-to=127.0.0.1:{garbage.port}", "--copy-to=depot*"]
        for depot in run_depot(open_dir, monkeypatch, *allow):
            out = depot.attack(COPY, ",".join(f"127.0.0.1:{t.port}" for t in (secret, refusing, garbage)))
            replies = [ln.split("->", 1)[1].strip() for ln in out.stdout.splitlines()]
            assert len(replies) == 3, out.stdout + out.stderr
            assert replies[0].startswith(f"{w.IBP_E_INVALID_HOST} ") and secret.connections == 0
            assert replies[1].split()[0] == str(w.IBP_E_WOULD_EXCEED_LIMIT) and refusing.connections == 1
            assert int(replies[2].split()[0]) < 0 and garbage.connections == 1
            assert not any("SECRET" in r for r in replies), replies
            assert "SECRET" not in depot.log.read_text()
            # Root copies depot to depot by name, as allowed.
            with Connection(depot.name, timeout=5) as c:
                r, wcap, _ = c.allocate(10, 60)
                c.store(wcap, [b"0123456789"], 10)
                r2, w2, _ = c.allocate(10, 60)
                assert c.copy(r, w2) == 10 and c.load_bytes(r2) == b"0123456789"
    finally:
        for t in (secret, refusing, garbage):
            t.close()


COPIES = (
    STORED
    + r"""
import threading
out = []
def copy():
    c = conn()
    c.sendall(send_line(sys.argv[4]))
    out.append(first_line(c).split(' ')[0])
threads = [threading.Thread(target=copy) for _ in range(int(sys.argv[5]))]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(' '.join(sorted(out)))
"""
)


def test_copies_are_few_per_client_and_only_to_what_answers_as_a_depot(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flows a copy opens are the depot's own: a client has at most --client-copies of them at
    once (more are refused with -66), and a target that does not answer ST_VERSION as a depot is left
    before any byte of the copy is sent. Root's copies, another client's, go on meanwhile."""
    silent = FakeTarget(None)
    try:
        for depot in run_depot(
            open_dir, monkeypatch, f"--copy-to=127.0.0.1:{silent.port}", "--copy-to=depot*", "--client-copies", "2"
        ):
            p = depot.attack_bg(COPIES, f"127.0.0.1:{silent.port}", "3")
            try:
                wait_for(lambda: len(silent.received) >= 2, 15, "the copies to reach the target")
                with Connection(depot.name, timeout=LEGIT_WAIT) as c:  # root, while they hang
                    r, wcap, _ = c.allocate(10, 60)
                    c.store(wcap, [b"0123456789"], 10)
                    r2, w2, _ = c.allocate(10, 60)
                    assert c.copy(r, w2) == 10 and c.load_bytes(r2) == b"0123456789"
                out, err = p.communicate(timeout=30)
            finally:
                p.kill()
                p.wait()
            statuses = out.split()
            assert sorted(statuses) == sorted(
                [str(w.IBP_E_OUT_OF_SOCKETS), str(w.IBP_E_CLIENT_TIMEOUT), str(w.IBP_E_CLIENT_TIMEOUT)]
            ), out + err
            assert len(silent.received) == 2, silent.received
            for got in silent.received:  # a version question, never the copy itself
                assert got.split()[:2] == [b"1", str(w.IBP_STATUS).encode()] and b"hello" not in got, got
    finally:
        silent.close()


def test_copies_are_made_with_the_clients_identity(depot: Depot) -> None:
    """A root depot allocates a copy's flow as the client: the target sees uid 65534 for uid 65534's
    copy (and counts it there), root for root's; neither is the depot's identity lent."""
    env = {**depot.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    probe = subprocess.Popen([sys.executable, "-c", WHO_ACCEPTS, "probe"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
        out = depot.attack(COPY, "probe")
        assert out.stdout.split("->")[-1].strip().startswith("-"), out.stdout + out.stderr  # no depot: failed
        assert json.loads(probe.stdout.readline())[0] == NOBODY  # who the IRMd says allocated it
        target = Capability.parse(f"ibp://probe/0#{'k' * 64}/{'k' * 64}/WRITE")
        with Connection(depot.name, timeout=LEGIT_WAIT) as c:
            r, wcap, _ = c.allocate(10, 60)
            c.store(wcap, [b"0123456789"], 10)
            with pytest.raises(w.IbpError):
                c.copy(r, target)
        assert json.loads(probe.stdout.readline())[0] == 0
    finally:
        probe.kill()
        probe.wait()


HOLD = (
    PRELUDE
    + r"""
from flowlib.irm import IrmClient
from flowlib import flow_alloc, qos
socks = [conn() for _ in range(4)]
for s in socks:
    s.sendall(b'1 4 0 1 IBPch@ngem3 5\n')
    first_line(s)
flow = flow_alloc(name, qos=qos.data, timeout=5)
flow.write(b'1 4 0 1 IBPch@ngem3 5\n')
flow.fccntl(__import__('flowlib').Fccntl.SRCVTIMEO, 5)
print('flow', flow.read().split(b' ')[0].decode(), flush=True)
time.sleep(float(sys.argv[4]))
"""
)


def test_connection_slots_count_a_clients_flows_and_tcp_together(depot: Depot) -> None:
    """uid 65534 holds its four slots over TCP; its flow is turned away with -66; root is served."""
    p = depot.attack_bg(HOLD, "3")
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.split() == ["flow", str(w.IBP_E_OUT_OF_SOCKETS)], line + (p.stderr.read() if p.stderr else "")
        assert depot.served() < LEGIT_WAIT
    finally:
        p.kill()
        p.wait()


HOLD_FLOWS = (
    PRELUDE
    + r"""
from apps.ibp.client import Connection
from apps.ibp.exnode import ExNode, to_xml
held = []
for i in range(int(sys.argv[4])):
    c = Connection(name, timeout=20)
    c.status()
    held.append(c)
print('holding', len(held), flush=True)
time.sleep(60)
"""
)


def test_one_user_cannot_hold_a_shared_layers_slots(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through a layer that names no local peer, every client is one identity: uid 65534 fills its
    slots with idle connections, and root's new connection still gets in (an idle one gives way)."""
    for depot in run_depot(open_dir, monkeypatch, shared_layer=True):
        limit = int(LIMITS[LIMITS.index("--client-connections") + 1])
        p = depot.attack_bg(HOLD_FLOWS, str(limit))
        try:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.split() == ["holding", str(limit)], line + (p.stderr.read() if p.stderr else "")
            time.sleep(IDLE_GRACE)  # the attacker's connections are now idle, not between two requests
            assert depot.served() < LEGIT_WAIT  # by TCP (root's own uid) and by flow (the shared layer)
        finally:
            p.kill()
            p.wait()


FILL_QUOTA = r"""
import sys
from pathlib import Path
from apps.ibp import wire as w
from apps.ibp.client import Connection
from flowlib.irm import IrmClient
with Connection('depot1', timeout=10, irm=IrmClient(Path(sys.argv[1]))) as c:
    for _ in range(int(sys.argv[2])):
        c.allocate(64, 600)
    try:
        c.allocate(64, 600)
        print('one more allocated')
    except w.IbpError as e:
        print('refused', e.status)
"""


def test_one_remote_host_fills_its_own_quota_not_every_remote_clients_of_its_layer(open_dir: Path) -> None:  # noqa: F811
    """Remote flow clients were one client per layer (no remote identity reached the depot): uid 65534
    on one host of a udp layer took the allocations every remote client of that layer was allowed
    (3 here), and root on another host got -45. The IRMd now hands the depot the host the layer
    vouches for (`FlowPeer`), and the quotas are each host's."""
    with udp_lan.lan(open_dir) as make:
        a = make(udp_lan.A_IP)
        b = make(udp_lan.B_IP, peer=udp_lan.A_IP)
        c = make(udp_lan.C_IP, peer=udp_lan.A_IP)
        depot_dir, log = open_dir / "depot1", open_dir / "depot.log"
        argv = [str(BIN / "ibp"), "depot", "--name", "depot1", "--dir", str(depot_dir), "--layer", "lan",
                "--client-allocations", "3"]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=a.irmd.env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
        try:
            a.irmd.note_children()
            root_at_c = c.client()
            wait_for(lambda: _allocates(root_at_c), 20, "the depot to serve root at C")  # one of C's 3
            r = subprocess.run(
                [*AS_NOBODY, sys.executable, "-c", FILL_QUOTA, str(b.irmd.sock), "3"],
                env={**b.irmd.env, "HOME": "/nonexistent"}, capture_output=True, text=True, timeout=60, cwd="/",
            )  # fmt: skip
            assert r.stdout.split() == ["refused", str(w.IBP_E_WOULD_EXCEED_POLICY)], r.stdout + r.stderr
            with Connection("depot1", timeout=10, irm=root_at_c) as conn:
                conn.allocate(64, 600)  # root at C: its own host's quota, the two left
                conn.allocate(64, 600)
                with pytest.raises(w.IbpError) as refused:
                    conn.allocate(64, 600)
                assert refused.value.status == w.IBP_E_WOULD_EXCEED_POLICY
        finally:
            terminate(proc)


def _allocates(irm: IrmClient) -> bool:
    try:
        with Connection("depot1", timeout=5, irm=irm) as conn:
            conn.allocate(64, 600)
    except (w.IbpError, FlowError, OSError):
        return False
    return True


STALL = (
    PRELUDE
    + r"""
s = conn()
s.sendall(b'1 1 0 1 1 -1 1000 999999\n')
caps = first_line(s).split()[1:]
key, wkey, mkey = caps[0].split('/')[3], caps[1].split('/')[4], caps[2].split('/')[4]
s.sendall(('1 9 %s %s 40 3 999999\n' % (key, mkey)).encode())
print('probe', first_line(s))
s.sendall(b'1 1 0 1 1 999999999 1000 999999\n')
print('long', first_line(s).split()[0])
s.sendall(('1 2 %s %s 1000 999999\n' % (key, wkey)).encode() + b'x' * 10)
first_line(s)
t0 = time.monotonic()
s.settimeout(60)
print('closed after', s.recv(100), round(time.monotonic() - t0, 1))
"""
)


def test_client_timeouts_and_durations_are_clamped(depot: Depot) -> None:
    """A client asking for a 999999 s timeout and stalling its STORE is cut at the depot's
    --max-timeout (3 s here); -1 (forever) gets the longest duration allowed, more gets -28."""
    out = depot.attack(STALL)
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout + out.stderr
    probe = lines[0].split()
    assert probe[1] == "1" and 86390 <= int(probe[6]) <= 86400  # seconds left: the depot's maximum
    assert lines[1] == f"long {w.IBP_E_LONG_DURATION}"
    closed, took = lines[2].rsplit(" ", 1)
    assert closed.startswith(f"closed after b'{w.IBP_E_SERVER_TIMEOUT} ") and float(took) < 3 + 2
    assert depot.served() < LEGIT_WAIT


# ST_CHANGE's limits line (IBP sends them on a second line) was awaited for the request's own timeout,
# clamped to --max-timeout (300 s), before the admin key was looked at: anyone held a connection that
# long with one line. The key is checked first now, and the limits line is a request line like any.

HALF_CHANGE = (
    PRELUDE
    + r"""
socks, answers = [], []
for i in range(4):
    s = conn()
    s.sendall(b'1 4 0 2 %s 300\n' % sys.argv[4].encode())  # no limits line follows
    socks.append(s)
start = time.monotonic()
for s in socks:
    answers.append(first_line(s).split(' ')[0])
    answers.append(repr(s.recv(1)))  # closed: nothing more is read or answered
print(' '.join(answers), round(time.monotonic() - start, 1))
"""
)


@pytest.fixture
def patient_depot(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Depot]:  # noqa: F811
    """A depot that lets a client's timeout field be as long as 300 s (--request-timeout stays 2)."""
    yield from run_depot(open_dir, monkeypatch, "--max-timeout", "300")


@pytest.mark.timeout(60)
def test_an_st_change_without_the_admin_key_is_refused_before_its_limits_line(patient_depot: Depot) -> None:
    out = patient_depot.attack(HALF_CHANGE, "not-the-admin-key")
    answers, took = out.stdout.split()[:-1], float(out.stdout.split()[-1])
    assert answers == [str(w.IBP_E_WRONG_PASSWD), "b''"] * 4 and took < 5, out.stdout + out.stderr
    key = (patient_depot.dir / "admin.key").read_text().strip()
    with Connection(patient_depot.addr, timeout=5) as c:  # the admin's change is served
        c.change(key, 900 << 20, 7200)
        assert c.status()["capacity"] == str(900 << 20)
    assert patient_depot.served() < LEGIT_WAIT


@pytest.mark.timeout(60)
def test_st_changes_limits_line_is_awaited_no_longer_than_the_request_timeout(patient_depot: Depot) -> None:
    key = (patient_depot.dir / "admin.key").read_text().strip()
    with socket.create_connection(("127.0.0.1", patient_depot.port), timeout=30) as s:
        start = time.monotonic()
        s.sendall(f"1 4 0 2 {key} 300\n".encode())  # the key holder, its limits line late
        assert s.recv(100) == b""  # closed: --request-timeout (2 s), not the 300 s asked
        assert time.monotonic() - start < 15
    assert patient_depot.served() < LEGIT_WAIT


DIR_SWAP = (
    PRELUDE
    + r"""
from apps.ibp.client import Connection
from apps.ibp.exnode import ExNode, to_xml
parent, target = sys.argv[4], sys.argv[5]
os.rename(parent + '/depot', parent + '/moved')  # root's 0700 directory, in ours
os.mkdir(parent + '/depot')
os.symlink(target, parent + '/depot/data')  # where the depot makes its data files now
with Connection(sys.argv[2], timeout=5) as c:
    r, wcap, _ = c.allocate(100, 60)
    c.store(wcap, [b'planted by uid 65534'], 20)
print('stored')
"""
)


def test_a_depot_directory_another_user_could_move_is_refused(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A root depot whose --dir is in a directory uid 65534 owns: that user moves the depot's 0700
    directory aside and makes its own in its place, with `data` a link to any directory, and the
    depot creates its data files there, as root, with the bytes its clients store. It is refused at
    start, as sshd's StrictModes refuses a path others could change; a directory only root controls
    serves."""
    parent = open_dir / "u"
    parent.mkdir()
    os.chown(parent, NOBODY, NOBODY)
    target = open_dir / "roots-only"
    target.mkdir(mode=0o700)
    runs = run_depot(open_dir, monkeypatch, depot_dir=parent / "depot")
    try:
        depot = next(runs)
    except AssertionError:  # the depot ended at start
        log = (open_dir / "depot.log").read_text()
        assert f"belongs to uid {NOBODY}" in log and str(parent) in log, log
    else:
        try:
            out = depot.attack(DIR_SWAP, str(parent), str(target))
        finally:
            runs.close()
        planted = [p.read_bytes() for p in target.iterdir()]
        pytest.fail(f"the depot started in {parent}; uid 65534 then planted {planted} in {target}: {out.stdout}")
    assert not list(target.iterdir())
    os.chown(parent, 0, 0)  # the same place, once only root controls it
    shutil.rmtree(parent / "depot", ignore_errors=True)
    for depot in run_depot(open_dir, monkeypatch, depot_dir=parent / "depot"):
        with Connection(depot.addr, timeout=5) as c:
            r, wcap, _ = c.allocate(100, 60)
            c.store(wcap, [b"root's"], 6)
            assert c.load_bytes(r) == b"root's"


def _small_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))  # a tool that reads /dev/zero fails here, not the host


@pytest.mark.timeout(60)
def test_exnodes_another_user_names_cannot_hold_roots_tools(open_dir: Path) -> None:  # noqa: F811
    """Root runs an exNode tool on exNodes in a directory uid 65534 owns: a FIFO there held the tool for
    ever, and a link to /dev/zero took all its memory. Each is refused with a message naming it, and
    the tool goes on to the exNode beside them."""
    drop = open_dir / "drop"
    drop.mkdir()
    os.chown(drop, NOBODY, NOBODY)
    plant = "import os, sys; os.mkfifo(sys.argv[1] + '/fifo.xnd'); os.symlink('/dev/zero', sys.argv[1] + '/zero.xnd')"
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
                    plant, str(drop)], check=True, timeout=20)  # fmt: skip
    (open_dir / "real.xnd").write_bytes(to_xml(ExNode("real.bin", 0)))
    for planted in ("fifo.xnd", "zero.xnd"):
        try:
            r = subprocess.run(
                [str(BIN / "exnode"), "ls", str(drop / planted), str(open_dir / "real.xnd")],
                capture_output=True, text=True, timeout=15, preexec_fn=_small_memory,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail(f"exnode ls {planted} hung")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{drop / planted} is not a regular file" in r.stderr, r.stderr
        assert "real.bin" in r.stdout, r.stdout  # the exNode beside it is listed


@pytest.mark.timeout(60)
def test_an_xndrc_a_group_may_write_sends_no_upload_elsewhere(open_dir: Path) -> None:  # noqa: F811
    """Root's .xndrc, writable by a group uid 65534 is in (0664, group nogroup): that user names its
    own depot in it, and root's next upload went there, where it reads the file. Such a file is
    refused; one only root may write still names root's depots."""
    target = FakeTarget(b"")  # uid 65534's "depot": counts who connects
    home = open_dir / "home"
    home.mkdir()
    rc = open_dir / ".xndrc"
    rc.write_text("# root's depots\n")
    os.chown(rc, 0, NOBODY)
    os.chmod(rc, 0o664)
    edit = f"open({str(rc)!r}, 'a').write('DEPOT 127.0.0.1 {target.port}\\n')"
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
                    edit], check=True, timeout=20)  # fmt: skip
    (open_dir / "secret.bin").write_bytes(b"root's data")
    env = dict(os.environ, HOME=str(home))

    def upload() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "exnode"), "upload", "secret.bin", "-o", "secret.xnd", "--timeout", "3"],
            cwd=open_dir, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    try:
        r = upload()
        assert target.connections == 0, f"root's upload went to uid 65534's depot: {r.stderr}"
        assert r.returncode != 0 and f"writable by group {NOBODY}" in r.stderr, r.stderr
        os.chmod(rc, 0o644)  # the same file, root's alone: its depot is used
        upload()
        assert target.connections >= 1
    finally:
        target.close()


FIFO_SWAP = r"""
import os, sys, time
d, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
os.chdir(d)
while time.monotonic() < until:
    os.rename("file.bin", "reg")   # the file root checked ...
    os.rename("fifo", "file.bin")  # ... is a FIFO when it opens it
    os.rename("file.bin", "fifo")
    os.rename("reg", "file.bin")
"""


@pytest.mark.timeout(120)
def test_an_upload_of_a_file_swapped_for_a_fifo_is_refused_not_waited_on(open_dir: Path) -> None:  # noqa: F811
    """Root uploads a file in a directory uid 65534 owns, which swaps it for a FIFO between the tool's
    check and its open: the upload waited for ever on the FIFO. It is opened once, as a regular file
    only, and the file checked is the file read."""
    drop = open_dir / "drop"
    drop.mkdir()
    (drop / "file.bin").write_bytes(b"x" * 1000)
    os.mkfifo(drop / "fifo")
    for p in (drop, drop / "file.bin", drop / "fifo"):
        os.chown(p, NOBODY, NOBODY)
    swapper = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                sys.executable, "-c", FIFO_SWAP, str(drop), "60"])  # fmt: skip
    home = open_dir / "home"
    home.mkdir()
    try:
        for _ in range(20):
            try:
                r = subprocess.run(
                    [str(BIN / "exnode"), "upload", str(drop / "file.bin"), "--depots", "127.0.0.1:1", "-o",
                     str(open_dir / "out.xnd"), "--timeout", "2"],
                    env=dict(os.environ, HOME=str(home)), cwd=open_dir, capture_output=True, text=True, timeout=10,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                pytest.fail("the upload waited on the FIFO swapped in")
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    finally:
        swapper.kill()
        swapper.wait()
    for name in ("file.bin", "reg", "fifo"):  # the swap was stopped anywhere: a plain file again
        (drop / name).unlink(missing_ok=True)
    (drop / "file.bin").write_bytes(b"x" * 1000)
    r = subprocess.run(
        [str(BIN / "exnode"), "upload", str(drop / "file.bin"), "--depots", "127.0.0.1:1", "-o",
         str(open_dir / "out.xnd"), "--timeout", "2"],
        env=dict(os.environ, HOME=str(home)), cwd=open_dir, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "no depot took the block" in r.stderr, r.stderr  # the file itself, once left alone, is read
