"""The directory: a DHT mapping name hashes to member addresses, sans-IO.

Keys live at the K members whose ids are XOR-closest to them (Kademlia's metric);
membership comes from the link-state database, so every lookup is one hop.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterable

from sortedcontainers import SortedList

from ipcp.unicast.messages import DhtFind, DhtFound, DhtStore
from transports.wire import Message

K = 8  # replicas of each entry (dht_k)
ALPHA = 3  # lookups asked in parallel (dht_alpha)
T_EXPIRE = 86400.0  # an entry lives this long unless refreshed (dht_t_expire)
T_REFRESH = 900.0  # registrations are republished this often (dht_t_refresh)
LOOKUP_TIMEOUT = 2.0
CACHE_TTL = 10.0

Out = list[tuple[int, Message]]  # (destination address, message)


def node_id(addr: int) -> int:
    return int.from_bytes(hashlib.sha3_256(addr.to_bytes(8, "big")).digest(), "big")


class _Lookup:
    def __init__(self, key: bytes, targets: list[int], deadline: float) -> None:
        self.key = key
        self.targets = targets  # still to ask, closest first
        self.deadline = deadline
        self.waiting = 0


class Directory:
    def __init__(self, me: int, k: int = K, expire: float = T_EXPIRE, refresh: float = T_REFRESH) -> None:
        self.me = me
        self.k = k
        self.expire = expire
        self.refresh = refresh
        self.members: set[int] = {me}
        self.mine: set[bytes] = set()  # what this member registered
        self.store: dict[bytes, dict[int, float]] = {}  # key -> {addr: expiry} held for the layer
        self.cache: dict[bytes, tuple[list[int], float]] = {}
        self._schedule: SortedList = SortedList()  # (expiry, key, addr)
        self._lookups: dict[int, _Lookup] = {}
        self._next_refresh = 0.0
        self.resolved: list[tuple[bytes, list[int]]] = []  # finished lookups, for the caller
        self.reachable: Callable[[int], bool] = lambda addr: True  # members with a route to them

    def closest(self, key: bytes, n: int | None = None) -> list[int]:
        k = int.from_bytes(hashlib.sha3_256(key).digest(), "big")
        return sorted(self.members, key=lambda a: node_id(a) ^ k)[: n or self.k]

    def set_members(self, members: Iterable[int], now: float) -> Out:
        """Membership changed: republish what we registered to its new home."""
        new = set(members) | {self.me}
        changed = new != self.members
        self.members = new
        return self._publish(self.mine, now) if changed else []

    def register(self, key: bytes, on: bool, now: float) -> Out:
        (self.mine.add if on else self.mine.discard)(key)
        if on:
            return self._publish([key], now)
        return [(a, DhtStore(self.me, key, self.me, 0.0)) for a in self.closest(key)]

    def _publish(self, keys: Iterable[bytes], now: float) -> Out:
        return [(a, DhtStore(self.me, key, self.me, self.expire)) for key in keys for a in self.closest(key)]

    def local(self, key: bytes, now: float) -> list[int] | None:
        """What we know without asking: our own names, entries we hold, the cache."""
        if key in self.mine:
            return [self.me]
        held = [a for a, exp in self.store.get(key, {}).items() if exp > now and a in self.members]
        if held:
            return held
        hit = self.cache.get(key)
        live = [a for a in hit[0] if a in self.members] if hit and hit[1] > now else []
        return live or None

    def lookup(self, key: bytes, now: float) -> tuple[int, Out]:
        """Start a lookup; its answer lands in `resolved` (an empty list: not found)."""
        cookie = random.getrandbits(62)
        targets = [a for a in self.closest(key) if a != self.me]
        lk = _Lookup(key, targets, now + LOOKUP_TIMEOUT)
        self._lookups[cookie] = lk
        return cookie, self._ask(cookie, lk)

    def _ask(self, cookie: int, lk: _Lookup) -> Out:
        out: Out = []
        while lk.targets and lk.waiting < ALPHA:
            target = lk.targets.pop(0)
            if self.reachable(target):  # no route yet (or any more): asking would only time out
                out.append((target, DhtFind(self.me, lk.key, cookie)))
                lk.waiting += 1
        if not out and lk.waiting == 0:
            del self._lookups[cookie]
            self.resolved.append((lk.key, []))
        return out

    def receive(self, msg: Message, now: float) -> Out:
        if isinstance(msg, DhtStore):
            if not math.isfinite(msg.ttl):
                return []
            entries = self.store.setdefault(msg.key, {})
            if msg.ttl <= 0:
                entries.pop(msg.addr, None)
                self.cache.pop(msg.key, None)
            else:
                expiry = now + min(msg.ttl, self.expire)
                entries[msg.addr] = expiry
                self._schedule.add((expiry, msg.key, msg.addr))
            if not entries:
                del self.store[msg.key]
            return []
        if isinstance(msg, DhtFind):
            return [(msg.src, DhtFound(self.me, msg.key, msg.cookie, self.local(msg.key, now) or []))]
        if isinstance(msg, DhtFound):
            lk = self._lookups.get(msg.cookie)
            if lk is None or lk.key != msg.key:
                return []
            lk.waiting -= 1
            live = [a for a in msg.addrs if a in self.members]  # not members that left since
            if live:
                del self._lookups[msg.cookie]
                self.cache[msg.key] = (live, now + CACHE_TTL)
                self.resolved.append((msg.key, live))
                return []
            return self._ask(msg.cookie, lk)
        return []

    def tick(self, now: float) -> Out:
        while self._schedule and self._schedule[0][0] <= now:
            expiry, key, addr = self._schedule.pop(0)
            entries = self.store.get(key)
            if entries is not None and entries.get(addr) == expiry:
                del entries[addr]
                if not entries:
                    del self.store[key]
        for cookie, lk in list(self._lookups.items()):
            if now >= lk.deadline:
                del self._lookups[cookie]
                self.resolved.append((lk.key, []))
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh
            return self._publish(self.mine, now)
        return []
