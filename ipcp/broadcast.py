"""The broadcast IPCP: a layer in which every SDU a member's application writes reaches
every other joined application (flow_join), flooded over the members' data flows.

Enrollment, neighbour connections and the link-state membership are the unicast IPCP's;
the data path floods with duplicate suppression instead of routing.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import OrderedDict
from typing import Any

from ipcp.unicast.dt import Dt, Link, Parts, UniFlow
from ipcp.unicast.ipcp import UnicastIpcp
from ipcp.unicast.pci import Pci, PciFormat
from proto.names import name_hash
from proto.qos import QosSpec
from transports.channel import HandlerError
from transports.unix import seqpacket_pair

log = logging.getLogger(__name__)

SEEN = 1 << 16  # PDUs (origin, seqno and their SDU's CRC) remembered to drop flooded duplicates
# ... each for at least this long, the time its copies may take to come back around the layer's
# loops: one forgotten sooner would be flooded again, each copy of it, without end. When SEEN PDUs
# younger than that fill the table, new PDUs are dropped instead (at most SEEN / HOLD a second).
HOLD = 1.0


class FloodDt(Dt):
    """A PDU's PCI names its origin (dst field) and its sequence number (eid field).

    Neither is proof of anything: a member relays others' PDUs, so any neighbour may claim any origin
    (as in 0.23, whose broadcast layer names none, every member is trusted with what it sends). A copy
    is known by its SDU as well: else PDUs forged with another member's next seqnos (which count up,
    and every member sees them) would have every member drop that member's real ones as duplicates.
    """

    INLINE_ARRIVALS = False  # every PDU goes through _arrived: copies are dropped there

    def __init__(self, fmt: PciFormat, me: int, max_ttl: int, bufsize: int, *args: Any, **kw: Any) -> None:
        super().__init__(fmt, me, max_ttl, bufsize, *args)  # floods have no one receiver to echo: no congestion
        self.seqno = 0
        self.seen: OrderedDict[tuple[int, int, int], float] = OrderedDict()  # -> when first seen
        self.now = time.monotonic()  # of the burst being handled

    def _tap(self, sdu: bytes | memoryview, skip: UniFlow | None) -> None:
        """Every joined flow but `skip` gets the SDU (delivered when the burst is done)."""
        for flow in self.flows.values():
            if flow is not skip:
                if not flow.inbox:
                    self._delivering.append(flow)
                flow.inbox.append(memoryview(sdu))

    def _flood(self, parts: Parts, skip: int) -> None:
        for hop, link in self.n1.items():
            if hop != skip:
                self._pack(link, parts)
                self.counters.forwarded += 1

    def _fresh(self, origin: int, seqno: int, sdu: bytes | memoryview) -> bool:
        """Not seen before, and now remembered; False for a copy, and for any PDU while the table is
        full of PDUs that may still come back (dropped: the layer is flooded)."""
        key, seen = (origin, seqno, zlib.crc32(sdu)), self.seen
        if key in seen:
            return False
        if len(seen) >= SEEN:
            if self.now - seen[next(iter(seen))] < HOLD:
                self.counters.overflow += 1
                return False
            seen.popitem(last=False)
        seen[key] = self.now
        return True

    def from_n1(self, link: Link, frames: list[bytes]) -> None:
        self.now = time.monotonic()
        super().from_n1(link, frames)

    def from_app(self, flow: UniFlow, sdus: list[bytes]) -> None:
        self.now = time.monotonic()
        for sdu in sdus:
            if not sdu:
                continue  # a keepalive has one peer to reach; a broadcast has none
            if len(sdu) > self.max_sdu:  # written past flowlib: its length would not pack, ending the thread
                self.counters.oversized += 1
                continue
            self.seqno += 1
            if not self._fresh(self.me, self.seqno, sdu):
                continue
            self._tap(sdu, skip=flow)
            self._flood((self.fmt.pack(Pci(self.me, 0, self.max_ttl, 0, self.seqno)), sdu), skip=0)
        self.flush()

    def _arrived(self, pdu: bytes | memoryview, hop: int) -> None:
        fmt = self.fmt
        if len(pdu) < fmt.size:
            self.counters.malformed += 1
            return
        origin, _, ttl, _, seqno = fmt.struct.unpack_from(pdu)
        sdu = memoryview(pdu)[fmt.size :]
        if not sdu or not self._fresh(origin, seqno, sdu):
            return
        self._tap(sdu, skip=None)
        if ttl > 1:
            buf = bytearray(pdu)
            buf[fmt.ttl_offset] = ttl - 1
            self._flood((buf,), skip=hop)
        else:
            self.counters.ttl_expired += 1


class BroadcastIpcp(UnicastIpcp):
    type = "broadcast"
    dt_class = FloodDt

    async def query(self, digest: bytes) -> bool:
        return bool(self.layer) and digest == name_hash(self.conf["hash"], self.layer)

    async def reg(self, digest: bytes, register: bool) -> None:
        raise HandlerError("EINVAL", "names are not registered in a broadcast layer; applications join it")

    async def flow_alloc(
        self, flow_id: int, digest: bytes, qos: QosSpec, timeout: float, data: bytes
    ) -> tuple[int, int, bytes]:
        """flow_join: the application's flow is one more tap on the layer."""
        if not await self.query(digest):
            raise HandlerError("ENOENT", "a broadcast layer is joined by its own name")
        assert self.dt is not None
        app_end, mine = seqpacket_pair()
        eid = max((f.eid for f in self.flows.values()), default=0) + 1
        self._add_flow(UniFlow(eid, mine, flow_id=flow_id))
        return self.mtu, app_end.detach(), b""

    def qos_refusal(self, qos: QosSpec) -> str | None:
        if qos.frct or qos.cypher_s:
            return "a broadcast layer carries raw flows only: order, retransmission and encryption need one peer"
        return super().qos_refusal(qos)

    async def flow_dealloc(self, flow_id: int) -> None:
        flow = self.flows.pop(flow_id, None)
        if flow is not None and self.dt is not None:
            self.dt.command(self._close_flow, flow)
