"""The eth-dix and eth-llc IPCPs: a layer over raw Ethernet frames on one interface, no IP needed,
speaking Ouroboros 0.23's eth wire (names by broadcast query, flows on endpoint 0, data by eid).

Between nodes of ours, also deallocation notices and peer keepalives (docs/interop.md). On a
loopback interface (`lo`) every frame comes back to its sender, so the layer reaches itself.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Hashable

from ipcp.shim import ShimCore, ShimFlow
from ipcp.shim_io import ShimIpcp, impaired
from ipcp.shim_wire import ETH_DIX, ETH_LLC, Layout
from proto import messages as m
from proto.names import HASHES
from transports import eth
from transports.channel import HandlerError
from transports.relay import Relay

log = logging.getLogger(__name__)

DEFAULT_HASH = "SHA3_256"
DIX_MAX_MTU = 0xFFFF  # the length field's reach
BUFSIZE = 65536  # frames and application SDUs are read whole, oversized ones included


class EthDixIpcp(ShimIpcp):
    """eth-dix: DIX frames of one ethertype (default 0xA000), 16-bit endpoint ids."""

    type = "eth-dix"
    options = frozenset({"dev", "ethertype", "hash", "impair"})
    layout: Layout = ETH_DIX
    loops_back = False  # Ethernet does not hand a frame back to its sender (but `lo` does, by itself)

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)
        self.sock: socket.socket | None = None
        self.framing: eth.EthFraming | eth.LlcFraming | None = None

    # -- transport -------------------------------------------------------------

    def _parse_conf(self, conf: dict[str, str]) -> tuple[str, int]:
        """(dev, protocol to bind) from the bootstrap options."""
        if unknown := set(conf) - self.options:
            raise HandlerError(
                m.EINVAL, f"unknown {self.type} options {sorted(unknown)}: expected {sorted(self.options)}"
            )
        dev = conf.get("dev", "")
        if not dev:
            raise HandlerError(m.EINVAL, f'{self.type} needs "dev <interface>"')
        self.hash_algo = conf.get("hash", DEFAULT_HASH)
        if self.hash_algo not in HASHES:
            raise HandlerError(m.EINVAL, f"bad hash {self.hash_algo!r}: expected one of {', '.join(HASHES)}")
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

    def _link_mtu(self, dev_mtu: int, loopback: bool) -> int:
        """As Ouroboros: the interface's MTU up to what the length field reaches, 9000 on a loopback."""
        mtu = min(dev_mtu, DIX_MAX_MTU)
        return min(mtu, eth.LO_MTU) if loopback else mtu

    def _extra(self) -> int:
        return eth.DIX_EXTRA

    async def open_transport(self, layer: str, conf: dict[str, str]) -> tuple[ShimCore, Relay]:
        dev, proto = self._parse_conf(conf)
        try:
            mac, dev_mtu = eth.interface_info(dev)
            self.sock = eth.open_packet_socket(dev, proto)
        except OSError as e:
            raise HandlerError(m.EINVAL, f"{self.type} on {dev!r}: {e.strerror or e}") from None
        self.framing = self._framing(mac, proto)
        self.framing.mgmt_frame(eth.BROADCAST, b"")  # loads scapy's layers now, not at a query
        link_mtu = self._link_mtu(dev_mtu, eth.is_loopback(dev))
        self.mtu = link_mtu - self._extra()
        self.capacity = eth.link_speed(dev)
        hash_len = HASHES[self.hash_algo]().digest_size
        core = ShimCore(self.layout.limited(self.mtu), hash_len=hash_len, own=mac, discovery=False)
        log.info(
            "%s: %s layer %s on %s (%s), proto 0x%04x, mtu %d",
            self.name,
            self.type,
            layer,
            dev,
            eth.mac_str(mac),
            proto,
            self.mtu,
        )
        framing = impaired(self.framing, conf.get("impair"))
        return core, Relay(self.sock, framing, BUFSIZE, self.on_mgmt, max_sdu=self.mtu)

    def send_mgmt(self, dst: Hashable | None, frame: bytes) -> None:
        assert self.sock is not None and self.framing is not None
        self.sock.send(self.framing.mgmt_frame(eth.BROADCAST if dst is None else bytes(dst), frame))  # type: ignore[call-overload]

    def show_addr(self, addr: Hashable) -> str:
        return eth.mac_str(bytes(addr))  # type: ignore[call-overload]

    def flow_header(self, flow: ShimFlow) -> bytes:
        assert isinstance(self.framing, eth.EthFraming)
        return self.framing.header(bytes(flow.addr), flow.remote_eid)  # type: ignore[call-overload]

    async def stop(self) -> None:
        await super().stop()
        if self.sock is not None:
            self.sock.close()


class EthLlcIpcp(EthDixIpcp):
    """eth-llc: 802.3 frames with LLC SAPs as endpoint ids, so at most 62 flows."""

    type = "eth-llc"
    options = frozenset({"dev", "hash", "impair"})
    layout = ETH_LLC

    def _parse_conf(self, conf: dict[str, str]) -> tuple[str, int]:
        if "ethertype" in conf:
            raise HandlerError(m.EINVAL, "eth-llc frames carry a length, not an ethertype: drop the ethertype option")
        dev, _ = super()._parse_conf(conf)
        return dev, eth.ETH_P_802_2

    def _framing(self, mac: bytes, proto: int) -> eth.EthFraming | eth.LlcFraming:
        return eth.LlcFraming(mac)

    def _link_mtu(self, dev_mtu: int, loopback: bool) -> int:
        return min(dev_mtu, eth.LLC_MAX_LEN)  # an 802.3 length; Ouroboros's lo cap is above it

    def _extra(self) -> int:
        return eth.LLC_EXTRA

    def flow_header(self, flow: ShimFlow) -> bytes:
        assert isinstance(self.framing, eth.LlcFraming)
        return self.framing.header(bytes(flow.addr), flow.eid, flow.remote_eid)  # type: ignore[call-overload]
