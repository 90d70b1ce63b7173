"""The LoRS tools as a LoRS user runs them: .xndrc files ($HOME's, then the current directory's, the
command line over both), LoRS's option letters and where its tools write, and no L-Bone pretended.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, free_port
from test_ibp_flows import Start, depots  # noqa: F401 - the depots fixture

from apps.ibp import exnode_cli, xndrc
from apps.ibp.exnode import NS, ExNode, Mapping, from_xml, to_xml

pytestmark = pytest.mark.timeout(120)

# Written as LoRS's lors_setup.sh writes ~/.xndrc: keywords this implementation has no use for among them.
SETUP_STYLE = """\
######################################################################
#  This file contains defaults for the LoRS command line tools.
######################################################################
LBONE_SERVER     lbone.example.org 6767
RESOLUTION_FILE /nonexistent/.resolution.txt
LOCATION                    zip= 37996
DURATION 2h
STORAGE_TYPE                SOFT
VERBOSE                1
MAX_INTERNAL_BUFFER    64M
DEMO 0
DATA_BLOCKSIZE       64K
E2E_BLOCKSIZE        512K
E2E_ORDER            none
COPIES               2
TIMEOUT     20
THREADS  3
MAXDEPOTS 6
"""


def tool(
    name: str, *args: str, cwd: Path, home: Path, env: dict[str, str] | None = None, stdout: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool with HOME=home in cwd; its stdout to the file `stdout` if given (as `> FILE`)."""
    env = dict(env or os.environ, HOME=str(home))
    if stdout is None:
        return subprocess.run([str(BIN / name), *args], env=env, cwd=cwd, capture_output=True, timeout=90)
    with open(stdout, "wb") as out:
        return subprocess.run(
            [str(BIN / name), *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.PIPE, timeout=90
        )


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


def uploaded(
    tmp_path: Path,
    start: Start,
    irmd: IrmdProc,
    depot: str,
    size: int,
    *upload: str,
) -> tuple[Path, Path, bytes]:
    """(home, work, the file's bytes): a depot up and a file of `size` random bytes uploaded from work as
    f.bin (its exNode f.bin.xnd), with the upload's further options."""
    home, work = dirs(tmp_path)
    start(depot)
    data = os.urandom(size)
    (work / "f.bin").write_bytes(data)
    r = tool("exnode", "upload", "f.bin", "--depots", depot, *upload, cwd=work, home=home, env=irmd.env)
    assert r.returncode == 0, r.stderr
    return home, work, data


# -- the .xndrc reader --


def test_home_then_current_directory_each_keyword_and_depot_list_replaced(tmp_path: Path) -> None:
    home, work = dirs(tmp_path)
    (home / ".xndrc").write_text(SETUP_STYLE + "DEPOT a.example.org 6714\nDEPOT b.example.org 7000\n")
    rc = xndrc.load(str(home), work)
    assert rc.depots == ["a.example.org:6714", "b.example.org:7000"] and rc.lbone == ["lbone.example.org:6767"]
    assert (rc.duration, rc.soft, rc.bs, rc.copies, rc.timeout, rc.threads) == (7200, True, 65536, 2, 20, 3)
    assert (rc.location, rc.e2e, rc.verbose, rc.maxdepots) == ("zip= 37996", [], 1, 6)
    (work / ".xndrc").write_text("COPIES 1\nDEPOT ::1 6714\nDEPOT local-depot\nDURATION_DAYS 0.5\n")
    rc = xndrc.load(str(home), work)
    assert rc.depots == ["[::1]:6714", "local-depot"]  # ./.xndrc's DEPOT lines replace $HOME's list
    assert (rc.copies, rc.duration, rc.soft, rc.bs) == (1, 43200, True, 65536)  # what it does not say stays
    assert rc.files == [home / ".xndrc", work / ".xndrc"]
    assert xndrc.load(str(work), work).files == [work / ".xndrc"]  # HOME is the current directory: read once
    assert xndrc.load(str(tmp_path / "none"), tmp_path).files == []  # none at all: LoRS goes on without


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("COPIES three", "COPIES: 'three' is not a whole number"),
        ("COPIES 3   # three copies", "COPIES: takes one value"),  # LoRS would silently skip the line
        ("DEPOT depot.example.org 99999", "65535"),
        ("DEPOT depot.example.org 6714 extra", "DEPOT: takes a host and a port"),
        ("STORAGE_TYPE FIRM", "HARD nor SOFT"),
        ("DURATION 1w", "time"),
        ("DATA_BLOCKSIZE lots", "size"),
        ("E2E_ORDER checksum rot13", "rot13"),
        ("LBONE_SERVER lbone.example.org", "LBONE_SERVER: takes a host and a port"),
    ],
)
def test_a_bad_value_is_named_with_its_file_and_line(tmp_path: Path, line: str, says: str) -> None:
    (tmp_path / ".xndrc").write_text(f"# defaults\nDEPOT d.example.org 6714\n{line}\nSOME_KEYWORD_OF_LODN x y z\n")
    with pytest.raises(xndrc.BadRc, match=rf"^{re.escape(str(tmp_path / '.xndrc'))}:3: .*{re.escape(says)}"):
        xndrc.load(str(tmp_path / "none"), tmp_path)


def test_an_oversized_binary_or_world_writable_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".xndrc").write_bytes(b"# x\n" * (xndrc.MAX_BYTES // 4 + 1))
    with pytest.raises(xndrc.BadRc, match="KiB"):
        xndrc.load(str(tmp_path / "none"), tmp_path)
    (tmp_path / ".xndrc").write_bytes(b"DEPOT a 1\0\n")
    with pytest.raises(xndrc.BadRc, match="binary"):
        xndrc.load(str(tmp_path / "none"), tmp_path)
    (tmp_path / ".xndrc").write_text("DEPOT depot.example.org 6714\n")
    (tmp_path / ".xndrc").chmod(0o666)  # anyone could have said where the files go
    with pytest.raises(xndrc.BadRc, match="writable by anyone"):
        xndrc.load(str(tmp_path / "none"), tmp_path)


# -- the tools --


def test_a_malformed_xndrc_is_one_clear_line_and_exit_1(tmp_path: Path) -> None:
    home, work = dirs(tmp_path)
    (work / "f.bin").write_bytes(b"x" * 1000)
    (home / ".xndrc").write_text("DEPOT 127.0.0.1 6714\nCOPIES 3 # three\n")
    said = f"{home}/.xndrc:2: COPIES: takes one value, not 3 (a comment must be on a line of its own)\n"
    for name, *argv in (["lors_upload", "f.bin"], ["lors_ls", "f.bin.xnd"], ["exnode upload", "f.bin"]):
        r = tool(*name.split(), *argv, cwd=work, home=home)  # every tool reads it, as LoRS's do
        assert r.returncode == 1 and r.stderr.decode() == f"{name}: {said}", r.stderr
    assert not list(work.glob("*.xnd*"))


def test_an_l_bone_command_line_with_no_depots_fails_saying_where_to_list_them(tmp_path: Path) -> None:
    home, work = dirs(tmp_path)
    (work / "f.bin").write_bytes(b"x" * 1000)
    # LoRS's README: lors_upload filename -f -F 8 -c 2 -l "st= TN", with an L-Bone server named
    r = tool("lors_upload", "f.bin", "-f", "-F", "8", "-c", "2", "-l", "st= TN", "-H", "lbone.example.org",
             "-P", "6767", "-m", "6", "-V", "1", cwd=work, home=home)  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no depots" in err and "DEPOT host port" in err and "--depots" in err and "no L-Bone" in err
    assert "-H" in err and "-l" in err
    (home / ".xndrc").write_text(SETUP_STYLE)  # lors_setup.sh's file: L-Bone servers and a location, no DEPOT
    r = tool("lors_upload", "f.bin", "-f", cwd=work, home=home)
    assert r.returncode == 1 and b"LBONE_SERVER" in r.stderr and b"DEPOT host port" in r.stderr, r.stderr
    assert not list(work.glob("*.xnd*"))


def test_lors_options_not_carried_out_are_refused_by_name(tmp_path: Path) -> None:
    home, work = dirs(tmp_path)
    (work / "f.bin").write_bytes(b"x")
    for argv, what in (
        (["lors_upload", "f.bin", "-x"], b"-x: end-to-end conditioning is not implemented here"),
        (["lors_upload", "-i", "f.bin"], b"-i: reading the file from stdin"),
        (["lors_augment", "f.xnd", "-B"], b"-B: adding copies only where too few"),
        (["lors_download", "f.xnd", "-R"], b"-R: resuming"),
    ):
        r = tool(argv[0], *argv[1:], cwd=work, home=home)
        assert r.returncode == 2 and what in r.stderr and b"Traceback" not in r.stderr, r.stderr
    for name in ("lors_upload", "lors_augment", "lors_ls", "lors_trim"):  # popt's help: -? and --help
        for flag in ("-?", "--help"):
            r = tool(name, flag, cwd=work, home=home)
            assert r.returncode == 0 and r.stdout.startswith(f"usage: {name}".encode()), r.stderr
    r = tool("lors_upload", "-?", cwd=work, home=home)
    assert b"-h, --hard" in r.stdout  # LoRS's HARD, not help
    r = tool("exnode", "upload", "-h", cwd=work, home=home)
    assert r.returncode == 0 and b"usage: exnode upload" in r.stdout  # ours stays help


def test_xndrc_depots_upload_then_ls_download_trim_refresh_as_lors_does(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    home, work = dirs(tmp_path)
    ports = [free_port(["127.0.0.1"]) for _ in range(2)]
    for i, port in enumerate(ports):
        depots(f"l{i}", "--listen", f"tcp:127.0.0.1:{port}", "--copy-to", "127.0.0.1:*")  # replicas over TCP
    tcp = [f"127.0.0.1:{p}" for p in ports]
    # $HOME's: lors_setup.sh's keywords; ./.xndrc's: the depots (as LoRS's DEPOT lines: host and port).
    (home / ".xndrc").write_text(SETUP_STYLE + "DEPOT 127.0.0.1 1\n")
    (work / ".xndrc").write_text("".join(f"DEPOT 127.0.0.1 {p}\n" for p in ports))
    data = os.urandom(300_000)
    (work / "big.bin").write_bytes(data)

    r = tool("lors_upload", "big.bin", cwd=work, home=home, env=irmd.env, stdout=work / "big.bin.xnd")
    assert r.returncode == 0, r.stderr  # `lors_upload big.bin > big.bin.xnd`: the exNode on stdout
    ex = from_xml((work / "big.bin.xnd").read_bytes())
    assert len(ex.blocks()) == 5 and all(n == 65536 for _, n, _ in ex.blocks()[:4])  # DATA_BLOCKSIZE 64K
    assert all({m.depot for m in ms} == set(tcp) for _, _, ms in ex.blocks())  # COPIES 2, on the DEPOT lines
    assert all(abs(m.expires - time.time() - 7200) < 120 for m in ex.mappings)  # DURATION 2h

    r = tool("lors_ls", "big.bin.xnd", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.decode().splitlines()
    assert len(rows) == 10, rows
    stamp = r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}"  # ctime's
    for i, row in enumerate(rows):  # STORAGE_TYPE SOFT, all three capabilities, one reader each
        assert re.fullmatch(rf" ?{i} Srwma  1 +\d+ +\d+ 127\.0\.0\.1:\d+ {stamp} alive", row), row
    assert b"TITLE Filename big.bin" in r.stderr and b"EXNODEFILE big.bin.xnd" in r.stderr

    r = tool("lors_download", "big.bin.xnd", "-o", "back.bin", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 0 and (work / "back.bin").read_bytes() == data, r.stderr

    # lors_trim -m XND N: the new exNode on stdout, as LoRS's.
    r = tool("lors_trim", "-m", "big.bin.xnd", "0", cwd=work, home=home, env=irmd.env, stdout=work / "t.xnd")
    assert r.returncode == 0, r.stderr
    assert from_xml((work / "t.xnd").read_bytes()).mappings == ex.mappings[1:]
    until = int(time.time()) + 3 * 3600
    r = tool("lors_refresh", "-a", str(until), "t.xnd", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 0, r.stderr
    assert all(abs(m.expires - until) < 60 for m in from_xml((work / "t.xnd").read_bytes()).mappings)


def test_the_command_line_wins_over_both_xndrc_files(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    home, work = dirs(tmp_path)
    port = free_port(["127.0.0.1"])
    depots("c0", "--listen", f"tcp:127.0.0.1:{port}")
    depots("c1")
    (home / ".xndrc").write_text("COPIES 3\nSTORAGE_TYPE SOFT\nDATA_BLOCKSIZE 64K\nDEPOT 127.0.0.1 1\n")
    (work / ".xndrc").write_text(f"COPIES 1\nDEPOT 127.0.0.1 {port}\n")
    (work / "f.bin").write_bytes(os.urandom(100_000))

    r = tool("lors_upload", "f.bin", "-f", cwd=work, home=home, env=irmd.env)  # -f: to f.bin.xnd
    assert r.returncode == 0 and r.stdout == b"", r.stderr
    ex = from_xml((work / "f.bin.xnd").read_bytes())  # ./.xndrc's depots and COPIES, $HOME's block size
    assert len(ex.blocks()) == 2 and {m.depot for m in ex.mappings} == {f"127.0.0.1:{port}"}

    r = tool("lors_upload", "f.bin", "--depots", "c1", "-c", "1", "-b", "32k", "-h", "-d", "1h", "-o", "cl.xnd",
             cwd=work, home=home, env=irmd.env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ex = from_xml((work / "cl.xnd").read_bytes())
    assert len(ex.blocks()) == 4 and {m.depot for m in ex.mappings} == {"c1"}
    assert all(abs(m.expires - time.time() - 3600) < 120 for m in ex.mappings)
    listing = tool("lors_ls", "cl.xnd", cwd=work, home=home, env=irmd.env).stdout.decode()
    assert listing.count(" Hrwma ") == 4, listing  # -h: HARD over the .xndrc's SOFT

    (home / "other.xndrc").write_text("DEPOT c1\n")  # -X FILE: its depots over ./.xndrc's
    r = tool("lors_upload", "f.bin", "-X", str(home / "other.xndrc"), "-o", "x.xnd", cwd=work, home=home,
             env=irmd.env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert {m.depot for m in from_xml((work / "x.xnd").read_bytes()).mappings} == {"c1"}


# -- exNodes as LoRS writes them --


def as_lors_writes(ex: ExNode, function: str = "") -> bytes:
    """`ex` as LoRS 0.82 writes an exNode (libexnode's serialize.c, lors_serialize.c): the root in no
    namespace and without a version; exNode metadata `filename` and `lorsversion` (a double) only, no
    file size; each mapping's metadata in name order, its conditioning `function` if any, then its
    read, write and manage capabilities."""
    out = [
        '<?xml version="1.0"?>',
        f'<exnode xmlns:exnode="{NS}">',
        f'  <exnode:metadata name="filename" type="string">{ex.filename}</exnode:metadata>',
        '  <exnode:metadata name="lorsversion" type="double">0.828000</exnode:metadata>',
    ]
    for m in ex.mappings:
        out.append("  <exnode:mapping>")
        for name in ("alloc_length", "alloc_offset", "e2e_blocksize", "exnode_offset", "logical_length"):
            value = (65536 if function else 0) if name == "e2e_blocksize" else getattr(m, name)
            out.append(f'    <exnode:metadata name="{name}" type="integer">{value}</exnode:metadata>')
        out += [function] if function else []
        out += [f"    <exnode:{t}>{getattr(m, t)}</exnode:{t}>" for t in ("read", "write", "manage")]
        out.append("  </exnode:mapping>")
    return ("\n".join([*out, "</exnode>", ""])).encode()


def as_lors_wrote(
    tmp_path: Path, start: Start, irmd: IrmdProc, depot: str, size: int, name: str, function: str = ""
) -> tuple[Path, Path, bytes]:
    """A file uploaded in 64 KiB blocks (see `uploaded`), its exNode rewritten in work as LoRS writes one."""
    home, work, data = uploaded(tmp_path, start, irmd, depot, size, "-b", "64k")
    (work / name).write_bytes(as_lors_writes(from_xml((work / "f.bin.xnd").read_bytes()), function))
    return home, work, data


def test_an_exnode_lors_wrote_is_listed_and_downloaded(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    home, work, data = as_lors_wrote(tmp_path, depots, irmd, "x0", 150_000, "lors.xnd")

    r = tool("lors_ls", "lors.xnd", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3, r.stderr
    assert b"SIZE 150000\n" in r.stderr and b"MAXLENGTH 150000\n" in r.stderr  # where the last mapping ends
    r = tool("lors_download", "lors.xnd", "-o", "back.bin", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 0 and (work / "back.bin").read_bytes() == data, r.stderr

    ours = to_xml(from_xml((work / "lors.xnd").read_bytes()))  # what our tools write back, LoRS reads
    assert b'<exnode:metadata name="lorsversion" type="double">0.820000</exnode:metadata>' in ours
    assert from_xml(ours).size == 150_000


def test_lors_download_writes_to_stdout_unless_given_o_or_f(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    home, work, data = uploaded(tmp_path, depots, irmd, "y0", 70_000)
    (work / "f.bin").unlink()
    # LoRS's lors_download: output "-" unless -o FILE, or -f for the exNode's own file name.
    r = tool("lors_download", "f.bin.xnd", cwd=work, home=home, env=irmd.env, stdout=work / "out.bin")
    assert r.returncode == 0 and (work / "out.bin").read_bytes() == data, r.stderr
    assert not (work / "f.bin").exists()
    r = tool("lors_download", "-f", "f.bin.xnd", cwd=work, home=home, env=irmd.env, stdout=work / "none")
    assert r.returncode == 0 and (work / "f.bin").read_bytes() == data and (work / "none").read_bytes() == b""


def test_lors_ls_lists_the_other_exnodes_past_one_it_cannot_read(tmp_path: Path) -> None:
    home, work = dirs(tmp_path)
    ex = ExNode("f.bin", 10, mappings=[Mapping(0, 10, 0, 10, "ibp://127.0.0.1:1/0#k/k/READ")])
    for name in ("a.xnd", "c.xnd"):
        (work / name).write_bytes(to_xml(ex))
    (work / "b.xnd").write_text("not an exNode")
    for name in ("lors_ls", "exnode"):
        argv = ["a.xnd", "b.xnd", "missing.xnd", "c.xnd", "--offline"]
        r = tool(name, *(["ls"] if name == "exnode" else []), *argv, cwd=work, home=home)
        listed = r.stdout.decode() + r.stderr.decode()
        assert r.returncode == 1 and "Traceback" not in listed, listed  # as LoRS's: an error, then the next
        assert "a.xnd" in listed and "c.xnd" in listed, listed
        assert "b.xnd: not XML" in listed and "cannot read missing.xnd" in listed, listed


# What lors_upload -k (--checksum) records in each mapping (lors_libe2e.c's arguments), its bytes
# in the allocation being blocks with their checksums, not the file's.
CHECKSUM = """\
    <exnode:function name="checksum">
      <exnode:argument name="blocksize" type="integer">65536</exnode:argument>
      <exnode:argument name="header_length" type="integer">20</exnode:argument>
    </exnode:function>"""


def test_a_lors_exnode_conditioned_end_to_end_is_refused_not_misread_and_kept_on_rewrite(
    irmd: IrmdProc,
    depots: Start,  # noqa: F811
    tmp_path: Path,
) -> None:
    home, work, _ = as_lors_wrote(tmp_path, depots, irmd, "z0", 100_000, "k.xnd", CHECKSUM)

    said = b"are conditioned end to end by LoRS (checksum): not implemented here\n"
    r = tool("lors_download", "k.xnd", "-o", "back.bin", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 1 and r.stderr.endswith(said) and not (work / "back.bin").exists(), r.stderr
    r = tool("lors_augment", "k.xnd", "--depots", "z0", "-o", "aug.xnd", cwd=work, home=home, env=irmd.env)
    assert r.returncode == 1 and r.stderr.endswith(said) and not (work / "aug.xnd").exists(), r.stderr

    r = tool("lors_refresh", "k.xnd", cwd=work, home=home, env=irmd.env)  # what does not read the bytes works
    assert r.returncode == 0, r.stderr
    again = from_xml((work / "k.xnd").read_bytes())
    assert len(again.mappings) == 2 and all(m.e2e_blocksize == 65536 for m in again.mappings)
    assert all(m.conditioning == "checksum" and 'name="header_length"' in m.function for m in again.mappings)
    assert (work / "k.xnd").read_bytes().count(b'<exnode:function name="checksum">') == 2


@pytest.mark.parametrize(("given", "bs"), [("1.5M", 3 << 19), ("512k", 1 << 19), ("2G", 2 << 30), ("0.5m", 1 << 19)])
def test_lors_upload_takes_block_sizes_as_lors_reads_them(given: str, bs: int) -> None:
    # lors_util.c's strtobytes: a number, fractions too, then K, M or G in either case.
    args = exnode_cli.lors_parser("upload").parse_args(["f.bin", "-b", given])
    assert args.bs == bs
    assert exnode_cli.lors_parser("upload").parse_args(["f.bin", "-bs", given]).bs == bs


def lors_modify(*args: str, cwd: Path, home: Path, stdout: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """lors_modify as its console script runs it (the script is made when the package is installed)."""
    cmd = [sys.executable, "-c", "from apps.ibp.exnode_cli import lors_modify; lors_modify()", *args]
    env = dict(os.environ, HOME=str(home))
    if stdout is None:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, timeout=60)
    with open(stdout, "wb") as out:
        return subprocess.run(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.PIPE, timeout=60)


def test_lors_modify_hands_on_an_exnode_without_its_manage_or_write_capabilities(tmp_path: Path) -> None:
    """LoRS's lors_modify (cmdtools/lors_modify.c, lors_file.c lorsModifyFile): the exNode without the
    manage capabilities (always: its options add to those), -w without the write ones too; to stdout
    unless -o FILE or -f (in place), as LoRS's other tools. It was no tool here."""
    home, work = dirs(tmp_path)
    cap = "ibp://127.0.0.1:6714/0#k{0}/{1}/{2}"
    ex = ExNode(
        "f.bin",
        20,
        mappings=[
            Mapping(
                off,
                10,
                0,
                10,
                cap.format(off, "r", "READ"),
                cap.format(off, "w", "WRITE"),
                cap.format(off, "m", "MANAGE"),
            )
            for off in (0, 10)
        ],
    )
    (work / "f.xnd").write_bytes(to_xml(ex))

    r = lors_modify("-w", "f.xnd", cwd=work, home=home, stdout=work / "ro.xnd")
    assert r.returncode == 0, r.stderr
    ro = from_xml((work / "ro.xnd").read_bytes())
    assert [(m.read, m.write, m.manage) for m in ro.mappings] == [(m.read, "", "") for m in ex.mappings]
    assert from_xml((work / "f.xnd").read_bytes()) == ex  # the owner's exNode is left as it was

    r = lors_modify("f.xnd", "-o", "nm.xnd", cwd=work, home=home)
    assert r.returncode == 0 and r.stdout == b"", r.stderr
    assert [(m.write, m.manage) for m in from_xml((work / "nm.xnd").read_bytes()).mappings] == [
        (m.write, "") for m in ex.mappings
    ]
    assert (work / "nm.xnd").stat().st_mode & 0o777 == 0o600  # it still holds capabilities

    r = lors_modify("-m", "-f", "f.xnd", cwd=work, home=home)
    assert r.returncode == 0 and all(not m.manage for m in from_xml((work / "f.xnd").read_bytes()).mappings)

    r = lors_modify("-r", "nm.xnd", "-o", "none.xnd", cwd=work, home=home)  # no read capability: none is read here
    assert r.returncode == 2 and b"-r" in r.stderr and not (work / "none.xnd").exists()
