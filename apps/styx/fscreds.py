"""Per-thread credentials: a session thread of a root server takes its client's uid and gid as its
effective and file system ids, and its groups, and gives up every capability, so the kernel checks
that thread's file access as the client's. The effective ids too: a few checks look at them, not
at the file system ids (sysctl files: with only the fsuid switched, any client wrote root's
/proc/sys). The real and saved ids stay root's, for the switch back and so that the client's
processes may not signal the thread.

Raw system calls, as knfsd and Samba use them: glibc's setgroups would change every thread.
When the file system uid leaves 0 the kernel drops only the thread's file capabilities (DAC
override, CHOWN, FOWNER, ...); a file may still ask for others (/proc/PID/maps asks for
CAP_SYS_PTRACE, quotas and reserved blocks give way to CAP_SYS_RESOURCE), so the thread clears
its effective set too (capset is per thread), as knfsd drops CAP_SYS_RESOURCE with the file ones.
The permitted set stays, for the next switch (a Tversion starts over, the next attach may be none).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import threading
from collections.abc import Iterator

from apps.accounts import Creds

# (setgroups, setresgid, setresuid) system call numbers, from the kernel's syscall tables (the
# 32-bit-id ones where there are two).
_GENERIC = (159, 149, 147)  # asm-generic: aarch64, riscv64, loongarch64
_SYSCALLS = {
    "x86_64": (116, 119, 117),
    "aarch64": _GENERIC,
    "riscv64": _GENERIC,
    "loongarch64": _GENERIC,
    "ppc64le": (81, 169, 164),
    "s390x": (206, 210, 208),
}
_KEEP = ctypes.c_long(-1)  # setres[ug]id: leave this id as it is
PR_SET_DUMPABLE = 4
NGROUPS_MAX = 65536
_CAP_VERSION_3 = 0x20080522  # capget/capset: two 32-bit words per set


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class CredsError(OSError):
    """The thread could not take the client's credentials."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def supported() -> str:
    """'' if threads can switch credentials here, else why not."""
    if platform.machine() not in _SYSCALLS:
        return f"per-thread credentials are not known for {platform.machine()}"
    return ""


def _status() -> dict[str, str]:
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        return {key: value.strip() for key, _, value in (line.partition(":") for line in f)}


def fs_ids() -> tuple[int, int, tuple[int, ...]]:
    """This thread's fsuid, fsgid and groups, as the kernel reports them."""
    status = _status()
    fsuid = int(status["Uid"].split()[3])
    fsgid = int(status["Gid"].split()[3])
    groups = tuple(sorted(int(g) for g in status.get("Groups", "").split()))
    return fsuid, fsgid, groups


def effective_ids() -> tuple[int, int]:
    """This thread's effective uid and gid, as the kernel reports them."""
    status = _status()
    return int(status["Uid"].split()[1]), int(status["Gid"].split()[1])


def effective_caps() -> int:
    """This thread's effective capabilities, as the kernel reports them."""
    return int(_status()["CapEff"], 16)


def _capset(libc: ctypes.CDLL, effective_from_permitted: bool) -> None:
    """Make this thread's effective capabilities its permitted ones, or none; the permitted and
    inheritable sets stay as they are."""
    header = _CapHeader(_CAP_VERSION_3, 0)  # pid 0: the calling thread only
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise CredsError(ctypes.get_errno(), "capget failed")
    for word in data:
        word.effective = word.permitted if effective_from_permitted else 0
    if libc.capset(ctypes.byref(header), data) != 0:
        raise CredsError(ctypes.get_errno(), "capset failed")


def become(creds: Creds) -> None:
    """Make the calling thread's file access that of `creds`; CredsError if the kernel refused."""
    why = supported()
    if why:
        raise CredsError(0, why)
    if len(creds.groups) > NGROUPS_MAX:
        raise CredsError(0, f"{len(creds.groups)} groups: at most {NGROUPS_MAX}")
    setgroups, setresgid, setresuid = _SYSCALLS[platform.machine()]
    libc = _libc()
    _capset(libc, effective_from_permitted=True)  # CAP_SETGID and CAP_SETUID, if an earlier switch shed them
    gids = (ctypes.c_uint * max(len(creds.groups), 1))(*creds.groups)
    if libc.syscall(setgroups, ctypes.c_long(len(creds.groups)), gids) != 0:
        raise CredsError(ctypes.get_errno(), "setgroups failed")
    # The effective ids (the file system ones follow them); real and saved stay, so root comes back.
    if libc.syscall(setresgid, _KEEP, ctypes.c_long(creds.gid), _KEEP) != 0:
        raise CredsError(ctypes.get_errno(), "setresgid failed")
    if libc.syscall(setresuid, _KEEP, ctypes.c_long(creds.uid), _KEEP) != 0:
        raise CredsError(ctypes.get_errno(), "setresuid failed")
    got = fs_ids()
    if got != (creds.uid, creds.gid, tuple(sorted(set(creds.groups)))) or effective_ids() != (creds.uid, creds.gid):
        raise CredsError(0, f"thread credentials are {got} (effective {effective_ids()}), not {creds}")
    if creds.uid != 0:  # root's client is root; anyone else's work asks the kernel with no capability
        # Leaving euid 0 makes the process as dumpable as fs.suid_dumpable says: never the client's
        # to trace or read through /proc, whatever that is.
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise CredsError(ctypes.get_errno(), "cannot keep the server undumpable")
        _capset(libc, effective_from_permitted=False)
        if effective_caps():
            raise CredsError(0, f"thread keeps capabilities {effective_caps():#x} as {creds}")


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
