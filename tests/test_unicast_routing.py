"""Link-state routing of the unicast IPCP, sans-IO: signed LSUs, their bindings to addresses and
names, timers (ls_t_*), and the forwarding tables of the pff policies (simple, lfa, ecmp).

Lsdb instances are wired by hand and flood LSUs to each other as the IPCP would (`receive`
True means "news: flood it on"); time is passed explicitly: no process, socket or sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import deque
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcp.unicast import auth, pff
from ipcp.unicast import messages as um
from ipcp.unicast.messages import signed_part
from ipcp.unicast.routing import MAX_ALL_LINKS, MAX_LINKS, Lsdb, LsTimers

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TIMERS = LsTimers()
TIMEO = TIMERS.timeo


@functools.cache
def ident_of(n: int) -> auth.Identity:
    """Member n's signing key, the same on every call."""
    return auth.Identity.generate()


def lsu(
    src: int, seqno: int, neighbours: list[int], name: str = "", since: float = 0.0, ident: auth.Identity | None = None
) -> um.Lsu:
    """An LSU as member `src` (or the holder of `ident`) signs it."""
    ident = ident or ident_of(src)
    unsigned = um.Lsu(src, seqno, neighbours, name, since, ident.pub)
    return dataclasses.replace(unsigned, sig=ident.sign(signed_part(unsigned)))


class Graph:
    """Lsdb instances wired by hand: set_neighbours floods, receive() == True floods on."""

    def __init__(self, nodes: Iterable[int], policy: str = "link_state") -> None:
        self.db = {n: Lsdb(n, pff.by_name(policy)) for n in nodes}
        self.links: dict[int, set[int]] = {n: set() for n in self.db}
        self.now = 0.0
        self.sent = 0

    def flood(self, origin: int, news: um.Lsu, exclude: int = 0) -> None:
        queue = deque((news, nb, origin) for nb in self.links[origin] if nb != exclude)
        while queue:
            msg, to, came_from = queue.popleft()
            self.sent += 1
            if self.db[to].receive(msg, self.now):
                queue.extend((msg, nb, to) for nb in self.links[to] if nb != came_from)

    def connect(self, edges: Iterable[tuple[int, int]]) -> None:
        for a, b in edges:
            self.links[a].add(b)
            self.links[b].add(a)
            for end in (a, b):
                # what _add_neighbour does on a new management flow: send the whole LSDB
                for held in self.db[end].all():
                    other = b if end == a else a
                    if self.db[other].receive(held, self.now):
                        self.flood(other, held, exclude=end)
            for end in (a, b):
                self.flood(end, self.db[end].set_neighbours(set(self.links[end]), self.now))

    def cut(self, node: int) -> None:
        """`node` dies: its neighbours see their flows go down."""
        neighbours = self.links.pop(node)
        del self.db[node]
        for nb in neighbours:
            self.links[nb].discard(node)
        for nb in neighbours:
            self.flood(nb, self.db[nb].set_neighbours(set(self.links[nb]), self.now))

    def run_until(self, t: float, step: float = 0.5) -> None:
        while self.now < t:
            self.now += step
            for n, db in self.db.items():
                due = db.handle_timer(self.now)
                if due is not None:
                    self.flood(n, due)


def line(n: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(1, n)]


def ring(n: int) -> list[tuple[int, int]]:
    return [*line(n), (n, 1)]


DIAMOND = [(1, 2), (1, 3), (2, 4), (3, 4)]


def test_lsdb_a_one_sided_claim_is_not_a_link() -> None:
    a = Lsdb(1)
    assert a.receive(lsu(2, 1, [1, 3]), 0.0)
    assert a.graph() == {1: set(), 2: set()}  # 1 has not claimed 2; 3 is unknown
    assert a.table() == {}
    a.set_neighbours({2}, 0.0)
    assert a.graph() == {1: {2}, 2: {1}}
    assert a.table() == {2: [2]}
    assert a.receive(lsu(3, 1, [4]), 0.0)  # 3 claims 4, 2 does not claim 3
    assert 3 not in a.table()


def test_lsdb_newer_seqno_wins_and_only_news_is_flooded() -> None:
    a = Lsdb(1)
    assert a.receive(lsu(2, 5, [1]), 0.0) is True
    assert a.receive(lsu(2, 5, [1]), 1.0) is False  # a duplicate: not flooded again
    assert a.receive(lsu(2, 4, [1, 3]), 2.0) is False  # older: ignored
    assert a.db[2].neighbours == {1}
    assert a.receive(lsu(2, 6, [1, 3]), 3.0) is True
    assert a.db[2].neighbours == {1, 3} and a.db[2].seqno == 6


def test_lsdb_our_own_lsu_is_never_news_and_an_older_incarnation_is_outnumbered() -> None:
    a = Lsdb(1)
    first = a.set_neighbours({2}, 0.0)
    assert first.src == 1 and first.neighbours == [2] and first.seqno == 1
    assert a.receive(lsu(1, 40, [7, 8], ident=a.identity), 1.0) is False  # from a previous life of address 1
    assert a.db[1].neighbours == {2}
    assert a.set_neighbours({2, 3}, 2.0).seqno > 40
    with pytest.raises(auth.Forged):  # another key cannot speak for us
        a.receive(lsu(1, 50, [9]), 3.0)
    assert a.forged == 1 and a.set_neighbours({2}, 4.0).seqno < 50


def test_lsdb_entries_expire_unless_renewed() -> None:
    a = Lsdb(1)
    a.set_neighbours({2}, 0.0)
    a.receive(lsu(2, 1, [1]), 0.0)
    a.receive(lsu(3, 1, [2]), 0.0)
    a.take_table(0.0)
    assert a.get_timer() == min(TIMERS.update, TIMERS.timeo)
    a.handle_timer(TIMEO / 2)
    assert a.members == {1, 2, 3}
    assert not a.receive(lsu(2, 1, [1]), TIMEO / 2)  # the same LSU again (a replay) renews nothing
    a.receive(lsu(2, 2, [1]), TIMEO / 2)  # a newer one does
    a.handle_timer(TIMEO + 1)
    assert a.members == {1, 2}
    a.handle_timer(TIMEO * 3)
    assert a.members == {1}  # we never expire ourselves
    assert a.table() == {}


def test_lsdb_lsus_carry_member_names_for_automatic_connects() -> None:
    a = Lsdb(1, name="n1")
    assert a.set_neighbours({2}, 0.0).name == "n1" and a.own().name == "n1"
    a.receive(lsu(2, 1, [1], "n2"), 0.0)
    assert a.names() == {1: "n1", 2: "n2"}
    assert {lsu.src: lsu.name for lsu in a.all()} == {1: "n1", 2: "n2"}


def test_lsdb_a_member_back_at_a_new_address_replaces_its_old_incarnation() -> None:
    a = Lsdb(1, name="n1")
    a.set_neighbours({2}, 0.0)
    a.receive(lsu(2, 1, [1, 3], "n2"), 0.0)
    a.receive(lsu(3, 1, [2], "n3"), 0.0)
    assert a.receive(lsu(9, 1, [2], "n3", ident=ident_of(3)), 1.0)  # n3 rebooted (same key) as 9
    assert a.members == {1, 2, 9} and a.names()[9] == "n3"
    assert a.receive(lsu(4, 1, [2]), 1.0) and 9 in a.members  # unnamed LSUs replace nothing


def test_lsdb_a_takeover_of_a_name_or_address_needs_its_members_key() -> None:
    a = Lsdb(1, name="n1")
    a.receive(lsu(3, 1, [2], "n3"), 0.0)
    with pytest.raises(auth.Forged, match="name 'n3'"):
        a.receive(lsu(9, 1, [2], "n3", since=99.0), 1.0)  # another key, claiming n3 under a new address
    with pytest.raises(auth.Forged, match="address 3"):
        a.receive(lsu(3, 2, [2], "x", ident=ident_of(77)), 1.0)  # another key at 3's address
    with pytest.raises(auth.Forged):
        a.receive(dataclasses.replace(lsu(3, 3, [2], "n3"), neighbours=[2, 4]), 1.0)  # altered on its way
    assert a.members == {1, 3} and a.db[3].seqno == 1 and a.forged == 3
    a.handle_timer(TIMEO + 1)  # once n3 is gone for good, its name is free again
    assert a.receive(lsu(9, 1, [2], "n3", since=99.0), TIMEO + 2)


def test_lsdb_an_old_incarnations_lsu_still_going_round_does_not_undo_the_new_one() -> None:
    n3 = ident_of(3)
    a = Lsdb(1, name="n1")
    a.receive(lsu(3, 1, [2], "n3", since=100.0, ident=n3), 0.0)
    assert a.receive(lsu(9, 1, [2], "n3", since=200.0, ident=n3), 1.0)  # rebooted at 200, now at 9
    assert not a.receive(lsu(3, 7, [2], "n3", since=100.0, ident=n3), 2.0)  # re-flooded by a slower member
    assert 9 in a.members and 3 not in a.members
    b = Lsdb(5, name="n5")  # heard of the new one first, then of the old: keeps the new one
    b.receive(lsu(9, 1, [2], "n3", since=200.0, ident=n3), 0.0)
    assert not b.receive(lsu(3, 1, [2], "n3", since=100.0, ident=n3), 1.0)
    assert b.names() == {5: "n5", 9: "n3"}
    with pytest.raises(auth.Forged):  # nor anyone else under its own name
        b.receive(lsu(4, 1, [2], "n5", since=-1.0), 1.0)


def test_lsdb_renewal_is_due_every_ls_t_update_and_recalc_waits_ls_t_recalc() -> None:
    timers = LsTimers(recalc=2.0, update=5.0, timeo=12.0)
    a = Lsdb(1, timers=timers)
    a.set_neighbours({2}, 0.0)
    assert a.take_table(0.0) == {}
    assert a.get_timer() == 5.0  # the table is fresh: the next renewal is due first
    assert a.handle_timer(4.0) is None
    due = a.handle_timer(5.0)
    assert due is not None and due.src == 1 and due.neighbours == [2] and due.seqno == 2
    assert a.get_timer() == 10.0
    a.receive(lsu(2, 1, [1, 3]), 5.5)
    assert a.take_table(5.5) == {2: [2]}
    a.receive(lsu(3, 1, [2]), 6.0)  # a new link: routed over at once
    assert a.take_table(6.0) == {2: [2], 3: [2]}
    a.receive(lsu(3, 2, []), 6.5)  # a lost one: at the next ls_t_recalc
    assert a.take_table(6.5) is None and a.get_timer() == 8.0
    assert a.take_table(8.0) == {2: [2]}


def test_routing_line_single_next_hop_everywhere() -> None:
    g = Graph(range(1, 6))
    g.connect(line(5))
    assert g.db[1].table() == {2: [2], 3: [2], 4: [2], 5: [2]}
    assert g.db[3].table() == {1: [2], 2: [2], 4: [4], 5: [4]}
    assert g.db[5].table() == {1: [4], 2: [4], 3: [4], 4: [4]}
    for n, db in g.db.items():
        assert db.members == set(range(1, 6)), n


def test_routing_ring_link_state_takes_the_shorter_way_round() -> None:
    g = Graph(range(1, 7))
    g.connect(ring(6))
    t = g.db[1].table()
    assert t[2] == [2] and t[3] == [2] and t[5] == [6] and t[6] == [6]
    assert t[4] in ([2], [6])  # opposite: two equal ways, link_state keeps one
    assert all(len(hops) == 1 for hops in t.values())


def test_routing_diamond_link_state_keeps_one_of_two_equal_next_hops() -> None:
    g = Graph(range(1, 5))
    g.connect(DIAMOND)
    t = g.db[1].table()
    assert t == {2: [2], 3: [3], 4: [2]}  # sorted: the lowest address of the two


def test_routing_diamond_ecmp_keeps_both_equal_next_hops() -> None:
    g = Graph(range(1, 5), "ecmp")
    g.connect(DIAMOND)
    assert g.db[1].table() == {2: [2], 3: [3], 4: [2, 3]}
    assert g.db[4].table() == {1: [2, 3], 2: [2], 3: [3]}
    assert g.db[2].table() == {1: [1], 3: [1, 4], 4: [4]}


def test_routing_ring_ecmp_only_splits_over_equal_costs() -> None:
    g = Graph(range(1, 7), "ecmp")
    g.connect(ring(6))
    assert g.db[1].table() == {2: [2], 3: [2], 4: [2, 6], 5: [6], 6: [6]}


def test_routing_diamond_lfa_adds_the_loop_free_alternate() -> None:
    g = Graph(range(1, 5), "lfa")
    g.connect(DIAMOND)
    assert g.db[1].table() == {2: [2], 3: [3], 4: [2, 3]}


def test_routing_ring_lfa_adds_only_alternates_that_cannot_loop_back() -> None:
    g = Graph(range(1, 6), "lfa")
    g.connect(ring(5))  # 1-2-3-4-5-1
    t = g.db[1].table()
    # to 3: primary 2; 5 reaches 3 over 4 (2 hops) < 5->1->3 (3 hops): loop-free
    assert t[3] == [2, 5]
    # to 2: 5's shortest path to 2 runs back through 1: not an alternate
    assert t[2] == [2]
    assert t[4] == [5, 2] and t[5] == [5]


def test_routing_reroutes_around_a_dead_member() -> None:
    g = Graph(range(1, 5))
    g.connect(ring(4))
    via = g.db[1].table()[3][0]
    other = ({2, 4} - {via}).pop()
    g.cut(via)
    assert g.db[1].table() == {3: [other], other: [other]}
    assert g.db[3].table() == {1: [other], other: [other]}
    assert via in g.db[1].members  # its stale LSU lingers until it expires...
    g.run_until(TIMEO + 2)
    assert via not in g.db[1].members  # ...then it is forgotten


def test_routing_flooding_stops_once_everyone_knows() -> None:
    g = Graph(range(1, 11))
    g.connect([*ring(10), (1, 6), (3, 8)])
    before = g.sent
    g.flood(4, g.db[4].set_neighbours(g.links[4], g.now))
    # each of the 12 links carries the news at most once in each direction
    assert g.sent - before <= 2 * 12
    assert all(db.db[4].seqno == g.db[4].seqno for db in g.db.values())


def test_routing_stays_converged_over_many_refresh_periods() -> None:
    g = Graph(range(1, 6))
    g.connect(line(5))
    g.run_until(TIMEO * 3)
    assert g.db[1].table() == {2: [2], 3: [2], 4: [2], 5: [2]}
    assert g.db[1].members == set(range(1, 6))


def test_routing_renewal_outnumbers_an_older_incarnation() -> None:
    a = Lsdb(1)
    a.set_neighbours({2}, 0.0)
    a.receive(lsu(1, 40, [7], ident=a.identity), 1.0)
    due = a.handle_timer(TIMERS.update + 1)
    assert due is not None and due.seqno > 40


@FUZZ
@given(
    st.lists(
        st.builds(
            lsu,
            st.integers(0, 12),  # (negative addresses never decode: test_unicast_addresses)
            st.integers(-(2**64), 2**64),
            st.lists(st.integers(0, 12), max_size=6),
            st.sampled_from(["", "a", "b"]),
            st.floats(allow_nan=True),
            st.sampled_from([ident_of(i) for i in range(3)]),
        ),
        max_size=30,
    ),
    st.sampled_from(["link_state", "lfa", "ecmp"]),
)
def test_fuzz_lsdb_takes_any_lsus_and_routes_only_over_known_two_way_links(lsus: list[um.Lsu], policy: str) -> None:
    a = Lsdb(1, pff.by_name(policy))
    a.set_neighbours({2, 3}, 0.0)
    for t, msg in enumerate(lsus):
        with contextlib.suppress(auth.Forged):
            a.receive(msg, float(t))
    graph = a.graph()
    for x, nbs in graph.items():
        for y in nbs:
            assert x in graph[y]
    for dst, hops in a.table().items():
        assert dst != 1 and hops and set(hops) <= graph[1] and dst in a.members


def test_pff_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'ospf'"):
        pff.by_name("ospf")


def test_lsdb_tables_come_at_most_every_holdoff_in_a_join_storm() -> None:
    """A new link is routed over at once, but within HOLDOFF of the last table only once it has
    passed: a storm of members joining costs a few tables, not one each."""
    from ipcp.unicast.routing import HOLDOFF

    a = Lsdb(1)
    a.set_neighbours({2}, 0.0)
    a.receive(lsu(2, 1, [1]), 0.0)
    assert a.take_table(0.0) == {2: [2]}
    for n in range(3, 30):  # members behind 2 join one after the other, 1 ms apart
        a.receive(lsu(n, 1, [2]), 0.001 * n)
        a.receive(lsu(2, n, [1, *range(3, n + 1)]), 0.001 * n)
        assert a.take_table(0.001 * n) is None
    assert a.get_timer() == HOLDOFF
    table = a.take_table(HOLDOFF)
    assert table is not None and set(table) == set(range(2, 30))


def test_lsdb_holds_a_bounded_number_of_links_in_all_so_every_table_stays_cheap() -> None:
    """A member may make up keys and addresses (up to 4,096 members) and give each an LSU of 1,024
    neighbours, all two-way: 4 million links took 260 MB at every member of the layer and seconds of
    its loop for every table (ls_t_recalc). All LSUs together claim at most MAX_ALL_LINKS; an LSU past
    that is refused and counted, one that claims fewer is always taken, and real members route on."""
    db = Lsdb(1)
    assert db.receive(lsu(2, 1, [1, 3]), 0.0) and db.receive(lsu(3, 1, [2]), 0.0)
    made_up = range(100, 100 + MAX_ALL_LINKS // MAX_LINKS + 8)
    for src in made_up:  # each claims the others, and addresses beyond up to MAX_LINKS
        others = [a for a in made_up if a != src]
        db.receive(lsu(src, 1, [*others, *range(src << 12, (src << 12) + MAX_LINKS - len(others))]), 0.0)
    held = sum(len(e.neighbours) for e in db.db.values())
    assert held <= MAX_ALL_LINKS and db.refused >= 8
    assert db.receive(lsu(2, 2, [1, 3]), 1.0)  # a real member's renewal is news as ever
    assert db.receive(lsu(100, 2, [101]), 1.0)  # and fewer links are taken whatever the total
    db.set_neighbours({2}, 1.0)
    assert db.table()[3] == [2]
