"""IPCPs forked, not executed: a process forked from the IRMd before it serves holds the interpreter
and the code IPCPs share with it, and forks each IPCP from there (start-up ~10 ms instead of ~80).

The server is forked while the IRMd is one thread with no loop and no log handlers, so a child
inherits nothing of the IRMd's state. A child gets what an executed IPCP (`python -I`) got: a
session of its own, cwd /, stdin /dev/null, the IRMd's log as stdout and stderr, the environment
the IRMd gives it, no other descriptor, and code only from the project and the interpreter's own
directories. An IRMd that loaded code from elsewhere (an admin's PYTHONPATH) or runs with settings
`python -I` would not pass on (a fixed hash seed, -O, dev mode, warning options) gets no server.
The server reaps its children, reports their start and exit, and signals them only while they
are its unreaped children (no pid reuse); a fork that fails fails that IPCP alone. If the server
is lost or stops answering, the IRMd stops what it forked and executes IPCPs from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

from irmd.identity import proc_start
from proto.login import login_umask
from transports.unix import close_fds, readable, recv_frame, send_frame, seqpacket_pair

log = logging.getLogger("irmd")
STOPS = (signal.SIGINT, signal.SIGTERM)
REPLY_TIMEOUT = 10.0  # a fork and a module import: a server slower than this is hung
CLOSE_GRACE = 1.0  # after the IRMd closes its end, the server's time to exit before SIGKILL
# The directory that holds the irmd package: ipcp is its sibling in the same distribution.
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class ForkError(Exception):
    """The fork server could not start the IPCP (it is lost, hung, or the fork failed): execute it."""


def isolated_path() -> list[str] | None:
    """sys.path as `python -I` has it, the project first; None if a fork would hand an IPCP what
    `python -I` would not: a module loaded from outside the project and the interpreter's
    directories, or interpreter settings from the environment or the command line."""
    flags = sys.flags
    fixed_hash = not flags.ignore_environment and os.environ.get("PYTHONHASHSEED", "random") != "random"
    if fixed_hash or flags.optimize or flags.dev_mode or flags.verbose or flags.inspect or sys.warnoptions:
        return None
    roots = {os.path.realpath(p) for p in sysconfig.get_paths().values()} | {os.path.realpath(PROJECT_ROOT)}
    user_site = os.path.realpath(sysconfig.get_path("purelib", f"{os.name}_user"))

    def trusted(path: str) -> bool:
        real = os.path.realpath(path)
        inside = any(real == root or real.startswith(root + os.sep) for root in roots)
        return inside and not (real == user_site or real.startswith(user_site + os.sep))

    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if name != "__main__" and where and not trusted(where):
            return None
    return [PROJECT_ROOT, *(p for p in sys.path if p and p != PROJECT_ROOT and trusted(p))]


@dataclasses.dataclass(eq=False)
class Forked:
    """An IPCP the server forked, as the IRMd uses a child process: pid, start time, exit status."""

    pid: int
    start: int  # /proc/PID/stat's start time, read by its parent before it could be reaped
    exited: asyncio.Future[int]
    server: ForkServer

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    def send_signal(self, sig: int) -> None:
        """Through its parent, which signals it only while it has not reaped it."""
        if self.returncode is None:
            self.server.signal(self, sig)


class ForkServer:
    """The IRMd's end: start() forks the server; spawn() asks it for an IPCP."""

    def __init__(self, pid: int, ctl: socket.socket) -> None:
        self.pid = pid
        self._ctl = ctl
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Forked]] = {}
        self._children: dict[int, Forked] = {}
        self._reading = False
        self.lost = False

    @classmethod
    def start(cls) -> ForkServer | None:
        """Fork the server; call it before the IRMd starts a thread or a loop or sets up logging. None
        if a fork would pass on what an executed IPCP would not have (isolated_path)."""
        path = isolated_path()
        if path is None:
            return None
        ours, theirs = seqpacket_pair(rights=True)  # it hands the IRMd its IPCPs' descriptors
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the IRMd was started with that descriptor closed
                stream.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the server; coverage cannot follow it
            ours.close()
            sys.path[:] = path
            code = 1
            try:
                code = _serve(theirs)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(pid, ours)

    async def spawn(self, kind: str, name: str, sock: str, env: dict[str, str], out_fd: int | None) -> Forked:
        """An IPCP of type `kind` named `name` for the IRMd at `sock`, with environment `env`, writing to
        `out_fd` (None: where the IRMd's stdout and stderr went when it started)."""
        if self.lost:
            raise ForkError("the fork server is gone")
        loop = asyncio.get_running_loop()
        if not self._reading:
            loop.add_reader(self._ctl.fileno(), self._readable)
            self._reading = True
        seq = next(self._seq)
        self._pending[seq] = reply = loop.create_future()
        try:
            request = {"seq": seq, "kind": kind, "name": name, "sock": sock, "env": env}
            send_frame(self._ctl, json.dumps(request).encode(), [out_fd] if out_fd is not None else [])
            # A caller gone meanwhile (its client hung up) leaves the reply to _readable, which stops the child.
            return await asyncio.wait_for(asyncio.shield(reply), REPLY_TIMEOUT)
        except TimeoutError:  # (an OSError too: first)
            self._lose(f"no answer in {REPLY_TIMEOUT:g} s")
            raise ForkError("the fork server did not answer") from None
        except OSError as e:
            self._lose(f"cannot reach it: {e}")
            raise ForkError(f"the fork server is gone: {e}") from e
        finally:
            self._pending.pop(seq, None)

    def signal(self, child: Forked, sig: int) -> None:
        if self.lost:
            return
        try:
            send_frame(self._ctl, json.dumps({"signal": child.pid, "sig": int(sig)}).encode())
        except OSError as e:
            self._lose(f"cannot reach it: {e}")

    def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.lost:
            try:
                frame, fds = recv_frame(self._ctl)
            except BlockingIOError:
                return
            except OSError as e:
                return self._lose(f"its socket failed: {e}")
            close_fds(fds)
            if not frame:
                return self._lose("it exited")
            try:
                msg = json.loads(frame)
                if "exit" in msg:
                    child = self._children.pop(int(msg["exit"]), None)
                    if child is not None and not child.exited.done():
                        child.exited.set_result(int(msg["code"]))
                    continue
                reply = self._pending.pop(int(msg["seq"]), None)
                if "pid" not in msg:
                    if reply is not None and not reply.done():
                        reply.set_exception(ForkError(f"the fork server could not start it: {msg.get('error')}"))
                    continue
                child = Forked(int(msg["pid"]), int(msg["start"]), loop.create_future(), self)
            except (ValueError, TypeError, KeyError):
                return self._lose("it sent what is not its protocol")
            self._children[child.pid] = child  # before its exit report can be read
            if reply is None or reply.done():
                child.send_signal(signal.SIGKILL)  # its request's caller is gone: nobody would watch it
            else:
                reply.set_result(child)
        return None

    def _lose(self, why: str) -> None:
        """Without its reaper, what it forked cannot be watched or safely signalled: stop it, and say so."""
        if self.lost:
            return
        self.lost = True
        log.error("the IPCP fork server was lost (%s): stopping the IPCPs it started, executing new ones", why)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # hung or not, it is done: its children go to init
        for pid, child in self._children.items():
            if proc_start(pid) == child.start:  # still that process, not a later one with its pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not child.exited.done():
                child.exited.set_result(-signal.SIGKILL)
        self._children.clear()
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(ForkError(why))
                reply.exception()  # whoever still waits gets it; nobody else need hear of it
        self.close()

    def close(self) -> None:
        """The server ends with its socket; reap it (it is the IRMd's child), killing it if it lingers."""
        if self._reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._reading = False
        self._ctl.close()
        deadline = time.monotonic() + CLOSE_GRACE
        while True:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                return
            time.sleep(0.01)


# -- the server ------------------------------------------------------------------------------------


def _serve(ctl: socket.socket) -> int:  # pragma: no cover - runs in the forked server
    """Fork an IPCP per request, signal and reap its children, report their exits; end when the
    IRMd closes its end. Only a failing socket ends it early: a bad request or fork fails alone."""
    from ipcp.__main__ import name_process

    name_process("irmd-forkserver", "irmd-forkserver (forks the IRMd's IPCPs)")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of exits
    for sig in STOPS:  # a terminal's ^C, a service manager's SIGTERM: the IRMd's to act on; we end with it
        signal.signal(sig, signal.SIG_IGN)
    live: set[int] = set()  # forked, not yet reaped: the only pids we signal
    while True:
        ready = readable([ctl.fileno(), wake_r], None)
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap(ctl, live)
        if ctl.fileno() not in ready:
            continue
        try:
            frame, fds = recv_frame(ctl)
        except OSError:
            return 1
        if not frame:
            return 0  # the IRMd is gone: its IPCPs notice by themselves
        try:
            reply = _handle(frame, fds, ctl, live)
        except Exception as e:  # a request we could not serve fails alone
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        finally:
            close_fds(fds)
        if reply is not None:
            try:
                send_frame(ctl, json.dumps(reply).encode())
            except OSError:
                return 1


def _reap(ctl: socket.socket, live: set[int]) -> None:  # pragma: no cover - runs in the forked server
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        live.discard(pid)
        with contextlib.suppress(OSError):  # the IRMd gone: the loop ends at its EOF
            send_frame(ctl, json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _handle(
    frame: bytes, fds: list[int], ctl: socket.socket, live: set[int]
) -> dict[str, Any] | None:  # pragma: no cover
    from ipcp.__main__ import KINDS

    req = json.loads(frame)
    if "signal" in req:
        if req["signal"] in live:  # ours and not reaped: its pid is still its own
            os.kill(int(req["signal"]), int(req["sig"]))
        return None
    seq, kind, name, sock, env = req["seq"], req["kind"], req["name"], req["sock"], req["env"]
    if kind not in KINDS or not isinstance(name, str) or not isinstance(sock, str) or len(fds) > 1:
        return {"seq": seq, "error": "a malformed request"}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        return {"seq": seq, "error": "a malformed environment"}
    importlib.import_module(KINDS[kind][0])  # once here, not in every child
    try:
        pid = os.fork()
    except OSError as e:
        return {"seq": seq, "error": f"fork: {e.strerror}"}
    if pid == 0:
        _child([kind, name, sock], env, fds[0] if fds else None, ctl)
    live.add(pid)
    return {"seq": seq, "pid": pid, "start": proc_start(pid)}  # unreaped: its stat is still its own


def _child(argv: list[str], env: dict[str, str], out: int | None, ctl: socket.socket) -> None:  # pragma: no cover
    """Become the IPCP an executed one would be; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, *STOPS):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.chdir("/")
        os.umask(login_umask())  # as an executed IPCP's: a login's, not the IRMd's
        if out is not None:
            os.dup2(out, 1)
            os.dup2(out, 2)
        ctl.detach()  # the socket object must not close a number the IPCP reuses
        _close_all_but_std()
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["ipcp", *argv]
        from ipcp.__main__ import main

        code = main(argv)
    except SystemExit as e:  # as the interpreter exits on it
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        os._exit(code)


def _close_all_but_std() -> None:  # pragma: no cover - runs in a forked child
    """Every descriptor but 0-2 (few here: listed, not swept up to a limit the IRMd raised)."""
    for entry in os.listdir("/proc/self/fd"):
        if (fd := int(entry)) > 2:
            with contextlib.suppress(OSError):
                os.close(fd)
