"""Names a udp shim resolves outside its layer, as Ouroboros 0.23 does (getaddrinfo on the hex of the
name's hash): /etc/hosts read here, at once, and the system's resolver (DNS) a few calls at a time.

A resolver call holds a thread until DNS answers, which a slow or silent server makes seconds, and
any local user can make the shim look names up (an allocation to a made-up name). So: at most
`running` calls at once, at most `queued` names waiting for one (past them a name is not looked up:
LookupsBusy), a queued name nobody waits for any more leaves the queue, and what /etc/hosts holds
never waits behind them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HOSTS_MAX = 1 << 20  # bytes of a hosts file read; a larger one is read that far


class LookupsBusy(Exception):
    """The resolver's queue is full: the name was not looked up."""


class HostsFile:
    """A hosts file (/etc/hosts), read again when it changes: name -> the first address of the IP
    version asked, as getaddrinfo's `files` source answers. Only a regular file is read (a FIFO in
    its place would hold the event loop)."""

    def __init__(self, path: Path, version: int) -> None:
        self.path, self.version = path, version
        self._seen: tuple[int, int, int] | None = None
        self._names: dict[str, str] = {}

    def get(self, name: str) -> str | None:
        self._refresh()
        return self._names.get(name.lower())

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._names = None, {}
            return
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen, self._names = seen, {}
        if not stat.S_ISREG(st.st_mode):
            return
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            log.debug("%s: %s", self.path, e)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            text = os.read(fd, HOSTS_MAX).decode("utf-8", "replace")
        except OSError as e:
            log.debug("%s: %s", self.path, e)
            return
        finally:
            os.close(fd)
        for line in text.splitlines():
            words = line.partition("#")[0].split()
            if len(words) < 2:
                continue
            try:
                addr = ipaddress.ip_address(words[0].partition("%")[0])
            except ValueError:
                continue
            if addr.version == self.version:
                for name in words[1:]:
                    self._names.setdefault(name.lower(), words[0])


class Lookups:
    """Calls of a blocking `resolve(name)` on threads: `running` at once, `queued` waiting, in order."""

    def __init__(self, resolve: Callable[[str], str | None], running: int, queued: int) -> None:
        self._resolve = resolve
        self.running, self.queued = running, queued
        self._calls: dict[str, list[asyncio.Future[str | None]]] = {}  # name -> its waiters, call under way
        self._queue: dict[str, list[asyncio.Future[str | None]]] = {}  # ... waiting for a call, oldest first
        self.refused = 0  # names not looked up: the queue was full
        self.dropped = 0  # names taken off the queue: nobody waited for them any more

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def ask(self, name: str) -> str | None:
        """`name`'s address from the resolver (None: it has none); LookupsBusy if the queue is full.
        Cancelled, the name leaves the queue unless someone else still waits for it."""
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if name in self._calls:
            self._calls[name].append(fut)
        elif name in self._queue:
            self._queue[name].append(fut)
        elif len(self._calls) < self.running:
            self._start(name, [fut])
        elif len(self._queue) < self.queued:
            self._queue[name] = [fut]
        else:
            self.refused += 1
            raise LookupsBusy(f"{len(self._queue)} names wait for the system's resolver already")
        try:
            return await fut
        finally:
            fut.cancel()  # (done already, unless we were cancelled)
            waiters = self._queue.get(name)
            if waiters is not None and all(f.done() for f in waiters):
                del self._queue[name]
                self.dropped += 1

    def _start(self, name: str, waiters: list[asyncio.Future[str | None]]) -> None:
        self._calls[name] = waiters
        call = asyncio.get_running_loop().run_in_executor(None, self._resolve, name)
        call.add_done_callback(lambda c: self._done(name, c))

    def _done(self, name: str, call: asyncio.Future[str | None]) -> None:
        """A call returned (a thread cannot be stopped: it counted as running until now)."""
        if call.cancelled():
            result = None
        elif (error := call.exception()) is not None:
            log.warning("looking %s up failed: %r", name, error)
            result = None
        else:
            result = call.result()
        for fut in self._calls.pop(name, []):
            if not fut.done():
                fut.set_result(result)
        while self._queue and len(self._calls) < self.running:
            nxt = next(iter(self._queue))
            waiters = self._queue.pop(nxt)
            if all(f.done() for f in waiters):
                self.dropped += 1
                continue
            self._start(nxt, waiters)
