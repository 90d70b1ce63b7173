"""The eth suite (root only): eth-dix flows across a veth pair between two namespaces, vs raw AF_PACKET.

Hosts A and B are network namespaces joined by a veth pair with no IP, each with its own irmd
and an eth-dix IPCP on its end of the pair; A runs the flow server, this process allocates at B.
The baseline is a plain AF_PACKET socket at each end of the same veth (bench.packet's frames),
served by a peer process as the flows are. RTT of 64-byte SDUs; one-way throughput of
1,400-byte SDUs as the receiver counted them. Without root the suite logs why and gives no rows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import TypeVar

from bench import hosts, netns
from bench.harness import Goal, Row, Suite
from bench.packet import ETHERTYPE, PacketLink
from bench.stack import Stack
from flowlib.irm import IrmClient
from transports.eth import open_packet_socket

log = logging.getLogger(__name__)

LAYER = "ethbench"
MAX_RUNS = 5
RAW = "raw AF_PACKET sockets"

T = TypeVar("T")


class RawPacketPeer(hosts.RawServer):
    """Sessions on a fresh AF_PACKET socket at each end of the veth pair: served at A, opened at B."""

    def __init__(self, stack: Stack, pair: netns.VethPair) -> None:
        super().__init__(stack)
        self.pair = pair
        self.macs = pair.mac(0), pair.mac(1)

    def run(self, measure: hosts.Measure[T]) -> T:
        server, client = (self.pair.inside(i, functools.partial(open_packet_socket, self.pair.dev[i], ETHERTYPE))
                          for i in (0, 1))  # fmt: skip
        with client:
            with server:
                self.hand(server, f"{self.macs[0].hex()} {self.macs[1].hex()}".encode())
            client.setblocking(True)
            link = PacketLink(client, self.macs[1], self.macs[0])
            try:
                return measure(link.send, link.recv, link.settimeout)
            finally:
                with contextlib.suppress(OSError):  # an empty SDU ends an echo session
                    link.send(b"")


def run(runs: int) -> list[Row]:
    why = netns.unavailable()
    if why is not None:
        log.warning("eth suite skipped: %s", why)
        return []
    n = min(runs, MAX_RUNS)
    with contextlib.ExitStack() as ex:
        pair = ex.enter_context(netns.VethPair("obe"))
        a, b = (ex.enter_context(Stack(ns)) for ns in pair.ns)
        for st, dev in ((a, pair.dev[0]), (b, pair.dev[1])):
            hosts.irm_at(st, "ipcp", "bootstrap", "type", "eth-dix", "name", "e", "layer", LAYER, "dev", dev)
        hosts.flow_server(a, LAYER)
        raw = RawPacketPeer(a, pair)
        ex.callback(raw.close)
        irm = IrmClient(b.sock)
        ex.callback(irm.close)
        hosts.wait_route(irm)
        rtts = hosts.measure_runs(irm, raw, n, hosts.rtt, "eth rtt")
        tputs = hosts.measure_runs(irm, raw, n, hosts.tput, "eth throughput")
    return hosts.rows("eth", rtts, tputs, None, Goal(">=", 0.3), RAW)


SUITE = Suite("eth", "eth-dix flows across a veth pair (netns, root) vs raw AF_PACKET sockets", run)
