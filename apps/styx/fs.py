"""A real directory tree as a 9P tree, confined to its root by the kernel.

Every fid holds its own O_PATH descriptor of its file (a fid is a file, not a name); names
are resolved beneath the root's descriptor (beneath.open_beneath), so no rename or symlink
swap by anyone leads outside the root, and name operations first check the name still
leads to the fid's file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import logging
import os
import stat as st_
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING

from apps.styx import ownproc
from apps.styx import wire as w
from apps.styx.beneath import Escape, open_beneath
from apps.styx.fscreds import fs_ids
from apps.styx.identity import group_name, user_name
from apps.styx.tree import (
    EEXIST,
    ENONEXIST,
    ENOTEMPTY,
    EPERM,
    EREMOVEROOT,
    ESPECIAL,
    EUNKNOWNGROUP,
    DirCheck,
    Handle,
    Node,
    StyxError,
    Tree,
    allowed,
)

if TYPE_CHECKING:
    from apps.styx.agent import Peer

log = logging.getLogger(__name__)

PROC_FD = "/proc/self/fd"  # an O_PATH descriptor is reopened, chmod-ed, truncated through here
RENAME_NOREPLACE = 1
SYS_FACCESSAT2 = 439  # the same number on every architecture (new system calls share one table)
AT_EACCESS = 0x200
AT_EMPTY_PATH = 0x1000
MASK64 = (1 << 64) - 1
# open(5) and stat(5) give these bits meaning (one writer at the end, one open at a time) that a Linux
# file cannot keep: a create or wstat asking for them is refused, not answered as if they held.
UNSERVED_MODE = w.DMAPPEND | w.DMEXCL
EUNSERVED_MODE = "append-only and exclusive-use files are not served"
_OPEN_FLAGS = {w.OREAD: os.O_RDONLY, w.OWRITE: os.O_WRONLY, w.ORDWR: os.O_RDWR, w.OEXEC: os.O_RDONLY}


def _qid_path(s: os.stat_result, root_dev: int) -> int:
    """intro(5): a qid path is unique in the served hierarchy. An inode number is unique only in its
    file system: a file on another one mounted beneath the root (whose root is inode 1 or 2 as ours
    may be) gets one made of both."""
    if s.st_dev == root_dev:
        return s.st_ino
    # splitmix64's finalizer of both: arithmetic only, as a session thread working as its client may
    # no longer import a module (a hash library) from where the server's Python lives.
    x = (s.st_ino ^ (s.st_dev * 0x9E3779B97F4A7C15)) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _stat(s: os.stat_result, name: str, root_dev: int) -> w.Stat:
    is_dir = st_.S_ISDIR(s.st_mode)
    mode = (w.DMDIR if is_dir else 0) | (s.st_mode & 0o777)
    qid = w.Qid(w.QTDIR if is_dir else w.QTFILE, (s.st_mtime_ns ^ s.st_size) & 0xFFFFFFFF, _qid_path(s, root_dev))
    owner = user_name(s.st_uid)
    return w.Stat(
        0,
        0,
        qid,
        mode,
        int(s.st_atime) & 0xFFFFFFFF,
        int(s.st_mtime) & 0xFFFFFFFF,
        0 if is_dir else s.st_size,
        name,
        owner,
        group_name(s.st_gid),
        owner,
    )


def _exact_perm(path: str, perm: int) -> None:
    """Give a file just created the permission bits asked (already limited by its directory's, as
    open(5) says), not those the server's umask leaves: Plan 9 has no umask, clients apply their own."""
    mode = os.stat(path).st_mode
    if st_.S_IMODE(mode) & 0o777 != perm & 0o777:
        os.chmod(path, (st_.S_IMODE(mode) & ~0o777) | (perm & 0o777))  # a set-group-ID bit it inherited stays


def _may(fd: int, mode: int) -> bool:
    """Whether this thread's file credentials (the client's, where the server works as it) give `mode`
    (os.X_OK, os.W_OK, ...) on fd's file, as the kernel judges it, ACLs included. faccessat2 with
    AT_EACCESS takes the fsuid, fsgid and groups as they are; access(2) would judge the real uid (root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    flags = ctypes.c_int(AT_EACCESS | AT_EMPTY_PATH)
    if libc.syscall(ctypes.c_long(SYS_FACCESSAT2), ctypes.c_int(fd), b"", ctypes.c_int(mode), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
        return False
    if err not in (errno.ENOSYS, errno.EINVAL):
        raise OSError(err, os.strerror(err))
    # A kernel before 5.8: the mode bits against the thread's own ids (no ACLs).
    uid, gid, groups = fs_ids()
    s = os.fstat(fd)
    if uid == 0:  # DAC override, except that something must be executable to execute it
        return not mode & os.X_OK or st_.S_ISDIR(s.st_mode) or bool(s.st_mode & 0o111)
    shift = 6 if s.st_uid == uid else 3 if s.st_gid == gid or s.st_gid in groups else 0
    return (s.st_mode >> shift) & mode == mode


def _rename_noreplace(dirfd: int, old: str, new: str) -> None:
    """renameat2(RENAME_NOREPLACE): 9P renames never replace a file; without it, check then rename."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        if fn(dirfd, os.fsencode(old), dirfd, os.fsencode(new), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: the file system has no NOREPLACE
            raise OSError(err, os.strerror(err))
    if os.path.lexists(os.path.join(f"{PROC_FD}/{dirfd}", new)):
        raise FileExistsError(errno.EEXIST, "file exists")
    os.rename(old, new, src_dir_fd=dirfd, dst_dir_fd=dirfd)


class FsTree(Tree):
    kernel_checked = True

    def __init__(self, root: str | Path) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise StyxError(f"{root}: not a directory")
        if not os.path.isdir(PROC_FD):
            raise StyxError(f"serving files needs {PROC_FD} (/proc is not mounted)")
        self.rootfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.rootfd).st_dev
        ownproc.identity()  # known before any session thread works as a client
        if ownproc.refused(self.rootfd, from_proc=True):
            os.close(self.rootfd)
            raise StyxError(f"{root}: the server's own process: its entries are served to no one")

    def attach(self, peer: Peer, aname: str) -> Node:
        """The node `aname` names. Symlinks are followed only where the kernel checks every directory
        they lead through with credentials that are the client's (its own, or the anonymous user's);
        a server working for others with its own rights checks each directory walked itself (the
        server's Plan 9 check), so a link would take them past directories nobody checked."""
        rights = peer.rights
        node = FsNode(self, (), self.resolve(()), follow=rights.as_user or rights.creds is not None)
        for part in aname.split("/"):
            if part and part != ".":
                if not rights.as_user and not allowed(node.stat(), peer.user, w.DMEXEC):
                    node.close()
                    raise StyxError(EPERM)
                step = node.parent() if part == ".." else node.walk(part)
                node.close()
                assert isinstance(step, FsNode)
                node = step
        # The file aname names is this attach's root (walk(5)): ".." of it is itself, and it is not removed.
        node.top = len(node.rel)
        return node

    def resolve(
        self, rel: tuple[str, ...], flags: int = os.O_PATH, mode: int = 0, follow: bool = True, at: int | None = None
    ) -> int:
        """A descriptor for `rel` beneath the root (or beneath the directory `at`); what leads outside,
        or through a symlink with follow=False, is not there."""
        try:
            return open_beneath(self.rootfd if at is None else at, rel, flags, mode, follow)
        except (Escape, FileNotFoundError):
            raise StyxError(ENONEXIST) from None

    def close(self) -> None:
        os.close(self.rootfd)


class FsNode(Node):
    """A file of the tree: its path from the root and its own descriptor. follow: whether names are
    resolved through symlinks (beneath the root) for this client, or each walk step opens one name in
    this very directory, the one the server checked, and no symlink at all."""

    def __init__(self, tree: FsTree, rel: tuple[str, ...], fd: int, follow: bool = True, top: int = 0) -> None:
        self.tree = tree
        self.rel = rel
        self.fd = fd
        self.follow = follow
        self.top = top  # the length of the attach root's rel: no walk goes above it

    def _resolve(self, rel: tuple[str, ...], flags: int = os.O_PATH) -> int:
        return self.tree.resolve(rel, flags, follow=self.follow)

    def _node(self, rel: tuple[str, ...], fd: int) -> FsNode:
        return FsNode(self.tree, rel, fd, self.follow, self.top)

    @property
    def name(self) -> str:
        return "/" if self.is_root() else self.rel[-1]

    @property
    def proc(self) -> str:
        return f"{PROC_FD}/{self.fd}"

    def _os_stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def stat(self) -> w.Stat:
        return _stat(self._os_stat(), self.name, self.tree.dev)

    def is_root(self) -> bool:
        return len(self.rel) <= self.top

    def walk(self, name: str) -> Node:
        rel = (*self.rel, name)
        # In a procfs, one name and no link (self, thread-self, mounts lead into the server's own
        # process): each step's directory is then the one checked before it.
        from_proc = ownproc.on_proc(self.fd)
        if self.follow and not from_proc:
            node = self._node(rel, self._resolve(rel))
        else:
            node = self._node(rel, self.tree.resolve((name,), follow=False, at=self.fd))
        try:
            if ownproc.refused(node.fd, from_proc):
                raise StyxError(ENONEXIST)
        except BaseException:
            node.close()
            raise
        return node

    def parent(self) -> Node:
        return self.clone() if self.is_root() else self._node(self.rel[:-1], self._resolve(self.rel[:-1]))

    def clone(self) -> Node:
        return self._node(self.rel, os.dup(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _still_here(self, flags: int = os.O_PATH) -> int:
        """Our name resolved anew (a descriptor with `flags`), if it still leads to our file."""
        here = self._resolve(self.rel, flags)
        try:
            a, b = os.fstat(here), self._os_stat()
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                raise StyxError(f"'{self.name}' was moved or replaced since it was walked: walk to it again")
        except BaseException:
            os.close(here)
            raise
        return here

    def _parent_fd(self, may: DirCheck | None = None) -> int:
        """The descriptor of the directory our entry is in, judged by `may` (given its stat) and
        holding our file under our name: the one a removal or rename is then made through, so that
        a directory swapped in by a rename anywhere above is neither judged nor changed in our
        stead. For a client whose names follow symlinks (the kernel judges it, as itself or as the
        anonymous user), our name may be a link to a file elsewhere beneath the root."""
        pfd = self._resolve(self.rel[:-1])
        try:
            if may is not None:
                may(*self._removal_stats(pfd))
            if self.follow:
                os.close(self._still_here())
            else:
                entry, ours = os.stat(self.rel[-1], dir_fd=pfd, follow_symlinks=False), self._os_stat()
                if (entry.st_dev, entry.st_ino) != (ours.st_dev, ours.st_ino):
                    raise StyxError(f"'{self.name}' was moved or replaced since it was walked: walk to it again")
        except FileNotFoundError:
            os.close(pfd)
            raise StyxError(f"'{self.name}' was moved or replaced since it was walked: walk to it again") from None
        except BaseException:
            os.close(pfd)
            raise
        return pfd

    def _removal_stats(self, pfd: int) -> tuple[w.Stat, w.Stat | None]:
        d = os.fstat(pfd)
        entry = self.stat() if d.st_mode & st_.S_ISVTX else None  # 9P's mode has no sticky bit: say it so
        return _stat(d, "/" if len(self.rel) - 1 <= self.top else self.rel[-2], self.tree.dev), entry

    def removal_stats(self) -> tuple[w.Stat, w.Stat | None]:
        pfd = self._resolve(self.rel[:-1])
        try:
            return self._removal_stats(pfd)
        finally:
            os.close(pfd)

    def open(self, mode: int, user: str) -> Handle:
        s = self._os_stat()
        if st_.S_ISDIR(s.st_mode):
            return FsDirHandle(self)
        if not st_.S_ISREG(s.st_mode):  # a fifo would block the session, a device is not ours to serve
            raise StyxError(ESPECIAL)
        # What open(2) does not judge, the kernel is asked, so that no client gets more than the
        # server's own Plan 9 check gives: OEXEC needs execute permission (open(5)), ORCLOSE the
        # right to remove the file, refused at the open rather than failing at the clunk.
        if mode & 3 == w.OEXEC and not _may(self.fd, os.X_OK):
            raise StyxError(EPERM)
        if mode & w.ORCLOSE:
            self.may_remove()
        flags = _OPEN_FLAGS[mode & 3] | (os.O_TRUNC if mode & w.OTRUNC else 0)
        return FileHandle(os.open(self.proc, flags | os.O_CLOEXEC))  # this very file, by its descriptor

    def create(self, name: str, perm: int, mode: int, user: str) -> tuple[Node, Handle]:
        if perm & UNSERVED_MODE:
            raise StyxError(EUNSERVED_MODE)
        pfd = self._still_here(os.O_PATH | os.O_DIRECTORY)  # a directory new files can be made in
        rel = (*self.rel, name)
        try:
            if perm & w.DMDIR:
                os.mkdir(name, perm & 0o777, dir_fd=pfd)
                fd, empty = self._made_dir(pfd, name)
                child = self._node(rel, fd)
                if empty:  # else it was made unreadable to its maker: it keeps what mkdir gave it
                    _exact_perm(child.proc, perm)
                return child, FsDirHandle(child)
            flags = _OPEN_FLAGS[mode & 3] | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, perm & 0o777, dir_fd=pfd)
        except FileExistsError:
            raise StyxError(EEXIST) from None
        finally:
            os.close(pfd)
        try:
            _exact_perm(f"{PROC_FD}/{fd}", perm)
            node = self._node(rel, os.open(f"{PROC_FD}/{fd}", os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            os.close(fd)
            raise
        return node, FileHandle(fd)

    def _made_dir(self, pfd: int, name: str) -> tuple[int, bool]:
        """The directory just made as `name` in `pfd` (an O_PATH descriptor), and whether it was
        seen empty. mkdir gives no descriptor, and whoever may write that directory can swap ours
        for a link or another directory before we open it: no link is followed, and a directory
        with entries is not ours (what the create then sets and serves is ours, or nothing is)."""
        moved = f"'{name}' was moved or replaced as it was made"
        try:
            fd = self.tree.resolve((name,), follow=False, at=pfd)
        except StyxError:
            raise StyxError(moved) from None
        try:
            if not st_.S_ISDIR(os.fstat(fd).st_mode):
                raise StyxError(moved)
            try:
                entries = os.listdir(f"{PROC_FD}/{fd}")
            except PermissionError:  # made without read permission for its maker
                return fd, False
            if entries:
                raise StyxError(moved)
        except BaseException:
            os.close(fd)
            raise
        return fd, True

    def may_remove(self) -> None:
        """StyxError unless the kernel would let this thread remove our entry: write and search
        permission in its directory and, where that is sticky, owning the file or the directory."""
        if self.is_root():
            raise StyxError(EREMOVEROOT)
        pfd = self._parent_fd()
        try:
            if not _may(pfd, os.W_OK | os.X_OK):
                raise StyxError(EPERM)
            d = os.fstat(pfd)
            if d.st_mode & st_.S_ISVTX and fs_ids()[0] not in (0, d.st_uid, self._os_stat().st_uid):
                raise StyxError(EPERM)
        finally:
            os.close(pfd)

    def remove(self, may: DirCheck | None = None) -> None:
        if self.is_root():
            raise StyxError(EREMOVEROOT)
        pfd = self._parent_fd(may)
        name = self.rel[-1]
        try:
            # The entry itself: a symlink walked through is removed, not what it points to.
            if st_.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise StyxError(ENOTEMPTY) from None
            raise
        finally:
            os.close(pfd)

    def wstat(self, st: w.Stat, user: str, may_rename: DirCheck | None = None) -> None:
        """All the changes or none (stat(5)): what can fail without changing anything is checked
        first, each change made is undone if a later one fails, and the length, which cannot be
        undone, is set last."""
        keep = w.Stat.dont_touch()
        before = self._os_stat()
        gid = None
        if st.gid and st.gid != group_name(before.st_gid):
            try:
                gid = grp.getgrnam(st.gid).gr_gid
            except (KeyError, ValueError):  # ValueError: a NUL in the name, which no group has
                raise StyxError(EUNKNOWNGROUP) from None
        if st.length != keep.length and not st_.S_ISREG(before.st_mode):
            raise StyxError(ESPECIAL)
        if st.mode != keep.mode and st.mode & UNSERVED_MODE:
            raise StyxError(EUNSERVED_MODE)
        undo: list[Callable[[], None]] = []
        try:
            if st.name and not self.is_root() and st.name != self.rel[-1]:
                old = self.rel[-1]
                self._rename(st.name, may_rename)
                undo.append(lambda: self._rename(old))
            if gid is not None:
                os.chown(self.proc, -1, gid)
                undo.append(lambda: os.chown(self.proc, -1, before.st_gid))
            if st.mode != keep.mode:
                os.chmod(self.proc, st.mode & 0o777)
                undo.append(lambda: os.chmod(self.proc, st_.S_IMODE(before.st_mode)))
            if st.mtime != keep.mtime or st.atime != keep.atime:
                atime = before.st_atime_ns if st.atime == keep.atime else st.atime * 10**9
                mtime = before.st_mtime_ns if st.mtime == keep.mtime else st.mtime * 10**9
                os.utime(self.proc, ns=(atime, mtime))  # explicit times: the kernel asks for the owner
                undo.append(lambda: os.utime(self.proc, ns=(before.st_atime_ns, before.st_mtime_ns)))
            if st.length != keep.length:
                fd = os.open(self.proc, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, st.length)
                finally:
                    os.close(fd)
        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except (OSError, StyxError) as e:  # what was there is gone or taken: nothing to restore
                    log.warning("undoing part of a failed wstat of '%s': %s", self.name, e)
            raise

    def _rename(self, new: str, may: DirCheck | None = None) -> None:
        """Rename our entry within its directory, never over another file."""
        pfd = self._parent_fd(may)
        try:
            _rename_noreplace(pfd, self.rel[-1], new)
        except FileExistsError:
            raise StyxError(EEXIST) from None
        finally:
            os.close(pfd)
        self.rel = (*self.rel[:-1], new)


class FileHandle(Handle):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, offset: int, count: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        return os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FsDirHandle(Handle):
    """An open directory: each listing reads it anew through the fid's own descriptor."""

    def __init__(self, node: FsNode) -> None:
        self.node = node

    def dirents(self) -> Generator[w.Stat, None, None]:
        node = self.node
        fd = os.open(node.proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            entries = os.scandir(fd)  # which holds a descriptor of its own while the listing lasts
        finally:
            os.close(fd)
        with entries:
            for entry in entries:
                try:
                    if entry.is_symlink():  # shown as what it leads to beneath the root, if anything
                        target = node._resolve((*node.rel, entry.name))
                        try:
                            s = os.fstat(target)
                        finally:
                            os.close(target)
                    else:  # by the directory's O_PATH descriptor: the listing's own is scandir's
                        s = os.stat(entry.name, dir_fd=node.fd, follow_symlinks=False)
                except (StyxError, OSError):
                    continue
                yield _stat(s, entry.name, node.tree.dev)
