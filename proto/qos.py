"""QoS specifications, as Ouroboros's qosspec_t: what an application asks of a flow.

Layers map a spec onto one of their QoS cubes; the presets are C Ouroboros 0.23's, field for field.
"""

from __future__ import annotations

import dataclasses
import operator

UINT32_MAX = 0xFFFFFFFF
UINT64_MAX = 0xFFFFFFFFFFFFFFFF
DEFAULT_PEER_TIMEOUT = 120_000  # ms: every preset's keepalive timeout, as C's DEFAULT_PEER_TIMEOUT


@dataclasses.dataclass(frozen=True)
class QosSpec:
    delay: int = UINT32_MAX  # ms
    bandwidth: int = 0  # bits/s
    availability: int = 0  # class of nines
    loss: int = 1  # 0 asks for retransmission
    ber: int = 1  # bit errors per billion bits; 0 asks for a CRC32 on every packet
    in_order: int = 0  # 1 enables FRCT in-order delivery
    max_gap: int = UINT32_MAX  # ms
    timeout: int = DEFAULT_PEER_TIMEOUT  # peer timeout in ms (keepalives every quarter), 0 = none
    cypher_s: int = 0  # encryption key bits, 0 = none (flow_alloc(..., encrypt=True) sets it)

    def __post_init__(self) -> None:
        # Every flow's messages carry a spec, decoded in three processes per allocation: plain ints in
        # range are taken in a few C calls; anything else (a bool, an int subclass, a bad value) is
        # looked at field by field.
        values = _VALUES(self)
        if set(map(type, values)) == _INT and min(values) >= 0 and max(values) <= UINT64_MAX:
            return
        for name, value in zip(_FIELDS, values, strict=True):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= UINT64_MAX:
                raise ValueError(f"qos {name}: expected a non-negative integer, got {value!r}")

    @property
    def reliable(self) -> bool:
        return self.loss == 0

    @property
    def frct(self) -> bool:
        """Whether flows with this spec run FRCT: for ordering, and retransmission if reliable."""
        return bool(self.in_order) or self.loss == 0

    @property
    def crc(self) -> bool:
        """Whether every packet carries a CRC32 trailer (ber 0, as C's)."""
        return self.ber == 0


_FIELDS = tuple(f.name for f in dataclasses.fields(QosSpec))
_VALUES = operator.attrgetter(*_FIELDS)
_INT = {int}

raw = QosSpec()
raw_no_errors = QosSpec(ber=0)
best_effort = QosSpec(ber=0, in_order=1)
video = QosSpec(delay=100, bandwidth=UINT64_MAX, availability=3, ber=0, in_order=1, max_gap=100)
voice = QosSpec(delay=50, bandwidth=100_000, availability=5, ber=0, in_order=1, max_gap=50)
data = QosSpec(delay=1000, loss=0, ber=0, in_order=1, max_gap=2000)

PRESETS: dict[str, QosSpec] = {
    "raw": raw,
    "raw_no_errors": raw_no_errors,
    "best": best_effort,
    "best_effort": best_effort,
    "video": video,
    "voice": voice,
    "data": data,
}


def by_name(name: str) -> QosSpec:
    """The preset for an oping/irm-style QoS name, with a clear error otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown qos {name!r}: expected one of {', '.join(sorted(PRESETS))}") from None
