"""Congestion control of FRCT senders, sans-IO: how many PDUs may be in flight.

NewReno's AIMD counted in PDUs; loss detection lives in flowlib.recovery, which calls these hooks.
"""

from __future__ import annotations

INITIAL_WINDOW = 16.0  # PDUs in flight before the first ack
MIN_WINDOW = 2.0


class NewReno:
    """Slow start to ssthresh, then one PDU more per window acknowledged; halve on loss."""

    def __init__(self, limit: int) -> None:
        self.limit = float(limit)  # never more than the sender could keep: growth past it is meaningless
        self.cwnd = min(INITIAL_WINDOW, self.limit)
        self.ssthresh = self.limit

    def window(self) -> int:
        return int(self.cwnd)

    def on_acked(self, n: int) -> None:
        """n PDUs were acknowledged for the first time."""
        if self.cwnd < self.ssthresh:
            self.cwnd = min(self.cwnd + n, self.limit)
        else:
            self.cwnd = min(self.cwnd + n / self.cwnd, self.limit)

    def on_loss(self) -> None:
        """A loss was found by acks (once per recovery episode): halve."""
        self.ssthresh = max(self.cwnd / 2, MIN_WINDOW)
        self.cwnd = self.ssthresh

    def on_timeout(self) -> None:
        """The retransmission timer fired: the path may be gone, start over from the minimum."""
        self.ssthresh = max(self.cwnd / 2, MIN_WINDOW)
        self.cwnd = MIN_WINDOW
