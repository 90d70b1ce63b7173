"""Moving 9P messages: over flows (a message per SDU, or on reliable flows in SDU-sized pieces)
and byte streams (size[4] framing), and dialing a service by flow name or tcp!/unix! address.
"""

from __future__ import annotations

import socket

from apps.styx import wire as w
from flowlib import Flow, FlowError, flow_alloc, qos
from transports.unix import readable

ALLOC_TIMEOUT = 10.0


class TransportError(Exception):
    """The connection broke, or the peer sent something that is not 9P framing."""


class TransportTimeout(TransportError):
    """Nothing came within the time asked for."""


def wait_readable(obj: Flow | socket.socket, timeout: float | None) -> None:
    if timeout is not None and not readable([obj], timeout):
        raise TransportTimeout(f"nothing came in {timeout:g} s")


class Transport:
    """A connection that carries whole 9P messages."""

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        """The next message, of at most `limit` bytes (a longer one is passed on for the decoder to
        refuse, or ends the connection where framing depends on it); TransportTimeout if none
        begins within `timeout` seconds."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def flow_msize(flow: Flow, msize: int) -> int:
    """The largest message `flow` carries under `msize`: any on a reliable flow, one SDU on others."""
    return msize if flow.qos.reliable else min(msize, flow.mtu)


def send_message(flow: Flow, data: bytes) -> None:
    """One message as one SDU; on a reliable flow one longer than an SDU goes in PIECE-sized SDUs
    (an unreliable flow's msize is its MTU: a lost piece could not be told from a whole)."""
    if len(data) <= flow.mtu or not flow.qos.reliable:
        flow.write(data)
        return
    view = memoryview(data)
    for i in range(0, len(view), w.PIECE):
        flow.write(view[i : i + w.PIECE])


SMALL_SDU = 1024  # bytes: SDUs shorter than this are gathered, not kept one by one


class Reassembly:
    """Whole messages out of a reliable flow's SDUs, sans-IO: a message begins an SDU and says its
    size; a longer one continues in the SDUs that follow, which carry nothing else."""

    def __init__(self) -> None:
        self._parts: list[bytes | bytearray] = []
        self._need = 0
        self._have = 0

    def feed(self, sdu: bytes, limit: int) -> bytes | None:
        """The message `sdu` completes (or is); None while more of it is due. A message said to be
        longer than `limit` is not waited for: it is passed on whole, for the decoder to refuse.
        TransportError if an SDU runs past the end of its message (the framing is lost)."""
        if not self._need:
            if len(sdu) < 4 or not len(sdu) < w.message_size(sdu) <= limit:
                return sdu
            self._parts, self._need, self._have = [sdu], w.message_size(sdu), len(sdu)
            return None
        self._have += len(sdu)
        if self._have > self._need:
            raise TransportError(f"an SDU runs {self._have - self._need} bytes past the end of its message")
        # Small SDUs are gathered in one buffer: a peer sending a message a byte at a time would make
        # each byte cost a bytes object (33) and a list slot (8). Large ones are kept as they came, for
        # one copy in all when the message is whole.
        if len(sdu) >= SMALL_SDU:
            self._parts.append(sdu)
        elif isinstance(tail := self._parts[-1], bytearray):
            tail += sdu
        else:
            self._parts.append(bytearray(sdu))
        if self._have < self._need:
            return None
        whole = b"".join(self._parts)
        self._parts, self._need = [], 0
        return whole

    @property
    def held(self) -> int:
        """Bytes of a message begun and not yet whole."""
        return self._have if self._need else 0


class FlowTransport(Transport):
    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self._pieces = Reassembly() if flow.qos.reliable else None

    def send(self, data: bytes) -> None:
        try:
            send_message(self.flow, data)
        except FlowError as e:
            raise TransportError(str(e)) from None

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        while True:
            wait_readable(self.flow, timeout)
            try:
                sdu = self.flow.read()
            except FlowError as e:
                raise TransportError(str(e)) from None
            whole = sdu if self._pieces is None else self._pieces.feed(sdu, limit)
            if whole is not None:
                return whole

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


def recv_framed(sock: socket.socket, limit: int = w.MSIZE_SDU) -> bytes:
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

    def recv(self, timeout: float | None = None, limit: int = w.MSIZE_SDU) -> bytes:
        wait_readable(self.sock, timeout)
        try:
            return recv_framed(self.sock, limit)
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
