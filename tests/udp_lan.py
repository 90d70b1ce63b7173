"""A udp4 layer on loopback for tests: one irmd per 'host' (127.0.0.1, .2, .3), no root needed.

Every host runs its own irmd on its own socket, with a udp4 IPCP in layer 'lan' on the same
(random, free) port at its own loopback address. The fixtures stop the irmds at teardown, even
when the test failed or killed one of them on purpose, and fail a test whose irmd logged a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from helpers import BIN, IrmdProc, free_port, start_irmd, stop_irmd, udp4_bootstrap

from apps.oping import ECHO_REPLY, ECHO_REQUEST, HDR
from flowlib import Flow
from flowlib.irm import IrmClient
from ipcp.shim_wire import COOKIE, UDP, WANT_MEMBERS, Kind, Mgmt
from proto import messages as m
from transports import udp

LAYER = "lan"
A_IP, B_IP, C_IP = "127.0.0.1", "127.0.0.2", "127.0.0.3"


@dataclass
class Host:
    irmd: IrmdProc
    ip: str
    port: int
    killed: bool = False
    clients: list[IrmClient] = field(default_factory=list)

    @property
    def addr(self) -> tuple[str, int]:
        return self.ip, self.port

    def irm_ok(self, *args: str) -> str:
        return self.irmd.irm_ok(*args).stdout

    def bootstrap(self, peer: str | None = None, extra: tuple[str, ...] = ()) -> None:
        opts = ["peer", peer] if peer else []
        self.irm_ok(*udp4_bootstrap(LAYER, self.ip, "port", str(self.port), *opts, *extra))
        self.irmd.note_children()

    def serve(self, name: str, prog: str = "oping", *args: str) -> None:
        """`prog -l` started on demand for `name`, registered in the layer."""
        path = prog if "/" in prog else str(BIN / prog)
        self.irm_ok("bind", "program", path, "name", name, "auto", "--", "-l", *args)
        self.irm_ok("name", "register", name, "layer", LAYER)

    def run(self, tool: str, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
        r = self.irmd.run(tool, *args, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    def client(self) -> IrmClient:
        c = IrmClient(self.irmd.sock)
        self.clients.append(c)
        return c

    def alloc(self, name: str, timeout: float = 10.0) -> Flow:
        c = self.client()
        reply, fd = c.alloc(name, None, timeout)
        return Flow(reply, fd, c)

    def ipcp_pid(self) -> int:
        return self.irmd.ipcp_pid("u")

    def info(self) -> dict[str, dict[str, list[str]]]:
        """What the IPCP tells of itself (IpcpInfo, `irm ipcp show`): section -> first column -> row."""
        reply = self.irmd.request(m.IpcpInfoReq("u"))
        assert isinstance(reply, m.IpcpInfo), reply
        return {s.name: {row[0]: row for row in s.rows} for s in reply.sections}

    def counter(self, name: str) -> int:
        row = self.info()["counters"].get(name)
        return int(row[1]) if row else 0

    def kill(self, ipcp_too: bool) -> None:
        """SIGKILL the irmd (and, with ipcp_too, its IPCP: the host vanishes without a word)."""
        self.irmd.note_children()
        self.killed = True
        ipcp = self.ipcp_pid()
        if ipcp_too:
            os.kill(ipcp, signal.SIGKILL)
        self.irmd.proc.kill()
        self.irmd.proc.wait()
        for pid in self.irmd.note_children() - {ipcp}:  # servers it started: not under test here
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def lan(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    """`make(ip, peer=None, extra=(), args=())`: a host with its irmd (`args` for it) and a udp4 IPCP
    in layer 'lan'. (A test module's `lan` fixture wraps this.)"""
    hosts: list[Host] = []
    port = free_port([A_IP, B_IP, C_IP])

    def make(ip: str, peer: str | None = None, extra: tuple[str, ...] = (), args: tuple[str, ...] = ()) -> Host:
        irmd = start_irmd(tmp_path, name=f"irmd-{ip}", args=args)
        host = Host(irmd, ip, port)
        hosts.append(host)
        host.bootstrap(peer, extra)
        return host

    try:
        yield make
    finally:  # the test's failure too: its irmds are stopped all the same
        _stop(hosts)


def _stop(hosts: list[Host]) -> None:
    errors: list[BaseException] = []
    for host in hosts:
        for c in host.clients:
            with contextlib.suppress(Exception):
                c.close()
        try:
            stop_irmd(host.irmd, check=not host.killed)
        except BaseException as e:  # stop the others first
            errors.append(e)
        log = host.irmd.log_text()
        if "Traceback" in log and not host.killed:
            errors.append(AssertionError(f"a traceback in {host.ip}'s irmd log:\n{log[-3000:]}"))
    if errors:
        raise errors[0]


def pair(make: Callable[..., Host]) -> tuple[Host, Host]:
    """A (127.0.0.1) serving 'pong' with oping -l, B (127.0.0.2) configured with peer A."""
    a = make(A_IP)
    b = make(B_IP, peer=A_IP)
    a.serve("pong")
    return a, b


def oping_ok(host: Host, name: str = "pong", count: int = 10) -> str:
    code, out, err = host.run("oping", "-n", name, "-c", str(count), "-i", "10", "--timeout", "10")
    assert code == 0, f"oping failed ({code}): {err}{out}"
    assert f"{count} packets transmitted, {count} received" in out, out
    return out


def ping(flow: Flow, seq: int = 0) -> None:
    flow.write(HDR.pack(ECHO_REQUEST, seq, time.monotonic_ns()) + bytes(40))
    flow.set_timeout(5.0)
    try:
        reply = flow.read()
    finally:
        flow.set_timeout(None)  # back to a plain blocking socket
    kind, got, _ = HDR.unpack_from(reply)
    assert (kind, got) == (ECHO_REPLY, seq)


# -- speaking the udp shim's management messages from a plain socket --------------------


def mgmt(sock: socket.socket, dst: tuple[str, int], kind: Kind, body: bytes = b"", **fields: int) -> None:
    sock.sendto(udp.EID.pack(0) + UDP.encode(kind, body, **fields), dst)


def answers(sock: socket.socket, within: float = 2.0) -> list[tuple[Kind, Mgmt]]:
    """The management messages that arrive on `sock` until it is quiet for `within` s."""
    out = []
    sock.settimeout(within)
    with contextlib.suppress(TimeoutError):
        while True:
            data, _ = sock.recvfrom(65536)
            assert udp.EID.unpack_from(data)[0] == 0
            out.append(UDP.decode(data[4:]))
    return out


def prove(sock: socket.socket, dst: tuple[str, int]) -> list[tuple[Kind, Mgmt]]:
    """Become a member of `dst`'s by echoing its cookie; what it answers the proven HELLO."""
    mgmt(sock, dst, Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(0))
    ((kind, challenge),) = answers(sock, 1.0)
    assert kind is Kind.HELLO
    hello = UDP.encode(Kind.HELLO, bytes(8) + challenge.body[:8], response=WANT_MEMBERS)
    sock.sendto(udp.EID.pack(0) + hello + bytes(512 - len(hello)), dst)
    return answers(sock, 1.0)


def members_of(host: Host) -> set[tuple[str, int]]:
    """The members `host` proved (the first page: a few hundred), asked from outside, as a member."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.99", 0))
        got = prove(s, host.addr)
    return {cast(tuple[str, int], a) for k, msg in got if k is Kind.MEMBERS for a in udp.decode_addrs(msg.body)}
