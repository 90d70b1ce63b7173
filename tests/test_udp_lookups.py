"""The udp shim's names from outside its layer (as Ouroboros 0.23: getaddrinfo on the hash's hex, so
/etc/hosts and the system's resolver), against a resolver the test holds: no DNS is asked.

Each name the layer did not know started a lookup that waited behind 4 running at once, and ran even
after nobody waited for its answer any more: with a resolver that does not answer, the lookups queued
without bound (one task each), and a name /etc/hosts has waited behind them until its query timed out.
Now /etc/hosts and literal addresses answer at once, at most LOOKUP_QUEUE lookups wait for the
resolver (past them a name is not looked up, and the allocation says so), and a lookup nobody waits
for any more leaves the queue.

The IPCP runs in this process, on a loopback address, with no IRMd.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from helpers import free_port

from ipcp import udp as udp_ipcp
from ipcp.lookups import HostsFile, Lookups, LookupsBusy
from proto.qos import QosSpec
from transports import udp
from transports.channel import HandlerError

pytestmark = pytest.mark.timeout(90)

IP = "127.0.0.1"
HOSTS_IP = "127.0.0.9"


def digest(name: str) -> bytes:
    return hashlib.md5(name.encode()).digest()


class HeldResolver:
    """getaddrinfo's stand-in: what `answers` holds comes back at once (as from /etc/hosts or a DNS cache);
    every other name waits until `release` is set (a DNS server that does not answer), then is not found."""

    def __init__(self, answers: dict[str, str] | None = None) -> None:
        self.answers = answers or {}
        self.release = threading.Event()
        self.asked: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, version: int) -> str | None:
        with self._lock:
            self.asked.append(name)
        if name in self.answers:
            return self.answers[name]
        self.release.wait(60)
        return None


@asynccontextmanager
async def shim(resolver: HeldResolver, hosts: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[udp_ipcp.UdpIpcp]:
    """A udp4 IPCP of this process whose resolver is `resolver` and whose /etc/hosts is `hosts`."""
    monkeypatch.setattr(udp, "lookup", resolver)
    monkeypatch.setattr(udp_ipcp, "HOSTS", hosts, raising=False)
    ipcp = udp_ipcp.UdpIpcp("u", Path("/nonexistent"))
    await ipcp.bootstrap("lan", {"ip": IP, "port": str(free_port([IP]))})
    try:
        yield ipcp
    finally:
        resolver.release.set()
        await ipcp.stop()
        for task in list(ipcp._tasks):
            task.cancel()


async def settled(count: Callable[[], int], quiet: float = 0.5, within: float = 30.0) -> int:
    """`count()` once it stopped moving for `quiet` s."""
    end = time.monotonic() + within
    last = count()
    while time.monotonic() < end:
        await asyncio.sleep(quiet)
        if (now := count()) == last:
            return now
        last = now
    return last


def test_a_name_in_etc_hosts_does_not_wait_behind_lookups_the_resolver_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# a comment\n{HOSTS_IP}\t{digest('printer').hex()} printer-alias\n")
    resolver = HeldResolver({digest("printer").hex(): HOSTS_IP})  # getaddrinfo reads /etc/hosts too

    async def main() -> None:
        async with shim(resolver, hosts, monkeypatch) as ipcp:
            held = [asyncio.ensure_future(ipcp.query(digest(f"slow{i}"))) for i in range(20)]
            await asyncio.sleep(0.2)  # their lookups hold the resolver
            assert await ipcp.query(digest("printer")), "a name in /etc/hosts waited behind the resolver"
            assert ipcp.core is not None and ipcp.core.resolved(digest("printer"), time.monotonic()) == (
                HOSTS_IP,
                ipcp.core.own[1],
            )
            assert not any(await asyncio.gather(*held))

    asyncio.run(main())


def test_lookups_nobody_waits_for_are_dropped_and_the_queue_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 names the resolver holds: a few are asked, at most the queue's bound wait, the rest are not
    looked up (counted, and an allocation says why); once their queries are over, those waiting are
    dropped: the resolver, answering again, is asked for none of them, and a name it knows resolves."""
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    resolver = HeldResolver({digest("known").hex(): "127.0.0.8"})

    async def main() -> None:
        async with shim(resolver, hosts, monkeypatch) as ipcp:
            names = [digest(f"made-up-{i}") for i in range(200)]
            held = [asyncio.ensure_future(ipcp.query(d)) for d in names]
            await asyncio.sleep(0.2)
            with pytest.raises(HandlerError) as refused:
                await ipcp.flow_alloc(1, digest("one-more"), QosSpec(), 5.0, b"")
            assert refused.value.code == "ENOENT" and "resolver" in refused.value.text, refused.value.text
            counters = ipcp.counters()
            assert counters["names not looked up (resolver busy)"] == 200 + 1 - udp_ipcp.LOOKUPS - udp_ipcp.LOOKUP_QUEUE
            assert not any(await asyncio.gather(*held))  # the layer's queries timed out: nobody waits now
            resolver.release.set()
            asked = await settled(lambda: len(resolver.asked))
            assert asked == udp_ipcp.LOOKUPS, f"the resolver was asked {asked} names nobody waited for any more"
            assert ipcp.counters()["lookups dropped (nobody waiting)"] == udp_ipcp.LOOKUP_QUEUE
            assert await ipcp.query(digest("known"))  # the resolver serves again

    asyncio.run(main())


def test_the_hosts_file_is_read_again_when_it_changes_and_never_blocks(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.5 AbC  other # comment\n::1 abc\nnot-an-address abc\n")
    table = HostsFile(hosts, 4)
    assert (table.get("abc"), table.get("other"), table.get("none")) == ("127.0.0.5", "127.0.0.5", None)
    assert HostsFile(hosts, 6).get("abc") == "::1"
    hosts.write_text("127.0.0.6 abc\n")
    assert table.get("abc") == "127.0.0.6"
    hosts.unlink()
    os.mkfifo(hosts)  # nobody writes it: a read would wait for ever
    assert table.get("abc") is None


def test_a_queued_lookup_leaves_the_queue_when_its_asker_gives_up() -> None:
    resolver = HeldResolver()

    async def main() -> None:
        lookups = Lookups(lambda name: resolver(name, 4), running=1, queued=2)
        first = asyncio.ensure_future(lookups.ask("a"))
        queued = [asyncio.ensure_future(lookups.ask(n)) for n in ("b", "c")]
        await asyncio.sleep(0.1)
        with pytest.raises(LookupsBusy):
            await lookups.ask("d")
        assert (lookups.waiting, lookups.refused) == (2, 1)
        queued[0].cancel()
        await asyncio.gather(queued[0], return_exceptions=True)
        assert (lookups.waiting, lookups.dropped) == (1, 1)
        resolver.release.set()
        assert await first is None and await queued[1] is None
        assert resolver.asked == ["a", "c"]

    asyncio.run(main())
