"""The flow API's exceptions (defined in proto.errors, shared with irm and the daemons)."""

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
    from_remote,
)

__all__ = [
    "FlowDown",
    "FlowError",
    "FlowPeer",
    "FlowReset",
    "FlowTimeout",
    "FlowWouldBlock",
    "InvalidArgument",
    "IrmdUnreachable",
    "LayerDown",
    "NameNotFound",
    "PermissionDenied",
    "QosNotSupported",
    "from_remote",
]
