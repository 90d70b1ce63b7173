"""Who may speak in a unicast layer: the layer key's authenticated key exchange, per-PDU seals
with a replay window between neighbours, and the signing keys by which members speak for themselves.

The layer key never travels. Both ends of an enrollment or adjacency mix it with fresh X25519
ephemerals and nonces into session keys (one per direction) and prove them over the transcript.
Every SDU after that carries a sequence number and a keyed BLAKE2b tag. Inside the layer, each
member signs what only it may say (its LSU, its directory entries) with an Ed25519 key kept 0600
per IPCP; the first key seen for an address or name is bound to it (`Bindings`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import struct
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

log = logging.getLogger(__name__)

NONCE = 32  # bytes of a handshake nonce
EPH = 32  # bytes of an X25519 public key
MAC = 32  # bytes of a handshake confirmation
TAG = 16  # bytes of a per-PDU tag
PUB = 32  # bytes of an Ed25519 public key
SIG = 64  # bytes of an Ed25519 signature
WINDOW = 256  # sequence numbers a receiver accepts out of order (datagrams below may reorder)
_SEQ = struct.Struct("!Q")
_unpack_seq = _SEQ.unpack_from
_WINDOW_MASK = (1 << WINDOW) - 1
SEAL = _SEQ.size + TAG  # bytes a seal adds to a PDU


class AuthError(Exception):
    """A PDU or handshake that does not prove itself."""


class Forged(AuthError):
    """A tag, confirmation or signature that does not verify."""


class Replayed(AuthError):
    """A sequence number already seen, or too old to tell."""


def layer_psk(key: str) -> bytes:
    """The secret both ends mix into every exchange; the key itself is never used on the wire."""
    return hashlib.blake2b(key.encode(), digest_size=32, person=b"ouro-layer-psk").digest()


def _kdf(prk: bytes, label: bytes) -> bytes:
    return hashlib.blake2b(label, key=prk, digest_size=32).digest()


class KeyExchange:
    """One end of a handshake: a nonce and an X25519 ephemeral, completed with the peer's."""

    def __init__(self, psk: bytes) -> None:
        self.psk = psk
        self.nonce = os.urandom(NONCE)
        self._priv = nacl.public.PrivateKey.generate()
        self.eph = bytes(self._priv.public_key)

    def complete(self, peer_eph: bytes, transcript: bytes, initiator: bool) -> Session:
        """Session keys bound to the transcript (both hellos, nonces included); Forged if the
        peer's ephemeral is malformed or degenerate."""
        if len(peer_eph) != EPH:
            raise Forged(f"ephemeral key of {len(peer_eph)} bytes")
        try:
            shared = nacl.bindings.crypto_scalarmult(bytes(self._priv), peer_eph)
        except (nacl.exceptions.CryptoError, RuntimeError, ValueError) as e:
            raise Forged(f"degenerate ephemeral key: {e}") from None
        th = hashlib.blake2b(transcript, digest_size=32).digest()
        prk = hashlib.blake2b(shared + th, key=self.psk, digest_size=32, person=b"ouro-handshake").digest()
        i2r, r2i = _kdf(prk, b"i2r"), _kdf(prk, b"r2i")
        return Session(prk, th, i2r if initiator else r2i, r2i if initiator else i2r)


class Session:
    """What a completed exchange yields: confirmations for each role and the per-direction keys."""

    def __init__(self, prk: bytes, transcript_hash: bytes, tx: bytes, rx: bytes) -> None:
        self._confirm = _kdf(prk, b"confirm")
        self._th = transcript_hash
        self.tx, self.rx = tx, rx

    def confirmation(self, role: bytes) -> bytes:
        return hmac.new(self._confirm, role + self._th, hashlib.blake2b).digest()[:MAC]

    def check(self, role: bytes, mac: bytes) -> None:
        if not hmac.compare_digest(mac, self.confirmation(role)):
            raise Forged("handshake confirmation does not verify: not a member of this layer")


class Sealer:
    """Seals the PDUs one end sends on one N-1 flow: sequence number, PDU, tag. One thread only."""

    def __init__(self, key: bytes) -> None:
        self._mac = hashlib.blake2b(key=key, digest_size=TAG)
        self.seq = 0

    def seal(self, *parts: bytes | bytearray | memoryview) -> tuple[bytes | bytearray | memoryview, ...]:
        self.seq += 1
        seq = _SEQ.pack(self.seq)
        h = self._mac.copy()
        h.update(seq)
        for p in parts:
            h.update(p)
        return (seq, *parts, h.digest())

    def seal_bytes(self, pdu: bytes) -> bytes:
        return b"".join(self.seal(pdu))


class Opener:
    """Checks the PDUs that arrive on one N-1 flow; raises Forged or Replayed. One thread only.

    Sequence numbers seen are kept as IPsec keeps them: the highest, and a bitmap of the WINDOW
    below it (bit i: top - i seen), so datagrams reordered below are taken, each once.
    """

    def __init__(self, key: bytes) -> None:
        self._mac = hashlib.blake2b(key=key, digest_size=TAG)
        self.top = 0
        self._bits = 0

    def open(self, pdu: bytes) -> memoryview:
        if len(pdu) < SEAL:
            raise Forged(f"PDU of {len(pdu)} bytes is shorter than its seal")
        seq = _unpack_seq(pdu)[0]
        top = self.top
        if seq <= top and (seq == 0 or top - seq >= WINDOW or self._bits >> (top - seq) & 1):
            raise Replayed(f"sequence number {seq} seen or too old")
        view = memoryview(pdu)
        h = self._mac.copy()
        h.update(view[:-TAG])
        if not hmac.compare_digest(h.digest(), pdu[-TAG:]):
            raise Forged("PDU tag does not verify")
        if seq > top:  # only now: a forged PDU must not move the window
            shift = seq - top
            self._bits = (self._bits << shift | 1) & _WINDOW_MASK if shift < WINDOW else 1
            self.top = seq
        else:
            self._bits |= 1 << (top - seq)
        return view[_SEQ.size : -TAG]


# -- members' own keys ---------------------------------------------------------------------------


def state_dir() -> Path:
    """Where IPCPs keep what outlives them: $OUROBOROS_STATE_DIR, else /var/lib/ouroboros (root)
    or $XDG_STATE_HOME/ouroboros."""
    if env := os.environ.get("OUROBOROS_STATE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/ouroboros")
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "ouroboros"


class Identity:
    """A member's Ed25519 signing key: made once per IPCP name, kept 0600, refused if others can read it."""

    def __init__(self, key: nacl.signing.SigningKey) -> None:
        self._key = key
        self.pub = bytes(key.verify_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load(cls, path: Path) -> Identity:
        """The key at `path`, made if missing; ValueError if it is not ours alone or not a key."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            key = nacl.signing.SigningKey.generate()
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(key))
            log.info("made the member key %s", path)
            return cls(key)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                raise ValueError(f"{path}: a member key must be owned by uid {os.geteuid()} and mode 0600")
            seed = f.read(64)
        if len(seed) != 32:
            raise ValueError(f"{path}: not a member key ({len(seed)} bytes, expected 32)")
        return cls(nacl.signing.SigningKey(seed))

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data).signature


def verify(pub: bytes, data: bytes, sig: bytes) -> None:
    """Forged unless `sig` is `pub`'s signature of `data`."""
    if len(pub) != PUB or len(sig) != SIG:
        raise Forged("malformed key or signature")
    try:
        nacl.signing.VerifyKey(pub).verify(data, sig)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as e:
        raise Forged(f"signature does not verify: {e}") from None


class Bindings:
    """Which member key speaks for an address and for a member name: the first seen, until released.

    A member back under a new address (a reboot) signs with the key it kept: its name follows it.
    Another key claiming a bound address or name is refused.
    """

    def __init__(self) -> None:
        self.by_addr: dict[int, bytes] = {}
        self.by_name: dict[str, bytes] = {}
        self._name_of: dict[int, str] = {}

    def admit(self, addr: int, name: str, pub: bytes) -> None:
        """Bind (or confirm) `pub` for `addr` and `name`; Forged if another key holds either."""
        held = self.by_addr.get(addr)
        if held is not None and held != pub:
            raise Forged(f"address {addr} belongs to another member key")
        if name and (owner := self.by_name.get(name)) is not None and owner != pub:
            raise Forged(f"name {name!r} belongs to another member key")
        self.by_addr[addr] = pub
        if name:
            self.by_name[name] = pub
            old = self._name_of.get(addr)
            self._name_of[addr] = name
            if old is not None and old != name:
                # A member renaming itself lets go of its old name: else each LSU under a new name would
                # bind one more, for good, to its key (a table without bound, and names squatted on).
                self._release_name(old)

    def release(self, addr: int) -> None:
        """The member at `addr` is gone: its address is free, and its name once no address holds it."""
        self.by_addr.pop(addr, None)
        name = self._name_of.pop(addr, None)
        if name is not None:
            self._release_name(name)

    def _release_name(self, name: str) -> None:
        """`name` is free once no address holds it."""
        if name not in self._name_of.values():
            self.by_name.pop(name, None)
