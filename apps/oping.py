"""oping: measure round-trip times over a flow, as Ouroboros's oping does.

`oping -l` serves echo replies; `oping -n NAME` sends echo requests and
prints ping-style statistics.
"""

from __future__ import annotations

import argparse
import math
import select
import struct
import sys
import time

from apps.common import duration, fail, qos_arg, serve
from flowlib import Flow, FlowError, flow_alloc, qos

# The 24-byte oping header: type, id (sequence number), send time in ns (monotonic clock).
HDR = struct.Struct("!IIQ8x")
ECHO_REQUEST = 0
ECHO_REPLY = 1
MIN_SIZE = 64
MAX_INTERVAL = 10.0


class Stats:
    """Welford's running mean and deviation of the RTTs."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, rtt: float) -> None:
        self.n += 1
        delta = rtt - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (rtt - self.mean)
        self.min = min(self.min, rtt)
        self.max = max(self.max, rtt)

    @property
    def mdev(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan


def echo(_: Flow, sdu: bytes) -> bytes | None:
    if len(sdu) < HDR.size:
        return None
    kind, seq, stamp = HDR.unpack_from(sdu)
    if kind != ECHO_REQUEST:
        return None
    return HDR.pack(ECHO_REPLY, seq, stamp) + sdu[HDR.size :]


def client(args: argparse.Namespace) -> int:
    try:
        flow = flow_alloc(args.name, qos=args.qos, timeout=args.timeout, encrypt=args.encrypt)
    except FlowError as e:
        fail("oping", e)
    size = max(args.size, MIN_SIZE)
    if size > flow.mtu:
        print(f"Packet size truncated to {flow.mtu} bytes.")
        size = flow.mtu
    interval = min(args.interval, MAX_INTERVAL)
    if args.interval > MAX_INTERVAL:
        print("Ping interval truncated to 10s.")
    count = args.count
    padding = bytes(size - HDR.size)
    print(f"Pinging {args.name} with {size} bytes of data ({count} packets):\n", flush=True)
    stats, sent, expected, out_of_order = Stats(), 0, 0, 0
    poller = select.poll()
    poller.register(flow.fd, select.POLLIN)
    start = time.monotonic()
    next_send = start
    deadline = math.inf
    with flow:
        try:
            while sent < count or (stats.n + out_of_order < sent and time.monotonic() < deadline):
                now = time.monotonic()
                if sent < count and now >= next_send:
                    flow.write(HDR.pack(ECHO_REQUEST, sent, time.monotonic_ns()) + padding)
                    sent += 1
                    next_send += interval
                    if sent == count:
                        deadline = time.monotonic() + interval + 2.0  # Ouroboros's reply timeout
                    continue
                wait = (next_send if sent < count else deadline) - now
                if not poller.poll(max(wait, 0) * 1000):
                    continue
                sdu = flow.read()
                if len(sdu) < HDR.size:
                    print("Invalid message.")
                    continue
                kind, seq, stamp = HDR.unpack_from(sdu)
                if kind != ECHO_REPLY or seq >= sent:
                    print("Invalid id." if kind == ECHO_REPLY else f"Invalid message on flow {flow.flow_id}.")
                    continue
                rtt = (time.monotonic_ns() - stamp) / 1e6
                late = seq < expected
                expected = max(expected, seq + 1)
                stats.add(rtt)
                if late:
                    out_of_order += 1
                if not args.quiet:
                    print(f"{len(sdu)} bytes from {args.name}: seq={seq} time={rtt:.3f} ms"
                          f"{' [out-of-order]' if late else ''}", flush=True)
        except KeyboardInterrupt:
            pass
        except FlowError as e:
            print(f"oping: {e}", file=sys.stderr)
    elapsed = (time.monotonic() - start) * 1000
    loss = math.ceil(100 - 100 * stats.n / sent) if sent else 0
    print(f"\n--- {args.name} ping statistics ---")
    print(f"{sent} packets transmitted, {stats.n} received, {out_of_order} out-of-order, "
          f"{loss}% packet loss, time: {elapsed:.3f} ms")
    if stats.n:
        print(f"rtt min/avg/max/mdev = {stats.min:.3f}/{stats.mean:.3f}/{stats.max:.3f}/{stats.mdev:.3f} ms")
    return 0 if stats.n else 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="oping", description="Ouroboros ping: RTT over a flow.")
    p.add_argument("-l", "--listen", action="store_true", help="run as the echo server")
    p.add_argument("-n", "--server-name", dest="name", help="name to ping")
    p.add_argument("-c", "--count", type=int, default=2**31 - 1, help="packets to send (default: until stopped)")
    p.add_argument("-d", "--duration", type=lambda t: duration(t, "s"), help="stop after this long (e.g. 10s)")
    p.add_argument("-i", "--interval", type=duration, default=1.0, help="between packets (default 1000 ms)")
    p.add_argument("-s", "--size", type=int, default=MIN_SIZE, help="SDU size in bytes (default 64)")
    p.add_argument("-q", "--qos", type=qos_arg, default=qos.raw, help="raw|best|video|voice|data")
    p.add_argument("-Q", "--quiet", action="store_true", help="print only the statistics")
    p.add_argument("--timeout", type=float, default=None, help="allocation timeout in seconds")
    p.add_argument("--encrypt", action="store_true", help="encrypt the flow end to end")
    args = p.parse_args(argv)
    if args.listen:
        serve("ping", echo, idle_timeout=10.0)
        return
    if not args.name:
        p.error("No server specified (-n NAME).")
    if args.count < 1:
        p.error("count must be at least 1")
    if args.duration is not None:
        args.count = max(int(args.duration / args.interval), 1) if args.interval else int(args.duration * 10)
    sys.exit(client(args))
