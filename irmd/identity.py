"""Who a local process is, as the kernel says: SO_PEERCRED's ids and SO_PEERGROUPS, /proc's exe, argv
and start time; and whether such a process runs a bound program. Never what the process announces.

A pid alone is no identity (pids are reused): with its start time it names one process for good.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import signal
import socket
import stat
import struct
import threading

from proto.messages import MAX_PEER_GROUPS
from transports.ratelog import RateLog
from transports.unix import peer_groups

log = logging.getLogger(__name__)

SHEBANG_MAX = 256  # bytes of a script's first line we read (Linux reads at most 256 too)
ANCESTORS = 8  # generations of parents a peer's identity records
ARGV_MAX = 64 * 1024  # bytes of a process's argv read
ARGV_WAIT = 0.2  # seconds the caller waits for them
ARGV_STUCK = 4  # reads of argv that may be stuck at once: past them argv is not read (the script rule fails)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5: a pidfd of the process that connected
GONE, NO_PIDFD = -1, -2  # peer_pidfd: the connecting process has exited; the kernel cannot say
_argv_readers = threading.BoundedSemaphore(ARGV_STUCK)
_UNKNOWN_GROUPS = RateLog(rate=0.1, burst=2, logger=log)
_UNKNOWN_ARGV = RateLog(rate=1.0, burst=10, logger=log)  # a process may connect again and again


@dataclasses.dataclass(frozen=True)
class Peer:
    """A process at the other end of a control connection."""

    pid: int
    uid: int
    gid: int
    start: int = 0  # /proc/PID/stat starttime (clock ticks after boot); 0: unknown
    exe: str = ""  # what the kernel runs: the real path of /proc/PID/exe
    argv: tuple[str, ...] = ()
    cwd: str = ""
    ancestors: tuple[tuple[int, int], ...] = ()  # (pid, start time) of its parent, grandparent, ...
    # Its supplementary groups when it connected (SO_PEERGROUPS, at most MAX_PEER_GROUPS); None: not
    # known, or gid is not the kernel's (-1: the connection acts as another user, ActAs)
    groups: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Program:
    """A bound program file, with what the kernel runs when it is exec'd."""

    path: str  # as bound: absolute
    real: str  # its real path
    interpreter: str = ""  # a script's interpreter (real path); "" for a binary
    interp_arg: str = ""  # the optional argument on the #! line
    script: bool = False  # not an ELF binary: run by an interpreter, named in its argv


def _stat(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after "pid (comm)" (comm may hold spaces and ")"): [] if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return []


def proc_start(pid: int) -> int:
    """The start time of process `pid` (0 if it is gone): tells it apart from a later one with its pid."""
    fields = _stat(pid)
    try:
        return int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    except (IndexError, ValueError):
        return 0


def proc_ancestors(pid: int, depth: int = ANCESTORS) -> tuple[tuple[int, int], ...]:
    """(pid, start time) of the parent of `pid`, its parent, ... up to `depth` generations or init."""
    out: list[tuple[int, int]] = []
    fields = _stat(pid)
    while fields and len(out) < depth:
        try:
            ppid = int(fields[1])  # field 4
        except (IndexError, ValueError):
            break
        if ppid <= 1:
            break
        fields = _stat(ppid)
        try:
            out.append((ppid, int(fields[19])))
        except (IndexError, ValueError):
            break
    return tuple(out)


def proc_uids(pid: int) -> tuple[int, int] | None:
    """(real uid, effective uid) of process `pid`, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    real, effective = line.split()[1:3]
                    return int(real), int(effective)
    except (OSError, ValueError):
        return None
    return None


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected `sock`, from the kernel (SO_PEERCRED)."""
    pid, uid, gid = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))  # struct ucred
    return pid, uid, gid


def peer_groups_of(sock: socket.socket, pid: int) -> tuple[int, ...] | None:
    """The supplementary groups of the process that connected `sock` (pid `pid`), from the kernel
    (SO_PEERGROUPS), or None (logged) if they cannot be carried: no rights are then granted on them."""
    groups = peer_groups(sock, MAX_PEER_GROUPS)
    if groups is None:
        _UNKNOWN_GROUPS.log(
            "the supplementary groups of pid %d are not known (a kernel before 4.13, or more than %d): "
            "its flows carry none",
            pid,
            MAX_PEER_GROUPS,
            level=logging.WARNING,
        )
    return groups


def peer_of(sock: socket.socket) -> Peer:
    """The process that connected `sock`, from the kernel: SO_PEERCRED and SO_PEERGROUPS, then /proc."""
    return read_connected(sock, *peer_cred(sock))


def read_connected(sock: socket.socket, pid: int, uid: int, gid: int, *, argv: bool = True) -> Peer:
    """read_peer of the process that connected `sock` as SO_PEERCRED says (pid, uid, gid), checked
    live through its pidfd: its pid may be another process's by now."""
    pidfd = peer_pidfd(sock)
    try:
        return read_peer(pid, uid, gid, peer_groups_of(sock, pid), pidfd, argv=argv)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def peer_pidfd(sock: socket.socket) -> int:
    """A pidfd of the process that connected `sock` (SO_PEERPIDFD), GONE if that process has exited,
    or NO_PIDFD if the kernel cannot say (before Linux 6.5, or out of descriptors)."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ESRCH):
            return GONE  # before Linux 6.16 a process that has exited has no pidfd
        return NO_PIDFD


def _connected_it(pid: int, uid: int, pidfd: int | None) -> bool:
    """Is the process at `pid` still the one that connected as `uid`? A pid is not reused while its
    process lives, so with a pidfd: is that process still there. Without one (an older kernel), the
    process at `pid` must at least run as the connection's uid. None: the caller knows it otherwise."""
    if pidfd is None:
        return True
    if pidfd == NO_PIDFD:
        uids = proc_uids(pid)
        return uids is not None and uid in uids
    if pidfd < 0:
        return False
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except PermissionError:
        return True  # there, another user's (an IRMd not run as root)
    except OSError:
        return False
    return True


def read_peer(
    pid: int, uid: int, gid: int, groups: tuple[int, ...] | None = None, pidfd: int | None = None, *, argv: bool = True
) -> Peer:
    """What /proc says of the process `pid` that connected as `uid`: its start time, exe, argv, cwd and
    ancestors, or none of them if another process may have taken its pid (a connection queued while the
    IRMd was busy outlives the process that made it, and its pid goes to the next one). `pidfd`: what
    peer_pidfd said of the connecting process; None: the caller knows the process otherwise (itself,
    or one it will compare by start time with what it read at connect time). argv: read its argv and
    cwd, which only the script rule uses, and only for the uids a program binding names (admins'):
    a user's process, which may keep its argv from being read, then never waits for it."""
    start = proc_start(pid)
    try:
        exe = os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    raw = proc_argv(pid) if argv else b""
    args = tuple(a.decode(errors="surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")) if raw else ()
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd") if argv else ""
    except OSError:
        cwd = ""
    ancestors = proc_ancestors(pid)
    # Checked after the reads: it exec'd or went while we read, or it was not the connecting process
    if proc_start(pid) != start or not _connected_it(pid, uid, pidfd):
        return Peer(pid, uid, gid, groups=groups)  # the ids are the socket's: they stay
    return Peer(pid, uid, gid, start, exe, args, cwd, ancestors, groups)


def proc_argv(pid: int) -> bytes:
    """/proc/PID/cmdline, or b"" if it is gone or not read within ARGV_WAIT. The kernel reads another
    process's argv under that process's memory lock, which the process can keep taken (a page fault
    on a FUSE file whose server never answers, an mmap queued behind it): the read then waits as
    long, so it runs on a thread of its own, and at most ARGV_STUCK such threads wait at once."""
    if not _argv_readers.acquire(blocking=False):
        _UNKNOWN_ARGV.log("argv of pid %d not read: %d reads of argv are stuck already", pid, ARGV_STUCK,
                          level=logging.WARNING)  # fmt: skip
        return b""
    got: list[bytes] = []
    done = threading.Event()

    def read() -> None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                got.append(f.read(ARGV_MAX))
        except OSError:
            pass
        finally:
            _argv_readers.release()
            done.set()

    threading.Thread(target=read, name=f"argv-{pid}", daemon=True).start()
    if not done.wait(ARGV_WAIT):
        _UNKNOWN_ARGV.log("argv of pid %d not read in %.1f s: its memory lock is held", pid, ARGV_WAIT,
                          level=logging.WARNING)  # fmt: skip
        return b""
    return got[0] if got else b""


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """A descriptor of `path` for reading, and its stat, if it is a regular file (PermissionError
    if not); opened without blocking, so that a FIFO in its place cannot hold the IRMd's loop."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def file_head(path: str) -> bytes:
    """The first SHEBANG_MAX bytes of the regular file at `path` (OSError if it is none)."""
    fd, _ = open_regular(path)
    try:
        return os.read(fd, SHEBANG_MAX)
    finally:
        os.close(fd)


def shebang(head: bytes) -> tuple[str, str] | None:
    """The interpreter and the one argument a file's `#!` line gives, split as the kernel splits it
    (at blanks and tabs only: the interpreter up to the first, the rest one argument); None for a
    file without `#!`, ("", "") for a line that names no interpreter."""
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].decode(errors="surrogateescape")
    interpreter, arg = re.fullmatch(r"[ \t]*([^ \t]*)[ \t]*(.*?)[ \t]*", line, re.S).groups()  # type: ignore[union-attr]
    return interpreter, arg


def program_of(path: str) -> Program:
    """What the kernel runs for `path`: the file itself, or the interpreter its #! line names."""
    real = os.path.realpath(path)
    try:
        head = file_head(real)
    except OSError:  # not there, not readable, or not a regular file (a FIFO would block)
        head = b""
    if head.startswith(b"\x7fELF"):
        return Program(path, real)
    interpreter, arg = shebang(head) or ("", "")
    if not interpreter:
        return Program(path, real, script=True)
    if os.path.basename(interpreter) == "env" and arg and not arg.startswith("-"):
        interpreter, arg = arg.split()[0], ""  # #!/usr/bin/env python3: the interpreter is found in PATH
        return Program(path, real, interpreter=interpreter, script=True)
    return Program(path, real, os.path.realpath(interpreter), arg, script=True)


def runs(program: Program, peer: Peer) -> bool:
    """Does `peer` run `program`? A binary: the kernel's exe is it. A script: the process is its
    interpreter with the script as the argument the kernel put after it.

    The script rule is weaker: whoever may run the interpreter may name the script and still run
    other code (PYTHONPATH, -c before it is refused, but not site hooks). The uid rule is the guard.
    """
    if not peer.exe:
        return False
    if peer.exe == program.real:
        return True
    if not program.script or len(peer.argv) < 2:
        return False
    if program.interpreter:
        if os.path.isabs(program.interpreter):
            if peer.exe != program.interpreter:
                return False
        elif not os.path.basename(peer.exe).startswith(program.interpreter):
            return False  # #!/usr/bin/env python3 runs python3.11
    args = list(peer.argv[1:])
    if program.interp_arg and args and args[0] == program.interp_arg:
        args.pop(0)
    if not args or args[0].startswith("-"):
        return False
    script = args[0] if os.path.isabs(args[0]) else os.path.join(peer.cwd or "/", args[0])
    return os.path.realpath(script) == program.real
