"""The benchmark harness: goals by row name, value goals, the sink session on a lossy path, and
the parsing of C Ouroboros's oping and ocbr output; with root and the C build, a C IRMd in its
own namespaces answering C oping."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bench import c, cstack, netns, session
from bench.goals import GOALS, Goal
from bench.harness import BenchError, Row, median_row, write_json

# The rows ../shared/checks/15-performance reads, and what it reads of each.
CHECKED = {
    "eth.throughput_1400B": "ratio", "eth.rtt_64B": "ratio", "unicast.1hop.throughput_1400B": "ratio",
    "unicast.1hop.rtt_64B": "ratio", "unicast.3hop.throughput_1400B": "ratio",
    "frct.goodput_1400B_loss0": "ratio", "frct.goodput_1400B_loss5": "ratio",
    "frct.encrypted_raw_1400B": "ratio", "local.alloc_dealloc": "value", "styx.read_64MB": "ratio",
    "styx.write_64MB": "ratio", "ibp.store_32MiB": "ratio", "ibp.load_32MiB": "ratio",
    "ibp.copy_32MiB": "ratio", "netplumb.cat_20MB": "ratio",
}  # fmt: skip


def test_every_checked_row_has_its_goal_on_the_field_the_check_reads() -> None:
    for name, field in CHECKED.items():
        assert GOALS[name].on == field, name


def test_a_value_goal_judges_the_value_not_the_ratio(tmp_path: Path) -> None:
    row = median_row("local.alloc_dealloc", "flows/s", [3500, 2900, 3100], [10_000] * 3, "broker")
    assert row.goal == Goal(">=", 3000, on="value")
    assert row.value == 3100 and row.ratio == pytest.approx(0.31)
    assert row.met is True
    slow = median_row("local.alloc_dealloc", "flows/s", [300] * 3, [100] * 3, "broker")
    assert slow.ratio == 3.0 and slow.met is False  # a good ratio does not meet a value goal
    write_json([row, slow], tmp_path / "r.json")
    out = json.loads((tmp_path / "r.json").read_text())
    assert [(r["goal"], r["met"]) for r in out] == [("value >= 3000", True), ("value >= 3000", False)]


def test_the_table_overrides_a_suites_own_goal_and_rows_without_one_have_none() -> None:
    assert median_row("eth.throughput_1400B", "SDU/s", [1.0], [2.0], "raw", Goal(">=", 0.3)).goal == Goal(">=", 0.5)
    assert median_row("udp.relay.rtt_64B", "us", [1.0], [2.0], "raw").goal is None
    row = Row("x", 1.0, "us", 1.0, 1.0, "raw", 1)
    assert row.met is None and "goal" not in row.to_json()


def test_a_sink_answers_a_repeated_sink_and_counts_only_data() -> None:
    """On a lossy path the client repeats SINK when READY is lost: the peer says READY again,
    and neither the repeats nor END count as data."""
    to_peer: collections.deque[bytes] = collections.deque(
        [session.SINK, session.SINK, b"x" * 100, session.SINK, b"y" * 50, session.END, b""]
    )
    sent: list[bytes] = []
    session.serve(to_peer.popleft, sent.append)
    assert sent[:3] == [session.READY, session.READY, session.READY]
    count, nbytes, _ = session.STATS.unpack(sent[3])
    assert (count, nbytes) == (2, 150)


ONE_SUMMARY = """
--- c-ping ping statistics ---
10000 packets transmitted, 10000 received, 0 out-of-order, 0% packet loss, time: 698.728 ms
rtt min/avg/max/mdev = 39.000/69.332/7803.000/83.931 µs
"""


def test_c_oping_rtt_is_the_flood_loops_time_over_the_count() -> None:
    assert c.parse_oping(ONE_SUMMARY, 10_000) == pytest.approx(69.8728)
    with pytest.raises(BenchError, match="9999 of 10000"):
        c.parse_oping(ONE_SUMMARY.replace("10000 received", "9999 received"), 10_000)
    with pytest.raises(BenchError, match="no summary"):
        c.parse_oping("Failed to allocate flow: -1003.", 10_000)


def test_c_ocbr_rate_is_what_the_server_counted_over_the_clients_time() -> None:
    client = "sent statistics:    576732 packets,    807424800 bytes in      1000 ms, 6459.3984 Mb/s\n"
    server = (
        "New flow.\n"
        "Flow   64:    500000 packets (   700000000 bytes) in      1100 ms => 1 pps, 1 Mbps\n"
        "Flow   64:     76732 packets (   107424800 bytes) in      1101 ms =>    0.0000 pps,    0.0000 Mbps\n"
        "Test on flow 64 timed out\n"
    )
    assert c.parse_ocbr(client, server) == pytest.approx(576_732)
    with pytest.raises(BenchError, match="counted nothing"):
        c.parse_ocbr(client, "New flow.\nTest on flow 64 timed out\n")


def test_name_hash_is_the_md5_a_c_udp4_ipcp_looks_up() -> None:
    assert cstack.name_hash("abc") == "900150983cd24fb0d6963f7d28e17f72"


@pytest.mark.timeout(120)
@pytest.mark.skipif(cstack.why_not() is not None, reason=f"C Ouroboros: {cstack.why_not()}")
def test_a_c_irmd_runs_in_namespaces_of_its_own_and_answers_c_oping(tmp_path: Path) -> None:
    """Two C IRMds at once (one per namespace), neither touching this host's /dev/shm or
    /var/run/ouroboros; closing one kills everything it started."""
    host_shm = set(os.listdir("/dev/shm"))
    with contextlib.ExitStack() as ex:
        stacks = []
        for tag in ("otx", "oty"):
            ns = ex.enter_context(netns.Netns(tag)).ns
            cs = ex.enter_context(cstack.CStack(cstack.DIRECT, ns, tmp_path))
            cs.irm("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local")
            stacks.append(cs)
        ends = c.CEnds(stacks[0], c.c_servers(stacks[0], "layer", "local"))
        with c.C(lambda _: ends, "test") as side:
            assert 0 < side.rtt() < 10_000
        assert "c-ping" not in stacks[1].irm("name", "list")  # the other IRMd is another world
        mnt = os.readlink(f"/proc/{stacks[0]._irmd.pid}/ns/mnt")  # type: ignore[union-attr]
        stacks[0].close()
        assert cstack._pids_in(mnt) == []
    # The C IRMds' lock files and packet buffers (/dev/shm/ouroboros.*) stayed in their own mounts.
    assert {f for f in os.listdir("/dev/shm") if f.startswith("ouroboros")} <= host_shm


def test_a_c_ipcp_that_lost_the_start_up_race_is_made_once_more_and_other_failures_carry_the_log(
    tmp_path: Path,
) -> None:
    """0.23's IRMd gives a new IPCP 500 ms to say it is up ("failed to boot" under load): CStack.irm
    runs an `irm ipcp` command once more then, and nothing else; failures quote the irmd's log."""
    cs = cstack.CStack(cstack.DIRECT, "none", tmp_path)
    logfile = tmp_path / f"{cs.label}-irmd.log"
    logfile.write_text("==01==(II): Started.\n")
    runs: list[list[str]] = []

    def run(argv: list[str], timeout: float) -> str:
        runs.append(argv)
        if len(runs) == 1:
            with logfile.open("a") as f:
                f.write("==01==(EE): IPCP 42 failed to boot.\n")
            raise BenchError("C irm ipcp bootstrap: status 1:")
        if argv[1] == "name":
            raise BenchError("C irm name create: status 1:")
        return "ok"

    cs.run = run  # type: ignore[assignment,method-assign]
    assert cs.irm("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local") == "ok"
    assert len(runs) == 2
    with pytest.raises(BenchError, match=r"(?s)name create: status 1.*failed to boot"):
        cs.irm("name", "create", "x")
    assert len(runs) == 3  # not tried again: the log's news were not a boot race


def test_a_c_run_that_fails_is_tried_again_on_a_fresh_layout() -> None:
    """C.rtt sets the C side up again after a failed run (C 0.23's IPCPs wedge after one failed
    flow response); it gives up after ATTEMPTS."""
    calls = {"layouts": 0, "runs": 0}

    class FakeStack:
        def run(self, argv: list[str], timeout: float) -> str:
            if "-c" in argv and argv[argv.index("-c") + 1] == "1":
                return ""  # the route check
            calls["runs"] += 1
            if calls["layouts"] < 2:
                raise BenchError("Failed to allocate flow: -1.")
            return ONE_SUMMARY.replace("10000", str(c.RTT_COUNT))

    def layout(ex: contextlib.ExitStack) -> c.CEnds:
        calls["layouts"] += 1
        return c.CEnds(FakeStack(), Path("/dev/null"))  # type: ignore[arg-type]

    with c.C(layout, "fake") as side:
        assert side.rtt() > 0
    assert calls == {"layouts": 2, "runs": 2}


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="playing an unprivileged user beside the root profiler needs root and setpriv (util-linux)",
)
def test_the_profiler_run_as_root_writes_only_where_no_other_user_could_plant_a_link(tmp_path: Path) -> None:
    """bench.profile runs strace and py-spy as root, and they write their files as root, links followed.
    Its output directory had a fixed name in /tmp: uid 65534 made it first with a link per pid to come
    (strace.PID.txt), and the profile truncated root's 0600 file through it. A directory given must now
    be one only root could have written; the default is a new private one."""
    from bench import profile

    victim = tmp_path / "root-only"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    public = Path(tempfile.mkdtemp(prefix="bench-profile-", dir="/tmp"))
    try:
        public.chmod(0o1777)  # as /tmp: anyone makes entries, sticky
        theirs = public / "theirs"
        made = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
             f"mkdir -m 0755 {theirs} && ln -s {victim} {theirs}/strace.{os.getpid()}.txt"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        with pytest.raises(BenchError, match="belongs to uid 65534"):
            profile.output_dir(theirs)
        open_to_all = public / "open"
        open_to_all.mkdir(mode=0o777)
        open_to_all.chmod(0o777)  # root's, but anyone may put a link in it
        with pytest.raises(BenchError, match="writable by others"):
            profile.output_dir(open_to_all)
        with pytest.raises(SystemExit):  # the command line refuses it before any target runs
            profile.main(["--out", str(theirs), "--seconds", "0", "alloc"])
        assert victim.read_text() == "root's\n"
        ours = public / "ours"  # the legitimate use: a directory of root's own
        assert profile.output_dir(ours) == ours and os.stat(ours).st_uid == 0
        fresh = profile.output_dir(None)  # the default: new each run, root's alone
        try:
            st = os.stat(fresh)
            assert fresh.name.startswith(profile.OUT_PREFIX) and st.st_uid == 0 and st.st_mode & 0o777 == 0o700
        finally:
            fresh.rmdir()
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_a_failed_suite_is_named_with_its_reason_on_the_runs_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that keeps only the tail of `make bench` (a check, CI) still learns why a suite failed."""
    import bench.__main__ as main
    from bench.harness import BenchError, Suite

    def broken(runs: int) -> list[object]:
        raise BenchError("no flow to the holder:\n  timed out")

    monkeypatch.setattr(main, "SUITES", {"broken": Suite("broken", "fails", broken)})  # type: ignore[arg-type]
    rows, failed = main._run(["broken"], 1)
    assert rows == [] and failed == ["broken (BenchError: no flow to the holder: timed out)"]
