"""operf, ocbr and obc end to end, as C Ouroboros 0.23's tools: their options, their wire and their output.

operf and ocbr over a local layer (servers started on demand by the IRMd), obc over a broadcast layer.
"""

from __future__ import annotations

import argparse
import re
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
from helpers import BIN, IrmdProc, interrupted
from unicast_net import Cluster

from apps import ocbr, operf, oping
from flowlib import FlowError, flow_alloc
from flowlib.irm import IrmClient
from proto import logs

C_STATS = re.compile(
    r"--- perf perf statistics ---\n(\d+) packets transmitted, (\d+) received, (\d+)% packet loss, "
    r"time: [\d.]+ ms, bandwidth: ([\d.]+) Mb/s\."
)
OUR_COUNTS = re.compile(
    r"(\d+) SDUs sent, (\d+) received, (-?\d+) lost \((-?\d+) gaps in sequence\), "
    r"(\d+) out-of-order, (\d+) corrupt"
)


@pytest.fixture
def parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool's main run in this process to see what it makes of a command line: its logging set up
    nowhere (it would take over this process's)."""
    monkeypatch.setattr(logs, "setup", lambda *_, **__: None)


@pytest.fixture
def serving(irmd: IrmdProc, local_layer: str) -> Callable[[str, str], None]:
    def serve(name: str, prog: str, *args: str) -> None:
        irmd.irm_ok("bind", "program", prog, "name", name, "auto", "--", "-l", *args)
        irmd.irm_ok("name", "register", name, "layer", local_layer)

    return serve


def run(irmd: IrmdProc, *argv: str, timeout: float = 60.0) -> str:
    r = irmd.run(*argv, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}):\n{out}"
    return out


# -- operf ------------------------------------------------------------------------------------------


def test_operf_unidirectional_prints_cs_lines_and_no_statistics(irmd: IrmdProc, serving: Callable[..., None]) -> None:
    serving("perf", "operf")
    r = irmd.run("operf", "-n", "perf", "-d", "300", "-r", "1M")
    assert r.returncode == 0, r.stdout + r.stderr
    # as C's: no statistics for a unidirectional test (and nothing asked of the server)
    assert r.stdout == (
        "Doing a unidirectional test.\nSending 1500 byte packets for 0 s to perf at 1.000 Mb/s.\n\nTest finished.\n"
    ), r.stdout


def test_operf_unidirectional_paced_reports_our_counts_when_asked_and_loses_nothing(
    irmd: IrmdProc, serving: Callable[..., None]
) -> None:
    serving("perf", "operf")
    out = run(irmd, "operf", "-n", "perf", "-d", "1s", "-r", "8M", "-s", "1000", "--report")
    assert "Doing a unidirectional test." in out
    assert "Sending 1000 byte packets for 1 s to perf at 8.000 Mb/s." in out and "Test finished." in out
    assert not C_STATS.search(out), out  # C's block is the bidirectional test's
    m = OUR_COUNTS.search(out)
    assert m, out
    sent, rcvd = int(m[1]), int(m[2])
    assert 900 <= sent <= 1100 and rcvd == sent, out  # 1000 SDUs/s for a second
    assert m.groups()[2:] == ("0", "0", "0", "0")
    mbps = re.search(r"sender: ([\d.]+) Mb/s", out)
    assert mbps and 6.0 < float(mbps[1]) < 10.0, out
    summary = re.compile(
        rf"Flow \d+: {sent} packets \({sent * 1000} bytes\) in \d+ ms => .* 0 lost, "
        r"0 out-of-order, 0 corrupt"
    )
    deadline = time.monotonic() + 10  # the server writes it once it sees the flow go
    while not summary.search(irmd.log_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert summary.search(irmd.log_text()), irmd.log_text()[-2000:]
    assert "Doing a unidirectional test." in irmd.log_text()


def test_operf_bidirectional_flood_gets_every_sdu_back(irmd: IrmdProc, serving: Callable[..., None]) -> None:
    serving("perf", "operf")
    r = irmd.run("operf", "-n", "perf", "-t", "bi", "-d", "1500", "-f", "-s", "200")
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    # C's seconds are whole: 1500 ms is "1"
    assert "Doing a bidirectional test." in out and "Flooding perf with 200 byte packets for 1 seconds." in out
    m = C_STATS.search(out)
    assert m, out
    assert int(m[1]) > 100 and int(m[2]) == int(m[1]) and m[3] == "0", out
    assert out.endswith(m[0] + "\n"), out  # C's statistics end it
    out = run(irmd, "operf", "-n", "perf", "-t", "bi", "-d", "500", "-f", "-s", "200", "--report")
    assert C_STATS.search(out) and OUR_COUNTS.search(out).group(6) == "0", out  # type: ignore[union-attr]


def test_operf_rates_take_cs_units_and_sizes_its_bounds(irmd: IrmdProc, serving: Callable[..., None]) -> None:
    serving("perf", "operf")
    out = run(irmd, "operf", "-n", "perf", "-d", "300", "-r", "500", "-s", "10", "--sleep")
    assert "Packet size set to 64 bytes." in out
    assert "at 0.500 Mb/s" in out  # 500 with no unit is kb/s, as C's


@pytest.mark.parametrize(
    ("argv", "code", "out"),
    [
        (["-n", "perf", "-t", "sideways"], 1, "Invalid test type.\n"),
        (["-t", "bi"], 1, "No server specified.\n"),
        (["-n", "perf", "-r", "5x"], 1, "Unknown rate unit: x.\n"),
        (["-n", "perf", "-d", "5y"], 1, "Unknown time unit: y.\n"),
        (["-n", "perf", "-d", "0.5"], 1, "Unknown time unit: .5.\n"),  # a fraction of a ms, as C's
    ],
)
@pytest.mark.usefixtures("parsing")
def test_operf_refuses_as_c_does(argv: list[str], code: int, out: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        operf.main(argv)
    assert (done.value.code, capsys.readouterr().out) == (code, out)


@pytest.mark.parametrize("tool", [operf, ocbr])
@pytest.mark.parametrize("argv", [["--bogus"], ["-l", "--bogus"], ["--sle"]])
@pytest.mark.usefixtures("parsing")
def test_an_option_c_does_not_know_prints_the_usage_and_exits_0_as_cs_operf_and_ocbr(
    tool: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        tool.main(argv)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"Usage: {tool.__name__.split('.')[-1]} [OPTION]...\n")


def test_operfs_wire_is_cs_a_test_type_then_ids(irmd: IrmdProc, serving: Callable[..., None]) -> None:
    """What a C operf client sends, written here by hand: our server counts it and says so when asked."""
    serving("perf", "operf")
    client = IrmClient(irmd.sock)
    flow = flow_alloc("perf", timeout=10, irm=client)
    try:
        flow.write(struct.pack("=I", 0))  # uni
        for i in (0, 1, 2, 4, 3):  # one late
            flow.write(struct.pack("=I", i) + bytes(60))
        flow.write(struct.pack("=I", 5) + b"\1" + bytes(59))  # corrupt
        flow.write(operf.ASK)
        flow.set_timeout(5)
        reply = flow.read()
        assert operf.REPORT.unpack(reply) == (operf.ANSWER, 6, 6 * 64, 0, 1, 1)
    finally:
        flow.close()
        client.close()


# -- ocbr -------------------------------------------------------------------------------------------


def test_ocbr_sends_at_its_rate_and_the_server_reports_each_interval(
    irmd: IrmdProc, serving: Callable[..., None]
) -> None:
    serving("cbr", "ocbr", "-i", "1", "-t", "2")
    out = run(irmd, "ocbr", "-n", "cbr", "-d", "2", "-r", "800k", "-s", "1000")
    assert "Client started, duration 2, rate 800000 b/s, size 1000 B." in out
    m = re.search(r"sent statistics: +(\d+) packets, +(\d+) bytes in +(\d+) ms, ([\d.]+) Mb/s", out)
    assert m, out
    assert 180 <= int(m[1]) <= 210 and int(m[2]) == int(m[1]) * 1000  # 100 packets/s for 2 s
    assert 0.7 < float(m[4]) < 0.9
    deadline = time.monotonic() + 10
    while "timed out" not in irmd.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = irmd.log_text()
    # C's lines: its start line, "New flow." and, once the flow is silent, "Test on flow N timed out"
    assert re.search(r"\bServer started, interval is 1 s, timeout is 2 s\.$", log, re.M), log[-2000:]
    assert len(re.findall(r"\bNew flow\.$", log, re.M)) == 1
    reports = [int(n) for n in re.findall(r"Flow +\d+: +(\d+) packets \( *\d+ bytes\) in +\d+ ms => ", log)]
    assert len(reports) >= 2 and sum(reports) == int(m[1]), log[-2000:]
    assert len(re.findall(r"\bTest on flow \d+ timed out$", log, re.M)) == 1
    assert "Ouroboros cbr server" not in log and not re.search(r"Flow \d+ (timed out|deallocated)\.", log)


@pytest.mark.parametrize(
    ("argv", "out"),
    [
        (["-n", "cbr", "-s", "524289"], "Maximum size: 524288.\n"),
        (["-n", "cbr", "-s", "-1"], "Size overflow.\n"),
        (["-n", "cbr", "-r", "0"], "Invalid rate.\n"),
        (["-n", "cbr", "-r", "fast"], "Invalid rate.\n"),
    ],
)
@pytest.mark.usefixtures("parsing")
def test_ocbr_refuses_as_c_does(argv: list[str], out: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        ocbr.main(argv)
    assert (done.value.code, capsys.readouterr().out) == (1, out)


@pytest.mark.usefixtures("parsing")
def test_ocbr_without_a_server_prints_the_usage_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        ocbr.main(["-d", "1"])
    assert done.value.code == 1
    assert capsys.readouterr().out.startswith("No server specified.\nUsage: ocbr [OPTION]...\n")


def test_ocbr_reads_rates_as_c() -> None:
    assert [ocbr.c_rate(t) for t in ("800k", "2M", "1G", "100", "5x", "x")] == [8e5, 2e6, 1e9, 100.0, 5.0, 0.0]


# Ours: a fraction of a unit larger than a ms, so long as it comes to whole ms (C's refuses any fraction).
@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("tool", "argv", "expected"),
    [
        (oping, ["-i", "0.5s"], {"interval": 0.5}),
        (oping, ["-i", "1500"], {"interval": 1.5}),
        (oping, ["-i", "0.5s", "-d", "1.5s"], {"count": 3}),
        (operf, ["-d", "0.25s"], {"duration": 0.25}),
    ],
)
@pytest.mark.usefixtures("parsing")
def test_a_fraction_of_a_second_is_taken_in_whole_ms(
    tool: ModuleType, argv: list[str], expected: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_parsed(tool, argv, expected, monkeypatch)


def assert_parsed(
    tool: ModuleType, argv: list[str], expected: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tool -n x ARGV` hands its client the `expected` options."""
    args = parsed(tool, ["-n", "x", *argv], monkeypatch)
    assert {k: args[k] for k in expected} == expected


def parsed(tool: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The options a tool's main hands its client (which is not run)."""
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(tool, "client", lambda args: seen.append(vars(args)) or 0)
    with pytest.raises(SystemExit) as done:
        tool.main(argv)
    assert done.value.code == 0 and seen, done.value.code
    return seen[0]


# C's tools read their numbers with strtol: the leading digits, whatever follows ignored, none 0.
@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("tool", "argv", "expected"),
    [
        (ocbr, ["-d", "10s"], {"duration": 10.0}),
        (ocbr, ["-s", "100B", "-d", "2sec"], {"size": 100, "duration": 2.0}),
        (ocbr, ["-d", "1.5"], {"duration": 1.5}),  # ours: C's reads 1
        (operf, ["-s", "100B"], {"size": 100}),
        (operf, ["-s", "big"], {"size": 64}),  # 0, then C's least size
    ],
)
@pytest.mark.usefixtures("parsing")
def test_numbers_are_read_as_cs_strtol_reads_them(
    tool: ModuleType, argv: list[str], expected: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_parsed(tool, argv, expected, monkeypatch)


@pytest.mark.timeout(10)
@pytest.mark.usefixtures("parsing")
def test_ocbrs_server_reads_its_seconds_as_c(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[float, float]] = []

    class Server:
        def __init__(self, interval: float, timeout: float) -> None:
            seen.append((interval, timeout))

        def run(self) -> None:
            pass

    monkeypatch.setattr(ocbr, "Server", Server)
    ocbr.main(["-l", "-i", "2s", "-t", "5s"])
    assert seen == [(2.0, 5.0)]


def test_ocbr_flood_sends_back_to_back(irmd: IrmdProc, serving: Callable[..., None]) -> None:
    serving("cbr", "ocbr")
    out = run(irmd, "ocbr", "-n", "cbr", "-d", "1", "-f", "-s", "500")
    m = re.search(r"sent statistics: +(\d+) packets", out)
    assert m and int(m[1]) > 1000, out


@pytest.mark.parametrize("flood", [[], ["-f"]])
def test_ocbr_sends_one_sdu_at_least_as_cs(irmd: IrmdProc, serving: Callable[..., None], flood: list[str]) -> None:
    """C's client checks the time after each SDU: `-d 0` sends one, and ends with status 0."""
    serving("cbr", "ocbr")
    out = run(irmd, "ocbr", "-n", "cbr", "-d", "0", *flood)
    assert re.search(r"sent statistics: +1 packets, +1000 bytes in ", out), out


# -- obc ----------------------------------------------------------------------------------------------


@pytest.fixture
def broadcast(cluster: Cluster) -> Iterator[IrmdProc]:
    (a,) = cluster.start(["a"])
    cluster.udp([a])
    a.irm_ok("ipcp", "bootstrap", "type", "broadcast", "name", "b1", "layer", "bc", "autobind")
    yield a.irmd


def test_obc_writers_reach_a_listening_reader(broadcast: IrmdProc) -> None:
    reader = subprocess.Popen(
        [str(BIN / "obc"), "-l", "-n", "bc"],
        env=broadcast.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "Starting a reader."
        assert reader.stdout.readline().strip() == "New flow."
        run(broadcast, "obc", "-n", "bc", "-m", "hello, layer")
        run(broadcast, "obc", "-n", "bc")
        assert reader.stdout.readline().strip() == "Message is hello, layer."
        assert reader.stdout.readline().strip() == "Message is Ouroboros multicast rocks!."
    finally:
        reader.kill()
        reader.wait()


def test_obc_shows_a_members_control_characters_as_escapes(broadcast: IrmdProc) -> None:
    """Any member of the layer writes to the reader's terminal: its words as text, never as escapes."""
    reader = subprocess.Popen(
        [str(BIN / "obc"), "-l", "-n", "bc"], env=broadcast.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == b"Starting a reader."
        assert reader.stdout.readline().strip() == b"New flow."
        run(broadcast, "obc", "-n", "bc", "-m", "\x1b]0;owned\x07\x1b[2Jhi")
        run(broadcast, "obc", "-n", "bc", "-m", "plain")
        assert reader.stdout.readline() == b"Message is \\x1b]0;owned\\x07\\x1b[2Jhi.\n"
        assert reader.stdout.readline() == b"Message is plain.\n"
    finally:
        reader.kill()
        reader.wait()


def test_obc_sends_cs_message_with_its_nul(broadcast: IrmdProc) -> None:
    joined = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from flowlib import flow_join\n"
            "f = flow_join('bc', timeout=10); print('joined', flush=True)\n"
            "f.set_timeout(10); print(f.read().hex(), flush=True)",
        ],
        env=broadcast.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert joined.stdout is not None and joined.stdout.readline().strip() == "joined"
        run(broadcast, "obc", "-n", "bc", "-m", "hi")
        assert bytes.fromhex(joined.stdout.readline().strip()) == b"hi\0"
    finally:
        joined.kill()
        joined.wait()


def test_obc_without_a_name_says_so(irmd: IrmdProc) -> None:
    r = irmd.run("obc", "-m", "x")
    assert r.returncode == 1 and "Please specify a name." in r.stdout


class _EchoesOfAnotherSize:
    """A flow whose server echoes an SDU of another size, then goes silent."""

    flow_id = 7

    def __init__(self) -> None:
        self.sdus = [bytes(100)]

    def set_timeout(self, _: float) -> None:
        pass

    def read(self) -> bytes:
        if self.sdus:
            return self.sdus.pop()
        raise FlowError("gone")


@pytest.mark.timeout(10)
def test_operfs_bidirectional_reader_says_an_echo_of_another_size_is_invalid_in_cs_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(size=64, flood=True, rate=1e6, sleep=False)
    c = operf.Client(args, _EchoesOfAnotherSize())  # type: ignore[arg-type]
    done = threading.Event()
    done.set()
    c.sent = 1
    c.read_echoes(done)
    assert capsys.readouterr().out == "Invalid message on fd 7.\n"
    assert c.echoed == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spin", [[], ["--spin"]])
def test_an_interrupted_ocbr_ends_at_once_with_its_statistics(
    irmd: IrmdProc, serving: Callable[..., None], spin: list[str]
) -> None:
    """C's sleep between SDUs ends at a Ctrl-C; ours slept on to the end of the gap: 8 s at 1 kb/s."""
    serving("cbr", "ocbr")
    client = subprocess.Popen(
        [str(BIN / "ocbr"), "-n", "cbr", "-r", "1k", "-s", "1000", "-d", "60", *spin],
        env=irmd.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().startswith("Client started, duration 60, rate 1000 b/s")
        time.sleep(2)  # allocated, one SDU sent, the next 8 s away
        out, took = interrupted(client)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 0 and re.match(r"sent statistics: +1 packets, +1000 bytes in ", out), out
    assert took < 1.5, f"{took:.1f} s"
