"""Error codes of the control protocol and the flow API's exceptions: one class per code.

An Error reply carries a `Code`; `from_remote` turns it into its exception, and a daemon raises
the exception to answer with its code. Callers tell failures apart by class, never by words.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Code(enum.StrEnum):
    """The codes Error replies carry (errno-like symbols, as text on the wire)."""

    ENOENT = "ENOENT"  # a name, IPCP, layer, flow or process not found
    EEXIST = "EEXIST"  # already there: a name, an IPCP, a registration
    EINVAL = "EINVAL"  # a request that cannot be taken as given
    EPERM = "EPERM"  # not for this caller
    ETIMEDOUT = "ETIMEDOUT"
    ENOTCONN = "ENOTCONN"  # the layer or IPCP is down
    EIPCP = "EIPCP"  # the IPCP failed the operation
    EPROTO = "EPROTO"  # a malformed or unexpected message
    ENOTSUP = "ENOTSUP"  # the layer cannot serve the QoS asked
    EBUSY = "EBUSY"  # in use: a name still registered
    EDQUOT = "EDQUOT"  # a per-user or per-connection limit is reached
    EIO = "EIO"  # an internal error
    EAUTH = "EAUTH"  # the flow allocation failed authentication (OAP header, timestamp, replay, identity)
    ECRYPT = "ECRYPT"  # the allocation's key exchange failed, or encryption was required and not offered


class FlowError(Exception):
    """Base of all flow API errors; `code` is the Error reply's code, None for local failures."""

    code: ClassVar[Code | None] = None


class IrmdUnreachable(FlowError):
    """No IRMd answers on the control socket (or its socket is not one to trust)."""


class NotFound(FlowError):
    """A name (not registered in any reachable layer), IPCP, layer, flow or process not found."""

    code = Code.ENOENT


NameNotFound = NotFound  # the flow API's name for it


class AlreadyExists(FlowError):
    """A name, IPCP or registration that is already there."""

    code = Code.EEXIST


class InvalidArgument(FlowError, ValueError):
    """A request the IRMd or the flow cannot take as given."""

    code = Code.EINVAL


class PermissionDenied(FlowError, PermissionError):
    """The IRMd refused the request for this user."""

    code = Code.EPERM


class FlowTimeout(FlowError, TimeoutError):
    """An allocation, accept, read or write did not complete in time."""

    code = Code.ETIMEDOUT


class LayerDown(FlowError):
    """The layer serving the flow, or the IPCP asked, is not running."""

    code = Code.ENOTCONN


class IpcpFailed(FlowError):
    """The IPCP failed the operation."""

    code = Code.EIPCP


class ProtocolError(FlowError):
    """A message that does not follow the control protocol."""

    code = Code.EPROTO


class QosNotSupported(FlowError):
    """No layer that reaches the name can serve the QoS asked."""

    code = Code.ENOTSUP


class Busy(FlowError):
    """The object is in use (a name still registered in a layer), or too much is in flight: try again."""

    code = Code.EBUSY


class LimitReached(FlowError):
    """A per-user or per-connection limit of the IRMd is reached (flows, connections, names, ...)."""

    code = Code.EDQUOT


class InternalError(FlowError):
    """The IRMd failed in a way it did not expect."""

    code = Code.EIO


class AuthenticationFailed(FlowError, PermissionError):
    """The flow allocation failed authentication: a bad or replayed OAP header, or an identity
    that did not verify (EAUTH)."""

    code = Code.EAUTH


class EncryptionFailed(FlowError):
    """The flow's key exchange failed, or one side required encryption the other did not offer (ECRYPT)."""

    code = Code.ECRYPT


class FlowWouldBlock(FlowError, BlockingIOError):
    """A non-blocking flow has nothing to read or no room to write."""


class FlowDown(FlowError, ConnectionError):
    """The flow ended: deallocated by the peer, or its layer went away."""


class FlowPeer(FlowDown):
    """The peer stayed silent past the flow's QoS timeout (Ouroboros's FLOW_PEER)."""


class FlowReset(FlowDown):
    """The peer broke the flow's protocol (FRCT) and the flow was reset."""


BY_CODE: dict[str, type[FlowError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        InvalidArgument,
        PermissionDenied,
        FlowTimeout,
        LayerDown,
        IpcpFailed,
        ProtocolError,
        QosNotSupported,
        Busy,
        LimitReached,
        InternalError,
        AuthenticationFailed,
        EncryptionFailed,
    )
    if cls.code is not None
}
assert set(BY_CODE) == set(Code), "every code has its exception class"


def error_class(code: str) -> type[FlowError]:
    """The exception of an Error reply's code (FlowError for a code this side does not know)."""
    return BY_CODE.get(code, FlowError)


def from_remote(code: str, text: str) -> FlowError:
    return error_class(code)(text)
