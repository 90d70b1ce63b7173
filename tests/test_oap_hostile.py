"""A hostile peer against the flow allocation's key agreement, through a real udp4 IPCP: FLOW_REQs
on 0.23's wire (INTEROP-0.23.md §2.1) carrying malformed, replayed, stale, spoofed and hostile-key
OAP headers, and a flood of them. Each is refused with 0.23's errno and nothing else happens: the
IRMd and the server live on, their memory and CPU stay bounded, and legitimate requests sent in
between, from another address, are answered with a valid OAP response."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import BIN, IrmdProc, free_port, start_irmd, stop_irmd, wait_for
from pki import Pki, new_key

from irmd import kex
from proto import oap

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        importlib.util.find_spec("ipcp.shim_wire") is None,
        reason="our udp4 IPCP does not speak Ouroboros 0.23's wire yet (ipcp.shim_wire)",
    ),
]

NAME = "pong"
# The udp4 management header (INTEROP-0.23.md §2.1.2): eid, s_eid, d_eid, response, bandwidth, delay,
# loss, ber, max_gap, timeout, code, availability, in_order.
MGMT = struct.Struct("!IIIiQIIIIIBBB")
FLOW_REQ, FLOW_REPLY = 1, 2
EAUTH, ECRYPT = -1009, -1008
IRMD_IP, ATTACKER_IP, CLIENT_IP = "127.0.77.1", "127.0.77.2", "127.0.77.3"
FLOOD = 300
RSS_GROWTH_MB = 30.0
CPU_PER_REQUEST = 0.005  # seconds of IRMd CPU a refused request may cost


def flow_req(s_eid: int, oap_bytes: bytes, name: str = NAME) -> bytes:
    """0.23's FLOW_REQ with the raw QoS of oping: header, MD5 of the name, then the OAP request."""
    header = MGMT.pack(0, s_eid, 0, 0, 0, 0xFFFFFFFF, 1, 1, 0xFFFFFFFF, 120000, FLOW_REQ, 0, 0)
    return header + hashlib.md5(name.encode()).digest() + oap_bytes


def now_ns() -> int:
    return time.time_ns()


def plain(ts: int | None = None) -> bytes:
    return oap.plain_request(os.urandom(16), now_ns() if ts is None else ts)


@dataclass
class Peer:
    """A UDP socket on its own address, speaking 0.23's management wire to the IPCP."""

    sock: socket.socket
    dst: tuple[str, int]
    eids: int = 1000

    def ask(self, oap_bytes: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
        """Send one FLOW_REQ; (response, OAP of the FLOW_REPLY) or raise on no answer."""
        self.eids += 1
        eid = self.eids
        self.sock.send(flow_req(eid, oap_bytes))
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            data = self.sock.recv(9000)
            if len(data) >= MGMT.size:
                fields = MGMT.unpack_from(data)
                if fields[0] == 0 and fields[10] == FLOW_REPLY and fields[1] == eid:
                    return fields[3], data[MGMT.size :]

    def send(self, oap_bytes: bytes) -> None:
        self.eids += 1
        self.sock.send(flow_req(self.eids, oap_bytes))


@dataclass
class Target:
    irmd: IrmdProc
    server: subprocess.Popen[bytes]
    attacker: Peer
    client: Peer
    pki: Pki

    def legit(self) -> None:
        """A plain request from the client's address gets 0 and the valid response to it."""
        req = plain()
        response, body = self.client.ask(req)
        assert response == 0, f"a legitimate request was refused ({response})"
        oap.check_response(oap.decode(req), body)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peer(ip: str, dst: tuple[str, int]) -> Peer:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 0))
    s.connect(dst)
    return Peer(s, dst)


@contextlib.contextmanager
def oping_over_udp4(
    tmp: Path, env: dict[str, str], args: Sequence[str] = ()
) -> Iterator[tuple[IrmdProc, subprocess.Popen[bytes], int]]:
    """An IRMd (`args`, `env`) with a udp4 IPCP on IRMD_IP serving NAME by `oping -l` (started by us,
    stopped at the end, as the IRMd is): (irmd, the server, the port)."""
    irmd = start_irmd(tmp, args=args, env=env)
    server = None
    try:
        port = free_port([IRMD_IP, ATTACKER_IP, CLIENT_IP])
        irmd.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "udp", "ip", IRMD_IP,
                    "port", str(port))  # fmt: skip
        irmd.irm_ok("bind", "program", str(BIN / "oping"), "name", NAME)
        irmd.irm_ok("name", "register", NAME, "layer", "udp")
        with open(tmp / "oping.log", "wb") as out:
            server = subprocess.Popen([str(BIN / "oping"), "-l"], env=irmd.env, stdout=out, stderr=subprocess.STDOUT)
        irmd.note_children()
        yield irmd, server, port
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        stop_irmd(irmd)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("hostile")
    pki = Pki(tmp / "security")
    with oping_over_udp4(tmp, {"OUROBOROS_SECURITY_DIR": str(pki.base)}) as (irmd, server, port):
        t = Target(irmd, server, _peer(ATTACKER_IP, (IRMD_IP, port)), _peer(CLIENT_IP, (IRMD_IP, port)), pki)
        wait_for(lambda: _answers(t), 20, "the udp4 IPCP and oping -l to answer a FLOW_REQ")
        yield t


def _answers(t: Target) -> bool:
    try:
        return t.client.ask(plain(), timeout=1.0)[0] == 0
    except TimeoutError:
        return False


def low_order_x25519() -> bytes:
    der = x25519.X25519PrivateKey.generate().public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return der[:-32] + bytes(32)


def hostile_requests(pki: Pki) -> dict[str, tuple[bytes, int]]:
    """name -> (OAP request, the errno it must be refused with)."""
    ts = now_ns()
    stranger_crt, stranger_key = pki.issue("mallory")  # a certificate our CA store does not hold
    crt_der = stranger_crt.public_bytes(Encoding.DER)
    enc = {"cipher_nid": 901, "kdf_nid": 672, "md_nid": 672}
    return {
        "short": (b"x" * 35, EAUTH),
        "trailing": (plain() + b"XXXX", EAUTH),
        "beyond": (plain()[:30] + b"\x00\x40" + bytes(4), EAUTH),
        "unknown-nid": (oap.FIXED.pack(os.urandom(16), ts, 4242, 0, 0, 0, 0, 0), EAUTH),
        "garbage": (os.urandom(200), EAUTH),
        "stale": (plain(ts - 30 * oap.NS), EAUTH),
        "future": (plain(ts + 2 * oap.NS), EAUTH),
        "forged-signature": (oap.encode(os.urandom(16), ts, crt=crt_der, sign=lambda b: b"\x30" * 70), EAUTH),
        "unknown-client-ca": (
            oap.encode(os.urandom(16), ts, md_nid=672, crt=crt_der, sign=lambda b: kex.sign(stranger_key, 672, b)),
            EAUTH,
        ),
        "low-order-key": (oap.encode(os.urandom(16), ts, kex=low_order_x25519(), **enc), ECRYPT),
        "garbage-key": (oap.encode(os.urandom(16), ts, kex=os.urandom(91), **enc), ECRYPT),
        "kem": (oap.encode(os.urandom(16), ts, kex=os.urandom(1216), kex_raw=True, **enc), ECRYPT),
        "ed25519-as-kex": (
            oap.encode(
                os.urandom(16),
                ts,
                kex=new_key("ed25519").public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
                **enc,
            ),
            ECRYPT,
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "short",
        "trailing",
        "beyond",
        "unknown-nid",
        "garbage",
        "stale",
        "future",
        "forged-signature",
        "unknown-client-ca",
        "low-order-key",
        "garbage-key",
        "kem",
        "ed25519-as-kex",
    ],
)
def test_a_hostile_request_is_refused_and_a_legitimate_one_served_next(target: Target, case: str) -> None:
    request, errno = hostile_requests(target.pki)[case]
    response, body = target.attacker.ask(request)
    assert (response, body) == (errno, b""), f"{case}: answered {response} with {len(body)} bytes of OAP"
    target.legit()
    assert target.server.poll() is None and target.irmd.alive()


def test_a_replayed_request_is_refused_the_second_time(target: Target) -> None:
    req = plain()
    assert target.attacker.ask(req)[0] == 0
    assert target.attacker.ask(req) == (EAUTH, b"")
    target.legit()


def test_a_flood_costs_bounded_cpu_and_memory_and_legitimate_requests_still_pass(target: Target) -> None:
    pid = target.irmd.pid
    cases = list(hostile_requests(target.pki).values())
    rss, cpu = rss_mb(pid), cpu_s(pid)
    for i in range(FLOOD):
        target.attacker.send(cases[i % len(cases)][0])
        if i % 50 == 49:
            target.legit()  # served while the flood goes on
    answered = 0  # the layer may drop some of a flood (the shims rate-limit sources): count what got through
    target.attacker.sock.settimeout(1.0)
    try:
        while data := target.attacker.sock.recv(9000):
            answered += len(data) >= MGMT.size and MGMT.unpack_from(data)[10] == FLOW_REPLY
    except TimeoutError:
        pass
    target.legit()
    spent = cpu_s(pid) - cpu
    assert answered >= 10, f"only {answered} of {FLOOD} hostile requests reached the IRMd"
    assert spent / answered < CPU_PER_REQUEST, f"{spent / answered * 1000:.1f} ms of IRMd CPU per hostile request"
    assert rss_mb(pid) - rss < RSS_GROWTH_MB
    assert target.server.poll() is None
