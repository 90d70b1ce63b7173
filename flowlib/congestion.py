"""The FRCT sender's congestion window, sans-IO: how many PDUs may be in flight.

Slow start, then additive increase, as NewReno; but a loss is taken for congestion only when it looks like
a failing path (a timeout repeated without an ack between), as Ouroboros leaves congestion to the layer.
"""

from __future__ import annotations

INITIAL_WINDOW = 16.0  # PDUs in flight before the first ack
MIN_WINDOW = 2.0


class Window:
    """Slow start to ssthresh, then one PDU more per window acknowledged. Losses found by acks cost no
    window: C's FRCT has no congestion control, the layer's (mb-ecn) paces flows, and halving on every
    random loss starves a flow on a lossy link (at 5% loss NewReno keeps 3 to 5 PDUs in flight). The
    RTT cannot tell those losses from congestion on a host whose round trip is mostly scheduling. A
    timeout that repeats without an ack between says the path may be gone: then start over from the
    minimum. The peer's window (flow control) bounds what is in flight in every case."""

    def __init__(self, limit: int) -> None:
        self.limit = float(limit)  # never more than the sender could keep: growth past it is meaningless
        self.cwnd = min(INITIAL_WINDOW, self.limit)
        self.ssthresh = self.limit
        self.losses = 0  # losses found by acks (once per recovery episode): repaired, no window cost
        self.collapses = 0  # repeated timeouts: the window started over

    def window(self) -> int:
        return int(self.cwnd)

    def on_acked(self, n: int) -> None:
        """n PDUs were acknowledged for the first time."""
        if self.cwnd < self.ssthresh:
            self.cwnd = min(self.cwnd + n, self.limit)
        else:
            self.cwnd = min(self.cwnd + n / self.cwnd, self.limit)

    def on_loss(self) -> None:
        """A loss was found by acks (once per recovery episode): acks still flow, so the path works."""
        self.losses += 1

    def on_timeout(self, repeated: bool) -> None:
        """The retransmission timer fired; `repeated`: again without an ack between. One timeout is a
        lost retransmission or a tail loss; a second in a row, a path that may be gone: start over."""
        if not repeated:
            return
        self.collapses += 1
        self.ssthresh = max(self.cwnd / 2, MIN_WINDOW)
        self.cwnd = MIN_WINDOW
