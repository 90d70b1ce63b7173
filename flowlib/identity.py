"""Who is at the other end of a flow (`flow.peer`), and the user's known names: the keys of the
servers they have reached, pinned as OpenSSH pins host keys in known_hosts.

The IRMd proves a peer holds its certificate's key and says whether the certificate chains to
its CA store; what it cannot vouch for, the user's own pins decide, here in the client.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pwd
from pathlib import Path

from proto import messages as m
from proto.errors import AuthenticationFailed, FlowError
from transports.unix import TrustError, check_dirs, check_trusted_file

KNOWN_NAMES_ENV = "OUROBOROS_KNOWN_NAMES"  # the file; default ~/.config/ouroboros/known_names
STRICT_ENV = "OUROBOROS_STRICT_NAMES"  # "yes" (default) or "accept-new", as ssh's StrictHostKeyChecking
MAX_KNOWN_NAMES = 1 << 20  # bytes of known_names read


@dataclasses.dataclass(frozen=True)
class Peer:
    """A flow's verified peer: whose certificate it is and why it is believed."""

    name: str  # the certificate's common name: the name served (a server), or the client's
    subject: str  # the whole subject, RFC 4514
    fingerprint: str  # of its public key, as OpenSSH prints one: SHA256:...
    verified: str  # "ca": chains to the IRMd's CA store; "pinned": in known_names; "new": pinned just now
    certificate: bytes  # DER

    @classmethod
    def of(cls, der: bytes, verified: str) -> Peer:
        from cryptography import x509  # only flows with identities pay for X.509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import NameOID

        from proto.oap import fingerprint

        crt = x509.load_der_x509_certificate(der)
        spki = crt.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
        cns = crt.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else ""
        return cls(cn if isinstance(cn, str) else cn.decode(errors="replace"), crt.subject.rfc4514_string(),
                   fingerprint(spki), verified, der)  # fmt: skip


def _home() -> Path:
    """$HOME when it is this user's; else the passwd entry's, as OpenSSH takes it: a HOME inherited
    from another user (su, setpriv) is not where this user's pins are."""
    home = os.environ.get("HOME")
    try:
        if home and os.stat(home).st_uid == os.geteuid():
            return Path(home)
    except OSError:
        pass
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:  # a uid without an account (a container's, setpriv's): no home, so no pins
        return Path("/nonexistent")


def known_names_path() -> Path:
    env = os.environ
    return _known_names_path(env.get(KNOWN_NAMES_ENV), env.get("XDG_CONFIG_HOME"), env.get("HOME"), os.geteuid())


@functools.lru_cache(maxsize=16)
def _known_names_path(file: str | None, xdg: str | None, _home_env: str | None, _euid: int) -> Path:
    """Looked up once per environment and user: every allocation asks (the home's owner is
    taken to stay who it was for the life of the process)."""
    if file:
        return Path(file)
    return Path(xdg or _home() / ".config") / "ouroboros" / "known_names"


class KnownNames:
    """The pins file: `NAME SHA256:FINGERPRINT [comment]` per line; a name may have several keys."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or known_names_path()

    def pins(self, name: str) -> list[str]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise FlowError(f"cannot read {self.path}: {e.strerror}") from None
        with open(fd, "rb") as f:
            try:  # the file opened, and every directory and link on the way to it, as OpenSSH's StrictModes
                check_trusted_file(self.path, os.fstat(fd), os.geteuid())
            except TrustError as e:
                raise AuthenticationFailed(f"not trusting the pins of {self.path}: {e.strerror}") from None
            text = f.read(MAX_KNOWN_NAMES).decode(errors="replace")
        out = []
        # Lines end at "\n" only, as written: str.splitlines would also end one at the other breaks
        # (\r, \x85, \u2028...) a certificate's subject may hold.
        for line in text.split("\n"):
            words = line.split()
            if len(words) >= 2 and not words[0].startswith("#") and words[0] == name:
                out.append(words[1])
        return out

    def add(self, name: str, peer: Peer) -> None:
        try:  # root with another user's XDG_CONFIG_HOME or HOME (sudo -E) must not write where they lead
            check_dirs(self.path.parent, os.geteuid(), strict_leaf=True, missing_ok=True)
        except TrustError as e:
            raise AuthenticationFailed(f"not pinning {name!r} in {self.path}: {e.strerror}") from None
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # in a directory no one else can change
        # The subject is the peer's choice: written printable only, so no break in it starts a line of
        # its own (a pin the peer chose for another name).
        comment = "".join(c if c.isprintable() else "?" for c in peer.subject)
        line = f"{name} {peer.fingerprint} {comment}\n".encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line)  # one write with O_APPEND: concurrent pins do not interleave
        finally:
            os.close(fd)


def server_identity(
    name: str, reply: m.FlowReply, accept_new: bool | None = None, known: KnownNames | None = None
) -> Peer | None:
    """The allocating side's check of who answered for `name`: a certificate the IRMd verified
    against its CA store; else the user's pin for the name (an unknown key only with accept-new,
    a changed one never); no certificate at all passes only for names with no pin."""
    if reply.peer_crt and reply.peer_ca:
        return Peer.of(reply.peer_crt, "ca")
    known = known or KnownNames()
    pins = known.pins(name)
    if not reply.peer_crt:
        if pins:
            raise AuthenticationFailed(f"{name!r} is known by key {pins[0]} ({known.path}), but its peer "
                                       f"proved no identity: refused")  # fmt: skip
        return None
    peer = Peer.of(reply.peer_crt, "pinned")
    if peer.fingerprint in pins:
        return peer
    if pins:
        raise AuthenticationFailed(
            f"the key of {name!r} has CHANGED: {known.path} has {', '.join(pins)}, the peer presented "
            f"{peer.fingerprint} ({peer.subject}); someone may be impersonating {name!r}. Refused; if the "
            f"change is expected, remove the old line from {known.path}"
        )
    if accept_new is None:  # asked only here: most allocations find their answer above
        accept_new = os.environ.get(STRICT_ENV, "yes") == "accept-new"
    if not accept_new:
        raise AuthenticationFailed(
            f"{name!r} presented key {peer.fingerprint} ({peer.subject}), which neither this IRMd's CA store "
            f"nor {known.path} vouches for; refused. Pin it with {STRICT_ENV}=accept-new (or accept_new=True), "
            f"or add `{name} {peer.fingerprint}` to {known.path}"
        )
    known.add(name, peer)
    return dataclasses.replace(peer, verified="new")


def client_identity(reply: m.FlowReply) -> Peer | None:
    """The accepting side: the IRMd refuses client certificates that do not chain to its CA store."""
    return Peer.of(reply.peer_crt, "ca") if reply.peer_crt and reply.peer_ca else None
