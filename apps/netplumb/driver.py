"""One client of netplumbd, driven: its flow's bytes and the clock into the connection core
(connection.py), the core's events out to the policy, the runner (privsep.py) and the channels' threads.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from apps.netplumb import policy
from apps.netplumb.channels import Ends, Link, Pump, Reader, Sink, Stop, duplex
from apps.netplumb.connection import (
    Authenticated,
    Closed,
    Event,
    LocalProtocolError,
    ServerConnection,
    StartRequested,
)
from apps.netplumb.jobs import signal_number
from apps.netplumb.keys import (
    AuthorizedKey,
    AuthorizedKeys,
    Identity,
    KeyFileError,
    SpentKeys,
    fingerprint,
    private_dir,
)
from apps.netplumb.limits import Admission, BufferFull, Buffers, Holding, LimitReached, Limits, Ticket
from apps.netplumb.messages import BadStart, Data, Eof, Signal, Start, Unread, Window
from apps.netplumb.policy import Account, Plan, Refused, Settings
from apps.netplumb.privsep import JobNotStarted, Runner
from apps.netplumb.wire import FIRST_CLIENT_CHANNEL, FIRST_SERVER_CHANNEL, MAX_PACKET, STDERR, STDIN, STDOUT, Fields
from flowlib import Flow, FlowDown, FlowError, FlowTimeout
from flowlib.fccntl import Fccntl
from flowlib.frct import RCV_BUF

log = logging.getLogger("netplumbd")

LINGER = 30.0  # after EXIT, how long we wait for the client to close
CLOSE_LINGER = 2.0  # after we ended a connection, how long what the client still sends is read and dropped
KILL_GRACE = 2.0  # SIGTERM, then SIGKILL this much later
START_TIMEOUT = 15.0  # the runner reports the job started (or why not) by then
OPEN_TIMEOUT = 10.0  # a recipe's redirection waits this long for the other end of a named pipe
# What FRCT holds of a connection for netplumbd before its client authenticated: HELLO, AUTH and START,
# a packet each at most (FRCT rounds it up to one whole SDU and one PDU). Once authenticated, the full
# window (RCV_BUF); a peer without a key could else have a full one buffered per connection.
PREAUTH_RCV_BUF = 2 * MAX_PACKET
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass
class Config:
    """What every driver shares: keys, the recipe directory, the policy's settings, the limits and the
    counts they bound."""

    identity: Identity
    authorized_keys: Path
    spent: SpentKeys
    recipe_dir: Path
    recipe_fd: int  # the recipe directory, opened once and verified: private to netplumbd
    settings: Settings
    limits: Limits
    admission: Admission = field(init=False)
    buffers: Buffers = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits)
        self.buffers = Buffers(self.limits.key_buffer, self.limits.max_buffer)


class Driver:
    """One client, driven: the flow's bytes and the clock into the connection core, its events out to
    the runner, the pumps and the sinks. One thread reads; pumps, sinks and the waiter send."""

    def __init__(self, flow: Flow, cfg: Config, ticket: Ticket) -> None:
        self.flow = flow
        self.cfg = cfg
        self.ticket = ticket
        self.entries: list[AuthorizedKey] = []
        self.key = b""
        self.core = ServerConnection(
            cfg.identity, self._authorize, time.monotonic(), cfg.limits.login_grace, LINGER, flow.mtu
        )
        self.link = Link(flow, self.core)
        self.runner: Runner | None = None
        self.holding: Holding | None = None  # what its sinks hold of its key's --per-key-buffer, once logged in
        self.ends = Ends(Stop())  # the session's end unblocks its pumps and sinks, whoever holds the other end
        self.exited = threading.Event()
        self.listeners: list[socket.socket] = []
        self.ids = itertools.count(FIRST_SERVER_CHANNEL)
        self.open_connections = 0
        self.refused_connections = 0  # over --max-connections, logged once and counted
        self.lock = threading.Lock()
        self.reader = Reader(flow, self.core)
        self.who = f"flow {flow.flow_id}" + (f" ({ticket.peer})" if ticket.peer.known else "")
        # Until the client authenticated, no write of ours waits longer than the grace time: a peer
        # that keeps its window shut would else hold the connection, and its slot, past it.
        flow.fccntl(Fccntl.SSNDTIMEO, cfg.limits.login_grace)

    # -- authentication ---------------------------------------------------------

    def _authorize(self, key: bytes) -> str | None:
        try:
            entries = AuthorizedKeys.load(self.cfg.authorized_keys).find(key)
            spent = any(e.one_time for e in entries) and self.cfg.spent.spent(key)
        except (KeyFileError, OSError) as e:
            log.error("%s", e)
            return "the server cannot read its authorized keys"
        why = policy.login(key, entries, spent)
        if why is None:
            try:
                self.cfg.admission.login(self.ticket, key)
            except LimitReached as e:
                why = str(e)
        if why is not None:
            log.info("%s: refused key %s: %s", self.who, fingerprint(key), why)
            return why
        self.entries = [e for e in entries if not (e.one_time and spent)]  # a spent line admits no more
        self.key = key
        self.holding = Holding(self.cfg.buffers, key)
        self.who += f" {fingerprint(key)[:20]}…"
        return None

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
            self._linger()
        except FlowDown:
            if self.runner is not None and not self.exited.is_set():
                log.info("%s: the client went away: stopping its command", self.who)
        except FlowError as e:
            log.info("%s: %s", self.who, e)
        except Exception:  # a bug must not take the daemon down with it
            log.exception("%s: unexpected error", self.who)
        finally:
            self._teardown()

    def _loop(self) -> None:
        while not self.core.closed:
            events = self.reader.events()
            self.link.flush()
            for ev in events:
                self._on(ev)

    def _linger(self) -> None:
        """We ended the connection (an ERROR or a refusal went out) after keys were agreed, so the
        client may have packets on the way (START goes right behind AUTH): read and drop what it
        still sends until it closes, for CLOSE_LINGER at most. A flow closed on packets nobody read
        can lose the last ones written to it, and with them the reason we gave (as with TCP, and a
        web server's lingering close)."""
        if not self.core.session.keyed:
            return
        deadline = time.monotonic() + CLOSE_LINGER
        with contextlib.suppress(FlowDown, FlowTimeout):
            while (left := deadline - time.monotonic()) > 0:
                self.flow.set_timeout(left)
                self.flow.read()

    def _on(self, ev: Event) -> None:
        match ev:
            case Authenticated():
                log.info("%s: authenticated", self.who)
                self.flow.fccntl(Fccntl.SSNDTIMEO, None)  # flow control, not a clock, paces the session now
                if self.flow.qos.frct:
                    self.flow.fccntl(Fccntl.FRCTSRCVBUF, RCV_BUF)
            case StartRequested(fields):
                self._start(fields)
            case Data() | Eof() | Unread() | Window():
                try:
                    self.ends.take(ev)
                except BufferFull as e:  # the client's to hear: it sent what its key may not have waiting
                    log.info("%s: %s", self.who, e)
                    reason = str(e)
                    self.link.send(lambda: self.core.close(reason))
            case Signal(name):
                sig = signal_number(name)
                if sig is not None and self.runner is not None:
                    self.runner.deliver(sig)
            case Closed(reason):
                log.info("%s: %s", self.who, reason)

    # -- START -----------------------------------------------------------------------------

    def _start(self, fields: Fields) -> None:
        try:
            plan = self._plan(fields)
            stdin, stdout, stderr, *lfds = self._run(plan)
        except Refused as e:
            log.info("%s: refused: %s", self.who, e)
            message, status = str(e), e.status
            self.link.send(lambda: self.core.refuse_start(message, status))
            return
        runner = self.runner
        assert runner is not None
        self._add_sink(STDIN, lambda: stdin)
        self._add_pump(STDOUT, lambda: stdout)
        self._add_pump(STDERR, lambda: stderr)
        for ch, _ in plan.infifos:
            self._add_sink(ch, runner.fifos[ch].result)
        for ch, _ in plan.outfifos:
            self._add_pump(ch, runner.fifos[ch].result)
        acceptors = []
        for (ch, _), lfd in zip(plan.sockets, lfds, strict=True):
            lsock = socket.socket(fileno=lfd)
            self.listeners.append(lsock)
            # Started after START's answer: an OPEN must not overtake it.
            acceptors.append(
                threading.Thread(target=self._accept_loop, args=(ch, lsock), daemon=True, name=f"listen-{ch}")
            )
        self.link.send(self.core.started)
        self.ends.start()
        for t in acceptors:
            t.start()
        threading.Thread(target=self._wait_job, daemon=True, name="waiter").start()

    def _plan(self, fields: Fields) -> Plan:
        try:
            plan = policy.plan(self.entries, Start.from_fields(fields), self.cfg.settings)
        except BadStart as e:
            raise Refused(str(e)) from None
        if plan.one_time and not self.cfg.spent.spend(self.key):
            raise Refused("this one-time key was already used")
        what = "a recipe" if plan.recipe is not None else shlex.join(plan.steps[0].argv)
        log.info(
            "%s: running %s as %s (key line %d)%s",
            self.who,
            what,
            plan.account.name,
            plan.line,
            f"; client variables not accepted: {', '.join(plan.ignored_env)}" if plan.ignored_env else "",
        )
        return plan

    def _run(self, plan: Plan) -> list[int]:
        """Start the runner on the plan; the descriptors of the job it started."""
        workdir = user_workdir(self.cfg, plan.account) if plan.recipe is not None else None
        try:
            self.runner = runner = Runner(plan, workdir, OPEN_TIMEOUT, KILL_GRACE)
        except OSError as e:
            raise Refused(f"cannot start the session runner: {e.strerror}") from None
        finally:
            if workdir is not None:
                os.close(workdir)
        try:
            return runner.started.result(START_TIMEOUT)[1]
        except FutureTimeout:
            raise Refused(f"the command did not start within {START_TIMEOUT:g} s") from None
        except JobNotStarted as e:
            raise Refused(str(e), e.status) from None

    def _add_sink(self, ch: int, opener: Callable[[], int]) -> None:
        self.core.add_channel(ch, receives=True, sends=False)
        self.ends.sinks[ch] = Sink(self.link, ch, opener, stop=self.ends.stop, budget=self.holding)

    def _add_pump(self, ch: int, opener: Callable[[], int]) -> None:
        self.core.add_channel(ch, receives=False, sends=True)
        self.ends.pumps[ch] = Pump(self.link, ch, opener, stop=self.ends.stop)

    # -- unix sockets -----------------------------------------------------------------

    def _accept_loop(self, parent: int, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # closed at teardown
            with self.lock:
                full = self.open_connections >= self.cfg.limits.max_connections
                self.open_connections += not full
            if full:
                conn.close()
                # The job may connect in a loop: one line per session, and the count at its end.
                self.refused_connections += 1
                if self.refused_connections == 1:
                    log.info(
                        "%s: socket connection refused: %d open (--max-connections); more are counted",
                        self.who,
                        self.cfg.limits.max_connections,
                    )
                continue
            ch = next(self.ids)
            sink, pump = duplex(
                self.link, ch, conn, functools.partial(self._connection_closed, ch), self.ends.stop, self.holding
            )
            self.ends.sinks[ch], self.ends.pumps[ch] = sink, pump  # before OPEN: the client may answer at once
            try:
                self.link.send(lambda: self.core.open_connection(ch, parent))  # noqa: B023 - called at once
            except (FlowError, LocalProtocolError):
                return  # the session is over (teardown ends the threads)
            finally:  # after OPEN, which must come before the pump's first DATA
                sink.start()
                pump.start()

    def _connection_closed(self, ch: int) -> None:
        self.core.remove_channel(ch)
        self.ends.forget(ch)
        with self.lock:
            self.open_connections -= 1

    # -- the end ----------------------------------------------------------------------

    def _wait_job(self) -> None:
        assert self.runner is not None
        ended = self.runner.ended.result()
        pumps = self.ends.pumps
        for ch in (STDOUT, STDERR, *(c for c in list(pumps) if FIRST_CLIENT_CHANNEL <= c < FIRST_SERVER_CHANNEL)):
            pumps[ch].join()
        log.info("%s: command ended with %s %d", self.who, ended.kind, ended.value)
        self.exited.set()
        with contextlib.suppress(FlowError, LocalProtocolError):  # the connection may have ended first
            self.link.send(lambda: self.core.exited(ended.kind, ended.value, time.monotonic()))
        self.reader.wake()  # its timer is the linger now

    def stop_job(self) -> None:
        """Have the runner end the job (SIGTERM, then SIGKILL after the grace time)."""
        if self.runner is not None and not self.exited.is_set():
            self.runner.stop()

    def _teardown(self) -> None:
        self.stop_job()
        for lsock in self.listeners:
            lsock.close()
        if self.runner is not None:
            self.runner.reap(KILL_GRACE + 2.0)
        self.ends.close()
        if self.holding is not None:  # whatever its sinks still hold, the key has back
            self.holding.close()
        # A client that never authenticated is owed nothing more: no linger on what it left
        # unacknowledged or unread, which would hold the connection (and its slot) long past the grace.
        self.flow.close(linger=bool(self.key))
        self.reader.close()
        if self.refused_connections > 1:
            log.info("%s: %d socket connections refused (--max-connections)", self.who, self.refused_connections)
        log.info("%s: closed", self.who)


# -- the recipe directory ---------------------------------------------------------------


class ConfigError(Exception):
    """netplumbd cannot start as configured; the message says why."""


def open_recipe_dir(path: Path) -> int:
    """The recipe directory, made if missing, opened once: ours and private (0700), or refused."""
    try:
        private_dir(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"recipe directory {path}: {e.strerror}") from None
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or mode & 0o077:
        os.close(fd)
        raise ConfigError(
            f"recipe directory {path}: mode {mode:04o}, owner uid {st.st_uid}: it must be "
            f"private to netplumbd (mode 0700, owner uid {os.geteuid()})"
        )
    return fd


def user_workdir(cfg: Config, account: Account) -> int:
    """RECIPE_DIR/USER, the account's own 0700 directory (made for it if missing), opened relative to
    the recipe directory and never through a symlink; the runner works in it."""
    name = account.name
    if not USER_NAME.fullmatch(name):
        raise Refused(f"user name {name!r} cannot name a directory")
    made = False
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=cfg.recipe_fd)
        made = True
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cfg.recipe_fd)
    except OSError as e:
        raise Refused(f"recipe directory {cfg.recipe_dir / name}: {e.strerror}") from None
    st = os.fstat(fd)
    if made and st.st_uid != account.uid:
        os.fchown(fd, account.uid, account.gid)
    elif st.st_uid != account.uid:
        os.close(fd)
        raise Refused(f"recipe directory {cfg.recipe_dir / name} belongs to uid {st.st_uid}, not to {name}")
    return fd
