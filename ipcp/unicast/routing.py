"""Link-state routing, sans-IO: the link-state database of signed LSUs, flooding decisions, the
timers of Ouroboros's link-state policy (ls_t_recalc, ls_t_update, ls_t_timeo), and the
forwarding table a pff policy computes from it.

Each member signs its own LSU; an LSU is taken only under the key bound to its address and name
(auth.Bindings), so no member can speak for another, relay or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

from ipcp.unicast import auth
from ipcp.unicast.messages import ADDR_SPACE, Lsu, signed_part
from ipcp.unicast.pff import Graph, Pff, Simple, Table

MAX_MEMBERS = 4096  # LSDB entries: past this, LSUs of members not yet known are refused
MAX_LINKS = 1024  # neighbours one LSU may claim ...
MAX_ALL_LINKS = 16 * MAX_MEMBERS  # ... and all LSUs held together: each table walks every one of them
MAX_NAME = 255
HOLDOFF = 0.05  # seconds between two tables at least: a join storm of N members costs a few tables, not N
# A member flapping a link (or making up new ones) would otherwise earn a table every HOLDOFF, each a
# walk of the whole graph (85 ms at the bounds below): past BURST tables with no quiet spell between
# them (two ls_t_recalc without one), the holdoff doubles with each table, up to ls_t_recalc.
BURST = 10


@dataclasses.dataclass(frozen=True)
class LsTimers:
    """Ouroboros 0.23's link-state defaults, in seconds."""

    recalc: float = 4.0  # ls_t_recalc: a lost link is routed around within this (a new one at once)
    update: float = 15.0  # ls_t_update: our LSU is flooded again this often
    timeo: float = 60.0  # ls_t_timeo: an LSU not renewed for this long is forgotten


@dataclasses.dataclass
class _Entry:
    seqno: int
    neighbours: frozenset[int]
    seen: float
    name: str = ""
    since: float = 0.0  # when this incarnation of the member started (its own wall clock)
    lsu: Lsu | None = None  # as signed, to pass on to new neighbours


class Lsdb:
    """What this member knows of the layer's graph, and the next hops it implies."""

    def __init__(
        self,
        me: int,
        pff: Pff | None = None,
        name: str = "",
        since: float = 0.0,
        identity: auth.Identity | None = None,
        bindings: auth.Bindings | None = None,
        timers: LsTimers = LsTimers(),
        now: float = 0.0,
        max_addr: int = ADDR_SPACE - 1,
    ) -> None:
        self.me = me
        self.max_addr = max_addr  # the layer's widest address: an LSU naming a wider one is refused
        self.pff = pff or Simple()
        self.identity = identity or auth.Identity.generate()
        self.bindings = bindings or auth.Bindings()
        self.bindings.admit(me, name, self.identity.pub)
        self.timers = timers
        self.seqno = 0
        self.db: dict[int, _Entry] = {me: _Entry(0, frozenset(), now, name, since)}
        self._named: dict[str, set[int]] = {name: {me}}  # addresses by member name
        self.forged = 0  # LSUs refused: bad signature, or a key speaking for another's address or name
        self.refused = 0  # LSUs refused for bounds: too many members, links or too long a name
        self.links = 0  # neighbours the LSUs of other members claim, all together
        self._last_flood = now
        self._dirty = True
        self._next_recalc = now
        self._last_calc = -math.inf
        self._holdoff = HOLDOFF  # the least time from one table to the next a new link may ask
        self._spell = 0  # tables since the last quiet spell
        self._oldest: float | None = None  # the oldest `seen` of another member's entry; None: to find

    @property
    def members(self) -> set[int]:
        return set(self.db)

    def digest(self) -> str:
        """A short digest of the layer's graph as we hold it (members and the links each reports):
        equal at two members when their databases agree on it (how a layer's convergence is seen
        from outside, in IpcpInfo; the periodic renewals, which change only sequence numbers, do
        not count)."""
        h = hashlib.blake2b(digest_size=8)
        for addr, entry in sorted(self.db.items()):
            h.update(b"%d:%s;" % (addr, ",".join(map(str, sorted(entry.neighbours))).encode()))
        return h.hexdigest()

    def names(self) -> dict[int, str]:
        """Members by address, with the names their LSUs gave."""
        return {a: e.name for a, e in self.db.items() if e.name}

    def set_neighbours(self, neighbours: set[int], now: float) -> Lsu:
        """Our adjacencies changed: the LSU to flood."""
        entry = self.db[self.me]
        self._changed(now, added=bool(frozenset(neighbours) - entry.neighbours))
        entry.neighbours = frozenset(neighbours)
        return self._renew(now)

    def _changed(self, now: float, added: bool) -> None:
        """As Ouroboros: a new link is routed over at once (within HOLDOFF of the last table), a lost
        one at the next ls_t_recalc."""
        self._dirty = True
        if added:
            self._next_recalc = min(self._next_recalc, max(now, self._last_calc + self._holdoff))

    def _renew(self, now: float) -> Lsu:
        self.seqno += 1
        entry = self.db[self.me]
        entry.seqno, entry.seen = self.seqno, now
        self._last_flood = now
        lsu = Lsu(self.me, self.seqno, sorted(entry.neighbours), entry.name, entry.since, self.identity.pub)
        entry.lsu = dataclasses.replace(lsu, sig=self.identity.sign(signed_part(lsu)))
        return entry.lsu

    def own(self) -> Lsu:
        lsu = self.db[self.me].lsu
        return lsu if lsu is not None else self._renew(self.db[self.me].seen)

    def all(self) -> list[Lsu]:
        """Every LSU we hold, as its member signed it (for a new neighbour)."""
        return [self.own(), *(e.lsu for a, e in self.db.items() if a != self.me and e.lsu is not None)]

    def receive(self, lsu: Lsu, now: float) -> bool:
        """Take an LSU; True if it was news (and so is to be flooded on). Raises auth.Forged for an
        LSU its member did not sign, or signed with a key not its own."""
        entry = self.db.get(lsu.src)
        if entry is not None and lsu.seqno <= entry.seqno:
            return False  # no news (a replay, or a copy by another path; most LSUs): it renews nothing
        if (
            len(lsu.neighbours) > MAX_LINKS
            or len(lsu.name) > MAX_NAME
            or not math.isfinite(lsu.since)
            or not 0 <= lsu.seqno < 1 << 63
            or not all(0 < a <= self.max_addr for a in (lsu.src, *lsu.neighbours))
        ):
            self.refused += 1
            return False
        claimed = frozenset(lsu.neighbours)
        links = self.links + len(claimed) - (len(entry.neighbours) if entry is not None else 0)
        if (entry is None and len(self.db) >= MAX_MEMBERS) or (
            lsu.src != self.me and links > MAX_ALL_LINKS and links > self.links  # (fewer links are always taken)
        ):
            self.refused += 1
            return False
        try:
            auth.verify(lsu.key, signed_part(lsu), lsu.sig)
            if lsu.src == self.me:
                if lsu.key != self.identity.pub:
                    raise auth.Forged(f"an LSU for our own address {self.me} under another key")
            else:
                self.bindings.admit(lsu.src, lsu.name, lsu.key)
        except auth.Forged:
            self.forged += 1
            raise
        if lsu.src == self.me:  # an older incarnation of us, still going round: outnumber it
            self.seqno = max(self.seqno, lsu.seqno)
            return False
        if entry is None and lsu.name:  # the member back under a new address (its key proves it)
            rivals = [a for a in self._named.get(lsu.name, ()) if a not in (lsu.src, self.me)]
            if any(self.db[a].since > lsu.since for a in rivals):
                self.bindings.release(lsu.src)
                return False  # an old incarnation's LSU still going round: it must not undo the new one
            for addr in rivals:
                self._drop(addr)
        if entry is None or claimed != entry.neighbours:  # a renewal leaves the graph, and the table, as it was
            self._changed(now, added=entry is None or bool(claimed - entry.neighbours))
        if entry is None or entry.seen == self._oldest:
            self._oldest = None if entry is not None or self._oldest is None else min(self._oldest, now)
        if entry is not None and entry.name != lsu.name:  # renamed
            self._unname(entry.name, lsu.src)
        self._named.setdefault(lsu.name, set()).add(lsu.src)
        self.links += len(claimed) - (len(entry.neighbours) if entry is not None else 0)  # (rivals dropped since)
        self.db[lsu.src] = _Entry(lsu.seqno, claimed, now, lsu.name, lsu.since, lsu)
        return True

    def _drop(self, addr: int) -> None:
        """Forget another member's entry, and release its address and name."""
        entry = self.db.pop(addr)
        self.links -= len(entry.neighbours)
        self._oldest = None
        self._unname(entry.name, addr)
        self.bindings.release(addr)

    def _unname(self, name: str, addr: int) -> None:
        """`addr` no longer goes by `name`; the name's set goes once empty."""
        named = self._named[name]
        named.discard(addr)
        if not named:
            del self._named[name]

    # -- timers (sans-IO) ------------------------------------------------------------

    def get_timer(self) -> float:
        """When handle_timer next has work."""
        due = [self._last_flood + self.timers.update, self._oldest_seen() + self.timers.timeo]
        if self._dirty:
            due.append(self._next_recalc)
        return min(due)

    def _oldest_seen(self) -> float:
        """When the least recently renewed entry of another member was (inf: none)."""
        if self._oldest is None:
            self._oldest = min((e.seen for a, e in self.db.items() if a != self.me), default=math.inf)
        return self._oldest

    def handle_timer(self, now: float) -> Lsu | None:
        """Forget LSUs not renewed in time; our own LSU if due to be flooded again."""
        if now >= self._oldest_seen() + self.timers.timeo:  # else nothing can have expired: no scan
            for a in [a for a, e in self.db.items() if a != self.me and now >= e.seen + self.timers.timeo]:
                self._drop(a)
                self._changed(now, added=False)
        if now >= self._last_flood + self.timers.update:  # as get_timer sums it: no rounding apart
            return self._renew(now)  # news to everyone: it outnumbers an older incarnation of us too
        return None

    def take_table(self, now: float) -> Table | None:
        """A new forwarding table, if the graph changed and ls_t_recalc allows one now."""
        if not self._dirty or now < self._next_recalc:
            return None
        self._dirty = False
        if now - self._last_calc >= 2 * self.timers.recalc:  # quiet since the last: a new spell
            self._spell, self._holdoff = 0, HOLDOFF
        self._spell += 1
        if self._spell > BURST:
            self._holdoff = min(2 * self._holdoff, self.timers.recalc)
        self._last_calc = now
        self._next_recalc = now + self.timers.recalc
        return self.table()

    def graph(self) -> Graph:
        """Links both ends report; a one-sided claim is not a link."""
        g: Graph = {a: set() for a in self.db}
        for a, e in self.db.items():
            for b in e.neighbours:
                if b in self.db and a in self.db[b].neighbours:
                    g[a].add(b)
        return g

    def table(self) -> Table:
        return self.pff.table(self.graph(), self.me)


MIN_ARRIVAL = 0.25  # s: a known member's LSUs are taken at most this often (OSPF's MinLSArrival)
MAX_HELD = 4 * MAX_MEMBERS  # LSUs held back at once: past it, one is checked and taken as it comes


class Pacer:
    """Holds back the LSUs of a member already known that come sooner than MIN_ARRIVAL after the last
    one taken from it, before any signature check, and hands the newest of them over when its turn
    comes: each news LSU of a member cost every member of the layer a signature check and a flood to
    all its neighbours, as fast as its links carried them. A member not known yet is never held back
    (what it may be is the LSDB's bounds to decide). The newest is kept per neighbour it came through:
    an unchecked LSU with a higher seqno, forged by one neighbour, must not push out the member's own
    coming through another."""

    def __init__(self, lsdb: Lsdb, every: float = MIN_ARRIVAL) -> None:
        self.lsdb = lsdb
        self.every = every
        self.held = 0  # LSUs held back (replaced by a newer one, or taken later)
        self._waiting: dict[tuple[int, int], tuple[Lsu, float]] = {}  # (member, via) -> (newest held, due)
        self._due = math.inf  # the earliest of them

    def hold(self, lsu: Lsu, via: int, now: float) -> bool:
        """True if `lsu`, from the neighbour at `via`, is held back (or older than one held from there)."""
        entry = self.lsdb.db.get(lsu.src)
        if entry is None or lsu.src == self.lsdb.me or lsu.seqno <= entry.seqno:
            return False  # new, ours, or no news: Lsdb.receive answers at no cost
        slot = (lsu.src, via)
        waiting = self._waiting.get(slot)
        if waiting is None and (now >= entry.seen + self.every or len(self._waiting) >= MAX_HELD):
            return False
        self.held += 1
        if waiting is None or lsu.seqno > waiting[0].seqno:
            at = max(entry.seen + self.every, now) if waiting is None else waiting[1]
            self._waiting[slot] = (lsu, at)
            self._due = min(self._due, at)
        return True

    def get_timer(self) -> float | None:
        return self._due if self._waiting else None

    def due(self, now: float) -> list[tuple[Lsu, int]]:
        """The LSUs whose turn has come, newest first, with the neighbour each came through, to take
        now (Lsdb.receive) as if just arrived (and flood to all but that neighbour): after the first
        that is genuine, the others of its member are no news and cost nothing."""
        if now < self._due:
            return []
        ready = [slot for slot, (_, at) in self._waiting.items() if at <= now]
        out = sorted(((self._waiting.pop(slot)[0], slot[1]) for slot in ready), key=lambda held: -held[0].seqno)
        self._due = min((at for _, at in self._waiting.values()), default=math.inf)
        return out
