"""The connections a depot keeps to the depots it copies to: a flow's allocation and teardown are
a good part of a copy's time, so one is kept a while for the next copy to the same depot.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from apps.ibp import wire as w
from apps.ibp.client import Connection

KEEP_FOR = 60.0  # seconds an unused connection is kept (well within a target's idle timeout)
PER_TARGET = 2  # connections kept per target depot
MOST = 16  # connections kept in all

Opener = Callable[[str, float], Connection]


class Targets:
    """Connections to copy targets, each used by one copy at a time, kept between copies within
    bounds; one that breaks is closed, never kept."""

    def __init__(self, opener: Opener, clock: Callable[[], float] = time.monotonic) -> None:
        self.opener = opener
        self.clock = clock
        self.lock = threading.Lock()
        self.kept: dict[str, list[tuple[float, Connection]]] = {}

    def use(self, depot: str, timeout: float, work: Callable[[Connection], object]) -> None:
        """`work` on a connection to `depot`: a kept one, or a new one. A kept one the target has
        closed meanwhile is lost before its first request is answered; the work is then done again
        on a new connection (the target did nothing for it)."""
        conn = self._take(depot)
        if conn is not None:
            conn.timeout = timeout
            answered = conn.answered
            try:
                work(conn)
            except w.IbpError as e:
                conn.close()
                if e.status != w.IBP_E_CONNECTION or conn.answered != answered:
                    raise  # the target took the request: doing it again could do it twice
            else:
                self._keep(conn)
                return
        conn = self.opener(depot, timeout)
        try:
            work(conn)
        except BaseException:
            conn.close()
            raise
        self._keep(conn)

    def _take(self, depot: str) -> Connection | None:
        with self.lock:
            kept = self.kept.get(depot)
            return kept.pop()[1] if kept else None

    def _keep(self, conn: Connection) -> None:
        """Keep `conn` for the next copy if it is in step (nothing unread) and there is room."""
        with self.lock:
            kept = self.kept.setdefault(conn.depot, [])
            if not conn.stream.pending and len(kept) < PER_TARGET and sum(map(len, self.kept.values())) < MOST:
                kept.append((self.clock(), conn))
                return
        conn.close()

    def expire(self) -> None:
        """Close the connections unused for KEEP_FOR seconds."""
        old: list[Connection] = []
        with self.lock:
            for depot, kept in list(self.kept.items()):
                old += [c for t, c in kept if self.clock() - t >= KEEP_FOR]
                kept[:] = [(t, c) for t, c in kept if self.clock() - t < KEEP_FOR]
                if not kept:
                    del self.kept[depot]
        for conn in old:
            with contextlib.suppress(Exception):
                conn.close()

    def close(self) -> None:
        with self.lock:
            conns = [c for kept in self.kept.values() for _, c in kept]
            self.kept.clear()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
