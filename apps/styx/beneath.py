"""Opening paths beneath a directory descriptor and nowhere else, whatever is renamed meanwhile.

openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) through ctypes where the kernel has it (5.6+):
symlinks that stay beneath are followed, all others fail (or all fail, with follow=False). Elsewhere
one component at a time with O_NOFOLLOW, so no symlink is followed at all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

SYS_OPENAT2 = 437  # the same number on every architecture (new system calls share one table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
OPEN_HOW = struct.Struct("=QQQ")  # flags, mode, resolve
RETRIES = 8  # EAGAIN: a rename raced the lookup; the kernel asks us to try again


class Escape(OSError):
    """The path leads outside the directory (or through a symlink where none may be followed)."""


_openat2_works: bool | None = None


def _openat2(dirfd: int, path: str, flags: int, mode: int, follow: bool = True) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    resolve = RESOLVE_BENEATH | (RESOLVE_NO_MAGICLINKS if follow else RESOLVE_NO_SYMLINKS)
    how = ctypes.create_string_buffer(OPEN_HOW.pack(flags, mode, resolve))
    for _ in range(RETRIES):
        fd = int(
            libc.syscall(
                ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), os.fsencode(path), how, ctypes.c_size_t(OPEN_HOW.size)
            )
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    if err == errno.EXDEV:
        raise Escape(errno.ENOENT, "leads outside the served tree")
    if err == errno.ELOOP and not follow:
        raise Escape(errno.ENOENT, "symbolic links are not followed here")
    raise OSError(err, os.strerror(err))


def has_openat2() -> bool:
    """Whether the kernel (and any seccomp filter) lets us use openat2."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(_openat2(os.open("/", os.O_PATH | os.O_CLOEXEC), ".", os.O_PATH | os.O_CLOEXEC, 0))
            _openat2_works = True
        except OSError as e:
            _openat2_works = e.errno not in (errno.ENOSYS, errno.EPERM)
    return _openat2_works


def _walk_nofollow(dirfd: int, parts: list[str], flags: int, mode: int) -> int:
    """The fallback: each directory opened O_PATH|O_NOFOLLOW from the last; symlinks refused."""
    fd = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        last = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise Escape(errno.ENOENT, "symbolic links are not followed here") from None
        raise
    finally:
        os.close(fd)
    if flags & os.O_PATH and stat.S_ISLNK(os.fstat(last).st_mode):
        os.close(last)
        raise Escape(errno.ENOENT, "symbolic links are not followed here")
    return last


def open_beneath(dirfd: int, names: tuple[str, ...] | list[str], flags: int, mode: int = 0, follow: bool = True) -> int:
    """open(2) of `names` (single components, none '.', '..' or with '/') beneath `dirfd`.

    No component may be a symbolic link leading out of dirfd's tree, nor any symbolic link at all
    with follow=False (Escape); the result is close-on-exec. An empty `names` opens dirfd's own
    directory anew.
    """
    parts = list(names)
    if any(not n or n in (".", "..") or "/" in n for n in parts):
        raise Escape(errno.ENOENT, f"bad name in {'/'.join(parts)!r}")
    if not parts:
        parts = ["."]
    if has_openat2():
        return _openat2(dirfd, "/".join(parts), flags | os.O_CLOEXEC, mode, follow)
    return _walk_nofollow(dirfd, parts, flags, mode)
