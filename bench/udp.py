"""The udp suite: flows of a udp4 layer between two irmds on loopback, against raw UDP sockets.

Host A (127.0.0.1) runs the flow server; host B (127.0.0.2, `peer 127.0.0.1`) allocates. The
baseline is a pair of connected UDP sockets between the same two addresses, made with the same
socket options as the IPCP's (transports.udp.open_udp: 8 MiB buffers), served by a peer process
as the flows are. RTT of 64-byte SDUs; one-way throughput of 1,400-byte SDUs as the receiver
counted them (both are lossy under flood: UDP drops at a full receive buffer).

`udp.*` rows are the layer as users get it (each flow its own connected UDP socket, no relay);
`udp.relay.*` rows (no goal, for information) force the IPCPs' relay data path with the
test-only `impair loss=0`: the path every SDU takes over the eth layers.
"""

from __future__ import annotations

import contextlib
import functools
import logging

from bench import hosts
from bench.harness import Goal, Row, Suite

log = logging.getLogger(__name__)

A_IP, B_IP = "127.0.0.1", "127.0.0.2"
RTT_COUNT = 10_000
RELAY = ("impair", "loss=0")  # any impairment routes data through the relays


def run(runs: int) -> list[Row]:
    return [*_suite(runs, "udp", (), goals=True), *_suite(runs, "udp.relay", RELAY, goals=False)]


def _suite(runs: int, prefix: str, opts: tuple[str, ...], goals: bool) -> list[Row]:
    with contextlib.ExitStack() as ex:
        a, _, irm = hosts.udp_pair(ex, A_IP, B_IP, *opts)
        raw = hosts.RawUdpPeer(a, A_IP, B_IP)
        ex.callback(raw.close)
        rtt = functools.partial(hosts.rtt, count=RTT_COUNT)
        rtts = hosts.measure_runs(irm, raw, runs, rtt, f"{prefix} rtt")
        tputs = hosts.measure_runs(irm, raw, runs, hosts.tput, f"{prefix} throughput")
    return hosts.rows(prefix, rtts, tputs, Goal("<=", 2.0) if goals else None, Goal(">=", 0.5) if goals else None)


SUITE = Suite("udp", "udp4-layer flows (127.0.0.1 <-> 127.0.0.2) vs raw UDP sockets", run)
