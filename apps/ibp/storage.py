"""A depot's disk: one data file per allocation and an fsync'd journal of allocation metadata.

A store is acknowledged only after its bytes and the journal record of the new length are on disk.
Records are written under the depot's lock and made durable after it by group commit (`durable`):
one fsync serves every record written before it began, so requests share the cost of durability.
The directory is 0700 and every file 0600, set explicitly, whatever the umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from transports.unix import TrustError, check_dirs

log = logging.getLogger(__name__)

JOURNAL = "journal.log"
ADMIN_KEY = "admin.key"
SETTINGS = "settings.json"
LOCK = "lock"
MAX_RECORD = 16_384  # a journal line longer than this is corrupt
# The journal is rewritten once it holds more lines than this many per live allocation, plus the
# floor: its size stays proportional to what it describes, and the rewrite's cost (one line per
# allocation) is spread over at least as many appends.
COMPACT_FACTOR = 4
COMPACT_FLOOR = 1024
DIR_MODE = 0o700
FILE_MODE = 0o600
SYNC_FILE_RANGE_WRITE = 2  # start writing the range back, without waiting for it (linux/fs.h)


FALLOC_FL_KEEP_SIZE = 1  # reserve blocks past the end without changing the file's size (linux/falloc.h)


def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """A Linux call from libc, or None where there is none (the callers then go without the hint)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_FALLOCATE = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing [offset, offset + length) of `fd` to disk now, while more data
    arrives, so that the fsync which acknowledges a store finds little left to do. A hint only:
    durability still rests on that fsync (the call waits for nothing and its failure is ignored)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def reserve(fd: int, size: int) -> None:
    """Reserve `size` bytes of disk blocks for `fd` without changing its length, as the allocation's
    size promises: a store then finds its blocks in place and cannot meet a full disk. Where the
    filesystem cannot (EOPNOTSUPP) or the disk is short, the file grows block by block as before."""
    if _FALLOCATE is not None and size > 0 and _FALLOCATE(fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        log.debug("no blocks reserved for an allocation of %d bytes: %s", size, os.strerror(ctypes.get_errno()))


class DirInUse(OSError):
    """Another depot holds the directory."""


def private_dir(path: Path, trusted: bool = False) -> None:
    """Make `path` (and missing parents) and leave it 0700 and ours; refuse one another user owns,
    as sshd's StrictModes would: whoever owns it could read or swap what the depot keeps there.
    trusted: the directories above it (and links on the way) must be root's or ours and let no one
    else replace their entries (a sticky one such as /tmp only where the entry is ours or root's),
    else that user could move ours aside and put one of its own, or a link to any directory, where
    the depot then makes its files by name (they are opened by path)."""
    if trusted:
        _check_trusted(path.parent, strict=False)  # before anything is made in theirs
    path.mkdir(parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to the depot's uid {os.geteuid()}")
    os.chmod(path, DIR_MODE)
    if trusted:
        _check_trusted(path, strict=True)


def _check_trusted(path: Path, strict: bool) -> None:
    try:
        check_dirs(path, os.geteuid(), strict_leaf=strict, missing_ok=not strict)
    except TrustError as e:
        raise PermissionError(f"will not keep a depot in {path}: {e.strerror}") from None


def private_open(path: Path, flags: int) -> int:
    """A file descriptor on `path`, created 0600 if need be and 0600 in any case; never through a symlink."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


class DiskStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        private_dir(root, trusted=True)
        private_dir(self.data)
        self.journal_path = root / JOURNAL
        self._journal: BinaryIO | None = None
        self.journal_lines = 0  # lines in the journal, live or superseded
        # Group commit. Records are numbered as written; `_synced` of them are on disk. One thread at a
        # time fsyncs (`_syncing`) for all written so far; the others wait for it, then one leads the next.
        self._written = 0
        self._synced = 0
        self._syncing = False
        self._failed = False  # an fsync failed: nothing is durable again until the journal is rewritten
        self._sync = threading.Condition()
        self._entries_dirty = False  # data files made whose names may not be on disk yet
        self._entries_lock = threading.Lock()
        self.syncs = 0  # fsyncs of the journal since the start (ST_INQ reports them)
        # One depot per directory: a second one would interleave journals and data.
        self._lock = private_open(root / LOCK, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise DirInUse(f"{root} is in use by another depot") from None

    # -- journal --

    def load(self) -> dict[str, dict[str, Any]]:
        """Replay the journal: file id -> the allocation's latest record. A torn last line is dropped."""
        records: dict[str, dict[str, Any]] = {}
        if not self.journal_path.exists():
            return records
        with os.fdopen(private_open(self.journal_path, os.O_RDONLY), "rb") as f:
            for n, line in enumerate(f, 1):
                self.journal_lines = n
                if len(line) > MAX_RECORD or not line.endswith(b"\n"):
                    log.warning("journal line %d is torn or too long; ignored", n)
                    continue
                try:
                    rec = json.loads(line)
                    op, fid, fields = rec["op"], rec["id"], rec.get("a", {})
                    if not isinstance(fid, str) or not isinstance(fields, dict):
                        raise TypeError
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("journal line %d is corrupt; ignored", n)
                    continue
                if op == "alloc":
                    records[fid] = fields
                elif op == "set" and fid in records:
                    records[fid].update(fields)
                elif op == "free":
                    records.pop(fid, None)
        return records

    def compact(self, records: dict[str, dict[str, Any]]) -> None:
        """Rewrite the journal as one record per live allocation, atomically: a new file, fsync'd,
        renamed over the old, the directory fsync'd. On failure (a full disk) the old one stays."""
        tmp = self.journal_path.with_suffix(".tmp")
        try:
            with os.fdopen(private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as f:
                for fid, a in records.items():
                    f.write(_line({"op": "alloc", "id": fid, "a": a}))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._sync:  # not while an fsync of the old journal runs: it would see its file closed
            while self._syncing:
                self._sync.wait()
            self.close()
            os.replace(tmp, self.journal_path)
            self._fsync_dir()
            self.journal_lines = len(records)
            self._synced, self._failed = self._written, False  # the new journal holds them all, on disk
            self._sync.notify_all()

    def needs_compaction(self, live: int) -> bool:
        """Whether the journal holds too many superseded lines for its `live` allocations."""
        return self.journal_lines > COMPACT_FACTOR * live + COMPACT_FLOOR

    @property
    def written(self) -> int:
        """The number of the last record written: `durable(written)` waits for all so far."""
        return self._written

    @property
    def failed(self) -> bool:
        """Whether an fsync failed: the journal must be rewritten (`compact`) before more is durable."""
        return self._failed

    def append(self, record: dict[str, Any]) -> int:
        """Write `record` to the journal (to the OS, not yet to the disk: see `durable`); its number.
        A write that fails (a full disk) raises here, before the caller changes anything."""
        if self._journal is None:
            fd = private_open(self.journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            self._journal = os.fdopen(fd, "ab")  # held open for the depot's life
        self._journal.write(_line(record))
        self._journal.flush()
        self.journal_lines += 1
        self._written += 1  # only now: a sync that reads this number covers the record
        return self._written

    def durable(self, seq: int) -> None:
        """Return once record `seq` (and every one before it) is on disk. Group commit: if an fsync
        is running, wait for it; then, unless it covered `seq`, one waiter fsyncs for all records
        written by then, so a burst of requests costs one or two fsyncs, not one each. OSError if
        an fsync failed (then every later record fails too, until `compact` rewrites the journal)."""
        with self._sync:
            while self._synced < seq:
                if self._failed:
                    raise OSError(errno.EIO, "the journal could not be synced (it is rewritten at the next change)")
                if not self._syncing:
                    break
                self._sync.wait()
            else:
                return
            self._syncing = True
            target = self._written  # read before the file: a record counted here was written to it
            journal = self._journal
        ok = False
        try:
            if journal is not None:
                os.fsync(journal.fileno())
            ok = True
        finally:
            with self._sync:
                self._syncing = False
                self.syncs += 1
                if ok:
                    self._synced = max(self._synced, target)
                else:  # after a failed fsync a later one may succeed without the lost pages (fsyncgate)
                    self._failed = True
                    log.error("journal fsync failed: records are not durable until it is rewritten")
                self._sync.notify_all()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def release(self) -> None:
        """Put the journal on disk, close it and let another depot use the directory."""
        with contextlib.suppress(OSError):
            self.durable(self._written)
        self.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    # -- data files --

    def path(self, fid: str) -> Path:
        return self.data / fid

    def create(self, fid: str, size: int = 0) -> None:
        """An empty data file for a new allocation, its blocks reserved. Nothing is fsync'd here (the
        caller holds the depot's lock): an empty file lost to a crash is made again at the next start
        (`fit`), and the first store that puts bytes in it makes its name durable first
        (`entries_durable`)."""
        fd = private_open(self.path(fid), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            reserve(fd, size)
        finally:
            os.close(fd)
        self._entries_dirty = True

    def entries_durable(self) -> None:
        """Put the directory entries of the files made since the last call on disk (one fsync of the
        directories for all of them), before a store into one of them is acknowledged: a data file
        whose bytes were acknowledged must not vanish with a crash. A caller that finds another
        thread's fsync under way waits for it, as that fsync covers its file too."""
        with self._entries_lock:
            if not self._entries_dirty:
                return
            self._entries_dirty = False  # before the fsync: a file made meanwhile sets it again
            try:
                self._fsync_dir()
            except BaseException:
                self._entries_dirty = True
                raise

    def open(self, fid: str) -> BinaryIO:
        return os.fdopen(private_open(self.path(fid), os.O_RDWR), "r+b")

    def fit(self, fid: str, size: int, room: int) -> None:
        """Leave `fid`'s file `size` bytes long with disk blocks for `room` bytes, none beyond: bytes
        no journal record acknowledged (a store cut short) are cut off, and blocks reserved past the
        allocation's end (it shrank) go back to the disk. The file is 0600 again."""
        p = self.path(fid)
        if not p.exists():
            self.create(fid, room)
            return
        fd = private_open(p, os.O_WRONLY)
        try:
            # A truncate that shrinks a file frees every block past its new end, those reserved past
            # the end too, on every filesystem; one to the file's own length does not everywhere.
            os.ftruncate(fd, size + 1)
            os.ftruncate(fd, size)
            reserve(fd, room)
        finally:
            os.close(fd)

    def remove(self, fid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(fid).unlink()

    def orphans(self, live: set[str]) -> list[str]:
        """Data files no allocation owns (left by a crash between a file's creation and its record)."""
        return [p.name for p in self.data.iterdir() if p.name not in live]

    def settings(self) -> dict[str, Any]:
        """What the admin changed through STATUS (empty if nothing, or unreadable)."""
        try:
            data = json.loads((self.root / SETTINGS).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_settings(self, settings: dict[str, Any]) -> None:
        tmp = self.root / (SETTINGS + ".tmp")
        with os.fdopen(private_open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w") as f:
            json.dump(settings, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / SETTINGS)
        self._fsync_dir()

    def admin_key(self) -> str:
        """The depot's admin key, made on first start, readable by its owner only."""
        p = self.root / ADMIN_KEY
        if p.exists():
            with os.fdopen(private_open(p, os.O_RDONLY)) as f:
                return f.read().strip()
        key = secrets.token_hex(32)
        with os.fdopen(private_open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        return key

    def _fsync_dir(self) -> None:
        for d in (self.root, self.data):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()
