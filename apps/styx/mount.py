"""`styx mount`: a 9P service as a local directory through FUSE (mfusepy + libfuse).

Each FUSE call becomes 9P requests of one Client (serialised by a lock); open files
are fids. Files with a length go through the page cache with read-ahead, read in
iounit-sized 9P reads several at a time; synthetic ones (length 0) are read directly,
one read at a time. Unmounted by libfuse on SIGINT/SIGTERM, or by `fusermount3 -u`.
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

READAHEAD = 1 << 20  # what we ask the kernel to read ahead of a sequential reader (it may cap it)
SECTOR = 512  # st_blocks counts these

_ERRNOS = [
    ("does not exist", errno.ENOENT),
    ("not found", errno.ENOENT),
    ("permission", errno.EACCES),
    ("exists", errno.EEXIST),
    ("not empty", errno.ENOTEMPTY),
    ("not a directory", errno.ENOTDIR),
    ("non-directory", errno.ENOTDIR),
    ("is a directory", errno.EISDIR),
    ("directory", errno.EISDIR),
]


def to_errno(e: StyxClientError) -> int:
    """An errno for an Rerror's text (9P errors are strings)."""
    text = str(e).lower()
    return next((code for words, code in _ERRNOS if words in text), errno.EIO)


def _flags_to_mode(flags: int) -> int:
    acc = flags & os.O_ACCMODE
    mode = w.OWRITE if acc == os.O_WRONLY else w.ORDWR if acc == os.O_RDWR else w.OREAD
    return mode | (w.OTRUNC if flags & os.O_TRUNC else 0)


class StyxOps(fuse.Operations if fuse else object):  # type: ignore[misc]
    """FUSE operations on paths, done with 9P (raw_fi: open files are fuse_file_info, fh the fid)."""

    use_ns = True  # utimens gets nanoseconds

    def __init__(
        self, client: Client, base: str = "/", on_ready: Callable[[], None] | None = None, mountpoint: str = ""
    ) -> None:
        self.client = client
        self.mountpoint = mountpoint
        self.base = split_path(base)
        self._mutex = threading.Lock()
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mounted = False
        self.on_ready = on_ready
        # The last iounit-sized chunk read of each file read through the page cache: the kernel
        # asks for 128 KiB, which is not a multiple of an iounit, so what is left serves the next.
        self._chunks: dict[int, tuple[int, bytes]] = {}

    def init_with_config(self, conn: Any, config: Any) -> None:
        if conn is not None:
            conn.max_readahead = max(conn.max_readahead, READAHEAD)
        if self.mountpoint:
            raise_readahead(self.mountpoint)
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

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        s = self._stat(path)
        kind = st_.S_IFDIR if s.mode & w.DMDIR else st_.S_IFREG
        mtime = s.mtime * 1_000_000_000
        return {
            "st_mode": kind | (s.mode & 0o777),
            "st_size": s.length,
            "st_nlink": 2 if kind == st_.S_IFDIR else 1,
            "st_mtime": mtime,
            "st_atime": s.atime * 1_000_000_000,
            "st_ctime": mtime,
            "st_uid": self.uid,
            "st_gid": self.gid,
            "st_ino": s.qid.path & 0x7FFFFFFFFFFFFFFF,
            "st_blocks": (s.length + SECTOR - 1) // SECTOR,
            "st_blksize": self.client.iounit,
        }

    def readdir(self, path: str, fh: Any) -> list[str]:
        stats = self._call(self.client.ls, "/".join(self._names(path)) or "/")
        return [".", "..", *(s.name for s in stats)]

    def open(self, path: str, fi: Any) -> int:
        def do() -> tuple[int, w.Stat]:
            fid = self.client.walk(self._names(path))
            try:
                st = self.client.stat_fid(fid)
                self.client.open(fid, _flags_to_mode(fi.flags))
            except StyxClientError:
                self.client.clunk(fid)
                raise
            return fid, st

        fid, st = self._call(do)
        fi.fh = fid
        # A file of length 0 may be synthetic (a status file, a flow): read it as it comes.
        fi.direct_io = st.length == 0 or bool(st.qid.type & (w.QTAPPEND | w.QTEXCL))
        fi.keep_cache = False  # another client may have changed it: read it anew after each open
        return 0

    def create(self, path: str, mode: int, fi: Any) -> int:
        names = self._names(path)

        def do() -> int:
            fid = self.client.walk(names[:-1])
            try:
                self.client.create(fid, names[-1], mode & 0o777, w.ORDWR)
            except StyxClientError:
                self.client.clunk(fid)
                raise
            return fid

        fi.fh = self._call(do)
        return 0

    def read(self, path: str, size: int, offset: int, fi: Any) -> bytes:
        fid = fi.fh
        if fi.direct_io:  # synthetic: each read as it comes, nothing kept
            return self._call(self._read, fid, offset, size)  # type: ignore[no-any-return]
        out = bytearray()
        while len(out) < size:
            pos = offset + len(out)
            start, chunk = self._chunks.get(fid, (0, b""))
            if not start <= pos < start + len(chunk):
                units = -(-(size - len(out)) // self.client.iounit)  # whole iounits, read `pipeline` at a time
                start, chunk = pos, self._call(self.client.read_at, fid, pos, units * self.client.iounit)
                if not chunk:
                    break
                self._chunks[fid] = (start, chunk)
            out += chunk[pos - start : pos - start + size - len(out)]
        return bytes(out)

    def _read(self, fid: int, offset: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = self.client.read(fid, offset + len(out), size - len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def write(self, path: str, data: bytes, offset: int, fi: Any) -> int:
        self._chunks.pop(fi.fh, None)
        self._call(self.client.write_fid_all, fi.fh, bytes(data), offset)
        return len(data)

    def release(self, path: str, fi: Any) -> int:
        self._chunks.pop(fi.fh, None)
        self._call(self.client.clunk, fi.fh)
        return 0

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        self._wstat(path, length=length)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        old = self._stat(path)
        self._wstat(path, mode=(old.mode & ~0o777) | (mode & 0o777))
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        mtime = times[1] // 1_000_000_000 if times else int(time.time())
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
        # 9P2000 carries no file system sizes: the counts are unknown (0), the I/O size is the iounit.
        return {
            "f_bsize": self.client.iounit,
            "f_frsize": SECTOR,
            "f_blocks": 0,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_namemax": 255,
        }


def raise_readahead(mountpoint: str) -> None:
    """Let the kernel read ahead READAHEAD bytes on our mount (its default is 128 KiB), so a
    sequential reader costs a FUSE request per MiB. Only root may; others keep the default.

    `mountpoint` is already resolved: looking it up now would ask us, who are in init.
    """
    where = mountpoint.replace("\\", "\\134").replace(" ", "\\040").replace("\n", "\\012")
    try:
        with open("/proc/self/mountinfo") as f:
            devs = [line.split()[2] for line in f if line.split()[4] == where]
        if devs:
            with open(f"/sys/class/bdi/{devs[-1]}/read_ahead_kb", "w") as ra:
                ra.write(str(READAHEAD // 1024))
    except OSError as e:
        log.info("read-ahead stays the kernel's: %s", e)


def mount(
    client: Client, base: str, mountpoint: str, on_ready: Callable[[], None] | None = None, name: str = ""
) -> None:
    """Serve `client`'s tree at `mountpoint` until unmounted (blocks); `mount` shows it as styx#NAME."""
    if fuse is None:
        raise RuntimeError(FUSE_MISSING)
    if not os.path.isdir(mountpoint):
        raise RuntimeError(f"{mountpoint}: not a directory")
    ops = StyxOps(client, base, on_ready, os.path.realpath(mountpoint))
    fsname = "styx#" + (name or "9p").replace(",", "_")  # a comma would end the mount option
    try:
        fuse.FUSE(ops, mountpoint, raw_fi=True, foreground=True, nothreads=True, fsname=fsname, subtype="styx")
    except RuntimeError as e:
        # libfuse also answers non-zero when a signal ended a good mount, after unmounting it.
        if not ops.mounted or os.path.ismount(mountpoint):
            raise RuntimeError(f"cannot mount on {mountpoint}: libfuse error {e}") from None
