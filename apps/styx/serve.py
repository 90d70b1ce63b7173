"""The serving loop: accept flows, admit each within the limits, and serve each on a thread of
its own as its peer's user; nothing a flow delivers ends or stalls the accepting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from apps.agent import peer_pid
from apps.styx import fscreds
from apps.styx import wire as w
from apps.styx.agent import Peer
from apps.styx.identity import Policy, User, identify, server_policy
from apps.styx.server import DEFAULT_LIMITS, Limits, Session
from apps.styx.transport import FlowTransport, Reassembly, Transport, TransportError, flow_msize, send_message
from apps.styx.tree import StyxError, Tree
from flowlib import FLOWFRNOBLOCK, Fccntl, Flow, FlowError, FlowTimeout, FlowWouldBlock, IrmdUnreachable
from flowlib.flow import establish
from flowlib.irm import IrmClient, default_client
from proto import messages as m
from proto.service import raise_nofile
from transports.ratelog import RateLog
from transports.unix import irmd_sock_path, readable

log = logging.getLogger(__name__)
# Refused and failed connections: a user at its limit can cause one per flow it allocates (a line each of
# the server's log, ~500 a second); the rest are counted in the next line that passes.
REFUSALS = RateLog(logger=log)
# Connections coming and going: a user within its limits can open and close one per flow it allocates (two
# lines each, ~230 connections a second), so these too are logged at a bounded rate, the rest counted.
CONNECTIONS = RateLog(rate=10.0, burst=50, logger=log)

RETRY_INTERVAL = 0.02  # how often parked requests with nothing to wait on (listens) are retried
IDLE_RETRY = 1.0  # parked requests with a waitable are retried at least this often anyway
ACCEPT_BACKOFF = 0.1  # after an accept that failed for a reason of its own
REFUSE_WAIT = 2.0  # how long a refused connection may take to send the message its Rerror answers
MAX_REFUSING = 8  # refused connections being answered at once; beyond, they are just closed
RESERVE_FDS = 64  # descriptors no connection may take: accepting, logging, the IRMd's connection


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

    def done(self, user: User, why: str) -> None:
        """A connection admitted (why == '') or being told why not is over."""
        if why:
            self.answered()
        else:
            self.leave(user)


def refuse(transport: Transport, why: str) -> None:
    """Answer the first message of a refused connection with an Rerror saying why (a Tflush with an
    Rflush: flush(5) allows it no other answer, and nothing of the connection waits), then hang up."""
    try:
        data = transport.recv(REFUSE_WAIT)
        tag = w.peek_tag(data)
        with contextlib.suppress(w.DecodeError):
            if isinstance(flush := w.decode(data), w.Tflush):
                transport.send(w.encode(w.Rflush(flush.tag)))
                return
        transport.send(w.encode(w.Rerror(tag if tag is not None else w.NOTAG, why)))
    except TransportError as e:
        REFUSALS.log("refused connection ended: %s", e)


def fit_fds(limits: Limits) -> Limits:
    """Raise the descriptor limit so every connection can hold its share; if it cannot be raised
    enough, serve fewer connections, so that one client running out never starves another."""
    need = limits.conns * limits.fds_per_conn() + RESERVE_FDS
    _, soft = raise_nofile(need)
    if need <= soft:
        return limits
    conns = max(1, (soft - RESERVE_FDS) // limits.fds_per_conn())
    log.info("%d descriptors allow %d connections of %d fids each, not %d", soft, conns, limits.fids, limits.conns)
    return replace(limits, conns=conns, conns_per_user=min(limits.conns_per_user, conns))


def serve_flow(
    flow: Flow,
    session: Session,
    attach_timeout: float | None = None,
    send_timeout: float | None = None,
    anon_idle: float | None = None,
) -> None:
    """One client's loop: messages in, replies out, parked requests retried; until the flow ends,
    or, if it has not attached within attach_timeout seconds, until then, or, attached as the
    anonymous user, once it has asked nothing for anon_idle seconds (anonymous clients share their
    slots: none may keep one for nothing), or until it has left a reply (or a piece of one)
    untaken for send_timeout seconds. Other attached clients (mounts) idle as long as they like."""
    start = last = time.monotonic()
    pieces = Reassembly() if flow.qos.reliable else None
    if send_timeout is not None:
        flow.fccntl(Fccntl.SSNDTIMEO, send_timeout)  # a write that waits that long raises FlowTimeout
    try:
        while True:
            waitables, timed = session.waitables()
            timeout = RETRY_INTERVAL if timed else IDLE_RETRY if waitables else None
            peer = session.attached
            if peer is None:
                limit, why = attach_timeout, "did not attach within"
                deadline = None if attach_timeout is None else start + attach_timeout
            else:
                limit, why = anon_idle, "asked nothing, anonymous, for"
                deadline = None if anon_idle is None or not peer.user.anonymous or session.pending else last + anon_idle
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    CONNECTIONS.log("flow %s %s %.0f s: closed", flow.flow_id, why, limit)
                    return
                timeout = left if timeout is None else min(timeout, left)
            sdu = _next_sdu(flow, waitables, timeout)
            replies: list[bytes] = []
            if sdu is not None:
                message = sdu if pieces is None else pieces.feed(sdu, session.msize or session.limits.msize)
                if message is not None:
                    last = time.monotonic()
                    replies += session.receive(message)
            if session.pending:
                replies += session.retry()
            for reply in replies:
                send_message(flow, reply)
    except FlowTimeout:
        CONNECTIONS.log("flow %s took no reply for %.0f s: dropped", flow.flow_id, send_timeout)
    except (FlowError, TransportError) as e:
        CONNECTIONS.log("flow %s ended: %s", flow.flow_id, e)
    finally:
        session.close()


def _next_sdu(flow: Flow, waitables: list[Any], timeout: float | None) -> bytes | None:
    """The flow's next SDU, or None once `timeout` passed or a parked request's file is ready. Without
    parked requests a read with a timeout waits: on a reliable flow that wait is the reader's own, so
    an arrival wakes this thread directly rather than flowlib's engine first."""
    if waitables:
        try:
            ready = readable([flow, *waitables], timeout)
        except (OSError, ValueError):  # what a parked request waited on was closed: retry it now
            return None
        return _read_now(flow) if flow in ready else None
    if flow.fccntl(Fccntl.GRCVTIMEO) != timeout:
        flow.fccntl(Fccntl.SRCVTIMEO, timeout)
    try:
        return flow.read()
    except FlowTimeout:
        return None


def _read_now(flow: Flow) -> bytes | None:
    """The SDU that made the flow readable, or None if the record was none (a keepalive, which the
    read skips): a blocking read would then wait on this thread for the client's next message, and
    leave the parked requests, ready meanwhile, unanswered and unretried until it came."""
    flags = flow.fccntl(Fccntl.GFLAGS)
    flow.fccntl(Fccntl.SFLAGS, flags | FLOWFRNOBLOCK)
    try:
        return flow.read()
    except FlowWouldBlock:
        return None
    finally:
        flow.fccntl(Fccntl.SFLAGS, flags)


class Server:
    """Accepts flows for this process; admits each within the limits; serves each on a thread
    of its own as its peer's user. Nothing a flow delivers ends or stalls the accepting."""

    def __init__(
        self,
        tree: Tree,
        limits: Limits = DEFAULT_LIMITS,
        users: frozenset[str] | None = None,
        policy: Policy | None = None,
        irm: IrmClient | None = None,
    ) -> None:
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
            user = identify(reply.peer_uid, reply.peer_gid, reply.peer_groups)
            why = self.admission.enter(user)
            if why and not self.admission.may_answer():
                REFUSALS.log("flow %d of %s refused: %s", reply.flow_id, user.name, why)
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.irm.dealloc(reply.flow_id)
                continue
            try:
                threading.Thread(
                    target=self._connection, args=(reply, fd, user, why), daemon=True, name=f"styx-flow-{reply.flow_id}"
                ).start()
            except RuntimeError as e:  # no thread to be had: this flow goes, the loop stays
                REFUSALS.log("flow %d of %s dropped: %s", reply.flow_id, user.name, e)
                with contextlib.suppress(OSError):
                    os.close(fd)
                self.irm.dealloc(reply.flow_id)
                self.admission.done(user, why)

    def _connection(self, reply: m.FlowReply, fd: int, user: User, why: str) -> None:
        try:
            try:
                flow = establish(reply, fd, self.irm, client=False)
            except FlowError as e:  # a flow that could not be set up: this flow only
                REFUSALS.log("flow from %s failed: %s", user.name, e)
                return
            try:
                if why:
                    REFUSALS.log("flow %s of %s refused: %s", flow.flow_id, user.name, why)
                    refuse(FlowTransport(flow), why)
                else:
                    CONNECTIONS.log("flow %s from %s via layer %s", flow.flow_id, user.name, flow.layer)
                    self._serve(flow, user)
            finally:
                flow.close()
        except Exception:  # whatever went wrong, it went wrong for this connection alone
            log.exception("connection of %s failed", user.name)
        finally:
            self.admission.done(user, why)

    def _serve(self, flow: Flow, user: User) -> None:
        peer = Peer(user, self.policy, self.irmd_sock, self.irmd_pid)
        limits = replace(self.limits, msize=flow_msize(flow, self.limits.msize))
        session = Session(self.tree, peer, limits, self.users, on_attach=self._become if self.thread_creds else None)
        try:
            serve_flow(
                flow, session, self.limits.attach_timeout, self.limits.send_timeout, self.limits.anon_idle_timeout
            )
        finally:
            peer.close()  # its agent, if it had one, and that agent's IRMd connection

    @staticmethod
    def _become(peer: Peer) -> None:
        """This session's thread takes the file credentials the server works with for `peer`."""
        creds = peer.rights.creds
        if creds is not None:
            try:
                fscreds.become(creds)
            except fscreds.CredsError as e:
                raise StyxError(f"cannot work as {peer.user.name}: {e.strerror or e}") from None
