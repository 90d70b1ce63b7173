"""Management PDUs handed from the data transfer thread to the IPCP's loop, queued per neighbour:
bounded in all, taken in turn, so that one neighbour's flood cannot crowd out what the others send.
"""

from __future__ import annotations

import collections
import threading


class MgmtQueue:
    """The loop takes one PDU of each neighbour in turn; when full, the neighbour holding the most gives
    up its newest PDU to one holding fewer. A member sending PDUs that cost a signature check each (stores
    with bad signatures: nothing to sign on its side) once kept one shared queue full, and lookups and
    flow requests through every other neighbour were dropped. Thread-safe: put() from the data transfer
    thread, take() from the loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.dropped = 0  # PDUs not queued, or pushed out by a neighbour holding fewer
        self._lock = threading.Lock()
        self._by_hop: dict[int, collections.deque[bytes]] = {}  # only hops with PDUs queued
        self._turns: collections.deque[int] = collections.deque()  # those hops, in the order served
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def put(self, hop: int, pdu: bytes) -> bool:
        """Queue `pdu` from neighbour `hop`; True when the queue was empty (the loop is to be woken)."""
        with self._lock:
            queue = self._by_hop.get(hop)
            if self._size >= self.limit:
                self.dropped += 1
                longest = max(self._by_hop, key=lambda h: len(self._by_hop[h]))
                if queue is not None and len(queue) >= len(self._by_hop[longest]):
                    return False  # this neighbour holds the most already
                self._by_hop[longest].pop()
                self._size -= 1
                if not self._by_hop[longest]:
                    del self._by_hop[longest]
                    self._turns.remove(longest)
            if queue is None:
                queue = self._by_hop[hop] = collections.deque()
                self._turns.append(hop)
            queue.append(pdu)
            self._size += 1
            return self._size == 1

    def take(self) -> bytes | None:
        """The next PDU, of the next neighbour in turn; None when the queue is empty."""
        with self._lock:
            if not self._turns:
                return None
            hop = self._turns.popleft()
            queue = self._by_hop[hop]
            pdu = queue.popleft()
            self._size -= 1
            if queue:
                self._turns.append(hop)
            else:
                del self._by_hop[hop]
            return pdu
