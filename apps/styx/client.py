"""A 9P2000 client: version, attach, then file operations by path, over any Transport.

Paths are walked MAXWELEM names per Twalk; bulk data moves in iounit-sized reads and writes,
up to `pipeline` of them in flight, so a file costs a round trip per window, not per message.
"""

from __future__ import annotations

import contextlib
import getpass
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from apps.styx import wire as w
from apps.styx.transport import Transport, TransportError, TransportTimeout
from apps.styx.tree import ENONEXIST

M = TypeVar("M", bound=w.Msg)
_T = TypeVar("_T")
VERSION_TIMEOUT = 3.0  # a 9P server answers Tversion at once; one that does not is no 9P server
PIPELINE = 8  # Treads or Twrites in flight on a bulk transfer: the round trip is paid once per window
FLUSH_TIMEOUT = 5.0  # flush(5): a server answers a Tflush at once; one that does not in this long is given up


class StyxClientError(Exception):
    """The server answered Rerror, or the connection failed."""


class ServerError(StyxClientError):
    """The server's Rerror: its text as sent (Plan 9's words, without the name: see `naming`)."""


class RequestTimeout(StyxClientError):
    """No reply within the time given: the request was flushed before anything came (flush(5))."""


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Put the path before a server's error, as Plan 9's kernel does: "'/a/b' file does not exist"."""
    try:
        yield
    except ServerError as e:
        raise ServerError(f"'{path}' {e}") from None


def split_path(path: str) -> list[str]:
    """'/a/b//c/' -> ['a', 'b', 'c']; '..' is kept (the server decides what it means)."""
    return [p for p in path.split("/") if p and p != "."]


def _expect(reply: w.Msg, expect: type[M]) -> M:
    if isinstance(reply, w.Rerror):
        raise ServerError(reply.ename)
    if not isinstance(reply, expect):
        raise StyxClientError(f"expected {expect.__name__}, got {type(reply).__name__}")
    return reply


class Client:
    def __init__(
        self,
        transport: Transport,
        user: str | None = None,
        aname: str = "",
        msize: int = w.MSIZE_DEFAULT,
        pipeline: int = PIPELINE,
    ) -> None:
        self.transport = transport
        self.msize = msize
        self.pipeline = max(1, pipeline)
        self._tag = 0
        self._next_fid = 1
        self.root = 0
        self._version()
        self.rpc(w.Tattach(0, self.root, w.NOFID, user or getpass.getuser(), aname), w.Rattach)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def iounit(self) -> int:
        return self.msize - w.IOHDRSZ

    # -- messages --------------------------------------------------------------

    def _version(self) -> None:
        """Tversion, which also tells a 9P service from anything else quickly."""
        try:
            reply = self.rpc(w.Tversion(w.NOTAG, self.msize, w.VERSION9P), w.Rversion, VERSION_TIMEOUT)
        except TransportTimeout:
            raise StyxClientError(f"not a 9P service: no answer to Tversion within {VERSION_TIMEOUT:g} s") from None
        except StyxClientError as e:
            if "bad reply" in str(e) or "expected Rversion" in str(e):
                raise StyxClientError(f"not a 9P service: {e}") from None
            raise
        if reply.version != w.VERSION9P:
            raise StyxClientError(f"the server does not speak 9P2000 (answered '{reply.version}')")
        if reply.msize < w.MSIZE_MIN:  # nonsense to Plan 9's mount driver (below 24 no read header fits)
            raise StyxClientError(f"the server's msize {reply.msize} is below 9P's least, {w.MSIZE_MIN}")
        self.msize = min(self.msize, reply.msize)

    def _send(self, msg: w.Msg) -> int:
        """Send a request under a fresh tag (Tversion keeps NOTAG); the tag."""
        if not isinstance(msg, w.Tversion):
            self._tag = (self._tag + 1) % w.NOTAG
            msg.tag = self._tag
        try:
            self.transport.send(w.encode(msg))
        except TransportError as e:
            raise StyxClientError(f"connection lost: {e}") from None
        except KeyboardInterrupt:  # part of the message may have gone: no Tflush can follow it in step
            self.transport.close()
            raise
        return msg.tag

    def _receive(self, timeout: float | None = None) -> w.Msg:
        """The next reply, whichever request it answers."""
        try:
            return w.decode(self.transport.recv(timeout, self.msize), self.msize)
        except TransportTimeout:
            raise
        except TransportError as e:
            raise StyxClientError(f"connection lost: {e}") from None
        except w.DecodeError as e:
            raise StyxClientError(f"bad reply from the server: {e}") from None

    def _abandon(self, tags: Iterable[int]) -> dict[int, w.Msg]:
        """Flush the requests tagged `tags` and take every Rflush, as flush(5) has a client do before it
        uses those tags again: no reply to them can come after. The replies that came first, by tag (the
        request was done: flush(5) has them honoured). An interrupt meanwhile sends each Tflush not yet
        answered again, of the same request, as Plan 9's mount driver does; a server that has answered
        them not within FLUSH_TIMEOUT is out of step, and the connection is closed."""
        flushed: dict[int, int] = {}  # every Tflush sent: its tag -> the tag it flushes
        due: dict[int, int] = {}  # each request flushed -> the tag of its latest Tflush, until answered
        answers: dict[int, w.Msg] = {}
        deadline = time.monotonic() + FLUSH_TIMEOUT
        again = list(tags)
        while again or due:
            for old in again:
                due[old] = self._send(w.Tflush(0, old))
                flushed[due[old]] = old
            again = []
            try:
                reply = self._receive(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                again = list(due)
                continue
            except TransportTimeout:
                self.transport.close()
                raise StyxClientError(f"no Rflush within {FLUSH_TIMEOUT:g} s: the connection is closed") from None
            old = flushed.get(reply.tag, reply.tag)
            if reply.tag in flushed:  # an Rflush (whatever its type: Plan 9's mount driver asks no more)
                if due.get(old) == reply.tag:  # the latest Tflush's: it answers for the earlier ones too
                    del due[old]
            elif old in due and old not in answers:  # the request's own reply, before its Rflush: it was done
                answers[old] = reply
            else:
                raise StyxClientError(f"reply tag {reply.tag} answers no request in flight")
        return answers

    def _answer(self, inflight: dict[int, _T]) -> tuple[_T, w.Msg]:
        """The next reply to one of the requests in flight (tag -> what the caller keeps for it). An
        interrupt flushes them all, so the connection is in step for whatever the caller does next."""
        try:
            reply = self._receive()
        except KeyboardInterrupt:
            self._abandon(inflight)
            raise
        if reply.tag not in inflight:
            raise StyxClientError(f"reply tag {reply.tag} answers no request in flight")
        return inflight.pop(reply.tag), reply

    def _drain(self, inflight: dict[int, _T]) -> None:
        """Take the replies still due, so the connection is in step for the next request."""
        while inflight:
            self._answer(inflight)

    def rpc(self, msg: w.Msg, expect: type[M], timeout: float | None = None) -> M:
        """`msg` answered as `expect`. One unanswered within `timeout` seconds, or interrupted, is flushed
        and its Rflush taken (flush(5)): a reply that came first is the answer (a timeout) or taken and
        dropped (the interrupt goes on); else RequestTimeout. A Tversion is not flushed (version(5): nothing
        may follow it before its Rversion): its timeout is TransportTimeout."""
        tag = self._send(msg)
        try:
            reply = self._receive(timeout)
        except KeyboardInterrupt:
            if not isinstance(msg, w.Tversion):
                self._abandon([tag])
            raise
        except TransportTimeout:
            if isinstance(msg, w.Tversion):
                raise
            late = self._abandon([tag]).get(tag)
            if late is None:
                raise RequestTimeout(f"no answer within {timeout:g} s: the request was flushed") from None
            reply = late
        if reply.tag != tag:
            raise StyxClientError(f"reply tag {reply.tag} does not match request tag {tag}")
        return _expect(reply, expect)

    def newfid(self) -> int:
        self._next_fid += 1
        return self._next_fid

    def walk(self, path: str | list[str], fid: int | None = None) -> int:
        """A new fid for `path` (from the root, or from `fid`); StyxClientError if a name is missing."""
        names = split_path(path) if isinstance(path, str) else path
        start = self.root if fid is None else fid
        new = self.newfid()
        self.rpc(w.Twalk(0, start, new, []), w.Rwalk)
        for i in range(0, len(names), w.MAXWELEM):
            part = names[i : i + w.MAXWELEM]
            try:
                reply = self.rpc(w.Twalk(0, new, new, part), w.Rwalk)
            except StyxClientError:
                self.clunk(new)
                raise
            if len(reply.wqid) != len(part):
                self.clunk(new)
                raise ServerError(ENONEXIST)  # the server says no more of a walk that stops early
        return new

    def clunk(self, fid: int) -> None:
        self.rpc(w.Tclunk(0, fid), w.Rclunk)

    def open(self, fid: int, mode: int) -> w.Ropen:
        return self.rpc(w.Topen(0, fid, mode), w.Ropen)

    def create(self, fid: int, name: str, perm: int, mode: int) -> w.Rcreate:
        return self.rpc(w.Tcreate(0, fid, name, perm, mode), w.Rcreate)

    def read(self, fid: int, offset: int, count: int) -> bytes:
        return bytes(self.rpc(w.Tread(0, fid, offset, min(count, self.iounit)), w.Rread).data)

    def write(self, fid: int, offset: int, data: bytes | memoryview) -> int:
        return self.rpc(w.Twrite(0, fid, offset, data[: self.iounit]), w.Rwrite).count

    def stat_fid(self, fid: int) -> w.Stat:
        return self.rpc(w.Tstat(0, fid), w.Rstat).stat

    def wstat_fid(self, fid: int, st: w.Stat) -> None:
        self.rpc(w.Twstat(0, fid, st), w.Rwstat)

    # -- bulk data: up to `pipeline` requests in flight ---------------------------

    def _settle(self, reply: w.Msg, expect: type[M], inflight: dict[int, _T]) -> M:
        """`reply` as `expect`; on an error the rest of the window is taken first, to stay in step."""
        try:
            return _expect(reply, expect)
        except StyxClientError:
            self._drain(inflight)
            raise

    def _read_into(self, out: bytearray, fid: int, offset: int, count: int) -> None:
        """Append to `out` up to `count` bytes from `offset`, fewer only where the file ends (a short
        read), with up to `pipeline` reads in flight: each reply's data goes in as soon as it is
        next, so the bytes are gathered while the rest is still on its way."""
        unit = self.iounit
        end = offset + count
        inflight: dict[int, int] = {}  # tag -> offset
        early: dict[int, bytes | memoryview] = {}  # replies ahead of one still awaited
        pos = done = offset  # the next offset to ask for; the end of what is in `out`
        short: int | None = None  # the offset of the first read that came back short: the file ends there
        while True:
            while pos < end and short is None and len(inflight) < self.pipeline:
                n = min(unit, end - pos)
                inflight[self._send(w.Tread(0, fid, pos, n))] = pos
                pos += n
            if not inflight:
                return
            at, reply = self._answer(inflight)
            data = self._settle(reply, w.Rread, inflight).data
            if short is not None and at > short:
                continue  # past the end
            if len(data) < min(unit, end - at):
                short = at if short is None else min(short, at)
                early = {k: v for k, v in early.items() if k <= short}
            early[at] = data
            while done in early:
                data = early.pop(done)
                out += data
                done += len(data)

    def read_at(self, fid: int, offset: int, count: int) -> bytearray:
        """Up to `count` bytes of an open file from `offset` (fewer where it ends), `pipeline` reads
        at a time. Only for files read by offset: each read of a stream (net/N/data) takes the next
        SDU, and a read in flight past a short one would take an SDU nobody gets."""
        out = bytearray()
        self._read_into(out, fid, offset, count)
        return out

    def read_fid_all(self, fid: int) -> bytearray:
        """An open file's contents, read until a read returns nothing. A file that fills its first
        read and whose stat gives a length (a real file: synthetic ones and streams say 0) is read
        up to that length `pipeline` reads at a time."""
        out = bytearray()
        while True:
            chunk = self.rpc(w.Tread(0, fid, len(out), self.iounit), w.Rread).data
            if not chunk:
                return out
            out += chunk
            if len(out) == self.iounit and self.pipeline > 1:
                length = self.stat_fid(fid).length
                if length > len(out):
                    self._read_into(out, fid, len(out), length - len(out))

    def write_fid_all(self, fid: int, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """All of `data` at `offset`: iounit-sized writes, `pipeline` at a time once one went through
        whole. After a short write the rest goes one write at a time from where it stopped."""
        view = memoryview(data).cast("B")
        unit = self.iounit
        inflight: dict[int, tuple[int, int]] = {}  # tag -> (position in data, bytes sent)
        window, pos = 1, 0
        while pos < len(view) or inflight:
            while pos < len(view) and len(inflight) < window:
                n = min(unit, len(view) - pos)
                inflight[self._send(w.Twrite(0, fid, offset + pos, view[pos : pos + n]))] = (pos, n)
                pos += n
            (at, n), reply = self._answer(inflight)
            count = self._settle(reply, w.Rwrite, inflight).count
            if count == n:
                window = self.pipeline
                continue
            self._drain(inflight)  # what those wrote past the short one is written again, in order
            if not 0 < count < n:
                raise StyxClientError(
                    "the server accepted no bytes" if count <= 0 else f"the server says it wrote {count} bytes of {n}"
                )
            window, pos = 1, at + count

    # -- by path -----------------------------------------------------------------

    def read_file(self, path: str) -> tuple[w.Qid, bytearray]:
        """The qid and whole contents of `path` (a directory's are stat records), in the buffer
        they were gathered in as they came."""
        with naming(path):
            fid = self.walk(path)
            try:
                qid = self.open(fid, w.OREAD).qid
                return qid, self.read_fid_all(fid)
            finally:
                self.clunk(fid)

    def cat(self, path: str) -> bytearray:
        return self.read_file(path)[1]

    def put(self, path: str, data: bytes | bytearray | memoryview, perm: int = 0o644) -> None:
        """Write `data` as the whole file at `path`, creating it if needed."""
        with naming(path):
            names = split_path(path)
            if not names:
                raise StyxClientError("cannot write to the root directory")
            fid = self.walk(names[:-1])
            try:
                existing = self.walk(names[-1:], fid)
            except StyxClientError:  # not there (whatever words the server uses for it): create
                try:
                    self.create(fid, names[-1], perm, w.OWRITE)
                except StyxClientError:
                    self.clunk(fid)
                    raise
            else:
                self.clunk(fid)
                fid = existing
                try:
                    self.open(fid, w.OWRITE | w.OTRUNC)
                except StyxClientError:
                    self.clunk(fid)
                    raise
            try:
                self.write_fid_all(fid, data)
            finally:
                self.clunk(fid)

    def command(self, path: str, text: str) -> str:
        """Write one command to a ctl file and read back its answer (one open, as Plan 9 does)."""
        with naming(path):
            fid = self.walk(path)
            try:
                self.open(fid, w.ORDWR)
                self.write(fid, 0, text.encode())
                return self.read_fid_all(fid).decode(errors="replace")
            finally:
                self.clunk(fid)

    def stat(self, path: str) -> w.Stat:
        with naming(path):
            fid = self.walk(path)
            try:
                return self.stat_fid(fid)
            finally:
                self.clunk(fid)

    def ls(self, path: str) -> list[w.Stat]:
        with naming(path):
            fid = self.walk(path)
            try:
                st = self.stat_fid(fid)
                if not st.mode & w.DMDIR:
                    return [st]
                self.open(fid, w.OREAD)
                try:
                    return w.stats_decode(self.read_fid_all(fid))
                except w.DecodeError as e:
                    raise StyxClientError(f"bad directory data: {e}") from None
            finally:
                self.clunk(fid)

    def remove(self, path: str) -> None:
        with naming(path):
            fid = self.walk(path)
            self.rpc(w.Tremove(0, fid), w.Rremove)  # remove clunks the fid, even on error

    def mkdir(self, path: str, perm: int = 0o755) -> None:
        with naming(path):
            names = split_path(path)
            if not names:
                raise StyxClientError("the root already exists")
            fid = self.walk(names[:-1])
            try:
                self.create(fid, names[-1], w.DMDIR | perm, w.OREAD)
            finally:
                self.clunk(fid)
