"""The depot core without flows: admission policy, capabilities kept as hashes, quotas, expiry,
reference counts, persistence and file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from apps.ibp import wire as w
from apps.ibp.capability import key_hash
from apps.ibp.depot import DepotCore, Grant, admit
from apps.ibp.limits import Limits
from apps.ibp.storage import DiskStore
from apps.ibp.stream import ByteStream
from apps.ibp.wire import IbpError

NOW = 1_000_000.0
MB = 1 << 20
ALL = Limits(client_share=1.0)  # one client may take the whole depot: these tests are about the policy


def core(
    tmp_path: Path, capacity: int = 100 * MB, max_duration: int = 86400, now: float = NOW, limits: Limits = ALL
) -> DepotCore:
    return DepotCore(DiskStore(tmp_path), capacity, max_duration, now, limits)


def alloc(size: int = MB, duration: int = 3600, reliability: int = w.IBP_SOFT) -> w.Allocate:
    return w.Allocate("0", reliability, w.IBP_BYTEARRAY, duration, size, 30)


def store(c: DepotCore, g: Grant, data: bytes) -> None:
    a = g.allocation
    start = c.check_write(a, None, len(data))
    with c.open_data(a) as f:
        f.seek(start)
        f.write(data)
    c.commit(a, start + len(data))


def manage(
    g: Grant,
    sub: int,
    captype: int = w.IBP_READCAP,
    size: int = w.KEEP,
    duration: int = w.KEEP,
    reliability: int = w.KEEP,
) -> w.Manage:
    return w.Manage(g.key, g.manage_key, sub, captype, 5, size, duration, reliability)


def refused(status: int) -> pytest.RaisesContext[IbpError]:
    return pytest.raises(IbpError, match=rf"\({w.status_text(status)}, {status}\)")


def test_allocation_gives_three_distinct_256_bit_caps(tmp_path: Path) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(), NOW)
    r, wr, m = g.caps("depot1")
    assert {r.right, wr.right, m.right} == {"READ", "WRITE", "MANAGE"}
    assert len({g.key, g.read_key, g.write_key, g.manage_key}) == 4
    assert all(len(k) == 64 for k in (g.key, g.read_key, g.write_key, g.manage_key))
    assert str(r).startswith("ibp://depot1/0#")


def test_the_depot_keeps_only_hashes_of_keys(tmp_path: Path) -> None:
    """A leaked journal, data directory or memory dump holds no capability."""
    c = core(tmp_path)
    g = c.allocate(alloc(), NOW)
    store(c, g, b"secret")
    keys = (g.key, g.read_key, g.write_key, g.manage_key)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert not any(k.encode() in text for k in keys), path
            assert path.name not in keys
    a = g.allocation
    assert key_hash(g.key) == a.fid and key_hash(g.read_key) == a.read_hash
    assert not any(k in json.dumps(vars(a)) for k in keys)
    # What the journal holds does not open the allocation: its hashes are not keys.
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(a.fid, a.read_hash, "READ", NOW)
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(g.key, a.read_hash, "READ", NOW)


def test_each_command_needs_its_own_right_key(tmp_path: Path) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(), NOW)
    assert c.authorize(g.key, g.read_key, "READ", NOW) is g.allocation
    # A key of another right is -4, as L-Store's depot answers (handle_read/write/manage).
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(g.key, g.write_key, "READ", NOW)
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(g.key, g.read_key, "WRITE", NOW)
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(g.key, g.read_key, "MANAGE", NOW)
    with refused(w.IBP_E_INVALID_RID):
        c.authorize(g.key, g.read_key, "READ", NOW, rid="7")
    assert c.authorize(g.key, g.read_key, "READ", NOW, rid="0") is g.allocation


def _flip_last(k: str) -> str:
    return k[:-1] + ("1" if k[-1] == "0" else "0")


@pytest.mark.parametrize("forge", [lambda k: "X" + k, lambda k: k[:-1], _flip_last, lambda k: k.upper()])
def test_forged_or_truncated_keys_are_refused_and_counted(tmp_path: Path, forge: object) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(), NOW)
    assert callable(forge)
    with pytest.raises(IbpError):
        c.authorize(forge(g.key), g.read_key, "READ", NOW)
    with pytest.raises(IbpError):
        c.authorize(g.key, forge(g.read_key), "READ", NOW)
    assert c.refused.total() == 2


def test_policy_grants_within_free_space_and_max_duration() -> None:
    assert admit(MB, 3600, 100 * MB, 100 * MB, 86400)[0] == w.IBP_OK
    assert admit(100 * MB, 86400, 100 * MB, 100 * MB, 86400)[0] == w.IBP_OK  # an empty depot grants all
    assert admit(MB, 86401, 100 * MB, 100 * MB, 86400)[0] == w.IBP_E_LONG_DURATION
    assert admit(101 * MB, 60, 100 * MB, 100 * MB, 86400)[0] == w.IBP_E_WOULD_EXCEED_LIMIT


def test_policy_favours_small_or_short_asks_as_the_depot_fills() -> None:
    free, cap, maxd = 20 * MB, 100 * MB, 86400
    big_long = admit(10 * MB, 86400, free, cap, maxd)
    assert big_long[0] == w.IBP_E_WOULD_EXCEED_POLICY and "budget" in big_long[1]
    assert admit(10 * MB, 3600, free, cap, maxd)[0] == w.IBP_OK  # same size, shorter
    assert admit(MB, 86400, free, cap, maxd)[0] == w.IBP_OK  # same time, smaller


def test_allocate_refusals_use_l_store_numbers(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB, max_duration=3600)
    with refused(w.IBP_E_TYPE_NOT_SUPPORTED):
        c.allocate(w.Allocate("0", w.IBP_SOFT, w.IBP_FIFO, 60, MB, 5), NOW)
    with refused(w.IBP_E_INVALID_PARAMETER):  # no such type at all
        c.allocate(w.Allocate("0", w.IBP_SOFT, 9, 60, MB, 5), NOW)
    with refused(w.IBP_E_LONG_DURATION):
        c.allocate(alloc(MB, 7200), NOW)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.allocate(alloc(11 * MB), NOW)
    with refused(w.IBP_E_INVALID_RID):
        c.allocate(w.Allocate("7", w.IBP_SOFT, w.IBP_BYTEARRAY, 60, MB, 5), NOW)
    with refused(w.IBP_E_BAD_FORMAT):
        c.allocate(w.Allocate("0", 9, w.IBP_BYTEARRAY, 60, MB, 5), NOW)
    with refused(w.IBP_E_INVALID_PARAMETER):
        c.allocate(alloc(0), NOW)
    with refused(w.IBP_E_INVALID_PARAMETER):
        c.allocate(alloc(MB, 0), NOW)
    assert c.refused.total() == 8 and not c.allocs


def test_duration_minus_one_is_the_longest_the_depot_allows(tmp_path: Path) -> None:
    c = core(tmp_path, max_duration=3600)
    g = c.allocate(alloc(MB, w.FOREVER), NOW)
    assert g.allocation.expires == NOW + 3600


def test_exhausted_depot_refuses_then_grants_after_free(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=4 * MB)
    g = c.allocate(alloc(4 * MB, 60), NOW)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.allocate(alloc(1), NOW)
    c.free_alloc(g.allocation)
    assert c.allocate(alloc(MB, 60), NOW)


def test_store_appends_and_refuses_overflow_and_reads_past_end(tmp_path: Path) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(10), NOW)
    a = g.allocation
    store(c, g, b"hello")
    store(c, g, b"world")
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.check_write(a, None, 1)
    assert c.check_read(a, 0, 0) == 10
    assert c.check_read(a, 3, 4) == 4
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.check_read(a, 8, 5)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):  # L-Store's handle_read: past the data is -19
        c.check_read(a, 11, 0)
    with c.open_data(a) as f:
        assert f.read() == b"helloworld"


def test_a_write_past_the_end_leaves_a_hole_of_zeros_within_the_maximum(tmp_path: Path) -> None:
    """As L-Store's handle_write: only offset + length <= max_size is checked."""
    c = core(tmp_path)
    g = c.allocate(alloc(100), NOW)
    a = g.allocation
    store(c, g, b"abc")
    assert c.check_write(a, 20, 4) == 20
    with c.open_data(a) as f:
        f.seek(20)
        f.write(b"HOLE")
    c.commit(a, 24)
    assert (a.size, c.stored, c.reserved) == (24, 24, 100)
    with c.open_data(a) as f:
        assert f.read() == b"abc" + bytes(17) + b"HOLE"
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.check_write(a, 98, 3)
    assert c.check_write(a, 97, 3) == 97


def test_expired_allocations_are_refused_and_reclaimed(tmp_path: Path) -> None:
    c = core(tmp_path)
    short = c.allocate(alloc(MB, 10), NOW)
    long = c.allocate(alloc(MB, 100), NOW)
    assert c.next_expiry() == NOW + 10
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.authorize(short.key, short.read_key, "READ", NOW + 10)
    assert c.expire(NOW + 50) == [short.allocation.fid]
    assert not c.store.path(short.allocation.fid).exists()
    assert c.reserved == MB and long.allocation.fid in c.allocs
    assert c.expire(NOW + 50) == []


def test_manage_probe_incr_decr(tmp_path: Path) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(100, 60), NOW)
    store(c, g, b"abc")
    probe = manage(g, w.IBP_PROBE, w.IBP_MANAGECAP)
    # L-Store's counts (resource.c): one reader, no writer; a count stops at 0 and never bars a write.
    assert c.manage(probe, NOW + 10) == (1, 0, 3, 100, 50, w.IBP_SOFT, w.IBP_BYTEARRAY)
    c.manage(manage(g, w.IBP_INCR), NOW)
    c.manage(manage(g, w.IBP_DECR, w.IBP_WRITECAP), NOW)
    assert g.allocation.write_refs == 0 and c.check_write(g.allocation, None, 1) == 3
    with refused(w.IBP_E_WRONG_CAP_FORMAT):  # L-Store's handle_manage: a manage count is no count
        c.manage(manage(g, w.IBP_INCR, w.IBP_MANAGECAP), NOW)
    c.manage(manage(g, w.IBP_INCR, w.IBP_WRITECAP), NOW)
    c.manage(manage(g, w.IBP_DECR), NOW)
    c.manage(manage(g, w.IBP_DECR), NOW)
    assert g.allocation.read_refs == 0 and g.allocation.fid in c.allocs  # a writer still holds it
    c.manage(manage(g, w.IBP_DECR, w.IBP_WRITECAP), NOW)
    assert g.allocation.fid not in c.allocs  # both counts are 0: the allocation is gone
    with refused(w.IBP_E_CAP_NOT_FOUND):
        c.manage(probe, NOW)


def test_manage_change_extends_and_resizes_under_policy(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB, max_duration=3600)
    g = c.allocate(alloc(100, 60), NOW)
    a = g.allocation
    store(c, g, b"x" * 50)
    c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, duration=1800), NOW)
    assert a.expires == NOW + 1800 and c.next_expiry() == NOW + 1800
    # As L-Store's handle_manage, the answer is -45 or -20 but the rest is made (here: the maximum).
    with refused(w.IBP_E_WOULD_EXCEED_POLICY):
        c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, duration=7200, reliability=w.IBP_HARD), NOW)
    assert (a.expires, a.reliability) == (NOW + 3600, w.IBP_HARD)
    with refused(w.IBP_E_WOULD_DAMAGE_DATA):
        c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=10, duration=1800), NOW)
    assert (a.max_size, a.expires) == (100, NOW + 1800)
    c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=1000, reliability=w.IBP_HARD), NOW)
    assert (a.max_size, a.reliability, a.expires) == (1000, w.IBP_HARD, NOW + 1800)
    assert (c.reserved, c.hard_reserved) == (1000, 1000)


def test_restart_keeps_acknowledged_bytes_and_allocations(tmp_path: Path) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(100, 600), NOW)
    store(c, g, b"acknowledged")
    c.manage(manage(g, w.IBP_INCR), NOW)
    gone = c.allocate(alloc(100, 600), NOW)
    c.free_alloc(gone.allocation)
    # A store cut short by a crash: bytes on disk past the journaled length.
    with c.open_data(g.allocation) as f:
        f.seek(12)
        f.write(b"unacknowledged")
    c.store.release()
    again = core(tmp_path, now=NOW + 1)
    b = again.authorize(g.key, g.read_key, "READ", NOW + 1)
    assert (b.size, b.read_refs, b.expires) == (12, 2, NOW + 600)
    with again.open_data(b) as f:
        assert f.read() == b"acknowledged"
    assert list(again.allocs) == [g.allocation.fid]
    assert again.admin_key == c.admin_key
    assert (again.reserved, again.stored) == (100, 12)


def lose_last_record(c: DepotCore, path: Path) -> None:
    """A crash before the last journal record reached the disk: the depot gone, the record too."""
    c.store.release()
    journal = path / "journal.log"
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:-1]))


def test_a_restart_drops_an_allocation_whose_free_had_begun(tmp_path: Path) -> None:
    """A free removes the data file at once, its record reaching the disk with the next sync: an
    allocation recorded live whose bytes are gone was being freed, and stays freed (never back with
    zeros for its data). One with no bytes is kept, with a new empty file, as nothing is lost."""
    c = core(tmp_path)
    freed, empty, kept = (c.allocate(alloc(100, 600), NOW) for _ in range(3))
    store(c, freed, b"some bytes")
    store(c, kept, b"kept")
    c.store.remove(empty.allocation.fid)
    c.free_alloc(freed.allocation)
    lose_last_record(c, tmp_path)
    again = core(tmp_path, now=NOW + 1)
    assert freed.allocation.fid not in again.allocs and empty.allocation.fid in again.allocs
    with refused(w.IBP_E_CAP_NOT_FOUND):
        again.authorize(freed.key, freed.read_key, "READ", NOW + 1)
    with again.open_data(again.allocs[kept.allocation.fid]) as f:
        assert f.read() == b"kept"
    assert (again.reserved, again.stored) == (200, 4)


def test_a_restart_keeps_a_file_cut_by_a_truncate_as_cut(tmp_path: Path) -> None:
    """A TRUNCATE cuts the data at once, its record reaching the disk with the next sync: a file
    shorter than its record was cut, and the allocation keeps the bytes it has (never zeros after)."""
    c = core(tmp_path)
    g = c.allocate(alloc(100, 600), NOW)
    store(c, g, b"0123456789")
    c.manage(w.Manage(g.key, g.manage_key, w.IBP_TRUNCATE, 0, 5, 4), NOW)
    lose_last_record(c, tmp_path)
    again = core(tmp_path, now=NOW + 1)
    a = again.authorize(g.key, g.read_key, "READ", NOW + 1)
    assert (a.size, again.stored) == (4, 4)
    with again.open_data(a) as f:
        assert f.read() == b"0123"


def test_after_a_failed_journal_sync_the_journal_is_rewritten_before_the_next_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync may have lost records a later one would not report (fsyncgate): no later change
    is durable until the journal is rewritten from memory, which the next change does first."""
    c = core(tmp_path)
    g = c.allocate(alloc(100, 600), NOW)
    c.store.durable(c.store.written)
    c.manage(manage(g, w.IBP_INCR), NOW)

    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", eio)
        with pytest.raises(OSError):
            c.store.durable(c.store.written)
    with pytest.raises(OSError, match="rewritten"):  # nothing is durable now, not even by a later fsync
        c.store.durable(c.store.written)
    c.manage(manage(g, w.IBP_INCR), NOW)
    c.store.durable(c.store.written)
    assert len((tmp_path / "journal.log").read_bytes().splitlines()) == 2  # rewritten, then the INCR
    c.store.release()
    assert core(tmp_path, now=NOW + 1).allocs[g.allocation.fid].read_refs == 3


def test_restart_survives_a_torn_journal_line_and_drops_expired(tmp_path: Path) -> None:
    c = core(tmp_path)
    g = c.allocate(alloc(100, 600), NOW)
    short = c.allocate(alloc(100, 10), NOW)
    store(c, g, b"abc")
    c.store.release()
    with open(tmp_path / "journal.log", "ab") as f:
        f.write(b'{"op":"set","id":"x","a":[1]}\n{"op":"alloc"}\n')  # corrupt records
        f.write(b'{"op":"set","id":"' + g.allocation.fid.encode() + b'","a":{"size":9')  # torn by a crash
    again = core(tmp_path, now=NOW + 60)
    assert again.allocs[g.allocation.fid].size == 3
    assert short.allocation.fid not in again.allocs and not again.store.path(short.allocation.fid).exists()


def test_a_journal_with_clear_keys_is_converted_to_hashes(tmp_path: Path) -> None:
    """Journals written before keys were hashed still open, and are rewritten without keys."""
    DiskStore(tmp_path).release()
    keys = {"key": "k" * 64, "read_key": "r" * 64, "write_key": "w" * 64, "manage_key": "m" * 64}
    rec = {**keys, "reliability": 1, "type": 1, "max_size": 10, "expires": NOW + 60, "size": 0}
    (tmp_path / "journal.log").write_text(json.dumps({"op": "alloc", "id": key_hash("k" * 64), "a": rec}) + "\n")
    c = core(tmp_path)
    assert c.authorize("k" * 64, "r" * 64, "READ", NOW)
    assert b"rrrr" not in (tmp_path / "journal.log").read_bytes()


def test_admin_changes_need_the_admin_key(tmp_path: Path) -> None:
    c = core(tmp_path)
    with refused(w.IBP_E_WRONG_PASSWD):
        c.change("nope", 1, 1)
    c.change(c.admin_key, 200 * MB, 60)
    assert c.status()["capacity"] == 200 * MB and c.status()["max_duration"] == 60


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
    c.allocate(alloc(4 * MB), NOW)
    with refused(w.IBP_E_WOULD_DAMAGE_DATA):
        c.change(c.admin_key, 3 * MB, 60)


def test_hard_requests_revoke_soft_allocations_soonest_expiring_first(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=10 * MB, max_duration=3600)
    late = c.allocate(alloc(4 * MB, 600), NOW).allocation
    early = c.allocate(alloc(4 * MB, 60), NOW).allocation
    hard = c.allocate(alloc(5 * MB, 60, w.IBP_HARD), NOW).allocation
    assert early.fid not in c.allocs and late.fid in c.allocs and hard.fid in c.allocs
    assert c.status()["revoked_soft"] == 1
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):  # soft asks never revoke; nor do hopeless hard ones
        c.allocate(alloc(2 * MB, 60), NOW)
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):
        c.allocate(alloc(6 * MB, 60, w.IBP_HARD), NOW)
    assert late.fid in c.allocs


def test_per_client_quotas(tmp_path: Path) -> None:
    limits = Limits(client_share=0.5, client_allocations=3, max_allocations=5)
    c = core(tmp_path, capacity=10 * MB, limits=limits)
    c.allocate(alloc(4 * MB, 60), NOW, "uid:1")
    with refused(w.IBP_E_WOULD_EXCEED_POLICY):  # beyond half the depot
        c.allocate(alloc(2 * MB, 60), NOW, "uid:1")
    assert c.allocate(alloc(2 * MB, 60), NOW, "uid:2")  # another client's share is its own
    c.allocate(alloc(1, 60), NOW, "uid:1")
    c.allocate(alloc(1, 60), NOW, "uid:1")
    with refused(w.IBP_E_WOULD_EXCEED_POLICY):  # three allocations each
        c.allocate(alloc(1, 60), NOW, "uid:1")
    c.allocate(alloc(1, 60), NOW, "uid:3")
    with refused(w.IBP_E_WOULD_EXCEED_LIMIT):  # five in all
        c.allocate(alloc(1, 60), NOW, "uid:4")
    assert c.owned == {"uid:1": 3, "uid:2": 1, "uid:3": 1}


def test_running_totals_match_a_recount_after_every_kind_of_change(tmp_path: Path) -> None:
    c = core(tmp_path, capacity=100 * MB)
    grants = [
        c.allocate(alloc(MB * (i + 1), 60 * (i + 1), w.IBP_HARD if i % 2 else w.IBP_SOFT), NOW, f"c{i % 3}")
        for i in range(6)
    ]
    store(c, grants[0], b"x" * 100)
    c.manage(manage(grants[1], w.IBP_CHNG, w.IBP_MANAGECAP, size=3 * MB, reliability=w.IBP_SOFT), NOW)
    c.manage(manage(grants[2], w.IBP_DECR), NOW)
    c.expire(NOW + 61)

    def recount() -> tuple[int, int, int, dict[str, int]]:
        live = list(c.allocs.values())
        owners: dict[str, int] = {}
        for a in live:
            owners[a.owner] = owners.get(a.owner, 0) + a.max_size
        return (
            sum(a.max_size for a in live),
            sum(a.max_size for a in live if a.reliability == w.IBP_HARD),
            sum(a.size for a in live),
            owners,
        )

    assert (c.reserved, c.hard_reserved, c.stored, dict(c.owned_bytes)) == recount()


def test_depot_directory_0700_and_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        c = core(tmp_path / "d")
        g = c.allocate(alloc(10), NOW)
        store(c, g, b"x")
        c.change(c.admin_key, 200 * MB, 60)
    finally:
        os.umask(old)
    root = tmp_path / "d"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "data").stat().st_mode) == 0o700
    files = [p for p in root.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"journal.log", "admin.key", "settings.json", "lock", g.allocation.fid}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [(p, oct(p.stat().st_mode)) for p in files]


def test_loose_modes_are_tightened_and_another_users_directory_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    root.mkdir(mode=0o777)
    (root / "data").mkdir(mode=0o777)
    os.chmod(root, 0o777)
    DiskStore(root).release()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory another user owns")
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to uid 65534"):
        DiskStore(other)


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_depot_keeps_nothing_under_a_directory_another_user_may_change() -> None:
    """Root's depot took `--dir /tmp/theirs/depot1` where uid 65534 had made /tmp/theirs (the demo's
    config, booted by hand, names /tmp/ouroboros-demo/depot1): its own 0700 directory passed, and the
    user swapped it for one of theirs while the depot ran; every later allocation's data went there.
    Refused now; a depot's directory in sticky /tmp itself, and a user's depot in its own, still work."""
    theirs = Path(tempfile.mkdtemp(prefix="ibp-theirs-", dir="/tmp"))
    ours = Path(tempfile.mkdtemp(prefix="ibp-ours-", dir="/tmp"))
    try:
        os.chown(theirs, 65534, 65534)
        with pytest.raises(PermissionError, match="uid 65534"):
            DiskStore(theirs / "depot1")
        assert not (theirs / "depot1" / "data").exists()
        DiskStore(ours / "depot1").release()  # root's, below root's own directory
        sticky = Path(f"/tmp/ibp-depot-{os.getpid()}")
        try:
            DiskStore(sticky).release()  # root's, straight in /tmp
        finally:
            shutil.rmtree(sticky, ignore_errors=True)
        code = (
            "import sys; from pathlib import Path; from apps.ibp.storage import DiskStore; "
            "DiskStore(Path(sys.argv[1])).release(); print('ok')"
        )
        r = subprocess.run(  # the user's own depot, in its own directory
            [*AS_NOBODY, sys.executable, "-c", code, str(theirs / "mine")],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        assert r.stdout.strip() == "ok", r.stdout + r.stderr
    finally:
        shutil.rmtree(theirs, ignore_errors=True)
        shutil.rmtree(ours, ignore_errors=True)


class Collect(ByteStream):
    """A stream for DepotServer.handle: no more input, replies collected."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    def _recv(self, timeout: float | None) -> bytes:
        return b""

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.sent.append(bytes(data))

    def close(self) -> None:
        pass


def test_fuzzed_request_lines_never_break_the_depot(tmp_path: Path) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from apps.ibp.server import DepotServer
    from apps.ibp.stream import StreamClosed

    server = DepotServer(core(tmp_path), "d", clock=lambda: NOW)
    g = server.core.allocate(alloc(1000, 60), NOW)
    toks = st.sampled_from(
        [
            "1",
            "0",
            "2",
            "4",
            "5",
            "8",
            "9",
            "13",
            "40",
            "43",
            "-1",
            "99999999999",
            g.key,
            "0#" + g.key,
            g.read_key,
            g.write_key,
            g.manage_key,
            "ibp://d/0#k/k/WRITE",
            "x",
        ]
    )

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.lists(toks, max_size=11).map(lambda t: (" ".join(t) + "\n").encode()), st.binary(max_size=200)))
    def one(line: bytes) -> None:
        cap = Collect()
        try:
            server.handle(cap, line, "d")
        except StreamClosed:
            return  # a STORE/WRITE accepted (or ST_CHANGE's second line awaited), and nothing came
        assert cap.sent, f"no reply to {line!r}"
        status = int(cap.sent[0].split()[0])
        assert status == 1 or status < 0

    one()
    c = server.core  # whatever the fuzz allocated, changed or freed, the books still balance
    assert c.reserved <= c.capacity
    assert c.reserved == sum(a.max_size for a in c.allocs.values())
    for x in c.allocs.values():
        assert c.store.path(x.fid).stat().st_size >= x.size and x.size <= x.max_size


def test_one_depot_per_directory(tmp_path: Path) -> None:
    from apps.ibp.storage import DirInUse

    c = core(tmp_path)
    with pytest.raises(DirInUse, match="in use by another depot"):
        DiskStore(tmp_path)
    c.store.release()
    DiskStore(tmp_path).release()


class _NoScan(dict):  # type: ignore[type-arg]
    """The allocation table, refusing to be walked: admission must not sum over it."""

    def values(self):  # type: ignore[no-untyped-def]
        raise AssertionError("admission walked every allocation")

    __iter__ = items = values  # type: ignore[assignment]


def test_admission_accounting_never_walks_the_allocations(tmp_path: Path) -> None:
    c = core(tmp_path, limits=Limits(client_share=0.5))
    for _ in range(50):
        c.allocate(alloc(1000, 60), NOW, "uid:1")
    c.allocs = _NoScan(c.allocs)
    g = c.allocate(alloc(1000, 60), NOW, "uid:1")  # admission, quotas, totals: all from running sums
    store(c, g, b"x")
    c.manage(manage(g, w.IBP_CHNG, w.IBP_MANAGECAP, size=2000, duration=120), NOW)
    c.manage(manage(g, w.IBP_DECR), NOW)
    assert c.status()["allocations"] == 50 and c.reserved == 50 * 1000


def test_connection_slots_per_client_and_in_all() -> None:
    from apps.ibp.limits import Busy, Slots

    slots = Slots(total=3, per_client=2)
    a, b = slots.take("uid:1", 0.0), slots.take("uid:1", 0.0)
    with pytest.raises(Busy, match="2 connections from this client"):
        slots.take("uid:1", 100.0)  # one uid is one user: its idle connections keep their slots
    c = slots.take("uid:2")
    with pytest.raises(Busy, match="3 connections already"):
        slots.take("uid:3")
    slots.give(a)
    d = slots.take("uid:3")
    assert slots.count() == 3
    for t in (b, c, d):
        slots.give(t)
    assert slots.count() == 0 and not slots.held


def test_a_shared_identity_gives_the_slot_idle_longest_to_a_new_connection() -> None:
    """Behind a layer's name many users look alike: a new connection takes the slot of the one idle
    longest (past the grace), never one busy in a request; that connection learns it gave way."""
    from apps.ibp.limits import IDLE_GRACE, Busy, Slots

    slots = Slots(total=8, per_client=2)
    old, busy = slots.take("layer:net", 0.0), slots.take("layer:net", 5.0)
    assert slots.busy(busy)
    with pytest.raises(Busy):
        slots.take("layer:net", IDLE_GRACE / 2)  # the idle one is within its grace (between requests)
    woken: list[bool] = []
    old.wake = lambda: woken.append(True)
    new = slots.take("layer:net", 10.0)
    assert old.evicted and woken and not slots.busy(old) and slots.busy(new)
    assert slots.count() == 3  # the old connection counts until its thread is gone
    slots.give(old)  # its connection closes: the slot it gave away stays the new one's
    assert slots.count() == 2
    with pytest.raises(Busy):
        slots.take("layer:net", 20.0)  # both busy: nobody gives way
    for t in (busy, new):
        slots.give(t)
    assert slots.count() == 0 and not slots.held


@pytest.mark.parametrize(
    ("dest", "patterns", "allowed"),
    [
        ("depot2", (), True),
        ("10.0.0.5:6714", (), False),
        ("127.0.0.1:22", (), False),
        ("depot2", ("depot*",), True),
        ("other", ("depot*",), False),
        ("10.0.0.5:6714", ("depot*",), False),
        ("10.0.0.5:6714", ("10.0.0.*:6714",), True),
        ("10.0.0.5:22", ("10.0.0.*:6714",), False),
        ("depot2", ("10.0.0.*:6714",), False),  # a list of addresses only: names too must be listed
    ],
)
def test_copy_targets(dest: str, patterns: tuple[str, ...], allowed: bool) -> None:
    from apps.ibp.limits import copy_target

    assert (copy_target(dest, patterns) is not None) is allowed


def test_limits_from_the_command_line() -> None:
    from apps.ibp.cli import parser
    from apps.ibp.limits import from_args

    args = parser().parse_args(
        [
            "depot",
            "--name",
            "d",
            "--dir",
            "x",
            "--client-connections",
            "3",
            "--copy-to",
            "depot*",
            "--copy-to",
            "10.0.0.1:6714",
            "--max-timeout",
            "9",
        ]
    )
    lim = from_args(args)
    assert (lim.client_connections, lim.max_timeout, lim.copy_to) == (3, 9, ("depot*", "10.0.0.1:6714"))
    assert lim.max_connections == Limits().max_connections
    assert lim.timeout(0) == 2 and lim.timeout(5) == 5 and lim.timeout(10**9) == 9
    for bad in (["--client-share", "0"], ["--client-share", "1.5"], ["--max-connections", "0"]):
        with pytest.raises(ValueError):
            from_args(parser().parse_args(["depot", "--name", "d", "--dir", "x", *bad]))


def test_a_local_tcp_client_is_known_by_its_uid() -> None:
    import socket

    from apps.ibp.peer import tcp_identity

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        with socket.create_connection(srv.getsockname()) as c:
            conn, _ = srv.accept()
            with conn:
                assert tcp_identity(conn) == f"uid:{os.geteuid()}"
                assert c.fileno() >= 0
