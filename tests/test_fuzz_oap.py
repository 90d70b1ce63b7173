"""Fuzzed OAP headers (Ouroboros 0.23's flow allocation protocol): requests and responses, plain,
signed with a certificate and carrying a key exchange, bent in their lengths, NIDs, certificates,
keys and signatures. proto.oap raises only OapError; the IRMd's sans-IO Oap refuses with the
flow API's errors (EAUTH, ECRYPT), never anything else.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzzing import cases, only_raises
from pki import Pki

from irmd.oap import Oap
from proto import oap
from proto.errors import FlowError
from proto.qos import QosSpec, raw

T0 = 1_800_000_000_000_000_000
ENCRYPT = QosSpec(cypher_s=256)


@pytest.fixture(scope="module")
def irmds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Oap, Oap]:
    """A client IRMd with a certificate for "pong" and a server IRMd with one, each trusting the other's CA."""
    base: Path = tmp_path_factory.mktemp("oap")
    server_pki, client_pki = Pki(base / "server-side"), Pki(base / "client-side", "Client Root CA")
    server_pki.serve_as("pong", *server_pki.issue("pong"))
    client_pki.serve_as("pong", *client_pki.issue("ping"), role="client")
    server_pki.trust(client_pki.ca)
    client_pki.trust(server_pki.ca)
    return Oap(base=client_pki.base, clock=lambda: T0), Oap(base=server_pki.base, clock=lambda: T0)


def test_bent_headers_decode_or_raise_oap_error() -> None:
    request = oap.decode(
        oap.encode(bytes(16), T0, cipher_nid=901, kdf_nid=672, md_nid=673, kex=b"k" * 91, data=oap.SEQ_IV)
    )
    corpus = [oap.plain_request(bytes(16), T0), request.raw, oap.plain_response(request, T0)]
    for data in cases(61, corpus, 3000):
        for md in (None, 0, 672, 674, 1057):
            only_raises(oap.decode, data, oap.OapError, md)
        only_raises(lambda d: oap.check_response(request, d), data, oap.OapError)


@pytest.mark.parametrize("qos", [raw, ENCRYPT], ids=["signed", "signed+encrypted"])
def test_bent_requests_are_served_or_refused_with_a_flow_error(irmds: tuple[Oap, Oap], qos: QosSpec) -> None:
    client, server = irmds
    corpus = [client.request("pong", qos).data, oap.plain_request(bytes(16), T0)]
    for data in cases(62 + qos.cypher_s, corpus, 250):
        server.replay = oap.ReplayCache()  # each case fresh: the fuzz is for the parsers, not the cache
        only_raises(lambda d: server.serve("pong", d), data, FlowError)


@pytest.mark.parametrize("qos", [raw, ENCRYPT], ids=["signed", "signed+encrypted"])
def test_bent_responses_complete_or_refuse_with_a_flow_error(irmds: tuple[Oap, Oap], qos: QosSpec) -> None:
    client, server = irmds
    attempt = client.request("pong", qos)
    response, _ = server.serve("pong", attempt.data)
    for data in cases(64 + qos.cypher_s, [response], 250):
        only_raises(lambda d: client.complete(attempt, d), data, FlowError)


def test_a_certificate_whose_key_does_not_parse_is_refused_with_eauth(tmp_path: Path) -> None:
    """The certificate loads (the library parses its key lazily) but its EC point is not one: the
    signature check must refuse it, not fail with the library's ValueError."""
    from cryptography.hazmat.primitives import serialization

    from irmd.credentials import load_der
    from proto.errors import AuthenticationFailed

    pki = Pki(tmp_path)
    crt, key = pki.issue("ping")
    der = crt.public_bytes(serialization.Encoding.DER)
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    bent = der.replace(point, b"\x05" + point[1:])  # an unknown point form
    with pytest.raises(oap.OapError):
        load_der(bent)
    signed = oap.encode(bytes(16), T0, md_nid=oap.SHA384, crt=bent, sign=lambda data: b"\x30\x00")
    server = Oap(base=tmp_path, clock=lambda: T0)
    with pytest.raises(AuthenticationFailed, match="does not parse"):
        server.serve("pong", signed)
