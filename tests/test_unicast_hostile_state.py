"""A member gone bad against the unicast layer's cores, with messages that are well formed and
validly signed but push state where nobody checked it: LSUs renaming their member again and again,
a layer full of (made-up) members at 8-byte addresses answering an enrollment, hellos whose
member names are no IPCP names. Each must leave the core's tables bounded, raise nothing it does
not declare, and keep the legitimate use beside it working.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_unicast_enroll import KEY, acceptor, pump

from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.connmgr import AUTO_CHECK, Adjacency, AutoConnect, Neighbours
from ipcp.unicast.enroll import Enrollee, EnrolleeState, Enroller
from ipcp.unicast.handshake import Handshake
from ipcp.unicast.routing import Lsdb
from proto import messages as m
from transports.wire import MAX_FRAME


def signed_lsu(ident: auth.Identity, src: int, seqno: int, name: str, neighbours: list[int]) -> um.Lsu:
    lsu = um.Lsu(src, seqno, neighbours, name, 0.0, ident.pub)
    return dataclasses.replace(lsu, sig=ident.sign(um.signed_part(lsu)))


@pytest.mark.timeout(60)
def test_a_member_renaming_itself_in_its_lsus_holds_one_name_at_a_time() -> None:
    """Each LSU of a member under a new name bound that name to its key for good: thousands of LSUs,
    thousands of names held (memory without bound), each refused to the member really called so."""
    lsdb = Lsdb(1, name="n1")
    rogue = auth.Identity.generate()
    for seqno in range(1, 3001):
        assert lsdb.receive(signed_lsu(rogue, 7, seqno, f"member{seqno}", [1]), 0.0)
    assert set(lsdb.bindings.by_name) == {"n1", "member3000"}
    assert set(lsdb._named) == {"n1", "member3000"}
    # a member that is called member5 joins: its name is its own, its LSU taken and its links routed
    real = auth.Identity.generate()
    assert lsdb.receive(signed_lsu(real, 9, 1, "member5", [1]), 0.0)
    lsdb.set_neighbours({7, 9}, 0.0)
    assert lsdb.names()[9] == "member5" and lsdb.table()[9] == [9]
    # ... and the rogue's current name is still its own alone
    with pytest.raises(auth.Forged, match="name 'member3000'"):
        lsdb.receive(signed_lsu(auth.Identity.generate(), 11, 1, "member3000", [1]), 0.0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mtu", [MAX_FRAME, 8976, 1400])
@pytest.mark.parametrize("width", [4, 8])
def test_an_enrollment_answer_fits_the_flow_however_many_members_the_layer_has(mtu: int, width: int) -> None:
    """4096 members (a member can make them up: each LSU signed by a fresh key) made the answer too
    large for the N-1 flow (from some 800 members at 4-byte addresses over UDP: no one could enroll)
    or, at 8-byte addresses, for a frame: encoding it raised in the enroller's task, and the IPCP
    ended at the next enrollment. The answer now lists what fits, and the enrollee takes it."""
    rng = random.Random(5)
    members = sorted(rng.randrange(1 << (8 * width - 1), 1 << (8 * width)) for _ in range(4096))
    responder = acceptor()
    enrollee = Enrollee("n2", KEY, 0.0)
    enrollee.start()
    pump(enrollee, responder)
    assert responder.peer is not None
    info = um.EnrollInfo("net", {"addr": str(width)}, members, name="n1")
    (sdu,) = Enroller(responder.peer, info, 0.0, mtu).pop_out()
    assert len(sdu) <= mtu
    enrollee.receive(sdu, 0.0)
    assert enrollee.machine.state is EnrolleeState.ENROLLED and enrollee.info is not None
    got = enrollee.info.members
    assert mtu // 30 < len(got) <= len(members) and got == members[: len(got)]  # (all of them fit one frame)
    # a layer of ordinary size is listed whole
    responder, enrollee = acceptor(), Enrollee("n3", KEY, 0.0)
    enrollee.start()
    pump(enrollee, responder)
    assert responder.peer is not None
    for sdu in Enroller(responder.peer, dataclasses.replace(info, members=members[:20]), 0.0, mtu).pop_out():
        enrollee.receive(sdu, 0.0)
    assert enrollee.info is not None and enrollee.info.members == members[:20]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["", "x" * 256, "x" * 50_000, "two words", "line\nbreak", "\x00"])
def test_a_hello_that_names_no_ipcp_is_refused(name: str) -> None:
    """The peer's name is logged, shown in the neighbours of IpcpInfo (one of 50,000 characters made
    every `irm ipcp info` of the IPCP fail, its reply too large) and connected to by name."""
    init = Adjacency(Handshake(True, um.DT, name, "net", 9, auth.layer_psk(KEY), 0.0))
    resp = acceptor()
    pump(init, resp)
    assert resp.peer is None and resp.error is not None and resp.error.code == m.EINVAL
    assert "no IPCP name" in resp.error.text and len(resp.error.text) < 100
    # the same hello from a member with an IPCP's name is taken
    init, resp = Adjacency(Handshake(True, um.DT, "n2-x.y_z", "net", 9, auth.layer_psk(KEY), 0.0)), acceptor()
    pump(init, resp)
    assert resp.peer is not None and resp.peer.name == "n2-x.y_z" and init.peer is not None


@pytest.mark.timeout(60)
def test_automatic_connects_remember_only_the_names_still_held_back() -> None:
    """A member under a new name at every LSU is a new target each time: each connect to it that
    failed left its name remembered for good. Only those within their retry time stay."""
    auto = AutoConnect(0.0, most=8, retry=10.0)
    auto.enabled = True
    nbs = Neighbours()
    nbs.add(7, "n1", um.DT, "d")
    now = 0.0
    for i in range(2000):
        now += AUTO_CHECK
        assert auto.handle_timer(now, 5, "n1", nbs, {7: "n1", 9: f"rogue{i}"}) == f"rogue{i}"
        auto.done(f"rogue{i}", False, now)
    assert len(auto._retry_at) <= 10.0 / AUTO_CHECK + 1
    # a real member that failed a moment ago is still held back its whole retry time, then tried again
    auto.done("n3", False, now)
    assert auto.handle_timer(now + 1.0, 5, "n1", nbs, {7: "n1", 30: "n3"}) is None
    assert auto.handle_timer(now + 10.0, 5, "n1", nbs, {7: "n1", 30: "n3"}) == "n3"


@pytest.mark.timeout(60)
def test_a_member_flapping_a_link_earns_few_routing_tables_and_others_links_are_still_routed() -> None:
    """Each LSU adding a link asked for a table within HOLDOFF (50 ms) of the last: a member flapping
    one of its links every 10 ms made its neighbour walk the whole graph 20 times a second (85 ms
    each at the LSDB's bounds: more than its loop has). Past a burst of tables the holdoff grows while
    they keep coming, up to ls_t_recalc; a link another member adds meanwhile is routed within ls_t_recalc, and once
    the flapping has stopped a new link is routed at once again."""
    from ipcp.unicast.routing import BURST

    lsdb = Lsdb(1, name="n1")
    rogue, honest, newcomer = (auth.Identity.generate() for _ in range(3))
    recalc = lsdb.timers.recalc
    lsdb.set_neighbours({2, 3}, 0.0)
    assert lsdb.receive(signed_lsu(rogue, 2, 1, "rogue", [1]), 0.0)
    assert lsdb.receive(signed_lsu(honest, 3, 1, "honest", [1]), 0.0)
    assert lsdb.take_table(0.0) == {2: [2], 3: [3]}

    tables, seqno, now, honest_routed = 0, 1, 0.0, None
    for step in range(1, 6001):  # 60 s of LSUs from the rogue, 10 ms apart: a link to 9, then none
        now = step * 0.01
        seqno += 1
        assert lsdb.receive(signed_lsu(rogue, 2, seqno, "rogue", [1, 9] if seqno % 2 else [1]), now)
        if step == 3000:  # the honest member gets a new neighbour, 4, in the middle of it
            assert lsdb.receive(signed_lsu(honest, 3, 2, "honest", [1, 4]), now)
            assert lsdb.receive(signed_lsu(newcomer, 4, 1, "newcomer", [3]), now)
        if (table := lsdb.take_table(now)) is not None:  # as the IPCP does after each input
            tables += 1
            if honest_routed is None and 4 in table:
                honest_routed = now
    assert tables <= 60 / recalc + 10 + BURST  # was 1,200
    assert honest_routed is not None and honest_routed - 30.0 <= recalc + 0.01
    assert lsdb.table() == {2: [2], 3: [3], 4: [3]}

    # Quiet for twice ls_t_recalc (the last lost link routed around meanwhile), then a new link is at once.
    now += recalc
    lsdb.take_table(now)
    now += 2 * recalc
    seqno += 2 - seqno % 2  # the next flap would remove 9: make it add a new member's link instead
    assert lsdb.receive(signed_lsu(honest, 3, 3, "honest", [1, 4, 5]), now)
    assert lsdb.receive(signed_lsu(auth.Identity.generate(), 5, 1, "late", [3]), now)
    table = lsdb.take_table(now)
    assert table is not None and table[5] == [3]


def test_the_management_queue_serves_neighbours_in_turn_and_a_flooding_one_gives_way() -> None:
    """One neighbour filling the queue to the loop keeps at most what the others leave; the others'
    PDUs go in and come out in turn with its own, not behind all of them."""
    from ipcp.unicast.mgmtq import MgmtQueue

    q = MgmtQueue(8)
    assert q.put(7, b"f0")  # the first one wakes the loop
    for i in range(1, 20):
        assert not q.put(7, b"f%d" % i)
    assert len(q) == 8 and q.dropped == 12
    q.put(2, b"n2-lookup")
    q.put(3, b"n3-request")
    q.put(2, b"n2-store")
    assert len(q) == 8 and q.dropped == 15  # the flooder gave up three of its own
    taken = [q.take() for _ in range(8)]
    assert taken[:4] == [b"f0", b"n2-lookup", b"n3-request", b"f1"] and b"n2-store" in taken
    assert q.take() is None and len(q) == 0
    assert q.put(2, b"again")  # empty again: wakes the loop


def test_the_pacer_holds_back_a_known_members_lsus_to_one_per_min_arrival_and_never_a_newcomers() -> None:
    """No signature is checked for an LSU held back; the newest held is taken when its turn comes, and
    one forged with a higher seqno through another neighbour does not push the member's own out."""
    from ipcp.unicast.routing import MIN_ARRIVAL, Pacer

    lsdb = Lsdb(1, name="n1")
    pacer = Pacer(lsdb)
    rogue, honest = auth.Identity.generate(), auth.Identity.generate()
    assert not pacer.hold(signed_lsu(rogue, 7, 1, "rogue", [1]), 7, 0.0)  # not known yet: taken at once
    assert lsdb.receive(signed_lsu(rogue, 7, 1, "rogue", [1]), 0.0)
    assert lsdb.receive(signed_lsu(honest, 8, 1, "honest", [1]), 0.0)
    for seqno in range(2, 500):  # then as fast as it can: only held, no signature checked
        assert pacer.hold(um.Lsu(7, seqno, [1], "rogue", 0.0, rogue.pub, b"unchecked"), 7, 0.001 * seqno)
    last = signed_lsu(rogue, 7, 500, "rogue", [1, 9])
    assert pacer.hold(last, 7, 0.2)
    assert not pacer.hold(signed_lsu(honest, 8, 2, "honest", [1]), 8, 0.3)  # its turn: not held
    assert lsdb.receive(signed_lsu(honest, 8, 2, "honest", [1]), 0.3)
    # the honest member's next, through itself, and one in its name with a higher seqno, through the rogue
    real = signed_lsu(honest, 8, 3, "honest", [1, 5])
    assert pacer.hold(um.Lsu(8, 1 << 40, [], "honest", 0.0, honest.pub, b"forged"), 7, 0.35)
    assert pacer.hold(real, 8, 0.4)
    assert pacer.get_timer() == MIN_ARRIVAL and pacer.due(0.2) == []
    assert pacer.due(MIN_ARRIVAL) == [(last, 7)]  # with the neighbour it came from: not flooded back there
    assert lsdb.receive(last, MIN_ARRIVAL) and lsdb.db[7].neighbours == {1, 9}
    held = [lsu for lsu, _ in pacer.due(0.3 + MIN_ARRIVAL)]
    assert held[0].seqno == 1 << 40 and held[1] is real and pacer.get_timer() is None
    with pytest.raises(auth.Forged):
        lsdb.receive(held[0], 0.55)
    assert lsdb.receive(real, 0.55) and lsdb.db[8].neighbours == {1, 5}
    assert pacer.held == 501
