"""Keys and certificates for OAP: a name's credentials (crt.pem and key.pem, refused when the key
is readable by others, as OpenSSH's StrictModes), and the CA store that verifies a peer's chain.

Files are parsed once and again only when they change; every failure says which file and why.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from irmd.kex import SigningKey
from irmd.secfiles import read_file
from proto.oap import EAUTH, OapError

log = logging.getLogger("irmd.credentials")

MAX_CHAIN = 8  # certificates between a peer and a trust anchor, the peer's own included
MAX_FILE = 1 << 20  # a credential or CA file larger than this is not one
_SHA256 = hashes.SHA256()
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class CredentialError(Exception):
    """A name's key or certificate that cannot be used; the text names the file."""


class Credentials:
    """A name's identity: its certificate and the private key that proves it."""

    def __init__(self, crt: x509.Certificate, key: SigningKey) -> None:
        self.crt, self.key = crt, key
        self.der = crt.public_bytes(serialization.Encoding.DER)


def common_name(crt: x509.Certificate) -> str:
    """The certificate's CN, which 0.23 compares with the name (crypt_get_crt_name)."""
    cns = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


def spki(crt: x509.Certificate) -> bytes:
    """The certificate's public key as SubjectPublicKeyInfo DER: what fingerprints and pins name."""
    return crt.public_key().public_bytes(serialization.Encoding.DER, _SPKI)


def load_der(der: bytes) -> x509.Certificate:
    """A peer's certificate, every part OAP reads parsed now: the library parses the key, names and
    extensions only when asked, so a certificate that loads may still hold a key that does not."""
    try:
        crt = x509.load_der_x509_certificate(der)
        crt.public_key(), crt.subject, crt.issuer, crt.extensions, crt.signature_hash_algorithm
    except (
        ValueError,
        TypeError,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
        UnsupportedAlgorithm,
    ) as e:
        raise OapError(EAUTH, f"peer's certificate does not parse: {e}") from None
    return crt


def _stamp(path: Path | str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode


def _read(path: Path | str, private: bool) -> bytes:
    try:
        return read_file(str(path), MAX_FILE, private)
    except PermissionError as e:
        raise CredentialError(str(e)) from None


class CredentialStore:
    """Credentials by (certificate, key) path, reloaded when either file changes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[Any, Credentials]] = {}

    def load(self, crt_path: str, key_path: str) -> Credentials | None:
        """None when either file is missing (the name has no identity, as 0.23)."""
        try:
            stamp = (_stamp(crt_path), _stamp(key_path))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CredentialError(f"cannot read {e.filename}: {e.strerror}") from None
        cached = self._cache.get((crt_path, key_path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        creds = self._parse(crt_path, key_path)
        self._cache[(crt_path, key_path)] = (stamp, creds)
        return creds

    @staticmethod
    def _parse(crt_path: str, key_path: str) -> Credentials:
        try:
            crt = x509.load_pem_x509_certificate(_read(crt_path, private=False))
        except (OSError, ValueError) as e:
            raise CredentialError(f"{crt_path}: not a PEM certificate: {e}") from None
        try:
            key = serialization.load_pem_private_key(_read(key_path, private=True), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise CredentialError(f"{key_path}: not an unencrypted PEM private key: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
                          | ed448.Ed448PrivateKey):  # fmt: skip
            raise CredentialError(f"{key_path}: a {type(key).__name__} cannot sign OAP headers")
        public = key.public_key().public_bytes(serialization.Encoding.DER, _SPKI)
        if public != spki(crt):
            raise CredentialError(f"{key_path} is not the key of {crt_path}")
        return Credentials(crt, key)


class CaStore:
    """The trusted certificates of <security dir>/cacert (every file in it, as 0.23 loads them),
    reread when the directory changes. A peer's certificate verifies when a chain of valid
    signatures by CA certificates leads from it to a self-signed certificate in the store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: object = None
        self._by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        self._anchors: set[bytes] = set()

    def _refresh(self) -> None:
        try:
            entries = sorted(p for p in self.directory.iterdir() if p.is_file())
            stamp = [(p.name, *_stamp(p)) for p in entries]
        except OSError:
            entries, stamp = [], []
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._by_subject, self._anchors = {}, set()
        for path in entries:
            try:
                certs = x509.load_pem_x509_certificates(_read(path, private=False))
            except (OSError, ValueError, CredentialError) as e:
                log.warning("CA store: skipping %s: %s", path, e)
                continue
            for crt in certs:
                self._by_subject.setdefault(crt.subject, []).append(crt)
                self._anchors.add(crt.fingerprint(_SHA256))
        if entries:
            log.info("CA store: %d certificates from %s", len(self._anchors), self.directory)

    @property
    def configured(self) -> bool:
        """The store holds a trust anchor: this host's clients can verify a name's certificate."""
        self._refresh()
        return bool(self._anchors)

    def verify(self, crt: x509.Certificate, now: datetime.datetime | None = None) -> None:
        """Raise OapError(EAUTH) with the reason unless `crt` chains to the store."""
        self._refresh()
        now = now or datetime.datetime.now(datetime.UTC)
        cert = crt
        below = 0  # CA certificates between `cert`'s issuer and the peer's (self-issued ones not counted)
        for depth in range(MAX_CHAIN):
            _check_validity(cert, now)
            if cert.issuer == cert.subject and cert.fingerprint(_SHA256) in self._anchors:
                try:
                    cert.verify_directly_issued_by(cert)
                except (InvalidSignature, ValueError, TypeError):
                    raise OapError(EAUTH, "a CA certificate's own signature does not verify") from None
                return
            if depth and cert.issuer != cert.subject:
                below += 1  # `cert` is a CA certificate between the peer's and the next issuer
            cert = self._issuer(cert, below)
        raise OapError(EAUTH, f"certificate chain longer than {MAX_CHAIN}")

    def _issuer(self, cert: x509.Certificate, below: int) -> x509.Certificate:
        """The CA in the store that signed `cert`, with `below` CA certificates under `cert` in the
        chain (its path length constraint must allow them)."""
        for issuer in self._by_subject.get(cert.issuer, []):
            if issuer == cert:
                continue
            try:
                cert.verify_directly_issued_by(issuer)
            except (InvalidSignature, ValueError, TypeError):
                continue
            _check_ca(issuer, below)
            return issuer
        who = cert.issuer.rfc4514_string() or "(empty)"
        raise OapError(EAUTH, f"certificate of {cert.subject.rfc4514_string()!r} is not signed by a CA "
                              f"in {self.directory} (issuer {who!r})")  # fmt: skip


def _check_validity(cert: x509.Certificate, now: datetime.datetime) -> None:
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        span = f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
        raise OapError(EAUTH, f"certificate of {cert.subject.rfc4514_string()!r} is not valid now ({span})")


def _check_ca(cert: x509.Certificate, below: int = 0) -> None:
    """An issuer must be a CA: basicConstraints CA:TRUE, a path length constraint (if it has one) of
    at least the `below` CA certificates under it in the chain (as OpenSSL's X509_verify_cert, which
    0.23 uses), and keyCertSign if it limits its key usage."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise OapError(EAUTH, f"{cert.subject.rfc4514_string()!r} signed a certificate but is not a CA")
    if bc.path_length is not None and below > bc.path_length:
        raise OapError(EAUTH, f"{cert.subject.rfc4514_string()!r} may have {bc.path_length} CA certificate"
                              f"{'s' * (bc.path_length != 1)} under it (path length), not {below}")  # fmt: skip
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise OapError(EAUTH, f"{cert.subject.rfc4514_string()!r} may not sign certificates (key usage)")
