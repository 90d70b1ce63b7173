"""The OAP header, Ouroboros 0.23's flow allocation protocol: the allocating IRMd's request and
the accepting IRMd's response ride in every flow allocation; declared once, parsed with bounds.

Sans-IO: ids, clocks (`now`, ns since the epoch) and signatures come in as parameters, so the
checks (timestamp window, replay cache, request hash) are pure and tested without sockets.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import heapq
import struct
from collections.abc import Callable

# -- the wire format (src/irmd/oap/hdr.h) ------------------------------------------------------

ID_SIZE = 16
# id, timestamp (ns, CLOCK_REALTIME), cipher_nid, kdf_nid, md_nid, crt_len, F|R|kex_len, data_len
FIXED = struct.Struct("!16sQHHHHHH")
KEX_FMT_RAW = 0x8000  # F: the kex data is raw (hybrid KEM), not an X.509 DER public key
KEX_CLIENT_ENCAP = 0x4000  # R: the client encapsulated (KEM), rather than the server
KEX_LEN_MASK = 0x3FFF
MAX_CRT = 0xFFFF
MAX_KEX = KEX_LEN_MASK
MAX_DATA = 0xFFFF

# Refusal codes, as the Error replies and the IPCPs carry them (Ouroboros's -1009 and -1008).
EAUTH = "EAUTH"  # the header, its timestamp or its authentication failed
ECRYPT = "ECRYPT"  # the key exchange failed or was asked for and not given

# -- algorithms, by OpenSSL NID (src/lib/crypt.c); rank lists are weakest first ----------------

CIPHERS = {
    895: "aes-128-gcm", 898: "aes-192-gcm", 901: "aes-256-gcm", 1018: "chacha20-poly1305",
    904: "aes-128-ctr", 905: "aes-192-ctr", 906: "aes-256-ctr",
}  # fmt: skip
CIPHER_RANK = (904, 905, 906, 895, 898, 901, 1018)
KEXES = {
    415: "prime256v1", 715: "secp384r1", 716: "secp521r1", 1034: "X25519", 1035: "X448",
    1126: "ffdhe2048", 1127: "ffdhe3072", 1128: "ffdhe4096",
    1454: "ML-KEM-512", 1455: "ML-KEM-768", 1456: "ML-KEM-1024",
    2053: "X25519MLKEM768", 2054: "X448MLKEM1024",
}  # fmt: skip
KEX_RANK = (1126, 415, 1034, 1127, 715, 1128, 1035, 716, 1454, 1455, 1456, 2053, 2054)
# nid -> (name as enc.conf spells it, hashlib's name)
DIGESTS = {
    672: ("sha256", "sha256"), 673: ("sha384", "sha384"), 674: ("sha512", "sha512"),
    1097: ("sha3-256", "sha3_256"), 1098: ("sha3-384", "sha3_384"), 1099: ("sha3-512", "sha3_512"),
    1056: ("blake2b512", "blake2b"), 1057: ("blake2s256", "blake2s"),
}  # fmt: skip
DIGEST_RANK = (1057, 672, 1097, 673, 1098, 1056, 674, 1099)
SHA256, SHA384 = 672, 673
KEY_BITS = {895: 128, 898: 192, 901: 256, 1018: 256, 904: 128, 905: 192, 906: 256}

# -- the checks' constants (src/irmd/oap/auth.c, cmake/config/irmd.cmake) -----------------------

NS = 1_000_000_000
TIMESYNC_SLACK = 100_000_000  # ns a request may come from the future (clock skew)
REPLAY_TIMER = 20 * NS  # ns a request stays valid, and is remembered to refuse it twice
REPLAY_CACHE_MAX = 65536  # requests remembered at once; beyond, new ones are refused, not forgotten


# Our use of the data field (which 0.23 carries and ignores): an encrypting peer that numbers its
# IVs says so, and when both do, each refuses the other's replayed packets.
SEQ_IV = b"o7s-py seq-iv"


class OapError(Exception):
    """A header or exchange that fails a check; `code` (EAUTH or ECRYPT) goes back to the peer."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def rank(order: tuple[int, ...], nid: int) -> int:
    """Strength of an algorithm: 0 for none, -1 for one we do not know."""
    if nid == 0:
        return 0
    return order.index(nid) + 1 if nid in order else -1


def fingerprint(spki_der: bytes) -> str:
    """A public key's name as OpenSSH prints it: SHA256:<base64 of the key's digest, unpadded>."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(spki_der).digest()).decode().rstrip("=")


# hashlib's constructor of each digest: called directly, not looked up by name per use (hashlib.new)
_HASH: dict[int, Callable[[bytes], hashlib._Hash]] = {nid: getattr(hashlib, name) for nid, (_, name) in DIGESTS.items()}
_DIGEST_SIZE = {nid: make(b"").digest_size for nid, make in _HASH.items()}


def digest(md_nid: int, data: bytes) -> bytes:
    """The digest OAP names by NID; 0 (no digest configured) means SHA-384, as 0.23's req_hash."""
    return _HASH[md_nid or SHA384](data).digest()


def digest_size(md_nid: int) -> int:
    return _DIGEST_SIZE[md_nid or SHA384]


@dataclasses.dataclass(frozen=True)
class Header:
    """One OAP header as decoded; `raw` is it as on the wire (what req_hash and signatures cover)."""

    id: bytes
    timestamp: int  # ns since the epoch
    cipher_nid: int = 0
    kdf_nid: int = 0
    md_nid: int = 0
    crt: bytes = b""  # X.509 DER of the sender's certificate
    kex: bytes = b""  # the sender's public key (DER), or a KEM ciphertext
    kex_raw: bool = False
    kex_client_encap: bool = False
    data: bytes = b""  # piggybacked data
    req_hash: bytes = b""  # responses: the digest of the request's raw bytes
    sig: bytes = b""  # present only with crt: over everything before it
    raw: bytes = b""

    @property
    def signed(self) -> bytes:
        """The bytes the signature covers."""
        return self.raw[: len(self.raw) - len(self.sig)]


def _check_nids(cipher: int, kdf: int, md: int) -> None:
    if (not cipher or cipher in CIPHERS) and (not kdf or kdf in DIGESTS) and (not md or md in DIGESTS):
        return  # every header of a flow's allocation passes here three times
    if cipher and cipher not in CIPHERS:
        raise OapError(EAUTH, f"unknown cipher NID {cipher}")
    for what, nid in (("KDF", kdf), ("digest", md)):
        if nid and nid not in DIGESTS:
            raise OapError(EAUTH, f"unknown {what} NID {nid}")


def decode(buf: bytes, req_md_nid: int | None = None) -> Header:
    """A request (req_md_nid None), or the response to a request with that md_nid (0: SHA-384),
    which fixes the length of its req_hash. Raises OapError on anything malformed."""
    if len(buf) < FIXED.size:
        raise OapError(EAUTH, f"OAP header of {len(buf)} bytes: at least {FIXED.size} expected")
    oid, ts, cipher, kdf, md, crt_len, kex_word, data_len = FIXED.unpack_from(buf)
    _check_nids(cipher, kdf, md)
    kex_len = kex_word & KEX_LEN_MASK
    hash_len = 0 if req_md_nid is None else digest_size(req_md_nid)
    fixed_end = FIXED.size + crt_len + kex_len + data_len + hash_len
    if len(buf) < fixed_end:
        raise OapError(EAUTH, f"OAP header of {len(buf)} bytes announces {fixed_end}")
    if crt_len == 0 and len(buf) != fixed_end:
        raise OapError(EAUTH, f"unsigned OAP header with {len(buf) - fixed_end} trailing bytes")
    buf = bytes(buf)
    at = FIXED.size
    crt = buf[at : (at := at + crt_len)]
    kex = buf[at : (at := at + kex_len)]
    data = buf[at : (at := at + data_len)]
    req_hash = buf[at : (at := at + hash_len)]
    return Header(oid, ts, cipher, kdf, md, crt, kex, bool(kex_word & KEX_FMT_RAW),
                  bool(kex_word & KEX_CLIENT_ENCAP), data, req_hash, buf[at:], buf)  # fmt: skip


def encode(
    oid: bytes,
    timestamp: int,
    *,
    cipher_nid: int = 0,
    kdf_nid: int = 0,
    md_nid: int = 0,
    crt: bytes = b"",
    kex: bytes = b"",
    kex_raw: bool = False,
    kex_client_encap: bool = False,
    data: bytes = b"",
    req_hash: bytes = b"",
    sign: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """An OAP header; with `sign`, its signature over all of it is appended (needs a certificate)."""
    if len(oid) != ID_SIZE:
        raise ValueError(f"OAP id of {len(oid)} bytes: {ID_SIZE} expected")
    for what, value, limit in (("certificate", crt, MAX_CRT), ("kex data", kex, MAX_KEX), ("data", data, MAX_DATA)):
        if len(value) > limit:
            raise ValueError(f"OAP {what} of {len(value)} bytes: at most {limit}")
    if (sign is None) != (not crt):
        raise ValueError("an OAP header is signed exactly when it carries a certificate")
    _check_nids(cipher_nid, kdf_nid, md_nid)
    kex_word = len(kex) | (KEX_FMT_RAW if kex_raw else 0) | (KEX_CLIENT_ENCAP if kex_client_encap else 0)
    out = FIXED.pack(oid, timestamp, cipher_nid, kdf_nid, md_nid, len(crt), kex_word, len(data))
    out += crt + kex + data + req_hash
    return out + sign(out) if sign is not None else out


# -- the plain exchange (INTEROP-0.23 §3.3) -------------------------------------------------------


def plain_request(oid: bytes, now: int) -> bytes:
    """The 36 bytes every unauthenticated, unencrypted allocation carries."""
    return encode(oid, now)


def request_hash(request: Header) -> bytes:
    return digest(request.md_nid, request.raw)


def plain_response(request: Header, now: int) -> bytes:
    """The 84-byte answer: the request's id, our time and the SHA-384 of the request."""
    return encode(request.id, now, req_hash=request_hash(request))


def check_response(request: Header, buf: bytes) -> Header:
    """The response decoded and matched to our request (id and req_hash, INTEROP-0.23 §3.5);
    its certificate, signature and key exchange are for the caller to check."""
    response = decode(buf, request.md_nid)
    if response.id != request.id:
        raise OapError(EAUTH, "OAP response id does not match the request")
    if response.req_hash != request_hash(request):
        raise OapError(EAUTH, "OAP response answers another request (req_hash mismatch)")
    return response


class ReplayCache:
    """The accepting side's window and memory (INTEROP-0.23 §3.4.3): a request is refused when its
    timestamp is more than TIMESYNC_SLACK ahead or REPLAY_TIMER behind, or its (id, timestamp)
    was seen within REPLAY_TIMER. Bounded: when full it refuses, it never forgets early."""

    def __init__(self, window: int = REPLAY_TIMER, slack: int = TIMESYNC_SLACK, cap: int = REPLAY_CACHE_MAX) -> None:
        self.window, self.slack, self.cap = window, slack, cap
        self._seen: set[tuple[bytes, int]] = set()
        self._expiry: list[tuple[int, bytes]] = []  # (timestamp, id), a heap: the oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, hdr: Header, now: int) -> None:
        while self._expiry and self._expiry[0][0] + self.window < now:
            ts, oid = heapq.heappop(self._expiry)
            self._seen.discard((oid, ts))
        delta = now - hdr.timestamp
        if delta < -self.slack:
            raise OapError(EAUTH, f"OAP request from {-delta // 1_000_000} ms into the future")
        if delta > self.window:
            raise OapError(EAUTH, f"OAP request too old ({delta // 1_000_000} ms)")
        key = (hdr.id, hdr.timestamp)
        if key in self._seen:
            raise OapError(EAUTH, "OAP request already seen (a replay)")
        if len(self._seen) >= self.cap:
            raise OapError(EAUTH, f"more than {self.cap} allocations within {self.window // NS} s: refused")
        self._seen.add(key)
        heapq.heappush(self._expiry, (hdr.timestamp, hdr.id))
