"""netplumbd: accept flows, authenticate clients, run their commands and replicate stdio,
named pipes and unix sockets over the encrypted session (one thread per connection).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import pwd
import shlex
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from apps.netplumb import wire
from apps.netplumb.channels import STDERR, STDIN, STDOUT, Link, Pump, Sink
from apps.netplumb.jobs import CommandJob, Job, RunAs, describe_status, signal_number
from apps.netplumb.keys import AuthorizedKey, AuthorizedKeys, Identity, KeyFileError, SpentKeys, config_dir, fingerprint
from apps.netplumb.recipe import RecipeError, RecipeJob, parse_recipe
from apps.netplumb.session import Established, Message, PeerError, ServerSession, SessionError
from apps.netplumb.wire import Fields, WireError
from flowlib import Flow, FlowDown, FlowError, FlowTimeout, flow_accept
from flowlib.irm import default_client

log = logging.getLogger("netplumbd")

HANDSHAKE_TIMEOUT = 15.0  # a client that does not finish authenticating by then is dropped
LINGER = 30.0  # after EXIT, how long we wait for the client to close
IDLE_CHECK = 1.0  # seconds between looks at the clock while a session is quiet
KILL_GRACE = 2.0  # SIGTERM, then SIGKILL this much later
FIRST_SERVER_CHANNEL = 1000  # channels of socket connections; the client numbers below this
MAX_CHANNELS = 64
MAX_RECIPE = 1 << 16


@dataclass
class Config:
    identity: Identity
    authorized_keys: Path
    spent: SpentKeys
    recipe_dir: Path


class Refused(Exception):
    """A START the client may not have: the message goes back to it."""


@dataclass
class Plan:
    """What a START asks for, checked against the client's key."""

    argv: list[str]
    recipe: str | None
    run_as: RunAs
    infifos: dict[int, str] = field(default_factory=dict)
    outfifos: dict[int, str] = field(default_factory=dict)
    sockets: dict[int, str] = field(default_factory=dict)


def parse_start(fields: Fields) -> Plan:
    argv = fields.getall("arg")
    recipe = fields.get("recipe")
    if recipe is not None and len(recipe) > MAX_RECIPE:
        raise Refused(f"recipe longer than {MAX_RECIPE} bytes")
    if not argv and recipe is None:
        raise Refused("no command given")
    env = {}
    for item in fields.getall("env"):
        name, eq, value = item.partition("=")
        if not eq or not name.isidentifier():
            raise Refused(f"bad environment entry {item[:40]!r} (expected NAME=VALUE)")
        env[name] = value
    plan = Plan(argv, recipe, RunAs(fields.get("user") or None, env))
    for kind, table in (("infifo", plan.infifos), ("outfifo", plan.outfifos), ("socket", plan.sockets)):
        for item in fields.getall(kind):
            ch_text, _, path = item.partition(" ")
            if not ch_text.isdigit() or not 3 <= int(ch_text) < FIRST_SERVER_CHANNEL or not path.startswith("/"):
                raise Refused(f"bad {kind} entry {item[:60]!r} (expected CHANNEL /absolute/path)")
            if any(int(ch_text) in t for t in (plan.infifos, plan.outfifos, plan.sockets)):
                raise Refused(f"channel {ch_text} is used twice")
            table[int(ch_text)] = path
    if len(plan.infifos) + len(plan.outfifos) + len(plan.sockets) > MAX_CHANNELS:
        raise Refused(f"more than {MAX_CHANNELS} named pipes and sockets")
    return plan


class Connection:
    """One client: handshake, START, then the channels until the command exits."""

    def __init__(self, flow: Flow, cfg: Config) -> None:
        self.flow = flow
        self.cfg = cfg
        self.entries: list[AuthorizedKey] = []
        self.session = ServerSession(cfg.identity, self._authorize)
        self.link = Link(flow, self.session)
        self.job: Job | None = None
        self.pumps: dict[int, Pump] = {}
        self.sinks: dict[int, Sink] = {}
        self.lock = threading.Lock()
        self.exited = threading.Event()
        self.exit_time = 0.0
        self.cleanup: list[Path] = []
        self.listeners: list[socket.socket] = []
        self.acceptors: list[threading.Thread] = []
        self.ids = itertools.count(FIRST_SERVER_CHANNEL)
        self.who = f"flow {flow.flow_id}"

    # -- authentication ---------------------------------------------------------

    def _authorize(self, key: bytes) -> str | None:
        try:
            keys = AuthorizedKeys.load(self.cfg.authorized_keys)
        except (KeyFileError, OSError) as e:
            log.error("%s", e)
            return "the server cannot read its authorized keys"
        entries = keys.find(key)
        usable = [k for k in entries if not (k.one_time and self.cfg.spent.spent(k.public))]
        if not entries:
            log.warning("%s: refused key %s: not in %s", self.who, fingerprint(key), self.cfg.authorized_keys)
            return f"key {fingerprint(key)} is not authorized"
        if not usable:
            log.warning("%s: refused spent one-time key %s", self.who, fingerprint(key))
            return f"one-time key {fingerprint(key)} was already used"
        self.entries = usable
        self.who = f"flow {self.flow.flow_id} ({fingerprint(key)[:20]}…)"
        return None

    def _choose(self, plan: Plan) -> AuthorizedKey:
        """The first authorized_keys entry of this key that permits the plan (else Refused)."""
        commands = [plan.argv] if plan.recipe is None else [c.argv for c in parse_recipe(plan.recipe)]
        whys = []
        for entry in self.entries:
            if plan.recipe is not None and entry.command is not None:
                whys.append("a key bound to one command cannot run recipes")
                continue
            why = next((w for argv in commands if (w := entry.permits(argv)) is not None), None)
            user = plan.run_as.user
            if why is None and user is not None and user not in entry.users:
                why = f"this key may not run commands as {user!r}"
            if why is None and user is not None and os.geteuid() != 0 and user != _current_user():
                why = f"netplumbd does not run as root and cannot switch to user {user!r}"
            if why is None:
                if entry.one_time and not self.cfg.spent.spend(entry.public):
                    why = "this one-time key was already used"
                else:
                    return entry
            whys.append(why)
        raise Refused(whys[0] if whys else "not permitted")

    # -- the session --------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
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

    def _run(self) -> None:
        self.flow.set_timeout(HANDSHAKE_TIMEOUT)
        while True:
            events = self.session.receive(self.flow.read())
            self.link.flush()
            if any(isinstance(ev, Established) for ev in events):
                break
        log.info("%s: authenticated", self.who)
        start = self._next_message()
        if start.type != wire.START:
            raise WireError(f"expected START, got packet type {start.type}")
        try:
            self._start(start.fields)
        except Refused as e:
            log.warning("%s: refused: %s", self.who, e)
            self.link.send(wire.START, Fields.of(ok=0, message=str(e), status=126))
            return
        # Wake up now and then: a client that neither speaks nor closes after EXIT is dropped.
        self.flow.set_timeout(IDLE_CHECK)
        threading.Thread(target=self._wait_job, daemon=True, name="waiter").start()
        while True:
            try:
                msg = self._next_message()
            except FlowTimeout:
                if self.exited.is_set() and time.monotonic() - self.exit_time > LINGER:
                    log.info("%s: the client did not close after the command ended", self.who)
                    return
                continue
            except FlowDown:
                if not self.exited.is_set():
                    log.info("%s: the client went away: killing its command", self.who)
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
                if sig is not None and self.job is not None:
                    self.job.signal(sig)
            else:
                raise WireError(f"unexpected packet type {msg.type} during a command")

    def _next_message(self) -> Message:
        while True:
            for ev in self.session.receive(self.flow.read()):
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
        plan = parse_start(fields)
        try:
            entry = self._choose(plan)
        except RecipeError as e:
            raise Refused(f"bad recipe: {e}") from None
        log.info("%s: running %s%s (key line %d)", self.who,
                 "a recipe" if plan.recipe is not None else shlex.join(plan.argv),
                 f" as {plan.run_as.user}" if plan.run_as.user else "", entry.line)
        for ch, path in plan.infifos.items():
            self._make_fifo(path, plan)
            self._add_sink(ch, functools.partial(os.open, path, os.O_WRONLY))
        for ch, path in plan.outfifos.items():
            self._make_fifo(path, plan)
            self._add_pump(ch, functools.partial(os.open, path, os.O_RDONLY))
        for ch, path in plan.sockets.items():
            self._listen(ch, path, plan)
        try:
            if plan.recipe is not None:
                self.job = RecipeJob(parse_recipe(plan.recipe), plan.run_as, self.cfg.recipe_dir)
            else:
                self.job = CommandJob(plan.argv, plan.run_as)
        except (OSError, ValueError, KeyError, RecipeError) as e:
            what = plan.argv[0] if plan.recipe is None else "the recipe"
            raise Refused(f"cannot run {what}: {getattr(e, 'strerror', None) or e}") from None
        job = self.job
        self.link.send(wire.START, Fields.of(ok=1))
        self._add_sink(STDIN, lambda: job.stdin)
        self._add_pump(STDOUT, lambda: job.stdout)
        self._add_pump(STDERR, lambda: job.stderr)
        for t in [*self.sinks.values(), *self.pumps.values(), *self.acceptors]:
            t.start()

    def _make_fifo(self, path: str, plan: Plan) -> None:
        try:
            os.mkfifo(path, 0o600)
            self.cleanup.append(Path(path))
            self._give(path, plan)
        except FileExistsError:
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                raise Refused(f"{path} exists and is not a named pipe") from None
        except OSError as e:
            raise Refused(f"cannot make the named pipe {path}: {e.strerror}") from None

    def _add_sink(self, ch: int, opener: Callable[[], int], close_fd: bool = True) -> Sink:
        sink = Sink(self.link, ch, opener, _ignore, close_fd)
        self.sinks[ch] = sink
        return sink

    def _add_pump(self, ch: int, opener: Callable[[], int], close_fd: bool = True) -> Pump:
        pump = Pump(self.link, ch, opener, _ignore, close_fd)
        self.pumps[ch] = pump
        return pump

    # -- unix sockets -----------------------------------------------------------------

    def _give(self, path: str, plan: Plan) -> None:
        """A pipe or socket we made belongs to the user the command runs as (-user)."""
        if plan.run_as.user and os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(plan.run_as.user)
            except KeyError:
                raise Refused(f"no user {plan.run_as.user!r} here") from None
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _listen(self, ch: int, path: str, plan: Plan) -> None:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise Refused(f"{path} exists and is not a unix socket")
            if _answers(path):
                raise Refused(f"{path} is a unix socket in use")
            os.unlink(path)  # a stale socket nobody listens on
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lsock.bind(path)
            lsock.listen(16)
        except OSError as e:
            lsock.close()
            raise Refused(f"cannot listen on {path}: {e.strerror}") from None
        self.cleanup.append(Path(path))
        self._give(path, plan)
        self.listeners.append(lsock)
        # Started after START's answer: an OPEN must not overtake it.
        self.acceptors.append(threading.Thread(target=self._accept_loop, args=(ch, lsock), daemon=True,
                                               name=f"listen-{ch}"))

    def _accept_loop(self, parent: int, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return  # closed at teardown
            ch = next(self.ids)
            fd = conn.detach()
            closer = _SharedFd(fd)
            try:
                self.link.send(wire.OPEN, Fields.of(ch=ch, parent=parent))
            except FlowError:
                closer.release(0)
                closer.release(0)
                return
            sink = Sink(self.link, ch, closer.get, closer.release, close_fd=False,
                        on_eof=lambda f: socket.socket(fileno=os.dup(f)).shutdown(socket.SHUT_WR))
            pump = Pump(self.link, ch, closer.get, closer.release, close_fd=False)
            self.sinks[ch], self.pumps[ch] = sink, pump
            sink.start()
            pump.start()

    # -- the end ----------------------------------------------------------------------

    def _wait_job(self) -> None:
        assert self.job is not None
        code = self.job.wait()
        # Fifos the command never opened would keep our pumps and sinks waiting in open().
        deadline = time.monotonic() + 5.0
        fifos: list[Pump | Sink] = [t for ch, t in self.pumps.items() if 3 <= ch < FIRST_SERVER_CHANNEL]
        fifos += [t for ch, t in self.sinks.items() if 3 <= ch < FIRST_SERVER_CHANNEL]
        while any(t.is_alive() and t.fd < 0 for t in fifos) and time.monotonic() < deadline:
            self._unblock_fifos()
            time.sleep(0.05)
        for ch in (STDOUT, STDERR, *(c for c in self.pumps if 3 <= c < FIRST_SERVER_CHANNEL)):
            self.pumps[ch].join()
        kind, value = describe_status(code)
        log.info("%s: command ended with %s %d", self.who, kind, value)
        self.exit_time = time.monotonic()
        self.exited.set()
        for path in self._fifos():  # gone before the client hears the exit status and returns
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(FlowError, SessionError):  # the session may have ended first
            self.link.send(wire.EXIT, Fields.of((kind, value)))

    def _fifos(self) -> list[Path]:
        fifos = []
        for path in self.cleanup:
            with contextlib.suppress(OSError):  # gone already
                if stat.S_ISFIFO(path.stat().st_mode):
                    fifos.append(path)
        return fifos

    def _unblock_fifos(self) -> None:
        for path in self._fifos():
            for mode in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
                with contextlib.suppress(OSError):
                    os.close(os.open(path, mode))

    def _teardown(self) -> None:
        job = self.job
        if job is not None and not self.exited.is_set():
            job.signal(signal.SIGTERM)
            deadline = time.monotonic() + KILL_GRACE
            while not self.exited.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
                self._unblock_fifos()
            if not self.exited.is_set():
                job.signal(signal.SIGKILL)
        for pump in self.pumps.values():
            pump.window.close()
        for sink in self.sinks.values():
            sink.finish()
        for lsock in self.listeners:
            lsock.close()
        self._unblock_fifos()
        for path in self.cleanup:
            with contextlib.suppress(OSError):
                path.unlink()
        self.flow.close()
        log.info("%s: closed", self.who)


class _SharedFd:
    """An fd used by a pump and a sink: closed when both are done."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 2
        self.lock = threading.Lock()

    def get(self) -> int:
        return self.fd

    def release(self, _ch: int) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)


def _ignore(_ch: int) -> None:
    pass


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def _bind(name: str, layers: list[str]) -> None:
    irm = default_client()
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


def main(argv: list[str] | None = None) -> None:
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
                    help="where recipes' relative file names go (default $TMPDIR/netplumb)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="netplumbd[%(process)d]: %(message)s")
    if args.layer and not args.name:
        ap.error("--layer needs --name")
    auth = args.authorized_keys or config_dir() / "authorized_keys"
    try:
        identity = Identity.load_or_create(args.host_key or config_dir() / "host_key")
    except (KeyFileError, OSError) as e:
        print(f"netplumbd: {e}", file=sys.stderr)
        sys.exit(1)
    recipe_dir = args.recipe_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "netplumb"
    cfg = Config(identity, auth, SpentKeys(args.spent_keys or auth.with_name(auth.name + ".spent")), recipe_dir)

    live: set[Connection] = set()

    def on_signal(signum: int, _frame: object) -> None:
        _abandon(live, signal.SIGTERM)
        # Whatever the main thread waits in, we are gone shortly, and so are the commands.
        timer = threading.Timer(KILL_GRACE, _give_up, args=(live,))
        timer.daemon = True
        timer.start()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.name:
            _bind(args.name, args.layer)
        log.info("serving with key %s", fingerprint(identity.public))
        while True:
            flow = flow_accept()
            conn = Connection(flow, cfg)
            live.add(conn)

            def serve(c: Connection = conn) -> None:
                try:
                    c.run()
                finally:
                    live.discard(c)

            threading.Thread(target=serve, daemon=True, name=f"conn-{flow.flow_id}").start()
    except FlowError as e:
        print(f"netplumbd: {e}", file=sys.stderr)
        sys.exit(1)
    finally:  # commands of sessions still running do not outlive us
        _abandon(live, signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while any(c.job is not None and not c.exited.is_set() for c in list(live)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        _abandon(live, signal.SIGKILL)


def _give_up(live: set[Connection]) -> None:
    _abandon(live, signal.SIGKILL)
    os._exit(0)


def _abandon(live: set[Connection], sig: int) -> None:
    """Signal the commands still running and remove the pipes and sockets we made."""
    for c in list(live):
        if c.job is not None and not c.exited.is_set():
            c.job.signal(sig)
        for path in c.cleanup:
            with contextlib.suppress(OSError):
                path.unlink()


if __name__ == "__main__":
    main()
