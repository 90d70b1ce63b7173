"""The 9P client driven sans-IO against the server core: bulk reads and writes keep several
requests in flight, stay in step on errors, and fall back to one at a time where offsets
do not behave as a file's."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

from apps.styx import wire as w
from apps.styx.agent import Peer
from apps.styx.client import Client, RequestTimeout, StyxClientError
from apps.styx.fs import FileHandle, FsTree
from apps.styx.identity import server_policy, user_for_uid
from apps.styx.server import Limits, Session
from apps.styx.transport import Transport, TransportTimeout
from apps.styx.tree import Handle, StyxError, SynthDir, SynthFile, Tree, WouldBlock

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


# -- flush(5): calls that time out or are interrupted ---------------------------------------


class Gate(Handle):
    """Reads from `from_offset` on wait (parked by the server) until `data` is set."""

    def __init__(self, from_offset: int = 0) -> None:
        self.data: bytes | None = None
        self.from_offset = from_offset

    def read(self, offset: int, count: int) -> bytes:
        if offset < self.from_offset:
            return bytes(count)
        if self.data is None:
            raise WouldBlock()
        return self.data


class Unanswered(Loopback):
    """A Loopback on which a wait with nothing queued is interrupted (a Ctrl-C) `interrupts` times before
    it times out; the Rflushes of the first `lost` Tflushes never come; `on_flush` runs as a Tflush arrives."""

    def __init__(self, session: Session, interrupts: int = 0, lost: int = 0) -> None:
        super().__init__(session)
        self.interrupts, self.lost = interrupts, lost
        self.on_flush: Callable[[], None] = lambda: None
        self.on_send: Callable[[], None] = lambda: None
        self.closed = False

    def send(self, data: bytes) -> None:
        self.on_send()
        if isinstance(w.decode(data), w.Tflush):
            self.on_flush()
            if self.lost:
                self.lost -= 1
                self.sent.append(w.decode(data))
                self.session.receive(data)
                return
        super().send(data)

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        if not self.replies and self.interrupts:
            self.interrupts -= 1
            raise KeyboardInterrupt
        return super().recv(timeout, limit)

    def close(self) -> None:
        self.closed = True
        super().close()


def gated(handle: Handle, **kw: int) -> tuple[Client, Unanswered, int]:
    """A client of a file read through `handle`, open as the fid returned."""
    link = Unanswered(Session(SynthTree(handle, 0), Peer(ME, server_policy()), Limits(msize=MSIZE)), **kw)
    c = Client(link, msize=MSIZE)
    fid = c.walk("f")
    c.open(fid, w.OREAD)
    return c, link, fid


def flushes(link: Loopback) -> list[int]:
    """The oldtags of the Tflushes sent."""
    return [m.oldtag for m in link.sent if isinstance(m, w.Tflush)]


def test_a_call_that_times_out_is_flushed_and_the_rflush_taken_before_the_next() -> None:
    """flush(5): a request given up is flushed, and its tag is free once the Rflush came. The client
    left the read waiting on the server, its reply to come as the answer to whatever was asked next."""
    gate = Gate()
    c, link, fid = gated(gate)
    with pytest.raises(RequestTimeout, match="flushed"):
        c.rpc(w.Tread(0, fid, 0, 10), w.Rread, timeout=0.01)
    read = link.sent[-2]
    assert flushes(link) == [read.tag] and not link.replies
    assert not link.session.pending  # the server let the read go: it is never answered
    gate.data = b"now"
    assert link.session.retry() == []
    assert c.read(fid, 0, 10) == b"now"  # in step


def test_a_reply_that_comes_before_the_rflush_is_the_calls_answer() -> None:
    """flush(5): a reply ahead of the Rflush is honoured: the request was done."""
    gate = Gate()
    c, link, fid = gated(gate)

    def answer_first() -> None:
        gate.data = b"just in time"
        link.replies.extend(link.session.retry())

    link.on_flush = answer_first
    assert c.rpc(w.Tread(0, fid, 0, 100), w.Rread, timeout=0.01).data == b"just in time"
    assert len(flushes(link)) == 1 and not link.replies
    assert c.stat_fid(fid).name == "f"


def test_an_interrupted_call_is_flushed_and_the_connection_goes_on() -> None:
    """A Ctrl-C in a call (a read of a flow that sends nothing) left the request waiting: its reply
    came later as the answer to the next request, which failed as a tag mismatch."""
    gate = Gate()
    c, link, fid = gated(gate, interrupts=1)
    with pytest.raises(KeyboardInterrupt):
        c.read(fid, 0, 10)
    assert flushes(link) == [link.sent[-2].tag] and not link.session.pending
    gate.data = b"after"
    assert c.read(fid, 0, 10) == b"after"


def test_an_interrupt_while_waiting_for_the_rflush_flushes_the_same_request_again() -> None:
    """As Plan 9's mount driver does: each further Tflush names the request, not the earlier Tflush."""
    c, link, fid = gated(Gate(), interrupts=2, lost=1)
    with pytest.raises(KeyboardInterrupt):
        c.read(fid, 0, 10)
    read = next(m for m in reversed(link.sent) if isinstance(m, w.Tread))
    assert flushes(link) == [read.tag, read.tag] and not link.replies
    assert c.stat_fid(fid).name == "f"


def test_an_interrupted_bulk_read_flushes_every_read_in_flight() -> None:
    c, link, fid = gated(Gate(from_offset=UNIT * 2), interrupts=1)
    with pytest.raises(KeyboardInterrupt):
        c.read_at(fid, 0, UNIT * 8)
    waiting = [m.tag for m in link.sent if isinstance(m, w.Tread) and m.offset >= UNIT * 2]
    assert len(waiting) > 1 and sorted(flushes(link)) == sorted(waiting)
    assert not link.session.pending and not link.replies
    assert c.stat_fid(fid).name == "f"


def test_a_server_that_answers_no_tflush_costs_the_connection_not_a_hang() -> None:
    c, link, fid = gated(Gate(), lost=1)
    with pytest.raises(StyxClientError, match="no Rflush"):
        c.rpc(w.Tread(0, fid, 0, 10), w.Rread, timeout=0.01)
    assert link.closed


def test_an_interrupted_send_closes_the_connection() -> None:
    """Part of the message may have gone: nothing sent after it would be read as a message of its own."""
    c, link, fid = gated(Gate())

    def interrupt() -> None:
        link.on_send = lambda: None
        raise KeyboardInterrupt

    link.on_send = interrupt
    with pytest.raises(KeyboardInterrupt):
        c.read(fid, 0, 10)
    assert link.closed and not flushes(link)


class Answering(Transport):
    """A server that answers every request with the same message."""

    def __init__(self, reply: w.Msg) -> None:
        self.reply = w.encode(reply)

    def send(self, data: bytes) -> None:
        pass

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        return self.reply

    def close(self) -> None:
        pass


def test_an_msize_below_9ps_least_is_a_clear_error_at_the_version() -> None:
    """Plan 9's mount driver refuses an Rversion msize below 256 as nonsense; ours took any (one below
    24 leaves no room for a read's header: every read then asked for a negative count)."""
    with pytest.raises(StyxClientError, match="msize 100 is below"):
        Client(Answering(w.Rversion(w.NOTAG, 100, "9P2000")))
