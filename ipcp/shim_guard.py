"""What stands between a shim and an untrusted network: cookies proving that an address answers,
and per-source rate limits in a table of bounded size. Sans-IO: time comes in as `now`.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Hashable

COOKIE_EPOCH = 30.0  # seconds a cookie stays good (and up to one epoch more: the previous one is honoured)


class Cookies:
    """Stateless return-routability cookies: a keyed hash of (address, epoch); nothing is stored per address."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._key = secret or os.urandom(32)

    def _mac(self, addr: Hashable, epoch: int) -> int:
        h = hashlib.blake2b(repr(addr).encode() + epoch.to_bytes(8, "big", signed=True), key=self._key, digest_size=8)
        return int.from_bytes(h.digest(), "big") or 1  # 0 means "no cookie" on the wire

    def make(self, addr: Hashable, now: float) -> int:
        return self._mac(addr, int(now // COOKIE_EPOCH))

    def check(self, addr: Hashable, cookie: int, now: float) -> bool:
        if not cookie:
            return False
        epoch = int(now // COOKIE_EPOCH)
        return cookie in (self._mac(addr, epoch), self._mac(addr, epoch - 1))


class RateLimits:
    """A token bucket per source (the least recently heard forgotten beyond `max_sources`), and one
    bucket shared by every source not known to us, so that changing addresses earns no extra tokens."""

    def __init__(self, rate: float, burst: float, strangers_rate: float, strangers_burst: float,
                 max_sources: int) -> None:
        self.rate, self.burst = rate, burst
        self.strangers_rate, self.strangers_burst = strangers_rate, strangers_burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()
        self._strangers = [strangers_burst, 0.0]

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def _take(bucket: list[float], rate: float, burst: float, now: float) -> bool:
        bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def allow(self, src: Hashable, known: bool, now: float) -> bool:
        bucket = self._buckets.get(src)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[src] = [self.burst, now]
        else:
            self._buckets.move_to_end(src)
        if not self._take(bucket, self.rate, self.burst, now):
            return False
        return known or self._take(self._strangers, self.strangers_rate, self.strangers_burst, now)
