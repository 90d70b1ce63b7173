"""Forwarding-table policies of a unicast layer (Ouroboros's pff): from the layer's graph to the
next hops per destination, and whether the data path spreads flows over them.

simple (routing link_state): one next hop per destination, the first of the shortest paths;
lfa: that hop, then loop-free alternates; ecmp: every next hop on an equal-cost shortest path.
"""

from __future__ import annotations

import heapq
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
            alternates = [n for n, dn in from_nb.items()
                          if n != primary and dst in dn and dn[dst] < dn.get(me, 1 << 30) + dist[dst]]
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
    """Distances from src, and for each node every first hop on a shortest path to it."""
    dist = {src: 0}
    first: dict[int, set[int]] = {src: set()}
    heap = [(0, src)]
    while heap:
        d, node = heapq.heappop(heap)
        if d > dist[node]:
            continue
        for nb in g.get(node, ()):
            nd = d + 1  # every link costs the same
            hops = {nb} if node == src else first[node]
            if nb not in dist or nd < dist[nb]:
                dist[nb] = nd
                first[nb] = set(hops)
                heapq.heappush(heap, (nd, nb))
            elif nd == dist[nb]:
                first[nb] |= hops
    return dist, first
