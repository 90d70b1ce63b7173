"""IBP's byte stream over a flow (SDUs of up to CHUNK bytes) or a TCP socket, with bounded reads
and deadlines, so a slow or silent peer costs a connection its time limit, never a hang.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator

from flowlib import Fccntl, Flow, FlowDown, FlowError, FlowTimeout

CHUNK = 65_000  # bytes per SDU on a flow: under FRCT's 65,535-byte SDU limit
SEND_TIMEOUT = 60.0  # a peer that takes nothing for this long is gone


class StreamClosed(ConnectionError):
    """The peer closed the stream."""


class StreamTimeout(TimeoutError):
    """Nothing arrived, or nothing was taken, in time."""


def _left(deadline: float | None, wait: float | None) -> float | None:
    """The wait allowed now: `wait`, cut to what is left before `deadline` (monotonic)."""
    if deadline is None:
        return wait
    left = deadline - time.monotonic()
    if left <= 0:
        raise StreamTimeout("out of time")
    return left if wait is None else min(wait, left)


class ByteStream:
    """readline/read_chunks/send over a transport; subclasses supply _recv and _send."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received and not yet read."""
        return len(self._buf)

    def _recv(self, timeout: float | None) -> bytes:
        raise NotImplementedError

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """End, from another thread, a wait for bytes on this stream, if the transport can (TCP);
        a flow's reader notices what it is waiting for at its next poll instead."""

    def send(self, data: bytes | memoryview, deadline: float | None = None) -> None:
        """All of `data`, within SEND_TIMEOUT and before `deadline` (monotonic) if given."""
        wait = _left(deadline, SEND_TIMEOUT)
        self._send(data, SEND_TIMEOUT if wait is None else wait)

    def wait(self, timeout: float) -> bool:
        """Whether bytes are pending, after waiting up to `timeout` for some (False: none came)."""
        if not self._buf:
            try:
                self._fill(time.monotonic() + timeout)
            except StreamTimeout:
                return False
        return True

    def readline(self, limit: int, timeout: float | None, line_timeout: float | None = None) -> bytes:
        """One line, newline included; ValueError if it exceeds `limit` bytes.

        Waits up to `timeout` for it to begin; once begun, the rest must follow within
        `line_timeout`, so a peer dribbling a line keeps no connection for long.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        begun = False
        while True:
            i = self._buf.find(b"\n", 0, limit)
            if i >= 0:
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) >= limit:
                raise ValueError(f"line longer than {limit} bytes")
            if self._buf and not begun and line_timeout is not None:
                begun = True
                end = time.monotonic() + line_timeout
                deadline = end if deadline is None else min(deadline, end)
            self._fill(deadline)

    def read_chunks(
        self, n: int, timeout: float | None, deadline: Callable[[int], float] | None = None
    ) -> Iterator[bytes]:
        """Exactly `n` bytes, as they arrive; `timeout` applies to each wait, and `deadline(k)`, given
        the k bytes read so far, says by when (monotonic) more must have come (a minimum rate)."""
        left = n
        while left > 0:
            if self._buf:
                piece = bytes(self._buf[:left])
                del self._buf[: len(piece)]
            else:  # straight from the transport, without a pass through the buffer
                wait = _left(None if deadline is None else deadline(n - left), timeout)
                piece = self._recv(None if wait is None else max(0.001, wait))
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
        wait = _left(deadline, None)
        data = self._recv(None if wait is None else max(0.001, wait))
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

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        view = memoryview(data)
        end = time.monotonic() + timeout
        if timeout != self._snd_timeout:
            self.flow.fccntl(Fccntl.SSNDTIMEO, timeout)
            self._snd_timeout = timeout
        try:
            for i in range(0, len(view), CHUNK):
                if i and time.monotonic() > end:  # each SDU waits at most `timeout`; all of them too
                    raise StreamTimeout("the peer takes data too slowly")
                self.flow.write(view[i : i + CHUNK])
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

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.sock.settimeout(timeout)  # for the whole sendall (Python >= 3.5)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise StreamTimeout("the peer takes no data") from None
        except (BrokenPipeError, ConnectionResetError):
            raise StreamClosed("the peer closed the connection") from None

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
