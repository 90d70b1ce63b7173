"""Fuzzed unicast layer: the handshake's SDUs bent at the byte level, and every management message
(directory, flow allocator, LSUs, congestion updates) with hostile but well-typed values (edge and
negative numbers, huge lists, empty and oversized keys), signed where the receiver checks a
signature so the fuzz goes past it. Each component takes them or refuses with its declared error
(auth.Forged, handshake.Refused), and its state stays within its bounds.
"""

from __future__ import annotations

import dataclasses
import random

from fuzzing import cases, only_raises
from test_fuzz_control import _frames

from ipcp.unicast import auth, ca
from ipcp.unicast import messages as um
from ipcp.unicast.connmgr import Adjacency
from ipcp.unicast.dir import MAX_ENTRIES, Directory
from ipcp.unicast.fa import FlowAllocator
from ipcp.unicast.handshake import Handshake, Refused
from ipcp.unicast.routing import MAX_MEMBERS, Lsdb
from transports.wire import WireError

PSK = auth.layer_psk("fuzz")
IDENTITIES = [auth.Identity.generate() for _ in range(3)]


def messages(seed: int, n: int) -> list[um.Message]:
    """Unicast messages with typed hostile values, as they come out of the codec."""
    out = []
    for frame in _frames(um.CODEC, seed, n):
        try:
            out.append(um.CODEC.decode(frame).msg)
        except WireError:
            continue
    return out


def _signed(rng: random.Random, msg: um.Message) -> um.Message:
    """The message signed by one of our identities (as its src's key), so the receiver gets past the check."""
    ident = rng.choice(IDENTITIES)
    if isinstance(msg, um.Lsu):
        msg = dataclasses.replace(msg, key=ident.pub)
    elif isinstance(msg, um.DhtStore):
        msg = dataclasses.replace(msg, pub=ident.pub)
    if hasattr(msg, "sig") and rng.random() < 0.8:
        msg = dataclasses.replace(msg, sig=ident.sign(um.signed_part(msg)))  # type: ignore[type-var]
    return msg


def test_components_take_hostile_messages_or_refuse_them() -> None:
    rng = random.Random(101)
    d, fa, lsdb, sender = Directory(1), FlowAllocator(1, 1 << 32, lambda addr: True), Lsdb(1), ca.Sender(0.0)
    now = 0.0
    for msg in messages(102, 4000):
        now += rng.choice((0.0, 0.5, 30.0))
        msg = _signed(rng, msg)
        match msg:
            case um.DhtStore() | um.DhtFind() | um.DhtFound():
                only_raises(d.receive, msg, auth.Forged, now)
                d.handle_timer(now)
            case um.FaReq() | um.FaReply() | um.FaDealloc():
                fa.receive(msg, now)
                fa.handle_timer(now)
                fa.events.clear()
            case um.Lsu():
                only_raises(lsdb.receive, msg, auth.Forged, now)
                lsdb.handle_timer(now)
            case um.FlowUpdate():
                sender.on_update(ca.Update(msg.ece, msg.rate), now)
                assert sender.admit(1500, now) >= 0.0
    assert d.size <= MAX_ENTRIES and len(lsdb.db) <= MAX_MEMBERS


def test_bent_handshake_sdus_are_taken_or_refused() -> None:
    initiator = Adjacency(Handshake(True, um.ENROLL, "n1", "net", 4, PSK, 0.0))
    hello = initiator.pop_out()[0]
    corpus = [hello, um.CODEC.encode(um.Proof(b"\0" * 32)), um.CODEC.encode(um.Refuse(um.E_AUTH, "no"))]
    corpus += [um.CODEC.encode(msg) for msg in messages(103, 300) if isinstance(msg, um.Hello | um.Proof)]
    for sdu in cases(104, corpus, 2000):
        responder = Adjacency(Handshake(False, "", "n2", "net", 9, PSK, 0.0))
        only_raises(responder.receive, sdu, Refused, 0.0)
        if not responder.done:  # it answered our hello: a second bent SDU meets the next state
            only_raises(responder.receive, sdu[::-1], Refused, 0.0)
