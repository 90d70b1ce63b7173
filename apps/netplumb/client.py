"""plumb: run a command on a netplumbd by name, with stdin/stdout/stderr, named pipes and unix
sockets replicated over one encrypted session; exits with the remote command's status.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import select
import shlex
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from apps.netplumb.channels import Link, Pump, Sink, duplex
from apps.netplumb.connection import ClientConnection, Closed, Event, LocalProtocolError
from apps.netplumb.keys import HostKeyChanged, Identity, KeyFileError, KnownHosts, config_dir, fingerprint
from apps.netplumb.messages import Data, Eof, Exit, Open, Start, Started, Window
from apps.netplumb.recipe import RecipeError, parse_recipe
from apps.netplumb.session import SessionError
from apps.netplumb.wire import FIRST_CLIENT_CHANNEL, STDERR, STDIN, STDOUT
from flowlib import Flow, FlowDown, FlowError, flow_alloc, qos

log = logging.getLogger("plumb")

FAILED = 255  # our own failures, as ssh does: the remote command's statuses stay distinguishable
ALLOC_TIMEOUT = 10.0
ANSWER_TIMEOUT = 30.0  # for the handshake and START's answer (the server may take 15 s to start a recipe)
USAGE = ("usage: plumb HOST [-recipe=FILE] [-user=NAME] [-infifo=LOCAL[:REMOTE]] [-outfifo=LOCAL[:REMOTE]]\n"
         "             [-socket=LOCAL[:REMOTE]] [-export=NAME,...] [-key=FILE] [-v] [--] COMMAND [ARG...]")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
OPTIONS = ("recipe", "user", "infifo", "outfifo", "socket", "export", "key")


class UsageError(Exception):
    pass


class Failure(Exception):
    """Why plumb gives up; printed as one line."""


@dataclass
class Request:
    host: str
    argv: list[str] = field(default_factory=list)
    recipe: str | None = None
    user: str | None = None
    infifos: list[tuple[str, str]] = field(default_factory=list)
    outfifos: list[tuple[str, str]] = field(default_factory=list)
    sockets: list[tuple[str, str]] = field(default_factory=list)
    export: list[str] = field(default_factory=list)
    key: Path | None = None
    verbose: bool = False


def _paths(value: str, opt: str) -> tuple[str, str]:
    local, sep, remote = value.partition(":")
    remote = remote if sep else local
    if not local or not remote.startswith("/"):
        raise UsageError(f"-{opt}={value}: expected LOCAL[:REMOTE] with an absolute REMOTE path")
    return os.path.abspath(local), remote


def parse_args(args: list[str]) -> Request:
    if not args or args[0].startswith("-"):
        raise UsageError("the first argument is the HOST (a name netplumbd is registered as)")
    req = Request(args[0])
    i = 1
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg == "-v":
            req.verbose = True
            continue
        name, eq, value = arg[1:].partition("=")
        if name not in OPTIONS or not eq or not value:
            raise UsageError(f"unknown option {arg!r} (options: {', '.join('-' + o + '=' for o in OPTIONS)}, -v)")
        if name == "recipe":
            try:
                req.recipe = Path(value).read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError(f"-recipe={value}: {getattr(e, 'strerror', None) or e}") from None
            try:
                parse_recipe(req.recipe)  # fail here, with the line, rather than remotely
            except RecipeError as e:
                raise UsageError(f"{value}: {e}") from None
        elif name == "user":
            req.user = value
        elif name == "key":
            req.key = Path(value)
        elif name == "export":
            req.export += [n for n in value.replace(" ", ",").split(",") if n]
        else:
            getattr(req, name + "s").append(_paths(value, name))
    req.argv = args[i:]
    if len(req.argv) == 1 and any(c.isspace() for c in req.argv[0]):
        try:
            req.argv = shlex.split(req.argv[0])  # plumb host 'tar x -C /tmp/dst'
        except ValueError as e:
            raise UsageError(f"command: {e}") from None
    if not req.argv and req.recipe is None:
        raise UsageError("no command (and no -recipe=)")
    if req.argv and req.recipe is not None:
        raise UsageError("give either a command or -recipe=, not both")
    return req


class Client:
    """One plumb run: drive the connection core over a flow until EXIT, with the local ends of the
    channels in threads."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.locals: dict[int, str] = {}  # channel -> its local pipe, file or socket
        self.pumps: dict[int, Pump] = {}
        self.sinks: dict[int, Sink] = {}
        self.waited: list[Sink] = []
        self.status: int | None = None

    def _check_host(self, key: bytes) -> None:
        known = KnownHosts(config_dir() / "known_hosts")
        try:
            if known.check(self.req.host, key):
                print(f"plumb: pinned the key of {self.req.host!r} ({fingerprint(key)}) in {known.path}",
                      file=sys.stderr)
        except HostKeyChanged as e:
            raise SessionError(str(e)) from None
        except (KeyFileError, OSError) as e:
            raise SessionError(f"known hosts: {e}") from None

    def run(self) -> int:
        req = self.req
        try:
            identity = Identity.load(req.key or config_dir() / "id")
        except (KeyFileError, OSError) as e:
            raise Failure(str(e)) from None
        self.core = ClientConnection(identity, self._check_host, self._start_message(), time.monotonic(),
                                     ANSWER_TIMEOUT)
        try:
            flow = flow_alloc(req.host, qos=qos.data, timeout=ALLOC_TIMEOUT)
        except FlowError as e:
            raise Failure(f"cannot reach {req.host}: {e}") from None
        self.link = Link(flow, self.core)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wake_w)  # a signal any thread took wakes us to run its handler
        try:
            self.link.send(self.core.connect)
            return self._loop(flow, wake_r)
        except FlowDown:
            raise Failure(f"{req.host}: the connection ended before the command did") from None
        except FlowError as e:
            raise Failure(f"{req.host}: {e}") from None
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for fd in (wake_r, wake_w):
                os.close(fd)
            with contextlib.suppress(FlowError):
                flow.close()

    def _loop(self, flow: Flow, wake_r: int) -> int:
        poller = select.poll()
        poller.register(flow.fileno(), select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        while self.status is None:
            timer, now = self.core.get_timer(), time.monotonic()
            if timer is not None and timer <= now:
                events = self.core.handle_timer(now)
            else:
                ready = {fd for fd, _ in poller.poll(None if timer is None else (timer - now) * 1000)}
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 64)
                if flow.fileno() not in ready:
                    continue
                events = self.core.receive(flow.read(), time.monotonic())
            self.link.send()
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
            case Started(ok, message, status):
                if not ok:
                    print(f"plumb: {self.req.host}: {message}", file=sys.stderr)
                    return status
                self._forward_signals()
                self._start_channels()
            case Data(ch, data):
                self.sinks[ch].put(data)
            case Eof(ch):
                self.sinks[ch].finish()
            case Window(ch, n):
                pump = self.pumps.get(ch)
                if pump is not None:
                    pump.window.grant(n)
            case Open(ch, parent):
                self._open(ch, parent)
            case Exit("signal", sig):
                name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
                print(f"plumb: {self.req.host}: the command was killed by {name}", file=sys.stderr)
                self.status = 128 + sig
            case Exit(_, status):
                self.status = status
            case Closed(reason):
                raise Failure(f"{self.req.host}: {reason}")
        return None

    def _forward_signals(self) -> None:
        """Interrupts go to the remote command (as ssh does), which decides whether to end."""

        def forward(signum: int, _frame: object) -> None:
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
        return Start(tuple(req.argv), req.recipe, req.user, env, tuple(channels[:n_in]),
                     tuple(channels[n_in:n_in + n_out]), tuple(channels[n_in + n_out:]))

    def _start_channels(self) -> None:
        start = self.core.start
        self.pumps[STDIN] = Pump(self.link, STDIN, lambda: 0, _nothing, close_fd=False)
        for ch in (STDOUT, STDERR):
            self.sinks[ch] = Sink(self.link, ch, functools.partial(int, ch), _nothing, close_fd=False)
        for ch, _ in start.infifos:
            self.pumps[ch] = Pump(self.link, ch, functools.partial(os.open, self.locals[ch], os.O_RDONLY), _nothing)
        for ch, _ in start.outfifos:
            self.sinks[ch] = Sink(self.link, ch, functools.partial(_open_out, self.locals[ch]), _nothing)
        self.waited = list(self.sinks.values())
        for ch in self.pumps:
            self.core.add_channel(ch, receives=False, sends=True)
        for ch in self.sinks:
            self.core.add_channel(ch, receives=True, sends=False)
        for t in [*self.sinks.values(), *self.pumps.values()]:
            t.start()

    def _open(self, ch: int, parent: int) -> None:
        """A connection to the remote end of a replicated socket: connect to the local one."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.locals[parent])
        except OSError as e:
            log.warning("socket %s: %s", self.locals[parent], e.strerror)
            sock.close()
            self.sinks[ch] = Sink(self.link, ch, _refuse, _nothing)
            self.sinks[ch].start()
            self.link.eof(ch)
            return
        self.sinks[ch], self.pumps[ch] = duplex(self.link, ch, sock)
        self.sinks[ch].start()
        self.pumps[ch].start()


def _nothing(_ch: int) -> None:
    pass


def _refuse() -> int:
    raise OSError("the local socket refused the connection")


def _open_out(path: str) -> int:
    """A local named pipe (opened when its reader comes) or a file, made if missing."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISFIFO(os.stat(path).st_mode):
            return os.open(path, os.O_WRONLY)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    try:
        req = parse_args(args)
    except UsageError as e:
        print(f"plumb: {e}\n{USAGE}", file=sys.stderr)
        sys.exit(FAILED)
    logging.basicConfig(level=logging.DEBUG if req.verbose else logging.WARNING, format="plumb: %(message)s")
    with contextlib.suppress(ValueError):  # a closed reader of our stdout is not our error to report
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        code = Client(req).run()
    except Failure as e:
        print(f"plumb: {e}", file=sys.stderr)
        code = FAILED
    except KeyboardInterrupt:
        code = 130
    sys.stdout.flush()
    os._exit(code)  # threads may still wait on our stdin: do not wait for them


if __name__ == "__main__":
    main()
