"""A seeded mutational fuzzer for the wire parsers: valid encodings bent into the inputs a hostile
peer sends (flipped bits, boundary integers in length fields, truncation, splices, junk).

Deterministic: each test names its seed; FUZZ_ROUNDS=N (environment) runs N times as many cases
when hunting. `only_raises` checks the property every parser keeps: a message or its declared error.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ROUNDS = int(os.environ.get("FUZZ_ROUNDS", "1"))

# Integers that break length and count fields: zero, signs, widths' edges.
_EDGES = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    0xFFFFFFFFFFFFFFFF,
)
_FORMATS = ("<B", "<H", "<I", "<Q", ">H", ">I", ">Q")


def _edge_bytes(rng: random.Random) -> bytes:
    fmt = rng.choice(_FORMATS)
    limit = 1 << (8 * struct.calcsize(fmt))
    return struct.pack(fmt, rng.choice(_EDGES) % limit)


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes] = ()) -> bytes:
    """`data` with one to four mutations."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # a byte at its edges
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2:  # an edge integer written over what is there (a length, a count, a type)
            edge = _edge_bytes(rng)
            buf[pos : pos + len(edge)] = edge
        elif op == 3:  # truncate
            del buf[pos:]
        elif op == 4:  # drop a slice
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 5:  # insert junk
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 6 and corpus:  # splice another valid input in
            other = rng.choice(corpus)
            start = rng.randrange(len(other) + 1)
            buf[pos:] = other[start:]
        else:  # repeat a slice
            piece = buf[pos : pos + rng.randint(1, 32)]
            buf[pos:pos] = piece * rng.randint(1, 4)
    return bytes(buf)


def cases(seed: int, corpus: Sequence[bytes], n: int) -> Iterator[bytes]:
    """n inputs (times FUZZ_ROUNDS): mostly mutants of the corpus, some random bytes, the corpus itself."""
    rng = random.Random(seed)
    yield from corpus
    for _ in range(n * ROUNDS):
        if rng.random() < 0.05 or not corpus:
            yield rng.randbytes(rng.randint(0, 96))
        else:
            yield mutate(rng, rng.choice(corpus), corpus)


def only_raises(
    parse: Callable[..., Any], data: Any, errors: type[BaseException] | tuple[type[BaseException], ...], *args: Any
) -> Any:
    """parse(data, *args), or None if it raised one of `errors`; anything else fails the test with the input."""
    try:
        return parse(data, *args)
    except errors:
        return None
    except Exception as e:
        raise AssertionError(f"{type(e).__name__}: {str(e)[:200]} on input {repr(data)[:1000]}") from e
