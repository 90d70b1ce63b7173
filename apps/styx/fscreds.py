"""Per-thread file system credentials: a session thread of a root server takes its client's
fsuid, fsgid and groups, so the kernel checks that thread's file access as the client.

Raw system calls, as knfsd and Samba use them: glibc's setgroups would change every thread.
When the file system uid leaves 0 the kernel also drops the thread's DAC override capabilities.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

from apps.accounts import Creds

# (setgroups, setfsgid, setfsuid) system call numbers, from the kernel's syscall tables.
_GENERIC = (159, 152, 151)  # asm-generic: aarch64, riscv64, loongarch64
_SYSCALLS = {
    "x86_64": (116, 123, 122),
    "aarch64": _GENERIC,
    "riscv64": _GENERIC,
    "loongarch64": _GENERIC,
    "ppc64le": (81, 139, 138),
    "s390x": (206, 216, 215),
}
NGROUPS_MAX = 65536


class CredsError(OSError):
    """The thread could not take the client's credentials."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def supported() -> str:
    """'' if threads can switch credentials here, else why not."""
    if platform.machine() not in _SYSCALLS:
        return f"per-thread credentials are not known for {platform.machine()}"
    return ""


def fs_ids() -> tuple[int, int, tuple[int, ...]]:
    """This thread's fsuid, fsgid and groups, as the kernel reports them."""
    fsuid = fsgid = -1
    groups: tuple[int, ...] = ()
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Uid":
                fsuid = int(value.split()[3])
            elif key == "Gid":
                fsgid = int(value.split()[3])
            elif key == "Groups":
                groups = tuple(sorted(int(g) for g in value.split()))
    return fsuid, fsgid, groups


def become(creds: Creds) -> None:
    """Make the calling thread's file access that of `creds`; CredsError if the kernel refused."""
    why = supported()
    if why:
        raise CredsError(0, why)
    if len(creds.groups) > NGROUPS_MAX:
        raise CredsError(0, f"{len(creds.groups)} groups: at most {NGROUPS_MAX}")
    setgroups, setfsgid, setfsuid = _SYSCALLS[platform.machine()]
    libc = _libc()
    gids = (ctypes.c_uint * max(len(creds.groups), 1))(*creds.groups)
    if libc.syscall(setgroups, ctypes.c_long(len(creds.groups)), gids) != 0:
        raise CredsError(ctypes.get_errno(), "setgroups failed")
    # setfsgid/setfsuid return the previous id whether or not they succeeded: check what took.
    libc.syscall(setfsgid, ctypes.c_long(creds.gid))
    libc.syscall(setfsuid, ctypes.c_long(creds.uid))
    got = fs_ids()
    if got != (creds.uid, creds.gid, tuple(sorted(set(creds.groups)))):
        raise CredsError(0, f"thread credentials are {got}, not {creds}")


@contextlib.contextmanager
def working_as(creds: Creds | None) -> Iterator[None]:
    """The calling thread's file access as `creds` for the block (None: as it is), then as before."""
    if creds is None:
        yield
        return
    fsuid, fsgid, groups = fs_ids()
    try:
        become(creds)
        yield
    finally:
        become(Creds(fsuid, fsgid, groups))
