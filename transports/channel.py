"""Request/reply channels over one SOCK_SEQPACKET control socket, in both directions.

`AsyncChannel` serves the daemons (asyncio, add_reader, no per-request task
unless a handler awaits); `SyncChannel` serves applications (a reader thread).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from transports.ratelog import RateLog
from transports.unix import PEEK_NOW, close_fds, close_own, recv_frame, send_frame
from transports.wire import HEADER, ID_MASK, NOTICE, REPLY, Codec, Error, Message, WireError

if TYPE_CHECKING:
    import asyncio  # imported when an AsyncChannel is made: applications (SyncChannel) start 35 ms sooner

log = logging.getLogger(__name__)
FAILURES = RateLog(rate=1.0, burst=10, logger=log)  # handlers' unexpected exceptions, with their tracebacks
# What peers do wrong (bad frames, messages, unread replies): per connection is no bound, as a peer
# may connect again and again, so these lines have one rate for all connections together.
MISCONDUCT = RateLog(logger=log)

Reply = tuple[Message, list[int]]
ERROR_TEXT = 500  # characters of an error's text sent or logged: errors may quote what a peer sent
MALFORMED_LOGGED = 3  # malformed messages logged per connection; the rest are only answered
FAREWELL_WAIT = 1.0  # seconds a failed send waits for the reader to see why the peer closed
# A handler takes a request and its fds (which it then owns) and returns the
# reply and fds to pass; the channel closes those fds once sent.
AsyncHandler = Callable[[Message, list[int]], Awaitable[tuple[Message, Sequence[int]]]]


class RemoteError(Exception):
    """The peer answered a request with an Error reply."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class ChannelClosed(ConnectionError):
    """The control socket closed before a reply arrived."""


class HandlerError(Exception):
    """Raised by a handler to answer its request with an Error reply."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def _abandon(coro: Coroutine[Any, Any, None], _task: object) -> None:
    """A request's coroutine whose task was cancelled before its first step (the connection closed
    behind it) still waits where it began: it is cancelled there, so that it lets go of its fds."""
    import asyncio

    if getattr(coro, "cr_frame", None) is None:  # it ended
        return
    try:
        coro.throw(asyncio.CancelledError())
    except (StopIteration, asyncio.CancelledError):
        return
    coro.close()  # it waits again: it may not


async def _resume(coro: Coroutine[Any, Any, None], waits_on: Any) -> None:
    """The rest of a coroutine begun outside any task (AsyncChannel._start), which yielded
    `waits_on`: a future it awaits (None: a bare yield). Cancelling this task cancels that future,
    so the coroutine sees CancelledError where it waits, as in a task of its own."""
    import asyncio

    while True:
        try:
            if waits_on is None:
                await asyncio.sleep(0)
            elif not waits_on.done():
                waits_on._asyncio_future_blocking = False
                await asyncio.wait((waits_on,))
        except asyncio.CancelledError:
            if waits_on is None:
                try:
                    waits_on = coro.throw(asyncio.CancelledError())
                except StopIteration:
                    return
                continue
            waits_on.cancel()
        try:
            waits_on = coro.send(None)
        except StopIteration:
            return


def _unwrap(frame_msg: Message, fds: list[int]) -> Reply:
    if isinstance(frame_msg, Error):
        close_fds(fds)
        raise RemoteError(frame_msg.code, frame_msg.text)
    return frame_msg, fds


class AsyncChannel:
    """Both ends may send requests; replies are matched by request id."""

    def __init__(
        self,
        sock: socket.socket,
        codec: Codec,
        handler: AsyncHandler,
        *,
        name: str = "",
        on_close: Callable[[AsyncChannel], None] | None = None,
        max_requests: int | None = None,
        max_queued: int | None = None,
    ) -> None:
        """max_requests: requests served at once, more are answered EBUSY at once; max_queued: bytes
        sent but not yet taken by the peer, above which its requests are not read until it catches
        up (twice that, and the connection is dropped)."""
        import asyncio

        sock.setblocking(False)
        self.sock = sock
        self.name = name
        self._codec = codec
        self._handler = handler
        self._on_close = on_close
        self._max_requests = max_requests
        self._max_queued = max_queued
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._outq: deque[tuple[bytes, list[int]]] = deque()
        self._queued = 0  # bytes in _outq
        self._malformed = 0  # messages that did not decode
        self._reading = True
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def unlimit(self) -> None:
        """A trusted peer (an IPCP of ours): serve it without per-connection limits."""
        self._max_requests = self._max_queued = None
        if not self._reading and not self.closed:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reading = True

    @property
    def congested(self) -> bool:
        """The peer is not taking what we send: more would only queue up here."""
        return self._max_queued is not None and self._queued > self._max_queued

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def request(self, msg: Message, fds: Sequence[int] = (), timeout: float | None = None) -> Reply:
        """Send a request and wait for its reply; fds sent are not closed here."""
        if self.closed:
            raise ChannelClosed(f"{self.name}: channel closed")
        req_id = next(self._ids) & ID_MASK or next(self._ids)
        import asyncio

        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._pending[req_id] = fut
        try:
            self._send(self._codec.encode(msg, req_id), fds)
            msg_in, fds_in = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(req_id, None)
        return _unwrap(msg_in, fds_in)

    def notify(self, msg: Message, fds: Sequence[int] = ()) -> None:
        if not self.closed:
            self._send(self._codec.encode(msg, NOTICE), fds)

    def close(self) -> None:
        if self.closed:
            return
        self._closed.set()
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
        if self._outq:
            self._loop.remove_writer(self.sock.fileno())
        for _, fds in self._outq:
            close_fds(fds)
        self._outq.clear()
        self._queued = 0
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed(f"{self.name}: channel closed"))
        self.sock.close()
        for task in list(self._tasks):
            task.cancel()
        if self._on_close:
            self._on_close(self)

    # -- internals -------------------------------------------------------

    def _send(self, frame: bytes, fds: Sequence[int]) -> None:
        if not self._outq:
            try:
                send_frame(self.sock, frame, fds)
                return
            except BlockingIOError:
                self._loop.add_writer(self.sock.fileno(), self._on_writable)
            except OSError as e:
                log.debug("%s: send failed: %s", self.name, e)
                self._loop.call_soon(self.close)
                return
        if self._max_queued is not None and self._queued > 2 * self._max_queued:
            MISCONDUCT.log("%s: the peer has left %d bytes unread; dropping the connection", self.name, self._queued)
            self._loop.call_soon(self.close)
            return
        # Queued frames keep their own copies of the fds: the caller may close its own.
        self._outq.append((frame, [os.dup(fd) for fd in fds]))
        self._queued += len(frame)
        if self.congested and self._reading:  # read no more requests until the peer catches up
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _on_writable(self) -> None:
        while self._outq:
            frame, fds = self._outq[0]
            try:
                send_frame(self.sock, frame, fds)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self._outq.popleft()
            self._queued -= len(frame)
            close_fds(fds)
            if not self._reading and self._max_queued is not None and self._queued <= self._max_queued // 2:
                self._loop.add_reader(self.sock.fileno(), self._on_readable)
                self._reading = True
        self._loop.remove_writer(self.sock.fileno())

    def _on_readable(self) -> None:
        for _ in range(64):  # bounded, so one chatty peer cannot starve the loop
            if not self._reading or self.closed:
                return
            try:
                data, fds = recv_frame(self.sock)
            except (BlockingIOError, InterruptedError):
                return
            except WireError as e:
                MISCONDUCT.log("%s: dropping connection: %s", self.name, e)
                self.close()
                return
            except OSError as e:
                log.debug("%s: recv failed: %s", self.name, e)
                self.close()
                return
            if not data:
                self.close()
                return
            try:
                frame = self._codec.decode(data)
            except WireError as e:
                close_fds(fds)
                self._malformed += 1
                if self._malformed <= MALFORMED_LOGGED:  # then counted only: a peer cannot fill the log
                    MISCONDUCT.log("%s: malformed message: %s", self.name, str(e)[:ERROR_TEXT])
                self._reply_error(data, "EPROTO", f"malformed message: {e}")
                continue
            if frame.req_id & REPLY:
                fut = self._pending.get(frame.req_id & ID_MASK)
                if fut is not None and not fut.done():
                    fut.set_result((frame.msg, fds))
                else:
                    close_fds(fds)  # a late reply to a request that timed out or was dropped
            elif self._max_requests is not None and len(self._tasks) >= self._max_requests:
                close_fds(fds)
                self._reply_error(
                    data,
                    "EBUSY",
                    f"{self._max_requests} requests are being served on this "
                    "connection already; wait for their replies",
                )
            else:
                self._start(self._serve(frame.req_id, frame.msg, fds))

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        """Serve a request at once, up to its first wait: most handlers never wait (a notice, a
        lookup) and need no task, nor a turn of the loop before their reply leaves. One that waits
        goes on as a task, which the channel's close cancels."""
        try:
            waits_on = coro.send(None)
        except StopIteration:
            return
        task = self._loop.create_task(_resume(coro, waits_on))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(functools.partial(_abandon, coro))

    def _reply_error(self, data: bytes, code: str, text: str) -> None:
        # Answer with the request id if the header was readable, so the peer is not left waiting.
        if len(data) >= HEADER.size:
            req_id = HEADER.unpack_from(data)[3]
            if req_id and not req_id & REPLY:
                self._send(self._codec.encode(Error(code, text[:ERROR_TEXT]), req_id | REPLY), ())

    async def _serve(self, req_id: int, msg: Message, fds: list[int]) -> None:
        """Answer one request; its fds are the handler's, which closes them."""
        import asyncio

        try:
            reply, out_fds = await self._handler(msg, fds)
        except (HandlerError, RemoteError) as e:
            reply, out_fds = Error(e.code, e.text), ()
        except (ChannelClosed, asyncio.CancelledError):
            return
        except Exception as e:
            # (A bug a client can trigger at will must not let it fill the log with tracebacks.)
            FAILURES.log("%s: handler for %s failed", self.name, type(msg).__name__, level=logging.ERROR, exc_info=True)
            reply, out_fds = Error("EIO", f"internal error: {e}"), ()
        if isinstance(reply, Error):
            reply = Error(reply.code, reply.text[:ERROR_TEXT])  # an error quoting a request stays short
        try:
            if req_id != NOTICE and not self.closed:
                try:
                    frame, sent = self._codec.encode(reply, req_id | REPLY), out_fds
                except WireError as e:  # a reply past what a frame carries: say so, not the stack
                    log.warning("%s: reply to %s not sent: %s", self.name, type(msg).__name__, str(e)[:ERROR_TEXT])
                    frame, sent = self._codec.encode(Error("EIO", "the reply is too large"), req_id | REPLY), ()
                self._send(frame, sent)
        finally:
            close_own(out_fds)  # a handler's reply carries only the daemon's own descriptors


class SyncChannel:
    """A blocking client of an AsyncChannel, safe to share between threads."""

    def __init__(
        self,
        sock: socket.socket,
        codec: Codec,
        on_notice: Callable[[Message, list[int]], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._codec = codec
        self._on_notice = on_notice
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, list[Reply | None]] = {}
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._farewell: Error | None = None  # an Error notice the peer sent before it closed: why
        self._busy = False  # the reader holds a frame it has not handled yet
        self._settling = 0  # threads in settle(), which the reader then wakes after each frame
        self._reader = threading.Thread(target=self._read_loop, name="irm-channel", daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, msg: Message, fds: Sequence[int] = (), timeout: float | None = None) -> Reply:
        with self._lock:
            if self._closed:
                self._raise_farewell()
                raise ChannelClosed("connection to the IRMd is closed")
            req_id = next(self._ids) & ID_MASK or next(self._ids)
            slot: list[Reply | None] = [None]
            self._pending[req_id] = slot
            try:
                send_frame(self.sock, self._codec.encode(msg, req_id), fds)
            except OSError as e:
                del self._pending[req_id]
                self._cond.wait_for(lambda: self._closed, FAREWELL_WAIT)  # it may have said why
                self._raise_farewell()
                raise ChannelClosed(f"connection to the IRMd failed: {e}") from None
            try:
                if not self._cond.wait_for(lambda: slot[0] is not None or self._closed, timeout):
                    raise TimeoutError(f"no reply to {type(msg).__name__} in {timeout} s")
            finally:
                self._pending.pop(req_id, None)
            reply = slot[0]
            if reply is None:
                self._raise_farewell()
                raise ChannelClosed("connection to the IRMd closed")
        return _unwrap(*reply)

    def _raise_farewell(self) -> None:
        if self._farewell is not None:
            raise RemoteError(self._farewell.code, self._farewell.text)

    def notify(self, msg: Message) -> None:
        with self._lock:
            send_frame(self.sock, self._codec.encode(msg, NOTICE))

    def settle(self, timeout: float) -> None:
        """Wait (up to `timeout`) until the reader has handled what the peer sent so far, so that a
        notice the peer sent before some other sign (a flow's end) is known before that sign is acted on.
        The reader marks itself busy before it takes a frame, so asking the socket first and the reader
        second misses no frame in between."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._settling += 1
            try:
                while not self._closed and (_unread(self.sock) or self._busy):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(left)  # the reader wakes us when it has handled a frame
            finally:
                self._settling -= 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=2)
        self.sock.close()

    def _read_loop(self) -> None:
        try:
            resets = 0
            readable = select.poll()
            readable.register(self.sock, select.POLLIN)
            while True:
                readable.poll()
                self._busy = True  # before the frame leaves the socket: settle() asks in that order
                try:
                    data, fds = recv_frame(self.sock)
                except WireError as e:
                    log.warning("IRMd sent a bad frame: %s", e)
                    self._done()
                    continue
                except ConnectionResetError:
                    # The IRMd closed with our request unread: the kernel reports that first, but what
                    # it sent before (why it refused us) is still queued: read on to it.
                    resets += 1
                    if resets > 1:
                        return
                    self._done()
                    continue
                if not data:
                    return
                try:
                    frame = self._codec.decode(data)
                except WireError as e:
                    close_fds(fds)
                    log.warning("IRMd sent a malformed message: %s", e)
                    self._done()
                    continue
                with self._lock:
                    slot = self._pending.get(frame.req_id & ID_MASK) if frame.req_id & REPLY else None
                    if slot is not None:
                        slot[0] = (frame.msg, fds)
                        self._busy = False
                        self._cond.notify_all()
                        continue
                if frame.req_id == NOTICE and isinstance(frame.msg, Error):
                    close_fds(fds)
                    with self._lock:
                        self._farewell = frame.msg  # the peer refuses us, and says why before it closes
                elif frame.req_id == NOTICE and self._on_notice:
                    self._on_notice(frame.msg, fds)
                else:
                    close_fds(fds)
                self._done()
        except OSError:
            return
        finally:
            with self._lock:
                self._closed = True
                self._cond.notify_all()
            if self._on_close:
                self._on_close()

    def _done(self) -> None:
        """The reader handled a frame: wake the threads settling, if any."""
        self._busy = False
        if self._settling:
            with self._lock:
                self._cond.notify_all()


def _unread(sock: socket.socket) -> bool:
    """Whether a frame waits in the socket, unread (its end counts as nothing more to read)."""
    try:
        return bool(sock.recv(1, PEEK_NOW))
    except OSError:
        return False
