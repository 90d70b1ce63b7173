"""IBP's wire codec and capabilities: round trips, strict parsing, fuzzed request lines."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.ibp import wire as w
from apps.ibp.capability import BadCapability, Capability, keys_equal, new_key

KEY = "a" * 64

REQUESTS: list[w.Request] = [
    w.Allocate("0", w.IBP_HARD, w.IBP_BYTEARRAY, 3600, 4 << 20, 30),
    w.Store(KEY, KEY, 3_000_000, 30),
    w.Write(KEY, KEY, 10, 20, 30),
    w.Load(KEY, KEY, 0, 1, 30),
    w.Send(KEY, KEY, f"ibp://depot2/0#{KEY}/{KEY}/WRITE", 0, 100, 5, 6, 7),
    w.Mcopy(KEY, KEY, 0, 100, (f"ibp://d2/0#{KEY}/{KEY}/WRITE", f"ibp://127.0.0.1:6714/0#{KEY}/{KEY}/WRITE"), 9),
    w.Manage(KEY, KEY, w.IBP_PROBE, w.IBP_MANAGECAP, 30),
    w.Manage(KEY, KEY, w.IBP_INCR, w.IBP_READCAP, 30),
    w.Manage(KEY, KEY, w.IBP_CHNG, w.IBP_MANAGECAP, 30, 1000, 60, w.IBP_SOFT),
    w.Status("0", w.IBP_ST_INQ, "-", 30),
    w.Status("0", w.IBP_ST_CHANGE, KEY, 30, 1 << 30, 86400),
    w.Status("", w.IBP_ST_VERSION, "", 30),
    w.Status("", w.IBP_ST_RES, "", 30),
    w.Store(KEY, KEY, 10, 30, "0"),
    w.Load(KEY, KEY, 0, 5, 30, "17"),
    w.Manage(KEY, KEY, w.IBP_CHNG, w.IBP_MANAGECAP, 30, w.KEEP, w.KEEP, w.KEEP, "0"),
    w.Manage(KEY, KEY, w.IBP_TRUNCATE, 0, 30, 50, rid="0"),
    w.Transfer(False, KEY, KEY, f"ibp://d2/0#{KEY}/{KEY}/WRITE", 0, None, 5, 30, 6, 7, "0"),
    w.Transfer(True, KEY, KEY, f"ibp://d2/0#{KEY}/{KEY}/READ", None, 3, 5, 30, 6, 7, "0"),
]


@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(req: w.Request) -> None:
    line = w.format_request(req)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert w.parse_request(line) == req


def first_line(req: w.Request) -> bytes:
    return w.format_request(req).split(b"\n")[0]


def test_command_codes_are_ibp_v1_4() -> None:
    assert (
        w.IBP_ALLOCATE,
        w.IBP_STORE,
        w.IBP_DELIVER,
        w.IBP_STATUS,
        w.IBP_SEND,
        w.IBP_MCOPY,
        w.IBP_LOAD,
        w.IBP_MANAGE,
        w.IBP_WRITE,
    ) == (1, 2, 3, 4, 5, 6, 8, 9, 13)
    assert (w.IBP_PROBE, w.IBP_INCR, w.IBP_DECR, w.IBP_CHNG) == (40, 41, 42, 43)
    assert w.format_request(REQUESTS[0]) == b"1 1 0 2 1 3600 4194304 30\n"
    assert w.format_request(w.Load(KEY, "k", 5, 7, 3)) == f"1 8 {KEY} k 5 7 3\n".encode()
    assert w.format_request(w.Load(KEY, "k", 5, 7, 3, "0")) == f"1 8 0#{KEY} k 5 7 3\n".encode()


def test_keys_in_the_rid_form_are_split_and_bare_keys_still_accepted() -> None:
    for tok, rid in ((f"0#{KEY}", "0"), (KEY, ""), (f"42#{KEY}", "42")):
        req = w.parse_request(f"1 8 {tok} rk 0 10 30\n".encode())
        assert req == w.Load(KEY, "rk", 0, 10, 30, rid)
    with pytest.raises(w.BadRequest) as e:
        w.parse_request(f"1 8 0#x#{KEY} rk 0 10 30\n".encode())
    assert e.value.status == w.IBP_E_WRONG_CAP_FORMAT


def test_send_takes_the_target_in_either_place() -> None:
    dest = f"ibp://d2/0#{KEY}/{KEY}/WRITE"
    lstore = f"1 5  0#{KEY} {dest} rk 0 100 5 6 7\n".encode()  # L-Store: an empty path, key destcap typekey
    older = f"1 5 0#{KEY} rk {dest} 0 100 5 6 7\n".encode()
    want = w.Send(KEY, "rk", dest, 0, 100, 5, 6, 7, "0")
    assert w.parse_request(lstore) == w.parse_request(older) == want
    assert w.format_request(want) == f"1 5 0#{KEY} {dest} rk 0 100 5 6 7\n".encode()


def test_manage_forms_of_l_store() -> None:
    probe = w.parse_request(f"1 9 0#{KEY} mk 40 3 0 0 0 30 \n".encode())  # probe_command's unused fields
    assert probe == w.Manage(KEY, "mk", w.IBP_PROBE, w.IBP_MANAGECAP, 30, rid="0")
    chng = w.parse_request(f"1 9 0#{KEY} mk 43 3 4096 -1 -1 30\n".encode())
    assert (chng.size, chng.duration, chng.reliability) == (4096, w.KEEP, w.KEEP)  # type: ignore[union-attr]
    warm = w.parse_request(f"1 9 0#{KEY} mk 43 3 -1 86400 -1 10\n".encode())  # lio_warm: size -1 kept
    assert (warm.size, warm.duration) == (w.KEEP, 86400)  # type: ignore[union-attr]
    push = w.parse_request(f"1 20 1  0#{KEY} ibp://d/0#{KEY}/t/WRITE rk 0 -1 5 10 10 10\n".encode())
    assert push == w.Transfer(False, KEY, "rk", f"ibp://d/0#{KEY}/t/WRITE", 0, None, 5, 10, 10, 10, "0")


def test_status_forms_by_field_count() -> None:
    assert w.parse_request(b"1 4 5 30\n") == w.Status("", w.IBP_ST_VERSION, "", 30)
    assert w.parse_request(b"1 4 3 30\n") == w.Status("", w.IBP_ST_RES, "", 30)
    two = w.format_request(w.Status("0", w.IBP_ST_CHANGE, "pw", 30, 5000, 60, follows=True))
    first, second, _ = two.split(b"\n")
    head = w.parse_request(first)
    assert isinstance(head, w.Status) and head.follows
    assert w.parse_change(second, head) == w.Status("0", w.IBP_ST_CHANGE, "pw", 30, 5000, 60)
    with pytest.raises(w.BadRequest):
        w.parse_change(b"1 2\n", head)


def test_phoebus_copies_parse_with_their_gateways_path_for_the_depot_to_refuse() -> None:
    cap = f"ibp://d/0#{KEY}/t/WRITE"
    send = w.parse_request(f"1 17 auto 0#{KEY} {cap} rk 0 5 10 10 10\n".encode())
    assert send == w.Send(KEY, "rk", cap, 0, 5, 10, 10, 10, "0", path="auto")
    push = w.parse_request(f"1 20 2 gw/5006 0#{KEY} {cap} rk 0 -1 5 10 10 10\n".encode())
    assert push == w.Transfer(False, KEY, "rk", cap, 0, None, 5, 10, 10, 10, "0", path="gw/5006")
    for req in (send, push):
        assert w.parse_request(w.format_request(req)) == req


def test_version_0_allocate_and_status_name_no_resource_and_read_back_as_sent() -> None:
    alloc = w.parse_request(b"0 1 2 1 3600 100 10\n")
    assert alloc == w.Allocate("", w.IBP_HARD, w.IBP_BYTEARRAY, 3600, 100, 10)
    assert w.format_request(alloc) == b"0 1 2 1 3600 100 10\n"
    inq = w.parse_request(b"0 4 1 pw 10\n")
    assert inq == w.Status("", w.IBP_ST_INQ, "pw", 10, version=w.IBPv031)
    assert w.format_request(inq) == b"0 4 1 pw 10\n"
    assert w.parse_request(b"0 4 5 10\n") == w.Status("", w.IBP_ST_VERSION, "", 10, version=w.IBPv031)
    assert w.parse_request(b"0 8 0#k t 0 1 10\n") == w.parse_request(b"1 8 0#k t 0 1 10\n")  # the rest: as v1
    with pytest.raises(w.BadRequest) as e:
        w.parse_request(b"0 4 2 adminkey 10\n")
    assert (e.value.status, e.value.closes) == (w.IBP_E_INVALID_CMD, True)
    assert w.format_inq_v031(64 << 20, 3 << 20, 64 << 20, (2 << 20) + 5, 7200) == b"64 3 64 2 7200 \n"


def test_inq_line_is_what_l_store_reads_and_ours_after_re() -> None:
    values = {name: i for i, (_, name) in enumerate(w.INQ_TAGS)}
    reply = w.format_inq(values, {"allocations": 7})
    status, body = reply.split(b"\n", 1)
    assert status.split() == [b"1", str(len(body)).encode()] and len(body) < 1024
    tags = body.split()
    assert tags[0] == b"VS:0" and tags[-2:] == [b"RE", b"allocations:7"]
    assert [t.split(b":")[0] for t in tags[:13]] == [tag.encode() for tag, _ in w.INQ_TAGS]
    parsed = w.parse_inq(body)
    assert parsed["capacity"] == "4" and parsed["allocations"] == "7" and "RE" not in parsed


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"2 1 0 1 1 10 10 5\n", w.IBP_E_PROT_VERS),  # neither IBPv031 nor IBPv040
        (b"0 1 0 1 1 10 10 5\n", w.IBP_E_BAD_FORMAT),  # IBPv031's ALLOCATE names no resource
        (b"1 100 x\n", w.IBP_E_UNKNOWN_FUNCTION),  # no such command: -43, as L-Store
        (b"1 99 x\n", w.IBP_E_INVALID_CMD),  # L-Store's INTERNAL_GET_ALLOC: its, not served
        (b"1 4 0 4 1000 10\n", w.IBP_E_INVALID_CMD),  # L-Store's ST_STATS: not served
        (b"1 3 a b\n", w.IBP_E_UNKNOWN_FUNCTION),  # DELIVER: L-Store has no handler either
        (b"1 16 a b\n", w.IBP_E_INVALID_CMD),  # RENAME: L-Store's, not served
        (b"1 1 0 1 1 10 10\n", w.IBP_E_BAD_FORMAT),  # a field short
        (b"1 1 0 1 1 10 10 5 6\n", w.IBP_E_BAD_FORMAT),  # a field too many
        (b"1 1 0 1 1 ten 10 5\n", w.IBP_E_INVALID_PARAMETER),  # no duration reads as 0 (L-Store's sscanf)
        (b"1 1 0 1 1 10 ten 5\n", w.IBP_E_INVALID_PARAMETER),  # nor a size
        (b"1 8 k t 0 ten 5\n", w.IBP_E_INV_PAR_SIZE),  # nor a length
        (b"1 8 k t ten 1 5\n", w.IBP_E_BAD_FORMAT),  # an offset L-Store would take as 0: malformed
        (b"1 1 0 1 1 -5 10 5\n", w.IBP_E_INVALID_PARAMETER),  # negative duration
        (b"1 2 k/ey t 10 5\n", w.IBP_E_WRONG_CAP_FORMAT),
        (b"1 9 k t 77 1 5\n", w.IBP_E_BAD_FORMAT),  # L-Store's read_manage
        (b"1 4 0 9 pw 5\n", w.IBP_E_BAD_FORMAT),  # L-Store's read_status
        (b"1 8 k t 0 0 5\n", w.IBP_E_INV_PAR_SIZE),  # L-Store's read_read: no length 0
        (b"1 5 k ibp://d/0#k/t/WRITE t 0 1 5 0 5\n", w.IBP_E_INVALID_PARAMETER),  # a destination timeout of 0
        (b"1 9 k t 43 3 0 -1 -1 5\n", w.IBP_E_WOULD_DAMAGE_DATA),  # CHNG size 0 (-1 keeps it)
        (b"1 20 3 k ibp://d/0#k/t/WRITE t 0 -1 5 5 5 5\n", w.IBP_E_TYPE_NOT_SUPPORTED),  # neither TCP nor Phoebus
        (b"1 6 k t 0 10 0 9\n", w.IBP_E_INVALID_PARAMETER),  # MCOPY to no target
        (b"\xff\xfe 1\n", w.IBP_E_BAD_FORMAT),
        (b"\n", w.IBP_E_BAD_FORMAT),
        (b"1 " + b"9" * 5000 + b"\n", w.IBP_E_BAD_FORMAT),
    ],
)
def test_bad_lines_get_the_right_status(line: bytes, status: int) -> None:
    with pytest.raises(w.BadRequest) as e:
        w.parse_request(line)
    assert e.value.status == status


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        (b"1 1 0 1 1 10 18446744073709551615 5\n", "size", 2**64 - 1),
        (b"1 1 0 1 1 10 18446744073709551616 5\n", "size", 2**64 - 1),  # saturated, as glibc's scanf
        (b"1 1 0 1 1 10 -5 5\n", "size", 2**64 - 5),  # %llu: modulo 2**64
        (b"1 1 0 1 1 99999999999999999999 10 5\n", "duration", 2**63 - 1),
        (b"1 8 k t 0 99999999999999999999999 5\n", "length", 2**64 - 1),
        (b"1 8 k t 0 -1 5\n", "length", 2**64 - 1),
        (b"1 8 k t 9223372036854775808 1 5\n", "offset", 2**63 - 1),
        (b"1 13 k t 000000000000000000000000000000000000007 1 5\n", "offset", 7),
        (b"1 9 k t 45 -5 5\n", "size", 2**64 - 5),  # TRUNCATE
        (b"1 9 k t 43 3 99999999999999999999 -1 -1 5\n", "size", 2**63 - 1),  # CHNG (negative: keep)
    ],
)
def test_numbers_past_64_bits_are_read_as_l_stores_scanf_reads_them(line: bytes, field: str, value: int) -> None:
    """Not malformed: L-Store's depot reads them and answers for the value read (-19, past any
    allocation, for a size, length or offset); ours does the same at the depot."""
    assert getattr(w.parse_request(line), field) == value


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_bytes_parse_or_raise_bad_request(data: bytes) -> None:
    try:
        req = w.parse_request(data)
    except w.BadRequest as e:
        assert e.status < 0
    else:
        assert w.parse_request(first_line(req)) == req


_tok = st.one_of(
    st.integers(-3, 2**64).map(str),
    st.sampled_from(["0", "1", KEY, "x", "-", "READ"]),
    st.text(alphabet="0123456789abc#/:-", max_size=12),
)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2), st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 13, 40, 7]), st.lists(_tok, max_size=12))
def test_fuzzed_token_lines_parse_or_raise_bad_request(version: int, cmd: int, toks: list[str]) -> None:
    line = " ".join([str(version), str(cmd), *toks]).encode() + b"\n"
    try:
        req = w.parse_request(line)
    except w.BadRequest as e:
        assert e.status < 0 and e.reason
    else:
        assert w.parse_request(first_line(req)) == req


def test_reply_parsing() -> None:
    r = w.parse_reply(b"1 ibp://a/0#k/r/READ ibp://a/0#k/w/WRITE ibp://a/0#k/m/MANAGE\n")
    assert r.ok and len(r.fields) == 3
    assert w.parse_reply(b"-4 no such allocation\n").status == w.IBP_E_CAP_NOT_FOUND
    with pytest.raises(w.BadRequest):
        w.parse_reply(b"\n")
    with pytest.raises(w.BadRequest):
        w.parse_reply(b"ok\n")


def test_capability_round_trip_and_forms() -> None:
    cap = Capability("depot1", "0", new_key(), new_key(), "READ")
    assert Capability.parse(str(cap)) == cap
    assert len(cap.key) == 64 and cap.key != cap.typekey  # 256-bit keys, independent
    assert Capability.parse(f"ibp://127.0.0.1:6714/0#{KEY}/{KEY}/WRITE").depot == "127.0.0.1:6714"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ibp://d/0#k/t/DELETE",
        "http://d/0#k/t/READ",
        "ibp://d/0#k/READ",
        "ibp://d/0#k/t/READ/x",
        "ibp://d/0#" + "k" * 200 + "/t/READ",
        "ibp://d d/0#k/t/READ",
    ],
)
def test_malformed_capabilities_are_refused(text: str) -> None:
    with pytest.raises(BadCapability):
        Capability.parse(text)


def test_keys_compare_in_constant_time_helper() -> None:
    k = new_key()
    assert keys_equal(k, k)
    assert not keys_equal(k, k[:-1])
    assert not keys_equal(k, "X" + k)
    assert not keys_equal(k, "é")


@pytest.mark.parametrize(
    ("line", "closes"),
    [
        (b"1 33 0#k t 2 0 5 5 4 10\n", True),  # IBP_VEC_WRITE: L-Store's coalesced writes, data behind
        (b"1 27 1 65536 0#k t 0 9 10\n", True),  # IBP_WRITE_CHKSUM
        (b"1 28 1 65536 0#k t 9 10\n", True),  # IBP_STORE_CHKSUM
        (b"1 34 1 65536 0#k t 1 0 9 10\n", True),  # IBP_VEC_WRITE_CHKSUM
        (b"1 35 0#k t 1 0 9 10\n", False),  # IBP_VEC_READ: nothing follows its line
        (b"1 16 0#k t 10\n", False),  # IBP_RENAME
    ],
)
def test_lstores_writes_we_do_not_serve_close_the_connection(line: bytes, closes: bool) -> None:
    with pytest.raises(w.BadRequest) as e:
        w.parse_request(line)
    assert (e.value.status, e.value.closes) == (w.IBP_E_INVALID_CMD, closes)
