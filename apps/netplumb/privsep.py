"""The privilege boundary of a session: netplumbd starts a runner process and hands it the plan; the
runner becomes the target user at once, then makes the pipes and sockets, opens redirections and starts
the job with that user's rights only, and passes back file descriptors and the exit status.

The messages both ways are declared once here. What comes back from the runner is parsed as hostile
(it runs as the user, who may tamper with it): bounded, typed, with exactly the fds each message carries.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the runner imports this module: it stays light (no crypto, no policy)
    from apps.netplumb.policy import Plan

log = logging.getLogger("netplumbd")

MAX_MESSAGE = 4096
WORKDIR = b"workdir"  # netplumbd -> runner, before the plan: the recipe directory it works in (one fd)
MAX_FDS = 3 + 64  # stdio and one listener per socket
CODE_ROOT = str(Path(__file__).resolve().parents[2])  # where `apps` is: the runner imports the same code
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); from apps.netplumb.runner import main; main()"
NOFILE_VAR = "NETPLUMB_NOFILE"  # the descriptor limit jobs get: netplumbd's before it raised its own
job_nofile: int | None = None  # set by netplumbd once it raised its own limit (server.fit_fds)


class RunnerError(Exception):
    """The runner broke the protocol, or is gone."""


class JobNotStarted(Exception):
    """The job did not start; the message and status are for the client."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- runner -> netplumbd -------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    """The job runs. fds: our ends of its stdin, stdout, stderr, then a listener per socket channel."""

    sockets: tuple[int, ...]


@dataclass(frozen=True)
class FifoOpened:
    """A session pipe is open at the runner's end (its user opened the other). fds: the pipe."""

    ch: int


@dataclass(frozen=True)
class NotStarted:
    """The job could not start (a pipe, a redirection, the program): why, and the status to report."""

    message: str
    status: int


@dataclass(frozen=True)
class Ended:
    """The job ended: ("status", n) or ("signal", n)."""

    kind: str
    value: int


# -- netplumbd -> runner -------------------------------------------------------------------------


@dataclass(frozen=True)
class Deliver:
    """A signal for the job (the client's SIGNAL)."""

    sig: int


@dataclass(frozen=True)
class Stop:
    """End the job: SIGTERM, then SIGKILL after the grace time; then the runner exits."""


FromRunner = Started | FifoOpened | NotStarted | Ended
ToRunner = Deliver | Stop


def encode(msg: FromRunner | ToRunner) -> bytes:
    match msg:
        case Started(sockets):
            body: dict[str, Any] = {"started": list(sockets)}
        case FifoOpened(ch):
            body = {"fifo": ch}
        case NotStarted(message, status):
            body = {"refused": message[:1000], "status": status}
        case Ended(kind, value):
            body = {"exit": kind, "value": value}
        case Deliver(sig):
            body = {"signal": sig}
        case Stop():
            body = {"stop": True}
    return json.dumps(body).encode()


def _int(v: object, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise RunnerError(f"bad number {v!r}")
    return v


def decode_from_runner(data: bytes, nfds: int, plan: Plan) -> FromRunner:
    """One message of the runner, checked against the plan: known shape, bounded values, the right fds."""
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: arrays nested ~1000 deep fit in MAX_MESSAGE
        raise RunnerError("a message that is not JSON") from None
    if not isinstance(body, dict):
        raise RunnerError("a message that is not an object")
    keys = frozenset(body)
    msg: FromRunner
    fds = 0
    if keys == {"started"}:
        socks = body["started"]
        if not isinstance(socks, list) or [_int(c, 0, 1 << 16) for c in socks] != [c for c, _ in plan.sockets]:
            raise RunnerError("started: the sockets are not the plan's")
        msg, fds = Started(tuple(socks)), 3 + len(socks)
    elif keys == {"fifo"}:
        ch = _int(body["fifo"], 0, 1 << 16)
        if ch not in {c for c, _ in (*plan.infifos, *plan.outfifos)}:
            raise RunnerError(f"fifo: channel {ch} is not one of the plan's pipes")
        msg, fds = FifoOpened(ch), 1
    elif keys == {"refused", "status"}:
        if not isinstance(body["refused"], str):
            raise RunnerError("refused: no message")
        msg = NotStarted(body["refused"][:1000], _int(body["status"], 1, 255))
    elif keys == {"exit", "value"} and body["exit"] in ("status", "signal"):
        msg = Ended(body["exit"], _int(body["value"], 0, 255))
    else:
        raise RunnerError(f"an unknown message {sorted(keys)[:4]}")
    if nfds != fds:
        raise RunnerError(f"{type(msg).__name__} with {nfds} file descriptors, not {fds}")
    return msg


def decode_to_runner(data: bytes) -> ToRunner:
    body = json.loads(data)
    if body.get("stop"):
        return Stop()
    return Deliver(int(body["signal"]))


def send(sock: socket.socket, msg: FromRunner | ToRunner, fds: list[int] | tuple[int, ...] = ()) -> None:
    socket.send_fds(sock, [encode(msg)], list(fds)) if fds else sock.send(encode(msg))


def receive(sock: socket.socket, max_fds: int) -> tuple[bytes, list[int]]:
    """One message and its fds; b"" when the other end is gone. Truncated ones are refused."""
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_LEN(max_fds * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    got = list(fds)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close(got)
        raise RunnerError("a message larger than the protocol allows")
    return data, got


# -- the plan, netplumbd -> runner (the runner trusts it) -------------------------------------


def plan_to_json(plan: Plan, workdir: bool, open_timeout: float, kill_grace: float) -> bytes:
    a = plan.account
    return json.dumps(
        {
            "uid": a.uid,
            "gid": a.gid,
            "groups": a.groups,
            "steps": [[list(s.argv), s.exe, s.real] for s in plan.steps],
            "recipe": plan.recipe,
            "env": dict(plan.env),
            "cwd": plan.cwd,
            "workdir": workdir,
            "infifos": plan.infifos,
            "outfifos": plan.outfifos,
            "sockets": plan.sockets,
            "open_timeout": open_timeout,
            "kill_grace": kill_grace,
        }
    ).encode()


# -- netplumbd's side -------------------------------------------------------------------------


# -- what is left of a session once its runner is gone -------------------------------------------

SESSION_SWEEPS = 50  # rounds of SIGKILL for processes forked while the previous round was sent


def _session_of(pid: int) -> int | None:
    """The session id of the live process `pid`; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == b"Z" else int(fields[3])


def session_members(sid: int) -> list[int]:
    """The live processes of session `sid` (the runner's: the runner and its job)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _session_of(int(name)) == sid]


def _signal_member(pid: int, sid: int, sig: int) -> None:
    """Signal `pid` if it is still of session `sid`: the check is made through a pidfd opened first,
    so a pid given to another process meanwhile is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if _session_of(pid) == sid:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


def end_session(sid: int, grace: float) -> int:
    """End every process left in session `sid`: SIGHUP (and SIGCONT, for a stopped one), as sshd's
    session gets its hangup; SIGKILL to what is left after `grace` seconds. How many there were.

    Exact only while the session leader, the runner, is not reaped: until then no process can take
    its pid, hence that session id; nor can a process join a session it is not in (setpgid stays in
    the caller's session). A process that made a session of its own (setsid) has left the job, as it
    leaves an ssh session; a restricted key's programs have no such way out to offer."""
    members = session_members(sid)
    if not members:
        return 0
    for sig in (signal.SIGHUP, signal.SIGCONT):
        for pid in members:
            _signal_member(pid, sid, sig)
    deadline = time.monotonic() + grace
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for _ in range(SESSION_SWEEPS):
        left = session_members(sid)
        if not left:
            break
        for pid in left:
            _signal_member(pid, sid, signal.SIGKILL)
        time.sleep(0.01)
    else:
        log.warning("session %d: processes left after %d rounds of SIGKILL: %s", sid, SESSION_SWEEPS, left)
    return len(members)


def _spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A runner process, started and waiting for its plan, and our end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Isolated (-I: no PYTHON* variables), but with our bytecode settings, which -I would drop.
    cache = ["-B"] if sys.flags.dont_write_bytecode else []
    cache += ["-X", f"pycache_prefix={sys.pycache_prefix}"] if sys.pycache_prefix else []
    try:  # as us: the interpreter may be where the user cannot reach; it drops to the user first
        proc = subprocess.Popen(
            [sys.executable, "-I", *cache, "-c", BOOT, CODE_ROOT, str(theirs.fileno())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=[theirs.fileno()],
            cwd="/",
            env={"PATH": os.defpath, **({NOFILE_VAR: str(job_nofile)} if job_nofile is not None else {})},
            start_new_session=True,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


class Spare:
    """One runner started ahead, so that a session does not wait for an interpreter to start. The
    next one is started once the session's job has (refill_soon), not beside it."""

    _lock = threading.Lock()
    _ready: tuple[subprocess.Popen[bytes], socket.socket] | None = None

    @classmethod
    def take(cls) -> tuple[subprocess.Popen[bytes], socket.socket]:
        with cls._lock:
            spare, cls._ready = cls._ready, None
        if spare is None or spare[0].poll() is not None:
            spare = _spawn()
        return spare

    @classmethod
    def refill_soon(cls) -> None:
        threading.Thread(target=cls.refill, daemon=True, name="spare-runner").start()

    @classmethod
    def refill(cls) -> None:
        with contextlib.suppress(OSError):
            spare = _spawn()
            with cls._lock:
                old, cls._ready = cls._ready, spare
            if old is not None:
                cls._drop(old)

    @classmethod
    def discard(cls) -> None:
        with cls._lock:
            old, cls._ready = cls._ready, None
        if old is not None:
            cls._drop(old)

    @staticmethod
    def _drop(spare: tuple[subprocess.Popen[bytes], socket.socket]) -> None:
        proc, sock = spare
        sock.close()
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


class Runner:
    """One session's runner, seen from netplumbd: what it started, the pipes it opened, how it ended."""

    def __init__(self, plan: Plan, workdir_fd: int | None, open_timeout: float, kill_grace: float) -> None:
        self.plan = plan
        self.kill_grace = kill_grace
        self.started: Future[tuple[Started, list[int]]] = Future()
        self.fifos: dict[int, Future[int]] = {ch: Future() for ch, _ in (*plan.infifos, *plan.outfifos)}
        self.ended: Future[Ended] = Future()
        self.gone = threading.Event()  # the runner has exited, what it left is ended, and it is reaped
        self._dropping = False  # signals are being dropped (logged once)
        self._lock = threading.Lock()  # _signal() and the reaping: no signal once its pid is given back
        self.proc, self.sock = Spare.take()
        assert self.proc.stdin is not None
        try:
            if workdir_fd is not None:
                socket.send_fds(self.sock, [WORKDIR], [workdir_fd])
            with self.proc.stdin:
                self.proc.stdin.write(plan_to_json(plan, workdir_fd is not None, open_timeout, kill_grace))
        except OSError:
            pass  # it died first: its end of the socket says so
        threading.Thread(target=self._read, daemon=True, name=f"runner-{self.proc.pid}").start()
        threading.Thread(target=self._watch, daemon=True, name=f"runner-{self.proc.pid}-exit").start()

    def _watch(self) -> None:
        """The one place the runner is reaped: once it has exited (by its own end, or killed by its
        user, the OOM killer or us), whatever it left of the job in its session is ended first, while
        its pid, which is that session's id, is still held (unreaped)."""
        pid = self.proc.pid
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        left = end_session(pid, self.kill_grace)
        if left:
            log.info("session runner %d ended; %d process(es) of its job were left: ended them", pid, left)
        with self._lock:
            self.proc.wait()
        self.gone.set()

    def _signal(self, sig: int) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self.proc.returncode is None:
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the runner and to every process of its job, at once (the runner's end would see
        to the job too, after the grace time)."""
        with self._lock:
            if self.proc.returncode is None:
                for pid in session_members(self.proc.pid):
                    _signal_member(pid, self.proc.pid, signal.SIGKILL)

    def _read(self) -> None:
        try:
            while True:
                try:
                    data, fds = receive(self.sock, MAX_FDS)
                except OSError as e:
                    raise RunnerError(str(e)) from None
                if not data:
                    raise RunnerError("the runner went away")
                try:
                    msg = decode_from_runner(data, len(fds), self.plan)
                    self._take(msg, fds)
                except RunnerError:
                    _close(fds)
                    raise
                if isinstance(msg, Ended | NotStarted):
                    return
        except RunnerError as e:
            self._broken(e)
        finally:
            self._settle()

    def _take(self, msg: FromRunner, fds: list[int]) -> None:
        match msg:
            case Started():
                if self.started.done():
                    raise RunnerError("started twice")
                self.started.set_result((msg, fds))
                Spare.refill_soon()
            case FifoOpened(ch):
                if self.fifos[ch].done():
                    raise RunnerError(f"pipe {ch} opened twice")
                self.fifos[ch].set_result(fds[0])
            case NotStarted(message, status):
                if self.started.done():
                    raise RunnerError("refused after it started")
                self.started.set_exception(JobNotStarted(message, status))
                Spare.refill_soon()
            case Ended():
                if not self.started.done():
                    raise RunnerError("ended before it started")
                self.ended.set_result(msg)

    def _broken(self, e: RunnerError) -> None:
        if not self.ended.done():
            log.warning("session runner %d: %s", self.proc.pid, e)
        self.kill()

    def _settle(self) -> None:
        """Whatever the runner did not deliver, it never will."""
        gone = OSError("the runner ended without opening it")
        for fut in self.fifos.values():
            if not fut.done():
                fut.set_exception(gone)
        if not self.started.done():
            self.started.set_exception(JobNotStarted("the session runner failed to start the command", 126))
            Spare.refill_soon()
        if not self.ended.done():
            self.gone.wait()
            code = self.proc.returncode
            self.ended.set_result(Ended("signal", -code) if code < 0 else Ended("status", code or 255))

    # Never blocking on the runner: it runs as the user, who may stop it (SIGSTOP) or keep it busy, and
    # the thread that asks is the session's reader, or its teardown, which frees the session's slots.

    def deliver(self, sig: int) -> None:
        """Pass the client's signal on, or drop it if the runner is not taking messages."""
        try:
            self.sock.send(encode(Deliver(sig)), socket.MSG_DONTWAIT)
        except BlockingIOError:
            if not self._dropping:
                log.info("session runner %d takes no signals: dropping them", self.proc.pid)
            self._dropping = True
        except OSError:
            pass

    def stop(self) -> None:
        """End the job: Stop, or at least the end of our messages (which the runner reads as Stop), and
        SIGCONT in case its user stopped it; reap() kills a runner that does not end."""
        with contextlib.suppress(OSError):
            self.sock.send(encode(Stop()), socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self._signal(signal.SIGCONT)  # not once reaped: no other process gets it

    def reap(self, timeout: float) -> None:
        """Wait for the runner to exit and what it left to end; kill them if they do not (the runner
        runs as the user: it may be stuck)."""
        if not self.gone.wait(timeout):
            self.kill()
            self.gone.wait()
        self.sock.close()


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
