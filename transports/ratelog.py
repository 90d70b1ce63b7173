"""Log lines that others can cause (refused connections and flows, peers' bad messages, what a
started program prints), at a bounded rate: the rest are counted and reported with the next line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLog:
    """At most `rate` lines a second to `logger` (bursts of `burst`), so a flood cannot fill the disk."""

    def __init__(self, rate: float = 10.0, burst: int = 20, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:  # fmt: skip
        self.rate, self.burst, self.clock = rate, burst, clock
        self.logger = logger or logging.getLogger("ouroboros")
        self.tokens, self.at, self.suppressed = float(burst), clock(), 0

    def log(
        self,
        fmt: str,
        *args: object,
        level: int = logging.INFO,
        extra: dict[str, object] | None = None,
        exc_info: bool = False,
    ) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            self.suppressed += 1
            return
        self.tokens -= 1
        if self.suppressed:
            self.logger.warning("(%d more lines not logged)", self.suppressed)
            self.suppressed = 0
        self.logger.log(level, fmt, *args, extra=extra, exc_info=exc_info)
