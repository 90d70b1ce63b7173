"""Longer kernel queues for flows whose reader fell behind, within one budget per data path.

A data-path thread that cannot hand an SDU to a flow's application grows that flow's socket queue
once (FLOW_QUEUE bytes) before it drops anything; all its flows together get at most QUEUE_BUDGET.
"""

from __future__ import annotations

import socket
from typing import Protocol

FLOW_QUEUE = 1 << 20  # bytes a flow that overflowed may queue to its application (SO_SNDBUF, within
# net.core.wmem_max): room for the bursts a data path hands over while the application waits for a CPU
QUEUE_BUDGET = 64 << 20  # ... over all flows at once: kernel memory that idle readers can pin stays bounded


class Queued(Protocol):
    io: socket.socket  # the data path's end of the flow's socket pair
    queue: int  # bytes of queue given to it from the budget (0: the system's default)


class QueueBudget:
    """The bytes of queue a data path has given its flows; `grow` gives a flow its share, `give_back`
    takes it back."""

    def __init__(self, per_flow: int = FLOW_QUEUE, total: int = QUEUE_BUDGET) -> None:
        self.per_flow = per_flow
        self.total = total
        self.given = 0

    def grow(self, flow: Queued) -> bool:
        """Give `flow`'s socket a longer send queue, once: False if it has one already, or the budget
        or the socket refused."""
        if flow.queue or self.given + self.per_flow > self.total:
            return False
        try:
            flow.io.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.per_flow)
        except OSError:
            return False
        self.given += self.per_flow
        flow.queue = self.per_flow
        return True

    def give_back(self, flow: Queued) -> None:
        self.given -= flow.queue
        flow.queue = 0
