"""The event API, modelled on kqueue and Ouroboros's fqueue: flow sets and event queues.

`fevent(set, queue, timeout)` waits on every flow of a set at once (one epoll)
and fills the queue with (flow, event) pairs, so one thread serves many flows.
Keepalives are no events; a silent peer is FLOW_PEER, FLOWFDOWN set and cleared FLOW_DOWN and FLOW_UP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterator

from flowlib.flow import Flow, establish
from flowlib.irm import IrmClient, default_client
from proto.errors import FlowError

log = logging.getLogger(__name__)

_HUP = select.EPOLLHUP | select.EPOLLRDHUP | select.EPOLLERR


class EventType(enum.IntFlag):
    """Event types, valued as Ouroboros's enum fqtype."""

    PKT = 1 << 0  # an SDU is ready to read
    DOWN = 1 << 1  # the flow's layer went away
    UP = 1 << 2  # the flow came back up
    ALLOC = 1 << 3  # a new flow arrived (sets that listen)
    DEALLOC = 1 << 4  # the peer deallocated the flow
    PEER = 1 << 5  # the peer timed out (flows with a qos timeout)

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"  # not the number IntFlag prints


@dataclasses.dataclass(frozen=True)
class Event:
    flow: Flow
    type: EventType


class EventQueue:
    """What one fevent call found, consumed with next() or iteration."""

    def __init__(self) -> None:
        self._events: deque[Event] = deque()

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        while self._events:
            yield self._events.popleft()

    def next(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def push(self, flow: Flow, kind: EventType) -> None:
        self._events.append(Event(flow, kind))


class FlowSet:
    """A set of flows to wait on together. With listen(), new flows join it as ALLOC events."""

    def __init__(self, irm: IrmClient | None = None) -> None:
        self._irm = irm
        self._epoll = select.epoll()
        self._flows: dict[int, Flow] = {}
        self._fd_of: dict[Flow, int] = {}
        self._listening = False
        self._changes: dict[Flow, None] = {}  # flows whose FLOWFDOWN changed since the last fevent, in order
        self._changes_lock = threading.Lock()
        # Flows whose SDU fevent read (to check it: CRCs, encryption) and nobody has yet: their sockets
        # may be empty, yet each fevent reports them, as it does a socket holding an SDU.
        self._taken: set[Flow] = set()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, flow: Flow) -> bool:
        return self._flows.get(flow.fd) is flow

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def add(self, flow: Flow) -> None:
        old = self._flows.get(flow.fd)
        if old is flow:
            return
        if old is not None:  # closed without remove(): its fd number now belongs to this flow
            self.remove(old)
        self._epoll.register(flow.fd, select.EPOLLIN | select.EPOLLRDHUP)
        self._flows[flow.fd] = flow
        self._fd_of[flow] = flow.fd
        flow._sets.add(self)

    def remove(self, flow: Flow) -> None:
        fd = self._fd_of.pop(flow, None)  # by the number it had: a closed flow has no fd
        flow._sets.discard(self)
        self._taken.discard(flow)
        if fd is not None:
            del self._flows[fd]
            with contextlib.suppress(OSError, ValueError):  # closed already
                self._epoll.unregister(fd)

    def zero(self) -> None:
        for flow in list(self._flows.values()):
            self.remove(flow)

    def listen(self, enabled: bool = True) -> None:
        """Have flows arriving for this process accepted into this set."""
        irm = self._client()
        if enabled and not self._listening:
            self._epoll.register(irm.wakeup_fd, select.EPOLLIN)
        elif not enabled and self._listening:
            self._epoll.unregister(irm.wakeup_fd)
        irm.listen(enabled)
        self._listening = enabled

    def close(self) -> None:
        try:
            if self._listening:
                with contextlib.suppress(FlowError):  # the IRMd may be gone
                    self.listen(False)
        finally:
            for flow in self._fd_of:
                flow._sets.discard(self)
            self._epoll.close()
            os.close(self._wake)
            self._flows.clear()
            self._fd_of.clear()
            self._taken.clear()

    def _changed(self, flow: Flow) -> None:
        """A flow of this set went down or came up (from any thread)."""
        with self._changes_lock:
            self._changes[flow] = None
        os.eventfd_write(self._wake, 1)

    def _client(self) -> IrmClient:
        if self._irm is None:
            self._irm = default_client()
        return self._irm

    def _poll(self, timeout: float | None, queue: EventQueue) -> None:
        wakeup = self._irm.wakeup_fd if self._listening and self._irm else -1
        taken = self._taken
        if taken:
            for flow in list(taken):
                if flow._pending is None:
                    taken.discard(flow)  # read since
                else:
                    queue.push(flow, EventType.PKT)
            if taken:
                timeout = 0.0
        for fd, mask in self._epoll.poll(-1 if timeout is None else timeout):
            if fd == self._wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake)
                with self._changes_lock:
                    changed, self._changes = list(self._changes), {}
                for flow in changed:
                    if flow in self:
                        queue.push(flow, EventType.DOWN if flow._live.down else EventType.UP)
                continue
            if fd == wakeup:
                for reply, flow_fd in self._client().take_arrived():
                    try:
                        flow = establish(reply, flow_fd, self._client(), client=False)
                    except FlowError as e:
                        log.warning("dropped an arriving flow: %s", e)
                        continue
                    self.add(flow)
                    queue.push(flow, EventType.ALLOC)
                continue
            found = self._flows.get(fd)
            if found is None or found in taken:
                continue  # (reported above)
            flow = found
            if mask & _HUP and not flow.has_data():
                self.remove(flow)  # report the end once
                queue.push(flow, self._end_of(flow))
            elif flow._session is not None or flow._skip_keepalives():
                queue.push(flow, EventType.PKT)
                if flow._pending is not None:
                    taken.add(flow)

    @staticmethod
    def _end_of(flow: Flow) -> EventType:
        if flow._live.peer:
            return EventType.PEER
        return EventType.DEALLOC if flow.ended() == "dealloc" else EventType.DOWN


def fevent(fset: FlowSet, queue: EventQueue, timeout: float | None = None) -> int:
    """Wait up to `timeout` seconds (None: forever) for events; returns how many (0: timeout)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fset._poll(None if deadline is None else max(deadline - time.monotonic(), 0.0), queue)
        if len(queue) or (deadline is not None and time.monotonic() >= deadline):
            return len(queue)
