"""The shims' data path: a thread moving SDUs between application sockets and the network.

One epoll over the network socket and every flow's socket; per SDU a dict
lookup and one system call each way. Framing is the transport's (`Framing`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import threading
from collections.abc import Callable, Hashable
from typing import Any, Protocol

log = logging.getLogger(__name__)

BURST = 64  # SDUs moved per ready socket before looking at the others


class Framing(Protocol):
    """How a transport carries (eid, SDU) in its datagrams."""

    def parse(self, frame: bytes, src: Any) -> tuple[int, memoryview, Hashable] | None:
        """(eid, SDU, peer address) of a received frame, or None to drop it."""

    def send(self, sock: socket.socket, flow: Any, sdu: bytes) -> None:
        """Send an SDU to the flow's peer."""


class RelayFlow(Protocol):
    eid: int
    addr: Hashable
    remote_eid: int
    io: socket.socket
    rx: bool


class Relay:
    """The data path of one shim IPCP; `on_mgmt` gets endpoint-0 frames (from this thread)."""

    def __init__(self, net: socket.socket, framing: Framing, bufsize: int,
                 on_mgmt: Callable[[bytes, Hashable], None]) -> None:
        self.net = net
        self.framing = framing
        self.bufsize = bufsize
        self.on_mgmt = on_mgmt
        self.flows: dict[int, RelayFlow] = {}
        self._by_fd: dict[int, RelayFlow] = {}
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._epoll.register(net.fileno(), select.EPOLLIN)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._running = True
        self.dropped = 0  # frames that were malformed, for no flow, or from the wrong peer
        self.overflow = 0  # SDUs dropped because the application did not keep up
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._wake_w.send(b"x")
        self._thread.join(timeout=2)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def add(self, flow: RelayFlow) -> None:
        flow.io.setblocking(False)
        self.flows[flow.eid] = flow
        self._by_fd[flow.io.fileno()] = flow
        self._epoll.register(flow.io.fileno(), select.EPOLLIN)

    def remove(self, flow: RelayFlow) -> None:
        self.flows.pop(flow.eid, None)
        fd = flow.io.fileno()
        if self._by_fd.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def _run(self) -> None:
        net_fd = self.net.fileno()
        wake_fd = self._wake_r.fileno()
        while self._running:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # closed under us at shutdown
            for fd, _ in events:
                if fd == net_fd:
                    self._from_net()
                elif fd != wake_fd:
                    flow = self._by_fd.get(fd)
                    if flow is not None:
                        self._from_app(flow)

    def _from_net(self) -> None:
        recv, parse, flows = self.net.recvfrom, self.framing.parse, self.flows
        for _ in range(BURST):
            try:
                frame, src = recv(self.bufsize)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EBADF, errno.ENOTSOCK):
                    return
                continue  # e.g. an ICMP error queued on the socket
            parsed = parse(frame, src)
            if parsed is None:
                self.dropped += 1
                continue
            eid, sdu, peer = parsed
            if eid == 0:
                self.on_mgmt(bytes(sdu), peer)
                continue
            flow = flows.get(eid)
            if flow is None or flow.addr != peer or not sdu:
                self.dropped += 1
                continue
            flow.rx = True
            try:
                flow.io.send(sdu)
            except BlockingIOError:
                self.overflow += 1
            except OSError:
                self.remove(flow)

    def _from_app(self, flow: RelayFlow) -> None:
        recv, send = flow.io.recv, self.framing.send
        for _ in range(BURST):
            try:
                sdu = recv(self.bufsize)
            except BlockingIOError:
                return
            except OSError:
                sdu = b""
            if not sdu:  # the application's end was torn down
                self.remove(flow)
                return
            if not flow.remote_eid:
                continue
            try:
                send(self.net, flow, sdu)
            except BlockingIOError:
                self.overflow += 1
            except OSError as e:
                log.debug("send to %s failed: %s", flow.addr, e)
