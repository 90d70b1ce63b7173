"""The exNode tools: `exnode upload|download|ls|refresh|augment|trim`, and the same tools under their
LoRS names (`lors_upload` …), which take LoRS's option letters, read .xndrc and print as LoRS does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, TypeVar

from apps.ibp import lors, xndrc
from apps.ibp import wire as w
from apps.ibp.cli import seconds, size
from apps.ibp.exnode import MAX_XML, BadExnode, ExNode, Mapping, from_xml, to_xml
from apps.ibp.lors import Settings
from flowlib import FlowError
from irmd.identity import open_regular
from proto.version import add_version
from proto.version import text as version_text
from proto.visible import visible

log = logging.getLogger("exnode")
T = TypeVar("T")
TOOLS = ("upload", "download", "ls", "refresh", "augment", "trim", "modify")
# LoRS's defaults (its tutorial and lors_upload): 5 MB blocks, one copy, one day, HARD allocations.
BLOCK = "5M"
COPIES = 1
DURATION = "1d"
TIMEOUT = 30  # seconds to wait for a depot at each step
THREADS = 4
MAX_THREADS = 256


class Refused(Exception):
    """A command the tool will not carry out as given (an output that exists, a terminal)."""


class _TqdmHandler(logging.Handler):
    """Log lines on stderr that do not tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm  # as lors.progress: only when there is something to say

        tqdm.write(self.format(record), file=sys.stderr)


# -- outputs --


def stdout_for(what: str) -> BinaryIO:
    """stdout for `what`, refused when it is a terminal."""
    if sys.stdout.isatty():
        raise Refused(f"will not write {what} to a terminal: give -o FILE (or redirect stdout)")
    return sys.stdout.buffer


def write_exnode(ex: ExNode, dest: str | Path) -> str:
    """The exNode to `dest` ("-": stdout): mode 0600 (it holds capabilities), fsync'd, then renamed
    into place. Returns where it went."""
    data = to_xml(ex)
    if str(dest) == "-":
        out = stdout_for("an exNode")
        out.write(data)
        out.flush()
        return "stdout"
    write_file(Path(dest), lambda f: f.write(data), 0o600)
    return str(dest)


def write_file(path: Path, fill: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """Fill a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory:
    `path` is the old file or the whole new one, never a part. `mode` None: as the umask says."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent or Path("."))
    if mode is None:
        mask = os.umask(0o077)
        os.umask(mask)
        mode = 0o666 & ~mask
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent or Path("."), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def partial_name(dest: str | Path) -> str:
    return "-" if str(dest) == "-" else f"{dest}.partial"


def read_exnode(path: Path) -> ExNode:
    """The exNode in `path` ("-": stdin). Only a regular file is read, and no more of it than an
    exNode may hold: one named by another user (root's tools read users' exNodes) can be a FIFO
    that never answers or a link to /dev/zero, which held the tool or took all its memory."""
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_XML + 1)
        else:
            fd, _ = open_regular(str(path))  # without blocking: a FIFO is refused, not waited on
            with os.fdopen(fd, "rb") as f:
                data = f.read(MAX_XML + 1)  # from_xml refuses more than MAX_XML
    except OSError as e:
        raise BadExnode(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return from_xml(data)
    except BadExnode as e:  # which of several exNodes it was
        raise BadExnode(f"{path}: {e}") from None


def safe_name(name: str) -> str:
    """A file name from an exNode, as a name in the current directory: its last component only, and
    only if every character of it prints (no line breaks, controls or bidirectional overrides)."""
    base = Path(name.replace("\\", "/")).name
    if base in ("", ".", "..") or not base.isprintable():
        raise Refused(f"the exNode's file name {visible(name[:80])} is no usable name: give -o FILE")
    return base


def settings(args: argparse.Namespace) -> Settings:
    return Settings(args.timeout, args.threads, args.encrypt)


def reliability(args: argparse.Namespace) -> int:
    return w.IBP_SOFT if args.soft else w.IBP_HARD


def depot_list(text: str) -> list[str]:
    depots = [d.strip() for d in text.split(",") if d.strip()]
    if not depots:
        raise argparse.ArgumentTypeError("no depot named")
    return depots


def bounded(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi."""

    def check(text: str) -> int:
        if not re.fullmatch(r"-?\d{1,12}", text.strip()) or not lo <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {lo} to {hi}")
        return int(text)

    return check


def lors_size(text: str) -> int:
    """A size as LoRS's tools read one (`strtobytes`): '5M', '512k', '1.5M' (powers of 1024)."""
    try:
        return xndrc.size(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def numbers(text: str) -> str:
    """Mapping numbers as `ls` shows them: '0,3,4'."""
    if not re.fullmatch(r"\s*\d{1,9}(\s*,\s*\d{1,9})*\s*,?\s*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of mapping numbers")
    return text


def _first(*values: T | None) -> T:
    for v in values:
        if v is not None:
            return v
    raise AssertionError("no default")


# -- .xndrc, LoRS's command lines and ours --


def resolve(args: argparse.Namespace, rc: xndrc.Rc) -> None:
    """What the command line left unsaid, from the .xndrc files (`rc`), else the tools' defaults."""
    args.rc = rc
    args.timeout = _first(args.timeout, rc.timeout, TIMEOUT)
    args.threads = _first(args.threads, rc.threads, THREADS)
    args.verbose = _first(args.verbose, rc.verbose, 0) > 0
    if args.cmd in ("upload", "augment"):
        args.duration = _first(args.duration, rc.duration, seconds(DURATION))
        args.soft = _first(args.soft, rc.soft, False)
        args.copies = _first(args.copies, rc.copies, COPIES if args.cmd == "upload" else 0)
    if args.cmd == "upload":
        args.bs = _first(args.bs, rc.bs, size(BLOCK))
    if args.cmd == "trim" and args.lors:
        _lors_trim_items(args)


def _lors_trim_items(args: argparse.Namespace) -> None:
    """lors_trim's `-m XND 0 3 5` (the numbers after the exNode, or before it) into our XND and -m."""
    given = [t for t in args.items if re.fullmatch(r"\d{1,9}(,\d{1,9})*", t)]
    names = [t for t in args.items if not re.fullmatch(r"\d{1,9}(,\d{1,9})*", t)]
    if len(names) != 1:
        raise Refused("give one exNode (and with -m the numbers of its mappings to drop, as lors_ls shows them)")
    if given and not args.by_number:
        raise Refused(f"{given[0]}: mapping numbers are given with -m")
    if args.by_number and not given:
        raise Refused("-m: give the numbers of the mappings to drop after the exNode, as lors_ls shows them")
    args.xnd = Path(names[0])
    args.mappings = ",".join(given)


def depots_for(args: argparse.Namespace) -> list[str]:
    """The depots to store on: --depots, else -X FILE's DEPOT lines, else those of the .xndrc files.
    There is no L-Bone client here: its options and keywords never find a depot."""
    rc: xndrc.Rc = args.rc
    lbone = [
        what
        for what, given in (
            ("-H", args.lbone_host),
            ("-P", args.lbone_port),
            ("-l", args.location),
            ("LBONE_SERVER", rc.lbone),
            ("LOCATION", rc.location),
        )
        if given
    ]
    if args.depots:
        depots: list[str] = args.depots
    elif args.xndrc:
        alt = xndrc.Rc()
        xndrc.read(args.xndrc, alt)
        if not alt.depots:
            raise Refused(f"{args.xndrc} has no DEPOT lines")
        depots = alt.depots
    elif rc.depots:
        depots = rc.depots
    else:
        why = f"; there is no L-Bone here to find depots ({', '.join(lbone)} cannot be used)" if lbone else ""
        raise Refused(
            "no depots to store on: name them with --depots a,b,… or in .xndrc lines `DEPOT host port`"
            f" ($HOME/.xndrc or ./.xndrc){why}"
        )
    if lbone:
        log.info("no L-Bone here: %s not used; the depots: %s", ", ".join(lbone), ",".join(depots))
    if rc.e2e:
        log.warning(
            "the .xndrc's E2E_ORDER %s is not applied (no end-to-end conditioning here): the data is stored as it is",
            " ".join(rc.e2e),
        )
    return depots


def destination(args: argparse.Namespace, default: str) -> str:
    """Where an exNode goes: -o, else `default`. Under the LoRS names, without -o or -f, it goes to
    stdout as LoRS's do, unless stdout is a terminal (then `default`)."""
    if args.outputfile:
        return str(args.outputfile)
    if args.lors and not args.samename and not sys.stdout.isatty():
        return "-"
    return default


# -- the tools --


def upload(args: argparse.Namespace) -> int:
    src: Path = args.file
    if not src.is_file():
        raise Refused(f"{src} is not a file")
    depots = depots_for(args)
    stripe = args.bs
    if args.fragments:
        stripe = max(1, -(-src.stat().st_size // args.fragments))
    default = f"{src.name}.xnd"
    out = destination(args, default)
    if out == default and not args.outputfile and Path(out).exists():  # its capabilities would be lost
        raise Refused(f"{out} exists: give -o {out} to replace it")
    if out == "-":
        stdout_for("an exNode")  # refused before anything is allocated
    try:
        done = lors.upload(src, depots, stripe, args.copies, args.duration, reliability(args), settings(args))
    except lors.UploadFailed as e:
        if e.leftover.mappings:
            where = write_exnode(e.leftover, partial_name(out))
            raise w.IbpError(
                w.IBP_E_RSRC_UNAVAIL,
                f"{e}; {len(e.leftover.mappings)} allocations could not be freed:"
                f" they are in the partial exNode {where}",
            ) from None
        raise w.IbpError(w.IBP_E_RSRC_UNAVAIL, f"{e}; the allocations it made are freed") from None
    if done.short:
        where = write_exnode(done.ex, partial_name(out))
        log.error(
            "%d of %d blocks have fewer than %d replicas (the first at byte %d has %d); the partial exNode is %s",
            len(done.short),
            len(done.ex.blocks()),
            args.copies,
            *done.short[0],
            where,
        )
        return 1
    where = write_exnode(done.ex, out)
    log.info(
        "%s: %d bytes in %d blocks, %d replicas each: %s",
        src.name,
        done.ex.size,
        len(done.ex.blocks()),
        args.copies,
        where,
    )
    return 0


def download(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    s = settings(args)
    if args.lors and not args.outputfile and not args.samename and not sys.stdout.isatty():
        args.outputfile = "-"  # LoRS's lors_download writes to stdout unless given -o or -f
    if args.outputfile == "-":
        lors.download(ex, stdout_for("file bytes"), s, args.offset, args.length)
        return 0
    out = Path(args.outputfile or safe_name(ex.filename))
    if out.exists() and not (args.outputfile or args.force):
        raise Refused(f"{out} exists: give -o {out} or --force to overwrite it")
    write_file(out, lambda f: lors.download(ex, f, s, args.offset, args.length, spill=out.parent))
    log.info("%s: %d bytes", out, out.stat().st_size)
    return 0


def readable(paths: list[Path]) -> tuple[list[tuple[Path, ExNode]], int]:
    """The exNodes of `paths` that could be read, with their paths, and 1 if one could not (its error
    logged), else 0: a tool goes on to the next file, as LoRS's do."""
    found: list[tuple[Path, ExNode]] = []
    worst = 0
    for path in paths:
        try:
            found.append((path, read_exnode(path)))
        except BadExnode as e:
            log.error("%s", e)
            worst = 1
    return found, worst


def ls(args: argparse.Namespace) -> int:
    found, worst = readable(args.xnd)
    for path, ex in found:
        lives = None if args.offline else lors.stat(ex, settings(args))
        if args.lors:
            worst = max(worst, print_lors_listing(path, ex, lives, args.physical))
        else:
            worst = max(worst, print_listing(path, ex, lives))
    return worst


@dataclass
class _Row:
    reliability: str  # H, S, or "" when no depot said
    rights: str  # rwm, a dash for each capability the exNode lacks
    expires: float  # epoch s, 0 unknown
    state: str


def _row(m: Mapping, live: lors.Liveness | None, now: float) -> _Row:
    rel = "" if live is None or live.reliability is None else "H" if live.reliability == w.IBP_HARD else "S"
    rights = "".join(c if getattr(m, n) else "-" for c, n in (("r", "read"), ("w", "write"), ("m", "manage")))
    expires = now + live.seconds_left if live is not None and live.seconds_left is not None else m.expires
    state = "-" if live is None else live.state + (f" ({live.why})" if live.why else "")
    if live is None and m.expires and m.expires <= now:
        state = "expired"
    return _Row(rel, rights, expires, state)


def _unreadable(ex: ExNode, lives: list[lors.Liveness] | None) -> str:
    """Why some bytes cannot be read ('' if all can): a gap, or no live replica."""
    if lives is None:
        return f"bytes {ex.gaps()[0][0]}.. are in no mapping" if ex.gaps() else ""
    alive = ExNode(
        ex.filename, ex.size, mappings=[m for m, live in zip(ex.mappings, lives, strict=True) if live.state == "alive"]
    )
    return f"bytes {alive.gaps()[0][0]}.. have no live replica" if alive.gaps() else ""


def print_listing(path: Path, ex: ExNode, lives: list[lors.Liveness] | None) -> int:
    """Our layout: LoRS's columns with dates, expiry and liveness; 1 if some bytes have no live replica."""
    now = time.time()
    blocks = ex.blocks()
    print(f"EXNODEFILE {path}")
    print(f"TITLE Filename {visible(ex.filename)}")
    print(
        f"SIZE {ex.size} bytes in {len(blocks)} blocks, {len(ex.mappings)} mappings"
        f"{'  INCOMPLETE' if ex.gaps() else ''}"
    )
    print(f"{'#':>3} {'attr':5} {'depot':24} {'offset':>12} {'length':>10}  {'expires':19}  state")
    for i, m in enumerate(ex.mappings):
        r = _row(m, lives[i] if lives is not None else None, now)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.expires)) if r.expires else "unknown"
        attrs = (r.reliability or "-") + r.rights + "a"
        print(f"{i:>3} {attrs:5} {m.depot[:24]:24} {m.exnode_offset:>12} {m.logical_length:>10}  {when:19}  {r.state}")
    why = _unreadable(ex, lives)
    if why and lives is not None:
        print(f"NOT READABLE: {why}")
    return 1 if why else 0


def print_lors_listing(path: Path, ex: ExNode, lives: list[lors.Liveness] | None, physical: bool) -> int:
    """lors_ls's layout: its header lines on stderr; on stdout a line per mapping (number, H/S and
    the rights held, the read count, offset, length, depot, expiry as ctime), then our state."""
    now = time.time()
    for line in ("TOOL List", f"SIZE {ex.size}", f"EXNODEFILE {path}", f"TITLE Filename {visible(ex.filename)}"):
        print(line, file=sys.stderr)
    print(f"MAXLENGTH {ex.size}", file=sys.stderr)
    for i, m in enumerate(ex.mappings):
        live = lives[i] if lives is not None else None
        r = _row(m, live, now)
        refs = "-" if live is None or live.read_refs is None else str(live.read_refs)
        length = m.alloc_length if physical else m.logical_length
        when = time.ctime(r.expires) if r.expires else "Unknown"
        attrs = (r.reliability or "?") + r.rights + "a"
        print(f"{i:2d} {attrs} {refs:>2} {m.exnode_offset:9d} {length:9d} {m.depot} {when} {r.state}")
    why = _unreadable(ex, lives)
    if why:
        log.error("%s: not readable: %s", path, why)
    return 1 if why else 0


def refresh(args: argparse.Namespace) -> int:
    if args.outputfile and len(args.xnd) > 1:
        raise Refused("-o names the output of one exNode: give one XND")
    how, secs = (
        (lors.MAXIMUM, 0)
        if args.maximum
        else (lors.SET, args.set)
        if args.set
        else (lors.ADD, args.add)
        if args.add
        else (lors.SET, args.absolute - int(time.time()))
        if args.absolute
        else (lors.SET, seconds(DURATION))
    )
    if secs < 0 or (how == lors.SET and secs < 1):
        raise Refused(f"-a {args.absolute}: that time is not in the future")
    found, worst = readable(args.xnd)
    for xnd, ex in found:
        new, failed = lors.refresh(ex, how, secs, settings(args))
        where = write_exnode(new, args.outputfile or xnd)
        for f in failed:
            log.error("not refreshed: %s", f)
        log.info("refreshed %d of %d mappings: %s", len(ex.mappings) - len(failed), len(ex.mappings), where)
        worst = max(worst, 1 if failed else 0)
    return worst


def augment(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    depots = depots_for(args)
    out = destination(args, str(args.xnd))
    if out == "-":
        stdout_for("an exNode")  # refused before anything is allocated
    copies = args.copies or len(depots)
    new, added, wanted = lors.augment(ex, depots, copies, args.duration, reliability(args), settings(args))
    where = write_exnode(new, out)
    log.info("added %d of %d replicas: %s", added, wanted, where)
    if added < wanted:
        log.error("%d replicas could not be made", wanted - added)
        return 1
    return 0


def trim(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    out = destination(args, str(args.xnd))
    if out == "-":
        stdout_for("an exNode")
    numbers = {int(n) for n in args.mappings.split(",") if n.strip()} if args.mappings else set()
    dead = lors.stat(ex, settings(args)) if args.unavailable else None
    if args.lors and not (args.depots or numbers or args.unavailable):
        drop = set(range(len(ex.mappings)))  # LoRS's lors_trim with nothing named: every mapping
    else:
        drop = lors.select(ex, set(args.depots or []), numbers, dead)
    new, not_freed = lors.trim(ex, drop, args.decrement, args.force, settings(args))
    where = write_exnode(new, out)
    log.info("removed %d mappings: %s", len(drop), where)
    if not_freed:
        log.error("%d dropped allocations could not be freed", len(not_freed))
        return 1
    return 0


def modify(args: argparse.Namespace) -> int:
    """LoRS's lors_modify: each exNode without the capabilities named, the manage ones always (as
    LoRS's, whose options add to those), so that it can be handed on with fewer rights than its
    owner's: one without the write capabilities lets its reader read only."""
    removed = "manage and write" if args.write_cap else "manage"
    found, worst = readable(args.xnd)
    for xnd, ex in found:
        kept = [replace(m, write="" if args.write_cap else m.write, manage="") for m in ex.mappings]
        where = write_exnode(replace(ex, mappings=kept), destination(args, str(xnd)))
        log.info("removed the %s capabilities of %d mappings: %s", removed, len(ex.mappings), where)
    return worst


RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "upload": upload,
    "download": download,
    "ls": ls,
    "refresh": refresh,
    "augment": augment,
    "trim": trim,
    "modify": modify,
}


# -- command lines --


class _NotHere(argparse.Action):
    """A LoRS option this implementation does not carry out: refused by name before anything is done."""

    def __init__(
        self, option_strings: list[str], dest: str, what: str, nargs: int = 0, metavar: str | None = None
    ) -> None:
        self.what = what
        help = f"(LoRS's: {what}; not implemented here)"
        super().__init__(option_strings, dest, nargs=nargs, metavar=metavar, help=help)

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: object, opt: object = None
    ) -> None:
        parser.error(f"{opt}: {self.what} is not implemented here")


class _Version(argparse.Action):
    """LoRS's -v (--version): our version text."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: object, opt: object = None
    ) -> None:
        sys.stdout.write(version_text(parser.prog) + "\n")
        parser.exit()


class _PoptParser(argparse.ArgumentParser):
    """Options and operands in any order, as popt (LoRS's parser) takes them: `lors_trim XND -m 0 3`."""

    _inside = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inside:  # the intermixed parse's own two passes
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _not_here(p: argparse.ArgumentParser, what: str, *flags: str, value: bool = False) -> None:
    if value:
        p.add_argument(*flags, action=_NotHere, what=what, nargs=1, dest=argparse.SUPPRESS, metavar="X")
    else:
        p.add_argument(*flags, action=_NotHere, what=what, nargs=0, dest=argparse.SUPPRESS)


def _ignored(p: argparse.ArgumentParser, what: str, *flags: str, value: bool = False) -> None:
    """A LoRS option with no effect here (it tunes what we do otherwise): taken and dropped."""
    hint = f"(LoRS's: {what}; no effect here)"
    if value:
        p.add_argument(*flags, dest="ignored", default=argparse.SUPPRESS, metavar="N", help=hint)
    else:
        p.add_argument(*flags, dest="ignored", action="store_true", default=argparse.SUPPRESS, help=hint)


def _common(lors_names: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-T",
        "--timeout",
        type=seconds,
        default=None,
        help=f"the wait for a depot at each step (default {TIMEOUT} s)",
    )
    p.add_argument(
        "-t",
        "--threads",
        "--parallel",
        dest="threads",
        type=bounded(1, MAX_THREADS),
        default=None,
        help=f"blocks moved at once (default {THREADS})",
    )
    p.add_argument("--encrypt", action="store_true", help="encrypt the flows to depots end to end")
    if lors_names:
        p.add_argument(
            "-V", "--verbose", type=bounded(-1, 1 << 30), metavar="LEVEL", default=None, help="over 0: say more"
        )
        _ignored(p, "LoRS View's demo messages", "-D", "--demo")
    else:
        p.add_argument("-V", "--verbose", action="store_const", const=1, default=None)
    return p


def _storage(p: argparse.ArgumentParser, lors_names: bool) -> None:
    p.add_argument("-d", "--duration", type=seconds, default=None, help=f"default {DURATION}")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("-s", "--soft", action="store_true", default=None, help="SOFT allocations (default HARD)")
    hard = ("-h", "--hard") if lors_names else ("--hard",)
    kind.add_argument(*hard, dest="soft", action="store_false", help="HARD allocations")


def _depots(p: argparse.ArgumentParser, lors_names: bool, tool: str) -> None:
    """Where to store: --depots, or the .xndrc's DEPOT lines; LoRS's L-Bone options are taken but
    find nothing, as there is no L-Bone here."""
    p.add_argument(
        "--depots", type=depot_list, default=None, help="comma-separated depot names or host:port (default: .xndrc's)"
    )
    g = p.add_argument_group("LoRS's depot discovery (no L-Bone here: depots come from --depots or .xndrc)")
    g.add_argument("-H", "--lbone-host", metavar="HOST", help="an L-Bone server: not used")
    g.add_argument("-P", "--lbone-port", type=bounded(1, 65535), metavar="PORT", help="its port: not used")
    g.add_argument("-l", "--location", metavar="HINT", help='a location hint ("state= TN"): not used')
    g.add_argument(
        "-m", "--maxdepots", type=bounded(-1, 100_000), metavar="N", help="depots the L-Bone gives: not used"
    )
    g.add_argument("--depot-list", action="store_true", help="only the .xndrc's depots (always so here)")
    xfile = ("-X", "-x", "--xndrc") if lors_names and tool == "augment" else ("-X", "--xndrc")
    g.add_argument(*xfile, type=Path, metavar="FILE", help="the depots of FILE's DEPOT lines")


def _output(p: argparse.ArgumentParser, default: str, lors_names: bool) -> None:
    where = f"stdout (a terminal: {default})" if lors_names else default
    p.add_argument("-o", "--outputfile", metavar="FILE", help=f"where to write ('-': stdout); default {where}")
    p.add_argument("-f", "--samename", "--in-place", action="store_true", help=default)


def add_tool(
    add: Callable[..., argparse.ArgumentParser], tool: str, lors_names: bool = False
) -> argparse.ArgumentParser:
    """Tool `tool`'s arguments, for `exnode TOOL` and `lors_TOOL` (`lors_names`: LoRS's letters where
    ours differ, its options that change nothing here, refusals of those not carried out);
    add(name, help=...) makes its parser."""
    bs = ("-b", "-bs", "--bs") if lors_names else ("-b", "--bs")
    if tool == "upload":
        p = add("upload", help="store FILE striped and replicated over depots, and write its exNode (see -o)")
        p.add_argument("file", type=Path)
        _depots(p, lors_names, tool)
        size_ = p.add_mutually_exclusive_group()
        size_.add_argument(
            *bs,
            "--stripe",
            dest="bs",
            type=lors_size if lors_names else size,
            default=None,
            help=f"block size (default {BLOCK})",
        )
        size_.add_argument("-F", "--fragments", type=bounded(1, 1 << 30), default=0, help="this many blocks instead")
        p.add_argument(
            "-c",
            "--copies",
            "--replicas",
            dest="copies",
            type=bounded(1, 1000),
            default=None,
            help=f"replicas of each block on distinct depots (default {COPIES})",
        )
        _storage(p, lors_names)
        _output(p, "FILE.xnd in the current directory", lors_names)
        if lors_names:
            e2e = "end-to-end conditioning"
            for flags in (
                ("-e", "--des"),
                ("-a", "--aes"),
                ("-z", "--compress"),
                ("-x", "--xor"),
                ("-k", "--checksum"),
            ):
                _not_here(p, e2e, *flags)
            _ignored(p, "conditioning off, as it always is here", "-n", "--none")
            _ignored(p, "the end-to-end block size", "-E", "--e2e-blocksize", value=True)
            _ignored(p, "the internal buffer size", "-M", "--buffersize", value=True)
            _not_here(p, "reading the file from stdin", "-i", "--stdin")
            _not_here(p, "uploading part of a file", "-O", "--offset", value=True)
            _not_here(p, "uploading part of a file", "-L", "--length", value=True)
    elif tool == "download":
        p = add("download", help="fetch the file an exNode describes (or part of it) to a file")
        p.add_argument("xnd", type=Path)
        _output(p, "the file's own name in the current directory", lors_names)
        p.add_argument("-O", "--offset", type=size, default=0, help="from this byte of the file")
        p.add_argument("-L", "--length", type=size, default=None, help="this many bytes (default: to the end)")
        p.add_argument("--force", action="store_true", help="overwrite an existing file")
        if lors_names:
            _ignored(p, "the transfer block size", *bs, value=True)
            _ignored(p, "the internal buffer size", "-M", "--buffersize", value=True)
            for what, flags in (
                ("connections per depot", ("-a", "--thread-depot")),
                ("threads per block", ("-r", "--redundancy")),
                ("blocks done before a slow one is fetched again", ("-p", "--progress")),
                ("blocks buffered before writing", ("-q", "--prebuffer")),
                ("block buffers", ("-C", "--cache")),
            ):
                _ignored(p, what, *flags, value=True)
            _not_here(p, "resuming a partial download", "-R", "--resume")
    elif tool == "ls":
        p = add("ls", help="the mappings of exNodes, with expiry and whether their depots still have them")
        p.add_argument("xnd", type=Path, nargs="+")
        p.add_argument("--offline", action="store_true", help="ask no depot: the expiry the exNode records")
        if lors_names:
            _ignored(p, "human-readable lines, the only ones here", "-h", "--human")
            _ignored(p, "logical lengths, the default", "-l", "--logical")
            p.add_argument("-p", "--physical", action="store_true", help="each allocation's length, not the mapped one")
    elif tool == "refresh":
        p = add("refresh", help="extend every mapping's allocation (default: to a day from now)")
        p.add_argument("xnd", type=Path, nargs="+")
        how = p.add_mutually_exclusive_group()
        how.add_argument("-d", "--add", type=seconds, help="extend by this long")
        how.add_argument("-s", "--set", type=seconds, help="to this long from now")
        how.add_argument("-m", "--maximum", action="store_true", help="to the longest each depot allows")
        how.add_argument("-a", "--absolute", type=bounded(1, 1 << 40), metavar="EPOCH", help="to this time (epoch s)")
        _output(p, "XND itself", False)
    elif tool == "augment":
        p = add("augment", help="add replicas of every block on more depots (copied depot to depot)")
        p.add_argument("xnd", type=Path)
        _depots(p, lors_names, tool)
        p.add_argument(
            "-c",
            "--copies",
            type=bounded(1, 1000),
            default=None,
            help="new replicas per block (default: one a depot)",
        )
        _storage(p, lors_names)
        _output(p, "XND itself", lors_names)
        if lors_names:
            _ignored(p, "IBP's MCOPY rather than COPY", "--mcopy")
            _ignored(p, "the internal buffer size", "-M", "--buffersize", value=True)
            _not_here(p, "an exNode of the new replicas only", "-n", "--newfile", value=True)
            _not_here(p, "adding copies only where too few are alive", "-B", "--balance")
            _not_here(p, "new replicas in other blocks", *bs, value=True)
            _not_here(p, "new replicas in other blocks", "-F", "--fragments", value=True)
            _not_here(p, "augmenting part of a file", "-O", "--offset", value=True)
            _not_here(p, "augmenting part of a file", "-L", "--length", value=True)
    elif tool == "modify":
        p = add("modify", help="remove capabilities from exNodes: the manage ones, with -w the write ones too")
        p.add_argument("xnd", type=Path, nargs="+")
        p.add_argument(
            "-m", "--manage-cap", action="store_true", help="remove the manage capabilities (always done, as LoRS's)"
        )
        p.add_argument("-w", "--write-cap", action="store_true", help="remove the write capabilities too")
        _not_here(p, "an exNode without read capabilities (none is read here)", "-r", "--read-cap")
        _output(p, "XND itself", lors_names)
    else:
        p = add("trim", help="drop mappings (on depots, by number, or the unavailable ones)")
        if lors_names:  # LoRS's: lors_trim [-m] XND [N …]
            p.add_argument("items", nargs="+", metavar="XND", help="the exNode; with -m, then the mapping numbers")
            p.add_argument(
                "-m", "--mappings", dest="by_number", action="store_true", help="drop the mappings numbered after XND"
            )
        else:
            p.add_argument("xnd", type=Path)
            p.add_argument("-m", "--mappings", type=numbers, help="those numbered so in `ls`, comma-separated")
        p.add_argument("--depots", type=depot_list, help="those on these depots")
        p.add_argument(
            "-u", "--unavailable", "--dead", dest="unavailable", action="store_true", help="those no depot answers for"
        )
        free = p.add_mutually_exclusive_group()
        free.add_argument(
            "-d",
            "--decrement",
            "--free",
            dest="decrement",
            action="store_true",
            help="also release the dropped allocations",
        )
        free.add_argument("-n", "--non-decrement", dest="decrement", action="store_false")
        p.add_argument("--force", action="store_true", help="even if some bytes are left with no replica")
        _output(p, "XND itself", lors_names)
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exnode", description="files spread over IBP depots (LoRS tools)")
    add_version(p)
    p.set_defaults(lors=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[_common(False)])
    for tool in TOOLS:
        add_tool(add, tool)
    return p


def lors_parser(tool: str) -> argparse.ArgumentParser:
    """lors_TOOL's command line: LoRS's letters (its -h is HARD for upload and augment, human for ls;
    help is -? and --help, as popt's), options and exNode before or after each other."""

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return _PoptParser(prog=f"lors_{name}", description=help, parents=[_common(True)], add_help=False)

    p = add_tool(add, tool, lors_names=True)
    helps = ("-?", "--help") if tool in ("upload", "augment", "ls") else ("-?", "-h", "--help")
    p.add_argument(*helps, action="help", help="show this help and exit")
    p.add_argument("-v", "--version", action=_Version, nargs=0, help="print the version and exit")
    p.set_defaults(cmd=tool, lors=True)
    return p


def run(args: argparse.Namespace) -> None:
    name = f"lors_{args.cmd}" if args.lors else f"exnode {args.cmd}"
    try:
        resolve(args, xndrc.load())
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
        logging.basicConfig(
            level=logging.INFO if args.verbose or args.cmd != "ls" else logging.WARNING, handlers=[handler]
        )
        sys.exit(RUN[args.cmd](args))
    except (w.IbpError, BadExnode, FlowError, Refused, ValueError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        sys.exit(1)
    except OSError as e:
        print(f"{name}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    run(parser().parse_args(argv))


def lors_main(tool: str, argv: list[str] | None = None) -> None:
    run(lors_parser(tool).parse_args(argv))


lors_upload = functools.partial(lors_main, "upload")
lors_download = functools.partial(lors_main, "download")
lors_ls = functools.partial(lors_main, "ls")
lors_refresh = functools.partial(lors_main, "refresh")
lors_augment = functools.partial(lors_main, "augment")
lors_trim = functools.partial(lors_main, "trim")
lors_modify = functools.partial(lors_main, "modify")


if __name__ == "__main__":
    main()
