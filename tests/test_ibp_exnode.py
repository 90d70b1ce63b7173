"""exNodes: the XML format and layout plans (no I/O), then upload/download/ls/augment/trim over
three depots, with a depot down and a corrupted replica.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc
from test_ibp_flows import Start, depots  # noqa: F401 - the depots fixture

from apps.ibp.exnode import NS, BadExnode, ExNode, Mapping, from_xml, plan, to_xml

K = "k" * 64


def cap(depot: str, right: str) -> str:
    return f"ibp://{depot}/0#{K}/{K}/{right}"


def test_plan_stripes_round_robin_with_distinct_replicas() -> None:
    blocks = plan(10, 4, ["a", "b", "c"], 2)
    assert blocks == [(0, 4, ["a", "b"]), (4, 4, ["b", "c"]), (8, 2, ["c", "a"])]
    with pytest.raises(ValueError):
        plan(10, 4, ["a"], 2)


def test_xml_round_trip_in_the_lors_namespace() -> None:
    ex = ExNode("f.bin", 10, "ab" * 32, [
        Mapping(0, 6, 0, 6, cap("a", "READ"), cap("a", "WRITE"), cap("a", "MANAGE"), "cd" * 32),
        Mapping(6, 4, 0, 4, cap("b:6714", "READ")),
    ])
    data = to_xml(ex)
    assert NS.encode() in data and b"exnode_offset" in data and b"logical_length" in data
    assert from_xml(data) == ex
    assert ex.gaps() == [] and ExNode("f", 12, mappings=ex.mappings).gaps() == [(10, 2)]


@pytest.mark.parametrize("bad", [
    b"not xml",
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><exnode/>',
    b"<other/>",
    b"<exnode/>",  # no size
    b'<exnode xmlns:exnode="%s"><exnode:metadata name="original_filesize" type="integer">5</exnode:metadata>'
    b'<exnode:mapping><exnode:metadata name="exnode_offset">0</exnode:metadata>'
    b'<exnode:metadata name="logical_length">9</exnode:metadata><exnode:metadata name="alloc_offset">0'
    b'</exnode:metadata><exnode:metadata name="alloc_length">9</exnode:metadata>'
    b"<exnode:read>ibp://a/0#k/k/READ</exnode:read></exnode:mapping></exnode>" % NS.encode(),  # past the end
])
def test_bad_exnodes_are_refused(bad: bytes) -> None:
    with pytest.raises(BadExnode):
        from_xml(bad)


def run(irmd: IrmdProc, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / tool), *args], env=irmd.env, capture_output=True, timeout=timeout)


def test_upload_download_with_a_depot_down_augment_and_trim(
        irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:  # noqa: F811
    procs = {d: depots(d) for d in ("x1", "x2", "x3")}
    src = tmp_path / "big.bin"
    data = os.urandom(700_000)
    src.write_bytes(data)
    r = run(irmd, "exnode", "upload", str(src), "--depots", "x1,x2,x3", "--stripe", "128k", "--replicas", "2")
    assert r.returncode == 0, r.stderr
    assert b"100.0%" in r.stderr  # the progress bar finished
    xnd = tmp_path / "big.xnd"
    xnd.write_bytes(r.stdout)
    ex = from_xml(r.stdout)
    assert len(ex.blocks()) == 6 and all(len({m.depot for m in ms}) == 2 for _, _, ms in ex.blocks())
    assert ex.sha256 == hashlib.sha256(data).hexdigest()
    listing = run(irmd, "exnode", "ls", str(xnd)).stdout.decode()
    assert "700000 bytes" in listing and "12 mappings" in listing

    procs["x2"].send_signal(signal.SIGKILL)
    procs["x2"].wait()
    r = run(irmd, "exnode", "download", str(xnd), "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == data

    r = run(irmd, "exnode", "trim", str(xnd), "--depots", "x2")
    assert r.returncode == 0, r.stderr
    trimmed = tmp_path / "trimmed.xnd"
    trimmed.write_bytes(r.stdout)
    assert all(m.depot != "x2" for m in from_xml(r.stdout).mappings)
    r = run(irmd, "exnode", "trim", str(trimmed), "--depots", "x1")
    assert r.returncode == 1 and b"no replica" in r.stderr
    r = run(irmd, "exnode", "augment", str(trimmed), "--depots", "x4", "--timeout", "5")
    assert r.returncode != 0 or b"added 0" in r.stderr  # x4 does not exist
    depots("x4")
    r = run(irmd, "exnode", "augment", str(trimmed), "--depots", "x4", "--in-place")
    assert r.returncode == 0, r.stderr
    assert {m.depot for m in from_xml(trimmed.read_bytes()).mappings} == {"x1", "x3", "x4"}
    r = run(irmd, "exnode", "download", str(trimmed), "-o", str(tmp_path / "out.bin"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").read_bytes() == data


def test_download_skips_a_replica_with_wrong_bytes(irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:  # noqa: F811
    for d in ("y1", "y2"):
        depots(d)
    src = tmp_path / "f.bin"
    src.write_bytes(b"A" * 5000)
    r = run(irmd, "exnode", "upload", str(src), "--depots", "y1,y2", "--replicas", "2")
    ex = from_xml(r.stdout)
    # Point the first replica at other bytes of the right length: its checksum no longer matches.
    bad = run(irmd, "ibp", "allocate", "y1", "--size", "5000", "--duration", "60").stdout.decode().split()
    subprocess.run([str(BIN / "ibp"), "store", bad[1]], env=irmd.env, input=b"B" * 5000, check=True,
                   capture_output=True)
    first = ex.mappings[0]
    ex.mappings[0] = Mapping(first.exnode_offset, first.logical_length, 0, 5000, bad[0], sha256=first.sha256)
    xnd = tmp_path / "f.xnd"
    xnd.write_bytes(to_xml(ex))
    r = run(irmd, "exnode", "download", str(xnd))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"A" * 5000
