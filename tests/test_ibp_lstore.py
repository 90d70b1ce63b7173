"""Our depot as an L-Store client sees it: the request lines of L-Store's IBP client (src/ibp/op_cmd.c,
built byte for byte as its snprintf formats do, keys split out of capabilities as its parse_cap
does) sent over TCP, and the replies read as its *_recv functions read them.
"""

# ruff: noqa: UP031 - the request lines are built with the C code's own printf formats, on purpose
from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from helpers import free_port
from test_ibp_flows import Start, depots  # noqa: F401 - the depots fixture

IBPv040, IBP_ALLOCATE, IBP_STORE, IBP_STATUS, IBP_SEND, IBP_LOAD, IBP_MANAGE, IBP_WRITE = 1, 1, 2, 4, 5, 8, 9, 13
IBP_PROBE, IBP_INCR, IBP_DECR, IBP_CHNG, IBP_TRUNCATE = 40, 41, 42, 43, 45
IBP_PUSH, IBP_PULL, IBP_TCP = 20, 21, 1
IBP_ST_INQ, IBP_ST_RES, IBP_ST_VERSION = 1, 3, 5
IBP_READCAP, IBP_WRITECAP, IBP_MANAGECAP = 1, 2, 3
IBP_SOFT, IBP_HARD, IBP_BYTEARRAY = 1, 2, 1
IBP_OK, IBP_E_CAP_NOT_FOUND, IBP_E_WRONG_CAP_FORMAT = 1, -4, -11
TIMEOUT = 10


def parse_cap(cap: str) -> tuple[str, int, str, str]:
    """misc.c parse_cap: ibp://host:port/KEY/TYPEKEY/... -> host, port, key (RID#key), typekey."""
    toks = cap.split("/")  # tbx_stk_string_token on "/" skips the empty token after "ibp:"
    host, port = toks[2].split(":")
    return host, int(port), toks[3], toks[4]


def atoi(tok: str) -> int:
    """C's atoi: the leading integer, 0 if none."""
    return int(atof(tok))


def atof(tok: str) -> float:
    """C's atof: the longest leading number, 0 if none (a reason word after a status reads as 0)."""
    tok = tok.strip()
    for end in range(len(tok), 0, -1):
        try:
            return float(tok[:end])
        except ValueError:
            continue
    return 0.0


class LStore:
    """One connection (tbx_ns_t) speaking as op_cmd.c's command and recv phases do."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.f = self.sock.makefile("rb")

    def close(self) -> None:
        self.f.close()
        self.sock.close()

    def send_command(self, command: str) -> None:
        self.sock.sendall(command.encode("ascii"))

    def readline(self) -> str:
        """gop_readline_with_timeout: up to the newline (buffer of 1024), without it."""
        line = self.f.readline(1025)
        assert line.endswith(b"\n"), f"no line from the depot: {line!r}"
        return line[:-1].decode("ascii")

    # allocate_command / allocate_recv
    def allocate(self, rid: str, reliability: int, type_: int, duration: int, size: int) -> tuple[int, list[str]]:
        self.send_command(
            "%d %d %s %d %d %d %d %d\n" % (IBPv040, IBP_ALLOCATE, rid, reliability, type_, duration, size, TIMEOUT)
        )
        toks = self.readline().split(" ")
        status = atoi(toks[0])
        if status != IBP_OK:
            return status, []
        caps = [t for t in toks[1:] if t][:3]
        assert len(caps) == 3 and all(caps)
        return status, caps

    # append_command / write_send / write_recv: the data goes right behind the command
    def store(self, wcap: str, data: bytes) -> tuple[int, int]:
        _, _, key, typekey = parse_cap(wcap)
        self.send_command("%d %d %s %s %d %d\n" % (IBPv040, IBP_STORE, key, typekey, len(data), TIMEOUT))
        self.sock.sendall(data)
        return self._write_recv()

    # write_command
    def write(self, wcap: str, offset: int, data: bytes) -> tuple[int, int]:
        _, _, key, typekey = parse_cap(wcap)
        self.send_command("%d %d %s %s %d %d %d\n" % (IBPv040, IBP_WRITE, key, typekey, offset, len(data), TIMEOUT))
        self.sock.sendall(data)
        return self._write_recv()

    def _write_recv(self) -> tuple[int, int]:
        status = atoi(self.readline().split(" ")[0])
        if status != IBP_OK:
            return status, -1
        toks = self.readline().split(" ")
        return atoi(toks[0]), int(toks[1])

    # read_command / read_recv
    def load(self, rcap: str, offset: int, size: int) -> tuple[int, bytes]:
        _, _, key, typekey = parse_cap(rcap)
        self.send_command("%d %d %s %s %d %d %d\n" % (IBPv040, IBP_LOAD, key, typekey, offset, size, TIMEOUT))
        toks = self.readline().split(" ")
        status, nbytes = atoi(toks[0]), int(atof(toks[1] if len(toks) > 1 else ""))
        if status != IBP_OK or nbytes != size:
            return status if status != IBP_OK else -1, b""
        return status, self.f.read(size)

    # copyappend_command (path "" for TCP: two spaces) / copy_recv
    def copy(self, srccap: str, destcap: str, offset: int, size: int) -> int:
        _, _, key, typekey = parse_cap(srccap)
        self.send_command(
            "%d %d %s %s %s %s %d %d %d %d %d\n"
            % (IBPv040, IBP_SEND, "", key, destcap, typekey, offset, size, TIMEOUT, TIMEOUT, TIMEOUT)
        )
        toks = self.readline().split(" ")
        status, nbytes = atoi(toks[0]), int(atof(toks[1] if len(toks) > 1 else ""))
        return status if status != IBP_OK or nbytes == size else -1

    # pushpull_command (path "" for TCP: two spaces) / copy_recv
    def pushpull(self, cmd: int, srccap: str, destcap: str, src_offset: int, dest_offset: int, size: int) -> int:
        _, _, key, typekey = parse_cap(srccap)
        self.send_command(
            "%d %d %d %s %s %s %s %d %d %d %d %d %d\n"
            % (
                IBPv040,
                cmd,
                IBP_TCP,
                "",
                key,
                destcap,
                typekey,
                src_offset,
                dest_offset,
                size,
                TIMEOUT,
                TIMEOUT,
                TIMEOUT,
            )
        )
        toks = self.readline().split(" ")
        status, nbytes = atoi(toks[0]), int(atof(toks[1] if len(toks) > 1 else ""))
        return status if status != IBP_OK or nbytes == size else -1

    # truncate_command / status_get_recv
    def truncate(self, mcap: str, size: int) -> int:
        _, _, key, typekey = parse_cap(mcap)
        self.send_command("%d %d %s %s %d %d %d\n" % (IBPv040, IBP_MANAGE, key, typekey, IBP_TRUNCATE, size, TIMEOUT))
        return atoi(self.readline().split(" ")[0])

    # modify_count_command / status_get_recv
    def count(self, mcap: str, mode: int, captype: int) -> int:
        _, _, key, typekey = parse_cap(mcap)
        self.send_command("%d %d %s %s %d %d %d\n" % (IBPv040, IBP_MANAGE, key, typekey, mode, captype, TIMEOUT))
        return atoi(self.readline().split(" ")[0])

    # probe_command / probe_recv
    def probe(self, mcap: str) -> tuple[int, dict[str, int]]:
        _, _, key, typekey = parse_cap(mcap)
        self.send_command(
            "%d %d %s %s %d %d 0 0 0 %d \n" % (IBPv040, IBP_MANAGE, key, typekey, IBP_PROBE, IBP_MANAGECAP, TIMEOUT)
        )
        toks = [t for t in self.readline().split(" ") if t]
        status = atoi(toks[0])
        if status != IBP_OK:
            return status, {}
        names = ["readRefCount", "writeRefCount", "currentSize", "maxSize", "duration", "reliability", "type"]
        p = {n: int(t) for n, t in zip(names, toks[1:8], strict=True)}
        p["duration"] += int(time.time())  # "in sec NOT APR time": an absolute expiry
        return status, p

    # modify_alloc_command: the duration is absolute, sent as what is left of it
    def change(self, mcap: str, size: int, duration: int, reliability: int) -> int:
        _, _, key, typekey = parse_cap(mcap)
        atime = duration - int(time.time())
        if atime < 0:
            atime = duration
        self.send_command(
            "%d %d %s %s %d %d %d %d %d %d\n"
            % (IBPv040, IBP_MANAGE, key, typekey, IBP_CHNG, IBP_MANAGECAP, size, atime, reliability, TIMEOUT)
        )
        return atoi(self.readline().split(" ")[0])

    # depot_inq_command / depot_inq_recv / process_inq
    def inq(self, rid: str, password: str) -> tuple[int, dict[str, str]]:
        self.send_command("%d %d %s %d %s %d\n" % (IBPv040, IBP_STATUS, rid, IBP_ST_INQ, password, TIMEOUT))
        toks = self.readline().split(" ")
        status = atoi(toks[0])
        if status != IBP_OK:
            return status, {}
        nbytes = atoi(toks[1])
        assert 0 < nbytes <= 1024  # depot_inq_recv refuses anything else
        di: dict[str, str] = {}
        for tok in self.readline().split(" "):  # "I ignore the size...."
            key, *values = tok.split(":")  # VS:major:minor, the others TAG:value
            if key == "RE":
                break
            if key:
                di[key] = values[0] if values else ""
        return status, di

    # depot_version_command / depot_version_recv
    def version(self) -> tuple[int, list[str]]:
        self.send_command("%d %d %d %d\n" % (IBPv040, IBP_STATUS, IBP_ST_VERSION, TIMEOUT))
        status = atoi(self.readline().split(" ")[0])
        lines = []
        while status == IBP_OK:
            line = self.readline()
            if line == "END":
                break
            lines.append(line)
        return status, lines

    # query_res_command / query_res_recv
    def resources(self) -> tuple[int, list[str]]:
        self.send_command("%d %d %d %d\n" % (IBPv040, IBP_STATUS, IBP_ST_RES, TIMEOUT))
        toks = [t for t in self.readline().split(" ") if t]
        return atoi(toks[0]), toks[1:]


@pytest.fixture
def lstore(depots: Start) -> Iterator[LStore]:  # noqa: F811
    port = free_port(["127.0.0.1"])
    depots("ls1", "--listen", f"tcp:127.0.0.1:{port}", "--copy-to", f"127.0.0.1:{port}")
    c = LStore(port)
    try:
        yield c
    finally:
        c.close()


def test_allocate_store_write_load(lstore: LStore) -> None:
    status, caps = lstore.allocate("0", IBP_HARD, IBP_BYTEARRAY, 3600, 1000)
    assert status == IBP_OK
    rcap, wcap, mcap = caps
    host, port, key, _ = parse_cap(rcap)
    assert (host, port) == ("127.0.0.1", lstore.sock.getpeername()[1]) and key.startswith("0#")
    assert rcap.endswith("/READ") and wcap.endswith("/WRITE") and mcap.endswith("/MANAGE")
    assert lstore.store(wcap, b"hello world") == (IBP_OK, 11)
    assert lstore.write(wcap, 6, b"depot") == (IBP_OK, 5)
    assert lstore.load(rcap, 0, 11) == (IBP_OK, b"hello depot")
    assert lstore.load(rcap, 6, 5) == (IBP_OK, b"depot")
    forged = rcap.replace("#", "#f", 1)
    assert lstore.load(forged, 0, 1)[0] == IBP_E_CAP_NOT_FOUND
    # A duration of -1 asks for the longest the depot allows.
    status, caps2 = lstore.allocate("0", IBP_SOFT, IBP_BYTEARRAY, -1, 10)
    assert status == IBP_OK and lstore.probe(caps2[2])[1]["duration"] - time.time() > 86000


def test_copy(lstore: LStore) -> None:
    _, (r1, w1, _) = lstore.allocate("0", IBP_SOFT, IBP_BYTEARRAY, 600, 100)
    _, (r2, w2, _) = lstore.allocate("0", IBP_SOFT, IBP_BYTEARRAY, 600, 100)
    assert lstore.store(w1, b"0123456789") == (IBP_OK, 10)
    assert lstore.copy(r1, w2, 2, 5) == IBP_OK
    assert lstore.load(r2, 0, 5) == (IBP_OK, b"23456")


def test_manage_probe_incr_decr_change(lstore: LStore) -> None:
    _, (rcap, wcap, mcap) = lstore.allocate("0", IBP_SOFT, IBP_BYTEARRAY, 600, 100)
    lstore.store(wcap, b"abc")
    status, p = lstore.probe(mcap)
    assert status == IBP_OK
    assert (p["readRefCount"], p["writeRefCount"], p["currentSize"], p["maxSize"]) == (1, 0, 3, 100)
    assert (p["reliability"], p["type"]) == (IBP_SOFT, IBP_BYTEARRAY)
    assert 590 <= p["duration"] - time.time() <= 601
    assert lstore.count(mcap, IBP_INCR, IBP_READCAP) == IBP_OK
    assert lstore.count(mcap, IBP_INCR, IBP_WRITECAP) == IBP_OK
    assert lstore.count(mcap, IBP_DECR, IBP_WRITECAP) == IBP_OK
    assert lstore.probe(mcap)[1]["readRefCount"] == 2 and lstore.probe(mcap)[1]["writeRefCount"] == 0
    # ibp_modify_alloc: an absolute expiry an hour away, a new size, HARD.
    assert lstore.change(mcap, 200, int(time.time()) + 3600, IBP_HARD) == IBP_OK
    p = lstore.probe(mcap)[1]
    assert (p["maxSize"], p["reliability"]) == (200, IBP_HARD) and 3590 <= p["duration"] - time.time() <= 3601
    assert lstore.change(mcap, 200, -1, -1) == IBP_OK  # -1: keep the duration and reliability
    assert lstore.probe(mcap)[1]["reliability"] == IBP_HARD
    assert lstore.count(rcap, IBP_DECR, IBP_READCAP) < 0  # a read cap cannot manage
    assert lstore.count(mcap, IBP_DECR, IBP_READCAP) == IBP_OK
    assert lstore.count(mcap, IBP_DECR, IBP_READCAP) == IBP_OK  # the last reader: freed
    assert lstore.probe(mcap)[0] == IBP_E_CAP_NOT_FOUND


def test_status_inq_version_and_resources(lstore: LStore) -> None:
    lstore.allocate("0", IBP_HARD, IBP_BYTEARRAY, 600, 4096)
    status, di = lstore.inq("0", "IBPch@ngem3")  # L-Store's default password (ibp_server.h)
    assert status == IBP_OK
    assert di["VS"] == "1.4" and di["RID"] == "0" and di["DT"] == "1" and di["RT"] == "1"
    assert int(di["CT"]) == 1 << 30 and int(di["UT"]) == 4096 and int(di["UH"]) == 4096
    assert int(di["AT"]) == (1 << 30) - 4096 and int(di["DR"]) == 86400
    status, lines = lstore.version()
    assert status == IBP_OK and lines[0].startswith("ouroboros-py IBP depot")
    assert any(ln.startswith("client_connections ") for ln in lines)
    assert lstore.resources() == (IBP_OK, ["0"])
    assert lstore.inq("9", "IBPch@ngem3")[0] == -50  # no such resource


def test_bare_keys_still_work(lstore: LStore) -> None:
    """Keys without their RID (as our older clients sent them) are accepted as well."""
    _, (rcap, wcap, _) = lstore.allocate("0", IBP_SOFT, IBP_BYTEARRAY, 600, 10)
    bare = rcap.replace("/0#", "/", 1)
    lstore.store(wcap, b"x")
    key, typekey = parse_cap(bare)[2:]
    lstore.send_command(f"1 8 {key} {typekey} 0 1 10\n")
    assert lstore.readline().split()[:2] == ["1", "1"] and lstore.f.read(1) == b"x"
