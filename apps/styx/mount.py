"""`styx mount`: a 9P service as a local directory through FUSE (mfusepy + libfuse).

Each FUSE call becomes 9P requests of one Client (serialised by a lock); open files
are fids. Unmounted by libfuse on SIGINT/SIGTERM, or by `fusermount3 -u`.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import stat as st_
import threading
import time
from collections.abc import Callable
from typing import Any

from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError, split_path

log = logging.getLogger(__name__)

fuse: Any
try:
    fuse = importlib.import_module("mfusepy")
except (ImportError, OSError) as e:  # the binding, or libfuse itself, is missing
    fuse = None
    FUSE_MISSING = f"styx mount needs the mfusepy package and libfuse 3 (pip install mfusepy; apt install fuse3): {e}"
else:
    FUSE_MISSING = ""

_ERRNOS = [("does not exist", errno.ENOENT), ("not found", errno.ENOENT), ("permission", errno.EACCES),
           ("exists", errno.EEXIST), ("not empty", errno.ENOTEMPTY), ("non-directory", errno.ENOTDIR),
           ("is a directory", errno.EISDIR), ("directory", errno.EISDIR)]


def to_errno(e: StyxClientError) -> int:
    """An errno for an Rerror's text (9P errors are strings)."""
    text = str(e).lower()
    return next((code for words, code in _ERRNOS if words in text), errno.EIO)


def _flags_to_mode(flags: int) -> int:
    acc = flags & os.O_ACCMODE
    mode = w.OWRITE if acc == os.O_WRONLY else w.ORDWR if acc == os.O_RDWR else w.OREAD
    return mode | (w.OTRUNC if flags & os.O_TRUNC else 0)


class StyxOps(fuse.Operations if fuse else object):  # type: ignore[misc]
    """FUSE operations on paths, done with 9P."""

    def __init__(self, client: Client, base: str = "/", on_ready: Callable[[], None] | None = None) -> None:
        self.client = client
        self.base = split_path(base)
        self._mutex = threading.Lock()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mounted = False
        self.on_ready = on_ready

    def init(self, path: str) -> None:
        self.mounted = True
        if self.on_ready is not None:
            self.on_ready()

    def _names(self, path: str) -> list[str]:
        return [*self.base, *split_path(path)]

    def _call(self, fn: Any, *args: Any) -> Any:
        with self._mutex:
            try:
                return fn(*args)
            except StyxClientError as e:
                raise fuse.FuseOSError(to_errno(e)) from None

    def _stat(self, path: str) -> w.Stat:
        def do() -> w.Stat:
            fid = self.client.walk(self._names(path))
            try:
                return self.client.stat_fid(fid)
            finally:
                self.client.clunk(fid)

        return self._call(do)  # type: ignore[no-any-return]

    def _wstat(self, path: str, **changes: Any) -> None:
        st = w.Stat.dont_touch()
        for k, v in changes.items():
            setattr(st, k, v)

        def do() -> None:
            fid = self.client.walk(self._names(path))
            try:
                self.client.wstat_fid(fid, st)
            finally:
                self.client.clunk(fid)

        self._call(do)

    # -- FUSE calls -----------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        s = self._stat(path)
        kind = st_.S_IFDIR if s.mode & w.DMDIR else st_.S_IFREG
        return {"st_mode": kind | (s.mode & 0o777), "st_size": s.length, "st_nlink": 2 if kind == st_.S_IFDIR else 1,
                "st_mtime": s.mtime, "st_atime": s.atime, "st_ctime": s.mtime, "st_uid": self.uid,
                "st_gid": self.gid, "st_ino": s.qid.path & 0x7FFFFFFFFFFFFFFF}

    def readdir(self, path: str, fh: int) -> list[str]:
        stats = self._call(self.client.ls, "/".join(self._names(path)) or "/")
        return [".", "..", *(s.name for s in stats)]

    def open(self, path: str, flags: int) -> int:
        def do() -> int:
            fid = self.client.walk(self._names(path))
            try:
                self.client.open(fid, _flags_to_mode(flags))
            except StyxClientError:
                self.client.clunk(fid)
                raise
            return fid

        return self._call(do)  # type: ignore[no-any-return]

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        names = self._names(path)

        def do() -> int:
            fid = self.client.walk(names[:-1])
            try:
                self.client.create(fid, names[-1], mode & 0o777, w.ORDWR)
            except StyxClientError:
                self.client.clunk(fid)
                raise
            return fid

        return self._call(do)  # type: ignore[no-any-return]

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        def do() -> bytes:
            out = bytearray()
            while len(out) < size:
                chunk = self.client.read(fh, offset + len(out), size - len(out))
                if not chunk:
                    break
                out += chunk
            return bytes(out)

        return self._call(do)  # type: ignore[no-any-return]

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._call(self.client.write_fid_all, fh, bytes(data), offset)
        return len(data)

    def release(self, path: str, fh: int) -> int:
        self._call(self.client.clunk, fh)
        return 0

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        self._wstat(path, length=length)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        old = self._stat(path)
        self._wstat(path, mode=(old.mode & ~0o777) | (mode & 0o777))
        return 0

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> int:
        mtime = int(times[1] if times else time.time())
        self._wstat(path, mtime=mtime & 0xFFFFFFFF)
        return 0

    def rename(self, old: str, new: str) -> int:
        if os.path.dirname(old.rstrip("/")) != os.path.dirname(new.rstrip("/")):
            raise fuse.FuseOSError(errno.EXDEV)  # 9P renames within a directory only
        self._wstat(old, name=os.path.basename(new.rstrip("/")))
        return 0

    def unlink(self, path: str) -> int:
        self._call(self.client.remove, "/".join(self._names(path)))
        return 0

    def rmdir(self, path: str) -> int:
        return self.unlink(path)

    def mkdir(self, path: str, mode: int) -> int:
        self._call(self.client.mkdir, "/".join(self._names(path)), mode & 0o777)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 0, "f_bfree": 0, "f_bavail": 0, "f_namemax": 255}


def mount(client: Client, base: str, mountpoint: str, on_ready: Callable[[], None] | None = None) -> None:
    """Serve `client`'s tree at `mountpoint` until unmounted (blocks)."""
    if fuse is None:
        raise RuntimeError(FUSE_MISSING)
    if not os.path.isdir(mountpoint):
        raise RuntimeError(f"{mountpoint}: not a directory")
    ops = StyxOps(client, base, on_ready)
    try:
        fuse.FUSE(ops, mountpoint, foreground=True, nothreads=True, fsname="styx", direct_io=True)
    except RuntimeError as e:
        # libfuse also answers non-zero when a signal ended a good mount, after unmounting it.
        if not ops.mounted or os.path.ismount(mountpoint):
            raise RuntimeError(f"cannot mount on {mountpoint}: libfuse error {e}") from None
