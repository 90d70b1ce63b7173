"""The exNode tools: `exnode upload|download|ls|refresh|augment|trim`, and the same tools under their
LoRS names (`lors_upload`, `lors_download`, `lors_ls`, `lors_refresh`, `lors_augment`, `lors_trim`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from apps.ibp import lors
from apps.ibp import wire as w
from apps.ibp.cli import seconds, size
from apps.ibp.exnode import BadExnode, ExNode, from_xml, to_xml
from apps.ibp.lors import Settings
from flowlib import FlowError
from proto.version import add_version

log = logging.getLogger("exnode")
TOOLS = ("upload", "download", "ls", "refresh", "augment", "trim")
# LoRS's defaults (its tutorial and lors_upload): 5 MB blocks, one copy, one day, HARD allocations.
BLOCK = "5M"
COPIES = 1
DURATION = "1d"


class Refused(Exception):
    """A command the tool will not carry out as given (an output that exists, a terminal)."""


class _TqdmHandler(logging.Handler):
    """Log lines on stderr that do not tear a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
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
    try:
        data = path.read_bytes() if str(path) != "-" else sys.stdin.buffer.read(1 << 25)
    except OSError as e:
        raise BadExnode(f"cannot read {path}: {e.strerror}") from None
    return from_xml(data)


def safe_name(name: str) -> str:
    """A file name from an exNode, as a name in the current directory: its last component only."""
    base = Path(name.replace("\\", "/")).name
    if base in ("", ".", "..") or "\0" in base:
        raise Refused(f"the exNode's file name {name[:80]!r} is no usable name: give -o FILE")
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


# -- the tools --


def upload(args: argparse.Namespace) -> int:
    src: Path = args.file
    if not src.is_file():
        raise Refused(f"{src} is not a file")
    stripe = args.bs
    if args.fragments:
        stripe = max(1, -(-src.stat().st_size // args.fragments))
    out = args.outputfile or f"{src.name}.xnd"
    if not args.outputfile and Path(out).exists():  # its capabilities would be lost
        raise Refused(f"{out} exists: give -o {out} to replace it")
    if out == "-":
        stdout_for("an exNode")  # refused before anything is allocated
    try:
        done = lors.upload(src, args.depots, stripe, args.copies, args.duration, reliability(args), settings(args))
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
    if args.outputfile == "-":
        lors.download(ex, stdout_for("file bytes"), s, args.offset, args.length)
        return 0
    out = Path(args.outputfile or safe_name(ex.filename))
    if out.exists() and not (args.outputfile or args.force):
        raise Refused(f"{out} exists: give -o {out} or --force to overwrite it")
    write_file(out, lambda f: lors.download(ex, f, s, args.offset, args.length))
    log.info("%s: %d bytes", out, out.stat().st_size)
    return 0


def ls(args: argparse.Namespace) -> int:
    worst = 0
    for path in args.xnd:
        ex = read_exnode(path)
        lives = None if args.offline else lors.stat(ex, settings(args))
        worst = max(worst, print_listing(path, ex, lives))
    return worst


def print_listing(path: Path, ex: ExNode, lives: list[lors.Liveness] | None) -> int:
    """LoRS's lors_ls -h layout, with expiry and liveness; 1 if some bytes have no live replica."""
    now = time.time()
    blocks = ex.blocks()
    print(f"EXNODEFILE {path}")
    print(f"TITLE Filename {ex.filename}")
    print(
        f"SIZE {ex.size} bytes in {len(blocks)} blocks, {len(ex.mappings)} mappings"
        f"{'  INCOMPLETE' if ex.gaps() else ''}"
    )
    print(f"{'#':>3} {'attr':5} {'depot':24} {'offset':>12} {'length':>10}  {'expires':19}  state")
    for i, m in enumerate(ex.mappings):
        live = lives[i] if lives is not None else None
        rel = "-" if live is None or live.reliability is None else "H" if live.reliability == w.IBP_HARD else "S"
        attrs = (
            rel
            + "".join(c if getattr(m, n) else "-" for c, n in (("r", "read"), ("w", "write"), ("m", "manage")))
            + "a"
        )
        expires = now + live.seconds_left if live is not None and live.seconds_left is not None else m.expires
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires)) if expires else "unknown"
        state = "-" if live is None else live.state + (f" ({live.why})" if live.why else "")
        if live is None and m.expires and m.expires <= now:
            state = "expired"
        print(f"{i:>3} {attrs:5} {m.depot[:24]:24} {m.exnode_offset:>12} {m.logical_length:>10}  {when:19}  {state}")
    if lives is None:
        return 1 if ex.gaps() else 0
    alive = ExNode(
        ex.filename, ex.size, mappings=[m for m, live in zip(ex.mappings, lives, strict=True) if live.state == "alive"]
    )
    if alive.gaps():
        print(f"NOT READABLE: bytes {alive.gaps()[0][0]}.. have no live replica")
        return 1
    return 0


def refresh(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    how, secs = (
        (lors.MAXIMUM, 0)
        if args.maximum
        else (lors.SET, args.set)
        if args.set
        else (lors.ADD, args.add)
        if args.add
        else (lors.SET, seconds(DURATION))
    )
    new, failed = lors.refresh(ex, how, secs, settings(args))
    where = write_exnode(new, args.outputfile or args.xnd)
    for f in failed:
        log.error("not refreshed: %s", f)
    log.info("refreshed %d of %d mappings: %s", len(ex.mappings) - len(failed), len(ex.mappings), where)
    return 1 if failed else 0


def augment(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    copies = args.copies or len(args.depots)
    new, added, wanted = lors.augment(ex, args.depots, copies, args.duration, reliability(args), settings(args))
    where = write_exnode(new, args.outputfile or args.xnd)
    log.info("added %d of %d replicas: %s", added, wanted, where)
    if added < wanted:
        log.error("%d replicas could not be made", wanted - added)
        return 1
    return 0


def trim(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    numbers = {int(n) for n in args.mappings.split(",") if n.strip()} if args.mappings else set()
    dead = lors.stat(ex, settings(args)) if args.unavailable else None
    drop = lors.select(ex, set(args.depots or []), numbers, dead)
    new, not_freed = lors.trim(ex, drop, args.decrement, args.force, settings(args))
    where = write_exnode(new, args.outputfile or args.xnd)
    log.info("removed %d mappings: %s", len(drop), where)
    if not_freed:
        log.error("%d dropped allocations could not be freed", len(not_freed))
        return 1
    return 0


RUN: dict[str, Callable[[argparse.Namespace], int]] = {
    "upload": upload,
    "download": download,
    "ls": ls,
    "refresh": refresh,
    "augment": augment,
    "trim": trim,
}


# -- command lines --


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-T", "--timeout", type=seconds, default=30, help="seconds to wait for a depot at each step")
    p.add_argument(
        "-t", "--threads", "--parallel", dest="threads", type=int, default=4, help="blocks moved at once (default 4)"
    )
    p.add_argument("--encrypt", action="store_true", help="encrypt the flows to depots end to end")
    p.add_argument("-V", "--verbose", action="store_true")
    return p


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("-d", "--duration", type=seconds, default=seconds(DURATION), help=f"default {DURATION}")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("-s", "--soft", action="store_true", help="SOFT allocations (default HARD, as LoRS)")
    kind.add_argument("--hard", dest="soft", action="store_false")


def _output(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("-o", "--outputfile", metavar="FILE", help=f"where to write ('-': stdout); default {default}")
    p.add_argument("-f", "--samename", "--in-place", action="store_true", help="the default: " + default)


def add_tool(add: Callable[..., argparse.ArgumentParser], tool: str) -> argparse.ArgumentParser:
    """Tool `tool`'s arguments, for `exnode TOOL` and `lors_TOOL` alike; add(name, help=...) makes its parser."""
    if tool == "upload":
        p = add("upload", help="store FILE striped and replicated over depots; the exNode goes to FILE.xnd")
        p.add_argument("file", type=Path)
        p.add_argument("--depots", required=True, type=depot_list, help="comma-separated depot names or host:port")
        size_ = p.add_mutually_exclusive_group()
        size_.add_argument(
            "-b", "--bs", "--stripe", dest="bs", type=size, default=size(BLOCK), help=f"block size (default {BLOCK})"
        )
        size_.add_argument("-F", "--fragments", type=int, default=0, help="this many blocks instead")
        p.add_argument(
            "-c",
            "--copies",
            "--replicas",
            dest="copies",
            type=int,
            default=COPIES,
            help=f"replicas of each block on distinct depots (default {COPIES})",
        )
        _storage(p)
        _output(p, "FILE.xnd in the current directory")
    elif tool == "download":
        p = add("download", help="fetch the file an exNode describes (or part of it) to a file")
        p.add_argument("xnd", type=Path)
        _output(p, "the file's own name in the current directory")
        p.add_argument("-O", "--offset", type=size, default=0, help="from this byte of the file")
        p.add_argument("-L", "--length", type=size, default=None, help="this many bytes (default: to the end)")
        p.add_argument("--force", action="store_true", help="overwrite an existing file")
    elif tool == "ls":
        p = add("ls", help="the mappings of exNodes, with expiry and whether their depots still have them")
        p.add_argument("xnd", type=Path, nargs="+")
        p.add_argument("--offline", action="store_true", help="ask no depot: the expiry the exNode records")
    elif tool == "refresh":
        p = add("refresh", help="extend every mapping's allocation (default: to a day from now)")
        p.add_argument("xnd", type=Path)
        how = p.add_mutually_exclusive_group()
        how.add_argument("-d", "--add", type=seconds, help="extend by this long")
        how.add_argument("-s", "--set", type=seconds, help="to this long from now")
        how.add_argument("-m", "--maximum", action="store_true", help="to the longest each depot allows")
        _output(p, "XND itself")
    elif tool == "augment":
        p = add("augment", help="add replicas of every block on more depots (copied depot to depot)")
        p.add_argument("xnd", type=Path)
        p.add_argument("--depots", required=True, type=depot_list)
        p.add_argument("-c", "--copies", type=int, default=0, help="new replicas per block (default: one per depot)")
        _storage(p)
        _output(p, "XND itself")
    else:
        p = add("trim", help="drop mappings (on depots, by number, or the unavailable ones)")
        p.add_argument("xnd", type=Path)
        p.add_argument("--depots", type=depot_list, help="those on these depots")
        p.add_argument("-m", "--mappings", help="those numbered so in `ls`, comma-separated")
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
        _output(p, "XND itself")
    return p


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exnode", description="files spread over IBP depots (LoRS tools)")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[_common()])
    for tool in TOOLS:
        add_tool(add, tool)
    return p


def lors_parser(tool: str) -> argparse.ArgumentParser:
    def add(name: str, help: str) -> argparse.ArgumentParser:
        return argparse.ArgumentParser(prog=f"lors_{name}", description=help, parents=[_common()])

    p = add_tool(add, tool)
    add_version(p)
    p.set_defaults(cmd=tool)
    return p


def run(args: argparse.Namespace) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(f"exnode {args.cmd}: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose or args.cmd != "ls" else logging.WARNING, handlers=[handler])
    try:
        sys.exit(RUN[args.cmd](args))
    except (w.IbpError, BadExnode, FlowError, Refused, ValueError) as e:
        print(f"exnode {args.cmd}: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        sys.exit(1)
    except OSError as e:
        print(f"exnode {args.cmd}: {e.strerror or e}", file=sys.stderr)
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


if __name__ == "__main__":
    main()
