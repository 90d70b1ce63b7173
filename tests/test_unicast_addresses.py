"""Addresses a peer names, sans-IO: negative ones, ones wider than any layer's (8 bytes) or than
this layer's are refused where they enter (the codec, an LSU, a hello), signed or not, before a
component hashes, routes or packs them; a directory re-storing one key keeps one expiry for it;
an enrollee's address draw ends whatever member list its enroller claims.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.dir import Directory
from ipcp.unicast.handshake import Handshake
from ipcp.unicast.ipcp import _free_address
from ipcp.unicast.routing import Lsdb
from proto.qos import QosSpec
from transports.channel import HandlerError
from transports.wire import WireError

ME, ROGUE = 1, 0xFEED
WIDE, NEGATIVE = 1 << 64, -7


def unchecked(cls: type[Any], **fields: Any) -> Any:
    """A message as a peer may put it on the wire: its fields as given, none checked."""
    msg = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in fields:
            setattr(msg, f.name, fields[f.name])
        elif f.default is not dataclasses.MISSING:
            setattr(msg, f.name, f.default)
        else:
            setattr(msg, f.name, f.default_factory())  # type: ignore[operator]
    return msg


def decoded(frame: bytes) -> Any:
    return um.CODEC.decode(frame).msg


def signed(ident: auth.Identity, cls: type[Any], **fields: Any) -> bytes:
    """The frame of a message signed as its member signs it (its encoding with sig empty)."""
    part = um.CODEC.encode(unchecked(cls, **{**fields, "sig": b""}))
    return um.CODEC.encode(unchecked(cls, **{**fields, "sig": ident.sign(part)}))


@pytest.mark.parametrize("bad", [WIDE, NEGATIVE, 1 << 70])
@pytest.mark.parametrize(
    ("cls", "fields", "where"),
    [
        (um.Lsu, {"src": ROGUE, "seqno": 1, "neighbours": [ME]}, "neighbours"),
        (um.Lsu, {"src": ROGUE, "seqno": 1, "neighbours": [ME]}, "src"),
        (um.Hello, {"component": um.DT, "name": "rogue"}, "addr"),
        (um.DhtStore, {"src": ROGUE, "key": b"k", "addr": ROGUE, "ttl": 60.0}, "addr"),
        (um.DhtFind, {"src": ROGUE, "key": b"k", "cookie": 1}, "src"),
        (um.FaReq, {"src": ROGUE, "s_eid": 1, "hash": b"h", "qos": QosSpec()}, "src"),
        (um.EnrollInfo, {"layer": "net", "conf": {}}, "members"),
    ],
)
def test_the_codec_refuses_what_is_no_address(cls: type[Any], fields: dict[str, Any], where: str, bad: int) -> None:
    value = [ME, bad] if where in ("neighbours", "members") else bad
    frame = um.CODEC.encode(unchecked(cls, **{**fields, where: value}))
    with pytest.raises(WireError):
        um.CODEC.decode(frame)
    assert um.CODEC.decode(um.CODEC.encode(unchecked(cls, **fields))).msg  # the same without it passes


def test_an_lsu_naming_an_address_wider_than_the_layer_is_refused_signed_or_not() -> None:
    lsdb, directory = Lsdb(ME, max_addr=0xFFFF), Directory(ME)
    lsdb.set_neighbours({ROGUE}, 0.0)
    rogue, other = auth.Identity.generate(), auth.Identity.generate()
    for lsu in (
        signed(rogue, um.Lsu, src=ROGUE, seqno=1, neighbours=[ME, 0x10000], name="rogue", key=rogue.pub),
        signed(other, um.Lsu, src=0x10000, seqno=1, neighbours=[ROGUE], name="x", key=other.pub),
        signed(other, um.Lsu, src=ROGUE + 1, seqno=1, neighbours=[0], name="y", key=other.pub),
    ):
        assert lsdb.receive(decoded(lsu), 1.0) is False
    assert lsdb.refused == 3
    good = signed(rogue, um.Lsu, src=ROGUE, seqno=2, neighbours=[ME], name="rogue", key=rogue.pub)
    assert lsdb.receive(decoded(good), 1.0) is True  # the member itself is still heard
    directory.set_members(set(lsdb.table()) | {ME}, 1.0)
    assert directory.members == {ME, ROGUE}


@pytest.mark.parametrize(("component", "addr"), [(um.DT, 0x10000), (um.MGMT, 0x10000), (um.DT, 0), (um.MGMT, 0)])
def test_a_hello_from_no_address_of_the_layer_is_refused(component: str, addr: int) -> None:
    responder = Handshake(False, "", "n1", "net", ME, None, 0.0, max_addr=0xFFFF)
    responder.receive(um.CODEC.encode(um.Hello(component, "rogue", "net", addr)), 0.0)
    assert responder.peer is None and responder.error is not None and "no address of this layer" in responder.error.text
    ok = Handshake(False, "", "n1", "net", ME, None, 0.0, max_addr=0xFFFF)
    whole = um.Hello(component, "rogue", "net", 0xFFFF, b"\x01" * auth.NONCE, pub=auth.Identity.generate().pub)
    ok.receive(um.CODEC.encode(whole), 0.0)
    assert ok.error is None


def test_a_key_stored_again_and_again_keeps_one_expiry() -> None:
    rogue = auth.Identity.generate()
    d = Directory(ME)
    d.set_members({ME, ROGUE}, 0.0)
    d.bindings.admit(ROGUE, "rogue", rogue.pub)
    for seq in range(1, 2001):
        frame = signed(rogue, um.DhtStore, src=ROGUE, key=b"\x42" * 32, addr=ROGUE, ttl=86400.0, seq=seq, pub=rogue.pub)
        d.receive(decoded(frame), seq * 1e-3)
    assert d.size == 1 and len(d._schedule) == 1
    gone = signed(rogue, um.DhtStore, src=ROGUE, key=b"\x42" * 32, addr=ROGUE, ttl=0.0, seq=5000, pub=rogue.pub)
    d.receive(decoded(gone), 3.0)
    assert d.size == 0 and len(d._schedule) == 0


def test_an_address_is_drawn_even_from_a_nearly_full_space_and_none_from_a_full_one() -> None:
    with pytest.raises(HandlerError, match="no free address"):
        _free_address(set(range(1, 256)), 255)
    with pytest.raises(HandlerError, match="no free address"):
        _free_address(set(range(0, 300)), 255)  # what lies outside the space takes none of it
    assert _free_address(set(range(1, 256)) - {77}, 255) == 77
    assert 1 <= _free_address({1 << 40, 0}, 255) <= 255
