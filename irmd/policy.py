"""Who may do what at the IRMd: a pure function of the caller (uid from SO_PEERCRED) and the request.
Admins (root and the IRMd's own user) run the host's IPCPs, names and bindings; everyone else uses
flows, and sees their own.
"""

from __future__ import annotations

import dataclasses

from proto import messages as m
from proto.errors import PermissionDenied
from transports.wire import Message

# What makes a process serve a name, or a name reachable, is the host's: a user who could bind or
# register would take flows meant for the host's services (or, in a layer other hosts reach, for
# another host's service of that name). Users ask an admin, who binds their process.
ADMIN_ONLY: dict[type[Message], str] = {
    m.IpcpCreate: "managing IPCPs", m.IpcpDestroy: "managing IPCPs", m.IpcpBootstrap: "managing IPCPs",
    m.IpcpEnroll: "managing IPCPs", m.IpcpConnect: "managing IPCPs", m.IpcpInfoReq: "asking IPCPs",
    m.Bind: "binding", m.NameCreate: "managing names", m.NameDestroy: "managing names",
    m.NameRegister: "registering names",
}  # fmt: skip
# Requests only an IPCP of this IRMd makes (checked by the connection being the IPCP's).
FROM_IPCP: frozenset[type[Message]] = frozenset({m.FlowReqArrived, m.FlowPeerDealloc})
# All a user may ask: an allow-list, so a request kind added later is the admins' until it is put here.
FOR_USERS: frozenset[type[Message]] = frozenset({
    m.ProcAnnounce, m.FlowAlloc, m.FlowAccept, m.FlowListen, m.FlowDealloc, m.FlowInfo, m.FlowPeer,
    m.IpcpList, m.NameList, m.FlowList, m.Dump, m.ActAs,
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Caller:
    uid: int
    admin: bool  # root or the IRMd's user

    @classmethod
    def of(cls, uid: int, irmd_uid: int) -> Caller:
        return cls(uid, is_admin(uid, irmd_uid))


def is_admin(uid: int, irmd_uid: int) -> bool:
    return uid in (0, irmd_uid)


def check_request(caller: Caller, kind: type[Message]) -> None:
    """Admins may ask anything; users only for flows, lists and dumps (of their own), and to act
    as themselves."""
    if caller.admin or kind in FOR_USERS:
        return
    what = ADMIN_ONLY.get(kind, f"{kind.__name__} requests")
    raise PermissionDenied(
        f"permission denied: {what} needs root or the IRMd's user (uid {caller.uid} may allocate and accept flows)"
    )


def visible(caller: Caller, uid: int) -> bool:
    """Lists and dumps show a user what is theirs (their flows, their processes' bindings)."""
    return caller.admin or uid == caller.uid
