"""Link-state routing, sans-IO: the link-state database, LSU flooding decisions, and the
forwarding table computed from it by Dijkstra under a policy (link_state, lfa, ecmp).
"""

from __future__ import annotations

import dataclasses
import heapq

from ipcp.unicast.messages import Lsu

POLICIES = ("link_state", "lfa", "ecmp")
LSU_REFRESH = 15.0  # re-flood our own LSU this often (Ouroboros's ls_t_update)
LSU_TIMEOUT = 60.0  # forget an LSU not refreshed for this long (ls_t_timeo)


@dataclasses.dataclass
class _Entry:
    seqno: int
    neighbours: frozenset[int]
    seen: float
    name: str = ""
    since: float = 0.0  # when this incarnation of the member started (its own wall clock)


class Lsdb:
    """What this member knows of the layer's graph, and the next hops it implies."""

    def __init__(self, me: int, policy: str = "link_state", name: str = "", since: float = 0.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.me = me
        self.policy = policy
        self.seqno = 0
        self.db: dict[int, _Entry] = {me: _Entry(0, frozenset(), 0.0, name, since)}
        self._last_flood = 0.0

    @property
    def members(self) -> set[int]:
        return set(self.db)

    def names(self) -> dict[int, str]:
        """Members by address, with the names their LSUs gave."""
        return {a: e.name for a, e in self.db.items() if e.name}

    def set_neighbours(self, neighbours: set[int], now: float) -> Lsu:
        """Our adjacencies changed: the LSU to flood."""
        self.seqno += 1
        self.db[self.me] = dataclasses.replace(self.db[self.me], seqno=self.seqno, neighbours=frozenset(neighbours),
                                               seen=now)
        self._last_flood = now
        return self.own()

    def own(self) -> Lsu:
        entry = self.db[self.me]
        return Lsu(self.me, entry.seqno, sorted(entry.neighbours), entry.name, entry.since)

    def all(self) -> list[Lsu]:
        return [Lsu(a, e.seqno, sorted(e.neighbours), e.name, e.since) for a, e in self.db.items()]

    def receive(self, lsu: Lsu, now: float) -> bool:
        """Take an LSU; True if it was news (and so is to be flooded on)."""
        if lsu.src == self.me:
            if lsu.seqno > self.seqno:  # an older incarnation of us: outnumber it
                self.seqno = lsu.seqno
            return False
        entry = self.db.get(lsu.src)
        if entry is not None and lsu.seqno <= entry.seqno:
            if lsu.seqno == entry.seqno:
                entry.seen = now
            return False
        if entry is None and lsu.name:  # a member under a second address: the later incarnation wins
            rivals = [a for a, e in self.db.items() if e.name == lsu.name]
            if any(self.db[a].since > lsu.since for a in rivals):
                return False  # an old one's LSU still going round: it must not undo the new one
            for addr in rivals:
                if addr != self.me:
                    del self.db[addr]
        self.db[lsu.src] = _Entry(lsu.seqno, frozenset(lsu.neighbours), now, lsu.name, lsu.since)
        return True

    def tick(self, now: float) -> tuple[Lsu | None, bool]:
        """(our LSU if due for a refresh flood, whether entries expired)."""
        expired = [a for a, e in self.db.items() if a != self.me and now - e.seen > LSU_TIMEOUT]
        for a in expired:
            del self.db[a]
        due = None
        if now - self._last_flood >= LSU_REFRESH:
            # A refresh must be news to be flooded on, and it outnumbers an old incarnation of us.
            self._last_flood = now
            self.seqno += 1
            entry = self.db[self.me]
            self.db[self.me] = dataclasses.replace(entry, seqno=self.seqno, seen=now)
            due = self.own()
        return due, bool(expired)

    def graph(self) -> dict[int, set[int]]:
        """Links both ends report; a one-sided claim is not a link."""
        g: dict[int, set[int]] = {a: set() for a in self.db}
        for a, e in self.db.items():
            for b in e.neighbours:
                if b in self.db and a in self.db[b].neighbours:
                    g[a].add(b)
        return g

    def table(self) -> dict[int, list[int]]:
        """Destination -> next hops, best first, per the policy."""
        g = self.graph()
        dist, first = _dijkstra(g, self.me)
        table: dict[int, list[int]] = {}
        for dst, hops in first.items():
            if dst == self.me:
                continue
            primary = sorted(hops)
            if self.policy == "link_state":
                table[dst] = primary[:1]
            elif self.policy == "ecmp":
                table[dst] = primary
            else:  # lfa: a neighbour whose own path to dst cannot loop back through us
                alternates = []
                for n in sorted(g[self.me]):
                    if n in primary[:1]:
                        continue
                    dn, _ = _dijkstra(g, n)
                    if dst in dn and dn[dst] < dn.get(self.me, 1 << 30) + dist[dst]:
                        alternates.append(n)
                table[dst] = primary[:1] + alternates
        return table


def _dijkstra(g: dict[int, set[int]], src: int) -> tuple[dict[int, int], dict[int, set[int]]]:
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
