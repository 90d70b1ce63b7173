"""Who a 9P client is, as the stack vouches for it, and with whose rights the server works for it.

A client is its flow's peer (the uid the IRMd took from SO_PEERCRED), never the name it
attaches as; without one it is the anonymous user none. The policy is a pure function.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
from dataclasses import dataclass

NONE_NAME = "none"  # Plan 9's anonymous user: anyone may be none, nobody needs to prove it
ANON_ACCOUNT = "nobody"  # whose credentials a root server uses for anonymous work
ANON_ID = 65534  # nobody/nogroup where the accounts database lacks them


@dataclass(frozen=True)
class Creds:
    """Kernel credentials a piece of work runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class User:
    """A client's identity: a local account, or none (uid None)."""

    name: str
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()  # supplementary groups, the primary one included
    group_names: frozenset[str] = frozenset()

    @property
    def anonymous(self) -> bool:
        return self.uid is None

    @property
    def creds(self) -> Creds | None:
        return None if self.uid is None or self.gid is None else Creds(self.uid, self.gid, self.groups)


NONE = User(NONE_NAME)


@functools.lru_cache(maxsize=1024)  # every stat record names two: do not read the database each time
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@functools.lru_cache(maxsize=1024)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@functools.lru_cache(maxsize=256)
def user_for_uid(uid: int) -> User:
    """The account of `uid` with its groups, as login and sshd make them (initgroups).

    A uid without an account gets the anonymous group and no others.
    """
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return User(str(uid), uid, ANON_ID, (ANON_ID,), frozenset({group_name(ANON_ID)}))
    try:
        gids = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    except OSError:
        gids = (pw.pw_gid,)
    return User(pw.pw_name, uid, pw.pw_gid, gids, frozenset(group_name(g) for g in gids))


def identify(peer_uid: int | None) -> User:
    """The user a flow's peer is: its local account, or none for peers the stack cannot name."""
    return NONE if peer_uid is None or peer_uid < 0 else user_for_uid(peer_uid)


def anon_creds(account: str = ANON_ACCOUNT) -> Creds:
    """The credentials of `account` (nobody), or 65534/65534 if there is no such account."""
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        return Creds(ANON_ID, ANON_ID)
    return Creds(pw.pw_uid, pw.pw_gid)


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
