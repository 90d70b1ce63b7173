"""Names as every part of the stack sees them: valid forms, the layers' hash algorithms.

A name is hashed per layer with that layer's algorithm; the IRMd and IPCPs must agree on both.
"""

from __future__ import annotations

import hashlib

HASHES = {  # what a layer may be configured with
    "SHA3_224": hashlib.sha3_224,
    "SHA3_256": hashlib.sha3_256,
    "SHA3_384": hashlib.sha3_384,
    "SHA3_512": hashlib.sha3_512,
}
DIGESTS = {**HASHES, "MD5": hashlib.md5}  # and what udp layers always use, as Ouroboros's
LB_POLICIES = ("round-robin", "spillover")
IPCP_TYPES = ("local", "unicast", "broadcast", "udp4", "udp6", "eth-dix", "eth-llc")
MAX_NAME = 255


class RegistryError(Exception):
    """A request the registry refuses; `code` is the Error reply's code."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


def check_name(name: str, what: str = "name") -> str:
    if not name or len(name) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise RegistryError("EINVAL", f"bad {what} {name!r}: 1-{MAX_NAME} printable characters, no spaces")
    return name


def name_hash(algo: str, name: str) -> bytes:
    try:
        return DIGESTS[algo](name.encode()).digest()
    except KeyError:
        raise RegistryError("EINVAL", f"unknown hash {algo!r}: expected one of {', '.join(DIGESTS)}") from None
