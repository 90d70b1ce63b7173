"""The depot's core, without sockets or flows: allocations, capabilities, admission policy,
per-client quotas, expiry, reference counts, persistence through DiskStore. Time is a parameter.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO

from sortedcontainers import SortedList

from apps.ibp import wire as w
from apps.ibp.capability import MANAGE, READ, WRITE, Capability, key_hash, keys_equal, new_key
from apps.ibp.limits import Limits
from apps.ibp.storage import DiskStore
from apps.ibp.wire import IbpError
from transports.ratelog import RateLog

log = logging.getLogger(__name__)
_disk_log = RateLog(rate=0.1, burst=3, logger=log)  # a full disk would otherwise log on every change
# SOFT allocations revoked for HARD ones: a client makes both kinds at will (a line per revoked one let a
# client's one HARD request write as many lines as it had made SOFT allocations, 10,000 at its quota).
_revoked_log = RateLog(rate=1.0, burst=5, logger=log)

RID = "0"  # our depots have one resource
MAX_REFS = 1_000_000


@dataclass
class Allocation:
    """What the depot keeps of an allocation: hashes of its keys, never the keys themselves."""

    fid: str  # the SHA-256 of the allocation's key: its name on disk and in memory
    read_hash: str  # the SHA-256 of each right's key
    write_hash: str
    manage_hash: str
    reliability: int
    type: int
    max_size: int
    expires: float
    size: int = 0
    # L-Store's counts (resource.c): one reader, no writer; freed once both are 0 (see manage)
    read_refs: int = 1
    write_refs: int = 0
    owner: str = ""  # the client that made it, for its quotas
    refs: int = 2  # the rules its counts follow: 2 L-Store's; records without it had a write count from 1

    def right_hash(self, right: str) -> str:
        return {READ: self.read_hash, WRITE: self.write_hash, MANAGE: self.manage_hash}[right]


@dataclass(frozen=True)
class Grant:
    """A new allocation and its keys, which leave the depot once, in the ALLOCATE reply."""

    allocation: Allocation
    key: str
    read_key: str
    write_key: str
    manage_key: str

    def caps(self, depot: str) -> tuple[Capability, Capability, Capability]:
        return (
            Capability(depot, RID, self.key, self.read_key, READ),
            Capability(depot, RID, self.key, self.write_key, WRITE),
            Capability(depot, RID, self.key, self.manage_key, MANAGE),
        )


def admit(size: int, duration: int, free: int, capacity: int, max_duration: int) -> tuple[int, str]:
    """The admission policy on size x duration: (IBP_OK, "") or (status, reason).

    An empty depot grants anything within its free space and maximum duration; as it fills, the
    size x duration budget shrinks with the square of the free fraction, so large and long asks
    are refused first while small or short ones still get through.
    """
    if duration > max_duration:
        return w.IBP_E_LONG_DURATION, f"duration {duration} s exceeds the depot's maximum of {max_duration} s"
    if size > free:
        return w.IBP_E_WOULD_EXCEED_LIMIT, f"size {size} exceeds the free space of {free} bytes"
    if capacity <= 0 or size * duration * capacity > free * free * max_duration:
        budget = free * free * max_duration // capacity if capacity > 0 else 0
        return (
            w.IBP_E_WOULD_EXCEED_POLICY,
            f"size x duration {size * duration} exceeds the policy budget of {budget} byte-seconds now",
        )
    return w.IBP_OK, ""


class DepotCore:
    def __init__(
        self, store: DiskStore, capacity: int, max_duration: int, now: float, limits: Limits | None = None
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.capacity = capacity
        self.max_duration = max_duration
        self._given = [capacity, max_duration]
        saved = store.settings()
        # Admin changes last across restarts, unless the operator starts the depot with other values.
        if saved.get("given") == self._given and isinstance(saved.get("admin"), list) and len(saved["admin"]) == 2:
            cap, maxd = saved["admin"]
            if isinstance(cap, int) and isinstance(maxd, int) and cap >= 0 and maxd > 0:
                self.capacity, self.max_duration = cap, maxd
        self.admin_key = store.admin_key()
        self.allocs: dict[str, Allocation] = {}
        self.expiry: SortedList = SortedList()  # (expires, fid)
        self.softs: SortedList = SortedList()  # (expires, fid) of SOFT ones: what a HARD request may revoke
        self.refused: Counter[int] = Counter()
        self.revoked = 0  # SOFT allocations given up for HARD ones
        # Running totals, kept as allocations change, so admission never sums over them all.
        self.reserved = self.hard_reserved = self.soft_reserved = self.stored = 0
        self.owned: Counter[str] = Counter()  # allocations per client
        self.owned_bytes: Counter[str] = Counter()  # bytes reserved per client
        self._recover(now)

    # -- persistence --

    def _recover(self, now: float) -> None:
        for fid, rec in self.store.load().items():
            a = _record(fid, rec)
            if a is None:
                log.warning("allocation record %s is incomplete; dropped", fid[:12])
                continue
            if not self._settle(a):
                continue
            self.allocs[fid] = a
            self._account(a, 1)
            self.store.fit(fid, a.size, a.max_size)  # nothing unacknowledged, no blocks past its end
        for orphan in self.store.orphans(set(self.allocs)):
            self.store.remove(orphan)
        self.store.compact(self._records())
        self.expire(now)
        if self.allocs:
            log.info("recovered %d allocations, %d bytes", len(self.allocs), self.stored)

    def _settle(self, a: Allocation) -> bool:
        """Whether `a`, as recorded, is still live, given its data file. A change is on disk only once
        a later fsync covers its record (group commit), while a free removes the file and a TRUNCATE
        cuts it at once: a file gone though `a` holds bytes was being freed, and a file shorter than
        `a` was cut, by a request the crash left unanswered. Its file is taken as the truth, so no
        allocation comes back with zeros for data."""
        try:
            length = self.store.path(a.fid).stat().st_size
        except FileNotFoundError:
            if a.size > 0:
                log.info("allocation %s was being freed; dropped", a.fid[:12])
                return False
            return True  # nothing to lose: it gets a new, empty file
        if length < a.size:
            log.info("allocation %s was being cut to %d bytes; kept so", a.fid[:12], length)
            a.size = length
        return True

    def _append(self, record: dict[str, Any]) -> None:
        """Journal `record`; after a failed fsync, the journal is first rewritten from memory, on
        disk, so that nothing is acknowledged on top of records that may be lost."""
        if self.store.failed:
            self.store.compact(self._records())
        self.store.append(record)

    def _records(self) -> dict[str, dict[str, Any]]:
        return {fid: dataclasses.asdict(a) for fid, a in self.allocs.items()}

    def _journal_set(self, a: Allocation, **changes: Any) -> None:
        """Change `a`, journal first: a failed append (a full disk) leaves memory as the journal has it."""
        self._append({"op": "set", "id": a.fid, "a": changes})
        self._account(a, -1)
        for k, v in changes.items():
            setattr(a, k, v)
        self._account(a, 1)
        self._tidy_journal()

    def _tidy_journal(self) -> None:
        """Rewrite the journal once superseded lines outnumber live ones (storage.needs_compaction), so
        it does not grow with every change a client makes; called once memory matches the journal."""
        if not self.store.needs_compaction(len(self.allocs)):
            return
        try:
            self.store.compact(self._records())
        except OSError as e:  # the old journal stays, complete; tried again on a later change
            _disk_log.log("journal compaction failed: %s", e, level=logging.WARNING)

    # -- accounting --

    def _account(self, a: Allocation, sign: int) -> None:
        """Add (1) or take away (-1) `a` in the running totals and the indexes by expiry."""
        self.reserved += sign * a.max_size
        self.stored += sign * a.size
        if a.reliability == w.IBP_HARD:
            self.hard_reserved += sign * a.max_size
        else:
            self.soft_reserved += sign * a.max_size
        entry = (a.expires, a.fid)
        if sign > 0:
            self.expiry.add(entry)
            if a.reliability != w.IBP_HARD:
                self.softs.add(entry)
        else:
            self.expiry.discard(entry)
            self.softs.discard(entry)
        self.owned[a.owner] += sign
        self.owned_bytes[a.owner] += sign * a.max_size
        if self.owned[a.owner] <= 0:
            del self.owned[a.owner], self.owned_bytes[a.owner]

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.reserved)

    def refuse(self, status: int, reason: str) -> IbpError:
        self.refused[status] += 1
        return IbpError(status, reason)

    def _check_quota(self, owner: str, more_allocs: int, more_bytes: int) -> None:
        """The per-client and per-depot bounds on what one client may hold."""
        lim = self.limits
        if more_allocs and len(self.allocs) >= lim.max_allocations:
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"the depot holds {lim.max_allocations} allocations")
        if more_allocs and self.owned[owner] >= lim.client_allocations:
            raise self.refuse(
                w.IBP_E_WOULD_EXCEED_POLICY, f"this client holds {lim.client_allocations} allocations already"
            )
        share = int(self.capacity * lim.client_share)  # a share of 1 leaves it to the admission policy
        if lim.client_share < 1 and more_bytes > 0 and self.owned_bytes[owner] + more_bytes > share:
            raise self.refuse(
                w.IBP_E_WOULD_EXCEED_POLICY, f"this client would hold more than its share of {share} bytes"
            )

    # -- operations --

    def allocate(self, req: w.Allocate, now: float, owner: str = "") -> Grant:
        if req.rid not in ("", RID):  # "": IBPv031 names none
            raise self.refuse(w.IBP_E_INVALID_RID, f"no resource {req.rid!r} (this depot has {RID!r})")
        if req.reliability not in (w.IBP_SOFT, w.IBP_HARD):
            raise self.refuse(w.IBP_E_BAD_FORMAT, f"reliability {req.reliability} (want 1 soft or 2 hard)")
        if req.type not in w.TYPES:
            raise self.refuse(w.IBP_E_INVALID_PARAMETER, f"allocation type {req.type}")
        if req.type != w.IBP_BYTEARRAY:
            raise self.refuse(w.IBP_E_TYPE_NOT_SUPPORTED, f"allocation type {req.type} (only BYTEARRAY is served)")
        # As L-Store's read_allocate: the duration, then the size, which it reads unsigned (a
        # negative one is more than any depot holds).
        if req.duration == 0:
            raise self.refuse(w.IBP_E_INVALID_PARAMETER, "duration must be positive (or -1: the longest allowed)")
        if req.size == 0:
            raise self.refuse(w.IBP_E_INVALID_PARAMETER, "size must be positive")
        if not 0 < req.size <= w.MAX_INT:  # read unsigned (wire._u64): past any depot
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"size {req.size}, read unsigned, exceeds any depot")
        if req.size > self.capacity:  # never to be had, whatever a client's share: L-Store's "exceeds", -19
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"size {req.size} exceeds the depot's {self.capacity} bytes")
        duration = self.max_duration if req.duration == w.FOREVER else req.duration
        self._check_quota(owner, 1, req.size)
        status, reason = admit(req.size, duration, self.free, self.capacity, self.max_duration)
        if status in (w.IBP_E_WOULD_EXCEED_LIMIT, w.IBP_E_WOULD_EXCEED_POLICY) and req.reliability == w.IBP_HARD:
            status = self._revoke_soft_for(req.size, duration, status)
        if status != w.IBP_OK:
            raise self.refuse(status, reason)
        key, rkey, wkey, mkey = new_key(), new_key(), new_key(), new_key()
        a = Allocation(
            key_hash(key),
            key_hash(rkey),
            key_hash(wkey),
            key_hash(mkey),
            req.reliability,
            req.type,
            req.size,
            now + duration,
            owner=owner,
        )
        self.store.create(a.fid, a.max_size)
        self._append({"op": "alloc", "id": a.fid, "a": dataclasses.asdict(a)})
        self.allocs[a.fid] = a
        self._account(a, 1)
        self._tidy_journal()
        return Grant(a, key, rkey, wkey, mkey)

    def _revoke_soft_for(self, size: int, duration: int, status: int) -> int:
        """Make room for a HARD request by revoking SOFT allocations, those expiring first first;
        nothing is revoked unless enough would be freed. From the running total of SOFT space and the
        SOFT index: only the allocations revoked are looked at, never all of them."""
        if admit(size, duration, self.free + self.soft_reserved, self.capacity, self.max_duration)[0] != w.IBP_OK:
            return status
        free, victims = self.free, []
        for _, fid in self.softs:  # admission grows with free space: this ends before the index does
            if admit(size, duration, free, self.capacity, self.max_duration)[0] == w.IBP_OK:
                break
            a = self.allocs[fid]
            free += a.max_size
            victims.append(a)
        for a in victims:
            self.free_alloc(a)
        self.revoked += len(victims)
        if victims:
            _revoked_log.log("revoked %d soft allocations (%d bytes) for a hard one of %d bytes", len(victims),
                             sum(a.max_size for a in victims), size)  # fmt: skip
        return w.IBP_OK

    def authorize(self, key: str, typekey: str, right: str, now: float, rid: str = "") -> Allocation:
        """The allocation `key` names if `typekey` is its `right` key; refusals are counted. A key of
        another right is -4 as any unknown capability, as L-Store's depot answers (it finds an
        allocation by the right's own key): nothing tells a holder of one right the others exist."""
        if rid not in ("", RID):
            raise self.refuse(w.IBP_E_INVALID_RID, f"no resource {rid!r} (this depot has {RID!r})")
        a = self.allocs.get(key_hash(key))
        if a is None or a.expires <= now:
            raise self.refuse(w.IBP_E_CAP_NOT_FOUND, "no such allocation (wrong, expired or freed capability)")
        if not keys_equal(key_hash(typekey), a.right_hash(right)):
            raise self.refuse(w.IBP_E_CAP_NOT_FOUND, f"no such {right} capability")
        return a

    def check_write(self, a: Allocation, offset: int | None, length: int) -> int:
        """Where a store (offset None: append) or write of `length` bytes goes; refuses overflows.

        As L-Store's handle_write: only the allocation's maximum size bounds a write (the write
        count is not looked at), and one past the end leaves a hole that reads as zeros. The hole
        is inside the blocks reserved for the allocation, so it takes no space it did not promise."""
        start = a.size if offset is None else offset
        if length <= 0:
            raise self.refuse(w.IBP_E_INV_PAR_SIZE, "nothing to write")
        if start + length > a.max_size:
            raise self.refuse(
                w.IBP_E_WOULD_EXCEED_LIMIT, f"{length} bytes at {start} exceed the allocation's {a.max_size} bytes"
            )
        return start

    def commit(self, a: Allocation, end: int) -> None:
        """Acknowledge bytes up to `end` (already written and fsync'd by the caller)."""
        if end > a.max_size:  # the allocation shrank (CHNG, TRUNCATE) while the bytes were arriving
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"the allocation now ends at {a.max_size}")
        if end > a.size:
            self._journal_set(a, size=end)

    def check_read(self, a: Allocation, offset: int, length: int) -> int:
        """How many bytes a read of `length` at `offset` returns (length 0, MCOPY's: up to the end);
        a range past the data is -19, as L-Store's handle_read answers."""
        if offset > a.size:
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"offset {offset} is past the end of the data ({a.size})")
        if length == 0:
            return a.size - offset
        if offset + length > a.size:
            raise self.refuse(
                w.IBP_E_WOULD_EXCEED_LIMIT, f"{length} bytes at {offset} go past the end of the data ({a.size} bytes)"
            )
        return length

    def open_data(self, a: Allocation) -> BinaryIO:
        return self.store.open(a.fid)

    def discard(self, a: Allocation) -> None:
        """Cut off what a failed store or write left past the acknowledged end, so that a later write
        further on leaves zeros there, never those bytes."""
        if self.allocs.get(a.fid) is a:
            self.store.fit(a.fid, a.size, a.max_size)

    def manage(self, req: w.Manage, now: float) -> tuple[object, ...]:
        """MANAGE with the manage key: PROBE's fields, or () after INCR, DECR, CHNG."""
        a = self.authorize(req.key, req.typekey, MANAGE, now, req.rid)
        if req.subcmd == w.IBP_PROBE:
            return (a.read_refs, a.write_refs, a.size, a.max_size, max(0, int(a.expires - now)), a.reliability, a.type)
        if req.subcmd in (w.IBP_INCR, w.IBP_DECR):
            return self._count(a, req)
        if req.subcmd == w.IBP_CHNG:
            return self._change(a, req, now)
        if req.subcmd == w.IBP_TRUNCATE:
            return self._truncate(a, req.size, now)
        raise self.refuse(w.IBP_E_BAD_FORMAT, f"MANAGE sub-command {req.subcmd}")

    def _count(self, a: Allocation, req: w.Manage) -> tuple[object, ...]:
        """INCR/DECR as L-Store's handle_manage: a count stops at 0, and the allocation is freed once
        both are 0. (IBP's spec frees on the read count alone and has a write count of 0 refuse
        writes; L-Store's clients, the ones in use, expect its depot's rules, so ours are those.)"""
        if req.captype not in (w.IBP_READCAP, w.IBP_WRITECAP):
            raise self.refuse(w.IBP_E_WRONG_CAP_FORMAT, f"captype {req.captype} (want 1 read or 2 write)")
        field = "read_refs" if req.captype == w.IBP_READCAP else "write_refs"
        value = max(0, getattr(a, field) + (1 if req.subcmd == w.IBP_INCR else -1))
        if value > MAX_REFS:
            raise self.refuse(w.IBP_E_INVALID_PARAMETER, f"{field} would become {value}")
        counts = {"read_refs": a.read_refs, "write_refs": a.write_refs, field: value}
        if not any(counts.values()):
            self.free_alloc(a)  # nobody holds it any more
        else:
            self._journal_set(a, **{field: value})
        return ()

    def _change(self, a: Allocation, req: w.Manage, now: float) -> tuple[object, ...]:
        """CHNG: a new maximum size, duration from now and reliability (KEEP keeps each).

        As L-Store's handle_manage, a size below the data (-20) or a duration past the maximum
        (-45) is answered so but the rest of the change is made: the size is kept, and the duration
        is the maximum (L-Store sets the one asked; ours never goes past its maximum)."""
        status, why = w.IBP_OK, ""
        size = a.max_size if req.size == w.KEEP else req.size
        if size < a.size:
            status, why, size = w.IBP_E_WOULD_DAMAGE_DATA, f"size {size} is below the {a.size} bytes stored", a.max_size
        changes: dict[str, Any] = {}
        duration = self._left(a, now)
        if req.duration != w.KEEP:
            if req.duration > self.max_duration:
                status, why = w.IBP_E_WOULD_EXCEED_POLICY, f"duration {req.duration} s is past the maximum: set to that"
            duration = min(req.duration, self.max_duration)
            changes["expires"] = now + duration
        reliability = a.reliability if req.reliability == w.KEEP else req.reliability
        if reliability not in (w.IBP_SOFT, w.IBP_HARD):
            raise self.refuse(w.IBP_E_BAD_FORMAT, f"reliability {reliability}")
        self._resize(a, size, duration, now, reliability=reliability, **changes)
        if status != w.IBP_OK:
            raise self.refuse(status, why)
        return ()

    def _truncate(self, a: Allocation, size: int, now: float) -> tuple[object, ...]:
        """TRUNCATE (L-Store's IBP_TRUNCATE): the maximum size becomes `size` and data past it is cut;
        a negative size, read unsigned as L-Store does, is past any depot's room (-19 as a huge one)."""
        if not 0 <= size <= w.MAX_INT:  # read unsigned (wire._u64): past any depot
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"size {size}, read unsigned, exceeds any depot")
        self._resize(a, size, self._left(a, now), now, size=min(a.size, size))
        return ()

    def _left(self, a: Allocation, now: float) -> int:
        """The seconds `a` has left, as the admission policy weighs a change that keeps its expiry."""
        return max(1, min(self.max_duration, int(a.expires - now)))

    def _resize(self, a: Allocation, max_size: int, duration: int, now: float, **changes: Any) -> None:
        """Give `a` a maximum size of `max_size` for `duration` more seconds, under the quotas and
        the admission policy if it grows in size or time (a shrink is always welcome), with
        `changes`; the disk gets back the blocks past a smaller size at once, and reserves those
        of a larger one (no store runs meanwhile: the server holds the allocation's writer lock)."""
        if max_size > max(a.max_size, self.capacity):  # never to be had, whatever a client's share: -19
            raise self.refuse(w.IBP_E_WOULD_EXCEED_LIMIT, f"size {max_size} exceeds the depot's {self.capacity} bytes")
        self._check_quota(a.owner, 0, max_size - a.max_size)
        if max_size > a.max_size or duration > self._left(a, now):
            status, reason = admit(max_size, duration, self.free + a.max_size, self.capacity, self.max_duration)
            if status != w.IBP_OK:
                raise self.refuse(status, reason)
        resized = max_size != a.max_size or changes.get("size", a.size) < a.size
        self._journal_set(a, max_size=max_size, **changes)
        if resized:  # smaller: blocks back to the disk; larger: reserved, as at ALLOCATE
            self.store.fit(a.fid, a.size, max_size)

    def free_alloc(self, a: Allocation) -> None:
        self._append({"op": "free", "id": a.fid})
        if self.allocs.pop(a.fid, None) is not None:
            self._account(a, -1)
        self.store.remove(a.fid)
        self._tidy_journal()

    def expire(self, now: float) -> list[str]:
        """Reclaim every allocation whose time is up; returns their file ids."""
        gone = []
        while self.expiry and self.expiry[0][0] <= now:
            _, fid = self.expiry[0]
            a = self.allocs.get(fid)
            if a is None:
                self.expiry.pop(0)
                continue
            self.free_alloc(a)
            gone.append(fid)
        if gone:
            log.info("reclaimed %d expired allocations", len(gone))
        return gone

    def next_expiry(self) -> float | None:
        return self.expiry[0][0] if self.expiry else None

    # -- STATUS --

    def inq(self) -> tuple[dict[str, object], dict[str, int]]:
        """ST_INQ's standard figures (by our names) and our own, for wire.format_inq."""
        hard_free = self.free
        values: dict[str, object] = {
            "version": w.INQ_VERSION,
            "data_mover": w.DM_TCP,
            "rid": RID,
            "resource_type": w.RS_DISK,
            "capacity": self.capacity,
            "served": self.capacity,
            "reserved": self.reserved,
            "hard_reserved": self.hard_reserved,
            "hard_served": self.capacity,
            "hard_capacity": self.capacity,
            "free": self.free,
            "hard_free": hard_free,
            "max_duration": self.max_duration,
        }
        extras = {
            "used": self.stored,
            "allocations": len(self.allocs),
            "refused": self.refused.total(),
            "revoked_soft": self.revoked,
            "syncs": self.store.syncs,
        }
        return values, extras

    def inq_v031(self) -> tuple[int, int, int, int, int]:
        """IBPv031's ST_INQ figures: hard capacity and reserved, soft capacity and reserved (bytes),
        and the maximum duration; one capacity serves both kinds here, as in the IBPv040 reply."""
        return self.capacity, self.hard_reserved, self.capacity, self.soft_reserved, self.max_duration

    def status(self) -> dict[str, object]:
        """Everything ST_INQ reports, by our names."""
        values, extras = self.inq()
        return {**values, **extras}

    def check_admin(self, password: str) -> None:
        """-29 unless `password` is the admin key (compared in constant time)."""
        if not keys_equal(password, self.admin_key):
            raise self.refuse(w.IBP_E_WRONG_PASSWD, "wrong admin key")

    def change(self, password: str, capacity: int, max_duration: int) -> None:
        self.check_admin(password)
        if capacity < self.reserved:
            raise self.refuse(w.IBP_E_WOULD_DAMAGE_DATA, f"capacity {capacity} is below the {self.reserved} reserved")
        self.capacity = capacity
        self.max_duration = max_duration
        self.store.save_settings({"given": self._given, "admin": [capacity, max_duration]})


_FIELDS = {f.name for f in dataclasses.fields(Allocation)}


def _record(fid: str, rec: dict[str, Any]) -> Allocation | None:
    """An allocation from its journal record; one written before keys were kept as hashes is
    converted (and the journal rewritten without them)."""
    rec = dict(rec)
    if "read_key" in rec:
        for right in ("read", "write", "manage"):
            rec[f"{right}_hash"] = key_hash(str(rec.pop(f"{right}_key", "")))
        if key_hash(str(rec.pop("key", ""))) != fid:
            return None
    rec["fid"] = fid
    if "refs" not in rec:  # made when the write count started at 1: the holds beyond that one stay
        count = rec.get("write_refs", 1)
        rec["write_refs"] = max(0, count - 1) if isinstance(count, int) else count
    try:
        a = Allocation(**{k: v for k, v in rec.items() if k in _FIELDS})
    except TypeError:
        return None
    numbers = (a.reliability, a.type, a.max_size, a.size, a.read_refs, a.write_refs)
    if not all(isinstance(n, int) for n in numbers) or not isinstance(a.expires, int | float):
        return None
    return a
