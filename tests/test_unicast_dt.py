"""The data transfer thread's wire without processes: frames of PDUs (pci.frame/unframe), packed up
to the N-1 flow's MTU, sealed once per frame, sent before the thread waits; bad frames counted."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from ipcp.unicast import auth, ca, pci
from ipcp.unicast.dt import Dt, Link, UniFlow
from ipcp.unicast.pci import FRAMING, MAX_FRAME_PDUS, Pci, PciFormat

FMT = PciFormat()
ME, HOP, DST = 1, 3, 9


def pdu(size: int, dst: int = DST, eid: int = 5) -> bytes:
    return FMT.pack(Pci(dst, 0, 60, 0, eid)) + bytes(size)


def test_frames_carry_pdus_and_unframe_refuses_what_does_not_add_up() -> None:
    pdus = [pdu(10), pdu(0), pdu(1400)]
    frame = pci.frame(*pdus)
    got, bad = pci.unframe(frame)
    assert [bytes(p) for p in got] == pdus and not bad
    assert pci.unframe(b"") == ([], True)
    assert pci.unframe(b"\x00\x00" + pdus[0])[1]  # a zero length
    got, bad = pci.unframe(frame[:-1])  # the last PDU cut short: the ones before it stand
    assert [bytes(p) for p in got] == pdus[:2] and bad
    assert pci.unframe(frame + b"\x05")[1]  # a stray byte after the last PDU


@pytest.fixture
def wire() -> Iterator[tuple[Dt, socket.socket, socket.socket]]:
    """A DT thread (not started: driven by calls) with a link to HOP; (dt, its end, HOP's end)."""
    dt = Dt(FMT, ME, 60, 65536, lambda p, h: None, lambda a, t: None, lambda f, u: None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    theirs.setblocking(False)
    yield dt, ours, theirs
    for s in (ours, theirs):
        s.close()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("keyed", [False, True])
def test_a_burst_goes_out_in_frames_that_fit_the_mtu_and_a_lone_pdu_at_once(
    wire: tuple[Dt, socket.socket, socket.socket], keyed: bool
) -> None:
    dt, ours, theirs = wire
    key = b"\x07" * 32
    mtu = 8980
    room = mtu - (auth.SEAL if keyed else 0)
    dt.n1[HOP] = Link(HOP, ours, auth.Sealer(key) if keyed else None, room=room)
    dt.pff = {DST: [HOP]}
    came = Link(2, socket.socket(), None, None)
    try:
        burst = [pci.frame(pdu(1400, eid=i)) for i in range(1, 21)]
        dt.from_n1(came, burst)  # 20 PDUs to forward, read in one burst
        frames = drain(theirs)
        opener = auth.Opener(key)
        pdus = []
        for f in frames:
            assert len(f) <= mtu
            got, bad = pci.unframe(opener.open(f) if keyed else f)
            assert not bad
            pdus += got
        per_frame = room // (FMT.size + 1400 + FRAMING)
        assert len(frames) == -(-20 // per_frame)  # as few frames as fit
        assert [FMT.struct.unpack_from(p)[4] for p in pdus] == list(range(1, 21))  # in order
        assert all(FMT.struct.unpack_from(p)[2] == 59 for p in pdus)  # one hop less to live
        dt.from_n1(came, [pci.frame(pdu(64))])  # a lone PDU is not held back for company
        assert len(drain(theirs)) == 1
        assert dt.counters.forwarded == 21 and dt.counters.frames_out == len(frames) + 1
    finally:
        came.sock.close()


def test_a_frame_holds_at_most_max_frame_pdus(wire: tuple[Dt, socket.socket, socket.socket]) -> None:
    dt, ours, theirs = wire
    dt.n1[HOP] = Link(HOP, ours)
    dt.pff = {DST: [HOP]}
    came = Link(2, socket.socket())
    try:
        dt.from_n1(came, [pci.frame(*[pdu(1)] * (MAX_FRAME_PDUS + 1))])
        frames = drain(theirs)
        assert [len(pci.unframe(f)[0]) for f in frames] == [MAX_FRAME_PDUS, 1]
    finally:
        came.sock.close()


def test_forged_replayed_and_malformed_frames_are_dropped_whole_and_counted(
    wire: tuple[Dt, socket.socket, socket.socket],
) -> None:
    dt, ours, theirs = wire
    key = b"\x09" * 32
    dt.n1[HOP] = Link(HOP, ours)
    dt.pff = {DST: [HOP]}
    sealer = auth.Sealer(key)
    came = Link(2, socket.socket(), None, auth.Opener(key))
    try:
        good = sealer.seal_bytes(pci.frame(pdu(10), pdu(20)))
        altered = bytearray(sealer.seal_bytes(pci.frame(pdu(10))))  # a sequence number not seen yet
        altered[12] ^= 1
        cut = sealer.seal_bytes(pci.frame(pdu(10))[:-1])
        dt.from_n1(came, [good, good, bytes(altered), pci.frame(pdu(10)), cut])
        c = dt.counters
        assert c.forwarded == 2 and c.replayed == 1 and c.forged == 2 and c.malformed == 1
        assert len(drain(theirs)) == 1
    finally:
        came.sock.close()


def test_a_flow_that_falls_behind_gets_a_longer_queue_within_the_budget(
    wire: tuple[Dt, socket.socket, socket.socket],
) -> None:
    from ipcp.unicast.dt import UniFlow
    from transports.queues import FLOW_QUEUE

    dt, _, _ = wire
    flows = []
    try:
        for eid in (5, 6):
            app, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # holds a PDU or two
            mine.setblocking(False)
            flows.append((app, mine))
            dt.flows[eid] = UniFlow(eid, mine)
        dt.queues.total = FLOW_QUEUE  # room for one flow
        came = Link(2, socket.socket())
        dt.from_n1(came, [pci.frame(*[pdu(1400, dst=ME, eid=5)] * 6)])
        assert dt.counters.delivered == 6 and dt.counters.overflow == 0  # grown, then delivered
        assert dt.flows[5].queue == FLOW_QUEUE
        dt.from_n1(came, [pci.frame(*[pdu(1400, dst=ME, eid=6)] * 6)])
        assert dt.flows[6].queue == 0 and dt.counters.overflow > 0  # the budget is spent: dropped
        dt.remove_flow(5)
        assert dt.queues.given == 0  # its share is back
        came.sock.close()
    finally:
        for a, b in flows:
            a.close()
            b.close()


def test_congestion_feedback_is_taken_only_from_the_flows_peer() -> None:
    """A member that knows an eid (a forwarder sees it in the PCI) cannot slow another's flow down."""
    dt = Dt(FMT, ME, 60, 65536, lambda p, h: None, lambda a, t: None, lambda f, u: None)
    flow = UniFlow(5, None, dst=7)  # type: ignore[arg-type]
    ca.by_name("mb-ecn").flow_added(flow, 0.0)
    assert flow.tx is not None
    before = flow.tx.rate
    dt.flows[5] = flow
    dt.on_update(5, 9, ca.Update(255, 10.0))  # from a member that is not the flow's peer
    assert flow.tx.rate == before
    dt.on_update(5, 7, ca.Update(255, 10.0))  # from the peer: taken
    assert flow.tx.rate < before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("congestion", ["none", "mb-ecn"])
def test_an_sdu_larger_than_a_pdu_carries_is_dropped_not_the_thread(
    wire: tuple[Dt, socket.socket, socket.socket], congestion: str
) -> None:
    """A flow's socket is its application's to write on past flowlib: one SDU of 65,536 bytes (a
    PDU's length is 2 bytes) raised in the DT thread, which ends the IPCP and every flow of every
    user. It is dropped and counted; the SDUs around it, the largest that fits among them, go on."""
    _, ours, theirs = wire
    dt = Dt(FMT, ME, 60, 65536, lambda p, h: None, lambda a, t: None, lambda f, u: None, ca.by_name(congestion))
    dt.n1[HOP] = Link(HOP, ours)
    dt.pff = {DST: [HOP]}
    app, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    try:
        dt.add_flow(UniFlow(5, mine, DST, 7, 1))
        largest = 0xFFFF - FMT.size
        sdus = [bytes(65536), b"hello", bytes(largest + 1), bytes(largest), b"again"]
        for sdu in sdus:
            app.send(sdu)
        dt.on_ready(mine.fileno(), 0)
        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(theirs.recv(1 << 17))  # (the largest PDU's frame is 2 bytes more than 65,535)
        got = [bytes(p)[FMT.size :] for f in frames for p in pci.unframe(f)[0]]
        assert got == [b"hello", bytes(largest), b"again"]
        assert dt.counters.oversized == 2 and dt.flows[5].dropped == 2 and dt.counters.sent == 3
    finally:
        app.close()
        mine.close()
