"""The `ibp` command: run a depot, and allocate, store, load, copy, mcopy, manage and status.

Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from apps.common import duration as parse_duration
from apps.ibp import wire as w
from apps.ibp.capability import MANAGE, READ, WRITE, Capability
from apps.ibp.client import DEFAULT_TIMEOUT, STORE_BLOCK, Connection, parse_cap
from apps.ibp.limits import add_flags, from_args
from flowlib import FlowError
from flowlib.irm import IrmClient
from proto import logs
from proto.service import notify_ready, serve_until_stopped, stop_on_signals
from proto.version import add_version

log = logging.getLogger("ibp")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text: str) -> int:
    """'4096', '4k', '4M', '1G' (powers of 1024) -> bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected a number with an optional unit k|M|G|T")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def seconds(text: str) -> int:
    try:
        value = parse_duration(text, "s")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"duration {text!r} is under a second")
    return int(value)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for a depot")
    logs.add_arguments(common)
    common.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt flows end to end (capabilities and data); a depot: for its copies",
    )
    p = argparse.ArgumentParser(prog="ibp", description="IBP depots and clients over flows")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[common])

    d = add("depot", help="run a depot")
    d.add_argument("--name", required=True, help="the name the depot is reached by (and in its capabilities)")
    d.add_argument("--dir", required=True, type=Path, help="where data and metadata live")
    d.add_argument("--capacity", type=size, default=size("1G"))
    d.add_argument("--max-duration", type=seconds, default=seconds("1d"))
    d.add_argument("--layer", action="append", default=[], help="register the name in this layer (repeatable)")
    d.add_argument(
        "--listen",
        nargs="?",
        const=f"tcp:{w.DEFAULT_PORT}",
        default=None,
        help=f"also serve plain IBP over TCP (tcp:PORT or tcp:HOST:PORT; default tcp:{w.DEFAULT_PORT})",
    )
    d.add_argument("--password", default=w.DEFAULT_PASSWORD, help="the password ST_INQ asks for (L-Store's default)")
    d.add_argument("--password-file", type=Path, help="read it from this file instead (a command line is public)")
    add_flags(d)

    a = add("allocate", help="reserve space; prints read, write and manage capabilities")
    a.add_argument("depot")
    a.add_argument("--size", type=size, required=True)
    a.add_argument("--duration", type=seconds, required=True)
    a.add_argument("--reliability", choices=["soft", "hard"], default="soft")
    a.add_argument("--type", choices=["bytearray", "buffer", "fifo", "cirq"], default="bytearray")

    s = add("store", help="append stdin to an allocation (or write at --offset)")
    s.add_argument("cap")
    s.add_argument("--offset", type=int, default=None)

    ld = add("load", help="write an allocation's bytes to stdout")
    ld.add_argument("cap")
    ld.add_argument("--offset", type=int, default=0)
    ld.add_argument("--length", type=int, default=0, help="bytes (0: up to the end, found with one-byte loads)")

    c = add("copy", help="the source depot pushes the bytes to the target itself")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--offset", type=int, default=0)
    c.add_argument("--length", type=int, default=0)

    mc = add("mcopy", help="one source, several targets")
    mc.add_argument("src")
    mc.add_argument("dsts", nargs="+")
    mc.add_argument("--offset", type=int, default=0)
    mc.add_argument("--length", type=int, default=0)

    m = add("manage", help="probe, incr, decr, extend or change an allocation")
    m.add_argument("cap")
    m.add_argument("op", choices=["probe", "incr", "decr", "extend", "change"])
    m.add_argument("--duration", type=seconds, default=0, help="extend/change: new duration from now")
    m.add_argument("--size", type=size, default=None, help="change: new maximum size (default: kept)")
    m.add_argument("--count", choices=["read", "write"], default="read", help="incr/decr: which reference count")

    st = add("status", help="a depot's capacity, use and policy; admin changes")
    st.add_argument("depot")
    st.add_argument("--version", action="store_true", help="the depot's description, policy and limits")
    st.add_argument("--password", default=w.DEFAULT_PASSWORD, help="the depot's ST_INQ password (L-Store's default)")
    st.add_argument("--password-file", type=Path, help="read it from this file instead (a command line is public)")
    st.add_argument("--admin-key", help="the depot's admin key (DIR/admin.key) for changes")
    st.add_argument("--capacity", type=size)
    st.add_argument("--max-duration", type=seconds)
    return p


def password(args: argparse.Namespace) -> str:
    """The ST_INQ password: --password-file's first line, else --password."""
    if args.password_file is None:
        return str(args.password)
    path: Path = args.password_file
    try:
        return path.read_text().split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"ibp: cannot read the password file: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    depot = args.cmd == "depot"  # a depot tells what it does; a client only what went wrong
    logs.setup("ibp", args, base=logging.INFO if depot else logging.WARNING, daemon=depot)
    try:
        sys.exit(run(args))
    except w.IbpError as e:
        print(f"ibp {args.cmd}: {e}", file=sys.stderr)
        sys.exit(1)
    except FlowError as e:
        print(f"ibp {args.cmd}: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def run(args: argparse.Namespace) -> int:
    if args.cmd == "depot":
        return run_depot(args)
    t = args.timeout
    if args.cmd == "allocate":
        rel = w.IBP_HARD if args.reliability == "hard" else w.IBP_SOFT
        typ = {"bytearray": w.IBP_BYTEARRAY, "buffer": w.IBP_BUFFER, "fifo": w.IBP_FIFO, "cirq": w.IBP_CIRQ}[args.type]
        with Connection(args.depot, t, encrypt=args.encrypt) as conn:
            print_caps(conn.allocate(args.size, args.duration, rel, typ))
        return 0
    if args.cmd == "store":
        cap = parse_cap(args.cap, WRITE)
        total = store_stream(cap, sys.stdin.buffer, args.offset, t, args.encrypt)
        print(f"stored {total} bytes", file=sys.stderr)
        return 0
    if args.cmd == "load":
        cap = parse_cap(args.cap, READ)
        with Connection(cap.depot, t, encrypt=args.encrypt) as conn:
            _, chunks = conn.load(cap, args.offset, args.length)
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
            out.flush()
        return 0
    if args.cmd == "copy":
        src, dst = parse_cap(args.src, READ), parse_cap(args.dst, WRITE)
        with Connection(src.depot, t, encrypt=args.encrypt) as conn:
            n = conn.copy(src, dst, args.offset, args.length)
        print(f"copied {n} bytes to {dst.depot}", file=sys.stderr)
        return 0
    if args.cmd == "mcopy":
        src = parse_cap(args.src, READ)
        dsts = [parse_cap(d, WRITE) for d in args.dsts]
        with Connection(src.depot, t, encrypt=args.encrypt) as conn:
            statuses = conn.mcopy(src, dsts, args.offset, args.length)
        failed = 0
        for d, s in zip(dsts, statuses, strict=False):
            print(f"{d.depot}: {'ok' if s == w.IBP_OK else w.status_text(s) + f' ({s})'}", file=sys.stderr)
            failed += s != w.IBP_OK
        return 1 if failed or len(statuses) != len(dsts) else 0
    if args.cmd == "manage":
        return run_manage(args)
    return run_status(args)


def print_caps(caps: tuple[Capability, ...]) -> None:
    for cap in caps:
        print(cap)


def _blocks(src: BinaryIO, limit: int) -> Iterator[bytes]:
    while True:
        block = src.read(limit)
        if not block:
            return
        yield block


def store_stream(cap: Capability, src: BinaryIO, offset: int | None, timeout: float, encrypt: bool = False) -> int:
    """STORE (or WRITE) everything `src` holds, one request per block so memory stays bounded."""
    total = 0
    with Connection(cap.depot, timeout, encrypt=encrypt) as conn:
        for block in _blocks(src, STORE_BLOCK):
            conn.store(cap, [block], len(block), None if offset is None else offset + total)
            total += len(block)
    return total


def run_manage(args: argparse.Namespace) -> int:
    cap = parse_cap(args.cap, MANAGE)
    captype = w.IBP_WRITECAP if args.count == "write" else w.IBP_READCAP
    with Connection(cap.depot, args.timeout, encrypt=args.encrypt) as conn:
        if args.op == "probe":
            for k, v in conn.probe(cap).items():
                print(f"{k} {v}")
        elif args.op in ("incr", "decr"):
            conn.manage(cap, w.IBP_INCR if args.op == "incr" else w.IBP_DECR, captype)
        else:
            if args.op == "extend" and not args.duration:
                raise w.IbpError(w.IBP_E_INVALID_PARAMETER, "extend needs --duration")
            size = w.KEEP if args.size is None else args.size  # L-Store refuses a size of 0 (-20)
            conn.manage(cap, w.IBP_CHNG, w.IBP_MANAGECAP, size, args.duration or w.KEEP)
    return 0


def run_status(args: argparse.Namespace) -> int:
    with Connection(args.depot, args.timeout, encrypt=args.encrypt) as conn:
        if args.version:
            print(conn.version())
            return 0
        if args.capacity is not None or args.max_duration is not None:
            if not args.admin_key:
                raise w.IbpError(w.IBP_E_WRONG_PASSWD, "changes need --admin-key")
            info = conn.status(password=password(args))
            capacity = args.capacity if args.capacity is not None else int(info.get("capacity", "0"))
            maxdur = args.max_duration if args.max_duration is not None else int(info.get("max_duration", "1"))
            conn.change(args.admin_key, capacity, maxdur)
        print(f"name {args.depot}")
        for k, v in conn.status(password=password(args)).items():
            print(f"{k} {v}")
    return 0


def depot_client(name: str) -> IrmClient:
    """An IRMd connection announced as program `ibp@NAME`, bound by pid to NAME.

    Every depot runs the same program, so a program binding of `ibp` to depot1 and to depot2 would
    route depot2's flows to a running depot1. Announced under its own name, a depot is only reached
    through its pid binding, and the IRMd starts depot2's own program for depot2's flows.
    """
    saved = sys.argv[0]
    sys.argv[0] = f"{saved or 'ibp'}@{name}"
    try:
        return IrmClient()
    finally:
        sys.argv[0] = saved


def run_depot(args: argparse.Namespace) -> int:
    # here: the depot's modules are no client command's (they cost the client ~30 ms of start-up)
    from apps.ibp.depot import DepotCore
    from apps.ibp.server import DepotServer, flow_loop, parse_listen, tcp_listener, tcp_loop
    from apps.ibp.storage import DiskStore
    from transports.unix import TrustError

    stop_on_signals()
    try:
        limits = from_args(args)
    except ValueError as e:
        raise w.IbpError(w.IBP_E_INVALID_PARAMETER, str(e)) from None
    try:
        store = DiskStore(args.dir)
    except TrustError as e:  # its text says which directory, and why
        raise w.IbpError(w.IBP_E_FILE_OPEN, f"--dir {args.dir}: {e.strerror}") from None
    except OSError as e:
        raise w.IbpError(w.IBP_E_FILE_OPEN, str(e)) from None
    core = DepotCore(store, args.capacity, args.max_duration, time.time(), limits)
    irm = depot_client(args.name)
    try:
        irm.bind(args.name)
    except FlowError as e:  # started by the IRMd for this name, it is bound already
        log.debug("bind %s: %s", args.name, e)
    if args.layer:
        try:
            irm.register(args.name, args.layer)
        except FlowError as e:
            if "already" not in str(e).lower() and "exist" not in str(e).lower():
                raise
    server = DepotServer(core, args.name, limits, irm=irm, encrypt=args.encrypt, password=password(args))
    stop = threading.Event()
    threading.Thread(target=server.expiry_loop, args=(stop,), daemon=True).start()
    if args.listen:
        try:
            host, port = parse_listen(args.listen)
            sock, addr = tcp_listener(host, port)
        except (ValueError, OSError) as e:
            raise w.IbpError(w.IBP_E_CONNECTION, f"--listen: {e}") from None
        threading.Thread(target=tcp_loop, args=(server, sock, addr), daemon=True).start()
        log.info("depot %s listening on tcp %s", args.name, addr)
    log.info(
        "depot %s serving %s (capacity %d, max duration %d s)", args.name, args.dir, args.capacity, args.max_duration
    )
    notify_ready()
    try:
        serve_until_stopped(lambda: flow_loop(server))  # the loop returns only when the IRMd is gone
    finally:
        stop.set()
        store.release()
    return 1


if __name__ == "__main__":
    main()
