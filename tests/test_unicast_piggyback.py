"""The allocation's piggyback through a real unicast IPCP process: this test plays its IRMd on a
unix socket (the IRMd's own OAP data is not on the wire yet), bootstraps a one-member layer,
registers a name at it and allocates a flow to that name: the request's data reaches the
acceptor (FlowReqArrived.data), the acceptor's answer comes back (IpcpFlow.data), the flow
carries SDUs, and data over MAX_DATA is refused with EINVAL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from ipcp.unicast.fa import MAX_DATA
from proto import messages as m
from proto.names import name_hash
from proto.qos import raw
from transports.channel import AsyncChannel, HandlerError, RemoteError
from transports.unix import close_fds
from transports.wire import Message


class StubIrmd:
    """Just enough of an IRMd for one IPCP: its announce, its flowlib client, the flows it hands up."""

    def __init__(self) -> None:
        self.ipcp: asyncio.Future[AsyncChannel] = asyncio.get_running_loop().create_future()
        self.arrived: list[tuple[m.FlowReqArrived, int]] = []  # the request, the acceptor's fd
        self.answer = b""
        self.channels: list[AsyncChannel] = []

    async def handle(self, msg: Message, fds: list[int]) -> tuple[Message, Sequence[int]]:
        match msg:
            case m.IpcpAnnounce():
                self.ipcp.set_result(self.channels[-1])
            case m.FlowReqArrived():
                self.arrived.append((msg, fds.pop()))
                close_fds(fds)
                return m.IpcpFlowAccepted(77, self.answer), ()
            case m.ProcAnnounce() | m.FlowListen() | m.FlowPeerDealloc():
                pass
            case _:
                raise HandlerError(m.EPROTO, f"the stub does not serve {type(msg).__name__}")
        close_fds(fds)
        return m.Ok(), ()

    def accept(self, server: socket.socket) -> None:
        conn, _ = server.accept()
        self.channels.append(AsyncChannel(conn, m.CODEC, self.handle, name="stub"))


@pytest.mark.timeout(60)
def test_the_piggyback_goes_both_ways_through_a_unicast_ipcp(tmp_path: Path) -> None:
    asyncio.run(_piggyback(tmp_path))


async def _piggyback(tmp: Path) -> None:
    path = tmp / "irmd.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(str(path))
    server.listen()
    server.setblocking(False)
    stub = StubIrmd()
    loop = asyncio.get_running_loop()
    loop.add_reader(server.fileno(), stub.accept, server)
    env = os.environ | {"OUROBOROS_STATE_DIR": str(tmp / "state"), "OUROBOROS_SOCK": str(path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipcp", "unicast", "u1", str(path)],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ipcp = await asyncio.wait_for(stub.ipcp, 20)
        info, _ = await ipcp.request(m.IpcpBootstrapReq("net", {"key": "k3y"}), timeout=20)
        assert isinstance(info, m.LayerInfo) and info.layer == "net"
        digest = name_hash(info.hash, "pong")
        await ipcp.request(m.IpcpReg(digest), timeout=10)

        stub.answer = b"the responder's OAP answer"
        reply, fds = await ipcp.request(m.IpcpFlowAlloc(5, digest, raw, 10.0, b"the requester's OAP data"), timeout=20)
        assert isinstance(reply, m.IpcpFlow) and reply.data == stub.answer and len(fds) == 1
        ((req, acceptor_fd),) = stub.arrived
        assert req.data == b"the requester's OAP data" and req.hash == digest
        with socket.socket(fileno=fds[0]) as mine, socket.socket(fileno=acceptor_fd) as theirs:
            mine.send(b"ping")
            theirs.settimeout(5)
            assert theirs.recv(100) == b"ping"

        with pytest.raises(RemoteError) as e:
            await ipcp.request(m.IpcpFlowAlloc(6, digest, raw, 10.0, b"x" * (MAX_DATA + 1)), timeout=20)
        assert e.value.code == m.EINVAL and "exceeds" in e.value.text
        assert len(stub.arrived) == 1

        info_reply, _ = await ipcp.request(m.IpcpInfoReq(), timeout=10)
        assert isinstance(info_reply, m.IpcpInfo)
        rows = {s.name: dict((r[0], r[1]) for r in s.rows) for s in info_reply.sections}
        assert rows["ipcp"]["name"] == "u1" and rows["ipcp"]["key"] == "yes" and rows["ipcp"]["flows"] == "2"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        loop.remove_reader(server.fileno())
        for ch in stub.channels:
            ch.close()
        server.close()
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert oct((tmp / "state" / "ipcp" / "u1.key").stat().st_mode & 0o777) == "0o600"
