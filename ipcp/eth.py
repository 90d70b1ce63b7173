"""The eth-dix and eth-llc IPCPs: a layer over raw Ethernet frames on one interface, no IP needed.

Names resolve by broadcast query/reply frames on endpoint 0; data rides one AF_PACKET socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Hashable

from flowlib.qos import QosSpec
from ipcp.shim import E_REFUSED, FlowRequested, ShimCore, ShimFlow
from ipcp.shim_io import ShimIpcp
from irmd import messages as m
from irmd.registry import HASHES
from transports import eth
from transports.channel import HandlerError
from transports.relay import Relay

log = logging.getLogger(__name__)

DEFAULT_HASH = "SHA3_256"
STATS_EVERY = 1.0  # seconds between checks of the drop counters (logged when they change)
BUFSIZE = 65536  # frames and application SDUs are read whole, oversized ones included


class EthDixIpcp(ShimIpcp):
    """eth-dix: DIX frames of one ethertype (default 0xA000), 16-bit endpoint ids."""

    type = "eth-dix"
    options = frozenset({"dev", "ethertype", "hash"})
    eid_bits = 16

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)
        self.hash_algo = DEFAULT_HASH
        self.sock: socket.socket | None = None
        self.framing: eth.EthFraming | eth.LlcFraming | None = None
        self._arriving = 0

    # -- transport -------------------------------------------------------------

    def _parse_conf(self, conf: dict[str, str]) -> tuple[str, int]:
        """(dev, protocol to bind) from the bootstrap options."""
        if unknown := set(conf) - self.options:
            raise HandlerError(m.EINVAL, f"unknown {self.type} options {sorted(unknown)}: "
                                         f"expected {sorted(self.options)}")
        dev = conf.get("dev", "")
        if not dev:
            raise HandlerError(m.EINVAL, f'{self.type} needs "dev <interface>"')
        self.hash_algo = conf.get("hash", DEFAULT_HASH)
        if self.hash_algo not in HASHES:
            raise HandlerError(m.EINVAL, f"bad hash {self.hash_algo!r}: "
                                         f"expected one of {', '.join(HASHES)}")
        text = conf.get("ethertype", hex(eth.DEFAULT_ETHERTYPE))
        try:
            ethertype = int(text, 16)
        except ValueError:
            ethertype = -1
        if not 0x0600 <= ethertype <= 0xFFFE:
            raise HandlerError(m.EINVAL, f"bad ethertype {text!r}: expected hex 0x0600-0xFFFE")
        return dev, ethertype

    def _framing(self, mac: bytes, proto: int) -> eth.EthFraming | eth.LlcFraming:
        return eth.EthFraming(mac, proto)

    def _layer_mtu(self, dev_mtu: int) -> int:
        return dev_mtu - eth.DIX_EXTRA

    async def open_transport(self, layer: str, conf: dict[str, str]) -> tuple[ShimCore, Relay]:
        dev, proto = self._parse_conf(conf)
        try:
            mac, dev_mtu = eth.interface_info(dev)
            self.sock = eth.open_packet_socket(dev, proto)
        except OSError as e:
            raise HandlerError(m.EINVAL, f"{self.type} on {dev!r}: {e.strerror or e}") from None
        self.framing = self._framing(mac, proto)
        self.framing.mgmt_frame(eth.BROADCAST, b"")  # loads scapy's layers now, not at a query
        self.mtu = self._layer_mtu(dev_mtu)
        core = ShimCore(eid_bits=self.eid_bits, encode_addr=eth.encode_addr,
                        decode_addrs=eth.decode_addrs, own=mac)
        self.spawn(self._report_drops())
        log.info("%s: %s layer %s on %s (%s), proto 0x%04x, mtu %d", self.name, self.type, layer,
                 dev, eth.mac_str(mac), proto, self.mtu)
        return core, Relay(self.sock, self.framing, BUFSIZE, self.on_mgmt)

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        info = await super().bootstrap(layer, conf)
        return m.LayerInfo(info.layer, self.hash_algo, info.mtu)

    def send_mgmt(self, dst: Hashable | None, frame: bytes) -> None:
        assert self.sock is not None and self.framing is not None
        self.sock.send(self.framing.mgmt_frame(eth.BROADCAST if dst is None else bytes(dst), frame))  # type: ignore[call-overload]

    def flow_header(self, flow: ShimFlow) -> bytes:
        assert isinstance(self.framing, eth.EthFraming)
        return self.framing.header(bytes(flow.addr), flow.remote_eid)  # type: ignore[call-overload]

    # -- differences from the udp shims -----------------------------------------

    async def _resolve(self, digest: bytes) -> Hashable | None:
        # Always ask the wire: Ethernet does not loop a frame back to its sender, so a name
        # registered only on this host is not reachable through this layer (use a local one).
        core = self._core()
        fut: asyncio.Future[Hashable | None] = asyncio.get_running_loop().create_future()
        self._queries.setdefault(digest, []).append(fut)
        core.query(digest, time.monotonic())
        self._flush()
        return await fut

    async def stop(self) -> None:
        await super().stop()
        if self.sock is not None:
            self.sock.close()

    async def _report_drops(self) -> None:
        """Log the drop counters whenever they moved: bad frames never pass silently."""
        seen = (0, 0)
        while True:
            await asyncio.sleep(STATS_EVERY)
            if self.relay is None or self.core is None:
                continue
            total = self.relay.dropped + self.core.dropped
            if (total, self.relay.overflow) != seen:
                seen = (total, self.relay.overflow)
                log.info("%s: dropped %d bad frames so far (%d malformed, for no flow or from the"
                         " wrong peer; %d bad management messages); %d SDUs overflowed",
                         self.name, total, self.relay.dropped, self.core.dropped,
                         self.relay.overflow)


class EthLlcIpcp(EthDixIpcp):
    """eth-llc: 802.3 frames with LLC SAPs as endpoint ids, so at most 63 flows."""

    type = "eth-llc"
    options = frozenset({"dev", "hash"})
    eid_bits = 6

    def _parse_conf(self, conf: dict[str, str]) -> tuple[str, int]:
        if "ethertype" in conf:
            raise HandlerError(m.EINVAL, "eth-llc frames carry a length, not an ethertype: "
                                         "drop the ethertype option")
        dev, _ = super()._parse_conf(conf)
        return dev, eth.ETH_P_802_2

    def _framing(self, mac: bytes, proto: int) -> eth.EthFraming | eth.LlcFraming:
        return eth.LlcFraming(mac)

    def _layer_mtu(self, dev_mtu: int) -> int:
        return min(dev_mtu, eth.LLC_MAX_LEN) - eth.LLC_EXTRA

    def flow_header(self, flow: ShimFlow) -> bytes:
        assert isinstance(self.framing, eth.LlcFraming)
        return self.framing.header(bytes(flow.addr), flow.eid, flow.remote_eid)  # type: ignore[call-overload]

    def _full(self) -> bool:
        core = self._core()
        return len(core.flows) + self._arriving >= core.eid_max

    async def flow_alloc(self, flow_id: int, digest: bytes, qos: QosSpec,
                         timeout: float) -> tuple[int, int]:
        if self._full():
            raise HandlerError(m.EIPCP, f"all {self._core().eid_max} LLC SAPs of {self.name} "
                                        "are in use")
        return await super().flow_alloc(flow_id, digest, qos, timeout)

    async def _arrived(self, req: FlowRequested) -> None:
        if self._full():
            self._core().refuse(req, E_REFUSED)
            self._flush()
            return
        self._arriving += 1
        try:
            await super()._arrived(req)
        finally:
            self._arriving -= 1
