"""Who a 9P client is, as the stack vouches for it, and with whose rights the server works for it.

A client is its flow's peer (the uid the IRMd took from SO_PEERCRED), never the name it
attaches as; without one it is the anonymous user none. The policy is a pure function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from apps.accounts import ANON_ACCOUNT, ANON_ID, Creds, User, anon_creds, group_name, user_for_uid, user_name

__all__ = [
    "ANON_ACCOUNT",
    "ANON_ID",
    "NONE",
    "NONE_NAME",
    "Creds",
    "Policy",
    "Rights",
    "User",
    "anon_creds",
    "group_name",
    "identify",
    "server_policy",
    "user_for_uid",
    "user_name",
]

NONE_NAME = "none"  # Plan 9's anonymous user: anyone may be none, nobody needs to prove it
NONE = User(NONE_NAME)


def identify(peer_uid: int | None) -> User:
    """The user a flow's peer is: its local account, or none for peers the stack cannot name."""
    return NONE if peer_uid is None or peer_uid < 0 else user_for_uid(peer_uid)


@dataclass(frozen=True)
class Rights:
    """How the server works for one user.

    creds: switch to these for the user's work (None: the server's own credentials).
    as_user: the kernel and the IRMd see the user itself, so they judge each request;
    only then may the client drive the IRMd (ctl writes) or allocate and announce flows.
    """

    creds: Creds | None
    as_user: bool


@dataclass(frozen=True)
class Policy:
    """What a server running as `euid` may do for whom; `anon` is whom a root server runs none as."""

    euid: int
    anon: Creds

    def rights(self, user: User) -> Rights:
        if self.euid == 0:
            creds = user.creds
            return Rights(creds, True) if creds is not None else Rights(self.anon, False)
        # Without root the server can only be itself: its own user gets its rights, nobody else does.
        return Rights(None, user.uid == self.euid)


def server_policy(anon_account: str = ANON_ACCOUNT) -> Policy:
    return Policy(os.geteuid(), anon_creds(anon_account))
