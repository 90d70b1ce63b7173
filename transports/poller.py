"""A thread that waits on many sockets with one epoll: the base of the data paths
(the shims' relay, the unicast and broadcast DT), and the one way they read a burst.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from transports.unix import after_empty

log = logging.getLogger(__name__)

BURST = 64  # packets taken from one ready socket before looking at the others


def read_burst(sock: socket.socket, bufsize: int, hup: bool, most: int = BURST) -> tuple[list[bytes], bool]:
    """What is ready on `sock` (up to `most` packets), and whether it has ended.

    Empty packets are kept: they are keepalives, which the flows' ends send and the layers carry.
    It has ended on EOF, on an error, or on a hang-up with nothing left to read:
    a datagram socket shut down under us answers EAGAIN, never EOF.
    """
    packets: list[bytes] = []
    recv, append = sock.recv, packets.append
    for _ in range(most):
        try:
            packet: bytes | None = recv(bufsize)
            if not packet:  # an empty record, or the end (recv_record, inlined for the SDUs)
                packet = after_empty(sock, bufsize, recv)
        except BlockingIOError:
            return packets, hup
        except OSError:
            return packets, True
        if packet is None:
            return packets, True
        append(packet)
    return packets, False


class PollThread:
    """Subclasses watch sockets and handle their readiness in `on_ready`, on this thread."""

    HUP = select.EPOLLHUP | select.EPOLLERR
    # Fail-stop: an IPCP's data path that ended silently would leave the IPCP listed, serving no flow;
    # its process ends instead (EX_SOFTWARE), and the IRMd sees it die and takes its flows down.
    FAIL_STOP = False
    EXIT_CODE = 70

    def __init__(self, name: str) -> None:
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._running = True
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties keep their order and never compare callables
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def watch(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):  # closed already
            self._epoll.unregister(fd)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run `fn` on this thread after `delay` seconds; only from this thread."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), fn))

    def wake(self) -> None:
        """Have on_wake run on this thread soon; from any thread."""
        self._wake_w.send(b"w")

    def on_ready(self, fd: int, mask: int) -> None:
        raise NotImplementedError

    def on_wake(self) -> None:
        """Work other threads queued for this one (see wake)."""

    def _due(self) -> float:
        """Run the timers that are due; seconds until the next one (-1: none)."""
        timers = self._timers
        while timers:
            wait = timers[0][0] - time.monotonic()
            if wait > 0:
                return wait
            heapq.heappop(timers)[2]()
        return -1

    def _serve(self) -> None:
        try:
            self._run()
        except BaseException:
            if not self.FAIL_STOP:
                raise
            log.critical("the data path failed; the IPCP ends (thread %s)", self._thread.name, exc_info=True)
            os._exit(self.EXIT_CODE)

    def _run(self) -> None:
        wake = self._wake_r.fileno()
        while self._running:
            try:
                events = self._epoll.poll(self._due() if self._timers else -1)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # closed under us at shutdown
            for fd, mask in events:
                if fd != wake:
                    self.on_ready(fd, mask)
                elif self._running:
                    self._wake_r.recv(4096)
                    self.on_wake()
