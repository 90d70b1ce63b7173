"""The command lines of the tools Ouroboros 0.23 ships (oping, operf, ocbr, oecho, obc, ovpn): what
each does with an option it does not take, and with a stdout whose reader has gone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from helpers import BIN, IrmdProc

from apps import obc, ocbr, oecho, operf, oping, ovpn
from flowlib.flow import flow_accept
from flowlib.irm import IrmClient
from proto import logs


@pytest.fixture
def parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool's main run in this process: its logging set up nowhere (it would take over this process's)."""
    monkeypatch.setattr(logs, "setup", lambda *_, **__: None)


# C's oecho and obc print their usage and return 0 on an option they do not take.
@pytest.mark.parametrize(("tool", "code"), [(oecho, 0), (obc, 0)])
@pytest.mark.parametrize("argv", [["--bogus"], ["-l", "--bogus"]])
@pytest.mark.usefixtures("parsing")
def test_an_option_c_does_not_know_prints_the_usage_and_exits_with_cs_status(
    tool: ModuleType, code: int, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        tool.main(argv)
    assert done.value.code == code
    assert capsys.readouterr().out.startswith(f"Usage: {tool.__name__.split('.')[-1]} [OPTION]...\n")


# -h and --help: the usage in C's layout, on stdout, and C's status: oping's 1 (it has no --help of its own
# and prints its usage for any word it does not know), ovpn's (getopt's --help) and the others' 0.
@pytest.mark.parametrize(
    ("tool", "code"), [(oping, 1), (operf, 0), (ocbr, 0), (oecho, 0), (obc, 0), (ovpn, 0)], ids=lambda t: str(t)
)
@pytest.mark.parametrize("word", ["--help", "-h"])
@pytest.mark.usefixtures("parsing")
def test_help_is_cs_usage_on_stdout_with_cs_status(
    tool: ModuleType, code: int, word: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        tool.main([word])
    out, err = capsys.readouterr()
    name = tool.__name__.split(".")[-1]
    assert (done.value.code, err) == (code, "")
    lines = out.splitlines()
    assert lines[0] == f"Usage: {name} [OPTION]...", out
    assert lines[-1] == f"  -h, --help{' ' * 14}display this help text and exit", out
    # an option a line, its short and long forms first: what C's usage lists is all there
    assert re.search(r"^  -l, --listen {12}\S", out, re.M) or name in ("obc", "ovpn"), out
    assert re.search(r"^  -n, --\S+ +\S", out, re.M), out
    assert all(len(line) <= 79 for line in lines), out


# C's ovpn reads its options with getopt_long: what it does not take is said on stderr, and nothing
# else; a value it cannot use, or one missing, is said on stdout with its usage. Status 1 for all.
@pytest.mark.parametrize(
    ("argv", "out", "err"),
    [
        (["--bogus"], "", "ovpn: unrecognized option '--bogus'\n"),
        (["-x", "-i", "10.0.0.1"], "", "ovpn: invalid option -- 'x'\n"),
        (["-n"], "", "ovpn: option requires an argument -- 'n'\n"),
        (["-i", "10.0.0.1", "--name"], "", "ovpn: option '--name' requires an argument\n"),
        (["--na"], "", "ovpn: option '--name' requires an argument\n"),  # its whole name, as getopt says it
        (["-x", "-n"], "", "ovpn: invalid option -- 'x'\n"),  # the first thing wrong, as getopt
        (["--v"], "", "ovpn: option '--v' is ambiguous; possibilities: '--verbose' '--version'\n"),
        # getopt takes the word after -n as its value, '-i' as well: 10.0.0.1 is then left over
        (["-n", "-i", "10.0.0.1", "-m", "255.0.0.0"], "Unknown arguments specified: 10.0.0.1 \n\nUsage: ovpn", ""),
        (["-i", "x", "-m", "255.0.0.0"], "Invalid IP address: x.\n\nUsage: ovpn", ""),
        (["-i", "10.0.0.1", "-m", "255.0.255.0"], "Invalid subnet mask: 255.0.255.0.\n\nUsage: ovpn", ""),
        (["-i", "10.0.0.1"], "Please specify a subnetmask.\n\nUsage: ovpn", ""),
        (["-m", "255.0.0.0"], "Please specify an IP address.\n\nUsage: ovpn", ""),
        (["x", "-i", "10.0.0.1", "-m", "255.0.0.0"], "Unknown arguments specified: x \n\nUsage: ovpn", ""),
    ],
)
@pytest.mark.usefixtures("parsing")
def test_ovpn_says_what_is_wrong_with_its_command_line_as_cs(
    argv: list[str], out: str, err: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ovpn.os, "geteuid", lambda: 0)  # as root: what comes after is the command line's
    with pytest.raises(SystemExit) as done:
        ovpn.main(argv)
    said = capsys.readouterr()
    assert done.value.code == 1
    assert said.out.startswith(out) and (out or not said.out), said.out
    assert said.err == err


# C's ovpn asks for root before it reads its command line: as another user, all it says is that.
@pytest.mark.parametrize("argv", [["--help"], ["--bogus"], ["-n"], ["-i", "10.0.0.1", "-m", "255.0.0.0"]])
@pytest.mark.usefixtures("parsing")
def test_ovpn_as_another_user_says_it_must_be_run_as_root_whatever_its_command_line(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ovpn.os, "geteuid", lambda: 65534)
    with pytest.raises(SystemExit) as done:
        ovpn.main(argv)
    assert done.value.code == 1
    assert capsys.readouterr() == ("ovpn must be run as root.\n", "")


# What each prints on stdout before it needs an IRMd: that no server (or name) was given, or its usage.
@pytest.mark.parametrize("argv", [["oping"], ["operf"], ["ocbr"], ["obc"], ["oecho", "--bogus"], ["ovpn", "--bogus"]])
def test_a_tool_whose_stdout_reader_has_gone_exits_1_without_a_traceback(argv: list[str]) -> None:
    """`oping ... | head`: C's tools die of SIGPIPE, silently; ours exit 1 with no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the tool writes its first line
    try:
        r = subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30
        )
    finally:
        os.close(write_end)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr


def test_oecho_prints_a_c_clients_message_up_to_its_nul_as_cs_server_does(capsys: pytest.CaptureFixture[str]) -> None:
    """C's oecho client sends its string with the NUL that ends it; C's server prints it with %.*s."""
    sdu = b"Client says hi!\0"
    assert oecho.reply(None, sdu) == sdu  # the flow is not used
    assert capsys.readouterr().out == "Message from client is Client says hi!.\n"


# Without an IRMd, each server says so under its own name, as every client does.
@pytest.mark.parametrize("tool", ["oping", "operf", "oecho", "ocbr"])
def test_a_server_that_finds_no_irmd_says_so_under_its_own_name(tool: str, tmp_path: Path) -> None:
    env = {**os.environ, "OUROBOROS_SOCK": str(tmp_path / "none.sock")}
    r = subprocess.run([str(BIN / tool), "-l"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{tool}: cannot reach the IRMd at "), r.stderr


@pytest.mark.timeout(60)
def test_oechos_client_sends_its_message_as_a_c_string_as_cs_does(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    """C's client writes strlen + 1 bytes: a C server (or any reader of the SDU) finds the NUL it expects."""
    server = client_factory()
    env = {**os.environ, "OUROBOROS_SOCK": str(irmd.sock)}
    client = subprocess.Popen(
        [str(BIN / "oecho"), "-n", bound_name, "-m", "hello"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        with flow_accept(timeout=20, irm=server) as flow:
            flow.set_timeout(10)
            sdu = flow.read()
            assert sdu == b"hello\0"
            flow.write(sdu)
            out, _ = client.communicate(timeout=20)
        assert (client.returncode, out) == (0, "Server replied with hello\n")
    finally:
        client.kill()
        client.wait()


# C's clients print one line on stdout when flow_alloc fails (oping with the errno it got: ENAME, 1007,
# for a name no layer knows), and end with their status: 1, or 255 where main returns -1 (ocbr, oecho).
# Ours say why on stderr as well.
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "out", "code"),
    [
        (["oping", "-n", "nobody", "-c", "1"], "Failed to allocate flow: -1007.\n", 1),
        (["operf", "-n", "nobody", "-d", "10"], "Failed to allocate flow.\n", 1),
        (
            ["ocbr", "-n", "nobody", "-d", "1"],
            "Client started, duration 1, rate 1000000 b/s, size 1000 B.\nFailed to allocate flow.\n",
            255,
        ),
        (["oecho", "-n", "nobody"], "Failed to allocate flow.\n", 255),
    ],
)
def test_a_client_whose_flow_is_refused_prints_cs_line_and_exits_with_cs_status(
    irmd: IrmdProc, local_layer: str, argv: list[str], out: str, code: int
) -> None:
    r = irmd.run(*argv)
    assert (r.returncode, r.stdout) == (code, out), r.stdout + r.stderr
    assert r.stderr.startswith(f"{argv[0]}: ") and "not found" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_an_ovpn_whose_flow_is_refused_prints_cs_line_alone_on_stdout(irmd: IrmdProc, local_layer: str) -> None:
    r = irmd.run("ovpn", "-n", "nobody", "-i", "10.0.0.1", "-m", "255.0.0.0")
    assert (r.returncode, r.stdout) == (1, "Allocating a flow to nobody.\nFailed to allocate flow.\n"), r.stdout
    assert r.stderr.startswith("ovpn: ") and "not found" in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_a_reader_or_writer_that_cannot_join_the_layer_exits_255_as_cs_obc(irmd: IrmdProc) -> None:
    for argv in (["-n", "nolayer"], ["-l", "-n", "nolayer"]):
        r = irmd.run("obc", *argv)
        assert r.returncode == 255, r.stdout + r.stderr
        assert r.stdout.endswith("Failed to join broadcast.\n"), r.stdout  # C's line: the reason on stderr
        assert r.stderr.startswith("obc: "), r.stderr


def _oecho(irmd: IrmdProc, *argv: str) -> subprocess.Popen[str]:
    """An oecho client of `irmd`, its output piped."""
    env = {**os.environ, "OUROBOROS_SOCK": str(irmd.sock)}
    return subprocess.Popen(
        [str(BIN / "oecho"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.mark.timeout(60)
def test_an_oecho_client_whose_server_never_answers_says_so_as_cs(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    """C's client prints "Failed to read packet." and its main returns -1: status 255."""
    server = client_factory()
    client = _oecho(irmd, "-n", bound_name, "-m", "hello")
    try:
        with flow_accept(timeout=20, irm=server) as flow:
            flow.set_timeout(10)
            assert flow.read() == b"hello\0"  # read, and never answered
            out, err = client.communicate(timeout=30)
        assert (client.returncode, out) == (255, "Failed to read packet.\n"), out + err
        assert err.startswith("oecho: "), err
    finally:
        client.kill()
        client.wait()


@pytest.mark.timeout(60)
def test_an_interrupted_oecho_client_dies_of_sigint_saying_nothing_as_cs(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    """C's oecho takes no signal itself: Ctrl-C while it waits for its reply ends it, with no more said.
    Ours ended in a traceback."""
    server = client_factory()
    client = _oecho(irmd, "-n", bound_name)
    try:
        with flow_accept(timeout=20, irm=server) as flow:
            flow.set_timeout(10)
            flow.read()  # the client now waits for its reply
            client.send_signal(signal.SIGINT)
            out, err = client.communicate(timeout=20)
        assert (client.returncode, out, err) == (-signal.SIGINT, "", "")
    finally:
        client.kill()
        client.wait()


def _server(irmd: IrmdProc, name: str, *argv: str) -> subprocess.Popen[str]:
    """A tool's server started by hand, its stdout a pipe, bound to `name` (registered in 'local')."""
    proc = subprocess.Popen(
        [str(BIN / argv[0]), *argv[1:]], env=irmd.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # its banner: it serves
    irmd.irm_ok("bind", "process", str(proc.pid), "name", name)
    irmd.irm_ok("name", "register", name, "layer", "local")
    return proc


def _ended(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_opings_server_ends_0_on_cs_signals(irmd: IrmdProc, local_layer: str, sig: signal.Signals) -> None:
    """C's oping server takes SIGINT, SIGTERM and SIGHUP alike: it stops and exits 0. SIGHUP killed ours."""
    server = _server(irmd, "pong2", "oping", "-l")
    try:
        server.send_signal(sig)
        out, _ = server.communicate(timeout=20)
    finally:
        server.kill()
        server.wait()
    assert (server.returncode, out) == (0, "")


@pytest.mark.timeout(60)
def test_oechos_server_answers_one_message_a_flow_and_says_only_cs_lines(irmd: IrmdProc, local_layer: str) -> None:
    """C's oecho server reads one message, echoes it and deallocates the flow: nothing more is said."""
    server = _server(irmd, "echo1", "oecho", "-l")
    try:
        for text in ("one", "two"):
            r = irmd.run("oecho", "-n", "echo1", "-m", text)
            assert (r.returncode, r.stdout) == (0, f"Server replied with {text}\n"), r.stdout + r.stderr
        time.sleep(0.5)
    finally:
        out = _ended(server)
    assert out == "New flow.\nMessage from client is one.\nNew flow.\nMessage from client is two.\n", out


@pytest.mark.timeout(60)
def test_opings_server_says_nothing_when_a_client_leaves_and_times_its_flow_out_as_cs(
    irmd: IrmdProc, local_layer: str
) -> None:
    """C's oping server does not hear of a client's deallocation: its cleaner says the flow timed out
    once it has been idle for 10 s."""
    server = _server(irmd, "pong1", "oping", "-l")
    try:
        r = irmd.run("oping", "-n", "pong1", "-c", "1", "-i", "10")
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(12)
    finally:
        out = _ended(server)
    assert re.fullmatch(r"New flow (\d+)\.\nReceived 64 bytes on fd \1\.\nFlow \1 timed out\.\n", out), out
