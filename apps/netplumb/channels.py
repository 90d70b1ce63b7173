"""Channels over a session: pumps (local fd -> DATA packets, within the peer's window) and sinks
(DATA -> local fd, granting window as they write). Threads; the session is shared under a lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable

from apps.netplumb import wire
from apps.netplumb.session import Session
from apps.netplumb.wire import Fields
from flowlib import Flow

log = logging.getLogger(__name__)

CHUNK = 32 * 1024  # data per packet: base64 of it plus headers stays under one 64 KiB SDU
WINDOW = 1024 * 1024  # what a receiver takes per channel before it has written any of it out
GRANT_BATCH = WINDOW // 4  # window adjustments are sent per this many bytes written (or when idle)


class Link:
    """The flow and its session, shared by the threads of one connection."""

    def __init__(self, flow: Flow, session: Session) -> None:
        self.flow = flow
        self.session = session
        self._lock = threading.Lock()

    def send(self, ptype: int, fields: Fields) -> None:
        # Sequence numbers and nonces are taken in the order packets go out, hence one lock.
        with self._lock:
            self.flow.write(self.session.send(ptype, fields))

    def send_error(self, message: str) -> None:
        """ERROR ends the session: the peer learns why."""
        with self._lock:
            self.flow.write(self.session.error(message))

    def flush(self) -> None:
        with self._lock:
            for data in self.session.data_to_send():
                self.flow.write(data)


class Window:
    """Bytes the peer still takes on one channel; a pump waits here."""

    def __init__(self, size: int = WINDOW) -> None:
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


class Pump(threading.Thread):
    """Read a local fd (opened lazily by `opener`) and send it as DATA on channel ch, then EOF."""

    def __init__(self, link: Link, ch: int, opener: Callable[[], int], on_done: Callable[[int], None],
                 close_fd: bool = True) -> None:
        super().__init__(daemon=True, name=f"pump-{ch}")
        self.link, self.ch, self.opener, self.on_done = link, ch, opener, on_done
        self.window = Window()
        self.close_fd = close_fd
        self.fd = -1

    def run(self) -> None:
        try:
            self.fd = self.opener()
            while True:
                n = self.window.take(CHUNK)
                if n == 0:
                    break
                data = os.read(self.fd, n)
                if not data:
                    break
                if len(data) < n:  # give back what this read did not use
                    self.window.grant(n - len(data))
                self.link.send(wire.DATA, Fields.of(ch=self.ch, data=wire.b64(data)))
            self.link.send(wire.EOF, Fields.of(ch=self.ch))
        except Exception as e:  # a local I/O error or the flow going down ends this channel only
            log.debug("channel %d pump ended: %s", self.ch, e)
            with contextlib.suppress(Exception):
                self.link.send(wire.EOF, Fields.of(ch=self.ch))
        finally:
            if self.close_fd and self.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
            self.on_done(self.ch)


class Sink(threading.Thread):
    """Write DATA of channel ch to a local fd (opened lazily), granting window as it goes."""

    def __init__(self, link: Link, ch: int, opener: Callable[[], int], on_done: Callable[[int], None],
                 close_fd: bool = True, on_eof: Callable[[int], None] | None = None) -> None:
        super().__init__(daemon=True, name=f"sink-{ch}")
        self.link, self.ch, self.opener, self.on_done = link, ch, opener, on_done
        self.close_fd = close_fd
        self.on_eof = on_eof
        self.fd = -1  # -1 while the opener waits (a named pipe without a reader yet)
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._owed = 0  # bytes the peer sent that we have not written out yet
        self._finished = False
        self._lock = threading.Lock()

    def put(self, data: bytes) -> None:
        """From the receiving thread: never blocks; the window bounds what can pile up."""
        with self._lock:
            if self._finished:
                raise wire.WireError(f"data on channel {self.ch} after its EOF")
            self._owed += len(data)
            if self._owed > WINDOW:
                raise wire.WireError(f"the peer overran the window of channel {self.ch}")
        self._q.put(data)

    def finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._q.put(None)

    def run(self) -> None:
        fd, broken, ungranted = -1, False, 0
        try:
            fd = self.fd = self.opener()
        except OSError as e:
            log.warning("channel %d: %s", self.ch, e)
            broken = True
        while True:
            data = self._q.get()
            if data is None:
                if ungranted:
                    with contextlib.suppress(Exception):
                        self.link.send(wire.WINDOW, Fields.of(ch=self.ch, n=ungranted))
                break
            if not broken:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as e:  # the reader went away: drop the rest, keep the window moving
                    log.debug("channel %d sink: %s", self.ch, e)
                    broken = True
            with self._lock:
                self._owed -= len(data)
            ungranted += len(data)
            # Grant in batches (fewer packets), but at once when we caught up, so the peer never stalls.
            if ungranted >= GRANT_BATCH or self._q.empty():
                with contextlib.suppress(Exception):
                    self.link.send(wire.WINDOW, Fields.of(ch=self.ch, n=ungranted))
                ungranted = 0
        if self.on_eof is not None and fd >= 0:
            with contextlib.suppress(OSError):
                self.on_eof(fd)
        if self.close_fd and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.on_done(self.ch)
