"""The depot's I/O: accept loops that nothing a peer sends can end, one thread per admitted flow or
TCP connection speaking IBP to the DepotCore, the expiry timer, and depot-to-depot copies.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import queue
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from apps.accounts import Creds, anon_creds, user_for_uid
from apps.agent import AGENT_PROG, Agent, peer_pid
from apps.ibp import wire as w
from apps.ibp.capability import MANAGE, READ, WRITE, Capability, keys_equal
from apps.ibp.client import Connection, parse_cap, tcp_address
from apps.ibp.depot import RID, Allocation, DepotCore
from apps.ibp.limits import Busy, Limits, Pace, Slots, Ticket, copy_target
from apps.ibp.peer import flow_identity, tcp_identity
from apps.ibp.storage import start_writeback
from apps.ibp.stream import ByteStream, FlowStream, StreamClosed, StreamTimeout, TcpStream
from apps.ibp.targets import Targets
from flowlib import FlowError
from flowlib.flow import establish
from flowlib.irm import IrmClient, default_client
from proto import messages as m
from proto.errors import IrmdUnreachable
from transports.ratelog import RateLog
from transports.unix import irmd_sock_path

log = logging.getLogger(__name__)
# What clients cause, one line per connection or request (a cut transfer, a failed copy, a slot given
# way): bounded, so no client can fill the disk with the depot's log.
peer_log = RateLog(logger=log)
_sync_log = RateLog(rate=0.1, burst=3, logger=log)  # a failing disk would otherwise log on every request

EXPIRY_TICK = 1.0  # seconds between expiry sweeps
READ_BLOCK = 1024 * 1024
WRITEBACK = 2 * 1024 * 1024  # a store's bytes are handed to the disk this many at a time as they come
REJECT_QUEUE = 32  # turned-away connections waiting for their -66; beyond, they are just closed
REJECT_TIME = 2.0  # seconds a turned-away client gets to take its -66
ACCEPT_BACKOFF = 0.1  # after a failed accept (out of fds, a flow that failed to arrive)
VERIFY_TIMEOUT = 5.0  # seconds a copy target has to answer ST_VERSION as a depot
EVICT_POLL = 1.0  # seconds between an idle connection's looks at whether it gave its slot away
VERSION_TEXT = "ouroboros-py IBP depot, protocol 1.4"
# Accept errors that concern one connection or a passing shortage, not the listening socket.
_TRANSIENT = {
    errno.EMFILE,
    errno.ENFILE,
    errno.ENOBUFS,
    errno.ENOMEM,
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.EPERM,
    errno.EINTR,
    errno.EAGAIN,
}

Opener = Callable[[], ByteStream]


WRONG_PASSWORD_PAUSE = 0.5  # s before a wrong ST_INQ password is answered (the connection's thread waits)


class Rejecter:
    """Tells turned-away clients `-66 wait reason` from a thread of its own, a bounded few at a time."""

    def __init__(self) -> None:
        self.pending: queue.Queue[tuple[Opener, Callable[[], None], str]] = queue.Queue(REJECT_QUEUE)
        threading.Thread(target=self._run, name="ibp-reject", daemon=True).start()

    def reject(self, opener: Opener, discard: Callable[[], None], why: str) -> None:
        try:
            self.pending.put_nowait((opener, discard, why))
        except queue.Full:
            discard()

    def _run(self) -> None:
        while True:
            opener, discard, why = self.pending.get()
            try:
                with opener() as stream:
                    stream.send(w.format_refusal(w.IBP_E_OUT_OF_SOCKETS, why), time.monotonic() + REJECT_TIME)
            except Exception as e:  # whatever the peer did, the next one gets its answer
                log.debug("turning a client away: %s", e)
                with contextlib.suppress(Exception):
                    discard()


@dataclass
class DepotServer:
    core: DepotCore
    name: str
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.time
    irm: IrmClient | None = None
    encrypt: bool = False  # copies to other depots over encrypted flows
    password: str = w.DEFAULT_PASSWORD  # ST_INQ's, as L-Store's depot asks for one
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: Slots | None = None
    rejecter: Rejecter = field(default_factory=Rejecter)
    _alloc_locks: dict[str, threading.Lock] = field(default_factory=dict)
    _copies: Counter[str] = field(default_factory=Counter)  # copies in progress per client
    euid: int = field(default_factory=os.geteuid)  # root copies as its clients (copier)
    turned_away: int = 0  # connections refused for a limit (ST_INQ reports it)
    accepted: int = 0  # connections served since the start (ST_INQ reports it)
    targets: Targets = field(init=False)

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = Slots(self.limits.max_connections, self.limits.client_connections)
        self.targets = Targets(self._open_target)

    def _open_target(self, depot: str, timeout: float, who: Creds | None) -> Connection:
        """A connection to a copy target, its flow allocated as `who` (None: as the depot), that
        answered as a depot (ST_VERSION) within VERIFY_TIMEOUT: a service of another protocol is left
        at once, before any copy is sent to it."""
        irm = self.irm
        if who is not None and tcp_address(depot) is None:
            irm = self._irm_as(who)
        conn = Connection(
            depot, timeout=min(timeout, VERIFY_TIMEOUT), irm=irm, encrypt=self.encrypt, own_irm=irm is not self.irm
        )
        try:
            conn.version()
        except BaseException:
            conn.close()
            raise
        conn.timeout = timeout
        return conn

    def copier(self, client: str) -> Creds | None:
        """Whose identity the flows of `client`'s copies carry, so that other services count them
        against the client and never against the depot's user: a local client's own uid, the
        anonymous account for clients the stack cannot name; None (the depot's own) for the depot's
        user itself, or when the depot cannot act as anyone else (it is not root)."""
        if self.euid != 0:
            return None
        if client.startswith("uid:") and client[4:].isdigit():
            uid = int(client[4:])
            return None if uid == self.euid else user_for_uid(uid).creds
        return anon_creds()

    def _irm_as(self, who: Creds) -> IrmClient:
        """An IRMd connection made by an agent process that is `who` (forked, switched, connected,
        then gone: the connection carries its credentials)."""
        ours = self.irm or default_client()
        agent = Agent(who, Path(os.path.abspath(irmd_sock_path())), peer_pid(ours.channel.sock))
        try:
            return IrmClient(sock=agent.connect(), prog=AGENT_PROG)
        except FlowError as e:
            raise w.IbpError(w.IBP_E_CONNECTION, f"cannot reach the IRMd as uid {who.uid}: {e}") from None
        finally:
            agent.close()

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """The depot's lock, for a request that may change what the journal records. Its records are
        written under the lock and made durable after the lock is let go, by group commit (one fsync
        for every request waiting meanwhile: storage.DiskStore.durable), so no client's changes hold
        the others for a sync each. The caller answers only after this, a refusal too: one may follow
        a change (a CHNG past the maximum duration is made, then answered -45)."""
        store = self.core.store
        self.lock.acquire()
        before = store.written
        try:
            yield
        finally:
            after = store.written
            self.lock.release()
            if after > before:
                self._durable(after)

    def _durable(self, seq: int) -> None:
        try:
            self.core.store.durable(seq)
        except OSError as e:  # the disk failed: the change may stand, unacknowledged
            _sync_log.log("journal sync failed: %s", e, level=logging.ERROR)
            raise w.IbpError(w.IBP_E_FILE_WRITE, "the depot could not put the change on disk") from None

    def alloc_lock(self, a: Allocation) -> threading.Lock:
        with self.lock:
            return self._alloc_locks.setdefault(a.fid, threading.Lock())

    # -- per connection --

    def admit(self, client: str, opener: Opener, depot_addr: str, discard: Callable[[], None]) -> None:
        """Serve the connection `opener` makes on a thread of its own, if `client` may have one more;
        else it gets -66. Never blocks and never raises: the accept loop goes on whatever happens."""
        assert self.slots is not None
        try:
            ticket = self.slots.take(client)
        except Busy as e:
            log.debug("client %s turned away: %s", client, e)  # a flood must not fill the log too
            self.turned_away += 1
            self.rejecter.reject(opener, discard, str(e))
            return
        self.accepted += 1
        try:
            threading.Thread(target=self._run, args=(ticket, opener, depot_addr), daemon=True).start()
        except RuntimeError as e:  # no thread to be had
            log.error("cannot serve %s: %s", client, e)
            self.slots.give(ticket)
            with contextlib.suppress(Exception):
                discard()

    def _run(self, ticket: Ticket, opener: Opener, depot_addr: str) -> None:
        assert self.slots is not None
        try:
            stream = opener()  # a flow's setup runs here, off the accept loop
        except Exception as e:  # a flow that never became one costs its slot only
            peer_log.log("connection from %s failed to open: %s", ticket.client, e)
            self.slots.give(ticket)
            return
        ticket.wake = stream.abort  # a slot given way ends this connection's wait at once
        try:
            self.serve(stream, depot_addr, ticket.client, ticket)
        finally:
            self.slots.give(ticket)  # only now: the slot counts until the thread and its socket are gone

    def serve(self, stream: ByteStream, depot_addr: str, client: str = "", ticket: Ticket | None = None) -> None:
        """Answer requests on `stream` until it closes, idles out, gives its slot `ticket` way to a
        newer connection of its (shared) identity, or breaks the protocol."""
        lim = self.limits
        with stream:
            while True:
                try:
                    if not self._await_request(stream, ticket):
                        return
                    line = stream.readline(w.MAX_LINE, lim.idle_timeout, lim.request_timeout)
                except StreamTimeout:
                    if stream.pending:  # a line begun and not ended in time: said, as L-Store's read_command
                        with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                            why = f"request line not ended within {lim.request_timeout:g} s"
                            stream.send(w.format_refusal(w.IBP_E_BAD_FORMAT, why))
                    return
                except (StreamClosed, FlowError, OSError):
                    return
                except ValueError:
                    with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                        stream.send(w.format_refusal(w.IBP_E_BAD_FORMAT, "request line too long"))
                    return
                try:
                    if not self.handle(stream, line, depot_addr, client):
                        return
                except (StreamClosed, StreamTimeout, FlowError, OSError) as e:
                    peer_log.log("connection ended mid-request: %s", e)
                    return
                except Exception:  # a bug must cost one connection, never the depot
                    log.exception("internal error serving %r", line[:80])
                    with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                        stream.send(w.format_refusal(w.IBP_E_INTERNAL, "internal error"))
                    return

    def _await_request(self, stream: ByteStream, ticket: Ticket | None) -> bool:
        """Wait, idle, for the next request to begin: True when it does (its first byte makes the
        connection busy: no longer one to give way), False after the idle timeout or once the
        connection gave its slot away (woken at once, or looked at every EVICT_POLL seconds)."""
        if ticket is None or self.slots is None:
            return True
        self.slots.idle(ticket)
        end = time.monotonic() + self.limits.idle_timeout
        while not ticket.evicted:
            left = end - time.monotonic()
            if left <= 0:
                return False
            if stream.wait(min(EVICT_POLL, left)) and self.slots.busy(ticket):
                return True
        peer_log.log("idle connection of %s gave way to a newer one", ticket.client)
        return False

    def handle(self, stream: ByteStream, line: bytes, depot_addr: str, client: str = "") -> bool:
        """One request; False when the stream can no longer be trusted (and is to be closed)."""
        try:
            req = w.parse_request(line)
        except w.BadRequest as e:
            with self.lock:
                self.core.refused[e.status] += 1
            stream.send(w.format_refusal(e.status, e.reason))
            return not e.closes  # what was sent behind it is no request
        try:
            return self._dispatch(stream, req, depot_addr, client)
        except w.IbpError as e:
            log.debug("refused %s: %s", type(req).__name__, e)
            stream.send(w.format_refusal(e.status, e.reason))
            # Some IBP clients send a STORE's data (or ST_CHANGE's limits) without waiting for our
            # answer: after a refusal those bytes would be read as requests, so the connection ends.
            return not w.more_follows(req)
        except w.BadRequest as e:  # a second line (ST_CHANGE's limits) that does not parse
            stream.send(w.format_refusal(e.status, e.reason))
            return False

    def _dispatch(self, stream: ByteStream, req: w.Request, depot_addr: str, client: str) -> bool:
        now = self.clock()
        core = self.core
        timeout = self.limits.timeout(req.timeout)
        if isinstance(req, w.Allocate):
            with self._changing():
                grant = core.allocate(req, now, client)
            stream.send(w.format_reply(w.IBP_OK, *grant.caps(depot_addr)))
        elif isinstance(req, (w.Store, w.Write)):
            return self._store(stream, req, now, timeout)
        elif isinstance(req, w.Load):
            return self._load(stream, req, now)
        elif isinstance(req, w.Send):
            with self._copying(client):
                n = self._copy(req, [req.dest_cap], req.dest_timeout, client)[0][0]
            stream.send(w.format_reply(w.IBP_OK, n))
        elif isinstance(req, w.Transfer) and not req.pull:
            with self._copying(client):
                n = self._copy(req, [req.remote_cap], req.dest_timeout, client, req.remote_offset)[0][0]
            stream.send(w.format_reply(w.IBP_OK, n))
        elif isinstance(req, w.Transfer):
            with self._copying(client):
                n = self._pull(req, client)
            stream.send(w.format_reply(w.IBP_OK, n))
        elif isinstance(req, w.Mcopy):
            with self._copying(client):
                results = self._copy(req, list(req.dest_caps), req.timeout, client)
            stream.send(w.format_reply(w.IBP_OK, results[0][0], *(s for _, s in results)))
        elif isinstance(req, w.Manage):
            stream.send(w.format_reply(w.IBP_OK, *self._manage(req, now, timeout)))
        else:
            return self._status(stream, req, depot_addr)
        return True

    def _status(self, stream: ByteStream, req: w.Status, depot_addr: str) -> bool:
        core = self.core
        if req.subcmd == w.IBP_ST_VERSION:
            stream.send(w.format_reply(w.IBP_OK) + self.version_text(depot_addr) + b"END\n")
            return True
        if req.subcmd == w.IBP_ST_RES:
            stream.send(w.format_reply(w.IBP_OK, RID))
            return True
        if req.subcmd == w.IBP_ST_INQ and not keys_equal(req.password, self.password):
            # Before the RID, as L-Store's handle_status; answered after a pause, so that guesses
            # come a few a second per connection (tens of thousands, else).
            peer_log.log("ST_INQ with a wrong password")
            time.sleep(WRONG_PASSWORD_PAUSE)
            raise core.refuse(w.IBP_E_WRONG_PASSWD, "wrong password")
        if req.rid not in ("", RID):  # "": IBPv031 names none
            raise core.refuse(w.IBP_E_INVALID_RID, f"no resource {req.rid!r} (this depot has {RID!r})")
        if req.subcmd == w.IBP_ST_INQ and req.version == w.IBPv031:
            with self.lock:
                figures = core.inq_v031()
            stream.send(w.format_inq_v031(*figures))
            return True
        if req.subcmd == w.IBP_ST_INQ:
            assert self.slots is not None
            with self.lock:
                values, extras = core.inq()
            extras.update(connections=self.slots.count(), accepted=self.accepted, turned_away=self.turned_away)
            stream.send(w.format_inq(values, extras))
            return True
        if req.follows:
            # The admin key before the limits line, and that line a request line like any other, so
            # a line without the key (or without its second line) holds the connection no longer.
            with self.lock:
                core.check_admin(req.password)
            lim = self.limits
            try:
                second = stream.readline(w.MAX_LINE, lim.request_timeout, lim.request_timeout)
            except ValueError:  # as any over-long line: -21, and the connection closed
                raise w.BadRequest(w.IBP_E_BAD_FORMAT, "request line too long") from None
            req = w.parse_change(second, req)
        with self.lock:
            core.change(req.password, req.capacity, req.max_duration)
        stream.send(w.format_reply(w.IBP_OK))
        return True

    def version_text(self, depot_addr: str) -> bytes:
        """ST_VERSION's lines: who we are, the policy and every limit."""
        lim = self.limits
        lines = [VERSION_TEXT, f"name {depot_addr}", "policy size*duration*capacity <= free^2*max_duration"]
        lines += [f"{name} {getattr(lim, name)}" for name in lim.__dataclass_fields__ if name != "copy_to"]
        lines.append("copy_to " + (" ".join(lim.copy_to) if lim.copy_to else "(registered names)"))
        return "".join(w.reason_fields(ln) + "\n" for ln in lines).encode("ascii")

    @contextlib.contextmanager
    def _writing(self, a: Allocation, timeout: float) -> Iterator[None]:
        """The allocation's data to ourselves: two writers (or a writer and a CHNG that shrinks it)
        take turns; one that waits too long gives up (the seed's server-side timeout), rather than hang."""
        lock = self.alloc_lock(a)
        if not lock.acquire(timeout=timeout):
            raise w.IbpError(w.IBP_E_SERVER_TIMEOUT, "another store to this allocation is still running")
        try:
            yield
        finally:
            lock.release()

    def _manage(self, req: w.Manage, now: float, timeout: float) -> tuple[object, ...]:
        if req.subcmd not in (w.IBP_CHNG, w.IBP_TRUNCATE):
            with self._changing():
                return self.core.manage(req, now)
        # A CHNG or TRUNCATE may shrink the allocation and give its blocks past the new end back to
        # the disk: not while a store writes there, which could leave bytes past the new end.
        with self.lock:
            a = self.core.authorize(req.key, req.typekey, MANAGE, now, req.rid)
        with self._writing(a, timeout), self._changing():
            return self.core.manage(req, now)

    def _store(self, stream: ByteStream, req: w.Store | w.Write, now: float, timeout: float) -> bool:
        with self.lock:
            a = self.core.authorize(req.key, req.typekey, WRITE, now, req.rid)
        with self._writing(a, timeout):
            with self.lock:
                start = self.core.check_write(a, req.offset if isinstance(req, w.Write) else None, req.length)
            stream.send(w.format_reply(w.IBP_OK))
            pace = self.limits.pace(req.timeout)
            try:
                self._write_data(a, start, stream.read_chunks(req.length, timeout, pace.deadline))
            except (StreamTimeout, StreamClosed) as e:
                peer_log.log("store of %d bytes cut short (%s); nothing acknowledged", req.length, e)
                if isinstance(e, StreamTimeout):  # too slow: the client hears why, if it listens
                    why = f"the data stalled, or came slower than {pace.rate} bytes/s after {pace.grace:g} s"
                    with contextlib.suppress(StreamClosed, StreamTimeout, FlowError, OSError):
                        stream.send(w.format_refusal(w.IBP_E_SERVER_TIMEOUT, why), time.monotonic() + 1)
                return False
            self._commit(a, start + req.length, "store")
            stream.send(w.format_reply(w.IBP_OK, req.length))
            return True

    def _commit(self, a: Allocation, end: int, what: str) -> None:
        """What a store or pull wrote, up to `end`, acknowledged: unless `a` was freed meanwhile."""
        with self._changing():
            if self.core.allocs.get(a.fid) is not a:
                raise w.IbpError(w.IBP_E_CAP_NOT_FOUND, f"the allocation went away during the {what}")
            self.core.commit(a, end)

    def _write_data(self, a: Allocation, start: int, chunks: Iterable[bytes]) -> None:
        """Write `chunks` into `a` from `start` and fsync them (the caller holds its writer lock). On
        any failure, what they left past the acknowledged end is cut off again."""
        try:
            self._write_chunks(a, start, chunks)
        except BaseException:
            with self.lock:
                self.core.discard(a)
            raise

    def _write_chunks(self, a: Allocation, start: int, chunks: Iterable[bytes]) -> None:
        try:
            with self.core.open_data(a) as f:
                f.seek(start)  # past the end: a hole, read as zeros
                end = handed = start  # the end of what came, of what is handed to the disk already
                for chunk in chunks:
                    f.write(chunk)
                    end += len(chunk)
                    if end - handed >= WRITEBACK:
                        f.flush()
                        start_writeback(f.fileno(), handed, end - handed)
                        handed = end
                f.flush()
                os.fsync(f.fileno())
            self.core.store.entries_durable()  # the file's name too, if ALLOCATE left it to us
        except FileNotFoundError:  # freed (DECR, expiry) while the data came: the client's doing
            raise w.IbpError(w.IBP_E_CAP_NOT_FOUND, "the allocation went away during the store") from None
        except OSError as e:  # e.g. the disk is full: nothing of this store is acknowledged
            if isinstance(e, (StreamClosed, StreamTimeout)):
                raise
            log.error("store failed on disk: %s", e)
            raise w.IbpError(w.IBP_E_FILE_WRITE, f"the depot could not write the data: {e.strerror}") from None

    def _load(self, stream: ByteStream, req: w.Load, now: float) -> bool:
        with self.lock:
            a = self.core.authorize(req.key, req.typekey, READ, now, req.rid)
            n = self.core.check_read(a, req.offset, req.length)
        blocks = self._read(a, req.offset, n, head=w.format_reply(w.IBP_OK, n))
        first = next(blocks)  # the file opens (or fails) while a status can still say so
        pace, sent = self.limits.pace(req.timeout), 0
        try:
            for block in itertools.chain([first], blocks):  # the status line and the first bytes in one SDU
                stream.send(block, pace.deadline(sent + len(block)))
                sent += len(block)
        except w.IbpError as e:  # after the status no other can follow: end the stream
            # (a TRUNCATE of the same allocation, say: a client can do it at will, so rate-limited)
            peer_log.log("load failed mid-stream: %s", e)
            return False
        except StreamTimeout:
            peer_log.log("load of %d bytes too slow for its client; connection closed", n)
            return False
        return True

    def _read(self, a: Allocation, offset: int, n: int, head: bytes = b"") -> Iterator[memoryview]:
        """`n` bytes of `a` from `offset`, `head` before them, in blocks read into one buffer: no
        allocation or copy per block, so each block is valid only until the next is asked for."""
        try:
            f = self.core.open_data(a)
        except OSError as e:  # freed or expired since it was authorized
            raise w.IbpError(w.IBP_E_CAP_NOT_FOUND, f"the allocation went away: {e.strerror}") from None
        with f:
            view = memoryview(bytearray(len(head) + min(READ_BLOCK, n)))
            view[: len(head)] = head
            at, left = len(head), n
            if head and not left:
                yield view
            while left > 0:
                got = os.preadv(f.fileno(), [view[at : at + min(READ_BLOCK, left)]], offset + n - left)
                if got <= 0:  # cut by a TRUNCATE or CHNG since the load began
                    raise w.IbpError(w.IBP_E_INV_PAR_SIZE, "the data was cut short during the load")
                left -= got
                yield view[: at + got]
                at = 0

    @contextlib.contextmanager
    def _copying(self, client: str) -> Iterator[None]:
        """One of `client`'s copies in progress, at most limits.client_copies at once: the flows a copy
        opens are the depot's, so no client may hold many of them at other services."""
        with self.lock:
            if self._copies[client] >= self.limits.client_copies:
                raise w.IbpError(
                    w.IBP_E_OUT_OF_SOCKETS, f"{self.limits.client_copies} copies of this client in progress already"
                )
            self._copies[client] += 1
        try:
            yield
        finally:
            with self.lock:
                self._copies[client] -= 1
                if self._copies[client] <= 0:
                    del self._copies[client]

    def _copy(
        self,
        req: w.Send | w.Transfer | w.Mcopy,
        dests: list[str],
        dest_timeout: int,
        client: str = "",
        dest_offset: int | None = None,
    ) -> list[tuple[int, int]]:
        """Push the bytes to each destination over our own flows: [(length, status)] per target,
        appended (dest_offset None: SEND, MCOPY, PUSH with -1) or written at dest_offset (PUSH).

        Only to depots the operator allows (limits.copy_to), and a target's reply is reduced to its
        status number: nothing a target sends reaches our client, nor is a refusal's text repeated.
        """
        now = self.clock()
        offset = req.offset or 0  # a PUSH's own offset is never None (wire)
        with self.lock:
            a = self.core.authorize(req.key, req.typekey, READ, now, req.rid)
            n = self.core.check_read(a, offset, req.length)
            self._no_phoebus(req)
        caps = [parse_cap(d, WRITE) for d in dests]
        timeout = self.limits.timeout(dest_timeout)
        results = []
        for cap in caps:
            status, why = self._with_target(cap, timeout, client, self._sender(a, offset, n, cap, dest_offset), "to")
            if status != w.IBP_OK and len(caps) == 1:
                raise w.IbpError(status, why)
            results.append((n, status))
        return results

    def _no_phoebus(self, req: w.Send | w.Transfer | w.Mcopy) -> None:
        """A copy through Phoebus gateways is -22, once its capability and range passed, as L-Store's
        handle_copy answers on a depot built without Phoebus (the caller holds the lock)."""
        if isinstance(req, (w.Send, w.Transfer)) and req.path is not None:
            raise self.core.refuse(w.IBP_E_TYPE_NOT_SUPPORTED, "copies through Phoebus gateways are not served")

    def _sender(
        self, a: Allocation, offset: int, n: int, cap: Capability, dest_offset: int | None
    ) -> Callable[[Connection], object]:
        """What copies `n` bytes of `a` at `offset` to `cap` over a connection to its depot."""
        return lambda conn: conn.store(cap, self._read(a, offset, n), n, dest_offset)

    def _pull(self, req: w.Transfer, client: str) -> int:
        """L-Store's PULL: the bytes of the remote read capability, fetched over our own connection to
        its depot (under the same copy-target policy as copies), appended (offset None) or written
        at `req.offset` into our allocation, which the write key names."""
        now = self.clock()
        timeout = self.limits.timeout(req.timeout)
        with self.lock:
            a = self.core.authorize(req.key, req.typekey, WRITE, now, req.rid)
        cap = parse_cap(req.remote_cap, READ)
        with self._writing(a, timeout):
            with self.lock:
                start = self.core.check_write(a, req.offset, req.length)
                self._no_phoebus(req)

            pace = self.limits.pace(req.timeout)

            def fetch(conn: Connection) -> None:
                _, chunks = conn.load(cap, req.remote_offset or 0, req.length)
                self._write_data(a, start, _paced(chunks, pace))

            status, why = self._with_target(cap, self.limits.timeout(req.dest_timeout), client, fetch, "from")
            if status != w.IBP_OK:
                raise w.IbpError(status, why)
            self._commit(a, start + req.length, "pull")
        return req.length

    def _with_target(
        self, cap: Capability, timeout: float, client: str, work: Callable[[Connection], object], way: str
    ) -> tuple[int, str]:
        """`work` on a connection to `cap`'s depot, if limits.copy_to allows it: (status, why); `way`
        is "to" or "from" it. The target is resolved once (copy_target): what is checked is what is
        reached."""
        target = copy_target(cap.depot, self.limits.copy_to)
        if target is None:
            with self.lock:
                self.core.refused[w.IBP_E_INVALID_HOST] += 1
            return w.IBP_E_INVALID_HOST, f"this depot does not copy {way} {cap.depot}"
        try:
            self.targets.use(target, timeout, work, self.copier(client))
        except w.IbpError as e:
            status = w.known_error(e.status)
            peer_log.log("copy %s %s failed: %s", way, cap.depot, w.status_text(status))
            return status, f"copy {way} {cap.depot}: {w.status_text(status)}"
        return w.IBP_OK, ""

    # -- expiry --

    def expiry_loop(self, stop: threading.Event) -> None:
        while not stop.wait(EXPIRY_TICK):
            self.targets.expire()
            try:
                with self._changing():
                    self.core.expire(self.clock())
                    for fid, lock in list(self._alloc_locks.items()):  # forget locks of freed allocations
                        if fid not in self.core.allocs and not lock.locked():
                            del self._alloc_locks[fid]
            except Exception:  # e.g. a disk error: expiry tries again on the next tick
                log.exception("expiry sweep failed")


def _paced(chunks: Iterable[bytes], pace: Pace) -> Iterator[bytes]:
    """`chunks` as long as they keep `pace` (a PULL's source depot is no better trusted than a client:
    one dribbling its bytes would hold the allocation's writer lock for as long as it liked)."""
    moved = 0
    for chunk in chunks:
        if time.monotonic() > pace.deadline(moved):
            raise w.IbpError(w.IBP_E_SERVER_TIMEOUT, f"the source sent slower than {pace.rate} bytes/s")
        moved += len(chunk)
        yield chunk


def parse_listen(text: str) -> tuple[str, int]:
    """'tcp:PORT' or 'tcp:HOST:PORT' (HOST defaults to loopback)."""
    m = re.fullmatch(r"tcp:(?:(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):)?(?P<port>\d{1,5})", text)
    if m is None or not 0 <= int(m["port"]) < 65536:
        raise ValueError(f"bad --listen {text!r}: expected tcp:PORT or tcp:HOST:PORT")
    return (m["host"] or "127.0.0.1").strip("[]"), int(m["port"])


def tcp_listener(host: str, port: int) -> tuple[socket.socket, str]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    bound = sock.getsockname()[1]
    shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
    return sock, f"[{shown}]:{bound}" if ":" in shown else f"{shown}:{bound}"


def tcp_loop(server: DepotServer, sock: socket.socket, addr: str) -> None:
    """Accept TCP connections until the listening socket is closed; nothing a client does ends it."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError as e:
            if e.errno in _TRANSIENT:
                log.warning("tcp accept: %s", e)
                time.sleep(ACCEPT_BACKOFF)
                continue
            return
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = tcp_identity(conn)
        except OSError:  # gone already
            conn.close()
            continue
        server.admit(client, functools.partial(TcpStream, conn), addr, conn.close)


def flow_loop(server: DepotServer) -> None:
    """Accept flows until the IRMd goes away; a flow's own setup (FRCT, its agreed keys) runs on its
    connection's thread, so neither a silent nor a broken flow stalls or ends this loop."""
    irm = server.irm
    assert irm is not None
    while True:
        try:
            reply, fd = irm.accept(None)
        except IrmdUnreachable:
            log.error("lost the IRMd: no more flows")
            return
        except FlowError as e:
            log.warning("flow accept: %s", e)
            time.sleep(ACCEPT_BACKOFF)
            continue
        server.admit(
            flow_identity(reply, "" if reply.peer_uid >= 0 else irm.remote_addr(reply.flow_id)),
            functools.partial(_open_flow, irm, reply, fd),
            server.name,
            functools.partial(_drop_flow, irm, reply, fd),
        )


def _open_flow(irm: IrmClient, reply: m.FlowReply, fd: int) -> ByteStream:
    return FlowStream(establish(reply, fd, irm, client=False))


def _drop_flow(irm: IrmClient, reply: m.FlowReply, fd: int) -> None:
    os.close(fd)
    irm.dealloc(reply.flow_id)
