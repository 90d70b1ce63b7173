"""Test identities for OAP: CAs, intermediates and name certificates written where an IRMd's
security directory expects them (server/<name>/crt.pem, key.pem; cacert/), with 0600 keys."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


def new_key(kind: str = "p256") -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP384R1() if kind == "p384" else ec.SECP256R1())


def certificate(
    cn: str,
    key: Key,
    issuer: tuple[x509.Certificate, Key] | None = None,
    *,
    ca: bool = False,
    path_length: int | None = None,
    days: int = 30,
    start: datetime.datetime | None = None,
) -> x509.Certificate:
    """A certificate for `cn`: self-signed without an issuer; a CA (basicConstraints CA:TRUE, with
    `path_length` if given) if asked."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = start or NOW - DAY
    builder = (x509.CertificateBuilder().subject_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + DAY + datetime.timedelta(days=days)))  # fmt: skip
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
    signer_crt, signer_key = issuer if issuer else (None, key)
    builder = builder.issuer_name(signer_crt.subject if signer_crt else name)
    algo = None if isinstance(signer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer_key, algo)


def pem(crt: x509.Certificate) -> bytes:
    return crt.public_bytes(serialization.Encoding.PEM)


def write_identity(directory: Path, crt: x509.Certificate, key: Key) -> None:
    """crt.pem and key.pem (mode 0600) in `directory`, as 0.23 keeps a name's credentials."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "crt.pem").write_bytes(pem(crt))
    key_path = directory / "key.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    key_path.chmod(0o600)


class Pki:
    """One security directory (what OUROBOROS_SECURITY_DIR names) and a root CA to issue from."""

    def __init__(self, base: Path, ca_name: str = "Test Root CA") -> None:
        self.base = base
        self.ca_key = new_key()
        self.ca = certificate(ca_name, self.ca_key, ca=True)

    def trust(self, crt: x509.Certificate | None = None, filename: str = "root.pem") -> None:
        """Put a certificate (the root by default) in the CA store."""
        store = self.base / "cacert"
        store.mkdir(parents=True, exist_ok=True)
        (store / filename).write_bytes(pem(crt or self.ca))

    def issue(self, cn: str, kind: str = "p256", **kw: object) -> tuple[x509.Certificate, Key]:
        key = new_key(kind)
        return certificate(cn, key, (self.ca, self.ca_key), **kw), key  # type: ignore[arg-type]

    def serve_as(self, name: str, crt: x509.Certificate, key: Key, role: str = "server") -> None:
        write_identity(self.base / role / name, crt, key)

    def enc_conf(self, name: str, text: str, role: str = "server") -> None:
        directory = self.base / role / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "enc.conf").write_text(text)
