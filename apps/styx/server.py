"""The 9P2000 server core, sans-IO: one Session per client connection, fed whole messages.

It keeps the fids, checks walks, opens and permissions, answers directory reads
with stat records, parks requests that must wait (WouldBlock) until retried or flushed.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

from apps.styx import wire as w
from apps.styx.tree import Handle, Node, StyxError, Tree, WouldBlock

log = logging.getLogger(__name__)

ENOTVERSION = "version not negotiated: send Tversion first"
ENAME_MAX = 200  # error texts quote names; cut so an Rerror always fits the smallest msize


@dataclass
class Fid:
    node: Node
    user: str
    mode: int | None = None  # the open mode, None while not open
    handle: Handle | None = None
    dirbuf: bytes = b""  # a directory's stat records, fixed at the read at offset 0
    diroff: int = 0  # the offset the next directory read must ask for

    @property
    def is_open(self) -> bool:
        return self.mode is not None


@dataclass
class Pending:
    msg: w.Msg
    waitable: Any = None  # readable when a retry may succeed; None: retry on a timer


def allowed(st: w.Stat, user: str, want: int) -> bool:
    """Plan 9's check: other bits, plus owner bits for the owner, group bits for the group."""
    bits = st.mode & 0o7
    if user == st.uid:
        bits |= (st.mode >> 6) & 0o7
    if user == st.gid:
        bits |= (st.mode >> 3) & 0o7
    return bits & want == want


def open_wants(mode: int) -> int:
    """The permission bits an open mode needs."""
    want = {w.OREAD: w.DMREAD, w.OWRITE: w.DMWRITE, w.ORDWR: w.DMREAD | w.DMWRITE, w.OEXEC: w.DMEXEC}[mode & 3]
    if mode & w.OTRUNC:
        want |= w.DMWRITE
    return want


def readable(mode: int) -> bool:
    return mode & 3 in (w.OREAD, w.ORDWR, w.OEXEC)


def writable(mode: int) -> bool:
    return mode & 3 in (w.OWRITE, w.ORDWR)


@dataclass
class Session:
    """One client's conversation with a tree."""

    tree: Tree
    msize_max: int = w.MSIZE_MAX
    users: frozenset[str] | None = None  # allowlist of attach names; None allows all
    msize: int = 0  # 0 until Tversion
    fids: dict[int, Fid] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)

    # -- the I/O loop's entry points ----------------------------------------

    def receive(self, data: bytes) -> list[bytes]:
        """One whole message in; the replies that are ready out."""
        try:
            msg = w.decode(data, self.msize or self.msize_max)
        except w.DecodeError as e:
            tag = w.peek_tag(data)
            log.info("bad message: %s", e)
            return [w.encode(w.Rerror(tag if tag is not None else w.NOTAG, f"bad message: {e}"[:ENAME_MAX]))]
        if msg.tag in self.pending and not isinstance(msg, w.Tversion):
            return [w.encode(w.Rerror(msg.tag, f"tag {msg.tag} is in use"))]
        reply = self._run(msg)
        return [self._encode(reply)] if reply is not None else []

    def retry(self) -> list[bytes]:
        """Run the parked requests again; the replies of those that could go."""
        out = []
        for tag, p in list(self.pending.items()):
            del self.pending[tag]
            reply = self._run(p.msg)
            if reply is not None:
                out.append(self._encode(reply))
        return out

    @staticmethod
    def _encode(reply: w.Msg) -> bytes:
        """The reply's bytes; one that cannot be encoded (a name over 64 KiB) becomes an Rerror."""
        try:
            return w.encode(reply)
        except (ValueError, struct.error) as e:
            log.warning("cannot encode %s: %s", type(reply).__name__, e)
            return w.encode(w.Rerror(reply.tag, f"reply cannot be encoded: {e}"[:1000]))

    def waitables(self) -> tuple[list[Any], bool]:
        """What parked requests wait on, and whether some can only be retried on a timer."""
        objs = [p.waitable for p in self.pending.values() if p.waitable is not None]
        return objs, len(objs) < len(self.pending)

    def close(self) -> None:
        """The connection ended: clunk every fid."""
        self.pending.clear()
        for fid in list(self.fids):
            self._clunk(fid)

    # -- dispatch ------------------------------------------------------------

    def _run(self, msg: w.Msg) -> w.Msg | None:
        try:
            return self._dispatch(msg)
        except WouldBlock as e:
            self.pending[msg.tag] = Pending(msg, e.waitable)
            return None
        except StyxError as e:
            return w.Rerror(msg.tag, str(e)[:ENAME_MAX])
        except OSError as e:
            return w.Rerror(msg.tag, (e.strerror or str(e))[:ENAME_MAX])
        except Exception as e:  # a backend bug must not end the service
            log.exception("%s failed", type(msg).__name__)
            return w.Rerror(msg.tag, f"internal error: {e}")

    def _dispatch(self, msg: w.Msg) -> w.Msg | None:
        if isinstance(msg, w.Tversion):
            return self._version(msg)
        if not self.msize:
            raise StyxError(ENOTVERSION)
        handler = {
            w.Tauth: self._auth, w.Tattach: self._attach, w.Tflush: self._flush, w.Twalk: self._walk,
            w.Topen: self._open, w.Tcreate: self._create, w.Tread: self._read, w.Twrite: self._write,
            w.Tclunk: self._clunk_msg, w.Tremove: self._remove, w.Tstat: self._stat, w.Twstat: self._wstat,
        }.get(type(msg))  # fmt: skip
        if handler is None:
            raise StyxError(f"{type(msg).__name__} is not a request")
        return handler(msg)  # type: ignore[operator, no-any-return]

    def _fid(self, fid: int) -> Fid:
        f = self.fids.get(fid)
        if f is None:
            raise StyxError(f"unknown fid {fid}")
        return f

    # -- requests -------------------------------------------------------------

    def _version(self, msg: w.Tversion) -> w.Msg:
        self.close()  # Tversion aborts all outstanding I/O and clunks all fids
        if msg.msize < w.MSIZE_MIN:
            self.msize = 0
            raise StyxError(f"msize {msg.msize} too small: at least {w.MSIZE_MIN}")
        if msg.version == w.VERSION9P or msg.version.startswith(w.VERSION9P + "."):
            self.msize = min(msg.msize, self.msize_max)
            return w.Rversion(msg.tag, self.msize, w.VERSION9P)
        self.msize = 0
        return w.Rversion(msg.tag, min(msg.msize, self.msize_max), "unknown")

    def _auth(self, msg: w.Tauth) -> w.Msg:
        raise StyxError("authentication not required")

    def _attach(self, msg: w.Tattach) -> w.Msg:
        if msg.fid in self.fids:
            raise StyxError(f"fid {msg.fid} in use")
        if msg.afid != w.NOFID:
            raise StyxError("authentication not required: afid must be NOFID")
        if not msg.uname:
            raise StyxError("attach needs a user name")
        if self.users is not None and msg.uname not in self.users:
            raise StyxError(f"permission denied: user '{msg.uname}' may not attach")
        root = self.tree.attach(msg.uname, msg.aname)
        self.fids[msg.fid] = Fid(root, msg.uname)
        return w.Rattach(msg.tag, root.stat().qid)

    def _flush(self, msg: w.Tflush) -> w.Msg:
        self.pending.pop(msg.oldtag, None)  # the flushed request is never answered
        return w.Rflush(msg.tag)

    def _walk(self, msg: w.Twalk) -> w.Msg:
        f = self._fid(msg.fid)
        if f.is_open:
            raise StyxError("cannot walk an open fid")
        if msg.newfid != msg.fid and msg.newfid in self.fids:
            raise StyxError(f"fid {msg.newfid} in use")
        node = f.node
        qids: list[w.Qid] = []
        for i, name in enumerate(msg.wname):
            try:
                node = self._step(node, name, f.user)
            except StyxError:
                if i == 0:
                    raise
                return w.Rwalk(msg.tag, qids)  # a partial walk: newfid is not made
            qids.append(node.stat().qid)
        self.fids[msg.newfid] = Fid(node, f.user)
        return w.Rwalk(msg.tag, qids)

    def _step(self, node: Node, name: str, user: str) -> Node:
        st = node.stat()
        if not st.mode & w.DMDIR:
            raise StyxError(f"walk in non-directory '{st.name}'")
        if not allowed(st, user, w.DMEXEC):
            raise StyxError(f"permission denied: cannot search '{st.name}'")
        if name == "..":
            return node.parent()
        if not name or name == "." or "/" in name:
            raise StyxError(f"bad file name '{name}'")
        return node.walk(name)

    def _open(self, msg: w.Topen) -> w.Msg:
        f = self._fid(msg.fid)
        if f.is_open:
            raise StyxError("fid already open")
        st = f.node.stat()
        if st.mode & w.DMDIR and (msg.mode & 3 != w.OREAD or msg.mode & (w.OTRUNC | w.ORCLOSE)):
            raise StyxError(f"'{st.name}' is a directory: open it for reading only")
        if not allowed(st, f.user, open_wants(msg.mode)):
            raise StyxError(f"permission denied: open '{st.name}'")
        if msg.mode & w.ORCLOSE:
            self._may_remove(f)
        f.handle = f.node.open(msg.mode, f.user)
        f.mode = msg.mode
        return w.Ropen(msg.tag, f.node.stat().qid, self._iounit())

    def _create(self, msg: w.Tcreate) -> w.Msg:
        f = self._fid(msg.fid)
        if f.is_open:
            raise StyxError("fid already open")
        st = f.node.stat()
        if not st.mode & w.DMDIR:
            raise StyxError(f"create in non-directory '{st.name}'")
        if msg.name in ("", ".", "..") or "/" in msg.name:
            raise StyxError(f"bad file name '{msg.name}'")
        if not allowed(st, f.user, w.DMWRITE):
            raise StyxError(f"permission denied: create in '{st.name}'")
        if msg.perm & w.DMDIR and (msg.mode & 3 != w.OREAD or msg.mode & w.OTRUNC):
            raise StyxError("a new directory can only be opened for reading")
        # Plan 9: the new file's permissions are limited by the directory's.
        mask = 0o777 if msg.perm & w.DMDIR else 0o666
        perm = (msg.perm & ~0o777) | (msg.perm & (~mask | (st.mode & mask)) & 0o777)
        node, handle = f.node.create(msg.name, perm, msg.mode, f.user)
        f.node, f.handle, f.mode = node, handle, msg.mode
        return w.Rcreate(msg.tag, node.stat().qid, self._iounit())

    def _iounit(self) -> int:
        return self.msize - w.IOHDRSZ

    def _read(self, msg: w.Tread) -> w.Msg:
        f = self._fid(msg.fid)
        if f.mode is None or f.handle is None or not readable(f.mode):
            raise StyxError("fid not open for reading")
        count = min(msg.count, self._iounit())
        if f.node.is_dir():
            return w.Rread(msg.tag, self._dirread(f, msg.offset, count))
        return w.Rread(msg.tag, f.handle.read(msg.offset, count)[:count])

    def _dirread(self, f: Fid, offset: int, count: int) -> bytes:
        if offset == 0:
            f.dirbuf = b"".join(child.stat().encode() for child in f.node.children())
        elif offset != f.diroff:
            raise StyxError(f"bad directory read offset {offset}: expected 0 or {f.diroff}")
        out: list[bytes] = []
        pos = offset
        while pos < len(f.dirbuf):
            n = w.message_size(f.dirbuf[pos : pos + 2] + b"\0\0") + 2
            if pos - offset + n > count:
                break
            out.append(f.dirbuf[pos : pos + n])
            pos += n
        if not out and pos < len(f.dirbuf):
            raise StyxError(f"read count {count} too small for a directory entry")
        f.diroff = pos
        return b"".join(out)

    def _write(self, msg: w.Twrite) -> w.Msg:
        f = self._fid(msg.fid)
        if f.mode is None or f.handle is None or not writable(f.mode):
            raise StyxError("fid not open for writing")
        if len(msg.data) > self._iounit():
            raise StyxError(f"write of {len(msg.data)} bytes exceeds iounit {self._iounit()}")
        return w.Rwrite(msg.tag, f.handle.write(msg.offset, msg.data))

    def _clunk_msg(self, msg: w.Tclunk) -> w.Msg:
        self._fid(msg.fid)
        self._clunk(msg.fid)
        return w.Rclunk(msg.tag)

    def _clunk(self, fid: int) -> None:
        f = self.fids.pop(fid)
        if f.handle is not None:
            try:
                f.handle.close()
            except (StyxError, OSError) as e:
                log.info("closing fid %d: %s", fid, e)
        if f.mode is not None and f.mode & w.ORCLOSE:
            try:
                f.node.remove()
            except (StyxError, OSError) as e:
                log.info("remove on close of fid %d: %s", fid, e)

    def _may_remove(self, f: Fid) -> None:
        parent = f.node.parent()
        if parent is f.node:
            raise StyxError("cannot remove the root")
        if not allowed(parent.stat(), f.user, w.DMWRITE):
            raise StyxError(f"permission denied: remove from '{parent.stat().name}'")

    def _remove(self, msg: w.Tremove) -> w.Msg:
        f = self._fid(msg.fid)
        try:
            self._may_remove(f)
            if f.handle is not None:
                f.handle.close()
                f.handle = None
            f.mode = None
            f.node.remove()
        finally:
            self.fids.pop(msg.fid, None)  # remove clunks the fid even when it fails
        return w.Rremove(msg.tag)

    def _stat(self, msg: w.Tstat) -> w.Msg:
        return w.Rstat(msg.tag, self._fid(msg.fid).node.stat())

    def _wstat(self, msg: w.Twstat) -> w.Msg:
        f = self._fid(msg.fid)
        st, new = f.node.stat(), msg.stat
        keep = w.Stat.dont_touch()
        if (new.type, new.dev, new.qid, new.atime) != (keep.type, keep.dev, keep.qid, keep.atime) \
                or new.muid or (new.uid and new.uid != st.uid):
            raise StyxError("wstat can change only name, length, mode, mtime and gid")
        owner = f.user == st.uid
        if new.name and new.name != st.name:
            if new.name in (".", "..") or "/" in new.name:
                raise StyxError(f"bad file name '{new.name}'")
            parent = f.node.parent()
            if parent is f.node or not allowed(parent.stat(), f.user, w.DMWRITE):
                raise StyxError("permission denied: rename")
        if new.length != keep.length:
            if st.mode & w.DMDIR:
                raise StyxError("cannot set the length of a directory")
            if not allowed(st, f.user, w.DMWRITE):
                raise StyxError("permission denied: truncate")
        if new.mode != keep.mode:
            if not owner:
                raise StyxError("permission denied: only the owner changes the mode")
            if (new.mode ^ st.mode) & w.DMDIR:
                raise StyxError("cannot change the directory bit")
        if (new.mtime != keep.mtime or (new.gid and new.gid != st.gid)) and not owner:
            raise StyxError("permission denied: only the owner changes mtime or gid")
        f.node.wstat(new, f.user)
        return w.Rwstat(msg.tag)
