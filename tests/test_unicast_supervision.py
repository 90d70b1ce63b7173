"""Nothing fails unseen in a unicast IPCP: an error in the data transfer thread ends the process
(exit status 70, one log line), an error in a background task or a loop callback ends the IPCP
the same way; the data transfer thread takes its table changes as commands, in order."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from ipcp.base import EXIT_FAILED, Ipcp
from ipcp.unicast.dt import Dt
from ipcp.unicast.pci import PciFormat


def make_dt() -> Dt:
    return Dt(PciFormat(), 1, 60, 65536, lambda pdu, hop: None, lambda addr: None, lambda flow, update: None)


def test_a_failing_command_on_the_data_transfer_thread_ends_the_process_with_a_log_line() -> None:
    code = textwrap.dedent("""
        import logging, time
        from tests.test_unicast_supervision import make_dt
        logging.basicConfig(level=logging.INFO)
        dt = make_dt()
        dt.start()
        dt.command(lambda: 1 / 0)
        time.sleep(10)
        print("still running")
    """)
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent
    )
    assert r.returncode == Dt.EXIT_CODE == 70, (r.returncode, r.stderr)
    assert "the data path failed; the IPCP ends" in r.stderr and "ZeroDivisionError" in r.stderr
    assert "still running" not in r.stdout


def test_commands_run_on_the_data_transfer_thread_in_order() -> None:
    dt = make_dt()
    dt.start()
    seen: list[tuple[int, str]] = []
    done = threading.Event()
    try:
        for i in range(100):
            dt.command(lambda i=i: seen.append((i, threading.current_thread().name)))
        dt.command(done.set)
        assert done.wait(10)
    finally:
        dt.stop()
    assert [i for i, _ in seen] == list(range(100)) and {name for _, name in seen} == {"dt"}


def test_the_data_transfer_thread_owns_the_n1_fd_it_is_given() -> None:
    dt = make_dt()
    dt.start()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    done = threading.Event()
    try:
        dt.command(dt.add_n1, 7, a.detach())
        dt.command(done.set)
        assert done.wait(10) and 7 in dt.n1
    finally:
        dt.stop()
        b.close()


def test_a_failing_background_task_ends_the_ipcp() -> None:
    async def run() -> Ipcp:
        ipcp = Ipcp("x", Path("/nonexistent"))

        async def boom() -> None:
            raise RuntimeError("a bug")

        ipcp.spawn(boom())
        await asyncio.wait_for(ipcp._done.wait(), 5)
        return ipcp

    assert asyncio.run(run()).failed and EXIT_FAILED == 70
