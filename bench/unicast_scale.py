"""The unicast scale suite: many flows through one IPCP, a layer of 50 real members, and one of
1,000 simulated members.

- flows_10k: 10,000 flows held open at once from one host to another over a 1-hop unicast layer
  (udp4 below, as the unicast suite): their allocation rate against that of the first 100 (with
  the IPCP still empty), and the IPCP's memory per idle flow against the application's.
- converge_50: 50 unicast IPCPs under one IRMd over a local layer, in a ring with chords; seconds
  from the last adjacency up until every member's LSDB is the same (IpcpInfo `lsdb` digests).
- sim_1000: bench.layer_sim's 1,000 members booting at once: simulated milliseconds until every
  LSDB holds every member (against the graph's diameter times the per-hop latency, the least a
  flood can take), and messages sent per member (against the flood's least: one LSU per member
  per link).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import resource
import selectors
import sys
import time
from pathlib import Path

from bench import hosts, layer_sim
from bench.harness import BenchError, Goal, Row, Suite, median_row
from bench.stack import Stack
from bench.unicast import LAYER, line_layer, member_keys
from flowlib import FlowError
from flowlib.flow import Flow
from flowlib.irm import IrmClient
from proto import messages as m

log = logging.getLogger(__name__)

FLOWS = 10_000
FIRST = 100  # flows whose allocation rate is the baseline
WORKERS = 8  # allocations under way at once
HOLDER = "bench-holder"
MEMBERS = 50
CONVERGE_GOAL = 5.0  # seconds
SIM_MEMBERS = 1000


# -- 10,000 flows ---------------------------------------------------------------------------------


def _flows() -> list[Row]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FLOWS + 1000:
        raise BenchError(f"{FLOWS} flows need {FLOWS + 1000} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.ExitStack() as ex:
        # One peer holding FLOWS flows is the point here: past the IRMd's limit per peer (flows_per_peer).
        stacks = line_layer(ex, 2, (), ("--limit", f"flows_per_peer={FLOWS + FIRST}"))
        client, server = stacks
        with hosts.pointing(server):
            server.spawn([sys.executable, "-m", "bench.unicast_scale", "hold", HOLDER], "holder", ready=True)
            server.irm("name", "register", HOLDER, "layer", LAYER)
        irm = IrmClient(client.sock)
        ex.callback(irm.close)
        _wait_holder(irm)
        n1 = _ipcp_pid(client, "n1")
        rss_ipcp, rss_app = _rss_kb(n1), _rss_kb(os.getpid())
        flows: list[Flow] = []
        ex.callback(_close_all, flows)
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            start = time.monotonic()
            flows += pool.map(lambda _: hosts.alloc(irm, name=HOLDER), range(FIRST))
            first = FIRST / (time.monotonic() - start)
            start = time.monotonic()
            flows += pool.map(lambda _: hosts.alloc(irm, name=HOLDER), range(FLOWS - FIRST))
            rest = (FLOWS - FIRST) / (time.monotonic() - start)
        log.info("%d flows: the first %d at %.0f/s, the rest at %.0f/s", FLOWS, FIRST, first, rest)
        for flow in flows[:: FLOWS // 100]:  # every one of them works: a sample answers
            flow.set_timeout(10.0)
            flow.write(b"ping")
            if flow.read() != b"ping":
                raise BenchError("a held flow answered wrongly")
        per_flow = (_rss_kb(n1) - rss_ipcp) / FLOWS
        app_per_flow = (_rss_kb(os.getpid()) - rss_app) / FLOWS
        log.info("IPCP n1: %.2f kB per flow; this application: %.2f kB per flow", per_flow, app_per_flow)
    return [
        median_row("unicast.flows_10k.alloc", "flows/s", [rest], [first], f"the first {FIRST} flows"),
        median_row(
            "unicast.flows_10k.ipcp_kB_per_flow", "kB", [per_flow], [app_per_flow], "the application's memory per flow"
        ),
    ]


def _wait_holder(irm: IrmClient) -> None:
    """Until a flow to the holder echoes (the layer has formed, the name is found)."""
    deadline = time.monotonic() + hosts.CONVERGE_TIMEOUT
    while True:
        try:
            with hosts.alloc(irm, name=HOLDER) as flow:
                flow.set_timeout(2.0)
                flow.write(b"ping")
                if flow.read() == b"ping":
                    return
        except FlowError as e:
            if time.monotonic() > deadline:
                raise BenchError(f"no flow to {HOLDER}: {e}") from None
            time.sleep(0.5)


def _close_all(flows: list[Flow]) -> None:
    for flow in flows:
        flow.close()


def _ipcp_pid(stack: Stack, name: str) -> int:
    """The pid of IPCP `name` under `stack`'s IRMd, as its `irm ipcp list` says."""
    for row in json.loads(stack.irm("ipcp", "list", "--json")):
        if row["name"] == name:
            return int(row["pid"])
    raise BenchError(f"no IPCP {name} under {stack.sock}")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def hold(name: str) -> None:
    """`python -m bench.unicast_scale hold NAME`: accept flows to NAME, keep them open, echo what
    comes on any of them (one epoll over all)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    irm = IrmClient()
    irm.bind(name)
    irm.listen(True)
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(irm.wakeup_fd, selectors.EVENT_READ)
    flows: dict[int, Flow] = {}
    while True:
        for key, _ in sel.select():
            if key.fd == irm.wakeup_fd:
                os.eventfd_read(irm.wakeup_fd)
                for reply, fd in irm.take_arrived():
                    flow = Flow(reply, fd, irm)
                    flows[fd] = flow
                    sel.register(fd, selectors.EVENT_READ)
                continue
            flow = flows[key.fd]
            try:
                flow.write(flow.read())
            except OSError:
                sel.unregister(key.fd)
                flows.pop(key.fd).close()


# -- 50 members -----------------------------------------------------------------------------------


def _converge() -> Row:
    """50 hosts on 127.0.0.1-50, each an IRMd with a udp4 shim and a unicast member (an IRMd has one
    IPCP per layer); set up WORKERS at a time."""
    graph = layer_sim.ring_with_chords(MEMBERS)
    edges = sorted({(a, b) for a, nbs in graph.items() for b in nbs if a < b})
    ips = [f"127.0.0.{i + 1}" for i in range(MEMBERS)]
    port = hosts.free_port(tuple(ips))
    with contextlib.ExitStack() as ex, concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        ex.enter_context(member_keys())
        stacks = [ex.enter_context(Stack()) for _ in ips]
        irm = Stack.irm
        list(
            pool.map(
                lambda i: irm(
                    stacks[i],
                    "ipcp",
                    "bootstrap",
                    "name",
                    "u",
                    "type",
                    "udp4",
                    "layer",
                    hosts.UDP_LAYER,
                    "ip",
                    ips[i],
                    "port",
                    str(port),
                    *(("peer", ips[0]) if i else ()),
                ),
                range(MEMBERS),
            )
        )
        irm(stacks[0], "ipcp", "bootstrap", "type", "unicast", "name", "n0", "layer", LAYER, "autobind")
        list(
            pool.map(
                lambda i: irm(
                    stacks[i],
                    "ipcp",
                    "enroll",
                    "type",
                    "unicast",
                    "name",
                    f"n{i}",
                    "layer",
                    LAYER,
                    "dst",
                    "n0",
                    "autobind",
                ),
                range(1, MEMBERS),
            )
        )
        formed = time.monotonic()
        list(pool.map(lambda e: irm(stacks[e[0]], "ipcp", "connect", "name", f"n{e[0]}", "dst", f"n{e[1]}"), edges))
        up = time.monotonic()
        log.info("%d members enrolled, %d adjacencies up in %.1f s", MEMBERS, len(edges), up - formed)
        clients = [IrmClient(st.sock) for st in stacks]
        for c in clients:
            ex.callback(c.close)
        while True:
            digests = collections.Counter(pool.map(lambda i: _lsdb(clients[i], f"n{i}"), range(MEMBERS)))
            if len(digests) == 1 and next(iter(digests))[1] == MEMBERS:
                took = time.monotonic() - up
                break
            if time.monotonic() - up > 120:
                raise BenchError(f"{MEMBERS} LSDBs still differ after 120 s: {digests.most_common(3)}")
    log.info("%d LSDBs identical %.2f s after the last adjacency came up", MEMBERS, took)
    return median_row(f"unicast.converge_{MEMBERS}", "s", [took], [CONVERGE_GOAL], "the goal", Goal("<=", 1.0))


def _lsdb(irm: IrmClient, name: str) -> tuple[str, int]:
    """(LSDB digest, members) of IPCP `name`, from its IpcpInfo."""
    reply, _ = irm.channel.request(m.IpcpInfoReq(name))
    rows = {r[0]: r[1] for s in getattr(reply, "sections", []) if s.name == "ipcp" for r in s.rows}
    return rows.get("lsdb", ""), int(rows.get("members", "0"))


# -- 1,000 simulated members ----------------------------------------------------------------------


def _simulated() -> list[Row]:
    graph = layer_sim.ring_with_chords(SIM_MEMBERS)
    sim = layer_sim.LayerSim(graph)
    sim.boot()
    sim.run(1.0)
    if sim.converged_at is None:
        raise BenchError("the simulated layer did not converge in 1 s")
    sent = collections.Counter[str]()
    for member in sim.members.values():
        sent.update(member.sent)
    per_member = sum(sent.values()) / SIM_MEMBERS
    links = sum(len(nbs) for nbs in graph.values()) // 2
    flood = 2 * links - SIM_MEMBERS + 1  # each member passes each LSU to each neighbour but its sender
    floor = layer_sim.diameter(graph) * layer_sim.LATENCY
    log.info(
        "simulated %d members: converged at %.1f ms; per member %s",
        SIM_MEMBERS,
        sim.converged_at * 1e3,
        {k: round(v / SIM_MEMBERS, 1) for k, v in sent.items()},
    )
    return [
        median_row(
            f"unicast.sim_{SIM_MEMBERS}.converge",
            "ms",
            [sim.converged_at * 1e3],
            [floor * 1e3],
            "diameter x per-hop latency",
        ),
        median_row(
            f"unicast.sim_{SIM_MEMBERS}.msgs_per_member", "msgs", [per_member], [flood], "the flood's LSUs alone"
        ),
    ]


# Three suites, each under bench's time limit of its own.
FLOWS_SUITE = Suite("unicast_flows", "10,000 flows held open through one unicast IPCP", lambda runs: _flows())
# 150 Python processes on loopback take minutes to start on 2 CPUs: only when named.
CONVERGE_SUITE = Suite(
    "unicast_converge",
    "a unicast layer of 50 members converges (opt-in: several minutes)",
    lambda runs: [_converge()],
    time_limit=600,
    default=False,
)
SIM_SUITE = Suite(
    "unicast_sim", "a unicast layer of 1,000 simulated members", lambda runs: _simulated(), time_limit=300
)

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "hold":
        logging.basicConfig(level=logging.WARNING)
        with contextlib.suppress(KeyboardInterrupt):
            hold(sys.argv[2])
    else:
        sys.exit("usage: python -m bench.unicast_scale hold NAME")
