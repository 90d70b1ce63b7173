"""Queries many callers may make of one IPCP at once, asked of it once: at most one in flight per key,
and those who asked while it ran share the next one. Each caller's answer comes from a query that
started after the caller asked (never an older answer), so nothing a caller saw happen before asking
is missing from it; queries of one key start at least `gap` seconds apart, which bounds what all
callers together cost the IPCP however fast they ask.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclasses.dataclass
class _Key(Generic[V]):
    waiting: asyncio.Future[V] | None = None  # the answer of the next query: those who asked since the last began
    running: bool = False  # a query (or the wait for its turn) is under way
    gone: bool = False  # forgotten while running: dropped when it ends
    last: float = float("-inf")  # when the last query began (monotonic): kept between queries, for the gap


class Coalesced(Generic[K, V]):
    def __init__(self, fetch: Callable[[K], Awaitable[V]], gap: float) -> None:
        self.fetch, self.gap = fetch, gap
        self._keys: dict[K, _Key[V]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        """The answer of a query of `key` that begins after this call; a caller that gives up (cancelled,
        timed out) leaves it to the others."""
        state = self._keys.setdefault(key, _Key())
        if state.waiting is None:
            state.waiting = asyncio.get_running_loop().create_future()
            state.waiting.add_done_callback(_retrieve)  # nobody may be left to take a failure
        answer = state.waiting
        if not state.running:
            state.running = True
            task = asyncio.ensure_future(self._run(key, state))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(answer)

    async def _run(self, key: K, state: _Key[V]) -> None:
        """Run the queries of `key` one after the other while callers wait for one."""
        try:
            while (answer := state.waiting) is not None:
                if (delay := state.last + self.gap - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                state.waiting, state.last = None, time.monotonic()  # who asks from now on waits for the next
                try:
                    result = await self.fetch(key)
                except Exception as e:  # each of its callers gets the failure as its own
                    if not answer.done():
                        answer.set_exception(e)
                else:
                    if not answer.done():
                        answer.set_result(result)
        except BaseException:  # cancelled (the IRMd stops): no caller waits on forever
            for fut in (state.waiting, answer):
                if fut is not None:
                    fut.cancel()
            raise
        finally:
            state.running = False
            if state.gone and self._keys.get(key) is state:
                del self._keys[key]

    def forget(self, key: K) -> None:
        """The key is no more (its IPCP is gone); its state, kept between queries for the gap, goes."""
        if (state := self._keys.get(key)) is not None:
            state.gone = True
            if not state.running:
                del self._keys[key]

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
