"""What L-Store's depot answers, ours answers: the byte-exact requests of L-Store's client (src/ibp/
op_cmd.c), with the replies its depot (src/ibp-server/parse_commands.c, handle_commands.c) gives;
and the requests our own client sends, as an L-Store depot takes them.
"""

# ruff: noqa: UP031 - the request lines are built with the C code's own printf formats, on purpose
from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import free_port, serve_tcp
from test_ibp_flows import Start, depots  # noqa: F401 - the depots fixture
from test_ibp_lstore import (
    IBP_CHNG,
    IBP_DECR,
    IBP_HARD,
    IBP_INCR,
    IBP_MANAGE,
    IBP_OK,
    IBP_PULL,
    IBP_PUSH,
    IBP_READCAP,
    IBP_SOFT,
    IBP_WRITECAP,
    IBPv040,
    LStore,
    atoi,
    lstore,  # noqa: F401 - the fixture: a depot spoken to as L-Store's client library does
    parse_cap,
)

from apps.ibp import cli, lors
from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import Connection
from apps.ibp.client import parse_cap as ibp_cap
from apps.ibp.exnode import ExNode, Mapping, from_xml, to_xml

IBP_BYTEARRAY = 1
PASSWORD = "IBPch@ngem3"  # ibp_server.h DEFAULT_PASSWORD


def ask(c: LStore, line: str) -> int:
    """One request line; the status its reply starts with (atoi, as op_cmd.c's *_recv)."""
    c.send_command(line)
    return atoi(c.readline().split(" ")[0])


def keys(cap: str) -> str:
    """`KEY TYPEKEY` of a capability, as op_cmd.c puts them on a line."""
    return "%s %s" % parse_cap(cap)[2:]


def new(c: LStore, size: int = 100, data: bytes = b"") -> tuple[str, str, str]:
    status, caps = c.allocate("0", IBP_SOFT, IBP_BYTEARRAY, 3600, size)
    assert status == IBP_OK
    if data:
        assert c.store(caps[1], data) == (IBP_OK, len(data))
    return caps[0], caps[1], caps[2]


# 1. CHNG with size -1, as lio_warm sends it (ibp_modify_alloc_gop(mcap, -1, dt, -1)).


def test_chng_with_size_minus_one_keeps_the_size_and_applies_the_duration(lstore: LStore) -> None:  # noqa: F811
    _, _, mcap = new(lstore, 100, b"0123456789")
    line = "%d %d %s %d 3 -1 86400 -1 10\n" % (IBPv040, IBP_MANAGE, keys(mcap), IBP_CHNG)
    assert ask(lstore, line) == IBP_OK
    p = lstore.probe(mcap)[1]
    assert (p["maxSize"], p["currentSize"]) == (100, 10) and p["duration"] - time.time() > 86000
    assert lstore.change(mcap, -1, 3600, -1) == IBP_OK  # modify_alloc_command's own line
    # parse_commands.c read_manage: a size of 0 is -20, nothing changed.
    assert ask(lstore, "1 9 %s 43 3 0 -1 -1 10\n" % keys(mcap)) == w.IBP_E_WOULD_DAMAGE_DATA
    assert lstore.probe(mcap)[1]["maxSize"] == 100


# 2. Our client's "keep the size" is -1, which an L-Store depot takes (it refuses 0 with -20).


class LineDepot:
    """A depot on 127.0.0.1 that records each request line and sends what `answer` makes of it."""

    def __init__(self, answer: Callable[[bytes], bytes]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.lines: list[bytes] = []
        serve_tcp(self.sock, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as f:
            for line in f:
                self.lines.append(line)
                conn.sendall(self.answer(line))

    def close(self) -> None:
        self.sock.close()


def lstore_answer(line: bytes) -> bytes:
    """As L-Store's depot: CHNG with size 0 is -20, other requests succeed."""
    toks = line.split()
    if toks[1:2] == [b"9"] and toks[4:5] == [b"40"]:
        return b"1 1 0 10 100 3600 2 1 \n"
    if toks[1:2] == [b"9"] and toks[4:5] == [b"43"] and toks[6:7] == [b"0"]:
        return b"-20 \n"
    return b"1 \n"


def test_our_refresh_and_extend_keep_the_size_with_minus_one() -> None:
    rec = LineDepot(lstore_answer)
    try:
        mcap = f"ibp://127.0.0.1:{rec.port}/0#{'k' * 32}/{'m' * 8}/MANAGE"
        rcap = mcap.replace("MANAGE", "READ")
        ex = ExNode("f", 10, mappings=[Mapping(0, 10, 0, 100, rcap, manage=mcap)])
        _, failed = lors.refresh(ex, lors.SET, 3600, lors.Settings(timeout=5))
        assert failed == []
        cli.run(cli.parser().parse_args(["manage", mcap, "extend", "--duration", "1h", "--timeout", "5"]))
        chng = [ln for ln in rec.lines if ln.split()[4:5] == [b"43"]]
        assert [ln.split()[5:9] for ln in chng] == [[b"3", b"-1", b"3600", b"-1"]] * 2
    finally:
        rec.close()


# 3. WRITE past the end: handle_write checks only offset + length <= max_size; the gap reads as zeros.


def test_a_write_past_the_end_leaves_zeros_within_the_maximum_size(lstore: LStore) -> None:  # noqa: F811
    rcap, wcap, _ = new(lstore, 100, b"abc")
    assert lstore.write(wcap, 20, b"HOLE") == (IBP_OK, 4)
    assert lstore.load(rcap, 0, 24) == (IBP_OK, b"abc" + bytes(17) + b"HOLE")
    other = LStore(lstore.sock.getpeername()[1])  # a refused WRITE closes its connection
    try:
        assert other.write(wcap, 98, b"xyz") == (w.IBP_E_WOULD_EXCEED_LIMIT, -1)
    finally:
        other.close()


# 4. PUSH and PULL (pushpull_command; read_read and handle_copy/handle_transfer).


def test_push_and_pull_copy_between_depots_as_lstore_does(lstore: LStore) -> None:  # noqa: F811
    src_r, _, _ = new(lstore, 100, b"0123456789")
    dst_r, dst_w, _ = new(lstore, 100)
    assert lstore.pushpull(IBP_PUSH, src_r, dst_w, 0, -1, 5) == IBP_OK  # -1: append (a STORE)
    assert lstore.pushpull(IBP_PUSH, src_r, dst_w, 5, 8, 5) == IBP_OK  # at 8 (a WRITE): a hole at 5..8
    assert lstore.load(dst_r, 0, 13) == (IBP_OK, b"01234" + bytes(3) + b"56789")
    # PULL: the local capability is a write capability, the remote one is read from remote_offset.
    pull_r, pull_w, _ = new(lstore, 100, b"ab")
    assert lstore.pushpull(IBP_PULL, pull_w, src_r, -1, 2, 3) == IBP_OK  # -1: append
    assert lstore.pushpull(IBP_PULL, pull_w, src_r, 10, 0, 2) == IBP_OK  # at 10: a hole at 5..10
    assert lstore.load(pull_r, 0, 12) == (IBP_OK, b"ab234" + bytes(5) + b"01")
    # handle_copy: past the local data (PUSH) or the local maximum (PULL) is -19; a PULL needs the
    # write key (a read one is no such capability, -4); Phoebus is not served (-22).
    assert lstore.pushpull(IBP_PUSH, src_r, dst_w, 8, -1, 5) == w.IBP_E_WOULD_EXCEED_LIMIT
    assert lstore.pushpull(IBP_PULL, pull_w, src_r, 98, 0, 5) == w.IBP_E_WOULD_EXCEED_LIMIT
    assert lstore.pushpull(IBP_PULL, src_r, src_r, -1, 0, 5) == w.IBP_E_CAP_NOT_FOUND
    line = "1 20 2 auto %s %s %s 0 -1 5 10 10 10\n" % (parse_cap(src_r)[2], dst_w, parse_cap(src_r)[3])
    assert ask(lstore, line) == w.IBP_E_TYPE_NOT_SUPPORTED
    # The copy-target policy of SEND holds for both: a target --copy-to does not allow is -61.
    elsewhere = dst_w.replace(f":{lstore.sock.getpeername()[1]}/", ":1/")
    assert lstore.pushpull(IBP_PUSH, src_r, elsewhere, 0, -1, 5) == w.IBP_E_INVALID_HOST
    assert lstore.pushpull(IBP_PULL, pull_w, elsewhere.replace("/WRITE", "/READ"), -1, 0, 5) == w.IBP_E_INVALID_HOST


# 5. TRUNCATE (truncate_command; handle_manage IBP_TRUNCATE): a new maximum size, the data cut to it.


def test_truncate_sets_the_maximum_and_cuts_the_data(lstore: LStore) -> None:  # noqa: F811
    rcap, wcap, mcap = new(lstore, 100, b"0123456789")
    assert lstore.truncate(mcap, 5) == IBP_OK
    p = lstore.probe(mcap)[1]
    assert (p["currentSize"], p["maxSize"]) == (5, 5)
    assert lstore.load(rcap, 0, 5) == (IBP_OK, b"01234")
    assert lstore.load(rcap, 0, 6)[0] == w.IBP_E_WOULD_EXCEED_LIMIT
    assert lstore.truncate(mcap, 50) == IBP_OK  # growing: the size stays, the room is back
    assert lstore.write(wcap, 20, b"x") == (IBP_OK, 1)
    assert lstore.load(rcap, 0, 21) == (IBP_OK, b"01234" + bytes(15) + b"x")  # what was cut stays gone
    assert lstore.probe(mcap)[1]["maxSize"] == 50


# 6. Reference counts: read 1, write 0 at first (resource.c); freed once both are 0 (handle_manage);
#    a write never looks at the write count.


def test_reference_counts_are_lstores(lstore: LStore) -> None:  # noqa: F811
    rcap, wcap, mcap = new(lstore, 100)
    p = lstore.probe(mcap)[1]
    assert (p["readRefCount"], p["writeRefCount"]) == (1, 0)
    assert lstore.count(mcap, IBP_DECR, IBP_WRITECAP) == IBP_OK  # stays 0
    assert lstore.store(wcap, b"abc") == (IBP_OK, 3)  # the write count does not matter
    assert lstore.count(mcap, IBP_INCR, IBP_WRITECAP) == IBP_OK
    assert lstore.count(mcap, IBP_DECR, IBP_READCAP) == IBP_OK
    p = lstore.probe(mcap)[1]
    assert (p["readRefCount"], p["writeRefCount"]) == (0, 1)  # not freed: a writer holds it
    assert lstore.load(rcap, 0, 3) == (IBP_OK, b"abc")
    assert lstore.count(mcap, IBP_DECR, IBP_WRITECAP) == IBP_OK  # both 0: freed
    assert lstore.probe(mcap)[0] == w.IBP_E_CAP_NOT_FOUND


# 7. ST_INQ's password: the depot's (L-Store's default unless --password), -29 otherwise.


def test_status_inq_wants_the_depots_password(depots: Start) -> None:  # noqa: F811
    port = free_port(["127.0.0.1"])
    depots("fid2", "--listen", f"tcp:127.0.0.1:{port}")
    c = LStore(port)
    try:
        assert c.inq("0", PASSWORD)[0] == IBP_OK
        assert c.inq("0", "ibp")[0] == w.IBP_E_WRONG_PASSWD
        assert c.inq("9", "ibp")[0] == w.IBP_E_WRONG_PASSWD  # the password first, as handle_status
    finally:
        c.close()
    with Connection(f"127.0.0.1:{port}", timeout=10) as conn:
        assert int(conn.status()["capacity"]) > 0  # our client sends L-Store's default
    port2 = free_port(["127.0.0.1"])
    depots("fid3", "--listen", f"tcp:127.0.0.1:{port2}", "--password", "s3cret")
    with Connection(f"127.0.0.1:{port2}", timeout=10) as conn:
        with pytest.raises(w.IbpError) as e:
            conn.status()
        assert e.value.status == w.IBP_E_WRONG_PASSWD
        assert int(conn.status(password="s3cret")["capacity"]) > 0


# 8. LOAD and SEND of length 0: -36 (read_read); our client finds the real length and sends it.


def test_a_length_of_zero_is_refused_and_our_client_sends_the_real_one(lstore: LStore) -> None:  # noqa: F811
    rcap, _, _ = new(lstore, 100, b"0123456789")
    dst_r, dst_w, _ = new(lstore, 100)
    r_keys = parse_cap(rcap)[2:]
    assert ask(lstore, "1 8 %s %s 0 0 10\n" % r_keys) == w.IBP_E_INV_PAR_SIZE
    assert ask(lstore, "1 5  %s %s %s 0 0 10 10 10\n" % (r_keys[0], dst_w, r_keys[1])) == w.IBP_E_INV_PAR_SIZE
    with Connection(f"127.0.0.1:{lstore.sock.getpeername()[1]}", timeout=10) as conn:
        r = ibp_cap(rcap)
        assert conn.readable(r) == 10 and conn.readable(r, 10) == 0
        assert conn.load_bytes(r, 3) == b"3456789"  # `ibp load` without --length
        assert conn.copy(r, ibp_cap(dst_w)) == 10  # `ibp copy` without --length
        asked: list[tuple[int, int]] = []
        real = conn.load_bytes

        def counted(cap: Capability, offset: int = 0, length: int = 0) -> bytearray:
            asked.append((offset, length))
            return real(cap, offset, length)

        conn.load_bytes = counted  # type: ignore[method-assign]
        assert [conn.readable(r, hint=h) for h in (10, 4, 40)] == [10, 10, 10]
        assert len(asked) <= 2 + 2 * 4 + 8  # a right hint costs two one-byte loads
        asked.clear()
        assert conn.readable(r, hint=10) == 10 and len(asked) == 2
        buf = bytearray(10)
        assert conn.load_into(r, buf) == 10 and buf == b"0123456789"  # its buffer is the hint
    assert lstore.load(dst_r, 0, 10) == (IBP_OK, b"0123456789")


# 9. Error codes, each as L-Store's depot answers.


def test_error_codes_are_lstores(lstore: LStore) -> None:  # noqa: F811
    rcap, _, mcap = new(lstore, 100, b"0123456789")
    r_keys = parse_cap(rcap)[2:]
    _, dst_w, _ = new(lstore, 100)
    # handle_read: a range past the data is -19, the offset past it too.
    assert ask(lstore, "1 8 %s %s 20 1 10\n" % r_keys) == w.IBP_E_WOULD_EXCEED_LIMIT
    # handle_manage: a duration past the maximum is -45, and the expiry is still changed (to our maximum).
    assert lstore.change(mcap, 200, int(time.time()) + 200_000, IBP_HARD) == w.IBP_E_WOULD_EXCEED_POLICY
    p = lstore.probe(mcap)[1]
    assert (p["maxSize"], p["reliability"]) == (200, IBP_HARD) and 86300 < p["duration"] - time.time() <= 86401
    # read_manage, read_status: an unknown sub-command is -21.
    assert ask(lstore, "1 9 %s 44 3 10\n" % keys(mcap)) == w.IBP_E_BAD_FORMAT
    assert ask(lstore, "1 4 0 9 %s 10\n" % PASSWORD) == w.IBP_E_BAD_FORMAT
    # handle_manage finds the allocation by its manage key: a read key is no such capability.
    assert ask(lstore, "1 9 %s 40 3 0 0 0 10 \n" % keys(rcap)) == w.IBP_E_CAP_NOT_FOUND
    # read_read: a SEND's destination timeouts must not be 0.
    assert ask(lstore, "1 5  %s %s %s 0 1 10 0 10\n" % (r_keys[0], dst_w, r_keys[1])) == w.IBP_E_INVALID_PARAMETER
    assert lstore.load(rcap, 0, 10) == (IBP_OK, b"0123456789")


def busy_depot(busy: int, wait: str = "0.1") -> LineDepot:
    """A depot that turns the first `busy` requests away for now (`-66 WAIT reason`, as L-Store's
    depot answers a client over its limits), then allocates."""

    def answer(line: bytes) -> bytes:
        if len(depot.lines) <= busy:
            return f"-66 {wait} copies of this client in progress already\n".encode()
        cap = f"ibp://127.0.0.1:{depot.port}/0#{'k' * 32}/{'m' * 8}"
        return f"1 {cap}/READ {cap}/WRITE {cap}/MANAGE\n".encode()

    depot = LineDepot(answer)
    return depot


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait", ["0.1", "nan", "-5", "x"])
def test_a_busy_depot_is_asked_again_after_the_wait_it_gives(wait: str) -> None:
    """-66 says when to come back (L-Store's clients parse it): our client waits that long, within
    bounds whatever the depot says, and asks again while its timeout allows."""
    depot = busy_depot(3, wait)
    try:
        with Connection(f"127.0.0.1:{depot.port}", timeout=10) as c:
            r, _, _ = c.allocate(10, 60)
        assert r.depot == f"127.0.0.1:{depot.port}" and len(depot.lines) == 4
    finally:
        depot.close()


@pytest.mark.timeout(30)
def test_a_depot_busy_past_the_timeout_is_an_error_that_says_so() -> None:
    depot = busy_depot(1000, "0.2")
    try:
        start = time.monotonic()
        with Connection(f"127.0.0.1:{depot.port}", timeout=1) as c, pytest.raises(w.IbpError, match="is busy"):
            c.allocate(10, 60)
        assert time.monotonic() - start < 3 and 2 <= len(depot.lines) <= 6
    finally:
        depot.close()


# 10. L-Store's keys are base64 with '-' for '/' (db_resource.c create_alloc_db): '+' is one of their
#     characters, so about two capabilities in five an L-Store depot hands out have one.

LSTORE_KEY = "q+Zr3-Xy9aBcDeFgHiJkLmNoPqRsT0+w"  # 32 characters, as CAP_SIZE


def test_lstore_capabilities_with_a_plus_in_their_keys_are_used_as_they_are() -> None:
    def answer(line: bytes) -> bytes:
        return b"1 3 \nabc" if line.split()[1:2] == [b"8"] else b"-25 \n"

    depot = LineDepot(answer)
    try:
        rcap = f"ibp://127.0.0.1:{depot.port}/0#{LSTORE_KEY}/3862277/READ"  # handle_allocate's form
        ex = ExNode("f", 3, mappings=[Mapping(0, 3, 0, 3, rcap)])
        assert from_xml(to_xml(ex)).mappings[0].read == rcap
        with Connection(f"127.0.0.1:{depot.port}", timeout=10) as c:
            assert c.load_bytes(ibp_cap(rcap), 0, 3) == b"abc"
        assert depot.lines == [f"1 8 0#{LSTORE_KEY} 3862277 0 3 10\n".encode()]
    finally:
        depot.close()


def test_a_key_of_lstores_form_unknown_here_is_cap_not_found(lstore: LStore) -> None:  # noqa: F811
    # handle_read: any key it does not hold is -4, whatever characters it is made of.
    assert ask(lstore, "1 8 0#%s 3862277 0 1 10\n" % LSTORE_KEY) == w.IBP_E_CAP_NOT_FOUND
    rcap, _, _ = new(lstore, 100, b"still here")
    assert lstore.load(rcap, 0, 10) == (IBP_OK, b"still here")


# 11. A command number L-Store's depot has no handler for is -43 (server_lib.c read_command: out of
#     its table, or a slot no add_command filled); one it has and we do not serve stays -25. Its
#     private commands 90-99 (install_commands.c, INTERNAL_* of ibp_server.h) have handlers, open to
#     anyone by its default ACL; 100 (INTERNAL_SEND) has none.


@pytest.mark.parametrize("cmd", [-5, 0, 3, 7, 10, 12, 37, 89, 100, 101, 2**40])
def test_a_command_lstore_does_not_know_is_an_unknown_function(lstore: LStore, cmd: int) -> None:  # noqa: F811
    assert ask(lstore, "1 %d 0 1 2 3 10\n" % cmd) == w.IBP_E_UNKNOWN_FUNCTION
    assert ask(lstore, "1 16 0#k t 10\n") == w.IBP_E_INVALID_CMD  # IBP_RENAME: L-Store's, not served
    rcap, _, _ = new(lstore, 100, b"served")
    assert lstore.load(rcap, 0, 6) == (IBP_OK, b"served")


def test_lstores_admin_tools_and_depot_statistics_are_its_commands_not_served(lstore: LStore) -> None:  # noqa: F811
    """The lines of L-Store's depot tools (src/ibp-server/bin: get_config, get_corrupt, ibp_rescan,
    ibp_rid_mode, date_spacefree, expire_list, ibp_undelete) and its ST_STATS sub-command (read_status):
    commands its depot serves, so -25 here as its other commands we do not serve, not -43 or -21."""
    for line in (
        "1 94 10\n",  # get_config
        "1 93 0 10\n",  # get_corrupt
        "1 95 0 10\n",  # ibp_rescan
        "1 90 0 1 10\n",  # ibp_rid_mode
        "1 98 0 1048576 10\n",  # date_spacefree
        "1 97 0 1 0 10 10\n",  # expire_list
        "1 96 0 0 1 3600 10\n",  # ibp_undelete
        "1 4 0 4 1000 10\n",  # ST_STATS with a RID and a start time
        "1 4 4 10\n",  # ST_STATS as read_status reads four fields
        "0 4 4 1000 10\n",  # IBPv031's
    ):
        assert ask(lstore, line) == w.IBP_E_INVALID_CMD, line
    rcap, _, _ = new(lstore, 100, b"served")  # the connection goes on
    assert lstore.load(rcap, 0, 6) == (IBP_OK, b"served")


def test_the_data_behind_lstores_vectored_and_checksummed_writes_is_never_read_as_a_request(
    lstore: LStore,  # noqa: F811
) -> None:
    """L-Store's client coalesces writes to one capability into an IBP_VEC_WRITE (config.c
    ibp_rw_coalesce, op_cmd.c vec_write_command) and checksums them on request (IBP_WRITE_CHKSUM,
    IBP_STORE_CHKSUM, IBP_VEC_WRITE_CHKSUM), each with its data right behind the line (write_send).
    We serve none of them (-25), and the connection ends there: the data is no request (here a block
    that reads as ST_VERSION, which the depot answered)."""
    _, wcap, _ = new(lstore, 100)
    data = "%d %d %d %d\n" % (IBPv040, 4, 5, 10)
    n = len(data)
    k = keys(wcap)
    for line in (
        "%d %d %s %d %d %d %d %d %d\n" % (IBPv040, 33, k, 2, 0, n - 4, n - 4, 4, 10),  # IBP_VEC_WRITE
        "%d %d %d %d %s %d %d %d\n" % (IBPv040, 27, 1, 65536, k, 0, n, 10),  # IBP_WRITE_CHKSUM
        "%d %d %d %d %s %d %d\n" % (IBPv040, 28, 1, 65536, k, n, 10),  # IBP_STORE_CHKSUM (append_command)
        "%d %d %d %d %s %d %d %d %d\n" % (IBPv040, 34, 1, 65536, k, 1, 0, n, 10),  # IBP_VEC_WRITE_CHKSUM
    ):
        c = LStore(lstore.sock.getpeername()[1])
        try:
            c.send_command(line + data)
            assert atoi(c.readline().split(" ")[0]) == w.IBP_E_INVALID_CMD, line
            assert c.f.read(1) == b"", line  # closed: the data is not answered as ST_VERSION
        finally:
            c.close()
    assert lstore.store(wcap, data.encode()) == (IBP_OK, n)


# 12. read_write: a WRITE's negative offset is -18 (IBP_E_FILE_SEEK_ERROR), before anything is looked up.


def test_a_write_at_a_negative_offset_is_a_seek_error(lstore: LStore) -> None:  # noqa: F811
    rcap, wcap, _ = new(lstore, 100, b"kept")
    assert ask(lstore, "1 13 %s -1 4 10\n" % keys(wcap)) == w.IBP_E_FILE_SEEK_ERROR
    other = LStore(lstore.sock.getpeername()[1])  # a refused WRITE closes its connection
    try:
        assert other.write(wcap, 4, b"more") == (IBP_OK, 4)
        assert other.load(rcap, 0, 8) == (IBP_OK, b"keptmore")
    finally:
        other.close()


def test_the_data_behind_a_refused_write_line_is_never_read_as_a_request(lstore: LStore) -> None:  # noqa: F811
    """L-Store's clients send a STORE's or WRITE's data right behind its line: a line refused as it
    is parsed ends the connection too, as a refusal after the look-up does, so none of those bytes
    is taken for a request (here a data block that reads as ST_VERSION)."""
    _, wcap, _ = new(lstore, 100)
    data = "%d %d %d %d\n" % (IBPv040, 4, 5, 10)
    for line in ("1 13 %s -1 %d 10\n", "1 2 %s 0 10\n", "1 13 %s 0 %d 10 extra\n"):
        c = LStore(lstore.sock.getpeername()[1])
        try:
            c.send_command((line % (keys(wcap), len(data)) if "%d" in line else line % keys(wcap)) + data)
            assert atoi(c.readline().split(" ")[0]) < 0
            assert c.f.read(1) == b""  # closed: nothing more is answered
        finally:
            c.close()
    assert lstore.store(wcap, data.encode()) == (IBP_OK, len(data))


# 13. probe_command's line has three unused fields before the timeout, and read_manage skips three
#     fields after a PROBE's captype whatever they are: without them, our timeout would be skipped.


def test_our_probe_is_sent_as_lstores_probe_command() -> None:
    rec = LineDepot(lstore_answer)
    try:
        mcap = f"ibp://127.0.0.1:{rec.port}/0#{'k' * 32}/{'m' * 8}/MANAGE"
        with Connection(f"127.0.0.1:{rec.port}", timeout=10) as c:
            assert c.probe(ibp_cap(mcap))["max_size"] == 100
        assert rec.lines == [b"1 9 0#%s %s 40 3 0 0 0 10\n" % (b"k" * 32, b"m" * 8)]
    finally:
        rec.close()


# 14. IBPv031 (version 0), as older clients send it (the LoCI IBP 1.x client library, LoRS of that
#     era, the LoCI depot's own copies): every command as in version 1 but ALLOCATE and STATUS, which
#     name no resource (parse_commands.c read_allocate and read_status, `cmd->version > IBPv031`).


def test_version_0_requests_are_served_as_version_1_ones_but_allocate_names_no_resource(
    lstore: LStore,  # noqa: F811
) -> None:
    lstore.send_command("0 1 %d %d 3600 100 10\n" % (IBP_SOFT, IBP_BYTEARRAY))  # no RID
    status, rcap, wcap, mcap = lstore.readline().split(" ")[:4]
    assert atoi(status) == IBP_OK
    lstore.send_command("0 2 %s 5 10\n" % keys(wcap) + "hello")  # the LoCI client's STORE
    assert atoi(lstore.readline().split(" ")[0]) == IBP_OK
    assert [atoi(t) for t in lstore.readline().split(" ")[:2]] == [IBP_OK, 5]
    lstore.send_command("0 8 %s 1 4 10\n" % keys(rcap))
    assert [atoi(t) for t in lstore.readline().split(" ")[:2]] == [IBP_OK, 4]
    assert lstore.f.read(4) == b"ello"
    assert ask(lstore, "0 9 %s 41 1 10\n" % keys(mcap)) == IBP_OK  # INCR
    lstore.send_command("0 9 %s 40 3 0 0 0 10\n" % keys(mcap))  # PROBE, as the LoCI client sends it
    assert [atoi(t) for t in lstore.readline().split(" ")[:5]] == [IBP_OK, 2, 0, 5, 100]
    assert ask(lstore, "0 1 0 %d %d 3600 100 10\n" % (IBP_SOFT, IBP_BYTEARRAY)) == w.IBP_E_BAD_FORMAT  # a RID


def test_version_0_status_inq_is_the_sizes_in_mib_without_a_status_line(depots: Start) -> None:  # noqa: F811
    port = free_port(["127.0.0.1"])
    depots("v0", "--listen", f"tcp:127.0.0.1:{port}", "--capacity", "64M", "--max-duration", "2h")
    c = LStore(port)
    try:
        assert c.allocate("0", IBP_HARD, IBP_BYTEARRAY, 60, 3 << 20)[0] == IBP_OK
        assert c.allocate("0", IBP_SOFT, IBP_BYTEARRAY, 60, 2 << 20)[0] == IBP_OK
        # handle_status for IBPv031: hard, hard used, soft, soft used (MiB), the maximum duration.
        c.send_command("0 4 1 %s 10\n" % PASSWORD)
        assert c.readline().split() == ["64", "3", "64", "2", "7200"]
        assert ask(c, "0 4 1 ibp 10\n") == w.IBP_E_WRONG_PASSWD
        c.send_command("0 4 3 10\n")  # ST_RES and ST_VERSION: as in version 1
        assert c.readline().split() == ["1", "0"]
        c.send_command("0 4 5 10\n")
        assert atoi(c.readline().split(" ")[0]) == IBP_OK
        while c.readline() != "END":
            pass
        assert ask(c, "2 4 5 10\n") == w.IBP_E_PROT_VERS  # neither 0 nor 1: as the LoCI depot
    finally:
        c.close()


def test_version_0_st_change_is_refused_and_its_limits_never_read(depots: Start, tmp_path: Path) -> None:  # noqa: F811
    """read_status refuses ST_CHANGE (-25) and closes the connection, so the limits line a client
    sends behind it is not taken for a request; the depot's limits stay as they were."""
    port = free_port(["127.0.0.1"])
    depots("v0c", "--listen", f"tcp:127.0.0.1:{port}", "--capacity", "64M")
    key = (tmp_path / "v0c" / "admin.key").read_text().strip()
    c = LStore(port)
    try:
        c.send_command("0 4 2 %s 10\n1 4 5 10\n" % key)  # its "limits" read as a request: ST_VERSION
        assert atoi(c.readline().split(" ")[0]) == w.IBP_E_INVALID_CMD
        assert c.f.read(1) == b""
    finally:
        c.close()
    with Connection(f"127.0.0.1:{port}", timeout=10) as conn:
        assert conn.status()["capacity"] == str(64 << 20)


# 15. Phoebus (PHOEBUS_SEND 17, PUSH/PULL of connection type 2) on a depot built without it:
#     read_read takes the line as a copy's, and handle_copy answers -22 only after the RID, the
#     capability and the range are checked (a client learns the allocation is gone before anything).


def test_phoebus_copies_are_refused_after_the_capability_and_range_checks(lstore: LStore) -> None:  # noqa: F811
    rcap, wcap, _ = new(lstore, 100, b"0123456789")
    _, dst_w, _ = new(lstore, 100)
    (rkey, rtype), (wkey, wtype) = parse_cap(rcap)[2:], parse_cap(wcap)[2:]
    send = "1 17 auto %s %s %s %d %d 10 10 10\n"
    assert ask(lstore, send % ("0#nosuchkey", dst_w, rtype, 0, 5)) == w.IBP_E_CAP_NOT_FOUND
    assert ask(lstore, send % (rkey, dst_w, rtype, 8, 5)) == w.IBP_E_WOULD_EXCEED_LIMIT  # past the data
    assert ask(lstore, send % (rkey, dst_w, rtype, 0, 5)) == w.IBP_E_TYPE_NOT_SUPPORTED
    push = "1 %d 2 gw1/5006,gw2/5006 %s %s %s %d -1 5 10 10 10\n"
    assert ask(lstore, push % (IBP_PUSH, "0#nosuchkey", dst_w, rtype, 0)) == w.IBP_E_CAP_NOT_FOUND
    assert ask(lstore, push % (IBP_PUSH, rkey, dst_w, rtype, 0)) == w.IBP_E_TYPE_NOT_SUPPORTED
    assert ask(lstore, push % (IBP_PULL, rkey, rcap, rtype, -1)) == w.IBP_E_CAP_NOT_FOUND  # PULL writes: a read key
    assert ask(lstore, push % (IBP_PULL, wkey, rcap, wtype, 98)) == w.IBP_E_WOULD_EXCEED_LIMIT
    assert ask(lstore, push % (IBP_PULL, wkey, rcap, wtype, -1)) == w.IBP_E_TYPE_NOT_SUPPORTED
    assert ask(lstore, "1 20 3 %s %s %s 0 -1 5 10 10 10\n" % (rkey, dst_w, rtype)) == w.IBP_E_TYPE_NOT_SUPPORTED
    assert lstore.load(rcap, 0, 10) == (IBP_OK, b"0123456789")  # nothing copied, the connection goes on


# 16. read_allocate reads the size unsigned (%llu into a uint64_t): a negative one is more than any
#     depot holds, -19, after the reliability, type and duration are checked (-21, -30, -30).


def test_a_negative_size_is_more_than_any_depot_holds(lstore: LStore) -> None:  # noqa: F811
    line = "1 1 0 %d 1 %d %d 10\n"
    assert ask(lstore, line % (IBP_SOFT, 3600, -5)) == w.IBP_E_WOULD_EXCEED_LIMIT
    assert ask(lstore, line % (7, 3600, -5)) == w.IBP_E_BAD_FORMAT  # the reliability first
    assert ask(lstore, line % (IBP_SOFT, 0, -5)) == w.IBP_E_INVALID_PARAMETER  # then the duration
    assert ask(lstore, line % (IBP_SOFT, 3600, 0)) == w.IBP_E_INVALID_PARAMETER  # a size of 0
    _, _, mcap = new(lstore, 100, b"kept")
    assert ask(lstore, "1 9 %s 45 -5 10\n" % keys(mcap)) == w.IBP_E_WOULD_EXCEED_LIMIT  # TRUNCATE, as a huge size
    p = lstore.probe(mcap)[1]
    assert (p["currentSize"], p["maxSize"]) == (4, 100)


# 17. read_allocate, read_write, read_read and read_manage read sizes and lengths with %llu and
#     offsets signed 64-bit, through glibc's scanf: a number too large saturates, a negative size or
#     length is read modulo 2**64. Either way it is more than any allocation holds: -19 (after the
#     capability), never a malformed request, 2**63 and up answered as 2**63 - 1 is. No number at all
#     reads as 0: -30 for a size or duration, -36 for a length.

HUGE = ["9223372036854775807", "9223372036854775808", "18446744073709551615", "18446744073709551616", "9" * 40]


@pytest.mark.parametrize("n", HUGE)
def test_a_size_offset_or_length_past_64_bits_is_past_any_allocation(lstore: LStore, n: str) -> None:  # noqa: F811
    rcap, wcap, mcap = new(lstore, 100, b"0123456789")
    r_keys, w_keys = parse_cap(rcap)[2:], parse_cap(wcap)[2:]
    past = w.IBP_E_WOULD_EXCEED_LIMIT
    assert ask(lstore, "1 1 0 %d 1 3600 %s 10\n" % (IBP_SOFT, n)) == past  # ALLOCATE
    assert ask(lstore, "1 8 %s %s 0 %s 10\n" % (*r_keys, n)) == past  # LOAD: the length
    assert ask(lstore, "1 8 %s %s %s 1 10\n" % (*r_keys, n)) == past  # LOAD: the offset
    assert ask(lstore, "1 8 0#nosuchkey %s 0 %s 10\n" % (r_keys[1], n)) == w.IBP_E_CAP_NOT_FOUND  # the cap first
    assert ask(lstore, "1 9 %s 45 %s 10\n" % (keys(mcap), n)) == past  # TRUNCATE
    port = lstore.sock.getpeername()[1]
    for line in ("1 13 %s %s %s 1 10\n", "1 13 %s %s 0 %s 10\n", "1 2 %s %s %s 10\n"):  # WRITE, STORE
        c = LStore(port)  # a refused WRITE or STORE closes its connection (its data may follow)
        try:
            assert ask(c, line % (*w_keys, n)) == past, line
        finally:
            c.close()
    c = LStore(port)
    try:  # and the allocation is as it was, for the requests that are right
        assert c.load(rcap, 0, 10) == (IBP_OK, b"0123456789")
        assert c.probe(mcap)[1]["maxSize"] == 100
    finally:
        c.close()


def test_a_negative_length_is_read_unsigned_and_no_number_reads_as_zero(lstore: LStore) -> None:  # noqa: F811
    rcap, _, _ = new(lstore, 100, b"0123456789")
    r_keys = parse_cap(rcap)[2:]
    assert ask(lstore, "1 8 %s %s 0 -5 10\n" % r_keys) == w.IBP_E_WOULD_EXCEED_LIMIT
    assert ask(lstore, "1 8 %s %s 0 ten 10\n" % r_keys) == w.IBP_E_INV_PAR_SIZE  # a length of 0
    assert ask(lstore, "1 1 0 %d 1 3600 ten 10\n" % IBP_SOFT) == w.IBP_E_INVALID_PARAMETER  # a size of 0
    assert ask(lstore, "1 1 0 %d 1 ten 100 10\n" % IBP_SOFT) == w.IBP_E_INVALID_PARAMETER  # a duration of 0
    assert ask(lstore, "1 1 0 %d 1 %s 100 10\n" % (IBP_SOFT, "9" * 40)) == w.IBP_E_LONG_DURATION
    assert lstore.load(rcap, 2, 3) == (IBP_OK, b"234")
