"""Hostile peers against a real unicast IPCP, reached the way any peer reaches it: flows in the
udp layer below to its name. A keyed layer 'net' (n1 on host a, n2 on host b, a pong at a) is
attacked from host b by this test process, as a non-member and as a member gone bad:

- non-members: garbage, bad hellos, guessed keys, silent handshakes by the hundred;
- a member's data and management adjacencies: unsealed, altered and replayed PDUs;
- a member speaking for others: LSUs for another's address or name, unsigned LSUs, directory
  stores for another's address, flow allocator messages in another's name, a flood of stores,
  malformed management PDUs.

The non-member's attacks are also played by an unprivileged local user (uid 65534) on host b.
Each attack must leave n1 alive, its memory and CPU bounded, every forged or replayed message
dropped and counted in its IpcpInfo, and n2's flow to pong answering all along.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from test_unicast_addresses import signed
from unicast_net import Cluster, Host

from flowlib.errors import FlowError
from flowlib.flow import Flow, flow_alloc
from flowlib.irm import IrmClient
from ipcp.unicast import auth, pci
from ipcp.unicast import messages as um
from ipcp.unicast.connmgr import Adjacency
from ipcp.unicast.enroll import Enrollee
from ipcp.unicast.handshake import Handshake
from ipcp.unicast.messages import signed_part
from proto.errors import FlowTimeout
from proto.qos import raw

KEY = "s3cret-layer-key"
FMT = pci.PciFormat()
ROGUE = 0xFEED  # the address the rogue member claims
rogue_ident = auth.Identity.generate()  # its member key, for LSUs in its own name


@dataclasses.dataclass
class Layer:
    a: Host
    b: Host
    n1: int  # n1's address


@pytest.fixture
def layer(cluster: Cluster) -> Layer:
    a, b = cluster.start(["a", "b"])
    cluster.udp([a, b])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "key", KEY, "autobind")
    b.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "key", KEY, "autobind")
    b.irm_ok("ipcp", "connect", "name", "n2", "dst", "n1")
    a.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    a.irm_ok("name", "register", "pong", "layer", "net")
    for h in (a, b):
        h.irmd.note_children()
    b.oping_until_ok("pong", within=30)
    return Layer(a, b, a.address("n1"))


@contextlib.contextmanager
def legit_pings(host: Host) -> Iterator[list[str]]:
    """oping pong from `host` in a loop while the attack runs; the failures it met."""
    failures: list[str] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            r = host.oping("pong", count=3, timeout=30)
            if r.returncode != 0 or "3 received" not in r.stdout:
                failures.append(r.stdout[-200:] + r.stderr[-200:])

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield failures
    finally:
        stop.set()
        t.join(60)


def rss_kb(pid: int) -> int:
    return int(
        next(
            line.split()[1]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(core: Adjacency | Enrollee, f: Flow) -> None:
    """Run a started sans-IO handshake core over the flow until it is done, its last words sent."""
    while not core.done:
        for sdu in core.pop_out():
            f.write(sdu)
        if not core.done:
            core.receive(f.read(), time.monotonic())
    for sdu in core.pop_out():
        f.write(sdu)


class Peer:
    """This test process as a peer of n1 in the layer below: a flow to n1 through b's IRMd."""

    def __init__(self, host: Host) -> None:
        self.irm = IrmClient(host.irmd.sock)

    def flow(self) -> Flow:
        f = flow_alloc("n1", raw, timeout=10, irm=self.irm)
        f.set_timeout(5)
        return f

    def member(self, component: str, key: str = KEY, addr: int = ROGUE) -> tuple[Flow, auth.Sealer, auth.Opener]:
        """A completed handshake as a member would do it: the flow and its seals."""
        f = self.flow()
        adj = Adjacency(
            Handshake(
                True, component, "rogue", "net", addr, auth.layer_psk(key), time.monotonic(), identity=rogue_ident
            )
        )  # its member key: the one its LSUs are signed with
        drive(adj, f)
        assert adj.peer is not None and adj.peer.sealer and adj.peer.opener, adj.error
        return f, adj.peer.sealer, adj.peer.opener

    def close(self) -> None:
        self.irm.close()


@pytest.fixture
def peer(layer: Layer) -> Iterator[Peer]:
    p = Peer(layer.b)
    yield p
    p.close()


def signed_lsu(
    ident: auth.Identity, src: int, name: str, seqno: int = 1, neighbours: list[int] | None = None, since: float = 0.0
) -> um.Lsu:
    lsu = um.Lsu(src, seqno, neighbours or [], name, since, ident.pub)
    return dataclasses.replace(lsu, sig=ident.sign(signed_part(lsu)))


def mgmt_pdu(dst: int, msg: um.Message) -> bytes:
    """A management PDU for `dst`, framed as a data flow carries it."""
    return pci.frame(FMT.pack(pci.Pci(dst, 0, 10, 0, pci.MGMT_EID)) + um.CODEC.encode(msg))


@pytest.mark.timeout(240)
def test_non_members_garbage_bad_hellos_and_guessed_keys_are_refused_and_counted(layer: Layer, peer: Peer) -> None:
    a, b = layer.a, layer.b
    n1 = a.irmd.ipcp_pid("n1")
    mem = rss_kb(n1)
    with legit_pings(b) as failures:
        attempts = [
            b"",  # an empty SDU
            os.urandom(3000),  # noise
            b"OU\x01\x00d\x00\x00\x00\x00\xff\xff\xff\xff",  # a header claiming 4 GB
            um.CODEC.encode(um.Proof(b"\x00" * 32)),  # a proof before any hello
            um.CODEC.encode(um.Hello(um.DT, "x", "net", 5)),  # keyless, into a keyed layer
            um.CODEC.encode(um.Hello(um.DT, "x", "net", 5, b"\x01" * 32, b"\x00" * 32)),  # degenerate ephemeral
            um.CODEC.encode(um.Hello("bogus", "x" * 5000, "net", 5)),
            um.CODEC.encode(um.EnrollInfo("net", {"key": "stolen?"})),
        ]
        for sdu in attempts:
            f = peer.flow()
            with contextlib.suppress(FlowError):
                f.write(sdu)
                f.read()  # a Refuse, or the flow closed under us
            f.close()
        for key in ("guess1", "s3cret", ""):  # a wrong key fails the handshake both ways
            with pytest.raises(AssertionError):
                peer.member(um.DT, key=key)
        wait_for(
            lambda: a.counter("n1", "handshake_auth") + a.counter("n1", "handshake_failed") >= 10,
            30,
            "n1 to count every refused handshake",
        )
    assert not failures, failures
    assert a.neighbours("n1") == {"n2"} and a.counter("n1", "enrollments") == 1  # n2's own
    assert rss_kb(n1) - mem < 20_000


@pytest.mark.timeout(240)
def test_a_member_cannot_take_a_live_neighbours_address(layer: Layer, peer: Peer) -> None:
    """A rogue knowing the layer key claims n2's address on a data link to n1: its member key is not
    the one n2's address is bound to, so n1 refuses it and keeps n2's link. A new address of its own
    it may take."""
    a, b = layer.a, layer.b
    n2 = b.address("n2")
    refused = a.counter("n1", "handshake_auth")
    with legit_pings(b) as failures:
        for component in (um.DT, um.MGMT):
            f, _, _ = peer.member(component, addr=n2)  # done on its side; n1 checks its proof
            refusal = um.CODEC.decode(f.read()).msg  # then refuses it, and closes the flow
            assert isinstance(refusal, um.Refuse) and "belongs to another member key" in refusal.error
            f.close()
        wait_for(lambda: a.counter("n1", "handshake_auth") >= refused + 2, 30, "n1 to count the refusals")
        f, _, _ = peer.member(um.MGMT, addr=ROGUE)  # a member at an address of its own
        f.close()
    assert not failures, failures
    rows = {row[1]: row[2] for row in a.info("n1")["neighbours"]}
    assert rows["n2"] == "dt mgmt", rows


@pytest.mark.timeout(240)
def test_links_made_to_an_address_before_its_key_was_bound_go_once_it_is(layer: Layer, peer: Peer) -> None:
    """A rogue links first at an address nobody has bound yet; the address's own member then floods
    its signed LSU: the rogue's links to that address, made with another key, are dropped."""
    a = layer.a
    x = 0xBEEF
    mgmt, msealer, _ = peer.member(um.MGMT, addr=x)  # with the rogue's key
    wait_for(lambda: "rogue" in a.neighbours("n1"), 10, "n1 to take the rogue's link")
    owner = auth.Identity.generate()  # the key x belongs to: its LSU reaches n1 (through any member)
    mgmt.write(msealer.seal_bytes(um.CODEC.encode(signed_lsu(owner, x, "owner", neighbours=[layer.n1]))))
    wait_for(lambda: "rogue" not in a.neighbours("n1"), 10, "n1 to drop the rogue's link to x")
    mgmt.close()


@pytest.mark.timeout(240)
def test_silent_handshakes_by_the_hundred_are_bounded_and_time_out(layer: Layer, peer: Peer) -> None:
    """Flows opened to n1 and left silent hold a greeting 2 s at most; those and flows that sent a hello
    and stopped give way to a newcomer, oldest first."""
    a, b = layer.a, layer.b
    n1 = a.irmd.ipcp_pid("n1")
    mem = rss_kb(n1)
    hello = um.CODEC.encode(um.Hello(um.DT, "x", "net", 5, os.urandom(32), os.urandom(32), pub=os.urandom(32)))
    with legit_pings(b) as failures:
        flows = []
        for i in range(100):
            with contextlib.suppress(FlowError):
                flows.append(peer.flow())  # and then say nothing,
                if i >= 60:
                    flows[-1].write(hello)  # or, the last 40, one hello never proved
        wait_for(lambda: a.counter("n1", "greet_evicted") > 0, 30, "n1 to close silent greetings past its bound")
        # A member reaching n1 meanwhile is greeted: a silent one gives way to it (once, only refused).
        f, _, _ = peer.member(um.MGMT, addr=ROGUE)
        f.close()
        for f in flows:
            f.close()
    assert not failures, failures
    wait_for(lambda: a.neighbours("n1") - {"rogue"} == {"n2"}, 30, "n1 to end every silent handshake")
    assert rss_kb(n1) - mem < 30_000
    before = cpu_seconds(n1)
    time.sleep(3)
    assert cpu_seconds(n1) - before < 1.0, "n1 keeps busy after the attack"


@pytest.mark.timeout(240)
def test_enrollees_that_never_close_hold_a_bounded_number_of_flows(layer: Layer, peer: Peer) -> None:
    """Each enrollee that knows the key gets its answer, then n1 waits for it to close first (up to the
    handshake's 10 s): enrollees that never do hold MAX_ENROLLING such waits at most, oldest let go."""
    from ipcp.unicast import ipcp as uipcp

    a, b = layer.a, layer.b
    flows, enrolled = [], 0
    with legit_pings(b) as failures:
        for _ in range(uipcp.MAX_ENROLLING + 20):
            f = peer.flow()
            flows.append(f)
            core = Enrollee("rogue", KEY, time.monotonic())
            core.start()
            drive(core, f)
            enrolled += core.info is not None  # and then never close
        assert enrolled == len(flows)
        wait_for(lambda: a.counter("n1", "enroll_let_go") >= 20, 10, "n1 to let the oldest enrollees go")

        def ended(f: Flow) -> bool:
            f.set_timeout(1)
            try:
                f.read()
            except FlowTimeout:
                return False
            except FlowError:
                return True
            return False

        assert all(ended(f) for f in flows[:20])  # the oldest: n1 let them go
        assert not ended(flows[-1])  # the newest: still waited for
    for f in flows:
        f.close()
    assert not failures, failures


@pytest.mark.timeout(240)
def test_a_members_link_drops_unsealed_altered_and_replayed_pdus(layer: Layer, peer: Peer) -> None:
    a, b = layer.a, layer.b
    dt, sealer, _ = peer.member(um.DT)
    wait_for(lambda: "rogue" in a.neighbours("n1"), 10, "n1 to take the rogue's data flow")
    # a lookup in the rogue's name, unsigned: each one n1 takes off the link it refuses, as fa_forged
    probe = mgmt_pdu(layer.n1, um.DhtFind(ROGUE, b"\x01" * 32, 1))
    good = sealer.seal_bytes(probe)
    before = a.counter("n1", "fa_forged")
    with legit_pings(b) as failures:
        dt.write(good)
        wait_for(lambda: a.counter("n1", "fa_forged") == before + 1, 10, "the sealed PDU to be answered")
        for _ in range(200):
            dt.write(good)  # replayed
        altered = bytearray(sealer.seal_bytes(probe))
        altered[12] ^= 0x40
        for _ in range(200):
            dt.write(bytes(altered))
            dt.write(probe)  # not sealed at all
        wait_for(
            lambda: a.counter("n1", "replayed") >= 200 and a.counter("n1", "forged") >= 400,
            30,
            "n1 to count the replays and forgeries",
        )
    assert not failures, failures
    assert a.counter("n1", "fa_forged") == before + 1  # the replays and forgeries were never taken


@pytest.mark.timeout(240)
def test_a_member_cannot_speak_for_another_in_lsus_or_the_directory(layer: Layer, peer: Peer) -> None:
    a, b = layer.a, layer.b
    n2 = b.address("n2")
    mgmt, msealer, _ = peer.member(um.MGMT)
    dt, dsealer, _ = peer.member(um.DT)
    rogue = auth.Identity.generate()
    entries = a.field("n1", "directory entries")
    forged_lsus = [
        signed_lsu(rogue, n2, "n2", seqno=1 << 40),  # n2's address: empty its routes
        signed_lsu(rogue, 0xBEEF, "n2", seqno=1, since=time.time() + 1e6),  # n2's name, a "newer incarnation"
        signed_lsu(rogue, layer.n1, "n1", seqno=1 << 40),  # n1's own address, to n1
        dataclasses.replace(signed_lsu(rogue, ROGUE, "rogue"), neighbours=[n2]),  # altered after signing
        um.Lsu(ROGUE, 2, [layer.n1], "rogue"),  # unsigned
    ]
    with legit_pings(b) as failures:
        for lsu in forged_lsus:
            mgmt.write(msealer.seal_bytes(um.CODEC.encode(lsu)))
        wait_for(lambda: a.counter("n1", "lsu_forged") >= len(forged_lsus), 20, "n1 to count the forged LSUs")
        # the directory: a store for n2's address, under the rogue's key; and an unsigned one
        name = b"\x22" * 32
        store = um.DhtStore(ROGUE, name, n2, 86400.0, 1, rogue.pub)
        store = dataclasses.replace(store, sig=rogue.sign(signed_part(store)))
        dt.write(dsealer.seal_bytes(mgmt_pdu(layer.n1, store)))
        dt.write(dsealer.seal_bytes(mgmt_pdu(layer.n1, um.DhtStore(n2, name, n2, 86400.0))))
        for _ in range(50):
            head = FMT.pack(pci.Pci(layer.n1, 0, 10, 0, pci.MGMT_EID))
            dt.write(dsealer.seal_bytes(pci.frame(head + os.urandom(200))))
        # the flow allocator: a request and a deallocation in n2's name, unsigned and signed by the rogue
        for msg in (um.FaReq(n2, 99, name, raw), um.FaDealloc(n2, 1, 2), um.DhtFind(n2, name, 7)):
            dt.write(dsealer.seal_bytes(mgmt_pdu(layer.n1, msg)))
            forged = dataclasses.replace(msg, sig=rogue.sign(signed_part(msg)))
            dt.write(dsealer.seal_bytes(mgmt_pdu(layer.n1, forged)))
        wait_for(
            lambda: (
                a.counter("n1", "dht_forged") >= 2
                and a.counter("n1", "mgmt_malformed") >= 50
                and a.counter("n1", "fa_forged") >= 6
            ),
            20,
            "n1 to count the forged stores, allocator messages and malformed PDUs",
        )
    assert not failures, failures
    routes = {row[0] for row in a.info("n1")["forwarding"]}
    assert str(n2) in routes  # n2's routes were not emptied
    assert a.field("n1", "directory entries") == entries
    assert a.counter("n1", "lsu_forged") >= len(forged_lsus)


@pytest.mark.timeout(240)
def test_a_member_naming_addresses_outside_the_layer_is_refused(layer: Layer, peer: Peer) -> None:
    """Validly signed LSUs naming a neighbour no layer has (negative, wider than 8 bytes) or wider than
    this layer's addresses, and a hello from such an address: n1 refuses each, routes on, lives."""
    a, b = layer.a, layer.b
    n1 = a.irmd.ipcp_pid("n1")
    _dt, _, _ = peer.member(um.DT)  # (held open: the rogue stays n1's neighbour)
    wait_for(lambda: "rogue" in a.neighbours("n1"), 10, "n1 to take the rogue's data flow")
    mgmt, sealer, _ = peer.member(um.MGMT)
    refused, failed = a.counter("n1", "lsu_refused"), a.counter("n1", "handshake_failed")
    with legit_pings(b) as failures:
        for x in (1 << 64, -7, FMT.max_addr + 1):
            other = auth.Identity.generate()
            for frame in (
                signed(rogue_ident, um.Lsu, src=ROGUE, seqno=int(time.time() * 1e6), neighbours=[layer.n1, x],
                       name="rogue", key=rogue_ident.pub),
                signed(other, um.Lsu, src=x, seqno=1, neighbours=[ROGUE], name="x", key=other.pub),
            ):  # fmt: skip
                mgmt.write(sealer.seal_bytes(frame))
        wait_for(lambda: a.counter("n1", "lsu_refused") >= refused + 2, 20, "n1 to refuse the LSUs it can decode")
        with pytest.raises(AssertionError):
            peer.member(um.DT, addr=FMT.max_addr + 1)
        wait_for(lambda: a.counter("n1", "handshake_failed") > failed, 20, "n1 to refuse the hello")
        time.sleep(5)  # past ls_t_recalc: a route to such an address would have been computed
    assert not failures, failures
    assert a.irmd.ipcp_pid("n1") == n1 and os.path.exists(f"/proc/{n1}")
    assert all(1 <= int(row[0]) <= FMT.max_addr for row in a.info("n1")["forwarding"])


@pytest.mark.timeout(300)
def test_a_member_flooding_its_own_stores_is_bounded(layer: Layer, peer: Peer) -> None:
    a, b = layer.a, layer.b
    n1 = a.irmd.ipcp_pid("n1")
    dt, sealer, _ = peer.member(um.DT)
    rogue = auth.Identity.generate()
    mem = rss_kb(n1)
    with legit_pings(b) as failures:
        for i in range(3000):  # its own address, validly signed: only the bounds stop it
            store = um.DhtStore(ROGUE, i.to_bytes(32, "big"), ROGUE, 86400.0, i + 1, rogue.pub)
            store = dataclasses.replace(store, sig=rogue.sign(signed_part(store)))
            with contextlib.suppress(FlowError):
                dt.write(sealer.seal_bytes(mgmt_pdu(layer.n1, store)))
        wait_for(lambda: a.counter("n1", "dht_refused") > 0, 60, "n1 to refuse stores past its bound")
    assert not failures, failures
    assert int(a.field("n1", "directory entries")) <= 1024 + 8
    assert rss_kb(n1) - mem < 50_000
    assert a.irmd.alive() and b.irmd.alive()


ATTACKER = r"""
import os, sys, time
from flowlib.errors import FlowError
from flowlib.flow import flow_alloc
from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.connmgr import Adjacency
from ipcp.unicast.enroll import Enrollee
from ipcp.unicast.handshake import Handshake
from proto.qos import raw
sent = 0
for i in range(int(sys.argv[1])):
    try:
        f = flow_alloc("n1", raw, timeout=10)
    except FlowError as e:
        print("alloc:", e, flush=True)
        continue
    f.set_timeout(5)
    try:
        if i % 2:
            f.write(os.urandom(64 + i))
        else:  # a handshake under a guessed key
            hs = Handshake(True, um.DT, "guess", "net", 4000 + i, auth.layer_psk(f"guess{i}"), time.monotonic())
            adj = Adjacency(hs)
            f.write(adj.pop_out()[0])
            adj.receive(f.read(), time.monotonic())
            assert adj.peer is None, "a guessed key was taken"
            for sdu in adj.pop_out():
                f.write(sdu)
        sent += 1
        f.read()
    except FlowError:
        pass
    finally:
        f.close()
print("sent", sent, flush=True)
"""


COMES_AND_GOES = (
    r"""
import sys, time
from flowlib.errors import FlowError
from flowlib.flow import Flow, flow_alloc
from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.connmgr import Adjacency
from ipcp.unicast.enroll import Enrollee
from ipcp.unicast.handshake import Handshake
from proto.qos import raw
"""
    + inspect.getsource(drive)
    + r"""
key, secs, done, ident = sys.argv[1], float(sys.argv[2]), 0, auth.Identity.generate()
end = time.monotonic() + secs
while time.monotonic() < end:
    try:
        f = flow_alloc("n1", raw, timeout=10)
    except FlowError:
        continue
    f.set_timeout(5)
    try:
        if done % 2:  # enrolled, answered, gone
            core = Enrollee("rogue", key, time.monotonic())
        else:  # a management link made and dropped, at an address of its own
            core = Adjacency(Handshake(True, um.MGMT, "rogue", "net", 0xBEEF, auth.layer_psk(key),
                                       time.monotonic(), identity=ident))
        core.start() if isinstance(core, Enrollee) else None
        drive(core, f)
        done += 1
    except FlowError:
        pass
    finally:
        f.close()
print("done", done, flush=True)
"""
)


@pytest.mark.timeout(240)
def test_a_member_enrolling_and_connecting_in_a_loop_does_not_fill_the_members_log(
    layer: Layer, cluster: Cluster
) -> None:
    """A member (it knows the key: or anyone, in an open layer) enrolling and making management links
    over and over through the layer below, as uid 65534 on host b, wrote a line of n1's log for each
    (enrolled, connected, down). Now they are logged at a bounded rate, the rest counted."""
    a, b = layer.a, layer.b
    os.chmod(cluster.tmp, 0o755)  # the test hosts' sockets, reachable by any local user (as /run/ouroboros is)
    secs = 5.0
    logged = len(a.log())
    with legit_pings(b) as failures:
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", COMES_AND_GOES,
             KEY, str(secs)],
            env=b.irmd.env, capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip
        assert r.returncode == 0 and r.stdout.startswith("done"), r.stdout + r.stderr
        done = int(r.stdout.split()[1])
        time.sleep(1.0)  # the last ends reach n1
    assert not failures, failures
    grown = a.log()[logged:]
    lines = sum(grown.count(what) for what in (": enrolled rogue", "rogue connected", "to rogue (address"))
    print(f"{done} enrollments and links in {secs} s: {lines} lines")
    assert done >= 40, done  # far past what the log takes in that time
    assert lines <= 10 + 2 * (secs + 3), f"{lines} lines for {done} enrollments and links"
    assert a.counter("n1", "enrollments") >= done // 2 - 1 and a.irmd.alive()


@pytest.mark.timeout(240)
def test_an_unprivileged_non_member_is_refused_like_any_other(layer: Layer, cluster: Cluster) -> None:
    a, b = layer.a, layer.b
    os.chmod(cluster.tmp, 0o755)  # the test hosts' sockets, reachable by any local user (as /run/ouroboros is)
    before = a.counter("n1", "handshake_auth") + a.counter("n1", "handshake_failed")
    with legit_pings(b) as failures:
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", ATTACKER, "20"],
            env=b.irmd.env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd="/",
        )
        assert r.returncode == 0 and "sent 20" in r.stdout, r.stdout + r.stderr
        wait_for(
            lambda: a.counter("n1", "handshake_auth") + a.counter("n1", "handshake_failed") >= before + 20,
            30,
            "n1 to count the nobody's 20 refused handshakes",
        )
    assert not failures, failures
    assert a.neighbours("n1") == {"n2"} and a.irmd.alive()


@pytest.mark.timeout(300)
def test_a_member_flooding_management_pdus_is_bounded(layer: Layer, peer: Peer) -> None:
    a, b = layer.a, layer.b
    n1 = a.irmd.ipcp_pid("n1")
    dt, sealer, _ = peer.member(um.DT)
    mgmt, msealer, _ = peer.member(um.MGMT)
    head = FMT.pack(pci.Pci(layer.n1, 0, 10, 0, pci.MGMT_EID))
    mem = rss_kb(n1)
    with legit_pings(b) as failures:
        for i in range(20000):  # on the data flow, as management PDUs; and on the management flow
            with contextlib.suppress(FlowError):
                dt.write(sealer.seal_bytes(pci.frame(head + b"\x00" * (i % 100))))
                mgmt.write(msealer.seal_bytes(b"\x01" * (i % 100)))
        wait_for(
            lambda: a.counter("n1", "mgmt_malformed") + a.counter("n1", "mgmt_dropped") >= 20000,
            60,
            "n1 to drop the flood",
        )
    assert not failures, failures
    assert rss_kb(n1) - mem < 30_000
    before = cpu_seconds(n1)
    time.sleep(3)
    assert cpu_seconds(n1) - before < 1.0, "n1 keeps busy after the flood"


@pytest.mark.timeout(240)
def test_a_local_application_writing_past_the_mtu_on_its_flow_ends_nothing(layer: Layer) -> None:
    """The flow's socket is the application's to write on past flowlib (which refuses SDUs over the
    MTU): one SDU of 65,536 bytes ended n2's data transfer thread, and with it n2 and every flow of
    every user on it. It is dropped and counted; the flow and the others go on."""
    b = layer.b
    n2 = b.irmd.ipcp_pid("n2")
    irm = IrmClient(b.irmd.sock)
    try:
        f = flow_alloc("pong", raw, timeout=10, irm=irm)
        try:
            assert f.mtu < 65535
            os.write(f.fileno(), bytes(65536))
            wait_for(lambda: b.counter("n2", "oversized") == 1, 20, "n2 to drop the oversized SDU")
        finally:
            f.close()
    finally:
        irm.close()
    b.oping_until_ok("pong", within=30)
    assert b.irmd.ipcp_pid("n2") == n2 and os.path.exists(f"/proc/{n2}")


@pytest.mark.timeout(300)
def test_a_member_making_up_thousands_of_members_leaves_enrollment_working(cluster: Cluster) -> None:
    """In a layer of 8-byte addresses, a member floods validly signed LSUs for 3000 members it makes
    up (a fresh key each): n1's enrollment answer, listing every member, grew past a frame, and the
    next enrollment ended n1 (past the udp flow's MTU already at some 400: none could enroll). n1 now
    answers with the members that fit the flow, and enrolls on."""
    a, b = cluster.start(["a", "b"])
    cluster.udp([a, b])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "key", KEY, "addr", "8", "autobind")
    n1 = a.irmd.ipcp_pid("n1")
    irm = IrmClient(b.irmd.sock)
    try:
        peer = Peer(b)
        mgmt, sealer, _ = peer.member(um.MGMT)
        rng = random.Random(7)
        for _ in range(3000):
            fake = auth.Identity.generate()
            addr = rng.randrange(1 << 63, 1 << 64)
            mgmt.write(sealer.seal_bytes(um.CODEC.encode(signed_lsu(fake, addr, f"m{addr}", neighbours=[ROGUE]))))
        wait_for(lambda: int(a.field("n1", "members")) > 3000, 60, "n1 to take the made-up members")
        f = peer.flow()
        core = Enrollee("rogue2", KEY, time.monotonic())
        core.start()
        drive(core, f)
        f.close()
        assert core.info is not None and 100 < len(core.info.members) < 3000, core.error  # what fits the flow
        mgmt.close()
        peer.close()
    finally:
        irm.close()
    b.irm_ok("ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "key", KEY, "autobind")
    assert a.irmd.ipcp_pid("n1") == n1 and os.path.exists(f"/proc/{n1}")
    assert a.counter("n1", "enrollments") == 2


@pytest.mark.timeout(300)
def test_a_member_flooding_costly_management_pdus_leaves_others_theirs(layer: Layer, peer: Peer) -> None:
    """Management PDUs from every neighbour went into one queue of 4,096 for the IPCP's loop: a member
    sending directory stores with bad signatures (a signature check each, nothing to sign on its side)
    faster than the loop checks them kept it full, and n2's lookups and flow requests, arriving through
    another neighbour, were dropped: its allocations failed for as long as the flood went on. Each
    neighbour now has its own share of the queue and the loop takes them in turn."""
    a, b = layer.a, layer.b
    dt, sealer, _ = peer.member(um.DT)
    head = FMT.pack(pci.Pci(layer.n1, 0, 10, 0, pci.MGMT_EID))
    pdus = [
        head + um.CODEC.encode(um.DhtStore(ROGUE, os.urandom(32), ROGUE, 60.0, i + 1, rogue_ident.pub, os.urandom(64)))
        for i in range(4096)
    ]
    frames = [pci.frame(*pdus[i : i + 8]) for i in range(0, len(pdus), 8)]
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            for f in frames:
                with contextlib.suppress(FlowError):
                    dt.write(sealer.seal_bytes(f))

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        wait_for(lambda: a.counter("n1", "mgmt_dropped") > 0, 60, "n1's queue to overflow")
        ok = 0
        for _ in range(4):
            r = b.oping("pong", count=1, timeout=30)
            ok += r.returncode == 0 and "1 received" in r.stdout
    finally:
        stop.set()
        t.join(30)
    assert ok == 4, f"only {ok} of 4 allocations of n2's went through the flood"
    assert a.irmd.alive() and b.irmd.alive()


@pytest.mark.timeout(300)
def test_a_member_flooding_its_own_lsus_gets_a_few_passed_on_and_its_last_state_taken(layer: Layer, peer: Peer) -> None:
    """Each LSU a member signs with a seqno past its last is news: n1 checked its signature and flooded
    it to every neighbour, as fast as the member's link carried them, and so did every member after it.
    A known member's LSUs are now taken at most every MIN_ARRIVAL, the newest of those that came sooner
    when its turn comes: a listening neighbour of n1 hears a few of 2,000, the last among them."""
    from ipcp.unicast.routing import MIN_ARRIVAL

    a, b = layer.a, layer.b
    mgmt, msealer, _ = peer.member(um.MGMT)
    listener, _, lopener = peer.member(um.MGMT, addr=ROGUE + 1)
    heard: list[int] = []
    stop = threading.Event()

    def listen() -> None:
        listener.set_timeout(0.5)
        while not stop.is_set():
            try:
                msg = um.CODEC.decode(bytes(lopener.open(listener.read()))).msg
            except (FlowError, auth.Forged, auth.Replayed):
                continue
            if isinstance(msg, um.Lsu) and msg.src == ROGUE:
                heard.append(msg.seqno)

    lsus = [signed_lsu(rogue_ident, ROGUE, "rogue", seqno=i, neighbours=[layer.n1]) for i in range(1, 2001)]
    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        with legit_pings(b) as failures:
            start = time.monotonic()
            for lsu in lsus:
                with contextlib.suppress(FlowError):
                    mgmt.write(msealer.seal_bytes(um.CODEC.encode(lsu)))
            spent = time.monotonic() - start
            wait_for(lambda: heard and heard[-1] == 2000, 20, "n1 to take the rogue's last LSU")
            time.sleep(1.0)
    finally:
        stop.set()
        t.join(10)
    assert not failures, failures
    assert len(heard) <= spent / MIN_ARRIVAL + 10, f"n1 passed on {len(heard)} LSUs in {spent:.1f} s"
    assert a.counter("n1", "lsu_held") >= 2000 - len(heard) - 10
    assert a.irmd.alive() and b.irmd.alive()


@pytest.mark.timeout(300)
def test_an_unprivileged_non_members_refused_handshakes_do_not_fill_the_members_log(
    layer: Layer, cluster: Cluster
) -> None:
    """Every handshake a non-member fails at n1 (a guessed key, garbage) is counted, but logged at a
    bounded rate: anyone who reaches a member through the layer below can fail one per flow it opens,
    and each wrote a line of the IRMd's log (one nobody on host b made n1 log ~20 lines a second)."""
    a, b = layer.a, layer.b
    os.chmod(cluster.tmp, 0o755)  # the test hosts' sockets, reachable by any local user (as /run/ouroboros is)
    attempts = 200
    before = a.counter("n1", "handshake_auth") + a.counter("n1", "handshake_failed")
    logged = len(a.log())
    with legit_pings(b) as failures:
        start = time.monotonic()
        r = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                ATTACKER,
                str(attempts),
            ],
            env=b.irmd.env,
            capture_output=True,
            text=True,
            timeout=240,
            cwd="/",
        )
        assert r.returncode == 0 and f"sent {attempts}" in r.stdout, r.stdout + r.stderr
        wait_for(
            lambda: a.counter("n1", "handshake_auth") + a.counter("n1", "handshake_failed") >= before + attempts,
            30,
            "n1 to count every refused handshake",
        )
        spent = time.monotonic() - start
    assert not failures, failures
    lines = a.log()[logged:].count("refused an N-1 flow")
    # a line a second, bursts of 5, and a second's slack for the clocks' offset
    assert lines <= 5 + (spent + 1), f"{lines} lines for {attempts} refusals in {spent:.1f} s"
    assert lines >= 1, "the refusals are still logged"
    assert a.neighbours("n1") == {"n2"} and a.irmd.alive()
