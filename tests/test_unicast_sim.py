"""A unicast layer of 1,000 members, simulated in one process through the sans-IO routing and
directory cores (bench.layer_sim): it converges, routes every pair on a shortest path and finds
every name; messages per member and the convergence time are printed (run with -s).
"""

from __future__ import annotations

import collections

import pytest

from bench import layer_sim

MEMBERS = 1000


@pytest.mark.timeout(600)
def test_a_layer_of_1000_members_converges_routes_every_pair_and_finds_every_name() -> None:
    graph = layer_sim.ring_with_chords(MEMBERS)
    sim = layer_sim.LayerSim(graph)
    sim.boot()
    sim.run(1.0)
    assert sim.converged_at is not None
    members = list(sim.members.values())
    assert len({sim.lsdb_digest(m) for m in members}) == 1  # every LSDB the same
    assert all(len(m.lsdb.db) == MEMBERS for m in members)
    assert next(sim.unrouted(), None) is None  # every next hop one hop closer, for every pair
    # a join storm costs each member a few tables, not one per member heard of
    assert max(m.tables for m in members) <= 3
    addrs = list(sim.members)
    names = [m.name for m in members]
    pairs = [(addrs[i], names[(i * 7 + 1) % MEMBERS]) for i in range(MEMBERS)]  # every name, asked once
    pairs += [(addrs[0], name) for name in names if name != names[0]]  # ... and all from one member
    found = sim.lookup_all(pairs)
    wrong = [(a, name, found.get((a, name))) for a, name in pairs if found.get((a, name)) != [sim.by_name[name]]]
    assert not wrong, wrong[:5]
    sent = collections.Counter[str]()
    for m in members:
        sent.update(m.sent)
    print(
        f"{MEMBERS} members: LSDBs identical at {sim.converged_at * 1e3:.0f} ms simulated "
        f"(diameter {layer_sim.diameter(graph)} hops); per member: "
        f"{ {k: round(v / MEMBERS, 1) for k, v in sent.items()} }; dropped on the way: {sim.dropped}"
    )
    # the directory's traffic is small next to the flood: a few stores and lookups per member
    assert sent["DhtStore"] / MEMBERS < 4 * 8


def test_a_small_layer_converges_after_a_member_is_gone() -> None:
    """Links to a member that left are routed around at the next ls_t_recalc; its LSU expires."""
    graph = layer_sim.ring_with_chords(30, chords=0)
    sim = layer_sim.LayerSim(graph)
    sim.boot()
    sim.run(1.0)
    gone = next(iter(sim.members))
    sim.leave(gone)
    sim.run(sim.now + 70.0)  # past ls_t_recalc (4 s) and ls_t_timeo (60 s)
    assert all(gone not in m.lsdb.db for m in sim.members.values())
    assert len({sim.lsdb_digest(m) for m in sim.members.values()}) == 1
    assert next(sim.unrouted(), None) is None
