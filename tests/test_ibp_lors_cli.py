"""The LoRS tools as a LoRS user runs them: .xndrc files ($HOME's, then the current directory's, the
command line over both), LoRS's option letters and where its tools write, and no L-Bone pretended.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from apps.ibp import xndrc

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


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    return home, work


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
