"""plumb: run a command on a netplumbd by name, with stdin/stdout/stderr, named pipes and unix
sockets replicated over one encrypted session; exits with the remote command's status.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from apps.netplumb import wire
from apps.netplumb.channels import Link, Pump, Sink
from apps.netplumb.keys import HostKeyChanged, Identity, KeyFileError, KnownHosts, config_dir, fingerprint
from apps.netplumb.recipe import RecipeError, parse_recipe
from apps.netplumb.session import ClientSession, Established, Message, PeerError, SessionError
from apps.netplumb.wire import STDERR, STDIN, STDOUT, Fields, WireError
from flowlib import Flow, FlowDown, FlowError, FlowTimeout, flow_alloc, qos

log = logging.getLogger("plumb")

FAILED = 255  # our own failures, as ssh does: the remote command's statuses stay distinguishable
ALLOC_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0
SIGNAL_POLL = 0.1  # seconds between checks for signals while waiting for the server
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
    """One plumb run: connect, authenticate, START, then move data until EXIT."""

    def __init__(self, req: Request) -> None:
        self.req = req
        self.local_sockets: dict[int, str] = {}
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
        session = ClientSession(identity, self._check_host)
        try:
            flow = flow_alloc(req.host, qos=qos.data, timeout=ALLOC_TIMEOUT)
        except FlowError as e:
            raise Failure(f"cannot reach {req.host}: {e}") from None
        self.link = link = Link(flow, session)
        try:
            flow.set_timeout(HANDSHAKE_TIMEOUT)
            session.start()
            link.flush()
            while not any(isinstance(ev, Established) for ev in self._events(flow.read())):
                link.flush()
            link.flush()
            link.send(wire.START, self._start_fields())
            reply = self._next(flow.read)
            if reply.type != wire.START:
                raise Failure(f"{req.host}: unexpected answer (packet type {reply.type}) to START")
            if reply.fields.get("ok") != "1":
                print(f"plumb: {req.host}: {reply.fields.get('message', 'refused')}", file=sys.stderr)
                return reply.fields.int("status", 1, 255) if reply.fields.get("status") else FAILED
            # Short read timeouts: a signal that another thread took is handled at the next wake-up.
            flow.set_timeout(SIGNAL_POLL)
            self._forward_signals()
            self._start_channels()
            while self.status is None:
                self._dispatch(self._next(lambda: _read_waiting(flow)))
            for sink in self.waited:
                sink.join()
            return self.status
        except SessionError as e:
            raise Failure(f"{req.host}: {e}") from None
        except WireError as e:
            with contextlib.suppress(FlowError, SessionError):
                link.send_error(f"protocol error: {e}")
            raise Failure(f"{req.host}: protocol error: {e}") from None
        except FlowDown:
            raise Failure(f"{req.host}: the connection ended before the command did") from None
        except FlowError as e:
            raise Failure(f"{req.host}: {e}") from None
        finally:
            with contextlib.suppress(FlowError):
                flow.close()

    def _forward_signals(self) -> None:
        """Interrupts go to the remote command (as ssh does), which decides whether to end."""

        def forward(signum: int, _frame: object) -> None:
            with contextlib.suppress(FlowError, SessionError):
                self.link.send(wire.SIGNAL, Fields.of(sig=signal.Signals(signum).name[3:]))

        for sig in FORWARDED:
            signal.signal(sig, forward)

    def _events(self, data: bytes) -> list[object]:
        events: list[object] = []
        for ev in self.link.session.receive(data):
            if isinstance(ev, PeerError):
                raise Failure(f"{self.req.host}: {ev.message}")
            events.append(ev)
        return events

    def _next(self, read: Callable[[], bytes]) -> Message:
        while True:
            for ev in self._events(read()):
                if isinstance(ev, Message):
                    return ev

    def _start_fields(self) -> Fields:
        req = self.req
        f = Fields()
        for arg in req.argv:
            f.add("arg", arg)
        if req.recipe is not None:
            f.add("recipe", req.recipe)
        if req.user:
            f.add("user", req.user)
        for name in req.export:
            if name in os.environ:
                f.add("env", f"{name}={os.environ[name]}")
        ch = 3
        for kind, items in (("infifo", req.infifos), ("outfifo", req.outfifos), ("socket", req.sockets)):
            for local, remote in items:
                f.add(kind, f"{ch} {remote}")
                if kind == "infifo":
                    self.pumps[ch] = Pump(self.link, ch, functools.partial(os.open, local, os.O_RDONLY),
                                         _nothing)
                elif kind == "outfifo":
                    sink = Sink(self.link, ch, functools.partial(_open_out, local), _nothing)
                    self.sinks[ch] = sink
                    self.waited.append(sink)
                else:
                    self.local_sockets[ch] = local
                ch += 1
        return f

    def _start_channels(self) -> None:
        self.pumps[STDIN] = Pump(self.link, STDIN, lambda: 0, _nothing, close_fd=False)
        for ch in (STDOUT, STDERR):
            sink = Sink(self.link, ch, functools.partial(int, ch), _nothing, close_fd=False)
            self.sinks[ch] = sink
            self.waited.append(sink)
        for t in [*self.sinks.values(), *self.pumps.values()]:
            t.start()

    def _dispatch(self, msg: Message) -> None:
        f = msg.fields
        if msg.type == wire.DATA:
            self._sink(f).put(f.bin("data"))
        elif msg.type == wire.EOF:
            self._sink(f).finish()
        elif msg.type == wire.WINDOW:
            pump = self.pumps.get(f.int("ch"))
            if pump is not None:
                pump.window.grant(f.int("n", 1, 1 << 40))
        elif msg.type == wire.EXIT:
            if f.get("signal") is not None:
                sig = f.int("signal", 1, 255)
                name = signal.Signals(sig).name if sig in signal.Signals.__members__.values() else str(sig)
                print(f"plumb: {self.req.host}: the command was killed by {name}", file=sys.stderr)
                self.status = 128 + sig
            else:
                self.status = f.int("status", 0, 255)
        elif msg.type == wire.OPEN:
            self._open(f.int("ch"), f.int("parent"))
        else:
            raise WireError(f"unexpected packet type {msg.type}")

    def _sink(self, f: Fields) -> Sink:
        sink = self.sinks.get(f.int("ch"))
        if sink is None:
            raise WireError(f"data for channel {f.get('ch')}, which takes none")
        return sink

    def _open(self, ch: int, parent: int) -> None:
        """A connection to the remote end of a replicated socket: connect to the local one."""
        path = self.local_sockets.get(parent)
        if path is None or ch in self.sinks:
            raise WireError(f"OPEN of channel {ch} on unknown socket {parent}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            log.warning("socket %s: %s", path, e.strerror)
            sock.close()
            self.sinks[ch] = Sink(self.link, ch, _refuse, _nothing)
            self.sinks[ch].start()
            self.link.send(wire.EOF, Fields.of(ch=ch))
            return
        fd = sock.detach()
        users = [2]
        lock = threading.Lock()

        def release(_ch: int) -> None:
            with lock:
                users[0] -= 1
                if users[0] == 0:
                    os.close(fd)

        self.sinks[ch] = Sink(self.link, ch, lambda: fd, release, close_fd=False,
                              on_eof=lambda f: socket.socket(fileno=os.dup(f)).shutdown(socket.SHUT_WR))
        self.pumps[ch] = Pump(self.link, ch, lambda: fd, release, close_fd=False)
        self.sinks[ch].start()
        self.pumps[ch].start()


def _read_waiting(flow: Flow) -> bytes:
    while True:
        try:
            return flow.read()
        except FlowTimeout:
            continue


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
