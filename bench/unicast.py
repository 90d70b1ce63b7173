"""The unicast suite: a unicast layer over a loopback udp4 layer, one irmd per simulated host.

1 hop: hosts A (127.0.0.1) and B (127.0.0.2), each with a udp4 shim in layer "lan" and a
unicast member of layer "net" (n1 bootstraps, n2 enrolls and connects to n1). 3 hops: four
hosts in a line (127.0.0.1..4, n(i) enrolls through and connects to n(i-1)); the flow runs
between the ends; the .key rows are the same layers with a layer key (every N-1 PDU sealed).
The flow server sits on the last host, the client on the first; the baseline is a pair of
connected UDP sockets between the same two addresses, served by a peer process.
RTT of 64-byte SDUs; one-way throughput of 1,400-byte SDUs as the receiver counted them.

Every figure is measured min(runs, MAX_RUNS) times: building a layer takes seconds, and each
run of each figure costs about a second per side.
"""

from __future__ import annotations

import contextlib
import logging

from bench import hosts
from bench.harness import Goal, Row, Suite
from bench.stack import Stack
from flowlib.irm import IrmClient

log = logging.getLogger(__name__)

LAYER = "net"
MAX_RUNS = 3
KEY = ("key", "bench-layer-key")  # the .key rows: every N-1 PDU sealed (sequence number, BLAKE2b tag)


def run(runs: int) -> list[Row]:
    n = min(runs, MAX_RUNS)
    return [*_line(2, n, "unicast.1hop", Goal(">=", 0.3)), *_line(4, n, "unicast.3hop", None),
            *_line(2, n, "unicast.1hop.key", None, KEY), *_line(4, n, "unicast.3hop.key", None, KEY)]


def _line(count: int, runs: int, prefix: str, tput_goal: Goal | None, key: tuple[str, ...] = ()) -> list[Row]:
    ips = [f"127.0.0.{i + 1}" for i in range(count)]
    port = hosts.free_port(tuple(ips))
    with contextlib.ExitStack() as ex:
        stacks = [ex.enter_context(Stack()) for _ in ips]
        for i, (st, ip) in enumerate(zip(stacks, ips, strict=True)):
            hosts.udp_shim(st, ip, port, None if i == 0 else ips[0])
        hosts.irm_at(stacks[0], "ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", LAYER, *key,
                     "autobind")
        for i, st in enumerate(stacks[1:], start=2):
            hosts.irm_at(st, "ipcp", "enroll", "type", "unicast", "name", f"n{i}", "layer", LAYER,
                         "dst", f"n{i - 1}", *key, "autobind")  # fmt: skip
            hosts.irm_at(st, "ipcp", "connect", "name", f"n{i}", "dst", f"n{i - 1}")
        server, client = stacks[-1], stacks[0]
        hosts.flow_server(server, LAYER)
        raw = hosts.RawUdpPeer(server, ips[-1], ips[0])
        ex.callback(raw.close)
        irm = IrmClient(client.sock)
        ex.callback(irm.close)
        took = hosts.wait_route(irm)
        log.info("%s: first flow end to end %.1f s after the layer formed", prefix, took)
        rtts = hosts.measure_runs(irm, raw, runs, hosts.rtt, f"{prefix} rtt")
        tputs = hosts.measure_runs(irm, raw, runs, hosts.tput, f"{prefix} throughput")
    return hosts.rows(prefix, rtts, tputs, None, tput_goal)


SUITE = Suite("unicast", "unicast layer over loopback udp4, 1 and 3 hops, vs raw UDP sockets", run)
