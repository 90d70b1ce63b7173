"""The application library: allocate flows to names, read and write them, wait on many.

    from flowlib import flow_alloc, qos
    with flow_alloc("pong", qos=qos.raw) as f:
        f.write(b"hi"); print(f.read())
"""

from flowlib import qos
from flowlib.events import Event, EventQueue, EventType, FlowSet, fevent
from flowlib.flow import FLOWFRNONBLOCK, Fccntl, Flow, flow_accept, flow_alloc, flow_join
from proto.errors import (
    FlowDown,
    FlowError,
    FlowPeer,
    FlowReset,
    FlowTimeout,
    FlowWouldBlock,
    InvalidArgument,
    IrmdUnreachable,
    LayerDown,
    NameNotFound,
    PermissionDenied,
    QosNotSupported,
)
from proto.qos import QosSpec

__all__ = [
    "FLOWFRNONBLOCK",
    "Event",
    "EventQueue",
    "EventType",
    "Fccntl",
    "Flow",
    "FlowDown",
    "FlowError",
    "FlowPeer",
    "FlowReset",
    "FlowSet",
    "FlowTimeout",
    "FlowWouldBlock",
    "InvalidArgument",
    "IrmdUnreachable",
    "LayerDown",
    "NameNotFound",
    "PermissionDenied",
    "QosNotSupported",
    "QosSpec",
    "fevent",
    "flow_accept",
    "flow_alloc",
    "flow_join",
    "qos",
]
