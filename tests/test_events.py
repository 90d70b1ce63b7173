"""The event API (FlowSet, EventQueue, fevent) and the asyncio adapter, over the local layer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import BIN, IrmdProc

from flowlib import aio
from flowlib.errors import FlowDown, NameNotFound
from flowlib.events import EventQueue, EventType, FlowSet, fevent
from flowlib.flow import Flow
from flowlib.irm import IrmClient


def poll_events(fset: FlowSet, want: int, timeout: float) -> list[tuple[Flow, EventType]]:
    """fevent until `want` events were seen or `timeout` passed."""
    got: list[tuple[Flow, EventType]] = []
    q = EventQueue()
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        fevent(fset, q, max(deadline - time.monotonic(), 0))
        got += [(e.flow, e.type) for e in q]
    return got


def listening_set(server: IrmClient) -> FlowSet:
    fset = FlowSet(server)
    fset.listen()
    return fset


def test_fevent_times_out_with_no_events(client_factory: Callable[[], IrmClient], bound_name: str) -> None:
    fset = listening_set(client_factory())
    start = time.monotonic()
    assert fevent(fset, EventQueue(), 0.2) == 0
    assert 0.15 < time.monotonic() - start < 2
    fset.close()


def test_listening_set_reports_an_arriving_flow_as_alloc_and_adds_it(
    client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    fset = listening_set(client_factory())
    client = client_factory()
    cli = Flow(*client.alloc(bound_name, None, 10), client)
    q = EventQueue()
    assert fevent(fset, q, 5) == 1
    ev = q.next()
    assert ev is not None and ev.type is EventType.ALLOC
    assert ev.flow in fset and ev.flow.name == bound_name
    assert q.next() is None
    cli.close()
    ev.flow.close()
    fset.close()


def test_fevent_reports_pkt_for_a_flow_with_data(client_factory: Callable[[], IrmClient], bound_name: str) -> None:
    fset = listening_set(client_factory())
    client = client_factory()
    cli = Flow(*client.alloc(bound_name, None, 10), client)
    q = EventQueue()
    fevent(fset, q, 5)
    (srv,) = [e.flow for e in q]
    cli.write(b"data")
    assert fevent(fset, q, 5) == 1
    assert [(e.flow, e.type) for e in q] == [(srv, EventType.PKT)]
    assert srv.read() == b"data"
    cli.close()
    srv.close()
    fset.close()


def test_removed_flow_no_longer_reports_events(client_factory: Callable[[], IrmClient], bound_name: str) -> None:
    fset = listening_set(client_factory())
    client = client_factory()
    cli = Flow(*client.alloc(bound_name, None, 10), client)
    q = EventQueue()
    fevent(fset, q, 5)
    (srv,) = [e.flow for e in q]
    fset.remove(srv)
    cli.write(b"ignored")
    assert fevent(fset, q, 0.2) == 0
    assert len(fset) == 0
    cli.close()
    srv.close()
    fset.close()


def arrivals(fsets: list[FlowSet], n: int) -> list[int]:
    """How many of `n` arriving flows each set got (flows closed after counting)."""
    counts = [0] * len(fsets)
    deadline = time.monotonic() + 10
    while sum(counts) < n and time.monotonic() < deadline:
        for i, fset in enumerate(fsets):
            for _, kind in poll_events(fset, 1, 0.05):
                assert kind is EventType.ALLOC
                counts[i] += 1
    return counts


def test_round_robin_name_spreads_flows_over_its_servers(
    client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    servers = [listening_set(client_factory()), listening_set(client_factory())]
    client = client_factory()
    flows = [Flow(*client.alloc(bound_name, None, 10), client) for _ in range(4)]
    assert arrivals(servers, 4) == [2, 2]
    for flow in flows:
        flow.close()
    for fset in servers:
        for flow in fset:
            flow.close()
        fset.close()


def test_spillover_name_gives_every_flow_to_its_first_server(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    irmd.irm_ok("name", "create", "spill", "lb", "spillover")
    irmd.irm_ok("bind", "process", str(os.getpid()), "name", "spill")
    irmd.irm_ok("name", "register", "spill", "layer", local_layer)
    servers = [listening_set(client_factory()), listening_set(client_factory())]
    client = client_factory()
    flows = [Flow(*client.alloc("spill", None, 10), client) for _ in range(3)]
    assert arrivals(servers, 3) == [3, 0]
    for flow in flows:
        flow.close()
    for fset in servers:
        for flow in fset:
            flow.close()
        fset.close()


@pytest.mark.timeout(120)
def test_one_thread_serves_a_thousand_concurrent_flows_through_one_flow_set(
    client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    n = 1000
    server, client = client_factory(), client_factory()
    fset = listening_set(server)
    stop = threading.Event()
    served: dict[str, int] = {"alloc": 0, "pkt": 0}

    def serve() -> None:
        q = EventQueue()
        while not stop.is_set():
            fevent(fset, q, 0.1)
            for ev in q:
                if ev.type is EventType.ALLOC:
                    served["alloc"] += 1
                elif ev.type is EventType.PKT:
                    ev.flow.write(ev.flow.read())
                    served["pkt"] += 1
                else:
                    fset.remove(ev.flow)
                    ev.flow.close()

    thread = threading.Thread(target=serve, name="one-server", daemon=True)
    thread.start()
    flows: list[Flow] = []
    try:
        with ThreadPoolExecutor(8) as pool:
            flows = list(pool.map(lambda _: Flow(*client.alloc(bound_name, None, 30), client), range(n)))
        assert len({f.flow_id for f in flows}) == n
        index = {flow: i for i, flow in enumerate(flows)}
        for flow, i in index.items():
            flow.write(f"sdu {i}".encode())
        replies = FlowSet(client)
        for flow in flows:
            replies.add(flow)
        got: dict[int, bytes] = {}
        q = EventQueue()
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline:
            fevent(replies, q, 1)
            for ev in q:
                assert ev.type is EventType.PKT
                got[index[ev.flow]] = ev.flow.read()
                replies.remove(ev.flow)
        replies.close()
        assert got == {i: f"sdu {i}".encode() for i in range(n)}
        assert thread.is_alive()
        stop.set()
        thread.join(10)
        assert served == {"alloc": n, "pkt": n}
    finally:
        stop.set()
        thread.join(10)
        for flow in flows:
            flow.close()
        for flow in fset:
            flow.close()
        fset.close()


# -- asyncio ----------------------------------------------------------------------


async def _alloc_when_accepting(name: str) -> aio.AsyncFlow:
    deadline = time.monotonic() + 5
    while True:
        try:
            return await aio.flow_alloc(name, timeout=10)
        except NameNotFound as e:
            if "no process is accepting" not in str(e) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


@pytest.mark.usefixtures("default_client")
def test_asyncio_adapter_echoes_over_a_flow(bound_name: str) -> None:
    async def main() -> None:
        accepting = asyncio.create_task(aio.flow_accept(timeout=10))
        client = await _alloc_when_accepting(bound_name)
        server = await asyncio.wait_for(accepting, 15)

        async def echo() -> None:
            try:
                while True:
                    await server.write(await server.read())
            except FlowDown:
                pass

        echoing = asyncio.create_task(echo())
        async with client:
            for i in range(50):
                msg = f"message {i}".encode() * (i + 1)
                await client.write(msg)
                assert await asyncio.wait_for(client.read(), 5) == msg
        await asyncio.wait_for(echoing, 5)
        server.close()

    asyncio.run(main())


@pytest.mark.usefixtures("default_client")
def test_asyncio_read_waits_without_blocking_the_loop(bound_name: str) -> None:
    async def main() -> None:
        accepting = asyncio.create_task(aio.flow_accept(timeout=10))
        client = await _alloc_when_accepting(bound_name)
        server = await asyncio.wait_for(accepting, 15)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        reading = asyncio.create_task(server.read())
        await asyncio.sleep(0.2)
        assert not reading.done() and ticks >= 5
        await client.write(b"now")
        assert await asyncio.wait_for(reading, 5) == b"now"
        ticker.cancel()
        client.close()
        server.close()

    asyncio.run(main())


ONE_SHOT_CLIENT = """
import sys
from flowlib import flow_alloc
f = flow_alloc(sys.argv[1], timeout=5)
f.set_timeout(3)
f.write(sys.argv[2].encode())
print(f.read().decode(), flush=True)
sys.stdin.read()  # hold the flow until told to go
"""


def fill_fd_holes_below(fd: int) -> list[int]:
    """Occupy every free descriptor number below `fd`, so the next new descriptor is `fd`."""
    held = []
    while (probe := os.dup(0)) < fd:
        held.append(probe)
    os.close(probe)
    assert probe == fd, f"descriptor {fd} is still in use"
    return held


def test_a_flow_closed_without_removal_does_not_hide_a_new_flow_reusing_its_fd(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    fset = listening_set(client_factory())
    clients: list[subprocess.Popen[str]] = []

    def connect(word: str) -> Flow:
        proc = subprocess.Popen(
            [str(BIN / "python"), "-c", ONE_SHOT_CLIENT, bound_name, word],
            env=irmd.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        clients.append(proc)
        events = poll_events(fset, 1, 10)
        assert [t for _, t in events] == [EventType.ALLOC]
        return events[0][0]

    held: list[int] = []
    try:
        first = connect("one")
        assert poll_events(fset, 1, 5) == [(first, EventType.PKT)]
        first.write(first.read())
        old_fd = first.fd
        first.close()  # hung up, but not removed from the set
        held = fill_fd_holes_below(old_fd)

        second = connect("two")
        assert second.fd == old_fd  # the situation under test: the number was reused
        assert second in fset
        assert poll_events(fset, 1, 5) == [(second, EventType.PKT)]
        second.write(second.read())
        assert clients[1].stdout is not None and clients[1].stdout.readline().strip() == "two"
        second.close()
    finally:
        for fd in held:
            os.close(fd)
        for proc in clients:
            proc.kill()
            proc.wait()
        fset.close()
