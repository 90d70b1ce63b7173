"""netplumb channels: a pump never sends beyond the peer's window; a sink grants what it wrote."""

from __future__ import annotations

import os
import threading
import time

import pytest

from apps.netplumb import wire
from apps.netplumb.channels import CHUNK, Link, Pump, Sink, Window
from apps.netplumb.wire import INITIAL_WINDOW as WINDOW


class FakeLink:
    """Records what a pump or sink sends: (packet type, channel, data bytes or granted n)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, int, int]] = []
        self.lock = threading.Lock()

    def data(self, ch: int, data: bytes) -> None:
        assert len(data) <= CHUNK
        with self.lock:
            self.sent.append((wire.DATA, ch, len(data)))

    def eof(self, ch: int) -> None:
        with self.lock:
            self.sent.append((wire.EOF, ch, 0))

    def grant(self, ch: int, n: int) -> None:
        with self.lock:
            self.sent.append((wire.WINDOW, ch, n))

    def data_bytes(self) -> int:
        with self.lock:
            return sum(n for t, _, n in self.sent if t == wire.DATA)


def test_window_blocks_until_granted() -> None:
    w = Window(10)
    assert w.take(100) == 10
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(w.take(5)))
    t.start()
    time.sleep(0.1)
    assert got == []
    w.grant(3)
    t.join(5)
    assert got == [3]


def test_window_refuses_silly_grants() -> None:
    with pytest.raises(wire.WireError):
        Window().grant(0)
    with pytest.raises(wire.WireError):
        Window().grant(1 << 50)


def test_pump_stops_at_the_window_and_resumes_on_grant() -> None:
    r, w = os.pipe()
    link = FakeLink()
    pump = Pump(link, 1, lambda: r, lambda ch: None)  # type: ignore[arg-type]
    pump.start()

    def write_all() -> None:
        os.write(w, bytes(3 * WINDOW))
        os.close(w)

    writer = threading.Thread(target=write_all)
    writer.start()
    deadline = time.monotonic() + 5
    while link.data_bytes() < WINDOW and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert link.data_bytes() == WINDOW  # the window is used up, and not exceeded
    for _ in range(2 * WINDOW // CHUNK + 1):  # the last grant lets it read the end of the data
        pump.window.grant(CHUNK)
    writer.join(5)
    pump.join(5)
    assert link.data_bytes() == 3 * WINDOW
    assert link.sent[-1][0] == wire.EOF


def test_sink_writes_in_order_and_grants_what_it_wrote() -> None:
    r, w = os.pipe()
    link = FakeLink()
    done = threading.Event()
    sink = Sink(link, 2, lambda: w, lambda ch: done.set())  # type: ignore[arg-type]
    sink.start()
    for i in range(5):
        sink.put(bytes([i]) * 1000)
    sink.finish()
    assert done.wait(5)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    assert data == b"".join(bytes([i]) * 1000 for i in range(5))
    grants = [n for t, _, n in link.sent if t == wire.WINDOW]
    assert sum(grants) == 5000


def test_fake_link_has_the_real_links_senders() -> None:
    for name in ("data", "eof", "grant"):
        assert hasattr(Link, name) and hasattr(FakeLink, name)
