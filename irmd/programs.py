"""Programs started on demand (`bind program ... auto`): one at a time per name, as the binding's
owner, held back after failures; and stopping what the IRMd started (IPCPs and programs) when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

from irmd import spawn
from irmd.forkserver import Forked
from irmd.identity import proc_start
from irmd.reg import Ipcp, ProgBinding
from transports.ratelog import RateLog

if TYPE_CHECKING:
    from irmd.core import Irmd

log = logging.getLogger("irmd")

LINES_PER_S, LINES_BURST = 5.0, 50  # a started program's output lines logged (the rest counted)
LINE_LOGGED = 512  # characters of one such line logged
LINE_MAX = 4096  # a program's output line longer than this is logged in pieces
START_GRACE = 10.0  # a program started for a name has this long to accept before another is started
# A program that fails (cannot be started, or exits with an error within START_GRACE) is not started
# again for FAIL_HOLD s, doubling with each failure in a row up to FAIL_HOLD_MAX (as systemd's restart
# limits): every arrival, which anyone may cause, once started it again, a process and two log lines each.
FAIL_HOLD, FAIL_HOLD_MAX = 1.0, 60.0
UNSERVED_MAX = 4  # programs started for a name running at once, none of which serves it (stuck at its start)
STOP_GRACE = 2.0  # SIGTERM, then SIGKILL after this long


def kill(proc: spawn.Child, sig: int) -> None:
    """Signal a child by pid, unless it is known to have exited (its pid may be another's by now):
    Process.kill() may reap it behind asyncio's child watcher."""
    if isinstance(proc, Forked):
        proc.send_signal(sig)  # through the fork server, which knows whether the pid is still its child's
    elif proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


async def stop(procs: list[spawn.Child]) -> None:
    """SIGTERM, and SIGKILL to those still running after STOP_GRACE."""
    for proc in procs:
        kill(proc, signal.SIGTERM)
    if not procs:
        return
    _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=STOP_GRACE)
    for proc in procs:
        if proc.returncode is None:
            kill(proc, signal.SIGKILL)
    if pending:
        await asyncio.wait(pending, timeout=STOP_GRACE)


async def relay_output(stream: asyncio.StreamReader, tag: str) -> None:
    """Log what a started program prints, line by line, as its own (tagged with its name and pid):
    at most LINES_PER_S a second and LINE_LOGGED characters a line, since a server may print what
    its clients send (oecho, oping), and the IRMd's log is everyone's."""
    out = RateLog(LINES_PER_S, LINES_BURST, logger=logging.getLogger("irmd.program"))
    while line := await _line(stream):
        text = line.decode(errors="replace").rstrip("\n")
        cut = f"{text[:LINE_LOGGED]}... ({len(text)} characters)" if len(text) > LINE_LOGGED else text
        out.log("%s", cut, extra={"tag": tag})


async def _line(stream: asyncio.StreamReader) -> bytes:
    try:
        return await stream.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:  # the last line, without its newline
        return e.partial
    except asyncio.LimitOverrunError as e:  # a line longer than the reader holds: in pieces
        return await stream.read(max(1, min(e.consumed, LINE_MAX)))


class Programs:
    def __init__(self, irmd: Irmd) -> None:
        self.irmd = irmd
        self.running: dict[int, asyncio.subprocess.Process] = {}
        self._starting: dict[str, float] = {}  # name -> when its program was started
        self._failed: dict[str, tuple[int, float]] = {}  # name -> (failures in a row, no start before)

    def start(self, name: str, prog: ProgBinding) -> None:
        """Start `prog` for `name` (called when no process serves it), unless one started for it is on
        its way, its program failed lately, or UNSERVED_MAX started for it are still running."""
        now = time.monotonic()
        started = self._starting.get(name)
        if started is not None and now - started < START_GRACE:
            return
        if (failed := self._failed.get(name)) is not None and now < failed[1]:
            return
        if sum(1 for started_for, _ in self.irmd.reg.started.values() if started_for == name) >= UNSERVED_MAX:
            return
        self._starting[name] = now
        self.irmd.spawn_task(self._run(name, prog))

    def held(self, name: str) -> float:
        """How long `name`'s program is held back after failing (0: it is not)."""
        failed = self._failed.get(name)
        return max(failed[1] - time.monotonic(), 0.0) if failed is not None else 0.0

    def _failure(self, name: str) -> float:
        """Count a failure of `name`'s program in a row; how long it is held back."""
        count = self._failed.get(name, (0, 0.0))[0] + 1
        hold: float = min(FAIL_HOLD * 2.0 ** min(count - 1, 16), FAIL_HOLD_MAX)
        self._failed[name] = (count, time.monotonic() + hold)
        self._starting.pop(name, None)
        return hold

    async def _run(self, name: str, prog: ProgBinding) -> None:
        who = spawn.run_as(prog.owner, self.irmd.uid)
        try:  # checked again at each start: the file or a directory above it may have changed since the bind
            spawn.check_program(prog.path, self.irmd.uid if who.uid is None else who.uid)
        except OSError as e:
            hold = self._failure(name)
            log.error(
                "will not start %s for %r: %s (not tried again for %.0f s)", prog.path, name, e.strerror or e, hold
            )
            return
        try:
            proc = await spawn.start_program(prog.path, prog.args, prog.owner, self.irmd.sock_path, self.irmd.output)
        except (OSError, subprocess.SubprocessError) as e:
            hold = self._failure(name)
            log.error("cannot start %s for %r: %s (not tried again for %.0f s)", prog.path, name, e, hold)
            return
        log.info("started %s %s (pid %d) for %r as %s", prog.path, " ".join(prog.args), proc.pid, name, who.user)
        self.running[proc.pid] = proc
        self.irmd.reg.started[proc.pid] = (name, proc_start(proc.pid))  # this process, not a later one with its pid
        if proc.stdout is not None:  # read to its end, which a child of the program may hold past its exit
            self.irmd.spawn_task(relay_output(proc.stdout, f"{os.path.basename(prog.path)}[{proc.pid}]"))
        began = time.monotonic()
        code = await proc.wait()
        self.running.pop(proc.pid, None)
        self.irmd.reg.started.pop(proc.pid, None)
        failed = code and not self.irmd.stopping and code != -signal.SIGTERM
        held = ""
        if failed and time.monotonic() - began < START_GRACE:
            held = f" (not started again for {self._failure(name):.0f} s)"  # the next flow may try again then
        elif code:
            self._starting.pop(name, None)  # it ended, having run a while: the next flow may start it
        if not failed or not held:
            self._failed.pop(name, None)
        (log.warning if failed else log.info)(
            "program %s (pid %d) for %r exited with status %s%s", prog.path, proc.pid, name, code, held
        )

    async def stop_all(self, ipcps: list[Ipcp]) -> None:
        await stop([i.proc for i in ipcps] + list(self.running.values()))
