"""The unicast suite: a unicast layer over a loopback udp4 layer, one irmd per simulated host.

1 hop: hosts A (127.0.0.1) and B (127.0.0.2), each with a udp4 shim in layer "lan" and a
unicast member of layer "net" (n1 bootstraps, n2 enrolls and connects to n1). 3 hops: four
hosts in a line (127.0.0.1..4, n(i) enrolls through and connects to n(i-1)); the flow runs
between the ends; the .key rows are the same layers with a layer key (every N-1 PDU sealed).
The flow server sits on the last host, the client on the first; the baseline is a pair of
connected UDP sockets between the same two addresses, served by a peer process.
RTT of 64-byte SDUs; one-way throughput of 1,400-byte SDUs as the receiver counted them.

The dt_forward rows time the data transfer thread's forwarding loop alone (no processes): CPU
per PDU with a layer key against the same PDUs in an open layer.

Every figure over layers is measured min(runs, MAX_RUNS) times: building a layer takes seconds, and each
run of each figure costs about a second per side.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator

from bench import hosts
from bench.harness import Goal, Row, Suite, median_row
from bench.stack import Stack
from flowlib.irm import IrmClient
from ipcp.unicast import auth, pci
from ipcp.unicast.dt import Dt, Link
from ipcp.unicast.pci import FRAMING, MAX_FRAME_PDUS, Pci, PciFormat

log = logging.getLogger(__name__)

LAYER = "net"
MAX_RUNS = 3
N1_MTU = 8980  # the udp layer's: what the data transfer thread packs its frames up to
KEY = ("key", "bench-layer-key")  # the .key rows: every N-1 PDU sealed (sequence number, BLAKE2b tag)


def run(runs: int) -> list[Row]:
    n = min(runs, MAX_RUNS)
    return [
        *_line(2, n, "unicast.1hop", Goal(">=", 0.5), Goal("<=", 2.0)),
        *_line(4, n, "unicast.3hop", Goal(">=", 0.3)),
        *_line(2, n, "unicast.1hop.key", None, key=KEY),
        *_line(4, n, "unicast.3hop.key", None, key=KEY),
        *(_forward_cost(size, runs) for size in (64, 1400)),
    ]


@contextlib.contextmanager
def member_keys() -> Iterator[None]:
    """The IPCPs' member keys in a directory of the run's, not the machine's /var/lib/ouroboros."""
    saved = os.environ.get("OUROBOROS_STATE_DIR")
    with tempfile.TemporaryDirectory(prefix="ouroboros-bench-keys-") as keys:
        os.environ["OUROBOROS_STATE_DIR"] = keys
        try:
            yield
        finally:
            if saved is None:
                del os.environ["OUROBOROS_STATE_DIR"]
            else:
                os.environ["OUROBOROS_STATE_DIR"] = saved


def _forward_cost(size: int, runs: int, burst: int = 2000) -> Row:
    """CPU per PDU the data transfer thread spends forwarding (check the link's seal, route, seal for
    the next link, send), keyed layer against open layer, on one thread: what a layer key costs."""
    keyed, open_ = [], []
    for _ in range(runs):
        open_.append(_forward_us(size, burst, sealed=False))
        keyed.append(_forward_us(size, burst, sealed=True))
    return median_row(f"unicast.dt_forward_{size}B.key", "us", keyed, open_, "the same PDUs, open layer")


def _forward_us(size: int, burst: int, sealed: bool) -> float:
    """CPU per PDU to forward frames packed as a sender packs them for a udp layer's MTU."""
    fmt = PciFormat()
    dt = Dt(fmt, 1, 60, 65536, lambda pdu, hop: None, lambda addr, link: None, lambda flow, update: None)
    drain, out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    out.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    drain.setblocking(False)
    keys = (b"\x01" * 32, b"\x02" * 32)
    room = N1_MTU - (auth.SEAL if sealed else 0)
    links = [
        Link(
            hop,
            out if hop == 3 else socket.socket(),
            auth.Sealer(k) if sealed else None,
            auth.Opener(k) if sealed else None,
            room=room,
        )
        for hop, k in zip((2, 3), keys, strict=True)
    ]
    dt.n1[3], dt.pff = links[1], {9: [3]}
    pdu = fmt.pack(Pci(9, 0, 60, 0, 5)) + b"x" * size
    per_frame = min(MAX_FRAME_PDUS, room // (len(pdu) + FRAMING))
    sealer = auth.Sealer(keys[0])
    best = float("inf")
    try:
        for _ in range(5):
            frame = pci.frame(*[pdu] * per_frame)
            frames = [sealer.seal_bytes(frame) if sealed else frame for _ in range(burst // per_frame)]
            start = time.perf_counter()
            dt.from_n1(links[0], frames)
            best = min(best, time.perf_counter() - start)
            with contextlib.suppress(BlockingIOError):
                while True:
                    drain.recv(65536)
    finally:
        for sock in (drain, out, links[0].sock):
            sock.close()
    sent = 5 * (burst // per_frame) * per_frame
    if dt.counters.forwarded != sent:
        raise RuntimeError(f"forwarded {dt.counters.forwarded} of {sent} PDUs: {dt.counters}")
    return best / (sent // 5) * 1e6


def line_layer(
    ex: contextlib.ExitStack, count: int, key: tuple[str, ...], irmd_args: tuple[str, ...] = ()
) -> list[Stack]:
    """`count` hosts in a line (127.0.0.1...), each a udp4 shim and a unicast member of LAYER: n(i)
    enrolls through and connects to n(i-1). The stacks, first to last; `irmd_args` for every IRMd."""
    ips = [f"127.0.0.{i + 1}" for i in range(count)]
    port = hosts.free_port(tuple(ips))
    ex.enter_context(member_keys())
    stacks = [ex.enter_context(Stack(irmd_args=irmd_args)) for _ in ips]
    for i, (st, ip) in enumerate(zip(stacks, ips, strict=True)):
        hosts.udp_shim(st, ip, port, None if i == 0 else ips[0])
    hosts.irm_at(stacks[0], "ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", LAYER, *key, "autobind")
    for i, st in enumerate(stacks[1:], start=2):
        hosts.irm_at(st, "ipcp", "enroll", "type", "unicast", "name", f"n{i}", "layer", LAYER,
                     "dst", f"n{i - 1}", *key, "autobind")  # fmt: skip
        hosts.irm_at(st, "ipcp", "connect", "name", f"n{i}", "dst", f"n{i - 1}")
    return stacks


def _line(
    count: int, runs: int, prefix: str, tput_goal: Goal | None, rtt_goal: Goal | None = None, key: tuple[str, ...] = ()
) -> list[Row]:
    with contextlib.ExitStack() as ex:
        stacks = line_layer(ex, count, key)
        server, client = stacks[-1], stacks[0]
        hosts.flow_server(server, LAYER)
        raw = hosts.RawUdpPeer(server, f"127.0.0.{count}", "127.0.0.1")
        ex.callback(raw.close)
        irm = IrmClient(client.sock)
        ex.callback(irm.close)
        took = hosts.wait_route(irm)
        log.info("%s: first flow end to end %.1f s after the layer formed", prefix, took)
        rtts = hosts.measure_runs(irm, raw, runs, hosts.rtt, f"{prefix} rtt")
        tputs = hosts.measure_runs(irm, raw, runs, hosts.tput, f"{prefix} throughput")
    return hosts.rows(prefix, rtts, tputs, rtt_goal, tput_goal)


SUITE = Suite("unicast", "unicast layer over loopback udp4, 1 and 3 hops, vs raw UDP sockets", run)
