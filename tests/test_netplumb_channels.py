"""netplumb channels: a pump never sends beyond the peer's window; a sink grants what it wrote."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import tracemalloc

import pytest

from apps.netplumb import wire
from apps.netplumb.channels import CHUNK, Link, Pump, Reader, Sink, Stop, Window
from apps.netplumb.limits import BufferFull, Buffers, Holding
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


@pytest.mark.timeout(30)
def test_a_stop_ends_a_pump_and_a_sink_whose_other_ends_are_held_idle() -> None:
    """A pump reading a pipe nobody writes to, and a sink writing a pipe nobody reads, both with
    their other ends held open (by a process the session does not end): setting the session's Stop
    ends both, and they let go of their fds. Before it, data moves as ever."""
    stop = Stop()
    (pr, pw), (sr, sw) = os.pipe(), os.pipe()
    link = FakeLink()
    done: list[int] = []
    pump = Pump(link, 3, lambda: pr, done.append, stop=stop)  # type: ignore[arg-type]
    sink = Sink(link, 4, lambda: sw, done.append, stop=stop)  # type: ignore[arg-type]
    pump.start()
    sink.start()
    os.write(pw, b"hello")
    sink.put(b"x" * 100)
    deadline = time.monotonic() + 5
    while link.data_bytes() < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.data_bytes() == 5 and os.read(sr, 1000) == b"x" * 100
    sink.put(bytes(4 * WINDOW))  # more than the pipe holds: the sink waits for a reader
    time.sleep(0.2)
    assert pump.is_alive() and sink.is_alive()
    sink.finish()
    stop.set()
    pump.join(5)
    sink.join(5)
    assert not pump.is_alive() and not sink.is_alive() and sorted(done) == [3, 4]
    for fd in (pr, sw):  # closed by them
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(pw)
    os.close(sr)


class _FakeFlow:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


@pytest.mark.timeout(30)
def test_a_reader_woken_after_it_closed_writes_into_no_fd_that_took_its_number() -> None:
    """A session's waiter may wake its reader as the session is torn down: once the reader is
    closed, the number of its wake pipe may be another session's fd (a flow, a command's stdin)."""
    r, w = os.pipe()
    reader = Reader(_FakeFlow(r), None)  # type: ignore[arg-type]
    reader.wake()
    number = reader.wake_w
    reader.close()
    taken = [os.dup(r) for _ in range(4)]  # the lowest free numbers: the wake pipe's among them
    other_r, other_w = os.pipe()
    os.dup2(other_w, number)
    try:
        reader.wake()
        reader.close()  # twice: nothing
        os.set_blocking(other_r, False)
        with pytest.raises(BlockingIOError):
            os.read(other_r, 10)
    finally:
        for fd in (*taken, other_r, other_w, number, r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.mark.timeout(60)
def test_a_peers_tiny_datas_cost_what_they_carry_while_they_wait() -> None:
    """A window's worth of 4-byte DATAs for a local end not open yet: the sink holds 1 MiB, not an
    object per DATA (that was ~12 MiB: 45 bytes held for every 4)."""
    gate = threading.Event()
    r, w = os.pipe()
    link = FakeLink()

    def opener() -> int:
        gate.wait()
        return w

    sink = Sink(link, 5, opener)  # type: ignore[arg-type]
    sink.start()
    tracemalloc.start()
    try:
        for _ in range(WINDOW // 4):
            sink.put(bytes(bytearray(b"abcd")))  # one object each, as parsed DATAs are
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert sink.waiting() == WINDOW
    assert held < 2 * WINDOW, f"{held} bytes held for {WINDOW} received"
    sink.finish()
    gate.set()
    got = bytearray()
    while chunk := os.read(r, 1 << 16):
        got += chunk
    sink.join(5)
    os.close(r)
    assert got == b"abcd" * (WINDOW // 4)
    assert sum(n for t, _, n in link.sent if t == wire.WINDOW) == WINDOW


def test_all_keys_together_hold_at_most_the_total_and_each_gets_it_back_as_commands_read() -> None:
    """Each key within its own budget, together past --max-buffer: the DATA past it is refused
    (its session ended) naming the option; what a key's commands read is free again for any key."""
    buffers = Buffers(2 * WINDOW, total=3 * WINDOW)
    a, b, c = (Holding(buffers, k) for k in (b"a", b"b", b"c"))
    a.take(2 * WINDOW)
    b.take(WINDOW)
    with pytest.raises(BufferFull, match=r"of at most 3145728 \(--max-buffer\)"):
        c.take(1)
    b.give(WINDOW)
    c.take(WINDOW)
    with pytest.raises(BufferFull, match=r"--per-key-buffer"):
        a.take(1)  # its own budget is still the first limit it meets
    a.close()
    b.take(2 * WINDOW)
    assert (buffers.held(b"a"), buffers.held(b"b"), buffers.held(b"c")) == (0, 2 * WINDOW, WINDOW)


def test_a_keys_sessions_share_one_budget_and_give_back_what_they_held() -> None:
    """What sinks hold counts against their key's budget, across its sessions: past it, put() raises
    BufferFull (the driver ends that session with it); written bytes are given back, and a session's
    end gives back whatever its sinks still held, once."""
    buffers = Buffers(3 * WINDOW)
    first, second, other = Holding(buffers, b"k"), Holding(buffers, b"k"), Holding(buffers, b"o")
    link = FakeLink()
    gate = threading.Event()
    _, w = os.pipe()
    sinks = [Sink(link, 5, lambda: gate.wait() and w, budget=h) for h in (first, first, second)]  # type: ignore[arg-type]
    for s in sinks:
        s.put(bytes(WINDOW))
    with pytest.raises(BufferFull, match=r"more than 3145728 bytes .*\(--per-key-buffer\)"):
        sinks[2].put(b"x")
    Sink(link, 6, lambda: w, budget=other).put(bytes(WINDOW))  # another key's budget is its own
    assert buffers.held(b"k") == 3 * WINDOW and second.held == WINDOW
    second.close()
    second.close()
    second.give(WINDOW)  # its sink, writing after the session ended, gives nothing twice
    assert buffers.held(b"k") == 2 * WINDOW
    sinks[0].put(b"x")
    first.close()
    assert buffers.held(b"k") == 0 and buffers.held(b"o") == WINDOW
    os.close(w)
