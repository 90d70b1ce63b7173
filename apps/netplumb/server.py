"""netplumbd: accept flows, authenticate clients off the accept path (bounded in number and time),
and run what they ask through a runner as the target user, replicating stdio, named pipes and unix
sockets over the encrypted session.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import pwd
import re
import shlex
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from apps.netplumb import policy, wire
from apps.netplumb.channels import Link, Pump, Sink
from apps.netplumb.jobs import signal_number
from apps.netplumb.keys import (
    AuthorizedKey,
    AuthorizedKeys,
    Identity,
    KeyFileError,
    SpentKeys,
    config_dir,
    fingerprint,
    private_dir,
)
from apps.netplumb.limits import Admission, LimitReached, Limits, Ticket
from apps.netplumb.policy import Account, Refused, Request, Settings
from apps.netplumb.privsep import JobNotStarted, Runner
from apps.netplumb.session import Established, Message, PeerError, ServerSession, SessionError
from apps.netplumb.wire import FIRST_CLIENT_CHANNEL, FIRST_SERVER_CHANNEL, STDERR, STDIN, STDOUT, Fields, WireError
from flowlib import Flow, FlowDown, FlowError, FlowTimeout, IrmdUnreachable
from flowlib.flow import establish
from flowlib.irm import IrmClient, default_client
from proto import messages as m

log = logging.getLogger("netplumbd")

LINGER = 30.0  # after EXIT, how long we wait for the client to close
IDLE_CHECK = 1.0  # seconds between looks at the clock while a session is quiet
KILL_GRACE = 2.0  # SIGTERM, then SIGKILL this much later
START_TIMEOUT = 15.0  # the runner reports the job started (or why not) by then
OPEN_TIMEOUT = 10.0  # a recipe's redirection waits this long for the other end of a named pipe
ACCEPT_BACKOFF = 0.2  # after the IRMd failed an accept, before the next
REFUSE_WAIT = 2.0  # a refused client's hello is awaited this long before the refusal goes out
MAX_REFUSING = 8  # refusals in progress; beyond, connections over a limit are closed unanswered
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class LoginTimeout(Exception):
    """The client did not authenticate and ask for a command within the grace time."""


@dataclass
class Config:
    identity: Identity
    authorized_keys: Path
    spent: SpentKeys
    recipe_dir: Path
    recipe_fd: int  # the recipe directory, opened once and verified: private to netplumbd
    settings: Settings
    limits: Limits
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits)


class Connection:
    """One client: handshake (within the grace time), START, then the channels until the job ends."""

    def __init__(self, flow: Flow, cfg: Config, ticket: Ticket, deadline: float) -> None:
        self.flow = flow
        self.cfg = cfg
        self.ticket = ticket
        self.deadline = deadline
        self.entries: list[AuthorizedKey] = []
        self.key = b""
        self.session = ServerSession(cfg.identity, self._authorize)
        self.link = Link(flow, self.session)
        self.runner: Runner | None = None
        self.pumps: dict[int, Pump] = {}
        self.sinks: dict[int, Sink] = {}
        self.exited = threading.Event()
        self.exit_time = 0.0
        self.listeners: list[socket.socket] = []
        self.acceptors: list[threading.Thread] = []
        self.ids = itertools.count(FIRST_SERVER_CHANNEL)
        self.open_connections = 0
        self.lock = threading.Lock()
        self.who = f"flow {flow.flow_id}" + (f" (uid {ticket.peer})" if ticket.peer is not None else "")

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
            log.warning("%s: refused key %s: %s", self.who, fingerprint(key), why)
            return why
        self.entries, self.key = entries, key
        self.who += f" {fingerprint(key)[:20]}…"
        return None

    # -- the session --------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except LoginTimeout:
            why = f"no command asked for within {self.cfg.limits.login_grace:g} s (--login-grace-time)"
            log.warning("%s: %s", self.who, why)
            with contextlib.suppress(FlowError, SessionError):
                self.link.send_error(why)
        except SessionError as e:
            log.warning("%s: session ended: %s", self.who, e)
            with contextlib.suppress(FlowError):
                self.link.flush()  # the refusal, if there is one
        except WireError as e:  # a well-sealed packet that makes no sense: tell the client why
            log.warning("%s: protocol error: %s", self.who, e)
            with contextlib.suppress(FlowError, SessionError):
                self.link.send_error(f"protocol error: {e}")
        except (FlowDown, FlowTimeout) as e:
            log.info("%s: %s", self.who, e)
        except FlowError as e:
            log.warning("%s: %s", self.who, e)
        except Exception:  # a bug must not take the daemon down with it
            log.exception("%s: unexpected error", self.who)
        finally:
            self._teardown()

    def _read_in_grace(self) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise LoginTimeout
        self.flow.set_timeout(left)
        try:
            return self.flow.read()
        except FlowTimeout:
            raise LoginTimeout from None

    def _run(self) -> None:
        while True:
            events = self.session.receive(self._read_in_grace())
            self.link.flush()
            if any(isinstance(ev, Established) for ev in events):
                break
        log.info("%s: authenticated", self.who)
        start = self._next_message(self._read_in_grace)
        if start.type != wire.START:
            raise WireError(f"expected START, got packet type {start.type}")
        try:
            self._start(start.fields)
        except Refused as e:
            log.warning("%s: refused: %s", self.who, e)
            self.link.send(wire.START, Fields.of(ok=0, message=str(e), status=e.status))
            return
        # Wake up now and then: a client that neither speaks nor closes after EXIT is dropped.
        self.flow.set_timeout(IDLE_CHECK)
        threading.Thread(target=self._wait_job, daemon=True, name="waiter").start()
        while True:
            try:
                msg = self._next_message(self.flow.read)
            except FlowTimeout:
                if self.exited.is_set() and time.monotonic() - self.exit_time > LINGER:
                    log.info("%s: the client did not close after the command ended", self.who)
                    return
                continue
            except FlowDown:
                if not self.exited.is_set():
                    log.info("%s: the client went away: stopping its command", self.who)
                return
            if msg.type == wire.DATA:
                self._sink(msg.fields).put(msg.fields.bin("data"))
            elif msg.type == wire.EOF:
                self._sink(msg.fields).finish()
            elif msg.type == wire.WINDOW:
                ch = msg.fields.int("ch")
                pump = self.pumps.get(ch)
                if pump is not None:  # else the channel already ended: a late grant
                    pump.window.grant(msg.fields.int("n", 1, 1 << 40))
            elif msg.type == wire.SIGNAL:
                sig = signal_number(msg.fields.need("sig"))
                if sig is not None and self.runner is not None:
                    self.runner.deliver(sig)
            else:
                raise WireError(f"unexpected packet type {msg.type} during a command")

    def _next_message(self, read: Callable[[], bytes]) -> Message:
        while True:
            for ev in self.session.receive(read()):
                if isinstance(ev, PeerError):
                    raise SessionError(f"the client ended the session: {ev.message}")
                if isinstance(ev, Message):
                    return ev

    def _sink(self, fields: Fields) -> Sink:
        ch = fields.int("ch")
        sink = self.sinks.get(ch)
        if sink is None:
            raise WireError(f"data for channel {ch}, which does not take data")
        return sink

    def _start(self, fields: Fields) -> None:
        cfg = self.cfg
        plan = policy.plan(self.entries, Request.from_fields(fields), cfg.settings)
        if plan.one_time and not cfg.spent.spend(self.key):
            raise Refused("this one-time key was already used")
        what = "a recipe" if plan.recipe is not None else shlex.join(plan.steps[0].argv)
        log.info("%s: running %s as %s (key line %d)%s", self.who, what, plan.account.name, plan.line,
                 f"; client variables not accepted: {', '.join(plan.ignored_env)}" if plan.ignored_env else "")
        workdir = user_workdir(cfg, plan.account) if plan.recipe is not None else None
        try:
            self.runner = runner = Runner(plan, workdir, OPEN_TIMEOUT, KILL_GRACE)
        except OSError as e:
            raise Refused(f"cannot start the session runner: {e.strerror}") from None
        finally:
            if workdir is not None:
                os.close(workdir)
        try:
            _, fds = runner.started.result(START_TIMEOUT)
        except FutureTimeout:
            raise Refused(f"the command did not start within {START_TIMEOUT:g} s") from None
        except JobNotStarted as e:
            raise Refused(str(e), e.status) from None
        stdin, stdout, stderr, *lfds = fds
        self.link.send(wire.START, Fields.of(ok=1))
        self._add_sink(STDIN, lambda: stdin)
        self._add_pump(STDOUT, lambda: stdout)
        self._add_pump(STDERR, lambda: stderr)
        for ch, _ in plan.infifos:
            self._add_sink(ch, runner.fifos[ch].result)
        for ch, _ in plan.outfifos:
            self._add_pump(ch, runner.fifos[ch].result)
        for (ch, _), lfd in zip(plan.sockets, lfds, strict=True):
            lsock = socket.socket(fileno=lfd)
            self.listeners.append(lsock)
            self.acceptors.append(threading.Thread(target=self._accept_loop, args=(ch, lsock), daemon=True,
                                                   name=f"listen-{ch}"))
        for t in [*self.sinks.values(), *self.pumps.values(), *self.acceptors]:
            t.start()

    def _add_sink(self, ch: int, opener: Callable[[], int]) -> None:
        self.sinks[ch] = Sink(self.link, ch, opener, _ignore)

    def _add_pump(self, ch: int, opener: Callable[[], int]) -> None:
        self.pumps[ch] = Pump(self.link, ch, opener, _ignore)

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
                log.warning("%s: socket connection refused: %d open (--max-connections)", self.who,
                            self.cfg.limits.max_connections)
                conn.close()
                continue
            ch = next(self.ids)
            closer = _SharedFd(conn.detach(), self._connection_closed)
            try:
                self.link.send(wire.OPEN, Fields.of(ch=ch, parent=parent))
            except (FlowError, SessionError):
                closer.release(0)
                closer.release(0)
                return
            sink = Sink(self.link, ch, closer.get, closer.release, close_fd=False,
                        on_eof=lambda f: socket.socket(fileno=os.dup(f)).shutdown(socket.SHUT_WR))
            pump = Pump(self.link, ch, closer.get, closer.release, close_fd=False)
            self.sinks[ch], self.pumps[ch] = sink, pump
            sink.start()
            pump.start()

    def _connection_closed(self) -> None:
        with self.lock:
            self.open_connections -= 1

    # -- the end ----------------------------------------------------------------------

    def _wait_job(self) -> None:
        assert self.runner is not None
        ended = self.runner.ended.result()
        for ch in (STDOUT, STDERR, *(c for c in self.pumps if FIRST_CLIENT_CHANNEL <= c < FIRST_SERVER_CHANNEL)):
            self.pumps[ch].join()
        log.info("%s: command ended with %s %d", self.who, ended.kind, ended.value)
        self.exit_time = time.monotonic()
        self.exited.set()
        with contextlib.suppress(FlowError, SessionError):  # the session may have ended first
            self.link.send(wire.EXIT, Fields.of((ended.kind, ended.value)))

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
        for pump in self.pumps.values():
            pump.window.close()
        for sink in self.sinks.values():
            sink.finish()
        self.flow.close()
        log.info("%s: closed", self.who)


class _SharedFd:
    """An fd used by a pump and a sink: closed when both are done."""

    def __init__(self, fd: int, on_close: Callable[[], None]) -> None:
        self.fd = fd
        self.users = 2
        self.lock = threading.Lock()
        self.on_close = on_close

    def get(self) -> int:
        return self.fd

    def release(self, _ch: int) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.on_close()


def _ignore(_ch: int) -> None:
    pass


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
        raise ConfigError(f"recipe directory {path}: mode {mode:04o}, owner uid {st.st_uid}: it must be "
                          f"private to netplumbd (mode 0700, owner uid {os.geteuid()})")
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


# -- the accept path ---------------------------------------------------------------------


class Daemon:
    """The accept loop: every flow gets a thread bounded by the limits; nothing a peer sends reaches
    this loop, so no peer can end it or hold it up."""

    def __init__(self, cfg: Config, irm: IrmClient) -> None:
        self.cfg = cfg
        self.irm = irm
        self.live: set[Connection] = set()
        self.refusing = threading.BoundedSemaphore(MAX_REFUSING)

    def serve(self) -> None:
        while True:
            try:
                reply, fd = self.irm.accept(None)
            except IrmdUnreachable:
                raise
            except FlowError as e:
                log.warning("accept: %s", e)
                time.sleep(ACCEPT_BACKOFF)
                continue
            peer = reply.peer_uid if reply.peer_uid >= 0 else None
            try:
                ticket = self.cfg.admission.arrive(peer)
            except LimitReached as e:
                log.warning("flow %d%s: %s", reply.flow_id, f" (uid {peer})" if peer is not None else "", e)
                self._refuse(reply, fd, str(e))
                continue
            threading.Thread(target=self._connection, args=(reply, fd, ticket), daemon=True,
                             name=f"conn-{reply.flow_id}").start()

    def _connection(self, reply: m.FlowReply, fd: int, ticket: Ticket) -> None:
        deadline = time.monotonic() + self.cfg.limits.login_grace
        conn = None
        try:
            flow = establish(reply, fd, self.irm, client=False)
            conn = Connection(flow, self.cfg, ticket, deadline)
            self.live.add(conn)
            conn.run()
        except Exception as e:  # whatever a peer did to the flow before the session began
            log.warning("flow %d: %s: %s", reply.flow_id, type(e).__name__, e)
        finally:
            if conn is not None:
                self.live.discard(conn)
            self.cfg.admission.leave(ticket)

    def _refuse(self, reply: m.FlowReply, fd: int, why: str) -> None:
        """Tell a client over a limit why (in clear: no key is agreed), in a thread of a bounded few."""
        if not self.refusing.acquire(blocking=False):
            with contextlib.suppress(OSError):
                os.close(fd)
            self.irm.dealloc(reply.flow_id)
            return

        def refuse() -> None:
            try:
                flow = establish(reply, fd, self.irm, client=False)
                try:
                    flow.set_timeout(REFUSE_WAIT)
                    with contextlib.suppress(FlowError):
                        flow.read()  # its hello: the refusal answers it
                    flow.write(ServerSession(self.cfg.identity, lambda _key: why).error(why))
                finally:
                    flow.close()
            except Exception as e:
                log.info("flow %d: refusal not delivered: %s", reply.flow_id, e)
            finally:
                self.refusing.release()

        threading.Thread(target=refuse, daemon=True, name=f"refuse-{reply.flow_id}").start()

    def stop_jobs(self) -> None:
        for c in list(self.live):
            c.stop_job()

    def kill_runners(self) -> None:
        for c in list(self.live):
            if c.runner is not None:
                with contextlib.suppress(OSError):
                    c.runner.proc.kill()

    def busy(self) -> bool:
        return any(c.runner is not None and c.runner.proc.poll() is None for c in list(self.live))


def _bind(irm: IrmClient, name: str, layers: list[str]) -> None:
    try:
        irm.bind(name)
    except FlowError as e:  # started by the IRMd for this name: bound already
        log.info("bind %s: %s", name, e)
    if layers:
        try:
            irm.register(name, layers)
        except FlowError as e:
            if "already" not in str(e).lower() and "exist" not in str(e).lower():
                raise
            log.info("register %s: %s", name, e)


def _parser() -> argparse.ArgumentParser:
    d = Limits()
    ap = argparse.ArgumentParser(prog="netplumbd", description="netplumb remote execution service")
    ap.add_argument("--name", help="bind this process to NAME (an IRMd starting us with auto has done so)")
    ap.add_argument("--layer", action="append", default=[], help="register NAME in LAYER (repeatable)")
    ap.add_argument("--authorized-keys", type=Path, default=None,
                    help="client keys allowed in (default ~/.config/netplumb/authorized_keys)")
    ap.add_argument("--host-key", type=Path, default=None,
                    help="this server's key, made if missing (default ~/.config/netplumb/host_key)")
    ap.add_argument("--spent-keys", type=Path, default=None,
                    help="where used one-time keys are recorded (default AUTHORIZED_KEYS.spent)")
    ap.add_argument("--recipe-dir", type=Path, default=None,
                    help="private directory of recipes' working directories, one per user "
                         "(default ~/.config/netplumb/recipes)")
    ap.add_argument("--path", default=None,
                    help="the PATH programs are found in and commands get (default: netplumbd's own)")
    ap.add_argument("--accept-env", action="append", default=[], metavar="PATTERN",
                    help="client variables a command may get, as sshd's AcceptEnv (repeatable; none by default)")
    limits = ap.add_argument_group("limits")
    for opt, attr, kind, what in (
            ("--max-startups", "max_startups", int, "unauthenticated connections in all"),
            ("--per-peer-startups", "peer_startups", int, "unauthenticated connections from one local uid"),
            ("--max-sessions", "max_sessions", int, "connections in all"),
            ("--per-peer-sessions", "peer_sessions", int, "connections from one local uid"),
            ("--per-key-sessions", "key_sessions", int, "sessions of one key"),
            ("--login-grace-time", "login_grace", float, "seconds to authenticate and ask for a command"),
            ("--max-channels", "max_channels", int, "named pipes and sockets of one START"),
            ("--max-connections", "max_connections", int, "open connections on a session's sockets")):
        limits.add_argument(opt, dest=attr, type=kind, default=getattr(d, attr), metavar="N",
                            help=f"{what} (default {getattr(d, attr):g})")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="netplumbd[%(process)d]: %(message)s")
    if args.layer and not args.name:
        ap.error("--layer needs --name")
    limits = Limits(**{f: getattr(args, f) for f in Limits.__dataclass_fields__})
    if any(v <= 0 for v in vars(limits).values()):
        ap.error("every limit must be positive")
    auth = args.authorized_keys or config_dir() / "authorized_keys"
    try:
        identity = Identity.load_or_create(args.host_key or config_dir() / "host_key")
        with contextlib.suppress(FileNotFoundError):
            AuthorizedKeys.load(auth)  # refuse a file with loose modes now, not at the first login
        recipe_dir = args.recipe_dir or config_dir() / "recipes"
        recipe_fd = open_recipe_dir(recipe_dir)
    except (KeyFileError, ConfigError, OSError) as e:
        print(f"netplumbd: {e}", file=sys.stderr)
        sys.exit(1)
    me = policy.account_of(pwd.getpwuid(os.geteuid()))
    settings = Settings(me, args.path or os.environ.get("PATH") or os.defpath, policy.real_account,
                        policy.real_which, tuple(args.accept_env), os.environ.get("LANG"), limits.max_channels)
    cfg = Config(identity, auth, SpentKeys(args.spent_keys or auth.with_name(auth.name + ".spent")), recipe_dir,
                 recipe_fd, settings, limits)
    irm = default_client()
    daemon = Daemon(cfg, irm)

    def on_signal(signum: int, _frame: object) -> None:
        daemon.stop_jobs()
        # Whatever the main thread waits in, we are gone shortly, and so are the commands.
        timer = threading.Timer(KILL_GRACE + 1.0, _give_up, args=(daemon,))
        timer.daemon = True
        timer.start()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.name:
            _bind(irm, args.name, args.layer)
        log.info("serving with key %s", fingerprint(identity.public))
        daemon.serve()
    except FlowError as e:
        print(f"netplumbd: {e}", file=sys.stderr)
        sys.exit(1)
    finally:  # the commands of sessions still running do not outlive us
        daemon.stop_jobs()
        deadline = time.monotonic() + KILL_GRACE + 1.0
        while daemon.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.kill_runners()


def _give_up(daemon: Daemon) -> None:
    daemon.kill_runners()
    os._exit(0)


if __name__ == "__main__":
    main()
