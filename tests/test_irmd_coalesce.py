"""irmd.coalesce: an IPCP's info asked of it once for all who ask meanwhile, never older than the asking."""

from __future__ import annotations

import asyncio
import time

import pytest

from irmd.coalesce import Coalesced

pytestmark = pytest.mark.timeout(30)


class Counted:
    """A query that answers how many times it was made, taking `takes` s each time."""

    def __init__(self, takes: float = 0.05, fail: bool = False) -> None:
        self.made, self.takes, self.fail, self.running, self.most = 0, takes, fail, 0, 0

    async def __call__(self, key: str) -> int:
        self.made += 1
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(self.takes)
            if self.fail:
                raise LookupError(f"{key} failed")
            return self.made
        finally:
            self.running -= 1


def test_callers_at_once_share_one_query_and_later_ones_wait_for_a_fresh_one() -> None:
    async def main() -> None:
        query = Counted()
        infos = Coalesced(query, gap=0.0)
        first = [asyncio.ensure_future(infos.get("a")) for _ in range(50)]
        await asyncio.sleep(0.01)  # the first query under way: who asks now asked after it began
        later = [asyncio.ensure_future(infos.get("a")) for _ in range(50)]
        assert await asyncio.gather(*first) == [1] * 50
        assert await asyncio.gather(*later) == [2] * 50
        assert query.made == 2 and query.most == 1
        assert await infos.get("a") == 3  # asked after the last answer: a query of its own

    asyncio.run(main())


def test_queries_of_a_key_are_spaced_by_the_gap_and_keys_do_not_wait_on_each_other() -> None:
    async def main() -> None:
        query = Counted(takes=0.0)
        infos = Coalesced(query, gap=0.05)
        t0 = time.monotonic()
        for _ in range(5):  # one caller in a loop, as a flooder: one query per gap at most
            await infos.get("a")
        assert time.monotonic() - t0 >= 4 * 0.05 * 0.9
        t1 = time.monotonic()
        await infos.get("b")
        assert time.monotonic() - t1 < 0.04

    asyncio.run(main())


def test_a_failure_is_each_waiting_callers_and_a_caller_giving_up_leaves_the_rest_their_answer() -> None:
    async def main() -> None:
        failing = Coalesced(Counted(fail=True), gap=0.0)
        got = await asyncio.gather(*(failing.get("x") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(e, LookupError) for e in got)
        query = Counted(takes=0.1)
        infos = Coalesced(query, gap=0.0)
        impatient = asyncio.ensure_future(asyncio.wait_for(infos.get("a"), 0.02))
        patient = asyncio.ensure_future(infos.get("a"))
        with pytest.raises(TimeoutError):
            await impatient
        assert await patient == 1 and query.made == 1
        infos.forget("a")
        assert not infos._keys

    asyncio.run(main())


def test_closing_cancels_queries_under_way_and_their_callers_end() -> None:
    async def main() -> None:
        infos = Coalesced(Counted(takes=10), gap=0.0)
        caller = asyncio.ensure_future(infos.get("a"))
        await asyncio.sleep(0.01)
        infos.close()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 2)

    asyncio.run(main())
