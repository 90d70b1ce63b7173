"""The eth shims facing a hostile Ethernet: frames from thousands of forged MAC addresses (queries,
flow requests, replies and deallocations for guessed endpoints, keepalives), replayed and malformed
ones. The IPCP must not crash, must stay within bounded CPU and memory, must answer no frame with
more than 3x its bytes, and must keep serving the flow that was there before the attack.

Forging frames takes raw access to the link (CAP_NET_RAW), so the attacker here is root in the
peer's namespace: another machine on the LAN. It also listens, and counts what the IPCP sends back.
Figures are printed (-s) and recorded as junit properties; docs/security/shims.md quotes them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
from helpers import pid_alive
from shim_attack import Watched, usage

from flowlib.irm import IrmClient
from ipcp.shim import AMPLIFICATION
from ipcp.shim_wire import COOKIE, ETH_DIX, ETH_LLC, Kind, Layout
from transports import eth

if TYPE_CHECKING:
    from conftest import Host

pytestmark = [pytest.mark.net, pytest.mark.timeout(240)]

LAYER = "ethlan"
PONG = hashlib.sha3_256(b"pong").digest()

# Root in the peer's namespace; stdlib only. Sends every frame, listening meanwhile on the same link,
# and counts the bytes the target's MAC sent to each forged source.
ATTACKER = r"""
import json, select, socket, sys, time
job = json.load(sys.stdin)
dev, target = job["dev"], bytes.fromhex(job["target"])
tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
tx.bind((dev, 0))
rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
rx.bind((dev, 3))
rx.setblocking(False)
sent, back, forged = {}, {}, set()
def drain():
    while True:
        try:
            frame = rx.recv(65536)
        except BlockingIOError:
            return
        if frame[6:12] == target and frame[:6] in forged:
            back[frame[:6]] = back.get(frame[:6], 0) + len(frame)
for i, line in enumerate(job["frames"]):
    frame = bytes.fromhex(line)
    src = frame[6:12]
    forged.add(src)
    sent[src] = sent.get(src, 0) + len(frame)
    try:
        tx.send(frame)
    except OSError:
        pass
    if i % 200 == 0:
        drain()
        time.sleep(job["pause"])
deadline = time.monotonic() + job["linger"]
while time.monotonic() < deadline:
    select.select([rx], [], [], 0.05)
    drain()
worst = max((back.get(s, 0) / n for s, n in sent.items()), default=0.0)
print(json.dumps({"sent": sum(sent.values()), "received": sum(back.values()), "worst": worst,
                  "answered": len(back)}))
"""


def bootstrap(host: Host, kind: str) -> None:
    host.irmd.irm_ok("ipcp", "bootstrap", "type", kind, "name", "e", "layer", LAYER, "dev", host.dev)


def forged_mac(rng: random.Random) -> bytes:
    return bytes([0x02]) + rng.randbytes(5)  # locally administered, unicast


class Framer:
    """Management frames of one eth layer, from any source MAC."""

    def __init__(self, kind: str, dst: bytes) -> None:
        self.kind, self.dst = kind, dst
        self.layout: Layout = ETH_DIX if kind == "eth-dix" else ETH_LLC

    def mgmt(self, src: bytes, kind: Kind, body: bytes = b"", /, to: bytes | None = None, **fields: int) -> bytes:
        return self.frame(src, self.layout.encode(kind, body, **fields), to)

    def frame(self, src: bytes, payload: bytes, to: bytes | None = None) -> bytes:
        """Any payload on the management endpoint."""
        dst = to or self.dst
        if self.kind == "eth-dix":
            return eth.DIX.pack(dst, src, eth.DEFAULT_ETHERTYPE, 0, len(payload)) + payload
        return eth.LLC.pack(dst, src, 3 + len(payload), eth.MGMT_WIRE_SAP, eth.MGMT_WIRE_SAP, eth.LLC_UI) + payload

    def data(self, src: bytes, eid: int, sdu: bytes) -> bytes:
        if self.kind == "eth-dix":
            return eth.DIX.pack(self.dst, src, eth.DEFAULT_ETHERTYPE, eid, len(sdu)) + sdu
        return eth.LLC.pack(self.dst, src, 3 + len(sdu), eth.WIRE_SAP[eid % 62 + 2], eth.WIRE_SAP[2], 3) + sdu


@pytest.fixture(params=["eth-dix", "eth-llc"])
def lan(two_hosts: tuple[Host, Host], request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host, Framer]]:
    a, b = two_hosts
    for h in (a, b):
        bootstrap(h, request.param)
    a.irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    a.irmd.irm_ok("name", "register", "pong", "layer", LAYER)
    yield a, b, Framer(request.param, eth.mac_bytes(a.mac))


def attack(b: Host, target: bytes, frames: list[bytes], pause: float = 0.005, linger: float = 1.0) -> dict[str, float]:
    job = {"dev": b.dev, "target": target.hex(), "frames": [f.hex() for f in frames], "pause": pause, "linger": linger}
    r = b.exec("python3", "-c", ATTACKER, input=json.dumps(job), timeout=200)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def oping_ok(host: Host, count: int = 3) -> None:
    r = host.irmd.run("oping", "-n", "pong", "-c", str(count), "-i", "10", "--timeout", "10")
    assert f"{count} packets transmitted, {count} received" in r.stdout, r.stdout + r.stderr


def test_frames_from_thousands_of_forged_macs_amplify_nothing_and_leave_the_flow_up(
    lan: tuple[Host, Host, Framer], record_property: Callable[[str, object], None]
) -> None:
    a, b, framer = lan
    client = IrmClient(b.irmd.sock)
    watched = Watched(client)
    try:
        pid = a.irmd.ipcp_pid("e")
        before = usage(pid)
        rng = random.Random(7)
        hash_len = len(PONG)
        frames = []
        for i in range(3000):
            src = forged_mac(rng)
            frames.append(framer.mgmt(src, Kind.NAME_QUERY, PONG + COOKIE.pack(i), to=eth.BROADCAST))
            frames.append(framer.mgmt(src, Kind.NAME_QUERY, rng.randbytes(hash_len), to=eth.BROADCAST))
            eids = framer.layout.reply_fields(rng.randrange(2, 63), rng.randrange(2, 63))
            frames.append(framer.frame(src, framer.layout.encode(Kind.FLOW_REPLY, **eids)))
            frames.append(framer.mgmt(src, Kind.DEALLOC, s_eid=rng.randrange(2, 63), d_eid=rng.randrange(2, 63)))
            frames.append(framer.mgmt(src, Kind.KEEPALIVE, response=1))
            frames.append(framer.data(src, rng.randrange(1, 0xFFFF), b"data for nobody"))
        result = attack(b, eth.mac_bytes(a.mac), frames)
        after = usage(pid)
        assert pid_alive(pid) and a.irmd.ipcp_pid("e") == pid, "the IPCP died"
        assert result["worst"] <= AMPLIFICATION, result
        assert result["received"] <= result["sent"], result
        watched.check()
        oping_ok(b)
        cpu = after.cpu - before.cpu
        ratio, grown = result["received"] / result["sent"], (after.rss - before.rss) / 1e6
        print(
            f"\n{framer.kind} flood of {len(frames)} frames: IPCP CPU {cpu:.2f} s, "
            f"answers {ratio:.3f} bytes per byte, rss +{grown:.1f} MB"
        )
        record_property(f"{framer.kind}_flood_ipcp_cpu_s", cpu)
        assert cpu < 20 and after.rss - before.rss < 40e6
    finally:
        client.close()


def test_flow_requests_from_forged_macs_are_held_to_the_limits(lan: tuple[Host, Host, Framer]) -> None:
    """Each forged request takes an endpoint while the IRMd decides and, accepted, a flow that never
    hears from its peer. The IPCP holds to its limits and the flow that was there keeps working."""
    a, b, framer = lan
    client = IrmClient(b.irmd.sock)
    watched = Watched(client)
    try:
        pid = a.irmd.ipcp_pid("e")
        rng = random.Random(9)
        frames = [
            framer.mgmt(forged_mac(rng), Kind.FLOW_REQ, PONG + bytes(36), s_eid=rng.randrange(2, 63))
            for _ in range(400)
        ]
        frames += [framer.mgmt(eth.mac_bytes(b.mac), Kind.FLOW_REQ, PONG, s_eid=2)] * 200  # one source, replayed
        result = attack(b, eth.mac_bytes(a.mac), frames, pause=0.01)
        assert result["worst"] <= AMPLIFICATION, result
        assert pid_alive(pid) and a.irmd.ipcp_pid("e") == pid
        watched.check()
    finally:
        client.close()


def test_malformed_management_of_every_length_and_field_crashes_nothing(lan: tuple[Host, Host, Framer]) -> None:
    a, b, framer = lan
    pid = a.irmd.ipcp_pid("e")
    rng = random.Random(11)
    src = forged_mac(rng)
    frames = []
    for kind in framer.layout.codes:  # every code, cut short or with junk after it
        whole = framer.layout.encode(kind, PONG + COOKIE.pack(1))
        for size in (0, 1, framer.layout.size - 1, framer.layout.size, framer.layout.size + 7, len(whole)):
            frames.append(framer.frame(src, whole[:size] + rng.randbytes(rng.randrange(0, 20))))
    frames += [
        framer.mgmt(
            src,
            Kind.FLOW_REQ,
            rng.randbytes(rng.randrange(0, 120)),
            s_eid=rng.randrange(0, 256),
            response=rng.randrange(-(2**31), 2**31),
        )
        for _ in range(200)
    ]
    frames += [
        framer.mgmt(
            src,
            rng.choice(list(framer.layout.codes)),
            rng.randbytes(rng.randrange(0, 300)),
            s_eid=rng.randrange(0, 256),
            d_eid=rng.randrange(0, 256),
        )
        for _ in range(300)
    ]
    attack(b, eth.mac_bytes(a.mac), frames, linger=0.5)
    assert pid_alive(pid) and a.irmd.ipcp_pid("e") == pid
    oping_ok(b)
    log = a.irmd.log_text()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
