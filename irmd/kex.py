"""The cryptography under OAP, as Ouroboros 0.23's src/lib/crypt/openssl.c does it: ephemeral
ECDH (P-256/384/521, X25519, X448) with HKDF over the two public keys, and signatures by NID.

Every failure is an OapError, so a hostile key or signature ends one allocation, nothing more.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, x448, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proto import oap
from proto.oap import EAUTH, ECRYPT, OapError

KEY_SIZE = 32  # SYMMKEYSZ: one symmetric key, both directions
HKDF_INFO_DHE = b"o7s-ossl-dhe"
CURVES: dict[int, type[ec.EllipticCurve]] = {415: ec.SECP256R1, 715: ec.SECP384R1, 716: ec.SECP521R1}
CURVE_NIDS = {"secp256r1": 415, "secp384r1": 715, "secp521r1": 716}
X25519, X448 = 1034, 1035
SUPPORTED_KEX = (*CURVES, X25519, X448)
HASHES: dict[int, hashes.HashAlgorithm] = {
    672: hashes.SHA256(), 673: hashes.SHA384(), 674: hashes.SHA512(),
    1097: hashes.SHA3_256(), 1098: hashes.SHA3_384(), 1099: hashes.SHA3_512(),
    1056: hashes.BLAKE2b(64), 1057: hashes.BLAKE2s(32),
}  # fmt: skip

KexKey = ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey | x448.X448PrivateKey
SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
DER, SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def check_kex(nid: int) -> None:
    """Refuse, with the reason, a key exchange this implementation cannot do."""
    if nid not in SUPPORTED_KEX:
        name = oap.KEXES.get(nid, f"NID {nid}")
        raise OapError(ECRYPT, f"key exchange {name} is not supported here (supported: "
                               f"{', '.join(oap.KEXES[n] for n in SUPPORTED_KEX)})")  # fmt: skip


def keypair(nid: int) -> KexKey:
    """A fresh ephemeral key for the exchange `nid` names."""
    check_kex(nid)
    if nid == X25519:
        return x25519.X25519PrivateKey.generate()
    if nid == X448:
        return x448.X448PrivateKey.generate()
    return ec.generate_private_key(CURVES[nid]())


def public_der(key: KexKey) -> bytes:
    """The kex data OAP carries: the public key, X.509 SubjectPublicKeyInfo DER (i2d_PUBKEY)."""
    return key.public_key().public_bytes(DER, SPKI)


def _load_peer(der: bytes) -> ec.EllipticCurvePublicKey | x25519.X25519PublicKey | x448.X448PublicKey:
    try:
        pub = serialization.load_der_public_key(der)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # a peer may name any algorithm
        raise OapError(ECRYPT, f"peer's public key does not parse: {e}") from None
    if isinstance(pub, ec.EllipticCurvePublicKey | x25519.X25519PublicKey | x448.X448PublicKey):
        return pub
    raise OapError(ECRYPT, f"peer's public key is a {type(pub).__name__}, not a key-exchange key")


def peer_kex(der: bytes) -> int:
    """The exchange the peer chose, from its public key (as openssl_get_algo_from_pk_der)."""
    pub = _load_peer(der)
    if isinstance(pub, x25519.X25519PublicKey):
        return X25519
    if isinstance(pub, x448.X448PublicKey):
        return X448
    nid: int | None = CURVE_NIDS.get(pub.curve.name)
    if nid is None:
        raise OapError(ECRYPT, f"peer's key is on curve {pub.curve.name}, which OAP does not use")
    return nid


def derive(key: KexKey, peer_der: bytes, kdf_nid: int) -> bytes:
    """The flow's symmetric key: HKDF(kdf digest, ECDH secret, salt = SHA-256 of the two public
    keys' DER in byte order, info "o7s-ossl-dhe"). A low-order or off-curve key raises."""
    pub = _load_peer(peer_der)
    try:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != key.curve.name:
                raise OapError(ECRYPT, "peer's public key is not on our curve")
            secret = key.exchange(ec.ECDH(), pub)
        elif isinstance(key, x25519.X25519PrivateKey):
            if not isinstance(pub, x25519.X25519PublicKey):
                raise OapError(ECRYPT, "peer's public key is not an X25519 key")
            secret = key.exchange(pub)
        elif isinstance(pub, x448.X448PublicKey):
            secret = key.exchange(pub)
        else:
            raise OapError(ECRYPT, "peer's public key is for another key exchange")
    except ValueError as e:  # e.g. an all-zero X25519 secret from a low-order point
        raise OapError(ECRYPT, f"key agreement failed: {e}") from None
    local = public_der(key)
    salt = hashlib.sha256(min(local, peer_der) + max(local, peer_der)).digest()
    return hkdf(secret, kdf_nid, salt, HKDF_INFO_DHE)


def hkdf(secret: bytes, kdf_nid: int, salt: bytes, info: bytes) -> bytes:
    """HKDF to a 32-byte key; kdf 0 means SHA-256, as 0.23's fallback."""
    algo = HASHES.get(kdf_nid, hashes.SHA256())
    return HKDF(algorithm=algo, length=KEY_SIZE, salt=salt, info=info).derive(secret)


# -- signatures (openssl_sign / openssl_verify_sig) ----------------------------------------------


def _md(md_nid: int) -> hashes.HashAlgorithm:
    return HASHES.get(md_nid, hashes.SHA256())  # 0: OpenSSL's default digest for EC and RSA keys


def sign(key: SigningKey, md_nid: int, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(_md(md_nid)))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), _md(md_nid))
    return key.sign(data)  # EdDSA signs the message itself


def verify(pub: object, md_nid: int, data: bytes, sig: bytes) -> None:
    """Raise OapError(EAUTH) unless `sig` is the holder of `pub`'s signature over `data`."""
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, data, ec.ECDSA(_md(md_nid)))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, data, padding.PKCS1v15(), _md(md_nid))
        elif isinstance(pub, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            pub.verify(sig, data)
        else:
            raise OapError(EAUTH, f"certificate key type {type(pub).__name__} cannot sign OAP headers")
    except InvalidSignature:
        raise OapError(EAUTH, "signature does not verify") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # e.g. a digest the key type cannot use
        raise OapError(EAUTH, f"signature does not verify: {e}") from None
