"""exNodes: the XML format and layout plans (no I/O), then the tools over real depots: upload,
download (whole and a range), ls with liveness, refresh, augment, trim, under their exnode and LoRS
names; honest defaults, files not terminals, partial uploads named, failed ones cleaned up.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc
from test_ibp_flows import Start, depots  # noqa: F401 - the depots fixture

from apps.ibp import exnode_cli
from apps.ibp.exnode import NS, BadExnode, ExNode, Mapping, from_xml, plan, to_xml
from apps.ibp.xndrc import Rc

K = "k" * 64


def cap(depot: str, right: str) -> str:
    return f"ibp://{depot}/0#{K}/{K}/{right}"


def test_plan_stripes_round_robin_with_distinct_replicas() -> None:
    blocks = plan(10, 4, ["a", "b", "c"], 2)
    assert blocks == [(0, 4, ["a", "b"]), (4, 4, ["b", "c"]), (8, 2, ["c", "a"])]
    with pytest.raises(ValueError):
        plan(10, 4, ["a"], 2)


def test_xml_round_trip_in_the_lors_namespace() -> None:
    ex = ExNode(
        "f.bin",
        10,
        "ab" * 32,
        [
            Mapping(0, 6, 0, 6, cap("a", "READ"), cap("a", "WRITE"), cap("a", "MANAGE"), "cd" * 32, 1_900_000_000),
            Mapping(6, 4, 0, 4, cap("b:6714", "READ")),
        ],
    )
    data = to_xml(ex)
    assert NS.encode() in data and b"exnode_offset" in data and b"logical_length" in data
    assert b'name="e2e_blocksize" type="integer">0<' in data  # LoRS reads it
    assert from_xml(data) == ex
    assert ex.gaps() == [] and ExNode("f", 12, mappings=ex.mappings).gaps() == [(10, 2)]


def test_pieces_cover_a_range_once_from_overlapping_blocks() -> None:
    a, b = cap("a", "READ"), cap("b", "READ")
    ex = ExNode("f", 10, mappings=[Mapping(0, 4, 0, 4, a), Mapping(0, 6, 0, 6, b), Mapping(6, 4, 0, 4, a)])
    assert [(len(ms), start, n) for ms, start, n in ex.pieces()] == [(1, 0, 4), (1, 4, 2), (1, 0, 4)]
    assert [(start, n) for _, start, n in ex.pieces(5, 3)] == [(5, 1), (0, 2)]
    assert ex.pieces(10, 5) == []
    with pytest.raises(BadExnode, match="does not cover"):
        ExNode("f", 12, mappings=ex.mappings).pieces(8)


@pytest.mark.parametrize(
    "bad",
    [
        b"not xml",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><exnode/>',
        b"<other/>",
        b"<exnode/>",  # not in LoRS's namespace
        b'<exnode xmlns:exnode="%s"><exnode:metadata name="original_filesize" type="integer">x</exnode:metadata>'
        b"</exnode>" % NS.encode(),  # a size that is no number
        b'<exnode xmlns:exnode="%s"><exnode:metadata name="original_filesize" type="integer">5</exnode:metadata>'
        b'<exnode:mapping><exnode:metadata name="exnode_offset">0</exnode:metadata>'
        b'<exnode:metadata name="logical_length">9</exnode:metadata><exnode:metadata name="alloc_offset">0'
        b'</exnode:metadata><exnode:metadata name="alloc_length">9</exnode:metadata>'
        b"<exnode:read>ibp://a/0#k/k/READ</exnode:read></exnode:mapping></exnode>" % NS.encode(),  # past the end
    ],
)
def test_bad_exnodes_are_refused(bad: bytes) -> None:
    with pytest.raises(BadExnode):
        from_xml(bad)


FORGED = "report.pdf\n  0 -rwma depot9  0  100  2030-01-01 00:00:00  alive\u202efdp.exe"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("lors_names", [False, True])
def test_an_exnodes_file_name_forges_no_line_and_names_no_file(
    lors_names: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file name with a line break (a forged listing row) or a right-to-left override is shown
    escaped on one line, and names no output file; printable names (accents too) do as before."""
    xnd = tmp_path / "evil.xnd"
    xnd.write_bytes(to_xml(ExNode(FORGED, 100, mappings=[Mapping(0, 100, 0, 100, cap("h:1", "READ"))])))
    with pytest.raises(SystemExit):
        (exnode_cli.lors_ls if lors_names else exnode_cli.main)(["ls", "--offline", str(xnd)][lors_names:])
    out, err = capsys.readouterr()
    titles = [ln for ln in (err if lors_names else out).splitlines() if ln.startswith("TITLE")]
    assert titles == ["TITLE Filename report.pdf\\n  0 -rwma depot9  0  100  2030-01-01 00:00:00  alive\\u202efdp.exe"]
    assert "alive" not in out.replace(titles[0], ""), out  # no row but the real one's
    for bad in (FORGED, "a\x85b", "tab\there"):
        with pytest.raises(exnode_cli.Refused, match="give -o FILE"):
            exnode_cli.safe_name(bad)
    assert exnode_cli.safe_name("dir/résumé 2.pdf") == "résumé 2.pdf"


@pytest.mark.parametrize(
    ("name", "safe"),
    [("big.iso", "big.iso"), ("../../etc/passwd", "passwd"), ("/abs/x.bin", "x.bin"), ("a\\b\\c.txt", "c.txt")],
)
def test_file_names_from_an_exnode_stay_in_the_current_directory(name: str, safe: str) -> None:
    assert exnode_cli.safe_name(name) == safe
    for bad in ("", "..", "/", "dir/.."):
        with pytest.raises(exnode_cli.Refused):
            exnode_cli.safe_name(bad)


def test_exnode_files_are_fsynced_before_the_rename_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    dest = tmp_path / "f.xnd"
    exnode_cli.write_exnode(ExNode("f", 0), dest)
    assert calls == ["fsync", "replace", "fsync"]  # the file, the rename, then the directory
    assert dest.stat().st_mode & 0o777 == 0o600  # it holds capabilities
    assert from_xml(dest.read_bytes()) == ExNode("f", 0)
    assert [p.name for p in tmp_path.iterdir()] == ["f.xnd"]  # no temporary left


def test_defaults_are_what_the_docs_say() -> None:
    args = exnode_cli.parser().parse_args(["upload", "f", "--depots", "a"])
    exnode_cli.resolve(args, Rc())  # no .xndrc
    assert (args.copies, args.bs, args.duration, args.soft) == (1, 5 << 20, 86400, False)  # 1, LoRS's 5M, 1d, HARD
    assert (args.threads, args.timeout) == (4, 30)
    doc = (Path(__file__).parent.parent / "docs" / "ibp.md").read_text()
    assert "--copies 1" in doc and "-b 5M" in doc and "-d 1d" in doc
    lors = exnode_cli.lors_parser("upload").parse_args(["f", "--depots", "a", "-c", "2", "-b", "1M", "-s"])
    exnode_cli.resolve(lors, Rc())
    assert (lors.cmd, lors.copies, lors.bs, lors.soft) == ("upload", 2, 1 << 20, True)


# -- the tools over depots --


def run(
    irmd: IrmdProc, tool: str, *args: str, cwd: Path, timeout: float = 60, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / tool), *args], env=irmd.env, capture_output=True, timeout=timeout, cwd=cwd, input=stdin
    )


def status(irmd: IrmdProc, depot: str, cwd: Path) -> dict[str, str]:
    out = run(irmd, "ibp", "status", depot, cwd=cwd).stdout.decode()
    return dict(ln.split(" ", 1) for ln in out.splitlines())


@pytest.mark.timeout(120)  # some twenty tool runs, each a Python start: on a loaded host, over a minute
def test_upload_ls_download_with_a_depot_down_trim_augment_refresh(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    procs = {d: depots(d) for d in ("x1", "x2", "x3")}
    data = os.urandom(700_000)
    (tmp_path / "big.bin").write_bytes(data)
    r = run(irmd, "exnode", "upload", "big.bin", "--depots", "x1,x2,x3", "-b", "128k", "--copies", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and b"\r" not in r.stderr  # the exNode went to a file; no bar without a terminal
    xnd = tmp_path / "big.bin.xnd"
    ex = from_xml(xnd.read_bytes())
    assert len(ex.blocks()) == 6 and all(len({m.depot for m in ms}) == 2 for _, _, ms in ex.blocks())
    assert ex.sha256 == hashlib.sha256(data).hexdigest() and all(m.expires for m in ex.mappings)
    r = run(irmd, "exnode", "upload", "big.bin", "--depots", "x1", cwd=tmp_path)
    assert r.returncode == 1 and b"exists" in r.stderr  # an exNode (and its capabilities) is never clobbered

    listing = run(irmd, "exnode", "ls", str(xnd), cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout.decode()
    assert "700000 bytes in 6 blocks, 12 mappings" in text and text.count(" alive") == 12 and "Hrwma" in text

    procs["x2"].send_signal(signal.SIGKILL)
    procs["x2"].wait()
    listing = run(irmd, "lors_ls", str(xnd), "-T", "5", cwd=tmp_path).stdout.decode()
    assert listing.count(" alive") == 8 and listing.count(" unreachable") == 4
    here = tmp_path / "elsewhere"
    here.mkdir()
    r = run(irmd, "exnode", "download", str(xnd), "--timeout", "5", cwd=here)
    assert r.returncode == 0, r.stderr
    assert (here / "big.bin").read_bytes() == data and r.stdout == b""  # the file's own name, here
    (here / "big.bin").write_bytes(b"mine")
    r = run(irmd, "exnode", "download", str(xnd), cwd=here)
    assert r.returncode == 1 and b"exists" in r.stderr and (here / "big.bin").read_bytes() == b"mine"
    r = run(irmd, "exnode", "download", str(xnd), "-O", "100000", "-L", "300001", "-o", "-", "-T", "5", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == data[100000:400001]  # a range, straddling blocks

    r = run(irmd, "exnode", "trim", str(xnd), "--unavailable", "-T", "5", "-o", "trimmed.xnd", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    trimmed = tmp_path / "trimmed.xnd"
    assert {m.depot for m in from_xml(trimmed.read_bytes()).mappings} == {"x1", "x3"}
    r = run(irmd, "exnode", "trim", str(trimmed), "--depots", "x1", cwd=tmp_path)
    assert r.returncode == 1 and b"no replica" in r.stderr
    r = run(irmd, "exnode", "augment", str(trimmed), "--depots", "x4", "--timeout", "3", cwd=tmp_path)
    assert r.returncode == 1 and b"added 0 of 6" in r.stderr  # x4 does not exist
    depots("x4")
    r = run(irmd, "lors_augment", str(trimmed), "--depots", "x4", "-f", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert {m.depot for m in from_xml(trimmed.read_bytes()).mappings} == {"x1", "x3", "x4"}

    def expiry_after(*how: str) -> set[int]:
        r = run(irmd, "exnode", "refresh", str(trimmed), *how, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return {round(m.expires - time.time(), -2) for m in from_xml(trimmed.read_bytes()).mappings}

    assert expiry_after("--set", "2h") == {7200}
    assert expiry_after("--add", "1h") == {10800}
    assert expiry_after("-m") == {86400}  # the depots' longest
    listing = run(irmd, "exnode", "ls", str(trimmed), cwd=tmp_path).stdout.decode()
    shown = [
        time.mktime(time.strptime(d, "%Y-%m-%d %H:%M:%S"))
        for d in re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", listing)
    ]
    assert len(shown) == 14 and all(abs(t - time.time() - 86400) < 120 for t in shown)  # as the depots say
    r = run(irmd, "exnode", "download", str(trimmed), "-o", "out.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == data


def test_fewer_replicas_than_asked_is_an_error_with_a_partial_exnode(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    depots("p1")
    depots("p2", "--capacity", "200k", "--client-share", "1")  # takes one block, then refuses
    (tmp_path / "f.bin").write_bytes(os.urandom(500_000))
    r = run(irmd, "exnode", "upload", "f.bin", "--depots", "p1,p2", "-b", "128k", "-c", "2", cwd=tmp_path)
    assert r.returncode == 1
    assert b"fewer than 2 replicas" in r.stderr and b"f.bin.xnd.partial" in r.stderr
    assert not (tmp_path / "f.bin.xnd").exists()
    partial = from_xml((tmp_path / "f.bin.xnd.partial").read_bytes())
    assert not partial.gaps() and {n for _, _, n in partial.replicas()} == {1, 2}
    r = run(irmd, "exnode", "download", "f.bin.xnd.partial", "-o", "back.bin", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "back.bin").read_bytes() == (tmp_path / "f.bin").read_bytes()


def test_a_failed_upload_frees_the_allocations_it_made(irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:  # noqa: F811
    depots("q1", "--capacity", "300k", "--client-share", "1")
    (tmp_path / "f.bin").write_bytes(os.urandom(700_000))
    r = run(irmd, "exnode", "upload", "f.bin", "--depots", "q1", "-b", "128k", "-t", "1", cwd=tmp_path)
    assert r.returncode == 1 and b"the allocations it made are freed" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.xnd*"))
    assert status(irmd, "q1", tmp_path)["allocations"] == "0"


HOSTILE_DEPOT = r"""
import socket, sys
srv = socket.socket(); srv.bind(('127.0.0.1', int(sys.argv[1]))); srv.listen(16)
print('ready', flush=True)
n = 0
while True:
    c, _ = srv.accept()
    f = c.makefile('rwb')
    for line in f:
        if line.startswith(b'1 1 '):  # ALLOCATE: caps that look right
            n += 1
            caps = ['ibp://127.0.0.1:%s/0#%064d/%064d/%s' % (sys.argv[1], n, n, r) for r in ('READ', 'WRITE', 'MANAGE')]
            f.write(('1 ' + ' '.join(caps) + '\n').encode()); f.flush()
        else:  # anything else: a lie, then gone
            f.write(b'1 999999999\n'); f.flush()
            break
    c.close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the hostile depot runs as uid 65534 through setpriv: needs root")
def test_a_hostile_depot_costs_replicas_not_allocations(irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:  # noqa: F811
    """A depot run by uid 65534 grants allocations and then fails every store: the upload says it has
    fewer replicas than asked, names its partial exNode, and that exNode reads back."""
    from helpers import free_port

    depots("h1")
    port = free_port(["127.0.0.1"])
    evil = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", HOSTILE_DEPOT, str(port)],
        stdout=subprocess.PIPE,
    )
    try:
        assert evil.stdout is not None and evil.stdout.readline() == b"ready\n"
        (tmp_path / "f.bin").write_bytes(os.urandom(300_000))
        r = run(
            irmd,
            "exnode",
            "upload",
            "f.bin",
            "--depots",
            f"127.0.0.1:{port},h1",
            "-b",
            "100k",
            "-c",
            "2",
            "-T",
            "3",
            cwd=tmp_path,
        )
        assert r.returncode == 1 and b"f.bin.xnd.partial" in r.stderr, r.stderr
        partial = from_xml((tmp_path / "f.bin.xnd.partial").read_bytes())
        assert {m.depot for m in partial.mappings} == {"h1"}
        assert status(irmd, "h1", tmp_path)["allocations"] == "3"  # one replica of each block, nothing else
        r = run(irmd, "exnode", "download", "f.bin.xnd.partial", "-o", "back.bin", cwd=tmp_path)
        assert r.returncode == 0 and (tmp_path / "back.bin").read_bytes() == (tmp_path / "f.bin").read_bytes()
    finally:
        evil.kill()
        evil.wait()


def on_a_terminal(irmd: IrmdProc, argv: list[str], cwd: Path, which: str) -> tuple[int, bytes]:
    """Run with stdout or stderr (`which`) on a pseudo-terminal; its exit status and what the terminal got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    streams = (
        {"stdout": slave, "stderr": subprocess.PIPE}
        if which == "stdout"
        else {"stdout": subprocess.PIPE, "stderr": slave}
    )
    p = subprocess.Popen(argv, env=irmd.env, cwd=cwd, stdin=subprocess.DEVNULL, **streams)  # type: ignore[arg-type]
    os.close(slave)
    seen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    p.communicate(timeout=60)
    return p.returncode, seen


def test_progress_only_on_a_terminal_and_never_data_to_one(irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:  # noqa: F811
    depots("t1")
    (tmp_path / "f.bin").write_bytes(os.urandom(400_000))
    code, seen = on_a_terminal(
        irmd, [str(BIN / "exnode"), "upload", "f.bin", "--depots", "t1", "-b", "64k"], tmp_path, "stderr"
    )
    assert code == 0 and re.search(rb"upload f\.bin.*\|", seen), seen  # a tqdm bar on the terminal
    code, seen = on_a_terminal(irmd, [str(BIN / "exnode"), "download", "f.bin.xnd", "-o", "-"], tmp_path, "stdout")
    assert code == 1 and b"terminal" not in seen  # refused; the message went to stderr, not the terminal
    code, seen = on_a_terminal(
        irmd, [str(BIN / "exnode"), "upload", "f.bin", "--depots", "t1", "-o", "-"], tmp_path, "stdout"
    )
    assert code == 1 and b"<exnode" not in seen
    assert status(irmd, "t1", tmp_path)["allocations"] == "7"  # the refused upload took nothing


def test_download_skips_a_replica_with_wrong_bytes(irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:  # noqa: F811
    for d in ("y1", "y2"):
        depots(d)
    (tmp_path / "f.bin").write_bytes(b"A" * 5000)
    r = run(irmd, "lors_upload", "f.bin", "--depots", "y1,y2", "-c", "2", "-f", cwd=tmp_path)  # -f: to f.bin.xnd
    assert r.returncode == 0, r.stderr
    ex = from_xml((tmp_path / "f.bin.xnd").read_bytes())
    # Point the first replica at other bytes of the right length: its checksum no longer matches.
    bad = run(irmd, "ibp", "allocate", "y1", "--size", "5000", "--duration", "60", cwd=tmp_path).stdout.decode().split()
    assert run(irmd, "ibp", "store", bad[1], stdin=b"B" * 5000, cwd=tmp_path).returncode == 0
    first = ex.mappings[0]
    ex.mappings[0] = Mapping(first.exnode_offset, first.logical_length, 0, 5000, bad[0], sha256=first.sha256)
    (tmp_path / "f.xnd").write_bytes(to_xml(ex))
    r = run(irmd, "lors_download", "f.xnd", "-o", "-", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"A" * 5000
