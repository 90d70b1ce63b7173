"""The 9P server core driven sans-IO: versions, fids, walks, opens and permissions,
directory reads, writes, remove, wstat, flush, and escapes from the served root."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import BIN, fds_on, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.styx import beneath, fscreds
from apps.styx import wire as w
from apps.styx.agent import Peer
from apps.styx.fs import FsTree
from apps.styx.identity import NONE, Creds, Policy, User, server_policy, user_for_uid
from apps.styx.serve import Server, refuse
from apps.styx.server import Limits, Session
from apps.styx.transport import Transport
from apps.styx.tree import Handle, SynthDir, SynthFile, Tree, WouldBlock, text_file

ME = user_for_uid(os.geteuid())
USER = ME.name
POLICY = server_policy()
# A server that cannot act as others (not root): its Plan 9 checks decide for them.
UNPRIVILEGED = Policy(euid=4242, anon=Creds(65534, 65534))


def rpc(s: Session, msg: w.Msg) -> w.Msg:
    replies = s.receive(w.encode(msg))
    assert len(replies) == 1, replies
    reply = w.decode(replies[0])
    assert reply.tag == msg.tag
    return reply


def ok(s: Session, msg: w.Msg) -> w.Msg:
    reply = rpc(s, msg)
    assert not isinstance(reply, w.Rerror), reply
    return reply


def err(s: Session, msg: w.Msg, match: str = "") -> str:
    reply = rpc(s, msg)
    assert isinstance(reply, w.Rerror), reply
    assert match in reply.ename
    return reply.ename


def new_session(tree: Tree, user: User = ME, policy: Policy = POLICY, **kw: object) -> Session:
    return Session(tree, Peer(user, policy), **kw)  # type: ignore[arg-type]


def session(tree: Tree, user: User = ME, policy: Policy = POLICY, **kw: object) -> Session:
    s = new_session(tree, user, policy, **kw)
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    ok(s, w.Tattach(1, 0, w.NOFID, user.name, ""))
    return s


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    (d / "hello.txt").write_text("hello world")
    (d / "sub").mkdir()
    (d / "sub" / "deep.txt").write_text("deep")
    (tmp_path / "secret.txt").write_text("outside")
    return d


@pytest.fixture
def fs(root: Path) -> Session:
    return session(FsTree(root))


def walk(s: Session, names: list[str], newfid: int = 2, fid: int = 0) -> w.Msg:
    return rpc(s, w.Twalk(5, fid, newfid, names))


# -- version ---------------------------------------------------------------------------


def test_version_rules(root: Path) -> None:
    s = new_session(FsTree(root), limits=Limits(msize=65535))
    assert rpc(s, w.Tversion(w.NOTAG, 1 << 20, "9P2000")) == w.Rversion(w.NOTAG, 65535, "9P2000")
    assert rpc(s, w.Tversion(w.NOTAG, 8192, "9P2000.u")) == w.Rversion(w.NOTAG, 8192, "9P2000")
    assert rpc(s, w.Tversion(w.NOTAG, 8192, "9P2000.L")).version == "9P2000"  # type: ignore[attr-defined]
    assert rpc(s, w.Tversion(w.NOTAG, 8192, "9P1999")).version == "unknown"  # type: ignore[attr-defined]
    err(s, w.Tattach(1, 0, w.NOFID, USER, ""), "Tversion first")
    err(s, w.Tversion(w.NOTAG, 100, "9P2000"), "too small")
    # version(5): a version the server does not understand is answered Rversion, never Rerror
    assert rpc(s, w.Tversion(w.NOTAG, 100, "9P1999")) == w.Rversion(w.NOTAG, 100, "unknown")


def test_requests_before_version_are_refused(root: Path) -> None:
    err(new_session(FsTree(root)), w.Tattach(1, 0, w.NOFID, USER, ""), "Tversion")


def test_version_clunks_all_fids(fs: Session) -> None:
    ok(fs, w.Tversion(w.NOTAG, 8192, "9P2000"))
    err(fs, w.Tstat(1, 0), "fid unknown or out of range")


def test_message_over_msize_gets_rerror(fs: Session) -> None:
    replies = fs.receive(w.encode(w.Twrite(7, 0, 0, bytes(9000))))
    assert w.decode(replies[0]) == w.Rerror(7, "bad message: message of 9023 bytes exceeds msize 8192")


def test_garbage_gets_rerror_not_a_crash(fs: Session) -> None:
    for junk in [b"", b"\x01", b"\x07\x00\x00\x00\x6a\x05\x00", os.urandom(64)]:
        replies = fs.receive(junk)
        assert len(replies) == 1 and isinstance(w.decode(replies[0]), w.Rerror)
    ok(fs, w.Tstat(1, 0))  # the session still works


# -- attach, walk ----------------------------------------------------------------------


def test_attach_refuses_auth_and_fid_reuse(root: Path) -> None:
    s = session(FsTree(root))
    err(s, w.Tauth(2, 5, USER, ""), f"authentication not required: the flow's peer is user {USER}")
    err(s, w.Tattach(2, 0, w.NOFID, USER, ""), "in use")
    err(s, w.Tattach(2, 1, 7, USER, ""), "afid")
    anon = session(FsTree(root), NONE)
    err(anon, w.Tauth(2, 5, "root", ""), "no identity from the stack")


ALICE = User("alice", 5001, 5001, (5001,), frozenset({"alice"}))
MALLORY = User("mallory", 5002, 5002, (5002,), frozenset({"mallory"}))


def test_user_allowlist_names_the_peer_not_the_attach_name(root: Path) -> None:
    s = new_session(FsTree(root), MALLORY, users=frozenset({"alice"}))
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    err(s, w.Tattach(1, 0, w.NOFID, "alice", ""), "user 'mallory' may not attach")
    s = new_session(FsTree(root), ALICE, users=frozenset({"alice"}))
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    ok(s, w.Tattach(1, 0, w.NOFID, "whatever-label", ""))


def test_the_attach_name_is_a_label_except_none(root: Path) -> None:
    (root / "private").write_text("p")
    os.chmod(root / "private", 0o600)
    s = session(FsTree(root), MALLORY, UNPRIVILEGED)
    ok(s, w.Tattach(2, 5, w.NOFID, "alice", ""))  # claiming alice changes nothing
    ok(s, w.Twalk(1, 5, 6, ["private"]))
    err(s, w.Topen(1, 6, w.OREAD), "permission denied")
    assert ok(s, w.Tstat(1, 6)).stat.uid != "mallory"  # type: ignore[attr-defined]
    err(s, w.Tattach(3, 7, w.NOFID, "none", ""), "attached as mallory")  # one user per connection
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    ok(s, w.Tattach(3, 7, w.NOFID, "none", ""))  # anyone may become none
    assert s.attached is not None and s.attached.user.anonymous


def test_walk_full_partial_and_failed(fs: Session) -> None:
    reply = walk(fs, ["sub", "deep.txt"])
    assert isinstance(reply, w.Rwalk) and len(reply.wqid) == 2 and reply.wqid[0].type == w.QTDIR
    partial = walk(fs, ["sub", "nope", "x"], newfid=3)
    assert isinstance(partial, w.Rwalk) and len(partial.wqid) == 1
    err(fs, w.Tstat(1, 3), "fid unknown or out of range")  # a partial walk makes no newfid
    err(fs, w.Twalk(1, 0, 4, ["nope"]), "does not exist")
    err(fs, w.Twalk(1, 0, 2, []), "in use")  # newfid 2 exists
    err(fs, w.Twalk(1, 2, 6, ["x"]), "not a directory")
    err(fs, w.Twalk(1, 99, 6, []), "fid unknown or out of range")


def test_walk_zero_names_clones_and_same_fid_moves(fs: Session) -> None:
    ok(fs, w.Twalk(1, 0, 2, []))
    ok(fs, w.Twalk(1, 2, 2, ["sub"]))
    st = ok(fs, w.Tstat(1, 2))
    assert isinstance(st, w.Rstat) and st.stat.name == "sub"


def test_dotdot_cannot_leave_the_root(fs: Session) -> None:
    reply = walk(fs, ["..", "..", "..", "etc", "passwd"])
    assert isinstance(reply, w.Rerror) or len(reply.wqid) < 5  # type: ignore[attr-defined]
    root_qid = ok(fs, w.Tstat(1, 0)).stat.qid  # type: ignore[attr-defined]
    assert walk(fs, ["..", "secret.txt"], newfid=3) == w.Rwalk(5, [root_qid])  # partial: stopped at the root
    err(fs, w.Tstat(1, 3), "fid unknown or out of range")
    ok(fs, w.Twalk(1, 0, 3, ["sub", "..", "hello.txt"]))


def test_symlinks_out_of_the_root_are_not_there(root: Path, fs: Session) -> None:
    (root / "out").symlink_to(root.parent / "secret.txt")
    (root / "outdir").symlink_to("/etc")
    (root / "in").symlink_to("hello.txt")
    err(fs, w.Twalk(1, 0, 2, ["out"]), "does not exist")
    err(fs, w.Twalk(1, 0, 2, ["outdir", "passwd"]), "does not exist")
    ok(fs, w.Twalk(1, 0, 2, ["in"]))
    ok(fs, w.Topen(1, 2, w.OREAD))
    assert ok(fs, w.Tread(1, 2, 0, 100)) == w.Rread(1, b"hello world")
    ok(fs, w.Topen(1, 0, w.OREAD))
    names = [s.name for s in w.stats_decode(ok(fs, w.Tread(1, 0, 0, 8000)).data)]  # type: ignore[attr-defined]
    assert "out" not in names and "outdir" not in names and "in" in names


def test_long_names_in_errors_still_fit_the_smallest_msize(root: Path) -> None:
    s = new_session(FsTree(root))
    ok(s, w.Tversion(w.NOTAG, w.MSIZE_MIN, "9P2000"))
    ok(s, w.Tattach(1, 0, w.NOFID, USER, ""))
    reply = s.receive(w.encode(w.Twalk(2, 0, 1, ["x" * 200])))[0]
    assert len(reply) <= w.MSIZE_MIN and isinstance(w.decode(reply), w.Rerror)


def test_names_with_slashes_or_dots_are_refused(fs: Session) -> None:
    err(fs, w.Twalk(1, 0, 2, ["sub/deep.txt"]), "illegal name")
    err(fs, w.Twalk(1, 0, 2, ["."]), "illegal name")
    err(fs, w.Twalk(1, 0, 2, ["/etc"]), "illegal name")
    err(fs, w.Tcreate(1, 0, "../x", 0o644, w.OWRITE), "illegal name")


# -- open, read, write ---------------------------------------------------------------------


def test_read_with_offsets_and_count_capped_by_msize(fs: Session) -> None:
    walk(fs, ["hello.txt"])
    err(fs, w.Tread(1, 2, 0, 5), "bad use of fid")
    ok(fs, w.Topen(1, 2, w.OREAD))
    err(fs, w.Topen(1, 2, w.OREAD), "bad use of fid")
    assert ok(fs, w.Tread(1, 2, 6, 100)) == w.Rread(1, b"world")
    assert ok(fs, w.Tread(1, 2, 11, 100)) == w.Rread(1, b"")
    err(fs, w.Twrite(1, 2, 0, b"x"), "bad use of fid")
    err(fs, w.Twalk(1, 2, 3, []), "bad use of fid")


def test_write_and_truncate(root: Path, fs: Session) -> None:
    walk(fs, ["hello.txt"])
    ok(fs, w.Topen(1, 2, w.ORDWR))
    assert ok(fs, w.Twrite(1, 2, 6, b"there")) == w.Rwrite(1, 5)
    assert (root / "hello.txt").read_text() == "hello there"
    walk(fs, ["hello.txt"], newfid=3)
    ok(fs, w.Topen(1, 3, w.OWRITE | w.OTRUNC))
    assert (root / "hello.txt").read_text() == ""


def test_permissions_follow_owner_group_other(root: Path) -> None:
    (root / "private").write_text("p")
    os.chmod(root / "private", 0o600)
    s = session(FsTree(root), User("someone-else", 4343), UNPRIVILEGED)
    ok(s, w.Twalk(1, 0, 2, ["private"]))
    err(s, w.Topen(1, 2, w.OREAD), "permission denied")
    ok(s, w.Twalk(1, 0, 3, ["hello.txt"]))  # 0644: others read, not write
    ok(s, w.Topen(1, 3, w.OREAD))
    ok(s, w.Twalk(1, 0, 4, ["hello.txt"]))
    err(s, w.Topen(1, 4, w.OWRITE), "permission denied")
    err(s, w.Tcreate(1, 0, "new", 0o644, w.OWRITE), "permission denied")
    os.chmod(root / "sub", 0o700)
    assert len(walk(s, ["sub", "deep.txt"], newfid=5).wqid) == 1  # type: ignore[attr-defined]
    ok(s, w.Twalk(1, 0, 5, ["sub"]))
    err(s, w.Twalk(1, 5, 6, ["deep.txt"]), "permission denied")


def test_directories_open_for_reading_only(fs: Session) -> None:
    walk(fs, ["sub"])
    err(fs, w.Topen(1, 2, w.OWRITE), "directory")
    err(fs, w.Topen(1, 2, w.OREAD | w.OTRUNC), "directory")


def test_directory_reads_are_whole_stat_records(fs: Session) -> None:
    ok(fs, w.Topen(1, 0, w.OREAD))
    first = ok(fs, w.Tread(1, 0, 0, 80)).data  # type: ignore[attr-defined]
    assert len(w.stats_decode(first)) == 1  # two records do not fit in 80 bytes
    err(fs, w.Tread(1, 0, 5, 80), "offset")
    rest = ok(fs, w.Tread(1, 0, len(first), 8000)).data  # type: ignore[attr-defined]
    names = [s.name for s in w.stats_decode(bytes(first) + bytes(rest))]
    assert sorted(names) == ["hello.txt", "sub"]  # in the directory's own order, as Plan 9
    assert ok(fs, w.Tread(1, 0, len(first) + len(rest), 8000)) == w.Rread(1, b"")
    err(fs, w.Tread(1, 0, 0, 10), "too small")


def test_create_file_and_directory(root: Path, fs: Session) -> None:
    ok(fs, w.Twalk(1, 0, 2, []))
    reply = ok(fs, w.Tcreate(1, 2, "new.txt", 0o666, w.OWRITE))
    assert isinstance(reply, w.Rcreate) and reply.iounit == 8192 - w.IOHDRSZ
    ok(fs, w.Twrite(1, 2, 0, b"data"))
    assert (root / "new.txt").read_bytes() == b"data"
    assert (root / "new.txt").stat().st_mode & 0o777 == 0o644  # limited by the directory's 0755... & umask
    ok(fs, w.Twalk(1, 0, 3, []))
    err(fs, w.Tcreate(1, 3, "new.txt", 0o644, w.OWRITE), "exists")
    ok(fs, w.Twalk(1, 0, 4, []))
    ok(fs, w.Tcreate(1, 4, "d", w.DMDIR | 0o755, w.OREAD))
    assert (root / "d").is_dir()
    st = ok(fs, w.Tstat(1, 4))
    assert st.stat.mode & w.DMDIR  # type: ignore[attr-defined]


def test_remove_clunks_even_on_failure(root: Path, fs: Session) -> None:
    walk(fs, ["sub"])
    err(fs, w.Tremove(1, 2), "not empty")
    err(fs, w.Tstat(1, 2), "fid unknown or out of range")
    walk(fs, ["hello.txt"], newfid=3)
    ok(fs, w.Tremove(1, 3))
    assert not (root / "hello.txt").exists()
    err(fs, w.Tremove(1, 0), "root")


def test_orclose_removes_on_clunk(root: Path, fs: Session) -> None:
    walk(fs, ["hello.txt"])
    ok(fs, w.Topen(1, 2, w.OREAD | w.ORCLOSE))
    assert (root / "hello.txt").exists()
    ok(fs, w.Tclunk(1, 2))
    assert not (root / "hello.txt").exists()
    err(fs, w.Tclunk(1, 2), "fid unknown or out of range")


def test_touch_sets_atime_and_mtime_of_an_existing_file(root: Path, fs: Session) -> None:
    """v9fs's setattr sends the atime with the mtime (utimensat with both): touch must work."""
    walk(fs, ["hello.txt"])
    change = w.Stat.dont_touch()
    change.atime, change.mtime = 1_000_000_000, 1_100_000_000
    ok(fs, w.Twstat(1, 2, change))
    st = (root / "hello.txt").stat()
    assert (int(st.st_atime), int(st.st_mtime)) == (1_000_000_000, 1_100_000_000)


def test_an_atime_change_needs_what_an_mtime_change_needs(root: Path) -> None:
    """Only the owner changes times, the atime as the mtime: a writer who is not the owner may not."""
    os.chmod(root / "hello.txt", 0o666)
    before = (root / "hello.txt").stat()
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)
    ok(other, w.Twalk(1, 0, 2, ["hello.txt"]))
    change = w.Stat.dont_touch()
    change.atime = 1_000_000_000
    err(other, w.Twstat(1, 2, change), "permission denied")
    assert (root / "hello.txt").stat().st_atime_ns == before.st_atime_ns


def test_an_oexec_open_needs_execute_permission_where_the_kernel_judges(root: Path, fs: Session) -> None:
    """open(5): mode 3 is execute access; read permission alone does not give it (not even to root,
    which the kernel lets execute only what some execute bit allows)."""
    os.chmod(root / "hello.txt", 0o644)
    walk(fs, ["hello.txt"])
    err(fs, w.Topen(1, 2, w.OEXEC), "permission denied")
    os.chmod(root / "hello.txt", 0o755)
    ok(fs, w.Topen(1, 2, w.OEXEC))
    assert ok(fs, w.Tread(1, 2, 0, 5)).data == b"hello"  # type: ignore[attr-defined]


def test_an_oexec_open_needs_execute_permission_in_the_servers_own_check(root: Path) -> None:
    os.chmod(root / "hello.txt", 0o644)
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)
    ok(other, w.Twalk(1, 0, 2, ["hello.txt"]))
    err(other, w.Topen(1, 2, w.OEXEC), "permission denied")
    ok(other, w.Topen(1, 2, w.OREAD))


def test_orclose_is_refused_at_the_open_where_the_client_may_not_remove(root: Path) -> None:
    """open(5): ORCLOSE needs permission to remove the file (write permission in its directory)."""
    os.chmod(root / "sub" / "deep.txt", 0o666)
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)
    ok(other, w.Twalk(1, 0, 2, ["sub", "deep.txt"]))
    err(other, w.Topen(1, 2, w.ORDWR | w.ORCLOSE), "permission denied")
    ok(other, w.Topen(1, 2, w.ORDWR))  # the same open without ORCLOSE
    ok(other, w.Tclunk(1, 2))
    assert (root / "sub" / "deep.txt").exists()


def test_wstat_rename_truncate_and_refusals(root: Path, fs: Session) -> None:
    walk(fs, ["hello.txt"])
    change = w.Stat.dont_touch()
    change.name, change.length = "renamed.txt", 5
    ok(fs, w.Twstat(1, 2, change))
    assert (root / "renamed.txt").read_text() == "hello"
    assert ok(fs, w.Tstat(1, 2)).stat.name == "renamed.txt"  # type: ignore[attr-defined]
    bad = w.Stat.dont_touch()
    bad.uid = "someone"
    err(fs, w.Twstat(1, 2, bad), "wstat prohibited")
    escape = w.Stat.dont_touch()
    escape.name = "../x"
    err(fs, w.Twstat(1, 2, escape), "illegal name")
    ok(fs, w.Twstat(1, 2, w.Stat.dont_touch()))  # a no-op "sync"


# -- concurrency: parked requests, flush, tags ------------------------------------------------


class Gate(Handle):
    """A read that blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.data: bytes | None = None

    def read(self, offset: int, count: int) -> bytes:
        if self.data is None:
            raise WouldBlock()
        return self.data


class GateTree(Tree):
    def __init__(self) -> None:
        self.gate = Gate()
        self.root = SynthDir("")
        self.root.add(SynthFile("gate", self.root, lambda mode, user: self.gate, 0o444))
        self.root.add(text_file("motd", self.root, lambda: "hello\n"))

    def attach(self, peer: Peer, aname: str) -> SynthDir:
        return self.root


def test_blocked_read_is_parked_then_answered() -> None:
    tree = GateTree()
    s = session(tree)
    ok(s, w.Twalk(1, 0, 2, ["gate"]))
    ok(s, w.Topen(1, 2, w.OREAD))
    assert s.receive(w.encode(w.Tread(10, 2, 0, 100))) == []
    assert s.retry() == []
    assert s.waitables() == ([], True)  # nothing to wait on: the loop retries on a timer
    # other tags go on meanwhile
    ok(s, w.Twalk(11, 0, 3, ["motd"]))
    err(s, w.Tread(10, 2, 0, 1), "duplicate tag")
    tree.gate.data = b"open"
    assert [w.decode(r) for r in s.retry()] == [w.Rread(10, b"open")]
    assert not s.pending


def test_flush_cancels_a_parked_request() -> None:
    tree = GateTree()
    s = session(tree)
    ok(s, w.Twalk(1, 0, 2, ["gate"]))
    ok(s, w.Topen(1, 2, w.OREAD))
    assert s.receive(w.encode(w.Tread(10, 2, 0, 100))) == []
    assert ok(s, w.Tflush(11, 10)) == w.Rflush(11)
    tree.gate.data = b"late"
    assert s.retry() == []  # the flushed request is never answered
    assert ok(s, w.Tflush(12, 999)) == w.Rflush(12)  # flushing an answered tag is fine


def parked_gate_read(s: Session, tag: int, fid: int = 2) -> None:
    """Open the gate as `fid` and leave a read of it parked under `tag`."""
    ok(s, w.Twalk(1, 0, fid, ["gate"]))
    ok(s, w.Topen(1, fid, w.OREAD))
    assert s.receive(w.encode(w.Tread(tag, fid, 0, 100))) == []


def test_a_tflush_is_answered_rflush_whatever_its_tag_and_oldtag() -> None:
    """flush(5): a Tflush is never answered Rerror. One reusing the tag of the very request it flushes
    (py9p's client sends those on an interrupt) got `duplicate tag`, and the request stayed parked."""
    tree = GateTree()
    s = new_session(tree)
    assert rpc(s, w.Tflush(3, 1)) == w.Rflush(3)  # before Tversion: nothing waits, the answer is Rflush
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    ok(s, w.Tattach(1, 0, w.NOFID, USER, ""))
    parked_gate_read(s, 10)
    assert rpc(s, w.Tflush(10, 10)) == w.Rflush(10)  # its own tag: the read is gone, the tag free
    assert not s.pending
    assert s.receive(w.encode(w.Tread(10, 2, 0, 100))) == []  # and used again
    assert s.receive(w.encode(w.Tread(11, 2, 0, 100))) == []
    assert rpc(s, w.Tflush(10, 11)) == w.Rflush(10)  # a tag in use flushing another: that one goes
    assert list(s.pending) == [10]  # the one holding the tag stays
    assert rpc(s, w.Tflush(12, 10)) == w.Rflush(12)  # several flushes of one request, each answered
    assert rpc(s, w.Tflush(13, 10)) == w.Rflush(13)
    assert rpc(s, w.Tflush(14, 13)) == w.Rflush(14)  # a flush of a flush
    assert rpc(s, w.Tflush(w.NOTAG, 999)) == w.Rflush(w.NOTAG)  # a tag never used
    tree.gate.data = b"late"
    assert s.retry() == []  # no flushed request is answered after its Rflush
    assert ok(s, w.Tread(15, 2, 0, 100)) == w.Rread(15, b"late")  # the connection is in step


def test_a_request_reusing_a_waiting_tag_is_refused_and_the_waiting_one_answered_as_asked() -> None:
    """intro(5): no two outstanding requests share a tag. One that does is answered `duplicate tag`, as
    lib9p's servers answer it, without being done; the request holding the tag gets its own reply."""
    tree = GateTree()
    s = session(tree)
    parked_gate_read(s, 10)
    err(s, w.Tclunk(10, 2), "duplicate tag")
    err(s, w.Twalk(10, 0, 5, ["motd"]), "duplicate tag")
    err(s, w.Tread(10, 2, 0, 2), "duplicate tag")
    err(s, w.Tstat(1, 5), "fid unknown")  # the walk was not done
    tree.gate.data = b"open"
    assert [w.decode(r) for r in s.retry()] == [w.Rread(10, b"open")]  # fid 2 was not clunked; count 100
    assert not s.pending


def test_notag_on_other_requests_is_an_ordinary_tag() -> None:
    """intro(5) keeps NOTAG for Tversion; Plan 9's servers (lib9p, exportfs) take it on any request as
    any other tag, and so does this one: answered under it, parked, refused as a duplicate, flushed."""
    tree = GateTree()
    s = session(tree)
    assert ok(s, w.Tstat(w.NOTAG, 0)).tag == w.NOTAG
    parked_gate_read(s, w.NOTAG)
    err(s, w.Tstat(w.NOTAG, 0), "duplicate tag")
    assert rpc(s, w.Tflush(1, w.NOTAG)) == w.Rflush(1)
    tree.gate.data = b"x"
    assert s.retry() == []
    assert s.receive(w.encode(w.Tread(w.NOTAG, 2, 0, 1))) == [w.encode(w.Rread(w.NOTAG, b"x"))]
    tree.gate.data = None
    assert s.receive(w.encode(w.Tread(w.NOTAG, 2, 0, 1))) == []
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))  # a Tversion ends the session: the read is never answered
    assert not s.pending and s.retry() == []


class FirstMessage(Transport):
    """A connection that sends one message, and keeps what it is answered."""

    def __init__(self, msg: w.Msg) -> None:
        self.msg, self.answers = w.encode(msg), list[w.Msg]()

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        return self.msg

    def send(self, data: bytes) -> None:
        self.answers.append(w.decode(data))


@pytest.mark.parametrize(
    ("first", "answer"),
    [
        (w.Tversion(w.NOTAG, 8192, "9P2000"), w.Rerror(w.NOTAG, "too many connections")),
        (w.Tflush(5, 1), w.Rflush(5)),  # flush(5): never an Rerror, a refusal's neither
    ],
)
def test_a_refused_connection_is_told_why_except_in_answer_to_a_tflush(first: w.Msg, answer: w.Msg) -> None:
    link = FirstMessage(first)
    refuse(link, "too many connections")
    assert link.answers == [answer]


class Stuck(Handle):
    """A write that waits for ever, and a backend that fails to let it go when it is flushed."""

    def write(self, offset: int, data: bytes | memoryview) -> int:
        raise WouldBlock()

    def abandoned(self, data: bytes | memoryview) -> None:
        raise RuntimeError("backend bug")


def test_a_flushed_write_is_answered_rflush_though_the_backend_fails_to_let_it_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tree = GateTree()
    tree.root.add(SynthFile("stuck", tree.root, lambda mode, user: Stuck(), 0o666))
    s = session(tree)
    ok(s, w.Twalk(1, 0, 2, ["stuck"]))
    ok(s, w.Topen(1, 2, w.OWRITE))
    assert s.receive(w.encode(w.Twrite(10, 2, 0, b"data"))) == []
    with caplog.at_level(logging.ERROR, logger="apps.styx.server"):
        assert rpc(s, w.Tflush(11, 10)) == w.Rflush(11)
    assert "forgetting a flushed Twrite failed" in caplog.text and not s.pending


def test_synthetic_text_file_reads_with_offsets() -> None:
    s = session(GateTree())
    ok(s, w.Twalk(1, 0, 2, ["motd"]))
    ok(s, w.Topen(1, 2, w.OREAD))
    assert ok(s, w.Tread(1, 2, 2, 2)) == w.Rread(1, b"ll")
    err(s, w.Twalk(1, 2, 3, ["x"]), "bad use of fid")
    ok(s, w.Twalk(1, 0, 3, ["gate"]))
    err(s, w.Twalk(1, 3, 4, ["x"]), "not a directory")
    err(s, w.Tcreate(1, 0, "x", 0o644, w.OWRITE), "permission denied")  # 0555 directory


# -- fuzz: random request sequences ---------------------------------------------------------------


fids = st.sampled_from([0, 1, 2, 3, w.NOFID])
fnames = st.sampled_from(["a", "b", "..", ".", "", "/", "sub", "../x", "/etc", "hello.txt"])
requests = st.one_of(
    st.builds(
        w.Tversion,
        st.integers(0, 9),
        st.sampled_from([0, 100, 8192, 2**32 - 1]),
        st.sampled_from(["9P2000", "9P2000.u", "9P", "x"]),
    ),
    st.builds(w.Tattach, st.integers(0, 9), fids, fids, st.sampled_from([USER, "", "other"]), fnames),
    st.builds(w.Tauth, st.integers(0, 9), fids, st.just(USER), fnames),
    st.builds(w.Tflush, st.integers(0, 9), st.integers(0, 9)),
    st.builds(w.Twalk, st.integers(0, 9), fids, fids, st.lists(fnames, max_size=4)),
    st.builds(w.Topen, st.integers(0, 9), fids, st.integers(0, 255)),
    st.builds(
        w.Tcreate,
        st.integers(0, 9),
        fids,
        fnames,
        st.sampled_from([0o644, w.DMDIR | 0o755, 0xFFFFFFFF]),
        st.integers(0, 255),
    ),
    st.builds(w.Tread, st.integers(0, 9), fids, st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.builds(w.Twrite, st.integers(0, 9), fids, st.integers(0, 2**20), st.binary(max_size=64)),
    st.builds(w.Tclunk, st.integers(0, 9), fids),
    st.builds(w.Tremove, st.integers(0, 9), fids),
    st.builds(w.Tstat, st.integers(0, 9), fids),
    st.builds(
        w.Twstat,
        st.integers(0, 9),
        fids,
        st.builds(
            w.Stat,
            st.just(0xFFFF),
            st.just(0xFFFFFFFF),
            st.just(w.Qid(0xFF, 0xFFFFFFFF, 2**64 - 1)),
            st.sampled_from([0xFFFFFFFF, 0o600, w.DMDIR | 0o700]),
            st.just(0xFFFFFFFF),
            st.just(0xFFFFFFFF),
            st.sampled_from([2**64 - 1, 0, 3]),
            fnames,
            st.just(""),
            st.just(""),
            st.just(""),
        ),
    ),
    # replies sent as requests, and raw junk
    st.builds(w.Rread, st.integers(0, 9), st.binary(max_size=8)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(requests, max_size=25))
def test_random_request_sequences_never_crash_or_escape(tmp_path: Path, seq: list[w.Msg]) -> None:
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    root = base / "root"
    root.mkdir()
    (root / "hello.txt").write_text("hi")
    (base / "outside").write_text("keep")
    s = new_session(FsTree(root))
    start = [w.Tversion(w.NOTAG, 8192, "9P2000"), w.Tattach(0, 0, w.NOFID, USER, "")]
    try:
        for msg in start + seq:
            replies = s.receive(w.encode(msg))
            if isinstance(msg, w.Tflush):  # flush(5): whatever came before, never an Rerror
                assert replies == [w.encode(w.Rflush(msg.tag))]
            for reply in replies:
                assert len(reply) <= max(s.msize, w.MSIZE_MIN) or isinstance(w.decode(reply), w.Rversion)
                w.decode(reply)
        s.close()
        assert sorted(p.name for p in base.iterdir()) == ["outside", "root"]
        assert (base / "outside").read_text() == "keep"
    finally:
        for p in root.rglob("*"):
            with contextlib.suppress(OSError):
                p.chmod(0o700)
        shutil.rmtree(base, ignore_errors=True)


# -- resolution beneath the root, with openat2 and without ----------------------------------------


@pytest.fixture(params=["openat2", "component-wise"])
def beneath_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "openat2" and not beneath.has_openat2():
        pytest.skip("this kernel has no openat2")
    monkeypatch.setattr(beneath, "_openat2_works", request.param == "openat2")
    return str(request.param)


def test_open_beneath_refuses_every_way_out(tmp_path: Path, beneath_mode: str) -> None:
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "f").write_text("in")
    (tmp_path / "out.txt").write_text("out")
    (tmp_path / "root" / "abs").symlink_to("/etc")
    (tmp_path / "root" / "up").symlink_to("../out.txt")
    (tmp_path / "root" / "a" / "in").symlink_to("f")
    root = os.open(tmp_path / "root", os.O_PATH)
    try:
        for names in [("abs", "passwd"), ("up",), ("abs",), ("..",), ("a", ".."), ("a/f",), ("",)]:
            with pytest.raises(OSError):
                os.close(beneath.open_beneath(root, names, os.O_RDONLY))
        fd = beneath.open_beneath(root, ("a", "f"), os.O_RDONLY)
        assert os.read(fd, 10) == b"in"
        os.close(fd)
        if beneath_mode == "openat2":  # links that stay inside are followed; without openat2, none is
            fd = beneath.open_beneath(root, ("a", "in"), os.O_RDONLY)
            assert os.read(fd, 10) == b"in"
            os.close(fd)
        else:
            with pytest.raises(beneath.Escape):
                beneath.open_beneath(root, ("a", "in"), os.O_RDONLY)
    finally:
        os.close(root)


def test_open_beneath_holds_while_a_directory_is_swapped_for_a_link(tmp_path: Path, beneath_mode: str) -> None:
    d = tmp_path / "root" / "d"
    d.mkdir(parents=True)
    (d / "f").write_text("inside")
    (tmp_path / "f").write_text("OUTSIDE")  # what d/f is once d points at tmp_path
    stop = threading.Event()
    swaps = [0]

    def swap() -> None:
        while not stop.is_set():
            os.rename(d, tmp_path / "root" / "real")
            os.symlink(tmp_path, d)
            time.sleep(0)  # let the reader in while the link is there
            os.unlink(d)
            os.rename(tmp_path / "root" / "real", d)
            swaps[0] += 1
            time.sleep(0)

    root = os.open(tmp_path / "root", os.O_PATH)
    t = threading.Thread(target=swap)
    t.start()
    seen: list[bytes] = []
    deadline = time.monotonic() + 20
    try:
        while (swaps[0] < 500 or len(seen) < 20) and time.monotonic() < deadline:
            try:
                fd = beneath.open_beneath(root, ("d", "f"), os.O_RDONLY)
            except OSError:
                continue
            seen.append(os.read(fd, 10))
            os.close(fd)
    finally:
        stop.set()
        t.join()
        os.close(root)
    assert set(seen) == {b"inside"} and swaps[0] >= 500  # read inside while racing, outside never


# -- the policy: who gets whose rights ------------------------------------------------------------

ANON = Creds(65534, 65534)


# alice's process that dropped her group 6000 (setpriv --clear-groups, a service's restricted groups)
ALICE_DROPPED = User("alice", 5001, 5001, (5001,), frozenset({"alice"}))
ALICE_IN_6000 = User("alice", 5001, 5001, (5001, 6000), frozenset({"alice", "6000"}))
ALICE_AS_6000 = User("alice", 5001, 6000, (5001, 6000), frozenset({"alice", "6000"}))  # gid 6000, 5001 a group


@pytest.mark.parametrize(("euid", "user", "creds", "as_user"), [
    (0, ALICE, Creds(5001, 5001, (5001,)), True),  # root works as each local user
    (0, ALICE_AS_6000, Creds(5001, 6000, (5001, 6000)), True),  # with the ids the kernel vouched for
    (0, user_for_uid(0), Creds(0, 0, user_for_uid(0).groups), True),
    (0, NONE, ANON, False),  # and as nobody for anonymous clients, who may not act
    (5001, ALICE, None, True),  # a user's own server works as itself for that user
    (5001, MALLORY, None, False),  # and cannot act for anyone else
    (5001, NONE, None, False),
])  # fmt: skip
def test_policy_rights(euid: int, user: User, creds: Creds | None, as_user: bool) -> None:
    rights = Policy(euid, ANON, egid=5001, groups=frozenset({5001})).rights(user)
    assert (rights.creds, rights.as_user) == (creds, as_user)


@pytest.mark.parametrize(("user", "as_user"), [
    (ALICE_IN_6000, True),  # the server's every id: it lends no more than the client holds
    (ALICE_DROPPED, False),  # her process without group 6000 is not the server, which holds it
    (ALICE_AS_6000, True),
    (User("alice", 5001, 6000, (6000,), frozenset({"6000"})), False),  # nor one without the server's gid
])  # fmt: skip
def test_a_users_server_acts_for_its_user_only_with_every_group_it_holds(user: User, as_user: bool) -> None:
    rights = Policy(5001, ANON, egid=5001, groups=frozenset({5001, 6000})).rights(user)
    assert (rights.creds, rights.as_user) == (None, as_user)
    if not as_user:
        with pytest.raises(Exception, match="this server's groups are not all this connection's"):
            Peer(user, Policy(5001, ANON, egid=5001, groups=frozenset({5001, 6000}))).require_acts("connect")


def test_identity_comes_from_the_peer_uid_only() -> None:
    from apps.styx.identity import identify

    assert identify(None) is NONE and identify(-1) is NONE
    assert identify(0).name == user_for_uid(0).name and identify(0).uid == 0
    unknown = identify(3_999_999)
    assert unknown.name == "3999999" and unknown.gid == 65534  # no account: the anonymous group


def test_a_local_peers_ids_are_the_kernels_not_its_accounts() -> None:
    """The gid and groups the kernel vouched for: root's account has group 0; a root process
    that dropped it, or runs with another gid, gets no more than it holds."""
    from apps.styx.identity import identify

    dropped = identify(0, 4242, ())
    assert (dropped.name, dropped.uid, dropped.gid, dropped.groups) == (user_for_uid(0).name, 0, 4242, (4242,))
    assert dropped.creds == Creds(0, 4242, (4242,)) and "root" not in dropped.group_names
    more = identify(0, 0, [4243, 0])
    assert (more.gid, more.groups) == (0, (0, 4243)) and more.group_names == {"root", "4243"}  # named where known
    unknown = identify(3_999_999, 3_999_999, [])
    assert (unknown.name, unknown.gid, unknown.groups) == ("3999999", 3_999_999, (3_999_999,))


def test_a_local_peer_whose_groups_the_kernel_did_not_say_is_none() -> None:
    """Its account's would lend it groups it may have dropped (a kernel before 4.13; more groups
    than a flow carries); without a kernel gid (a root server acting as the user, ActAs) the
    account's are the user's, as login gives them."""
    from apps.styx.identity import identify

    assert identify(0, 0, None) is NONE
    assert identify(0, -1, None) == user_for_uid(0)


def test_anonymous_peers_may_not_act() -> None:
    peer = Peer(NONE, Policy(0, ANON))
    assert not peer.acts
    with pytest.raises(Exception, match="needs an identity from the stack"):
        peer.require_acts("writing an irm command")
    mallory = Peer(MALLORY, Policy(5001, ANON))
    with pytest.raises(Exception, match="cannot act as user mallory"):
        mallory.require_acts("connect")


# -- limits -----------------------------------------------------------------------------------------


def test_fid_limit_is_an_rerror_and_clunking_makes_room(root: Path) -> None:
    s = session(FsTree(root), limits=Limits(fids=3))
    ok(s, w.Twalk(1, 0, 1, []))
    ok(s, w.Twalk(1, 0, 2, ["hello.txt"]))
    err(s, w.Twalk(1, 0, 3, []), "too many fids: this connection may hold 3")
    err(s, w.Tattach(1, 4, w.NOFID, USER, ""), "too many fids")
    ok(s, w.Twalk(1, 1, 1, ["sub"]))  # moving a fid takes none
    ok(s, w.Tclunk(1, 2))
    ok(s, w.Twalk(1, 0, 3, []))


def test_waiting_requests_are_capped() -> None:
    s = session(GateTree(), limits=Limits(pending=2))
    ok(s, w.Twalk(1, 0, 2, ["gate"]))
    ok(s, w.Topen(1, 2, w.OREAD))
    assert s.receive(w.encode(w.Tread(10, 2, 0, 10))) == []
    assert s.receive(w.encode(w.Tread(11, 2, 0, 10))) == []
    err(s, w.Tread(12, 2, 0, 10), "too many requests waiting (limit 2)")
    ok(s, w.Tflush(13, 10))
    assert s.receive(w.encode(w.Tread(12, 2, 0, 10))) == []  # room again


def test_msize_is_capped_by_the_limit(root: Path) -> None:
    s = new_session(FsTree(root), limits=Limits(msize=1024))
    assert rpc(s, w.Tversion(w.NOTAG, 8192, "9P2000")) == w.Rversion(w.NOTAG, 1024, "9P2000")
    ok(s, w.Tattach(1, 0, w.NOFID, USER, ""))
    replies = s.receive(w.encode(w.Twrite(7, 0, 0, bytes(2000))))
    assert "exceeds msize 1024" in w.decode(replies[0]).ename  # type: ignore[attr-defined]


def test_clunked_and_failed_walks_leave_no_descriptors(root: Path) -> None:
    before = fds_on(root)
    tree = FsTree(root)
    s = session(tree)
    ok(s, w.Twalk(1, 0, 5, []))
    ok(s, w.Topen(1, 5, w.OREAD))
    for _ in range(50):
        ok(s, w.Twalk(1, 0, 10, ["sub", "deep.txt"]))
        ok(s, w.Topen(1, 10, w.OREAD))
        walk(s, ["sub", "nope"], newfid=11)  # partial
        walk(s, ["..", "sub", ".."], newfid=12)
        ok(s, w.Tclunk(1, 10))
        ok(s, w.Tclunk(1, 12))
        ok(s, w.Tread(1, 5, 0, 80))  # a directory read left half done, then started over
    s.close()
    tree.close()
    assert fds_on(root) == before


FIT_FDS = """
import json, os, resource, sys
from apps.styx.serve import fit_fds
from apps.styx.server import Limits
resource.setrlimit(resource.RLIMIT_NOFILE, (600, 600))
if os.geteuid() == 0:  # a process that may not raise its hard limit again
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
lim = fit_fds(Limits(fids=50, flows=10, conns=64, conns_per_user=16))
print(json.dumps([lim.conns, lim.conns_per_user, lim.fds_per_conn()]))
"""


def test_descriptor_budget_lowers_connections_when_the_limit_cannot_be_raised() -> None:
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", FIT_FDS],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    conns, per_user, per_conn = json.loads(r.stdout)
    assert per_conn == 2 * 50 + 3 * 10 + 8
    assert conns == (600 - 64) // per_conn and per_user == conns  # every admitted connection has its share


def test_bad_messages_are_answered_each_and_logged_for_the_first_few(
    fs: Session, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apps.styx.server")
    for _ in range(100):
        (reply,) = fs.receive(struct.pack("<IBH", 7, 250, 1))  # a type no 9P message has
        assert isinstance(w.decode(reply, 8192), w.Rerror)
    assert sum("bad message" in r.getMessage() for r in caplog.records) == 3


def test_backend_failures_are_answered_each_and_logged_for_the_first_few(
    fs: Session, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that trips a backend bug is answered; a client repeating it cannot fill the log."""
    node = fs.fids[0].node

    def broken() -> w.Stat:
        raise RuntimeError("backend bug")

    monkeypatch.setattr(node, "stat", broken)
    caplog.set_level(logging.INFO, logger="apps.styx.server")
    for _ in range(100):
        reply = rpc(fs, w.Tstat(9, 0))
        assert isinstance(reply, w.Rerror) and "internal error: backend bug" in reply.ename
    assert sum("Tstat failed" in r.getMessage() for r in caplog.records) == 3
    monkeypatch.undo()
    assert isinstance(rpc(fs, w.Tstat(9, 0)), w.Rstat)  # the session serves on


# -- what Plan 9, plan9port and v9fs clients depend on ----------------------------------------------

# Linux's v9fs turns an Rerror into an errno by its whole text (net/9p/error.c): any other text is
# ESERVERFAULT ("Unknown error 526") and a kernel log line. These are Plan 9's strings it knows.
V9FS_ERRNOS = {
    "file does not exist": "ENOENT",
    "permission denied": "EACCES",
    "file already exists": "EEXIST",
    "directory is not empty": "ENOTEMPTY",
    "not a directory": "ENOTDIR",
    "fid unknown or out of range": "EBADF",  # u9fs's and fossil's; lib9p's "unknown fid" is not mapped
    "bad use of fid": "EBADF",
    "illegal name": "ENAMETOOLONG",  # ramfs's
    "bad offset in directory read": "ESPIPE",
    "cannot remove root": "EPERM",
    "wstat prohibited": "EPERM",  # lib9p's
    "wstat can't convert between files and directories": "EPERM",
}


def _missing(root: Path, s: Session) -> str:
    return err(s, w.Twalk(1, 0, 2, ["nope"]))


def _outside(root: Path, s: Session) -> str:
    (root / "out").symlink_to(root.parent / "secret.txt")
    return err(s, w.Twalk(1, 0, 2, ["out"]))


def _in_a_file(root: Path, s: Session) -> str:
    ok(s, w.Twalk(1, 0, 2, ["hello.txt"]))
    return err(s, w.Twalk(1, 2, 3, ["x"]))


def _create_existing(root: Path, s: Session) -> str:
    ok(s, w.Twalk(1, 0, 2, []))
    return err(s, w.Tcreate(1, 2, "hello.txt", 0o644, w.OWRITE))


def _rename_onto_existing(root: Path, s: Session) -> str:
    (root / "other.txt").write_text("other")
    return _wstat_refused(s, "hello.txt", name="other.txt")


def _wstat_refused(s: Session, file: str, /, **fields: object) -> str:
    """The error a Twstat of `file` (walked to as fid 2) changing only `fields` gets."""
    ok(s, w.Twalk(1, 0, 2, [file]))
    change = w.Stat.dont_touch()
    for field, value in fields.items():
        setattr(change, field, value)
    return err(s, w.Twstat(1, 2, change))


def _remove_full_directory(root: Path, s: Session) -> str:
    ok(s, w.Twalk(1, 0, 2, ["sub"]))
    return err(s, w.Tremove(1, 2))


def _open_denied(root: Path, s: Session) -> str:
    (root / "private").write_text("p")
    os.chmod(root / "private", 0o600)
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)  # the server's own Plan 9 check
    ok(other, w.Twalk(1, 0, 2, ["private"]))
    return err(other, w.Topen(1, 2, w.OREAD))


def _search_denied(root: Path, s: Session) -> str:
    os.chmod(root / "sub", 0o700)
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)
    ok(other, w.Twalk(1, 0, 2, ["sub"]))
    return err(other, w.Twalk(1, 2, 3, ["deep.txt"]))


def _synthetic_missing(root: Path, s: Session) -> str:
    return err(session(GateTree()), w.Twalk(1, 0, 2, ["nope"]))


def _unknown_fid(root: Path, s: Session) -> str:
    return err(s, w.Tstat(1, 42))


def _read_unopened(root: Path, s: Session) -> str:
    ok(s, w.Twalk(1, 0, 2, ["hello.txt"]))
    return err(s, w.Tread(1, 2, 0, 10))


def _open_twice(root: Path, s: Session) -> str:
    ok(s, w.Twalk(1, 0, 2, ["hello.txt"]))
    ok(s, w.Topen(1, 2, w.OREAD))
    return err(s, w.Topen(1, 2, w.OREAD))


def _walk_bad_name(root: Path, s: Session) -> str:
    return err(s, w.Twalk(1, 0, 2, ["sub/deep.txt"]))


def _directory_read_elsewhere(root: Path, s: Session) -> str:
    ok(s, w.Twalk(1, 0, 2, []))
    ok(s, w.Topen(1, 2, w.OREAD))
    return err(s, w.Tread(1, 2, 7, 100))


def _remove_root(root: Path, s: Session) -> str:
    return err(s, w.Tremove(1, 0))


def _wstat_owner(root: Path, s: Session) -> str:
    return _wstat_refused(s, "hello.txt", uid="someone")


def _wstat_directory_bit(root: Path, s: Session) -> str:
    return _wstat_refused(s, "hello.txt", mode=w.DMDIR | 0o755)


def _touch_not_owner(root: Path, s: Session) -> str:
    os.chmod(root / "hello.txt", 0o666)
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)  # the server's own Plan 9 check
    return _wstat_refused(other, "hello.txt", atime=1_000_000_000, mtime=1_000_000_000)


@pytest.mark.parametrize(("case", "ename"), [
    (_missing, "file does not exist"),
    (_outside, "file does not exist"),
    (_synthetic_missing, "file does not exist"),
    (_in_a_file, "not a directory"),
    (_create_existing, "file already exists"),
    (_rename_onto_existing, "file already exists"),
    (_remove_full_directory, "directory is not empty"),
    (_open_denied, "permission denied"),
    (_search_denied, "permission denied"),
    (_unknown_fid, "fid unknown or out of range"),
    (_read_unopened, "bad use of fid"),
    (_open_twice, "bad use of fid"),
    (_walk_bad_name, "illegal name"),
    (_directory_read_elsewhere, "bad offset in directory read"),
    (_remove_root, "cannot remove root"),
    (_wstat_owner, "wstat prohibited"),
    (_wstat_directory_bit, "wstat can't convert between files and directories"),
    (_touch_not_owner, "permission denied"),
], ids=lambda v: getattr(v, "__name__", "").lstrip("_") or None)  # fmt: skip
def test_errors_are_plan9s_own_strings_which_v9fs_maps_to_errnos(
    root: Path, fs: Session, case: Callable[[Path, Session], str], ename: str
) -> None:
    assert case(root, fs) == ename and ename in V9FS_ERRNOS


@pytest.mark.parametrize(("asked", "answer"), [
    ("9P2000", "9P2000"),
    ("9P2000.L", "9P2000"),  # a period-separated suffix is stripped
    ("9P2001", "9P2000"),  # a later version: an earlier one may be answered
    ("9P2001.x", "9P2000"),
    ("9P1999", "unknown"),  # an earlier one cannot
    ("9P", "unknown"),
    ("9Pabcd", "unknown"),
    ("XP2000", "unknown"),
])  # fmt: skip
def test_version_answers_9p2000_to_any_version_at_or_after_it(root: Path, asked: str, answer: str) -> None:
    s = new_session(FsTree(root))
    assert rpc(s, w.Tversion(w.NOTAG, 8192, asked)) == w.Rversion(w.NOTAG, 8192, answer)


def test_create_gives_the_permissions_asked_within_the_directorys_whatever_the_servers_umask(
    root: Path, fs: Session
) -> None:
    os.chmod(root, 0o775)
    old = os.umask(0o077)  # a daemon's umask is not the client's: Plan 9 has none
    try:
        ok(fs, w.Twalk(1, 0, 2, []))
        ok(fs, w.Tcreate(1, 2, "shared.txt", 0o666, w.OWRITE))
        ok(fs, w.Twalk(1, 0, 3, []))
        ok(fs, w.Tcreate(1, 3, "shared", w.DMDIR | 0o777, w.OREAD))
        ok(fs, w.Twalk(1, 0, 4, []))
        ok(fs, w.Tcreate(1, 4, "tool", 0o751, w.OWRITE))
    finally:
        os.umask(old)
    assert (root / "shared.txt").stat().st_mode & 0o777 == 0o664  # 0666 & (~0666 | 0775)
    assert (root / "shared").stat().st_mode & 0o777 == 0o775  # 0777 & 0775
    assert (root / "tool").stat().st_mode & 0o777 == 0o751  # a file's x bits are the client's


def test_a_failed_wstat_changes_nothing(root: Path, fs: Session) -> None:
    (root / "other.txt").write_text("other")
    walk(fs, ["hello.txt"])
    change = w.Stat.dont_touch()
    change.name, change.length, change.mode = "other.txt", 0, 0o600
    err(fs, w.Twstat(1, 2, change), "file already exists")
    assert (root / "hello.txt").read_text() == "hello world"  # not truncated
    assert (root / "hello.txt").stat().st_mode & 0o777 == 0o644
    change.name = "renamed.txt"
    ok(fs, w.Twstat(1, 2, change))  # the same changes where they can all be made
    assert (root / "renamed.txt").read_text() == "" and (root / "renamed.txt").stat().st_mode & 0o777 == 0o600


def test_a_wstat_that_changes_nothing_is_a_sync_on_any_file() -> None:
    s = session(GateTree())
    ok(s, w.Twalk(1, 0, 2, ["motd"]))
    assert ok(s, w.Twstat(1, 2, w.Stat.dont_touch())) == w.Rwstat(1)
    change = w.Stat.dont_touch()
    change.mode = 0o666
    err(s, w.Twstat(1, 2, change))  # a synthetic file's attributes are still its own


def test_a_directorys_length_may_be_set_to_zero_only(root: Path, fs: Session) -> None:
    walk(fs, ["sub"])
    change = w.Stat.dont_touch()
    change.length = 0
    ok(fs, w.Twstat(1, 2, change))
    change.length = 5
    err(fs, w.Twstat(1, 2, change), "directory")
    assert (root / "sub" / "deep.txt").read_text() == "deep"
    synthetic = session(GateTree())
    change.length = 0
    ok(synthetic, w.Twstat(1, 0, change))  # any directory's, a synthetic one's too


def test_a_directory_swapped_for_a_link_as_it_is_made_is_neither_opened_nor_chmod_ded(
    root: Path, fs: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever may write a shared directory can swap a directory another user just made for a link
    to that user's file: the create must not give that file the new directory's permissions, nor
    make it the creator's fid."""
    (root / "private.txt").write_text("mine")
    os.chmod(root / "private.txt", 0o600)
    os.chmod(root, 0o777)
    real_mkdir = os.mkdir

    def mkdir_then_swap(name: str, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real_mkdir(name, mode, dir_fd=dir_fd)
        os.rename(root / name, root / "moved")  # the racing user's moves, between mkdir and open
        os.symlink("private.txt", root / name)

    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    ok(fs, w.Twalk(1, 0, 2, []))
    err(fs, w.Tcreate(1, 2, "d", w.DMDIR | 0o777, w.OREAD), "moved or replaced")
    monkeypatch.undo()
    assert (root / "private.txt").stat().st_mode & 0o777 == 0o600
    ok(fs, w.Twalk(1, 0, 3, []))
    ok(fs, w.Tcreate(1, 3, "e", w.DMDIR | 0o777, w.OREAD))  # unraced, the same create works
    assert (root / "e").stat().st_mode & 0o777 == 0o777


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a thread's credentials needs root")
def test_a_root_servers_session_thread_works_as_its_client_with_no_capability(root: Path) -> None:
    """The thread takes the client's ids and sheds every capability (a file may ask the kernel for
    one the ids do not give); after a Tversion the same thread switches again, to none."""
    (root / "hello.txt").chmod(0o644)
    (root / "private.txt").write_text("root's")
    (root / "private.txt").chmod(0o600)
    seen: dict[str, object] = {}

    def run() -> None:
        s = Session(FsTree(root), Peer(user_for_uid(65534), POLICY), on_attach=Server._become)
        ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
        ok(s, w.Tattach(1, 0, w.NOFID, "root", ""))
        seen["caps"], seen["ids"] = fscreds.effective_caps(), fscreds.fs_ids()[:2]
        ok(s, w.Twalk(1, 0, 1, ["private.txt"]))
        seen["private"] = err(s, w.Topen(1, 1, w.OREAD))
        ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
        ok(s, w.Tattach(1, 0, w.NOFID, "none", ""))  # switching again needs what the first switch shed
        seen["caps-none"] = fscreds.effective_caps()
        ok(s, w.Twalk(1, 0, 1, ["hello.txt"]))
        ok(s, w.Topen(1, 1, w.OREAD))
        seen["hello"] = rpc(s, w.Tread(1, 1, 0, 100))
        s.close()

    t = threading.Thread(target=run)
    t.start()
    t.join(20)
    assert seen["caps"] == 0 and seen["ids"] == (65534, 65534), seen
    assert seen["private"] == "permission denied"
    assert seen["caps-none"] == 0
    assert isinstance(seen["hello"], w.Rread) and seen["hello"].data == b"hello world"
    assert fscreds.effective_caps() != 0  # the test's own thread kept its capabilities


@pytest.mark.parametrize("op", ["remove", "rename", "orclose"])
def test_a_directory_swapped_between_the_check_and_the_change_keeps_its_files(
    root: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """A server of user S checks Plan 9 permissions itself for other users. Whoever may rename S's
    directories (the Unix way) can swap the directory an entry is in for another one with an entry
    of the same name, between the server's check of the first and its change: at whatever moment
    the swap comes, the change is made in the directory checked, or not at all."""
    other = User("someone-else", 4343)

    def layout() -> tuple[int, int]:
        for d in ("pub", "priv", "pub.old"):
            shutil.rmtree(root / d, ignore_errors=True)
        (root / "pub").mkdir(mode=0o777)
        os.chmod(root / "pub", 0o777)  # others may remove and rename here
        (root / "pub" / "victim.txt").write_text("anyone's")
        (root / "priv").mkdir(mode=0o755)  # and not here
        (root / "priv" / "victim.txt").write_text("S's")
        return (root / "priv").stat().st_ino, (root / "priv" / "victim.txt").stat().st_ino

    def prepare(s: Session) -> None:
        if op == "orclose":  # the right to remove is checked at the open, the removal made at the clunk
            ok(s, w.Topen(1, 2, w.OREAD | w.ORCLOSE))

    def request(s: Session) -> w.Msg:
        if op == "rename":
            change = w.Stat.dont_touch()
            change.name = "renamed.txt"
            reply = rpc(s, w.Twstat(1, 2, change))
            ok(s, w.Tclunk(1, 2))
            return reply
        return rpc(s, w.Tclunk(1, 2) if op == "orclose" else w.Tremove(1, 2))

    s = session(FsTree(root), other, UNPRIVILEGED)  # unraced: pub's file may go, priv's may not
    layout()
    ok(s, w.Twalk(1, 0, 2, ["pub", "victim.txt"]))
    prepare(s)
    assert not isinstance(request(s), w.Rerror) and not (root / "pub" / "victim.txt").exists()
    ok(s, w.Twalk(1, 0, 2, ["priv", "victim.txt"]))
    err(s, w.Tremove(1, 2), "permission denied")
    assert (root / "priv" / "victim.txt").exists()

    real = FsTree.resolve
    for k in range(1, 9):  # the swap before the server's first look beneath the root, its second, ...
        priv_dir, priv_file = layout()
        ok(s, w.Twalk(1, 0, 2, ["pub", "victim.txt"]))
        prepare(s)
        looks = 0

        def resolve(tree: FsTree, *args: object, at_look: int = k, **kw: object) -> int:
            nonlocal looks
            looks += 1
            if looks == at_look:  # the racing user's renames
                os.rename(root / "pub", root / "pub.old")
                os.rename(root / "priv", root / "pub")
            return real(tree, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(FsTree, "resolve", resolve)
        request(s)
        monkeypatch.setattr(FsTree, "resolve", real)
        priv = next(d for d in root.iterdir() if d.stat().st_ino == priv_dir)
        assert [(f.name, f.stat().st_ino) for f in priv.iterdir()] == [("victim.txt", priv_file)], (k, priv)


def test_a_refused_remove_of_an_open_fid_closes_what_it_held(root: Path) -> None:
    """remove(5) clunks the fid even when the file stays: its open file and listing go with it. A
    refused Tremove kept them, so an anonymous client could open, remove and leak without end."""
    before = fds_on(root)
    tree = FsTree(root)
    anon = session(tree, NONE)
    for _ in range(20):
        ok(anon, w.Twalk(1, 0, 2, ["hello.txt"]))
        ok(anon, w.Topen(1, 2, w.OREAD))
        err(anon, w.Tremove(1, 2), "permission denied")
        ok(anon, w.Twalk(1, 0, 3, ["sub"]))
        ok(anon, w.Topen(1, 3, w.OREAD))
        ok(anon, w.Tread(1, 3, 0, 80))  # a listing under way
        err(anon, w.Tremove(1, 3), "permission denied")
    err(anon, w.Tstat(1, 2), "fid unknown or out of range")
    assert fds_on(root) == before + 2  # the tree's root and fid 0
    anon.close()
    tree.close()
    assert fds_on(root) == before


def test_a_group_change_by_the_servers_own_check_needs_membership_of_the_new_group(root: Path) -> None:
    """stat(5): the owner changes the gid only to a group it is a member of. Where the server works with
    its own rights for others, the owner could give its file to any group the server could."""
    owner = User(USER, 4999, 4999, (4999,), frozenset({"adm"}))  # the files' owner by name, in adm only
    s = session(FsTree(root), owner, UNPRIVILEGED)
    ok(s, w.Twalk(1, 0, 2, ["hello.txt"]))
    before = (root / "hello.txt").stat().st_gid
    change = w.Stat.dont_touch()
    change.gid = "daemon"
    err(s, w.Twstat(1, 2, change), "permission denied")
    assert (root / "hello.txt").stat().st_gid == before
    change.gid = "adm"
    ok(s, w.Twstat(1, 2, change))
    assert (root / "hello.txt").stat().st_gid == 4  # adm


def test_a_directory_is_not_created_to_be_removed_on_close(root: Path, fs: Session) -> None:
    """open(5): it is illegal to remove a directory on close, for Tcreate's mode as for Topen's (which
    refused it). A Tcreate of a directory with ORCLOSE made it, then removed it at the clunk."""
    ok(fs, w.Twalk(1, 0, 2, []))
    err(fs, w.Tcreate(1, 2, "d", w.DMDIR | 0o755, w.OREAD | w.ORCLOSE), "a new directory can only be opened")
    assert not (root / "d").exists()  # refused before it was made
    ok(fs, w.Tcreate(1, 2, "d", w.DMDIR | 0o755, w.OREAD))  # the fid is still the directory it was
    ok(fs, w.Tclunk(1, 2))
    assert (root / "d").is_dir()
    ok(fs, w.Twalk(1, 0, 3, []))
    ok(fs, w.Tcreate(1, 3, "f", 0o644, w.ORDWR | w.ORCLOSE))  # a file may be
    ok(fs, w.Tclunk(1, 3))
    assert not (root / "f").exists()


def test_the_file_aname_names_is_the_attachs_root(root: Path) -> None:
    """walk(5): ".." in the root directory is a walk of no names; the root is not removed. An attach
    to aname "sub" walked ".." up to the directory served, and let the client remove its own root."""
    s = new_session(FsTree(root))
    ok(s, w.Tversion(w.NOTAG, 8192, "9P2000"))
    top = ok(s, w.Tattach(1, 0, w.NOFID, USER, "sub")).qid  # type: ignore[attr-defined]
    assert ok(s, w.Tstat(1, 0)).stat.name == "/"  # type: ignore[attr-defined]
    assert walk(s, [".."]) == w.Rwalk(5, [top])
    assert walk(s, ["..", "hello.txt"], newfid=3) == w.Rwalk(5, [top])  # partial: stopped at the root
    ok(s, w.Twalk(1, 0, 4, ["deep.txt"]))
    ok(s, w.Twalk(1, 4, 4, []))
    err(s, w.Tremove(1, 0), "cannot remove root")
    assert (root / "sub" / "deep.txt").exists()
    ok(s, w.Tattach(1, 6, w.NOFID, USER, "sub/../sub"))  # a path within the tree still reaches it
    change = w.Stat.dont_touch()
    change.name = "renamed"
    err(s, w.Twstat(1, 6, change), "permission denied")
    assert (root / "sub").is_dir()


@pytest.mark.parametrize("bit", [w.DMAPPEND, w.DMEXCL])
def test_append_only_and_exclusive_use_are_refused_not_dropped(root: Path, fs: Session, bit: int) -> None:
    """stat(5): a wstat that succeeds made every change; open(5): a file made exclusive-use opens once.
    The bits were dropped and the create or wstat answered as done: a client's lock file was no lock."""
    ok(fs, w.Twalk(1, 0, 2, []))
    err(fs, w.Tcreate(1, 2, "lock", bit | 0o644, w.ORDWR), "not served")
    assert not (root / "lock").exists()
    ok(fs, w.Twalk(1, 0, 3, ["hello.txt"]))
    before = (root / "hello.txt").stat()
    change = w.Stat.dont_touch()
    change.mode, change.mtime = bit | 0o600, 1_000_000_000
    err(fs, w.Twstat(1, 3, change), "not served")
    after = (root / "hello.txt").stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)  # nothing of it made
    change.mode = 0o600
    ok(fs, w.Twstat(1, 3, change))
    assert (root / "hello.txt").stat().st_mode & 0o777 == 0o600


def test_a_wstat_repeating_the_files_present_values_changes_only_what_differs(root: Path, fs: Session) -> None:
    """stat(5) refuses attempts to change the qid, type, dev, owner or muid: a record that repeats them,
    as a dirwstat of what dirstat gave with one field changed does, was refused as a whole."""
    ok(fs, w.Twalk(1, 0, 2, ["hello.txt"]))
    st = ok(fs, w.Tstat(1, 2)).stat  # type: ignore[attr-defined]
    ok(fs, w.Twstat(1, 2, replace(st, mode=0o600)))
    assert (root / "hello.txt").stat().st_mode & 0o777 == 0o600
    assert (root / "hello.txt").read_text() == "hello world"  # the length it repeated was left alone
    st = ok(fs, w.Tstat(1, 2)).stat  # type: ignore[attr-defined]
    err(fs, w.Twstat(1, 2, replace(st, mode=0o644, qid=replace(st.qid, path=st.qid.path + 1))), "wstat prohibited")
    err(fs, w.Twstat(1, 2, replace(st, mode=0o644, muid="someone")), "wstat prohibited")
    assert (root / "hello.txt").stat().st_mode & 0o777 == 0o600
    other = session(FsTree(root), MALLORY, UNPRIVILEGED)
    ok(other, w.Twalk(1, 0, 2, ["hello.txt"]))
    ok(other, w.Twstat(1, 2, st))  # its own present values: nothing to change, nothing refused


def test_a_reply_longer_than_the_msize_becomes_an_rerror(root: Path) -> None:
    """version(5): both sides honour the msize. An Rstat of a file with a long name outgrew the smallest
    msize and was sent anyway, a message the client had said it would not take."""
    (root / ("n" * 220)).write_text("x")
    s = new_session(FsTree(root))
    ok(s, w.Tversion(w.NOTAG, w.MSIZE_MIN, "9P2000"))
    ok(s, w.Tattach(1, 0, w.NOFID, USER, ""))
    ok(s, w.Twalk(1, 0, 2, ["n" * 220]))
    replies = s.receive(w.encode(w.Tstat(3, 2)))
    assert len(replies[0]) <= w.MSIZE_MIN
    reply = w.decode(replies[0])
    assert isinstance(reply, w.Rerror) and reply.tag == 3
    assert reply.ename.startswith("reply of 2") and reply.ename.endswith(" bytes exceeds msize 256")
    ok(s, w.Twalk(1, 0, 3, ["hello.txt"]))
    ok(s, w.Tstat(1, 3))  # what fits goes


def test_a_refused_tversion_leaves_the_session_as_it_was(fs: Session) -> None:
    """version(5): a successful Tversion starts a new session. One refused (msize too small) clunked
    every fid and left the connection without a version all the same."""
    err(fs, w.Tversion(w.NOTAG, 100, "9P2000"), "too small")
    assert ok(fs, w.Tstat(1, 0)).stat.name == "/"  # type: ignore[attr-defined]
    ok(fs, w.Tversion(w.NOTAG, 8192, "9P2000"))
    err(fs, w.Tstat(1, 0), "fid unknown or out of range")


PY9P_DIRWSTAT = """
import dataclasses, json, sys
from py9p import Client
from py9p.client import RemoteError
out = {}
with Client.connect_unix(sys.argv[1]) as c:
    c.negotiate()
    root = c.attach(fid=0, uname='any', aname='sub')
    out['up'] = [q.path for q in c.walk(fid=0, newfid=1, path=['..'])] == [root.path]
    c.walk(fid=0, newfid=2, path='deep.txt')
    d = c.stat(2)  # dirstat, one field changed, dirwstat: the record repeats the rest
    try:
        c.wstat(2, dataclasses.replace(d, mode=0o600))
        out['wstat'] = oct(c.stat(2).mode)
    except RemoteError as e:
        out['wstat'] = str(e)
    try:
        c.remove(0)
    except RemoteError as e:
        out['remove'] = str(e)
print(json.dumps(out))
"""


@contextlib.contextmanager
def served_on_unix(
    path: Path, s: Session, waiting: threading.Event | None = None, received: list[w.Msg] | None = None
) -> Iterator[threading.Thread]:
    """`s` served to the first client of a unix socket at `path` until it hangs up (the thread doing it);
    `waiting`, if given, is set once a request of its is parked; `received` gets each message."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as f:
            while (head := f.read(4)) and len(head) == 4:
                body = f.read(int.from_bytes(head, "little") - 4)
                if received is not None:
                    received.append(w.decode(head + body))
                for reply in s.receive(head + body):
                    conn.sendall(reply)
                if waiting is not None and s.pending:
                    waiting.set()
        s.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield server
    finally:
        listener.close()


def test_py9p_sees_an_aname_root_and_a_dirwstat_of_a_changed_dirstat(root: Path, tmp_path: Path) -> None:
    """A third-party client (python-9p, on plan9port's codec) over a unix socket to one session."""
    from third_party import py9p_python

    python = py9p_python()
    path, tree = tmp_path / "9p.sock", FsTree(root)
    with served_on_unix(path, new_session(tree)) as server:
        r = subprocess.run([python, "-c", PY9P_DIRWSTAT, str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"up": True, "wstat": "0o600", "remove": "cannot remove root"}, out
    assert (root / "sub").is_dir() and (root / "sub" / "deep.txt").stat().st_mode & 0o777 == 0o600
    server.join(10)
    tree.close()


def test_qid_paths_stay_unique_across_file_systems_mounted_beneath_the_root() -> None:
    """intro(5): a qid path is unique among the files served. It was the inode number, which another
    file system mounted beneath the root repeats (/dev is inode 1 of devtmpfs, /dev/shm inode 1 of a
    tmpfs): clients that cache by qid took one for the other."""
    top, shm = os.stat("/dev"), os.stat("/dev/shm")
    if (top.st_dev, top.st_ino) == (shm.st_dev, shm.st_ino) or top.st_ino != shm.st_ino:
        pytest.skip("needs /dev/shm mounted on /dev with the same inode number")
    tree = FsTree("/dev")
    s = session(tree)
    root_qid = ok(s, w.Tstat(1, 0)).stat.qid  # type: ignore[attr-defined]
    assert root_qid.path == top.st_ino  # the root's own file system keeps its inode numbers
    shm_qid = walk(s, ["shm"]).wqid[0]  # type: ignore[attr-defined]
    assert shm_qid.path != root_qid.path
    assert ok(s, w.Tstat(1, 2)).stat.qid == shm_qid  # type: ignore[attr-defined]
    ok(s, w.Twalk(1, 0, 3, []))
    ok(s, w.Topen(1, 3, w.OREAD))
    offset, listed = 0, []
    while data := ok(s, w.Tread(1, 3, offset, 8000)).data:  # type: ignore[attr-defined]
        listed += w.stats_decode(data)
        offset += len(data)
    assert next(st.qid for st in listed if st.name == "shm") == shm_qid  # the listing says the same
    s.close()
    tree.close()


P9FS_INTERRUPTED = """
import json, socket, sys
from py9p import py9p
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
c = py9p.Client(sock, py9p.Credentials('any'))
out = {}
c.open('gate')
try:
    c.read(100)  # waits until interrupted: py9p then flushes the read with a Tflush of the read's own tag
except KeyboardInterrupt:
    out['interrupted'] = True
try:
    c.close()
    c.open('motd')
    out['motd'] = c.read(100).decode()
except Exception as e:
    out['error'] = str(e)
print(json.dumps(out))
"""


def test_py9p_interrupting_a_read_flushes_it_and_goes_on(tmp_path: Path) -> None:
    """p9fs's py9p client flushes an interrupted request with a Tflush reusing that request's tag
    (all its requests have tag 1). That Tflush was answered `duplicate tag`, the read stayed, and
    every later request of the client was refused as a duplicate of it."""
    from third_party import p9fs_python

    python = p9fs_python()
    path, waiting = tmp_path / "9p.sock", threading.Event()
    with served_on_unix(path, new_session(GateTree()), waiting) as server:
        out = interrupted_in_a_wait([python, "-c", P9FS_INTERRUPTED, str(path)], waiting)
    assert json.loads(out) == {"interrupted": True, "motd": "hello\n"}
    server.join(10)


def interrupted_in_a_wait(argv: list[str], waiting: threading.Event) -> str:
    """Run `argv`; once the server parked its request and it sleeps waiting for the reply, a SIGINT
    (before it waits, a client would have sent no Tflush); what it printed. It must exit within 30 s."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert waiting.wait(30), "the request never came"
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S", 10, "a wait")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode in (0, 130), proc.returncode
        return out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_styx_cat_interrupted_flushes_its_read_before_it_leaves(tmp_path: Path) -> None:
    """A Ctrl-C of `styx cat` of a file that waits (a flow's data) left the read to the server until
    it saw the hang-up; the client now flushes it and takes the Rflush first, as Plan 9 does."""
    path, waiting, received = tmp_path / "9p.sock", threading.Event(), list[w.Msg]()
    with served_on_unix(path, new_session(GateTree()), waiting, received) as server:
        interrupted_in_a_wait([str(BIN / "styx"), "cat", f"unix!{path}:/gate"], waiting)
        server.join(10)
    read = next(m for m in received if isinstance(m, w.Tread))
    assert [m.oldtag for m in received if isinstance(m, w.Tflush)] == [read.tag]
