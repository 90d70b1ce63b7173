"""The 9P client driven sans-IO against the server core: bulk reads and writes keep several
requests in flight, stay in step on errors, and fall back to one at a time where offsets
do not behave as a file's."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest

from apps.styx import wire as w
from apps.styx.agent import Peer
from apps.styx.client import Client, StyxClientError
from apps.styx.fs import FileHandle, FsTree
from apps.styx.identity import server_policy, user_for_uid
from apps.styx.server import Limits, Session
from apps.styx.transport import Transport, TransportTimeout
from apps.styx.tree import Handle, StyxError, SynthDir, SynthFile, Tree

ME = user_for_uid(os.geteuid())
MSIZE = 1024  # small messages: a few KiB of data make many of them
UNIT = MSIZE - w.IOHDRSZ


class Loopback(Transport):
    """A Session as the far end: what the client sends is answered at once, replies queue up.
    It counts how many requests were in flight at most."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.replies: deque[bytes] = deque()
        self.sent: list[w.Msg] = []
        self.most_in_flight = 0

    def send(self, data: bytes) -> None:
        self.sent.append(w.decode(data, 1 << 20))
        self.replies.extend(self.session.receive(data))
        self.most_in_flight = max(self.most_in_flight, len(self.replies))

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        if not self.replies:
            raise TransportTimeout("no reply queued")
        return self.replies.popleft()

    def close(self) -> None:
        self.session.close()


def connect(tree: Tree, pipeline: int = 4) -> tuple[Client, Loopback]:
    link = Loopback(Session(tree, Peer(ME, server_policy()), Limits(msize=MSIZE)))
    return Client(link, msize=MSIZE, pipeline=pipeline), link


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "export"
    d.mkdir()
    return d


def reads(link: Loopback) -> list[w.Tread]:
    return [m for m in link.sent if isinstance(m, w.Tread)]


def test_a_file_is_read_with_several_reads_in_flight(root: Path) -> None:
    data = os.urandom(UNIT * 20 + 77)
    (root / "big").write_bytes(data)
    c, link = connect(FsTree(root), pipeline=4)
    assert c.cat("big") == data
    assert link.most_in_flight == 4
    offsets = [m.offset for m in reads(link)]
    assert offsets[-1] == len(data)  # the read that found the end
    assert sorted(set(offsets)) == sorted(offsets)  # no byte asked for twice


def test_one_read_at_a_time_gives_the_same_bytes(root: Path) -> None:
    data = os.urandom(UNIT * 5)
    (root / "f").write_bytes(data)
    c, link = connect(FsTree(root), pipeline=1)
    assert c.cat("f") == data
    assert link.most_in_flight == 1


def test_small_files_and_directories_are_not_pipelined(root: Path) -> None:
    (root / "small").write_bytes(b"x" * 100)
    c, link = connect(FsTree(root))
    assert c.cat("small") == b"x" * 100
    assert c.stat("small").name == "small"
    assert [s.name for s in c.ls("/")] == ["small"]
    assert link.most_in_flight == 1


def test_read_at_stops_where_the_file_ends(root: Path) -> None:
    data = os.urandom(UNIT * 3 + 10)
    (root / "f").write_bytes(data)
    c, _ = connect(FsTree(root))
    fid = c.walk("f")
    c.open(fid, w.OREAD)
    assert c.read_at(fid, 5, UNIT * 10) == data[5:]
    assert c.read_at(fid, UNIT, UNIT + 3) == data[UNIT : 2 * UNIT + 3]
    assert c.read_at(fid, len(data), 100) == b""


class Shrinking(Handle):
    """A file whose reads come back short in the middle (it shrank, or the server serves
    pieces): the client takes up the rest from where the short read stopped."""

    def __init__(self, data: bytes, short_at: int) -> None:
        self.data = data
        self.short_at = short_at

    def read(self, offset: int, count: int) -> bytes:
        if offset == self.short_at:
            count = min(count, 10)
        return self.data[offset : offset + count]


class SynthTree(Tree):
    def __init__(self, handle: Handle, length: int) -> None:
        self.root = SynthDir("")
        self.root.add(Sized("f", self.root, handle, length))

    def attach(self, peer: Peer, aname: str) -> SynthDir:
        return self.root


class Sized(SynthFile):
    """A synthetic file that gives a length in its stat, as a real file does."""

    def __init__(self, name: str, parent: SynthDir, handle: Handle, length: int) -> None:
        super().__init__(name, parent, lambda mode, user: handle, 0o666)
        self._length = length

    def length(self) -> int:
        return self._length


def test_a_short_read_in_the_window_is_taken_up_from_where_it_stopped() -> None:
    data = os.urandom(UNIT * 8)
    c, link = connect(SynthTree(Shrinking(data, UNIT * 3), len(data)))
    assert c.cat("f") == data
    assert link.most_in_flight > 1


class Failing(Handle):
    def read(self, offset: int, count: int) -> bytes:
        if offset >= UNIT * 2:
            raise StyxError("the disk is on fire")
        return bytes(count)


def test_an_error_in_the_window_is_raised_and_the_connection_stays_in_step() -> None:
    c, _ = connect(SynthTree(Failing(), UNIT * 10))
    with pytest.raises(StyxClientError, match="on fire"):
        c.cat("f")
    assert c.stat("f").name == "f"  # the replies to the other reads were taken: the next rpc works


def test_writes_keep_several_in_flight_and_land_whole(root: Path) -> None:
    data = os.urandom(UNIT * 12 + 5)
    c, link = connect(FsTree(root), pipeline=4)
    c.put("new", data)
    assert (root / "new").read_bytes() == data
    assert link.most_in_flight == 4


class ShortWrites(FileHandle):
    """A file that takes only part of one write, once."""

    def __init__(self, fd: int, short_at: int) -> None:
        super().__init__(fd)
        self.short_at = short_at

    def write(self, offset: int, data: bytes | memoryview) -> int:
        if offset == self.short_at:
            self.short_at = -1
            data = data[:7]
        return super().write(offset, data)


def test_a_short_write_is_taken_up_from_where_it_stopped(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        c, _ = connect(SynthTree(ShortWrites(fd, UNIT * 2), 0))
        data = os.urandom(UNIT * 6)
        fid = c.walk("f")
        c.open(fid, w.OWRITE)
        c.write_fid_all(fid, data)
        assert path.read_bytes() == data
    finally:
        os.close(fd)


class Refusing(Handle):
    def write(self, offset: int, data: bytes | memoryview) -> int:
        if offset >= UNIT * 3:
            raise StyxError("no space left")
        return len(data)


def test_a_refused_write_in_the_window_is_raised_and_the_connection_stays_in_step() -> None:
    c, _ = connect(SynthTree(Refusing(), 0))
    fid = c.walk("f")
    c.open(fid, w.OWRITE)
    with pytest.raises(StyxClientError, match="no space"):
        c.write_fid_all(fid, bytes(UNIT * 10))
    assert c.stat("f").name == "f"


def test_a_reply_to_no_request_is_an_error() -> None:
    c, link = connect(SynthTree(Refusing(), 0))
    link.replies.append(w.encode(w.Rclunk(999)))
    with pytest.raises(StyxClientError, match="tag 999"):
        c.stat("f")


def test_errors_by_path_name_the_path_before_the_servers_words(root: Path) -> None:
    """The server sends Plan 9's words alone; the client puts the path first, as Plan 9's kernel does."""
    (root / "sub").mkdir()
    c, _ = connect(FsTree(root))
    with pytest.raises(StyxClientError) as e:
        c.cat("sub/nope")
    assert str(e.value) == "'sub/nope' file does not exist"
    with pytest.raises(StyxClientError) as e:
        c.mkdir("sub")
    assert str(e.value) == "'sub' file already exists"


@pytest.mark.parametrize(("ename", "code"), [
    ("file does not exist", "ENOENT"),
    ("'a/b' file does not exist", "ENOENT"),
    ("permission denied", "EACCES"),
    ("file already exists", "EEXIST"),
    ("directory is not empty", "ENOTEMPTY"),
    ("not a directory", "ENOTDIR"),
    ("file is a directory", "EISDIR"),
])  # fmt: skip
def test_a_mount_turns_plan9s_error_strings_into_their_errnos(ename: str, code: str) -> None:
    import errno

    from apps.styx.mount import to_errno

    assert to_errno(StyxClientError(ename)) == getattr(errno, code)
