"""Local accounts and the kernel credentials work for a client runs with: a process's ids as the
kernel vouches for them, a uid's account and groups as login makes them, and the anonymous account.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import time
from dataclasses import dataclass

ANON_ACCOUNT = "nobody"  # whose credentials a root server uses for anonymous work
ANON_ID = 65534  # nobody/nogroup where the accounts database lacks them
ACCOUNT_TTL = 60.0  # seconds a uid's account and groups are used before they are read again


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


def user_for_creds(uid: int, gid: int, groups: tuple[int, ...]) -> User:
    """A process as the kernel vouches for it (SO_PEERCRED's uid and gid, SO_PEERGROUPS): exactly
    those ids, whatever the accounts database says its user may hold (a process may have dropped
    groups, or run with another gid). The database only names them."""
    gids = tuple(sorted({gid, *groups}))
    return User(user_name(uid), uid, gid, gids, frozenset(group_name(g) for g in gids))


def user_for_uid(uid: int) -> User:
    """The account of `uid` with its groups, as login and sshd make them (initgroups), read
    again after at most ACCOUNT_TTL: a group the user was taken out of is not lent on for long.
    For a user a server authenticated; a local process is what the kernel says (user_for_creds).

    A uid without an account gets the anonymous group and no others.
    """
    return _user_for_uid(uid, int(time.monotonic() // ACCOUNT_TTL))


@functools.lru_cache(maxsize=256)  # an earlier period's entries are the least recently used
def _user_for_uid(uid: int, period: int) -> User:
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return User(str(uid), uid, ANON_ID, (ANON_ID,), frozenset({group_name(ANON_ID)}))
    try:
        gids = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    except OSError:
        gids = (pw.pw_gid,)
    return User(pw.pw_name, uid, pw.pw_gid, gids, frozenset(group_name(g) for g in gids))


def anon_creds(account: str = ANON_ACCOUNT) -> Creds:
    """The credentials of `account` (nobody), or 65534/65534 if there is no such account."""
    try:
        pw = pwd.getpwnam(account)
    except KeyError:
        return Creds(ANON_ID, ANON_ID)
    return Creds(pw.pw_uid, pw.pw_gid)
