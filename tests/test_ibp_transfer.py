"""The depot's data path without flows: a store hands its bytes to the disk as they come and is
acknowledged only after its fsync; a load sends its status with the first bytes, from one reused
buffer; a client gathers a load where it arrives."""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import pytest

from apps.ibp import server as srv
from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.depot import DepotCore
from apps.ibp.limits import Limits
from apps.ibp.storage import DiskStore
from apps.ibp.stream import ByteStream

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
    return srv.DepotServer(DepotCore(DiskStore(tmp_path), 100 * MB, 86400, NOW, Limits(client_share=1.0)), "d",
                           clock=lambda: NOW)


def allocate(server: srv.DepotServer, size: int) -> tuple[Capability, Capability]:
    grant = server.core.allocate(w.Allocate("0", w.IBP_SOFT, w.IBP_BYTEARRAY, 3600, size, 30), NOW)
    r, wc, _ = grant.caps("d")
    return r, wc


def request(req: w.Request) -> bytes:
    return w.format_request(req)


def test_a_store_hands_its_bytes_to_the_disk_as_they_come_and_acks_after_fsync(
        server: srv.DepotServer, monkeypatch: pytest.MonkeyPatch) -> None:
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
    assert server.core.store.path(server.core.authorize(r.key, r.typekey, "READ", NOW, r.rid).fid) \
        .read_bytes() == data


def test_a_load_sends_its_status_with_the_first_bytes(server: srv.DepotServer) -> None:
    data = os.urandom(2 * srv.READ_BLOCK + 100)
    r, wc = allocate(server, len(data))
    server.handle(Scripted([data]), request(w.Store(wc.key, wc.typekey, len(data), 30, wc.rid)), "d")
    stream = Scripted([])
    assert server.handle(stream, request(w.Load(r.key, r.typekey, 0, 0, 30, r.rid)), "d")
    head = w.format_reply(w.IBP_OK, len(data))
    assert stream.sent[0].startswith(head) and len(stream.sent[0]) == len(head) + srv.READ_BLOCK
    assert b"".join(stream.sent) == head + data  # each block copied out before the buffer was reused
    assert len(stream.sent) == 3


def test_an_empty_load_is_its_status_alone(server: srv.DepotServer) -> None:
    r, _ = allocate(server, 10)
    stream = Scripted([])
    assert server.handle(stream, request(w.Load(r.key, r.typekey, 0, 0, 30, r.rid)), "d")
    assert stream.sent == [w.format_reply(w.IBP_OK, 0)]


def test_a_load_of_a_vanished_file_is_refused_with_a_status(server: srv.DepotServer) -> None:
    r, wc = allocate(server, 10)
    server.handle(Scripted([b"0123456789"]), request(w.Store(wc.key, wc.typekey, 10, 30, wc.rid)), "d")
    a = server.core.authorize(r.key, r.typekey, "READ", NOW, r.rid)
    server.core.store.path(a.fid).unlink()
    stream = Scripted([])
    assert server.handle(stream, request(w.Load(r.key, r.typekey, 0, 0, 30, r.rid)), "d")
    assert int(stream.sent[0].split()[0]) == w.IBP_E_CAP_NOT_FOUND


def test_load_bytes_gathers_a_load_as_it_arrives() -> None:
    from apps.ibp.client import Connection

    data = os.urandom(300_000)
    conn = Connection.__new__(Connection)
    conn.depot, conn.timeout = "d", 5.0
    conn.stream = Scripted([w.format_reply(w.IBP_OK, len(data)) + data[:1000]]
                           + [data[i : i + 65000] for i in range(1000, len(data), 65000)])
    cap = Capability("d", "0", "k" * 64, "r" * 64, "READ")
    assert conn.load_bytes(cap) == data
