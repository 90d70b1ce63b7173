"""The IBP client library: one connection to a depot, by flow (a registered name) or TCP (host:port).

Every wait has a timeout, so a silent depot returns control with IbpError(IBP_E_CLIENT_TIMEOUT).
"""

from __future__ import annotations

import math
import re
import socket
import time
from collections.abc import Iterable, Iterator
from types import TracebackType

from apps.ibp import wire as w
from apps.ibp.capability import BadCapability, Capability
from apps.ibp.stream import ByteStream, FlowStream, StreamClosed, StreamTimeout, TcpStream
from flowlib import FlowError, flow_alloc, qos
from flowlib.irm import IrmClient

DEFAULT_TIMEOUT = 30.0
# Bytes a load takes at once before any arrive: past them a buffer grows with what comes. A load to
# the end is as long as the depot says (one-byte probes it answers), and a lying one had the client
# take 2 GiB for a load it never sent.
PREALLOC_MAX = 64 << 20
BUSY_WAIT = (0.05, 5.0)  # bounds on the wait a busy depot asks for before we ask again
COPY_WAIT_FACTOR = 10  # a copy's reply is awaited up to this many timeouts per target
STORE_BLOCK = 8 * 1024 * 1024  # bytes per STORE when the length is not known up front
MAX_STATUS_TEXT = 65_536  # bytes of STATUS text we take from a depot
PAST_END = (w.IBP_E_WOULD_EXCEED_LIMIT, w.IBP_E_INVALID_PARAMETER)  # a load past the data: L-Store's, our old one
PROBE_FIELDS = ("read_refs", "write_refs", "size", "max_size", "seconds_left", "reliability", "type")
_HOSTPORT = re.compile(r"(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")


def tcp_address(depot: str) -> tuple[str, int] | None:
    """(host, port) if `depot` is host:port, else None (a name reached by flow)."""
    m = _HOSTPORT.fullmatch(depot)
    if m is None or not 0 < int(m["port"]) < 65536:
        return None
    return m["host"].strip("[]"), int(m["port"])


def open_stream(depot: str, timeout: float, irm: IrmClient | None = None, encrypt: bool = False) -> ByteStream:
    """A stream to `depot`: TCP for host:port, else a reliable flow (end-to-end encrypted if asked)."""
    addr = tcp_address(depot)
    try:
        if addr is not None:
            return TcpStream(socket.create_connection(addr, timeout=timeout))
        return FlowStream(flow_alloc(depot, qos=qos.data, timeout=timeout, irm=irm, encrypt=encrypt))
    except (OSError, FlowError) as e:
        raise w.IbpError(w.IBP_E_CONNECTION, f"cannot reach depot {depot!r}: {e}") from None


def _busy_wait(reply: w.Reply) -> float:
    """The seconds a -66 reply asks to wait, within BUSY_WAIT (1 s when it says none we can read)."""
    try:
        advised = float(reply.fields[0])
    except (IndexError, ValueError):
        return 1.0
    return min(max(advised, BUSY_WAIT[0]), BUSY_WAIT[1]) if math.isfinite(advised) else 1.0


def parse_cap(text: str, right: str | None = None) -> Capability:
    try:
        cap = Capability.parse(text)
    except BadCapability as e:
        raise w.IbpError(w.IBP_E_WRONG_CAP_FORMAT, str(e)) from None
    if right is not None and cap.right != right:
        raise w.IbpError(w.IBP_E_WRONG_CAP_FORMAT, f"a {right} capability is needed here, not {cap.right}")
    return cap


class Connection:
    """Requests to one depot over one stream; use as a context manager."""

    def __init__(
        self,
        depot: str,
        timeout: float = DEFAULT_TIMEOUT,
        irm: IrmClient | None = None,
        encrypt: bool = False,
        own_irm: bool = False,
    ) -> None:
        """own_irm: `irm` was made for this connection alone, and is closed with it."""
        self.depot = depot
        self.timeout = timeout
        self.answered = 0  # replies received: whether the depot took a request, when a connection is lost
        self._own_irm = irm if own_irm else None
        try:
            self.stream = open_stream(depot, timeout, irm, encrypt)
        except BaseException:
            self._close_irm()
            raise

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self._close_irm()

    def _close_irm(self) -> None:
        if self._own_irm is not None:
            self._own_irm.close()
            self._own_irm = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def _server_timeout(self) -> int:
        return max(1, int(self.timeout))

    def _reply(self, wait: float | None = None) -> w.Reply:
        wait = self.timeout if wait is None else wait
        try:
            line = self.stream.readline(w.MAX_LINE, wait)
            self.answered += 1
            return w.parse_reply(line)
        except StreamTimeout:
            raise w.IbpError(w.IBP_E_CLIENT_TIMEOUT, f"depot {self.depot!r} did not answer in {wait:g} s") from None
        except StreamClosed:
            raise w.IbpError(w.IBP_E_CONNECTION, f"depot {self.depot!r} closed the connection") from None
        except (ValueError, w.BadRequest) as e:
            raise w.IbpError(w.IBP_E_BAD_FORMAT, f"bad reply from depot {self.depot!r}: {e}") from None

    def _send(self, data: bytes | memoryview) -> None:
        try:
            self.stream.send(data)
        except StreamTimeout:
            raise w.IbpError(w.IBP_E_CLIENT_TIMEOUT, f"depot {self.depot!r} takes no data") from None
        except (StreamClosed, FlowError, OSError) as e:
            raise w.IbpError(w.IBP_E_CONNECTION, f"lost depot {self.depot!r}: {e}") from None

    def call(self, req: w.Request, wait: float | None = None) -> w.Reply:
        """Send `req`; its reply line, waited for `wait` seconds (default: the timeout). A depot that
        turns the request away for now (-66, with the seconds to wait: e.g. this client's copies in
        progress are many) is asked again after that wait, as L-Store's clients do, within the timeout."""
        frame, deadline = w.format_request(req), time.monotonic() + self.timeout
        while True:
            self._send(frame)
            reply = self._reply(wait)
            if reply.status != w.IBP_E_OUT_OF_SOCKETS or time.monotonic() + (pause := _busy_wait(reply)) > deadline:
                return self._checked(reply)
            time.sleep(pause)

    def _checked(self, reply: w.Reply) -> w.Reply:
        if reply.status == w.IBP_E_OUT_OF_SOCKETS:  # `-66 WAIT reason`: turned away for now
            wait = reply.fields[0] if reply.fields else "?"
            why = w.reason_fields(" ".join(reply.fields[1:]))
            raise w.IbpError(
                reply.status, f"depot {self.depot!r} is busy ({why}): retry in {w.reason_fields(wait)[:12]} s"
            )
        if not reply.ok:
            why = w.reason_fields(" ".join(reply.fields)) or "no reason"
            raise w.IbpError(reply.status, f"depot {self.depot!r} refused: {why}")
        return reply

    # -- operations --

    def allocate(
        self, size: int, duration: int, reliability: int = w.IBP_SOFT, type_: int = w.IBP_BYTEARRAY
    ) -> tuple[Capability, Capability, Capability]:
        reply = self.call(w.Allocate("0", reliability, type_, duration, size, self._server_timeout))
        if len(reply.fields) < 3:
            raise w.IbpError(w.IBP_E_BAD_FORMAT, "ALLOCATE reply lacks capabilities")
        caps = tuple(parse_cap(f) for f in reply.fields[:3])
        return caps[0], caps[1], caps[2]

    def store(
        self, cap: Capability, chunks: Iterable[bytes | memoryview], length: int, offset: int | None = None
    ) -> int:
        """Append (offset None: STORE) or write at `offset` (WRITE) exactly `length` bytes."""
        t = self._server_timeout
        req: w.Request = (
            w.Store(cap.key, cap.typekey, length, t, cap.rid)
            if offset is None
            else w.Write(cap.key, cap.typekey, offset, length, t, cap.rid)
        )
        self.call(req)
        sent = 0
        for chunk in chunks:
            if sent + len(chunk) > length:
                raise ValueError("more data than announced")
            self._send(chunk)
            sent += len(chunk)
        if sent != length:
            # The depot waits for the rest and then times out; nothing of this store is kept.
            raise w.IbpError(w.IBP_E_INVALID_PARAMETER, f"only {sent} of {length} bytes to store")
        reply = self._checked(self._reply())
        return w.reply_int(reply, 0, "stored length")

    def load(self, cap: Capability, offset: int = 0, length: int = 0, hint: int = 0) -> tuple[int, Iterator[bytes]]:
        """(n, chunks): n bytes at `offset` (length 0: to the end, found by `readable`, from `hint` if
        given: IBP depots refuse a length of 0); consume the chunks before the next call."""
        length = length or self.readable(cap, offset, hint)
        if not length:
            return 0, iter(())
        reply = self.call(w.Load(cap.key, cap.typekey, offset, length, self._server_timeout, cap.rid))
        n = w.reply_int(reply, 0, "length")
        if n != length:
            raise w.IbpError(w.IBP_E_BAD_FORMAT, f"asked for {length} bytes, the depot announced {n}")
        return n, self._chunks(n)

    def readable(self, cap: Capability, offset: int = 0, hint: int = 0) -> int:
        """How many bytes `cap`'s allocation holds from `offset`. A read capability gives no other way
        to learn its size on an IBP depot (a load's length must be at least 1, PROBE wants the manage
        key), so the end is found with one-byte loads: doubling, then halving (2 log2 n requests); two
        when `hint` (say, the size of the buffer to fill) is right, as it usually is."""

        def has(count: int) -> bool:
            try:
                self.load_bytes(cap, offset + count - 1, 1)
            except w.IbpError as e:
                if e.status in PAST_END:
                    return False
                raise
            return True

        have, beyond, bounded = 0, 1, False  # `have` bytes are there, `beyond` are not (once bounded)
        if hint > 0:
            if not has(hint):
                beyond, bounded = hint, True
            elif not has(hint + 1):
                return hint
            else:
                have, beyond = hint + 1, min(2 * (hint + 1), w.MAX_INT - offset)
        while not bounded and has(beyond):
            have, beyond = beyond, min(2 * beyond, w.MAX_INT - offset)
            if have == beyond:
                return have
        while beyond - have > 1:
            mid = (have + beyond) // 2
            have, beyond = (mid, beyond) if has(mid) else (have, mid)
        return have

    def _chunks(self, n: int) -> Iterator[bytes]:
        try:
            yield from self.stream.read_chunks(n, self.timeout)
        except StreamTimeout:
            raise w.IbpError(w.IBP_E_CLIENT_TIMEOUT, f"depot {self.depot!r} stopped sending") from None
        except StreamClosed:
            raise w.IbpError(w.IBP_E_CONNECTION, f"depot {self.depot!r} closed the connection mid-load") from None

    def load_bytes(self, cap: Capability, offset: int = 0, length: int = 0) -> bytearray:
        """The bytes of a load, gathered as they arrive into the buffer returned (no copy at the end:
        a join would copy them all once the last came)."""
        n, chunks = self.load(cap, offset, length)
        if n > PREALLOC_MAX:  # the depot's word (it sized a load to the end): memory as its bytes come
            out = bytearray()
            for chunk in chunks:
                out += chunk
            return out
        out = bytearray(n)  # no growing (each growth a realloc and a copy)
        _gather(chunks, memoryview(out))
        return out

    def load_into(self, cap: Capability, buf: bytearray | memoryview, offset: int = 0, length: int = 0) -> int:
        """A load into `buf` from its start, as recv_into does: the count of bytes. A buffer used again
        spares the fresh memory load_bytes takes (page faults: about 0.3 ms per MB on a small VM). A
        load longer than `buf` fails after its bytes were read past, so the connection stays usable."""
        view = memoryview(buf).cast("B")
        n, chunks = self.load(cap, offset, length, hint=len(view))
        if n > len(view):
            for _ in chunks:
                pass
            raise ValueError(f"the load is {n} bytes, the buffer {len(view)}")
        _gather(chunks, view[:n])
        return n

    def copy(self, src: Capability, dst: Capability, offset: int = 0, length: int = 0) -> int:
        """The source depot appends `length` bytes at `offset` (0: to the end) to `dst`: the count."""
        length = length or self.readable(src, offset)
        if not length:
            return 0
        t = self._server_timeout
        reply = self.call(w.Send(src.key, src.typekey, str(dst), offset, length, t, t, t, src.rid), self._copy_wait(1))
        return w.reply_int(reply, 0, "copied length")

    def _copy_wait(self, targets: int) -> float:
        """A copy answers only when done: the depot's timeouts apply per step towards each target,
        so the whole may take several of them (a silent source depot still ends the wait)."""
        return self.timeout * COPY_WAIT_FACTOR * targets

    def mcopy(self, src: Capability, dsts: list[Capability], offset: int = 0, length: int = 0) -> list[int]:
        """Statuses per target (IBP_OK or an error), after the copied length (0: to the end)."""
        length = length or self.readable(src, offset)
        reply = self.call(
            w.Mcopy(src.key, src.typekey, offset, length, tuple(str(d) for d in dsts), self._server_timeout, src.rid),
            self._copy_wait(len(dsts)),
        )
        return [w.reply_status(reply, i) for i in range(1, len(reply.fields))]

    def manage(
        self,
        cap: Capability,
        subcmd: int,
        captype: int = w.IBP_READCAP,
        size: int = w.KEEP,
        duration: int = w.KEEP,
        reliability: int = w.KEEP,
    ) -> tuple[str, ...]:
        """PROBE's fields (read_refs write_refs size max_size seconds_left reliability type), or ()."""
        return self.call(
            w.Manage(cap.key, cap.typekey, subcmd, captype, self._server_timeout, size, duration, reliability, cap.rid)
        ).fields

    def probe(self, cap: Capability) -> dict[str, int]:
        fields = self.manage(cap, w.IBP_PROBE, w.IBP_MANAGECAP)
        reply = w.Reply(w.IBP_OK, fields)
        return {name: w.reply_int(reply, i, name) for i, name in enumerate(PROBE_FIELDS)}

    def status(self, rid: str = "0", password: str = w.DEFAULT_PASSWORD) -> dict[str, str]:
        """ST_INQ: the depot's figures by name (capacity, reserved, free, max_duration, ...)."""
        reply = self.call(w.Status(rid, w.IBP_ST_INQ, password, self._server_timeout))
        n = w.reply_int(reply, 0, "length")
        if n > w.MAX_LINE:
            raise w.IbpError(w.IBP_E_BAD_FORMAT, "status line too long")
        return w.parse_inq(b"".join(self._chunks(n)))

    def version(self) -> str:
        """ST_VERSION: the depot's description in words, up to its END line, all within the timeout
        (a peer dripping one line at a time gets no longer)."""
        end = time.monotonic() + self.timeout
        self.call(w.Status("", w.IBP_ST_VERSION, "", self._server_timeout))
        lines: list[str] = []
        size = 0
        while True:
            try:
                line = self.stream.readline(w.MAX_LINE, max(0.0, end - time.monotonic()))
            except StreamTimeout:
                raise w.IbpError(w.IBP_E_CLIENT_TIMEOUT, f"depot {self.depot!r} stopped sending") from None
            except (StreamClosed, ValueError) as e:
                raise w.IbpError(w.IBP_E_CONNECTION, f"depot {self.depot!r}: {e}") from None
            text = line.decode("ascii", "replace").rstrip("\r\n")
            if text == "END":
                return "\n".join(lines)
            size += len(line)
            if size > MAX_STATUS_TEXT:
                raise w.IbpError(w.IBP_E_BAD_FORMAT, "version text too long")
            lines.append("".join(c if c.isprintable() else "?" for c in text))

    def change(self, password: str, capacity: int, max_duration: int) -> None:
        """ST_CHANGE as IBP sends it: the new limits on a second line."""
        self.call(w.Status("0", w.IBP_ST_CHANGE, password, self._server_timeout, capacity, max_duration, follows=True))


def _gather(chunks: Iterable[bytes], view: memoryview) -> None:
    at = 0
    for chunk in chunks:
        view[at : at + len(chunk)] = chunk
        at += len(chunk)
