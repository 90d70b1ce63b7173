"""Test-only impairment of a shim's outgoing SDUs: loss, duplication, reordering and a slow link.

Off unless a layer is bootstrapped with `impair loss=5,dup=1,reorder=2,rate=8`
(percentages, and Mbit/s); used to test FRCT and congestion avoidance where the kernel offers no netem.
"""

from __future__ import annotations

import dataclasses
import random
import socket
import time
from typing import Any

from transports.relay import Framing

KINDS = ("loss", "dup", "reorder", "rate")


@dataclasses.dataclass(frozen=True)
class Impairment:
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    rate: float = 0.0  # Mbit/s the shim sends at, at most (0: as fast as it can)

    @classmethod
    def parse(cls, text: str) -> Impairment:
        values: dict[str, float] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key not in KINDS:
                raise ValueError(f"impair {item!r}: expected loss|dup|reorder=PERCENT or rate=MBITS, comma-separated")
            what = "a rate in Mbit/s" if key == "rate" else "a percentage"
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"impair {item!r}: {value!r} is not {what}") from None
            if not 0 <= values[key] <= (1e6 if key == "rate" else 100):
                raise ValueError(f"impair {item!r}: {what} is 0 to {1e6 if key == 'rate' else 100:g}")
        return cls(**values)


class ImpairedFraming:
    """Wraps a transport's framing; decisions are per SDU, from a seeded generator."""

    def __init__(self, inner: Framing, impairment: Impairment, seed: int | None = None) -> None:
        self.inner = inner
        self.impairment = impairment
        self._rng = random.Random(seed)
        self._held: tuple[Any, bytes] | None = None
        self._free_at = 0.0  # when the slow link has sent what it was given
        self.parse = inner.parse
        self.needs_src = inner.needs_src

    def send(self, sock: socket.socket, flow: Any, sdu: bytes) -> None:
        imp, rng = self.impairment, self._rng
        if imp.rate:  # the shim's thread waits as a slow NIC would: what comes after queues up before it
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + len(sdu) * 8 / (imp.rate * 1e6)
            if self._free_at - now > 0.001:
                time.sleep(self._free_at - now)
        if rng.random() * 100 < imp.loss:
            return
        if self._held is None and rng.random() * 100 < imp.reorder:
            self._held = (flow, sdu)  # goes out after the next one
            return
        self.inner.send(sock, flow, sdu)
        if rng.random() * 100 < imp.dup:
            self.inner.send(sock, flow, sdu)
        if self._held is not None:
            held, self._held = self._held, None
            self.inner.send(sock, *held)
