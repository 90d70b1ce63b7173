"""operf: measure a flow's throughput, with every SDU checked at the receiver.

`operf -l` counts and verifies; `operf -n NAME -t SECONDS` floods (or paces
with -r) and prints sender and receiver rates, loss and corruption.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time

from apps.common import duration, fail, qos_arg, serve
from flowlib import Flow, FlowError, FlowTimeout, flow_alloc, qos

# Every operf SDU starts with a type and a sequence number.
HDR = struct.Struct("!BQ")
DATA, STOP, STATS = 0, 1, 2
# The receiver's report: SDUs, bytes, SDUs missing (gaps), out of order, corrupt.
REPORT = struct.Struct("!QQQQQ")


def pattern(size: int) -> bytes:
    """The payload every DATA SDU of this size carries, so corruption shows."""
    return bytes(i & 0xFF for i in range(size - HDR.size))


class Receiver:
    """Per-flow counters of what arrived and whether it was intact and in order."""

    def __init__(self) -> None:
        self.sdus = self.bytes = self.missing = self.reordered = self.corrupt = 0
        self.next_seq = 0
        self._patterns: dict[int, bytes] = {}

    def take(self, sdu: bytes) -> bytes | None:
        if len(sdu) < HDR.size:
            self.corrupt += 1
            return None
        kind, seq = HDR.unpack_from(sdu)
        if kind == STOP:
            return HDR.pack(STATS, seq) + REPORT.pack(
                self.sdus, self.bytes, self.missing, self.reordered, self.corrupt)
        self.sdus += 1
        self.bytes += len(sdu)
        expect = self._patterns.get(len(sdu))
        if expect is None:
            expect = self._patterns.setdefault(len(sdu), pattern(len(sdu)))
        if sdu[HDR.size :] != expect:
            self.corrupt += 1
        if seq > self.next_seq:
            self.missing += seq - self.next_seq
        elif seq < self.next_seq:
            self.reordered += 1
            self.missing -= 1
        self.next_seq = max(self.next_seq, seq + 1)
        return None


def server() -> None:
    receivers: dict[Flow, Receiver] = {}

    def on_sdu(flow: Flow, sdu: bytes) -> bytes | None:
        return receivers.setdefault(flow, Receiver()).take(sdu)

    serve("perf", on_sdu, idle_timeout=10.0)


def ask_stats(flow: Flow, sent: int, deadline: float) -> bytes:
    """STOP until the receiver's report comes: on a raw flow either may be lost."""
    flow.set_timeout(0.2)
    while True:
        flow.write(HDR.pack(STOP, sent))
        try:
            while True:
                reply = flow.read()
                if len(reply) == HDR.size + REPORT.size and reply[0] == STATS:
                    return reply
        except FlowTimeout:
            if time.monotonic() > deadline:
                raise FlowTimeout(f"{flow.name or 'the server'} sent no report") from None


def client(args: argparse.Namespace) -> int:
    try:
        flow = flow_alloc(args.name, qos=args.qos, timeout=args.timeout, encrypt=args.encrypt)
    except FlowError as e:
        fail("operf", e)
    size = min(max(args.size, HDR.size), flow.mtu)
    payload = pattern(size)
    gap = size * 8 / args.rate if args.rate else 0.0
    how = f"at {args.rate / 1e6:.3f} Mb/s" if args.rate else "flooding"
    print(f"Sending {size} byte SDUs to {args.name} for {args.time:g} s, {how}.\n", flush=True)
    sent = 0
    with flow:
        try:
            start = time.monotonic()
            end = start + args.time
            pack, write = HDR.pack, flow.write
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                for _ in range(64):  # check the clock every 64 SDUs
                    write(pack(DATA, sent) + payload)
                    sent += 1
                if gap:
                    time.sleep(max(start + sent * gap - time.monotonic(), 0))
            elapsed = time.monotonic() - start
            reply = ask_stats(flow, sent, deadline=time.monotonic() + max(5.0, args.time))
        except FlowError as e:
            fail("operf", e)
    rcvd, nbytes, missing, reordered, corrupt = REPORT.unpack_from(reply, HDR.size)
    print(f"--- {args.name} perf statistics ---")
    print(f"{sent} SDUs sent, {rcvd} received, {sent - rcvd} lost ({missing} gaps in sequence), "
          f"{reordered} out-of-order, {corrupt} corrupt, time: {elapsed * 1000:.3f} ms")
    print(f"sender: {sent * size * 8 / elapsed / 1e6:.3f} Mb/s ({sent / elapsed:.0f} SDUs/s), "
          f"receiver: {nbytes * 8 / elapsed / 1e6:.3f} Mb/s ({rcvd / elapsed:.0f} SDUs/s)")
    return 0 if rcvd and not corrupt else 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="operf", description="Ouroboros perf: throughput over a flow.")
    p.add_argument("-l", "--listen", action="store_true", help="run as the server")
    p.add_argument("-n", "--server-name", dest="name", help="name of the server")
    p.add_argument("-t", "--time", type=lambda t: duration(t, "s"), default=10.0, help="test length (default 10s)")
    p.add_argument("-s", "--size", type=int, default=1400, help="SDU size in bytes (default 1400)")
    p.add_argument("-r", "--rate", type=float, default=0.0, help="bits/s to send at (default: flood)")
    p.add_argument("-q", "--qos", type=qos_arg, default=qos.raw, help="raw|best|video|voice|data")
    p.add_argument("--timeout", type=float, default=None, help="allocation timeout in seconds")
    p.add_argument("--encrypt", action="store_true", help="encrypt the flow end to end")
    args = p.parse_args(argv)
    if args.listen:
        server()
        return
    if not args.name:
        p.error("No server specified (-n NAME).")
    sys.exit(client(args))
