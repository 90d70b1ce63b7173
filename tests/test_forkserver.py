"""The IRMd's IPCP fork server: a forked IPCP is what an executed one was (session, cwd, stdin, log,
descriptors, environment, code, name), its exits are seen, and no failure of the server (a fork
refused, a request abandoned, a hang, its loss) costs more than it must.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
from helpers import IrmdProc, children_of, pid_alive, start_irmd, stop_irmd, wait_for

from irmd import forkserver
from irmd.forkserver import ForkError, ForkServer
from transports.unix import recv_frame, send_frame, seqpacket_pair

pytestmark = pytest.mark.timeout(90)


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def open_files(pid: int, low: int = 3) -> dict[int, tuple[int, int]]:
    """fd -> (device, inode) of the files, pipes and sockets process `pid` has open, from fd `low` up
    (not epoll and event descriptors: every one of those shares the one anonymous inode)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) >= low:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("anon_inode:"):
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            out[int(fd)] = (st.st_dev, st.st_ino)
    return out


def server_of(irmd: IrmdProc) -> int:
    (server,) = children_of(irmd.pid)  # before any program is started: the fork server alone
    return server


@pytest.mark.parametrize("to_file", [False, True], ids=["log-on-stderr", "log-file"])
def test_a_forked_ipcp_is_what_an_executed_one_was(tmp_path: Path, to_file: bool) -> None:
    log_file = tmp_path / "irmd-own.log"
    irmd = start_irmd(tmp_path, args=["--log", str(log_file), "--log-level", "debug"] if to_file else [])
    log = log_file if to_file else irmd.log
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("ipcp", "bootstrap", "name", "u", "type", "unicast", "layer", "net")
        server = server_of(irmd)
        held = set(open_files(server, 0).values()) | set(open_files(irmd.pid, 0).values())
        for name, kind in (("lo", "local"), ("u", "unicast")):
            pid = irmd.ipcp_pid(name)
            assert ppid(pid) == server
            assert comm(pid) == f"ipcpd-{kind}" and cmdline(pid) == f"ipcpd-{kind} {name}"  # as C's are named
            assert os.getsid(pid) == pid and os.readlink(f"/proc/{pid}/cwd") == "/"
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
            for fd in (1, 2):
                assert os.path.samefile(f"/proc/{pid}/fd/{fd}", log)  # it logs where its IRMd logs
            # Nothing the server or the IRMd holds is open in it: only what it opened itself.
            assert not set(open_files(pid).values()) & held, open_files(pid)
        if to_file:  # the level the IRMd hands on in the environment it gives: it replaced the server's
            assert f"ipcp/unicast/u[{irmd.ipcp_pid('u')}] DEBUG" in log.read_text()
    finally:
        stop_irmd(irmd)


def test_ipcps_keep_their_member_keys_in_the_irmds_state_directory(tmp_path: Path) -> None:
    """An IRMd given OUROBOROS_STATE_DIR has its IPCPs (forked or executed) keep their member keys
    there, not in /var/lib/ouroboros."""
    name = f"st{os.getpid()}"
    for executed in (False, True):
        state = tmp_path / f"state-{executed}"
        env = {"OUROBOROS_STATE_DIR": str(state)} | ({"PYTHONDEVMODE": "1"} if executed else {})
        irmd = start_irmd(tmp_path, name=f"irmd-{executed}", env=env)
        try:
            irmd.irm_ok("ipcp", "bootstrap", "name", name, "type", "unicast", "layer", "net")
            assert (ppid(irmd.ipcp_pid(name)) == irmd.pid) is executed
            key = state / "ipcp" / f"{name}.key"
            assert key.is_file() and key.stat().st_mode & 0o077 == 0
            assert not Path(f"/var/lib/ouroboros/ipcp/{name}.key").exists()
        finally:
            stop_irmd(irmd)


def test_a_forked_ipcp_runs_the_projects_code_not_the_pythonpaths(tmp_path: Path) -> None:
    """An admin's PYTHONPATH the IRMd loaded nothing from still starts the server: its path is cut."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil" / "ipcp"
    evil.mkdir(parents=True)
    (evil / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    irmd = start_irmd(tmp_path, env={"PYTHONPATH": str(evil.parent)})
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        assert ppid(irmd.ipcp_pid("lo")) == server_of(irmd)  # forked
        assert not marker.exists()
    finally:
        stop_irmd(irmd)


def test_an_ipcp_killed_is_seen_gone_and_its_name_is_free_again(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
    pid = irmd.ipcp_pid("lo")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not irmd.table("ipcp", "list"), 10, "the IRMd to see its IPCP gone")
    assert f"ipcp lo (pid {pid}) exited with status -9" in irmd.log_text()
    irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
    assert irmd.ipcp_pid("lo") != pid


def serves_pong(irmd: IrmdProc) -> bool:
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", "local")
    return "1 received" in irmd.run("oping", "-n", "pong", "-c", "1").stdout


def test_losing_the_fork_server_stops_its_ipcps_and_later_ones_are_executed(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    forked, server = irmd.ipcp_pid("lo"), server_of(irmd)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: not pid_alive(forked), 10, "the IPCP the lost server forked to be stopped")
    wait_for(lambda: not irmd.table("ipcp", "list"), 10, "the IRMd to drop it")
    assert "the IPCP fork server was lost" in irmd.log_text()
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    executed = irmd.ipcp_pid("lo")
    assert ppid(executed) == irmd.pid and comm(executed) == "ipcpd-local"  # named as C's either way
    assert serves_pong(irmd)


def test_a_hung_fork_server_is_given_up_and_the_ipcp_executed(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    forked, server = irmd.ipcp_pid("lo"), server_of(irmd)
    os.kill(server, signal.SIGSTOP)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo2", "type", "local", "layer", "other")  # ~10 s: its deadline
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: the IRMd killed it
            os.kill(server, signal.SIGCONT)
    assert ppid(irmd.ipcp_pid("lo2")) == irmd.pid and "no answer in 10 s" in irmd.log_text()
    wait_for(lambda: not pid_alive(server) and not pid_alive(forked), 10, "the hung server and its IPCP to go")
    assert [r["name"] for r in irmd.table("ipcp", "list")] == ["lo2"]


def test_the_fork_server_ends_with_its_irmd(tmp_path: Path) -> None:
    irmd = start_irmd(tmp_path)
    server = server_of(irmd)
    irmd.proc.kill()  # no shutdown: the server learns from its socket alone
    irmd.proc.wait(10)
    wait_for(lambda: not pid_alive(server), 10, "the fork server to end")
    stop_irmd(irmd, check=False)


@pytest.mark.parametrize(
    "setting",
    [{"PYTHONPATH": "sitecustomize"}, {"PYTHONHASHSEED": "0"}, {"PYTHONOPTIMIZE": "1"}, {"PYTHONDEVMODE": "1"}],
    ids=["pythonpath-code", "fixed-hash-seed", "optimize", "dev-mode"],
)
def test_an_irmd_a_fork_would_pass_more_on_than_python_I_executes_its_ipcps(
    tmp_path: Path, setting: dict[str, str]
) -> None:
    """Code loaded from an admin's PYTHONPATH, or interpreter settings `python -I` ignores: a forked
    IPCP would inherit them (a hash seed shared with, or fixed for, every IPCP parsing peers' input)."""
    env = dict(setting)
    if "PYTHONPATH" in env:
        extra = tmp_path / "extra"
        extra.mkdir()
        (extra / "sitecustomize.py").write_text("LOADED = True\n")
        env["PYTHONPATH"] = str(extra)
    irmd = start_irmd(tmp_path, env=env)
    try:
        assert not children_of(irmd.pid)
        irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
        assert ppid(irmd.ipcp_pid("lo")) == irmd.pid
        assert "IPCPs are executed" in irmd.log_text()
    finally:
        stop_irmd(irmd)


PID = 4_000_000  # above any pid_max: a signal sent to it by mistake reaches nobody


class StandIn:
    """The IRMd's end of the protocol against a stand-in server (this test, on the other socket)."""

    def __init__(self) -> None:
        ours, self.theirs = seqpacket_pair()
        ours.setblocking(False)
        self.forks = ForkServer(PID + 100, ours)  # a server that is no process: losing it kills nothing

    def request(self) -> dict[str, object]:
        frame, _ = recv_frame(self.theirs)
        return dict(json.loads(frame))

    def send(self, *msgs: dict[str, object]) -> None:
        for msg in msgs:
            send_frame(self.theirs, json.dumps(msg).encode())


def test_an_exit_read_with_its_spawn_reply_is_not_lost() -> None:
    async def run() -> int:
        s = StandIn()
        spawn = asyncio.ensure_future(s.forks.spawn("local", "lo", "/nowhere", {}, None))
        seq = (await asyncio.to_thread(s.request))["seq"]
        s.send({"seq": seq, "pid": PID, "start": 1}, {"exit": PID, "code": 3})  # read in one go
        child = await spawn
        return await asyncio.wait_for(child.wait(), 5)

    assert asyncio.run(run()) == 3


def test_the_ipcp_forked_for_an_abandoned_create_is_killed_and_the_next_gets_its_own() -> None:
    """Its client gone while the server forks: the reply that comes later belongs to no create."""

    async def run() -> tuple[dict[str, object], int]:
        s = StandIn()
        gone = asyncio.ensure_future(s.forks.spawn("local", "a", "/nowhere", {}, None))
        first = (await asyncio.to_thread(s.request))["seq"]
        gone.cancel()
        nxt = asyncio.ensure_future(s.forks.spawn("local", "b", "/nowhere", {}, None))
        second = (await asyncio.to_thread(s.request))["seq"]
        s.send({"seq": first, "pid": PID, "start": 1}, {"seq": second, "pid": PID + 1, "start": 1})
        child = await nxt
        return await asyncio.to_thread(s.request), child.pid

    kill, pid = asyncio.run(run())
    assert pid == PID + 1 and kill == {"signal": PID, "sig": signal.SIGKILL}


def test_a_refused_fork_fails_that_ipcp_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's fork refused (a process limit): that request gets an error, the server serves on,
    and the IRMd executes that IPCP."""

    def refused() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    ours, theirs = seqpacket_pair()
    monkeypatch.setattr(os, "fork", refused)
    live: set[int] = set()
    request = {"seq": 7, "kind": "local", "name": "lo", "sock": "/nowhere", "env": {}}
    reply = forkserver._handle(json.dumps(request).encode(), [], theirs, live)
    assert reply == {"seq": 7, "error": "fork: Resource temporarily unavailable"} and not live

    async def run() -> None:
        s = StandIn()
        spawn = asyncio.ensure_future(s.forks.spawn("local", "lo", "/nowhere", {}, None))
        seq = (await asyncio.to_thread(s.request))["seq"]
        s.send({"seq": seq, "error": "fork: Resource temporarily unavailable"})
        with pytest.raises(ForkError, match="could not start it: fork"):
            await spawn
        assert not s.forks.lost

    asyncio.run(run())
    ours.close()
    theirs.close()
