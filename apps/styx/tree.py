"""What a 9P server serves: nodes (files and directories) and their open handles.

Backends implement Node and Handle; synthetic trees are built from SynthDir,
SynthFile and the text handles here (ctl/status files that print plain text).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from apps.styx.identity import User, user_name
from apps.styx.wire import DMDIR, QTDIR, QTFILE, Qid, Stat

if TYPE_CHECKING:
    from apps.styx.agent import Peer


class StyxError(Exception):
    """A failed file operation; its text becomes the Rerror ename."""


# Plan 9's error strings for the conditions clients act on. They are sent exactly, never with a
# name added (the client knows the name; Plan 9's kernel adds it): Linux's v9fs maps an Rerror to
# an errno by its whole text, and any other text becomes ESERVERFAULT, "Unknown error 526".
ENONEXIST = "file does not exist"
EPERM = "permission denied"
EEXIST = "file already exists"
ENOTEMPTY = "directory is not empty"
ENOTDIR = "not a directory"
EISDIR = "file is a directory"
# Where Plan 9's own servers have a string for the condition (u9fs, ramfs, fossil, lib9p), that one,
# as v9fs maps it (net/9p/error.c).
EBADFID = "fid unknown or out of range"  # u9fs, fossil: EBADF
EBADUSEFID = "bad use of fid"  # u9fs: walk, open or create of an open fid, I/O against the open mode
EBADNAME = "illegal name"  # ramfs: ".", "..", "/" or NUL in a name
EDIROFFSET = "bad offset in directory read"  # u9fs: ESPIPE
EOFFSET = "illegal offset"  # fossil: EINVAL
ETOOLARGE = "i/o count too large"  # u9fs: EIO
ENOWSTAT = "wstat prohibited"  # lib9p: EPERM; the owner, qid, type, dev and muid are not changed
EDIRCHANGE = "wstat can't convert between files and directories"  # u9fs: EPERM
EREMOVEROOT = "cannot remove root"  # fossil: EPERM
EUNKNOWNGROUP = "unknown group"  # u9fs: EINVAL
ESPECIAL = "no access to special file"  # u9fs: EPERM; fifos and devices are not served


# Judges a change of a directory's entries (raises to refuse) by the directory's stat and, where the
# directory lets only a file's owner or its own remove or rename it (sticky), the entry's; else None.
DirCheck = Callable[[Stat, Stat | None], None]


class WouldBlock(Exception):
    """The operation must wait (a flow with no data yet); the server retries it later.

    `waitable` (anything with fileno(), e.g. the flow) becomes readable when a retry may go;
    without one the server retries on a short timer.
    """

    def __init__(self, waitable: object | None = None) -> None:
        super().__init__("would block")
        self.waitable = waitable


class Handle:
    """An open file: what Topen/Tcreate return and Tread/Twrite/Tclunk act on."""

    snapshots = False  # whether a read from the start, or a write, makes it keep text (`held` bytes)

    @property
    def held(self) -> int:
        """Bytes this open file keeps between requests (a text snapshot, a command's answer)."""
        return 0

    def read(self, offset: int, count: int) -> bytes:
        raise StyxError("file not open for reading")

    def dirents(self) -> Generator[Stat, None, None]:
        """An open directory's entries, from the start, made as they are read."""
        raise StyxError("not a directory")

    def write(self, offset: int, data: bytes | memoryview) -> int:
        raise StyxError("file not open for writing")

    def abandoned(self, data: bytes | memoryview) -> None:
        """A parked write of `data` (WouldBlock) was flushed: what was kept to resume it goes."""

    def close(self) -> None:
        pass


class Node:
    """One file or directory of a served tree.

    A node may hold resources (a descriptor): walk, parent and clone give the caller a node
    of its own, which it closes when done; close of a shared synthetic node does nothing.
    """

    def stat(self) -> Stat:
        raise NotImplementedError

    def is_dir(self) -> bool:
        return bool(self.stat().mode & DMDIR)

    def walk(self, name: str) -> Node:
        """The child called `name` (never '..': the server walks up with parent())."""
        raise StyxError(ENOTDIR)

    def parent(self) -> Node:
        raise NotImplementedError

    def is_root(self) -> bool:
        raise NotImplementedError

    def clone(self) -> Node:
        return self

    def close(self) -> None:
        pass

    def parent_stat(self) -> Stat:
        parent = self.parent()
        try:
            return parent.stat()
        finally:
            parent.close()

    def removal_stats(self) -> tuple[Stat, Stat | None]:
        """What a DirCheck of removing or renaming this file is given: its directory's stat and, if
        that directory restricts removal to owners (sticky), this file's."""
        return self.parent_stat(), None

    def children(self) -> list[Node]:
        raise StyxError("not a directory")

    def open(self, mode: int, user: str) -> Handle:
        raise StyxError("cannot open")

    def create(self, name: str, perm: int, mode: int, user: str) -> tuple[Node, Handle]:
        raise StyxError("cannot create here")

    def remove(self, may: DirCheck | None = None) -> None:
        """Remove this file; `may`, given the stats of the directory it is removed from (that very
        directory, whatever is renamed meanwhile) and of the file (DirCheck), raises StyxError to refuse."""
        raise StyxError("cannot remove")

    def wstat(self, st: Stat, user: str, may_rename: DirCheck | None = None) -> None:
        """Change what `st` asks; `may_rename` judges a rename as `may` judges a removal."""
        raise StyxError("cannot change this file's attributes")


class Tree:
    """A served tree: gives each attach its root.

    kernel_checked: its files are real, so when the server works as the client itself the
    kernel judges every access and the server adds no checks of its own.
    """

    kernel_checked = False

    def attach(self, peer: Peer, aname: str) -> Node:
        raise NotImplementedError


def allowed(st: Stat, user: User, want: int) -> bool:
    """Plan 9's check: other bits, plus owner bits for the owner, group bits for its groups."""
    bits = st.mode & 0o7
    if user.name == st.uid:
        bits |= (st.mode >> 6) & 0o7
    if st.gid in user.group_names or st.gid == user.name:
        bits |= (st.mode >> 3) & 0o7
    return bits & want == want


def qid_path(path: str) -> int:
    """A stable 64-bit qid path for a synthetic node."""
    import hashlib  # here: the clients, which import this module for its errors, start 3-5 ms sooner

    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little")


# -- synthetic trees -------------------------------------------------------------


class Synth(Node):
    def __init__(self, name: str, mode: int, parent: Synth | None, owner: str | None) -> None:
        self.name = name
        self.mode = mode
        self._parent = parent
        self.owner: str = owner or (parent.owner if parent else user_name(os.geteuid()))
        self.path: str = f"{parent.path}/{name}" if parent else ""
        self.mtime = int(time.time())

    def parent(self) -> Node:
        return self._parent or self

    def is_root(self) -> bool:
        return self._parent is None

    def length(self) -> int:
        return 0

    def stat(self) -> Stat:
        qtype = QTDIR if self.mode & DMDIR else QTFILE
        return Stat(
            qid=Qid(qtype, 0, qid_path(self.path or "/")),
            mode=self.mode,
            atime=self.mtime,
            mtime=self.mtime,
            length=self.length(),
            name=self.name or "/",
            uid=self.owner,
            gid=self.owner,
            muid=self.owner,
        )


class SynthDir(Synth):
    """A directory whose entries come from a function, so they follow live state."""

    def __init__(
        self,
        name: str,
        parent: SynthDir | None = None,
        entries: Callable[[SynthDir], list[Synth]] | None = None,
        perm: int = 0o555,
        owner: str | None = None,
    ) -> None:
        super().__init__(name, DMDIR | perm, parent, owner)
        self._entries = entries
        self.fixed: list[Synth] = []

    def add(self, child: Synth) -> Synth:
        self.fixed.append(child)
        return child

    def children(self) -> list[Node]:
        return [*self.fixed, *(self._entries(self) if self._entries else [])]

    def walk(self, name: str) -> Node:
        for child in self.children():
            if isinstance(child, Synth) and child.name == name:
                return child
        raise StyxError(ENONEXIST)

    def open(self, mode: int, user: str) -> Handle:
        return SynthDirHandle(self)


class SynthDirHandle(Handle):
    def __init__(self, d: SynthDir) -> None:
        self.dir = d

    def dirents(self) -> Generator[Stat, None, None]:
        return (child.stat() for child in self.dir.children())


class SynthFile(Synth):
    """A file whose opens are made by a function (text, ctl, or anything live)."""

    def __init__(
        self,
        name: str,
        parent: SynthDir,
        opener: Callable[[int, str], Handle],
        perm: int = 0o444,
        owner: str | None = None,
    ) -> None:
        super().__init__(name, perm, parent, owner)
        self._opener = opener

    def open(self, mode: int, user: str) -> Handle:
        return self._opener(mode, user)


class TextHandle(Handle):
    """Reads a text snapshot taken at open; writes run `on_write` per write as a command.

    A command's answer (if any) replaces what later reads of this open file return,
    as Plan 9 ctl files do.
    """

    snapshots = True

    def __init__(self, text: Callable[[], str] | str = "", on_write: Callable[[str], str | None] | None = None) -> None:
        self._text = text
        self._on_write = on_write
        self._snapshot: bytes | None = None

    @property
    def held(self) -> int:
        return len(self._snapshot or b"") + (len(self._text) if isinstance(self._text, str) else 0)

    def read(self, offset: int, count: int) -> bytes:
        if self._snapshot is None or offset == 0:
            self._snapshot = (self._text() if callable(self._text) else self._text).encode()
        return self._snapshot[offset : offset + count]

    def write(self, offset: int, data: bytes | memoryview) -> int:
        if self._on_write is None:
            raise StyxError(EPERM)
        try:
            command = str(data, "utf-8").strip()
        except UnicodeDecodeError:
            raise StyxError("commands are UTF-8 text") from None
        answer = self._on_write(command)
        if answer is not None:
            self._snapshot = answer.encode() if answer.endswith("\n") or not answer else (answer + "\n").encode()
            self._text = answer
        return len(data)


def text_file(
    name: str,
    parent: SynthDir,
    text: Callable[[], str],
    on_write: Callable[[str], str | None] | None = None,
    perm: int | None = None,
) -> SynthFile:
    """A file that prints `text()`, and runs written commands through `on_write`."""
    mode = perm if perm is not None else (0o644 if on_write else 0o444)
    return SynthFile(name, parent, lambda _mode, _user: TextHandle(text, on_write), mode)
