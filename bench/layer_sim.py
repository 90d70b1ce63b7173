"""A unicast layer of many members in one process: the sans-IO routing (Lsdb) and directory cores
of every member driven over a simulated graph, in simulated time, message by message.

Members boot at once with their adjacencies up (the worst flood: every LSU is news everywhere at
once), flood their signed LSUs, compute forwarding tables, and register one name each. A message
takes LATENCY per hop: LSUs one hop (the management flows), directory messages along the
senders' forwarding tables (dropped, and counted, where a table has no next hop yet). Signatures
are made and checked as the IPCP does; a check of the same signed bytes by another member is
answered from a cache (its result cannot differ), so the run measures the protocol, not Ed25519.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Iterator

from ipcp.unicast import auth, messages, routing
from ipcp.unicast import dir as directory
from ipcp.unicast.dir import Directory
from ipcp.unicast.messages import Lsu
from ipcp.unicast.pff import Table
from ipcp.unicast.routing import Lsdb
from transports.wire import Message

LATENCY = 0.001  # seconds a message takes per hop
SETTLE = 1.0  # simulated seconds a run of lookups is given (each takes a few LATENCY)


@dataclasses.dataclass
class Member:
    addr: int
    name: str
    lsdb: Lsdb
    dir: Directory
    neighbours: set[int]
    table: Table = dataclasses.field(default_factory=dict)
    sent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    tables: int = 0  # forwarding tables computed
    full_at: float | None = None  # when its LSDB first held every member
    wake_at: float = math.inf  # when its timer is armed for


def ring_with_chords(n: int, chords: int = 2, seed: int = 1) -> dict[int, set[int]]:
    """Members 0..n-1 in a ring, each with `chords` more links to random others: a connected graph
    of diameter about log n, as a layer of many members built up by `connect dst auto` would be."""
    rng = random.Random(seed)
    graph: dict[int, set[int]] = {i: set() for i in range(n)}
    for i in range(n):
        graph[i].add((i + 1) % n)
        graph[(i + 1) % n].add(i)
    for i in range(n):
        for _ in range(chords // 2):
            j = rng.randrange(n)
            if j != i:
                graph[i].add(j)
                graph[j].add(i)
    return graph


def diameter(graph: dict[int, set[int]]) -> int:
    """The most hops between two members."""
    most = 0
    for src in graph:
        dist = {src: 0}
        todo = collections.deque([src])
        while todo:
            a = todo.popleft()
            for b in graph[a]:
                if b not in dist:
                    dist[b] = dist[a] + 1
                    todo.append(b)
        most = max(most, *dist.values())
    return most


def name_key(name: str) -> bytes:
    return hashlib.sha3_256(name.encode()).digest()


class LayerSim:
    """`graph` gives each member's neighbours (by index); addresses are drawn at random."""

    def __init__(self, graph: dict[int, set[int]], seed: int = 1) -> None:
        rng = random.Random(seed)
        addrs = rng.sample(range(1, 1 << 32), len(graph))
        self.now = 0.0
        self.members: dict[int, Member] = {}
        for i, addr in enumerate(addrs):
            identity = auth.Identity.generate()
            bindings = auth.Bindings()
            name = f"m{i}"
            lsdb = Lsdb(addr, None, name, 1.0, identity, bindings, now=0.0)
            directory = Directory(addr, identity=identity, bindings=bindings, now=0.0)
            self.members[addr] = Member(addr, name, lsdb, directory, {addrs[j] for j in graph[i]})
        for m in self.members.values():
            m.dir.reachable = m.table.__contains__
        self.by_name = {m.name: m.addr for m in self.members.values()}
        self._queue: list[tuple[float, int, int, int, Message | None]] = []  # (at, order, to, from, message)
        self._order = itertools.count()
        # LSUs take one LATENCY each, sent in time order: a FIFO keeps them in time order, cheaper
        self._lsus: collections.deque[tuple[float, int, int, Lsu]] = collections.deque()
        self.dropped = 0  # directory messages with no route at some hop
        self.converged_at: float | None = None

    # -- the run ------------------------------------------------------------------------------

    def boot(self) -> None:
        """Every member's adjacencies come up and it registers its name."""
        for m in self.members.values():
            lsu = m.lsdb.set_neighbours(m.neighbours, self.now)
            for nb in m.neighbours:
                self._send_lsu(m, nb, lsu)
            self._send_all(m, m.dir.register(name_key(m.name), True, self.now))
            self._after(m)

    def run(self, until: float) -> None:
        """Deliver messages in time order until none is left or `until` (simulated seconds)."""
        queue, hops = self._queue, self._lsus
        with _verify_once(), _no_cycle_collection():
            while True:
                if hops and (not queue or hops[0][0] <= queue[0][0]):
                    if hops[0][0] > until:
                        return
                    self.now, to, src, lsu = hops.popleft()
                    if (member := self.members.get(to)) is not None:  # else it left meanwhile
                        self._deliver(member, src, lsu)
                    continue
                if not queue or queue[0][0] > until:
                    return
                self.now, _, to, src, msg = heapq.heappop(queue)
                if (member := self.members.get(to)) is None:
                    continue
                if msg is not None:
                    self._deliver(member, src, msg)
                elif member.wake_at == self.now:  # else re-armed since
                    self._on_timer(member)

    def leave(self, addr: int) -> None:
        """A member is gone: its neighbours see their flows to it go down."""
        gone = self.members.pop(addr)
        for nb in gone.neighbours:
            m = self.members[nb]
            m.neighbours.discard(addr)
            lsu = m.lsdb.set_neighbours(m.neighbours, self.now)
            for other in m.neighbours:
                self._send_lsu(m, other, lsu)
            self._after(m)

    def lookup_all(self, pairs: list[tuple[int, str]]) -> dict[tuple[int, str], list[int]]:
        """Look names up (asker address, name); what each lookup found once traffic has ended."""
        for addr, name in pairs:
            m = self.members[addr]
            _, out = m.dir.lookup(name_key(name), self.now)
            self._send_all(m, out)
        self.run(self.now + SETTLE)
        found: dict[tuple[int, str], list[int]] = {}
        keys = {name_key(name): name for _, name in pairs}
        for addr, _ in pairs:
            m = self.members[addr]
            for key, addrs in m.dir.resolved:
                found[(addr, keys[key])] = addrs
            m.dir.resolved.clear()
        return found

    # -- what the checks read -----------------------------------------------------------------

    def lsdb_digest(self, m: Member) -> tuple[tuple[int, int], ...]:
        """Which LSU of each member `m` holds (all members renew at once here: seqnos compare)."""
        return tuple(sorted((a, e.seqno) for a, e in m.lsdb.db.items()))

    def unrouted(self) -> Iterator[tuple[int, int]]:
        """(source, destination) pairs whose forwarding tables do not lead there on a shortest
        path: for each destination, every member's next hop must be one hop closer to it."""
        for dst in self.members:
            dist = {dst: 0}
            todo = collections.deque([dst])
            while todo:
                a = todo.popleft()
                for b in self.members[a].neighbours:
                    if b not in dist:
                        dist[b] = dist[a] + 1
                        todo.append(b)
            for src, m in self.members.items():
                if src == dst:
                    continue
                hops = m.table.get(dst)
                if not hops or hops[0] not in m.neighbours or dist.get(hops[0], -1) != dist[src] - 1:
                    yield src, dst

    # -- members' actions ---------------------------------------------------------------------

    def _deliver(self, m: Member, src: int, msg: Message) -> None:
        if isinstance(msg, Lsu):
            if not m.lsdb.receive(msg, self.now):
                return  # no news: nothing changed (the IPCP does nothing more either)
            for nb in m.neighbours:
                if nb != src:
                    self._send_lsu(m, nb, msg)
            if m.full_at is None and len(m.lsdb.db) == len(self.members):
                m.full_at = self.now
                if all(x.full_at is not None for x in self.members.values()):
                    self.converged_at = self.now
        else:
            self._send_all(m, m.dir.receive(msg, self.now))
        self._after(m)

    def _on_timer(self, m: Member) -> None:
        m.wake_at = math.inf
        lsu = m.lsdb.handle_timer(self.now)
        if lsu is not None:
            for nb in m.neighbours:
                self._send_lsu(m, nb, lsu)
        self._send_all(m, m.dir.handle_timer(self.now))
        self._after(m)

    def _after(self, m: Member) -> None:
        """As the IPCP after any input: a new forwarding table moves the directory's homes; the
        timer armed for the earliest the cores ask."""
        table = m.lsdb.take_table(self.now)
        if table is not None:
            m.tables += 1
            m.table.clear()
            m.table.update(table)
            self._send_all(m, m.dir.set_members(set(table) | {m.addr}, self.now))
        due = max(min(m.lsdb.get_timer(), m.dir.get_timer()), self.now)
        if due < m.wake_at:
            m.wake_at = due
            heapq.heappush(self._queue, (due, next(self._order), m.addr, 0, None))

    def _send_lsu(self, m: Member, nb: int, lsu: Lsu) -> None:
        m.sent["lsu"] += 1
        self._lsus.append((self.now + LATENCY, nb, m.addr, lsu))

    def _send_all(self, m: Member, out: list[tuple[int, Message]]) -> None:
        for dst, msg in out:
            m.sent[type(msg).__name__] += 1
            hops = self._hops(m.addr, dst)
            if hops is None:
                self.dropped += 1
                continue
            heapq.heappush(self._queue, (self.now + LATENCY * max(hops, 1), next(self._order), dst, m.addr, msg))

    def _hops(self, src: int, dst: int) -> int | None:
        """Hops along the forwarding tables from `src` to `dst` now; None where they end first."""
        at, hops = src, 0
        while at != dst:
            member = self.members.get(at)
            nxt = member.table.get(dst) if member is not None else None
            if not nxt or hops > len(self.members):
                return None
            at, hops = nxt[0], hops + 1
        return hops


@contextlib.contextmanager
def _verify_once() -> Iterator[None]:
    """While a run lasts, a message's signed part is encoded once and each signature checked once:
    every member checks the same objects, and the answer cannot differ from one to the next."""
    real = messages.signed_part
    encoded: dict[int, tuple[Message, bytes]] = {}

    def signed_part(msg: Message) -> bytes:
        hit = encoded.get(id(msg))
        if hit is None or hit[0] is not msg:
            hit = encoded[id(msg)] = (msg, real(msg))
        return hit[1]

    patches = [
        (auth.__dict__, "verify", functools.lru_cache(maxsize=1 << 16)(auth.verify)),
        (routing.__dict__, "signed_part", signed_part),
        (directory.__dict__, "signed_part", signed_part),
    ]
    saved = [(space, name, space[name]) for space, name, _ in patches]
    for space, name, value in patches:
        space[name] = value
    try:
        yield
    finally:
        for space, name, value in saved:
            space[name] = value


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """The run holds millions of short-lived messages: the cycle collector would scan them over and
    over (a third of the run's time) and find no cycles to free."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
