"""Flows as the IRMd records them, and how their state may change: a table of transitions, any
other change an IllegalFlowTransition; and which failure a caller hears when several layers fail.
"""

from __future__ import annotations

import dataclasses
import enum

from proto.errors import Code
from proto.qos import QosSpec


class FlowState(enum.Enum):
    PENDING = "pending"  # asked of an IPCP, not answered yet
    ALLOCATED = "allocated"
    DEALLOC = "dealloc"  # the peer deallocated
    DOWN = "down"  # the layer or IPCP failed


class FlowEvent(enum.Enum):
    ALLOCATED = "allocated"  # the IPCP answered the allocation (or handed an arriving flow over)
    PEER_DEALLOC = "peer dealloc"  # the IPCP says the peer let go
    DOWN = "down"  # the IPCP says the flow is lost, or the IPCP died


S, E = FlowState, FlowEvent
# How a flow ended stays how it ended: a later DOWN does not undo the peer's DEALLOC, and an
# allocation answered after the flow ended (the IPCP's reply and its notice crossed) is still ended.
TRANSITIONS: dict[tuple[FlowState, FlowEvent], FlowState] = {
    (S.PENDING, E.ALLOCATED): S.ALLOCATED,
    (S.PENDING, E.DOWN): S.DOWN,
    (S.PENDING, E.PEER_DEALLOC): S.DEALLOC,
    (S.ALLOCATED, E.PEER_DEALLOC): S.DEALLOC,
    (S.ALLOCATED, E.DOWN): S.DOWN,
    (S.DEALLOC, E.ALLOCATED): S.DEALLOC,
    (S.DEALLOC, E.PEER_DEALLOC): S.DEALLOC,
    (S.DEALLOC, E.DOWN): S.DEALLOC,
    (S.DOWN, E.ALLOCATED): S.DOWN,
    (S.DOWN, E.PEER_DEALLOC): S.DOWN,
    (S.DOWN, E.DOWN): S.DOWN,
}


class IllegalFlowTransition(RuntimeError):
    """An event a flow in its state cannot take (a flow allocated twice)."""


def next_state(state: FlowState, event: FlowEvent) -> FlowState:
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalFlowTransition(f"a flow in state {state.value} cannot be {event.value}") from None


@dataclasses.dataclass
class Flow:
    flow_id: int
    owner: int  # connection id of the owning application
    pid: int
    name: str
    layer: str
    ipcp: str
    qos: QosSpec
    role: str  # "src" or "dst"
    state: FlowState = FlowState.PENDING
    mtu: int = 0
    uid: int = -1  # the owner's uid, from SO_PEERCRED
    gid: int = -1  # and its gid (-1: acting as another user)
    groups: tuple[int, ...] | None = None  # its supplementary groups, from SO_PEERGROUPS (None: not known)
    fd: int = -1  # the IRMd's copy of the application's end, to tear the flow down
    peer: int = 0  # the other end's flow id, when the local layer handed both ends to this IRMd
    remote: str = ""  # who asked for an arriving flow, as its layer names it ("": a local or our own flow)

    def advance(self, event: FlowEvent) -> FlowState:
        self.state = next_state(self.state, event)
        return self.state


# -- when several layers reach a name ------------------------------------------------------

# A layer that answered "not here" (a stale directory) or "not this QoS" may leave the flow to the
# next layer; any other failure is the answer.
TRY_NEXT = frozenset({Code.ENOENT, Code.ENOTSUP})


def try_next_layer(code: str) -> bool:
    return code in TRY_NEXT


def worse(current: str, new: str) -> bool:
    """Does failure `new` replace `current` as the one to report? The latest does, except that a
    layer's refusal of the QoS is not hidden by a later layer's stale directory."""
    return not (new == Code.ENOENT and current == Code.ENOTSUP)
