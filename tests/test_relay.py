"""The shims' relay (transports.relay) counts each flow's SDUs: sent to the peer, handed to the
application, and dropped, with the queue that was full. The eth and udp IPCPs share it."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from helpers import wait_for

from ipcp.shim import ShimFlow
from transports import udp
from transports.queues import FLOW_QUEUE
from transports.relay import Relay
from transports.unix import seqpacket_pair

EID = 7


@pytest.fixture
def relayed() -> Iterator[tuple[Relay, ShimFlow, socket.socket, socket.socket]]:
    """(relay, its flow, the application's end, the peer's UDP socket)."""
    net = udp.open_udp("127.0.0.1", 0)
    net.setblocking(False)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5)
    app, io = seqpacket_pair()
    flow = ShimFlow(EID, peer.getsockname(), remote_eid=9, relayed=True, io=io, hdr=udp.EID.pack(9))
    relay = Relay(net, udp.UdpFraming(), 65536, lambda frame, src: None, max_sdu=1400)
    relay.add(flow)
    relay.start()
    try:
        yield relay, flow, app, peer
    finally:
        relay.stop()
        for s in (net, peer, app, io):
            s.close()


def test_the_relay_counts_a_flows_sdus_each_way(relayed: tuple[Relay, ShimFlow, socket.socket, socket.socket]) -> None:
    relay, flow, app, peer = relayed
    for i in range(3):
        app.send(b"out %d" % i)
    assert [peer.recv(100)[udp.EID.size :] for _ in range(3)] == [b"out 0", b"out 1", b"out 2"]
    wait_for(lambda: flow.sent == 3, 5, "the relay to count what it sent")  # (counted once the send returned)
    for i in range(2):
        peer.sendto(udp.EID.pack(EID) + b"in %d" % i, relay.net.getsockname())
    app.settimeout(5)
    assert [app.recv(100) for _ in range(2)] == [b"in 0", b"in 1"]
    wait_for(lambda: flow.received == 2, 5, "the relay to count what it handed over")
    assert (flow.sent, flow.dropped_app, flow.dropped_net) == (3, 0, 0)
    peer.sendto(udp.EID.pack(EID + 1) + b"for no flow", relay.net.getsockname())
    wait_for(lambda: relay.dropped == 1, 5, "the stray frame")
    assert flow.received == 2  # another flow's frame is not this one's


def test_sdus_the_application_leaves_unread_are_dropped_and_counted(
    relayed: tuple[Relay, ShimFlow, socket.socket, socket.socket],
) -> None:
    relay, flow, _app, peer = relayed
    relay.queues.total = 0  # no longer queue to give
    flow.io.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the application's queue: a few SDUs
    for step in range(1, 11):  # in steps the network's queue holds whole: each SDU reaches the relay
        for _ in range(20):
            peer.sendto(udp.EID.pack(EID) + bytes(1000), relay.net.getsockname())
        wait_for(lambda n=20 * step: flow.received + flow.dropped_app == n, 10, "the relay to take them")
    sent = 200
    assert 0 < flow.received < 20 and flow.dropped_app == sent - flow.received == relay.overflow


def test_an_application_that_falls_behind_gets_a_longer_queue_within_the_budget(
    relayed: tuple[Relay, ShimFlow, socket.socket, socket.socket],
) -> None:
    """An IPCP above that waits for a CPU loses nothing the network's queue held: the relay grows its
    queue once, and all its flows share one bounded budget."""
    relay, flow, app, peer = relayed
    relay.queues.total = FLOW_QUEUE  # room for one flow
    flow.io.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    other_app, other_io = seqpacket_pair()
    other_peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_peer.bind(("127.0.0.1", 0))
    other = ShimFlow(EID + 1, other_peer.getsockname(), remote_eid=10, relayed=True, io=other_io)
    other_io.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    relay.add(other)
    try:
        for step in range(1, 11):
            for _ in range(20):
                peer.sendto(udp.EID.pack(EID) + bytes(1000), relay.net.getsockname())
            wait_for(lambda n=20 * step: flow.received + flow.dropped_app == n, 10, "the relay to take them")
        assert (flow.received, flow.dropped_app, flow.queue) == (200, 0, FLOW_QUEUE)
        app.settimeout(5)
        assert all(len(app.recv(2000)) == 1000 for _ in range(200))
        for _ in range(20):
            other_peer.sendto(udp.EID.pack(EID + 1) + bytes(1000), relay.net.getsockname())
        wait_for(lambda: other.received + other.dropped_app == 20, 10, "the relay to take the other's")
        assert other.queue == 0 and other.dropped_app > 0  # the budget is spent: dropped, and counted
        relay.remove(flow)
        assert relay.queues.given == 0 and flow.queue == 0  # its share is back
    finally:
        for s in (other_app, other_io, other_peer):
            s.close()


@pytest.mark.parametrize("kind", ["dix", "llc"])
@pytest.mark.timeout(30)
def test_an_sdu_past_what_a_frame_carries_is_dropped_and_the_relay_goes_on(kind: str) -> None:
    """An application writes on its flow's socket as it likes, past flowlib's MTU check: one SDU of
    65,536 bytes (what the eth shims read whole) overflowed the frame's 2-byte length, and the
    exception ended the relay thread, the data path of every flow of the IPCP. It is dropped and
    counted; the flow's next SDU goes."""
    from ipcp.eth import BUFSIZE
    from transports import eth

    net, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    wire.settimeout(5)
    app, io = seqpacket_pair()
    framing = eth.EthFraming(b"\x02" * 6) if kind == "dix" else eth.LlcFraming(b"\x02" * 6)
    hdr = framing.header(b"\x04" * 6, 9) if kind == "dix" else framing.header(b"\x04" * 6, EID, 9)
    flow = ShimFlow(EID, b"\x04" * 6, remote_eid=9, relayed=True, io=io, hdr=hdr)
    relay = Relay(net, framing, BUFSIZE, lambda frame, src: None, max_sdu=1500)
    relay.add(flow)
    relay.start()
    try:
        app.send(bytes(BUFSIZE))
        app.send(b"after")
        assert wire.recv(100).endswith(b"after")  # the next SDU went: the relay lives
        wait_for(lambda: (relay.oversized, flow.sent) == (1, 1), 5, "the relay to count both")
    finally:
        relay.stop()
        for s in (net, wire, app, io):
            s.close()


FAILING_RELAY = """
import logging, socket, sys, time
from ipcp.shim import ShimFlow
from transports.relay import Relay
from transports.unix import seqpacket_pair
logging.basicConfig(level=logging.INFO)

class Broken:
    needs_src = False
    def parse(self, frame, src):
        return None
    def send(self, sock, flow, sdu):
        raise RuntimeError("a bug in the data path")

net, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
app, io = seqpacket_pair()
relay = Relay(net, Broken(), 65536, lambda frame, src: None, max_sdu=1500)
relay.add(ShimFlow(7, "peer", remote_eid=9, relayed=True, io=io, hdr=b""))
relay.start()
app.send(b"x")
time.sleep(10)
print("still running")
"""


@pytest.mark.timeout(30)
def test_a_relay_that_fails_ends_its_ipcp_rather_than_serve_no_flow_while_listed() -> None:
    """Whatever fails in the data path ends the process (the IRMd then takes its flows down), as the
    unicast IPCP's does: a relay thread that ended on an exception left the IPCP up and every flow dead."""
    r = subprocess.run([sys.executable, "-c", FAILING_RELAY], capture_output=True, text=True, timeout=20)
    assert r.returncode == 70 and "still running" not in r.stdout, r.stdout + r.stderr
    assert "the data path failed; the IPCP ends" in r.stderr and "a bug in the data path" in r.stderr
