"""Enrollment and adjacency handshakes of the unicast IPCP, sans-IO: the cores of enroll and
connmgr driven against each other by hand, with time passed explicitly; no socket or sleep.

The layer key never appears on the wire; a wrong or missing key fails with EPERM on both ends;
each transition table refuses what it does not list (IllegalTransition).
"""

from __future__ import annotations

import dataclasses

import pytest

from ipcp.unicast import messages as um
from ipcp.unicast.auth import Identity, layer_psk
from ipcp.unicast.connmgr import Adjacency, AdjState, AutoConnect, Neighbours
from ipcp.unicast.enroll import Enrollee, EnrolleeState, Enroller, EnrollerEvent, EnrollerState
from ipcp.unicast.fsm import IllegalTransition
from ipcp.unicast.handshake import FIRST_HELLO, TIMEOUT, Handshake, Peer

KEY = "s3cret"
INFO = um.EnrollInfo("net", {"addr": "4", "routing": "lfa"}, [5, 9], name="n1")


def pump(a: Adjacency | Enrollee, b: Adjacency, wire: list[bytes] | None = None) -> None:
    """Pass SDUs both ways until both are quiet; every SDU is also recorded in `wire`."""
    while True:
        moved = False
        for src, dst in ((a, b), (b, a)):
            for sdu in src.pop_out():
                moved = True
                if wire is not None:
                    wire.append(sdu)
                if not dst.done:
                    dst.receive(sdu, 0.0)
        if not moved:
            return


def acceptor(key: str | None = KEY, layer: str = "net", addr: int = 5) -> Adjacency:
    return Adjacency(Handshake(False, "", "n1", layer, addr, layer_psk(key) if key else None, 0.0))


def enroll(key: str, responder: Adjacency) -> tuple[Enrollee, list[bytes]]:
    wire: list[bytes] = []
    enrollee = Enrollee("n2", key, 0.0)
    enrollee.start()
    pump(enrollee, responder, wire)
    if responder.peer is not None:
        enroller = Enroller(responder.peer, INFO, 0.0)
        for sdu in enroller.pop_out():
            wire.append(sdu)
            enrollee.receive(sdu, 0.0)
    return enrollee, wire


def test_enrollment_with_the_key_yields_the_layer_and_the_key_never_travels() -> None:
    enrollee, wire = enroll(KEY, acceptor())
    assert enrollee.machine.state is EnrolleeState.ENROLLED and enrollee.info == INFO
    assert enrollee.enroller is not None and enrollee.enroller.name == "n1" and enrollee.enroller.layer == "net"
    blob = b"".join(wire)
    assert KEY.encode() not in blob and layer_psk(KEY) not in blob and layer_psk(KEY).hex().encode() not in blob


@pytest.mark.parametrize("key", ["wrong", ""], ids=["wrong-key", "no-key"])
def test_enrollment_without_the_key_fails_with_eperm_on_both_ends(key: str) -> None:
    responder = acceptor()
    enrollee, _ = enroll(key, responder)
    assert enrollee.machine.state is EnrolleeState.FAILED and enrollee.info is None
    assert enrollee.error is not None and enrollee.error.code == "EPERM"
    assert responder.state is AdjState.FAILED and responder.peer is None


def test_an_enrollee_with_a_key_refuses_an_open_layer() -> None:
    enrollee, _ = enroll(KEY, acceptor(key=None))
    assert enrollee.error is not None and enrollee.error.code == "EPERM" and "open" in enrollee.error.text


def test_an_open_layer_enrolls_without_a_key() -> None:
    enrollee, _ = enroll("", acceptor(key=None))
    assert enrollee.info == INFO and enrollee.enroller is not None and enrollee.enroller.sealer is None


def test_a_sealed_enrollment_answer_altered_on_the_way_is_refused() -> None:
    responder = acceptor()
    enrollee = Enrollee("n2", KEY, 0.0)
    enrollee.start()
    pump(enrollee, responder)
    assert responder.peer is not None
    sdu = bytearray(Enroller(responder.peer, INFO, 0.0).pop_out()[0])
    sdu[20] ^= 1
    enrollee.receive(bytes(sdu), 0.0)
    assert enrollee.error is not None and enrollee.error.code == "EPERM"


def test_the_enrollee_times_out_and_then_refuses_anything_more() -> None:
    enrollee = Enrollee("n2", KEY, 0.0)
    enrollee.start()
    assert enrollee.get_timer() == TIMEOUT
    enrollee.handle_timer(TIMEOUT - 0.1)
    assert not enrollee.done
    enrollee.handle_timer(TIMEOUT)
    assert enrollee.error is not None and enrollee.error.code == "ETIMEDOUT" and enrollee.get_timer() is None
    with pytest.raises(IllegalTransition, match="START is not allowed in state FAILED"):
        enrollee.start()


def test_the_enroller_table_ends_once() -> None:
    peer = Peer(um.ENROLL, "n2", "", 0, None, None)
    enroller = Enroller(peer, INFO, 0.0)
    assert enroller.machine.state is EnrollerState.INFO_SENT
    enroller.handle_timer(TIMEOUT)
    assert enroller.done
    with pytest.raises(IllegalTransition):
        enroller.machine.fire(EnrollerEvent.SEND)


@pytest.mark.parametrize("component", [um.MGMT, um.DT])
def test_an_adjacency_with_the_key_is_up_at_both_ends_with_matching_seals(component: str) -> None:
    init = Adjacency(Handshake(True, component, "n2", "net", 9, layer_psk(KEY), 0.0))
    resp = acceptor()
    pump(init, resp)
    assert init.state is AdjState.UP and resp.state is AdjState.UP
    assert init.peer is not None and resp.peer is not None
    assert (init.peer.addr, init.peer.name, resp.peer.addr, resp.peer.component) == (5, "n1", 9, component)
    assert init.peer.sealer and resp.peer.opener and resp.peer.sealer and init.peer.opener
    assert bytes(resp.peer.opener.open(init.peer.sealer.seal_bytes(b"hello"))) == b"hello"
    assert bytes(init.peer.opener.open(resp.peer.sealer.seal_bytes(b"back"))) == b"back"
    with pytest.raises(Exception, match="tag"):  # each direction has its own key: no reflection
        init.peer.opener.open(init.peer.sealer.seal_bytes(b"mirror"))


def test_an_adjacency_hello_replayed_to_another_acceptor_proves_nothing() -> None:
    init = Adjacency(Handshake(True, um.DT, "n2", "net", 9, layer_psk(KEY), 0.0))
    first = acceptor()
    wire: list[bytes] = []
    pump(init, first, wire)
    second = acceptor()
    second.receive(wire[0], 0.0)  # the recorded hello
    second.pop_out()
    second.receive(wire[2], 0.0)  # and the recorded proof: bound to the first acceptor's nonce
    assert second.state is AdjState.FAILED and second.error is not None and second.error.code == "EPERM"


@pytest.mark.parametrize("key", [KEY, None], ids=["keyed", "open"])
def test_an_address_bound_to_a_member_key_is_taken_only_with_that_key(key: str | None) -> None:
    """Whoever connects must sign the handshake with its member key, and an address bound to a key
    (by its LSUs) goes only to that key: in an open layer too, no one takes a live member's address."""
    owner, rogue = Identity.generate(), Identity.generate()
    psk = layer_psk(key) if key else None

    def responder() -> Adjacency:
        return Adjacency(Handshake(False, "", "n1", "net", 5, psk, 0.0, owner_of={9: owner.pub}.get))

    for ident, up in ((rogue, False), (owner, True)):
        init, resp = Adjacency(Handshake(True, um.DT, "n2", "net", 9, psk, 0.0, identity=ident)), responder()
        pump(init, resp)
        assert (resp.state is AdjState.UP) == up, resp.error
        if not up:
            assert resp.error is not None and "address 9 belongs to another member key" in resp.error.text
    init, resp = Adjacency(Handshake(True, um.DT, "n2", "net", 9, psk, 0.0, identity=owner)), responder()
    wire: list[bytes] = []
    pump(init, resp, wire)
    forged = um.CODEC.encode(dataclasses.replace(um.CODEC.decode(wire[2]).msg, sig=rogue.sign(b"initiator")))
    again = responder()
    again.receive(wire[0], 0.0)
    again.pop_out()  # a new nonce: the recorded proof is for another handshake anyway
    again.receive(forged, 0.0)
    assert again.state is AdjState.FAILED and again.error is not None and again.error.code == "EPERM"


def test_an_acceptor_waits_briefly_for_the_first_hello_then_the_whole_handshake() -> None:
    """A flow opened and left silent holds a greeting FIRST_HELLO s; one that speaks has TIMEOUT."""
    silent = acceptor()
    assert silent.silent and silent.get_timer() == FIRST_HELLO
    silent.handle_timer(FIRST_HELLO)
    assert silent.state is AdjState.FAILED and silent.error is not None and silent.error.code == "ETIMEDOUT"
    init, resp = Adjacency(Handshake(True, um.DT, "n2", "net", 9, layer_psk(KEY), 0.0)), acceptor()
    resp.receive(init.pop_out()[0], 1.0)
    assert not resp.silent and resp.get_timer() == TIMEOUT


@pytest.mark.parametrize(("layer", "addr", "why"), [("other", 9, "not 'net'"), ("net", 5, "itself")])
def test_an_adjacency_from_another_layer_or_from_itself_is_refused(layer: str, addr: int, why: str) -> None:
    init = Adjacency(Handshake(True, um.MGMT, "n2", layer, addr, layer_psk(KEY), 0.0))
    resp = acceptor()
    pump(init, resp)
    assert resp.error is not None and why in resp.error.text
    assert init.error is not None and init.state is AdjState.FAILED


def test_garbage_in_a_handshake_fails_it_without_raising() -> None:
    resp = acceptor()
    resp.receive(b"\x00" * 40, 0.0)
    assert resp.error is not None and resp.error.code == "EPROTO" and resp.state is AdjState.FAILED
    resp2 = acceptor()
    resp2.receive(
        um.CODEC.encode(dataclasses.replace(um.Hello(um.DT, "x", "net", 9), nonce=b"\x01" * 3, eph=b"\x02" * 32)), 0.0
    )
    assert resp2.error is not None and resp2.error.code == "EPROTO"


def test_neighbours_table_tracks_links_per_component() -> None:
    nbs = Neighbours()
    assert nbs.add(5, "n1", um.MGMT, "m1") is None
    assert nbs.add(5, "n1", um.DT, "d1") is None
    assert nbs.add(5, "n1", um.DT, "d2") == "d1"  # replaced: the caller closes it
    assert nbs.with_link(um.DT) == {5: "d2"} and len(nbs) == 1
    assert nbs.remove(5, um.DT, "d1") is None  # not that flow any more
    assert nbs.remove(5, um.DT) == "d2" and nbs.remove(5, um.MGMT) == "m1"
    assert len(nbs) == 0 and nbs.get(5) is None


def test_auto_connect_goes_to_the_enroller_first_then_to_higher_addresses_and_retries_later() -> None:
    auto = AutoConnect(0.0, most=2, retry=10.0)
    nbs = Neighbours()
    assert auto.get_timer() is None  # off until asked
    auto.enabled = True
    assert auto.handle_timer(0.0, 50, "n1", nbs, {}) == "n1"
    assert auto.get_timer() is None  # busy until done()
    auto.done("n1", False, 0.0)
    assert auto.handle_timer(1.0, 50, "n1", nbs, {}) is None  # n1 failed: not before 10 s
    assert auto.handle_timer(10.0, 50, "n1", nbs, {}) == "n1"
    auto.done("n1", True, 10.0)
    nbs.add(7, "n1", um.DT, "d")
    names = {7: "n1", 40: "low", 60: "high", 70: "higher"}
    assert auto.handle_timer(11.0, 50, "n1", nbs, names) == "high"  # lower addresses connect to us
    auto.done("high", True, 11.0)
    nbs.add(60, "high", um.DT, "d")
    assert auto.handle_timer(12.0, 50, "n1", nbs, names) is None  # at most 2 neighbours
