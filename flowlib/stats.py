"""What is known of a flow's traffic (Flow.stats): FRCT's counts at this end, and what the flow's
IPCP counted of its SDUs, as the IRMd tells it; never a number nobody counted.
"""

from __future__ import annotations

import dataclasses

from flowlib.frct import Frct
from proto import messages as m


@dataclasses.dataclass(frozen=True)
class FrctStats:
    """FRCT at this end of the flow: PDUs sent (first transmissions) and received, sent again, and
    dropped (late or overflowing on a flow without retransmission); the smoothed RTT in seconds once
    an acknowledgement measured one (reliable flows only)."""

    sent: int
    received: int
    retransmitted: int
    dropped: int
    rtt: float | None

    @classmethod
    def of(cls, frct: Frct) -> FrctStats:
        c = frct.counters
        rtt = frct.recovery.rtt.srtt if frct.recovery is not None else None
        return cls(c.sent, c.received, c.retransmitted, c.dropped, rtt)


@dataclasses.dataclass(frozen=True)
class IpcpStats:
    """The flow's SDUs as its IPCP counted them at this end: `data` is "ipcp" (it relays and counts
    them), "direct" (they go between the applications' sockets: no IPCP sees them) or "" (it did not
    say). Counts are None unless data is "ipcp"."""

    ipcp: str
    data: str
    sent: int | None = None
    received: int | None = None
    dropped: int | None = None
    drops: str = ""  # why, as the IPCP says: "3 queue full: the application did not read"

    @classmethod
    def of(cls, info: m.FlowInfo) -> IpcpStats:
        if info.data != "ipcp":
            return cls(info.ipcp, info.data if info.data == m.DIRECT else "")
        return cls(info.ipcp, "ipcp", _counted(info.sent), _counted(info.received), _counted(info.dropped), info.drops)

    def where(self) -> str:
        """Where the stack dropped the flow's SDUs at this end, in words ("" if nowhere it knows of)."""
        if not self.dropped:
            return ""
        return f"dropped at ipcp {self.ipcp}: {self.drops or self.dropped}"


def _counted(n: int) -> int | None:
    return n if n >= 0 else None  # -1 on the wire: not counted


@dataclasses.dataclass(frozen=True)
class FlowStats:
    """Flow.stats(): `frct` where the flow runs FRCT, `ipcp` when the IRMd was asked (else None)."""

    frct: FrctStats | None
    ipcp: IpcpStats | None
