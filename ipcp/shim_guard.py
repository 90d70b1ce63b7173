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


class Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RateLimits:
    """A token bucket per source (the least recently heard forgotten beyond `max_sources`), and one
    bucket shared by every source not known to us, so that changing addresses earns no extra tokens.
    A member's bucket fills at `member_rate`: a host of ours opening and closing flows quickly sends
    more than a stranger may, and its deallocations lost to the rate left its flows behind."""

    def __init__(
        self, rate: float, strangers_rate: float, member_rate: float, max_sources: int, burst: float = 2.0
    ) -> None:
        """Rates in tokens a second; each bucket saves `burst` seconds of its rate."""
        self.rate, self.member_rate, self.burst = rate, member_rate, burst
        self.max_sources = max_sources
        self._buckets: OrderedDict[Hashable, Bucket] = OrderedDict()
        self._strangers = Bucket(strangers_rate, burst * strangers_rate)

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, src: Hashable, known: bool, now: float, member: bool = False) -> bool:
        """Whether a message from `src` may be taken. `member`: `src` names a proven member (whose
        bucket, once made, fills at `member_rate`), and `known` exempts it from the strangers' bucket."""
        rate = self.member_rate if member else self.rate
        burst = self.burst * rate
        bucket = self._buckets.get(src)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[src] = Bucket(rate, burst, now)
        else:
            self._buckets.move_to_end(src)
        return bucket.take(now) and (known or self._strangers.take(now))
