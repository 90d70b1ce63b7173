"""The I/O around a connection core, in threads: the Reader feeding it the flow's bytes and its
timer, the Link writing what it queued, pumps (local fd -> DATA, within the peer's window) and sinks
(DATA -> local fd, granting window as they write).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from apps.netplumb import wire
from apps.netplumb.messages import Data, Eof, Unread
from apps.netplumb.messages import Window as Grant
from apps.netplumb.wire import INITIAL_WINDOW
from flowlib import Flow

log = logging.getLogger(__name__)
DEBUG2, DEBUG3 = 12, 10  # plumb -vv (channels) and -vvv (packets); -v is 15

CHUNK = 60 * 1024  # data read at once: one DATA packet of under 64 KiB, one SDU (the core cuts it if need be)
GRANT_BATCH = INITIAL_WINDOW // 4  # window adjustments are sent per this many bytes written


class Core(Protocol):
    """A sans-IO connection (apps/netplumb/connection.py), as the I/O around it uses it."""

    def receive(self, data: bytes, now: float) -> list[Any]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> list[Any]: ...

    def send_data(self, ch: int, data: bytes) -> None: ...

    def send_eof(self, ch: int) -> None: ...

    def grant(self, ch: int, n: int) -> None: ...

    def remove_channel(self, ch: int) -> None: ...

    def data_to_send(self) -> list[bytes]: ...

    def has_output(self) -> bool: ...


class Reader:
    """Feeds a core from one thread: the flow's bytes when it has some, handle_timer() when its timer
    is due; nothing else wakes it but wake() (a new timer, a signal's handler to run). One timer, no
    polling tick."""

    def __init__(self, flow: Flow, core: Core) -> None:
        self.flow = flow
        self.core = core
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closing = threading.Lock()  # wake() and close(): never a write to a number closed and reused
        self._closed = False
        self._poller = select.poll()
        self._poller.register(flow.fileno(), select.POLLIN)
        self._poller.register(self.wake_r, select.POLLIN)

    def events(self) -> list[Any]:
        """The core's events of one wake-up (maybe none). Raises the flow's errors."""
        timer, now = self.core.get_timer(), time.monotonic()
        if timer is not None and timer <= now:
            return self.core.handle_timer(now)
        ready = {fd for fd, _ in self._poller.poll(None if timer is None else (timer - now) * 1000)}
        if self.wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 64)
        if self.flow.fileno() not in ready:
            return []
        data = self.flow.read()
        if log.isEnabledFor(DEBUG3):
            log.log(DEBUG3, "<- %s", wire.describe(data))
        return self.core.receive(data, time.monotonic())

    def wake(self) -> None:
        """From any thread, at any time: a session's waiter may wake it as the session is torn down,
        and the number of a pipe closed meanwhile may be another session's fd by then."""
        with self._closing, contextlib.suppress(OSError):
            if not self._closed:
                os.write(self.wake_w, b"x")

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
            for fd in (self.wake_r, self.wake_w):
                os.close(fd)


class Link:
    """A connection core and the flow under it, shared by the threads of a session: each send is
    sealed, queued and written under one lock, so packets leave in the order they were numbered."""

    def __init__(self, flow: Flow, core: Core) -> None:
        self.flow = flow
        self.core = core
        self._lock = threading.Lock()

    def send(self, queue: Callable[[], object] = lambda: None) -> None:
        """Have the core queue something (none: only what it queued by itself, such as handshake
        replies and errors), then write all it queued."""
        with self._lock:
            queue()
            for packet in self.core.data_to_send():
                if log.isEnabledFor(DEBUG3):
                    log.log(DEBUG3, "-> %s", wire.describe(packet))
                self.flow.write(packet)

    def flush(self) -> None:
        """Write what the core queued by itself (handshake replies, errors), if anything: the
        receiving thread does not wait for the lock while a pump writes."""
        if self.core.has_output():
            self.send()

    def data(self, ch: int, data: bytes) -> None:
        self.send(lambda: self.core.send_data(ch, data))

    def eof(self, ch: int) -> None:
        self.send(lambda: self.core.send_eof(ch))

    def grant(self, ch: int, n: int) -> None:
        self.send(lambda: self.core.grant(ch, n))


class Window:
    """Bytes the peer still takes on one channel; a pump waits here."""

    def __init__(self, size: int = INITIAL_WINDOW) -> None:
        self._left = size
        self._cond = threading.Condition()
        self._closed = False

    def take(self, most: int) -> int:
        """Wait for room; 0 once closed."""
        with self._cond:
            while self._left <= 0 and not self._closed:
                self._cond.wait()
            if self._closed:
                return 0
            n = min(most, self._left)
            self._left -= n
            return n

    def grant(self, n: int) -> None:
        if n <= 0 or n > 1 << 40:
            raise wire.WireError(f"bad window adjustment {n}")
        with self._cond:
            self._left += n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _nothing(_ch: int) -> None:
    pass


class Stop:
    """The end of a session, for the threads moving its data: set, it wakes every pump waiting to read
    and every sink waiting to write a local fd. Their other end may be held by a process the session
    does not end (one that left the job's session, or any of its user's, on a named pipe or a socket):
    blocked in read(2) or write(2) on it, a thread, its fd and the data it holds would stay until that
    process let go, whatever became of the session and its slot."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._set = False

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        if not self._set:
            self._set = True
            os.write(self._w, b"x")

    def waiter(self, fd: int, events: int) -> Callable[[], bool]:
        """A wait until `fd` is ready for `events` (or in error: the call made next says which), False
        once set; its poll set made once, for every read or write of the fd that follows."""
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._r, select.POLLIN)

        def wait() -> bool:
            while True:
                ready = dict(poller.poll())
                if self._r in ready:
                    return False
                if fd in ready:
                    return True

        return wait

    def __del__(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Pump(threading.Thread):
    """Read a local fd (opened lazily by `opener`) and send it as DATA on channel ch, then EOF."""

    def __init__(
        self,
        link: Link,
        ch: int,
        opener: Callable[[], int],
        on_done: Callable[[int], None] = _nothing,
        close_fd: bool = True,
        stop: Stop | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"pump-{ch}")
        self.link, self.ch, self.opener, self.on_done = link, ch, opener, on_done
        self.window = Window()
        self.close_fd = close_fd
        self.stop = stop  # None: reads block until the fd has data or its end (the client's own fds)
        self.fd = -1

    def run(self) -> None:
        sent = 0
        try:
            self.fd = self.opener()
            readable = self.stop.waiter(self.fd, select.POLLIN) if self.stop is not None else None
            while True:
                n = self.window.take(CHUNK)
                if n == 0:
                    break
                if readable is not None and not readable():
                    break
                try:
                    data = os.read(self.fd, n)
                except BlockingIOError:  # a socket its sink made non-blocking, read by nothing yet
                    self.window.grant(n)
                    continue
                if not data:
                    break
                if len(data) < n:  # give back what this read did not use
                    self.window.grant(n - len(data))
                self.link.data(self.ch, data)
                sent += len(data)
            log.log(DEBUG2, "channel %d: %d bytes sent, then EOF", self.ch, sent)
            self.link.eof(self.ch)
        except Exception as e:  # a local I/O error or the flow going down ends this channel only
            log.debug("channel %d pump ended: %s", self.ch, e)
            with contextlib.suppress(Exception):
                self.link.eof(self.ch)
        finally:
            if self.close_fd and self.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
            self.on_done(self.ch)


class Budget(Protocol):
    """What a sink's buffered bytes count against (limits.Holding: the session's key's budget)."""

    def take(self, n: int) -> None: ...

    def give(self, n: int) -> None: ...


class Sink(threading.Thread):
    """Write DATA of channel ch to a local fd (opened lazily), granting window as it goes. The core
    has checked the data against the window, so what waits here is at most one window; with a
    budget, the bytes waiting count against it too (put() raises what its take() raises). They wait
    in one buffer, not one object per DATA: a peer's tiny DATAs cost what they carry."""

    def __init__(
        self,
        link: Link,
        ch: int,
        opener: Callable[[], int],
        on_done: Callable[[int], None] = _nothing,
        close_fd: bool = True,
        on_eof: Callable[[int], None] | None = None,
        stop: Stop | None = None,
        budget: Budget | None = None,
        on_broken: Callable[[int], None] = _nothing,
    ) -> None:
        super().__init__(daemon=True, name=f"sink-{ch}")
        self.on_broken = on_broken  # the reader of the local pipe went away (EPIPE)
        self.link, self.ch, self.opener, self.on_done = link, ch, opener, on_done
        self.close_fd = close_fd
        self.on_eof = on_eof
        self.stop = stop  # with a Stop, the fd is made non-blocking: it must be this session's own
        self.budget = budget
        self.fd = -1  # -1 while the opener waits (a named pipe without a reader yet)
        self._buf = bytearray()
        self._finished = False
        self._cond = threading.Condition()

    def put(self, data: bytes) -> None:
        """From the receiving thread: never blocks."""
        if self.budget is not None:
            self.budget.take(len(data))
        with self._cond:
            self._buf += data
            self._cond.notify()

    def finish(self) -> None:
        """No more data: what waits is written, then the sink ends."""
        with self._cond:
            self._finished = True
            self._cond.notify()

    def waiting(self) -> int:
        """Bytes received and not yet taken to be written."""
        with self._cond:
            return len(self._buf)

    def _next(self) -> bytes | None:
        """Up to CHUNK bytes to write next (taken out: the buffer grows meanwhile), None at the end."""
        with self._cond:
            while not self._buf and not self._finished:
                self._cond.wait()
            if not self._buf:
                return None
            data = bytes(self._buf[:CHUNK])
            del self._buf[:CHUNK]  # from the front: CPython's bytearray moves its start, copies nothing
            return data

    def run(self) -> None:
        fd, broken, ungranted, got = -1, False, 0, 0
        writable: Callable[[], bool] | None = None
        try:
            fd = self.fd = self.opener()
            if self.stop is not None:
                os.set_blocking(fd, False)
                writable = self.stop.waiter(fd, select.POLLOUT)
        except OSError as e:
            log.info("channel %d: %s", self.ch, e)
            broken = True
        while True:
            data = self._next()
            if data is None:
                log.log(DEBUG2, "channel %d: %d bytes received, then EOF", self.ch, got)
                if ungranted:
                    with contextlib.suppress(Exception):
                        self.link.grant(self.ch, ungranted)
                break
            if not broken:
                try:
                    view = memoryview(data)
                    while view:
                        try:
                            view = view[os.write(fd, view) :]
                        except BlockingIOError:
                            assert writable is not None
                            if not writable():
                                raise OSError("the session ended with data not yet taken") from None
                except OSError as e:  # the reader went away: drop the rest, keep the window moving
                    log.debug("channel %d sink: %s", self.ch, e)
                    broken = True
                    if e.errno == errno.EPIPE:  # a pipe's reader, not a full disk or a closed fd
                        with contextlib.suppress(Exception):
                            self.on_broken(self.ch)
            if self.budget is not None:
                self.budget.give(len(data))
            ungranted += len(data)
            got += len(data)
            # In batches: the peer still has three quarters of its window, and stalls only when the
            # whole window waits here or is written out ungranted (then this grants it).
            if ungranted >= GRANT_BATCH:
                with contextlib.suppress(Exception):
                    self.link.grant(self.ch, ungranted)
                ungranted = 0
        if self.on_eof is not None and fd >= 0:
            with contextlib.suppress(OSError):
                self.on_eof(fd)
        if self.close_fd and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.on_done(self.ch)


class Ends:
    """The local ends of a session's channels, by channel: what the peer's DATA, EOF and WINDOW
    (checked by the core) are for."""

    def __init__(self, stop: Stop | None = None) -> None:
        self.pumps: dict[int, Pump] = {}
        self.sinks: dict[int, Sink] = {}
        self.stop = stop  # set by close(): what the pumps and sinks made with it wait on

    def take(self, msg: Data | Eof | Unread | Grant) -> None:
        match msg:
            case Unread(ch):  # the peer reads no more: the pump stops, closing what its writer writes to
                pump = self.pumps.get(ch)
                if pump is not None:
                    pump.window.close()
            case Data(ch, data):
                self.sinks[ch].put(data)
            case Eof(ch):
                self.sinks[ch].finish()
            case Grant(ch, n):
                pump = self.pumps.get(ch)
                if pump is not None:  # else the channel ended: a late grant
                    pump.window.grant(n)

    def start(self) -> None:
        for t in [*self.sinks.values(), *self.pumps.values()]:
            if t.ident is None:
                t.start()

    def forget(self, ch: int) -> None:
        """A socket connection is over both ways: its threads are done (see Channels.remove)."""
        self.sinks.pop(ch, None)
        self.pumps.pop(ch, None)

    def close(self) -> None:
        """Stop every pump waiting for window and every sink waiting for data."""
        for pump in list(self.pumps.values()):  # copies: connections forget themselves meanwhile
            pump.window.close()
        for sink in list(self.sinks.values()):
            sink.finish()
        if self.stop is not None:
            self.stop.set()


def duplex(
    link: Link,
    ch: int,
    sock: socket.socket,
    on_close: Callable[[], None] = lambda: None,
    stop: Stop | None = None,
    budget: Budget | None = None,
) -> tuple[Sink, Pump]:
    """A socket connection as one channel both ways: the peer's EOF half-closes it, and the socket
    closes (then on_close, which forgets the channel) when both directions are done."""
    fd = sock.detach()
    users = [2]
    lock = threading.Lock()

    def release(_ch: int) -> None:
        with lock:
            users[0] -= 1
            if users[0]:
                return
        with contextlib.suppress(OSError):
            os.close(fd)
        on_close()

    def half_close(f: int) -> None:
        with socket.socket(fileno=os.dup(f)) as s:
            s.shutdown(socket.SHUT_WR)

    return (
        Sink(link, ch, lambda: fd, release, close_fd=False, on_eof=half_close, stop=stop, budget=budget),
        Pump(link, ch, lambda: fd, release, close_fd=False, stop=stop),
    )
