"""A depot's disk: one data file per allocation and an fsync'd journal of allocation metadata.

A store is acknowledged only after its bytes and the journal record of the new length are on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

JOURNAL = "journal.log"
ADMIN_KEY = "admin.key"
SETTINGS = "settings.json"
LOCK = "lock"
MAX_RECORD = 16_384  # a journal line longer than this is corrupt


class DirInUse(OSError):
    """Another depot holds the directory."""


def file_id(key: str) -> str:
    """The on-disk and in-memory name of an allocation: a hash, so lookups leak no key prefix."""
    return hashlib.sha256(key.encode("ascii", "replace")).hexdigest()


class DiskStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.journal_path = root / JOURNAL
        self._journal: BinaryIO | None = None
        # One depot per directory: a second one would interleave journals and data.
        self._lock = os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        with open(self.journal_path, "rb") as f:
            for n, line in enumerate(f, 1):
                if len(line) > MAX_RECORD or not line.endswith(b"\n"):
                    log.warning("journal line %d is torn or too long; ignored", n)
                    continue
                try:
                    rec = json.loads(line)
                    op, fid = rec["op"], rec["id"]
                except (ValueError, KeyError, TypeError):
                    log.warning("journal line %d is corrupt; ignored", n)
                    continue
                if op == "alloc":
                    records[fid] = rec["a"]
                elif op == "set" and fid in records:
                    records[fid].update(rec["a"])
                elif op == "free":
                    records.pop(fid, None)
        return records

    def compact(self, records: dict[str, dict[str, Any]]) -> None:
        """Rewrite the journal as one record per live allocation (atomically, by rename)."""
        self.close()
        tmp = self.journal_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for fid, a in records.items():
                f.write(_line({"op": "alloc", "id": fid, "a": a}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.journal_path)
        self._fsync_dir()

    def append(self, record: dict[str, Any]) -> None:
        if self._journal is None:
            self._journal = open(self.journal_path, "ab")  # noqa: SIM115 - held open for the depot's life
        self._journal.write(_line(record))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def release(self) -> None:
        """Close the journal and let another depot use the directory."""
        self.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    # -- data files --

    def path(self, fid: str) -> Path:
        return self.data / fid

    def create(self, fid: str) -> None:
        with open(self.path(fid), "wb") as f:
            os.fsync(f.fileno())
        self._fsync_dir()

    def open(self, fid: str) -> BinaryIO:
        return open(self.path(fid), "r+b")

    def truncate(self, fid: str, size: int) -> None:
        """Cut off bytes no journal record acknowledged (a store cut short by a crash)."""
        p = self.path(fid)
        if not p.exists():
            self.create(fid)
        elif p.stat().st_size != size:
            os.truncate(p, size)

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
        with open(tmp, "w") as f:
            json.dump(settings, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / SETTINGS)
        self._fsync_dir()

    def admin_key(self) -> str:
        """The depot's admin key, made on first start, readable by its owner only."""
        p = self.root / ADMIN_KEY
        if p.exists():
            return p.read_text().strip()
        key = secrets.token_hex(32)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
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
