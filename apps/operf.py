"""operf: a flow's throughput, as C Ouroboros 0.23's operf: a unidirectional or bidirectional test
(-t uni|bi) for a duration (-d), at a rate (-r, with k/M/G) or flooding (-f), with C's statistics.

On the wire as C's: a 4-byte test type, then SDUs that start with a 4-byte id (host order, as C's
packed structs), zeros after it. Ours beyond C's: our server checks every SDU (gaps, order, corruption)
and reports to a client that asks with an 8-byte request, which C's server ignores.
"""

from __future__ import annotations

import argparse
import dataclasses
import struct
import sys
import threading
import time

from apps.common import (
    CParser,
    Pacer,
    alloc,
    c_duration,
    c_long,
    c_units,
    duration,
    ends_quietly,
    fail,
    ms,
    on_signals,
    qos_arg,
    rate,
    serve,
    stack_report,
)
from flowlib import FLOWSSNDTIMEO, Flow, FlowError, FlowTimeout, qos
from proto import logs
from proto.version import add_version

CONF = struct.Struct("=I")  # the test type, as C's struct conf (packed, host order)
MSG = struct.Struct("=I")  # every data SDU's id, as C's struct msg
UNI, BI = 0, 1
TESTS = {"uni": UNI, "bi": BI}
MIN_SIZE, MAX_SIZE = 64, 1 << 20  # C's bounds (OPERF_BUF_SIZE)
ASK = b"OPRF?STS"  # ours: "what did you get?"; 8 bytes, so never a test type or a data SDU
REPORT = struct.Struct("!8sQQQQQ")  # b"OPRF!STS", SDUs, bytes, missing (gaps), out of order, corrupt
ANSWER = b"OPRF!STS"
SERVER_TIMEOUT = 10.0  # seconds a server keeps a silent flow (C's: 1 s)
WRITE_GRACE = 2.0  # seconds past the test's duration a client's write waits for a server to read


@dataclasses.dataclass
class Received:
    """What one flow's receiver saw: per SDU, whether it was intact and in order."""

    test: int | None = None
    sdus: int = 0
    nbytes: int = 0
    missing: int = 0
    reordered: int = 0
    corrupt: int = 0
    next_id: int = 0
    first: float = 0.0
    last: float = 0.0

    def take(self, sdu: bytes) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.sdus += 1
        self.nbytes += len(sdu)
        if len(sdu) < MIN_SIZE or sdu.count(0, MSG.size) != len(sdu) - MSG.size:
            self.corrupt += 1
            return
        (i,) = MSG.unpack_from(sdu)
        if i > self.next_id:
            self.missing += i - self.next_id
        elif i < self.next_id:
            self.reordered += 1
            self.missing -= 1
        self.next_id = max(self.next_id, i + 1)

    def report(self) -> bytes:
        return REPORT.pack(ANSWER, self.sdus, self.nbytes, self.missing, self.reordered, self.corrupt)


def server() -> None:
    flows: dict[Flow, Received] = {}

    def on_sdu(flow: Flow, sdu: bytes) -> bytes | None:
        rx = flows.setdefault(flow, Received())
        if rx.test is None:  # the first SDU says which test
            if len(sdu) != CONF.size or CONF.unpack(sdu)[0] not in (UNI, BI):
                print("Invalid config message.", flush=True)
                raise FlowError("invalid config message")
            rx.test = CONF.unpack(sdu)[0]
            print(f"Doing a {'bi' if rx.test == BI else 'uni'}directional test.", flush=True)
            return None
        if sdu == ASK:
            return rx.report()
        rx.take(sdu)
        return sdu if rx.test == BI else None

    def on_end(flow: Flow) -> None:
        rx = flows.pop(flow, None)
        if rx is None or not rx.sdus:
            return
        secs = max(rx.last - rx.first, 1e-9)
        print(
            f"Flow {flow.flow_id}: {rx.sdus} packets ({rx.nbytes} bytes) in {secs * 1000:.0f} ms => "
            f"{rx.sdus / secs:.4f} pps, {rx.nbytes * 8 / secs / 1e6:.4f} Mbps; {rx.missing} lost, "
            f"{rx.reordered} out-of-order, {rx.corrupt} corrupt",
            flush=True,
        )

    serve("operf", on_sdu, idle_timeout=SERVER_TIMEOUT, on_end=on_end)


class Client:
    def __init__(self, args: argparse.Namespace, flow: Flow) -> None:
        self.args = args
        self.flow = flow
        self.size = args.size
        self.zeros = bytes(self.size - MSG.size)
        self.sent = 0
        self.echoed = self.echo_corrupt = 0
        self.stop = False

    def write_for(self, seconds: float) -> float:
        """Send until the duration is over (or a signal); returns how long it took."""
        pack, write, zeros = MSG.pack, self.flow.write, self.zeros
        start = time.monotonic()
        end = start + seconds
        # a gap ends with the test (a slow rate's may be longer) or at a signal
        pacer = (
            None
            if self.args.flood
            else Pacer(self.args.rate, self.size, self.args.sleep, lambda: self.stop or time.monotonic() >= end)
        )
        # A server that stops reading must not hold the client past its test: a write waits so long at most.
        self.flow.fccntl(FLOWSSNDTIMEO, seconds + WRITE_GRACE)
        while not self.stop and time.monotonic() < end:
            if pacer is None:
                for _ in range(64):  # check the clock every 64 SDUs
                    write(pack(self.sent & 0xFFFFFFFF) + zeros)
                    self.sent += 1
                continue
            write(pack(self.sent & 0xFFFFFFFF) + zeros)
            self.sent += 1
            pacer.wait(self.sent)
        return time.monotonic() - start

    def read_echoes(self, done: threading.Event) -> None:
        """The bidirectional test's reader: every echo must be the SDU sent."""
        self.flow.set_timeout(2.0)
        while not (done.is_set() and self.echoed >= self.sent):
            try:
                sdu = self.flow.read()
            except FlowTimeout:
                if self.echoed < self.sent:
                    print("Server timed out.", flush=True)
                return
            except FlowError:
                return
            if len(sdu) != self.size:
                print(f"Invalid message on fd {self.flow.flow_id}.", flush=True)  # C's words (its fd: our flow id)
                continue
            self.echoed += 1
            if sdu.count(0, MSG.size) != len(sdu) - MSG.size:
                self.echo_corrupt += 1

    def ask(self) -> tuple[int, int, int, int, int] | None:
        """Our server's counts (asked again on a raw flow, which may lose either way); None from C's."""
        self.flow.set_timeout(0.2)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            self.flow.write(ASK)
            try:
                while time.monotonic() < deadline:  # a server that answers only with other SDUs: no end else
                    reply = self.flow.read()
                    if len(reply) == REPORT.size and reply.startswith(ANSWER):
                        return REPORT.unpack(reply)[1:]
            except FlowTimeout:
                continue
        return None


def statistics(name: str, sent: int, rcvd: int, size: int, elapsed: float) -> None:
    """C's block, which C prints for the bidirectional test only."""
    us = max(elapsed * 1e6, 1.0)
    loss = 100 - 100 * rcvd // sent if sent else 0
    print(f"\n--- {name} perf statistics ---")
    print(
        f"{sent} packets transmitted, {rcvd} received, {loss}% packet loss, time: {us / 1000:.3f} ms, "
        f"bandwidth: {rcvd * size * 8 / us:.3f} Mb/s."
    )


def client(args: argparse.Namespace) -> int:
    flow = alloc("operf", args, args.timeout)
    c = Client(args, flow)
    on_signals(lambda: setattr(c, "stop", True))
    bi = args.test == BI
    print(f"Doing a {'bi' if bi else 'uni'}directional test.", flush=True)
    with flow:
        try:
            flow.write(CONF.pack(args.test))
            time.sleep(1.0)  # as C: the server sets up
            seconds = ms(args.duration) // 1000  # as C says it: whole seconds, rounded down
            if args.flood:
                print(f"Flooding {args.name} with {args.size} byte packets for {seconds} seconds.\n", flush=True)
            else:
                print(
                    f"Sending {args.size} byte packets for {seconds} s to {args.name} at {args.rate / 1e6:.3f} Mb/s.\n",
                    flush=True,
                )
            done = threading.Event()
            reader = threading.Thread(target=c.read_echoes, args=(done,), daemon=True) if bi else None
            if reader is not None:
                reader.start()
            elapsed = c.write_for(args.duration)
            done.set()
            print("Test finished.", flush=True)
            if reader is not None:
                reader.join()
                counts = (c.echoed, c.echoed * args.size, c.sent - c.echoed, 0, c.echo_corrupt)
                if not args.report:
                    statistics(args.name, c.sent, c.echoed, args.size, elapsed)
                    return 0 if c.echoed and not c.echo_corrupt else 1
            elif not args.report:  # as C: nothing more (and nothing asked of the server, so C's sees no more)
                return 0 if c.sent else 1
            else:
                asked = c.ask()
                if asked is None:
                    print("The server sent no report (C's operf server keeps none): sender figures only.")
                    print(
                        f"{c.sent} SDUs sent in {elapsed * 1000:.3f} ms, "
                        f"{c.sent * args.size * 8 / elapsed / 1e6:.3f} Mb/s."
                    )
                    return 0 if c.sent else 1
                counts = asked
            report = stack_report(flow, c.sent - counts[0])  # before the flow goes
        except FlowError as e:
            fail("operf", e)
    rcvd, nbytes, missing, reordered, corrupt = counts
    if bi:
        statistics(args.name, c.sent, rcvd, args.size, elapsed)
    print(
        f"{c.sent} SDUs sent, {rcvd} received, {c.sent - rcvd} lost ({missing} gaps in sequence), "
        f"{reordered} out-of-order, {corrupt} corrupt, time: {elapsed * 1000:.3f} ms"
    )
    print(
        f"sender: {c.sent * args.size * 8 / elapsed / 1e6:.3f} Mb/s ({c.sent / elapsed:.0f} SDUs/s), "
        f"receiver: {nbytes * 8 / elapsed / 1e6:.3f} Mb/s ({rcvd / elapsed:.0f} SDUs/s)",
        flush=True,
    )
    for line in report:
        print(line, flush=True)
    return 0 if rcvd and not corrupt else 1


def test_type(text: str) -> int | float | None:
    """uni|bi; a number is the older `-t SECONDS` (a duration), kept; None: neither."""
    if text in TESTS:
        return TESTS[text]
    try:
        return duration(text, "s")
    except ValueError:
        return None


@ends_quietly
def main(argv: list[str] | None = None) -> None:
    p = CParser(prog="operf", description="Measures bandwidth between a client and a server.", usage_status=0)
    p.add_argument("-l", "--listen", action="store_true", help="run in server mode")
    p.add_argument("-t", "--test", default="uni", help="the type of test: uni, bi (default uni)")
    p.add_argument("-n", "--server-name", dest="name", help="name of the operf server")
    p.add_argument(
        "-d",
        "--duration",
        type=c_units(c_duration, "time"),
        default=60.0,
        help="test duration (ms, or 10s; default 60s)",
    )
    p.add_argument(
        "-r",
        "--rate",
        type=c_units(lambda t: rate(t, "k"), "rate"),
        default=1e6,
        help="rate in b/s: kb/s without a unit, or with k|M|G (default 1M)",
    )
    p.add_argument("-s", "--size", type=c_long, default=1500, help="payload size (B, default 1500)")
    p.add_argument("-f", "--flood", action="store_true", help="send packets as fast as possible")
    p.add_argument("--sleep", action="store_true", help="sleep in between sending packets (rather than spin)")
    p.add_argument(
        "--report",
        action="store_true",
        help="after the test, our counts: the server's (asked of it: C's answers nothing), the rates at "
        "either end, FRCT's counts, where lost SDUs went (ours)",
    )
    p.add_argument("-q", "--qos", type=qos_arg, default=qos.raw, help="the flow's QoS (ours; C's is raw)")
    p.add_argument("--timeout", type=float, default=None, help="allocation timeout in seconds (ours)")
    p.add_argument("--encrypt", action="store_true", help="encrypt the flow end to end (ours)")
    logs.add_arguments(p, quiet=False)
    add_version(p)
    args = p.parse_args(argv)
    logs.setup("operf", args, daemon=args.listen)
    if args.listen:
        server()
        return
    if not args.name:
        print("No server specified.")
        sys.exit(1)
    test = test_type(args.test)
    if test is None:
        print("Invalid test type.")
        sys.exit(1)
    if isinstance(test, float):  # the older -t SECONDS
        args.duration, test = test, UNI
    args.test = test
    if args.size > MAX_SIZE:
        print(f"Packet size truncated to {MAX_SIZE} bytes.")
        args.size = MAX_SIZE
    if args.size < MIN_SIZE:
        print(f"Packet size set to {MIN_SIZE} bytes.")
        args.size = MIN_SIZE
    sys.exit(client(args))
