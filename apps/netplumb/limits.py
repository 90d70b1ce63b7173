"""netplumbd's admission limits, as OpenSSH's MaxStartups, PerSourceMaxStartups and LoginGraceTime:
connections in the handshake, sessions per peer and per key. Counts under one lock; the decisions are
pure functions of the counts, and every refusal names the limit and its option. And the bytes a key's
sessions hold for their commands (Buffers): what clients sent ahead of what the commands read.

A peer is the allocating uid the IRMd vouches for on a local flow, or for a flow from another machine
the peer as the layer names it (a udp shim's source host, a unicast member's address), as the IRMd
counts flows per remote peer. A local admin (root, or netplumbd's own user) is held to --max-sessions
only, and has ADMIN_SESSIONS more, as the IRMd leaves its admins out of users' limits: neither peers'
waiting connections nor keys' sessions lock it out.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import TypeVar

from apps.netplumb.keys import fingerprint
from apps.netplumb.wire import INITIAL_WINDOW, MAX_CONNECTIONS

K = TypeVar("K", "Peer", bytes)


@dataclass(frozen=True)
class Limits:
    """Every limit, with the option that sets it (docs/netplumb.md lists them)."""

    max_startups: int = 10  # --max-startups: connections not yet authenticated, in all
    peer_startups: int = 3  # --per-peer-startups: of those, from one peer
    max_sessions: int = 64  # --max-sessions: connections in all, authenticated or not
    peer_sessions: int = 16  # --per-peer-sessions: connections from one peer
    key_sessions: int = 8  # --per-key-sessions: authenticated sessions of one key
    login_grace: float = 15.0  # --login-grace-time: seconds to authenticate and ask for a command
    max_channels: int = 64  # --max-channels: named pipes and sockets one START may ask for
    max_connections: int = MAX_CONNECTIONS  # --max-connections: open connections on a session's replicated sockets
    # --per-key-buffer: bytes a key's sessions hold that their commands have not read yet (a pipe not
    # opened yet, a command not reading its stdin or a connection); each channel's window alone allows
    # 1 MiB, so a key's 8 sessions of 64 pipes and 64 connections each could make netplumbd hold 1 GiB
    key_buffer: int = 64 * INITIAL_WINDOW
    # --max-buffer: the same bytes for every key together (each key's budget times the keys with
    # sessions, up to --max-sessions of them, was 4 GiB)
    max_buffer: int = 256 * INITIAL_WINDOW

    def fds_per_session(self) -> int:
        """The descriptors one session can make netplumbd hold at most: its flow, wake and stop pipes,
        runner and stdio (SESSION_FDS), one per named pipe or listening socket, one per connection."""
        return SESSION_FDS + self.max_channels + self.max_connections


SESSION_FDS = 16  # a session's own descriptors (measured: 9), with room to spare
# Sessions past --max-sessions that only local admins may take (as the IRMd keeps descriptors for its
# admins): however many sessions keys hold, root still logs in to see to them.
ADMIN_SESSIONS = 4


@dataclass(frozen=True)
class Peer:
    """Who a connection comes from, as the IRMd vouches for it: a local uid, or a remote peer in a
    layer; neither when unknown (then only the overall limits apply)."""

    uid: int | None = None
    layer: str = ""
    remote: str = ""  # the peer as its layer names it, for a flow from another machine
    admin: bool = False  # a local admin: root or netplumbd's own user

    @property
    def known(self) -> bool:
        return self.uid is not None or bool(self.remote)

    def __str__(self) -> str:
        if self.uid is not None:
            return f"uid {self.uid}"
        return f"peer {self.remote} of layer {self.layer}" if self.remote else "an unknown peer"


@dataclass
class Counts:
    startups: int = 0  # admins' not counted
    sessions: int = 0  # every connection, in the handshake or past it
    peer_startups: Counter[Peer] = field(default_factory=Counter)
    peer_sessions: Counter[Peer] = field(default_factory=Counter)
    key_sessions: Counter[bytes] = field(default_factory=Counter)


class LimitReached(Exception):
    """A connection or a login over a limit; the message goes to the client."""


def refuse_arrival(counts: Counts, limits: Limits, peer: Peer) -> str | None:
    """Why a new connection may not start its handshake, or None."""
    if counts.sessions >= limits.max_sessions + (ADMIN_SESSIONS if peer.admin else 0):
        return f"too many connections (at most {limits.max_sessions}: --max-sessions); try again later"
    if peer.admin:
        return None
    if counts.startups >= limits.max_startups:
        return f"too many unauthenticated connections (at most {limits.max_startups}: --max-startups); try again later"
    if peer.known and counts.peer_sessions[peer] >= limits.peer_sessions:
        return f"too many connections from {peer} (at most {limits.peer_sessions}: --per-peer-sessions)"
    if peer.known and counts.peer_startups[peer] >= limits.peer_startups:
        return f"too many unauthenticated connections from {peer} (at most {limits.peer_startups}: --per-peer-startups)"
    return None


def refuse_login(counts: Counts, limits: Limits, key: bytes) -> str | None:
    """Why an authenticated key may not have one more session, or None."""
    if counts.key_sessions[key] >= limits.key_sessions:
        return f"too many sessions with key {fingerprint(key)} (at most {limits.key_sessions}: --per-key-sessions)"
    return None


@dataclass(frozen=True)
class Ticket:
    """One admitted connection."""

    id: int
    peer: Peer

    @property
    def counted(self) -> bool:
        """Held to the per-peer limits: a known peer, not an admin."""
        return self.peer.known and not self.peer.admin


class Admission:
    """The counts of live connections; arrive(), login() and leave() keep them, atomically."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.counts = Counts()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._keys: dict[int, bytes] = {}  # ticket -> its key, once logged in

    def arrive(self, peer: Peer) -> Ticket:
        with self._lock:
            why = refuse_arrival(self.counts, self.limits, peer)
            if why is not None:
                raise LimitReached(why)
            c = self.counts
            ticket = Ticket(next(self._ids), peer)
            c.sessions += 1
            if not peer.admin:
                c.startups += 1
            if ticket.counted:
                c.peer_startups[peer] += 1
                c.peer_sessions[peer] += 1
            return ticket

    def login(self, ticket: Ticket, key: bytes) -> None:
        """The ticket's client authenticated as `key`: it leaves the handshake count (LimitReached if the
        key has all the sessions it may)."""
        with self._lock:
            if ticket.id in self._keys:
                raise LimitReached("this connection already logged in")
            why = refuse_login(self.counts, self.limits, key)
            if why is not None:
                raise LimitReached(why)
            self._end_startup(ticket)
            self.counts.key_sessions[key] += 1
            self._keys[ticket.id] = key

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            key = self._keys.pop(ticket.id, None)
            c = self.counts
            if key is None:
                self._end_startup(ticket)
            else:
                _drop(c.key_sessions, key)
            c.sessions -= 1
            if ticket.counted:
                _drop(c.peer_sessions, ticket.peer)

    def _end_startup(self, ticket: Ticket) -> None:
        if not ticket.peer.admin:
            self.counts.startups -= 1
        if ticket.counted:
            _drop(self.counts.peer_startups, ticket.peer)


def _drop(counter: Counter[K], key: K) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class BufferFull(Exception):
    """A session's client sent more than its key may have waiting for commands; the message goes to it."""


class Buffers:
    """The bytes each key's sessions hold for their commands, received and not yet written out: at most
    `most` per key, whatever the windows of its channels allow together, and `total` for all keys."""

    def __init__(self, most: int, total: int | None = None) -> None:
        self.most = most
        self.total = sys.maxsize if total is None else total  # None: no limit across keys
        self._held: Counter[bytes] = Counter()
        self._all = 0
        self._lock = threading.Lock()

    def take(self, key: bytes, n: int) -> None:
        """Hold n more bytes for `key` (BufferFull if that is past its budget or past all keys')."""
        with self._lock:
            if self._held[key] + n > self.most:
                raise BufferFull(
                    f"more than {self.most} bytes sent ahead of what the commands of key {fingerprint(key)} "
                    f"read (--per-key-buffer)"
                )
            if self._all + n > self.total:
                raise BufferFull(
                    f"netplumbd holds {self._all} bytes its sessions' commands have not read, of at most "
                    f"{self.total} (--max-buffer); try again later"
                )
            self._held[key] += n
            self._all += n

    def give(self, key: bytes, n: int) -> None:
        with self._lock:
            given = min(n, self._held[key])
            self._held[key] -= given
            self._all -= given
            if self._held[key] <= 0:
                del self._held[key]

    def held(self, key: bytes) -> int:
        with self._lock:
            return self._held[key]


class Holding:
    """What one session holds of its key's budget; close() gives back what is left (sinks may still
    hold data, or never have started), and nothing is given twice."""

    def __init__(self, buffers: Buffers, key: bytes) -> None:
        self.buffers = buffers
        self.key = key
        self.held = 0
        self._lock = threading.Lock()
        self._closed = False

    def take(self, n: int) -> None:
        with self._lock:
            if self._closed:
                return
            self.buffers.take(self.key, n)
            self.held += n

    def give(self, n: int) -> None:
        with self._lock:
            if self._closed:
                return
            n = min(n, self.held)
            self.held -= n
            self.buffers.give(self.key, n)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self.buffers.give(self.key, self.held)
                self.held = 0
