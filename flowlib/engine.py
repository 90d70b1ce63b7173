"""The process's flow engine: FRCT, encryption and CRCs for the flows that need them, on the IPCP's
socket (PDUs), run in the application's threads where they can and in one thread of its own else.

The application's end is a socket, so blocking, timeouts, the event API and asyncio work unchanged.
On a flow without FRCT (CRCs, encryption) SDUs cross it to and from the engine's thread. On an FRCT
flow the application's thread sends on the IPCP's socket itself while the window is open (a
blocking writer waits there for room; a non-blocking one leaves its SDU in its socket for the
engine's thread), takes in-order SDUs straight from FRCT, and when it finds none waits on the IPCP's
socket and reads it; its socket carries a doorbell, one byte while FRCT holds SDUs, so it polls
readable exactly when a read would return one, and the end. The engine's thread runs the timers and
keepalives, and reads the IPCP's socket whenever no application thread does. Packets are built in
C's order: FRCT PCI, then encryption, then the CRC32 trailer. Flows it does not carry (raw ones) it
only watches: arrivals are noticed by an edge-triggered epoll looked at on its timer, never read.
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

from flowlib import crc
from flowlib.alarm import alarm
from flowlib.crypto import PacketCrypto
from flowlib.frct import APP_MTU, DATA, PCI, Frct
from flowlib.liveness import Action, Liveness
from transports.unix import recv_record, seqpacket_pair

log = logging.getLogger(__name__)

# A closed flow retransmits what its peer has not acknowledged until it has (as C's flow_dealloc),
# FRCT gives up (DELT_R), the peer goes silent or the flow goes down; this only bounds the rest.
LINGER = 150.0
HUP_GIVE_UP = 10.0  # an application gone with SDUs the peer's window holds back: how long without room
BURST = 64
MAX_PDU = 65536 + 64  # the largest PDU read from the IPCP: a layer MTU plus encryption and CRC
BACKLOG = 1 << 20  # bytes held for an application that does not read a flow without FRCT; then dropped
BACKLOG_SDUS = 4096  # ... and SDUs: a tiny one costs far more than its bytes
OUTQ = 1024  # PDUs held while the layer has no room; past it (only FRCT's own packets) dropped
# What the IPCP's socket may hold that its peer has not read (the kernel caps it at wmem_max): on a local
# flow, a socket pair, the default 208 KiB is three 64 KiB SDUs, and the writer then waits on each read.
SNDBUF = 1 << 20
DEFAULT_SWITCH, SWITCH = 0.005, 0.0002
# An FRCT reader that read the IPCP's socket itself keeps it while it keeps taking what that brought
# (the doorbell rings meanwhile), reading it again at least every LEASE/2 as it takes, and a writer while
# it writes (ACK_READ_EVERY); unless one reads it again within LEASE, the thread takes the socket back.
LEASE = 0.01
# A writer waiting for room looks again this often: another of the application's threads may read the
# ack that opens the window just before it waits, and time alone reopens one the peer left idle.
WRITE_RECHECK = 0.005
# A writer sending while the window is open reads the IPCP's socket itself every ACK_READ_EVERY SDUs
# (the acks that move the window, what FRCT's timers are due for), and keeps it as a reader does:
# an ack that woke the engine's thread instead would take the lock and the interpreter from it.
ACK_READ_EVERY = 16
# A writer's hold that holds no SDUs lapses this soon after its last read (renewed every ACK_READ_EVERY
# SDUs while it writes): meanwhile a reply only the doorbell would announce (select, asyncio) waits.
WRITER_LEASE = 0.002


@dataclasses.dataclass(eq=False)
class Session:
    outer: socket.socket  # PDUs, to and from the IPCP
    inner: socket.socket  # SDUs, to and from the application
    mtu: int
    frct: Frct | None
    crypto: PacketCrypto | None
    crc: bool = False  # qos ber 0: a CRC32 trailer on every packet
    live: Liveness = dataclasses.field(default_factory=lambda: Liveness(0, 0.0))
    backlog: deque[bytes] = dataclasses.field(default_factory=deque)  # without FRCT: SDUs the app has no room for
    backlog_bytes: int = 0
    outq: deque[bytes] = dataclasses.field(default_factory=deque)  # PDUs the layer has no room for
    closing: float = 0.0  # when the application let go; 0 while it holds the flow
    linger: bool = False  # closing, and FRCT still has data the peer must acknowledge
    gone: bool = False  # the flow ended below us: hand the application what arrived, then EOF
    hup: float = 0.0  # the application closed while the window held SDUs of it back: when last taken
    error: str | None = None  # why the engine ended the flow, for the application's error
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    mask: int = select.EPOLLIN  # what we wait for on `inner`
    rejected: int = 0  # packets whose CRC did not match or that would not open
    queued: int = 0  # FRCT: SDUs the application wrote into the socket that the engine has not taken
    rung: bool = False  # FRCT: the doorbell byte is in the application's socket
    waiting: int = 0  # FRCT: application threads blocked on the IPCP's socket themselves (Engine.wait)
    owned: float = 0.0  # FRCT: when the application, keeping the IPCP's socket, last read it (0: it does not)
    unread: int = 0  # FRCT: SDUs the application's thread sent since it last read the IPCP's socket
    writing: bool = False  # FRCT: the hold (owned) is a writer's, which brought no SDUs (WRITER_LEASE)
    outer_mask: int = select.EPOLLIN  # what the engine's epoll waits for on `outer`


@dataclasses.dataclass(eq=False)
class Watch:
    """A flow the engine does not carry, only keeps alive: the application's own socket."""

    sock: socket.socket
    live: Liveness


class Engine:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self._epoll = select.epoll()
        self._lock = threading.Lock()
        self._sessions: dict[int, Session] = {}  # by fd, both outer and inner
        self._watches: dict[int, Watch] = {}  # by fd
        self._arrivals = select.epoll()  # edge-triggered on watched flows; polled, never waited on
        self._live_due = float("inf")  # when the next keepalive or peer check is due
        self._sleep_until = float("inf")  # when the thread, waiting, looks at its timers next
        self._retired: list[socket.socket] = []  # ended sessions' sockets, for this thread to close
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._alarm = alarm()  # what an application's thread sets, to wake this one later, not now
        if self._alarm is not None:
            self._epoll.register(self._alarm.fd, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="flow-engine", daemon=True)
        self._thread.start()

    def wrap(
        self,
        fd: int,
        mtu: int,
        frct: Frct | None,
        crypto: PacketCrypto | None,
        *,
        with_crc: bool = False,
        live: Liveness | None = None,
    ) -> tuple[int, Session]:
        """Take over the IPCP's socket; returns the fd the application uses instead."""
        if sys.getswitchinterval() == DEFAULT_SWITCH:
            # Every SDU crosses from the application's thread to this one: with the default 5 ms
            # GIL switch interval a busy thread can hold a ready one back that long.
            sys.setswitchinterval(SWITCH)
        outer = socket.socket(fileno=fd)
        with contextlib.suppress(OSError):
            if outer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SNDBUF:
                outer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        app, inner = seqpacket_pair()
        for s in (outer, inner):
            s.setblocking(False)
        session = Session(outer, inner, mtu, frct, crypto, with_crc, live or Liveness(0, 0.0))
        with self._lock:
            self._sessions[outer.fileno()] = session
            self._sessions[inner.fileno()] = session
            self._epoll.register(outer.fileno(), select.EPOLLIN)
            self._epoll.register(inner.fileno(), select.EPOLLIN)
            self._due(session.live)
        self._wake()
        return app.detach(), session

    def watch(self, sock: socket.socket, live: Liveness) -> None:
        """Keep a flow the engine does not carry alive: send its keepalives, notice its arrivals."""
        if not live.timeout:
            return
        with self._lock:
            self._watches[sock.fileno()] = Watch(sock, live)
            self._arrivals.register(sock.fileno(), select.EPOLLIN | select.EPOLLET)
            earlier = self._due(live)
        if earlier:  # else the thread wakes in time anyway (a hop to it costs a flow allocation dear)
            self._wake()

    def unwatch(self, sock: socket.socket) -> None:
        """Before the flow's socket is closed: the engine never touches it again."""
        with self._lock:
            if self._watches.pop(sock.fileno(), None) is not None:
                with contextlib.suppress(OSError):
                    self._arrivals.unregister(sock.fileno())

    # -- an FRCT flow's application thread ------------------------------------

    def send(self, s: Session, sdu: bytes | bytearray | memoryview, may_wait: bool) -> bool | None:
        """Send an SDU from the application's thread if it may go now. None: the window (or the layer) has
        no room, and a caller that `may_wait` waits for it (Engine.wait) and tries again. False: the
        caller writes the SDU into its socket for the engine's thread, behind any others there (counted
        before it is written); so does a non-blocking writer, whose socket's room is then the flow's."""
        f = s.frct
        assert f is not None
        now = time.monotonic()
        with self._lock:
            if s.queued or self._engine_only(s):
                s.queued += 1  # behind those; or the socket's error says how the flow ended
                return False
            if s.owned and not may_wait and not s.waiting and not f.can_send(now):
                # A writer that will not wait leaves the window to the engine's thread: the acks that
                # reopen it are for that thread to read, and what already came may reopen it now.
                self._pump(s, now)
            if s.outq or not f.can_send(now):
                self._kick(s)  # a closed window may have set a rendez-vous
                if may_wait:
                    return None
                s.queued += 1
                return False
            idle = f.idle
            s.live.sent(now)
            f.send(sdu, now)
            self._flush(s)
            if idle:  # the first in flight sets the retransmission timer; later ones move it no earlier
                self._kick(s)
            s.unread += 1
            if s.unread >= ACK_READ_EVERY and not s.waiting:
                self._pump(s, now, keep=True)
                self._ring(s, now)  # what came besides acks is for the reader
        return True

    def resize(self, s: Session, rcv_buf: int) -> None:
        """FRCT holds at most `rcv_buf` bytes of the flow for the application (Frct.resize); a window
        that grew is advertised now."""
        f = s.frct
        assert f is not None
        with self._lock:
            if self._engine_only(s):
                return
            f.resize(rcv_buf, time.monotonic())
            self._flush(s)
            self._kick(s)

    def abort(self, s: Session) -> None:
        """End the session now, whatever the peer has not acknowledged or the layer has not taken: for a
        peer owed nothing more (one that never authenticated), which could else hold the flow for the
        whole linger by acknowledging nothing or reading nothing."""
        with self._lock:
            if not s.done.is_set():
                self._end(s)

    @staticmethod
    def _engine_only(s: Session) -> bool:
        """The application's thread no longer sends or reads the IPCP's socket: the flow ended, failed
        or is being closed, and the application's socket says so."""
        return bool(s.gone or s.closing or s.hup or s.error or s.done.is_set() or (s.frct and s.frct.error))

    def unqueue(self, s: Session) -> None:
        """The SDU counted by send() did not go into the socket after all."""
        with self._lock:
            s.queued -= 1

    def take(self, s: Session, app: socket.socket) -> bytes | None:
        """The next in-order SDU FRCT holds for the application, or None. The doorbell rings while more
        are held and falls silent with the last, so the application's socket polls readable exactly
        when a read would return one."""
        f = s.frct
        assert f is not None
        with self._lock:
            if not f.sdus and s.owned and s.writing and not s.waiting and not self._engine_only(s):
                self._pump(s, time.monotonic())  # a read that finds nothing hands a writer's hold back
            if not f.sdus:
                return None
            sdu = f.sdus.popleft()
            now = time.monotonic()
            pumped = False
            if not s.gone:
                f.taken(len(sdu), now)
                # The reader keeps the IPCP's socket while reading it brings more, and reads it
                # again when it runs dry, or is LEASE/2 from losing it (else the peer waits for acks).
                if s.owned and (not f.sdus or now >= s.owned + LEASE / 2):
                    self._pump(s, now)
                    pumped = True
            if not f.sdus and s.rung:
                with contextlib.suppress(OSError):
                    app.recv(16, socket.MSG_DONTWAIT)
                s.rung = False
            # Most takes change nothing _ring acts on (the doorbell already rung, nothing to send, no
            # arrivals that could open the window): it is skipped then, a third of a reader's Python.
            if pumped or s.gone or f.pdus or (f.sdus and not s.rung):
                self._ring(s, now)
            return sdu

    def wait(
        self, s: Session, app: socket.socket, timeout: float | None, write: bool = False
    ) -> list[tuple[int, int]] | None:
        """A reader that found nothing, or a writer that found no room, waits here: on the IPCP's socket
        in the application's thread (the engine's leaves it alone meanwhile), so that an arrival (an SDU,
        an ack that opens the window) wakes this thread and not the engine's, and is read here; and on
        the application's socket, whose doorbell the engine's thread may ring (a reader's), or whose
        end it may see. Returns the application's socket's poll events ([]: arrivals or the timeout
        woke it), or None without waiting when the engine alone carries the flow now (it ended, or is
        ending): then the caller polls its socket instead."""
        with self._lock:
            if self._engine_only(s) or (fd := s.outer.fileno()) < 0 or app.fileno() < 0:
                return None
            f = s.frct
            assert f is not None
            if f.sdus if not write else not s.outq and f.can_send(time.monotonic()):
                return []  # it came meanwhile: no need to wait
            poller = select.poll()  # one per wait: threads may wait at once
            if write:
                timeout = WRITE_RECHECK if timeout is None else min(timeout, WRITE_RECHECK)
                poller.register(app, 0)  # its end only: a doorbell is not room
                poller.register(fd, select.POLLIN | (select.POLLOUT if s.outq else 0))
            else:
                poller.register(fd, select.POLLIN)
                poller.register(app, select.POLLIN)
            s.waiting += 1
            self._outer_mask(s)
        ready: list[tuple[int, int]] = []
        try:
            ready = poller.poll(None if timeout is None else timeout * 1000)
        finally:
            with self._lock:
                s.waiting -= 1
                if not s.gone and s.outer.fileno() == fd:
                    now, events = time.monotonic(), next((ev for got, ev in ready if got == fd), 0)
                    if events & select.POLLOUT:
                        self._drain(s)
                    self._pump(s, now, bool(events & (select.POLLHUP | select.POLLERR)))
                    if write:
                        self._ring(s, now)  # what came is for the reader
        return [(got, ev) for got, ev in ready if got != fd]

    def _pump(self, s: Session, now: float, hup: bool = False, keep: bool = False) -> None:
        """An application thread reads the IPCP's socket (what FRCT makes of it waits to be taken), runs
        FRCT's timers that are due, and keeps the socket while that brought SDUs, or while it writes
        (`keep`; see LEASE and ACK_READ_EVERY)."""
        f = s.frct
        assert f is not None
        s.unread = 0
        self._from_outer(s, now, hup, deliver=False)
        if s.gone:
            return
        if (due := f.get_timer()) is not None and due <= now:
            self._timers(s, now)
        s.owned = now if f.sdus or keep else 0.0
        s.writing = keep and not f.sdus
        self._outer_mask(s)
        self._interest(s, now)
        self._kick(s)  # acks may have set a probe or a retransmission
        if s.owned:
            self._wake_by(self._hold_end(s))  # to take the socket back if the reader or writer stops

    @staticmethod
    def _hold_end(s: Session) -> float:
        """When an application thread's hold on the IPCP's socket lapses: LEASE after its last read, or
        WRITER_LEASE for a writer's that brought no SDUs."""
        return s.owned + (WRITER_LEASE if s.writing else LEASE)

    def _reclaim(self, s: Session) -> None:
        """The reader's or writer's hold ends: the IPCP's socket is this thread's to read again."""
        s.owned = 0.0
        s.writing = False
        self._outer_mask(s)

    def _outer_mask(self, s: Session) -> None:
        """What the thread waits for on the IPCP's socket: arrivals unless an application thread does."""
        mask = (0 if s.waiting or s.owned else select.EPOLLIN) | (select.EPOLLOUT if s.outq else 0)
        if mask != s.outer_mask:
            s.outer_mask = mask
            with contextlib.suppress(OSError):
                self._epoll.modify(s.outer.fileno(), mask)

    def heard(self, s: Session) -> None:
        """The application read the doorbell: the next SDUs ring it again."""
        with self._lock:
            s.rung = False

    def _kick(self, s: Session) -> None:
        """What the application just did set FRCT a timer before the thread means to look: have it look
        then (the alarm: one system call, the thread sleeps on till then), or wake it now."""
        if (due := s.frct.get_timer() if s.frct is not None else None) is not None:
            self._wake_by(due)

    def _wake_by(self, due: float) -> None:
        if due < self._sleep_until:
            self._sleep_until = due
            if self._alarm is not None:
                self._alarm.set(due)
            else:
                self._wake()

    def _due(self, live: Liveness) -> bool:
        """Whether `live` is due before the thread planned to look: then it must be woken."""
        if (due := live.get_timer()) is None or due >= self._live_due:
            return False
        self._live_due = due
        return True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    # -- the thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                for sock in self._retired:
                    sock.close()
                self._retired.clear()
            timeout = self._next_timeout()
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            with self._lock:
                for fd, mask in events:
                    if self._alarm is not None and fd == self._alarm.fd:
                        self._alarm.take()
                        continue
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
                        hup = bool(mask & (select.EPOLLHUP | select.EPOLLERR))
                        # An application thread waiting on the socket reads it: this event came before it.
                        if mask & ~select.EPOLLOUT and (hup or not session.waiting):
                            if session.owned:
                                self._reclaim(session)
                            self._from_outer(session, now, hup=hup)
                    elif mask & select.EPOLLOUT:
                        self._deliver(session, now)
                    if fd == session.inner.fileno() and mask & (select.EPOLLIN | select.EPOLLHUP):
                        self._from_app(session, now, hup=bool(mask & select.EPOLLHUP))
                for session in {id(s): s for s in self._sessions.values()}.values():
                    if session.owned and now >= self._hold_end(session):  # the reader or writer stopped
                        self._reclaim(session)
                        if session.waiting or session.gone:
                            self._ring(session, now)
                        else:  # what waits there now (an ack) comes before the timers below
                            self._from_outer(session, now, hup=False)
                    if session.hup and not session.closing:
                        self._held_back(session, now)
                    due = session.frct.get_timer() if session.frct is not None else None
                    if session.closing or (due is not None and due <= now):
                        if session.owned and not session.waiting and not session.gone:
                            # An application's thread keeps the socket: what waits in it (an ack) may
                            # settle the timer, which would else retransmit what arrived.
                            self._from_outer(session, now, hup=False)
                        self._timers(session, now)
                if now >= self._live_due:
                    self._liveness(now)

    def _liveness(self, now: float) -> None:
        """Keepalives due, peers silent too long; arrivals on watched flows first."""
        for fd, _ in self._arrivals.poll(0):
            if (w := self._watches.get(fd)) is not None:
                w.live.received(now)
        due = float("inf")
        for session in {id(s): s for s in self._sessions.values()}.values():
            action = session.live.handle_timer(now)
            if action is Action.KEEPALIVE:
                self._raw_send(session, b"")  # no FRCT, no encryption, no CRC: as C
            elif action is Action.PEER:
                log.info("flow peer silent for %g s: FLOW_PEER", session.live.timeout)
                self._end(session)
                continue
            due = min(due, session.live.get_timer() or due)
        for fd, w in list(self._watches.items()):
            action = w.live.handle_timer(now)
            if action is Action.KEEPALIVE:
                with contextlib.suppress(OSError):  # a full queue: the data in it says we live
                    w.sock.send(b"", socket.MSG_DONTWAIT)
            elif action is Action.PEER:
                log.info("flow peer silent for %g s: FLOW_PEER", w.live.timeout)
                del self._watches[fd]
                with contextlib.suppress(OSError):
                    self._arrivals.unregister(fd)
                    # Reads drain what arrived, then end; writes fail: the application learns at once.
                    w.sock.shutdown(socket.SHUT_RDWR)
                continue
            due = min(due, w.live.get_timer() or due)
        self._live_due = due

    def _next_timeout(self) -> float:
        deadlines = [1.0]
        now = time.monotonic()
        with self._lock:
            deadlines.append(self._live_due - now)
            for s in self._sessions.values():
                if s.frct is not None and (d := s.frct.get_timer()) is not None:
                    deadlines.append(d - now)
                if s.closing or s.hup:
                    deadlines.append(0.2)
                if s.owned:
                    deadlines.append(self._hold_end(s) - now)
            timeout = max(min(deadlines), 0.0)
            self._sleep_until = now + timeout
        return timeout

    def _from_outer(self, s: Session, now: float, hup: bool, deliver: bool = True) -> None:
        for _ in range(BURST):
            try:
                pdu = recv_record(s.outer, MAX_PDU)
            except BlockingIOError:
                if hup:  # torn down: a shut-down datagram socket says EAGAIN, not EOF
                    self._peer_gone(s)
                    return
                break
            except OSError:
                pdu = None
            if pdu is None:  # the flow went down under us
                self._peer_gone(s)
                return
            s.live.received(now)
            if not pdu:
                continue  # a keepalive
            opened = self._open(s, pdu)
            if opened is None:
                s.rejected += 1  # corrupt, tampered, replayed or stale
                continue
            if s.frct is None:
                # An empty SDU is none a flow carries (keepalives come bare, above). Past the backlog the
                # application does not read: a flow without FRCT may drop.
                if not opened or s.backlog_bytes + len(opened) > BACKLOG or len(s.backlog) >= BACKLOG_SDUS:
                    s.rejected += 1
                    continue
                s.backlog.append(opened)
                s.backlog_bytes += len(opened)
            else:
                s.frct.receive(opened, now)
        if s.frct is not None and s.frct.error is not None:
            self._fail(s, s.frct.error)
            return
        self._flush(s)
        if deliver:
            self._deliver(s, now)

    def _open(self, s: Session, pdu: bytes) -> bytes | None:
        """A packet from the peer, CRC checked and stripped, then decrypted; None if it is not good.

        C sends FRCT's own packets (acks, window updates) without a CRC even when ber is 0: a bare
        PCI that fails the CRC check is taken as one of those.
        """
        body = crc.strip(pdu) if s.crc else pdu
        if body is None:
            bare = pdu if s.crypto is None else s.crypto.open(pdu)
            if s.frct is None or bare is None or len(bare) != PCI.size or bare[0] & DATA:
                return None
            return bare
        if s.crypto is not None:
            return s.crypto.open(body)
        return body

    def _peer_gone(self, s: Session) -> None:
        """Nothing more will arrive; what did still reaches the application before its EOF."""
        s.gone = True
        self._unwatch(s.outer)
        self._retire(s.outer)
        self._deliver(s, time.monotonic())

    def _deliver(self, s: Session, now: float) -> None:
        if s.frct is not None:
            self._ring(s, now)
            return
        taken = 0
        while s.backlog:
            try:
                s.inner.send(s.backlog[0])
            except BlockingIOError:
                break
            except OSError:  # the application is gone
                taken += sum(map(len, s.backlog))
                s.backlog.clear()
                break
            taken += len(s.backlog.popleft())
        s.backlog_bytes -= taken
        if s.gone and not s.backlog:
            self._end(s)
            return
        self._interest(s, now)

    def _ring(self, s: Session, now: float) -> None:
        """FRCT holds SDUs: the doorbell says so. FRCT's queue counts against its window, so a slow
        reader slows the sender down; what a gone application will never read frees it."""
        f = s.frct
        assert f is not None
        if f.sdus and not s.rung and not s.done.is_set():
            try:
                s.inner.send(b"\1")
                s.rung = True
            except OSError:
                if not s.gone:
                    f.taken(sum(map(len, f.sdus)), now)
                f.sdus.clear()
        if s.gone:
            self._end(s)  # what FRCT holds the application still takes, then the end
            return
        self._flush(s)
        self._interest(s, now)

    def _from_app(self, s: Session, now: float, hup: bool = False) -> None:
        f = s.frct
        if hup and f is not None and s.queued and not s.hup and not f.can_send(now):
            # Gone, with SDUs the window holds back: a hung-up socket is readable to epoll for good,
            # so it leaves epoll, and what it holds is taken as the window opens (_held_back).
            s.hup = now
            with contextlib.suppress(OSError):
                self._epoll.unregister(s.inner.fileno())
            if s.owned:  # no application thread reads the socket any more
                self._reclaim(s)
            return
        for _ in range(BURST):
            if f is not None and s.queued and not f.can_send(now):
                break  # (with nothing queued only the application's end can come)
            try:
                sdu = s.inner.recv(APP_MTU + 1)
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The application closed with SDUs we relayed still unread: the kernel says so once,
                # ahead of what it wrote before closing, which still goes out; its end follows as EOF.
                continue
            except OSError:
                sdu = b""
            if not sdu:  # the application let go: a final ack, then linger until acknowledged
                s.closing = now
                s.linger = f is not None and f.close(now)
                self._unwatch(s.inner)
                if s.owned:  # no application thread reads the socket any more
                    self._reclaim(s)
                break
            s.live.sent(now)
            if f is None:
                self._send(s, sdu)
            else:
                s.queued -= 1
                try:
                    f.send(sdu, now)
                except ValueError as e:
                    log.warning("dropped an SDU the flow cannot carry: %s", e)
        self._flush(s)
        self._interest(s, now)

    def _held_back(self, s: Session, now: float) -> None:
        """The application is gone with SDUs the window held back: take them as it opens; give up after
        HUP_GIVE_UP without room (as a C writer gives up on a window that stays shut)."""
        if s.frct is not None and s.frct.can_send(now):
            s.hup = now
            self._from_app(s, now)
        elif now - s.hup > HUP_GIVE_UP:
            self._fail(s, f"the peer's window took nothing written before the close for {HUP_GIVE_UP:g} s")

    def _interest(self, s: Session, now: float) -> None:
        """Read the app only while the window is open; wait for room when it cannot take SDUs."""
        if s.closing or s.hup or s.done.is_set():
            return
        mask = 0
        if not s.gone and not s.outq and (s.frct is None or s.frct.can_send(now)):
            mask |= select.EPOLLIN
        if s.backlog:
            mask |= select.EPOLLOUT
        if mask != s.mask:
            s.mask = mask
            with contextlib.suppress(OSError):
                self._epoll.modify(s.inner.fileno(), mask)

    def _send(self, s: Session, pdu: bytes) -> None:
        if s.crypto is not None:
            pdu = s.crypto.seal(pdu)
        if s.crc:
            pdu = crc.add(pdu)
        self._raw_send(s, pdu)

    def _raw_send(self, s: Session, pdu: bytes) -> None:
        if s.gone:
            return
        if s.outq:
            if len(s.outq) < OUTQ:
                s.outq.append(pdu)
            return
        try:
            s.outer.send(pdu)
        except BlockingIOError:
            # The layer is full: hold the PDU and stop reading the application until it drains.
            s.outq.append(pdu)
            self._outer_mask(s)
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
        self._outer_mask(s)
        self._interest(s, time.monotonic())

    def _flush(self, s: Session) -> None:
        if s.frct is None:
            return
        pdus = s.frct.pdus
        if pdus and s.crypto is None and not s.outq and not s.gone:
            # The usual case, _send and _raw_send inline (a writer flushes every SDU): on any error the
            # general path takes the PDU that met it and what follows.
            send, with_crc, add_crc = s.outer.send, s.crc, crc.add
            while pdus:
                pdu = pdus.popleft()
                if with_crc:
                    pdu = add_crc(pdu)
                try:
                    send(pdu)
                except OSError:
                    self._raw_send(s, pdu)
                    break
        while pdus:
            self._send(s, pdus.popleft())

    def _timers(self, s: Session, now: float) -> None:
        f = s.frct
        if f is not None:
            f.handle_timer(now)
            self._flush(s)
            if f.error is not None:
                self._fail(s, f.error)
                return
            self._interest(s, now)
        settled = (not s.linger or f is None or f.idle) and not s.outq
        if s.closing and (settled or s.gone or now - s.closing > LINGER):
            self._end(s)

    def _fail(self, s: Session, why: str) -> None:
        log.info("flow reset: %s", why)
        s.error = why
        self._end(s)

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._sessions.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    def _end(self, s: Session) -> None:
        for sock in (s.outer, s.inner):
            self._unwatch(sock)
            self._retire(sock)
        s.done.set()

    def _retire(self, sock: socket.socket) -> None:
        """Close a socket of a session that ended, from this thread only: it may hold events polled
        before the end, and a number closed elsewhere could come back as another flow's meanwhile."""
        if threading.get_ident() == self._thread.ident:
            sock.close()
        else:
            self._retired.append(sock)
            self._wake_by(0.0)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    """The process's engine, started on its first flow (again in a forked child)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine


def running() -> Engine | None:
    """The process's engine if it was started, without starting it."""
    return _engine


def _forked() -> None:
    """A forked child has none of its parent's threads: its first flow starts an engine of its own.
    (Told at the fork, not checked with getpid on every call: a system call per flow operation.)"""
    global _engine, _engine_lock
    _engine, _engine_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forked)
