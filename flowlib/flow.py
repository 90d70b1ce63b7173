"""Flows: a file descriptor an application reads and writes SDUs on.

`flow_alloc` and `flow_accept` get one from the IRMd; `Flow.fccntl` sets its
options as Ouroboros's fccntl does (blocking, timeouts, queue limits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import select
import socket
import struct
import termios
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flowlib import crc
from flowlib.crypto import CYPHER_S, PacketCrypto
from flowlib.engine import LINGER, Session, engine, running
from flowlib.fccntl import (
    FLOWFACCMODE,
    FLOWFDEFAULT,
    FLOWFDOWN,
    FLOWFINVALID,
    FLOWFNONBLOCK,
    FLOWFRDONLY,
    FLOWFRNOBLOCK,
    FLOWFRNOPART,
    FLOWFWNOBLOCK,
    FLOWFWNOPART,
    FLOWFWRONLY,
    FRCTFLINGER,
    FRCTFRESCNTL,
    FRCTFRTX,
    Fccntl,
)
from flowlib.frct import APP_MTU, RCV_BUF, Frct
from flowlib.identity import Peer, client_identity, server_identity
from flowlib.irm import IrmClient, default_client
from flowlib.liveness import Liveness
from proto import messages as m
from proto.errors import (
    FlowDown,
    FlowError,
    FlowPeer,
    FlowReset,
    FlowTimeout,
    FlowWouldBlock,
    InvalidArgument,
    PermissionDenied,
)
from proto.qos import QosSpec, raw
from transports.unix import PEEK_NOW, hung_up, recv_record

if TYPE_CHECKING:
    from flowlib.stats import FlowStats

_INT = struct.Struct("i")


class Flow:
    """One end of an allocated flow. Closing it deallocates the flow.

    Without a `session` (the flow engine carrying it) the flow's socket is the IPCP's own, read and
    written in the caller's thread; the engine still keeps it alive (keepalives, FLOW_PEER).
    """

    def __init__(
        self, reply: m.FlowReply, fd: int, irm: IrmClient, *, with_crc: bool = False, session: Session | None = None
    ) -> None:
        self.flow_id = reply.flow_id
        self.layer = reply.layer
        self.name = reply.name
        self.mtu = reply.mtu - (crc.CRCLEN if with_crc else 0)
        self.qos = reply.qos
        # Who allocated the flow, as the kernel told the IRMd: set only when both ends are on this host.
        self.peer_uid: int | None = reply.peer_uid if reply.peer_uid >= 0 else None
        self.peer_gid: int | None = reply.peer_gid if reply.peer_gid >= 0 else None
        # None: not known (the peer is remote or acts as another user, or its groups were not carried)
        self.peer_groups: tuple[int, ...] | None = None if reply.peer_groups is None else tuple(reply.peer_groups)
        self.peer_pid: int | None = reply.peer_pid or None
        self._irm = irm
        # The kernel says what the socket is: an AF_UNIX pair on most layers, but a udp layer hands the
        # application a connected UDP socket of its own.
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(True)
        self._recv: Callable[[int], bytes] = self._sock.recv
        self._send: Callable[[bytes | bytearray | memoryview], int] = self._sock.send
        self._rbuf = max(self.mtu, 1)
        self.rejected = 0  # packets dropped for a CRC that did not match
        if with_crc:
            self._recv, self._send = self._crc_recv, self._crc_send
        self._oflags = FLOWFDEFAULT
        self._can_read = self._can_write = True
        self._part_done = False  # a read(count) ended an SDU exactly: the next one returns b"" (as C)
        self._rcvtimeo: float | None = None
        self._sndtimeo: float | None = None
        self._closed = False
        self._ended: str | None = None
        self._session = session  # the flow engine's, when it runs FRCT, encryption or CRCs for the flow
        self._pending: bytes | None = None  # the rest of an SDU partly read, or one fevent read past keepalives
        self._sets: weakref.WeakSet[Any] = weakref.WeakSet()  # the FlowSets holding it: told of FLOW_DOWN/UP
        if session is not None:
            self._live = session.live
            if session.frct is not None:
                self._send, self._recv = _through_frct(self, session)
        else:
            self._live = Liveness(reply.qos.timeout, time.monotonic())
            if self._live.timeout:  # (the engine thread starts with the first flow it keeps alive)
                engine().watch(self._sock, self._live)
        self.peer: Peer | None = None  # the peer's verified identity; None: anonymous

    def __repr__(self) -> str:
        return f"<Flow {self.flow_id} {self.name or '?'} via {self.layer} fd={self.fd}>"

    def __enter__(self) -> Flow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def fd(self) -> int:
        return self._sock.fileno()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- data ------------------------------------------------------------

    def read(self, count: int | None = None) -> bytes:
        """The next SDU, or with `count` up to count bytes of it, as C's flow_read: the rest of a longer
        SDU comes with the next reads (unless FLOWFRNOPART, which fails and drops it), and a read after
        one that ended an SDU exactly at count bytes returns b''.

        Raises FlowDown when the flow ended (FlowPeer when its peer went silent), FlowTimeout,
        FlowWouldBlock.
        """
        if count is not None or not self._can_read or self._pending is not None:
            return self._read_some(count)
        try:
            data = self._recv(self._rbuf)
        except BlockingIOError:
            data = b""
        except OSError as e:
            raise self._failed(e) from None
        if data:
            self._live.heard = True
            return data
        return self._read_slow()

    def _read_some(self, count: int | None) -> bytes:
        if not self._can_read:
            raise PermissionDenied(f"flow {self.flow_id} is write-only (FLOWFWRONLY)")
        if count is not None and count < 0:
            raise InvalidArgument(f"read count {count}: expected 0 or more bytes")
        if self._part_done and count is not None:
            self._part_done = False
            return b""
        self._part_done = False
        if self._pending is not None:
            sdu, self._pending = self._pending, None
        else:
            sdu = self.read()  # a whole one
        n = len(sdu)
        if count is None:
            return sdu
        partial = not self._oflags & FLOWFRNOPART
        if n <= count:
            self._part_done = partial and n == count
            return sdu
        if not partial:
            raise InvalidArgument(
                f"flow {self.flow_id}: an SDU of {n} bytes does not fit in {count} (FLOWFRNOPART): dropped"
            )
        self._pending = sdu[count:]
        return sdu[:count]

    def _read_slow(self) -> bytes:
        """Past empty records (keepalives), waiting as the flow's options say; the end raises."""
        deadline = None if self._rcvtimeo is None else time.monotonic() + self._rcvtimeo
        nonblock = bool(self._oflags & FLOWFRNOBLOCK)
        while True:
            if self._live.down:
                raise self._down()
            try:
                data = recv_record(self._sock, self._rbuf, self._recv)
            except BlockingIOError:
                data = self._wait(select.POLLIN, deadline, nonblock, recv_record, self._sock, self._rbuf, self._recv)
            except OSError as e:
                raise self._failed(e) from None
            if data is None:
                raise self._down()
            self._live.heard = True
            if data:
                return data

    def _crc_recv(self, size: int) -> bytes:
        while True:  # a packet with a bad CRC is counted and skipped; EAGAIN goes up to the caller
            packet = self._sock.recv(size + crc.CRCLEN)
            if not packet:
                return packet
            body = crc.strip(packet)
            if body is not None:
                return body
            self.rejected += 1

    def _crc_send(self, sdu: bytes | bytearray | memoryview) -> int:
        self._sock.send(crc.add(bytes(sdu)))
        return len(sdu)

    def write(self, sdu: bytes | bytearray | memoryview) -> int:
        """Send one SDU, whole or not at all; unless FLOWFWNOPART is cleared, when an SDU over the MTU is
        cut to it. Returns the bytes sent."""
        n = len(sdu)
        if n == 0 or n > self.mtu:
            if n == 0 or self._oflags & FLOWFWNOPART:
                raise InvalidArgument(f"SDU of {n} bytes: flow {self.flow_id} carries 1 to {self.mtu} bytes")
            sdu = sdu[: self.mtu]  # a partial write
        live = self._live
        if live.down or live.peer or not self._can_write:
            if not self._can_write:
                raise PermissionDenied(f"flow {self.flow_id} is read-only (FLOWFRDONLY)")
            raise self._down()
        live.wrote = True
        try:
            return self._send(sdu)
        except BlockingIOError:
            deadline = None if self._sndtimeo is None else time.monotonic() + self._sndtimeo
            nonblock = bool(self._oflags & FLOWFWNOBLOCK)
            return self._wait(select.POLLOUT, deadline, nonblock, self._send, sdu)  # type: ignore[no-any-return]
        except OSError as e:
            raise self._failed(e) from None

    def _wait(self, event: int, deadline: float | None, nonblock: bool, op: Any, *args: Any) -> Any:
        """Wait until `op` can go, the deadline passes or the flow ends.

        A flow torn down by the IRMd (shutdown of its socket) polls as hung up;
        a datagram socket then still answers EAGAIN, so the hang-up decides.
        """
        poller = select.poll()
        poller.register(self._sock, event)
        s = self._session if self._session and self._session.frct else None
        while True:
            left = 0.0 if nonblock else None if deadline is None else max(deadline - time.monotonic(), 0.0)
            # An FRCT flow's reader or writer waits on the IPCP's socket itself (see Engine.wait).
            if s is not None and not nonblock:
                ready = engine().wait(s, self._sock, left, write=event == select.POLLOUT)
            else:
                ready = None
            if ready is None:
                ready = poller.poll(None if left is None else left * 1000)
            try:
                return op(*args)
            except BlockingIOError:
                if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in ready):
                    raise self._down() from None
                if nonblock:
                    raise FlowWouldBlock(f"flow {self.flow_id}: would block") from None
                if not ready and left is not None and left <= 0:
                    timeout = self._rcvtimeo if event == select.POLLIN else self._sndtimeo
                    raise FlowTimeout(f"flow {self.flow_id}: timed out after {timeout} s") from None
            except OSError as e:
                raise self._failed(e) from None

    def _failed(self, e: OSError) -> FlowError:
        if self._closed or e.errno == errno.EBADF:
            return FlowError(f"flow {self.flow_id} is closed")
        if e.errno == errno.EMSGSIZE:
            return InvalidArgument(f"flow {self.flow_id}: SDU too large for the layer")
        return self._down()

    def _down(self) -> FlowDown:
        if self._live.peer:
            return FlowPeer(
                f"flow {self.flow_id} to {self.name or 'its peer'}: the peer was silent for "
                f"{self._live.timeout:g} s (FLOW_PEER)"
            )
        if self._live.down:
            return FlowDown(f"flow {self.flow_id} to {self.name or 'its peer'} is down (FLOWFDOWN)")
        if self._session is not None and self._session.error is not None:
            return FlowReset(f"flow {self.flow_id} to {self.name or 'its peer'} was reset: {self._session.error}")
        how = "deallocated by the peer" if self.ended() == "dealloc" else "down"
        return FlowDown(f"flow {self.flow_id} to {self.name or 'its peer'} is {how}")

    def has_data(self) -> bool:
        """Whether an SDU waits to be read, without reading it."""
        if self._pending is not None:
            return True
        if (s := self._session) is not None and s.frct is not None:
            return bool(s.frct.sdus)
        try:
            return bool(self._sock.recv(1, PEEK_NOW))
        except OSError:
            return False

    def _skip_keepalives(self) -> bool:
        """Take the empty records (keepalives) at the head of the queue; whether anything else is there
        (an SDU, or the end) for read to take. For fevent, so that a keepalive is no FLOW_PKT; nor is a
        packet a decoding recv (CRCs, encryption) drops: the blocking read after it would wait for the
        peer's next good one. Such a recv takes the packet now, and read returns what it decoded."""
        raw = self._recv == self._sock.recv
        while self._pending is None:
            try:
                if self._sock.recv(1, PEEK_NOW):
                    if raw:
                        return True
                elif hung_up(self._sock):
                    return True
            except BlockingIOError:
                return False
            except OSError:
                return True
            blocking = self._sock.getblocking()
            self._sock.setblocking(False)  # read() copes with EAGAIN, should another thread race us
            try:
                data = self._recv(self._rbuf)
            except BlockingIOError:
                return False
            except OSError:
                return True
            finally:
                self._sock.setblocking(blocking)
            self._live.heard = True
            if data:  # a reader in another thread took the keepalive first: this SDU is read's
                self._pending = data
        return True

    def _set_down(self, down: bool) -> None:
        """FLOWFDOWN set or cleared: reads and writes fail while it is set; FLOW_DOWN or FLOW_UP follows."""
        if down == self._live.down:
            return
        self._live.set_down(down, time.monotonic())
        for fset in list(self._sets):
            fset._changed(self)

    def peer_addr(self) -> str:
        """The remote host the flow came from, as its layer vouches for it (m.FlowPeer: a udp peer's IP
        or IPv6 /64, a unicast member's address); "" for a flow from this host, from a layer that names
        no peer, or when the IRMd cannot say (the flow went meanwhile)."""
        return "" if self.peer_uid is not None else self._irm.remote_addr(self.flow_id)

    def ended(self) -> str:
        """How the flow ended, as the IRMd saw it: 'dealloc' (by the peer) or 'down'."""
        if self._ended is None:
            self._ended = "dealloc" if self._irm.flow_state(self.flow_id) == "dealloc" else "down"
        return self._ended

    # -- options ---------------------------------------------------------

    def fccntl(self, cmd: int, value: Any = None) -> Any:
        """Get or set a flow option, as C's fccntl (flowlib.fccntl names the commands and flags);
        setters return None, getters the value."""
        try:
            cmd = Fccntl(cmd)
        except ValueError:
            raise InvalidArgument(f"fccntl: no command {cmd!r}") from None
        sock = self._sock
        match cmd:
            case Fccntl.SRCVTIMEO:
                self._rcvtimeo = _timeout(value)
            case Fccntl.SSNDTIMEO:
                self._sndtimeo = _timeout(value)
            case Fccntl.SFLAGS:
                self._set_flags(int(value))
            case Fccntl.SRCVBUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(value))
            case Fccntl.SSNDBUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(value))
            case Fccntl.FRCTSFLAGS:
                frct = self._frct()
                # Retransmission follows the QoS; the rest is the caller's.
                frct.cflags = frct.cflags & FRCTFRTX | int(value) & (FRCTFRESCNTL | FRCTFLINGER)
            case Fccntl.FRCTSRCVBUF:
                self._frct()
                assert self._session is not None
                engine().resize(self._session, _positive(value))
            case Fccntl.GRCVTIMEO:
                return self._rcvtimeo
            case Fccntl.GSNDTIMEO:
                return self._sndtimeo
            case Fccntl.GFLAGS:
                return self._oflags
            case Fccntl.GQOSSPEC:
                return self.qos
            case Fccntl.GRXQLEN:
                return self._rx_queued()
            case Fccntl.GTXQLEN:
                return self._tx_queued()
            case Fccntl.FRCTGFLAGS:
                return self._frct().cflags
            case Fccntl.FRCTGRCVBUF:
                return self._frct().rcv_buf
            case Fccntl.GMTU:
                return self.mtu
            case Fccntl.GRCVBUF:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            case Fccntl.GSNDBUF:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # The fast path is a plain blocking socket; anything else polls in _wait.
        sock.setblocking(not self._oflags & FLOWFNONBLOCK and self._rcvtimeo is None and self._sndtimeo is None)
        return None

    def _set_flags(self, flags: int) -> None:
        if flags & FLOWFACCMODE == FLOWFINVALID:
            raise InvalidArgument(f"flow flags {flags:#o}: no access mode is both FLOWFWRONLY and FLOWFRDWR")
        self._oflags = flags
        mode = flags & FLOWFACCMODE
        self._can_read = mode != FLOWFWRONLY
        self._can_write = mode != FLOWFRDONLY
        self._set_down(bool(flags & FLOWFDOWN))

    def _frct(self) -> Frct:
        if self._session is None or self._session.frct is None:
            raise PermissionDenied(f"flow {self.flow_id} runs no FRCT (qos in_order 0 and loss not 0)")
        return self._session.frct

    def stats(self, ask_ipcp: bool = True) -> FlowStats:
        """What is known of the flow's traffic: FRCT's counters at this end (when it runs FRCT) and,
        with `ask_ipcp`, what its IPCP counted of its SDUs (one request to the IRMd)."""
        from flowlib.stats import FlowStats, FrctStats, IpcpStats  # here: few processes ever ask

        s = self._session
        frct = FrctStats.of(s.frct) if s is not None and s.frct is not None else None
        ipcp = IpcpStats.of(self._irm.flow_counters(self.flow_id)) if ask_ipcp else None
        return FlowStats(frct, ipcp)

    def _rx_queued(self) -> int:
        """SDUs waiting to be read: what flowlib holds, and one if the socket holds any (the kernel
        counts bytes, not datagrams)."""
        n = int(self._pending is not None)
        if (s := self._session) is not None:
            if s.frct is not None:
                return n + len(s.frct.sdus)  # its socket holds only the doorbell
            n += len(s.backlog)
        with contextlib.suppress(OSError):
            n += len(self._sock.recv(1, PEEK_NOW)) > 0
        return n

    def _tx_queued(self) -> int:
        """SDUs written and not yet gone: FRCT's unacknowledged and the engine's held ones, and one if
        the socket holds any."""
        n = 0
        if (s := self._session) is not None:
            n += len(s.outq) + (len(s.frct.unacked) if s.frct is not None else 0)
        queued: int = _INT.unpack(fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, b"\0" * _INT.size))[0]
        return n + (queued > 0)

    def set_blocking(self, blocking: bool) -> None:
        """Blocking (the default) or non-blocking reads and writes, the other flags as they are."""
        self.fccntl(Fccntl.SFLAGS, self._oflags & ~FLOWFNONBLOCK | (0 if blocking else FLOWFNONBLOCK))

    def set_timeout(self, timeout: float | None) -> None:
        """Both the receive and the send timeout."""
        self.fccntl(Fccntl.SRCVTIMEO, timeout)
        self.fccntl(Fccntl.SSNDTIMEO, timeout)

    # -- teardown --------------------------------------------------------

    def close(self, linger: bool = True) -> None:
        """Deallocate the flow (idempotent). `linger`: with FRCT, first let the peer acknowledge what it
        has not (FRCTFLINGER); False drops that and ends at once (a peer owed nothing more)."""
        if self._closed:
            return
        self._closed = True
        # Out of its sets while its fd is still its own: epoll watches a file, not a number, and a
        # set left watching it would report its end under the number a new flow reuses. (Most flows
        # are in none by now: a WeakSet's len is cheap, iterating it is not.)
        if len(self._sets):
            for fset in list(self._sets):
                fset.remove(self)
        if self._session is None and (e := running()) is not None:
            e.unwatch(self._sock)
        self._sock.close()
        if self._session is not None and not linger:
            engine().abort(self._session)
        if self._session is not None:  # let FRCT deliver what is still unacknowledged
            self._session.done.wait(LINGER + 1.0)
        self._irm.dealloc(self.flow_id)


def _timeout(value: Any) -> float | None:
    if value is None:
        return None
    t = float(value)
    if t < 0:
        raise InvalidArgument(f"timeout {value!r}: expected seconds >= 0 or None")
    return t


def _positive(value: Any) -> int:
    n = int(value)
    if n <= 0:
        raise InvalidArgument(f"{value!r}: expected a number of bytes > 0")
    return n


def establish(reply: m.FlowReply, fd: int, irm: IrmClient, client: bool, rcv_buf: int = RCV_BUF) -> Flow:
    """A Flow over the IPCP's socket: direct for raw flows, through the engine for FRCT; `rcv_buf`,
    what FRCT holds for the application from the first PDU on (FRCTSRCVBUF changes it later).

    An encrypted flow seals and opens with the key and cipher the IRMds agreed in OAP; the
    acceptor's peer is the client certificate its IRMd verified (the allocator's is set by
    flow_alloc, which checks it against the user's known names)."""
    qos = reply.qos
    try:
        crypto = PacketCrypto(reply.cipher, reply.key, server=not client, seq_iv=reply.seq_iv) if reply.cipher else None
        peer = None if client else client_identity(reply)
        with_crc = qos.crc and not reply.no_wire
        if not qos.frct and crypto is None:
            flow = Flow(reply, fd, irm, with_crc=with_crc)
        elif not qos.frct and not with_crc and crypto is not None:
            flow = _sealed(reply, fd, irm, crypto)
        else:
            # C's order on the wire: FRCT PCI, then encryption, then the CRC.
            mtu = reply.mtu - (crypto.overhead if crypto else 0) - (crc.CRCLEN if with_crc else 0)
            frct = Frct(mtu, reliable=qos.reliable, rcv_buf=rcv_buf) if qos.frct else None
            live = Liveness(qos.timeout, time.monotonic())
            app_fd, session = engine().wrap(fd, mtu, frct, crypto, with_crc=with_crc, live=live)
            # Only reliable flows fragment: an unreliable one could not tell a lost piece from a whole SDU.
            app_mtu = APP_MTU if frct and frct.reliable else frct.max_payload if frct else mtu
            flow = Flow(dataclasses.replace(reply, mtu=app_mtu), app_fd, irm, session=session)
    except BaseException:
        os.close(fd)
        irm.dealloc(reply.flow_id)
        raise
    flow.peer = peer
    return flow


def _through_frct(flow: Flow, s: Session) -> tuple[Callable[[Any], int], Callable[[int], bytes]]:
    """An FRCT flow's send and recv in the application's thread: through the engine's FRCT, with the
    socket for the doorbell, the flow's end, and SDUs a non-blocking writer leaves for the engine's
    thread to send when the window opens (see flowlib.engine)."""
    eng, sock = engine(), flow._sock

    def send(data: bytes | bytearray | memoryview) -> int:
        # FRCT copies what it sends (header and payload joined): a caller's buffer needs no copy first,
        # unless its items are not bytes (FRCT cuts SDUs by length).
        if isinstance(data, memoryview) and (data.itemsize != 1 or data.ndim != 1):
            data = data.tobytes()
        while (sent := eng.send(s, data, not flow._oflags & FLOWFWNOBLOCK)) is None:
            if sock.fileno() < 0:  # another thread closed the flow
                raise OSError(errno.EBADF, "closed")
            if not sock.getblocking():
                raise BlockingIOError  # a timed write: Flow._wait waits for room
            if eng.wait(s, sock, None, write=True) is None:  # closed under us, or the flow is ending
                sent = eng.send(s, data, False)  # into the socket, whose error says which
                break
        if sent:
            return len(data)
        try:
            return sock.send(data)
        except BaseException:
            eng.unqueue(s)
            raise

    def recv(size: int) -> bytes:
        while (sdu := eng.take(s, sock)) is None:
            blocking = sock.getblocking()
            if blocking and eng.wait(s, sock, None) is not None:
                continue  # it waited and read what came; Flow._wait does this for timed reads
            # The doorbell, or the end once FRCT holds nothing more; EAGAIN goes up to Flow._wait.
            if not sock.recv(16, 0 if blocking else socket.MSG_DONTWAIT):
                return b""
            eng.heard(s)
        return sdu

    return send, recv


def _sealed(reply: m.FlowReply, fd: int, irm: IrmClient, crypto: PacketCrypto) -> Flow:
    """An encrypted flow without FRCT, sealed and opened in the caller's own thread.

    No engine in between: a hop to another thread costs more than the cipher.
    """
    flow = Flow(dataclasses.replace(reply, mtu=reply.mtu - crypto.overhead), fd, irm)
    send, recv, seal, open_, room = flow._sock.send, flow._sock.recv, crypto.seal, crypto.open, crypto.overhead

    def seal_send(sdu: bytes | bytearray | memoryview) -> int:
        send(seal(sdu))  # the cipher reads any buffer
        return len(sdu)

    def recv_open(size: int) -> bytes:
        while True:  # a packet that does not open is counted and skipped; EAGAIN goes up to Flow._wait
            packet = recv(size + room)
            if not packet:
                return packet
            if (plain := open_(packet)) is not None:
                return plain

    flow._send, flow._recv = seal_send, recv_open
    return flow


def flow_alloc(
    name: str,
    qos: QosSpec | None = None,
    timeout: float | None = None,
    *,
    encrypt: bool = False,
    accept_new: bool | None = None,
    irm: IrmClient | None = None,
) -> Flow:
    """Allocate a flow to `name` through whichever layer reaches it.

    qos.data (loss 0) makes it reliable and in order; encrypt=True (or qos.cypher_s) makes it
    end-to-end encrypted, keys agreed by the IRMds (OAP: X25519 unless the name's client enc.conf
    says otherwise, then AES-256-GCM per packet). A peer that presents a certificate must be vouched
    for by the IRMd's CA store or the user's known names; accept_new=True pins an unknown one
    (default: $OUROBOROS_STRICT_NAMES, "yes" or "accept-new"). `flow.peer` says who answered.
    """
    irm = irm or default_client()
    spec = qos or raw
    if encrypt and not spec.cypher_s:
        spec = dataclasses.replace(spec, cypher_s=CYPHER_S)
    reply, fd = irm.alloc(name, spec, timeout)
    try:
        peer = server_identity(name, reply, accept_new)
    except BaseException:
        os.close(fd)
        irm.dealloc(reply.flow_id)
        raise
    flow = establish(reply, fd, irm, client=True)
    flow.peer = peer
    return flow


def flow_join(
    layer: str, qos: QosSpec | None = None, timeout: float | None = None, *, irm: IrmClient | None = None
) -> Flow:
    """Join a broadcast layer: what this flow writes reaches every other joined flow.

    No keepalives (qos timeout 0, as C's joins): a broadcast flow has many peers, not one.
    """
    irm = irm or default_client()
    reply, fd = irm.alloc(layer, dataclasses.replace(qos or raw, timeout=0), timeout, join=True)
    return Flow(reply, fd, irm)


def flow_accept(qos: QosSpec | None = None, timeout: float | None = None, *, irm: IrmClient | None = None) -> Flow:
    """Wait for a flow to one of the names this process is bound to.

    `qos`, if given, is the minimum the caller takes; weaker flows are refused. With qos.cypher_s
    the IRMd refuses plain allocations for this process outright (ECRYPT to the allocator).
    """
    irm = irm or default_client()
    while True:
        reply, fd = irm.accept(timeout, qos.cypher_s if qos else 0)
        flow = establish(reply, fd, irm, client=False)
        if qos is None or _satisfies(flow.qos, qos):
            return flow
        flow.close()


def _satisfies(got: QosSpec, want: QosSpec) -> bool:
    return got.loss <= want.loss and got.in_order >= want.in_order and got.cypher_s >= want.cypher_s
