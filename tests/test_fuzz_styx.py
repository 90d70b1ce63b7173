"""Fuzzed 9P2000: messages bent at the byte level (with and without their size fixed up) and
requests with hostile field values (edge integers, names with slashes, dots and NULs, huge counts,
fids and tags in use), fed to the wire decoder and to a server session over a real directory.
Decoding raises only DecodeError; the session answers every message with one decodable reply
that fits msize, and never through its catch-all (an "internal error" is a bug found).
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
from pathlib import Path
from typing import Any

import pytest
from fuzzing import ROUNDS, cases, only_raises

from apps.styx import wire as w
from apps.styx.agent import Peer
from apps.styx.fs import FsTree
from apps.styx.identity import server_policy, user_for_uid
from apps.styx.server import Limits, Session
from apps.styx.tree import Node, SynthDir, Tree, text_file

ME = user_for_uid(os.geteuid())
REQUESTS = [cls for cls in w.MESSAGES.values() if cls.__name__.startswith("T")]
_INTS = {
    "1": (0, 1, 0x10, 0x40, 0x80, 0xFF),
    "2": (0, 1, 0xFFFF, 0x8000),
    "4": (0, 1, 2, 3, 8192, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 0o777, 0x80000000 | 0o777),
    "8": (0, 1, 2**31, 2**63, 2**64 - 1, 11),
}
_NAMES = ("", ".", "..", "a/b", "/", "hello.txt", "sub", "new", "x\0y", "n" * 255, "é", "../secret.txt", "deep.txt")
_HOSTILE = ("x\0y", "\0", "..", "a/b", "/", "n" * 255, "\udc80")  # what a system call refuses or misreads


def _name(rng: random.Random) -> str:
    return rng.choice(_HOSTILE if rng.random() < 0.3 else _NAMES)


def _value(rng: random.Random, kind: str) -> Any:
    if kind in _INTS:
        return rng.choice(_INTS[kind])
    if kind == "s":
        return _name(rng)
    if kind == "data":
        return rng.randbytes(rng.choice((0, 1, 100, 9000)))
    if kind == "qid":
        return w.Qid(rng.choice((0, 0x80)), 0, rng.choice((0, 2**64 - 1)))
    if kind == "stat":  # a Twstat that changes one thing, as clients send them (or now and then all)
        st = w.Stat.dont_touch()
        changes = {
            "name": lambda: _name(rng),
            "mode": lambda: rng.choice(_INTS["4"]),
            "length": lambda: rng.choice(_INTS["8"]),
            "mtime": lambda: rng.choice(_INTS["4"]),
            "gid": lambda: rng.choice((_name(rng), "root", "nogroup", ME.name)),
        }
        for name in rng.sample(sorted(changes), 1 if rng.random() < 0.8 else len(changes)):
            setattr(st, name, changes[name]())
        return st
    return [rng.choice(_NAMES) for _ in range(rng.choice((0, 1, 2, 16, 17)))]  # wname


def requests(seed: int, n: int) -> list[bytes]:
    """Requests of every type with hostile values, mostly on the fids a session has (0 the root, 1..3)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n * ROUNDS:
        cls = rng.choice(REQUESTS)
        if cls is w.Tversion and rng.random() < 0.99:
            continue  # a new version clunks everything: now and then only, so the others go deep
        values = {name: _value(rng, kind) for name, kind in cls.FIELDS}
        for fid in ("fid", "newfid"):
            if fid in values and rng.random() < 0.8:
                values[fid] = rng.randint(0, 3)
        try:
            out.append(w.encode(cls(rng.choice((1, 2, w.NOTAG)), **values)))
        except (ValueError, struct.error):
            continue  # not encodable (a string over 64 KiB, a count out of range): the bytes below try those
    return out


def _fixed(data: bytes) -> bytes:
    """The message with its size[4] made right, so the body's damage is what gets tested."""
    return struct.pack("<I", len(data)) + data[4:] if len(data) >= 4 else data


def test_bent_messages_decode_or_raise_decode_error() -> None:
    corpus = [*requests(71, 300), w.encode(w.Rstat(1, w.Stat(name="x"))), w.encode(w.Rwalk(1, [w.Qid()] * 3))]
    for data in cases(72, corpus, 4000):
        for msg in (data, _fixed(data)):
            only_raises(w.decode, msg, w.DecodeError)
        only_raises(w.stats_decode, data, w.DecodeError)


class Synthetic(Tree):
    """A tree of synthetic files, as the IRMd's and netfs's: a text file, a ctl file, a directory."""

    def __init__(self) -> None:
        self.root = SynthDir("")
        self.root.add(text_file("hello.txt", self.root, lambda: "hello world\n", lambda cmd: f"did {cmd[:20]}"))
        self.root.add(SynthDir("sub", self.root, lambda d: [text_file("deep.txt", d, lambda: "deep")]))

    def attach(self, peer: Peer, aname: str) -> Node:
        return self.root


def _session(tree: Tree) -> Session:
    s = Session(tree, Peer(ME, server_policy()), Limits())
    for msg in (w.Tversion(w.NOTAG, 8192, "9P2000"), w.Tattach(1, 0, w.NOFID, ME.name, "")):
        assert not isinstance(w.decode(s.receive(w.encode(msg))[0]), w.Rerror)
    return s


@pytest.mark.parametrize("kind", ["fs", "synthetic"])
def test_a_session_answers_hostile_requests_with_one_reply_each(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    (root / "hello.txt").write_text("hello world")
    (root / "sub" / "deep.txt").write_text("deep")
    (tmp_path / "secret.txt").write_text("outside")
    tree: Tree = FsTree(root) if kind == "fs" else Synthetic()
    typed = requests(73, 2500)
    rng = random.Random(74)
    bent = cases(75, typed[:300], 2500)
    s = _session(tree)
    for i, pristine in enumerate(typed):
        data = pristine if rng.random() < 0.5 else next(bent)
        if rng.random() < 0.7:
            data = _fixed(data)
        replies = s.receive(data) + s.retry()
        for reply in replies:
            assert len(reply) <= s.msize or not s.msize, (i, data)
            msg = w.decode(reply)
            assert not (isinstance(msg, w.Rerror) and "internal error" in msg.ename), (msg.ename, data)
        if not s.msize or 0 not in s.fids:  # versioned anew, or its root fid clunked: reconnect
            s.close()
            s = _session(tree)
    s.close()
    assert (tmp_path / "secret.txt").read_text() == "outside"


def test_what_the_fuzz_found_is_answered_with_9p_errors(tmp_path: Path) -> None:
    """Each class found once reached a system call that refused it with ValueError or OverflowError
    (answered only by the catch-all): names with NUL, offsets and lengths past 2^63 - 1."""
    (tmp_path / "hello.txt").write_text("hello")
    s = _session(FsTree(tmp_path))
    for msg in (w.Twalk(1, 0, 1, ["hello.txt"]), w.Topen(1, 1, w.ORDWR)):
        assert not isinstance(w.decode(s.receive(w.encode(msg))[0]), w.Rerror)
    big, nul_gid = w.Stat.dont_touch(), w.Stat.dont_touch()
    big.length, nul_gid.gid = 2**64 - 2, "wheel\0"
    for msg in (
        w.Tcreate(1, 0, "x\0y", 0o644, w.OWRITE),
        w.Twalk(1, 0, 2, ["hello.txt\0"]),
        w.Twstat(1, 0, dataclasses.replace(w.Stat.dont_touch(), name="a\0")),
        w.Twstat(1, 1, nul_gid),
        w.Tread(1, 1, 2**64 - 1, 10),
        w.Tread(1, 1, 2**63, 10),
        w.Twrite(1, 1, 2**64 - 1, b"x"),
        w.Twstat(1, 1, big),
    ):
        reply = w.decode(s.receive(w.encode(msg))[0])
        assert isinstance(reply, w.Rerror) and "internal error" not in reply.ename, (msg, reply)
    assert (tmp_path / "hello.txt").read_text() == "hello"


def test_reassembly_of_bent_pieces_is_bounded_by_the_limit() -> None:
    """A reliable flow's SDUs put back into messages: a size field may lie, but never makes the
    receiver wait for (or hold) more than its limit; a piece running past its message ends it."""
    from apps.styx.transport import Reassembly, TransportError

    msg = w.encode(w.Twrite(1, 1, 0, bytes(300)))
    corpus = [msg[:100], msg[100:250], msg[250:], msg, struct.pack("<I", 2**32 - 1) + msg[4:40]]
    limit = 1000
    r = Reassembly()
    for sdu in cases(76, corpus, 4000):
        try:
            whole = r.feed(sdu, limit)
        except TransportError:
            r = Reassembly()  # the framing is lost: the connection ends
            continue
        assert r.held <= limit
        if whole is not None:
            only_raises(w.decode, whole, w.DecodeError, limit)
