"""Who a 9P client is, as the stack vouches for it, and with whose rights the server works for it.

A client is its flow's peer (the uid, gid and groups the IRMd took from SO_PEERCRED and
SO_PEERGROUPS), never the name it attaches as; without one it is the anonymous user none. The
policy is a pure function.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from apps.accounts import (
    ANON_ACCOUNT,
    ANON_ID,
    Creds,
    User,
    anon_creds,
    group_name,
    user_for_creds,
    user_for_uid,
    user_name,
)

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
    "user_for_creds",
    "user_for_uid",
    "user_name",
]

NONE_NAME = "none"  # Plan 9's anonymous user: anyone may be none, nobody needs to prove it
NONE = User(NONE_NAME)


def identify(peer_uid: int | None, peer_gid: int = -1, peer_groups: Sequence[int] | None = None) -> User:
    """The user a flow's peer is: a local process with the ids the kernel vouched for; a user a
    server acts as (no kernel gid: ActAs) with its account's groups; none for peers the stack cannot
    name, and for a process whose groups the kernel did not say (granting its account's could
    lend it groups it dropped)."""
    if peer_uid is None or peer_uid < 0:
        return NONE
    if peer_gid < 0:
        return user_for_uid(peer_uid)
    if peer_groups is None:
        return NONE
    return user_for_creds(peer_uid, peer_gid, tuple(peer_groups))


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
    """What a server running as `euid` (with `egid` and `groups`) may do for whom; `anon` is whom
    a root server runs none as."""

    euid: int
    anon: Creds
    egid: int = field(default_factory=os.getegid)
    groups: frozenset[int] = field(default_factory=lambda: frozenset(os.getgroups()))

    def rights(self, user: User) -> Rights:
        if self.euid == 0:
            creds = user.creds
            return Rights(creds, True) if creds is not None else Rights(self.anon, False)
        # Without root the server can only be itself: its own user gets its rights if it holds every
        # group the server would lend (not a process of that user that dropped some); nobody else does.
        return Rights(None, self.is_us(user))

    def is_us(self, user: User) -> bool:
        """Whether `user` holds all the server's own ids: its uid, gid and every group."""
        held = {user.gid, *user.groups}
        return user.uid == self.euid and self.egid in held and self.groups <= held


def server_policy(anon_account: str = ANON_ACCOUNT) -> Policy:
    return Policy(os.geteuid(), anon_creds(anon_account))
