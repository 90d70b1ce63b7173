"""A unicast layer of 10 and 20 members in a ring-plus-chords topology, one IRMd per member on
loopback: it forms, converges (every member reaches every other by name), survives two
members crashing, and stays converged once their LSUs have expired (ls_t_timeo scaled down).

Each member i is a host: an IRMd, a udp4 shim on 127.0.0.i (member 1's shim is every
shim's peer), a unicast IPCP n<i> in layer "net" and an echo server for the name m<i>.
Member 1 bootstraps; the others enroll through n1 and connect to their ring successor
and chords. Reachability is checked pair by pair from this process (flowlib clients on
each member's IRMd socket, in a thread pool): allocate a flow to m<j>, echo a packet.

Measured (printed; run with -s): convergence time from the last connect until every pair
has echoed once, and recovery time from the crash until every surviving pair has. Both
are upper bounds: one probe round over all pairs takes several seconds by itself (each
allocation waits ~1 s for the udp layer to answer that it does not know the name).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import wait_for
from unicast_net import Cluster, Host, echo_once

from proto import messages as m

# Link-state timers scaled down from C's 15 s and 60 s, so that dead members' LSUs expire in seconds.
LS_TIMERS = {"ls_t_update": "2", "ls_t_timeo": "8"}
# Layer sizes to run: 20 by default (about 2 minutes); UNICAST_SCALE_SIZES=10,20 measures both.
SIZES = [int(n) for n in os.environ.get("UNICAST_SCALE_SIZES", "20").split(",")]
WORKERS = 48  # concurrent pair checks (each allocation waits ~1 s for the udp layer's negative answer)


def topology(n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Ring edges (i, i+1) and chords (i, i+n/2) every third member; members are 1..n."""
    ring = [(i, i % n + 1) for i in range(1, n + 1)]
    chords = [(i, (i - 1 + n // 2) % n + 1) for i in range(1, n // 2 + 1, 3)]
    return ring, chords


def connected(members: set[int], edges: list[tuple[int, int]]) -> bool:
    adj: dict[int, set[int]] = {v: set() for v in members}
    for a, b in edges:
        if a in members and b in members:
            adj[a].add(b)
            adj[b].add(a)
    start = next(iter(members))
    seen, todo = {start}, deque([start])
    while todo:
        for nb in adj[todo.popleft()] - seen:
            seen.add(nb)
            todo.append(nb)
    return seen == members


def in_parallel(jobs: Sequence[tuple[Any, ...]], fn: Callable[..., object]) -> None:
    errors: list[BaseException] = []

    def run(args: tuple[object, ...]) -> None:
        try:
            fn(*args)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def reach_all(members: dict[int, Host], within: float, what: str) -> float:
    """Poll until every ordered pair of `members` has echoed once; the seconds it took."""
    start = time.monotonic()
    pending = {(s, d) for s in members for d in members if s != d}
    why: dict[tuple[int, int], str] = {}
    rounds = 0
    with ThreadPoolExecutor(WORKERS) as pool:
        while pending:
            left = within - (time.monotonic() - start)
            assert left > 0, (
                f"{what}: {len(pending)} of {len(members) * (len(members) - 1)} pairs still "
                f"unreachable after {within} s, e.g. {sorted(why.items())[:5]}"
            )
            rounds += 1
            batch = sorted(pending)
            wait = min(10.0, left)
            results = pool.map(lambda p, wait=wait: echo_once(members[p[0]].irmd.sock, f"m{p[1]}", wait), batch)
            for pair, err in zip(batch, results, strict=True):
                if err:
                    why[pair] = err
                else:
                    pending.discard(pair)
                    why.pop(pair, None)
            if pending:
                kinds: dict[str, int] = {}
                for pair in pending:  # errors by kind, with the pair (source, destination) of the first
                    kind = why[pair].split(" via ")[0]
                    kinds[kind] = kinds.get(kind, 0) + 1
                detail = {pair: why[pair] for pair in sorted(pending)[:4]}
                print(
                    f"{what}: round {rounds} at {time.monotonic() - start:.1f} s: {len(pending)} pairs failed: "
                    f"{kinds}; e.g. {detail}"
                )
                time.sleep(0.5)
    took = time.monotonic() - start
    print(f"{what}: all {len(members) * (len(members) - 1)} pairs reachable after {took:.1f} s ({rounds} rounds)")
    return took


@pytest.mark.timeout(600)
@pytest.mark.parametrize("n", SIZES)
def test_ring_with_chords_converges_and_survives_two_crashes(cluster: Cluster, n: int) -> None:
    ring, chords = topology(n)
    dead = {n // 4 + 1, 3 * n // 4}
    assert 1 not in dead and connected(set(range(1, n + 1)) - dead, ring + chords), "the test's own topology"
    t0 = time.monotonic()
    hosts = dict(enumerate(cluster.start([f"h{i:02}" for i in range(1, n + 1)], parallel=True), start=1))
    cluster.udp([hosts[1]], cli=False)
    in_parallel([(hosts[i],) for i in range(2, n + 1)], lambda h: cluster.udp([h], cli=False))
    hosts[1].request(m.IpcpBootstrap("n1", "net", "unicast", True, LS_TIMERS))

    def enroll(i: int) -> None:
        hosts[i].request(m.IpcpEnroll(f"n{i}", "net", "n1", "unicast", True))
        hosts[i].start_echo(f"m{i}")

    enroll_in = time.monotonic()
    in_parallel([(i,) for i in range(2, n + 1)], enroll)
    hosts[1].start_echo("m1")
    print(
        f"n={n}: {n} irmds, udp layer and {n - 1} enrollments in {time.monotonic() - t0:.1f} s "
        f"(enrollments {time.monotonic() - enroll_in:.1f} s)"
    )

    def connect(a: int, b: int) -> None:
        hosts[a].request(m.IpcpConnect(f"n{a}", f"n{b}"))

    connect_in = time.monotonic()
    # each IPCP starts at most one connect at a time: ring successors, then chords
    in_parallel(ring, connect)
    in_parallel(chords, connect)
    for h in hosts.values():
        h.irmd.note_children()
    print(f"n={n}: {len(ring) + len(chords)} connects in {time.monotonic() - connect_in:.1f} s")

    converged = reach_all(hosts, 120, f"n={n} convergence")

    for i in dead:
        cluster.kill(hosts[i], whole_host=True)
    killed_at = time.monotonic()
    alive = {i: h for i, h in hosts.items() if i not in dead}
    recovered = reach_all(alive, 90, f"n={n} after crashing members {sorted(dead)}")
    assert all(h.irmd.alive() for h in alive.values())

    # once the dead members' LSUs have expired everywhere (and the layer has renewed itself since)
    wait_for(
        lambda: all(h.field(f"n{i}", "members") == str(len(alive)) for i, h in alive.items()),
        60,
        "every survivor to forget the dead members",
    )
    expired = time.monotonic() - killed_at
    later = reach_all(alive, 90, f"n={n} {expired:.0f} s after the crash, the dead forgotten")
    print(
        f"n={n}: SUMMARY convergence {converged:.1f} s, recovery {recovered:.1f} s, "
        f"stable check {later:.1f} s, total {time.monotonic() - t0:.1f} s"
    )
