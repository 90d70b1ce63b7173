"""Congestion avoidance of a unicast layer (`congestion mb-ecn`): forwarders mark PDUs with how
full the queue to their next hop is, receivers echo the level and their delivery rate, senders pace.

Multi-bit ECN as in Ouroboros, plus the receiver's measured delivery rate in every update, so a
sender lands on the bottleneck's rate in one round trip instead of halving its way down to it.
Sans-IO: fed queue depths, marks, byte counts and times; answers marks, updates and waits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Protocol

MARK_FROM = 32  # average queue fullness (of 255) below which a forwarder does not mark
UPDATE_EVERY = 8  # marked PDUs between two updates from a receiver
UPDATE_GAP = 0.001  # seconds between two updates at least: each is signed, and marks that come and
# go with every PDU (a hostile sender or forwarder) must not make the receiver sign one per PDU
RATE_WINDOW = 0.01  # seconds over which a receiver measures its delivery rate
HOLD = 0.02  # seconds between two decreases of a sender's rate: one round trip of a congested path
CLIMBING = 1.25  # a delivery rate this much above the last one reported is reported unasked
STALE = 0.5  # seconds after which a sender stops believing the last congestion it heard of
QUIET = 2.0  # seconds without congestion after which a sender slow-starts again: it is long gone
INITIAL_RATE = 1.25e6  # bytes per second a new flow starts at (10 Mbit/s)
SLOW_START = 0.5  # the fraction its rate grows by every RATE_WINDOW until it first hears of congestion
INCREASE = 32_000.0  # ... and after, the bytes/s it grows by every RATE_WINDOW: additive, so flows
# that share a bottleneck converge on equal shares (each decrease takes more from the faster)
MIN_RATE = 16_384.0  # bytes per second: the floor, so a flow always makes progress
UNLIMITED = 1e9  # bytes per second above which a sender stops pacing altogether
BURST = 16_384.0  # bytes a paced sender may send at once


def ecn_level(queued: int, capacity: int) -> int:
    """The mark for a PDU sent into a queue holding `queued` of `capacity` bytes: 0 to 255."""
    level = (queued << 8) // max(capacity, 1)
    return 0 if level < MARK_FROM else min(level, 255)


@dataclasses.dataclass
class Update:
    """What a receiver tells the sender: congestion level (0: none) and bytes/s delivered."""

    ece: int
    rate: float


class Receiver:
    """Per flow at the receiving end: a smoothed congestion level and the delivery rate, echoed
    on marks, and reported unasked while it keeps climbing (the sender is slow-starting)."""

    def __init__(self, now: float) -> None:
        self.ece = 0
        self.rate = 0.0
        self._reported = 0.0  # the climbing rate last reported
        self._marked = 0
        self._window_start = now
        self._window_bytes = 0
        self._sent = now - UPDATE_GAP  # when the last update went
        self._held = False  # an update fell due within UPDATE_GAP of the last: the next PDU after sends it

    def on_pdu(self, ecn: int, nbytes: int, now: float) -> Update | None:
        """A PDU of the flow arrived carrying mark `ecn`: an update to send back, if one is due
        (at most one every UPDATE_GAP: one held back goes with the first PDU after, as things are then)."""
        due = self._due(ecn, nbytes, now)
        if due is None and not self._held:
            return None
        if now - self._sent < UPDATE_GAP:
            self._held = True
            return None
        self._sent, self._held = now, False
        return due if due is not None else Update(self.ece, self.rate)

    def _due(self, ecn: int, nbytes: int, now: float) -> Update | None:
        report = None
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW:
            if elapsed < 4 * RATE_WINDOW:  # else the flow was idle: that says nothing of the path
                self.rate = self._window_bytes / elapsed
                if self.rate > CLIMBING * self._reported:
                    self._reported = self.rate
                    report = Update(self.ece, self.rate)
            else:
                self._reported = 0.0  # a new busy spell: its sender slow-starts again
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += nbytes
        if not ecn and not self.ece:
            return report
        before = self.ece
        self.ece = ecn if ecn > before else (3 * before + ecn) // 4  # up at once, down gently
        if not self.ece:
            self._marked = 0
            return Update(0, self.rate)  # the congestion is over: let the sender speed up
        self._marked += 1
        if not before or self._marked >= UPDATE_EVERY:
            self._marked = 0
            return Update(self.ece, self.rate)
        return report


class Sender:
    """Per flow at the sending end: a token bucket whose rate follows the receiver's updates."""

    def __init__(self, now: float) -> None:
        self.rate = INITIAL_RATE
        self.slow_start = True
        self.ece = 0
        self._congested = -QUIET  # when congestion was last heard of
        # The last delivery rate heard, while slow-starting; until the first echo, as if half the
        # initial rate arrived: a sender whose echoes are slow (a loaded host) cannot run ahead of them.
        self._delivered = INITIAL_RATE / 2
        self._heard = now
        self._decreased = -HOLD
        self._grown = now
        self._tokens = BURST
        self._last = now

    @property
    def paced(self) -> bool:
        return self.rate < UNLIMITED

    def on_update(self, update: Update, now: float) -> None:
        """An update from the flow's receiver: a remote member's numbers, so a level is taken as the
        byte it is and a rate only when it is one (a NaN, an infinite or a negative one says nothing);
        the pace never drops below MIN_RATE, so every wait it asks for is finite and short."""
        ece = min(max(update.ece, 0), 255)
        rate = update.rate if math.isfinite(update.rate) and update.rate > 0 else 0.0
        self.ece, self._heard = ece, now
        if not ece:
            self._delivered = rate
            return
        self._congested = now
        if now - self._decreased < HOLD:
            return
        # Below what arrives, the more so the fuller the queue (down to half): the queue drains, then we grow.
        target = rate * (1 - min(ece, 128) / 256) if rate else self.rate / 2
        if not self.paced:
            self._tokens, self._last = BURST, now
        self.rate = max(MIN_RATE, min(self.rate, target))
        self.slow_start = False
        self._decreased = self._grown = now

    def admit(self, nbytes: int, now: float) -> float:
        """`nbytes` are being sent: how long to wait before sending more (0: go on)."""
        if not self.paced:
            return 0.0
        if self.ece and now - self._heard > STALE:
            self.ece = 0  # the receiver went quiet about it: it is over
        if not self.slow_start and now - self._congested > QUIET:
            self.slow_start, self._delivered = True, 0.0
        if not self.ece and now - self._grown >= RATE_WINDOW:
            windows = min(now - self._grown, 2 * RATE_WINDOW) / RATE_WINDOW  # grown while sending, not idle
            if self.slow_start:  # never beyond twice what arrives: ack-clocked, as TCP's
                grown = self.rate * (1 + SLOW_START * windows)
                fresh = self._delivered and now - self._heard < STALE
                self.rate = max(MIN_RATE, min(grown, 2 * self._delivered)) if fresh else grown
            else:
                self.rate += INCREASE * windows
            self._grown = now
            if not self.paced:
                return 0.0
        self._tokens = min(BURST, self._tokens + (now - self._last) * self.rate) - nbytes
        self._last = now
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


# -- the policies, as the data path uses them ---------------------------------------------------

SAMPLE_EVERY = 8  # PDUs sent into an N-1 flow between two looks at how full its queue is


@dataclasses.dataclass(eq=False)
class N1Queue:
    """How full the queue into one N-1 flow is, looked at every SAMPLE_EVERY PDUs and averaged
    (as RED does), so that a burst the next hop is draining is not taken for congestion."""

    depth: Callable[[], int]  # bytes queued now
    capacity: int
    sent: int = 0
    level: int = 0
    average: float = 0.0

    def sample(self) -> int:
        self.average += (self.depth() - self.average) / 8
        self.level = ecn_level(int(self.average), self.capacity)
        return self.level


class Flow(Protocol):
    rx: Receiver | None
    tx: Sender | None


class Congestion(Protocol):
    """What the data path asks of a congestion policy, per flow, per N-1 flow and per PDU."""

    @property
    def name(self) -> str: ...
    @property
    def holds(self) -> bool: ...  # our flows' writers are held back by a full first hop (else PDUs drop)

    def flow_added(self, flow: Flow, now: float) -> None: ...
    def n1_added(self, hop: int, depth: Callable[[], int], capacity: int) -> None: ...
    def n1_removed(self, hop: int) -> None: ...
    def level(self, hop: int) -> int: ...  # the mark a PDU forwarded to `hop` gets now (0: none)


class Nop:
    """`congestion none`: nothing is measured, marked or paced."""

    name = "none"
    holds = False

    def flow_added(self, flow: Flow, now: float) -> None:
        flow.rx = flow.tx = None

    def n1_added(self, hop: int, depth: Callable[[], int], capacity: int) -> None:
        pass

    def n1_removed(self, hop: int) -> None:
        pass

    def level(self, hop: int) -> int:
        return 0


class MbEcn:
    """`congestion mb-ecn`: forwarders mark by their next hop's averaged queue, receivers echo,
    senders pace (Receiver, Sender above)."""

    name = "mb-ecn"
    holds = True

    def __init__(self) -> None:
        self.queues: dict[int, N1Queue] = {}

    def flow_added(self, flow: Flow, now: float) -> None:
        flow.rx, flow.tx = Receiver(now), Sender(now)

    def n1_added(self, hop: int, depth: Callable[[], int], capacity: int) -> None:
        self.queues[hop] = N1Queue(depth, capacity)

    def n1_removed(self, hop: int) -> None:
        self.queues.pop(hop, None)

    def level(self, hop: int) -> int:
        queue = self.queues.get(hop)
        if queue is None:
            return 0
        queue.sent += 1
        return queue.sample() if queue.sent % SAMPLE_EVERY == 0 else queue.level


POLICIES: dict[str, type[Nop] | type[MbEcn]] = {"none": Nop, "mb-ecn": MbEcn}


def by_name(name: str) -> Congestion:
    try:
        policy: Congestion = POLICIES[name]()
        return policy
    except KeyError:
        raise ValueError(f"unknown congestion policy {name!r}: expected one of {', '.join(POLICIES)}") from None
