"""Flow encryption, packet by packet, in Ouroboros 0.23's format: IV | ciphertext | tag, with the
key phase in bit 7 of the IV's first byte and the key rotated every 2^20 packets (HKDF-SHA-256).

The key and cipher come from the allocation (the IRMds' OAP exchange); nothing is negotiated
here, so nothing a peer sends can do more than be refused and counted.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def _load_cryptography() -> None:
    """cryptography's primitives, imported by the first encrypted flow: ~10 ms that every process
    starting without one (most IPCPs and tools) does not spend."""
    global InvalidTag, hashes, Cipher, algorithms, modes, AESGCM, ChaCha20Poly1305, HKDF
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF


CYPHER_S = 256  # the qos cypher_s that asks for an encrypted flow
KEY_SIZE = 32
TAG = 16
ROTATION_BIT = 20  # KEY_ROTATION_BIT: the key changes every 2^20 packets, sent and received
HKDF_INFO_ROTATION = b"o7s-key-rotation"
REPLAY_WINDOW = 1024  # counters remembered behind the highest one seen, when the peer numbers its IVs
PHASE = 0x80  # bit 7 of IV byte 0: the sender's key phase
SERVER = 0x40  # bit 6 of IV byte 0 in our numbered IVs: the two ends never share an IV
COUNTER = struct.Struct("!Q")  # our IVs: 4 bytes (phase, role, random), then the packet number
IV = struct.Struct("!4sQ")

# cipher NID -> (IV size, tag size, key bytes); 0.23's EVP defaults (src/lib/crypt/openssl.c).
CIPHERS = {
    895: (12, TAG, 16), 898: (12, TAG, 24), 901: (12, TAG, 32), 1018: (12, TAG, 32),
    904: (16, 0, 16), 905: (16, 0, 24), 906: (16, 0, 32),
}  # fmt: skip
AES_256_GCM = 901
OVERHEAD = 12 + TAG  # of the AEAD ciphers, which flows use unless told otherwise


def overhead(cipher: int) -> int:
    iv, tag, _ = CIPHERS[cipher]
    return iv + tag


class _Ctr:
    """AES-CTR behind the AEAD interface: no tag, so every packet "opens" (as 0.23 offers it,
    "not recommended")."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def encrypt(self, iv: bytes, data: bytes | bytearray | memoryview, _aad: None) -> bytes:
        ctx = Cipher(algorithms.AES(self._key), modes.CTR(iv)).encryptor()
        return ctx.update(data) + ctx.finalize()

    decrypt = encrypt


if TYPE_CHECKING:
    Aead = AESGCM | ChaCha20Poly1305 | _Ctr


def _aead(cipher: int, key: bytes) -> Aead:
    key = key[: CIPHERS[cipher][2]]  # 0.23 hands EVP the first bytes of its 32-byte key
    if cipher == 1018:
        return ChaCha20Poly1305(key)
    return AESGCM(key) if CIPHERS[cipher][1] else _Ctr(key)


class PacketCrypto:
    """Seal and open one flow's packets; packets that do not open are counted and dropped.

    One key serves both directions, as in 0.23, and each end rotates it when its count of packets
    (sent and opened) crosses a multiple of 2^rotation_bit while sealing; IVs carry the phase.
    Our IVs are numbered (the counter follows four bytes of phase, role and randomness), so they
    never repeat under a key; when the peer numbers its IVs too (`seq_iv`, agreed in OAP),
    replayed and too old packets are refused, and so are our own packets sent back to us (the peer's
    IVs carry the other role; one key serves both directions, so they would open, and one numbered
    past the peer's count would move the window past every packet the peer sends). A packet that
    fails to open changes no state.

    Sealing takes no lock (the packet number comes from an atomic counter); opening takes one for
    the replay window only; rotating takes it too, so two threads never rotate one key twice.
    """

    def __init__(
        self, cipher: int, key: bytes, server: bool, seq_iv: bool = False, rotation_bit: int = ROTATION_BIT
    ) -> None:
        import hashlib  # here, as cryptography: a process with plain flows only starts 3-5 ms sooner

        if cipher not in CIPHERS:
            raise ValueError(f"cipher NID {cipher} is not one flows use")
        if len(key) != KEY_SIZE:
            raise ValueError(f"flow key of {len(key)} bytes: {KEY_SIZE} expected")
        _load_cryptography()
        self.cipher = cipher
        self.ivsz, self.tagsz, _ = CIPHERS[cipher]
        self.overhead = self.ivsz + self.tagsz
        # A cipher without a tag cannot vouch for a packet's number: a forged one would move the
        # replay window past the real peer's and lock it out, so only AEAD ciphers keep one.
        self.seq_iv = seq_iv and self.tagsz > 0
        self.rejected = 0
        self._salt = hashlib.sha256(key).digest()  # the rotation salt, from the initial key
        self._key = key
        self._aead = _aead(cipher, key)
        self._previous: Aead | None = None  # the key before the last rotation, during its grace
        self._next: tuple[bytes, Aead] | None = None  # derived when a packet first needs it
        self._mask = 1 << rotation_bit
        self._bit, self._low, self._grace = rotation_bit, self._mask - 1, self._mask >> 1
        self._cntr = 0  # packets sealed and opened
        self._age = 0  # ... since the last rotation
        self._phase = 0
        prefix = os.urandom(4)
        first = (prefix[0] & 0x3F) | (SERVER if server else 0)
        self._theirs = 0 if server else SERVER  # the role bit of the peer's numbered IVs
        self._heads = (bytes((first,)) + prefix[1:], bytes((first | PHASE,)) + prefix[1:])
        self._tail = b"\0\0\0\0" if self.ivsz == 16 else b""  # CTR: the low 32 bits count the packet's blocks
        self._numbers = itertools.count()
        self._highest = -1
        self._seen = bytearray(REPLAY_WINDOW)  # slot n % REPLAY_WINDOW: number n arrived (n within the window)
        self._lock = threading.Lock()  # the replay window, and rotation (never taken twice by one thread)

    def _next_key(self) -> tuple[bytes, Aead]:
        if self._next is None:
            key = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=self._salt,
                       info=HKDF_INFO_ROTATION).derive(self._key)  # fmt: skip
            self._next = key, _aead(self.cipher, key)
        return self._next

    def _rotate(self) -> None:
        """Move to the next key; the caller holds the lock."""
        self._key, aead = self._next_key()
        self._previous, self._aead, self._next = self._aead, aead, None
        self._age = 0
        self._phase ^= 1

    # -- sending ---------------------------------------------------------------------------------

    def seal(self, plain: bytes | bytearray | memoryview) -> bytes:
        """IV | ciphertext | tag. The common case is a few operations around the cipher: it runs once
        per packet in the writing thread, where it decides an encrypted flow's rate."""
        cntr = self._cntr
        aead = self._aead
        iv = IV.pack(self._heads[cntr >> self._bit & 1], next(self._numbers)) + self._tail
        packet: bytes = iv + aead.encrypt(iv, plain, None)
        self._cntr = cntr + 1
        self._age += 1
        if not (cntr + 1) & self._low:  # a multiple of 2^rotation_bit: the key's turn is over
            with self._lock:
                if self._aead is aead:  # not rotated meanwhile by the other direction
                    self._rotate()
        if self._previous is not None and self._age >= self._grace:
            self._previous = None  # the previous key's grace is over
        return packet

    # -- receiving -------------------------------------------------------------------------------

    def open(self, packet: bytes) -> bytes | None:
        """The plaintext, or None for a packet that is short, forged, for another key, or replayed.
        Numbered packets take one pass: window check, cipher, window update, under the lock."""
        if len(packet) < self.overhead:
            self.rejected += 1
            return None
        if not self.seq_iv:
            ivsz = self.ivsz
            return self._open(packet[:ivsz], packet[ivsz:])
        if packet[0] & SERVER != self._theirs:  # ours, reflected: never the peer's
            self.rejected += 1
            return None
        (number,) = COUNTER.unpack_from(packet, 4)
        with self._lock:  # the window's check and update, atomic against another reader
            highest = self._highest
            if number <= highest and (highest - number >= REPLAY_WINDOW or self._seen[number % REPLAY_WINDOW]):
                self.rejected += 1
                return None
            iv, body = packet[:12], packet[12:]  # numbered IVs: AEAD ciphers only, 12 bytes
            aead = self._aead
            try:
                plain: bytes = aead.decrypt(iv, body, None)  # the current key: nearly always
            except InvalidTag:
                found = self._other_keys(iv, body, aead)
                if found is None:
                    self.rejected += 1
                    return None
                plain = found
            self._cntr += 1
            self._age += 1
            if number == highest + 1:  # in order: the slot it takes is the only one the window passes
                self._highest = number
                self._seen[number % REPLAY_WINDOW] = 1
            else:
                self._note(number)
            return plain

    def _open(self, iv: bytes, body: bytes) -> bytes | None:
        if not self.tagsz and (iv[0] >> 7) != self._phase and self._age >= self._mask - (self._mask >> 2):
            with self._lock:  # AES-CTR has no tag to tell keys apart: the phase bit decides, as in 0.23
                self._rotate()
        aead = self._aead
        try:
            plain: bytes = aead.decrypt(iv, body, None)  # the current key: nearly always
        except InvalidTag:
            with self._lock:
                found = self._other_keys(iv, body, aead)
            if found is None:
                self.rejected += 1
                return None
            plain = found
        self._cntr += 1
        self._age += 1
        return plain

    def _other_keys(self, iv: bytes, body: bytes, tried: Aead) -> bytes | None:
        """The previous key (late packets), or the next one: a peer's key may be a rotation ahead of
        ours (0.23 rotates each end on its own count); a packet that opens with it moves us on, so
        no forgery can. First the current key, if a sealing thread rotated since `tried`."""
        if self._aead is not tried:
            try:
                return self._aead.decrypt(iv, body, None)
            except InvalidTag:
                pass
        previous = self._previous  # one read: a sealing thread may end its grace meanwhile
        if previous is not None:
            try:
                return previous.decrypt(iv, body, None)
            except InvalidTag:
                pass
        try:
            plain: bytes = self._next_key()[1].decrypt(iv, body, None)
        except InvalidTag:
            return None
        self._rotate()
        return plain

    def _note(self, number: int) -> None:
        seen, highest = self._seen, self._highest
        if number > highest:  # the window moves on: slots it passes over are free again
            if number - highest >= REPLAY_WINDOW:
                seen[:] = bytes(REPLAY_WINDOW)
            else:
                for skipped in range(highest + 1, number):
                    seen[skipped % REPLAY_WINDOW] = 0
            self._highest = number
        seen[number % REPLAY_WINDOW] = 1
