"""A hostile peer that asks for flow after flow and holds each one, through a real udp4 IPCP on
0.23's wire: the IRMd bounds the flows one remote peer holds, whoever accepts them.

The server is `oping -l` run as the IRMd's own user (an admin: its flows are no user's share), so
nothing but the limit per peer stands between one peer and every flow of the layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for
from test_oap_hostile import ATTACKER_IP, CLIENT_IP, IRMD_IP, Peer, _peer, oping_over_udp4, plain

from proto import oap

pytestmark = pytest.mark.timeout(120)

PER_PEER = 8


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[tuple[Peer, Peer, Peer]]:
    """An IRMd with flows_per_peer=8, a udp4 IPCP serving `oping -l`; the attacker's socket, a second
    socket of the attacker's host (another port) and a client's."""
    (tmp_path / "security").mkdir()
    env = {"OUROBOROS_SECURITY_DIR": str(tmp_path / "security")}
    with oping_over_udp4(tmp_path, env, ["--limit", f"flows_per_peer={PER_PEER}"]) as (_, _, port):
        dst = (IRMD_IP, port)
        peers = (_peer(ATTACKER_IP, dst), _peer(ATTACKER_IP, dst), _peer(CLIENT_IP, dst))
        try:

            def answers() -> bool:
                try:
                    return peers[2].ask(plain(), timeout=1.0)[0] == 0
                except TimeoutError:
                    return False

            wait_for(answers, 20, "the udp4 IPCP and oping -l to answer a FLOW_REQ")
            yield peers
        finally:
            for p in peers:
                p.sock.close()


def test_one_peer_holds_a_bounded_number_of_flows_and_another_peer_still_gets_its_own(
    layer: tuple[Peer, Peer, Peer],
) -> None:
    """Each request of the attacker was accepted and held (by a server that takes every flow), up
    to all the shim's 4,096 flows and as many descriptors of the IRMd: no peer asked for one after.
    Its flows count until they end, and no longer."""
    attacker, attacker_other_port, client = layer
    held = [attacker.ask(plain())[0] for _ in range(PER_PEER)]
    assert held == [0] * PER_PEER  # its fair use is served
    more = [attacker.ask(plain())[0] for _ in range(4)] + [attacker_other_port.ask(plain())[0] for _ in range(4)]
    assert all(r != 0 for r in more), f"the peer got more flows than its limit: {more}"
    for _ in range(3):  # another peer is served beside it
        req = plain()
        response, body = client.ask(req)
        assert response == 0
        oap.check_response(oap.decode(req), body)
    # The server lets its silent flows go (oping -l: after 10 s idle), and with them the peer's count.
    wait_for(lambda: attacker.ask(plain())[0] == 0, 40, "the peer's flows to be let go and counted no more")


def test_a_udp_peer_is_one_whatever_its_port_or_its_address_in_its_ipv6_64() -> None:
    """The limits per peer (flows held, allocations in flight) would count each source port, or each
    address of an IPv6 host's /64 (2**64 of them, any of which it may send from), as a peer of its own."""
    from ipcp.udp import Udp6Ipcp, UdpIpcp

    def peer(cls: type[UdpIpcp], addr: tuple[str, int]) -> str:
        return cls.peer_of(cls.__new__(cls), addr)

    assert peer(UdpIpcp, ("127.0.77.2", 4000)) == peer(UdpIpcp, ("127.0.77.2", 4001)) == "127.0.77.2"
    assert peer(UdpIpcp, ("127.0.77.3", 4000)) != peer(UdpIpcp, ("127.0.77.2", 4000))
    ours = {peer(Udp6Ipcp, (f"2001:db8:1:2:{i:x}::1", 4000 + i)) for i in range(100)}
    assert ours == {"2001:db8:1:2::/64"}
    assert peer(Udp6Ipcp, ("2001:db8:1:3::1", 4000)) != "2001:db8:1:2::/64"
    assert peer(Udp6Ipcp, ("::ffff:10.0.0.1", 4000)) == "10.0.0.1"
