"""The IRMd's IPCP fork server: a forked IPCP is what an executed one was (session, cwd, stdin,
environment, descriptors, name), its exits are seen, and losing the server loses no service.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from helpers import IrmdProc, children_of, pid_alive, start_irmd, stop_irmd, wait_for

pytestmark = pytest.mark.timeout(60)


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def server_of(irmd: IrmdProc) -> int:
    (server,) = children_of(irmd.pid)  # before any program is started: the fork server alone
    return server


def test_a_forked_ipcp_is_what_an_executed_one_was(tmp_path: Path) -> None:
    irmd = start_irmd(tmp_path)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("ipcp", "bootstrap", "name", "u", "type", "unicast", "layer", "net")
        server = server_of(irmd)
        for name, kind in (("lo", "local"), ("u", "unicast")):
            pid = irmd.ipcp_pid(name)
            assert ppid(pid) == server and comm(pid) == f"ipcpd-{kind}"  # as C's, in ps, top and pgrep
            assert os.getsid(pid) == pid and os.readlink(f"/proc/{pid}/cwd") == "/"
            assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
            assert os.path.samefile(f"/proc/{pid}/fd/2", irmd.log)  # it logs where its IRMd logs
            # Nothing of the IRMd's or the server's is open in it: no file, and no socket but its own.
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if int(fd) > 2:
                    mode = os.stat(f"/proc/{pid}/fd/{fd}").st_mode
                    assert not stat.S_ISREG(mode), os.readlink(f"/proc/{pid}/fd/{fd}")
        assert irmd.table("ipcp", "list")[1]["state"] == "operational"
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


def test_losing_the_fork_server_stops_its_ipcps_and_later_ones_are_executed(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    forked, server = irmd.ipcp_pid("lo"), server_of(irmd)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: not pid_alive(forked), 10, "the IPCP the lost server forked to be stopped")
    wait_for(lambda: not irmd.table("ipcp", "list"), 10, "the IRMd to drop it")
    assert "the IPCP fork server was lost" in irmd.log_text()
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    executed = irmd.ipcp_pid("lo")
    assert ppid(executed) == irmd.pid and comm(executed) != "ipcpd-local"
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", "local")
    assert "1 received" in irmd.run("oping", "-n", "pong", "-c", "1").stdout


def test_the_fork_server_ends_with_its_irmd(tmp_path: Path) -> None:
    irmd = start_irmd(tmp_path)
    server = server_of(irmd)
    irmd.proc.kill()  # no shutdown: the server learns from its socket alone
    irmd.proc.wait(10)
    wait_for(lambda: not pid_alive(server), 10, "the fork server to end")
    stop_irmd(irmd, check=False)


def test_an_irmd_running_code_from_its_pythonpath_executes_its_ipcps(tmp_path: Path) -> None:
    """Forking would hand what the admin's PYTHONPATH loaded into the IRMd to every IPCP."""
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "sitecustomize.py").write_text("LOADED = True\n")
    irmd = start_irmd(tmp_path, env={"PYTHONPATH": str(extra)})
    try:
        assert not children_of(irmd.pid)
        irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
        pid = irmd.ipcp_pid("lo")
        assert ppid(pid) == irmd.pid and b"PYTHONPATH" not in Path(f"/proc/{pid}/environ").read_bytes()
        assert "IPCPs are executed" in irmd.log_text()
    finally:
        stop_irmd(irmd)
