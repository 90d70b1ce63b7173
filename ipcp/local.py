"""The local IPCP: a layer spanning this host only.

A flow is one SOCK_SEQPACKET pair whose two ends go to the two applications,
so no process relays the data; both ends go to the IRMd in the allocation's answer.
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
        self.peers: dict[int, int] = {}  # flow id -> the flow id of the other end

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
        self.peers[flow_id] = 0  # until the IRMd names the accepting end
        return LOCAL_MTU, src.detach(), dst.detach()

    def flow_accepted(self, src_flow: int, flow_id: int) -> None:
        if self.peers.get(src_flow) == 0 and flow_id > 0 and flow_id not in self.peers:
            self.peers[src_flow], self.peers[flow_id] = flow_id, src_flow

    async def flow_dealloc(self, flow_id: int) -> None:
        peer = self.peers.pop(flow_id, None)
        if peer and self.peers.pop(peer, None) is not None:
            self.flow_ended(peer, down=False, io=None)
