"""The IRMd's control socket: its directory checked, connections accepted with the kernel's word on
who is calling, each request passed through the policy to the job that serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from irmd import policy
from irmd.identity import Peer, peer_cred, read_connected, read_peer
from irmd.policy import Caller
from irmd.reg import Acceptor, Ipcp
from proto import messages as m
from proto.errors import Code, FlowError, InvalidArgument, PermissionDenied, ProtocolError
from transports.channel import AsyncChannel, HandlerError
from transports.ratelog import RateLog
from transports.unix import TrustError, close_fds, make_sock_dir, refuse_rights
from transports.wire import Error, Message

if TYPE_CHECKING:
    from irmd.core import Irmd

log = logging.getLogger("irmd")

BACKLOG = 128
RESERVE = 8  # admins' connections accepted once the IRMd is out of descriptors
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # seconds without accepting when accept fails again and again
REFUSED = RateLog(logger=log)  # refused connections and failed accepts: others cause them


@dataclasses.dataclass(eq=False)
class Client:
    """One control connection, and the process behind it as the kernel described it at connect time."""

    conn_id: int
    peer: Peer
    caller: Caller
    channel: AsyncChannel | None = None
    prog: str = ""  # what the process announced: a label for logs, never an identity
    ipcp: Ipcp | None = None
    listening: bool = False
    serves: bool = False  # has accepted or listened: a server, not just a client of the name
    cypher_s: int = 0  # takes only encrypted flows (FlowAccept/FlowListen)
    accepts: deque[asyncio.Future[tuple[m.FlowReply, int]]] = dataclasses.field(default_factory=deque)
    dump: str = ""  # a dump being fetched in parts

    @property
    def pid(self) -> int:
        return self.peer.pid

    @property
    def uid(self) -> int:
        return self.peer.uid

    @property
    def acceptor(self) -> Acceptor:
        return Acceptor(self.conn_id, self.peer)

    @property
    def accepting(self) -> bool:
        congested = self.channel is not None and self.channel.congested  # it takes nothing more until it reads
        return not congested and (self.listening or any(not f.done() for f in self.accepts))


def farewell(conn: socket.socket, code: str, text: str) -> None:
    """Refuse a connection, saying why in an Error notice before closing it."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(m.CODEC.encode(Error(code, text)))
    conn.close()


class Reserve:
    """Descriptors held back (open on /dev/null) so that an IRMd out of them still accepts its
    admins' connections, and tells users why it refuses theirs."""

    def __init__(self, size: int = RESERVE) -> None:
        self.size = size
        self.fds: list[int] = []

    def refill(self) -> bool:
        """Take back what was spent, as far as descriptors allow; whether the reserve is whole."""
        while len(self.fds) < self.size:
            try:
                self.fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return False
        return True

    def spend(self) -> bool:
        """Free one for a connection to take at once; False when none is left."""
        if not self.fds:
            return False
        os.close(self.fds.pop())
        return True

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


class Server:
    def __init__(self, irmd: Irmd) -> None:
        self.irmd = irmd
        self._sock: socket.socket | None = None
        self._conn_ids = 0
        self._local: Client | None = None
        self._reserve = Reserve()
        self._backoff = 0.0

    async def start(self) -> None:
        path = self.irmd.sock_path
        try:  # root's socket directory is open to all (any user's applications use flows); a user's is private
            make_sock_dir(path.parent, 0o755 if self.irmd.uid == 0 else 0o700)
        except TrustError as e:
            raise SystemExit(f"irmd: will not serve from {path.parent}: {e.strerror}") from None
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a dead irmd
            else:
                raise SystemExit(f"irmd: another irmd is running on {path}")
            finally:
                probe.close()
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        srv.bind(str(path))
        os.chmod(path, 0o666)  # applications of any user may connect; each request is checked for its caller
        srv.listen(BACKLOG)
        srv.setblocking(False)
        self._sock = srv
        self._reserve.refill()
        asyncio.get_running_loop().add_reader(srv.fileno(), self._on_connect)
        log.info("irmd listening on %s", path)

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._reserve.close()
            with contextlib.suppress(FileNotFoundError):
                self.irmd.sock_path.unlink()

    def close_clients(self) -> None:
        for client in list(self.irmd.clients.values()):
            if client.channel:
                client.channel.close()

    # -- connections -------------------------------------------------------

    def _accept(self) -> tuple[socket.socket, bool] | None:
        """The next connection, and whether the IRMd is short of descriptors (its reserve is not
        whole: it serves only admins); None if there is none to take now."""
        assert self._sock is not None
        short, spent = not self._reserve.refill(), False
        while True:
            try:
                return self._sock.accept()[0], short or spent
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE) or spent or not self._reserve.spend():
                    REFUSED.log("accept failed: %s; pausing %.2f s", e.strerror, self._pause())
                    return None
                spent = True  # once more, on a descriptor of the reserve

    def _on_connect(self) -> None:
        accepted = self._accept()
        if accepted is None:
            return
        conn, short = accepted
        self._backoff = 0.0
        pid, uid, gid = peer_cred(conn)
        why = "" if policy.is_admin(uid, self.irmd.uid) else self._refusal(uid, short)
        if why:
            REFUSED.log("refusing a connection of uid %d (pid %d): %s", uid, pid, why)
            farewell(conn, Code.EDQUOT, why)
            return
        if not policy.is_admin(uid, self.irmd.uid):
            refuse_rights(conn)  # users pass no descriptors: only IPCPs' arriving flows carry them
        # /proc read only for connections served; argv only for those a program binding may name
        peer = read_connected(conn, pid, uid, gid, argv=policy.is_admin(uid, self.irmd.uid))
        self._conn_ids += 1
        client = Client(self._conn_ids, peer, Caller.of(uid, self.irmd.uid))

        async def handle(msg: Message, fds: list[int]) -> tuple[Message, Sequence[int]]:
            try:
                return await self.dispatch(client, msg, fds)
            except FlowError as e:
                if e.code is None:
                    raise
                raise HandlerError(e.code, str(e)) from None

        client.channel = AsyncChannel(
            conn, m.CODEC, handle, name=f"conn{client.conn_id}/pid{peer.pid}",
            on_close=lambda _: self.irmd.spawn_task(self._client_gone(client)),
            max_requests=self.irmd.limits.requests_per_conn, max_queued=self.irmd.limits.queued_bytes_per_conn,
        )  # fmt: skip
        self.irmd.clients[client.conn_id] = client

    def _refusal(self, uid: int, short: bool) -> str:
        """Why a user's new connection is refused (its own, all users', or the IRMd's descriptors
        are at their limit), or "": admins are never refused."""
        limits = self.irmd.limits
        if short:
            return "the IRMd is out of descriptors: it serves only root and its own user now"
        held = sum(1 for c in self.irmd.clients.values() if c.uid == uid)
        if held >= limits.conns_per_uid:
            return f"uid {uid} has {held} connections to the IRMd open (limit conns_per_uid={limits.conns_per_uid})"
        users = sum(1 for c in self.irmd.clients.values() if not c.caller.admin)
        if users >= limits.conns_total:
            return f"users have {users} connections to the IRMd open (limit conns_total={limits.conns_total})"
        return ""

    def _pause(self) -> float:
        """Stop accepting for a while, longer each time in a row (a level-triggered reader on a
        socket that cannot be accepted from would spin): how long."""
        self._backoff = min(max(self._backoff * 2, BACKOFF_MIN), BACKOFF_MAX)
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            loop.call_later(self._backoff, self._resume)
        return self._backoff

    def _resume(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_connect)

    async def dispatch(self, c: Client, msg: Message, fds: list[int]) -> tuple[Message, Sequence[int]]:
        """Serve one request of `c`: through the policy to its job. Failures are FlowErrors."""
        kind = type(msg)
        handler = self.irmd.handlers.get(kind)
        if kind is not m.FlowReqArrived:
            close_fds(fds)  # only arriving flows carry descriptors
            fds = []
        try:
            policy.check_request(c.caller, kind)  # first: a user learns nothing of what admins may ask
            if handler is None:
                raise ProtocolError(f"{kind.__name__} is not a request the IRMd serves")
            if kind in policy.FROM_IPCP and c.ipcp is None:
                raise PermissionDenied(f"{kind.__name__} is only accepted from IPCPs")
            result = await handler(c, msg, fds)
        finally:
            close_fds(fds)
        return result if isinstance(result, tuple) else (result, ())

    async def act_as(self, c: Client, msg: m.ActAs, _: list[int]) -> m.Ok:
        """Lower the connection to user `msg.uid`'s rights, for good."""
        if msg.uid != c.uid:
            if not c.caller.admin:
                raise PermissionDenied(f"permission denied: uid {c.uid} cannot act as uid {msg.uid}")
            if not 0 <= msg.uid < 1 << 32:
                raise InvalidArgument(f"bad uid {msg.uid}")
            log.info("conn%d (pid %d, uid %d) acts as uid %d from now on", c.conn_id, c.pid, c.uid, msg.uid)
            # The kernel's gid and groups are the server's, not the user's: the user's flows carry none
            # (its servers take its account's, as login does for a user it authenticated). Nor is the
            # connection the server's process any more (start time, exe, ancestors): the user takes none
            # of the flows the server's bindings give it.
            c.peer = Peer(c.pid, msg.uid, -1)
            c.caller = Caller.of(msg.uid, self.irmd.uid)
        return m.Ok()

    async def serve_locally(self, msg: Message) -> tuple[Message, Sequence[int]]:
        """A request made from within (the config boot): the IRMd's own user asks."""
        if self._local is None:
            own = tuple(os.getgroups())
            me = read_peer(os.getpid(), self.irmd.uid, os.getegid(), own if len(own) <= m.MAX_PEER_GROUPS else None)
            self._local = Client(0, me, Caller.of(self.irmd.uid, self.irmd.uid))
        return await self.dispatch(self._local, msg, [])

    async def _client_gone(self, c: Client) -> None:
        self.irmd.clients.pop(c.conn_id, None)
        for fut in c.accepts:
            fut.cancel()
        await self.irmd.flows.release_all(c)
        # The process is its pid and start time: a connection kept by a child of a process gone (its
        # SO_PEERCRED pid may be a later process's now) neither ends nor prolongs that process's.
        proc = (c.pid, c.peer.start)
        if not any((other.pid, other.peer.start) == proc for other in self.irmd.clients.values()):
            self.irmd.reg.forget_proc(*proc)  # its process bindings end with its last connection
            if not self.irmd.stopping:
                await self.irmd.names.process_gone(*proc)  # and the registrations it made of its names
        if c.ipcp is not None and c.ipcp.channel is c.channel and not self.irmd.stopping:
            self.irmd.ipcps.lost(c.ipcp)
