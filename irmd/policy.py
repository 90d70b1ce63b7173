"""Who may do what at the IRMd: a pure function of the caller (uid from SO_PEERCRED), the request
and what it touches. Admins are root and the IRMd's own user; everyone else uses flows and keeps
to the names, processes and flows that are theirs.
"""

from __future__ import annotations

import dataclasses

from proto import messages as m
from proto.errors import PermissionDenied
from transports.wire import Message

# Requests only an admin may make: they act on IPCPs, layers or programs, which are the host's.
ADMIN_ONLY: frozenset[type[Message]] = frozenset(
    {m.IpcpCreate, m.IpcpDestroy, m.IpcpBootstrap, m.IpcpEnroll, m.IpcpConnect, m.IpcpInfoReq}
)
# Requests only an IPCP of this IRMd makes (checked by the connection being the IPCP's).
FROM_IPCP: frozenset[type[Message]] = frozenset({m.FlowReqArrived, m.FlowPeerDealloc})


@dataclasses.dataclass(frozen=True)
class Caller:
    uid: int
    admin: bool  # root or the IRMd's user

    @classmethod
    def of(cls, uid: int, irmd_uid: int) -> Caller:
        return cls(uid, is_admin(uid, irmd_uid))


def is_admin(uid: int, irmd_uid: int) -> bool:
    return uid in (0, irmd_uid)


def _refuse(why: str) -> PermissionDenied:
    return PermissionDenied(f"permission denied: {why}")


def check_request(caller: Caller, kind: type[Message]) -> None:
    """The first gate: requests that need an admin, whatever they touch."""
    if kind in ADMIN_ONLY and not caller.admin:
        raise _refuse("managing IPCPs needs root or the IRMd's user")


def check_name(caller: Caller, owner: int | None, name: str) -> None:
    """Acting on name `name` (owned by `owner`; None: it does not exist yet, and would be the caller's)."""
    if caller.admin or owner is None or owner == caller.uid:
        return
    raise _refuse(f"name {name!r} belongs to uid {owner}")


def check_bind(caller: Caller, kind: str, target_uid: int | None) -> None:
    """Binding (or unbinding) a program, an IPCP, or a process running as `target_uid`."""
    if caller.admin:
        return
    if kind in ("program", "ipcp"):
        raise _refuse(f"binding {kind}s needs root or the IRMd's user; bind your own process instead")
    if target_uid != caller.uid:
        raise _refuse(f"that process is not yours (uid {caller.uid})")


def check_register(caller: Caller, ipcp_type: str, layer: str) -> None:
    """Registering a name with an IPCP: a user only in a local layer. A name in
    any other layer is reachable from other hosts, where it could take flows meant for another
    host's service of that name: which names a host serves is its admins' to say."""
    if caller.admin or ipcp_type == "local":
        return
    raise _refuse(f"registering names in {ipcp_type} layer {layer!r} needs root or the IRMd's user "
                  "(a user registers in local layers)")


def check_admin_name(caller: Caller, owner: int, name: str, irmd_uid: int) -> None:
    """An admin binding a program to a name another user made (so that user's processes would get
    flows meant for the program) is refused: the name must be destroyed or taken over first."""
    if caller.admin and not is_admin(owner, irmd_uid):
        raise _refuse(f"name {name!r} belongs to uid {owner}: destroy it before binding a program to it")


def visible(caller: Caller, owner: int) -> bool:
    """Lists and dumps show a non-admin what is theirs only."""
    return caller.admin or owner == caller.uid
