"""Unix-domain socket plumbing: the IRMd socket path and who may own it, frames with passed fds,
what the kernel says of a peer.

One SOCK_SEQPACKET packet carries one control frame; file descriptors ride
along as SCM_RIGHTS ancillary data.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import ctypes
import errno
import functools
import os
import select
import socket
import stat
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transports.wire import MAX_FDS, MAX_FRAME, WireError

SOCK_ENV = "OUROBOROS_SOCK"
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def irmd_sock_path(explicit: str | None = None) -> Path:
    """The IRMd socket: --sock, else $OUROBOROS_SOCK, else the per-user default."""
    if explicit:
        return Path(explicit)
    if env := os.environ.get(SOCK_ENV):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/ouroboros/irmd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/ouroboros-{os.geteuid()}"
    return Path(runtime) / "ouroboros" / "irmd.sock"


class TrustError(OSError):
    """A socket, file or directory above them is not owned and guarded as it must be."""


def _owner_ok(st: os.stat_result, uid: int) -> bool:
    return st.st_uid in (0, uid)


MAX_LINKS = 40  # symbolic links followed in one path, as the kernel's limit


def _guarded(st: os.stat_result, where: str, uid: int, strict: bool) -> bool:
    """TrustError unless directory `where` belongs to root or `uid` and lets no one else replace
    what is in it; True when that holds only as it is sticky (like /tmp: each entry's owner keeps it).
    strict: no sticky directory will do (a directory whose entries others may add to, the leaf's)."""
    if not stat.S_ISDIR(st.st_mode):
        raise TrustError(0, f"{where} is not a directory")
    if not _owner_ok(st, uid):
        raise TrustError(0, f"directory {where} belongs to uid {st.st_uid}, not to root or uid {uid}")
    if st.st_mode & 0o022:
        if strict or not st.st_mode & stat.S_ISVTX:
            raise TrustError(0, f"directory {where} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
        return True
    return False


def resolve_trusted(path: Path | str, uid: int, *, missing_ok: bool = False) -> str:
    """The real path of `path`, resolved one component at a time as the kernel will resolve it, with
    TrustError unless no one but root and `uid` can change where it leads: every directory it takes
    an entry from (each link's own directory and the ones its target leads through, as well as those
    of the path as written) belongs to one of them and is not writable by group or others, unless it
    is sticky (like /tmp) and the entry taken from it (a directory, a link, the last one) is theirs.

    missing_ok: a path that does not lead to anything (yet) resolves to the directory where it ends,
    the one whose writers could make the rest; the caller checks that one as a leaf (strictly).

    Checking only the path as written and the real path missed a link on the way: a link in another
    user's directory (or that user's own link in /tmp) that leads to root's file passed, and its
    owner could point it elsewhere between the check and the use."""
    text = os.fspath(path)
    here = "/" if text.startswith("/") else os.path.realpath(".")
    todo = [part for part in reversed(text.split("/")) if part not in ("", ".")]
    links = 0
    while todo:
        name = todo.pop()
        if name == "..":
            here = os.path.dirname(here)  # `here` is real: its parent is what the kernel's .. reaches
            continue
        try:
            sticky = _guarded(os.lstat(here), here, uid, strict=False)
            entry = os.path.join(here, name)
            st = os.lstat(entry)
        except OSError as e:
            if missing_ok and e.errno == errno.ENOENT:
                return here
            raise TrustError(e.errno, f"{e.filename or here}: {e.strerror}") from None
        if sticky and not _owner_ok(st, uid):
            raise TrustError(0, f"{entry} belongs to uid {st.st_uid}, not to root or uid {uid}, in sticky {here}")
        if not stat.S_ISLNK(st.st_mode):
            here = entry
            continue
        links += 1
        if links > MAX_LINKS:
            raise TrustError(40, f"{text}: more than {MAX_LINKS} symbolic links")  # ELOOP
        target = os.readlink(entry)
        if target.startswith("/"):
            here = "/"
        todo.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
    return here


def check_dirs(path: Path, uid: int, *, strict_leaf: bool, missing_ok: bool = False) -> None:
    """Every directory `path` leads through, and `path` itself, belongs to root or `uid`, and none
    lets others replace what is in it: not group- or other-writable, unless sticky (like /tmp) above
    the leaf and what is taken from it is theirs (resolve_trusted: the links on the way included).

    strict_leaf: `path` itself may not be group- or other-writable even if sticky (the IRMd's own
    socket directory); clients allow a sticky leaf, as they check the socket's owner as well.
    missing_ok: a `path` not there passes if only root or `uid` could make it: the directory it is
    missing from, where the kernel's walk ends, is checked as the leaf.
    """
    real = resolve_trusted(path, uid, missing_ok=missing_ok)
    try:
        st = os.lstat(real)
    except OSError as e:
        raise TrustError(e.errno, e.strerror) from None
    _guarded(st, real, uid, strict=strict_leaf)


def read_trusted(path: Path, uid: int) -> str:
    """The text of a file that only root or `uid` could have written: it and the directories above
    it belong to one of them and are not writable by others (as OpenSSH's StrictModes)."""
    with open(path, "rb") as f:  # checked on the file opened, not on a name that may change meanwhile
        check_trusted_file(path, os.fstat(f.fileno()), uid)
        return f.read().decode()


def check_trusted_file(path: Path | str, st: os.stat_result, uid: int) -> None:
    """TrustError unless the file at `path` (whose stat is `st`) is a regular file only root or `uid`
    could have written: theirs, not writable by others, and no other user's directory or link on the
    way to it (resolve_trusted)."""
    if not stat.S_ISREG(st.st_mode):
        raise TrustError(0, f"{path} is not a regular file")
    if not _owner_ok(st, uid):
        raise TrustError(0, f"{path} belongs to uid {st.st_uid}, not to root or uid {uid}")
    if st.st_mode & 0o022:
        raise TrustError(0, f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
    resolve_trusted(path, uid)  # the directories and links on the way to it: none another user's to turn


def make_sock_dir(path: Path, mode: int) -> None:
    """Create the IRMd's socket directory (and what is missing above it) with `mode`, then
    check it and its parents as clients will: refuse rather than serve from a directory others control."""
    missing: list[Path] = []
    here = Path(os.path.abspath(path))
    while not os.path.lexists(here):
        missing.append(here)
        here = here.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, mode)
            os.chmod(d, mode)  # the umask must not loosen or tighten what we chose
    check_dirs(path, os.geteuid(), strict_leaf=True)


def check_socket(path: Path, uid: int | None = None) -> None:
    """Before talking to an IRMd: its socket belongs to root or to us, and so do the directories
    above it, so nobody else can have put it there."""
    uid = os.geteuid() if uid is None else uid
    check_dirs(path.parent, uid, strict_leaf=False)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise TrustError(e.errno, e.strerror) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise TrustError(0, f"{path} is not a socket")
    if not _owner_ok(st, uid):
        raise TrustError(0, f"{path} belongs to uid {st.st_uid}, not to root or uid {uid}")


SO_PASSRIGHTS = getattr(socket, "SO_PASSRIGHTS", 83)  # Linux 6.16: refuse SCM_RIGHTS sent to a socket
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13: the peer's supplementary groups
NGROUPS_MAX = 65536  # the kernel's bound on a process's supplementary groups
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets at once, never waits
# socket's MSG_ flags are an enum.IntFlag, whose | and & run in Python (about 1 us each): as ints,
# for the paths every frame and flow event take
TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


def seqpacket_pair(rights: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected pair, for a flow unless `rights`: then neither end takes descriptors, so a peer
    cannot hand the reader one whose close blocks it (see refuse_rights)."""
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if not rights:
        for end in pair:
            refuse_rights(end)
    return pair


def seqpacket_fds() -> tuple[int, int]:
    """seqpacket_pair's two ends as bare descriptors, for a process that only hands them on (the IRMd,
    a local flow's): no Python socket objects in between, whose making costs a getsockname each."""
    a, b = _socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (a, b):
        refuse_rights(end)
    return a.detach(), b.detach()


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def peer_groups(sock: socket.socket, limit: int = NGROUPS_MAX) -> tuple[int, ...] | None:
    """The supplementary groups of the process that connected `sock`, as they were when it
    connected (SO_PEERGROUPS; SO_PEERCRED's uid and gid are of the same moment). None when the
    kernel does not say (before Linux 4.13) or they are more than `limit`: then no one knows them.

    Asked of libc: Python's getsockopt reads at most 1024 bytes (256 groups)."""
    buf = (ctypes.c_uint32 * max(limit, 1))()
    size = ctypes.c_uint32(4 * limit)  # socklen_t
    if _libc().getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_PEERGROUPS, buf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOPROTOOPT, errno.ERANGE):  # an older kernel; more groups than `limit`
            return None
        raise OSError(err, os.strerror(err))
    return tuple(buf[: size.value // 4])


def refuse_rights(sock: _socket.socket) -> None:
    """Make `sock` refuse descriptors sent to it (the sender's sendmsg fails with EPERM), where the
    kernel can (6.16 on). A descriptor a peer passed is closed by whoever drops the last reference:
    with one whose close blocks (a TCP socket lingering on unsent data), that reader would stall."""
    with contextlib.suppress(OSError):  # an older kernel: close_fds still defuses sockets
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSRIGHTS, 0)


def send_frame(sock: socket.socket, frame: bytes, fds: Sequence[int] = ()) -> None:
    """Send one frame (and fds); raises BlockingIOError on a full non-blocking socket."""
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sock.sendmsg([frame], anc)
    else:
        sock.send(frame)


def recv_frame(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Receive one frame and its fds; b'' means the peer closed.

    Truncated frames or fd lists raise WireError after closing any fds received.
    """
    data, anc, flags, _ = sock.recvmsg(MAX_FRAME + 1, _FD_SPACE)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & TRUNCATED or len(data) > MAX_FRAME:
        close_fds(fds)
        raise WireError("frame or fd list truncated")
    if not data:  # read as the peer's end: an empty packet's fds would otherwise be nobody's to close
        close_fds(fds)
        fds = []
    return data, fds


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors, as received from a peer: a socket's close is made a reset first (linger
    0), so that a passed socket lingering on unsent data cannot block the closing thread."""
    for fd in fds:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                sock = socket.socket(fileno=fd)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                finally:
                    sock.detach()
        with contextlib.suppress(OSError):
            os.close(fd)


def close_own(fds: Sequence[int]) -> None:
    """Close descriptors this process made, or an IPCP it started handed it: no application's socket is
    among them, so there is no linger to defuse (close_fds costs five system calls a descriptor more)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


SDU_LOOKAHEAD = 16  # records read past an empty one once the peer hung up, looking for data behind it


def recv_record(sock: socket.socket, bufsize: int, recv: Callable[[int], bytes] | None = None) -> bytes | None:
    """One record of a flow's SOCK_SEQPACKET socket: an SDU, b'' for an empty record (a keepalive, as
    on C's wire), or None once the flow has ended. Raises BlockingIOError when nothing is queued.
    `recv` (default sock.recv) may decode what it reads, if it passes empty records on as b''.

    recv says b'' both for an empty record and at the end, which then repeats for ever: only a hang-up
    tells them apart, and records still queued behind an empty one are read before calling it the end.
    """
    recv = recv or sock.recv
    data = recv(bufsize)
    return data if data else after_empty(sock, bufsize, recv)


def after_empty(sock: socket.socket, bufsize: int, recv: Callable[[int], bytes]) -> bytes | None:
    """What an empty read of `sock` (through `recv`) stands for: b'' for an empty record, the next
    record if the peer hung up behind it, None at the end (see recv_record)."""
    if not hung_up(sock):
        return b""
    for _ in range(SDU_LOOKAHEAD):
        try:
            data = recv(bufsize)  # the socket never blocks once hung up; a decoder may still say EAGAIN
        except BlockingIOError:
            return None
        if data:
            return data
    return None


def readable(objs: Sequence[Any], timeout: float | None) -> list[Any]:
    """Those of `objs` (descriptors, or objects with fileno(): sockets, flows) that have something to
    read or came to an end, waiting up to `timeout` s (None: for ever). poll, not select: select fails
    on a descriptor past 1023, which a server with many clients soon hands out. ValueError for an
    object already closed (fileno() -1)."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for obj in objs:
        fd = obj if isinstance(obj, int) else obj.fileno()
        poller.register(fd, select.POLLIN)
        by_fd[fd] = obj
    return [by_fd[fd] for fd, _ in poller.poll(None if timeout is None else max(timeout, 0.0) * 1000)]


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed its end or either end was shut down (nothing more will arrive)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in poller.poll(0))
