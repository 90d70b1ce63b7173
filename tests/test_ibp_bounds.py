"""What a security review of the depot reproduced, each attacked and each now bounded, with the
legitimate use beside it still served: disk use past the capacity (CHNG shrinking allocations),
threads past --max-connections (a shared identity's connections giving way), a copy allow-list
passed by a DNS name, a journal and a log growing without bound, IPv4-mapped loopback clients
sharing one identity, --min-rate not enforced as a rate, HARD admission walking every allocation,
a copy target dripping its ST_VERSION answer, and a journal append failing after memory changed.
Attacks on a running depot are played by uid 65534 (setpriv), as in test_ibp_hostile.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from helpers import wait_for
from test_ibp_depot import _NoScan, alloc, store
from test_ibp_hostile import ALLOCS, AS_NOBODY, LEGIT_WAIT, PRELUDE, Depot, open_dir, run_depot  # noqa: F401 - fixture

from apps.ibp import limits, peer, storage
from apps.ibp import server as srv
from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import Connection
from apps.ibp.depot import DepotCore, Grant
from apps.ibp.limits import Limits, copy_target
from apps.ibp.peer import tcp_identity, unmapped
from apps.ibp.storage import DiskStore
from apps.ibp.stream import ByteStream, StreamTimeout

NOW = 1_000_000.0
MB = 1 << 20
ALL = Limits(client_share=1.0)
BLOCK = 4096
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the attacker runs as uid 65534 through setpriv: needs root")


def core(path: Path, capacity: int = 100 * MB, lim: Limits = ALL) -> DepotCore:
    return DepotCore(DiskStore(path), capacity, 86400, NOW, lim)


def manage(g: Grant, sub: int, captype: int = w.IBP_READCAP, size: int = 0, duration: int = w.KEEP) -> w.Manage:
    return w.Manage(g.key, g.manage_key, sub, captype, 1, size, duration, w.KEEP)


def disk_use(d: Path) -> int:
    """Bytes of disk the files under `d` hold, as du counts them (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in d.rglob("*") if p.is_file())


def needs_fallocate() -> None:
    if storage._FALLOCATE is None:
        pytest.skip("no fallocate in this libc: no blocks are reserved ahead")


class Piped(ByteStream):
    """A stream the test feeds while a depot's thread reads it; replies are queued."""

    def __init__(self) -> None:
        super().__init__()
        self.incoming: queue.Queue[bytes] = queue.Queue()
        self.sent: queue.Queue[bytes] = queue.Queue()

    def _recv(self, timeout: float | None) -> bytes:
        try:
            return self.incoming.get(timeout=timeout)
        except queue.Empty:
            raise StreamTimeout("nothing came") from None

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.sent.put(bytes(data))

    def close(self) -> None:
        pass


def status(stream: Piped) -> int:
    return int(stream.sent.get(timeout=10).split()[0])


@contextlib.contextmanager
def serving(server: srv.DepotServer) -> Iterator[int]:
    """`server` on a loopback TCP port, in this process, until the block ends (the loop stopped)."""
    sock, _ = srv.tcp_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    loop = threading.Thread(target=srv.tcp_loop, args=(server, sock, f"127.0.0.1:{port}"), daemon=True)
    loop.start()
    try:
        yield port
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept: the loop returns
        sock.close()
        loop.join(5)


# -- 1. disk use within the capacity ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_allocations_shrunk_by_chng_give_their_blocks_back(tmp_path: Path) -> None:
    """Allocate big, CHNG small, again and again: the data directory stays within the capacity, and
    the bytes of an allocation beside them are untouched."""
    needs_fallocate()
    c = core(tmp_path, capacity=8 * MB)
    kept = c.allocate(alloc(1000), NOW)
    store(c, kept, b"k" * 1000)
    for _ in range(12):
        g = c.allocate(alloc(6 * MB), NOW)
        store(c, g, b"x" * 10)
        c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=100), NOW)
        assert disk_use(c.store.data) <= c.capacity
    assert c.reserved == 1000 + 12 * 100
    assert c.store.path(kept.allocation.fid).read_bytes() == b"k" * 1000


@pytest.mark.timeout(60)
def test_an_allocation_grown_by_chng_has_its_blocks_and_a_shrink_is_never_refused(tmp_path: Path) -> None:
    """Growing reserves the blocks a store will need, as ALLOCATE does; shrinking needs no admission
    (a policy that would refuse the allocation now must still let it give space back)."""
    needs_fallocate()
    c = core(tmp_path, capacity=64 * MB)
    g = c.allocate(alloc(MB), NOW)
    c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=40 * MB), NOW)
    assert os.stat(c.store.path(g.allocation.fid)).st_blocks * 512 >= 40 * MB
    c.capacity = 41 * MB  # (now a grow to 40 MB of so full a disk would not be admitted)
    c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=30 * MB), NOW)
    assert g.allocation.max_size == 30 * MB


def test_a_pull_from_a_source_slower_than_the_minimum_rate_is_cut() -> None:
    fast, slow = limits.Pace(time.monotonic(), 10.0, 1), limits.Pace(time.monotonic() - 10, 1.0, 1)
    assert list(srv._paced(iter([b"a", b"b"]), fast)) == [b"a", b"b"]
    with pytest.raises(w.IbpError) as e:
        list(srv._paced(iter([b"a", b"b"]), slow))
    assert e.value.status == w.IBP_E_SERVER_TIMEOUT


@pytest.mark.timeout(60)
def test_a_restart_trims_files_and_reserved_blocks_to_the_recorded_maximum(tmp_path: Path) -> None:
    """A data directory left with blocks reserved past an allocation's maximum (by a depot before
    this fix) or bytes past its acknowledged size (a crash mid-store) is trimmed at start."""
    needs_fallocate()
    c = core(tmp_path)
    a = c.allocate(alloc(1000), NOW)
    b = c.allocate(alloc(1000), NOW)
    store(c, a, b"a" * 100)
    store(c, b, b"b" * 100)
    fd = os.open(c.store.path(a.allocation.fid), os.O_WRONLY)
    storage.reserve(fd, 50 * MB)  # blocks far past the maximum, the file's length unchanged
    os.close(fd)
    with open(c.store.path(b.allocation.fid), "ab") as f:
        f.write(b"unacknowledged" * 100)
    c.store.release()
    c = core(tmp_path)
    for g, byte in ((a, b"a"), (b, b"b")):
        path = c.store.path(g.allocation.fid)
        assert path.read_bytes() == byte * 100
        assert path.stat().st_blocks * 512 <= 1000 + BLOCK
    assert disk_use(c.store.data) <= c.reserved + 2 * BLOCK


@pytest.mark.timeout(60)
def test_a_store_in_flight_leaves_nothing_past_a_shrunk_maximum(tmp_path: Path) -> None:
    """A CHNG that shrinks an allocation waits for a store in progress (-46 once its timeout is out);
    after a store cut short, it gives back the blocks and unacknowledged bytes past the new end."""
    server = srv.DepotServer(core(tmp_path), "d", clock=lambda: NOW)
    g = server.core.allocate(alloc(MB), NOW)
    a = g.allocation
    path = server.core.store.path(a.fid)
    writer = Piped()
    t = threading.Thread(target=server.handle, args=(writer, w.format_request(w.Store(g.key, g.write_key, MB, 5)), "d"))
    t.start()
    assert status(writer) == w.IBP_OK
    writer.incoming.put(b"x" * (MB // 2))
    chng = Piped()
    server.handle(chng, w.format_request(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=MB // 2 + 10)), "d")
    assert status(chng) == w.IBP_E_SERVER_TIMEOUT  # not while the store writes
    writer.incoming.put(b"y" * (MB - MB // 2))
    t.join(10)
    assert writer.sent.get(timeout=5).split() == [b"1", b"%d" % MB]  # the whole store, acknowledged
    assert a.size == MB == a.max_size and path.stat().st_size == MB

    h = server.core.allocate(alloc(MB), NOW)
    cut = Piped()
    cut.incoming.put(b"z" * (MB // 2))
    cut.incoming.put(b"")  # the client hangs up mid-store
    assert not server.handle(cut, w.format_request(w.Store(h.key, h.write_key, MB, 5)), "d")
    chng = Piped()
    server.handle(chng, w.format_request(manage(h, w.IBP_CHNG, w.IBP_MANAGECAP, size=1000)), "d")
    assert status(chng) == w.IBP_OK
    hpath = server.core.store.path(h.allocation.fid)
    assert hpath.stat().st_size == 0 and hpath.stat().st_blocks * 512 <= 1000 + BLOCK


# -- 2. a shared identity's threads and sockets ----------------------------------------------------


def connection_threads() -> int:
    return sum(t.name.endswith("(_run)") and t.is_alive() for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_a_shared_identity_gets_no_threads_past_max_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One remote address (many users) opens connection after connection, each beginning a request
    and never ending it: the depot's connection threads stay within --max-connections, and another
    client is served meanwhile."""
    lim = Limits(max_connections=8, client_connections=4, request_timeout=30, idle_timeout=60, client_share=1.0)
    server = srv.DepotServer(core(tmp_path, lim=lim), "d", limits=lim)
    remote: set[int] = set()  # the attacker's source ports: to the depot, one remote address
    monkeypatch.setattr(
        srv, "tcp_identity", lambda conn: "tcp:203.0.113.7" if conn.getpeername()[1] in remote else "uid:0"
    )
    base = connection_threads()
    socks: list[socket.socket] = []
    peak = 0
    with serving(server) as port:
        try:
            for _ in range(150):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                remote.add(s.getsockname()[1])
                s.connect(("127.0.0.1", port))
                s.sendall(b"1")  # a request line begun, never finished
                socks.append(s)
                time.sleep(0.01)
                peak = max(peak, connection_threads() - base, server.slots.count() if server.slots else 0)
            assert peak <= lim.max_connections
            with Connection(f"127.0.0.1:{port}", timeout=LEGIT_WAIT) as c:
                r, wc, _ = c.allocate(10, 60)
                c.store(wc, [b"legitimate"], 10)
                assert c.load_bytes(r) == b"legitimate"
        finally:
            for s in socks:
                s.close()


@pytest.mark.timeout(30)
def test_a_connection_giving_way_is_closed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle connection of a shared identity that gives its slot to a newer one is woken and closed
    at once, not at its next look, and the newer one is served."""
    lim = Limits(max_connections=8, client_connections=1, client_share=1.0)
    server = srv.DepotServer(core(tmp_path, lim=lim), "d", limits=lim)
    monkeypatch.setattr(srv, "tcp_identity", lambda conn: "tcp:203.0.113.7")
    with serving(server) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as old:
        time.sleep(0.3)  # idle past the grace
        with Connection(f"127.0.0.1:{port}", timeout=LEGIT_WAIT) as c:
            t0 = time.monotonic()
            assert old.recv(100) == b""
            assert time.monotonic() - t0 < srv.EVICT_POLL / 2
            assert int(c.status()["capacity"]) > 0


# -- 3. copies: the address checked is the address reached -----------------------------------------


@pytest.mark.parametrize(
    ("dest", "patterns", "reached"),
    [
        ("10.1.2.attacker.example:6714", ("10.1.2.*:6714",), None),  # a name never matches an address pattern
        ("10.1.2.7:6714", ("10.1.2.*:6714",), "10.1.2.7:6714"),
        ("depot.example:6714", ("depot.example:6714",), "127.0.0.1:6714"),  # a name listed exactly
        ("depot.example:6714", ("*.example:6714",), None),  # ... and only exactly
        ("depot.example:6714", ("127.0.0.*:6714",), "127.0.0.1:6714"),  # by the address it resolves to
        ("[::ffff:10.1.2.3]:6714", ("10.1.2.*:6714",), "10.1.2.3:6714"),
        ("[fd00::2]:6714", ("[fd00::*]:6714",), "[fd00::2]:6714"),
        ("unknown.example:6714", ("*:6714",), None),
        ("depot2", (), "depot2"),
    ],
)
def test_copy_targets_are_matched_by_the_addresses_they_resolve_to(
    dest: str, patterns: tuple[str, ...], reached: str | None
) -> None:
    names = {"10.1.2.attacker.example": ["127.0.0.1"], "depot.example": ["127.0.0.1", "10.9.9.9"]}

    def resolver(host: str, port: int) -> list[str]:
        if host == "unknown.example":
            raise socket.gaierror(socket.EAI_NONAME, "no such name")
        return names.get(host, [host])

    assert copy_target(dest, patterns, resolver) == reached


@pytest.mark.timeout(60)
def test_a_copy_connects_to_the_address_it_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `--copy-to 10.1.2.*:PORT`, a name `10.1.2.attacker.example` resolving to loopback gets
    -61 and no connection; a name listed exactly is copied to, at the address looked up once."""
    target = srv.DepotServer(core(tmp_path / "t"), "t")
    with serving(target) as port:
        names = {"10.1.2.attacker.example": ["127.0.0.1"], "depot.test": ["127.0.0.1"]}
        looked_up: list[str] = []

        def resolve(host: str, port: int) -> list[str]:
            looked_up.append(host)
            return names.get(host, [host])

        monkeypatch.setattr(limits, "resolve", resolve, raising=False)
        real = socket.getaddrinfo

        def once(host: str, *args: object, **kw: object) -> object:
            assert host not in names, f"{host} was resolved a second time"
            return real(host, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(socket, "getaddrinfo", once)
        lim = Limits(client_share=1.0, copy_to=(f"10.1.2.*:{port}", f"depot.test:{port}"))
        source = srv.DepotServer(core(tmp_path / "s", lim=lim), "s", limits=lim, clock=lambda: NOW)
        g = source.core.allocate(alloc(100), NOW)
        store(source.core, g, b"copied")
        with Connection(f"127.0.0.1:{port}", timeout=5) as c:
            r, wcap, _ = c.allocate(100, 60)
        accepted = target.accepted
        for host, want in (("10.1.2.attacker.example", w.IBP_E_INVALID_HOST), ("depot.test", w.IBP_OK)):
            dest = dataclasses.replace(wcap, depot=f"{host}:{port}")
            out = Piped()
            source.handle(out, w.format_request(w.Send(g.key, g.read_key, str(dest), 0, 6, 5, 5, 5, "0")), "s")
            assert status(out) == want, host
        assert target.accepted == accepted + 1  # the refused copy connected nowhere
        assert looked_up == ["10.1.2.attacker.example", "depot.test"]
        with Connection(f"127.0.0.1:{port}", timeout=5) as c:
            assert c.load_bytes(r) == b"copied"
        source.targets.close()


# -- 4. the journal stays proportional to the allocations ------------------------------------------


@pytest.mark.timeout(120)
def test_the_journal_stays_bounded_at_run_time_and_recovers_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # bounds are tested here, not durability: 60,000 fsyncs spared
    c = core(tmp_path)
    kept = c.allocate(alloc(1000), NOW)
    store(c, kept, b"kept bytes")
    changed = c.allocate(alloc(2000), NOW)
    c.manage(manage(changed, w.IBP_CHNG, w.IBP_MANAGECAP, size=3000, duration=7200), NOW)
    freed = c.allocate(alloc(10), NOW)
    c.manage(manage(freed, w.IBP_DECR), NOW)
    g = c.allocate(alloc(10), NOW)
    journal = tmp_path / storage.JOURNAL
    for i in range(30_000):
        c.manage(manage(g, w.IBP_INCR), NOW)
        c.manage(manage(g, w.IBP_DECR), NOW)
        if i % 1000 == 0:
            assert len(journal.read_bytes().splitlines()) <= 2000  # a floor of 1,024, plus 4 per allocation
    c.manage(manage(g, w.IBP_INCR, w.IBP_WRITECAP), NOW)
    assert journal.stat().st_size < 500_000
    before = {fid: dataclasses.asdict(a) for fid, a in c.allocs.items()}
    c.store.release()
    c = core(tmp_path)
    assert {fid: dataclasses.asdict(a) for fid, a in c.allocs.items()} == before
    assert freed.allocation.fid not in c.allocs and g.allocation.write_refs == 1
    assert c.store.path(kept.allocation.fid).read_bytes() == b"kept bytes"


@pytest.mark.timeout(30)
def test_a_failed_journal_append_leaves_memory_as_the_journal_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(MB), NOW)
    a = g.allocation

    def full(record: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(c.store, "append", full)
    for req in (manage(g, w.IBP_INCR), manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=2 * MB, duration=60)):
        with pytest.raises(OSError, match="No space"):
            c.manage(req, NOW)
    assert (a.read_refs, a.max_size, a.expires) == (1, MB, NOW + 3600)
    assert c.reserved == MB and c.next_expiry() == NOW + 3600
    monkeypatch.undo()
    c.manage(manage(g, w.IBP_INCR), NOW)
    assert a.read_refs == 2


# -- 5. what clients cause is not logged without bound ---------------------------------------------

LOG_FLOOD = (
    PRELUDE
    + r"""
from apps.ibp.capability import Capability
from apps.ibp.client import Connection
with Connection(sys.argv[2], timeout=10) as c:
    r, wc, mc = c.allocate(16, 3600)
    c.store(wc, [b'x' * 16], 16)
n = int(sys.argv[4])
answers = {}
for i in range(n):
    s = conn()
    s.sendall(b'1 4 0 2 x 5\n' + b'9' * 5000)  # ST_CHANGE without the admin key, its second line over-long
    a = first_line(s).split(' ')[0]
    answers['change ' + a] = answers.get('change ' + a, 0) + 1
    s.close()
s = conn()
for i in range(n):
    dest = 'ibp://nosuchdepot%d/0#k/k/WRITE' % i
    s.sendall(b'1 5 0#%s %s %s 0 16 1 1 1\n' % (r.key.encode(), dest.encode(), r.typekey.encode()))
    a = first_line(s).split(' ')[0]
    answers['send ' + a] = answers.get('send ' + a, 0) + 1
print(sorted(answers.items()))
"""
)


@as_root
@pytest.mark.timeout(180)
def test_a_client_cannot_grow_the_log_without_bound(open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """1,000 ST_CHANGE lines without the admin key (their limits line over-long) get -29, their limits
    never read, and log nothing; 1,000 copies to names nobody registered fail and log a bounded
    number of lines; root is served meanwhile."""
    for depot in run_depot(open_dir, monkeypatch):
        before = depot.log.read_text().splitlines()
        t0 = time.monotonic()
        r = depot.attack(LOG_FLOOD, "1000", timeout=150)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr[-2000:]
        answers = dict(eval(r.stdout))  # our own script's repr of (name, count) pairs
        # each refused for its password; a few told to come back later (-66) while the depot still
        # held the client's connections just closed (a fast accept on a loaded machine)
        later = answers.get(f"change {w.IBP_E_OUT_OF_SOCKETS}", 0)
        assert answers.get(f"change {w.IBP_E_WRONG_PASSWD}", 0) + later == 1000 and later <= 100, answers
        assert sum(v for k, v in answers.items() if k.startswith("send -")) == 1000, answers
        added = depot.log.read_text().splitlines()[len(before) :]
        assert not any("Traceback" in line for line in added), "\n".join(added[-20:])
        limit = srv.peer_log.burst + srv.peer_log.rate * took  # each line, and a count of those left out
        assert len(added) <= 2 * limit, f"{len(added)} lines in {took:.0f} s"
        assert depot.served() < LEGIT_WAIT


# -- 6. local users over a dual-stack listener -----------------------------------------------------


def test_a_local_ipv4_client_of_a_dual_stack_listener_is_known_by_its_uid() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    with socket.socket(socket.AF_INET6) as srv_sock:
        srv_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv_sock.bind(("::", 0))
        srv_sock.listen(2)
        for family, host in (
            (socket.AF_INET, "127.0.0.1"),
            (socket.AF_INET6, "::ffff:127.0.0.1"),
            (socket.AF_INET6, "::1"),
        ):
            with socket.socket(family) as c:
                c.connect((host, srv_sock.getsockname()[1]))
                conn, _ = srv_sock.accept()
                with conn:
                    assert tcp_identity(conn) == f"uid:{os.geteuid()}", host


@as_root
@pytest.mark.timeout(90)
def test_local_users_keep_their_own_quotas_over_a_dual_stack_listener(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    for depot in run_depot(open_dir, monkeypatch, listen="::"):
        r = depot.attack(ALLOCS)
        assert r.stdout.split() == ["20", "-45"], r.stdout + r.stderr  # uid 65534's quota, whole and its own
        assert depot.served() < LEGIT_WAIT  # root's is untouched


def own_address(family: socket.AddressFamily) -> str:
    """One of this host's addresses that is not a loopback one (the source of its default route)."""
    probe = ("192.0.2.254", 9) if family == socket.AF_INET else ("2001:db8::fe", 9)
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect(probe)  # UDP: picks the route and its source address, sends nothing
        except OSError:
            pytest.skip("no route, so no non-loopback address, here")
        host = str(s.getsockname()[0])
    if unmapped(host).is_loopback or unmapped(host).is_link_local:
        pytest.skip("no non-loopback address here")
    return host


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_a_local_client_over_the_hosts_own_address_is_known_by_its_uid(family: socket.AddressFamily) -> None:
    host = own_address(family)
    with socket.create_server((host, 0), family=family) as srv_sock:
        client = socket.create_connection((host, srv_sock.getsockname()[1]))
        conn, _ = srv_sock.accept()
        with client, conn:
            assert tcp_identity(conn) == f"uid:{os.geteuid()}"


@as_root
@pytest.mark.timeout(90)
def test_local_users_keep_their_own_quotas_over_the_hosts_own_address(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uid 65534 and root both reach a depot listening on every address through the host's own
    (non-loopback) address: each is still counted as its uid, so one's quota is not the other's."""
    host = own_address(socket.AF_INET)
    for depot in run_depot(open_dir, monkeypatch, listen="0.0.0.0"):
        depot.host = host
        r = depot.attack(ALLOCS)
        assert r.stdout.split() == ["20", "-45"], r.stdout + r.stderr  # uid 65534's quota, whole and its own
        assert depot.served() < LEGIT_WAIT  # root's is untouched


# -- 7. --min-rate is a rate -----------------------------------------------------------------------

DRIBBLE = (
    PRELUDE
    + r"""
s = conn()
s.sendall(b'1 1 0 1 1 60 1000000 5\n')
caps = first_line(s).split()[1:]
key, wkey = caps[1].split('/')[3], caps[1].split('/')[4]
s.sendall(('1 2 %s %s 1000000 1\n' % (key, wkey)).encode())
print('first', first_line(s))
t0 = time.monotonic()
s.settimeout(0.3)
answer = None
while time.monotonic() - t0 < float(sys.argv[4]):
    try:
        s.sendall(b'x')  # a byte every 0.3 s: within every wait's timeout, far below the rate
        answer = s.recv(200)
        break
    except socket.timeout:
        continue
    except OSError as e:
        answer = repr(e)
        break
print('after', round(time.monotonic() - t0, 1), answer)
"""
)


@as_root
@pytest.mark.timeout(90)
def test_a_store_below_the_minimum_rate_is_cut_after_its_grace(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--min-rate 1000 B/s, timeouts clamped to 1 s: a STORE of 1,000,000 bytes dribbled a byte at a
    time is cut (-46) about a second in, not after 1,000 s; a store at speed goes through."""
    for depot in run_depot(open_dir, monkeypatch, "--max-timeout", "1", "--min-rate", "1000"):
        r = depot.attack(DRIBBLE, "8")
        lines = r.stdout.splitlines()
        assert len(lines) == 2 and lines[0] == "first 1", r.stdout + r.stderr
        _, took, answer = lines[1].split(" ", 2)
        assert answer.startswith(f"b'{w.IBP_E_SERVER_TIMEOUT} ") and float(took) < 4, lines[1]
        with Connection(depot.addr, timeout=LEGIT_WAIT) as c:
            rcap, wcap, _ = c.allocate(200_000, 60)
            c.store(wcap, [b"s" * 200_000], 200_000)
            assert c.load_bytes(rcap) == b"s" * 200_000
        assert depot.served() < LEGIT_WAIT


# -- 8. HARD admission looks only at what it revokes -----------------------------------------------


@pytest.mark.timeout(30)
def test_hard_admission_never_walks_every_allocation(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=100_000)
    softs = [c.allocate(alloc(1000, 600 - i), NOW) for i in range(90)]  # the last made expires first
    c.allocs = _NoScan(c.allocs)
    with pytest.raises(w.IbpError, match="exceeds the depot's 100000 bytes"):
        c.allocate(alloc(200_000, 60, w.IBP_HARD), NOW)  # more than the depot: refused, nothing walked
    assert c.revoked == 0 and c.soft_reserved == 90_000
    c.allocate(alloc(12_000, 60, w.IBP_HARD), NOW)  # 10,000 free: two SOFT ones go, the soonest expiring
    assert c.revoked == 2
    assert [g.allocation.fid in c.allocs for g in softs[-3:]] == [True, False, False]
    assert c.soft_reserved == 88_000 and c.hard_reserved == 12_000


def test_a_hard_request_revoking_many_soft_allocations_writes_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client makes SOFT allocations at will: one HARD request revoking 500 of them wrote 500 lines."""
    c = core(tmp_path, capacity=100_000)
    softs = [c.allocate(alloc(100, 600), NOW) for _ in range(500)]
    with caplog.at_level(logging.INFO, logger="apps.ibp.depot"):
        c.allocate(alloc(100_000, 60, w.IBP_HARD), NOW)
    assert c.revoked == 500 and not any(g.allocation.fid in c.allocs for g in softs)
    lines = [r.getMessage() for r in caplog.records if "revoked" in r.getMessage()]
    assert lines == ["revoked 500 soft allocations (50000 bytes) for a hard one of 100000 bytes"], lines


# -- a copy target dripping its ST_VERSION answer ----------------------------------------------------


@contextlib.contextmanager
def version_server(interval: float) -> Iterator[int]:
    """A TCP service answering ST_VERSION with 40 lines, `interval` seconds apart, then END."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = sock.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"1\n")
                for i in range(40):
                    if stop.wait(interval):
                        return
                    conn.sendall(b"line %d\n" % i)
                conn.sendall(b"END\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        sock.close()
        t.join(5)


@pytest.mark.timeout(30)
def test_a_version_answer_gets_one_timeout_in_all() -> None:
    with version_server(0.2) as port, Connection(f"127.0.0.1:{port}", timeout=1) as c:
        t0 = time.monotonic()
        with pytest.raises(w.IbpError, match="stopped sending"):
            c.version()
        assert time.monotonic() - t0 < 1.5
    with version_server(0) as port, Connection(f"127.0.0.1:{port}", timeout=1) as c:
        assert c.version().splitlines()[-1] == "line 39"


# -- 9. a remote IPv6 client is its /64 ------------------------------------------------------------


class RemotePeer:
    """What tcp_identity asks of an accepted socket, for a peer at `host` (no such host here)."""

    family = socket.AF_INET6

    def __init__(self, host: str) -> None:
        self.host = host

    def getpeername(self) -> tuple[str, int, int, int]:
        return (self.host, 40000, 0, 0)

    def getsockname(self) -> tuple[str, int, int, int]:
        return ("2001:db8:ffff::1", 6714, 0, 0)


def test_a_remote_ipv6_client_has_one_identity_for_all_the_addresses_of_its_64() -> None:
    """A remote host may take any address of its /64 for each connection (privacy addresses): were
    each its own client, one host would have as many connection slots, allocations and shares of
    the capacity as it liked. Another /64 is another client; IPv4 clients stay one per address."""
    ident = {h: tcp_identity(RemotePeer(h)) for h in ("2001:db8:1:2::5", "2001:db8:1:2:a:b:c:d", "2001:db8:1:3::5")}
    assert ident["2001:db8:1:2::5"] == ident["2001:db8:1:2:a:b:c:d"] == "tcp:2001:db8:1:2::/64"
    assert ident["2001:db8:1:3::5"] == "tcp:2001:db8:1:3::/64"
    assert tcp_identity(RemotePeer("::ffff:198.51.100.7")) == "tcp:198.51.100.7"
    assert limits.shared_identity(ident["2001:db8:1:2::5"])  # idle slots give way to a new connection


# -- 10. durability's cost is shared: one client's changes do not hold the others' -----------------

SLOW_SYNC = 0.02  # seconds a journal fsync takes here, as on a loaded disk: syncs are counted, not timed


def slow_journal_syncs(monkeypatch: pytest.MonkeyPatch, journal: Path) -> list[float]:
    """Make every fsync of `journal` take SLOW_SYNC; the list gets the time each one ended."""
    real, ended = os.fsync, []

    def fsync(fd: int) -> None:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(journal):
                time.sleep(SLOW_SYNC)
                real(fd)
                ended.append(time.monotonic())
                return
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return ended


def allocate_keys(f: BinaryIO, s: socket.socket) -> bytes:
    """`RID#KEY MANAGEKEY` of a new allocation, as a MANAGE line takes them."""
    reply = ask_line(f, s, b"1 1 0 1 1 3600 100 10\n")
    assert reply[0] == b"1", reply
    _, _, _, key, manage_key, _ = reply[3].split(b"/")
    return key + b" " + manage_key


def ask_line(f: BinaryIO, s: socket.socket, line: bytes) -> list[bytes]:
    s.sendall(line)
    return f.readline().split()


@pytest.mark.timeout(60)
def test_one_client_looping_incr_decr_holds_another_clients_change_for_two_syncs_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight connections of one client loop INCR/DECR, each a journal record to put on disk; another
    client's INCR is answered within two journal syncs (the one running when its record was written,
    and the next, which covers it), where each of the eight once held the depot's lock for a sync."""
    server = srv.DepotServer(core(tmp_path / "d"), "d", Limits(client_share=1.0, client_connections=16))
    ended = slow_journal_syncs(monkeypatch, tmp_path / "d" / storage.JOURNAL)
    stop = threading.Event()
    with serving(server) as port:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(9)]
        files = [c.makefile("rb") for c in conns]
        looped, mine = allocate_keys(files[0], conns[0]), allocate_keys(files[0], conns[0])

        def loop(s: socket.socket, f: BinaryIO) -> None:
            for _ in range(2000):  # bounded; stopped once the measurement is done
                for sub in (w.IBP_INCR, w.IBP_DECR):
                    if stop.is_set() or ask_line(f, s, b"1 9 %s %d 1 10\n" % (looped, sub))[0] != b"1":
                        return

        loopers = [threading.Thread(target=loop, args=cf, daemon=True) for cf in zip(conns[1:], files[1:], strict=True)]
        try:
            for t in loopers:
                t.start()
            wait_for(lambda: len(ended) >= 20, 20, "the loop to be under way")
            held = []
            for _ in range(10):
                start = time.monotonic()
                assert ask_line(files[0], conns[0], b"1 9 %s 41 2 10\n" % mine)[0] == b"1"
                held.append(sum(start < t for t in ended))
            assert all(t.is_alive() for t in loopers)  # the loop went on all along
            assert max(held) <= 2, held
        finally:
            stop.set()
            for t in loopers:
                t.join(10)
            for c in conns:
                c.close()
    server.core.store.release()


def recorded_fsyncs(monkeypatch: pytest.MonkeyPatch, server: srv.DepotServer) -> list[tuple[str, bool]]:
    """Every fsync from now on: (what it synced, whether the depot's lock was held meanwhile)."""
    real, done = os.fsync, []

    def fsync(fd: int) -> None:
        held = server.lock.locked()
        real(fd)
        with contextlib.suppress(OSError):
            done.append((os.readlink(f"/proc/self/fd/{fd}"), held))

    monkeypatch.setattr(os, "fsync", fsync)
    return done


@pytest.mark.timeout(30)
def test_an_allocate_syncs_nothing_under_the_depots_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new allocation's empty data file is made without an fsync of it or its directories (a crash
    loses nothing a client was told of: the next start makes it again), and its journal record is
    synced after the lock is let go: a client looping ALLOCATE holds no one else's request for a sync."""
    server = srv.DepotServer(core(tmp_path / "d"), "d", Limits(client_share=1.0))
    synced = recorded_fsyncs(monkeypatch, server)
    with serving(server) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        for _ in range(3):
            allocate_keys(f, s)
    assert synced and all(path.endswith(storage.JOURNAL) for path, _ in synced), synced
    assert not any(held for _, held in synced), synced
    server.core.store.release()


@pytest.mark.timeout(30)
def test_a_store_puts_its_files_name_on_disk_before_it_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first store into a new allocation is acknowledged only once the data file's directory
    entry is on disk: acknowledged bytes must not vanish with their file in a crash."""
    server = srv.DepotServer(core(tmp_path / "d"), "d", clock=lambda: NOW)
    data_dir = str(server.core.store.data)
    synced = recorded_fsyncs(monkeypatch, server)
    allocate = Piped()
    server.handle(allocate, w.format_request(alloc(MB)), "d")
    _, wcap, _ = (Capability.parse(c.decode()) for c in allocate.sent.get(timeout=5).split()[1:])
    assert not any(path == data_dir for path, _ in synced), synced
    stored = Piped()
    stored.incoming.put(b"data")
    assert server.handle(stored, w.format_request(w.Store(wcap.key, wcap.typekey, 4, 5)), "d")
    assert [stored.sent.get(timeout=5).split()[0] for _ in range(2)] == [b"1", b"1"]
    assert [path for path, _ in synced].count(data_dir) == 1, synced
    stored = Piped()  # the name is on disk now: a second store syncs no directory
    stored.incoming.put(b"more")
    assert server.handle(stored, w.format_request(w.Store(wcap.key, wcap.typekey, 4, 5)), "d")
    assert [stored.sent.get(timeout=5).split()[0] for _ in range(2)] == [b"1", b"1"]
    assert [path for path, _ in synced].count(data_dir) == 1, synced
    server.core.store.release()


class Acked(Piped):
    """A Piped stream that notes, at each reply, whether the journal was all on disk by then."""

    def __init__(self, journal: Path, synced: list[int]) -> None:
        super().__init__()
        self.journal, self.synced = journal, synced
        self.on_disk: list[bool] = []

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.on_disk.append(self.journal.stat().st_size <= max(self.synced, default=0))
        super()._send(data, timeout)


@pytest.mark.timeout(30)
def test_a_change_is_answered_only_once_its_journal_record_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ALLOCATE, STORE, INCR, DECR, CHNG and a CHNG made but answered -45: no reply goes out before a
    journal fsync covering the request's record has ended (the promise a crash must not break)."""
    server = srv.DepotServer(core(tmp_path / "d"), "d", clock=lambda: NOW)
    journal = tmp_path / "d" / storage.JOURNAL
    real, synced = os.fsync, []

    def fsync(fd: int) -> None:
        covered = os.fstat(fd).st_size
        real(fd)
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(journal):
                synced.append(covered)

    monkeypatch.setattr(os, "fsync", fsync)
    allocate = Acked(journal, synced)
    server.handle(allocate, w.format_request(alloc(MB)), "d")
    _, wcap, m = (Capability.parse(c.decode()) for c in allocate.sent.get(timeout=5).split()[1:])
    stored = Acked(journal, synced)
    stored.incoming.put(b"data")
    assert server.handle(stored, w.format_request(w.Store(wcap.key, wcap.typekey, 4, 5)), "d")
    assert [stored.sent.get(timeout=5).split()[0] for _ in range(2)] == [b"1", b"1"]
    changes = [
        w.Manage(m.key, m.typekey, w.IBP_INCR, w.IBP_READCAP, 5),
        w.Manage(m.key, m.typekey, w.IBP_DECR, w.IBP_READCAP, 5),
        w.Manage(m.key, m.typekey, w.IBP_CHNG, w.IBP_MANAGECAP, 5, 2 * MB, 60, w.KEEP),
        w.Manage(m.key, m.typekey, w.IBP_CHNG, w.IBP_MANAGECAP, 5, w.KEEP, 10**6, w.KEEP),  # made, then -45
    ]
    answers = []
    for req in changes:
        acked = Acked(journal, synced)
        server.handle(acked, w.format_request(req), "d")
        answers.append(int(acked.sent.get(timeout=5).split()[0]))
        assert acked.on_disk == [True], req
    assert answers == [1, 1, 1, w.IBP_E_WOULD_EXCEED_POLICY]
    assert allocate.on_disk == [True] and stored.on_disk == [True, True]
    assert len(synced) < 12  # one journal fsync a change, not more
    server.core.store.release()


# -- 11. who a local TCP client is: the kernel asked for its socket, a closed one being no one -------

GONE_AT_ONCE = (
    PRELUDE
    + r"""
n = int(sys.argv[4])
for _ in range(n):
    s = conn()
    s.sendall(b'1 1 0 1 1 60 64 5\n')  # ALLOCATE, and gone before the depot has looked at who sent it
    s.close()
print('sent', n)
"""
)


def connect_as_nobody(port: int, linger: bool) -> subprocess.Popen[bytes]:
    """uid 65534 connected to 127.0.0.1:`port` (a byte sent), then closed at once or (linger) kept
    open until its stdin closes."""
    wait = "sys.stdin.read()" if linger else "pass"
    lines = ["import socket, sys", "s = socket.socket()", f"s.connect(('127.0.0.1', {port}))", "s.sendall(b'x')"]
    code = "\n".join([*lines, wait, "s.close()"])
    return subprocess.Popen([*AS_NOBODY, sys.executable, "-c", code], stdin=subprocess.PIPE)


def ownerless_rows(port: int) -> int:
    """Rows of the kernel's socket tables connected to `port` that no open socket owns (inode 0): a
    closed client's, once its FIN was answered (FIN_WAIT2, TIME_WAIT), listed with uid 0."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            n += cols[2].endswith(f":{port:04X}") and cols[7] == "0" and cols[9] == "0"
    return n


def ownerless_rows_at_least(port: int, n: int) -> bool:
    return ownerless_rows(port) >= n


def no_sock_diag(*_: object) -> tuple[int, int] | None:
    raise OSError(errno.EPROTONOSUPPORT, "no sock_diag")


@as_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("ask", ["sock_diag", "table"])
def test_a_local_client_gone_before_it_is_looked_at_is_no_one(ask: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket its process closed stays in the kernel's table as a row with no owner (FIN_WAIT2 or
    TIME_WAIT), listed with uid 0, while what it sent waits to be read: uid 65534 that connects,
    sends a request and closes before the depot looks was root. It is its address now, as a client
    the stack cannot name; one still connected is its uid, whether the kernel is asked for its row
    or (where it cannot be) the table is read."""
    if ask == "table":
        monkeypatch.setattr(peer, "_diag", no_sock_diag)
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        port = lsock.getsockname()[1]
        assert connect_as_nobody(port, linger=False).wait(30) == 0
        wait_for(lambda: ownerless_rows(port) >= 1, 10, "the closed socket's row to lose its owner", interval=0.02)
        gone, _ = lsock.accept()
        with gone:
            assert gone.recv(1) == b"x"  # its request is there to be read
            assert tcp_identity(gone) == "tcp:127.0.0.1"
        live = connect_as_nobody(port, linger=True)
        try:
            conn, _ = lsock.accept()
            with conn:
                assert tcp_identity(conn) == "uid:65534"
        finally:
            assert live.stdin is not None
            live.stdin.close()
            live.wait(30)


def test_a_local_client_is_found_without_reading_the_whole_socket_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each accepted connection is looked up on the accept loop: reading /proc/net/tcp costs time with
    every socket of the host (15 ms each with 8,000 open here), which any local user can open, and
    the loop then took some 60 connections a second from all clients. The kernel is asked for the
    one row (sock_diag), in constant time; the table is read only where it cannot be."""
    with socket.create_server(("127.0.0.1", 0)) as lsock, socket.create_connection(lsock.getsockname()) as c:
        conn, _ = lsock.accept()
        with conn:
            try:
                peer._diag(socket.AF_INET, c.getsockname(), c.getpeername())
            except OSError:
                pytest.skip("the kernel has no sock_diag here")
            monkeypatch.setattr(peer, "_PROC_TCP", {socket.AF_INET: Path("/nonexistent/tcp")})
            assert tcp_identity(conn) == f"uid:{os.geteuid()}"


def owners(depot: Depot) -> collections.Counter[str]:
    """The owners of the allocations the depot's journal records, by count."""
    counts: collections.Counter[str] = collections.Counter()
    for line in (depot.dir / "journal.log").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("op") == "alloc":
            counts[rec["a"]["owner"]] += 1
    return counts


@as_root
@pytest.mark.timeout(90)
def test_requests_of_a_local_client_gone_at_once_are_not_made_as_root(
    open_dir: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uid 65534 sends ALLOCATEs and closes each connection before the depot takes it (the depot
    stopped meanwhile, so it always comes to them late): the allocations are made, but none counts
    against root's quota (nor would a copy carry root's identity); root is served as ever."""
    for depot in run_depot(open_dir, monkeypatch):
        before = owners(depot)
        os.kill(depot.proc.pid, signal.SIGSTOP)
        try:
            r = depot.attack(GONE_AT_ONCE, "4")
            wait_for(
                functools.partial(ownerless_rows_at_least, depot.port, 4),
                10,
                "the closed sockets' rows to lose their owner",
            )
        finally:
            os.kill(depot.proc.pid, signal.SIGCONT)
        assert r.stdout.split() == ["sent", "4"], r.stdout + r.stderr

        def taken(depot: Depot = depot) -> bool:  # the attacker's connections came first, and are done
            with Connection(depot.addr, timeout=LEGIT_WAIT) as c:
                return int(c.status()["connections"]) <= 1

        wait_for(taken, 20, "the depot to take the connections", interval=0.1)
        after = owners(depot)
        assert after[f"uid:{os.geteuid()}"] == before[f"uid:{os.geteuid()}"], after
        assert after["tcp:127.0.0.1"] >= 1, after  # served, as a client the stack cannot name
        assert depot.served() < LEGIT_WAIT


@pytest.mark.timeout(30)
def test_a_request_line_not_ended_in_time_is_answered_before_the_close(tmp_path: Path) -> None:
    """A line begun and not ended within --request-timeout (a client that left out its newline) is
    told so, -21, before the connection closes, as L-Store's read_command answers a line its wait
    ended in (server_lib.c); it was closed without a word. A connection silent from the start is
    closed without one, as there."""
    lim = Limits(request_timeout=1, idle_timeout=1, client_share=1.0)
    server = srv.DepotServer(core(tmp_path, lim=lim), "d", limits=lim)
    with serving(server) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"1 4 5 10")  # no newline
            reply = s.makefile("rb").read()  # up to the close
            assert reply.startswith(b"-21 ") and reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert s.recv(100) == b""  # idle: closed, nothing said
