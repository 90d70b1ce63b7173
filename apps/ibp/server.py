"""The depot's I/O: one thread per flow or TCP connection speaking IBP to the DepotCore, the
expiry timer, and depot-to-depot copies where the depot itself becomes a client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from apps.ibp import wire as w
from apps.ibp.capability import READ, WRITE
from apps.ibp.client import Connection, parse_cap
from apps.ibp.depot import Allocation, DepotCore
from apps.ibp.stream import ByteStream, FlowStream, StreamClosed, StreamTimeout, TcpStream
from flowlib import FlowError, flow_accept
from flowlib.irm import IrmClient

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256   # concurrent flows and TCP connections; more are closed at once
IDLE_TIMEOUT = 300.0    # a connection silent between requests for this long is closed
EXPIRY_TICK = 1.0       # seconds between expiry sweeps
READ_BLOCK = 1024 * 1024
DEFAULT_PORT = 6714
_REASON = re.compile(r"[^\x21-\x7e]+")


def reason_fields(reason: str) -> str:
    """A reason as printable words on the status line (after the status, which clients parse)."""
    return _REASON.sub(" ", reason).strip()[:200]


@dataclass
class DepotServer:
    core: DepotCore
    name: str
    clock: Callable[[], float] = time.time
    irm: IrmClient | None = None
    encrypt: bool = False  # copies to other depots over encrypted flows
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(MAX_CONNECTIONS))
    _alloc_locks: dict[str, threading.Lock] = field(default_factory=dict)

    def alloc_lock(self, a: Allocation) -> threading.Lock:
        with self.lock:
            return self._alloc_locks.setdefault(a.fid, threading.Lock())

    # -- per connection --

    def start(self, stream: ByteStream, depot_addr: str) -> None:
        """Serve `stream` on a thread of its own, if a connection slot is free."""
        if not self.slots.acquire(blocking=False):
            log.warning("%d connections already: one more refused", MAX_CONNECTIONS)
            with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                stream.send(w.format_reply(w.IBP_E_RSRC_UNAVAIL, "too many connections"))
            stream.close()
            return

        def run() -> None:
            try:
                self.serve(stream, depot_addr)
            finally:
                self.slots.release()

        threading.Thread(target=run, daemon=True).start()

    def serve(self, stream: ByteStream, depot_addr: str) -> None:
        """Answer requests on `stream` until it closes, idles out or breaks the protocol."""
        with stream:
            while True:
                try:
                    line = stream.readline(w.MAX_LINE, IDLE_TIMEOUT)
                except (StreamClosed, StreamTimeout, FlowError, OSError):
                    return
                except ValueError:
                    with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                        stream.send(w.format_reply(w.IBP_E_BAD_FORMAT, "request line too long"))
                    return
                try:
                    if not self.handle(stream, line, depot_addr):
                        return
                except (StreamClosed, StreamTimeout, FlowError, OSError) as e:
                    log.info("connection ended mid-request: %s", e)
                    return
                except Exception:  # a bug must cost one connection, never the depot
                    log.exception("internal error serving %r", line[:80])
                    with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                        stream.send(w.format_reply(w.IBP_E_INTERNAL, "internal error"))
                    return

    def handle(self, stream: ByteStream, line: bytes, depot_addr: str) -> bool:
        """One request; False when the stream can no longer be trusted (and is to be closed)."""
        try:
            req = w.parse_request(line)
        except w.BadRequest as e:
            with self.lock:
                self.core.refused[e.status] += 1
            stream.send(w.format_reply(e.status, reason_fields(e.reason)))
            return True
        try:
            return self._dispatch(stream, req, depot_addr)
        except w.IbpError as e:
            log.debug("refused %s: %s", type(req).__name__, e)
            stream.send(w.format_reply(e.status, reason_fields(e.reason)))
            # Some IBP clients send a STORE's data without waiting for our first line: after a
            # refusal those bytes would be read as requests, so the connection ends here.
            return not isinstance(req, (w.Store, w.Write))

    def _dispatch(self, stream: ByteStream, req: w.Request, depot_addr: str) -> bool:
        now = self.clock()
        core = self.core
        if isinstance(req, w.Allocate):
            with self.lock:
                a = core.allocate(req, now)
                caps = core.caps(a, depot_addr)
            stream.send(w.format_reply(w.IBP_OK, *caps))
        elif isinstance(req, (w.Store, w.Write)):
            return self._store(stream, req, now)
        elif isinstance(req, w.Load):
            with self.lock:
                a = core.authorize(req.key, req.typekey, READ, now)
                n = core.check_read(a, req.offset, req.length)
            chunks = self._read(a, req.offset, n)
            first = next(chunks, b"")  # the file opens (or fails) while a status can still say so
            stream.send(w.format_reply(w.IBP_OK, n))
            try:
                if first:
                    stream.send(first)
                for chunk in chunks:
                    stream.send(chunk)
            except w.IbpError as e:  # after the header no status can follow: end the stream
                log.error("load failed mid-stream: %s", e)
                return False
        elif isinstance(req, w.Send):
            n = self._copy(req.key, req.typekey, req.offset, req.length, [req.dest_cap], req.dest_timeout)[0][0]
            stream.send(w.format_reply(w.IBP_OK, n))
        elif isinstance(req, w.Mcopy):
            results = self._copy(req.key, req.typekey, req.offset, req.length, list(req.dest_caps), req.timeout)
            stream.send(w.format_reply(w.IBP_OK, results[0][0], *(s for _, s in results)))
        elif isinstance(req, w.Manage):
            with self.lock:
                fields = core.manage(req, now)
            stream.send(w.format_reply(w.IBP_OK, *fields))
        elif req.subcmd == w.IBP_ST_INQ:
            with self.lock:
                info = {**core.status(), "name": depot_addr}
            text = "".join(f"{k} {v}\n" for k, v in info.items()).encode("ascii", "replace")
            stream.send(w.format_reply(w.IBP_OK, len(text)) + text)
        else:
            with self.lock:
                core.change(req.password, req.capacity, req.max_duration)
            stream.send(w.format_reply(w.IBP_OK))
        return True

    def _store(self, stream: ByteStream, req: w.Store | w.Write, now: float) -> bool:
        with self.lock:
            a = self.core.authorize(req.key, req.typekey, WRITE, now)
        lock = self.alloc_lock(a)
        # Two writers of one allocation take turns; a writer that waits too long gives up (the seed's
        # server-side timeout), rather than hang.
        if not lock.acquire(timeout=max(1, req.timeout)):
            raise w.IbpError(w.IBP_E_SERVER_TIMEOUT, "another store to this allocation is still running")
        try:
            with self.lock:
                start = self.core.check_write(a, req.offset if isinstance(req, w.Write) else None, req.length)
            stream.send(w.format_reply(w.IBP_OK))
            try:
                self._receive(stream, a, start, req.length, req.timeout)
            except (StreamTimeout, StreamClosed):
                log.info("store of %d bytes cut short; nothing acknowledged", req.length)
                return False
            with self.lock:
                if self.core.allocs.get(a.fid) is not a:
                    raise w.IbpError(w.IBP_E_CAP_NOT_FOUND, "the allocation went away during the store")
                self.core.commit(a, start + req.length)
            stream.send(w.format_reply(w.IBP_OK, req.length))
            return True
        finally:
            lock.release()

    def _receive(self, stream: ByteStream, a: Allocation, start: int, length: int, timeout: int) -> None:
        try:
            with self.core.open_data(a) as f:
                f.seek(start)
                for chunk in stream.read_chunks(length, max(1, timeout)):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # e.g. the disk is full: nothing of this store is acknowledged
            if isinstance(e, (StreamClosed, StreamTimeout)):
                raise
            log.error("store failed on disk: %s", e)
            raise w.IbpError(w.IBP_E_FILE_WRITE, f"the depot could not write the data: {e.strerror}") from None

    def _read(self, a: Allocation, offset: int, n: int) -> Iterator[bytes]:
        try:
            f = self.core.open_data(a)
        except OSError as e:  # freed or expired since it was authorized
            raise w.IbpError(w.IBP_E_CAP_NOT_FOUND, f"the allocation went away: {e.strerror}") from None
        with f:
            f.seek(offset)
            left = n
            while left > 0:
                data = f.read(min(READ_BLOCK, left))
                if not data:
                    raise w.IbpError(w.IBP_E_INTERNAL, "data file shorter than its record")
                left -= len(data)
                yield data

    def _copy(self, key: str, typekey: str, offset: int, length: int, dests: list[str],
              timeout: int) -> list[tuple[int, int]]:
        """Push the bytes to each destination over our own flows: [(length, status)] per target."""
        now = self.clock()
        with self.lock:
            a = self.core.authorize(key, typekey, READ, now)
            n = self.core.check_read(a, offset, length)
        caps = [parse_cap(d, WRITE) for d in dests]
        results = []
        for cap in caps:
            try:
                with Connection(cap.depot, timeout=max(1, timeout), irm=self.irm, encrypt=self.encrypt) as conn:
                    conn.store(cap, self._read(a, offset, n), n)
                results.append((n, w.IBP_OK))
            except w.IbpError as e:
                log.info("copy to %s failed: %s", cap.depot, e)
                if len(caps) == 1:
                    raise w.IbpError(e.status, f"copy to {cap.depot}: {e.reason}") from None
                results.append((n, e.status))
        return results

    # -- expiry --

    def expiry_loop(self, stop: threading.Event) -> None:
        while not stop.wait(EXPIRY_TICK):
            with self.lock:
                self.core.expire(self.clock())
                for fid, lock in list(self._alloc_locks.items()):  # forget locks of freed allocations
                    if fid not in self.core.allocs and not lock.locked():
                        del self._alloc_locks[fid]


def parse_listen(text: str) -> tuple[str, int]:
    """'tcp:PORT' or 'tcp:HOST:PORT' (HOST defaults to loopback)."""
    m = re.fullmatch(r"tcp:(?:(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):)?(?P<port>\d{1,5})", text)
    if m is None or not 0 <= int(m["port"]) < 65536:
        raise ValueError(f"bad --listen {text!r}: expected tcp:PORT or tcp:HOST:PORT")
    return (m["host"] or "127.0.0.1").strip("[]"), int(m["port"])


def tcp_listener(server: DepotServer, host: str, port: int) -> tuple[socket.socket, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    bound = sock.getsockname()[1]
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return sock, f"[{shown}]:{bound}" if ":" in shown else f"{shown}:{bound}"


def tcp_loop(server: DepotServer, sock: socket.socket, addr: str) -> None:
    while True:
        try:
            conn, peer = sock.accept()
        except OSError:
            return
        log.debug("tcp connection from %s", peer)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.start(TcpStream(conn), addr)


def flow_loop(server: DepotServer) -> None:
    while True:
        flow = flow_accept(irm=server.irm)
        server.start(FlowStream(flow), server.name)


def install_stop_signals() -> None:
    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
