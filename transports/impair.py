"""Test-only impairment of a shim's outgoing SDUs: loss, duplication and reordering.

Off unless a layer is bootstrapped with `impair loss=5,dup=1,reorder=2`
(percentages); used to test FRCT where the kernel offers no netem.
"""

from __future__ import annotations

import dataclasses
import random
import socket
from typing import Any

from transports.relay import Framing

KINDS = ("loss", "dup", "reorder")


@dataclasses.dataclass(frozen=True)
class Impairment:
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Impairment:
        values: dict[str, float] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key not in KINDS:
                raise ValueError(f"impair {item!r}: expected {'|'.join(KINDS)}=PERCENT, comma-separated")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"impair {item!r}: {value!r} is not a percentage") from None
            if not 0 <= values[key] <= 100:
                raise ValueError(f"impair {item!r}: a percentage is 0 to 100")
        return cls(**values)


class ImpairedFraming:
    """Wraps a transport's framing; decisions are per SDU, from a seeded generator."""

    def __init__(self, inner: Framing, impairment: Impairment, seed: int | None = None) -> None:
        self.inner = inner
        self.impairment = impairment
        self._rng = random.Random(seed)
        self._held: tuple[Any, bytes] | None = None
        self.parse = inner.parse

    def send(self, sock: socket.socket, flow: Any, sdu: bytes) -> None:
        imp, rng = self.impairment, self._rng
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
