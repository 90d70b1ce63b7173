"""The netplumb session: a sans-IO state machine for the handshake and the encrypted packets after it.

Fed whole packets (bytes), it returns events and queues the bytes to send; it never touches a flow.
Each end's handshake is a table of (state, packet type) -> handler; any other packet is an error.
The cipher is agreed in the hellos: the client offers, the server picks, the transcript binds both.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NoReturn

from nacl import bindings as nb  # imported first: it initialises libsodium (CPU features included)
from nacl._sodium import ffi, lib

from apps.netplumb import wire
from apps.netplumb.keys import Identity, verify
from apps.netplumb.wire import Fields, Packet, WireError
from transports.records import FrozenRecord, frozen_record

log = logging.getLogger(__name__)

VERSION = "1"
KEY_BYTES = 32
SERVER_PROOF = b"netplumb-v1 server proof\0"
CLIENT_PROOF = b"netplumb-v1 client proof\0"
KEYS_PERSON = b"netplumb-v1 keys"  # BLAKE2b's personalisation for the session keys


class SessionError(Exception):
    """The session cannot go on: bad packet, failed authentication, or the peer's ERROR."""


class UnexpectedPacket(SessionError):
    """A packet its state has no place for."""


class HandshakeFailed(SessionError):
    """The peer's hello or proof does not hold: version, keys, signature."""


class Tampered(SessionError):
    """A sealed packet did not open: wrong key, or changed on the way."""


class NotAdmitted(SessionError):
    """The server does not admit this client (the reason went to the client)."""


class State(enum.Enum):
    IDLE = "idle"  # client: hello not sent yet
    HELLO_SENT = "hello sent"  # client waits for the server's hello
    WAIT_HELLO = "wait hello"  # server waits for the client's hello
    AUTH_SENT = "auth sent"  # client waits for welcome
    WAIT_AUTH = "wait auth"  # server waits for the client's proof
    ESTABLISHED = "established"
    CLOSED = "closed"


# -- events ---------------------------------------------------------------------


@frozen_record
class ServerKey(FrozenRecord):
    """Client: the server proved it holds this long-term key (already accepted by check_host)."""

    public: bytes


@frozen_record
class Established(FrozenRecord):
    """The handshake is done; peer is the other side's long-term key."""

    peer: bytes


@frozen_record
class Message(FrozenRecord):
    """An encrypted packet (type >= 20) that arrived and authenticated."""

    type: int
    fields: Fields


@frozen_record
class PeerError(FrozenRecord):
    """The peer sent ERROR: it ends the session."""

    message: str


Event = ServerKey | Established | Message | PeerError
Handshake = dict[tuple[State, int], Callable[[Any, Fields], list[Event]]]


@frozen_record
class Aead(FrozenRecord):
    """An AEAD of libsodium's, by its name in the hellos: its nonce and tag sizes and its two calls."""

    name: str
    nonce_bytes: int
    tag_bytes: int
    encrypt: Callable[..., int]
    decrypt: Callable[..., int]


CHACHA20_POLY1305 = Aead(
    "chacha20-poly1305",
    12,
    16,
    lib.crypto_aead_chacha20poly1305_ietf_encrypt,
    lib.crypto_aead_chacha20poly1305_ietf_decrypt,
)
# AEGIS-256 (libsodium 1.0.19 on): about fifteen times ChaCha20-Poly1305's speed on a CPU with AES
# instructions, and far slower without them; 256-bit key, nonce and tag.
AEGIS256 = (
    Aead("aegis256", 32, 32, lib.crypto_aead_aegis256_encrypt, lib.crypto_aead_aegis256_decrypt)
    if hasattr(lib, "crypto_aead_aegis256_encrypt")
    else None
)
AEADS = {a.name: a for a in (AEGIS256, CHACHA20_POLY1305) if a is not None}


def fast_aeads() -> tuple[Aead, ...]:
    """The AEADs this machine runs fast, the fastest first: what we offer, or accept, in a hello."""
    aes = AEGIS256 is not None and lib.crypto_aead_aes256gcm_is_available() == 1  # AES-NI and PCLMUL
    return (AEGIS256, CHACHA20_POLY1305) if aes and AEGIS256 is not None else (CHACHA20_POLY1305,)


def _agreement(offer: Sequence[bytes], chosen: str) -> bytes:
    """The cipher negotiation as the transcript takes it: each end signs what it saw offered and chosen."""
    return wire.encode_pairs(wire.Fields([*(b for o in offer for b in (b"cipher", o)), b"chosen", chosen.encode()]))


class _Cipher:
    """One direction: the agreed AEAD, its key, and the packet counter both sides keep as the nonce.

    libsodium through pynacl's cffi module with a buffer kept per direction (nacl.bindings checks
    and copies its arguments on every call)."""

    def __init__(self, aead: Aead, key: bytes) -> None:
        self.aead = aead
        self.key = key
        self.counter = 0
        self._pad = bytes(aead.nonce_bytes - 8)
        self._out = ffi.new("unsigned char[]", wire.MAX_PACKET)
        self._len = ffi.new("unsigned long long *")

    def _nonce(self) -> bytes:
        nonce = self._pad + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    def seal(self, plain: bytes, aad: bytes) -> bytes:
        if len(plain) + self.aead.tag_bytes > wire.MAX_PACKET:
            raise WireError(f"{len(plain)} bytes are too many to seal into one packet")
        self.aead.encrypt(self._out, self._len, plain, len(plain), aad, len(aad), ffi.NULL, self._nonce(), self.key)
        return ffi.buffer(self._out, self._len[0])[:]  # type: ignore[no-any-return]

    def open(self, sealed: bytes, aad: bytes) -> bytes | None:
        """The plain text, or None if the packet does not authenticate."""
        nonce = self._nonce()
        if not self.aead.tag_bytes <= len(sealed) <= wire.MAX_PACKET:
            return None
        if self.aead.decrypt(self._out, self._len, ffi.NULL, sealed, len(sealed), aad, len(aad), nonce, self.key) != 0:
            return None
        return ffi.buffer(self._out, self._len[0])[:]  # type: ignore[no-any-return]


def session_keys(shared: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """The client-to-server and server-to-client keys: BLAKE2b-512 of the X25519 shared secret and
    the transcript, personalised with KEYS_PERSON. libsodium's BLAKE2b: importing hashlib's would load
    OpenSSL, 3-5 ms of every plumb's start."""
    okm: bytes = nb.crypto_generichash_blake2b_salt_personal(shared + transcript, digest_size=64, person=KEYS_PERSON)
    return okm[:32], okm[32:]


class Session:
    """Common to both ends: sequence numbers, encryption, the outgoing queue."""

    def __init__(self, identity: Identity, aeads: Sequence[Aead] | None = None) -> None:
        self.identity = identity
        self.aeads = tuple(aeads) if aeads is not None else fast_aeads()  # ours, the preferred first
        self.max_packet = wire.MAX_PACKET  # the flow's MTU, when it is smaller
        self.state = State.IDLE
        self.peer: bytes | None = None
        self._enc = wire.Encoder()
        self._dec = wire.Decoder(whole=True)  # one or more whole packets per flow SDU
        self._eph_secret = nb.randombytes(KEY_BYTES)
        self.eph_public: bytes = nb.crypto_scalarmult_base(self._eph_secret)
        self._tx: _Cipher | None = None
        self._rx: _Cipher | None = None
        self._transcript = b""
        self._out: list[bytes] = []

    # -- the caller's side -------------------------------------------------------

    @property
    def room(self) -> int:
        """The most plain text one packet carries, with the agreed cipher."""
        tag = self._tx.aead.tag_bytes if self._tx is not None else 0
        return min(self.max_packet, wire.MAX_PACKET) - wire.HEADER_SIZE - tag

    def data_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def has_output(self) -> bool:
        return bool(self._out)

    @property
    def keyed(self) -> bool:
        """Keys are agreed: the peer may have sealed packets on the way."""
        return self._rx is not None

    def send(self, ptype: int, fields: Fields | bytes) -> bytes:
        """Seal one message of the established session (its fields, or their encoding already made);
        returns its bytes (also for direct writes)."""
        if self.state not in self.SENDS_IN:
            raise SessionError(f"cannot send {wire.TYPE_NAMES.get(ptype, ptype)} in state {self.state.value}")
        return self._packet(ptype, fields)

    def error(self, message: str) -> bytes:
        """The packet that ends this session with a reason, and close: ERROR, sealed, once a key is
        agreed; before that REFUSE, in clear."""
        out = self._packet(wire.ERROR if self._tx is not None else wire.REFUSE, Fields.of(message=message))
        self.state = State.CLOSED
        return out

    def receive(self, data: bytes) -> list[Event]:
        """Feed received bytes; raises SessionError (and closes) on anything wrong."""
        if self.state is State.CLOSED:
            raise SessionError("the session is closed")
        try:
            events: list[Event] = []
            for packet in self._dec.feed(data):
                events.extend(self._handle(packet))
            return events
        except SessionError:
            self.state = State.CLOSED
            raise
        except WireError as e:
            self.state = State.CLOSED
            raise SessionError(str(e)) from None

    # -- internals ------------------------------------------------------------------

    def _packet(self, ptype: int, fields: Fields | bytes) -> bytes:
        plain = fields if isinstance(fields, bytes) else wire.encode_pairs(fields)
        seq = self._enc.next()
        if ptype >= wire.ENCRYPTED_FROM:
            assert self._tx is not None
            payload = self._tx.seal(plain, Packet(seq, ptype, b"").aad)
        else:
            payload = plain
        return wire.encode(Packet(seq, ptype, payload))

    def _queue(self, ptype: int, fields: Fields) -> None:
        self._out.append(self._packet(ptype, fields))

    def _open(self, packet: Packet) -> Fields:
        if packet.type < wire.ENCRYPTED_FROM:
            return wire.decode_pairs(packet.payload)
        if self._rx is None:
            raise Tampered(f"encrypted packet type {packet.type} before any key was agreed")
        plain = self._rx.open(packet.payload, packet.aad)
        if plain is None:
            raise Tampered("a packet failed authentication: wrong session key, or it was tampered with")
        return wire.decode_pairs(plain)

    def _keys(self, peer_eph: bytes, aead: Aead, client: bool) -> None:
        if len(peer_eph) != KEY_BYTES:
            raise HandshakeFailed("the peer's ephemeral key is not 32 bytes")
        try:
            shared = nb.crypto_scalarmult(self._eph_secret, peer_eph)
        except Exception:  # nacl raises RuntimeError on a low-order point
            raise HandshakeFailed("the peer's ephemeral key is unusable") from None
        if shared == bytes(KEY_BYTES):
            raise HandshakeFailed("the peer's ephemeral key is unusable (all-zero shared secret)")
        c2s_key, s2c_key = session_keys(shared, self._transcript)
        c2s, s2c = _Cipher(aead, c2s_key), _Cipher(aead, s2c_key)
        self._tx, self._rx = (c2s, s2c) if client else (s2c, c2s)

    # (state, packet type) -> what to do; each end fills in its handshake.
    HANDSHAKE: ClassVar[Handshake] = {}
    SENDS_IN: ClassVar[frozenset[State]] = frozenset({State.ESTABLISHED})  # where send() may seal

    def _handle(self, packet: Packet) -> list[Event]:
        fields = self._open(packet)
        handler = self.HANDSHAKE.get((self.state, packet.type))
        if handler is not None:
            return handler(self, fields)
        if packet.type == wire.ERROR:
            self.state = State.CLOSED
            return [PeerError(fields.get("message", "(no message)") or "")]
        if self.state is not State.ESTABLISHED or packet.type < wire.FIRST_SESSION_TYPE:
            raise UnexpectedPacket(
                f"unexpected {wire.TYPE_NAMES.get(packet.type, packet.type)} packet in state {self.state.value}"
            )
        return [Message(packet.type, fields)]


class ClientSession(Session):
    """The allocating side. check_host(server_key) raises to refuse the server's key."""

    def __init__(
        self, identity: Identity, check_host: Callable[[bytes], object], aeads: Sequence[Aead] | None = None
    ) -> None:
        super().__init__(identity, aeads)
        self.check_host = check_host

    def start(self) -> None:
        if self.state is not State.IDLE:
            raise UnexpectedPacket("the handshake was already started")
        self._queue(
            wire.HELLO,
            Fields.of(
                ("version", VERSION), ("eph", wire.b64(self.eph_public)), *(("cipher", a.name) for a in self.aeads)
            ),
        )
        self.state = State.HELLO_SENT

    def _on_refuse(self, fields: Fields) -> list[Event]:
        self.state = State.CLOSED
        return [PeerError(fields.get("message") or "(no message)")]

    def _on_hello(self, fields: Fields) -> list[Event]:
        if fields.get("version") != VERSION:
            raise HandshakeFailed(f"the server speaks netplumb version {fields.get('version')!r}, not {VERSION}")
        server_eph, server_key = fields.bin("eph"), fields.bin("key")
        if len(server_key) != KEY_BYTES:
            raise HandshakeFailed("the server's key is not 32 bytes")
        chosen = fields.get("cipher")
        aead = next((a for a in self.aeads if a.name == chosen), None)
        if aead is None:
            raise HandshakeFailed(f"the server chose cipher {chosen!r}, which we did not offer")
        offer = [a.name.encode() for a in self.aeads]
        self._transcript = self.eph_public + server_eph + server_key + _agreement(offer, aead.name)
        if not verify(server_key, SERVER_PROOF + self._transcript, fields.bin("sig")):
            raise HandshakeFailed("the server could not prove it holds its key (bad signature)")
        self.check_host(server_key)  # may raise: a changed key ends it here
        self.peer = server_key
        self._keys(server_eph, aead, client=True)
        proof = self.identity.sign(CLIENT_PROOF + self._transcript + self.identity.public)
        self._queue(wire.AUTH, Fields.of(key=wire.b64(self.identity.public), sig=wire.b64(proof)))
        self.state = State.AUTH_SENT
        return [ServerKey(server_key)]

    def _on_welcome(self, fields: Fields) -> list[Event]:
        if fields.get("ok") != "1":
            raise HandshakeFailed("the server did not welcome us")
        self.state = State.ESTABLISHED
        assert self.peer is not None
        return [Established(self.peer)]

    # The session's first message may follow AUTH at once: the server has proved its key, what we
    # seal only it can open, and it reads nothing of ours past an AUTH it refuses.
    SENDS_IN: ClassVar[frozenset[State]] = frozenset({State.AUTH_SENT, State.ESTABLISHED})
    HANDSHAKE: ClassVar[Handshake] = {
        (State.HELLO_SENT, wire.HELLO): _on_hello,
        (State.HELLO_SENT, wire.REFUSE): _on_refuse,
        (State.AUTH_SENT, wire.AUTH): _on_welcome,
        # Not REFUSE in AUTH_SENT: the server has proved its key and seals what it says (ERROR); a
        # REFUSE in clear then could be anyone's, and would be shown as the server's words.
    }


class ServerSession(Session):
    """The accepting side. authorize(client_key) says whether the key may log in at all."""

    def __init__(
        self, identity: Identity, authorize: Callable[[bytes], str | None], aeads: Sequence[Aead] | None = None
    ) -> None:
        super().__init__(identity, aeads)
        self.authorize = authorize
        self.state = State.WAIT_HELLO

    def _on_hello(self, fields: Fields) -> list[Event]:
        if fields.get("version") != VERSION:
            raise HandshakeFailed(f"the client speaks netplumb version {fields.get('version')!r}, not {VERSION}")
        client_eph = fields.bin("eph")
        offer = fields.rawall("cipher")
        # The client's preference decides, among the ciphers this machine runs fast.
        aead = next((a for name in offer for a in self.aeads if a.name.encode() == name), None)
        if aead is None:
            names = ", ".join(repr(o.decode("ascii", "replace")[:30]) for o in offer[:8]) or "none"
            self._refuse(
                HandshakeFailed(
                    f"no cipher in common: the client offers {names}; this server "
                    f"takes {', '.join(a.name for a in self.aeads)}"
                )
            )
        self._transcript = client_eph + self.eph_public + self.identity.public + _agreement(offer, aead.name)
        self._keys(client_eph, aead, client=False)
        proof = self.identity.sign(SERVER_PROOF + self._transcript)
        self._queue(
            wire.HELLO,
            Fields.of(
                version=VERSION,
                eph=wire.b64(self.eph_public),
                key=wire.b64(self.identity.public),
                sig=wire.b64(proof),
                cipher=aead.name,
            ),
        )
        self.state = State.WAIT_AUTH
        return []

    def _on_auth(self, fields: Fields) -> list[Event]:
        client_key = fields.bin("key")
        if len(client_key) != KEY_BYTES or not verify(
            client_key, CLIENT_PROOF + self._transcript + client_key, fields.bin("sig")
        ):
            self._refuse(HandshakeFailed("the client could not prove it holds its key (bad signature)"))
        why = self.authorize(client_key)
        if why is not None:
            self._refuse(NotAdmitted(why))
        self.peer = client_key
        self._queue(wire.AUTH, Fields.of(ok=1))
        self.state = State.ESTABLISHED
        return [Established(client_key)]

    HANDSHAKE: ClassVar[Handshake] = {
        (State.WAIT_HELLO, wire.HELLO): _on_hello,
        (State.WAIT_AUTH, wire.AUTH): _on_auth,
    }

    def _refuse(self, e: SessionError) -> NoReturn:
        """Tell the client (encrypted, it has the key) why, then fail."""
        self._out.append(self.error(str(e)))
        raise e
