"""The udp shim facing a hostile network: floods from thousands of addresses, malformed, replayed and
spoofed messages, requests meant to exhaust it. The IPCP must not crash, must stay within bounded
CPU and memory, must answer no datagram with more than 3x its bytes, must adopt no member that
did not prove its address, and must keep serving the legitimate flow beside the attack.

The attacker is a separate process, unprivileged (nobody, when the tests run as root), sending from
127.77.x.y addresses on loopback (tests/shim_attack.py). Figures are printed (-s) and recorded as
junit properties; docs/security/shims.md quotes them.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import udp_lan
from helpers import pid_alive, wait_for
from shim_attack import Watched, attack, loopback_sources, usage
from udp_lan import C_IP, Host, members_of, mgmt, oping_ok

from ipcp.shim import AMPLIFICATION, PEER_TIMEOUT, Limits
from ipcp.shim_wire import COOKIE, UDP, WANT_MEMBERS, Kind
from transports import udp

pytestmark = pytest.mark.timeout(240)

PONG = hashlib.md5(b"pong").digest()


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    with udp_lan.lan(tmp_path) as make:
        yield make


@pytest.fixture
def pair(lan: Callable[..., Host]) -> tuple[Host, Host]:
    return udp_lan.pair(lan)


def framed(kind: Kind, body: bytes = b"", **fields: int) -> bytes:
    return udp.EID.pack(0) + UDP.encode(kind, body, **fields)


def figure(record_property: Callable[[str, object], None], name: str, value: float, unit: str) -> None:
    print(f"\n{name}: {value:.3g} {unit}")
    record_property(name, value)


def test_a_flood_from_ten_thousand_addresses_adopts_nobody_and_amplifies_nothing(
    pair: tuple[Host, Host], record_property: Callable[[str, object], None]
) -> None:
    a, b = pair
    watched = Watched(b.client())
    pid = a.ipcp_pid()
    before = usage(pid)
    hello = UDP.encode(Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(2), response=WANT_MEMBERS)
    frames = [
        udp.EID.pack(0) + hello,  # each a different would-be member
        framed(Kind.NAME_QUERY, PONG + COOKIE.pack(9)),  # for a name that is registered
        framed(Kind.KEEPALIVE, response=1),
        framed(Kind.FLOW_REPLY, s_eid=5, d_eid=6),
        framed(Kind.MEMBERS, udp.encode_addr(("127.77.0.1", 1)) * 50),
    ]
    start = time.monotonic()
    # Paced to last longer than the peer timeout: B's flow must keep its keepalives meanwhile.
    result = attack(a.addr, loopback_sources(10_000), frames, repeat=2, pause=0.02, linger=0.1)
    took = time.monotonic() - start
    after = usage(pid)
    assert took > PEER_TIMEOUT, f"the attack lasted only {took:.1f} s"
    assert pid_alive(pid) and a.ipcp_pid() == pid, "the IPCP died"
    assert result.worst <= AMPLIFICATION, result
    assert result.received <= result.sent, result
    watched.check()
    assert not {m for m in members_of(a) if str(m[0]).startswith("127.77.")}, "a spoofed source became a member"
    assert not [m for m in a.info()["members"] if m.startswith("127.77.")] and a.counter("dropped internal error") == 0
    assert a.counter("dropped management (queue full)") + a.counter("dropped rate") > 0, "no flood got through"
    oping_ok(b, count=3)
    cpu = after.cpu - before.cpu
    figure(record_property, "udp_flood_datagrams", 10_000 * len(frames) * 2, "datagrams")
    figure(record_property, "udp_flood_ipcp_cpu_s", cpu, "s")
    figure(record_property, "udp_flood_answer_ratio", result.received / result.sent, "bytes out per byte in")
    figure(record_property, "udp_flood_rss_growth_mb", (after.rss - before.rss) / 1e6, "MB")
    figure(record_property, "udp_flood_legit_rtt_max_ms", watched.rtt_max * 1e3, "ms")
    assert cpu < 20, f"{cpu:.1f} s of CPU for the flood"
    assert after.rss - before.rss < 40e6, f"the IPCP grew by {(after.rss - before.rss) / 1e6:.0f} MB"


def test_sources_that_prove_their_address_are_adopted_only_up_to_the_member_limit(
    lan: Callable[..., Host], record_property: Callable[[str, object], None]
) -> None:
    """3,000 sources that do echo their cookies (as hosts would): members up to `members`, no more."""
    a = lan(udp_lan.A_IP, extra=("members", "100"))
    pid = a.ipcp_pid()
    before = usage(pid)
    hello = framed(Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(0))
    echo = udp.EID.pack(0) + UDP.encode(Kind.HELLO, response=WANT_MEMBERS) + bytes(8)
    result = attack(
        a.addr, loopback_sources(3000, block=78), [hello], echo=echo, cookie_at=udp.EID.size + UDP.size, linger=0.3
    )
    after = usage(pid)
    wait_for(lambda: a.counter("dropped members full") > 0, 5, "the IPCP to refuse members over the limit")
    adopted = [k for k in a.info()["members"] if k.startswith("127.78.")]
    assert len(adopted) == 100 == a.counter("members adopted"), len(adopted)
    # Only members may get more than AMPLIFICATION times what they sent: the HELLO round every
    # HELLO_EVERY s (padded, so that they may answer with a page) is no answer to what they sent.
    members = {k.rsplit(":", 1)[0] for k in adopted}
    assert set(result.over) <= members, {ip: r for ip, r in result.over.items() if ip not in members}
    assert members_of(a) == set(), "a member page for a source beyond the limit"
    figure(record_property, "udp_members_3000_provers_cpu_s", after.cpu - before.cpu, "s")
    assert after.cpu - before.cpu < 30


def test_one_host_proving_many_ports_takes_a_share_of_the_members_and_later_hosts_are_adopted(
    lan: Callable[..., Host],
) -> None:
    """Members are (IP, port): an unprivileged process of one host proved a port of its own for every
    place of the member table (16 here, 1,024 by default), and a host that came after it was not
    adopted: its names were never asked for, and A reached none of them. One host (an IP, an IPv6 /64)
    now holds a quarter of the places; a host that comes after it is adopted and its server reached."""
    a = lan(udp_lan.A_IP, extra=("members", "16"))
    share = Limits(members=16).members_per_peer
    hello = framed(Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(0))
    echo = udp.EID.pack(0) + UDP.encode(Kind.HELLO, response=WANT_MEMBERS) + bytes(8)
    attacker = "127.0.0.9"
    attack(a.addr, [attacker] * 16, [hello], echo=echo, cookie_at=udp.EID.size + UDP.size, linger=0.5)
    wait_for(lambda: a.counter("dropped members of one peer") > 0, 5, "A to refuse the host's ports past its share")
    assert len([k for k in a.info()["members"] if k.startswith(f"{attacker}:")]) == share == 4
    c = lan(C_IP, peer=udp_lan.A_IP)
    c.serve("pong")
    wait_for(lambda: f"{C_IP}:{c.port}" in a.info()["members"], 10, "A to adopt the host that came after")
    oping_ok(a)  # A asks its members for the name, C among them


def test_flow_requests_from_one_source_or_many_are_held_to_their_limits(pair: tuple[Host, Host]) -> None:
    a, b = pair
    watched = Watched(b.client())
    pid = a.ipcp_pid()
    one = [framed(Kind.FLOW_REQ, PONG, s_eid=i + 1) for i in range(300)]
    result = attack(a.addr, ["127.79.0.1"], one, pause=0.0, linger=1.0)
    assert result.worst <= AMPLIFICATION, result
    many = attack(a.addr, loopback_sources(300, block=79), [framed(Kind.FLOW_REQ, PONG, s_eid=64)], linger=1.0)
    assert many.worst <= AMPLIFICATION, many
    assert pid_alive(pid) and a.ipcp_pid() == pid
    watched.check()
    oping_ok(b, count=3)


def junk(rng: random.Random) -> Iterator[bytes]:
    """Random and truncated datagrams, data for no flow, and mangled and outsized management."""
    yield from (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00", b"\x00\x00\x00\x00")
    for _ in range(300):
        yield rng.randbytes(rng.randrange(0, 200))
    for _ in range(300):
        yield struct.pack("!I", rng.randrange(1, 2**32)) + rng.randbytes(rng.randrange(0, 1500))
    valid = [
        UDP.encode(Kind.NAME_QUERY, PONG + COOKIE.pack(7)),
        UDP.encode(Kind.NAME_REPLY, PONG + COOKIE.pack(7)),
        UDP.encode(Kind.NAME_GONE, PONG),
        UDP.encode(Kind.FLOW_REQ, PONG, s_eid=5),
        UDP.encode(Kind.FLOW_REQ, PONG + b"\x01\x02", s_eid=6, response=0x4F370000, d_eid=9),
        UDP.encode(Kind.FLOW_REPLY, s_eid=5, d_eid=6),
        UDP.encode(Kind.DEALLOC, s_eid=5, d_eid=6),
        UDP.encode(Kind.KEEPALIVE, response=1),
        UDP.encode(Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(2), response=WANT_MEMBERS),
        UDP.encode(Kind.MEMBERS, rng.randbytes(40)),
    ]
    for _ in range(600):
        data = udp.EID.pack(0) + rng.choice(valid)
        how = rng.randrange(4)
        if how == 0:  # truncated
            data = data[: rng.randrange(0, len(data))]
        elif how == 1:  # a byte flipped
            i = rng.randrange(4, len(data))
            data = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
        elif how == 2:  # garbage body of a random length
            data = data[:24] + rng.randbytes(rng.randrange(0, 300))
        yield data
    # Outsized: a members list of 10,000 entries, a HELLO of 60 kB, every field at its maximum.
    yield framed(Kind.MEMBERS) + udp.encode_addr(("10.0.0.1", 1)) * 9000
    yield framed(Kind.HELLO) + bytes(60000)
    yield udp.EID.pack(0) + b"\xff" * (UDP.size + 16 + 36)
    yield udp.EID.pack(0) + bytes(65000)
    yield bytes(65507)


def test_malformed_and_outsized_datagrams_are_counted_and_crash_nothing(pair: tuple[Host, Host]) -> None:
    a, b = pair
    oping_ok(b, count=2)
    pid = a.ipcp_pid()
    rng = random.Random(3435)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((C_IP, 0))
        for i, data in enumerate(junk(rng)):
            s.sendto(data, a.addr)
            if i % 100 == 0:
                time.sleep(0.01)  # don't just overflow the receive buffer
    wait_for(lambda: "dropped" in a.irmd.log_text(), 5, "the IPCP to count what it dropped")
    assert pid_alive(pid) and a.ipcp_pid() == pid, "the IPCP died"
    oping_ok(b)
    dropped = sum(int(row[1]) for name, row in a.info()["counters"].items() if name.startswith("dropped"))
    assert dropped > 1000 and a.counter("dropped internal error") == 0
    assert "Traceback" not in a.irmd.log_text()


def test_replayed_and_spoofed_messages_change_nothing(pair: tuple[Host, Host]) -> None:
    a, b = pair
    watched = Watched(b.client())
    eids = range(1, 2**32, 2**32 // 2000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((C_IP, 0))
        for eid in eids:  # deallocations and replies for guessed endpoints, from a third address
            mgmt(s, a.addr, Kind.DEALLOC, s_eid=eid, d_eid=eid)
            mgmt(s, b.addr, Kind.FLOW_REPLY, s_eid=eid, d_eid=eid)
        mgmt(s, b.addr, Kind.NAME_REPLY, PONG + COOKIE.pack(1))  # an answer nobody asked for
        mgmt(s, b.addr, Kind.NAME_GONE, PONG)  # a name it does not hold
        # A HELLO echoing a cookie A gave another address proves nothing for this one.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.bind(("127.0.0.98", 0))
            mgmt(other, a.addr, Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(0))
            challenge = UDP.decode(other.recv(1024)[4:])[1]
            for _ in range(3):
                mgmt(s, a.addr, Kind.HELLO, bytes(8) + challenge.body[:8])
        time.sleep(0.5)
    assert not {m for m in members_of(a) if m[0] in (C_IP, "127.0.0.98")}
    watched.check()
    oping_ok(b, count=3)


@pytest.mark.timeout(120)
def test_flows_a_peer_opens_and_closes_in_a_loop_do_not_fill_the_servers_log(pair: tuple[Host, Host]) -> None:
    """Each flow a peer ended (or that went down) wrote a line of the shim's log at its server's host:
    a peer allocating and deallocating in a loop wrote them as fast as it went. Now they are logged at
    a bounded rate, the rest counted, and the peer's flows still come and go, as others' do."""
    a, b = pair
    oping_ok(b)
    before = len(a.irmd.log_text())
    flows, secs = 0, 4.0
    end = time.monotonic() + secs
    while time.monotonic() < end:
        f = b.alloc("pong")
        f.close()
        b.clients.pop().close()
        flows += 1
    assert flows > 60, flows  # far past what the log takes in that time
    time.sleep(1.0)  # the last ends reach A
    oping_ok(b)  # served beside it
    grown = a.irmd.log_text()[before:]
    ended = grown.count("deallocated by peer") + grown.count("down: peer silent")
    # 2 lines a second (bursts of 10), and the second after
    assert ended <= 10 + 2 * (secs + 2), f"{ended} lines for {flows} flows"
    assert "lines not logged" in grown  # what was not logged is counted
