"""oping end to end over the local layer, with the server started on demand by the IRMd."""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from collections.abc import Callable

import pytest
from helpers import BIN, IrmdProc, interrupted

from apps import oping
from apps.common import stack_report
from flowlib import flow_accept, qos
from flowlib.irm import IrmClient
from flowlib.stats import FlowStats, FrctStats, IpcpStats
from proto import logs


@pytest.fixture
def pong(irmd: IrmdProc, local_layer: str) -> str:
    """'pong' served by `oping -l`, which the IRMd starts when a flow arrives."""
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    return "pong"


def test_oping_gets_every_reply_from_an_auto_started_server(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "3", "-i", "10")
    assert r.returncode == 0, r.stderr
    assert "3 packets transmitted, 3 received" in r.stdout
    assert "0% packet loss" in r.stdout
    assert r.stdout.count(f"64 bytes from {pong}: seq=") == 3


def test_oping_reuses_the_running_server_for_a_second_ping(irmd: IrmdProc, pong: str) -> None:
    irmd.run("oping", "-n", pong, "-c", "1")
    r = irmd.run("oping", "-n", pong, "-c", "2", "-i", "10", "-s", "1000", "-Q")
    assert "2 packets transmitted, 2 received" in r.stdout
    assert "seq=" not in r.stdout  # quiet
    log = irmd.log_text()
    assert len(re.findall(r"INFO: started \S*oping -l \(pid \d+\) for 'pong'", log)) == 1
    assert log.count("New flow") == 2  # the server's output: both flows went to the one server


def test_oping_to_an_unregistered_name_fails_fast_saying_not_found(irmd: IrmdProc, local_layer: str) -> None:
    start = time.monotonic()
    r = irmd.run("oping", "-n", "nobody", "-c", "1")
    assert time.monotonic() - start < 5.0
    assert r.returncode != 0
    assert "not found" in r.stderr


def test_oping_with_no_layer_up_fails_fast_saying_not_found(irmd: IrmdProc) -> None:
    start = time.monotonic()
    r = irmd.run("oping", "-n", "nobody", "-c", "1")
    assert time.monotonic() - start < 5.0
    assert r.returncode != 0 and "not found" in r.stderr


def test_oping_to_a_registered_name_nobody_serves_fails_with_a_reason(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("name", "register", "idle", "layer", local_layer)
    start = time.monotonic()
    r = irmd.run("oping", "-n", "idle", "-c", "1")
    assert time.monotonic() - start < 5.0
    assert r.returncode != 0 and "no process is accepting flows for 'idle'" in r.stderr


def test_oping_after_unregister_fails_saying_not_found(irmd: IrmdProc, pong: str, local_layer: str) -> None:
    irmd.irm_ok("name", "unregister", pong, "layer", local_layer)
    r = irmd.run("oping", "-n", pong, "-c", "1")
    assert r.returncode != 0 and "not found" in r.stderr


def test_oping_without_a_server_name_prints_its_usage_on_stdout_and_exits_1_as_c(irmd: IrmdProc) -> None:
    r = irmd.run("oping", "-c", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("No server specified.\nUsage: oping [OPTION]...\n"), r.stdout + r.stderr


def test_oping_works_over_a_local_layer_with_another_hash(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local", "hash", "SHA3_512")
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", "local")
    r = irmd.run("oping", "-n", "pong", "-c", "2", "-i", "10")
    assert "2 packets transmitted, 2 received" in r.stdout, r.stderr


def test_oping_with_a_reliable_qos_ends_with_cs_summary_and_reports_frct_when_asked(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "3", "-i", "10", "-q", "data")
    assert "3 packets transmitted, 3 received" in r.stdout, r.stderr
    assert STATS.match(r.stdout.rstrip().splitlines()[-1]), r.stdout  # C's last line stays the last
    assert "frct:" not in r.stdout + r.stderr
    r = irmd.run("oping", "-n", pong, "-c", "3", "-i", "10", "-q", "data", "--report")
    # ours, after C's summary: FRCT's own counts, what it sent, resent and measured
    last = r.stdout.rstrip().splitlines()[-2:]
    assert STATS.match(last[0]), r.stdout
    # (a loaded host delays a pong past the timer: resends, and the duplicates they make dropped, are due)
    assert re.match(r"frct: [3-9] sent, [3-9] received, \d+ retransmitted, \d+ dropped, srtt [\d.]+ ms$", last[1]), (
        r.stdout
    )


def test_oping_without_frct_and_without_loss_prints_c_s_summary_alone(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "2", "-i", "10", "--report")
    assert r.stdout.rstrip().splitlines()[-1].startswith("rtt min/avg/max/mdev"), r.stdout


class Counted:
    """A flow as stack_report sees it: stats() answers as given."""

    def __init__(self, stats: FlowStats) -> None:
        self._stats = stats
        self.asked: list[bool] = []

    def stats(self, ask_ipcp: bool = True) -> FlowStats:
        self.asked.append(ask_ipcp)
        return FlowStats(self._stats.frct, self._stats.ipcp if ask_ipcp else None)


FRCT = FrctStats(sent=10, received=9, retransmitted=2, dropped=0, rtt=0.0015)
REPORTS = [
    # (frct, ipcp, lost, the lines)
    (None, IpcpStats("u", "ipcp", 10, 7, 0), 0, []),  # nothing lost: the IPCP is not asked
    (FRCT, None, 0, ["frct: 10 sent, 9 received, 2 retransmitted, 0 dropped, srtt 1.500 ms"]),
    (FrctStats(1, 0, 0, 0, None), None, 0, ["frct: 1 sent, 0 received, 0 retransmitted, 0 dropped, srtt not measured"]),
    (
        None,
        IpcpStats("u", "ipcp", 10, 7, 3, "3 queue full: the application did not read"),
        3,
        ["3 lost; dropped at ipcp u: 3 queue full: the application did not read"],
    ),
    (
        None,
        IpcpStats("u", "ipcp", 10, 7, 0),
        3,
        ["3 lost; none dropped at ipcp u here: lost on the way or at the peer"],
    ),
    (
        None,
        IpcpStats("lo", "direct"),
        1,
        ["1 lost; no IPCP here sees this flow's packets (direct), so none can say where"],
    ),
    (None, IpcpStats("x", ""), 1, []),  # the IPCP did not say: nothing is made up
]


@pytest.mark.parametrize(("frct", "ipcp", "lost", "lines"), REPORTS)
def test_the_summary_says_what_the_stack_knows_of_losses_and_nothing_it_does_not(
    frct: FrctStats | None, ipcp: IpcpStats | None, lost: int, lines: list[str]
) -> None:
    flow = Counted(FlowStats(frct, ipcp))
    assert stack_report(flow, lost) == lines  # type: ignore[arg-type]
    assert flow.asked == [lost > 0]


# -- C's options and output --------------------------------------------------------------------------

RTT_LINE = re.compile(r"^(\[\d+\.\d{6}\] )?64 bytes from pong: seq=(\d+) time=\d+\.\d{3} (µs|ms)( \[out-of-order\])?$")
STATS = re.compile(r"rtt min/avg/max/mdev = [\d.]+/[\d.]+/[\d.]+/([\d.]+|NaN) (µs|ms)$")


def reply_lines(out: str) -> list[re.Match[str]]:
    return [m for line in out.splitlines() if (m := RTT_LINE.match(line))]


@pytest.mark.parametrize("flood", ["-f", "-F"])
def test_flood_pings_back_to_back_and_gets_every_reply(irmd: IrmdProc, pong: str, flood: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "200", flood)
    assert "200 packets transmitted, 200 received, 0 out-of-order, 0% packet loss" in r.stdout, r.stdout + r.stderr
    assert [int(m.group(2)) for m in reply_lines(r.stdout)] == list(range(200))
    assert STATS.search(r.stdout)
    assert ("busy-poll" in r.stdout) == (flood == "-F")


def test_timeofday_prefixes_every_reply_line(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "3", "-i", "10", "-D")
    lines = reply_lines(r.stdout)
    assert len(lines) == 3 and all(m.group(1) for m in lines), r.stdout
    stamp = float(lines[0].group(1)[1:-2])
    assert abs(stamp - time.time()) < 60


def test_duration_over_interval_gives_the_count_and_times_are_ms_unless_tiny(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-d", "100", "-i", "10")  # as C: ms without a unit
    assert "10 packets transmitted, 10 received" in r.stdout, r.stdout + r.stderr
    assert len(reply_lines(r.stdout)) == 10
    r = irmd.run("oping", "-n", pong, "-d", "300ms", "-i", "100")  # 0.3 s / 0.1 s is 2.999... in floats
    assert "3 packets transmitted, 3 received" in r.stdout, r.stdout + r.stderr


class _FlowId:
    flow_id = 3


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("rtt_ns", "shown"), [(87_375, "87.000 µs"), (1_234_999, "1.234 ms")])
def test_a_reply_time_is_in_whole_microseconds_as_cs(
    rtt_ns: int, shown: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """C's oping measures in µs (ts_diff_us) and prints them with three decimals: "87.000 µs"."""
    args = argparse.Namespace(name="pong", count=10, quiet=False, timeofday=False)
    c = oping.Client(args, _FlowId(), 64)  # type: ignore[arg-type]
    monkeypatch.setattr(oping.time, "monotonic_ns", lambda: 10**12 + rtt_ns)
    c.take(oping.HDR.pack(oping.ECHO_REPLY, 0, 10**12) + bytes(40))
    c.statistics(1.0)
    out = capsys.readouterr().out
    assert f"64 bytes from pong: seq=0 time={shown}\n" in out, out
    value, unit = shown.split()
    assert f"rtt min/avg/max/mdev = {value}/{value}/{value}/NaN {unit}" in out, out


def counted(*argv: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The options oping's main hands its client (which is not run)."""
    seen: list[argparse.Namespace] = []

    def client(args: argparse.Namespace) -> int:
        seen.append(args)
        return 0

    monkeypatch.setattr(oping, "client", client)
    monkeypatch.setattr(logs, "setup", lambda *_, **__: None)  # the test process's logging is left alone
    with pytest.raises(SystemExit) as done:
        oping.main(["-n", "pong", *argv])
    assert done.value.code == 0
    return seen[0]


@pytest.mark.parametrize(
    ("argv", "count"),
    [
        (("-d", "300ms", "-i", "100"), 3),
        (("-d", "700", "-i", "100"), 7),
        (("-d", "1s", "-i", "100ms"), 10),
        (("-d", "50", "-i", "100"), 0),  # as C: none
        (("-d", "60s", "-i", "20s"), 3),  # counted before the interval is cut to 10 s
        (("-d", "5", "-i", "0"), 50),  # no interval: 10 a ms
        (("-c", "4", "-d", "0"), 4),  # a duration of 0 counts for nothing
        (("-c", "-1"), 2**32 - 1),  # C's count is unsigned
    ],
)
def test_the_count_is_cs_whole_ms_duration_over_interval(
    argv: tuple[str, ...], count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert counted(*argv, monkeypatch=monkeypatch).count == count


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("argv", "count", "size"), [(("-c", "5x"), 5, 64), (("-c", "abc", "-s", "100B"), 0, 100)])
def test_numbers_are_read_as_cs_strtol_reads_them(
    argv: tuple[str, ...], count: int, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leading digits, whatever follows ignored, none 0: `-c 5x` pings 5 times, `-c abc` none."""
    args = counted(*argv, monkeypatch=monkeypatch)
    assert (args.count, args.size) == (count, size)


def test_the_interval_is_cut_to_10_s_after_the_count_as_cs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = counted("-d", "60s", "-i", "20s", monkeypatch=monkeypatch)
    assert (args.count, args.interval) == (3, 10.0)
    assert capsys.readouterr().out == "Ping interval truncated to 10s.\n"


def test_sizes_are_cs_64_to_1500(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert counted("-s", "1501", monkeypatch=monkeypatch).size == 1500
    assert capsys.readouterr().out == "Packet size truncated to 1500 bytes.\n"
    assert counted("-s", "1500", monkeypatch=monkeypatch).size == 1500
    assert capsys.readouterr().out == ""


def test_an_unknown_qos_cube_is_raw_as_cs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert counted("-q", "fast", monkeypatch=monkeypatch).qos == qos.raw
    assert capsys.readouterr().out == "Unknown QoS cube, defaulting to raw.\n"
    assert counted("-q", "data", monkeypatch=monkeypatch).qos == qos.data


@pytest.mark.parametrize(
    "argv",
    [
        ["-n", "pong", "--bogus"],
        ["-n", "pong", "--lis"],  # C takes options whole: no abbreviations
        ["-n"],  # a value missing
        ["-x", "-l"],
    ],
)
def test_a_command_line_c_does_not_take_prints_the_usage_on_stdout_and_exits_1(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        oping.main(argv)
    assert done.value.code == 1
    assert capsys.readouterr().out.startswith("Usage: oping [OPTION]...\n")


# C's reads the digits before a point and takes the rest for the unit: it refuses `-i 0.5` (ours would
# round 0.5 ms to 0, back to back); ours takes a fraction only of a larger unit (`-i 0.5s`).
@pytest.mark.parametrize(
    ("value", "unit"),
    [
        ("10x", "x"),
        ("2w", "w"),
        ("abc", "abc"),
        ("0.5", ".5"),
        ("1.5ms", ".5ms"),
        ("0.0005s", ".0005s"),
        ("1.5y", ".5y"),
    ],
)
def test_a_time_unit_c_does_not_know_exits_1_saying_so(
    value: str, unit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        oping.main(["-n", "pong", "-i", value])
    assert done.value.code == 1
    assert capsys.readouterr().out == f"Unknown time unit: {unit}.\n"


def test_zero_packets_and_an_unknown_qos_run_as_cs(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Pinging pong with 64 bytes of data (0 packets):\n\n"), r.stdout
    assert "0 packets transmitted, 0 received, 0 out-of-order, 0% packet loss" in r.stdout
    assert "rtt" not in r.stdout  # nothing came back: no RTTs, as C
    r = irmd.run("oping", "-n", pong, "-c", "2", "-i", "10", "-q", "fast")
    assert r.returncode == 0 and r.stdout.startswith("Unknown QoS cube, defaulting to raw.\n"), r.stdout + r.stderr
    assert "2 packets transmitted, 2 received" in r.stdout


def test_a_size_over_cs_buffer_is_cut_to_1500(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "2", "-i", "10", "-s", "4000")
    assert r.stdout.startswith("Packet size truncated to 1500 bytes.\n"), r.stdout + r.stderr
    assert r.stdout.count("1500 bytes from pong: seq=") == 2


def test_out_of_range_options_are_set_as_c_says(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "1", "-s", "10", "-i", "11s", "-f")
    assert "Packet size set to 64 bytes." in r.stdout and "Ping interval truncated to 10s." in r.stdout
    assert "1 packets transmitted, 1 received" in r.stdout


@pytest.mark.parametrize("mode", ["--poll", "--busy"])
def test_the_polling_and_busy_servers_answer(irmd: IrmdProc, local_layer: str, mode: str) -> None:
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l", mode)
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    r = irmd.run("oping", "-n", "pong", "-c", "20", "-i", "5")
    assert "20 packets transmitted, 20 received" in r.stdout, r.stdout + r.stderr
    log = irmd.log_text()
    if mode == "--busy":
        assert "[busy-poll]" in log and "(busy-poll)." in log
        assert "Received" not in log  # C's busy server says nothing per SDU
    else:
        assert re.search(r"Received 64 bytes on fd \d+\.", log), log[-2000:]  # C's words


@pytest.mark.timeout(60)
def test_an_interval_of_0_sends_as_fast_as_it_may_and_gets_every_reply_as_cs(irmd: IrmdProc, pong: str) -> None:
    """C's writer and reader are threads of their own: with `-i 0` the writer never waits, and replies
    are read as they come. A client that sent them all before reading one filled the server's queue
    to it, and the server's reads stopped: no reply came, and the flow ended after 10 s."""
    r = irmd.run("oping", "-n", pong, "-c", "3000", "-i", "0", "-Q", timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3000 packets transmitted, 3000 received" in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("interval", ["100", "10s"])
def test_an_interrupted_ping_prints_its_statistics_and_ends_0_as_cs(irmd: IrmdProc, pong: str, interval: str) -> None:
    """Ctrl-C stops C's client as its count would: the statistics follow, status 0. Ours stops at once,
    not at the next request (C's sends one more, up to an interval later)."""
    client = subprocess.Popen(
        [str(BIN / "oping"), "-n", pong, "-i", interval],
        env=irmd.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        lines = [client.stdout.readline() for _ in range(3)]  # "Pinging ...", "", the first reply
        assert lines[0].startswith(f"Pinging {pong} with 64 bytes of data ("), lines
        assert lines[2].startswith(f"64 bytes from {pong}: seq=0 "), lines
        time.sleep(0.5)  # waiting for the next request's time
        out, took = interrupted(client)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 0, out
    stats = re.search(r"\n--- pong ping statistics ---\n(\d+) packets transmitted, (\d+) received, ", out)
    assert stats and int(stats[2]) >= 1, out
    assert out.splitlines()[-1].startswith("rtt min/avg/max/mdev = "), out
    assert took < 3, f"{took:.1f} s"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("interval", "waits_ms"), [("1500", 3000), ("100", 2000)])
def test_a_silent_server_times_out_when_cs_would(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str, interval: str, waits_ms: int
) -> None:
    """C's reader waits the interval's whole seconds and 2 more for each reply, from the start of the
    ping (its writer's first request goes one interval in): `-i 1500` gives up 3 s in, `-i 100` 2 s in."""
    server = client_factory()
    client = subprocess.Popen(
        [str(BIN / "oping"), "-n", bound_name, "-c", "1", "-i", interval],
        env=irmd.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        with flow_accept(timeout=20, irm=server) as flow:
            flow.set_timeout(10)
            flow.read()  # and never answered
            out, _ = client.communicate(timeout=30)
    finally:
        client.kill()
        client.wait()
    assert "Server timed out.\n" in out, out
    took = re.search(r"1 packets transmitted, 0 received, 0 out-of-order, 100% packet loss, time: ([\d.]+) ms", out)
    assert took and waits_ms - 50 < float(took[1]) < waits_ms + 500, out


@pytest.mark.timeout(60)
def test_a_ping_whose_flow_ends_before_its_first_request_ends_1(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    """A server that lets the flow go at once: no request could go, no reply came. That ended with 0,
    as a ping asked for none (`-c 0`) does."""
    server = client_factory()
    client = subprocess.Popen(
        [str(BIN / "oping"), "-n", bound_name, "-c", "1", "-i", "2s"],
        env=irmd.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        flow_accept(timeout=20, irm=server).close()
        out, err = client.communicate(timeout=30)
    finally:
        client.kill()
        client.wait()
    assert client.returncode == 1, out + err
    assert "0 received" in out and err.startswith("oping: "), out + err
