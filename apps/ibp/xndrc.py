"""LoRS's `.xndrc` files: the defaults of the LoRS tools (depots, block size, copies, duration…),
read from $HOME/.xndrc, then ./.xndrc (a later file wins), below what the command line says.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from irmd.identity import open_regular

log = logging.getLogger("exnode")

NAME = ".xndrc"
MAX_BYTES = 256 * 1024  # LoRS's own files are a few kB
IBP_PORT = 6714
LBONE_PORT = 6767
E2E_WORDS = ("checksum", "des_encrypt", "aes_encrypt", "xor_encrypt", "zlib_compress", "none")
_SIZE = re.compile(r"(\d+(?:\.\d*)?)([kKmMgG]?)")
_TIME = re.compile(r"(\d+(?:\.\d*)?)([sSmMhHdD]?)")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}|\[?[0-9A-Fa-f:.]{2,45}\]?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class BadRc(ValueError):
    """An .xndrc that cannot be used; the message names the file and line."""


@dataclass
class Rc:
    """What the .xndrc files read so far say; None: not said (the tool's own default holds)."""

    depots: list[str] | None = None  # DEPOT lines, as `exnode --depots` names them
    lbone: list[str] = field(default_factory=list)  # LBONE_SERVER host:port (no L-Bone client here)
    location: str | None = None
    duration: int | None = None  # seconds
    soft: bool | None = None
    bs: int | None = None
    copies: int | None = None
    threads: int | None = None
    timeout: int | None = None
    maxdepots: int | None = None
    verbose: int | None = None
    e2e: list[str] | None = None  # E2E_ORDER words: conditioning we do not do
    files: list[Path] = field(default_factory=list)  # those read, in order


def depot_name(host: str, port: int) -> str:
    """`DEPOT host port` as the tools name a depot: host:port (TCP), an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _number(text: str, lo: int, hi: int) -> int:
    if not re.fullmatch(r"-?\d{1,9}", text) or not lo <= int(text) <= hi:
        raise ValueError(f"{text!r} is not a whole number from {lo} to {hi}")
    return int(text)


def size(text: str) -> int:
    """LoRS's sizes: '5M', '512K', '0.5G' (powers of 1024), bytes without a unit."""
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size (a number with an optional K, M or G)")
    value = int(float(m[1]) * _SIZE_UNITS[m[2].lower()])
    if not 1 <= value <= 1 << 40:
        raise ValueError(f"{text!r} is out of range")
    return value


def _seconds(text: str) -> int:
    """LoRS's times: '1d', '12h', '30m', '45s', seconds without a unit."""
    m = _TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a time (a number with an optional s, m, h or d)")
    value = int(float(m[1]) * _TIME_UNITS[m[2].lower()])
    if not 1 <= value < 1 << 31:
        raise ValueError(f"{text!r} is out of range (1 s to 68 years)")
    return value


def _host_port(values: list[str], default_port: int) -> str:
    host = values[0]
    if _HOST.fullmatch(host) is None:
        raise ValueError(f"{host[:80]!r} is not a host name or address")
    port = _number(values[1], 1, 65535) if len(values) > 1 else default_port
    return depot_name(host, port)


def _one(keyword: str, values: list[str]) -> str:
    if len(values) != 1:
        raise ValueError(f"takes one value, not {len(values)} (a comment must be on a line of its own)")
    return values[0]


def _apply(rc: Rc, keyword: str, values: list[str], depots: list[str], lbone: list[str]) -> None:
    """One line's keyword into `rc` (DEPOT and LBONE_SERVER into this file's lists)."""
    if keyword == "DEPOT":
        # `DEPOT host port` as LoRS; `DEPOT name` (a depot reached by flow) is ours.
        if len(values) not in (1, 2):
            raise ValueError("takes a host and a port (or one depot name)")
        name = _host_port(values, IBP_PORT) if len(values) == 2 else values[0]
        if name not in depots:
            depots.append(name)
    elif keyword == "LBONE_SERVER":
        if len(values) != 2:
            raise ValueError("takes a host and a port")
        lbone.append(_host_port(values, LBONE_PORT))
    elif keyword == "LOCATION":  # the rest of the line ("state= TN"); empty: none
        rc.location = " ".join(values) or None
    elif keyword == "DURATION":
        rc.duration = _seconds(_one(keyword, values))
    elif keyword == "DURATION_DAYS":
        text = _one(keyword, values)
        if not re.fullmatch(r"\d+(?:\.\d*)?", text) or not 0 < float(text) * 86400 < 1 << 31:
            raise ValueError(f"{text!r} is not a number of days")
        rc.duration = int(float(text) * 86400)
    elif keyword == "STORAGE_TYPE":
        kind = _one(keyword, values).upper()
        if kind not in ("HARD", "SOFT"):
            raise ValueError(f"{values[0]!r} is neither HARD nor SOFT")
        rc.soft = kind == "SOFT"
    elif keyword == "DATA_BLOCKSIZE":
        rc.bs = size(_one(keyword, values))
    elif keyword == "COPIES":
        rc.copies = _number(_one(keyword, values), 1, 1000)
    elif keyword == "THREADS":  # LoRS took -1 for "as many as needed": the tools' own default here
        n = _number(_one(keyword, values), -1, 256)
        rc.threads = n if n > 0 else None
    elif keyword == "TIMEOUT":
        rc.timeout = _seconds(_one(keyword, values))
    elif keyword == "MAXDEPOTS":
        rc.maxdepots = _number(_one(keyword, values), -1, 100_000)
    elif keyword == "VERBOSE":
        rc.verbose = _number(_one(keyword, values), -1, 1 << 30)
    elif keyword == "E2E_ORDER":
        words = [v.lower() for v in values]
        for word in words:
            if word not in E2E_WORDS:
                raise ValueError(f"{word!r} is not one of {', '.join(E2E_WORDS)}")
        rc.e2e = [] if "none" in words else words
    # Any other keyword (RESOLUTION_FILE, MAX_INTERNAL_BUFFER, E2E_BLOCKSIZE, DEMO, FRAGMENTS_PER_FILE,
    # ROUTE_DEPOT, LoDN's…) is skipped, as LoRS skips what it does not know.


def _group_ok(st: os.stat_result) -> bool:
    """A file its group may write only if that group is its owner's own (a user private group, as
    umask 002 leaves files in): the owner's primary group, of the owner's name, naming no other member."""
    if not st.st_mode & stat.S_IWGRP:
        return True
    try:
        owner = pwd.getpwuid(st.st_uid)
        group = grp.getgrgid(st.st_gid)
    except KeyError:
        return False
    return owner.pw_gid == st.st_gid and group.gr_name == owner.pw_name and set(group.gr_mem) <= {owner.pw_name}


def read(path: Path, rc: Rc) -> None:
    """Read one .xndrc into `rc`: its values replace those read before; its DEPOT (LBONE_SERVER)
    lines, if it has any, replace the list read before, as LoRS's reader does."""
    try:
        fd, st = open_regular(str(path))  # a FIFO in its place cannot hold the tool
    except OSError as e:  # absent, unreadable, or no regular file
        raise BadRc(f"cannot read {path}: {e.strerror}" if e.strerror else str(e)) from None
    with os.fdopen(fd, "rb") as f:
        # Its DEPOT lines say where files go: one planted in a directory (or edited by a group the
        # owner shares) must not send them to a depot of another user, who would read them there.
        if st.st_uid not in (os.getuid(), 0) or st.st_mode & stat.S_IWOTH:
            raise BadRc(f"{path}: owned by uid {st.st_uid} or writable by anyone: not read (it names depots)")
        if not _group_ok(st):
            raise BadRc(f"{path}: writable by group {st.st_gid}, not its owner's own: not read (it names depots)")
        try:
            data = f.read(MAX_BYTES + 1)
        except OSError as e:
            raise BadRc(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise BadRc(f"{path}: over {MAX_BYTES // 1024} KiB: not an .xndrc")
    if b"\0" in data:
        raise BadRc(f"{path}: a binary file, not an .xndrc")
    depots: list[str] = []
    lbone: list[str] = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        try:
            _apply(rc, words[0], words[1:], depots, lbone)
        except ValueError as e:
            why = str(e) if len(str(e)) <= 200 else str(e)[:200] + "…"  # one line, even of a huge value
            raise BadRc(f"{path}:{number}: {words[0][:40]}: {why}") from None
    if depots:
        rc.depots = depots
    if lbone:
        rc.lbone = lbone
    rc.files.append(path)
    log.debug("read %s", path)


def load(home: str | None = None, cwd: Path | None = None) -> Rc:
    """$HOME/.xndrc, then ./.xndrc (each if it exists; one file once), as LoRS reads them."""
    rc = Rc()
    home = os.environ.get("HOME") if home is None else home
    seen: set[tuple[int, int]] = set()
    for path in ([Path(home) / NAME] if home else []) + [(cwd or Path()) / NAME]:
        try:
            st = path.stat()
        except OSError:
            continue  # absent (or unreachable): LoRS goes on without it
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        read(path, rc)
    return rc
