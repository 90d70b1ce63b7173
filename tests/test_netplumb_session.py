"""netplumb sessions, sans-IO: mutual authentication, encryption, and every way it must fail."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.netplumb import wire
from apps.netplumb.keys import Identity
from apps.netplumb.session import (
    AEGIS256,
    CHACHA20_POLY1305,
    Aead,
    ClientSession,
    Established,
    Event,
    Message,
    PeerError,
    ServerKey,
    ServerSession,
    Session,
    SessionError,
    State,
    session_keys,
)
from apps.netplumb.wire import Fields, Packet

CLIENT, SERVER = Identity.generate(), Identity.generate()
CHARS = st.characters(blacklist_characters="\0", blacklist_categories=["Cs"])


def pair(
    client: Identity = CLIENT,
    server: Identity = SERVER,
    allowed: bytes | None = None,
    check: Callable[[bytes], object] = lambda key: None,
    offer: tuple[Aead, ...] | None = None,
    take: tuple[Aead, ...] | None = None,
) -> tuple[ClientSession, ServerSession]:
    allowed = client.public if allowed is None else allowed
    c = ClientSession(client, check, offer)
    s = ServerSession(server, lambda key: None if key == allowed else "not authorized", take)
    return c, s


def shuttle(a: Session, b: Session) -> list[Event]:
    """Deliver what a queued to b; b's events."""
    events: list[Event] = []
    for data in a.data_to_send():
        events += b.receive(data)
    return events


def handshake(c: ClientSession, s: ServerSession) -> None:
    c.start()
    assert shuttle(c, s) == []
    assert shuttle(s, c) == [ServerKey(SERVER.public)]
    assert shuttle(c, s) == [Established(CLIENT.public)]
    assert shuttle(s, c) == [Established(SERVER.public)]


def test_handshake_authenticates_both_ends() -> None:
    c, s = pair()
    handshake(c, s)
    assert c.state is s.state is State.ESTABLISHED
    assert c.peer == SERVER.public and s.peer == CLIENT.public


def test_messages_both_ways_after_the_handshake() -> None:
    c, s = pair()
    handshake(c, s)
    got = s.receive(c.send(wire.START, Fields.of(arg="echo")))
    assert got == [Message(wire.START, Fields.of(arg="echo"))]
    assert c.receive(s.send(wire.EXIT, Fields.of(status=7))) == [Message(wire.EXIT, Fields.of(status=7))]


def test_packets_from_type_10_are_encrypted() -> None:
    c, s = pair()
    handshake(c, s)
    data = c.send(wire.DATA, Fields.of(ch=0, data=wire.b64(b"secret-plaintext")))
    assert wire.b64(b"secret-plaintext").encode() not in data
    assert b"ch\0" not in data
    assert wire.decode(data).type == wire.DATA


def test_session_keys_are_blake2b_512_of_the_secret_and_transcript_personalised() -> None:
    shared, transcript = bytes(range(32)), b"hello" * 40
    okm = hashlib.blake2b(shared + transcript, digest_size=64, person=b"netplumb-v1 keys").digest()
    assert session_keys(shared, transcript) == (okm[:32], okm[32:])


def test_each_connection_gets_a_fresh_session_key() -> None:
    c1, s1 = pair()
    c2, s2 = pair()
    handshake(c1, s1)
    handshake(c2, s2)
    assert c1._tx is not None and c2._tx is not None
    assert c1._tx.key != c2._tx.key
    with pytest.raises(SessionError, match="authentication"):
        s2.receive(c1.send(wire.START, Fields.of(arg="x")))


def test_unauthorized_client_is_refused_and_told_why() -> None:
    c, s = pair(allowed=Identity.generate().public)
    c.start()
    shuttle(c, s)
    shuttle(s, c)
    with pytest.raises(SessionError, match="not authorized"):
        shuttle(c, s)
    assert s.state is State.CLOSED
    assert shuttle(s, c) == [PeerError("not authorized")]


def test_client_without_the_private_key_is_refused() -> None:
    """A client claiming an authorized public key it cannot sign for."""
    c, s = pair()
    impostor = Identity.generate()
    c.identity = impostor
    c.start()
    shuttle(c, s)
    shuttle(s, c)
    # Rewrite the AUTH to claim CLIENT's key, signed by the impostor.
    auth = c.data_to_send()[0]
    assert c._tx is not None
    c._tx.counter -= 1
    c._enc.seq -= 1
    forged = c._packet(wire.AUTH, Fields.of(key=wire.b64(CLIENT.public), sig=wire.b64(impostor.sign(b"whatever"))))
    assert forged != auth
    with pytest.raises(SessionError, match="prove"):
        s.receive(forged)


def test_server_without_the_private_key_is_refused() -> None:
    """A man in the middle presenting the real server's public key with its own signature."""
    c, s = pair(server=Identity.generate())
    c.start()
    shuttle(c, s)
    reply = wire.decode(s.data_to_send()[0])
    fields = wire.decode_pairs(reply.payload)
    forged = Fields.of(*((k, wire.b64(SERVER.public) if k == "key" else v) for k, v in fields.text()))
    with pytest.raises(SessionError, match="prove"):
        c.receive(wire.encode(Packet(reply.seq, reply.type, wire.encode_pairs(forged))))


# -- the cipher ---------------------------------------------------------------------------------

needs_aegis = pytest.mark.skipif(AEGIS256 is None, reason="this libsodium has no AEGIS-256")
BOTH = tuple(a for a in (AEGIS256, CHACHA20_POLY1305) if a is not None)


@pytest.mark.parametrize(
    "offer, take, agreed",
    [
        (BOTH, BOTH, BOTH[0]),  # the client's preference
        (BOTH, (CHACHA20_POLY1305,), CHACHA20_POLY1305),  # a server without AES instructions
        ((CHACHA20_POLY1305,), BOTH, CHACHA20_POLY1305),
        (BOTH[::-1], BOTH, CHACHA20_POLY1305),
    ],
)
def test_the_cipher_is_the_clients_first_choice_the_server_takes(
    offer: tuple[Aead, ...], take: tuple[Aead, ...], agreed: Aead
) -> None:
    c, s = pair(offer=offer, take=take)
    handshake(c, s)
    assert c._tx is not None and s._tx is not None and c._tx.aead is s._tx.aead is agreed
    got = s.receive(c.send(wire.START, Fields.of(arg="echo")))
    assert got == [Message(wire.START, Fields.of(arg="echo"))]


@needs_aegis
def test_no_cipher_in_common_is_refused_in_clear_with_the_reason() -> None:
    assert AEGIS256 is not None
    c, s = pair(offer=(AEGIS256,), take=(CHACHA20_POLY1305,))
    c.start()
    with pytest.raises(SessionError, match="no cipher in common"):
        shuttle(c, s)
    (refusal,) = s.data_to_send()
    assert wire.decode(refusal).type == wire.REFUSE
    assert c.receive(refusal) == [
        PeerError("no cipher in common: the client offers 'aegis256'; this server takes chacha20-poly1305")
    ]


def test_a_cipher_the_client_did_not_offer_is_refused() -> None:
    c, s = pair(offer=(CHACHA20_POLY1305,))
    c.start()
    shuttle(c, s)
    reply = wire.decode(s.data_to_send()[0])
    fields = wire.decode_pairs(reply.payload)
    forged = Fields.of(*((k, "rot13" if k == "cipher" else v) for k, v in fields.text()))
    with pytest.raises(SessionError, match="did not offer"):
        c.receive(wire.encode(Packet(reply.seq, reply.type, wire.encode_pairs(forged))))


@needs_aegis
def test_an_offer_changed_on_the_way_breaks_the_servers_proof() -> None:
    """A man in the middle striking the client's fast cipher from its hello: the server's signature
    covers the offer it saw, so the client notices."""
    c, s = pair(take=BOTH)
    c.start()
    hello = wire.decode(c.data_to_send()[0])
    fields = wire.decode_pairs(hello.payload)
    stripped = Fields.of(*((k, v) for k, v in fields.text() if v != "aegis256"))
    s.receive(wire.encode(Packet(hello.seq, hello.type, wire.encode_pairs(stripped))))
    with pytest.raises(SessionError, match="prove"):
        shuttle(s, c)


def test_a_refusal_in_clear_is_not_taken_once_the_server_proved_its_key() -> None:
    """REFUSE, in clear, answers a hello. Once the server has proved its key, whatever it says is sealed
    (ERROR): a REFUSE then is anyone's on the way, and is not shown as the server's words."""
    c, s = pair()
    c.start()
    shuttle(c, s)
    shuttle(s, c)
    assert c.state is State.AUTH_SENT
    forged = wire.encode(Packet(1, wire.REFUSE, wire.encode_pairs(Fields.of(message="key revoked: run evil"))))
    with pytest.raises(SessionError, match="unexpected REFUSE packet in state auth sent"):
        c.receive(forged)
    c, s = pair()
    c.start()
    shuttle(c, s)
    shuttle(s, c)
    c.data_to_send()  # AUTH, lost: the server's own reason after keys, sealed, is still heard
    assert c.receive(s.error("too many sessions")) == [PeerError("too many sessions")]


def test_a_hello_without_ciphers_is_refused() -> None:
    c, s = pair(offer=())
    c.start()
    with pytest.raises(SessionError, match="no cipher in common: the client offers none"):
        shuttle(c, s)


def test_host_check_can_refuse_the_server_key() -> None:
    def refuse(key: bytes) -> None:
        raise SessionError("the key of 'host2' has CHANGED")

    c, s = pair(check=refuse)
    c.start()
    shuttle(c, s)
    with pytest.raises(SessionError, match="CHANGED"):
        shuttle(s, c)
    assert c.state is State.CLOSED and c.data_to_send() == []  # nothing authenticating us was sent


def test_tampered_ciphertext_ends_the_session() -> None:
    c, s = pair()
    handshake(c, s)
    data = bytearray(c.send(wire.DATA, Fields.of(ch=0, data="AAAA")))
    data[20] ^= 1
    body = bytes(data[12:])  # keep the CRC right, so only the AEAD can notice
    data[8:12] = __import__("zlib").crc32(body).to_bytes(4, "big")
    with pytest.raises(SessionError, match="tampered"):
        s.receive(bytes(data))
    assert s.state is State.CLOSED
    with pytest.raises(SessionError):
        s.receive(c.send(wire.DATA, Fields.of(ch=0, data="AAAA")))


def test_changed_packet_type_fails_authentication() -> None:
    c, s = pair()
    handshake(c, s)
    p = wire.decode(c.send(wire.DATA, Fields.of(ch=0, data="AAAA")))
    with pytest.raises(SessionError, match="authentication"):
        s.receive(wire.encode(Packet(p.seq, wire.EOF, p.payload)))


def test_replayed_packet_ends_the_session() -> None:
    c, s = pair()
    handshake(c, s)
    data = c.send(wire.DATA, Fields.of(ch=0, data="AAAA"))
    s.receive(data)
    with pytest.raises(SessionError, match="sequence"):
        s.receive(data)


def test_dropped_packet_ends_the_session() -> None:
    c, s = pair()
    handshake(c, s)
    c.send(wire.DATA, Fields.of(ch=0, data="AAAA"))
    with pytest.raises(SessionError, match="sequence"):
        s.receive(c.send(wire.DATA, Fields.of(ch=0, data="BBBB")))


def test_sequence_rollover_keeps_working() -> None:
    c, s = pair()
    handshake(c, s)
    for i in range(wire.SEQ_MODULO + 5):
        if i % 4096 == 0 or i > wire.SEQ_MODULO - 3:
            assert s.receive(c.send(wire.WINDOW, Fields.of(ch=1, n=i)))[0].fields.int("n") == i  # type: ignore[union-attr]
        else:
            s.receive(c.send(wire.WINDOW, Fields.of(ch=1, n=i)))


def test_encrypted_packet_before_the_handshake_is_refused() -> None:
    _, s = pair()
    with pytest.raises(SessionError, match="before any key"):
        s.receive(wire.encode(Packet(0, wire.START, b"x" * 32)))


def test_plain_data_packet_after_handshake_is_refused() -> None:
    c, s = pair()
    handshake(c, s)
    with pytest.raises(SessionError):
        s.receive(wire.encode(Packet(3, wire.HELLO, wire.encode_pairs([("version", "1")]))))


def test_version_mismatch_is_refused() -> None:
    _, s = pair()
    with pytest.raises(SessionError, match="version"):
        s.receive(wire.encode(Packet(0, wire.HELLO, wire.encode_pairs([("version", "9"), ("eph", "")]))))


def test_cannot_send_before_established() -> None:
    c, _ = pair()
    with pytest.raises(SessionError, match="cannot send"):
        c.send(wire.DATA, Fields.of(ch=0, data=""))


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_fuzz_server_garbage_only_raises_session_error(data: bytes) -> None:
    _, s = pair()
    with contextlib.suppress(SessionError):
        s.receive(data)


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.text(CHARS, min_size=1, max_size=8), st.text(CHARS, max_size=40)), max_size=6),
    st.integers(0, 255),
)
def test_fuzz_well_framed_garbage_only_raises_session_error(pairs: list[tuple[str, str]], ptype: int) -> None:
    _, s = pair()
    with contextlib.suppress(SessionError, wire.WireError):
        s.receive(wire.encode(Packet(0, ptype, wire.encode_pairs(pairs))))
