"""plumb: run a command on a netplumbd by name, with stdin/stdout/stderr, named pipes and unix
sockets replicated over one encrypted session; exits with the remote command's status.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import shlex
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from apps.netplumb.channels import DEBUG2, DEBUG3, Ends, Link, Pump, Reader, Sink, duplex
from apps.netplumb.connection import Authenticated, ClientConnection, Closed, Event, LocalProtocolError
from apps.netplumb.keys import HostKeyChanged, Identity, KeyFileError, KnownHosts, config_dir, fingerprint
from apps.netplumb.messages import Data, Eof, Exit, Open, Start, Started, Unread, Window
from apps.netplumb.session import ServerKey, SessionError
from apps.netplumb.wire import FIRST_CLIENT_CHANNEL, MAX_CONNECTIONS, STDERR, STDIN, STDOUT
from flowlib import FlowDown, FlowError, flow_alloc, qos
from proto.version import text as version_text
from proto.visible import show_visible, visible

log = logging.getLogger("plumb")

FAILED = 255  # our own failures, as ssh does: the remote command's statuses stay distinguishable
ALLOC_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0  # for the handshake and START's answer (the server may take 15 s to start a recipe)
USAGE = """\
usage: plumb [-qvV] [-i KEY] [-l USER] [-recipe=FILE] [-user=NAME] [-infifo=LOCAL[:REMOTE]]
             [-outfifo=LOCAL[:REMOTE]] [-socket=LOCAL[:REMOTE]] [-export=NAME,...] [-key=KEY]
             [USER@]HOST [OPTIONS] [--] [COMMAND [ARG...]]"""
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
LONG = ("recipe", "user", "infifo", "outfifo", "socket", "export", "key")  # the seed's -NAME=VALUE
FLAGS = "qv"
VALUED = {"l": "user", "i": "key"}  # ssh's -l login_name, -i identity_file
DEBUG1 = 15  # plumb -v: the flow and the handshake; -vv adds channels, -vvv packets (channels.py)


class UsageError(Exception):
    pass


class Failure(Exception):
    """Why plumb gives up; printed as one line."""


@dataclass
class Request:
    host: str = ""
    argv: list[str] = field(default_factory=list)
    recipe: str | None = None
    user: str | None = None
    infifos: list[tuple[str, str]] = field(default_factory=list)
    outfifos: list[tuple[str, str]] = field(default_factory=list)
    sockets: list[tuple[str, str]] = field(default_factory=list)
    export: list[str] = field(default_factory=list)
    key: Path | None = None
    verbose: int = 0
    quiet: bool = False


def _paths(value: str, opt: str) -> tuple[str, str]:
    local, sep, remote = value.partition(":")
    remote = remote if sep else local
    if not local or not remote.startswith("/"):
        raise UsageError(f"-{opt}={value}: expected LOCAL[:REMOTE] with an absolute REMOTE path")
    return os.path.abspath(local), remote


def parse_args(args: list[str]) -> Request:
    """Options anywhere before the command, as ssh takes them (before and after the host), in ssh's
    short form (-v, -q, -l USER, -i KEY) or the seed's -NAME=VALUE; `--` ends them."""
    req = Request()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            if not req.host and i < len(args):
                _host(req, args[i])
                i += 1
            break
        if arg.startswith("-") and len(arg) > 1:
            i = _option(req, args, i)
        elif not req.host:
            _host(req, arg)
            i += 1
        else:
            break  # the command
    req.argv = args[i:]
    if not req.host:
        raise UsageError("no HOST (a name netplumbd is registered as)")
    if not req.argv and req.recipe is None:
        raise UsageError("no command (and no -recipe=)")
    if req.argv and req.recipe is not None:
        raise UsageError("give either a command or -recipe=, not both")
    return req


def _host(req: Request, text: str) -> None:
    user, at, host = text.partition("@")
    if at:
        _set_user(req, user)
    req.host = host if at else text
    if not req.host:
        raise UsageError(f"no HOST in {text!r}")


def _set_user(req: Request, user: str) -> None:
    if not user:
        raise UsageError("an empty user name")
    if req.user is not None and req.user != user:
        raise UsageError(f"the user is given twice: {req.user!r} and {user!r}")
    req.user = user


def _option(req: Request, args: list[str], i: int) -> int:
    """Take the option at args[i] (and its value); the index after it."""
    arg = args[i]
    if any(arg[1:].startswith(o) for o in LONG):  # the seed's form: never read as -i, -l and letters
        name, eq, value = arg[1:].partition("=")
        if name not in LONG:
            raise UsageError(f"unknown option {arg!r}")
        if not eq or not value:
            raise UsageError(f"{arg!r}: -{name}= takes a value")
        _long(req, name, value)
        return i + 1
    for k, flag in enumerate(arg[1:], 1):
        if flag == "v":
            req.verbose += 1
        elif flag == "q":
            req.quiet = True
        elif flag in VALUED:
            value = arg[k + 1 :] or (args[i + 1] if i + 1 < len(args) else "")
            if not value:
                raise UsageError(f"-{flag} needs a value")
            _long(req, VALUED[flag], value)
            return i + (1 if arg[k + 1 :] else 2)
        else:
            raise UsageError(f"unknown option {arg!r}")
    return i + 1


def _long(req: Request, name: str, value: str) -> None:
    if name == "recipe":
        from apps.netplumb.recipe import RecipeError, parse_recipe  # here: plumb starts faster without it

        try:
            req.recipe = Path(value).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"-recipe={value}: {getattr(e, 'strerror', None) or e}") from None
        try:
            parse_recipe(req.recipe)  # fail here, with the line, rather than remotely
        except RecipeError as e:
            raise UsageError(f"{value}: {e}") from None
    elif name == "user":
        _set_user(req, value)
    elif name == "key":
        req.key = Path(value)
    elif name == "export":
        req.export += [n for n in value.replace(" ", ",").split(",") if n]
    else:
        getattr(req, name + "s").append(_paths(value, name))


class Client:
    """One plumb run: drive the connection core over a flow until EXIT, with the local ends of the
    channels in threads."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.locals: dict[int, str] = {}  # channel -> its local pipe, file or socket
        self.ends = Ends()
        self.waited: list[Sink] = []
        self.connections: set[int] = set()  # the open connections the server made on our sockets
        self.status: int | None = None

    def _check_host(self, key: bytes) -> None:
        known = KnownHosts(config_dir() / "known_hosts")
        try:
            if known.check(self.req.host, key):
                log.warning("pinned the key of %r (%s) in %s", self.req.host, fingerprint(key), known.path)
            else:
                log.log(DEBUG1, "server key %s matches %s", fingerprint(key), known.path)
        except HostKeyChanged as e:
            raise SessionError(str(e)) from None
        except (KeyFileError, OSError) as e:
            raise SessionError(f"known hosts: {e}") from None

    def run(self) -> int:
        req = self.req
        key = req.key or config_dir() / "id"
        try:
            identity = Identity.load(key)
        except (KeyFileError, OSError) as e:
            raise Failure(str(e)) from None
        log.log(DEBUG1, "key %s: %s", key, fingerprint(identity.public))
        start = self._start_message()
        log.log(DEBUG1, "allocating a flow to %s (qos data)", req.host)
        try:
            flow = flow_alloc(req.host, qos=qos.data, timeout=ALLOC_TIMEOUT)
        except FlowError as e:
            raise Failure(f"cannot reach {req.host}: {e}") from None
        log.log(DEBUG1, "flow %d to %s via layer %s", flow.flow_id, req.host, flow.layer)
        self.core = ClientConnection(identity, self._check_host, start, time.monotonic(), ANSWER_TIMEOUT, flow.mtu)
        self.link = Link(flow, self.core)
        self.reader = Reader(flow, self.core)
        old_wakeup = signal.set_wakeup_fd(self.reader.wake_w)  # a signal any thread took wakes us for its handler
        try:
            self.link.send(self.core.connect)
            log.log(DEBUG1, "sent HELLO: a fresh X25519 key")
            return self._loop()
        except FlowDown:
            raise Failure(f"{req.host}: the connection ended before the command did") from None
        except FlowError as e:
            raise Failure(f"{req.host}: {e}") from None
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self.reader.close()
            with contextlib.suppress(FlowError):
                flow.close()

    def _loop(self) -> int:
        while self.status is None:
            events = self.reader.events()
            self.link.flush()
            for ev in events:
                refused = self._on(ev)
                if refused is not None:
                    return refused
        for sink in self.waited:
            sink.join()
        return self.status

    def _on(self, ev: Event) -> int | None:
        """Act on one event; the status to exit with if the command was refused."""
        match ev:
            case ServerKey(key):
                what = "the recipe" if self.core.start.recipe is not None else shlex.join(self.core.start.argv)
                log.log(
                    DEBUG1,
                    "the server proved it holds %s; sent AUTH (sealed): our key and proof, and START: %s%s",
                    fingerprint(key),
                    what,
                    f" as {self.core.start.user}" if self.core.start.user else "",
                )
            case Authenticated():
                log.log(DEBUG1, "authenticated")
            case Started(ok, message, status):
                if not ok:
                    log.log(DEBUG1, "START refused (status %d)", status)
                    say(f"plumb: {self.req.host}: {visible(message)}")
                    return status
                log.log(DEBUG1, "started")
                self._forward_signals()
                self._start_channels()
            case Data() | Eof() | Unread() | Window():
                self.ends.take(ev)
            case Open(ch, parent):
                log.log(DEBUG2, "channel %d: a connection on socket %d, to %s", ch, parent, self.locals[parent])
                self._open(ch, parent)
            case Exit("signal", sig):
                name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
                if sig != signal.SIGPIPE:  # as a shell: a reader that went away is no news
                    say(f"plumb: {self.req.host}: the command was killed by {name}")
                self.status = 128 + sig
                self._outputs_end()
            case Exit(_, status):
                log.log(DEBUG1, "exit status %d", status)
                self.status = status
                self._outputs_end()
            case Closed(reason):
                raise Failure(f"{self.req.host}: {reason}")
        return None

    def _outputs_end(self) -> None:
        """The command ended: so do its outputs. netplumbd sends their EOFs before EXIT; a server that
        did not would have plumb wait for them for ever, as the flow is read no more (what came is
        written first)."""
        for sink in self.waited:
            sink.finish()

    def _forward_signals(self) -> None:
        """Interrupts go to the remote command (as ssh does), which decides whether to end."""

        def forward(signum: int, _frame: object) -> None:
            log.log(DEBUG2, "forwarding %s", signal.Signals(signum).name)
            with contextlib.suppress(FlowError, LocalProtocolError):
                self.link.send(lambda: self.core.signal(signal.Signals(signum).name[3:]))

        for sig in FORWARDED:
            signal.signal(sig, forward)

    def _start_message(self) -> Start:
        """START: the channels from 3 on are the pipes and sockets in the order given."""
        req = self.req
        env = tuple((name, os.environ[name]) for name in req.export if name in os.environ)
        pairs = [*req.infifos, *req.outfifos, *req.sockets]
        numbered = list(zip(itertools.count(FIRST_CLIENT_CHANNEL), pairs))
        self.locals = {ch: local for ch, (local, _) in numbered}
        channels = [(ch, remote) for ch, (_, remote) in numbered]
        n_in, n_out = len(req.infifos), len(req.outfifos)
        return Start(
            tuple(req.argv),
            req.recipe,
            req.user,
            env,
            tuple(channels[:n_in]),
            tuple(channels[n_in : n_in + n_out]),
            tuple(channels[n_in + n_out :]),
        )

    def _start_channels(self) -> None:
        start = self.core.start
        pumps, sinks = self.ends.pumps, self.ends.sinks
        pumps[STDIN] = Pump(self.link, STDIN, lambda: 0, close_fd=False)
        for ch in (STDOUT, STDERR):
            sinks[ch] = Sink(self.link, ch, functools.partial(int, ch), close_fd=False, on_broken=self._unread)
        for ch, _ in start.infifos:
            pumps[ch] = Pump(self.link, ch, functools.partial(os.open, self.locals[ch], os.O_RDONLY))
        for ch, _ in start.outfifos:
            sinks[ch] = Sink(self.link, ch, functools.partial(_open_out, self.locals[ch]), on_broken=self._unread)
        self.waited = list(sinks.values())
        for ch in pumps:
            self.core.add_channel(ch, receives=False, sends=True)
            log.log(DEBUG2, "channel %d: %s -> server", ch, self._local(ch))
        for ch in sinks:
            self.core.add_channel(ch, receives=True, sends=False)
            log.log(DEBUG2, "channel %d: server -> %s", ch, self._local(ch))
        for ch, remote in start.sockets:
            log.log(DEBUG2, "channel %d: connections to %s there come to %s", ch, remote, self.locals[ch])
        self.ends.start()

    def _unread(self, ch: int) -> None:
        """Our reader of ch went away (`plumb HOST yes | head -1`): as ssh's eow@openssh.com, the
        server closes what the command writes there, so the command gets SIGPIPE and ends as it
        would locally, its stderr and exit status still coming back."""
        log.log(DEBUG2, "channel %d: %s is closed: the server is told we read no more", ch, self._local(ch))
        with contextlib.suppress(FlowError, LocalProtocolError):
            self.link.eof(ch)

    def _local(self, ch: int) -> str:
        return self.locals[ch] if ch in self.locals else ("stdin", "stdout", "stderr")[ch]

    def _forget(self, ch: int) -> None:
        """A socket connection is over both ways: nothing of it is kept."""
        self.connections.discard(ch)
        self.core.remove_channel(ch)
        self.ends.forget(ch)

    def _open(self, ch: int, parent: int) -> None:
        """A connection to the remote end of a replicated socket: connect to the local one. At most
        MAX_CONNECTIONS at once (netplumbd's own default for the other direction): each costs a
        descriptor and two threads here, and a hostile server could ask for them without end."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if len(self.connections) >= MAX_CONNECTIONS:
                raise OSError(errno.EMFILE, f"{MAX_CONNECTIONS} connections open already")
            sock.connect(self.locals[parent])
        except OSError as e:
            log.warning("socket %s: %s", self.locals[parent], e.strerror)
            sock.close()
            self.ends.sinks[ch] = Sink(self.link, ch, _refuse, self._forget)  # drains what comes, writes nowhere
            self.link.eof(ch)
        else:
            self.connections.add(ch)
            self.ends.sinks[ch], self.ends.pumps[ch] = duplex(self.link, ch, sock, functools.partial(self._forget, ch))
        self.ends.start()


def _refuse() -> int:
    raise OSError("the local socket refused the connection")


def _open_out(path: str) -> int:
    """A local named pipe (opened when its reader comes) or a file, made if missing."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISFIFO(os.stat(path).st_mode):
            return os.open(path, os.O_WRONLY)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def say(text: str) -> None:
    """A message on stderr; its reader gone (SIGPIPE is ignored) costs nothing but the message, not
    the exit status."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


def sanitise_stdfd() -> None:
    """A closed stdin, stdout or stderr becomes /dev/null, as OpenSSH's sanitise_stdfd(): else the
    next descriptor opened (the flow's socket, a wakeup pipe) would take its number, and the stdin
    pump read our own connection or the command's output be written into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # a lower one was closed too and took this open: both get /dev/null
                os.dup2(null, fd)
                os.close(null)
    # Python saw them closed at its start and left these None (print(file=None) goes to stdout)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 -- for the life of the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 -- for the life of the process


def main(argv: list[str] | None = None) -> None:
    sanitise_stdfd()
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if args and args[0] in ("-V", "--version"):  # ssh -V
        print(version_text("plumb"))
        sys.exit(0)
    try:
        req = parse_args(args)
    except UsageError as e:
        say(f"plumb: {e}\n{USAGE}")
        sys.exit(FAILED)
    for level, name in ((DEBUG1, "debug1"), (DEBUG2, "debug2"), (DEBUG3, "debug3")):
        logging.addLevelName(level, name)
    level = logging.ERROR if req.quiet else (logging.WARNING, DEBUG1, DEBUG2, DEBUG3)[min(req.verbose, 3)]
    logging.basicConfig(level=level, format="plumb: %(levelname)s: %(message)s")
    show_visible()  # what the server says (its reasons, in errors) reaches the terminal as text only
    logging.addLevelName(logging.WARNING, "warning")
    try:
        code = Client(req).run()
    except Failure as e:  # its reason may be the server's words
        say(f"plumb: {visible(str(e))}")
        code = FAILED
    except KeyboardInterrupt:
        code = 130
    with contextlib.suppress(OSError):  # SIGPIPE is ignored (Python's default): a closed stdout is told to the server
        sys.stdout.flush()
    os._exit(code)  # threads may still wait on our stdin: do not wait for them


if __name__ == "__main__":
    main()
