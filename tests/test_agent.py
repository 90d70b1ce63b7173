"""The agent a root server forks with a client's credentials (apps.agent): it holds a copy of the
server's memory, so the client it now is must not be able to trace it or read that memory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import types
from pathlib import Path

import pytest

from apps import accounts
from apps.accounts import Creds
from apps.agent import Agent, AgentError

SUID_DUMPABLE = Path("/proc/sys/fs/suid_dumpable")
PR_GET_PDEATHSIG = 2
NOBODY = 65534


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_the_client_cannot_read_its_agents_memory_even_where_suid_processes_may_dump(tmp_path: Path) -> None:
    """Changing ids resets the dumpable flag to fs.suid_dumpable; where that is 1 (debugging), the
    agent became the client's to trace and read. The agent still connects as the client."""
    old = SUID_DUMPABLE.read_text()
    agent: Agent | None = None
    SUID_DUMPABLE.write_text("1")
    try:
        agent = Agent(Creds(NOBODY, NOBODY, (NOBODY,)), tmp_path / "no-irmd", None)
        with pytest.raises(AgentError, match=f"as uid {NOBODY}"):  # it answers, as the client: switched
            agent.connect()
        SUID_DUMPABLE.write_text(old)
        mem = f"/proc/{agent.pid}/mem"
        r = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "head", "-c1", mem],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert r.returncode != 0 and "Permission denied" in r.stderr, (r.returncode, r.stderr)
    finally:
        SUID_DUMPABLE.write_text(old)
        if agent is not None:
            agent.close()


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (it switches ids, and sets fs.suid_dumpable)")
def test_the_agent_is_never_the_clients_to_trace_while_it_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fs.suid_dumpable is 1, the agent was dumpable with all three uids the client's from its
    setresuid until the flag was cleared after it: a client looping on ptrace could attach then.
    Every id change the agent makes is followed here by a look at the flag and the uids."""
    import ctypes

    from apps import agentd, ids

    libc = ctypes.CDLL(None, use_errno=True)
    states: list[tuple[tuple[int, int, int], int]] = []
    real = os.setresuid

    def setresuid(r: int, e: int, s: int) -> None:
        real(r, e, s)
        states.append((os.getresuid(), libc.prctl(ids.PR_GET_DUMPABLE, 0, 0, 0, 0)))

    old = SUID_DUMPABLE.read_text()
    read, write = os.pipe()
    try:
        SUID_DUMPABLE.write_text("1")
        pid = os.fork()
        if pid == 0:  # the agent's switch, in a child of its own as in the server
            code = 1
            try:
                os.close(read)
                monkeypatch.setattr(os, "setresuid", setresuid)
                agentd._become(Creds(NOBODY, NOBODY, (NOBODY,)))
                deathsig = ctypes.c_int()
                libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(deathsig), 0, 0, 0)  # the switch cleared it
                os.write(write, json.dumps([states, deathsig.value]).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            seen = f.read().decode()
        _, status = os.waitpid(pid, 0)
    finally:
        SUID_DUMPABLE.write_text(old)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    switched, deathsig = json.loads(seen)
    assert deathsig == signal.SIGKILL  # it still dies with the server's thread that forked it
    assert switched and switched[-1] == [[NOBODY] * 3, 0]  # the client's, undumpable
    assert all(dumpable == 0 for uids, dumpable in switched if uids == [NOBODY] * 3), switched


@pytest.mark.timeout(10)
def test_a_users_groups_are_read_again_so_one_taken_away_is_not_lent_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The groups an agent gets are the user's as the accounts database has them now, not as it had
    them when the server first saw the user (until it restarted)."""
    uid = os.geteuid()
    groups = [os.getegid(), 4242]
    monkeypatch.setattr(accounts.os, "getgrouplist", lambda name, gid: list(groups))
    now = [1e6 + 0.5]
    monkeypatch.setattr(accounts, "time", types.SimpleNamespace(monotonic=lambda: now[0]), raising=False)
    assert 4242 in accounts.user_for_uid(uid).groups
    groups.remove(4242)  # the administrator takes the user out of the group
    assert 4242 in accounts.user_for_uid(uid).groups  # read at most ACCOUNT_TTL ago
    now[0] += 60.0  # ACCOUNT_TTL
    user = accounts.user_for_uid(uid)
    assert 4242 not in user.groups and user.creds is not None and user.creds.uid == uid
