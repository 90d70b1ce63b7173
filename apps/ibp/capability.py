"""Capabilities: 256-bit random keys per allocation and per right, and their IBP URI form.

`ibp://DEPOT/RID#KEY/RIGHTKEY/READ|WRITE|MANAGE`; DEPOT is a registered name or host:port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from apps.ibp.wire import IBP_MANAGECAP, IBP_READCAP, IBP_WRITECAP, KEY_CHARS, MAX_KEY, MAX_TOKEN

KEY_BYTES = 32  # 256 bits
READ, WRITE, MANAGE = "READ", "WRITE", "MANAGE"
RIGHTS = (READ, WRITE, MANAGE)
CAPTYPE = {READ: IBP_READCAP, WRITE: IBP_WRITECAP, MANAGE: IBP_MANAGECAP}

_K = rf"[{KEY_CHARS}]{{1,{MAX_KEY}}}"  # a key or right key: ours hex, L-Store's base64
_CAP_RE = re.compile(
    r"ibp://(?P<depot>[A-Za-z0-9_.:\-\[\]]{1,256})/(?P<rid>[A-Za-z0-9_.\-]{1,64})"
    rf"#(?P<key>{_K})/(?P<typekey>{_K})/(?P<right>READ|WRITE|MANAGE)"
)


class BadCapability(ValueError):
    """A string that is not an IBP capability."""


# The depot's functions import what they use when called: hashlib, hmac and secrets (which load
# OpenSSL) cost every client command 4-5 ms of its start, and a depot's call ~0.15 us.


def new_key() -> str:
    """A fresh 256-bit key from the OS's CSPRNG, as 64 hex digits."""
    import secrets

    return secrets.token_hex(KEY_BYTES)


def key_hash(key: str) -> str:
    """What a depot keeps of a key: its SHA-256, so its files hold no capability."""
    import hashlib

    return hashlib.sha256(key.encode("ascii", "replace")).hexdigest()


def keys_equal(a: str, b: str) -> bool:
    """Constant-time comparison, so a wrong key reveals nothing of the right one by timing."""
    import hmac

    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))


@dataclass(frozen=True)
class Capability:
    depot: str
    rid: str
    key: str
    typekey: str
    right: str

    def __str__(self) -> str:
        return f"ibp://{self.depot}/{self.rid}#{self.key}/{self.typekey}/{self.right}"

    @property
    def captype(self) -> int:
        return CAPTYPE[self.right]

    @classmethod
    def parse(cls, text: str) -> Capability:
        text = text.strip()
        if len(text) > MAX_TOKEN:
            raise BadCapability("capability too long")
        m = _CAP_RE.fullmatch(text)
        if m is None:
            raise BadCapability(f"not an IBP capability: {text[:80]!r} (want ibp://DEPOT/RID#KEY/RIGHTKEY/RIGHT)")
        return cls(m["depot"], m["rid"], m["key"], m["typekey"], m["right"])
