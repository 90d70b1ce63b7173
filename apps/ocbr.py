"""ocbr: a constant bit rate test, as C Ouroboros 0.23's ocbr: the client sends SDUs of one size at a
rate (or flooding) for a duration; the server reports what each flow brought, every interval.

Each SDU starts with its sequence number (8 bytes, host order, as C's `long`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import struct
import sys
import time

from apps.common import (
    RATES,
    CParser,
    FlowQuota,
    Pacer,
    alloc,
    c_decimal,
    c_long,
    ends_quietly,
    fail,
    on_signals,
    qos_arg,
    rounds,
    switch_listening,
)
from flowlib import FLOWSSNDTIMEO, EventQueue, EventType, Flow, FlowError, FlowSet, qos
from proto import logs
from proto.service import notify_ready
from proto.version import add_version

SEQ = struct.Struct("=q")
BUF_SIZE = 524288  # the largest SDU, as C's
MAX_FLOWS = 10  # flows a server takes at once, as C's thread pool
# Of them, one client (a local user other than root, a remote peer) holds at most half, and clients
# together leave two to the server's admins: one user's flows once held every place, root's too.
PER_CLIENT = MAX_FLOWS // 2
WRITE_GRACE = 2.0  # seconds past the test's duration a client's write waits for a server to read
USERS_TOTAL = MAX_FLOWS - 2


@dataclasses.dataclass
class Tally:
    """One flow's counts: all of them, and at the start of the current interval."""

    alive: float  # when it last brought an SDU
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
            f"Flow {flow_id:4d}: {packets:9d} packets ({nbytes:12d} bytes) in {int(us) // 1000:9d} ms => "
            f"{packets / us * 1e6:9.4f} pps, {8 * nbytes / us:9.4f} Mbps"
        )


class Server:
    """C's ocbr server: up to MAX_FLOWS flows at once, each reported every interval and ended once
    silent for the timeout, in C's words. As C's, a flow its peer ended is kept (and reported) until
    that timeout: C's reader only sees its reads fail."""

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval = interval
        self.timeout = timeout
        self.tallies: dict[Flow, Tally] = {}
        self.quota = FlowQuota(PER_CLIENT, USERS_TOTAL)
        self.fset = FlowSet()
        self.listening = False
        self.stop = False

    def run(self) -> None:
        on_signals(lambda: setattr(self, "stop", True))
        fq = EventQueue()
        try:
            self._listen(True)
        except FlowError as e:
            fail("ocbr", e)
        print(f"Server started, interval is {self.interval:g} s, timeout is {self.timeout:g} s.", flush=True)
        notify_ready()
        for now in rounds("ocbr", self.fset, fq, 0.1, lambda: self.stop):
            for ev in fq:
                self._handle(ev.flow, ev.type, now)
            self._tick(now)
            with contextlib.suppress(FlowError):
                self._listen(len(self.tallies) < MAX_FLOWS)
        for flow in list(self.tallies):
            self._drop(flow)
        with contextlib.suppress(FlowError):
            self.fset.close()

    def _listen(self, enabled: bool) -> None:
        self.listening = switch_listening(self.fset, self.listening, enabled)

    def _handle(self, flow: Flow, kind: EventType, now: float) -> None:
        if kind is EventType.ALLOC:
            if not self.quota.take(flow):
                self.fset.remove(flow)
                flow.close()
                return
            print("New flow.", flush=True)
            self.tallies[flow] = Tally(now, iv_start=now)
        elif kind is EventType.PKT and flow in self.tallies:
            try:
                sdu = flow.read()
            except FlowError:
                self.fset.remove(flow)  # no more to read: silent from now on
                return
            t = self.tallies[flow]
            t.alive = now
            t.packets += 1
            t.nbytes += len(sdu)
        # the end of a flow (its events leave the set) or its layer going down or up: said nothing of, as C

    def _tick(self, now: float) -> None:
        for flow, t in list(self.tallies.items()):
            if now - t.alive > self.timeout:
                print(f"Test on flow {flow.flow_id} timed out", flush=True)
                print(t.line(flow.flow_id, now), flush=True)
                self._drop(flow)
            elif now - t.iv_start >= self.interval:
                print(t.line(flow.flow_id, now), flush=True)

    def _drop(self, flow: Flow) -> None:
        self.tallies.pop(flow, None)
        self.quota.give(flow)
        self.fset.remove(flow)
        flow.close()


def client(args: argparse.Namespace) -> int:
    print(f"Client started, duration {args.duration:g}, rate {args.rate:.0f} b/s, size {args.size} B.", flush=True)
    flow = alloc("ocbr", args, args.alloc_timeout)
    stopped = []
    on_signals(lambda: stopped.append(True))
    buf = bytearray(max(args.size, SEQ.size))
    sent = 0
    pacer = None if args.flood else Pacer(args.rate, args.size, args.sleep, lambda: bool(stopped))
    start = time.monotonic()
    with flow:
        try:
            # A server that stops reading must not hold the client past its test: a write waits so long at most.
            flow.fccntl(FLOWSSNDTIMEO, args.duration + WRITE_GRACE)
            while not stopped:  # the time is checked after each SDU, as C's: `-d 0` sends one
                SEQ.pack_into(buf, 0, sent)
                flow.write(memoryview(buf)[: args.size])
                sent += 1
                if pacer is not None:
                    pacer.wait(sent)
                if time.monotonic() - start >= args.duration:
                    break
        except FlowError as e:
            print(f"ocbr: {e}", file=sys.stderr)
    ms = int((time.monotonic() - start) * 1000)  # whole ms, as C's
    print(
        f"sent statistics: {sent:9d} packets, {sent * args.size:12d} bytes in {ms:9d} ms, "
        f"{sent / (max(ms, 1) * 1000) * args.size * 8:4.4f} Mb/s",
        flush=True,
    )
    return 0 if sent else 1


def c_rate(text: str) -> float:
    """-r as C's ocbr reads it: b/s, a k, M or G after the number multiplies; anything else after it is
    ignored, and no number is 0 (an invalid rate)."""
    match = re.match(r"\s*(-?\d+(?:\.\d+)?)(.?)", text)
    if match is None:
        return 0.0
    return float(match.group(1)) * RATES.get(match.group(2), 1.0)


@ends_quietly
def main(argv: list[str] | None = None) -> None:
    p = CParser(prog="ocbr", description="Sends packets from client to server at a constant bit rate.", usage_status=0)
    p.add_argument("-l", "--listen", action="store_true", help="run in server mode")
    p.add_argument("-i", "--interval", type=c_decimal, default=1.0, help="server report interval (s)")
    p.add_argument("-t", "--timeout", type=c_decimal, default=1.0, help="server timeout interval (s)")
    p.add_argument("-n", "--server_apn", "--server-name", dest="name", help="name of the server")
    p.add_argument("-d", "--duration", type=c_decimal, default=60.0, help="duration for sending (s)")
    p.add_argument("-f", "--flood", action="store_true", help="send packets as fast as possible")
    p.add_argument("-s", "--size", type=c_long, default=1000, help=f"packet size (B, max {BUF_SIZE} B)")
    p.add_argument("-r", "--rate", type=c_rate, default=1e6, help="rate (b/s, or with k|M|G)")
    # as C's: both may be given, the last one counts
    p.add_argument("--sleep", dest="sleep", action="store_true", default=True, help="sleep in between sending packets")
    p.add_argument("--spin", dest="sleep", action="store_false", help="spin the CPU between sending packets")
    p.add_argument("-q", "--qos", type=qos_arg, default=qos.raw, help="the flow's QoS (ours; C's is raw)")
    p.add_argument("--alloc-timeout", type=float, default=None, help="allocation timeout in seconds (ours)")
    p.add_argument("--encrypt", action="store_true", help="encrypt the flow end to end (ours)")
    logs.add_arguments(p, quiet=False)
    add_version(p)
    args = p.parse_args(argv)
    logs.setup("ocbr", args, daemon=args.listen)
    if args.listen:
        Server(args.interval, args.timeout).run()
        return
    if not args.name:
        print("No server specified.")
        p.exit_with_usage(1)
    if args.size > BUF_SIZE:
        print(f"Maximum size: {BUF_SIZE}.")
        sys.exit(1)
    if args.size < 0:
        print("Size overflow.")
        sys.exit(1)
    if args.rate <= 0:
        print("Invalid rate.")
        sys.exit(1)
    sys.exit(client(args))
