"""Become another user for good: groups, gid and uid (real, effective and saved), with no way back,
and never a process that user may trace or read on the way (the dumpable flag the switch resets)."""

from __future__ import annotations

import ctypes
import os

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def become(uid: int, gid: int, groups: list[int] | tuple[int, ...]) -> None:
    """Take `uid`, `gid` and `groups`; OSError unless they are all ours and undumpable after.

    A change of the effective uid resets the dumpable flag to fs.suid_dumpable: where that is 1, the
    user could trace us and read the memory we hold. So the saved uid stays root until the flag is
    cleared (ptrace and /proc/PID/mem need all three uids to be the tracer's), and goes only then: a
    change of the saved uid alone leaves the flag as it is. As OpenSSH's permanently_set_uid, it
    checks that root cannot be taken back."""
    libc = ctypes.CDLL(None, use_errno=True)
    if (uid, gid) != (os.geteuid(), os.getegid()):
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, os.getresuid()[2])
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot make the process undumpable")
        os.setresuid(uid, uid, uid)
        if uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise OSError(0, "could take root back after leaving it")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(0, f"could not become uid {uid}, gid {gid}")
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "the process stays dumpable")
