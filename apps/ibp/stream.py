"""IBP's byte stream over a flow (SDUs of up to CHUNK bytes) or a TCP socket, with bounded reads.

The text protocol is a byte stream; on a flow each SDU carries the next piece of it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator

from flowlib import Fccntl, Flow, FlowDown, FlowError, FlowTimeout

CHUNK = 65_000  # bytes per SDU on a flow: under FRCT's 65,535-byte SDU limit
SEND_TIMEOUT = 60.0  # a peer that takes nothing for this long is gone


class StreamClosed(ConnectionError):
    """The peer closed the stream."""


class StreamTimeout(TimeoutError):
    """Nothing arrived in time."""


class ByteStream:
    """readline/readexact/send over a transport; subclasses supply _recv and _send."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def _recv(self, timeout: float | None) -> bytes:
        raise NotImplementedError

    def _send(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def send(self, data: bytes | memoryview) -> None:
        self._send(data)

    def readline(self, limit: int, timeout: float | None) -> bytes:
        """One line, newline included; ValueError if it exceeds `limit` bytes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            i = self._buf.find(b"\n", 0, limit)
            if i >= 0:
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) >= limit:
                raise ValueError(f"line longer than {limit} bytes")
            self._fill(deadline)

    def read_chunks(self, n: int, timeout: float | None) -> Iterator[bytes]:
        """Exactly `n` bytes, as they arrive; `timeout` applies to each wait."""
        left = n
        while left > 0:
            if self._buf:
                piece = bytes(self._buf[:left])
                del self._buf[: len(piece)]
            else:  # straight from the transport, without a pass through the buffer
                piece = self._recv(None if timeout is None else max(0.001, timeout))
                if not piece:
                    raise StreamClosed("the peer closed the connection")
                if len(piece) > left:
                    self._buf += piece[left:]
                    piece = piece[:left]
            left -= len(piece)
            yield piece

    def readexact(self, n: int, timeout: float | None) -> bytes:
        return b"".join(self.read_chunks(n, timeout))

    def _fill(self, deadline: float | None) -> None:
        wait = None if deadline is None else max(0.001, deadline - time.monotonic())
        data = self._recv(wait)
        if not data:
            raise StreamClosed("the peer closed the connection")
        self._buf += data

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlowStream(ByteStream):
    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow
        self._rcv_timeout: float | None = -1.0  # what the flow has now; set only on change
        self._snd_timeout: float | None = -1.0

    def _recv(self, timeout: float | None) -> bytes:
        if timeout != self._rcv_timeout:
            self.flow.fccntl(Fccntl.SRCVTIMEO, timeout)
            self._rcv_timeout = timeout
        try:
            return self.flow.read()
        except FlowTimeout:
            raise StreamTimeout("no answer in time") from None
        except FlowDown:
            return b""

    def _send(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self._snd_timeout != SEND_TIMEOUT:
            self.flow.fccntl(Fccntl.SSNDTIMEO, SEND_TIMEOUT)
            self._snd_timeout = SEND_TIMEOUT
        try:
            for i in range(0, len(view), CHUNK):
                self.flow.write(view[i: i + CHUNK])
        except FlowTimeout:
            raise StreamTimeout("the peer takes no data") from None
        except FlowDown:
            raise StreamClosed("the peer closed the flow") from None

    def close(self) -> None:
        with contextlib.suppress(FlowError):
            self.flow.close()


class TcpStream(ByteStream):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def _recv(self, timeout: float | None) -> bytes:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(256 * 1024)
        except TimeoutError:
            raise StreamTimeout("no answer in time") from None
        except ConnectionResetError:
            return b""

    def _send(self, data: bytes | memoryview) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            raise StreamClosed("the peer closed the connection") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
