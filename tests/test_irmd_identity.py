"""Who a local process is (irmd.identity): the kernel's exe, argv and start time, never its claims;
and which processes run a bound program, binary or script."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import irmd.identity
from irmd.identity import Peer, Program, peer_of, proc_start, proc_uids, program_of, read_peer, runs
from transports.unix import TrustError, peer_groups

PYTHON = os.path.realpath(sys.executable)


def test_the_kernel_names_the_peer_of_a_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        me = peer_of(a)
    assert (me.pid, me.uid, me.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert me.exe == PYTHON and me.start == proc_start(os.getpid()) > 0
    assert me.cwd == os.getcwd()
    assert me.groups == tuple(sorted(os.getgroups()))


CONNECTS = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.recv(1)"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="starting a process with other groups needs root"
)
@pytest.mark.timeout(30)
def test_the_kernel_names_the_gid_and_groups_a_peer_connected_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not its account's: a process holds the ids it was given (setgid, setgroups), whatever the
    accounts database says; a gid past 2**31 is one too. Groups past the bound are not known."""
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(20)
        child = subprocess.Popen(
            ["setpriv", "--regid=3000000000", "--groups=4243,4244", sys.executable, "-c", CONNECTS, path]
        )
        try:
            conn, _ = listener.accept()
            with conn:
                peer = peer_of(conn)
                assert (peer.pid, peer.uid, peer.gid, peer.groups) == (child.pid, 0, 3000000000, (4243, 4244))
                assert peer_groups(conn, 2) == (4243, 4244) and peer_groups(conn, 1) is None
                monkeypatch.setattr(irmd.identity, "MAX_PEER_GROUPS", 1)
                assert peer_of(conn).groups is None  # more than a flow carries: known to no one
        finally:
            child.kill()
            child.wait()


def test_a_process_gone_has_no_start_time_nor_uids() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    assert proc_start(p.pid) == 0 and proc_uids(p.pid) is None
    gone = read_peer(p.pid, 0, 0)
    assert (gone.exe, gone.argv, gone.start) == ("", (), 0)


@pytest.mark.timeout(30)
def test_a_connection_whose_process_left_is_known_by_its_ids_alone(tmp_path: Path) -> None:
    """The connecting process exited before it was accepted: whatever now has its pid is not it, so
    nothing of /proc is taken (SO_PEERPIDFD; before Linux 6.5, the uid /proc shows must be the
    connection's)."""
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        child = subprocess.Popen([sys.executable, "-c", CONNECTS.replace("s.recv(1)", ""), path])
        assert child.wait(20) == 0
        conn, _ = listener.accept()
        with conn:
            peer = peer_of(conn)
    assert (peer.pid, peer.uid) == (child.pid, os.geteuid())
    assert (peer.start, peer.exe, peer.argv, peer.ancestors) == (0, "", (), ())
    me, other = os.geteuid(), os.geteuid() + 1
    assert read_peer(os.getpid(), me, 0, pidfd=irmd.identity.NO_PIDFD).exe == PYTHON
    assert read_peer(os.getpid(), other, 0, pidfd=irmd.identity.NO_PIDFD).start == 0  # another uid's process


def _argv_held(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """Reads of /proc/PID/cmdline wait (as when the process's memory lock is held) until the event
    is set; the paths of the reads tried are listed."""
    from irmd import identity

    stuck, opened, real_open = threading.Event(), [], open

    def held_open(path: str, *args: object, **kwargs: object) -> object:
        if path.endswith("/cmdline"):
            opened.append(path)
            stuck.wait(20)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(identity, "open", held_open, raising=False)
    return stuck, opened


@pytest.mark.timeout(30)
def test_a_users_process_is_known_without_its_argv_so_it_holds_no_reader_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the script rule reads argv, and only for uids a program binding names (admins'): a user's
    process that keeps its argv from being read (its memory lock held, simulated here) neither makes
    the IRMd wait nor takes the readers that root's script servers need."""
    from irmd import identity

    stuck, opened = _argv_held(monkeypatch)
    before = threading.active_count()
    try:
        start = time.monotonic()
        users = [read_peer(os.getpid(), 65534, 65534, argv=False) for _ in range(identity.ARGV_STUCK + 3)]
        assert time.monotonic() - start < identity.ARGV_WAIT  # not waited for, not once
        assert all(p.argv == () and p.cwd == "" and p.exe == PYTHON and p.start > 0 for p in users)
        assert not opened and threading.active_count() == before
    finally:
        stuck.set()


def test_argv_zero_is_what_the_process_says_exe_is_what_runs() -> None:
    p = subprocess.Popen(["/bin/sleep", "30"], executable="/bin/sleep")
    try:
        liar = subprocess.Popen(["oping", "30"], executable="/bin/sleep")  # argv[0] says oping
        try:
            deadline = time.monotonic() + 5
            while read_peer(liar.pid, 0, 0).argv[:1] != ("oping",) and time.monotonic() < deadline:
                time.sleep(0.01)
            peer = read_peer(liar.pid, 0, 0)
            assert peer.argv[0] == "oping" and peer.exe == os.path.realpath("/bin/sleep")
        finally:
            liar.kill()
            liar.wait()
    finally:
        p.kill()
        p.wait()


def script(tmp_path: Path, first_line: str, name: str = "server.py") -> Path:
    path = tmp_path / name
    path.write_text(f"{first_line}\nimport time\n")
    path.chmod(0o755)
    return path


def test_a_binary_is_what_the_kernel_runs() -> None:
    prog = program_of("/bin/sleep")
    assert not prog.script and prog.real == os.path.realpath("/bin/sleep")
    assert runs(prog, Peer(1, 0, 0, 1, os.path.realpath("/bin/sleep"), ("sleep",), "/"))
    assert not runs(prog, Peer(1, 0, 0, 1, PYTHON, ("sleep",), "/"))


def test_a_script_runs_as_its_interpreter_with_the_script_after_it(tmp_path: Path) -> None:
    path = script(tmp_path, f"#!{sys.executable}")
    prog = program_of(str(path))
    assert prog.script and prog.interpreter == PYTHON
    assert runs(prog, Peer(1, 0, 0, 1, PYTHON, (sys.executable, str(path)), "/"))
    assert runs(prog, Peer(1, 0, 0, 1, PYTHON, ("python3", "server.py"), str(tmp_path)))  # relative to its cwd
    assert not runs(prog, Peer(1, 0, 0, 1, PYTHON, ("python3", "-c", "evil", str(path)), "/"))
    assert not runs(prog, Peer(1, 0, 0, 1, PYTHON, ("python3", "other.py"), str(tmp_path)))
    assert not runs(prog, Peer(1, 0, 0, 1, os.path.realpath("/bin/sh"), ("sh", str(path)), "/"))


def test_an_env_shebang_matches_the_interpreter_by_name(tmp_path: Path) -> None:
    path = script(tmp_path, "#!/usr/bin/env python3")
    prog = program_of(str(path))
    assert prog.interpreter == "python3"
    assert runs(prog, Peer(1, 0, 0, 1, "/usr/bin/python3.11", ("python3", str(path)), "/"))
    assert not runs(prog, Peer(1, 0, 0, 1, "/usr/bin/perl", ("perl", str(path)), "/"))


def test_a_shebang_argument_may_come_before_the_script(tmp_path: Path) -> None:
    path = script(tmp_path, f"#!{sys.executable} -u")
    prog = program_of(str(path))
    assert prog.interp_arg == "-u"
    assert runs(prog, Peer(1, 0, 0, 1, PYTHON, (sys.executable, "-u", str(path)), "/"))


@pytest.mark.parametrize(
    ("line", "want"),
    [
        (b"#!/bin/sh", ("/bin/sh", "")),
        (b"#! \t/bin/sh \t-e -x \t", ("/bin/sh", "-e -x")),  # blanks and tabs around; one argument
        (b"#!/bin/sh\r", ("/bin/sh\r", "")),  # a CR is part of the name, as the kernel reads it
        (b"#!/bin/sh\x0b-e", ("/bin/sh\x0b-e", "")),  # only blanks and tabs split
        (b"#!", ("", "")),
        (b"#!   \n/bin/sh", ("", "")),
        (b"/bin/sh", None),
    ],
)
def test_one_reading_of_a_shebang_line_for_whom_a_program_is_and_what_it_runs(
    tmp_path: Path, line: bytes, want: tuple[str, str] | None
) -> None:
    """The IRMd tells a script's processes by its interpreter (program_of) and checks that interpreter
    before it starts the script (spawn): both read the #! line as the kernel does, from one parser."""
    from irmd.identity import shebang
    from irmd.spawn import _interpreters

    assert shebang(line + b"\nrest\n") == want
    path = tmp_path / "prog"
    path.write_bytes(line + b"\n")
    prog = program_of(str(path))
    if want is None:
        assert _interpreters(str(path)) == [] and not prog.interpreter
        return
    if not want[0]:
        with pytest.raises(TrustError, match="names no interpreter"):
            _interpreters(str(path))
        assert not prog.interpreter
        return
    assert prog.interp_arg == want[1]
    assert _interpreters(str(path)) == [want[0]]


def test_a_live_script_process_runs_its_program(tmp_path: Path) -> None:
    path = tmp_path / "waiter"
    path.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    path.chmod(0o755)
    p = subprocess.Popen([str(path)])
    try:
        deadline = time.monotonic() + 5
        while str(path) not in read_peer(p.pid, 0, 0).argv and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runs(program_of(str(path)), read_peer(p.pid, 0, 0))
        assert not runs(Program("/bin/sleep", os.path.realpath("/bin/sleep")), read_peer(p.pid, 0, 0))
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("argv", [(), ("python3",)])
def test_an_interpreter_without_a_script_runs_no_script(tmp_path: Path, argv: tuple[str, ...]) -> None:
    prog = program_of(str(script(tmp_path, f"#!{sys.executable}")))
    assert not runs(prog, Peer(1, 0, 0, 1, PYTHON, argv, "/"))


def test_unknown_exe_runs_nothing() -> None:
    assert not runs(program_of("/bin/sleep"), Peer(1, 0, 0, 1, "", ("sleep",), "/"))


def test_a_peer_knows_its_ancestors_by_pid_and_start_time() -> None:
    from irmd.identity import proc_ancestors

    p = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        child = 0
        while not child and time.monotonic() < deadline:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
            child = int(kids[0]) if kids else 0
            time.sleep(0.01)
        ancestors = proc_ancestors(child)
        assert ancestors[:2] == ((p.pid, proc_start(p.pid)), (os.getpid(), proc_start(os.getpid())))
    finally:
        p.kill()
        p.wait()


@pytest.mark.timeout(30)
def test_a_process_whose_argv_cannot_be_read_holds_up_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel reads argv under the process's memory lock, which the process can keep taken: the
    IRMd then learns who it is without its argv (no script rule), within ARGV_WAIT, and only
    ARGV_STUCK threads ever wait on such reads."""
    from irmd import identity

    stuck, _ = _argv_held(monkeypatch)
    before = threading.active_count()
    try:
        start = time.monotonic()
        peers = [read_peer(os.getpid(), os.geteuid(), os.getegid()) for _ in range(identity.ARGV_STUCK + 3)]
        took = time.monotonic() - start
        assert all(p.argv == () and p.exe == PYTHON and p.start > 0 for p in peers)
        assert took < (identity.ARGV_STUCK + 1) * identity.ARGV_WAIT + 1  # past the stuck ones: at once
        assert threading.active_count() - before == identity.ARGV_STUCK
    finally:
        stuck.set()
    deadline = time.monotonic() + 10
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    me = read_peer(os.getpid(), os.geteuid(), os.getegid())  # its readers released, argv is read again
    shown = Path("/proc/self/cmdline").read_bytes().rstrip(b"\0").split(b"\0")  # (a worker retitles itself)
    assert me.argv and me.argv == tuple(a.decode(errors="surrogateescape") for a in shown)
