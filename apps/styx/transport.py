"""Moving 9P messages: over flows (one message per SDU) and over byte streams (size[4] framing).

Holds the serving loop (accept flows, admit each within the limits, one thread and Session
each, as its peer's user) and the bridge that relays TCP/unix-socket 9P clients to a flow
to the served name, each as who it is (unix: SO_PEERCRED) or as none (TCP).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from apps.styx import fscreds
from apps.styx import wire as w
from apps.styx.agent import AGENT_PROG, Agent, Peer, peer_pid
from apps.styx.identity import NONE, NONE_NAME, Policy, User, identify, server_policy, user_for_uid
from apps.styx.server import DEFAULT_LIMITS, Limits, Session
from apps.styx.tree import StyxError, Tree
from flowlib import Fccntl, Flow, FlowError, IrmdUnreachable, flow_alloc, qos
from flowlib.flow import establish
from flowlib.irm import IrmClient, default_client
from proto import messages as m
from transports.unix import irmd_sock_path

log = logging.getLogger(__name__)

RETRY_INTERVAL = 0.02  # how often parked requests with nothing to wait on (listens) are retried
IDLE_RETRY = 1.0  # parked requests with a waitable are retried at least this often anyway
ALLOC_TIMEOUT = 10.0
ACCEPT_BACKOFF = 0.1  # after an accept that failed for a reason of its own
REFUSE_WAIT = 2.0  # how long a refused connection may take to send the message its Rerror answers
MAX_REFUSING = 8  # refused connections being answered at once; beyond, they are just closed
RESERVE_FDS = 64  # descriptors no connection may take: accepting, logging, the IRMd's connection


class TransportError(Exception):
    """The connection broke, or the peer sent something that is not 9P framing."""


class TransportTimeout(TransportError):
    """Nothing came within the time asked for."""


def wait_readable(obj: Flow | socket.socket, timeout: float | None) -> None:
    if timeout is not None and not select.select([obj], [], [], timeout)[0]:
        raise TransportTimeout(f"nothing came in {timeout:g} s")


class Transport:
    """A connection that carries whole 9P messages."""

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self, timeout: float | None = None) -> bytes:
        """The next message; TransportTimeout if none begins within `timeout` seconds."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class FlowTransport(Transport):
    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def send(self, data: bytes) -> None:
        try:
            self.flow.write(data)
        except FlowError as e:
            raise TransportError(str(e)) from None

    def recv(self, timeout: float | None = None) -> bytes:
        wait_readable(self.flow, timeout)
        try:
            return self.flow.read()
        except FlowError as e:
            raise TransportError(str(e)) from None

    def close(self) -> None:
        self.flow.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise TransportError("connection closed" if not buf else "connection closed mid-message")
        buf += chunk
    return bytes(buf)


def recv_framed(sock: socket.socket, limit: int = w.MSIZE_MAX) -> bytes:
    """One 9P message from a byte stream, split on its size[4]."""
    head = recv_exact(sock, 4)
    size = w.message_size(head)
    if size < w.HEADER or size > limit:
        raise TransportError(f"message size {size} outside {w.HEADER}..{limit}")
    return head + recv_exact(sock, size - 4)


class StreamTransport(Transport):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise TransportError(str(e)) from None

    def recv(self, timeout: float | None = None) -> bytes:
        wait_readable(self.sock, timeout)
        try:
            return recv_framed(self.sock)
        except OSError as e:
            raise TransportError(str(e)) from None

    def close(self) -> None:
        self.sock.close()


def parse_dial(addr: str) -> tuple[int, object]:
    """'tcp!HOST!PORT' or 'unix!/path' -> (family, sockaddr)."""
    parts = addr.split("!")
    if parts[0] == "tcp" and len(parts) == 3:
        try:
            return socket.AF_INET6 if ":" in parts[1] else socket.AF_INET, (parts[1], int(parts[2]))
        except ValueError:
            pass
    if parts[0] == "unix" and len(parts) == 2 and parts[1]:
        return socket.AF_UNIX, parts[1]
    raise ValueError(f"bad address '{addr}': expected tcp!HOST!PORT or unix!/path")


def dial(addr: str, timeout: float = ALLOC_TIMEOUT) -> Transport:
    """A connection to a 9P service: a flow to a name, or tcp!/unix! for a plain 9P server."""
    if "!" in addr:
        family, sockaddr = parse_dial(addr)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)  # type: ignore[arg-type]
        except OSError as e:
            sock.close()
            raise TransportError(f"cannot reach {addr}: {e.strerror or e}") from None
        sock.settimeout(None)
        return StreamTransport(sock)
    return FlowTransport(flow_alloc(addr, qos=qos.data, timeout=timeout))


# -- admission ----------------------------------------------------------------------


class Admission:
    """Connections at once, in all and per user: what is over is refused, the rest unaffected."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.lock = threading.Lock()
        self.by_user: Counter[str] = Counter()
        self.refusing = 0

    def enter(self, user: User) -> str:
        """'' if the connection is admitted (leave() it later), else why not."""
        with self.lock:
            if sum(self.by_user.values()) >= self.limits.conns:
                return f"too many connections: the server takes {self.limits.conns} at once"
            if self.by_user[user.name] >= self.limits.conns_per_user:
                return f"too many connections from user {user.name} (limit {self.limits.conns_per_user})"
            self.by_user[user.name] += 1
            return ""

    def leave(self, user: User) -> None:
        with self.lock:
            self.by_user[user.name] -= 1
            if self.by_user[user.name] <= 0:
                del self.by_user[user.name]

    def may_answer(self) -> bool:
        """Whether a refused connection may still be told why (bounded), else it is just closed."""
        with self.lock:
            if self.refusing >= MAX_REFUSING:
                return False
            self.refusing += 1
            return True

    def answered(self) -> None:
        with self.lock:
            self.refusing -= 1


def refuse(transport: Transport, why: str) -> None:
    """Answer the first message of a refused connection with an Rerror saying why, then hang up."""
    try:
        data = transport.recv()
        tag = w.peek_tag(data)
        transport.send(w.encode(w.Rerror(tag if tag is not None else w.NOTAG, why)))
    except TransportError as e:
        log.info("refused connection ended: %s", e)


def fit_fds(limits: Limits) -> Limits:
    """Raise the descriptor limit so every connection can hold its share; if it cannot be raised
    enough, serve fewer connections, so that one client running out never starves another."""
    need = limits.conns * limits.fds_per_conn() + RESERVE_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need > soft:
        with contextlib.suppress(ValueError, OSError):
            new_hard = max(hard, need) if os.geteuid() == 0 else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, new_hard), new_hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if need <= soft:
        return limits
    conns = max(1, (soft - RESERVE_FDS) // limits.fds_per_conn())
    log.warning("%d descriptors allow %d connections of %d fids each, not %d", soft, conns, limits.fids,
                limits.conns)
    return replace(limits, conns=conns, conns_per_user=min(limits.conns_per_user, conns))


# -- serving ------------------------------------------------------------------------


def serve_flow(flow: Flow, session: Session, attach_timeout: float | None = None) -> None:
    """One client's loop: messages in, replies out, parked requests retried; until the flow ends,
    or, if it has not attached within attach_timeout seconds, until then."""
    deadline = None if attach_timeout is None else time.monotonic() + attach_timeout
    try:
        while True:
            if deadline is not None and session.attached is not None:
                deadline = None  # attached once: idle clients (mounts) stay as long as they like
            waitables, timed = session.waitables()
            timeout = RETRY_INTERVAL if timed else IDLE_RETRY if waitables else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.info("flow %s did not attach within %.0f s: closed", flow.flow_id, attach_timeout)
                    return
                timeout = left if timeout is None else min(timeout, left)
            try:
                ready, _, _ = select.select([flow, *waitables], [], [], timeout)
            except (OSError, ValueError):  # what a parked request waited on was closed: retry it now
                ready = []
            replies: list[bytes] = []
            if flow in ready:
                replies += session.receive(flow.read())
            if session.pending:
                replies += session.retry()
            for reply in replies:
                flow.write(reply)
    except FlowError as e:
        log.info("flow %s ended: %s", flow.flow_id, e)
    finally:
        session.close()


class Server:
    """Accepts flows for this process; admits each within the limits; serves each on a thread
    of its own as its peer's user. Nothing a flow delivers ends or stalls the accepting."""

    def __init__(self, tree: Tree, limits: Limits = DEFAULT_LIMITS, users: frozenset[str] | None = None,
                 policy: Policy | None = None, irm: IrmClient | None = None) -> None:
        self.tree = tree
        self.limits = fit_fds(limits)
        self.users = users
        self.policy = policy or server_policy()
        self.irm = irm or default_client()
        self.irmd_pid = peer_pid(self.irm.channel.sock)
        self.irmd_sock = Path(os.path.abspath(irmd_sock_path()))
        self.admission = Admission(self.limits)
        # A root file server's session threads take their clients' file credentials.
        self.thread_creds = tree.kernel_checked and self.policy.euid == 0
        if self.thread_creds and (why := fscreds.supported()):
            raise StyxError(f"cannot serve files as root here: {why}")

    def serve_forever(self) -> None:
        while True:
            try:
                reply, fd = self.irm.accept(None)
            except IrmdUnreachable:
                raise
            except (FlowError, OSError) as e:  # this one flow failed (or we are short of descriptors)
                log.warning("accepting a flow failed: %s", e)
                time.sleep(ACCEPT_BACKOFF)
                continue
            user = identify(reply.peer_uid)
            why = self.admission.enter(user)
            if why and not self.admission.may_answer():
                log.warning("flow %d of %s refused: %s", reply.flow_id, user.name, why)
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.irm.dealloc(reply.flow_id)
                continue
            threading.Thread(target=self._connection, args=(reply, fd, user, why), daemon=True,
                             name=f"styx-flow-{reply.flow_id}").start()

    def _connection(self, reply: m.FlowReply, fd: int, user: User, why: str) -> None:
        try:
            try:
                flow = establish(reply, fd, self.irm, client=False)
            except FlowError as e:  # a bad or silent key agreement: this flow only
                log.info("flow from %s failed: %s", user.name, e)
                return
            try:
                if why:
                    log.warning("flow %s of %s refused: %s", flow.flow_id, user.name, why)
                    flow.set_timeout(REFUSE_WAIT)
                    refuse(FlowTransport(flow), why)
                else:
                    log.info("flow %s from %s via layer %s", flow.flow_id, user.name, flow.layer)
                    self._serve(flow, user)
            finally:
                flow.close()
        except Exception:  # whatever went wrong, it went wrong for this connection alone
            log.exception("connection of %s failed", user.name)
        finally:
            if why:
                self.admission.answered()
            else:
                self.admission.leave(user)

    def _serve(self, flow: Flow, user: User) -> None:
        peer = Peer(user, self.policy, self.irmd_sock, self.irmd_pid)
        session = Session(self.tree, peer, self.limits, self.users,
                          on_attach=self._become if self.thread_creds else None)
        flow.fccntl(Fccntl.SSNDTIMEO, self.limits.send_timeout)
        serve_flow(flow, session, self.limits.attach_timeout)

    @staticmethod
    def _become(peer: Peer) -> None:
        """This session's thread takes the file credentials the server works with for `peer`."""
        creds = peer.rights.creds
        if creds is not None:
            try:
                fscreds.become(creds)
            except fscreds.CredsError as e:
                raise StyxError(f"cannot work as {peer.user.name}: {e.strerror or e}") from None


# -- the bridge -------------------------------------------------------------------------


def listen(addr: str) -> socket.socket:
    family, sockaddr = parse_dial(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(str(sockaddr)) and not os.path.isfile(str(sockaddr)):
                os.unlink(str(sockaddr))  # a stale socket from an earlier bridge
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)  # type: ignore[arg-type]
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on {addr}: {e.strerror or e}") from None
    return sock


def stream_user(conn: socket.socket) -> User:
    """Who a bridged client is: the kernel's word for a unix socket's peer; none over TCP."""
    if conn.family != socket.AF_UNIX:
        return NONE
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return user_for_uid(uid)


def as_none(data: bytes) -> bytes:
    """A client message with the user of any Tattach or Tauth made none (TCP clients have no
    identity: the server must not take the bridge's for theirs). Raises DecodeError."""
    if data[4:5] not in (bytes([w.TATTACH]), bytes([w.TAUTH])):
        return data
    msg = w.decode(data)
    assert isinstance(msg, (w.Tattach, w.Tauth))
    msg.uname = NONE_NAME
    return w.encode(msg)


class Bridge:
    """Accepts 9P clients on a TCP or unix socket, each relayed to a flow of its own to `name`,
    allocated with the client's credentials where the kernel names it, else attached as none."""

    def __init__(self, name: str, limits: Limits = DEFAULT_LIMITS, policy: Policy | None = None) -> None:
        self.name = name
        self.limits = limits
        self.policy = policy or server_policy()
        self.irm = default_client()  # no IRMd, no bridge; and its loss (IrmdUnreachable) ends the bridge
        self.irmd_pid = peer_pid(self.irm.channel.sock)
        self.admission = Admission(limits)

    def run(self, addr: str, ready: Callable[[], None] | None = None) -> None:
        lsock = listen(addr)
        if ready is not None:
            ready()
        with lsock:
            while True:
                readable, _, _ = select.select([lsock.fileno(), self.irm.wakeup_fd], [], [])
                if self.irm.wakeup_fd in readable:
                    self.irm.take_arrived()  # raises once the IRMd is gone
                if lsock.fileno() in readable:
                    try:
                        conn, _ = lsock.accept()
                    except OSError as e:
                        log.warning("bridge: accept failed: %s", e)
                        time.sleep(ACCEPT_BACKOFF)
                        continue
                    threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            user = stream_user(conn)
        except OSError:
            conn.close()
            return
        why = self.admission.enter(user)
        if why:
            if self.admission.may_answer():
                conn.settimeout(REFUSE_WAIT)
                refuse(StreamTransport(conn), why)
                self.admission.answered()
            conn.close()
            return
        try:
            self._relay_as(conn, user)
        except Exception:
            log.exception("bridge: client %s failed", user.name)
        finally:
            conn.close()
            self.admission.leave(user)

    def _relay_as(self, conn: socket.socket, user: User) -> None:
        rights = self.policy.rights(user)
        agent: Agent | None = None
        irm = self.irm
        try:
            if rights.as_user and rights.creds is not None and rights.creds.uid != self.policy.euid:
                agent = Agent(rights.creds, Path(os.path.abspath(irmd_sock_path())), self.irmd_pid)
                irm = IrmClient(sock=agent.connect(), prog=AGENT_PROG)
            try:
                flow = flow_alloc(self.name, qos=qos.data, timeout=ALLOC_TIMEOUT, irm=irm)
            except FlowError as e:
                log.warning("bridge: cannot reach %s for %s: %s", self.name, user.name, e)
                return
            with flow:
                relay(conn, flow, not rights.as_user, self.limits.send_timeout)
        finally:
            if irm is not self.irm:
                irm.close()
            if agent is not None:
                agent.close()


def relay(conn: socket.socket, flow: Flow, anonymous: bool, send_timeout: float) -> None:
    """One bridged client's 9P byte stream to and from its flow; anonymous: attaches become none."""
    limit = min(w.MSIZE_MAX, flow.mtu)
    # A client that takes no replies is dropped after a while (SO_SNDTIMEO: sends only, idle is fine).
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(send_timeout), 0))
    done = threading.Event()
    send_lock = threading.Lock()  # replies from the service and the bridge's own Rerrors

    def up() -> None:  # client -> service
        try:
            while True:
                data = recv_framed(conn, limit)
                if anonymous:
                    try:
                        data = as_none(data)
                    except w.DecodeError as e:
                        tag = w.peek_tag(data)
                        with send_lock:
                            conn.sendall(w.encode(w.Rerror(w.NOTAG if tag is None else tag, f"bad message: {e}"[:200])))
                        continue
                flow.write(data)
        except (TransportError, OSError, FlowError) as e:
            log.info("bridge: client side ended: %s", e)
        finally:
            done.set()

    t = threading.Thread(target=up, daemon=True)
    t.start()
    try:
        while not done.is_set():  # service -> client; polls so a client hang-up is noticed
            ready, _, _ = select.select([flow], [], [], 0.2)
            if ready:
                data = flow.read()
                with send_lock:
                    conn.sendall(data)
    except (OSError, FlowError) as e:
        log.info("bridge: service side ended: %s", e)
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        t.join(timeout=5)


def bridge(name: str, addr: str, ready: Callable[[], None] | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
    """Accept 9P clients on `addr`, each relayed to its own flow to `name`, until the IRMd goes away."""
    Bridge(name, limits).run(addr, ready)
