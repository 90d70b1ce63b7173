"""Our flow cryptography against Ouroboros 0.23's own (libouroboros-common, through ctypes): the
same key from an ECDH exchange, packets one seals the other opens across key rotations,
signatures either side verifies, and enc.conf read alike. Skipped where the C build is absent."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from ctypes import POINTER, Structure, byref, c_char_p, c_int, c_size_t, c_uint8, c_void_p
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flowlib.crypto import PacketCrypto
from irmd import kex
from irmd.secfiles import parse_enc_conf
from proto import oap

LIB = Path(os.environ.get("OUROBOROS_C", "/opt/ouroboros-c-0.23")) / "lib" / "libouroboros-common.so"
pytestmark = pytest.mark.skipif(not LIB.exists(), reason=f"C Ouroboros 0.23 not built ({LIB} missing)")


class Buf(Structure):  # buffer_t
    _fields_ = [("len", c_size_t), ("data", POINTER(c_uint8))]


class Algo(Structure):
    _fields_ = [("str", c_char_p), ("nid", c_int), ("mode", c_int)]


class Named(Structure):
    _fields_ = [("str", c_char_p), ("nid", c_int)]


class SecConfig(Structure):  # struct sec_config: x (kex), k (kdf), c (cipher), d (digest)
    _fields_ = [("x", Algo), ("k", Named), ("c", Named), ("d", Named)]


class CryptSk(Structure):
    _fields_ = [("nid", c_int), ("key", POINTER(c_uint8)), ("rot_bit", c_uint8)]


@pytest.fixture(scope="module")
def c() -> Iterator[ctypes.CDLL]:
    lib = ctypes.CDLL(str(LIB))
    lib.crypt_create_ctx.restype = c_void_p
    lib.crypt_create_ctx.argtypes = [POINTER(CryptSk)]
    lib.crypt_encrypt.argtypes = lib.crypt_decrypt.argtypes = [c_void_p, Buf, POINTER(Buf)]
    lib.crypt_destroy_ctx.argtypes = [c_void_p]
    lib.kex_pkp_create.argtypes = [POINTER(SecConfig), POINTER(c_void_p), POINTER(c_uint8)]
    lib.kex_dhe_derive.argtypes = [POINTER(SecConfig), c_void_p, Buf, POINTER(c_uint8)]
    lib.kex_pkp_destroy.argtypes = [c_void_p]
    lib.auth_sign.argtypes = [c_void_p, c_int, Buf, POINTER(Buf)]
    lib.auth_verify_sig.argtypes = [c_void_p, c_int, Buf, Buf]
    lib.crypt_load_privkey_file.argtypes = [c_char_p, POINTER(c_void_p)]
    lib.crypt_load_crt_file.argtypes = [c_char_p, POINTER(c_void_p)]
    lib.crypt_get_pubkey_crt.argtypes = [c_void_p, POINTER(c_void_p)]
    lib.load_sec_config_file.argtypes = [POINTER(SecConfig), c_char_p]
    yield lib


_keep: list[object] = []  # ctypes buffers must outlive the calls that point into them


def buf(data: bytes) -> Buf:
    arr = (c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
    _keep.append(arr)
    return Buf(len(data), ctypes.cast(arr, POINTER(c_uint8)))


def take(b: Buf) -> bytes:
    data = ctypes.string_at(b.data, b.len)
    ctypes.CDLL(None).free(b.data)
    return data


def config(kex_nid: int, kdf: int = 0) -> SecConfig:
    cfg = SecConfig()
    cfg.x.str, cfg.x.nid = oap.KEXES[kex_nid].encode(), kex_nid
    cfg.k.nid = kdf
    return cfg


# -- the key exchange ------------------------------------------------------------------------------


@pytest.mark.parametrize("kdf", [0, 672, 674, 1097, 1056])
@pytest.mark.parametrize("kex_nid", [415, 715, 716, 1034, 1035])
def test_c_and_we_derive_the_same_flow_key(c: ctypes.CDLL, kex_nid: int, kdf: int) -> None:
    cfg = config(kex_nid, kdf)
    pkp, pk = c_void_p(), (c_uint8 * 2048)()
    n = c.kex_pkp_create(byref(cfg), byref(pkp), pk)
    assert n > 0
    theirs = bytes(pk[:n])
    assert kex.peer_kex(theirs) == kex_nid  # their kex data is the DER public key we expect
    ours = kex.keypair(kex_nid)
    key = (c_uint8 * 32)()
    assert c.kex_dhe_derive(byref(cfg), pkp, buf(kex.public_der(ours)), key) == 0
    c.kex_pkp_destroy(pkp)
    assert kex.derive(ours, theirs, kdf) == bytes(key)


# -- packets ---------------------------------------------------------------------------------------


class CFlow:
    """One end of a flow in C: crypt_create_ctx with the OAP key."""

    def __init__(self, lib: ctypes.CDLL, cipher: int, key: bytes, rot_bit: int) -> None:
        self.lib = lib
        self._key = (c_uint8 * 32).from_buffer_copy(key)
        sk = CryptSk(cipher, ctypes.cast(self._key, POINTER(c_uint8)), rot_bit)
        self.ctx = lib.crypt_create_ctx(byref(sk))
        assert self.ctx

    def seal(self, data: bytes) -> bytes:
        out = Buf()
        assert self.lib.crypt_encrypt(self.ctx, buf(data), byref(out)) == 0
        return take(out)

    def open(self, packet: bytes) -> bytes | None:
        out = Buf()
        if self.lib.crypt_decrypt(self.ctx, buf(packet), byref(out)) != 0:
            return None
        return take(out)


@pytest.mark.parametrize("cipher", [901, 1018, 895, 898, 906])
def test_packets_cross_both_ways_through_key_rotations(c: ctypes.CDLL, cipher: int) -> None:
    key = os.urandom(32)
    theirs, ours = CFlow(c, cipher, key, 4), PacketCrypto(cipher, key, server=True, rotation_bit=4)
    for i in range(100):  # one way: 6 rotations
        assert ours.open(theirs.seal(b"c%d" % i)) == b"c%d" % i, f"C's packet {i}"
    theirs, ours = CFlow(c, cipher, key, 4), PacketCrypto(cipher, key, server=True, rotation_bit=4)
    for i in range(100):  # the other way
        assert theirs.open(ours.seal(b"py%d" % i)) == b"py%d" % i, f"our packet {i}"
    if cipher == 906:
        return  # AES-CTR cannot tell keys apart when both ends rotate (C to C garbles alike)
    for i in range(200):  # request and answer after all that, as oping
        assert ours.open(theirs.seal(b"q%d" % i)) == b"q%d" % i, f"C's request {i}"
        assert theirs.open(ours.seal(b"a%d" % i)) == b"a%d" % i, f"our answer {i}"
    assert ours.rejected == 0


def test_c_rejects_our_tampered_packets_and_we_reject_its(c: ctypes.CDLL) -> None:
    key = os.urandom(32)
    theirs, ours = CFlow(c, 901, key, 20), PacketCrypto(901, key, server=False)
    packet = bytearray(ours.seal(b"integrity"))
    packet[20] ^= 1
    assert theirs.open(bytes(packet)) is None
    packet = bytearray(theirs.seal(b"integrity"))
    packet[-1] ^= 1
    assert ours.open(bytes(packet)) is None


# -- signatures ------------------------------------------------------------------------------------


@pytest.fixture
def identity(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pong")])
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
           .sign(key, hashes.SHA256()))  # fmt: skip
    key_path, crt_path = tmp_path / "key.pem", tmp_path / "crt.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    crt_path.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    return key, key_path, crt_path


@pytest.mark.parametrize("md", [0, 672, 674])
def test_signatures_verify_across(
    c: ctypes.CDLL, identity: tuple[ec.EllipticCurvePrivateKey, Path, Path], md: int
) -> None:
    key, key_path, crt_path = identity
    pkp, crt, pub = c_void_p(), c_void_p(), c_void_p()
    assert c.crypt_load_privkey_file(str(key_path).encode(), byref(pkp)) == 0
    assert c.crypt_load_crt_file(str(crt_path).encode(), byref(crt)) == 0
    assert c.crypt_get_pubkey_crt(crt, byref(pub)) == 0
    msg = oap.plain_request(os.urandom(16), 1)
    sig = Buf()
    assert c.auth_sign(pkp, md, buf(msg), byref(sig)) == 0
    kex.verify(key.public_key(), md, msg, take(sig))
    assert c.auth_verify_sig(pub, md, buf(msg), buf(kex.sign(key, md, msg))) == 0
    assert c.auth_verify_sig(pub, md, buf(msg + b"!"), buf(kex.sign(key, md, msg))) != 0


# -- enc.conf ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "none\n",
        "kex=X25519\n",
        "kex = secp384r1\ncipher = chacha20-poly1305\nkdf=sha512\ndigest=sha3-256\n",
        "# comment\n\ncipher=aes-128-gcm\nnonsense line\nkem_mode=client\n",
        "kex=prime256v1\nnone\n",
    ],
    ids=["empty", "none", "x25519", "all", "comments", "none-late"],
)
def test_enc_conf_reads_as_c_reads_it(c: ctypes.CDLL, tmp_path: Path, text: str) -> None:
    path = tmp_path / "enc.conf"
    path.write_text(text)
    cfg = SecConfig()
    assert c.load_sec_config_file(byref(cfg), str(path).encode()) == 0
    ours = parse_enc_conf(text)
    assert (ours.kex, ours.kdf, ours.cipher, ours.md, int(ours.client_encap)) == (
        cfg.x.nid,
        cfg.k.nid,
        cfg.c.nid,
        cfg.d.nid,
        cfg.x.mode,
    )
