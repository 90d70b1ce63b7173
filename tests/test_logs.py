"""One logging setup for every daemon (proto/logs.py): -v/-q reach the IPCPs and programs an IRMd
starts, every line says host, component and pid, --log and --stdout choose the place, and an ordinary
session logs no warning (a warning is for what a user must act on)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, free_port, irmd_env, start_irmd, stop_irmd, udp4_bootstrap, wait_for

from flowlib.irm import IrmClient
from proto import logs

pytestmark = pytest.mark.timeout(120)
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (\S+) (\S+)\[(\d+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL): ")


def session(irmd: IrmdProc) -> None:
    """What a newcomer does first: a local layer, a ping server started on demand, a ping."""
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", "local")
    r = irmd.run("oping", "-n", "pong", "-c", "1", "-i", "10")
    assert "1 received" in r.stdout, r.stdout + r.stderr
    irmd.note_children()


def lines(irmd: IrmdProc) -> list[re.Match[str]]:
    """Every line of the log, each checked to be tagged."""
    text = irmd.log_text()
    found = []
    for line in text.splitlines():
        if line.startswith((" ", "Traceback")):  # an exception's lines, under the tagged one
            continue
        match = LINE.match(line)
        assert match, f"an untagged log line: {line!r}\n{text}"
        found.append(match)
    return found


def test_every_line_is_tagged_and_a_plain_session_warns_of_nothing(tmp_path: Path) -> None:
    irmd = start_irmd(tmp_path)
    try:
        session(irmd)
        ipcp = irmd.ipcp_pid("lo")
        wait_for(lambda: "Ouroboros ping server started." in irmd.log_text(), 10, "the server's line")
    finally:
        stop_irmd(irmd)
    found = lines(irmd)
    assert {m.group(1) for m in found} == {"irmd"}  # the socket's name: several IRMds on one host differ
    tags = {(m.group(2), int(m.group(3))) for m in found}
    assert ("irmd", irmd.pid) in tags and ("ipcp/local/lo", ipcp) in tags
    assert any(tag == "oping" for tag, _ in tags)  # what the started server printed, under its name and pid
    assert [m.string for m in found if m.group(4) != "INFO"] == []  # at the default level: no DEBUG, no WARNING


def test_verbose_and_quiet_reach_the_ipcps_and_programs(tmp_path: Path) -> None:
    loud = start_irmd(tmp_path, "loud", ["-v"])
    try:
        session(loud)
    finally:
        stop_irmd(loud)
    assert any(m.group(2) == "ipcp/local/lo" and m.group(4) == "DEBUG" for m in lines(loud))
    quiet = start_irmd(tmp_path, "quiet", ["-q"])
    try:
        session(quiet)
    finally:
        stop_irmd(quiet)
    assert quiet.log_text() == ""  # nothing went wrong: nothing to say, from the irmd, its IPCP or oping


def test_log_and_stdout_choose_where_the_lines_go(tmp_path: Path) -> None:
    sock, file = tmp_path / "f.sock", tmp_path / "chosen.log"
    out = tmp_path / "out"
    with open(out, "wb") as o:
        proc = subprocess.Popen(
            [str(BIN / "irmd"), "--sock", str(sock), "--log", str(file)],
            env=irmd_env(sock),
            stdout=o,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    irmd = IrmdProc(sock, file, proc, irmd_env(sock))
    try:
        wait_for(lambda: "irmd listening" in (file.read_text() if file.exists() else ""), 15, "the log file")
        session(irmd)
    finally:
        stop_irmd(irmd)
    assert out.read_text() == ""  # all of it in the file, the IPCP's and the server's lines too
    assert {m.group(2) for m in lines(irmd)} >= {"irmd", "ipcp/local/lo", "oping"}
    assert file.stat().st_mode & 0o777 == logs.LOG_MODE


def test_a_log_file_is_never_opened_through_a_link_or_someone_elses(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "irmd.log"
    link.symlink_to(target)
    with pytest.raises(logs.LogFileError, match="cannot open"):
        logs.open_log(link)
    shared = tmp_path / "shared.log"
    shared.write_text("")
    shared.chmod(0o666)
    with pytest.raises(logs.LogFileError, match="only we can write"):
        logs.open_log(shared)
    secret = tmp_path / "secret"  # a file of ours with another name: /etc/shadow hard-linked into /tmp
    secret.write_text("root:x\n")
    (tmp_path / "linked.log").hardlink_to(secret)
    with pytest.raises(logs.LogFileError, match="under this one name"):
        logs.open_log(tmp_path / "linked.log")
    assert secret.read_text() == "root:x\n"
    os.close(logs.open_log(tmp_path / "fresh.log"))  # a new file, or one of ours with one name, is taken
    os.close(logs.open_log(tmp_path / "fresh.log"))
    r = subprocess.run(
        [str(BIN / "irmd"), "--sock", str(tmp_path / "l.sock"), "--log", str(link)],
        env=irmd_env(tmp_path / "l.sock"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot open the log file" in r.stderr and target.read_text() == ""


def test_levels_step_with_v_and_q_from_the_inherited_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import logging

    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    assert logs.level_of(argparse.Namespace(verbose=1, quiet=0), logging.INFO) == logging.DEBUG
    assert logs.level_of(argparse.Namespace(verbose=0, quiet=2), logging.INFO) == logging.ERROR
    assert logs.level_of(argparse.Namespace(verbose=5, quiet=0), logging.INFO) == logging.DEBUG
    monkeypatch.setenv(logs.LEVEL_ENV, "warning")  # what an IRMd -q hands what it starts
    assert logs.level_of(argparse.Namespace(), logging.INFO) == logging.WARNING
    assert logs.level_of(argparse.Namespace(log_level="debug"), logging.INFO) == logging.DEBUG
    assert os.environ[logs.LEVEL_ENV] == "warning"


@pytest.mark.timeout(180)
def test_the_two_irmd_quickstart_logs_no_warning(tmp_path: Path) -> None:
    """Two irmds over udp, a unicast layer enrolled and connected, pings plain and encrypted: what a
    newcomer does in docs/quickstart.md section 3, without a line a user must act on."""
    port = str(free_port(["127.0.0.1", "127.0.0.2"]))
    a = start_irmd(tmp_path, "a")
    b = start_irmd(tmp_path, "b")
    try:
        a.irm_ok(*udp4_bootstrap("udp", "127.0.0.1", "port", port, "peer", "127.0.0.2", name="udp-a"))
        a.irm_ok("ipcp", "bootstrap", "name", "net-a", "type", "unicast", "layer", "net", "autobind")
        a.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
        a.irm_ok("name", "register", "pong", "layer", "net")
        b.irm_ok(*udp4_bootstrap("udp", "127.0.0.2", "port", port, "peer", "127.0.0.1", name="udp-b"))
        b.irm_ok("ipcp", "enroll", "name", "net-b", "type", "unicast", "layer", "net", "autobind")
        b.irm_ok("ipcp", "connect", "name", "net-b", "dst", "net-a")
        a.note_children()
        b.note_children()
        for extra in ([], ["-q", "data", "--encrypt"]):
            r = b.run("oping", "-n", "pong", "-c", "2", "-i", "100", *extra, timeout=60)
            assert "2 received" in r.stdout, r.stdout + r.stderr
    finally:
        stop_irmd(b)
        stop_irmd(a)
    for irmd in (a, b):
        assert [m.string for m in lines(irmd) if m.group(4) != "INFO"] == [], irmd.log_text()


def test_what_a_started_server_prints_for_its_clients_reaches_the_log_bounded(tmp_path: Path) -> None:
    """oecho prints each message it echoes; a client sending lines by the thousand would have the
    IRMd log them all (one line per byte of newlines). Programs' lines are logged at a bounded rate,
    each cut short, and the echo goes on."""
    from flowlib import flow_alloc
    from flowlib.irm import IrmClient

    irmd = start_irmd(tmp_path)
    irm = IrmClient(irmd.sock)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("bind", "program", "oecho", "name", "echo", "auto", "--", "-l")
        irmd.irm_ok("name", "register", "echo", "layer", "local")
        before = irmd.log.stat().st_size
        for _ in range(20):
            with flow_alloc("echo", timeout=10, irm=irm) as flow:
                flow.set_timeout(10)
                flow.write(b"\n" * 30000 + b"x" * 30000)
                assert len(flow.read()) == 60000
        grown = irmd.log.stat().st_size - before
    finally:
        irm.close()
        stop_irmd(irmd)
    assert grown < 100_000, f"{grown} bytes of log for 1.2 MB echoed"


def test_what_a_started_program_writes_to_stderr_reaches_the_log_bounded(tmp_path: Path) -> None:
    """A started program's stderr goes through the same bounded relay as its stdout."""
    from flowlib import flow_alloc
    from proto.errors import FlowError

    loud = tmp_path / "loud"
    loud.write_text("#!/bin/sh\nhead -c 2000000 /dev/zero | tr '\\0' x | fold -w 100 >&2\nexec sleep 30\n")
    loud.chmod(0o755)
    irmd = start_irmd(tmp_path)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.irm_ok("bind", "program", str(loud), "name", "loud", "auto")
        irmd.irm_ok("name", "register", "loud", "layer", "local")
        before = irmd.log.stat().st_size
        with contextlib.suppress(FlowError):
            flow_alloc("loud", timeout=3, irm=IrmClient(irmd.sock)).close()  # it starts, and never accepts
        time.sleep(2)
        grown = irmd.log.stat().st_size - before
        assert "loud" in irmd.log_text()
    finally:
        stop_irmd(irmd)
    assert grown < 100_000, f"{grown} bytes of log for 2 MB written to stderr"


def test_a_message_carrying_a_peers_words_stays_on_its_own_line(tmp_path: Path) -> None:
    """What a peer or another user put in a record (a reason, a name, a path) cannot start a line of its
    own in a daemon's log, nor reach a terminal as escapes; a traceback keeps its lines."""
    log = tmp_path / "d.log"
    program = (
        "import argparse, logging\n"
        "from proto import logs\n"
        f"logs.setup('irmd', argparse.Namespace(log={str(log)!r}))\n"
        "logging.getLogger('irmd').warning('refused %s', 'x\\n2099-01-01 00:00:00.000 irmd[1] INFO: forged\\x1b[2J')\n"
        "try:\n"
        "    raise ValueError('boom')\n"
        "except ValueError:\n"
        "    logging.getLogger('irmd').exception('failed')\n"
    )
    subprocess.run([str(BIN / "python"), "-c", program], check=True, timeout=60)
    lines = log.read_text().splitlines()
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == 1 and refused[0].endswith("refused x\\n2099-01-01 00:00:00.000 irmd[1] INFO: forged\\x1b[2J")
    assert not any(line.startswith("2099") for line in lines) and "\x1b" not in log.read_text()
    assert any(line.startswith("Traceback") for line in lines) and lines[-1] == "ValueError: boom"
