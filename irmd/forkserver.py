"""IPCPs forked, not executed: a process forked from the IRMd before it serves holds the interpreter
and the code IPCPs share with it, and forks each IPCP from there (start-up ~10 ms instead of ~80).

The server is forked while the IRMd is one thread with no loop, no log handlers and no descriptors
but 0-2 open, so a child inherits nothing of the IRMd's state. A child gets what an executed IPCP
(`python -I`) got: a session of its own, cwd /, stdin /dev/null, the IRMd's log as stdout and
stderr, the environment the IRMd gives it, no other descriptor, and code only from the project and
the interpreter's own directories: an IRMd that loaded anything from elsewhere (an admin's
PYTHONPATH) gets no server. The server reaps its children and reports their exits; if it is lost,
the IRMd kills what it started and executes IPCPs from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from transports.unix import close_fds, recv_frame, send_frame, seqpacket_pair

log = logging.getLogger("irmd")
STOPS = (signal.SIGINT, signal.SIGTERM)
# The directory that holds the irmd package: ipcp is its sibling in the same distribution.
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def isolated_path() -> list[str] | None:
    """sys.path as `python -I` has it, the project first; None if the IRMd already runs code from
    elsewhere (a module outside the project and the interpreter's directories), which a fork would pass on."""
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


class ForkServerLost(Exception):
    """The fork server is gone or answered nonsense: start the IPCP another way."""


@dataclasses.dataclass(eq=False)
class Forked:
    """An IPCP the server forked, as the IRMd uses a child process: its pid, its exit status."""

    pid: int
    exited: asyncio.Future[int]

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)


class ForkServer:
    """The IRMd's end: start() forks the server; spawn() asks it for an IPCP."""

    def __init__(self, pid: int, ctl: socket.socket) -> None:
        self.pid = pid
        self._ctl = ctl
        self._lock: asyncio.Lock | None = None
        self._reply: asyncio.Future[dict[str, Any]] | None = None
        self._children: dict[int, Forked] = {}
        self._reading = False
        self.lost = False

    @classmethod
    def start(cls) -> ForkServer | None:
        """Fork the server; call it before the IRMd opens anything or starts a thread or a loop. None
        if the IRMd runs code from outside the project and the interpreter (isolated_path)."""
        path = isolated_path()
        if path is None:
            return None
        ours, theirs = seqpacket_pair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the server; coverage cannot follow it
            ours.close()
            sys.path[:] = path
            code = 1
            try:
                code = _serve(theirs)
            finally:
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        return cls(pid, ours)

    async def spawn(self, kind: str, name: str, sock: str, env: dict[str, str], out_fd: int | None) -> Forked:
        """An IPCP of type `kind` named `name` for the IRMd at `sock`, with environment `env`, writing to
        `out_fd` (None: where the IRMd's stdout and stderr went when it started)."""
        if self.lost:
            raise ForkServerLost("the fork server is gone")
        loop = asyncio.get_running_loop()
        if not self._reading:
            loop.add_reader(self._ctl.fileno(), self._readable)
            self._reading = True
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            self._reply = loop.create_future()
            try:
                request = json.dumps({"kind": kind, "name": name, "sock": sock, "env": env}).encode()
                send_frame(self._ctl, request, [out_fd] if out_fd is not None else [])
            except OSError as e:
                self._lose(f"cannot reach it: {e}")
            reply = await self._reply
        if not isinstance(pid := reply.get("pid"), int) or pid <= 0:
            raise ForkServerLost(f"it could not start the ipcp: {reply.get('error', reply)}")
        child = Forked(pid, loop.create_future())
        self._children[pid] = child
        return child

    def _readable(self) -> None:
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
            except ValueError:
                return self._lose("it sent what is not JSON")
            if "exit" in msg:
                child = self._children.pop(msg["exit"], None)
                if child is not None and not child.exited.done():
                    child.exited.set_result(int(msg.get("code", -1)))
            elif self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)
        return None

    def _lose(self, why: str) -> None:
        """Without its reaper, what it started cannot be watched: stop it, and say so."""
        if self.lost:
            return
        self.lost = True
        log.error("the IPCP fork server was lost (%s): stopping the IPCPs it started, executing new ones", why)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._ctl.fileno())
        for pid, child in self._children.items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not child.exited.done():
                child.exited.set_result(-signal.SIGKILL)
        self._children.clear()
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(ForkServerLost(why))
        self.close()

    def close(self) -> None:
        """The server ends with its socket; reap it (it is the IRMd's child)."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._ctl.fileno())
        self._ctl.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


# -- the server ------------------------------------------------------------------------------------


def _serve(ctl: socket.socket) -> int:  # pragma: no cover - runs in the forked server
    """Fork an IPCP per request, report every child's exit; end when the IRMd closes its end."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd hears of exits
    for sig in STOPS:  # a terminal's ^C, a service manager's SIGTERM: the IRMd's to act on; we end with it
        signal.signal(sig, signal.SIG_IGN)
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap(ctl)
        if ctl.fileno() not in ready:
            continue
        try:
            frame, fds = recv_frame(ctl)
        except OSError:
            return 1
        if not frame:
            return 0  # the IRMd is gone: its IPCPs notice by themselves
        try:
            send_frame(ctl, json.dumps(_fork(frame, fds, ctl)).encode())
        except OSError:
            return 1
        finally:
            close_fds(fds)


def _close_all_but_std() -> None:  # pragma: no cover - runs in a forked child
    """Every descriptor but 0-2 (few here: listed, not swept up to a limit the IRMd raised)."""
    for entry in os.listdir("/proc/self/fd"):
        if (fd := int(entry)) > 2:
            with contextlib.suppress(OSError):
                os.close(fd)


def _reap(ctl: socket.socket) -> None:  # pragma: no cover - runs in the forked server
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(OSError):  # the IRMd gone: the loop ends at its EOF
            send_frame(ctl, json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def _fork(frame: bytes, fds: list[int], ctl: socket.socket) -> dict[str, Any]:  # pragma: no cover
    try:
        from ipcp.__main__ import KINDS

        req = json.loads(frame)
        kind, name, sock, env = req["kind"], req["name"], req["sock"], req["env"]
        if kind not in KINDS or not isinstance(name, str) or not isinstance(sock, str) or len(fds) > 1:
            return {"error": "a malformed request"}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            return {"error": "a malformed environment"}
        importlib.import_module(KINDS[kind][0])  # once here, not in every child
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    pid = os.fork()
    if pid:
        return {"pid": pid}
    _child([kind, name, sock], env, fds[0] if fds else None, ctl)
    return {}  # not reached


def _child(argv: list[str], env: dict[str, str], out: int | None, ctl: socket.socket) -> None:  # pragma: no cover
    """Become the IPCP an executed one would be; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, *STOPS):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.chdir("/")
        with open("/proc/self/comm", "w") as comm:  # as C's IPCPs are named in ps, top and pgrep
            comm.write(f"ipcpd-{argv[0]}"[:15])
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
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
