"""Names as every part of the stack sees them: valid forms, the layers' hash algorithms.

A name is hashed per layer with that layer's algorithm; the IRMd and IPCPs must agree on both.
"""

from __future__ import annotations

import hashlib

from proto.errors import InvalidArgument
from transports.wire import quoted

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


QUOTED = 64  # characters of a refused name its error repeats


def check_name(name: str, what: str = "name") -> str:
    # The space is the one whitespace character str.isprintable() takes (every other one is a control
    # or separator character), so these two tests are the per-character check without its loop.
    if not name or len(name) > MAX_NAME or " " in name or not name.isprintable():
        raise InvalidArgument(f"bad {what} {quoted(name, QUOTED)}: 1-{MAX_NAME} printable characters, no spaces")
    return name


def name_hash(algo: str, name: str) -> bytes:
    try:
        return DIGESTS[algo](name.encode()).digest()
    except KeyError:
        raise InvalidArgument(f"unknown hash {algo!r}: expected one of {', '.join(DIGESTS)}") from None


def wildcard_match(pattern: str, text: str) -> bool:
    """Does `text` match `pattern`, where * stands for any run of characters (nothing else is special,
    as in the irm tool's patterns for IPCP and layer names)?"""
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == text
    if not text.startswith(parts[0]) or not text.endswith(parts[-1]) or len(text) < len(parts[0]) + len(parts[-1]):
        return False
    at, end = len(parts[0]), len(text) - len(parts[-1])
    for part in parts[1:-1]:
        found = text.find(part, at, end)
        if found < 0:
            return False
        at = found + len(part)
    return True


def is_pattern(name: str) -> bool:
    return "*" in name
