"""Flow encryption, packet by packet, in Ouroboros 0.23's format: IV | ciphertext | tag, with the
key phase in bit 7 of the IV's first byte and the key rotated every 2^20 packets (HKDF-SHA-256).

The key and cipher come from the allocation (the IRMds' OAP exchange); nothing is negotiated
here, so nothing a peer sends can do more than be refused and counted.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Callable

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


def _aead(cipher: int, key: bytes) -> AESGCM | ChaCha20Poly1305 | None:
    if cipher == 1018:
        return ChaCha20Poly1305(key)
    if CIPHERS[cipher][1]:
        return AESGCM(key)
    return None  # AES-CTR: no tag (0.23 offers it, "not recommended")


class PacketCrypto:
    """Seal and open one flow's packets; packets that do not open are counted and dropped.

    One key serves both directions, as in 0.23, and each end rotates it when its count of packets
    (sent and opened) crosses a multiple of 2^rotation_bit while sealing; IVs carry the phase.
    Our IVs are numbered (the counter follows four bytes of phase, role and randomness), so they
    never repeat under a key; when the peer numbers its IVs too (`seq_iv`, agreed in OAP),
    replayed and too old packets are refused. A packet that fails to open changes no state.
    """

    def __init__(self, cipher: int, key: bytes, server: bool, seq_iv: bool = False,
                 rotation_bit: int = ROTATION_BIT) -> None:
        if cipher not in CIPHERS:
            raise ValueError(f"cipher NID {cipher} is not one flows use")
        if len(key) != KEY_SIZE:
            raise ValueError(f"flow key of {len(key)} bytes: {KEY_SIZE} expected")
        self.cipher = cipher
        self.ivsz, self.tagsz, self._keylen = CIPHERS[cipher]
        self.overhead = self.ivsz + self.tagsz
        self.seq_iv = seq_iv
        self.rejected = 0
        self._salt = hashlib.sha256(key).digest()  # the rotation salt, from the initial key
        self._keys: list[bytes] = [key]  # current, then the previous during its grace period
        self._seal_fn, open_ = self._ciphers(key)
        self._open_fns = [open_]
        self._next: tuple[bytes, Callable[[bytes, bytes], bytes]] | None = None  # derived when first needed
        self._mask = 1 << rotation_bit
        self._cntr = 0  # packets sealed and opened
        self._age = 0  # ... since the last rotation
        self._phase = 0
        prefix = os.urandom(4)
        self._first = (prefix[0] & 0x3F) | (SERVER if server else 0)
        self._prefix = prefix[1:]
        self._sent = 0
        self._highest = -1
        self._seen = 0  # bit i: counter highest - i arrived
        self._lock = threading.Lock()  # seal and open share the rotation state, and may run in two threads

    def _ciphers(self, key: bytes) -> tuple[Callable[[bytes, bytes], bytes], Callable[[bytes, bytes], bytes]]:
        """(seal(iv, plain), open(iv, body)) for one key; open raises on a bad tag."""
        key = key[: self._keylen]
        aead = _aead(self.cipher, key)
        if aead is not None:
            return (lambda iv, plain: aead.encrypt(iv, plain, None)), (lambda iv, body: aead.decrypt(iv, body, None))

        def ctr(iv: bytes, data: bytes) -> bytes:
            ctx = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
            return ctx.update(data) + ctx.finalize()

        return ctr, ctr

    def _next_key(self) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=self._salt,
                    info=HKDF_INFO_ROTATION).derive(self._keys[0])  # fmt: skip

    def _rotate(self, key: bytes) -> None:
        self._next = None
        self._keys = [key, self._keys[0]]
        seal, open_ = self._ciphers(key)
        self._seal_fn, self._open_fns = seal, [open_, self._open_fns[0]]
        self._age = 0
        self._phase ^= 1

    # -- sending ---------------------------------------------------------------------------------

    def seal(self, plain: bytes) -> bytes:
        with self._lock:
            first = self._first | (PHASE if self._cntr & self._mask else 0)
            iv = bytes((first,)) + self._prefix + COUNTER.pack(self._sent)
            if self.ivsz == 16:
                iv += b"\0\0\0\0"  # CTR: the low 32 bits count the packet's blocks
            self._sent += 1
            packet: bytes = iv + self._seal_fn(iv, plain)
            self._cntr += 1
            self._age += 1
            if self._cntr & self._mask != (self._cntr - 1) & self._mask:
                self._rotate(self._next_key())
            if len(self._keys) > 1 and self._age >= self._mask >> 1:
                self._keys.pop()  # the previous key's grace is over
                self._open_fns.pop()
            return packet

    # -- receiving -------------------------------------------------------------------------------

    def open(self, packet: bytes) -> bytes | None:
        """The plaintext, or None for a packet that is short, forged, for another key, or replayed."""
        ivsz = self.ivsz
        if len(packet) < ivsz + self.tagsz:
            self.rejected += 1
            return None
        iv, body = packet[:ivsz], packet[ivsz:]
        with self._lock:
            number = -1
            if self.seq_iv:
                (number,) = COUNTER.unpack_from(iv, 4)
                age = self._highest - number
                if age >= REPLAY_WINDOW or (age >= 0 and self._seen >> age & 1):
                    self.rejected += 1
                    return None
            plain = self._try(iv, body)
            if plain is None:
                self.rejected += 1
                return None
            self._cntr += 1
            self._age += 1
            if number >= 0:
                self._note(number)
            return plain

    def _try(self, iv: bytes, body: bytes) -> bytes | None:
        """Open with the current key, the previous one, or the next one: a peer's key may be a
        rotation ahead of ours (0.23 rotates each end on its own count), and a packet that opens
        with the next key moves us on, so no forgery can. AES-CTR has no tag to tell keys apart:
        there the phase bit decides, as in 0.23."""
        if not self.tagsz:
            if (iv[0] >> 7) != self._phase and self._age >= self._mask - (self._mask >> 2):
                self._rotate(self._next_key())
            return self._open_fns[0](iv, body)
        for open_ in self._open_fns:
            try:
                return open_(iv, body)
            except InvalidTag:
                continue
        if self._next is None:
            key = self._next_key()
            self._next = key, self._ciphers(key)[1]
        try:
            plain = self._next[1](iv, body)
        except InvalidTag:
            return None
        self._rotate(self._next[0])
        return plain

    def _note(self, number: int) -> None:
        age = self._highest - number
        if age < 0:
            self._seen = (self._seen << -age | 1) & ((1 << REPLAY_WINDOW) - 1)
            self._highest = number
        else:
            self._seen |= 1 << age

