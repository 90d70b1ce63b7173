"""LoRS operations on files through exNodes: upload (striped, replicated), download (whole or a
range), refresh, augment, trim and a listing with each mapping's liveness; no argument parsing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, TypeVar

from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import DEFAULT_TIMEOUT, Connection, parse_cap
from apps.ibp.exnode import BadExnode, ExNode, Mapping, conditioned, plan
from flowlib import FlowError
from irmd.identity import open_regular
from proto.visible import visible

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

    from tqdm import tqdm

log = logging.getLogger("exnode")
T = TypeVar("T")
R = TypeVar("R")
Failure = (w.IbpError, FlowError)


@dataclass(frozen=True)
class Settings:
    """How the tools reach depots: the wait at each step, blocks moved at once, flow encryption."""

    timeout: float = DEFAULT_TIMEOUT
    parallel: int = 4
    encrypt: bool = False


def progress(total: int, label: str) -> tqdm:  # type: ignore[type-arg]
    """A progress bar on stderr, drawn only when stderr is a terminal."""
    from tqdm import tqdm  # here: 20-50 ms to import, and only moving bytes draws a bar

    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
        dynamic_ncols=True,
    )


class Pool:
    """One open connection per depot; a failed one is dropped and reopened on next use."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.conns: dict[str, Connection] = {}

    def get(self, depot: str) -> Connection:
        if depot not in self.conns:
            self.conns[depot] = Connection(depot, self.s.timeout, encrypt=self.s.encrypt)
        return self.conns[depot]

    def drop(self, depot: str) -> None:
        conn = self.conns.pop(depot, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for d in list(self.conns):
            self.drop(d)


class Workers:
    """Work done by `parallel` threads at once, each with its own depot connections; results in
    order, at most 2 x parallel items in flight (so in memory)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.n = max(1, s.parallel)
        self.local = threading.local()
        self.pools: list[Pool] = []
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(self.n)

    def pool(self) -> Pool:
        p: Pool | None = getattr(self.local, "pool", None)
        if p is None:
            p = self.local.pool = Pool(self.s)
            with self.lock:
                self.pools.append(p)
        return p

    def map(self, fn: Callable[[Pool, T], R], items: Iterable[T]) -> Iterator[R]:
        window: deque[Future[R]] = deque()
        for item in items:
            window.append(self.executor.submit(lambda i: fn(self.pool(), i), item))
            if len(window) >= 2 * self.n:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)  # every started item ends first
        for p in self.pools:
            p.close()


class Ledger:
    """Every allocation a tool made, so that whatever fails, none is left behind unaccounted for."""

    def __init__(self) -> None:
        self.made: list[Mapping] = []
        self._lock = threading.Lock()

    def add(self, m: Mapping) -> None:
        with self._lock:
            self.made.append(m)

    def orphans(self, kept: Iterable[Mapping]) -> list[Mapping]:
        keep = {m.manage for m in kept}
        return [m for m in self.made if m.manage not in keep]


def release(mappings: list[Mapping], s: Settings) -> list[Mapping]:
    """Free allocations (the last read reference dropped); those that could not be freed."""
    failed = []
    pool = Pool(s)
    try:
        for m in mappings:
            try:
                cap = parse_cap(m.manage)
                pool.get(cap.depot).manage(cap, w.IBP_DECR, w.IBP_READCAP)
            except Failure as e:
                log.warning("could not free an allocation on %s: %s", m.depot, e)
                pool.drop(m.depot)
                failed.append(m)
    finally:
        pool.close()
    return failed


# -- upload --


@dataclass
class Uploaded:
    ex: ExNode
    short: list[tuple[int, int]]  # (offset, replicas made) of blocks with fewer replicas than asked


class UploadFailed(Exception):
    """An upload that could not place some block at all; `leftover` holds the allocations it made
    that could not be freed either (empty when every one was)."""

    def __init__(self, reason: str, leftover: ExNode) -> None:
        super().__init__(reason)
        self.leftover = leftover


def upload(
    path: Path, depots: list[str], stripe: int, replicas: int, duration: int, reliability: int, s: Settings
) -> Uploaded:
    # Opened once, without blocking and only as a regular file: the file measured is the file read,
    # and a FIFO put in its place (by whoever may write its directory) is refused, not waited on.
    try:
        fd, st = open_regular(str(path))
    except OSError as e:
        raise w.IbpError(w.IBP_E_FILE_OPEN, f"cannot read {path}: {e.strerror or e}") from None
    source = os.fdopen(fd, "rb")
    size = st.st_size
    blocks = plan(size, stripe, depots, replicas)
    ex = ExNode(path.name, size)
    ledger = Ledger()
    whole = hashlib.sha256()

    def place(pool: Pool, block: tuple[int, bytes, list[str]]) -> list[Mapping]:
        offset, data, where = block
        others = [d for d in depots if d not in where]
        placed = _place(pool, ledger, data, offset, where + others, replicas, duration, reliability)
        if not placed:
            raise w.IbpError(w.IBP_E_RSRC_UNAVAIL, f"no depot took the block at {offset}")
        return placed

    def read(f: BinaryIO) -> Iterator[tuple[int, bytes, list[str]]]:
        for offset, length, where in blocks:
            data = f.read(length)
            if len(data) != length:
                raise w.IbpError(w.IBP_E_GENERIC, f"{path} changed while being uploaded")
            whole.update(data)
            yield offset, data, where

    try:
        with source as f, progress(size, f"upload {path.name}") as bar, Workers(s) as workers:
            for placed in workers.map(place, read(f)):
                ex.mappings.extend(placed)
                bar.update(placed[0].logical_length)
    except BaseException as e:
        leftover = release(ledger.made, s)
        raise UploadFailed(str(e) or type(e).__name__, ExNode(path.name, size, mappings=leftover)) from e
    release(ledger.orphans(ex.mappings), s)  # replicas whose store failed on the way
    ex.sha256 = whole.hexdigest()
    short = [(o, k) for o, _, k in ex.replicas() if k < replicas]
    return Uploaded(ex, short)


def _place(
    pool: Pool,
    ledger: Ledger,
    data: bytes,
    offset: int,
    candidates: list[str],
    replicas: int,
    duration: int,
    reliability: int,
) -> list[Mapping]:
    """`replicas` copies of one block: stored once, then copied depot to depot."""
    digest = hashlib.sha256(data).hexdigest()
    placed: list[Mapping] = []
    for depot in candidates:
        if len(placed) == replicas:
            break
        try:
            conn = pool.get(depot)
            r, wcap, m = conn.allocate(len(data), duration, reliability)
        except Failure as e:
            log.warning("depot %s: %s; trying the next one", depot, e)
            pool.drop(depot)
            continue
        mapping = Mapping(
            offset, len(data), 0, len(data), str(r), str(wcap), str(m), digest, int(time.time()) + duration
        )
        ledger.add(mapping)
        try:
            if placed:  # the first replica's depot pushes the bytes itself
                src = parse_cap(placed[0].read)
                pool.get(src.depot).copy(src, wcap, 0, len(data))
            else:
                conn.store(wcap, [data], len(data))
        except Failure as e:
            log.warning("depot %s: %s; trying the next one", depot, e)
            pool.drop(depot)
            continue
        placed.append(mapping)
    return placed


# -- download --


HELD = 32 * 1024 * 1024  # bytes of one block a download holds in memory; a longer one waits in a file
SPILL_CHUNK = 1024 * 1024  # bytes moved at a time between a spilled block and the output


@dataclass
class _Spilled:
    """A block longer than HELD, in an unnamed temporary file: its bytes [start, start + n) are wanted."""

    file: BinaryIO
    start: int
    n: int

    def chunks(self) -> Iterator[bytes]:
        with self.file:
            self.file.seek(self.start)
            left = self.n
            while left:
                chunk = self.file.read(min(left, SPILL_CHUNK))
                if not chunk:
                    raise w.IbpError(w.IBP_E_FILE_READ, "a block's temporary file came back short")
                left -= len(chunk)
                yield chunk


def download(
    ex: ExNode,
    out: BinaryIO,
    s: Settings,
    offset: int = 0,
    length: int | None = None,
    spill: Path | None = None,
) -> int:
    """Write the file's bytes [offset, offset + length) to `out`; checks each block's checksum and,
    for the whole file, the file's. Returns the bytes written. A block longer than HELD waits for
    its checksum in a temporary file in `spill` (None: the system's), never in memory: the lengths
    are the exNode's and the depot's word, so memory stays within 2 x parallel x HELD whatever they say."""
    if offset > ex.size:
        raise BadExnode(f"offset {offset} is past the end of the file ({ex.size} bytes)")
    pieces = ex.pieces(offset, length)
    for block, _, _ in pieces:  # before a byte is written: their bytes are not the file's
        conditioned(block)
    total = sum(n for _, _, n in pieces)
    whole = hashlib.sha256() if offset == 0 and total == ex.size else None
    with progress(total, f"download {visible(ex.filename)}") as bar, Workers(s) as workers:
        for got in workers.map(lambda pool, piece: _fetch(pool, *piece, spill=spill), pieces):
            for data in got.chunks() if isinstance(got, _Spilled) else (got,):
                out.write(data)
                if whole is not None:
                    whole.update(data)
                bar.update(len(data))
    out.flush()
    if whole is not None and ex.sha256 and whole.hexdigest() != ex.sha256:
        raise w.IbpError(w.IBP_E_GENERIC, "the file's checksum does not match the exNode's")
    return total


def _fetch(
    pool: Pool, block: list[Mapping], start: int, n: int, spill: Path | None = None
) -> bytearray | memoryview | _Spilled:
    """Bytes [start, start + n) of a block, from the first replica that answers with the right bytes
    (a replica with a checksum is read whole, to check it)."""
    errors = []
    for m in block:
        cap = parse_cap(m.read)
        whole = bool(m.sha256)
        at, count = (m.alloc_offset, m.logical_length) if whole else (m.alloc_offset + start, n)
        digest = hashlib.sha256() if whole else None
        try:
            data = _load(pool.get(cap.depot), cap, at, count, digest, spill)
        except Failure as e:
            pool.drop(cap.depot)
            errors.append(f"{cap.depot}: {e}")
            continue
        if digest is not None and digest.hexdigest() != m.sha256:
            if isinstance(data, _Spilled):
                data.file.close()
            errors.append(f"{cap.depot}: checksum mismatch")
            continue
        if isinstance(data, _Spilled):
            data.start, data.n = (start, n) if whole else (0, n)
            return data
        return memoryview(data)[start : start + n] if whole else data
    raise w.IbpError(
        w.IBP_E_RSRC_UNAVAIL, f"no replica of bytes {block[0].exnode_offset}.. is readable: " + "; ".join(errors)
    )


def _load(
    conn: Connection, cap: Capability, offset: int, n: int, digest: Hash | None, spill: Path | None
) -> bytearray | _Spilled:
    """`n` bytes of `cap` at `offset`, hashed into `digest` if given: in memory up to HELD bytes, else
    in an unnamed temporary file in `spill`, written as they arrive."""
    if n <= HELD:
        data = conn.load_bytes(cap, offset, n)
        if digest is not None:
            digest.update(data)
        return data
    f = tempfile.TemporaryFile(dir=spill)  # noqa: SIM115 - handed on open, closed by its reader
    try:
        _, chunks = conn.load(cap, offset, n)
        for chunk in chunks:
            f.write(chunk)
            if digest is not None:
                digest.update(chunk)
    except BaseException:
        f.close()
        raise
    return _Spilled(f, 0, n)


# -- liveness --


@dataclass(frozen=True)
class Liveness:
    """What a depot says of one mapping now."""

    state: str  # "alive", "gone" (the depot no longer has it), "unreachable"
    seconds_left: int | None = None
    reliability: int | None = None
    why: str = ""
    read_refs: int | None = None


def stat(ex: ExNode, s: Settings) -> list[Liveness]:
    """Each mapping's liveness, probed with its manage capability (or a 1-byte load without one)."""
    with Workers(s) as workers:
        return list(workers.map(_probe, ex.mappings))


def _probe(pool: Pool, m: Mapping) -> Liveness:
    cap = parse_cap(m.manage or m.read)
    try:
        conn = pool.get(cap.depot)
        if m.manage:
            p = conn.probe(cap)
            if p["size"] < m.alloc_offset + m.logical_length:
                return Liveness("gone", p["seconds_left"], p["reliability"], "shorter than mapped", p["read_refs"])
            return Liveness("alive", p["seconds_left"], p["reliability"], read_refs=p["read_refs"])
        if m.logical_length:
            conn.load_bytes(cap, m.alloc_offset, 1)
        return Liveness("alive")
    except w.IbpError as e:
        if e.status in (
            w.IBP_E_CAP_NOT_FOUND,
            w.IBP_E_INVALID_READ_CAP,
            w.IBP_E_INVALID_MANAGE_CAP,
            w.IBP_E_WOULD_EXCEED_LIMIT,
        ):
            return Liveness("gone", why=w.status_text(e.status))
        pool.drop(cap.depot)
        return Liveness("unreachable", why=w.status_text(e.status))
    except FlowError as e:
        pool.drop(cap.depot)
        return Liveness("unreachable", why=str(e))


# -- refresh --

ADD, SET, MAXIMUM = "add", "set", "max"


def refresh(ex: ExNode, how: str, seconds: int, s: Settings) -> tuple[ExNode, list[str]]:
    """Extend every mapping: by `seconds` (ADD), to `seconds` from now (SET) or to the depot's longest
    (MAXIMUM). The exNode with the new expiry times, and what could not be refreshed."""

    def one(pool: Pool, m: Mapping) -> Mapping | str:
        if not m.manage:
            return f"{m.depot} (bytes {m.exnode_offset}..{m.end}): no manage capability"
        cap = parse_cap(m.manage)
        try:
            conn = pool.get(cap.depot)
            if how == MAXIMUM:
                duration = int(conn.status(cap.rid)["max_duration"])
            elif how == ADD:
                duration = conn.probe(cap)["seconds_left"] + seconds
            else:
                duration = seconds
            conn.manage(cap, w.IBP_CHNG, w.IBP_MANAGECAP, w.KEEP, max(1, duration))  # size -1: kept
            left = conn.probe(cap)["seconds_left"]
        except (*Failure, KeyError, ValueError) as e:
            pool.drop(cap.depot)
            return f"{m.depot} (bytes {m.exnode_offset}..{m.end}): {e}"
        return dataclasses.replace(m, expires=int(time.time()) + left)

    mappings, failed = [], []
    with Workers(s) as workers:
        for m, r in zip(ex.mappings, workers.map(one, ex.mappings), strict=True):
            if isinstance(r, str):
                failed.append(r)
                mappings.append(m)
            else:
                mappings.append(r)
    return dataclasses.replace(ex, mappings=mappings), failed


# -- augment and trim --


def augment(
    ex: ExNode, depots: list[str], copies: int, duration: int, reliability: int, s: Settings
) -> tuple[ExNode, int, int]:
    """Add up to `copies` replicas of every block on `depots` that do not hold it yet, each copied
    depot to depot. The new exNode, the replicas added and those asked for."""
    conditioned(ex.mappings)  # copies of them would need LoRS's functions too: refused before allocating
    ledger = Ledger()
    added: list[Mapping] = []
    wanted = 0
    pool = Pool(s)
    blocks = ex.blocks()
    try:
        with progress(sum(n for _, n, _ in blocks) * copies, "augment") as bar:
            for i, (offset, length, block) in enumerate(blocks):
                have = {m.depot for m in block}
                free = [d for d in depots if d not in have]
                free = free[i % len(free) :] + free[: i % len(free)] if free else []
                wanted += copies
                made = 0
                for depot in free:
                    if made == copies:
                        break
                    m = _replicate(pool, ledger, block, depot, offset, length, duration, reliability)
                    if m is not None:
                        added.append(m)
                        made += 1
                        bar.update(length)
    finally:
        pool.close()
        release(ledger.orphans(added), s)
    return dataclasses.replace(ex, mappings=ex.mappings + added), len(added), wanted


def _replicate(
    pool: Pool,
    ledger: Ledger,
    block: list[Mapping],
    depot: str,
    offset: int,
    length: int,
    duration: int,
    reliability: int,
) -> Mapping | None:
    try:
        r, wcap, m = pool.get(depot).allocate(length, duration, reliability)
    except Failure as e:
        log.warning("depot %s: %s", depot, e)
        pool.drop(depot)
        return None
    new = Mapping(offset, length, 0, length, str(r), str(wcap), str(m), block[0].sha256, int(time.time()) + duration)
    ledger.add(new)
    for src_map in block:
        src = parse_cap(src_map.read)
        try:
            pool.get(src.depot).copy(src, wcap, src_map.alloc_offset, length)
            return new
        except Failure as e:
            log.warning("copy from %s to %s: %s", src.depot, depot, e)
            pool.drop(src.depot)
    return None


def trim(ex: ExNode, drop: set[int], free: bool, force: bool, s: Settings) -> tuple[ExNode, list[Mapping]]:
    """Drop the mappings numbered in `drop`; with `free`, release their allocations too. Refused if a
    byte would be left with no replica, unless `force`. The new exNode and those not freed."""
    keep = [m for i, m in enumerate(ex.mappings) if i not in drop]
    trimmed = dataclasses.replace(ex, mappings=keep)
    if trimmed.gaps() and not force:
        raise BadExnode(f"trimming would leave bytes {trimmed.gaps()[0]} with no replica (use --force)")
    dropped = [m for i, m in enumerate(ex.mappings) if i in drop]
    not_freed = release([m for m in dropped if m.manage], s) if free else []
    return trimmed, not_freed


def select(ex: ExNode, depots: set[str], numbers: set[int], dead: list[Liveness] | None) -> set[int]:
    """Mapping numbers on `depots`, among `numbers`, or (with `dead`) not alive."""
    out = {i for i, m in enumerate(ex.mappings) if m.depot in depots} | {i for i in numbers if i < len(ex.mappings)}
    if dead is not None:
        out |= {i for i, live in enumerate(dead) if live.state != "alive"}
    return out
