"""The depot core without flows: admission policy, capabilities, expiry, reference counts, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.ibp import wire as w
from apps.ibp.depot import DepotCore, admit
from apps.ibp.storage import DiskStore
from apps.ibp.wire import IbpError

NOW = 1_000_000.0
MB = 1 << 20


def core(tmp_path: Path, capacity: int = 100 * MB, max_duration: int = 86400, now: float = NOW) -> DepotCore:
    return DepotCore(DiskStore(tmp_path), capacity, max_duration, now)


def alloc(c: DepotCore, size: int = MB, duration: int = 3600, now: float = NOW) -> w.Allocate:
    return w.Allocate("0", w.IBP_SOFT, w.IBP_BYTEARRAY, duration, size, 30)


def store(c: DepotCore, a: object, data: bytes) -> None:
    from apps.ibp.depot import Allocation

    assert isinstance(a, Allocation)
    start = c.check_write(a, None, len(data))
    with c.open_data(a) as f:
        f.seek(start)
        f.write(data)
    c.commit(a, start + len(data))


def refused(status: int) -> pytest.RaisesContext[IbpError]:
    return pytest.raises(IbpError, match=rf"\({w.status_text(status)}, {status}\)")


def test_allocation_gives_three_distinct_256_bit_caps(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c), NOW)
    r, wr, m = c.caps(a, "depot1")
    assert {r.right, wr.right, m.right} == {"READ", "WRITE", "MANAGE"}
    assert len({a.key, a.read_key, a.write_key, a.manage_key}) == 4
    assert all(len(k) == 64 for k in (a.key, a.read_key, a.write_key, a.manage_key))
    assert str(r).startswith("ibp://depot1/0#")


def test_each_command_needs_its_own_right_key(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c), NOW)
    assert c.authorize(a.key, a.read_key, "READ", NOW) is a
    with refused(w.IBP_E_INVALID_READ_CAP):
        c.authorize(a.key, a.write_key, "READ", NOW)
    with refused(w.IBP_E_INVALID_WRITE_CAP):
        c.authorize(a.key, a.read_key, "WRITE", NOW)
    with refused(w.IBP_E_INVALID_MANAGE_CAP):
        c.authorize(a.key, a.read_key, "MANAGE", NOW)


def _flip_last(k: str) -> str:
    return k[:-1] + ("1" if k[-1] == "0" else "0")


@pytest.mark.parametrize("forge", [lambda k: "X" + k, lambda k: k[:-1], _flip_last, lambda k: k.upper()])
def test_forged_or_truncated_keys_are_refused_and_counted(tmp_path: Path, forge: object) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c), NOW)
    assert callable(forge)
    with pytest.raises(IbpError):
        c.authorize(forge(a.key), a.read_key, "READ", NOW)
    with pytest.raises(IbpError):
        c.authorize(a.key, forge(a.read_key), "READ", NOW)
    assert sum(c.refused.values()) == 2


def test_policy_grants_within_free_space_and_max_duration() -> None:
    assert admit(MB, 3600, 100 * MB, 100 * MB, 86400)[0] == w.IBP_OK
    assert admit(100 * MB, 86400, 100 * MB, 100 * MB, 86400)[0] == w.IBP_OK  # an empty depot grants all
    assert admit(MB, 86401, 100 * MB, 100 * MB, 86400)[0] == w.IBP_E_LONG_DURATION
    assert admit(101 * MB, 60, 100 * MB, 100 * MB, 86400)[0] == w.IBP_E_WOULD_EXCEED_LIMIT


def test_policy_favours_small_or_short_asks_as_the_depot_fills() -> None:
    free, cap, maxd = 20 * MB, 100 * MB, 86400
    big_long = admit(10 * MB, 86400, free, cap, maxd)
    assert big_long[0] == w.IBP_E_WOULD_EXCEED_POLICY and "budget" in big_long[1]
    assert admit(10 * MB, 3600, free, cap, maxd)[0] == w.IBP_OK     # same size, shorter
    assert admit(MB, 86400, free, cap, maxd)[0] == w.IBP_OK         # same time, smaller


def test_allocate_refusals(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB, max_duration=3600)
    with refused(w.IBP_E_TYPE_NOT_SUPPORTED):
        c.allocate(w.Allocate("0", w.IBP_SOFT, w.IBP_FIFO, 60, MB, 5), NOW)
    with refused(w.IBP_E_LONG_DURATION):
        c.allocate(alloc(c, MB, 7200), NOW)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.allocate(alloc(c, 11 * MB), NOW)
    with refused(w.IBP_E_INVALID_RID):
        c.allocate(w.Allocate("7", w.IBP_SOFT, w.IBP_BYTEARRAY, 60, MB, 5), NOW)
    with refused(w.IBP_E_INVALID_PARAMETER):
        c.allocate(w.Allocate("0", 9, w.IBP_BYTEARRAY, 60, MB, 5), NOW)
    assert sum(c.refused.values()) == 5 and not c.allocs


def test_exhausted_depot_refuses_then_grants_after_free(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=4 * MB)
    a = c.allocate(alloc(c, 4 * MB, 60), NOW)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.allocate(alloc(c, 1), NOW)
    c.free_alloc(a)
    assert c.allocate(alloc(c, MB, 60), NOW)


def test_store_appends_and_refuses_overflow_and_reads_past_end(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c, 10), NOW)
    store(c, a, b"hello")
    store(c, a, b"world")
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.check_write(a, None, 1)
    assert c.check_read(a, 0, 0) == 10
    assert c.check_read(a, 3, 4) == 4
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.check_read(a, 8, 5)
    with refused(w.IBP_E_INVALID_PARAMETER):
        c.check_read(a, 11, 0)
    with c.open_data(a) as f:
        assert f.read() == b"helloworld"


def test_write_may_not_leave_holes(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c, 100), NOW)
    with refused(w.IBP_E_INVALID_PARAMETER):
        c.check_write(a, 5, 1)
    assert c.check_write(a, 0, 10) == 0


def test_expired_allocations_are_refused_and_reclaimed(tmp_path: Path) -> None:
    c = core(tmp_path)
    short = c.allocate(alloc(c, MB, 10), NOW)
    long = c.allocate(alloc(c, MB, 100), NOW)
    assert c.next_expiry() == NOW + 10
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(short.key, short.read_key, "READ", NOW + 10)
    assert c.expire(NOW + 50) == [short.fid]
    assert not c.store.path(short.fid).exists()
    assert c.reserved == MB and long.fid in c.allocs
    assert c.expire(NOW + 50) == []


def test_manage_probe_incr_decr(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c, 100, 60), NOW)
    store(c, a, b"abc")
    probe = w.Manage(a.key, a.manage_key, w.IBP_PROBE, w.IBP_MANAGECAP, 5)
    assert c.manage(probe, NOW + 10) == (1, 1, 3, 100, 50, w.IBP_SOFT, w.IBP_BYTEARRAY)
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_INCR, w.IBP_READCAP, 5), NOW)
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_DECR, w.IBP_WRITECAP, 5), NOW)
    with refused(w.IBP_E_CAP_ACCESS_DENIED):
        c.check_write(a, None, 1)
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_DECR, w.IBP_READCAP, 5), NOW)
    assert a.fid in c.allocs
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_DECR, w.IBP_READCAP, 5), NOW)
    assert a.fid not in c.allocs  # the last read reference is gone: so is the allocation
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.manage(probe, NOW)


def test_manage_change_extends_and_resizes_under_policy(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB, max_duration=3600)
    a = c.allocate(alloc(c, 100, 60), NOW)
    store(c, a, b"x" * 50)
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_CHNG, w.IBP_MANAGECAP, 5, 0, 1800, 0), NOW)
    assert a.expires == NOW + 1800 and c.next_expiry() == NOW + 1800
    with refused(w.IBP_E_LONG_DURATION):
        c.manage(w.Manage(a.key, a.manage_key, w.IBP_CHNG, w.IBP_MANAGECAP, 5, 0, 7200, 0), NOW)
    with refused(w.IBP_E_WOULD_DAMAGE_DATA):
        c.manage(w.Manage(a.key, a.manage_key, w.IBP_CHNG, w.IBP_MANAGECAP, 5, 10, 0, 0), NOW)
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_CHNG, w.IBP_MANAGECAP, 5, 1000, 0, w.IBP_HARD), NOW)
    assert (a.max_size, a.reliability) == (1000, w.IBP_HARD)


def test_restart_keeps_acknowledged_bytes_and_allocations(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c, 100, 600), NOW)
    store(c, a, b"acknowledged")
    c.manage(w.Manage(a.key, a.manage_key, w.IBP_INCR, w.IBP_READCAP, 5), NOW)
    gone = c.allocate(alloc(c, 100, 600), NOW)
    c.free_alloc(gone)
    # A store cut short by a crash: bytes on disk past the journaled length.
    with c.open_data(a) as f:
        f.seek(12)
        f.write(b"unacknowledged")
    c.store.release()
    again = core(tmp_path, now=NOW + 1)
    b = again.authorize(a.key, a.read_key, "READ", NOW + 1)
    assert (b.size, b.read_refs, b.expires) == (12, 2, NOW + 600)
    with again.open_data(b) as f:
        assert f.read() == b"acknowledged"
    assert list(again.allocs) == [a.fid]
    assert again.admin_key == c.admin_key


def test_restart_survives_a_torn_journal_line_and_drops_expired(tmp_path: Path) -> None:
    c = core(tmp_path)
    a = c.allocate(alloc(c, 100, 600), NOW)
    short = c.allocate(alloc(c, 100, 10), NOW)
    store(c, a, b"abc")
    c.store.release()
    with open(tmp_path / "journal.log", "ab") as f:
        f.write(b'{"op":"set","id":"' + a.fid.encode() + b'","a":{"size":9')  # torn by a crash
    again = core(tmp_path, now=NOW + 60)
    assert again.allocs[a.fid].size == 3
    assert short.fid not in again.allocs and not again.store.path(short.fid).exists()


def test_admin_changes_need_the_admin_key(tmp_path: Path) -> None:
    c = core(tmp_path)
    with refused(w.IBP_E_WRONG_PASSWD):
        c.change("nope", 1, 1)
    c.change(c.admin_key, 200 * MB, 60)
    assert c.status()["capacity"] == 200 * MB and c.status()["max_duration"] == 60
    assert (tmp_path / "admin.key").stat().st_mode & 0o077 == 0


def test_admin_changes_last_across_restart_unless_the_operator_gives_new_values(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=100 * MB, max_duration=3600)
    c.change(c.admin_key, 50 * MB, 60)
    c.store.release()
    again = core(tmp_path, capacity=100 * MB, max_duration=3600)
    assert (again.capacity, again.max_duration) == (50 * MB, 60)
    again.store.release()
    other = core(tmp_path, capacity=200 * MB, max_duration=3600)
    assert (other.capacity, other.max_duration) == (200 * MB, 3600)


def test_capacity_cannot_drop_below_what_is_reserved(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB)
    c.allocate(alloc(c, 4 * MB), NOW)
    with refused(w.IBP_E_WOULD_DAMAGE_DATA):
        c.change(c.admin_key, 3 * MB, 60)


def test_connections_beyond_the_limit_are_refused_at_once(tmp_path: Path) -> None:
    import socket
    import threading

    from apps.ibp.server import DepotServer
    from apps.ibp.stream import TcpStream

    server = DepotServer(core(tmp_path), "d", slots=threading.BoundedSemaphore(1))
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    with a, a_peer, b, b_peer:
        server.start(TcpStream(a_peer), "d")  # takes the only slot, waiting for a request
        server.start(TcpStream(b_peer), "d")
        b.settimeout(5)
        assert b.recv(100).split()[0] == b"-23"
        a.sendall(b"1 4 0 1 - 5\n")  # the first connection is served
        a.settimeout(5)
        assert a.recv(100).split()[0] == b"1"


def test_hard_requests_revoke_soft_allocations_soonest_expiring_first(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB, max_duration=3600)
    late = c.allocate(alloc(c, 4 * MB, 600), NOW)
    early = c.allocate(alloc(c, 4 * MB, 60), NOW)
    hard = c.allocate(w.Allocate("0", w.IBP_HARD, w.IBP_BYTEARRAY, 60, 5 * MB, 5), NOW)
    assert early.fid not in c.allocs and late.fid in c.allocs and hard.fid in c.allocs
    assert c.status()["revoked_soft"] == 1
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):  # soft asks never revoke; nor do hopeless hard ones
        c.allocate(alloc(c, 2 * MB, 60), NOW)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.allocate(w.Allocate("0", w.IBP_HARD, w.IBP_BYTEARRAY, 60, 6 * MB, 5), NOW)
    assert late.fid in c.allocs


class _Captured:
    """A stream for DepotServer.handle: no more input, replies collected."""

    def __init__(self) -> None:
        from apps.ibp.stream import ByteStream

        class S(ByteStream):
            def __init__(inner) -> None:
                super().__init__()
                inner.sent: list[bytes] = []

            def _recv(inner, timeout: float | None) -> bytes:
                return b""

            def _send(inner, data: bytes | memoryview) -> None:
                inner.sent.append(bytes(data))

            def close(inner) -> None:
                pass

        self.stream = S()


def test_fuzzed_request_lines_never_break_the_depot(tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from apps.ibp.server import DepotServer
    from apps.ibp.stream import StreamClosed

    server = DepotServer(core(tmp_path), "d", clock=lambda: NOW)
    a = server.core.allocate(alloc(server.core, 1000, 60), NOW)
    toks = st.sampled_from(["1", "0", "2", "4", "8", "9", "13", "40", "43", "-1", "99999999999", a.key, a.read_key,
                            a.write_key, a.manage_key, "ibp://d/0#k/k/WRITE", "x"])

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.lists(toks, max_size=11).map(lambda t: (" ".join(t) + "\n").encode()),
                     st.binary(max_size=200)))
    def one(line: bytes) -> None:
        cap = _Captured()
        try:
            server.handle(cap.stream, line, "d")
        except StreamClosed:
            return  # a STORE/WRITE accepted, and then its data never came
        assert cap.stream.sent, f"no reply to {line!r}"
        status = int(cap.stream.sent[0].split()[0])
        assert status == 1 or status < 0

    one()
    c = server.core  # whatever the fuzz allocated, changed or freed, the books still balance
    assert c.reserved <= c.capacity
    for x in c.allocs.values():
        assert c.store.path(x.fid).stat().st_size >= x.size and x.size <= x.max_size


def test_one_depot_per_directory(tmp_path: Path) -> None:
    from apps.ibp.storage import DirInUse

    c = core(tmp_path)
    with pytest.raises(DirInUse, match="in use by another depot"):
        DiskStore(tmp_path)
    c.store.release()
    DiskStore(tmp_path).release()
