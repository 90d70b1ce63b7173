"""ocbr: a constant bit rate test, as C Ouroboros 0.23's ocbr: the client sends SDUs of one size at a
rate (or flooding) for a duration; the server reports what each flow brought, every interval.

Each SDU starts with its sequence number (8 bytes, host order, as C's `long`).
"""

from __future__ import annotations

import argparse
import dataclasses
import struct
import sys
import time

from apps.common import Pacer, alloc, on_signals, qos_arg, rate, serve
from flowlib import Flow, FlowError, qos
from proto import logs
from proto.version import add_version

SEQ = struct.Struct("=q")
BUF_SIZE = 524288  # the largest SDU, as C's
MAX_FLOWS = 10  # flows a server takes at once, as C's thread pool


@dataclasses.dataclass
class Tally:
    """One flow's counts: all of them, and at the start of the current interval."""

    start: float
    packets: int = 0
    nbytes: int = 0
    iv_start: float = 0.0
    iv_packets: int = 0
    iv_bytes: int = 0

    def line(self, flow_id: int, now: float) -> str:
        us = max((now - self.iv_start) * 1e6, 1.0)
        packets, nbytes = self.packets - self.iv_packets, self.nbytes - self.iv_bytes
        self.iv_start, self.iv_packets, self.iv_bytes = now, self.packets, self.nbytes
        return (
            f"Flow {flow_id:4d}: {packets:9d} packets ({nbytes:12d} bytes) in {us / 1000:9.0f} ms => "
            f"{packets / us * 1e6:9.4f} pps, {8 * nbytes / us:9.4f} Mbps"
        )


def server(interval: float, timeout: float) -> None:
    tallies: dict[Flow, Tally] = {}

    def on_sdu(flow: Flow, sdu: bytes) -> None:
        now = time.monotonic()
        t = tallies.get(flow) or tallies.setdefault(flow, Tally(now, iv_start=now))
        t.packets += 1
        t.nbytes += len(sdu)

    def on_tick(now: float) -> None:
        for flow, t in tallies.items():
            if now - t.iv_start >= interval:
                print(t.line(flow.flow_id, now), flush=True)

    def on_end(flow: Flow) -> None:
        t = tallies.pop(flow, None)
        if t is not None:
            print(f"Test on flow {flow.flow_id} timed out", flush=True)
            print(t.line(flow.flow_id, time.monotonic()), flush=True)

    serve(
        "cbr",
        on_sdu,
        idle_timeout=timeout,
        on_end=on_end,
        on_tick=on_tick,
        max_flows=MAX_FLOWS,
        banner=f" Interval is {interval:g} s, timeout is {timeout:g} s.",
    )


def client(args: argparse.Namespace) -> int:
    print(f"Client started, duration {args.duration:g}, rate {args.rate:.0f} b/s, size {args.size} B.", flush=True)
    flow = alloc("ocbr", args, args.alloc_timeout)
    stopped = []
    on_signals(lambda: stopped.append(True))
    buf = bytearray(max(args.size, SEQ.size))
    sent = 0
    pacer = None if args.flood else Pacer(args.rate, args.size, args.sleep)
    start = time.monotonic()
    with flow:
        try:
            while not stopped and time.monotonic() - start < args.duration:
                SEQ.pack_into(buf, 0, sent)
                flow.write(memoryview(buf)[: args.size])
                sent += 1
                if pacer is not None:
                    pacer.wait(sent)
        except FlowError as e:
            print(f"ocbr: {e}", file=sys.stderr)
    ms = max((time.monotonic() - start) * 1000, 1e-3)
    print(
        f"sent statistics: {sent:9d} packets, {sent * args.size:12d} bytes in {ms:9.0f} ms, "
        f"{sent / (ms * 1000) * args.size * 8:4.4f} Mb/s",
        flush=True,
    )
    return 0 if sent else 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ocbr", description="Sends packets from client to server at a constant bit rate.")
    p.add_argument("-l", "--listen", action="store_true", help="run in server mode")
    p.add_argument("-i", "--interval", type=float, default=1.0, help="server report interval (s)")
    p.add_argument("-t", "--timeout", type=float, default=1.0, help="server timeout interval (s)")
    p.add_argument("-n", "--server_apn", "--server-name", dest="name", help="name of the server")
    p.add_argument("-d", "--duration", type=float, default=60.0, help="duration for sending (s)")
    p.add_argument("-f", "--flood", action="store_true", help="send packets as fast as possible")
    p.add_argument("-s", "--size", type=int, default=1000, help=f"packet size (B, max {BUF_SIZE} B)")
    p.add_argument("-r", "--rate", type=rate, default=1e6, help="rate (b/s, or with k|M|G)")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--sleep",
        dest="sleep",
        action="store_true",
        default=True,
        help="sleep in between sending packets (the default)",
    )
    how.add_argument("--spin", dest="sleep", action="store_false", help="spin the CPU between sending packets")
    p.add_argument("-q", "--qos", type=qos_arg, default=qos.raw, help="the flow's QoS (ours; C's is raw)")
    p.add_argument("--alloc-timeout", type=float, default=None, help="allocation timeout in seconds (ours)")
    p.add_argument("--encrypt", action="store_true", help="encrypt the flow end to end (ours)")
    logs.add_arguments(p, quiet=False)
    add_version(p)
    args = p.parse_args(argv)
    logs.setup("ocbr", args, daemon=args.listen)
    if args.listen:
        server(args.interval, args.timeout)
        return
    if not args.name:
        p.error("No server specified.")
    if not 0 < args.size <= BUF_SIZE:
        p.error(f"Maximum size: {BUF_SIZE}." if args.size > 0 else "Size overflow.")
    sys.exit(client(args))
