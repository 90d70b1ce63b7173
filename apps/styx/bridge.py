"""The bridge: third-party 9P clients on a TCP or unix socket, each relayed to a flow of its own
to the served name, as who it is (unix: SO_PEERCRED and SO_PEERGROUPS, the flow allocated with
those credentials)
or as the anonymous user none (TCP: the flow allocated as the anonymous account, every Tattach's
user rewritten).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from apps.agent import AGENT_PROG, Agent, peer_pid
from apps.styx import wire as w
from apps.styx.identity import NONE, NONE_NAME, Policy, User, identify, server_policy
from apps.styx.serve import ACCEPT_BACKOFF, CONNECTIONS, REFUSALS, REFUSE_WAIT, Admission, refuse
from apps.styx.server import DEFAULT_LIMITS, Limits
from apps.styx.transport import (
    ALLOC_TIMEOUT,
    StreamTransport,
    TransportError,
    flow_msize,
    parse_dial,
    recv_framed,
    send_message,
)
from flowlib import Flow, FlowError, flow_alloc, qos
from flowlib.irm import IrmClient, default_client
from transports.unix import irmd_sock_path, peer_groups, readable

log = logging.getLogger(__name__)


def _stale(path: str) -> bool:
    """A socket (not a link, not a file) at `path` that nobody answers on: an earlier bridge's."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return True
    return False


def listen(addr: str) -> socket.socket:
    """A listening socket on `addr`. A unix socket is made mode 0666 as it is bound (the umask
    says so then: a chmod after would follow whatever link was put there meanwhile): any local
    user may connect, and each is served as who the kernel says it is."""
    family, sockaddr = parse_dial(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        if _stale(str(sockaddr)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(sockaddr))
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    old_umask = os.umask(0o111) if family == socket.AF_UNIX else None
    try:
        sock.bind(sockaddr)  # type: ignore[arg-type]
        sock.listen(16)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot listen on {addr}: {e.strerror or e}") from None
    finally:
        if old_umask is not None:
            os.umask(old_umask)
    return sock


def stream_user(conn: socket.socket) -> User:
    """Who a bridged client is: the kernel's word for a unix socket's peer (its uid, gid and groups,
    not its account's: it may have dropped some); none over TCP."""
    if conn.family != socket.AF_UNIX:
        return NONE
    _, uid, gid = struct.unpack("iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))  # struct ucred
    return identify(uid, gid, peer_groups(conn))


def as_none(data: bytes) -> bytes:
    """A client message with the user of any Tattach or Tauth made none (TCP clients have no
    identity: the server must not take the bridge's for theirs). Raises DecodeError."""
    if data[4:5] not in (bytes([w.TATTACH]), bytes([w.TAUTH])):
        return data
    msg = w.decode(data)
    assert isinstance(msg, (w.Tattach, w.Tauth))
    msg.uname = NONE_NAME
    return w.encode(msg)


def capped(data: bytes, msize: int) -> bytes:
    """A client message with any Tversion's msize cut to `msize`: the server then negotiates no
    larger messages than the bridge frames. Raises DecodeError."""
    if data[4:5] != bytes([w.TVERSION]):
        return data
    msg = w.decode(data)
    assert isinstance(msg, w.Tversion)
    if msg.msize <= msize:
        return data
    msg.msize = msize
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
                woke = readable([lsock.fileno(), self.irm.wakeup_fd], None)
                if self.irm.wakeup_fd in woke:
                    self.irm.take_arrived()  # raises once the IRMd is gone
                if lsock.fileno() in woke:
                    self._accept(lsock)

    def _accept(self, lsock: socket.socket) -> None:
        """One client, admitted (or refused) before any thread is spent on it."""
        try:
            conn, _ = lsock.accept()
        except OSError as e:
            log.warning("bridge: accept failed: %s", e)
            time.sleep(ACCEPT_BACKOFF)
            return
        try:
            user = stream_user(conn)
        except OSError:
            conn.close()
            return
        why = self.admission.enter(user)
        if why and not self.admission.may_answer():
            REFUSALS.log("bridge: client %s refused: %s", user.name, why)
            conn.close()
            return
        try:
            threading.Thread(target=self._client, args=(conn, user, why), daemon=True).start()
        except RuntimeError as e:
            REFUSALS.log("bridge: client %s dropped: %s", user.name, e)
            conn.close()
            self.admission.done(user, why)

    def _client(self, conn: socket.socket, user: User, why: str) -> None:
        try:
            if why:
                conn.settimeout(REFUSE_WAIT)
                refuse(StreamTransport(conn), why)
            else:
                self._relay_as(conn, user)
        except Exception:
            log.exception("bridge: client %s failed", user.name)
        finally:
            conn.close()
            self.admission.done(user, why)

    def _relay_as(self, conn: socket.socket, user: User) -> None:
        rights = self.policy.rights(user)
        agent: Agent | None = None
        irm = self.irm
        try:
            # The flow carries who the client is: its own uid, or (TCP, or a user the bridge cannot
            # act as) the anonymous account's, so that a server counts it there and never as the
            # bridge's user; only a bridge that cannot switch lends its own.
            if rights.creds is not None and rights.creds.uid != self.policy.euid:
                try:
                    agent = Agent(rights.creds, Path(os.path.abspath(irmd_sock_path())), self.irmd_pid)
                    irm = IrmClient(sock=agent.connect(), prog=AGENT_PROG)
                except FlowError as e:  # fail closed: never the bridge's identity instead
                    log.warning("bridge: cannot reach the IRMd as %s: %s", user.name, e)
                    refuse(StreamTransport(conn), f"the bridge cannot reach the IRMd as {user.name}")
                    return
            try:
                flow = flow_alloc(self.name, qos=qos.data, timeout=ALLOC_TIMEOUT, irm=irm)
            except FlowError as e:
                log.warning("bridge: cannot reach %s for %s: %s", self.name, user.name, e)
                return
            with flow:
                relay(conn, flow, not rights.as_user, self.limits.send_timeout, self.limits.msize)
        finally:
            if irm is not self.irm:
                irm.close()
            if agent is not None:
                agent.close()


def relay(conn: socket.socket, flow: Flow, anonymous: bool, send_timeout: float, msize: int = w.MSIZE_DEFAULT) -> None:
    """One bridged client's 9P byte stream to and from its flow, in messages of at most `msize`
    bytes (Tversion asks no more); anonymous: attaches become none."""
    limit = flow_msize(flow, msize)
    # A client that takes no replies is dropped after a while (SO_SNDTIMEO: sends only, idle is fine).
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(send_timeout), 0))
    done = threading.Event()
    send_lock = threading.Lock()  # replies from the service and the bridge's own Rerrors

    def up() -> None:  # client -> service
        try:
            while True:
                data = recv_framed(conn, limit)
                try:
                    data = capped(as_none(data) if anonymous else data, limit)
                except w.DecodeError as e:
                    tag = w.peek_tag(data)
                    with send_lock:
                        conn.sendall(w.encode(w.Rerror(w.NOTAG if tag is None else tag, f"bad message: {e}"[:200])))
                    continue
                send_message(flow, data)
        except (TransportError, OSError, FlowError) as e:
            CONNECTIONS.log("bridge: client side ended: %s", e)
        finally:
            done.set()

    t = threading.Thread(target=up, daemon=True)
    t.start()
    try:
        while not done.is_set():  # service -> client; polls so a client hang-up is noticed
            ready = readable([flow], 0.2)
            if ready:
                data = flow.read()
                with send_lock:
                    conn.sendall(data)
    except (OSError, FlowError) as e:
        CONNECTIONS.log("bridge: service side ended: %s", e)
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)
        t.join(timeout=5)


def bridge(name: str, addr: str, ready: Callable[[], None] | None = None, limits: Limits = DEFAULT_LIMITS) -> None:
    """Accept 9P clients on `addr`, each relayed to its own flow to `name`, until the IRMd goes away."""
    Bridge(name, limits).run(addr, ready)
