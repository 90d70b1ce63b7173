"""The OAP header (proto.oap) against the bytes C Ouroboros 0.23 put on the wire, and its checks:
decoding bounds, the timestamp window, the replay cache, matching a response to its request."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oap_captures import PAIRS, TRAILING

from proto import oap

NOW = 1_796_518_203_095_625_633  # a timestamp from the captures, ns
MS = 1_000_000


@pytest.mark.parametrize(("where", "req_hex", "rsp_hex"), PAIRS, ids=[p[0] for p in PAIRS])
def test_captured_plain_exchanges_decode_and_match(where: str, req_hex: str, rsp_hex: str) -> None:
    req_raw, rsp_raw = bytes.fromhex(req_hex), bytes.fromhex(rsp_hex)
    req = oap.decode(req_raw)
    assert len(req_raw) == 36 and req.raw == req_raw
    assert (req.cipher_nid, req.kdf_nid, req.md_nid) == (0, 0, 0)
    assert req.crt == req.kex == req.data == req.sig == b""
    rsp = oap.check_response(req, rsp_raw)
    assert len(rsp_raw) == 84 and rsp.id == req.id
    assert rsp.req_hash == hashlib.sha384(req_raw).digest()
    assert 0 <= rsp.timestamp - req.timestamp < 2_000 * MS  # answered within the capture's round trip


@pytest.mark.parametrize(("where", "req_hex", "rsp_hex"), PAIRS[:3], ids=[p[0] for p in PAIRS[:3]])
def test_our_plain_response_is_byte_for_byte_what_c_sent(where: str, req_hex: str, rsp_hex: str) -> None:
    req = oap.decode(bytes.fromhex(req_hex))
    theirs = oap.decode(bytes.fromhex(rsp_hex), req.md_nid)
    assert oap.plain_response(req, theirs.timestamp) == bytes.fromhex(rsp_hex)
    assert oap.plain_request(req.id, req.timestamp) == bytes.fromhex(req_hex)


def test_a_plain_request_is_36_bytes_and_its_response_84() -> None:
    oid = os.urandom(16)
    req = oap.decode(oap.plain_request(oid, NOW))
    rsp = oap.plain_response(req, NOW + MS)
    assert len(req.raw) == 36 and len(rsp) == 84
    assert oap.check_response(req, rsp).timestamp == NOW + MS


# -- decoding: every bound ----------------------------------------------------------------------


def test_trailing_bytes_without_a_certificate_are_refused_as_c_refused_them() -> None:
    with pytest.raises(oap.OapError, match="trailing") as e:
        oap.decode(bytes.fromhex(TRAILING))
    assert e.value.code == oap.EAUTH


@pytest.mark.parametrize("size", [0, 1, 16, 35])
def test_a_header_shorter_than_36_bytes_is_refused(size: int) -> None:
    with pytest.raises(oap.OapError, match="at least 36"):
        oap.decode(bytes(size))


@pytest.mark.parametrize("field", ["crt", "kex", "data"])
def test_a_length_beyond_the_buffer_is_refused(field: str) -> None:
    raw = bytearray(oap.plain_request(bytes(16), NOW))
    offset = {"crt": 30, "kex": 32, "data": 34}[field]
    raw[offset : offset + 2] = (5).to_bytes(2, "big")
    with pytest.raises(oap.OapError, match="announces"):
        oap.decode(bytes(raw) + b"abcd")


@pytest.mark.parametrize(("offset", "nid"), [(24, 4242), (26, 901), (28, 1)])
def test_unknown_nids_are_refused(offset: int, nid: int) -> None:
    raw = bytearray(oap.plain_request(bytes(16), NOW))
    raw[offset : offset + 2] = nid.to_bytes(2, "big")
    with pytest.raises(oap.OapError, match="unknown"):
        oap.decode(bytes(raw))


def test_every_field_round_trips_with_flags_and_signature() -> None:
    raw = oap.encode(
        b"i" * 16,
        NOW,
        cipher_nid=901,
        kdf_nid=672,
        md_nid=674,
        crt=b"C" * 300,
        kex=b"K" * 91,
        kex_raw=True,
        kex_client_encap=True,
        data=b"D" * 7,
        sign=lambda signed: b"S" * 72,
    )
    hdr = oap.decode(raw)
    assert (hdr.cipher_nid, hdr.kdf_nid, hdr.md_nid) == (901, 672, 674)
    assert (hdr.crt, hdr.kex, hdr.data, hdr.sig) == (b"C" * 300, b"K" * 91, b"D" * 7, b"S" * 72)
    assert hdr.kex_raw and hdr.kex_client_encap
    assert hdr.signed == raw[:-72]


def test_a_signed_response_carries_the_request_hash_of_the_requests_digest() -> None:
    req = oap.decode(oap.encode(os.urandom(16), NOW, md_nid=672))
    sig = b"\x30" * 70
    rsp_raw = oap.encode(req.id, NOW, md_nid=672, crt=b"cert", req_hash=oap.request_hash(req), sign=lambda _: sig)
    rsp = oap.check_response(req, rsp_raw)
    assert rsp.req_hash == hashlib.sha256(req.raw).digest() and rsp.sig == sig


def test_encode_refuses_what_the_format_cannot_carry() -> None:
    with pytest.raises(ValueError, match="id"):
        oap.encode(b"short", NOW)
    with pytest.raises(ValueError, match="kex"):
        oap.encode(bytes(16), NOW, kex=bytes(oap.MAX_KEX + 1))
    with pytest.raises(ValueError, match="signed"):
        oap.encode(bytes(16), NOW, crt=b"cert")


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.binary(max_size=400), st.sampled_from([None, 0, 672, 673, 674]))
def test_any_bytes_decode_or_raise_oap_error(buf: bytes, md: int | None) -> None:
    try:
        hdr = oap.decode(buf, md)
    except oap.OapError as e:
        assert e.code == oap.EAUTH
        return
    assert hdr.raw == buf and len(hdr.id) == 16


# -- matching a response to its request ------------------------------------------------------------


def test_a_response_to_another_request_is_refused() -> None:
    a = oap.decode(oap.plain_request(os.urandom(16), NOW))
    b = oap.decode(oap.plain_request(os.urandom(16), NOW))
    with pytest.raises(oap.OapError, match="id"):
        oap.check_response(a, oap.plain_response(b, NOW))
    forged = oap.encode(a.id, NOW, req_hash=oap.request_hash(b))  # right id, wrong hash
    with pytest.raises(oap.OapError, match="req_hash"):
        oap.check_response(a, forged)


def test_a_response_without_its_request_hash_is_refused() -> None:
    req = oap.decode(oap.plain_request(os.urandom(16), NOW))
    with pytest.raises(oap.OapError, match="announces"):
        oap.check_response(req, oap.plain_request(req.id, NOW))


# -- the timestamp window and the replay cache ------------------------------------------------------


def _req(ts: int, oid: bytes | None = None) -> oap.Header:
    return oap.decode(oap.plain_request(oid or os.urandom(16), ts))


def test_requests_within_the_window_pass_once() -> None:
    cache = oap.ReplayCache()
    for skew in (-99 * MS, 0, 19_999 * MS):
        cache.check(_req(NOW - skew), NOW)
    assert len(cache) == 3


@pytest.mark.parametrize(
    ("skew_ms", "why"), [(-101, "future"), (-1000, "future"), (20_001, "too old"), (30_000, "too old")]
)
def test_requests_outside_the_window_are_refused(skew_ms: int, why: str) -> None:
    with pytest.raises(oap.OapError, match=why):
        oap.ReplayCache().check(_req(NOW - skew_ms * MS), NOW)


def test_a_replayed_request_is_refused_and_forgotten_after_the_window() -> None:
    cache = oap.ReplayCache()
    req = _req(NOW)
    cache.check(req, NOW)
    with pytest.raises(oap.OapError, match="replay"):
        cache.check(req, NOW + 5 * MS)
    with pytest.raises(oap.OapError, match="too old"):  # once forgotten it is too old anyway
        cache.check(req, NOW + oap.REPLAY_TIMER + MS)
    assert len(cache) == 0


def test_the_same_id_at_another_time_is_another_request() -> None:
    cache = oap.ReplayCache()
    oid = os.urandom(16)
    cache.check(_req(NOW, oid), NOW)
    cache.check(_req(NOW + 1, oid), NOW)


def test_a_full_cache_refuses_rather_than_forgets() -> None:
    cache = oap.ReplayCache(cap=3)
    first = _req(NOW)
    cache.check(first, NOW)
    for _ in range(2):
        cache.check(_req(NOW), NOW)
    with pytest.raises(oap.OapError, match="more than 3"):
        cache.check(_req(NOW), NOW)
    with pytest.raises(oap.OapError, match="replay"):
        cache.check(first, NOW)  # still remembered
    later = NOW + oap.REPLAY_TIMER + MS
    cache.check(_req(later), later)  # the old ones expired: room again
    assert len(cache) == 1
