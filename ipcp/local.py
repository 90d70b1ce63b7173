"""The local IPCP: a layer spanning this host only.

A flow is one SOCK_SEQPACKET pair whose two ends go to the two applications,
so no process relays the data; both ends go to the IRMd in the allocation's answer,
and the IRMd, holding both, tells each end when the other lets go: nothing of a flow stays here.
"""

from __future__ import annotations

import logging

from ipcp.base import Ipcp
from proto import messages as m
from proto.names import HASHES
from proto.qos import QosSpec
from transports.channel import HandlerError
from transports.unix import seqpacket_pair

log = logging.getLogger(__name__)

LOCAL_MTU = 65535


class LocalIpcp(Ipcp):
    type = "local"

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.registered: set[bytes] = set()

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        algo = conf.pop("hash", "SHA3_256")
        if algo not in HASHES:
            raise HandlerError(m.EINVAL, f"unknown hash {algo!r}: expected one of {', '.join(HASHES)}")
        if conf:
            raise HandlerError(m.EINVAL, f"unknown local options {sorted(conf)}: the local layer takes only hash")
        return m.LayerInfo(layer, algo, LOCAL_MTU)

    async def reg(self, digest: bytes, register: bool) -> None:
        (self.registered.add if register else self.registered.discard)(digest)

    async def query(self, digest: bytes) -> bool:
        return digest in self.registered

    async def flow_pair(self, flow_id: int, digest: bytes, qos: QosSpec) -> tuple[int, int, int]:
        if digest not in self.registered:
            raise HandlerError(m.ENOENT, "name not found in this layer")
        src, dst = seqpacket_pair()
        return LOCAL_MTU, src.detach(), dst.detach()

    async def flow_dealloc(self, flow_id: int) -> None:
        """Nothing to forget: the IRMd holds both ends of a local flow and ends them itself."""
