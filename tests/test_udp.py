"""The udp4 layer end to end on loopback: one irmd per 'host' (127.0.0.1, .2, .3), no root needed.

Every host runs its own irmd on its own socket, with a udp4 IPCP in layer 'lan' on the same
(random, free) port at its own loopback address. Every test stops its irmds at teardown, even
when it failed or killed one of them on purpose.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import udp_lan
from helpers import BIN, pid_alive, wait_for
from udp_lan import A_IP, B_IP, C_IP, LAYER, Host, answers, members_of, mgmt, oping_ok, ping, prove

from apps import operf
from apps.oping import ECHO_REPLY, HDR
from flowlib import (
    EventQueue,
    EventType,
    Flow,
    FlowDown,
    FlowSet,
    FlowTimeout,
    InvalidArgument,
    NameNotFound,
    fevent,
    qos,
)
from flowlib.flow import establish
from flowlib.irm import IrmClient
from flowlib.stats import FlowStats, IpcpStats
from ipcp import shim
from ipcp.base import DROP_APP
from ipcp.shim_wire import COOKIE, WANT_MEMBERS, Kind
from transports import udp


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    with udp_lan.lan(tmp_path) as make:
        yield make


@pytest.fixture
def pair(lan: Callable[..., Host]) -> tuple[Host, Host]:
    return udp_lan.pair(lan)


def operf_counts(out: str) -> tuple[int, int, int, int]:
    """(sent, received, lost, corrupt) from operf's statistics line."""
    m = re.search(r"(\d+) SDUs sent, (\d+) received, (-?\d+) lost\b.*?(\d+) corrupt", out)
    assert m, f"no statistics in operf's output:\n{out}"
    sent, rcvd, lost, corrupt = map(int, m.groups())
    return sent, rcvd, lost, corrupt


# -- working paths ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_oping_across_two_irmds_gets_every_reply(pair: tuple[Host, Host]) -> None:
    _a, b = pair
    out = oping_ok(b)
    assert "0% packet loss" in out
    assert re.search(r"rtt min/avg/max/mdev = [\d.]+/[\d.]+/[\d.]+/[\d.]+ ms", out)
    assert out.count("64 bytes from pong: seq=") == 10


@pytest.mark.timeout(60)
def test_oping_with_large_sdus_up_to_the_layer_mtu(pair: tuple[Host, Host]) -> None:
    _a, b = pair
    code, out, err = b.run("oping", "-n", "pong", "-c", "5", "-i", "10", "-s", "8000", "-Q")
    assert code == 0, err
    assert "5 packets transmitted, 5 received" in out


@pytest.mark.timeout(60)
def test_the_layer_mtu_is_enforced_with_a_clear_error(pair: tuple[Host, Host]) -> None:
    _a, b = pair
    flow = b.alloc("pong")
    assert flow.mtu == 8976  # what an Ouroboros 0.23 udp IPCP reads whole: 8980 with the eid
    with pytest.raises(InvalidArgument, match="carries 1 to 8976 bytes"):
        flow.write(bytes(flow.mtu + 1))
    ping(flow)
    flow.close()


@pytest.mark.timeout(60)
def test_a_udp_flow_asking_for_no_errors_keeps_its_crc(pair: tuple[Host, Host]) -> None:
    """Only a local layer's flows go without the CRC trailer: this one crosses a network."""
    _a, b = pair
    reply, fd = b.client().alloc("pong", qos.raw_no_errors, 10)
    assert not reply.no_wire
    flow = establish(reply, fd, b.clients[-1], client=True)
    assert flow.mtu == 8976 - 4
    ping(flow)
    flow.close()


@pytest.mark.timeout(90)
def test_operf_paced_delivers_every_sdu_intact(pair: tuple[Host, Host]) -> None:
    a, b = pair
    a.serve("perf", "operf")
    code, out, err = b.run("operf", "-n", "perf", "-d", "2s", "-s", "1400", "-r", "40M", "--report")
    assert code == 0, f"operf failed: {err}{out}"
    sent, rcvd, lost, corrupt = operf_counts(out)
    assert sent > 1000 and rcvd == sent and lost == 0 and corrupt == 0, out


@pytest.mark.timeout(90)
def test_flooding_an_operf_server_corrupts_nothing(pair: tuple[Host, Host]) -> None:
    """operf's protocol from this process, the report asked until answered (a raw flow may drop it)."""
    a, b = pair
    a.serve("perf", "operf")
    flow = b.alloc("perf")
    size = 1400
    zeros = bytes(size - operf.MSG.size)
    flow.write(operf.CONF.pack(operf.UNI))
    sent = 0
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        for _ in range(64):
            flow.write(operf.MSG.pack(sent) + zeros)
            sent += 1
    flow.set_timeout(0.2)
    report = None
    for _ in range(50):
        flow.write(operf.ASK)
        try:
            while not (reply := flow.read()).startswith(operf.ANSWER):
                pass
        except FlowTimeout:
            continue
        report = operf.REPORT.unpack(reply)[1:]
        break
    flow.close()
    assert report is not None, "the operf server never answered"
    rcvd, nbytes, missing, reordered, corrupt = report
    assert corrupt == 0 and reordered == 0, report
    assert rcvd > 0 and nbytes == rcvd * size
    # Every SDU the server counted was one we sent, once: the gaps it saw and what it got add up to no
    # more than we wrote. How many a loaded machine drops is the benchmarks' business, not this test's;
    # one in a hundred only tells that the flood was served at all.
    assert rcvd + missing <= sent, f"{rcvd} received and {missing} missing of {sent} sent"
    assert rcvd >= 0.01 * sent, f"{rcvd} of {sent} SDUs arrived under flood"


@pytest.mark.timeout(90)
def test_operf_cli_flooding_reports_its_statistics(pair: tuple[Host, Host]) -> None:
    a, b = pair
    a.serve("perf", "operf")
    code, out, err = b.run("operf", "-n", "perf", "-d", "2s", "-s", "1400", "-f", "--report")
    assert code == 0, f"operf failed: {err}{out}"
    _sent, rcvd, _lost, corrupt = operf_counts(out)
    assert rcvd > 0 and corrupt == 0, out


@pytest.mark.timeout(60)
def test_flows_in_both_directions_and_many_at_once(pair: tuple[Host, Host]) -> None:
    a, b = pair
    b.serve("pong-b")
    oping_ok(a, "pong-b", count=3)
    flows = [b.alloc("pong") for _ in range(10)]
    for i, f in enumerate(flows):
        ping(f, i)
    for f in flows:
        f.close()
    oping_ok(b, count=3)


@pytest.mark.timeout(60)
def test_a_name_registered_on_the_host_itself_is_reached_through_the_udp_layer(lan: Callable[..., Host]) -> None:
    a = lan(A_IP)
    a.serve("pong")
    oping_ok(a, count=3)


@pytest.mark.timeout(60)
def test_deallocating_ends_the_flow_at_the_peer(pair: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = pair
    a.irm_ok("bind", "process", str(os.getpid()), "name", "me")
    a.irm_ok("name", "register", "me", "layer", LAYER)
    server = a.client()
    got: list[Flow] = []
    fset, queue = FlowSet(server), EventQueue()
    fset.listen()
    try:
        flow = b.alloc("me")
        flow.write(b"hello")
        deadline = time.monotonic() + 10
        kinds: list[EventType] = []
        while time.monotonic() < deadline and EventType.DEALLOC not in kinds:
            fevent(fset, queue, 0.5)
            for ev in queue:
                kinds.append(ev.type)
                if ev.type is EventType.ALLOC:
                    got.append(ev.flow)
                elif ev.type is EventType.PKT:
                    assert ev.flow.read() == b"hello"
                    flow.close()  # the requester lets go
        assert kinds[:3] == [EventType.ALLOC, EventType.PKT, EventType.DEALLOC], kinds
    finally:
        fset.close()
        for f in got:
            f.close()


@pytest.mark.timeout(60)
def test_a_flow_socket_takes_datagrams_only_from_its_peer(pair: tuple[Host, Host]) -> None:
    _a, b = pair
    flow = b.alloc("pong")
    ping(flow, 1)
    probe = socket.socket(fileno=os.dup(flow.fd))
    try:
        local = probe.getsockname()
    finally:
        probe.close()  # only the duplicate
    for ip in (C_IP, A_IP):  # a stranger, and the peer's host from another port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
            for _ in range(20):
                s.sendto(HDR.pack(ECHO_REPLY, 2, 0) + b"forged", local)
    time.sleep(0.2)
    flow.set_blocking(False)
    with pytest.raises(Exception, match="would block"):
        flow.read()  # nothing forged got in
    flow.set_blocking(True)
    ping(flow, 3)
    flow.close()


@pytest.mark.timeout(60)
def test_the_relay_data_path_carries_oping_and_operf(lan: Callable[..., Host]) -> None:
    """With `impair` (at 0 %) data goes through the IPCPs' relays, the eth layers' data path."""
    a = lan(A_IP, extra=("impair", "loss=0"))
    b = lan(B_IP, peer=A_IP, extra=("impair", "loss=0"))
    a.serve("pong")
    oping_ok(b)
    a.serve("perf", "operf")
    code, out, err = b.run("operf", "-n", "perf", "-d", "1s", "-s", "1400", "-r", "20M", "--report")
    assert code == 0, f"operf failed: {err}{out}"
    sent, rcvd, _lost, corrupt = operf_counts(out)
    assert sent > 500 and rcvd == sent and corrupt == 0, out


@pytest.mark.timeout(90)
def test_a_relayed_flow_counts_its_sdus_and_says_where_and_why_it_dropped_some(lan: Callable[..., Host]) -> None:
    """Through the relay (impair at 0 %), each end's IPCP counts the flow's SDUs: the sender's sent
    (or dropped, its socket full), the receiver's received, or dropped while its application did not
    read; the end's application, `irm flow list` and `irm ipcp show` hear the same numbers."""
    a = lan(A_IP, extra=("impair", "loss=0"))
    b = lan(B_IP, peer=A_IP, extra=("impair", "loss=0"))
    server = a.client()
    server.bind("sink")
    a.irm_ok("name", "register", "sink", "layer", LAYER)
    server.listen(True)
    cli = b.alloc("sink")
    arrived = wait_for(server.take_arrived, 10, "the flow at the sink")
    assert isinstance(arrived, list) and len(arrived) == 1
    srv = Flow(*arrived[0], server)  # never read: its queue fills, the rest is dropped at A's IPCP
    written = 2000
    for _ in range(written):
        cli.write(bytes(1000))

    def counted(flow: Flow) -> IpcpStats:
        stats = flow.stats().ipcp
        assert stats is not None and stats.data == "ipcp", stats
        return stats

    wait_for(
        lambda: (s := counted(cli)).sent is not None and s.sent + (s.dropped or 0) == written,
        30,
        "B's IPCP to send or drop every SDU",
    )
    last: list[IpcpStats] = []

    def settled() -> IpcpStats | None:  # A's IPCP has taken every datagram that came: two reads agree
        last[:] = [*last[-1:], counted(srv)]
        return last[-1] if len(last) == 2 and last[0] == last[1] else None

    rx = wait_for(settled, 30, "A's IPCP to take all that came")
    assert isinstance(rx, IpcpStats) and rx.received is not None and rx.dropped is not None
    assert 0 < rx.received < written and rx.received + rx.dropped <= written  # (UDP may lose some on the way)
    assert rx.drops == f"{rx.dropped} {DROP_APP}"
    assert rx.where() == f"dropped at ipcp u: {rx.dropped} {DROP_APP}"
    rows = {r["role"]: r for r in a.irmd.table("flow", "list")}
    assert int(rows["dst"]["received"]) == rx.received and int(rows["dst"]["dropped"]) == rx.dropped
    ((_, peer, sent, received, dropped, drops, *_),) = a.info()["flows"].values()
    assert (peer, received, dropped, drops) == (f"{B_IP}:{b.port}", str(rx.received), str(rx.dropped), rx.drops)
    assert sent.isdigit()  # (keepalives, if any: the application writes nothing)


@pytest.mark.timeout(60)
def test_oping_and_operf_say_packets_were_lost_beyond_this_hosts_ipcp(lan: Callable[..., Host]) -> None:
    """B's link loses a third of what B sends (impair): B's IPCP sent every packet it was given, so the
    tools say none was dropped here."""
    a = lan(A_IP, extra=("impair", "loss=0"))
    b = lan(B_IP, peer=A_IP, extra=("impair", "loss=33"))
    a.serve("pong")
    code, out, err = b.run("oping", "-n", "pong", "-c", "30", "-i", "10", "--timeout", "10", "--report")
    lost = re.search(r"^30 packets transmitted, (\d+) received", out, re.M)
    assert code == 0 and lost is not None and int(lost[1]) < 30, err + out
    assert f"{30 - int(lost[1])} lost; none dropped at ipcp u here: lost on the way or at the peer" in out, out
    a.serve("perf", "operf")
    for _ in range(10):  # operf's one test-type SDU, lost (a third are), ends the run, as in C's
        code, out, err = b.run("operf", "-n", "perf", "-d", "1s", "-s", "500", "-r", "2M", "-t", "bi", "--report")
        if "deallocated by the peer" not in err:
            break
    _, _, lost_, _ = operf_counts(out + err)
    assert lost_ > 0 and f"{lost_} lost; none dropped at ipcp u here" in out, err + out


@pytest.mark.timeout(60)
def test_the_ipcp_tells_its_address_flows_members_and_counters(pair: tuple[Host, Host]) -> None:
    a, b = pair
    flow = b.alloc("pong")
    ping(flow)
    wait_for(lambda: f"{B_IP}:{b.port}" in a.info().get("members", {}), 10, "B among A's members")
    info = a.info()
    assert info["shim"]["address"][1] == f"{A_IP}:{a.port}" and info["shim"]["mtu"][1] == "8976"
    assert info["shim"]["hash"][1] == "MD5"
    assert info["members"][f"{B_IP}:{b.port}"][1] == "proven"
    ((_, peer, *counted, eid, peer_eid, speaks, data),) = info["flows"].values()
    assert peer == f"{B_IP}:{b.port}" and speaks == "ours" and data == "own socket"
    assert counted == ["direct", "direct", "direct", ""]  # its packets pass no IPCP: nothing counted here
    assert flow.stats() == FlowStats(None, IpcpStats("u", "direct"))  # the same, as the flow's end hears it
    (row,) = b.irmd.table("flow", "list")
    assert (row["sent"], row["received"], row["dropped"]) == ("direct", "direct", "direct")
    ((*_, b_eid, b_peer_eid, _, _),) = b.info()["flows"].values()
    assert (b_eid, b_peer_eid) == (peer_eid, eid)  # each end names the other's eid
    assert b.info()["members"][f"{A_IP}:{a.port}"][1] == "configured"
    before = a.counter("dropped malformed")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((C_IP, 0))
        s.sendto(udp.EID.pack(0) + b"runt", a.addr)
    wait_for(lambda: a.counter("dropped malformed") == before + 1, 5, "the runt to be counted")
    assert a.counter("received") > 0 and a.counter("sent") > 0
    flow.close()


# -- names ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_unregistering_a_name_makes_it_unreachable(pair: tuple[Host, Host]) -> None:
    a, b = pair
    oping_ok(b, count=2)  # resolved and cached at B
    a.irm_ok("name", "unregister", "pong", "layer", LAYER)
    start = time.monotonic()
    with pytest.raises(NameNotFound, match="not found"):
        b.alloc("pong", timeout=5.0)
    assert time.monotonic() - start < 5.0
    code, _out, err = b.run("oping", "-n", "pong", "-c", "1")
    assert code != 0 and "not found" in err
    a.irm_ok("name", "register", "pong", "layer", LAYER)  # and back
    oping_ok(b, count=2)


@pytest.mark.timeout(60)
def test_an_unknown_name_is_not_found_quickly(pair: tuple[Host, Host]) -> None:
    _a, b = pair
    start = time.monotonic()
    with pytest.raises(NameNotFound):
        b.alloc("nobody", timeout=10.0)
    assert time.monotonic() - start < 5.0


@pytest.mark.timeout(60)
def test_configuring_one_member_is_enough_c_finds_a_name_at_a_through_b(lan: Callable[..., Host]) -> None:
    a = lan(A_IP)
    lan(B_IP, peer=A_IP)
    c = lan(C_IP, peer=B_IP)  # knows only B
    a.serve("pong")
    oping_ok(c)
    c.serve("pong-c")  # and the other way: A never heard of C, yet finds its names
    oping_ok(a, "pong-c", count=3)


@pytest.mark.timeout(60)
def test_a_server_that_takes_a_second_to_start_still_gets_the_flow(pair: tuple[Host, Host], tmp_path: Path) -> None:
    a, b = pair
    slow = tmp_path / "slow" / "oping"  # matched by base name, as the real oping is
    slow.parent.mkdir()
    slow.write_text(f'#!/bin/sh\nsleep 1.2\nexec {BIN / "oping"} "$@"\n')
    slow.chmod(slow.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    a.serve("slow", str(slow))
    code, out, err = b.run("oping", "-n", "slow", "-c", "2", "-i", "10", "--timeout", "10")
    assert code == 0, f"oping failed ({code}): {err}{out}"
    assert "2 received" in out


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_one_bad_member_address_does_not_stop_queries_reaching_the_others(lan: Callable[..., Host]) -> None:
    a = lan(A_IP)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a member gossiping garbage
        s.bind((B_IP, a.port))
        prove(s, a.addr)
        bad = udp.encode_addr(("::1", 9)) + udp.encode_addr(("127.0.0.9", 0)) + udp.encode_addr(("127.0.0.9", 7))
        mgmt(s, a.addr, Kind.MEMBERS, bad, d_eid=3)
        time.sleep(0.3)
    c = lan(C_IP, peer=A_IP)  # joins after the bad entries
    c.serve("pong-c")
    wait_for(lambda: c.run("oping", "-n", "pong-c", "-c", "1")[0] == 0, 10, "C to serve its own name")
    code, out, err = a.run("oping", "-n", "pong-c", "-c", "2", "-i", "10")
    assert code == 0, f"A could not reach C's name: {err}{out}"


@pytest.mark.timeout(60)
def test_a_hello_from_a_stranger_gets_a_challenge_and_members_only_once_it_echoes(pair: tuple[Host, Host]) -> None:
    a, b = pair
    wait_for(lambda: b.addr in members_of(a), 10, "B to join A's members")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((C_IP, 0))
        mgmt(s, a.addr, Kind.HELLO, COOKIE.pack(1) + COOKIE.pack(0), response=WANT_MEMBERS)
        got = answers(s, 1.0)
        assert [k for k, _ in got] == [Kind.HELLO], "a stranger got more than a challenge"
        got = prove(s, a.addr)
        members = [msg for k, msg in got if k is Kind.MEMBERS]
        assert len(members) == 1 and b.addr in udp.decode_addrs(members[0].body)
    oping_ok(b, count=2)


# -- peer failure ------------------------------------------------------------------------------


@contextlib.contextmanager
def bounded(seconds: float, what: str) -> Iterator[None]:
    """Fail (instead of hanging) if the block runs longer; pytest-timeout's alarm is restored."""
    old_handler = signal.getsignal(signal.SIGALRM)
    old_left, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()

    def expired(*_: object) -> None:
        raise AssertionError(f"{what}: still running after {seconds} s")

    signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_left:
            signal.setitimer(signal.ITIMER_REAL, max(old_left - (time.monotonic() - start), 0.01))


def wait_end(client: IrmClient, flow: Flow, within: float) -> tuple[list[EventType], float]:
    """fevent on `flow` until it reports something; (events, seconds it took)."""
    start = time.monotonic()
    fset, queue = FlowSet(client), EventQueue()
    fset.add(flow)
    events: list[EventType] = []
    try:
        while not events and time.monotonic() - start < within:
            fevent(fset, queue, 0.5)
            events += [ev.type for ev in queue]
    finally:
        fset.close()
    return events, time.monotonic() - start


@pytest.mark.timeout(60)
def test_killing_the_peer_irmd_ends_open_flows(pair: tuple[Host, Host]) -> None:
    """The peer's IPCP sees its IRMd go, deallocates its flows and exits: DEALLOC (or DOWN) here."""
    a, b = pair
    reader = b.alloc("pong")
    watched = b.alloc("pong")
    ping(reader)
    ping(watched)
    ipcp = a.ipcp_pid()
    a.kill(ipcp_too=False)
    events, took = wait_end(b.clients[-1], watched, 12)
    assert events and events[0] in (EventType.DOWN, EventType.DEALLOC), f"no end event in {took:.1f} s"
    assert took < 10, f"the flow took {took:.1f} s to end"
    with bounded(10, "a blocking read of the ended flow"), pytest.raises(FlowDown):
        reader.read()
    wait_for(lambda: not pid_alive(ipcp), 5, "the orphaned IPCP to exit")


@pytest.mark.timeout(60)
def test_a_vanished_peer_takes_flows_down_within_the_peer_timeout(pair: tuple[Host, Host]) -> None:
    a, b = pair
    reader = b.alloc("pong")
    watched = b.alloc("pong")
    ping(reader)
    ping(watched)
    last_heard = time.monotonic()  # A answered the ping: the silence starts no earlier than this
    a.kill(ipcp_too=True)  # not a word from A any more
    events, took = wait_end(b.clients[-1], watched, 15)
    silent = time.monotonic() - last_heard
    assert events == [EventType.DOWN], f"{events} after {took:.1f} s"
    assert silent >= shim.PEER_TIMEOUT - 0.5 and took < shim.PEER_TIMEOUT + 3, (
        f"down {took:.1f} s after the kill, {silent:.1f} s after A was last heard"
    )
    with bounded(10, "a blocking read of the flow that went down"), pytest.raises(FlowDown, match="down"):
        reader.read()
    rows = [r for r in b.irmd.table("flow", "list") if r["id"] == str(watched.flow_id)]
    assert not rows or rows[0]["state"] == "down", rows


@pytest.mark.timeout(60)
def test_a_read_with_a_timeout_on_an_ended_flow_raises_flow_down(pair: tuple[Host, Host]) -> None:
    a, b = pair
    reader = b.alloc("pong")
    watched = b.alloc("pong")
    ping(reader)
    a.kill(ipcp_too=False)
    events, _ = wait_end(b.clients[-1], watched, 12)
    assert events, "the flow did not end"
    reader.set_timeout(3)
    with bounded(8, "Flow.read with a 3 s timeout on an ended flow"), pytest.raises(FlowDown):
        reader.read()


@pytest.mark.timeout(60)
def test_a_non_blocking_read_on_an_ended_flow_raises_flow_down(pair: tuple[Host, Host]) -> None:
    a, b = pair
    reader = b.alloc("pong")
    watched = b.alloc("pong")
    ping(reader)
    a.kill(ipcp_too=False)
    events, _ = wait_end(b.clients[-1], watched, 12)
    assert events, "the flow did not end"
    reader.set_blocking(False)
    with bounded(5, "a non-blocking Flow.read on an ended flow"), pytest.raises(FlowDown):
        reader.read()


@pytest.mark.timeout(60)
def test_a_reliable_flow_ends_when_the_peer_goes_away(pair: tuple[Host, Host]) -> None:
    a, b = pair
    client = b.client()
    reply, fd = client.alloc("pong", qos.data, 10.0)
    flow = establish(reply, fd, client, client=True)
    ping(flow)
    a.kill(ipcp_too=False)  # the peer deallocates: the IRMd shuts the UDP socket down
    cpu = time.process_time()
    events, took = wait_end(client, flow, 10)
    cpu = time.process_time() - cpu
    # No busy waiting: the wait may take seconds (keepalive) or end at once (the peer's IRMd told us).
    assert events and events[0] in (EventType.DOWN, EventType.DEALLOC) and cpu < max(0.5 * took, 0.1), (
        f"events {events} after {took:.1f} s, this process used {cpu:.1f} s of CPU meanwhile"
    )


@pytest.mark.timeout(60)
def test_allocating_to_a_dead_peer_times_out_with_a_clear_error(pair: tuple[Host, Host]) -> None:
    a, b = pair
    oping_ok(b, count=1)  # B has A's address for 'pong' cached
    a.kill(ipcp_too=True)
    start = time.monotonic()
    with pytest.raises(FlowTimeout) as err:
        b.alloc("pong", timeout=3.0)
    took = time.monotonic() - start
    assert 2.5 <= took < 8, f"gave up after {took:.1f} s"
    assert "pong" in str(err.value) and "did not answer" in str(err.value), str(err.value)
    code, _out, stderr = b.run("oping", "-n", "pong", "-c", "1", "--timeout", "2")
    assert code != 0 and stderr.strip(), "oping to a dead peer did not fail with a message"
