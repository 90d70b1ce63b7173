"""oping: round-trip times over a flow, as C Ouroboros 0.23's oping, with its options and output.

`oping -l` serves echo replies (`--poll` spins, `--busy` serves one flow spinning); `oping -n NAME`
pings, paced by -i (or back to back: -f, -F spinning), and prints ping's statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import struct
import sys
import time

from apps.common import (
    CParser,
    alloc,
    c_duration,
    c_long,
    c_units,
    ends_quietly,
    fail,
    ms,
    on_signals,
    serve,
    stack_report,
)
from flowlib import (
    FLOWFRDWR,
    FLOWFRNOBLOCK,
    FLOWFRNOPART,
    FLOWSFLAGS,
    Flow,
    FlowError,
    FlowTimeout,
    FlowWouldBlock,
    flow_accept,
    qos,
)
from proto import logs
from proto.version import add_version

# The 24-byte header. C's: type and id big-endian, then the send time as two host-order words (opaque to
# the server, which only flips the type). Ours: the send time in ns of the monotonic clock, then padding.
HDR = struct.Struct("!IIQ8x")
ECHO_REQUEST = 0
ECHO_REPLY = 1
MIN_SIZE = 64
MAX_SIZE = 1500  # C's OPING_BUF_SIZE: its reader's buffer
MAX_INTERVAL_MS = 10_000
REPLY_WAIT = 2  # seconds past the interval's whole seconds the reader waits for a reply, as C's ("Server timed out.")


class Stats:
    """Welford's running mean and deviation of the RTTs (ms)."""

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


def rtt_text(ms: float) -> str:
    """As C prints an RTT: in µs under 0.1 ms."""
    return f"{ms * 1000:.3f} µs" if ms < 0.1 else f"{ms:.3f} ms"


def reply_to(sdu: bytes) -> bytes | None:
    """The echo reply to a request, None to anything else."""
    if len(sdu) < HDR.size or HDR.unpack_from(sdu)[0] != ECHO_REQUEST:
        return None
    return struct.pack("!I", ECHO_REPLY) + sdu[4:]


def echo(flow: Flow, sdu: bytes, quiet: bool) -> bytes | None:
    """The server's answer, said as C's server says it (C numbers flows by fd: ours by flow id)."""
    if not quiet:
        print(f"Received {len(sdu)} bytes on fd {flow.flow_id}.", flush=True)
    reply = reply_to(sdu)
    if reply is None:
        print(f"Invalid message on fd {flow.flow_id}.", flush=True)
    return reply


def busy_server() -> None:
    """C's --busy: one flow, served spinning on non-blocking reads."""
    print("Ouroboros ping server started. [busy-poll]", flush=True)
    try:
        flow = flow_accept()
    except FlowError as e:
        fail("oping", e)
    print(f"New flow {flow.flow_id} (busy-poll).", flush=True)
    flow.fccntl(FLOWSFLAGS, FLOWFRDWR | FLOWFRNOBLOCK | FLOWFRNOPART)
    with flow:
        while True:
            try:
                sdu = flow.read()
            except FlowWouldBlock:
                continue
            except FlowError:
                break
            reply = reply_to(sdu)  # as C's busy server: nothing said per SDU
            if reply is not None:
                flow.write(reply)


class Client:
    def __init__(self, args: argparse.Namespace, flow: Flow, size: int) -> None:
        self.args = args
        self.flow = flow
        self.name = args.name
        self.padding = bytes(size - HDR.size)
        self.stats = Stats()
        self.sent = self.out_of_order = self.expected = 0
        self.stop = False
        self.woken, self.waker = os.pipe()  # a signal's byte ends the paced ping's wait at once

    def interrupt(self) -> None:
        """SIGINT, SIGTERM, SIGHUP: the ping stops, and its statistics follow, as C's."""
        self.stop = True
        with contextlib.suppress(OSError):
            os.write(self.waker, b"!")

    def request(self) -> bytes:
        sdu = HDR.pack(ECHO_REQUEST, self.sent, time.monotonic_ns()) + self.padding
        self.sent += 1
        return sdu

    def take(self, sdu: bytes) -> bool:
        """A reply: counted and printed as C's reader does; whether it was one."""
        now = time.monotonic_ns()
        if len(sdu) < HDR.size or HDR.unpack_from(sdu)[0] != ECHO_REPLY:
            print(f"Invalid message on fd {self.flow.flow_id}.", flush=True)
            return False
        _, seq, stamp = HDR.unpack_from(sdu)
        if seq >= self.args.count:
            print("Invalid id.", flush=True)
            return False
        rtt = (now - stamp) // 1000 / 1000  # ms, in whole µs as C's (ts_diff_us): "87.000 µs"
        late = seq < self.expected
        self.expected = max(self.expected, seq + 1)
        self.out_of_order += late
        self.stats.add(rtt)
        if not self.args.quiet:
            stamp_text = ""
            if self.args.timeofday:
                t = time.time()
                stamp_text = f"[{int(t)}.{int(t % 1 * 1e6):06d}] "
            print(
                f"{stamp_text}{len(sdu)} bytes from {self.name}: seq={seq} time={rtt_text(rtt)}"
                f"{' [out-of-order]' if late else ''}",
                flush=True,
            )
        return True

    def paced(self) -> None:
        """C's threaded ping: a request every interval (the first after one), replies until all came
        or none for the interval's whole seconds and 2 s more ("Server timed out.")."""
        interval = self.args.interval
        self.flow.fccntl(FLOWSFLAGS, FLOWFRDWR | FLOWFRNOPART | FLOWFRNOBLOCK)  # reads: the poll waits
        poller = select.poll()
        poller.register(self.flow.fd, select.POLLIN)
        poller.register(self.woken, select.POLLIN)
        # As C's reader: from the start, it waits the interval's whole seconds and 2 more for each reply.
        last_heard = time.monotonic()
        next_send = last_heard + interval
        patience = int(interval) + REPLY_WAIT
        count = self.args.count
        while not self.stop and self.stats.n < count:
            now = time.monotonic()
            if now - last_heard > patience:
                print("Server timed out.", flush=True)
                break
            if self.sent < count and now >= next_send:
                self.flow.write(self.request())
                next_send += interval
            # Replies are read between requests, as C's reader thread reads them meanwhile: a client
            # that sent all before reading one (`-i 0`) filled its server's queue to it, and was answered no more.
            due = next_send if self.sent < count else math.inf
            wake = min(due, last_heard + patience)
            ready = poller.poll(max(wake - time.monotonic(), 0) * 1000)
            if all(fd != self.flow.fd for fd, _ in ready):  # the time came, or a signal (seen above)
                continue
            try:
                replied = self.take(self.flow.read())
            except FlowWouldBlock:
                continue  # a keepalive woke us
            if replied:  # a server sending only what is no reply is as silent as one sending nothing
                last_heard = time.monotonic()

    def flood(self, busy: bool) -> None:
        """C's -f: each request waits for its reply; -F spins on non-blocking reads meanwhile."""
        if busy:
            self.flow.fccntl(FLOWSFLAGS, FLOWFRDWR | FLOWFRNOPART | FLOWFRNOBLOCK)
        else:
            self.flow.set_timeout(int(self.args.interval) + REPLY_WAIT)
        while not self.stop and self.sent < self.args.count:
            self.flow.write(self.request())
            while True:
                try:
                    self.take(self.flow.read())
                    break
                except FlowWouldBlock:
                    if self.stop:
                        return
                except FlowTimeout:
                    print("Server timed out.", flush=True)
                    return

    def statistics(self, elapsed_ms: float) -> None:
        s = self.stats
        loss = math.ceil(100 - 100 * s.n / self.sent) if self.sent else 0
        print(f"\n--- {self.name} ping statistics ---")
        print(
            f"{self.sent} packets transmitted, {s.n} received, {self.out_of_order} out-of-order, "
            f"{loss}% packet loss, time: {elapsed_ms:.3f} ms"
        )
        if s.n:
            f, unit = (1000, "µs") if s.mean < 0.1 else (1, "ms")
            mdev = "NaN" if s.n < 2 else f"{s.mdev * f:.3f}"
            print(f"rtt min/avg/max/mdev = {s.min * f:.3f}/{s.mean * f:.3f}/{s.max * f:.3f}/{mdev} {unit}", flush=True)


def client(args: argparse.Namespace) -> int:
    flow = alloc("oping", args, args.timeout)
    size = args.size
    flow.fccntl(FLOWSFLAGS, FLOWFRDWR | FLOWFRNOPART)
    c = Client(args, flow, size)
    on_signals(c.interrupt)
    if not args.quiet:
        how = ", busy-poll" if args.flood_busy else ""
        print(f"Pinging {args.name} with {size} bytes of data ({args.count} packets{how}):\n", flush=True)
    start = time.monotonic()
    broke = False
    with flow:
        try:
            if args.flood or args.flood_busy:
                c.flood(args.flood_busy)
            else:
                c.paced()
        except FlowError as e:
            broke = True
            print(f"oping: {e}", file=sys.stderr)
        c.statistics((time.monotonic() - start) * 1000)
        if args.report:  # ours, after C's summary: its last line stays C's for scripts that read it
            for line in stack_report(flow, c.sent - c.stats.n):
                print(line, flush=True)
    # C's exits 0 whatever came back; ours 1 when pings went, or the flow broke, and no reply came
    return 0 if c.stats.n or not (c.sent or broke) else 1


@ends_quietly
def main(argv: list[str] | None = None) -> None:
    p = CParser(
        prog="oping",
        description="Checks liveness between a client and a server and reports the Round Trip Time (RTT).",
        usage_status=1,
    )
    p.add_argument("-l", "--listen", action="store_true", help="run in server mode")
    p.add_argument("--poll", action="store_true", help="server polls without sleeping (lower latency)")
    p.add_argument("--busy", action="store_true", help="server busy-polls one flow")
    p.add_argument("-c", "--count", type=c_long, default=2**31 - 1, help="number of packets")
    p.add_argument(
        "-d", "--duration", type=c_units(c_duration, "time"), help="duration of the test (ms, or with a unit: 10s)"
    )
    p.add_argument("-f", "--flood", action="store_true", help="send back-to-back, each after the last reply")
    p.add_argument("-F", "--flood-busy", action="store_true", help="flood, busy-polling for replies")
    p.add_argument("-i", "--interval", type=c_units(c_duration, "time"), default=1.0, help="interval (default 1000 ms)")
    p.add_argument("-n", "--server-name", dest="name", help="name of the oping server")
    p.add_argument("-q", "--qos", help="raw, best, video, voice, data (and the other presets); others: raw")
    p.add_argument("-s", "--size", type=c_long, default=MIN_SIZE, help=f"payload size (B, default 64, max {MAX_SIZE})")
    p.add_argument("-Q", "--quiet", action="store_true", help="only print final statistics")
    p.add_argument("-D", "--timeofday", action="store_true", help="print time of day before each line")
    p.add_argument(
        "--report",
        action="store_true",
        help="after the statistics, what the stack knows: FRCT's counts, where lost packets went (ours)",
    )
    p.add_argument("--timeout", type=float, default=None, help="allocation timeout in seconds (ours)")
    p.add_argument("--encrypt", action="store_true", help="encrypt the flow end to end (ours)")
    logs.add_arguments(p, quiet=False)
    add_version(p)
    args = p.parse_args(argv)
    logs.setup("oping", args, daemon=args.listen)
    interval_ms = ms(args.interval)
    args.count %= 2**32  # C's count is unsigned: -1 is 4294967295
    if args.duration is not None and ms(args.duration) > 0:
        # As C: a packet per interval, or 10 per ms of the duration with no interval; whole ms, so that
        # 300 ms at 100 ms is 3, and with the interval as given, before it is cut to 10 s.
        args.count = ms(args.duration) // interval_ms if interval_ms else ms(args.duration) * 10
    try:
        args.qos = qos.by_name(args.qos) if args.qos is not None else qos.raw
    except ValueError:
        print("Unknown QoS cube, defaulting to raw.")
        args.qos = qos.raw
    if args.listen:
        if args.busy:
            busy_server()
        else:
            serve(  # a flow its client let go is said nothing of, and times out, as C's
                "oping", lambda f, sdu: echo(f, sdu, args.quiet), idle_timeout=10.0, poll=args.poll, ends="silent"
            )
        return
    if not args.name:
        print("No server specified.")
        p.exit_with_usage(1)
    if interval_ms > MAX_INTERVAL_MS:
        print("Ping interval truncated to 10s.")
        interval_ms = MAX_INTERVAL_MS
    args.interval = interval_ms / 1000
    if args.size > MAX_SIZE:
        print(f"Packet size truncated to {MAX_SIZE} bytes.")
        args.size = MAX_SIZE
    if args.size < MIN_SIZE:
        print(f"Packet size set to {MIN_SIZE} bytes.")
        args.size = MIN_SIZE
    sys.exit(client(args))
