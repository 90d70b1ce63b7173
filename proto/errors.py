"""Exceptions of the flow API: one class per way a flow operation can fail.

Error replies from the IRMd carry an errno-like code; `from_remote` maps it here.
"""

from __future__ import annotations


class FlowError(Exception):
    """Base of all flow API errors."""


class IrmdUnreachable(FlowError):
    """No IRMd answers on the control socket."""


class NameNotFound(FlowError):
    """The name is not registered in any reachable layer."""


class FlowTimeout(FlowError, TimeoutError):
    """An allocation, accept, read or write did not complete in time."""


class FlowWouldBlock(FlowError, BlockingIOError):
    """A non-blocking flow has nothing to read or no room to write."""


class FlowDown(FlowError, ConnectionError):
    """The flow ended: deallocated by the peer, or its layer went away."""


class PermissionDenied(FlowError, PermissionError):
    """The IRMd refused the request for this user."""


class LayerDown(FlowError):
    """The layer serving the flow is not running."""


class InvalidArgument(FlowError, ValueError):
    """A request the IRMd or the flow cannot take as given."""


class QosNotSupported(FlowError):
    """No layer that reaches the name can serve the QoS asked."""


class AuthenticationFailed(FlowError, PermissionError):
    """The flow allocation failed authentication: a bad or replayed OAP header, or an identity
    that did not verify (EAUTH)."""


class EncryptionFailed(FlowError):
    """The flow's key exchange failed, or one side required encryption the other did not offer (ECRYPT)."""


_BY_CODE: dict[str, type[FlowError]] = {
    "ENOENT": NameNotFound,
    "ETIMEDOUT": FlowTimeout,
    "EPERM": PermissionDenied,
    "ENOTCONN": LayerDown,
    "EINVAL": InvalidArgument,
    "ENOTSUP": QosNotSupported,
    "EAUTH": AuthenticationFailed,
    "ECRYPT": EncryptionFailed,
}


def from_remote(code: str, text: str) -> FlowError:
    return _BY_CODE.get(code, FlowError)(text)
