"""The server's own entries in a served /proc: the kernel lets a process's threads into them whatever
their credentials (ptrace's same-thread-group rule), so a session thread working as a client would
read there what only the server's user may (its maps, its memory figures). They are served to no one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat as st_
import struct

PROC_SUPER_MAGIC = 0x9FA0
PROC_ROOT_INO = 1  # the root directory of every procfs
MAX_DEPTH = 16  # /proc/PID/task/TID/... is a few levels deep; a deeper one is refused, not climbed
_STATFS = struct.Struct("l")  # struct statfs begins with its f_type (a long)
_libc = ctypes.CDLL(None, use_errno=True)

_ours: tuple[int, int, int] | None = None


def on_proc(fd: int) -> bool:
    """Whether fd's file is on a procfs."""
    buf = ctypes.create_string_buffer(256)  # larger than struct statfs anywhere
    if _libc.fstatfs(ctypes.c_int(fd), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return bool(_STATFS.unpack_from(buf.raw)[0] == PROC_SUPER_MAGIC)


def identity() -> tuple[int, int, int]:
    """Our pid namespace (its nsfs device and inode) and our process id in it."""
    global _ours
    if _ours is None or _ours[2] != os.getpid():  # a fork is another process
        ns = os.stat("/proc/self/ns/pid")
        _ours = (ns.st_dev, ns.st_ino, os.getpid())
    return _ours


def _tgid(status: bytes) -> int | None:
    """The thread group id a /proc/PID/status gives, in the process's own pid namespace (the last of
    NStgid; Tgid where the kernel has no NStgid)."""
    fields = dict(line.split(b":", 1) for line in status.splitlines() if b":" in line)
    ids = (fields.get(b"NStgid") or fields.get(b"Tgid") or b"").split()
    return int(ids[-1]) if ids and ids[-1].isdigit() else None


def is_ours(dirfd: int) -> bool:
    """Whether the procfs directory `dirfd` is one of our process's own (its PID's, or a thread's):
    its process is ours if it has our id in our pid namespace. One whose status or namespace cannot
    be read is not ours (for a thread of ours, both always can be)."""
    try:
        fd = os.open("status", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:  # no process's directory, or one we may not look into
        return False
    try:
        status = os.read(fd, 8192)
    except OSError:
        return False
    finally:
        os.close(fd)
    ns_dev, ns_ino, pid = identity()
    if _tgid(status) != pid:
        return False
    try:
        ns = os.stat("ns/pid", dir_fd=dirfd)  # a namespace link: readable for our own threads only
    except OSError:
        return False
    return (ns.st_dev, ns.st_ino) == (ns_dev, ns_ino)


def within_ours(fd: int) -> bool:
    """Whether the procfs directory `fd`, or one above it, is our process's own (climbing to the
    procfs's root)."""
    cur = os.dup(fd)
    try:
        for _ in range(MAX_DEPTH):
            s = os.fstat(cur)
            if s.st_ino == PROC_ROOT_INO:
                return False
            if is_ours(cur):
                return True
            up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = up
        return True  # deeper than any process's directory: refused rather than trusted
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH):  # the process is gone: nothing of ours
            return False
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(cur)


def refused(fd: int, from_proc: bool) -> bool:
    """Whether the file `fd`, just walked to from a directory on a procfs (`from_proc`, by one name
    and no link) or from elsewhere, is of the server's own process, or may be: a procfs directory
    in ours, or a procfs file reached from outside (through a link: its directory is unknown)."""
    if not on_proc(fd):
        return False
    if st_.S_ISDIR(os.fstat(fd).st_mode):
        return within_ours(fd)
    return not from_proc
