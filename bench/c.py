"""The c suite (root only): ours against C Ouroboros 0.23 on the same paths, in the same run.

Rows c.PATH.rtt_64B and c.PATH.throughput_1400B; the ratio is ours / C. C is measured with its
own tools: `oping -f` (back-to-back echoes, mean RTT = loop time / count) and `ocbr -f` (flood,
the server counts what arrived; 0.23's operf sends nothing: its send loop's test is inverted).
Ours is measured with bench.session's echo and sink over a flow of ours on the same path.

- local, direct: one IRMd; C over its local IPCP with direct IPC off / on (two C builds); ours
  over its local layer (a socketpair between the applications: the analogue of direct IPC).
- udp4: two network namespaces joined by a veth pair (10.97.0.1, .2), an IRMd in each, a udp4
  layer between them; the server in A, the client in B. Ours and C each get such a pair.
- unicast: a 2-member unicast layer over that udp4 layer, one member per namespace.
- unicast_local: C as in Ouroboros's tutorial 2: both members in one IRMd over a local layer
  (direct IPC off, else the flow skips the layers). Our IRMd takes one IPCP per layer, so ours
  is the nearest layout it can run: the 2-member layer of the unicast row.

Without root, or without a C build, the rows concerned are skipped with the reason logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from bench import hosts, netns
from bench.cstack import DIRECT, NODIRECT, CBuild, CStack, unavailable
from bench.harness import BenchError, Resource, Row, Suite, SuiteFailed, median_row
from bench.stack import Stack
from flowlib.irm import IrmClient

log = logging.getLogger(__name__)

MAX_RUNS = 3
RTT_COUNT = 10_000
# Seconds for C oping's flood of RTT_COUNT (a few seconds on a loaded layer): past them it hangs, as
# 0.23 now and then does, and the next attempt on a fresh layout comes while a test's 120 s allow it.
RTT_TIMEOUT = 30
RTT_SIZE = hosts.RTT_SIZE
TPUT_SIZE = hosts.TPUT_SIZE
TPUT_SECONDS = round(hosts.TPUT_SECONDS)  # ocbr takes whole seconds
CBR_IDLE = 3  # seconds without SDUs before the ocbr server closes its count (1 s starved it under load)
ADDRS = ("10.97.0.1/24", "10.97.0.2/24")
PING, CBR = "c-ping", "c-cbr"
UDP_PORT = 3435  # C's default; ours listens on it too
NET = "normal"  # the unicast layer, named as in the tutorial
SAME_CA = ("congestion", "none")  # ours' default; C's is mb-ecn, which paces a flood to a few thousand SDU/s
CONVERGE = 20.0  # seconds for a first C flow on a fresh layout
ROUTES = 5.0  # seconds after a C unicast member connects: its link-state recomputes routes every 4 s,
# and a flow request answered before the route back exists leaves the IPCP refusing all later ones
ATTEMPTS = 3
PAUSE = 0.2  # seconds after every measurement

# C oping's summary: "N packets transmitted, M received, ... time: T ms" (T: the flood loop).
_PING = re.compile(r"(\d+) packets transmitted, (\d+) received.*time: ([\d.]+) ms")
# ocbr client "sent statistics: N packets, B bytes in T ms"; server "Flow F: N packets (B bytes) in T ms".
_SENT = re.compile(r"sent statistics:\s+(\d+) packets,\s+\d+ bytes in\s+(\d+) ms")
_RCVD = re.compile(r"Flow\s+\d+:\s+(\d+) packets")
_DONE = re.compile(r"Test on flow\s+\d+ timed out")


def parse_oping(out: str, count: int) -> float:
    """Mean RTT in µs from C oping -f's summary: the flood loop's time over the echoes."""
    m = _PING.search(out)
    if m is None:
        raise BenchError(f"C oping printed no summary: {out[-200:]!r}")
    sent, rcvd, ms = int(m[1]), int(m[2]), float(m[3])
    if sent != count or rcvd != count:
        raise BenchError(f"C oping: {rcvd} of {sent} echoes back, {count} asked")
    return ms * 1e3 / count


def parse_ocbr(client_out: str, server_log: str) -> float:
    """SDU/s from ocbr: SDUs the server counted, over the client's sending time."""
    sent = _SENT.search(client_out)
    if sent is None:
        raise BenchError(f"C ocbr printed no statistics: {client_out[-200:]!r}")
    rcvd = sum(int(m[1]) for m in _RCVD.finditer(server_log))
    if not rcvd or not int(sent[2]):
        raise BenchError("C ocbr server counted nothing")
    return rcvd / (int(sent[2]) / 1e3)


class Side(Protocol):
    """One side of a comparison: a fresh flow per measurement."""

    def rtt(self) -> float: ...  # µs

    def tput(self) -> float: ...  # SDU/s


@dataclasses.dataclass
class Ours:
    irm: IrmClient
    name: str = hosts.NAME

    def rtt(self) -> float:
        return hosts.on_flow(hosts.alloc(self.irm, name=self.name), functools.partial(hosts.rtt, count=RTT_COUNT))

    def tput(self) -> float:
        return hosts.on_flow(hosts.alloc(self.irm, name=self.name), hosts.tput)[0]


@dataclasses.dataclass(frozen=True)
class CEnds:
    """Where C's clients run (`client`) and whom they call: oping and ocbr servers by name."""

    client: CStack
    cbr_log: Path  # the ocbr server's output
    ping: str = PING
    cbr: str = CBR


Layout = Callable[[contextlib.ExitStack], CEnds]  # sets a C path up, its teardown on the ExitStack


class C(Resource):
    """C's side of a path: oping and ocbr over the C IRMds that `layout` sets up.

    A failed run is tried again on a fresh layout: once a C 0.23 IPCP has failed to answer one
    flow request it refuses every later one, and its udp4 IPCP sometimes fails to ("Failed to
    respond to flow request": a send to the requester's address that fails, under load).
    """

    def __init__(self, layout: Layout, what: str) -> None:
        self._layout, self.what = layout, what
        self._ex = contextlib.ExitStack()
        self._ends: CEnds | None = None

    def close(self) -> None:
        self._ex.close()

    def open(self) -> None:
        """Set the layout up and wait for a first flow; a layout that gives none is set up again."""
        for attempt in range(1, ATTEMPTS + 1):
            self._ends = self._layout(self._ex)
            try:
                self._wait_route()
                return
            except BenchError as e:
                if attempt == ATTEMPTS:
                    raise
                log.warning("C side of %s gave no flow (%s); setting it up again", self.what, e)
                self._ex.close()

    @property
    def ends(self) -> CEnds:
        assert self._ends is not None
        return self._ends

    def rtt(self) -> float:
        return self._attempt("oping", self._rtt)

    def tput(self) -> float:
        return self._attempt("ocbr", self._tput)

    def _rtt(self) -> float:
        e = self.ends
        out = e.client.run(["oping", "-n", e.ping, "-c", str(RTT_COUNT), "-s", str(RTT_SIZE), "-f", "-Q"], RTT_TIMEOUT)
        return parse_oping(out, RTT_COUNT)

    def _tput(self) -> float:
        e = self.ends
        start = e.cbr_log.stat().st_size
        out = e.client.run(["ocbr", "-n", e.cbr, "-f", "-d", str(TPUT_SECONDS), "-s", str(TPUT_SIZE)], 15)
        deadline = time.monotonic() + CBR_IDLE + 10
        while not _DONE.search(tail := _read_from(e.cbr_log, start)) or not _RCVD.search(tail):
            if time.monotonic() > deadline:
                raise BenchError(f"the C ocbr server did not close its count: {tail[-200:]!r}")
            time.sleep(0.1)
        return parse_ocbr(out, tail)

    def _attempt(self, tool: str, measure: Callable[[], float]) -> float:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return measure()
            except BenchError as e:
                if attempt == ATTEMPTS:
                    raise
                log.warning("C %s on %s failed (%s); setting the C side up again", tool, self.what, e)
                self.close()
                self.open()
        raise AssertionError("unreachable")

    def _wait_route(self) -> None:
        """Ping until a flow works: a new layer's directory takes a while."""
        e, start = self.ends, time.monotonic()
        while True:
            try:
                e.client.run(["oping", "-n", e.ping, "-c", "1", "-f", "-Q"], 5)
                log.info("C flow to %s works %.1f s after the layer formed", e.ping, time.monotonic() - start)
                return
            except BenchError as err:
                if time.monotonic() - start > CONVERGE:
                    raise BenchError(f"no C flow to {e.ping} within {CONVERGE:.0f} s: {err}") from None
                time.sleep(0.5)


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def c_servers(cs: CStack, *where: str) -> Path:
    """C's oping and ocbr servers in `cs`, registered `where`; the ocbr server's log."""
    cs.serve(["oping", "-l", "-Q"], PING, *where)
    return cs.serve(["ocbr", "-l", "-i", "3600", "-t", str(CBR_IDLE)], CBR, *where)


def compare(path: str, ours: Side, c: C, runs: int) -> list[Row]:
    """RTT and throughput rows of ours against C on `path`, `runs` times each, in turns."""
    rtts = []
    for i in range(runs):
        rtts.append(hosts.in_turns(i, _settled(ours.rtt), _settled(c.rtt)))
        log.info("c.%s rtt run %d/%d: ours %.1f us, C %.1f us", path, i + 1, runs, *rtts[-1])
    tputs = []
    for i in range(runs):
        tputs.append(hosts.in_turns(i, _settled(ours.tput), _settled(c.tput)))
        log.info("c.%s throughput run %d/%d: ours %.0f SDU/s, C %.0f SDU/s", path, i + 1, runs, *tputs[-1])
    return [
        median_row(f"c.{path}.rtt_{RTT_SIZE}B", "us", [o for o, _ in rtts], [c for _, c in rtts],
                   f"C 0.23 oping -f, {c.what}"),
        median_row(f"c.{path}.throughput_{TPUT_SIZE}B", "SDU/s", [o for o, _ in tputs], [c for _, c in tputs],
                   f"C 0.23 ocbr -f, {c.what}"),
    ]  # fmt: skip


def _settled(measure: Callable[[], float]) -> Callable[[], float]:
    """`measure`, then a pause: a flood's queues drain and a flow's teardown ends before the next."""

    def run() -> float:
        result = measure()
        time.sleep(PAUSE)
        return result

    return run


# -- the layouts, C's and ours -------------------------------------------------------------


def c_local(build: CBuild, logdir: Path) -> Layout:
    """One C IRMd with a local IPCP; the servers registered in its layer."""

    def layout(ex: contextlib.ExitStack) -> CEnds:
        cs = ex.enter_context(CStack(build, ex.enter_context(netns.Netns("ocl")).ns, logdir))
        cs.irm("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local")
        return CEnds(cs, c_servers(cs, "layer", "local"))

    return layout


def c_udp4(logdir: Path, unicast: bool) -> Layout:
    """Two C IRMds across a veth pair with a udp4 layer; with `unicast`, a 2-member unicast layer
    over it (A bootstraps, B enrolls and connects), the servers registered only there."""

    def layout(ex: contextlib.ExitStack) -> CEnds:
        pair = ex.enter_context(netns.VethPair("ocu", ADDRS))
        a_ip, b_ip = pair.ips
        # B finds in its /etc/hosts either the servers, or the unicast member and layer to enroll with.
        remote = ("uni1", NET) if unicast else (PING, CBR)
        ca = ex.enter_context(CStack(DIRECT, pair.ns[0], logdir))
        cb = ex.enter_context(CStack(DIRECT, pair.ns[1], logdir, hosts={n: a_ip for n in remote}))
        for cs, ip in ((ca, a_ip), (cb, b_ip)):
            cs.irm("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "udp", "ip", ip)
        if not unicast:
            return CEnds(cb, c_servers(ca, "layer", "udp"))
        ca.irm("ipcp", "bootstrap", "type", "unicast", "name", "uni1", "layer", NET, *SAME_CA, "autobind")
        for name in remote:
            ca.irm("name", "reg", name, "layer", "udp")
        cb.irm("ipcp", "enroll", "name", "uni2", "layer", NET, "autobind")
        cb.irm("ipcp", "connect", "name", "uni2", "dst", "uni1")
        time.sleep(ROUTES)
        cb.know(PING, CBR)
        return CEnds(cb, c_servers(ca, "layer", NET))

    return layout


def c_tutorial(logdir: Path) -> Layout:
    """Ouroboros's tutorial 2: a local layer, and over it a 2-member unicast layer, in one C IRMd."""

    def layout(ex: contextlib.ExitStack) -> CEnds:
        cs = ex.enter_context(CStack(NODIRECT, ex.enter_context(netns.Netns("oct")).ns, logdir))
        cs.irm("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local")
        cs.irm("ipcp", "bootstrap", "type", "unicast", "name", "uni1", "layer", NET, *SAME_CA, "autobind")
        for name in ("uni1", NET):
            cs.irm("name", "reg", name, "layer", "local")
        cs.irm("ipcp", "enroll", "name", "uni2", "layer", NET, "autobind")
        cs.irm("name", "reg", "uni2", "layer", "local")
        cs.irm("ipcp", "connect", "name", "uni2", "dst", "uni1")
        time.sleep(ROUTES)
        return CEnds(cs, c_servers(cs, "layer", NET))

    return layout


def our_local(ex: contextlib.ExitStack) -> Ours:
    st = ex.enter_context(Stack())
    st.irm("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local")
    hosts.flow_server(st, "local")
    return _client(ex, st, hosts.NAME)


def our_udp4(ex: contextlib.ExitStack, unicast: bool) -> Ours:
    """Our two IRMds across a veth pair with a udp4 layer (and with `unicast` the layer over it)."""
    pair = ex.enter_context(netns.VethPair("oou", ADDRS))
    a_ip, b_ip = pair.ips
    oa, ob = (ex.enter_context(Stack(ns)) for ns in pair.ns)
    hosts.udp_shim(oa, a_ip, UDP_PORT, None)
    hosts.udp_shim(ob, b_ip, UDP_PORT, a_ip)
    if not unicast:
        hosts.flow_server(oa, hosts.UDP_LAYER)
        return _client(ex, ob, hosts.NAME)
    hosts.irm_at(oa, "ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", NET, "autobind")
    hosts.irm_at(ob, "ipcp", "enroll", "type", "unicast", "name", "n2", "layer", NET, "dst", "n1", "autobind")
    hosts.irm_at(ob, "ipcp", "connect", "name", "n2", "dst", "n1")
    hosts.flow_server(oa, NET)
    return _client(ex, ob, hosts.NAME)


def _client(ex: contextlib.ExitStack, st: Stack, name: str) -> Ours:
    irm = IrmClient(st.sock)
    ex.callback(irm.close)
    hosts.wait_route(irm, name=name)
    return Ours(irm, name)


# -- the suite ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A row pair: C's layout and ours, what C's side is, and the C builds it needs."""

    name: str
    c: Callable[[Path], Layout]
    ours: Callable[[contextlib.ExitStack], Ours]
    c_is: str
    needs: tuple[CBuild, ...]


def comparisons() -> list[Comparison]:
    return [
        Comparison("local", lambda d: c_local(NODIRECT, d), our_local, f"local IPCP, {NODIRECT.label}", (NODIRECT,)),
        Comparison("direct", lambda d: c_local(DIRECT, d), our_local,
                   f"local IPCP bootstrapped but skipped, {DIRECT.label}", (DIRECT,)),
        Comparison("udp4", lambda d: c_udp4(d, unicast=False), lambda ex: our_udp4(ex, unicast=False),
              "udp4 IPCPs across a veth pair", (DIRECT,)),
        Comparison("unicast", lambda d: c_udp4(d, unicast=True), lambda ex: our_udp4(ex, unicast=True),
              "2 unicast members over udp4 across a veth pair", (DIRECT,)),
        Comparison("unicast_local", c_tutorial, lambda ex: our_udp4(ex, unicast=True),
              f"tutorial 2: 2 unicast members over a local layer in one IRMd, {NODIRECT.label}", (NODIRECT,)),
    ]  # fmt: skip


def run(runs: int) -> list[Row]:
    why = unavailable()
    if why is not None:
        log.warning("c suite skipped: %s", why)
        return []
    n = min(runs, MAX_RUNS)
    rows: list[Row] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ouroboros-bench-c-") as tmp:
        for path in comparisons():
            missing = [m for b in path.needs if (m := b.missing()) is not None]
            if missing:
                log.warning("c.%s rows skipped: %s", path.name, "; ".join(missing))
                continue
            try:
                with contextlib.ExitStack() as ex:
                    ours = path.ours(ex)
                    c = ex.enter_context(C(path.c(Path(tmp)), path.c_is))
                    rows += compare(path.name, ours, c, n)
            except BenchError as e:
                log.exception("c.%s rows failed", path.name)
                failed.append(f"c.{path.name}: {e}")
    if failed:
        raise SuiteFailed("; ".join(failed), rows)
    return rows


SUITE = Suite("c", "ours vs C Ouroboros 0.23 (oping, ocbr) on local, udp4 and unicast paths (netns, root)", run,
              time_limit=400)  # fmt: skip
