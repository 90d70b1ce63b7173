"""The 9P2000 server core, sans-IO: one Session per client connection, fed whole messages.

It keeps the fids within the connection's limits, checks walks, opens and permissions for
the connection's user (its flow's peer, never the attach name), answers directory reads
with stat records, parks requests that must wait (WouldBlock) until retried or flushed.
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable, Generator
from dataclasses import astuple, dataclass, field, fields, replace
from typing import Any

from apps.styx import wire as w
from apps.styx.agent import Peer
from apps.styx.identity import NONE_NAME, User
from apps.styx.tree import (
    EBADFID,
    EBADNAME,
    EBADUSEFID,
    EDIRCHANGE,
    EDIROFFSET,
    EEXIST,
    EISDIR,
    ENONEXIST,
    ENOTDIR,
    ENOTEMPTY,
    ENOWSTAT,
    EOFFSET,
    EPERM,
    EREMOVEROOT,
    ETOOLARGE,
    DirCheck,
    Handle,
    Node,
    StyxError,
    Tree,
    WouldBlock,
    allowed,
)

log = logging.getLogger(__name__)

ENOTVERSION = "version not negotiated: send Tversion first"
MAX_OFFSET = 2**63 - 1
MALFORMED_LOGGED = 3  # bad messages logged per connection
ENAME_MAX = 200  # error texts quote names; cut so an Rerror always fits the smallest msize


@dataclass(frozen=True)
class Limits:
    """What one client may hold, and what the server takes at once; each limit reached is
    answered with an Rerror (or, for connections, a refusal), never felt by other clients."""

    msize: int = w.MSIZE_DEFAULT  # the largest message a client may negotiate (unreliable flows: an SDU)
    fids: int = 256  # fids per connection (each may hold two descriptors)
    pending: int = 32  # requests per connection waiting for an answer (a read of an idle flow)
    flows: int = 32  # net/ flows per connection, arrivals waiting for a listen included
    conns: int = 64  # connections served at once
    conns_per_user: int = 16  # of those, per user: every anonymous client is the one user none
    attach_timeout: float = 30.0  # seconds a connection may take to attach
    send_timeout: float = 30.0  # seconds a client may leave a reply untaken before it is dropped
    anon_idle_timeout: float = 300.0  # seconds an anonymous client may stay attached with nothing asked
    # Bytes of text a connection's open files keep (the IRMd's tables and ctl answers, snapshot per open
    # file): past it no open file takes another. Each of 256 fids held up to a page of `flow list`.
    text: int = 2 << 20

    def fds_per_conn(self) -> int:
        """The descriptors one connection can hold at most: two per fid (a file and its open
        descriptor, or a directory and its listing), three per reliable flow (ours and the
        flow engine's two), and its own flow, agent and IRMd connection."""
        return 2 * self.fids + 3 * self.flows + 8


DEFAULT_LIMITS = Limits()


@dataclass
class Fid:
    node: Node
    user: User
    mode: int | None = None  # the open mode, None while not open
    handle: Handle | None = None
    isdir: bool = False
    dirents: Generator[w.Stat, None, None] | None = None  # an open directory's entries still to be read
    dircarry: bytes = b""  # an entry that did not fit the last read
    diroff: int = 0  # the offset the next directory read must ask for

    @property
    def is_open(self) -> bool:
        return self.mode is not None


@dataclass
class Pending:
    msg: w.Msg
    waitable: Any = None  # readable when a retry may succeed; None: retry on a timer


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


def _check_name(name: str) -> None:
    """A path element a client may name: not empty, "." or "..", without "/" or NUL (which no file
    name holds, and which the system calls refuse with ValueError, not an error to answer)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise StyxError(EBADNAME)


def _check_offset(offset: int) -> None:
    """Offsets and lengths are vlongs (Plan 9's are signed): beyond 2^63 - 1 no file reaches, and
    the system calls refuse them with OverflowError, not an error to answer."""
    if offset > MAX_OFFSET:
        raise StyxError(EOFFSET)


def auth_answer(user: User) -> str:
    """The Rerror to Tauth: identity comes from the flow, there is no afid protocol (attach(5))."""
    if user.anonymous:
        return "authentication not available: this connection has no identity from the stack (user none)"
    return f"authentication not required: the flow's peer is user {user.name}"


# A system call's failure as Plan 9 says it, where clients act on the words; other errors in the
# system's own words (strerror), which v9fs knows too.
PLAN9_ERRORS = {
    errno.ENOENT: ENONEXIST,
    errno.EACCES: EPERM,
    errno.EPERM: EPERM,
    errno.EEXIST: EEXIST,
    errno.ENOTEMPTY: ENOTEMPTY,
    errno.ENOTDIR: ENOTDIR,
    errno.EISDIR: EISDIR,
}


def os_error_text(e: OSError) -> str:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return "the server is out of file descriptors: try again later"
    return PLAN9_ERRORS.get(e.errno or 0) or e.strerror or str(e)


def answered_version(asked: str) -> str | None:
    """The version to answer (version(5)): 9P2000 to a client asking for it or for a later 9Pnnnn,
    with any period-separated suffix stripped; None where the server speaks no version asked."""
    base = asked.split(".", 1)[0]
    digits = base[2:]
    if base.startswith("9P") and digits.isascii() and digits.isdigit() and int(digits) >= 2000:
        return w.VERSION9P
    return None


def unchanged_as_dont_touch(new: w.Stat, st: w.Stat) -> w.Stat:
    """The Twstat record `new` with each field that names the file's present value (`st`) made
    "don't touch": stat(5) refuses attempts to change the owner, qid, type, dev or muid, not a record
    that repeats them (a client's dirwstat of what its dirstat gave, one field changed), as fossil takes it."""
    keep = w.Stat.dont_touch()
    parts = zip(astuple(new.qid), astuple(st.qid), astuple(keep.qid), strict=True)
    qid = w.Qid(*(k if n == o else n for n, o, k in parts))
    same = {f.name: getattr(keep, f.name) for f in fields(w.Stat) if getattr(new, f.name) == getattr(st, f.name)}
    return replace(new, **{**same, "qid": qid})


@dataclass
class Session:
    """One client's conversation with a tree."""

    tree: Tree
    peer: Peer
    limits: Limits = DEFAULT_LIMITS
    users: frozenset[str] | None = None  # allowlist of users (not attach names); None allows all
    on_attach: Callable[[Peer], None] | None = None  # the user is fixed: e.g. take its file credentials
    msize: int = 0  # 0 until Tversion
    attached: Peer | None = None  # whose connection this is, fixed by the first attach
    fids: dict[int, Fid] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    malformed: int = 0  # messages that did not decode (answered; the first MALFORMED_LOGGED logged)
    failed: int = 0  # requests a backend bug failed (answered; the first MALFORMED_LOGGED logged)
    _none: Peer | None = None  # this connection as user none, made on the first attach as none

    # -- the I/O loop's entry points ----------------------------------------

    def receive(self, data: bytes) -> list[bytes]:
        """One whole message in; the replies that are ready out."""
        try:
            msg = w.decode(data, self.msize or self.limits.msize)
        except w.DecodeError as e:
            tag = w.peek_tag(data)
            self.malformed += 1
            if self.malformed <= MALFORMED_LOGGED:  # then answered only: a client cannot fill the log
                log.info("bad message: %s", str(e)[:ENAME_MAX])
            return [w.encode(w.Rerror(tag if tag is not None else w.NOTAG, f"bad message: {e}"[:ENAME_MAX]))]
        if isinstance(msg, w.Tflush):  # flush(5): answered Rflush whatever its tag or oldtag, never Rerror
            return [w.encode(self._flush(msg))]
        if msg.tag in self.pending and not isinstance(msg, w.Tversion):
            # A tag still in use (a client's error) is refused as lib9p does, and the request that
            # holds it stays as it was: it is answered in its time, with its own reply.
            return [w.encode(w.Rerror(msg.tag, "duplicate tag"))]  # lib9p's words
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

    def _encode(self, reply: w.Msg) -> bytes:
        """The reply's bytes; one that cannot be encoded (a name over 64 KiB) becomes an Rerror, and so
        does one longer than the msize (an Rstat of long names): version(5) binds both sides to it."""
        try:
            data = w.encode(reply)
        except (ValueError, struct.error) as e:
            log.warning("cannot encode %s: %s", type(reply).__name__, e)
            return w.encode(w.Rerror(reply.tag, f"reply cannot be encoded: {e}"[:ENAME_MAX]))
        if self.msize and len(data) > self.msize:
            return w.encode(w.Rerror(reply.tag, f"reply of {len(data)} bytes exceeds msize {self.msize}"))
        return data

    def waitables(self) -> tuple[list[Any], bool]:
        """What parked requests wait on, and whether some can only be retried on a timer."""
        objs = [p.waitable for p in self.pending.values() if p.waitable is not None]
        return objs, len(objs) < len(self.pending)

    def close(self) -> None:
        """The connection ended: clunk every fid, let the agents go."""
        self._reset()
        if self._none is not None:
            self._none.close()

    def _reset(self) -> None:
        self.pending.clear()
        for fid in list(self.fids):
            self._clunk(fid)

    # -- dispatch ------------------------------------------------------------

    def _run(self, msg: w.Msg) -> w.Msg | None:
        try:
            return self._dispatch(msg)
        except WouldBlock as e:
            if len(self.pending) >= self.limits.pending:
                return w.Rerror(msg.tag, f"too many requests waiting (limit {self.limits.pending})")
            self.pending[msg.tag] = Pending(msg, e.waitable)
            return None
        except StyxError as e:
            return w.Rerror(msg.tag, str(e)[:ENAME_MAX])
        except OSError as e:
            return w.Rerror(msg.tag, os_error_text(e)[:ENAME_MAX])
        except Exception as e:  # a backend bug must not end the service, nor let a client fill the log
            self._backend_failed(type(msg).__name__)
            return w.Rerror(msg.tag, f"internal error: {e}"[:ENAME_MAX])

    def _backend_failed(self, what: str) -> None:
        """Count a backend's failure (an exception being handled); log the first few only."""
        self.failed += 1
        if self.failed <= MALFORMED_LOGGED:
            log.exception("%s failed", what)

    def _dispatch(self, msg: w.Msg) -> w.Msg | None:
        if isinstance(msg, w.Tversion):
            return self._version(msg)
        if not self.msize:
            raise StyxError(ENOTVERSION)
        handler = {
            w.Tauth: self._auth, w.Tattach: self._attach, w.Twalk: self._walk,
            w.Topen: self._open, w.Tcreate: self._create, w.Tread: self._read, w.Twrite: self._write,
            w.Tclunk: self._clunk_msg, w.Tremove: self._remove, w.Tstat: self._stat, w.Twstat: self._wstat,
        }.get(type(msg))  # fmt: skip
        if handler is None:
            raise StyxError(f"{type(msg).__name__} is not a request")
        return handler(msg)  # type: ignore[operator, no-any-return]

    def _fid(self, fid: int) -> Fid:
        f = self.fids.get(fid)
        if f is None:
            raise StyxError(EBADFID)
        return f

    def _new_fid(self, fid: int) -> None:
        if fid in self.fids:
            raise StyxError("fid already in use")
        if len(self.fids) >= self.limits.fids:
            raise StyxError(f"too many fids: this connection may hold {self.limits.fids}")

    @property
    def _kernel_judges(self) -> bool:
        """The files are real and the server works with the client's own credentials."""
        return self.tree.kernel_checked and self.attached is not None and self.attached.rights.as_user

    def _check(self, st: w.Stat, user: User, want: int) -> None:
        """Plan 9's permission check, unless the kernel checks the client's own credentials."""
        if not self._kernel_judges and not allowed(st, user, want):
            raise StyxError(EPERM)  # Plan 9's words exactly: what was refused, the client knows

    @staticmethod
    def _may_write(f: Fid) -> None:
        """None reads what the modes give others and changes nothing: it is anyone (a TCP client of
        a bridge, a peer of another host), so the anonymous account's rights are not lent to it to
        write, make, remove or change files."""
        if f.user.anonymous:
            raise StyxError(EPERM)

    # -- requests -------------------------------------------------------------

    def _version(self, msg: w.Tversion) -> w.Msg:
        version = answered_version(msg.version)
        # A version not understood is answered Rversion, never Rerror (version(5)), whatever the msize.
        if version is not None and msg.msize < w.MSIZE_MIN:  # a failed Tversion: the session goes on
            raise StyxError(f"msize {msg.msize} too small: at least {w.MSIZE_MIN}")
        self._reset()  # Tversion aborts all outstanding I/O and clunks all fids
        self.attached = None
        if version is not None:
            self.msize = min(msg.msize, self.limits.msize)
            return w.Rversion(msg.tag, self.msize, version)
        self.msize = 0
        return w.Rversion(msg.tag, min(msg.msize, self.limits.msize), "unknown")

    def _auth(self, msg: w.Tauth) -> w.Msg:
        raise StyxError(auth_answer(self.peer.user))

    def _attach(self, msg: w.Tattach) -> w.Msg:
        self._new_fid(msg.fid)
        if msg.afid != w.NOFID:
            raise StyxError("authentication not required: afid must be NOFID")
        if not msg.uname:
            raise StyxError("attach needs a user name")
        # The name is a label, except none: anyone may give up its identity, as in Plan 9.
        none = msg.uname == NONE_NAME or self.peer.user.anonymous
        if self.attached is not None:
            peer = self.attached
            if none != peer.user.anonymous:
                raise StyxError(f"this connection is attached as {peer.user.name}: Tversion starts over")
        elif none and not self.peer.user.anonymous:
            peer = self._none = self._none or self.peer.as_none()
        else:
            peer = self.peer
        if self.users is not None and peer.user.name not in self.users:
            raise StyxError(f"permission denied: user '{peer.user.name}' may not attach")
        if self.attached is None:
            if self.on_attach is not None:
                self.on_attach(peer)
            self.attached = peer
            if msg.uname != peer.user.name:
                log.info("attach as %r by user %s", msg.uname[:64], peer.user.name)
        root = self.tree.attach(peer, msg.aname)
        self.fids[msg.fid] = Fid(root, peer.user)
        return w.Rattach(msg.tag, root.stat().qid)

    def _flush(self, msg: w.Tflush) -> w.Rflush:
        """flush(5): the request tagged oldtag, if one waits, is never answered; whatever oldtag is (an
        answered request, a Tflush, a tag never used, the Tflush's own) and whenever it comes (before
        Tversion too), the answer is Rflush: a backend's failure to let a write go is logged, not sent."""
        p = self.pending.pop(msg.oldtag, None)
        if p is not None and isinstance(p.msg, w.Twrite):
            f = self.fids.get(p.msg.fid)
            if f is not None and f.handle is not None:
                try:
                    f.handle.abandoned(p.msg.data)
                except Exception:
                    self._backend_failed("forgetting a flushed Twrite")
        return w.Rflush(msg.tag)

    def _walk(self, msg: w.Twalk) -> w.Msg:
        f = self._fid(msg.fid)
        if f.is_open:
            raise StyxError(EBADUSEFID)  # an open fid is not walked
        if msg.newfid != msg.fid:
            self._new_fid(msg.newfid)
        node = f.node
        qids: list[w.Qid] = []
        try:
            for i, name in enumerate(msg.wname):
                try:
                    step = self._step(node, name, f.user)
                except StyxError:
                    if i == 0:
                        raise
                    return w.Rwalk(msg.tag, qids)  # a partial walk: newfid is not made
                if node is not f.node:
                    node.close()
                node = step
                qids.append(node.stat().qid)
            if node is f.node:
                node = f.node.clone()
            made, node = node, f.node  # from here on the new node is the fid's
        finally:
            if node is not f.node:
                node.close()
        if msg.newfid == msg.fid:
            f.node.close()
            f.node = made
        else:
            self.fids[msg.newfid] = Fid(made, f.user)
        return w.Rwalk(msg.tag, qids)

    def _step(self, node: Node, name: str, user: User) -> Node:
        st = node.stat()
        if not st.mode & w.DMDIR:
            raise StyxError(ENOTDIR)
        if not self._kernel_judges and not allowed(st, user, w.DMEXEC):
            raise StyxError(EPERM)
        if name == "..":
            return node.parent()
        _check_name(name)
        return node.walk(name)

    def _open(self, msg: w.Topen) -> w.Msg:
        f = self._fid(msg.fid)
        if f.is_open:
            raise StyxError(EBADUSEFID)  # already open
        st = f.node.stat()
        isdir = bool(st.mode & w.DMDIR)
        if isdir and (msg.mode & 3 != w.OREAD or msg.mode & (w.OTRUNC | w.ORCLOSE)):
            raise StyxError(EISDIR)  # directories are opened for reading only
        if writable(msg.mode) or msg.mode & (w.OTRUNC | w.ORCLOSE):
            self._may_write(f)
        self._check(st, f.user, open_wants(msg.mode))
        if msg.mode & w.ORCLOSE:
            self._may_remove(f)
        f.handle = f.node.open(msg.mode, f.user.name)
        f.mode, f.isdir = msg.mode, isdir
        return w.Ropen(msg.tag, f.node.stat().qid, self._iounit())

    def _create(self, msg: w.Tcreate) -> w.Msg:
        f = self._fid(msg.fid)
        if f.is_open:
            raise StyxError(EBADUSEFID)  # already open
        st = f.node.stat()
        if not st.mode & w.DMDIR:
            raise StyxError(ENOTDIR)
        _check_name(msg.name)
        self._may_write(f)
        self._check(st, f.user, w.DMWRITE)
        isdir = bool(msg.perm & w.DMDIR)
        if isdir and (msg.mode & 3 != w.OREAD or msg.mode & (w.OTRUNC | w.ORCLOSE)):  # as open(5) has it
            raise StyxError("a new directory can only be opened for reading")
        # Plan 9: the new file's permissions are limited by the directory's.
        mask = 0o777 if isdir else 0o666
        perm = (msg.perm & ~0o777) | (msg.perm & (~mask | (st.mode & mask)) & 0o777)
        node, handle = f.node.create(msg.name, perm, msg.mode, f.user.name)
        f.node.close()
        f.node, f.handle, f.mode, f.isdir = node, handle, msg.mode, isdir
        return w.Rcreate(msg.tag, node.stat().qid, self._iounit())

    def _iounit(self) -> int:
        return self.msize - w.IOHDRSZ

    def _read(self, msg: w.Tread) -> w.Msg:
        f = self._fid(msg.fid)
        if f.mode is None or f.handle is None or not readable(f.mode):
            raise StyxError(EBADUSEFID)  # not open for reading
        count = min(msg.count, self._iounit())
        _check_offset(msg.offset)
        if f.isdir:
            return w.Rread(msg.tag, self._dirread(f, msg.offset, count))
        if f.handle.snapshots and (msg.offset == 0 or not f.handle.held):
            self._text_room(f)
        return w.Rread(msg.tag, f.handle.read(msg.offset, count)[:count])

    def _text_room(self, f: Fid) -> None:
        """Refuse to let `f` take (or take again) a text snapshot while the connection's other open files
        keep `limits.text` bytes of them: so it holds that, and one snapshot more, at most."""
        held = sum(o.handle.held for o in self.fids.values() if o.handle is not None and o is not f)
        if held >= self.limits.text:
            raise StyxError(
                f"too much text held open by this connection ({held} bytes, limit {self.limits.text}): clunk some files"
            )

    def _dirread(self, f: Fid, offset: int, count: int) -> bytes:
        """Whole stat records, made as they are read: memory stays one entry per fid."""
        assert f.handle is not None
        if offset == 0:
            if f.dirents is not None:
                f.dirents.close()
            f.dirents, f.dircarry, f.diroff = f.handle.dirents(), b"", 0
        elif offset != f.diroff or f.dirents is None:
            raise StyxError(EDIROFFSET)  # neither 0 nor where the last read ended
        out: list[bytes] = []
        used = 0
        while True:
            rec = f.dircarry or next((st.encode() for st in f.dirents), b"")
            if not rec:
                break
            if used + len(rec) > count:
                f.dircarry = rec
                break
            f.dircarry = b""
            out.append(rec)
            used += len(rec)
        if not out and f.dircarry:
            raise StyxError(f"read count {count} too small for a directory entry")
        f.diroff += used
        return b"".join(out)

    def _write(self, msg: w.Twrite) -> w.Msg:
        f = self._fid(msg.fid)
        if f.mode is None or f.handle is None or not writable(f.mode):
            raise StyxError(EBADUSEFID)  # not open for writing
        if len(msg.data) > self._iounit():
            raise StyxError(ETOOLARGE)  # more than the iounit
        _check_offset(msg.offset)
        if f.handle.snapshots:  # a command's answer is kept: checked before the command runs
            self._text_room(f)
        return w.Rwrite(msg.tag, f.handle.write(msg.offset, msg.data))

    def _clunk_msg(self, msg: w.Tclunk) -> w.Msg:
        self._fid(msg.fid)
        self._clunk(msg.fid)
        return w.Rclunk(msg.tag)

    def _clunk(self, fid: int) -> None:
        f = self.fids.pop(fid)
        mode = f.mode
        try:
            try:
                self._release(f)
            except (StyxError, OSError) as e:
                log.info("closing fid %d: %s", fid, e)
            if mode is not None and mode & w.ORCLOSE:
                try:
                    f.node.remove(self._may_change(f))
                except (StyxError, OSError) as e:
                    log.info("remove on close of fid %d: %s", fid, e)
        finally:
            f.node.close()

    def _may_remove(self, f: Fid) -> None:
        if f.node.is_root():
            raise StyxError(EREMOVEROOT)
        self._may_change(f)(*f.node.removal_stats())

    def _may_change(self, f: Fid) -> DirCheck:
        """The check of the directory a removal or rename is made in, made by the tree on that very
        directory: a rename above it between a check of our own and the change cannot swap in another."""

        def check(parent: w.Stat, sticky_entry: w.Stat | None) -> None:
            self._check(parent, f.user, w.DMWRITE)
            # A sticky directory: only the file's owner or the directory's removes or renames it. Where
            # the server works with its own rights for others, its own would pass for whatever it owns.
            owners = () if sticky_entry is None else (sticky_entry.uid, parent.uid)
            if owners and not self._kernel_judges and f.user.name not in owners:
                raise StyxError(EPERM)

        return check

    def _remove(self, msg: w.Tremove) -> w.Msg:
        f = self._fid(msg.fid)
        try:
            self._may_write(f)
            self._may_remove(f)
            self._release(f)
            f.node.remove(self._may_change(f))
        finally:
            if self.fids.pop(msg.fid, None) is not None:  # remove clunks the fid even when it fails
                self._release(f)  # a refused remove too: its open file and listing are let go
                f.node.close()
        return w.Rremove(msg.tag)

    @staticmethod
    def _release(f: Fid) -> None:
        """Close what the fid holds open (once: a second call finds nothing), without an ORCLOSE removal."""
        if f.dirents is not None:
            f.dirents.close()
            f.dirents = None
        f.mode = None
        if f.handle is not None:
            handle, f.handle = f.handle, None
            handle.close()

    def _stat(self, msg: w.Tstat) -> w.Msg:
        return w.Rstat(msg.tag, self._fid(msg.fid).node.stat())

    def _wstat(self, msg: w.Twstat) -> w.Msg:
        f = self._fid(msg.fid)
        st = f.node.stat()
        keep = w.Stat.dont_touch()
        new = unchanged_as_dont_touch(msg.stat, st)
        if new == keep:  # a wstat that changes nothing asks for a sync (v9fs's fsync): any file may
            return w.Rwstat(msg.tag)
        if (
            (new.type, new.dev, new.qid) != (keep.type, keep.dev, keep.qid)
            or new.muid
            or (new.uid and new.uid != st.uid)
        ):
            raise StyxError(ENOWSTAT)
        self._may_write(f)
        owner = self._kernel_judges or f.user.name == st.uid
        if new.name and new.name != st.name:
            _check_name(new.name)
            if f.node.is_root():
                raise StyxError(EPERM)  # the root has no name to change
            self._may_change(f)(*f.node.removal_stats())
        if new.length != keep.length:
            if st.mode & w.DMDIR:
                raise StyxError(EISDIR)  # a directory's length can be set to 0 only
            _check_offset(new.length)
            self._check(st, f.user, w.DMWRITE)
        if new.mode != keep.mode:
            if not owner:
                raise StyxError(EPERM)  # only the owner changes the mode
            if (new.mode ^ st.mode) & w.DMDIR:
                raise StyxError(EDIRCHANGE)
        # The atime comes with the mtime from v9fs (touch sets both); it is the owner's to set as the
        # mtime is (u9fs and lib9p servers take it too), and never more than that.
        times = new.mtime != keep.mtime or new.atime != keep.atime
        regroup = bool(new.gid) and new.gid != st.gid
        if (times or regroup) and not owner:
            raise StyxError(EPERM)  # only the owner changes the times or the group
        if regroup and not self._kernel_judges and new.gid not in f.user.group_names and new.gid != f.user.name:
            raise StyxError(EPERM)  # stat(5): and only to a group it is a member of
        f.node.wstat(new, f.user.name, self._may_change(f))
        return w.Rwstat(msg.tag)
