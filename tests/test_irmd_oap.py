"""The IRMd's OAP (irmd.oap) between two IRMds' worth of state, without sockets: the allocating
side's request and completion, the accepting side's checks and answer, identities (CA chains,
client certificates), encryption policy and negotiation, and every refusal."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pki import Pki, certificate, new_key

from irmd.oap import Oap, Outcome, Startups
from irmd.reg import Registry
from proto import messages as m
from proto import oap
from proto.errors import FlowError
from proto.qos import QosSpec, raw
from transports.ratelog import RateLog

T0 = 1_800_000_000_000_000_000
MS = 1_000_000
ENCRYPT = QosSpec(cypher_s=256)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "server-side")


@pytest.fixture
def client_pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "client-side", "Client Root CA")


def irmds(clock: Clock, client: Pki, server: Pki) -> tuple[Oap, Oap]:
    return Oap(base=client.base, clock=clock), Oap(base=server.base, clock=clock)


def allocate(
    client: Oap, server: Oap, name: str = "pong", qos: QosSpec = raw, cypher_s: int = 0
) -> tuple[Outcome, Outcome]:
    attempt = client.request(name, qos)
    answer, served = server.serve(name, attempt.data, cypher_s)
    return client.complete(attempt, answer), served


# -- the plain exchange ------------------------------------------------------------------------------


def test_a_plain_allocation_is_36_bytes_out_84_back_and_establishes_nothing(
    clock: Clock, pki: Pki, client_pki: Pki
) -> None:
    client, server = irmds(clock, client_pki, pki)
    attempt = client.request("pong", raw)
    answer, served = server.serve("pong", attempt.data)
    assert (len(attempt.data), len(answer)) == (36, 84)
    assert client.complete(attempt, answer) == served == Outcome()


def test_every_attempt_has_a_fresh_id_and_timestamp(clock: Clock) -> None:
    client = Oap(clock=clock)
    a = client.request("pong", raw)
    clock.now += 1
    b = client.request("pong", raw)
    assert a.request.id != b.request.id and a.request.timestamp != b.request.timestamp


def test_joining_a_broadcast_layer_carries_no_oap_as_in_0_23(clock: Clock) -> None:
    client = Oap(clock=clock)
    attempt = client.request("bcast", raw, join=True)
    assert attempt.data == b"" and client.complete(attempt, b"") == Outcome()


def test_a_replayed_request_is_refused_with_eauth(clock: Clock) -> None:
    client, server = Oap(clock=clock), Oap(clock=clock)
    attempt = client.request("pong", raw)
    server.serve("pong", attempt.data)
    clock.now += 10 * MS
    with pytest.raises(FlowError, match="replay") as e:
        server.serve("pong", attempt.data)
    assert e.value.code == oap.EAUTH


def test_a_request_this_irmd_made_for_a_local_flow_takes_no_room_in_the_replay_memory(clock: Clock) -> None:
    """A local user's allocations cannot fill the memory every remote peer's requests need."""
    client, server = Oap(clock=clock), Oap(clock=clock)
    server.replay.cap = 2
    for _ in range(5):
        server.serve("pong", client.request("pong", raw).data, replay=False)
        clock.now += MS
    assert len(server.replay) == 0
    server.serve("pong", client.request("pong", raw).data)  # a peer's request is remembered, and fits
    assert len(server.replay) == 1


def test_a_stale_request_is_refused(clock: Clock) -> None:
    attempt = Oap(clock=clock).request("pong", raw)
    clock.now += 21_000 * MS
    with pytest.raises(FlowError, match="too old"):
        Oap(clock=clock).serve("pong", attempt.data)


@pytest.mark.parametrize("data", [b"x" * 35, bytes(36) + b"!"])
def test_a_malformed_request_is_refused(clock: Clock, data: bytes) -> None:
    with pytest.raises(FlowError) as e:
        Oap(clock=clock).serve("pong", data)
    assert e.value.code == oap.EAUTH


def test_a_response_to_another_request_fails_the_allocation(clock: Clock) -> None:
    client, server = Oap(clock=clock), Oap(clock=clock)
    mine, other = client.request("pong", raw), client.request("pong", raw)
    answer, _ = server.serve("pong", other.data)
    with pytest.raises(FlowError, match="does not match"):
        client.complete(mine, answer)


# -- encryption ----------------------------------------------------------------------------------------


def test_an_application_asking_for_encryption_gets_the_same_key_at_both_ends(
    clock: Clock, pki: Pki, client_pki: Pki
) -> None:
    client, server = irmds(clock, client_pki, pki)
    got, served = allocate(client, server, qos=ENCRYPT)
    assert got.key == served.key and len(got.key) == 32
    assert got.cipher == served.cipher == 901  # AES-256-GCM
    assert got.seq_iv and served.seq_iv  # both ends ours: numbered IVs, replays refused
    reply = got.reply(m.FlowReply(1, "l", 1500, raw))
    assert reply.qos.cypher_s == 256 and reply.key == got.key


def test_each_allocation_gets_its_own_key(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    client, server = irmds(clock, client_pki, pki)
    assert allocate(client, server, qos=ENCRYPT)[0].key != allocate(client, server, qos=ENCRYPT)[0].key


@pytest.mark.parametrize(
    ("kex", "cipher", "kdf"),
    [
        ("prime256v1", "aes-256-gcm", "sha256"),
        ("secp384r1", "chacha20-poly1305", "sha384"),
        ("secp521r1", "aes-128-gcm", "sha512"),
        ("X448", "aes-192-gcm", "sha3-256"),
        ("X25519", "aes-256-ctr", "blake2b512"),
    ],
)
def test_a_client_enc_conf_chooses_the_exchange(
    clock: Clock, pki: Pki, client_pki: Pki, kex: str, cipher: str, kdf: str
) -> None:
    client_pki.enc_conf("pong", f"kex={kex}\ncipher={cipher}\nkdf={kdf}\n", role="client")
    client, server = irmds(clock, client_pki, pki)
    got, served = allocate(client, server)  # no cypher_s: the name's enc.conf asks for it
    assert got.key == served.key and oap.CIPHERS[got.cipher] == cipher


def test_the_server_picks_the_stronger_cipher_and_the_client_takes_it(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    pki.enc_conf("pong", "cipher=chacha20-poly1305\n")
    client_pki.enc_conf("pong", "cipher=aes-128-gcm\n", role="client")
    client, server = irmds(clock, client_pki, pki)
    got, served = allocate(client, server)
    assert got.cipher == served.cipher == 1018


def test_a_cypher_s_of_256_raises_a_weaker_configured_cipher(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    client_pki.enc_conf("pong", "cipher=aes-128-gcm\n", role="client")
    client, server = irmds(clock, client_pki, pki)
    assert allocate(client, server)[0].cipher == 895  # what the name's enc.conf asks
    assert allocate(client, server, qos=ENCRYPT)[0].cipher == 901  # what the application asks
    pki.enc_conf("pong", "cipher=aes-128-gcm\n")
    assert allocate(client, server, qos=QosSpec(cypher_s=128), cypher_s=256)[1].cipher == 901  # the acceptor's


def test_a_server_with_an_enc_conf_refuses_plain_requests(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    pki.enc_conf("pong", "")  # empty: encryption with 0.23's defaults
    client, server = irmds(clock, client_pki, pki)
    with pytest.raises(FlowError, match="requires encryption") as e:
        allocate(client, server)
    assert e.value.code == oap.ECRYPT
    assert allocate(client, server, qos=ENCRYPT)[1].cipher == 901


def test_an_accepting_process_that_asks_for_encryption_refuses_plain_requests(clock: Clock) -> None:
    client, server = Oap(clock=clock), Oap(clock=clock)
    with pytest.raises(FlowError, match="requires encryption"):
        allocate(client, server, cypher_s=256)
    assert allocate(client, server, qos=ENCRYPT, cypher_s=256)[1].cipher


def test_a_client_weaker_than_the_servers_key_exchange_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    pki.enc_conf("pong", "kex=secp384r1\n")
    client, server = irmds(clock, client_pki, pki)
    with pytest.raises(FlowError, match="weaker") as e:
        allocate(client, server, qos=ENCRYPT)  # X25519 ranks below P-384 in 0.23
    assert e.value.code == oap.ECRYPT


def test_a_response_that_drops_the_key_exchange_is_refused(clock: Clock) -> None:
    client = Oap(clock=clock)
    attempt = client.request("pong", ENCRYPT)
    req = oap.decode(attempt.data)
    plain = oap.encode(req.id, clock(), req_hash=oap.request_hash(req))  # an answer as if plain
    with pytest.raises(FlowError, match="key exchange") as e:
        client.complete(attempt, plain)
    assert e.value.code == oap.ECRYPT
    with pytest.raises(FlowError):
        client.complete(attempt, b"")  # no OAP at all: never a plain flow when encryption was asked


@pytest.mark.parametrize(
    "kex",
    [
        bytes(44),
        b"\x30\x03\x02\x01\x00",
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)[:-32]
        + bytes(32),  # the all-zero (low-order) X25519 key
        new_key("ed25519").public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        .replace(bytes.fromhex("06032b656e"), bytes.fromhex("06032b657f")),  # an algorithm OID nobody has
    ],
    ids=["zeros", "truncated-der", "low-order-x25519", "ed25519-not-kex", "unknown-algorithm"],
)
def test_a_hostile_public_key_is_refused_with_ecrypt(clock: Clock, kex: bytes) -> None:
    req = oap.encode(b"i" * 16, clock(), cipher_nid=901, kdf_nid=672, md_nid=672, kex=kex)
    with pytest.raises(FlowError) as e:
        Oap(clock=clock).serve("pong", req)
    assert e.value.code == oap.ECRYPT


def test_kem_key_exchanges_are_refused_with_the_reason(clock: Clock) -> None:
    req = oap.encode(b"k" * 16, clock(), cipher_nid=901, kex=bytes(1216), kex_raw=True)
    with pytest.raises(FlowError, match="KEM"):
        Oap(clock=clock).serve("pong", req)


def test_an_unsupported_kex_in_enc_conf_fails_with_the_reason(clock: Clock, client_pki: Pki) -> None:
    client_pki.enc_conf("pong", "kex=ffdhe2048\n", role="client")
    with pytest.raises(FlowError, match="ffdhe2048 is not supported"):
        Oap(base=client_pki.base, clock=clock).request("pong", raw)


# -- server identities ------------------------------------------------------------------------------


def test_a_server_signs_its_response_and_the_client_verifies_the_chain(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, key = pki.issue("pong")
    pki.serve_as("pong", crt, key)
    client_pki.ca, client_pki.ca_key = pki.ca, pki.ca_key
    client_pki.trust()
    client, server = irmds(clock, client_pki, pki)
    got, _ = allocate(client, server, qos=ENCRYPT)
    assert got.peer_crt and got.peer_ca


def test_a_certificate_from_an_unknown_ca_reaches_the_client_unvouched(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, key = pki.issue("pong")
    pki.serve_as("pong", crt, key)
    client_pki.trust()  # its own root, not the server's
    client, server = irmds(clock, client_pki, pki)
    got, _ = allocate(client, server)
    assert got.peer_crt and not got.peer_ca  # flowlib's known names decide (tests/test_identity.py)


# -- fail closed: a name this host can verify must prove itself --------------------------------------


def _anonymous_server(pki: Pki, client_pki: Pki) -> None:
    """The client's CA store holds the CA that certifies `pong`; whoever answers has no certificate."""
    client_pki.ca, client_pki.ca_key = pki.ca, pki.ca_key
    client_pki.trust()


@pytest.mark.parametrize("how", ["application", "client enc.conf"])
def test_an_anonymous_answer_to_an_encrypted_flow_the_ca_store_could_verify_is_refused(
    clock: Clock, pki: Pki, client_pki: Pki, how: str
) -> None:
    _anonymous_server(pki, client_pki)
    if how == "client enc.conf":
        client_pki.enc_conf("pong", "", role="client")
    client, server = irmds(clock, client_pki, pki)
    with pytest.raises(
        FlowError,
        match=r"'pong' must prove itself \(the flow is encrypted and this IRMd's CA "
        r"store .* can verify it\), but its peer presented no certificate",
    ) as e:
        allocate(client, server, qos=ENCRYPT if how == "application" else raw)
    assert e.value.code == oap.EAUTH
    crt, key = pki.issue("pong")  # the real server, beside: certified, it is taken
    pki.serve_as("pong", crt, key)
    got, served = allocate(client, server, qos=ENCRYPT)
    assert got.peer_ca and got.key == served.key


def test_an_anonymous_answer_to_a_client_that_proves_itself_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    _anonymous_server(pki, client_pki)
    pki.trust()  # the server would verify alice
    crt, key = pki.issue("alice")
    client_pki.serve_as("pong", crt, key, role="client")
    with pytest.raises(FlowError, match="client certificate for it and this IRMd's CA store"):
        allocate(*irmds(clock, client_pki, pki))  # even a plain flow: mutual, or not at all


def test_anonymous_encryption_stays_where_nothing_is_expected(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    client, server = irmds(clock, client_pki, pki)  # no CA store on the client
    got, served = allocate(client, server, qos=ENCRYPT)
    assert got.cipher and got.key == served.key and not got.peer_crt
    client_pki.enc_conf("pong", "", role="client")  # a client enc.conf alone verifies nothing either
    assert allocate(client, server)[0].cipher
    (client_pki.base / "client" / "pong" / "enc.conf").unlink()
    _anonymous_server(pki, client_pki)
    assert allocate(client, server, qos=raw)[0] == Outcome()  # a plain flow expects nothing (docs/security)


def test_a_certificate_for_another_name_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, key = pki.issue("ping")
    pki.serve_as("pong", crt, key)
    client, server = irmds(clock, client_pki, pki)
    with pytest.raises(FlowError, match="for 'ping', not 'pong'") as e:
        allocate(client, server)
    assert e.value.code == oap.EAUTH


def test_a_tampered_signed_response_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, key = pki.issue("pong")
    pki.serve_as("pong", crt, key)
    client, server = irmds(clock, client_pki, pki)
    attempt = client.request("pong", ENCRYPT)
    answer, _ = server.serve("pong", attempt.data)
    hdr = oap.decode(answer, oap.decode(attempt.data).md_nid)
    at = len(answer) - len(hdr.sig) - len(hdr.req_hash) - 5  # a byte of the server's public key
    forged = answer[:at] + bytes([answer[at] ^ 1]) + answer[at + 1 :]
    with pytest.raises(FlowError, match="signature") as e:
        client.complete(attempt, forged)
    assert e.value.code == oap.EAUTH


def test_an_impostor_replaying_the_servers_certificate_cannot_sign(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, _ = pki.issue("pong")
    client = Oap(base=client_pki.base, clock=clock)
    attempt = client.request("pong", ENCRYPT)
    req = oap.decode(attempt.data)
    from cryptography.hazmat.primitives import serialization

    from irmd import kex

    der = crt.public_bytes(serialization.Encoding.DER)
    mine = kex.keypair(1034)
    impostor = oap.encode(req.id, clock(), cipher_nid=901, kdf_nid=672, md_nid=672, crt=der, kex=kex.public_der(mine),
                          req_hash=oap.request_hash(req), sign=lambda b: kex.sign(new_key(), 672, b))  # fmt: skip
    with pytest.raises(FlowError, match="signature"):
        client.complete(attempt, impostor)


@pytest.mark.parametrize("case", ["expired", "not-yet", "intermediate-not-ca", "self-signed-untrusted", "path-length"])
def test_chains_that_do_not_verify_leave_the_certificate_unvouched(
    clock: Clock, pki: Pki, client_pki: Pki, case: str
) -> None:
    client_pki.ca, client_pki.ca_key = pki.ca, pki.ca_key
    client_pki.trust()
    if case == "expired":
        crt, key = pki.issue("pong", days=0, start=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=5))
    elif case == "not-yet":
        crt, key = pki.issue("pong", start=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=2))
    elif case == "intermediate-not-ca":
        mid_key = new_key()
        mid = certificate("Not a CA", mid_key, (pki.ca, pki.ca_key))
        key = new_key()
        crt = certificate("pong", key, (mid, mid_key))
        client_pki.trust(mid, "mid.pem")
    elif case == "path-length":  # a CA that may sign no CA signed one, which signed the name's
        mid_key, sub_key, key = new_key(), new_key(), new_key()
        mid = certificate("Leaf-only CA", mid_key, (pki.ca, pki.ca_key), ca=True, path_length=0)
        sub = certificate("Sub CA", sub_key, (mid, mid_key), ca=True)
        crt = certificate("pong", key, (sub, sub_key))
        client_pki.trust(mid, "mid.pem")
        client_pki.trust(sub, "sub.pem")
    else:
        key = new_key()
        crt = certificate("pong", key)
    pki.serve_as("pong", crt, key)
    got, _ = allocate(*irmds(clock, client_pki, pki))
    assert got.peer_crt and not got.peer_ca


def test_a_ca_signs_names_within_its_path_length(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    mid_key, key = new_key(), new_key()
    mid = certificate("Leaf-only CA", mid_key, (pki.ca, pki.ca_key), ca=True, path_length=0)
    pki.serve_as("pong", certificate("pong", key, (mid, mid_key)), key)
    client_pki.trust(pki.ca)
    client_pki.trust(mid, "mid.pem")
    assert allocate(*irmds(clock, client_pki, pki))[0].peer_ca


def test_an_intermediate_ca_in_the_store_completes_the_chain(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    mid_key = new_key()
    mid = certificate("Issuing CA", mid_key, (pki.ca, pki.ca_key), ca=True)
    key = new_key("rsa")
    pki.serve_as("pong", certificate("pong", key, (mid, mid_key)), key)
    client_pki.trust(pki.ca)
    client_pki.trust(mid, "issuing.pem")
    got, _ = allocate(*irmds(clock, client_pki, pki), qos=ENCRYPT)
    assert got.peer_ca


@pytest.mark.parametrize("how", ["writable by others", "another user's"])
def test_a_ca_another_user_could_have_put_in_the_store_vouches_for_no_one(
    clock: Clock, pki: Pki, client_pki: Pki, how: str
) -> None:
    """A trust anchor is root's or the IRMd's user's to give: a CA file another user owns, or may
    write, is skipped (logged), and the server it would vouch for is anonymous to the CA store."""
    if how == "another user's" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    pki.serve_as("pong", *pki.issue("pong"))
    client_pki.trust(pki.ca)
    ca_file = client_pki.base / "cacert" / "root.pem"
    if how == "writable by others":
        ca_file.chmod(0o666)
    else:
        os.chown(ca_file, 65534, 65534)
    assert not allocate(*irmds(clock, client_pki, pki))[0].peer_ca
    ca_file.chmod(0o644)
    os.chown(ca_file, os.geteuid(), os.getegid())
    clock.now += MS
    assert allocate(*irmds(clock, client_pki, pki))[0].peer_ca  # the same file, root's alone


def test_a_name_without_files_is_plain_only_where_no_other_user_could_have_removed_them(
    clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No server/pong/ means plain only if server/ is root's or ours alone, or sticky: once others may
    write it, the allocation is refused, saying why; a pong/ another user made in a sticky one is not
    believed. The walk is checked once per role directory while
    it holds (it costs ~100 µs, twice per local flow), and looked at again when the hold ends."""
    import irmd.oap as irmd_oap

    base = tmp_path / "sec"
    (base / "server").mkdir(parents=True)
    for d in (base, base / "server"):
        d.chmod(0o755)
    checks: list[str] = []
    real = irmd_oap.check_absent
    monkeypatch.setattr(irmd_oap, "check_absent", lambda where: (checks.append(str(where)), real(where))[1])
    client, server = Oap(base=tmp_path / "none", clock=clock), Oap(base=base, clock=clock)
    for _ in range(3):
        clock.now += MS
        assert allocate(client, server, "pong") == (Outcome(), Outcome())
    assert sum(c.startswith(str(base)) for c in checks) == 1
    (base / "server").chmod(0o777)
    monkeypatch.setattr(irmd_oap, "ABSENT_OK_FOR", 0.0)
    server._absent_ok.clear()  # the hold ends, as it does ABSENT_OK_FOR seconds after the look
    clock.now += MS
    with pytest.raises(FlowError, match="another user could have removed it"):
        allocate(client, server, "pong")
    # Sticky (as a fresh tmpfs is): no one else can remove or rename root's entries there
    (base / "server").chmod(0o1777)
    clock.now += MS
    assert allocate(client, server, "pong") == (Outcome(), Outcome())
    if os.geteuid() == 0:  # and what another user makes there is not believed
        (base / "server" / "pong").mkdir()
        os.chown(base / "server" / "pong", 65534, 65534)
        clock.now += MS
        with pytest.raises(FlowError, match="65534"):
            allocate(client, server, "pong")


@pytest.mark.parametrize("kind", ["p384", "rsa", "ed25519"])
def test_every_kind_of_certificate_key_signs(clock: Clock, pki: Pki, client_pki: Pki, kind: str) -> None:
    crt, key = pki.issue("pong", kind)
    pki.serve_as("pong", crt, key)
    client_pki.ca, client_pki.ca_key = pki.ca, pki.ca_key
    client_pki.trust()
    assert allocate(*irmds(clock, client_pki, pki))[0].peer_ca


def test_a_private_key_readable_by_others_is_refused_with_the_file(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, key = pki.issue("pong")
    pki.serve_as("pong", crt, key)
    (pki.base / "server" / "pong" / "key.pem").chmod(0o644)
    with pytest.raises(FlowError, match=r"key\.pem is accessible by others") as e:
        allocate(*irmds(clock, client_pki, pki))
    assert e.value.code == oap.EAUTH


def test_a_key_that_is_not_the_certificates_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    crt, _ = pki.issue("pong")
    pki.serve_as("pong", crt, new_key())
    with pytest.raises(FlowError, match="is not the key of"):
        allocate(*irmds(clock, client_pki, pki))


def test_per_name_paths_override_the_defaults(clock: Clock, pki: Pki, client_pki: Pki, tmp_path: Path) -> None:
    crt, key = pki.issue("pong")
    pki.serve_as("elsewhere", crt, key)
    reg = Registry()
    d = pki.base / "server" / "elsewhere"
    reg.create_name("pong").sec = {"server_crt_file": str(d / "crt.pem"), "server_key_file": str(d / "key.pem")}
    server = Oap(reg, base=pki.base, clock=clock)
    got, _ = allocate(Oap(base=client_pki.base, clock=clock), server)
    assert got.peer_crt


# -- client certificates (mutual authentication) ---------------------------------------------------------


def test_a_client_certificate_from_the_servers_ca_identifies_the_client(
    clock: Clock, pki: Pki, client_pki: Pki
) -> None:
    pki.trust()
    crt, key = pki.issue("alice")
    client_pki.serve_as("pong", crt, key, role="client")
    got, served = allocate(*irmds(clock, client_pki, pki), qos=ENCRYPT)
    assert served.peer_crt and served.peer_ca and not got.peer_crt


def test_a_client_certificate_the_server_cannot_verify_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    pki.trust()
    crt, key = client_pki.issue("mallory")  # from another CA
    client_pki.serve_as("pong", crt, key, role="client")
    with pytest.raises(FlowError, match="CA store") as e:
        allocate(*irmds(clock, client_pki, pki))
    assert e.value.code == oap.EAUTH


@pytest.mark.timeout(30)
def test_a_client_request_sent_on_by_whoever_got_it_names_nobody_on_a_plain_flow(
    clock: Clock, pki: Pki, client_pki: Pki
) -> None:
    """alice presents her certificate to `games` (or to a host that hijacked `bank`'s entry), whose IRMd
    sends her signed request on, unchanged, as its own allocation to `bank`: bank's server was told the
    flow was alice's, while the relay held it. Only a key exchange under her signature binds her to the
    flow (only she can complete it); a plain flow now names no peer."""
    from irmd import kex

    pki.trust()
    crt, key = pki.issue("alice")
    client_pki.serve_as("games", crt, key, role="client")
    client_pki.serve_as("bank", crt, key, role="client")
    alice, bank = irmds(clock, client_pki, pki)
    relayed = alice.request("games", raw)
    _, served = bank.serve("bank", relayed.data)
    assert served == Outcome()  # the flow is the relay's: it names nobody
    # Encrypted, bank names alice, and the key is hers alone: the relay cannot derive it.
    relayed = alice.request("games", ENCRYPT)
    answer, served = bank.serve("bank", relayed.data)
    assert served.peer_crt and served.peer_ca
    assert relayed.key is not None and relayed.request is not None
    rsp = oap.decode(answer, relayed.request.md_nid)
    assert kex.derive(relayed.key, rsp.kex, rsp.kdf_nid) == served.key  # alice's ephemeral key, never sent
    # The legitimate use beside it: alice's own plain flow to bank is served, anonymously; encrypted, as alice.
    got, served = allocate(alice, bank, "bank")
    assert got == served == Outcome()
    got, served = allocate(alice, bank, "bank", ENCRYPT)
    assert served.peer_ca and got.key == served.key


@pytest.mark.timeout(60)
def test_a_client_certificate_no_ca_vouches_for_is_refused_before_its_costly_signature(
    clock: Clock, pki: Pki, client_pki: Pki
) -> None:
    """The accepting IRMd checked a client certificate's signature before its chain: an RSA key of the
    peer's own making (3072 bits, as long an exponent) made each request cost ~9 ms in the IRMd's loop,
    20 times a plain allocation. Only a certificate that chains has its signature checked now."""
    import secrets
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    pki.trust()
    n = secrets.randbits(3072) | 1 << 3071 | 1
    heavy = rsa.RSAPublicNumbers(secrets.randbits(3071) | 1 << 3070 | 1, n).public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    signer = new_key()
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(heavy)
           .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
           .not_valid_after(datetime.datetime(2100, 1, 1)).sign(signer, hashes.SHA256()))  # fmt: skip
    der = crt.public_bytes(Encoding.DER)
    server = Oap(base=pki.base, clock=clock)
    start, tries = time.thread_time(), 20
    for _ in range(tries):
        clock.now += MS
        request = oap.encode(os.urandom(16), clock.now, md_nid=672, crt=der,
                             sign=lambda _: secrets.randbits(3000).to_bytes(384, "big"))  # fmt: skip
        with pytest.raises(FlowError) as e:
            server.serve("pong", request)
        assert e.value.code == oap.EAUTH
    took = (time.thread_time() - start) / tries
    assert took < 0.003
    assert "does not chain" in str(e.value)
    # The legitimate use beside it: a client certificate from the server's CA still names the client.
    alice, key = pki.issue("alice")
    client_pki.serve_as("pong", alice, key, role="client")
    _, served = allocate(Oap(base=client_pki.base, clock=clock), server, qos=ENCRYPT)
    assert served.peer_ca


def test_a_signed_request_altered_on_the_way_is_refused(clock: Clock, pki: Pki, client_pki: Pki) -> None:
    pki.trust()
    crt, key = pki.issue("alice")
    client_pki.serve_as("pong", crt, key, role="client")
    client, server = irmds(clock, client_pki, pki)
    data = bytearray(client.request("pong", ENCRYPT).data)
    data[-80] ^= 1  # inside the client's public key, which the signature covers
    with pytest.raises(FlowError, match=r"signature|public key"):
        server.serve("pong", bytes(data))


# -- allocations in flight (MaxStartups) --------------------------------------------------------------------


def test_startups_refuse_a_peer_beyond_its_share_and_a_full_layer() -> None:
    s = Startups(start=3, rate=50, full=6, per_peer=2, rng=lambda: 0.99)
    with s.admit("l", "a"), s.admit("l", "a"):
        with pytest.raises(FlowError, match="2 allocations from a") as e, s.admit("l", "a"):
            pass
        assert e.value.code == m.EBUSY
        with s.admit("l", "b"), s.admit("l", "c"), s.admit("l", "d"), s.admit("l", "e"):  # 0.99 beats p < 1
            with pytest.raises(FlowError, match="6 allocations already"), s.admit("l", "f"):
                pass
            with s.admit("other", "a"):  # another layer has its own count
                pass
    assert not s.layers and not s.peers  # everything let go


def test_a_local_users_flood_neither_fills_the_layer_nor_refuses_another_user_or_an_admin() -> None:
    s = Startups(start=2, rate=100, full=3, per_peer=3, rng=lambda: 0.0)  # from `start` on, refuse all
    o = Oap(startups=s)
    with o.startup("l", uid=65534), o.startup("l", uid=65534), o.startup("l", uid=65534):
        with pytest.raises(FlowError, match="3 allocations from uid 65534"), o.startup("l", uid=65534):
            pass
        assert not s.layers  # the flooding user holds only its own share
        with o.startup("l", uid=1000), o.startup("l", "a remote peer"), o.startup("l", uid=0, admin=True):
            pass  # another user, a remote peer and an admin (never refused) all start
    assert not s.layers and not s.peers


def test_startups_drop_early_with_rising_probability() -> None:
    draws = iter([0.2, 0.6])
    s = Startups(start=1, rate=50, full=3, rng=lambda: next(draws))
    with s.admit("l", ""):
        with pytest.raises(FlowError, match="refused 50%"), s.admit("l", ""):
            pass
        with s.admit("l", ""):  # 0.6 >= 50%: admitted
            pass


def test_refusals_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    t = [0.0]
    rl = RateLog(rate=2, burst=3, clock=lambda: t[0], logger=logging.getLogger("irmd.oap"))
    with caplog.at_level(logging.INFO, logger="irmd.oap"):
        for i in range(100):
            rl.log("refused %d", i)
        t[0] += 1.0  # two more tokens
        rl.log("later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused 0", "refused 1", "refused 2", "(97 more lines not logged)", "later"]


def test_outcome_fills_the_flow_reply() -> None:
    out = Outcome(cipher=1018, key=b"k" * 32, peer_crt=b"c", peer_ca=True, seq_iv=True)
    reply = out.reply(m.FlowReply(7, "l", 1500, dataclasses.replace(raw, cypher_s=0)))
    assert (reply.cipher, reply.key, reply.peer_crt, reply.peer_ca, reply.seq_iv, reply.qos.cypher_s) == (
        1018,
        b"k" * 32,
        b"c",
        True,
        True,
        256,
    )


def test_a_signature_under_a_digest_the_key_type_cannot_use_is_refused_with_eauth() -> None:
    """An RSA certificate with a BLAKE2b digest (md_nid 1056): cryptography cannot verify that
    pair at all, which must still be a refusal (an allocating IRMd leaked the flow's descriptors
    on the exception before)."""
    from irmd import kex

    with pytest.raises(oap.OapError) as e:
        kex.verify(new_key("rsa").public_key(), 1056, b"signed", bytes(256))
    assert e.value.code == oap.EAUTH
