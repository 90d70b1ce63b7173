"""Moving 9P messages: over flows (one message per SDU) and over byte streams (size[4] framing).

Holds the serving loop (accept flows, one thread and Session each) and the
bridge that relays TCP/unix-socket 9P clients to a flow to the served name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from apps.styx import wire as w
from apps.styx.server import Session
from apps.styx.tree import Tree
from flowlib import Flow, FlowError, flow_accept, flow_alloc, qos
from flowlib.irm import default_client

log = logging.getLogger(__name__)

RETRY_INTERVAL = 0.02  # how often parked requests with nothing to wait on (listens) are retried
IDLE_RETRY = 1.0  # parked requests with a waitable are retried at least this often anyway
ALLOC_TIMEOUT = 10.0


class TransportError(Exception):
    """The connection broke, or the peer sent something that is not 9P framing."""


class Transport:
    """A connection that carries whole 9P messages."""

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class FlowTransport(Transport):
    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def send(self, data: bytes) -> None:
        try:
            self.flow.write(data)
        except FlowError as e:
            raise TransportError(str(e)) from None

    def recv(self) -> bytes:
        try:
            return self.flow.read()
        except FlowError as e:
            raise TransportError(str(e)) from None

    def close(self) -> None:
        self.flow.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise TransportError("connection closed" if not buf else "connection closed mid-message")
        buf += chunk
    return bytes(buf)


def recv_framed(sock: socket.socket, limit: int = w.MSIZE_MAX) -> bytes:
    """One 9P message from a byte stream, split on its size[4]."""
    head = recv_exact(sock, 4)
    size = w.message_size(head)
    if size < w.HEADER or size > limit:
        raise TransportError(f"message size {size} outside {w.HEADER}..{limit}")
    return head + recv_exact(sock, size - 4)


class StreamTransport(Transport):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise TransportError(str(e)) from None

    def recv(self) -> bytes:
        try:
            return recv_framed(self.sock)
        except OSError as e:
            raise TransportError(str(e)) from None

    def close(self) -> None:
        self.sock.close()


def parse_dial(addr: str) -> tuple[int, object]:
    """'tcp!HOST!PORT' or 'unix!/path' -> (family, sockaddr)."""
    parts = addr.split("!")
    if parts[0] == "tcp" and len(parts) == 3:
        try:
            return socket.AF_INET6 if ":" in parts[1] else socket.AF_INET, (parts[1], int(parts[2]))
        except ValueError:
            pass
    if parts[0] == "unix" and len(parts) == 2 and parts[1]:
        return socket.AF_UNIX, parts[1]
    raise ValueError(f"bad address '{addr}': expected tcp!HOST!PORT or unix!/path")


def dial(addr: str, timeout: float = ALLOC_TIMEOUT) -> Transport:
    """A connection to a 9P service: a flow to a name, or tcp!/unix! for a plain 9P server."""
    if "!" in addr:
        family, sockaddr = parse_dial(addr)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)  # type: ignore[arg-type]
        except OSError as e:
            sock.close()
            raise TransportError(f"cannot reach {addr}: {e.strerror or e}") from None
        sock.settimeout(None)
        return StreamTransport(sock)
    return FlowTransport(flow_alloc(addr, qos=qos.data, timeout=timeout))


# -- serving ------------------------------------------------------------------------


def serve_flow(flow: Flow, session: Session) -> None:
    """One client's loop: messages in, replies out, parked requests retried; until the flow ends."""
    try:
        while True:
            waitables, timed = session.waitables()
            timeout = RETRY_INTERVAL if timed else IDLE_RETRY if waitables else None
            ready, _, _ = select.select([flow, *waitables], [], [], timeout)
            replies: list[bytes] = []
            if flow in ready:
                replies += session.receive(flow.read())
            if session.pending:
                replies += session.retry()
            for reply in replies:
                flow.write(reply)
    except FlowError as e:
        log.info("flow %s ended: %s", flow.flow_id, e)
    finally:
        session.close()
        flow.close()


def serve_forever(make_session: Callable[[Flow], Session],
                  route: Callable[[Flow], bool] | None = None) -> None:
    """Accept flows for this process; `route` may claim one (net/ announcements), else serve 9P on it."""
    while True:
        flow = flow_accept()
        if route is not None and route(flow):
            continue
        log.info("flow %s from layer %s", flow.flow_id, flow.layer)
        session = make_session(flow)
        threading.Thread(target=serve_flow, args=(flow, session), daemon=True,
                         name=f"styx-flow-{flow.flow_id}").start()


def serve_tree(tree: Tree, users: frozenset[str] | None = None,
               route: Callable[[Flow], bool] | None = None) -> None:
    serve_forever(lambda flow: Session(tree, min(w.MSIZE_MAX, flow.mtu), users), route)


# -- the bridge -------------------------------------------------------------------------


def listen(addr: str) -> socket.socket:
    family, sockaddr = parse_dial(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(str(sockaddr)) and not os.path.isfile(str(sockaddr)):
                os.unlink(str(sockaddr))  # a stale socket from an earlier bridge
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)  # type: ignore[arg-type]
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on {addr}: {e.strerror or e}") from None
    return sock


def relay(conn: socket.socket, name: str) -> None:
    """One bridged client: its 9P byte stream to and from one flow to `name`."""
    try:
        flow = flow_alloc(name, qos=qos.data, timeout=ALLOC_TIMEOUT)
    except FlowError as e:
        log.warning("bridge: cannot reach %s: %s", name, e)
        conn.close()
        return
    limit = min(w.MSIZE_MAX, flow.mtu)

    done = threading.Event()

    def up() -> None:  # client -> service
        try:
            while True:
                flow.write(recv_framed(conn, limit))
        except (TransportError, OSError, FlowError) as e:
            log.info("bridge: client side ended: %s", e)
        finally:
            done.set()

    t = threading.Thread(target=up, daemon=True)
    t.start()
    try:
        while not done.is_set():  # service -> client; polls so a client hang-up is noticed
            ready, _, _ = select.select([flow], [], [], 0.2)
            if ready:
                conn.sendall(flow.read())
    except (OSError, FlowError) as e:
        log.info("bridge: service side ended: %s", e)
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        t.join(timeout=5)
        flow.close()
        conn.close()


def bridge(name: str, addr: str, ready: Callable[[], None] | None = None) -> None:
    """Accept 9P clients on `addr`, each relayed to its own flow to `name`, until the IRMd goes away."""
    irm = default_client()  # no IRMd, no bridge; and its loss (IrmdUnreachable) ends the bridge
    lsock = listen(addr)
    if ready is not None:
        ready()
    with lsock:
        while True:
            readable, _, _ = select.select([lsock.fileno(), irm.wakeup_fd], [], [])
            if irm.wakeup_fd in readable:
                irm.take_arrived()  # raises once the IRMd is gone
            if lsock.fileno() in readable:
                conn, _ = lsock.accept()
                threading.Thread(target=relay, args=(conn, name), daemon=True).start()
