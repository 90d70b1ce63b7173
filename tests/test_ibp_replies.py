"""Hostile depots against our side: what a depot answers our client, the exNode tools and a depot's
own copies is the depot's word, no more. A reply field that is no number (or a number out of range)
is an IbpError like any bad reply, so a download goes on to the next replica, and a copy target's
words never reach the client that asked for the copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import threading
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import serve_tcp
from test_ibp_depot import Collect

from apps.ibp import lors
from apps.ibp import server as srv
from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import Connection
from apps.ibp.depot import DepotCore
from apps.ibp.exnode import ExNode, Mapping
from apps.ibp.limits import Limits
from apps.ibp.storage import DiskStore
from apps.ibp.stream import ByteStream

NOW = 1_000_000.0
MB = 1 << 20
READ_CAP = Capability("d", "0", "k" * 64, "r" * 64, "READ")
WRITE_CAP = Capability("d", "0", "k" * 64, "w" * 64, "WRITE")
MANAGE_CAP = Capability("d", "0", "k" * 64, "m" * 64, "MANAGE")
BAD_NUMBERS = [b"abc", b"-5", b"9" * 25, b"0x10", b""]


class Answering(ByteStream):
    """A depot that answers each request line with `answer(line)`: the bytes it sends back."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        super().__init__()
        self.answer = answer
        self.out: deque[bytes] = deque()
        self.pending_line = b""

    def _recv(self, timeout: float | None) -> bytes:
        return self.out.popleft() if self.out else b""

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.pending_line += bytes(data)
        while b"\n" in self.pending_line:
            line, _, self.pending_line = self.pending_line.partition(b"\n")
            self.out.append(self.answer(line))

    def close(self) -> None:
        pass


def client(answer: Callable[[bytes], bytes], depot: str = "d") -> Connection:
    conn = Connection.__new__(Connection)
    conn.depot, conn.timeout, conn.answered, conn._own_irm = depot, 5.0, 0, None
    conn.stream = Answering(answer)
    return conn


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_reply_fields_that_are_no_numbers_are_ibp_errors(bad: bytes) -> None:
    """LOAD's length, STORE's stored length, PROBE's fields, a copy's length and MCOPY's statuses."""
    calls: list[Callable[[Connection], object]] = [
        lambda c: c.load_bytes(READ_CAP, 0, 10),
        lambda c: c.probe(MANAGE_CAP),
        lambda c: c.copy(READ_CAP, WRITE_CAP, 0, 10),
        lambda c: c.mcopy(READ_CAP, [WRITE_CAP], 0, 10),
        lambda c: c.status(),
    ]
    if bad in (b"", b"-5"):  # MCOPY's statuses: none is a list of none (its caller counts), -5 is one
        calls.pop(3)
    for call in calls:
        with pytest.raises(w.IbpError) as e:
            call(client(lambda line: b" ".join([b"1"] + [bad] * 7) + b"\n"))
        assert e.value.status == w.IBP_E_BAD_FORMAT, e.value
    with pytest.raises(w.IbpError) as e:  # STORE: taken, then a stored length that is none
        client(lambda line: b"1\n1 " + bad + b"\n").store(WRITE_CAP, [b"hello"], 5)
    assert e.value.status == w.IBP_E_BAD_FORMAT


DATA = b"the bytes of the file, " * 40


def _depot(answers: bytes | None) -> Callable[[bytes], bytes]:
    """A depot holding DATA (answers None), or one answering every LOAD with `answers`."""

    def answer(line: bytes) -> bytes:
        toks = line.split()
        offset, length = int(toks[4]), int(toks[5])
        if answers is not None:
            return answers
        return w.format_reply(w.IBP_OK, length) + DATA[offset : offset + length]

    return answer


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_a_download_goes_past_a_replica_whose_depot_answers_nonsense(
    bad: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    depots = {"liar:1": _depot(b"1 " + bad + b"\n"), "good:1": _depot(None)}
    monkeypatch.setattr(lors, "Connection", lambda depot, timeout, encrypt=False: client(depots[depot], depot))
    digest = hashlib.sha256(DATA).hexdigest()
    cap = "ibp://{}/0#{}/{}/READ"
    for whole in (digest, ""):  # read whole to check its checksum, or only the bytes asked
        mappings = [
            Mapping(0, len(DATA), 0, len(DATA), cap.format(d, "k" * 64, "r" * 64), sha256=whole) for d in depots
        ]
        out = io.BytesIO()
        assert lors.download(ExNode("f", len(DATA), digest, mappings), out, lors.Settings(timeout=5)) == len(DATA)
        assert out.getvalue() == DATA


def _replicas(depots: dict[str, Callable[[bytes], bytes]], whole: str, size: int = len(DATA)) -> list[Mapping]:
    cap = "ibp://{}/0#{}/{}/READ"
    return [Mapping(0, size, 0, size, cap.format(d, "k" * 64, "r" * 64), sha256=whole) for d in depots]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [256 * MB, 1 << 50])
def test_a_depot_announcing_a_huge_block_costs_the_download_no_memory(
    size: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An exNode of one huge block, whose depot announces all of it, sends 100 bytes and hangs up: the
    download fails as a depot's failure, having held no more than it was sent. (It took the
    announced length as a buffer to fill: 256 MiB of memory for 100 bytes sent, MemoryError past
    what the host has.)"""

    def announce(line: bytes) -> bytes:
        return w.format_reply(w.IBP_OK, int(line.split()[5])) + b"x" * 100

    monkeypatch.setattr(lors, "Connection", lambda depot, timeout, encrypt=False: client(announce, depot))
    for whole in ("ab" * 32, ""):
        ex = ExNode("f", size, "", _replicas({"huge:1": announce}, whole, size))
        tracemalloc.start()
        try:
            with pytest.raises(w.IbpError, match="closed the connection"):
                lors.download(ex, io.BytesIO(), lors.Settings(timeout=5, parallel=2), spill=tmp_path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * MB, peak
    assert list(tmp_path.iterdir()) == []  # the temporary files are gone with the download


@pytest.mark.timeout(60)
def test_blocks_longer_than_memory_holds_are_checked_through_a_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Blocks past HELD wait for their checksum in a temporary file: a replica with wrong bytes is
    passed over, the right one written, whole or a range of it."""
    monkeypatch.setattr(lors, "HELD", 100)
    wrong = DATA[:-1] + b"!"

    def liar(line: bytes) -> bytes:
        offset, length = int(line.split()[4]), int(line.split()[5])
        return w.format_reply(w.IBP_OK, length) + wrong[offset : offset + length]

    depots = {"liar:1": liar, "good:1": _depot(None)}
    monkeypatch.setattr(lors, "Connection", lambda depot, timeout, encrypt=False: client(depots[depot], depot))
    digest = hashlib.sha256(DATA).hexdigest()
    ex = ExNode("f", len(DATA), digest, _replicas(depots, digest))
    for offset, length in ((0, None), (150, 500)):
        out = io.BytesIO()
        n = lors.download(ex, out, lors.Settings(timeout=5), offset, length, spill=tmp_path)
        assert out.getvalue() == DATA[offset : None if length is None else offset + length] and n == len(out.getvalue())
    assert list(tmp_path.iterdir()) == []


# -- a depot's copies to a target that answers nonsense ----------------------------------------------


class LyingTarget:
    """A TCP 'depot' that answers ST_VERSION as one and takes a STORE's bytes, and then says `final`."""

    def __init__(self, final: bytes) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.final = final
        self.conns: list[socket.socket] = []
        serve_tcp(self.sock, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        f = conn.makefile("rb")
        try:
            while line := f.readline():
                toks = line.split()
                if toks[1:3] == [b"4", b"5"]:  # ST_VERSION
                    conn.sendall(b"1\nsome depot\nEND\n")
                elif toks[1:2] == [b"2"]:  # STORE KEY WRITEKEY LENGTH TIMEOUT
                    conn.sendall(b"1\n")
                    f.read(int(toks[4]))
                    conn.sendall(self.final)
                else:
                    conn.sendall(b"-21\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Callable[[tuple[str, ...]], srv.DepotServer]]:
    made: list[srv.DepotServer] = []

    def make(copy_to: tuple[str, ...]) -> srv.DepotServer:
        lim = Limits(client_share=1.0, copy_to=copy_to)
        core = DepotCore(DiskStore(tmp_path / f"s{len(made)}"), 100 * MB, 86400, NOW, lim)
        made.append(srv.DepotServer(core, "s", limits=lim, clock=lambda: NOW))
        return made[-1]

    yield make
    for s in made:
        s.targets.close()


@pytest.mark.timeout(60)
def test_a_copy_targets_nonsense_answer_is_its_status_only_and_other_targets_are_served(
    source: Callable[[tuple[str, ...]], srv.DepotServer],
) -> None:
    """A target answering the copy's STORE with `1 SECRET-WORDS` gives the copy -21 without its words
    (a SEND), and an MCOPY's other target still gets its copy (MCOPY's reply: 1 LENGTH STATUS...)."""
    liar, honest = LyingTarget(b"1 SECRET-WORDS\n"), LyingTarget(b"1 6\n")
    try:
        s = source((f"127.0.0.1:{liar.port}", f"127.0.0.1:{honest.port}"))
        g = s.core.allocate(w.Allocate("0", w.IBP_SOFT, w.IBP_BYTEARRAY, 3600, 100, 30), NOW)
        a = g.allocation
        start = s.core.check_write(a, None, 6)
        with s.core.open_data(a) as f:
            f.seek(start)
            f.write(b"copied")
        s.core.commit(a, 6)
        dest = "ibp://127.0.0.1:{}/0#{}/{}/WRITE"
        to_liar, to_honest = dest.format(liar.port, "k" * 64, "w" * 64), dest.format(honest.port, "k" * 64, "w" * 64)

        out = Collect()
        s.handle(out, w.format_request(w.Send(g.key, g.read_key, to_liar, 0, 6, 5, 5, 5, "0")), "s")
        reply = b"".join(out.sent)
        assert reply.split()[0] == str(w.IBP_E_BAD_FORMAT).encode() and b"SECRET" not in reply, reply

        out = Collect()
        assert s.handle(out, w.format_request(w.Mcopy(g.key, g.read_key, 0, 6, (to_liar, to_honest), 5, "0")), "s")
        reply = b"".join(out.sent)
        assert reply.split() == [b"1", b"6", str(w.IBP_E_BAD_FORMAT).encode(), str(w.IBP_OK).encode()], reply
    finally:
        liar.close()
        honest.close()
