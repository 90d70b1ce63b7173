"""A shim IPCP handing a peer's flow request to the IRMd: whatever the request holds, and whatever fails
on the way (the IRMd's codec, the process's descriptors), that one flow is refused and the IPCP goes on.

Every flow request becomes a task of the IPCP, and a task's error nothing handles ends the IPCP (its
flows go DOWN). A request's piggyback is the peer's to size: a management message longer than the
layer's (2,044 bytes on udp, 9,000 or the MTU on Ethernet) is dropped as it is parsed, and a failure
of the arrival itself refuses that flow only.

The IPCP runs in this process, on a loopback address (udp) or on `lo` (eth-dix, an ethertype of its
own), with a stand-in IRMd on a socket pair that accepts every flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port

from ipcp import eth as eth_ipcp
from ipcp import udp as udp_ipcp
from ipcp.shim_io import ShimIpcp
from ipcp.shim_wire import ETH_DIX, EXT_MAGIC, UDP, Kind, Layout
from proto import messages as m
from transports import eth, udp
from transports.channel import AsyncChannel
from transports.unix import close_fds

pytestmark = pytest.mark.timeout(60)

IP = "127.0.0.1"
ETHERTYPE = 0xA0F3  # not the default: no other eth-dix layer on lo reads these frames
PEER_MAC = bytes.fromhex("02a0f3000001")
OAP_REQ = b"\x9a" * 16 + bytes(20)  # opaque to the shim


class StandInIrmd:
    """Accepts every flow an IPCP hands it, answering with a fixed OAP response."""

    def __init__(self) -> None:
        self.arrivals: list[m.FlowReqArrived] = []

    async def handle(self, msg: Any, fds: list[int]) -> tuple[Any, list[int]]:
        close_fds(fds)
        if isinstance(msg, m.FlowReqArrived):
            self.arrivals.append(msg)
            return m.IpcpFlowAccepted(len(self.arrivals), b"\xe6" * 36), []
        return m.Ok(), []


@contextlib.asynccontextmanager
async def running(ipcp: ShimIpcp, layer: str, conf: dict[str, str]) -> AsyncIterator[StandInIrmd]:
    """`ipcp` bootstrapped, wired to a stand-in IRMd; stopped (and its tasks ended) whatever happens."""
    irmd = StandInIrmd()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ipcp.channel = AsyncChannel(ours, m.CODEC, ipcp._handle, name="ipcp")
    channel = AsyncChannel(theirs, m.CODEC, irmd.handle, name="irmd")
    try:
        await ipcp.bootstrap(layer, conf)
        yield irmd
    finally:
        await ipcp.stop()
        for task in list(ipcp._tasks):
            task.cancel()
        await asyncio.sleep(0)
        ipcp.channel.close()
        channel.close()


async def until(check: Any, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


def unbounded(layout: Layout) -> Layout:
    """The layout without its size limit: what an attacker encodes."""
    out = copy.copy(layout)
    out.max_size = 1 << 20
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="forging Ethernet frames on lo takes CAP_NET_RAW (root)")
def test_a_flow_request_longer_than_the_layer_takes_is_dropped_and_the_eth_ipcp_serves_the_next() -> None:
    """On `lo` (MTU 65,536) a frame may be far longer than the layer's 9,000 bytes. A FLOW_REQ of
    65,000 bytes for a registered name was handed to the IRMd whole: its piggyback is beyond what the
    control channel carries (60 KiB), the arrival's task failed, and the IPCP ended."""
    pong = hashlib.sha3_256(b"pong").digest()
    ipcp = eth_ipcp.EthDixIpcp("e", Path("/nonexistent"))

    def frame(payload: bytes) -> bytes:
        return eth.DIX.pack(eth.ZERO_MAC, PEER_MAC, ETHERTYPE, 0, len(payload)) + payload

    async def main() -> None:
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        rx = eth.open_packet_socket("lo", ETHERTYPE)
        try:
            tx.bind(("lo", 0))
            async with running(ipcp, "lan", {"dev": "lo", "ethertype": hex(ETHERTYPE)}) as irmd:
                await ipcp.reg(pong, True)
                huge = unbounded(ETH_DIX).encode(Kind.FLOW_REQ, pong + bytes(65_000), s_eid=5)
                tx.send(frame(huge))
                assert ipcp.core is not None
                assert await until(lambda: ipcp.core is not None and ipcp.core.stats["dropped malformed"] >= 1)
                await asyncio.sleep(0.3)
                assert not ipcp.failed, "one oversized flow request ended the IPCP"
                assert irmd.arrivals == []

                # The next, well-formed request is served as ever.
                tx.send(frame(ETH_DIX.encode(Kind.FLOW_REQ, pong + OAP_REQ, s_eid=6)))
                assert await until(lambda: len(irmd.arrivals) == 1), "the next flow request never reached the IRMd"
                assert irmd.arrivals[0].data == OAP_REQ

                def replied() -> bool:
                    while True:
                        try:
                            got = rx.recv(65536)
                        except BlockingIOError:
                            return False
                        if len(got) < eth.DIX.size:
                            continue
                        dst, _, etype, eid, length = eth.DIX.unpack_from(got)
                        if dst == PEER_MAC and etype == ETHERTYPE and eid == 0:
                            kind, msg = ETH_DIX.decode(got[eth.DIX.size : eth.DIX.size + length])
                            if kind is Kind.FLOW_REPLY and ETH_DIX.reply_eids(msg)[0] == 6:
                                return msg.response == 0

                assert await until(replied), "no FLOW_REPLY accepting the next request"
                assert not ipcp.failed
        finally:
            tx.close()
            rx.close()

    asyncio.run(main())


def test_an_arrival_that_fails_for_want_of_descriptors_refuses_that_flow_and_the_udp_ipcp_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request from a node of ours offers a data port: the IPCP opens a socket for the flow before
    handing it to the IRMd. Out of descriptors (EMFILE), that error escaped the arrival's task and
    ended the IPCP: every flow of the layer went DOWN for one request."""
    pong = hashlib.md5(b"pong").digest()
    ipcp = udp_ipcp.UdpIpcp("u", Path("/nonexistent"))
    port = free_port([IP])
    real = ipcp.data_socket
    calls = [0]

    def data_socket() -> tuple[socket.socket, int] | None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real()

    monkeypatch.setattr(ipcp, "data_socket", data_socket)

    async def main() -> None:
        peer = udp.open_udp(IP, 0)
        try:
            async with running(ipcp, "lan", {"ip": IP, "port": str(port)}) as irmd:
                await ipcp.reg(pong, True)
                offer = {"response": EXT_MAGIC, "d_eid": 40000}  # ours: a data port of its own

                def request(eid: int) -> None:
                    peer.sendto(udp.EID.pack(0) + UDP.encode(Kind.FLOW_REQ, pong + OAP_REQ, s_eid=eid, **offer),
                                (IP, port))  # fmt: skip

                def answer(eid: int) -> int | None:
                    while True:
                        try:
                            got = peer.recv(udp.MAX_DATAGRAM)
                        except BlockingIOError:
                            return None
                        kind, msg = UDP.decode(got[udp.EID.size :])
                        if kind is Kind.FLOW_REPLY and msg.s_eid == eid:
                            return msg.response

                request(11)
                response: list[int | None] = [None]

                def refused() -> bool:
                    response[0] = answer(11)
                    return response[0] is not None

                assert await until(refused), "no answer to the request the IPCP could not take"
                assert response[0] != 0 and not ipcp.failed, "one arrival's EMFILE ended the IPCP"
                assert ipcp.core is not None and not ipcp.core._deciding

                request(12)  # descriptors again: served as ever
                assert await until(lambda: len(irmd.arrivals) == 1)

                def accepted() -> bool:
                    response[0] = answer(12)
                    return response[0] is not None

                assert await until(accepted) and response[0] == 0
                assert not ipcp.failed
        finally:
            peer.close()

    asyncio.run(main())
