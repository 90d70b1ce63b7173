"""The depot's data path without flows: a store hands its bytes to the disk as they come and is
acknowledged only after its fsync; a load sends its status with the first bytes, from one reused
buffer; a client gathers a load where it arrives."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest

from apps.ibp import server as srv
from apps.ibp import storage
from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import Connection
from apps.ibp.depot import DepotCore
from apps.ibp.limits import Limits
from apps.ibp.storage import DiskStore
from apps.ibp.stream import ByteStream
from apps.ibp.targets import KEEP_FOR, PER_TARGET, Targets

NOW = 1_000_000.0
MB = 1 << 20


class Scripted(ByteStream):
    """A stream fed from a list of SDUs; what is sent is kept, one entry per send."""

    def __init__(self, sdus: list[bytes], events: list[str] | None = None) -> None:
        super().__init__()
        self.incoming = deque(sdus)
        self.sent: list[bytes] = []
        self.events = events if events is not None else []

    def _recv(self, timeout: float | None) -> bytes:
        return self.incoming.popleft() if self.incoming else b""

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.sent.append(bytes(data))
        self.events.append(f"send {bytes(data[:8])!r}")

    def close(self) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> srv.DepotServer:
    return srv.DepotServer(
        DepotCore(DiskStore(tmp_path), 100 * MB, 86400, NOW, Limits(client_share=1.0)), "d", clock=lambda: NOW
    )


def allocate(server: srv.DepotServer, size: int) -> tuple[Capability, Capability]:
    grant = server.core.allocate(w.Allocate("0", w.IBP_SOFT, w.IBP_BYTEARRAY, 3600, size, 30), NOW)
    r, wc, _ = grant.caps("d")
    return r, wc


def request(req: w.Request) -> bytes:
    return w.format_request(req)


def test_a_store_hands_its_bytes_to_the_disk_as_they_come_and_acks_after_fsync(
    server: srv.DepotServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(5 * srv.WRITEBACK + 12345)
    r, wc = allocate(server, len(data))
    events: list[str] = []
    monkeypatch.setattr(srv, "start_writeback", lambda fd, off, n: events.append(f"writeback {off} {n}"))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    sdus = [data[i : i + 65000] for i in range(0, len(data), 65000)]
    stream = Scripted(sdus, events)
    assert server.handle(stream, request(w.Store(wc.key, wc.typekey, len(data), 30, wc.rid)), "d")
    handed = [(int(e.split()[1]), int(e.split()[2])) for e in events if e.startswith("writeback")]
    assert [off for off, _ in handed] == [sum(n for _, n in handed[:i]) for i in range(len(handed))]  # in turn
    assert all(n >= srv.WRITEBACK for _, n in handed)  # a few large pieces, while more was still to come
    assert 0 < len(data) - sum(n for _, n in handed) < srv.WRITEBACK + 65000  # the rest is left to fsync
    ack = events.index(f"send {b'1 ' + str(len(data)).encode()[:6]!r}")
    assert events.index("fsync") < ack  # acknowledged only once the bytes are on disk
    assert server.core.store.path(server.core.authorize(r.key, r.typekey, "READ", NOW, r.rid).fid).read_bytes() == data


def test_a_load_sends_its_status_with_the_first_bytes(server: srv.DepotServer) -> None:
    data = os.urandom(2 * srv.READ_BLOCK + 100)
    r, wc = allocate(server, len(data))
    server.handle(Scripted([data]), request(w.Store(wc.key, wc.typekey, len(data), 30, wc.rid)), "d")
    stream = Scripted([])
    assert server.handle(stream, request(w.Load(r.key, r.typekey, 0, len(data), 30, r.rid)), "d")
    head = w.format_reply(w.IBP_OK, len(data))
    assert stream.sent[0].startswith(head) and len(stream.sent[0]) == len(head) + srv.READ_BLOCK
    assert b"".join(stream.sent) == head + data  # each block copied out before the buffer was reused
    assert len(stream.sent) == 3


def test_a_load_of_nothing_is_refused_as_lstore_does(server: srv.DepotServer) -> None:
    """A length of 0 is -36 (L-Store's read_read), no longer "to the end"; the connection goes on."""
    r, _ = allocate(server, 10)
    stream = Scripted([])
    assert server.handle(stream, f"1 8 {r.rid}#{r.key} {r.typekey} 0 0 30\n".encode(), "d")
    assert int(stream.sent[0].split()[0]) == w.IBP_E_INV_PAR_SIZE


def test_a_load_of_a_vanished_file_is_refused_with_a_status(server: srv.DepotServer) -> None:
    r, wc = allocate(server, 10)
    server.handle(Scripted([b"0123456789"]), request(w.Store(wc.key, wc.typekey, 10, 30, wc.rid)), "d")
    a = server.core.authorize(r.key, r.typekey, "READ", NOW, r.rid)
    server.core.store.path(a.fid).unlink()
    stream = Scripted([])
    assert server.handle(stream, request(w.Load(r.key, r.typekey, 0, 10, 30, r.rid)), "d")
    assert int(stream.sent[0].split()[0]) == w.IBP_E_CAP_NOT_FOUND


def loading(*loads: bytes) -> Connection:
    """A client whose depot answers each LOAD with the next of `loads`, as SDUs of up to 65,000 bytes."""
    conn = Connection.__new__(Connection)
    conn.depot, conn.timeout, conn.answered = "d", 5.0, 0
    sdus: list[bytes] = []
    for data in loads:
        sdus.append(w.format_reply(w.IBP_OK, len(data)) + data[:1000])
        sdus += [data[i : i + 65000] for i in range(1000, len(data), 65000)]
    conn.stream = Scripted(sdus)
    return conn


READ_CAP = Capability("d", "0", "k" * 64, "r" * 64, "READ")


def test_load_bytes_gathers_a_load_as_it_arrives() -> None:
    data = os.urandom(300_000)
    assert loading(data).load_bytes(READ_CAP, 0, len(data)) == data


def test_load_into_fills_the_callers_buffer_and_says_how_much() -> None:
    first, second = os.urandom(300_000), os.urandom(70_000)
    conn = loading(first, second)
    buf = bytearray(b"\xff" * 400_000)
    assert conn.load_into(READ_CAP, buf, 0, len(first)) == len(first)
    assert buf[: len(first)] == first and buf[len(first) :] == b"\xff" * 100_000  # nothing past the load
    assert conn.load_into(READ_CAP, memoryview(buf), 0, len(second)) == len(second)  # the same buffer again
    assert buf[: len(second)] == second


def test_a_load_longer_than_the_buffer_fails_and_the_connection_carries_on() -> None:
    big, small = os.urandom(200_000), b"after"
    conn = loading(big, small)
    buf = bytearray(100_000)
    with pytest.raises(ValueError, match="200000 bytes, the buffer 100000"):
        conn.load_into(READ_CAP, buf, 0, len(big))
    assert (
        conn.load_into(READ_CAP, buf, 0, len(small)) == len(small) and buf[:5] == small
    )  # the long load was read past


def test_an_allocation_reserves_its_blocks_without_growing_its_file(server: srv.DepotServer) -> None:
    r, _ = allocate(server, 4 * 1024 * 1024)
    st = os.stat(server.core.store.path(server.core.authorize(r.key, r.typekey, "READ", NOW, r.rid).fid))
    assert st.st_size == 0  # a load still sees nothing stored
    if storage._FALLOCATE is None:
        pytest.skip("no fallocate in this libc")
    assert st.st_blocks * 512 >= 4 * 1024 * 1024  # the disk holds the allocation's room already


# -- connections kept to copy targets ---------------------------------------------------------------


class FakeConn:
    """What Targets looks at in a connection: its depot, timeout, replies and unread bytes."""

    def __init__(self, depot: str, timeout: float) -> None:
        self.depot, self.timeout = depot, timeout
        self.answered = 0
        self.stream = Scripted([])
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Opener:
    def __init__(self) -> None:
        self.opened: list[FakeConn] = []

    def __call__(self, depot: str, timeout: float, who: object = None) -> FakeConn:
        self.opened.append(FakeConn(depot, timeout))
        return self.opened[-1]


def targets(clock: list[float] | None = None) -> tuple[Targets, Opener]:
    opener = Opener()
    now = clock if clock is not None else [0.0]
    return Targets(opener, lambda: now[0]), opener  # type: ignore[arg-type]


def answer(conn: FakeConn) -> None:
    conn.answered += 1


def test_a_copy_target_connection_is_kept_for_the_next_copy() -> None:
    t, opener = targets()
    t.use("d2", 5.0, answer)
    t.use("d2", 7.0, answer)
    assert len(opener.opened) == 1 and opener.opened[0].answered == 2
    assert opener.opened[0].timeout == 7.0  # each copy's own timeout
    t.use("d3", 5.0, answer)
    assert len(opener.opened) == 2


def test_kept_connections_are_bounded_and_expire() -> None:
    clock = [0.0]
    t, opener = targets(clock)
    held: list[FakeConn] = []

    def hold_all(conn: FakeConn) -> None:  # copies at once each take a connection of their own
        held.append(conn)
        if len(held) < 4:
            t.use("d2", 5.0, hold_all)

    t.use("d2", 5.0, hold_all)
    assert len(opener.opened) == 4
    assert sum(c.closed for c in opener.opened) == 4 - PER_TARGET  # only a few are kept
    clock[0] = KEEP_FOR + 1
    t.expire()
    assert all(c.closed for c in opener.opened)
    t.use("d2", 5.0, answer)
    assert len(opener.opened) == 5


def test_a_connection_with_unread_bytes_or_an_error_is_not_kept() -> None:
    t, opener = targets()
    t.use("d2", 5.0, lambda c: c.stream._buf.extend(b"stray"))
    assert opener.opened[0].closed
    with pytest.raises(w.IbpError):
        t.use("d2", 5.0, lambda c: (_ for _ in ()).throw(w.IbpError(w.IBP_E_WOULD_EXCEED_LIMIT, "full")))
    assert opener.opened[1].closed
    t.use("d2", 5.0, answer)
    assert len(opener.opened) == 3


def lost(conn: FakeConn) -> None:
    raise w.IbpError(w.IBP_E_CONNECTION, "lost")


def test_a_kept_connection_lost_before_any_answer_is_replaced_once() -> None:
    t, opener = targets()
    t.use("d2", 5.0, answer)
    calls: list[FakeConn] = []

    def stale_then_fine(conn: FakeConn) -> None:
        calls.append(conn)
        if conn is opener.opened[0]:
            lost(conn)
        answer(conn)

    t.use("d2", 5.0, stale_then_fine)
    assert calls == opener.opened and opener.opened[0].closed
    with pytest.raises(w.IbpError):  # a new connection that fails is not tried again
        t.use("d3", 5.0, lost)


def test_a_kept_connection_lost_after_an_answer_is_not_done_again() -> None:
    t, opener = targets()
    t.use("d2", 5.0, answer)
    tries: list[FakeConn] = []

    def answered_then_lost(conn: FakeConn) -> None:  # the target may have taken the store
        tries.append(conn)
        answer(conn)
        lost(conn)

    with pytest.raises(w.IbpError):
        t.use("d2", 5.0, answered_then_lost)
    assert len(tries) == 1 and len(opener.opened) == 1
