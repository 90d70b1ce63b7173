"""Longer kernel queues for flows whose reader fell behind, within one budget per data path.

A data-path thread that cannot hand an SDU to a flow's application grows that flow's socket queue
once (FLOW_QUEUE bytes) before it drops anything; all its flows together get at most QUEUE_BUDGET.
"""

from __future__ import annotations

import socket

FLOW_QUEUE = 1 << 20  # bytes a flow that overflowed may queue to its application (SO_SNDBUF, within
# net.core.wmem_max): room for the bursts a data path hands over while the application waits for a CPU
QUEUE_BUDGET = 64 << 20  # ... over all flows at once: kernel memory that idle readers can pin stays bounded


class QueueBudget:
    """The bytes of queue a data path has given its flows; `grow` takes a share, `give_back` returns it."""

    def __init__(self, per_flow: int = FLOW_QUEUE, total: int = QUEUE_BUDGET) -> None:
        self.per_flow = per_flow
        self.total = total
        self.given = 0

    def grow(self, sock: socket.socket) -> int:
        """Give `sock` a longer send queue: the bytes granted, 0 if the budget or the socket refused."""
        if self.given + self.per_flow > self.total:
            return 0
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.per_flow)
        except OSError:
            return 0
        self.given += self.per_flow
        return self.per_flow

    def give_back(self, granted: int) -> None:
        self.given -= granted
