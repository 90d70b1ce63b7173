"""Moving 9P messages: over flows (one message per SDU) and over byte streams (size[4] framing),
and dialing a service: a flow to a name, or tcp!/unix! for a plain 9P server or a bridge.
"""

from __future__ import annotations

import select
import socket

from apps.styx import wire as w
from flowlib import Flow, FlowError, flow_alloc, qos

ALLOC_TIMEOUT = 10.0


class TransportError(Exception):
    """The connection broke, or the peer sent something that is not 9P framing."""


class TransportTimeout(TransportError):
    """Nothing came within the time asked for."""


def wait_readable(obj: Flow | socket.socket, timeout: float | None) -> None:
    if timeout is not None and not select.select([obj], [], [], timeout)[0]:
        raise TransportTimeout(f"nothing came in {timeout:g} s")


class Transport:
    """A connection that carries whole 9P messages."""

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message; TransportTimeout if none begins within `timeout` seconds."""
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

    def recv(self, timeout: float | None = None) -> bytes:
        wait_readable(self.flow, timeout)
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

    def recv(self, timeout: float | None = None) -> bytes:
        wait_readable(self.sock, timeout)
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
