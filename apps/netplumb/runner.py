"""The session runner: a process netplumbd starts for a session, which becomes the target user for
good before anything else, then makes the session's pipes and sockets, opens the recipe's redirections
and runs the job, with no rights but that user's.

It reads the plan on stdin, answers on the control socket (apps/netplumb/privsep.py), and ends the job
when netplumbd says stop or goes away.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

from apps import ids
from apps.netplumb import privsep
from apps.netplumb.endpoints import EndpointError, Endpoints, open_fifo
from apps.netplumb.jobs import CommandJob, Exe, Job, Launch, describe_status
from apps.netplumb.recipe import RecipeError, RecipeJob, parse_recipe
from proto.login import login_umask
from proto.service import lower_nofile

MAX_PLAN = 4 << 20


class Session:
    """One job and its endpoints, driven by netplumbd's messages."""

    def __init__(self, ctl: socket.socket, plan: dict[str, Any]) -> None:
        self.ctl = ctl
        self.plan = plan
        self.ends = Endpoints()
        self.openers: list[threading.Thread] = []
        self.job: Job | None = None
        self.stopping = threading.Event()
        self.send_lock = threading.Lock()

    def send(self, msg: privsep.FromRunner, fds: list[int] | tuple[int, ...] = ()) -> None:
        with self.send_lock, contextlib.suppress(OSError):  # netplumbd gone: the job is stopped anyway
            privsep.send(self.ctl, msg, fds)

    def run(self) -> None:
        try:
            job, listeners = self._start()
        except Exception as e:
            self.send(privsep.NotStarted(_why(e), e.status if isinstance(e, _NotRun) else 126))
            self._finish()
            return
        self.job = job
        self.send(
            privsep.Started(tuple(ch for ch, _ in self.plan["sockets"])),
            [job.stdin, job.stdout, job.stderr, *(s.fileno() for s in listeners)],
        )
        for fd in (job.stdin, job.stdout, job.stderr):
            os.close(fd)
        for lsock in listeners:
            lsock.close()
        threading.Thread(target=self._listen, daemon=True, name="control").start()
        code = job.wait()
        self._finish()
        self.send(privsep.Ended(*describe_status(code)))
        job.reap()  # only now: until here a signal may still come for the job's pids

    def _start(self) -> tuple[Job, list[socket.socket]]:
        plan = self.plan
        if plan["workdir"]:
            _, fds, _, _ = socket.recv_fds(self.ctl, len(privsep.WORKDIR), 1)
            if len(fds) != 1:
                raise OSError("no working directory came with the plan")
            os.fchdir(fds[0])
            os.close(fds[0])
        else:
            try:
                os.chdir(plan["cwd"] or "/")
            except OSError:
                os.chdir("/")
        for _, path in (*plan["infifos"], *plan["outfifos"]):
            self.ends.fifo(path)
        listeners = [self.ends.listen(path) for _, path in plan["sockets"]]
        # Our ends of the session pipes wait for theirs before the recipe opens its redirections:
        # a `<` or `>` naming one of them then meets us instead of waiting forever.
        for kind, write in (("infifos", True), ("outfifos", False)):
            for ch, path in plan[kind]:
                t = threading.Thread(target=self._open, args=(ch, path, write), daemon=True, name=f"fifo-{ch}")
                t.start()
                self.openers.append(t)
        launch = Launch(plan["env"], None)
        steps = plan["steps"]
        if plan["recipe"] is not None:
            commands = parse_recipe(plan["recipe"])
            return RecipeJob(
                commands, [Exe(exe, real) for _, exe, real in steps], launch, plan["open_timeout"]
            ), listeners
        ((argv, exe, real),) = steps
        try:
            return CommandJob(argv, Exe(exe, real), launch), listeners
        except OSError as e:
            raise _NotRun(f"cannot run {argv[0]}: {e.strerror}", 127 if e.errno == 2 else 126) from None

    def _open(self, ch: int, path: str, write: bool) -> None:
        try:
            fd = open_fifo(path, write)
        except OSError:
            return  # netplumbd's end of it fails when we exit
        self.send(privsep.FifoOpened(ch), [fd])
        os.close(fd)

    def _listen(self) -> None:
        while True:
            try:
                data = self.ctl.recv(privsep.MAX_MESSAGE)
                msg = privsep.decode_to_runner(data) if data else privsep.Stop()
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                msg = privsep.Stop()
            if isinstance(msg, privsep.Stop):
                self._stop()
                return
            assert self.job is not None
            self.job.signal(msg.sig)

    def _stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace time, to every process of the job."""
        job = self.job
        assert job is not None
        self.stopping.set()
        job.cancel()
        job.signal(signal.SIGTERM)
        self.ends.release()
        waiter = threading.Thread(target=job.wait, daemon=True)
        waiter.start()
        waiter.join(self.plan["kill_grace"])
        if waiter.is_alive():
            job.signal(signal.SIGKILL)

    def _finish(self) -> None:
        """Wake our pipe openers still waiting, then remove what we made."""
        self.ends.release()
        for t in self.openers:
            t.join()
        self.ends.remove()


class _NotRun(Exception):
    """The program would not start: why, and the status (127: not found)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _why(e: Exception) -> str:
    """What the client reads when its job could not start."""
    if isinstance(e, EndpointError | RecipeError | _NotRun):
        return str(e)
    if isinstance(e, OSError) and e.strerror:  # the working directory, a descriptor
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return f"the session runner failed: {type(e).__name__}: {e}"


def main() -> None:
    ctl = socket.socket(fileno=int(sys.argv[2]))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        plan = json.loads(sys.stdin.buffer.read(MAX_PLAN))
        nofile = os.environ.get(privsep.NOFILE_VAR)
        if nofile is not None:  # netplumbd raised its own for its sessions, not for the jobs
            lower_nofile(int(nofile))
        ids.become(plan["uid"], plan["gid"], plan["groups"])
        os.umask(login_umask())
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        Session(ctl, plan).run()
    except Exception as e:  # a bug here must still end the session with a reason
        with contextlib.suppress(OSError):
            privsep.send(ctl, privsep.NotStarted(f"the session runner failed: {type(e).__name__}: {e}", 126))
    sys.stdout.flush()
    os._exit(0)
