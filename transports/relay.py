"""The shims' data path: a thread moving SDUs between application sockets and the network.

One epoll over the network socket and every flow's socket; per SDU a dict
lookup and one system call each way. Framing is the transport's (`Framing`).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from transports.poller import BURST, PollThread, read_burst
from transports.queues import QueueBudget

log = logging.getLogger(__name__)


class Framing(Protocol):
    """How a transport carries (eid, SDU) in its datagrams."""

    # Whether parse needs the sender's address from the socket; else frames are read with recv (on a
    # packet socket recvfrom costs an ioctl per frame: CPython looks up the interface's name).
    needs_src: bool

    def parse(self, frame: bytes, src: Any) -> tuple[int, bytes | memoryview, Hashable] | None:
        """(eid, SDU, peer address) of a received frame, or None to drop it."""

    def send(self, sock: socket.socket, flow: Any, sdu: bytes) -> None:
        """Send an SDU to the flow's peer."""


class RelayFlow(Protocol):
    eid: int
    addr: Hashable
    remote_eid: int
    io: socket.socket
    rx_at: float  # when the peer was last heard on the flow (data or keepalive)
    tx_at: float  # when we last sent on it
    sent: int  # its SDUs sent to the peer
    received: int  # ... handed to the application
    dropped_app: int  # ... dropped: the application's queue was full
    dropped_net: int  # ... dropped: the network socket's queue was full
    queue: int  # bytes of queue its application socket was given from the relay's budget (0: none)


class Relay(PollThread):
    """The data path of one shim IPCP; `on_mgmt` gets endpoint-0 frames (from this thread)."""

    FAIL_STOP = True

    def __init__(
        self,
        net: socket.socket,
        framing: Framing,
        bufsize: int,
        on_mgmt: Callable[[bytes, Hashable], None],
        max_sdu: int,
    ) -> None:
        super().__init__("relay")
        self.net = net
        self.framing = framing
        self.bufsize = bufsize
        self.max_sdu = max_sdu  # the layer's MTU: a peer's longer SDU is dropped, not cut short
        self.on_mgmt = on_mgmt
        self.flows: dict[int, RelayFlow] = {}
        self._by_fd: dict[int, RelayFlow] = {}
        self.watch(net.fileno())
        self.dropped = 0  # frames that were malformed, for no flow, or from the wrong peer
        self.overflow = 0  # SDUs dropped because the application did not keep up
        self.keepalives = 0  # empty SDUs received: keepalives, carried to the application like data
        self.oversized = 0  # SDUs an application wrote past the layer's MTU (past flowlib): dropped
        # An IPCP above that waits for a CPU is given a longer queue before its SDUs drop (the network
        # socket's queue is long; the application's, the system's default, holds some 100 SDUs).
        self.queues = QueueBudget()

    def add(self, flow: RelayFlow) -> None:
        flow.io.setblocking(False)
        self.flows[flow.eid] = flow
        self._by_fd[flow.io.fileno()] = flow
        self.watch(flow.io.fileno())

    def remove(self, flow: RelayFlow) -> None:
        if self.flows.pop(flow.eid, None) is not None:
            self.queues.give_back(flow)
        fd = flow.io.fileno()
        if self._by_fd.pop(fd, None) is not None:
            self.unwatch(fd)

    def on_ready(self, fd: int, mask: int) -> None:
        if fd == self.net.fileno():
            self._from_net()
        elif (flow := self._by_fd.get(fd)) is not None:
            self._from_app(flow, bool(mask & self.HUP))

    def _from_net(self) -> None:
        parse, flows, max_sdu, net, bufsize = self.framing.parse, self.flows, self.max_sdu, self.net, self.bufsize
        recvfrom = net.recvfrom if self.framing.needs_src else None
        recv = net.recv
        now = time.monotonic()  # one stamp for the burst: rx_at only says the peer was heard lately
        src = None
        dropped = 0
        try:
            for _ in range(BURST):
                try:
                    if recvfrom is None:
                        frame = recv(bufsize)
                    else:
                        frame, src = recvfrom(bufsize)
                except BlockingIOError:
                    return
                except OSError as e:
                    if e.errno in (errno.EBADF, errno.ENOTSOCK):
                        return
                    continue  # e.g. an ICMP error queued on the socket
                parsed = parse(frame, src)
                if parsed is None:
                    dropped += 1
                    continue
                eid, sdu, peer = parsed
                if not eid:
                    self.on_mgmt(bytes(sdu), peer)
                    continue
                flow = flows.get(eid)
                if flow is None or flow.addr != peer or len(sdu) > max_sdu:
                    dropped += 1
                    continue
                flow.rx_at = now
                if not sdu:  # a keepalive, as on Ouroboros's wire: the flows' ends send and read them
                    self.keepalives += 1
                try:
                    flow.io.send(sdu)
                    flow.received += 1
                except BlockingIOError:
                    self._overflowed(flow, sdu)
                except OSError:
                    self.remove(flow)
        finally:
            if dropped:
                self.dropped += dropped

    def _overflowed(self, flow: RelayFlow, sdu: bytes | memoryview) -> None:
        """The application's queue is full: grow it once, from the budget, and try again; else drop."""
        if self.queues.grow(flow):
            try:
                flow.io.send(sdu)
                flow.received += 1
                return
            except OSError:
                pass
        self.overflow += 1
        flow.dropped_app += 1

    def _from_app(self, flow: RelayFlow, hup: bool) -> None:
        sdus, ended = read_burst(flow.io, self.bufsize, hup)
        if flow.remote_eid and sdus:
            self._send_burst(flow, sdus)
        if ended:  # the application's end was torn down
            self.remove(flow)

    def _send_burst(self, flow: RelayFlow, sdus: list[bytes]) -> None:
        """SDUs to the flow's peer (an empty one is a keepalive); its counters move once a burst."""
        send, net, sent, max_sdu = self.framing.send, self.net, 0, self.max_sdu
        for sdu in sdus:
            if len(sdu) > max_sdu:  # the socket is the application's to write on: a frame's length would not pack
                self.oversized += 1
                continue
            try:
                send(net, flow, sdu)
            except BlockingIOError:
                self.overflow += 1
                flow.dropped_net += 1
                continue
            except OSError as e:
                log.debug("send to %s failed: %s", flow.addr, e)
                continue
            sent += 1
        if sent:
            flow.tx_at = time.monotonic()
            flow.sent += sent

    def send(self, flow: RelayFlow, sdu: bytes) -> None:
        """One SDU to the flow's peer (an empty one is a keepalive)."""
        self._send_burst(flow, [sdu])
