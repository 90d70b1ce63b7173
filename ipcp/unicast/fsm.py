"""State machines of the unicast IPCP's sans-IO cores: a transition table per role, and the
named error an illegal transition raises (as h11 does), shared by enroll, connmgr and fa.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class IllegalTransition(Exception):
    """An event the machine's table has no transition for in its current state."""

    def __init__(self, machine: str, state: enum.Enum, event: enum.Enum) -> None:
        super().__init__(f"{machine}: {event.name} is not allowed in state {state.name}")
        self.machine, self.state, self.event = machine, state, event


class Machine(Generic[S, E]):
    """A state and the table it moves by: {(state, event): next state}."""

    def __init__(self, name: str, table: dict[tuple[S, E], S], state: S) -> None:
        self.name = name
        self.table = table
        self.state = state

    def fire(self, event: E) -> S:
        try:
            self.state = self.table[self.state, event]
        except KeyError:
            raise IllegalTransition(self.name, self.state, event) from None
        return self.state

    def can(self, event: E) -> bool:
        return (self.state, event) in self.table


class TimedCore:
    """What the handshake and enrollment cores share: SDUs to send, and one deadline while not done."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self._out: list[bytes] = []

    @property
    def done(self) -> bool:
        raise NotImplementedError

    def pop_out(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None if self.done else self.deadline

    def handle_timer(self, now: float) -> None:
        if not self.done and now >= self.deadline:
            self.expire()

    def expire(self) -> None:
        """The deadline passed before the core was done."""
        raise NotImplementedError
