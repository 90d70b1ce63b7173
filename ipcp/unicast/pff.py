"""Forwarding-table policies of a unicast layer (Ouroboros's pff): from the layer's graph to the
next hops per destination, and whether the data path spreads flows over them.

simple (routing link_state): one next hop per destination, the first of the shortest paths;
lfa: that hop, then loop-free alternates; ecmp: every next hop on an equal-cost shortest path.
"""

from __future__ import annotations

from typing import Protocol

Graph = dict[int, set[int]]
Table = dict[int, list[int]]  # destination -> next hops, best first


class Pff(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def spread(self) -> bool: ...  # the data path spreads flows over the next hops (else: the first that is up)

    def table(self, graph: Graph, me: int) -> Table: ...


class Simple:
    name = "link_state"
    spread = False

    def table(self, graph: Graph, me: int) -> Table:
        _, first = dijkstra(graph, me)
        return {dst: [min(hops)] for dst, hops in first.items() if dst != me and hops}


class Ecmp:
    name = "ecmp"
    spread = True

    def table(self, graph: Graph, me: int) -> Table:
        _, first = dijkstra(graph, me)
        return {dst: sorted(hops) for dst, hops in first.items() if dst != me and hops}


class Lfa:
    """Loop-free alternates (RFC 5286): a neighbour n is one for dst if its own shortest path to
    dst does not come back through us: dist(n, dst) < dist(n, me) + dist(me, dst)."""

    name = "lfa"
    spread = False

    def table(self, graph: Graph, me: int) -> Table:
        dist, first = dijkstra(graph, me)
        from_nb = {n: dijkstra(graph, n)[0] for n in sorted(graph.get(me, ()))}
        table: Table = {}
        for dst, hops in first.items():
            if dst == me or not hops:
                continue
            primary = min(hops)
            alternates = [
                n
                for n, dn in from_nb.items()
                if n != primary and dst in dn and dn[dst] < dn.get(me, 1 << 30) + dist[dst]
            ]
            table[dst] = [primary, *alternates]
        return table


POLICIES: dict[str, type[Simple] | type[Ecmp] | type[Lfa]] = {p.name: p for p in (Simple, Lfa, Ecmp)}


def by_name(name: str) -> Pff:
    try:
        policy: Pff = POLICIES[name]()
        return policy
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}: expected one of {', '.join(POLICIES)}") from None


def dijkstra(g: Graph, src: int) -> tuple[dict[int, int], dict[int, set[int]]]:
    """Distances from src, and for each node every first hop on a shortest path to it. Every link
    costs the same, so a breadth-first search, level by level; first-hop sets are shared between
    nodes until two paths merge (then a new set), never copied per node."""
    dist = {src: 0}
    first: dict[int, set[int]] = {src: set()}
    level, d = [src], 0
    while level:
        d += 1
        below: list[int] = []
        for node in level:
            hops = first[node]
            for nb in g.get(node, ()):
                seen = dist.get(nb)
                if seen is None:
                    dist[nb] = d
                    first[nb] = {nb} if node == src else hops
                    below.append(nb)
                elif seen == d and node != src and not hops <= first[nb]:
                    first[nb] = first[nb] | hops
        level = below
    return dist, first
