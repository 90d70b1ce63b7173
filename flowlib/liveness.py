"""Peer liveness of one flow, sans-IO, as C Ouroboros 0.23's dev.c keeps it: a keepalive (an empty SDU)
after a quarter of the QoS timeout without sending, FLOW_PEER after the whole timeout without receiving.

The flow engine's thread drives it for every flow of the process (`handle_timer(now)`, `get_timer()`),
so a process that sleeps still answers for its flows. What arrives counts whether the application
reads it (`heard`, as C counts packets pulled) or not (the engine sees it queue up): unlike C, a peer
is never declared silent because this side did not read.
"""

from __future__ import annotations

import enum


class Action(enum.Enum):
    KEEPALIVE = "keepalive"  # send an empty SDU now
    PEER = "peer"  # the peer stayed silent for the whole timeout: raise FLOW_PEER


class Liveness:
    """What one flow sent and received lately, and the state fccntl and the timeout give it."""

    def __init__(self, timeout_ms: int, now: float) -> None:
        self.timeout = timeout_ms / 1000  # 0: no keepalives, no FLOW_PEER
        self.last_rcv = now
        self.last_snd = now
        self.wrote = False  # set by the application's writes on flows the engine does not carry
        self.heard = False  # set by the application's reads on them
        self.peer = False  # FLOW_PEER was raised: for good, as in C
        self.down = False  # FLOWFDOWN is set: no keepalives, no peer checks, reads and writes fail

    def received(self, now: float) -> None:
        self.last_rcv = now

    def sent(self, now: float) -> None:
        self.last_snd = now

    def set_down(self, down: bool, now: float) -> None:
        """FLOWFDOWN set or cleared; a flow coming back up gives its peer a whole timeout again."""
        if self.down and not down:
            self.last_rcv = now
        self.down = down

    def get_timer(self) -> float | None:
        if not self.timeout or self.peer or self.down:
            return None
        return min(self.last_snd + self.timeout / 4, self.last_rcv + self.timeout)

    def handle_timer(self, now: float) -> Action | None:
        if self.wrote:  # an application write since the last look counts as sending
            self.wrote = False
            self.last_snd = now
        if self.heard:  # and a read as receiving
            self.heard = False
            self.last_rcv = now
        if not self.timeout or self.peer or self.down:
            return None
        if now - self.last_rcv >= self.timeout:
            self.peer = True  # and no more keepalives from this side, as C
            return Action.PEER
        if now - self.last_snd >= self.timeout / 4:
            self.last_snd = now
            return Action.KEEPALIVE
        return None
