"""The process's flow engine: one thread running FRCT and encryption for the flows that
need them, between the IPCP's socket (PDUs) and the application's socket (SDUs).

The application keeps reading and writing a plain socket, so blocking,
timeouts, the event API and asyncio work unchanged on reliable flows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import socket
import sys
import threading
import time
from collections import deque

from flowlib.crypto import PacketCrypto
from flowlib.frct import Frct
from transports.unix import seqpacket_pair

log = logging.getLogger(__name__)

LINGER = 10.0  # how long a closed flow keeps retransmitting what its peer has not acknowledged
BURST = 64
APP_MTU = 65535  # SDUs up to this size are fragmented over the layer by FRCT
DEFAULT_SWITCH, SWITCH = 0.005, 0.0002


@dataclasses.dataclass(eq=False)
class Session:
    outer: socket.socket  # PDUs, to and from the IPCP
    inner: socket.socket  # SDUs, to and from the application
    mtu: int
    frct: Frct | None
    crypto: PacketCrypto | None
    backlog: deque[bytes] = dataclasses.field(default_factory=deque)  # without FRCT: SDUs the app has no room for
    outq: deque[bytes] = dataclasses.field(default_factory=deque)  # PDUs the layer has no room for
    closing: float = 0.0  # when the application let go; 0 while it holds the flow
    gone: bool = False  # the flow ended below us: hand the application what arrived, then EOF
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    mask: int = select.EPOLLIN  # what we wait for on `inner`


class Engine:
    def __init__(self) -> None:
        self.pid = os.getpid()
        if sys.getswitchinterval() == DEFAULT_SWITCH:
            # Every SDU crosses from the application's thread to this one: with the default 5 ms
            # GIL switch interval a busy thread can hold a ready one back that long.
            sys.setswitchinterval(SWITCH)
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._sessions: dict[int, Session] = {}  # by fd, both outer and inner
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="flow-engine", daemon=True)
        self._thread.start()

    def wrap(self, fd: int, mtu: int, frct: Frct | None, crypto: PacketCrypto | None) -> tuple[int, Session]:
        """Take over the IPCP's socket; returns the fd the application uses instead."""
        outer = socket.socket(fileno=fd)
        app, inner = seqpacket_pair()
        for s in (outer, inner):
            s.setblocking(False)
        session = Session(outer, inner, mtu, frct, crypto)
        with self._lock:
            self._sessions[outer.fileno()] = session
            self._sessions[inner.fileno()] = session
            self._epoll.register(outer.fileno(), select.EPOLLIN)
            self._epoll.register(inner.fileno(), select.EPOLLIN)
        self._wake()
        return app.detach(), session

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = self._next_timeout()
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            with self._lock:
                for fd, mask in events:
                    if fd == self._wake_r.fileno():
                        while True:
                            try:
                                self._wake_r.recv(4096)
                            except BlockingIOError:
                                break
                        continue
                    session = self._sessions.get(fd)
                    if session is None:
                        continue
                    if fd == session.outer.fileno():
                        if mask & select.EPOLLOUT:
                            self._drain(session)
                        if mask & ~select.EPOLLOUT:
                            self._from_outer(session, now, hup=bool(mask & (select.EPOLLHUP | select.EPOLLERR)))
                    elif mask & select.EPOLLOUT:
                        self._deliver(session)
                    if fd == session.inner.fileno() and mask & (select.EPOLLIN | select.EPOLLHUP):
                        self._from_app(session, now)
                for session in {id(s): s for s in self._sessions.values()}.values():
                    due = session.frct.next_deadline() if session.frct is not None else None
                    if session.closing or (due is not None and due <= now):
                        self._timers(session, now)

    def _next_timeout(self) -> float:
        deadlines = [1.0]
        now = time.monotonic()
        with self._lock:
            for s in self._sessions.values():
                if s.frct is not None and (d := s.frct.next_deadline()) is not None:
                    deadlines.append(d - now)
                if s.closing:
                    deadlines.append(0.2)
        return max(min(deadlines), 0.0)

    def _from_outer(self, s: Session, now: float, hup: bool) -> None:
        for _ in range(BURST):
            try:
                pdu = s.outer.recv(65536)
            except BlockingIOError:
                if hup:  # torn down: a shut-down datagram socket says EAGAIN, not EOF
                    self._peer_gone(s)
                    return
                break
            except OSError:
                pdu = b""
            if not pdu:  # the flow went down under us
                self._peer_gone(s)
                return
            if s.crypto is not None:
                opened = s.crypto.open(pdu)
                if opened is None:
                    continue  # tampered, replayed or stale: counted in crypto.rejected
                pdu = opened
            if s.frct is None:
                s.backlog.append(pdu)
            else:
                s.frct.receive(pdu, now)
        self._flush(s)
        self._deliver(s)

    def _peer_gone(self, s: Session) -> None:
        """Nothing more will arrive; what did still reaches the application before its EOF."""
        s.gone = True
        self._unwatch(s.outer)
        s.outer.close()
        self._deliver(s)

    def _deliver(self, s: Session) -> None:
        # FRCT's own queue counts against its window, so a slow reader slows the sender down.
        queue = s.backlog if s.frct is None else s.frct.sdus
        while queue:
            try:
                s.inner.send(queue[0])
            except BlockingIOError:
                break
            except OSError:
                queue.clear()
                break
            queue.popleft()
        if s.frct is not None and not s.gone:
            s.frct.taken()
            self._flush(s)
        if s.gone and not queue:
            self._end(s)
            return
        self._interest(s)

    def _from_app(self, s: Session, now: float) -> None:
        for _ in range(BURST):
            if s.frct is not None and not s.frct.can_send():
                break
            try:
                sdu = s.inner.recv(APP_MTU)
            except BlockingIOError:
                break
            except OSError:
                sdu = b""
            if not sdu:  # the application let go: linger until acknowledged
                s.closing = now
                self._unwatch(s.inner)
                break
            if s.frct is None:
                self._send(s, sdu)
            else:
                s.frct.send(sdu, now)
        self._flush(s)
        self._interest(s)

    def _interest(self, s: Session) -> None:
        """Read the app only while the window is open; wait for room when it cannot take SDUs."""
        if s.closing or s.inner.fileno() < 0:
            return
        mask = 0
        if not s.gone and not s.outq and (s.frct is None or s.frct.can_send()):
            mask |= select.EPOLLIN
        if s.backlog or (s.frct is not None and s.frct.sdus):
            mask |= select.EPOLLOUT
        if mask != s.mask:
            s.mask = mask
            with contextlib.suppress(OSError):
                self._epoll.modify(s.inner.fileno(), mask)

    def _send(self, s: Session, pdu: bytes) -> None:
        if s.crypto is not None:
            pdu = s.crypto.seal(pdu)
        self._raw_send(s, pdu)

    def _raw_send(self, s: Session, pdu: bytes) -> None:
        if s.gone:
            return
        if s.outq:
            s.outq.append(pdu)
            return
        try:
            s.outer.send(pdu)
        except BlockingIOError:
            # The layer is full: hold the PDU and stop reading the application until it drains.
            s.outq.append(pdu)
            with contextlib.suppress(OSError):
                self._epoll.modify(s.outer.fileno(), select.EPOLLIN | select.EPOLLOUT)
        except OSError:
            self._end(s)

    def _drain(self, s: Session) -> None:
        while s.outq:
            try:
                s.outer.send(s.outq[0])
            except BlockingIOError:
                return
            except OSError:
                self._end(s)
                return
            s.outq.popleft()
        with contextlib.suppress(OSError):
            self._epoll.modify(s.outer.fileno(), select.EPOLLIN)
        self._interest(s)

    def _flush(self, s: Session) -> None:
        if s.frct is not None:
            while s.frct.pdus:
                self._send(s, s.frct.pdus.popleft())

    def _timers(self, s: Session, now: float) -> None:
        f = s.frct
        if f is not None:
            f.handle_timer(now)
            self._flush(s)
            if f.failed:
                log.warning("flow peer stopped acknowledging; giving up")
                self._end(s)
                return
            self._interest(s)
        if s.closing and (((f is None or f.idle) and not s.outq) or now - s.closing > LINGER):
            self._end(s)

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._sessions.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _end(self, s: Session) -> None:
        for sock in (s.outer, s.inner):
            self._unwatch(sock)
            sock.close()
        s.done.set()


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """The process's engine, started on the first flow that needs it (again in a forked child)."""
    global _engine
    with _engine_lock:
        if _engine is None or _engine.pid != os.getpid():
            _engine = Engine()
        return _engine
