"""Flows: a file descriptor an application reads and writes SDUs on.

`flow_alloc` and `flow_accept` get one from the IRMd; `Flow.fccntl` sets its
options as Ouroboros's fccntl does (blocking, timeouts, queue limits).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from flowlib.crypto import CYPHER_S, PacketCrypto
from flowlib.engine import APP_MTU, LINGER, Session, engine
from flowlib.frct import Frct
from flowlib.identity import Peer, client_identity, server_identity
from flowlib.irm import IrmClient, default_client
from proto import messages as m
from proto.errors import FlowDown, FlowError, FlowTimeout, FlowWouldBlock, InvalidArgument
from proto.qos import QosSpec, raw


class Fccntl(enum.Enum):
    """fccntl commands, named as Ouroboros's."""

    SRCVTIMEO = "srcvtimeo"  # receive timeout in seconds, None = forever
    GRCVTIMEO = "grcvtimeo"
    SSNDTIMEO = "ssndtimeo"
    GSNDTIMEO = "gsndtimeo"
    SFLAGS = "sflags"  # FLOWFRNONBLOCK or 0
    GFLAGS = "gflags"
    GQOSSPEC = "gqosspec"
    GMTU = "gmtu"
    SRCVBUF = "srcvbuf"  # receive queue limit in bytes
    GRCVBUF = "grcvbuf"
    SSNDBUF = "ssndbuf"  # send queue limit in bytes
    GSNDBUF = "gsndbuf"


FLOWFRNONBLOCK = 0x1


class Flow:
    """One end of an allocated flow. Closing it deallocates the flow."""

    def __init__(self, reply: m.FlowReply, fd: int, irm: IrmClient) -> None:
        self.flow_id = reply.flow_id
        self.layer = reply.layer
        self.name = reply.name
        self.mtu = reply.mtu
        self.qos = reply.qos
        # Who allocated the flow, as the kernel told the IRMd: set only when both ends are on this host.
        self.peer_uid: int | None = reply.peer_uid if reply.peer_uid >= 0 else None
        self.peer_pid: int | None = reply.peer_pid or None
        self._irm = irm
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(True)
        self._recv: Callable[[int], bytes] = self._sock.recv
        self._send: Callable[[bytes | bytearray | memoryview], int] = self._sock.send
        self._rbuf = max(reply.mtu, 1)
        self._nonblock = False
        self._rcvtimeo: float | None = None
        self._sndtimeo: float | None = None
        self._closed = False
        self._ended: str | None = None
        self._session: Session | None = None  # set when the flow engine runs FRCT or encryption
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

    def read(self) -> bytes:
        """The next SDU. Raises FlowDown when the flow ended, FlowTimeout, FlowWouldBlock."""
        try:
            data = self._recv(self._rbuf)
        except BlockingIOError:
            data = self._wait(select.POLLIN, self._rcvtimeo, self._recv, self._rbuf)
        except OSError as e:
            raise self._failed(e) from None
        if data:
            return data
        raise self._down()

    def write(self, sdu: bytes | bytearray | memoryview) -> int:
        """Send one SDU, whole or not at all."""
        n = len(sdu)
        if n == 0 or n > self.mtu:
            raise InvalidArgument(f"SDU of {n} bytes: flow {self.flow_id} carries 1 to {self.mtu} bytes")
        try:
            return self._send(sdu)
        except BlockingIOError:
            return self._wait(select.POLLOUT, self._sndtimeo, self._send, sdu)  # type: ignore[no-any-return]
        except OSError as e:
            raise self._failed(e) from None

    def _wait(self, event: int, timeout: float | None, op: Any, arg: Any) -> Any:
        """Wait until `op` can go, the deadline passes or the flow ends.

        A flow torn down by the IRMd (shutdown of its socket) polls as hung up;
        a datagram socket then still answers EAGAIN, so the hang-up decides.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock, event)
        while True:
            left = 0.0 if self._nonblock else None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ready = poller.poll(None if left is None else left * 1000)
            try:
                return op(arg)
            except BlockingIOError:
                if any(ev & (select.POLLHUP | select.POLLERR) for _, ev in ready):
                    raise self._down() from None
                if self._nonblock:
                    raise FlowWouldBlock(f"flow {self.flow_id}: would block") from None
                if not ready and left is not None and left <= 0:
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
        how = "deallocated by the peer" if self.ended() == "dealloc" else "down"
        return FlowDown(f"flow {self.flow_id} to {self.name or 'its peer'} is {how}")

    def has_data(self) -> bool:
        """Whether an SDU waits to be read, without reading it."""
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:
            return False

    def ended(self) -> str:
        """How the flow ended, as the IRMd saw it: 'dealloc' (by the peer) or 'down'."""
        if self._ended is None:
            self._ended = "dealloc" if self._irm.flow_state(self.flow_id) == "dealloc" else "down"
        return self._ended

    # -- options ---------------------------------------------------------

    def fccntl(self, cmd: Fccntl, value: Any = None) -> Any:
        """Get or set a flow option; setters return None, getters the value."""
        sock = self._sock
        match cmd:
            case Fccntl.SRCVTIMEO:
                self._rcvtimeo = _timeout(value)
            case Fccntl.SSNDTIMEO:
                self._sndtimeo = _timeout(value)
            case Fccntl.SFLAGS:
                self._nonblock = bool(int(value) & FLOWFRNONBLOCK)
            case Fccntl.SRCVBUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, int(value))
            case Fccntl.SSNDBUF:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(value))
            case Fccntl.GRCVTIMEO:
                return self._rcvtimeo
            case Fccntl.GSNDTIMEO:
                return self._sndtimeo
            case Fccntl.GFLAGS:
                return FLOWFRNONBLOCK if self._nonblock else 0
            case Fccntl.GQOSSPEC:
                return self.qos
            case Fccntl.GMTU:
                return self.mtu
            case Fccntl.GRCVBUF:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            case Fccntl.GSNDBUF:
                return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        # The fast path is a plain blocking socket; anything else polls in _wait.
        sock.setblocking(not self._nonblock and self._rcvtimeo is None and self._sndtimeo is None)
        return None

    def set_blocking(self, blocking: bool) -> None:
        self.fccntl(Fccntl.SFLAGS, 0 if blocking else FLOWFRNONBLOCK)

    def set_timeout(self, timeout: float | None) -> None:
        """Both the receive and the send timeout."""
        self.fccntl(Fccntl.SRCVTIMEO, timeout)
        self.fccntl(Fccntl.SSNDTIMEO, timeout)

    # -- teardown --------------------------------------------------------

    def close(self) -> None:
        """Deallocate the flow (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
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


def establish(reply: m.FlowReply, fd: int, irm: IrmClient, client: bool) -> Flow:
    """A Flow over the IPCP's socket: direct for raw flows, through the engine for FRCT.

    An encrypted flow seals and opens with the key and cipher the IRMds agreed in OAP; the
    acceptor's peer is the client certificate its IRMd verified (the allocator's is set by
    flow_alloc, which checks it against the user's known names)."""
    qos = reply.qos
    try:
        crypto = PacketCrypto(reply.cipher, reply.key, server=not client, seq_iv=reply.seq_iv) if reply.cipher else None
        peer = None if client else client_identity(reply)
        if not qos.frct and crypto is None:
            flow = Flow(reply, fd, irm)
        elif not qos.frct and crypto is not None:
            flow = _sealed(reply, fd, irm, crypto)
        else:
            mtu = reply.mtu - (crypto.overhead if crypto else 0)
            frct = Frct(mtu, reliable=qos.reliable)
            app_fd, session = engine().wrap(fd, mtu, frct, crypto)
            # Only reliable flows fragment: an unreliable one could not tell a lost piece from a whole SDU.
            flow = Flow(dataclasses.replace(reply, mtu=APP_MTU if frct.reliable else frct.max_payload), app_fd, irm)
            flow._session = session
    except BaseException:
        os.close(fd)
        irm.dealloc(reply.flow_id)
        raise
    flow.peer = peer
    return flow


def _sealed(reply: m.FlowReply, fd: int, irm: IrmClient, crypto: PacketCrypto) -> Flow:
    """An encrypted flow without FRCT, sealed and opened in the caller's own thread.

    No engine in between: a hop to another thread costs more than the cipher.
    """
    flow = Flow(dataclasses.replace(reply, mtu=reply.mtu - crypto.overhead), fd, irm)
    send, recv, seal, open_, room = flow._sock.send, flow._sock.recv, crypto.seal, crypto.open, crypto.overhead

    def seal_send(sdu: bytes | bytearray | memoryview) -> int:
        send(seal(sdu if isinstance(sdu, bytes) else bytes(sdu)))
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


def flow_alloc(name: str, qos: QosSpec | None = None, timeout: float | None = None,
               *, encrypt: bool = False, accept_new: bool | None = None, irm: IrmClient | None = None) -> Flow:
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


def flow_join(layer: str, qos: QosSpec | None = None, timeout: float | None = None,
              *, irm: IrmClient | None = None) -> Flow:
    """Join a broadcast layer: what this flow writes reaches every other joined flow."""
    irm = irm or default_client()
    reply, fd = irm.alloc(layer, qos, timeout, join=True)
    return Flow(reply, fd, irm)


def flow_accept(qos: QosSpec | None = None, timeout: float | None = None,
                *, irm: IrmClient | None = None) -> Flow:
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
