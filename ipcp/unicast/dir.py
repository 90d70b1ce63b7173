"""The directory: a DHT mapping name hashes to member addresses, sans-IO.

Keys live at the K members whose ids are XOR-closest to them (Kademlia's metric); membership
comes from the link-state database, so every lookup is one hop. A member stores only its own
address, signed; holders keep the signed store and replicate it as it is (dht_t_replicate).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable

from sortedcontainers import SortedList

from ipcp.unicast import auth
from ipcp.unicast.messages import DhtFind, DhtFound, DhtStore, signed_part
from transports.wire import Message

LOOKUP_TIMEOUT = 2.0
CACHE_TTL = 10.0
MAX_CACHE = 4096  # lookup answers cached: names members registered by the thousand, looked up, grew it for good
MAX_ENTRIES = 16384  # (key, address) entries a member holds for the layer
MAX_PER_MEMBER = 1024  # ... of which one member's
SEQS_PER_MEMBER = 2 * MAX_PER_MEMBER  # a member's store seqnos kept (its removals too), of its own slots
MAX_SEQS = 4 * MAX_ENTRIES  # all members' together: past it the oldest goes
MAX_LOOKUPS = 1024  # lookups under way at once
MAX_KEY = 64  # bytes of a name hash (SHA3-512)
MAX_FOUND = 16  # signed stores in one lookup answer
RANK_EVERY = 1.0  # s: a full directory ranks who gives up a place for a newcomer at most this often
ANSWERED = 4096  # lookups remembered as answered (asker, cookie): a copy sent again is not answered
SETTLE = 0.5  # seconds without membership change after which our entries are published again ...
MAX_SETTLE = 5.0  # ... or this long after the first change of a spell: stores sent while routes were
# still forming may have been dropped on the way, and would otherwise wait for dht_t_refresh

Out = list[tuple[int, Message]]  # (destination address, message)


@dataclasses.dataclass(frozen=True)
class DhtParams:
    """Ouroboros 0.23's DHT defaults (seconds)."""

    alpha: int = 3  # dht_alpha: members asked at once in a lookup
    k: int = 8  # dht_k: replicas of each entry
    t_expire: float = 86400.0  # dht_t_expire: an entry lives this long unless stored again
    t_refresh: float = 900.0  # dht_t_refresh: a registrant publishes its entries again this often
    t_replicate: float = 900.0  # dht_t_replicate: a holder passes its entries on this often


@functools.lru_cache(maxsize=1 << 14)
def node_id(addr: int) -> int:
    return int.from_bytes(hashlib.sha3_256(addr.to_bytes(8, "big")).digest(), "big")


@dataclasses.dataclass
class _Held:
    store: DhtStore  # as its member signed it
    expiry: float


class _Lookup:
    def __init__(self, key: bytes, targets: list[int], deadline: float) -> None:
        self.key = key
        self.targets = targets  # still to ask, closest first
        self.deadline = deadline
        self.waiting = 0


class Directory:
    def __init__(
        self,
        me: int,
        params: DhtParams = DhtParams(),
        identity: auth.Identity | None = None,
        bindings: auth.Bindings | None = None,
        now: float = 0.0,
    ) -> None:
        self.me = me
        self.params = params
        self.identity = identity or auth.Identity.generate()
        self.bindings = bindings or auth.Bindings()
        self.members: set[int] = {me}
        self.mine: dict[bytes, DhtStore] = {}  # what this member registered, as last published
        self._homes: dict[bytes, list[int]] = {}  # ... and the members it was last sent to
        self.store: dict[bytes, dict[int, _Held]] = {}  # key -> {addr: entry} held for the layer
        self.seqs: dict[tuple[bytes, int], int] = {}  # newest store seen per (key, addr), removals too
        self._seq_keys: dict[int, dict[bytes, None]] = {}  # the keys of each member's seqs, oldest first
        self.cache: dict[bytes, tuple[list[int], float]] = {}
        self.forged = 0  # stores refused: unsigned, signed by another key, or for another's address
        self.refused = 0  # stores refused for bounds
        self.misdirected = 0  # lookups naming another member: copies of ones sent there, not answered
        self.replayed = 0  # lookups answered before (the same asker and cookie): a copy sent again
        self._answered: OrderedDict[tuple[int, int], None] = OrderedDict()  # (asker, cookie), the last ANSWERED
        self._per_member: dict[int, int] = {}
        self._size = 0  # entries held, all members' together
        self._ranked: list[int] = []  # when full: who gives up a place, the first to go last
        self._ranked_at = -math.inf
        self._schedule: SortedList = SortedList()  # (expiry, key, addr)
        self._lookups: dict[int, _Lookup] = {}
        self._seq = int(now * 1e6)  # over restarts too: a new incarnation's stores outnumber the old's
        self._next_refresh = now + params.t_refresh
        self._settled_at = math.inf  # when to publish again after membership changed
        self._churn_from = math.inf  # when the current spell of changes began
        self._next_replicate = now + params.t_replicate
        self.resolved: list[tuple[bytes, list[int]]] = []  # finished lookups, for the caller
        self.reachable: Callable[[int], bool] = lambda addr: True  # members with a route to them

    @property
    def size(self) -> int:
        return self._size

    def closest(self, key: bytes, n: int | None = None) -> list[int]:
        k = int.from_bytes(hashlib.sha3_256(key).digest(), "big")
        return heapq.nsmallest(n or self.params.k, self.members, key=lambda a: node_id(a) ^ k)

    def set_members(self, members: Iterable[int], now: float) -> Out:
        """Membership changed: what we registered goes to the members that became its homes (as
        signed: those that were already hold it, and it is refreshed every dht_t_refresh)."""
        new = set(members) | {self.me}
        if new == self.members:
            return []
        self.members = new
        if self._churn_from == math.inf:
            self._churn_from = now
        self._settled_at = min(now + SETTLE, self._churn_from + MAX_SETTLE)
        out: Out = []
        for key, store in self.mine.items():
            homes = self.closest(key)
            out += [(a, store) for a in homes if a not in self._homes.get(key, ())]
            self._homes[key] = homes
        return out

    def register(self, key: bytes, on: bool, now: float) -> Out:
        if on:
            return self._publish([key], now)
        self.mine.pop(key, None)
        self._homes.pop(key, None)
        gone = self._signed(key, 0.0)
        return [(a, gone) for a in self.closest(key)]

    def _signed(self, key: bytes, ttl: float) -> DhtStore:
        self._seq += 1
        store = DhtStore(self.me, key, self.me, ttl, self._seq, self.identity.pub)
        return dataclasses.replace(store, sig=self.identity.sign(signed_part(store)))

    def _publish(self, keys: Iterable[bytes], now: float) -> Out:
        out: Out = []
        for key in list(keys):
            store = self.mine[key] = self._signed(key, self.params.t_expire)
            homes = self._homes[key] = self.closest(key)
            out += [(a, store) for a in homes]
        return out

    def _held(self, key: bytes, now: float) -> list[DhtStore]:
        """The live stores for `key` we believe: of members, under the keys bound to them (a store
        taken before its member's LSU counts once the keys agree)."""
        keys = self.bindings.by_addr
        return [
            h.store
            for a, h in self.store.get(key, {}).items()
            if h.expiry > now and a in self.members and keys.get(a) == h.store.pub
        ]

    def local(self, key: bytes, now: float) -> list[int] | None:
        """What we know without asking: our own names, entries we hold, the cache."""
        if key in self.mine:
            return [self.me]
        held = [store.addr for store in self._held(key, now)]
        if held:
            return held
        hit = self.cache.get(key)
        live = [a for a in hit[0] if a in self.members] if hit and hit[1] > now else []
        return live or None

    def lookup(self, key: bytes, now: float) -> tuple[int, Out]:
        """Start a lookup; its answer lands in `resolved` (an empty list: not found)."""
        cookie = random.getrandbits(62)
        if len(self._lookups) >= MAX_LOOKUPS:
            self.resolved.append((key, []))
            return cookie, []
        targets = [a for a in self.closest(key) if a != self.me]
        lk = _Lookup(key, targets, now + LOOKUP_TIMEOUT)
        self._lookups[cookie] = lk
        return cookie, self._ask(cookie, lk)

    def _ask(self, cookie: int, lk: _Lookup) -> Out:
        out: Out = []
        while lk.targets and lk.waiting < self.params.alpha:
            target = lk.targets.pop(0)
            if self.reachable(target):  # no route yet (or any more): asking would only time out
                out.append((target, DhtFind(self.me, lk.key, cookie, target)))
                lk.waiting += 1
        if not out and lk.waiting == 0:
            del self._lookups[cookie]
            self.resolved.append((lk.key, []))
        return out

    def receive(self, msg: Message, now: float) -> Out:
        """Take a DHT message; raises auth.Forged for a store its member did not sign."""
        if isinstance(msg, DhtStore):
            self._take(msg, now)
            return []
        if isinstance(msg, DhtFind):
            if msg.dst != self.me:
                self.misdirected += 1
                return []
            if len(msg.key) > MAX_KEY:
                return []
            # An asker sends a lookup to each member once: a copy sent again (by a forwarder that kept
            # it) would have us send the asker up to MAX_FOUND signed stores each time, a flood on it.
            if (msg.src, msg.cookie) in self._answered:
                self.replayed += 1
                return []
            self._answered[msg.src, msg.cookie] = None
            if len(self._answered) > ANSWERED:
                self._answered.popitem(last=False)
            stores = self._held(msg.key, now)
            if msg.key in self.mine:
                stores.insert(0, self.mine[msg.key])
            return [(msg.src, DhtFound(self.me, msg.key, msg.cookie, stores[:MAX_FOUND]))]
        if isinstance(msg, DhtFound):
            lk = self._lookups.get(msg.cookie)
            if lk is None or lk.key != msg.key:
                return []
            lk.waiting -= 1
            live = self._proven(msg, now)
            if live:
                del self._lookups[msg.cookie]
                self._cache(msg.key, live, now)
                self.resolved.append((msg.key, live))
                return []
            return self._ask(msg.cookie, lk)
        return []

    def _cache(self, key: bytes, live: list[int], now: float) -> None:
        """Keep a lookup's answer CACHE_TTL, at most MAX_CACHE of them: in the order they expire (one TTL
        for all), so the expired and, past the bound, the oldest leave from the front."""
        cache = self.cache
        cache.pop(key, None)
        while cache and (len(cache) >= MAX_CACHE or next(iter(cache.values()))[1] <= now):
            del cache[next(iter(cache))]
        cache[key] = (live, now + CACHE_TTL)

    def _proven(self, found: DhtFound, now: float) -> list[int]:
        """The members a lookup answer proves registered for its key: each by its own signed store,
        under the key bound to it; whatever else the answerer claims counts for nothing."""
        live: list[int] = []
        for store in found.stores[:MAX_FOUND]:
            try:
                self._check(store)
            except auth.Forged:
                self.forged += 1
                continue
            if (
                store.key == found.key
                and store.ttl > 0
                and store.addr in self.members
                and self.bindings.by_addr.get(store.addr) == store.pub
                and store.seq >= self.seqs.get((store.key, store.addr), 0)
                and store.addr not in live
            ):
                live.append(store.addr)
        return live

    def _check(self, store: DhtStore) -> None:
        """Forged unless `store` is signed by its member, for its own address, under its bound key."""
        if store.addr != store.src:
            raise auth.Forged(f"member {store.src} stores for address {store.addr}")
        auth.verify(store.pub, signed_part(store), store.sig)
        held = self.bindings.by_addr.get(store.src)
        if held is not None and held != store.pub:
            raise auth.Forged(f"a store for address {store.src} under another member's key")

    def _take(self, store: DhtStore, now: float) -> None:
        if not math.isfinite(store.ttl) or len(store.key) > MAX_KEY or not 0 <= store.seq < 1 << 63:
            self.refused += 1
            return
        slot = (store.key, store.addr)
        if store.seq <= self.seqs.get(slot, -1):
            return  # a replay, or a replica of what we hold: nothing to take, nothing to check
        try:
            self._check(store)
        except auth.Forged:
            self.forged += 1
            raise
        entries = self.store.get(store.key, {})
        if store.addr not in entries and store.ttl > 0:
            if not self._room(store, now):
                self.refused += 1
                return
            self._per_member[store.addr] = self._per_member.get(store.addr, 0) + 1
            self._size += 1
        if slot not in self.seqs:
            self._new_seq_slot(store.key, store.addr)
        self.seqs[slot] = store.seq
        if store.ttl <= 0:
            self._drop(store.key, store.addr)
            self.cache.pop(store.key, None)
            return
        expiry = now + min(store.ttl, self.params.t_expire)
        entries = self.store.setdefault(store.key, {})
        if (old := entries.get(store.addr)) is not None:
            self._schedule.discard((old.expiry, store.key, store.addr))  # one expiry per entry, renewed or not
        entries[store.addr] = _Held(store, expiry)
        self._schedule.add((expiry, store.key, store.addr))

    def _bound(self, addr: int) -> bool:
        """A member whose LSU bound a key to its address: stores of any other address are never believed."""
        return addr in self.members and addr in self.bindings.by_addr

    def _room(self, store: DhtStore, now: float) -> bool:
        """Room for one more entry of `store.addr`'s. When the directory is full, a member's entry takes
        the place of one of an address no LSU binds, else of the member holding the most, if it holds
        more than this one would: stores for made-up addresses (no LSU needed) once filled every holder
        for dht_t_expire, and no member could register a name after them."""
        mine = self._per_member.get(store.addr, 0)
        if mine >= MAX_PER_MEMBER:
            return False
        if self._size < MAX_ENTRIES:
            return True
        if not self._bound(store.addr) or (victim := self._victim(mine, now)) is None:
            return False
        # Its oldest entry goes (its keys are kept oldest first; past MAX_SEQS one may be forgotten there).
        key = next((k for k in self._seq_keys.get(victim, ()) if victim in self.store.get(k, {})), None)
        self._drop(key if key is not None else next(k for k, e in self.store.items() if victim in e), victim)
        return True

    def _victim(self, mine: int, now: float) -> int | None:
        """Who gives up a place to a member holding `mine`: the addresses are ranked (no LSU binds them
        first, then by entries held) at most every RANK_EVERY, and taken from the top while they still
        qualify. Ranking them for every store cost 5 ms a store when 16,384 addresses held one each."""
        held = self._per_member
        if now >= self._ranked_at + RANK_EVERY:
            self._ranked = sorted(held, key=lambda a: (not self._bound(a), held[a]))
            self._ranked_at = now
        while self._ranked:
            top = self._ranked[-1]
            if (n := held.get(top, 0)) and (not self._bound(top) or n > mine + 1):
                return top
            if n:
                return None  # a member holding no more than the newcomer would: the rest held no more
            self._ranked.pop()  # holds nothing now
        return None

    def _new_seq_slot(self, key: bytes, addr: int) -> None:
        """Room for one more seqno of `addr`'s: a member past its share forgets the oldest of its own
        removals (never another member's: a withdrawal forgotten would let its old store be replayed)."""
        keys = self._seq_keys.setdefault(addr, {})
        if len(keys) >= SEQS_PER_MEMBER:
            self._forget_oldest_seq(addr)
        if len(self.seqs) >= MAX_SEQS:  # many members at once: the one holding the most gives one up
            self._forget_oldest_seq(max(self._seq_keys, key=lambda a: len(self._seq_keys[a])))
        keys[key] = None

    def _forget_oldest_seq(self, addr: int) -> None:
        """Forget `addr`'s oldest seqno of a removal (of an entry held only if it has nothing else)."""
        keys, held = self._seq_keys[addr], self.store
        old = next((k for k in keys if addr not in held.get(k, {})), next(iter(keys)))
        del keys[old]
        self.seqs.pop((old, addr), None)

    def _drop(self, key: bytes, addr: int) -> None:
        entries = self.store.get(key)
        if entries is not None and (held := entries.pop(addr, None)) is not None:
            self._schedule.discard((held.expiry, key, addr))
            self._size -= 1
            self._per_member[addr] -= 1
            if not self._per_member[addr]:
                del self._per_member[addr]
            if not entries:
                del self.store[key]

    # -- timers (sans-IO) ------------------------------------------------------------

    def get_timer(self) -> float:
        due = [self._next_refresh, self._next_replicate, self._settled_at]
        if self._schedule:
            due.append(self._schedule[0][0])
        due += [lk.deadline for lk in self._lookups.values()]
        return min(due)

    def handle_timer(self, now: float) -> Out:
        while self._schedule and self._schedule[0][0] <= now:
            expiry, key, addr = self._schedule.pop(0)
            held = self.store.get(key, {}).get(addr)
            if held is not None and held.expiry == expiry:
                self._drop(key, addr)
        for cookie, lk in list(self._lookups.items()):
            if now >= lk.deadline:
                del self._lookups[cookie]
                self.resolved.append((lk.key, []))
        out: Out = []
        if now >= self._settled_at:  # as signed: a home that has it ignores it, one that missed it takes it
            self._settled_at = self._churn_from = math.inf
            out += [(a, store) for key, store in self.mine.items() for a in self._homes.get(key, ())]
        if now >= self._next_refresh:
            self._next_refresh = now + self.params.t_refresh
            out += self._publish(self.mine, now)
        if now >= self._next_replicate:
            self._next_replicate = now + self.params.t_replicate
            for key, entries in self.store.items():
                homes = [a for a in self.closest(key) if a != self.me]
                out += [(a, h.store) for h in entries.values() for a in homes if a != h.store.src]
        return out
