"""A real directory tree as a 9P tree, confined to its root.

Nodes are paths relative to the root; every access resolves the real path and
refuses anything (`..`, symlinks, absolute names) that lands outside the root.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat as st_
from pathlib import Path

from apps.styx import wire as w
from apps.styx.tree import Handle, Node, StyxError, Tree


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class FsTree(Tree):
    def __init__(self, root: str | Path) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise StyxError(f"{root}: not a directory")

    def attach(self, uname: str, aname: str) -> Node:
        node = FsNode(self, ())
        for part in aname.split("/"):
            if part and part != ".":
                node = node.walk(part) if part != ".." else node.parent()  # type: ignore[assignment]
        return node

    def real(self, rel: tuple[str, ...]) -> str:
        """The real path of `rel`, symlinks resolved, or StyxError if it is outside the root."""
        path = os.path.realpath(os.path.join(self.root, *rel))
        if path != self.root and not path.startswith(self.root + os.sep):
            raise StyxError(f"'{'/'.join(rel)}' file does not exist")  # what is outside is not there
        return path


class FsNode(Node):
    def __init__(self, tree: FsTree, rel: tuple[str, ...]) -> None:
        self.tree = tree
        self.rel = rel

    @property
    def path(self) -> str:
        return self.tree.real(self.rel)

    def _os_stat(self) -> os.stat_result:
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            raise StyxError(f"'{'/'.join(self.rel)}' file does not exist") from None

    def stat(self) -> w.Stat:
        s = self._os_stat()
        is_dir = st_.S_ISDIR(s.st_mode)
        mode = (w.DMDIR if is_dir else 0) | (s.st_mode & 0o777)
        qid = w.Qid(w.QTDIR if is_dir else w.QTFILE, (s.st_mtime_ns ^ s.st_size) & 0xFFFFFFFF, s.st_ino)
        name = self.rel[-1] if self.rel else "/"
        return w.Stat(0, 0, qid, mode, int(s.st_atime) & 0xFFFFFFFF, int(s.st_mtime) & 0xFFFFFFFF,
                      0 if is_dir else s.st_size, name, _user(s.st_uid), _group(s.st_gid), _user(s.st_uid))

    def parent(self) -> Node:
        return FsNode(self.tree, self.rel[:-1]) if self.rel else self

    def walk(self, name: str) -> Node:
        child = FsNode(self.tree, (*self.rel, name))
        child._os_stat()  # exists, and inside the root
        return child

    def children(self) -> list[Node]:
        out: list[Node] = []
        for name in sorted(os.listdir(self.path)):
            child = FsNode(self.tree, (*self.rel, name))
            try:
                child._os_stat()
            except (StyxError, OSError):
                continue  # dangling or escaping symlinks are not shown
            out.append(child)
        return out

    def open(self, mode: int, user: str) -> Handle:
        path = self.path
        if os.path.isdir(path):
            return Handle()
        flags = {w.OREAD: os.O_RDONLY, w.OWRITE: os.O_WRONLY, w.ORDWR: os.O_RDWR, w.OEXEC: os.O_RDONLY}[mode & 3]
        if mode & w.OTRUNC:
            flags |= os.O_TRUNC
        return FileHandle(os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC))

    def create(self, name: str, perm: int, mode: int, user: str) -> tuple[Node, Handle]:
        parent = self.path
        target = os.path.join(parent, name)
        child = FsNode(self.tree, (*self.rel, name))
        if perm & w.DMDIR:
            try:
                os.mkdir(target, perm & 0o777)
            except FileExistsError:
                raise StyxError(f"'{name}' file already exists") from None
            return child, Handle()
        flags = {w.OREAD: os.O_RDONLY, w.OWRITE: os.O_WRONLY, w.ORDWR: os.O_RDWR, w.OEXEC: os.O_RDONLY}[mode & 3]
        try:
            fd = os.open(target, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, perm & 0o777)
        except FileExistsError:
            raise StyxError(f"'{name}' file already exists") from None
        return child, FileHandle(fd)

    def remove(self) -> None:
        if not self.rel:
            raise StyxError("cannot remove the root")
        # The entry itself (a symlink is removed, not its target), in a directory inside the root.
        target = os.path.join(self.tree.real(self.rel[:-1]), self.rel[-1])
        if os.path.isdir(target) and not os.path.islink(target):
            try:
                os.rmdir(target)
            except OSError as e:
                raise StyxError(f"remove '{self.rel[-1]}': {e.strerror}") from None
        else:
            os.unlink(target)

    def wstat(self, st: w.Stat, user: str) -> None:
        keep = w.Stat.dont_touch()
        path = self.path
        if st.length != keep.length:
            os.truncate(path, st.length)
        if st.mode != keep.mode:
            os.chmod(path, st.mode & 0o777)
        if st.mtime != keep.mtime:
            os.utime(path, (os.stat(path).st_atime, st.mtime))
        if st.gid and st.gid != _group(os.stat(path).st_gid):
            try:
                os.chown(path, -1, grp.getgrnam(st.gid).gr_gid)
            except KeyError:
                raise StyxError(f"unknown group '{st.gid}'") from None
        if st.name and self.rel and st.name != self.rel[-1]:
            new = os.path.join(os.path.dirname(path), st.name)
            if os.path.lexists(new):
                raise StyxError(f"'{st.name}' file already exists")
            os.rename(path, new)
            self.rel = (*self.rel[:-1], st.name)


class FileHandle(Handle):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, offset: int, count: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def write(self, offset: int, data: bytes) -> int:
        return os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
