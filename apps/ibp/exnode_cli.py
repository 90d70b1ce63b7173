"""The `exnode` command: upload a file striped and replicated over depots, download it (falling
back to replicas, verifying checksums), list, augment and trim exNodes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TextIO, TypeVar

from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.cli import seconds, size
from apps.ibp.client import DEFAULT_TIMEOUT, Connection, parse_cap
from apps.ibp.exnode import BadExnode, ExNode, Mapping, from_xml, plan, to_xml
from flowlib import FlowError

T = TypeVar("T")
R = TypeVar("R")


class Progress:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int, label: str, out: TextIO = sys.stderr) -> None:
        self.total, self.label, self.out = max(1, total), label, out
        self.done = 0
        self.start = self._drawn = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self._drawn >= 0.1:
            self.draw()

    def draw(self, end: str = "") -> None:
        self._drawn = time.monotonic()
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 30)
        rate = self.done / max(1e-6, self._drawn - self.start) / 1e6
        self.out.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {self.done}/{self.total} B {rate:.1f} MB/s{end}")
        self.out.flush()

    def finish(self) -> None:
        self.draw("\n")


class Pool:
    """One open connection per depot; a failed one is dropped and reopened on next use."""

    def __init__(self, timeout: float, encrypt: bool = False) -> None:
        self.timeout = timeout
        self.encrypt = encrypt
        self.conns: dict[str, Connection] = {}

    def get(self, depot: str) -> Connection:
        if depot not in self.conns:
            self.conns[depot] = Connection(depot, self.timeout, encrypt=self.encrypt)
        return self.conns[depot]

    def drop(self, depot: str) -> None:
        conn = self.conns.pop(depot, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for d in list(self.conns):
            self.drop(d)


class Workers:
    """Blocks moved by `n` threads at once, each with its own depot connections; results in order,
    with at most 2n blocks in memory."""

    def __init__(self, n: int, timeout: float, encrypt: bool = False) -> None:
        self.n, self.timeout, self.encrypt = max(1, n), timeout, encrypt
        self.local = threading.local()
        self.pools: list[Pool] = []
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(self.n)

    def pool(self) -> Pool:
        p: Pool | None = getattr(self.local, "pool", None)
        if p is None:
            p = self.local.pool = Pool(self.timeout, self.encrypt)
            with self.lock:
                self.pools.append(p)
        return p

    def map(self, fn: Callable[[Pool, T], R], items: Iterable[T]) -> Iterator[R]:
        window: deque[Future[R]] = deque()
        for item in items:
            window.append(self.executor.submit(self._run, fn, item))
            if len(window) >= 2 * self.n:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def _run(self, fn: Callable[[Pool, T], R], item: T) -> R:
        return fn(self.pool(), item)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        for p in self.pools:
            p.close()


def warn(text: str) -> None:
    print(f"\nexnode: {text}", file=sys.stderr)


def _place(pool: Pool, data: bytes, offset: int, candidates: list[str], replicas: int,
           duration: int) -> list[Mapping]:
    """`replicas` copies of one block: stored once, then copied depot to depot."""
    digest = hashlib.sha256(data).hexdigest()
    placed: list[Mapping] = []
    for depot in candidates:
        if len(placed) == replicas:
            break
        try:
            conn = pool.get(depot)
            r, wcap, m = conn.allocate(len(data), duration)
            if placed:  # the first replica's depot pushes the bytes itself
                src = parse_cap(placed[0].read)
                pool.get(src.depot).copy(src, wcap, 0, len(data))
            else:
                conn.store(wcap, [data], len(data))
        except (w.IbpError, FlowError) as e:
            warn(f"depot {depot}: {e}; trying the next one")
            pool.drop(depot)
            continue
        placed.append(Mapping(offset, len(data), 0, len(data), str(r), str(wcap), str(m), digest))
    return placed


def upload(args: argparse.Namespace) -> int:
    depots = [d for d in args.depots.split(",") if d]
    data_size = args.file.stat().st_size
    blocks = plan(data_size, args.stripe, depots, args.replicas)
    ex = ExNode(args.file.name, data_size)
    whole = hashlib.sha256()
    bar = Progress(data_size, f"upload {args.file.name}")
    workers = Workers(args.parallel, args.timeout, args.encrypt)

    def place(pool: Pool, block: tuple[int, bytes, list[str]]) -> list[Mapping]:
        offset, data, where = block
        others = [d for d in depots if d not in where]
        placed = _place(pool, data, offset, where + others, args.replicas, args.duration)
        if not placed:
            raise w.IbpError(w.IBP_E_RSRC_UNAVAIL, f"no depot took the block at {offset}")
        if len(placed) < args.replicas:
            warn(f"block at {offset} has {len(placed)} of {args.replicas} replicas")
        return placed

    def read(f: BinaryIO) -> Iterator[tuple[int, bytes, list[str]]]:
        for offset, length, where in blocks:
            data = f.read(length)
            if len(data) != length:
                raise w.IbpError(w.IBP_E_GENERIC, f"{args.file} changed while being uploaded")
            whole.update(data)
            yield offset, data, where

    try:
        with open(args.file, "rb") as f:
            for placed in workers.map(place, read(f)):
                ex.mappings.extend(placed)
                bar.add(placed[0].logical_length)
    finally:
        workers.close()
    bar.finish()
    ex.sha256 = whole.hexdigest()
    sys.stdout.buffer.write(to_xml(ex))
    return 0


def _fetch(pool: Pool, block: list[Mapping]) -> bytes:
    """The block from the first replica that answers with the right bytes."""
    errors = []
    for m in block:
        cap = parse_cap(m.read)
        try:
            data = pool.get(cap.depot).load_bytes(cap, m.alloc_offset, m.logical_length)
        except (w.IbpError, FlowError) as e:
            pool.drop(cap.depot)
            errors.append(f"{cap.depot}: {e}")
            continue
        if m.sha256 and hashlib.sha256(data).hexdigest() != m.sha256:
            errors.append(f"{cap.depot}: checksum mismatch")
            continue
        return data
    raise w.IbpError(w.IBP_E_RSRC_UNAVAIL, f"no replica of bytes {block[0].exnode_offset}.. is readable: "
                     + "; ".join(errors))


def download(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    if ex.gaps():
        raise BadExnode(f"the exNode does not cover bytes {ex.gaps()[0]}")
    # Distinct ranges in order, each trimmed of what an earlier, larger mapping already covers.
    wanted, pos = [], 0
    for offset, length, block in ex.blocks():
        if offset + length > pos:
            wanted.append((pos - offset if offset < pos else 0, block))
            pos = offset + length
    out = sys.stdout.buffer if args.output is None else open(args.output, "wb")  # noqa: SIM115
    whole = hashlib.sha256()
    bar = Progress(ex.size, f"download {ex.filename}")
    workers = Workers(args.parallel, args.timeout, args.encrypt)
    try:
        for data in workers.map(lambda pool, item: _fetch(pool, item[1])[item[0]:], wanted):
            out.write(data)
            whole.update(data)
            bar.add(len(data))
        out.flush()
    finally:
        workers.close()
        if out is not sys.stdout.buffer:
            out.close()
    bar.finish()
    if ex.sha256 and whole.hexdigest() != ex.sha256:
        raise w.IbpError(w.IBP_E_GENERIC, "the file's checksum does not match the exNode's")
    return 0


def ls(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    print(f"{ex.filename}  {ex.size} bytes  {len(ex.blocks())} blocks  {len(ex.mappings)} mappings"
          f"{'  INCOMPLETE' if ex.gaps() else ''}")
    print(f"{'offset':>12} {'length':>10}  depot")
    for m in ex.mappings:
        print(f"{m.exnode_offset:>12} {m.logical_length:>10}  {m.depot}")
    return 0


def augment(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    depots = [d for d in args.depots.split(",") if d]
    pool = Pool(args.timeout, args.encrypt)
    added = 0
    bar = Progress(ex.size * len(depots), "augment")
    try:
        for offset, length, block in ex.blocks():
            have = {m.depot for m in block}
            for depot in depots:
                if depot in have:
                    continue
                try:
                    r, wcap, m = pool.get(depot).allocate(length, args.duration)
                    src = _copy_from_any(pool, block, wcap, length)
                except (w.IbpError, FlowError) as e:
                    warn(f"depot {depot}: {e}")
                    pool.drop(depot)
                    continue
                ex.mappings.append(Mapping(offset, length, 0, length, str(r), str(wcap), str(m), src.sha256))
                added += 1
                bar.add(length)
    finally:
        pool.close()
    bar.finish()
    write_exnode(ex, args)
    print(f"exnode: added {added} mappings", file=sys.stderr)
    return 0


def _copy_from_any(pool: Pool, block: list[Mapping], wcap: Capability, length: int) -> Mapping:
    """Have a depot holding the block push it into `wcap`; the replica it came from."""
    for m in block:
        src = parse_cap(m.read)
        try:
            pool.get(src.depot).copy(src, wcap, m.alloc_offset, length)
            return m
        except (w.IbpError, FlowError):
            pool.drop(src.depot)
    raise w.IbpError(w.IBP_E_RSRC_UNAVAIL, "no replica could be copied")


def trim(args: argparse.Namespace) -> int:
    ex = read_exnode(args.xnd)
    depots = set(d for d in args.depots.split(",") if d)
    keep = [m for m in ex.mappings if m.depot not in depots]
    dropped = [m for m in ex.mappings if m.depot in depots]
    trimmed = ExNode(ex.filename, ex.size, ex.sha256, keep)
    if trimmed.gaps() and not args.force:
        raise BadExnode(f"trimming would leave bytes {trimmed.gaps()[0]} with no replica (use --force)")
    if args.free:
        pool = Pool(args.timeout, args.encrypt)
        try:
            for m in dropped:
                if not m.manage:
                    continue
                cap = parse_cap(m.manage)
                try:
                    pool.get(cap.depot).manage(cap, w.IBP_DECR, w.IBP_READCAP)
                except (w.IbpError, FlowError) as e:
                    warn(f"could not free on {cap.depot}: {e}")
                    pool.drop(cap.depot)
        finally:
            pool.close()
    write_exnode(trimmed, args)
    print(f"exnode: removed {len(dropped)} mappings", file=sys.stderr)
    return 0


def read_exnode(path: Path) -> ExNode:
    try:
        data = path.read_bytes() if str(path) != "-" else sys.stdin.buffer.read()
    except OSError as e:
        raise BadExnode(f"cannot read {path}: {e.strerror}") from None
    return from_xml(data)


def write_exnode(ex: ExNode, args: argparse.Namespace) -> None:
    data = to_xml(ex)
    if args.in_place:
        tmp = args.xnd.with_suffix(args.xnd.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(args.xnd)
    else:
        sys.stdout.buffer.write(data)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for a depot")
    common.add_argument("--encrypt", action="store_true", help="encrypt the flows to depots end to end")
    p = argparse.ArgumentParser(prog="exnode", description="files spread over IBP depots")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    u = add("upload", help="store FILE striped and replicated; the exNode goes to stdout")
    u.add_argument("file", type=Path)
    u.add_argument("--depots", required=True, help="comma-separated depot names (or host:port)")
    u.add_argument("--stripe", type=size, default=size("4M"))
    u.add_argument("--replicas", type=int, default=1)
    u.add_argument("--duration", type=seconds, default=seconds("1d"))
    u.add_argument("--parallel", type=int, default=4, help="blocks moved at once (default 4)")
    d = add("download", help="fetch the file an exNode describes to stdout (or -o)")
    d.add_argument("xnd", type=Path)
    d.add_argument("-o", "--output", type=Path)
    d.add_argument("--parallel", type=int, default=4, help="blocks fetched at once (default 4)")
    lsp = add("ls", help="list an exNode's mappings")
    lsp.add_argument("xnd", type=Path)
    a = add("augment", help="add a replica of every block on more depots")
    a.add_argument("xnd", type=Path)
    a.add_argument("--depots", required=True)
    a.add_argument("--duration", type=seconds, default=seconds("1d"))
    a.add_argument("--in-place", action="store_true", help="rewrite XND instead of printing the new exNode")
    t = add("trim", help="drop the mappings on some depots")
    t.add_argument("xnd", type=Path)
    t.add_argument("--depots", required=True)
    t.add_argument("--free", action="store_true", help="also release the dropped allocations")
    t.add_argument("--force", action="store_true", help="even if a block is left with no replica")
    t.add_argument("--in-place", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run = {"upload": upload, "download": download, "ls": ls, "augment": augment, "trim": trim}[args.cmd]
    try:
        sys.exit(run(args))
    except (w.IbpError, BadExnode, FlowError, ValueError) as e:
        print(f"\nexnode {args.cmd}: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        sys.exit(1)
    except OSError as e:
        print(f"\nexnode {args.cmd}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
