"""The IRMd's side of OAP: a fresh request for every allocation attempt, completed with the
peer's response; an arriving request checked (window, replay, identity, key exchange) and answered.

The daemon calls `request`/`complete` around an IpcpFlowAlloc and `serve` once a process is
there to accept, inside `startup` (MaxStartups); every refusal is a FlowError (by its code) for that flow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irmd.reg import Registry
from irmd.secfiles import (
    APP_DEFAULT,
    CA_DIR,
    NONE,
    EncConfError,
    SecConfig,
    check_absent,
    load_enc_conf,
    role_dir,
    role_files,
    security_dir,
)
from proto import messages as m
from proto import oap
from proto.errors import Busy, error_class
from proto.oap import EAUTH, ECRYPT, OapError
from proto.qos import QosSpec
from transports.ratelog import RateLog

# Key exchange and certificates (cryptography, ~25 ms to import) load with the first name that has
# security files or the first encrypted flow, not at every IRMd's start.
if TYPE_CHECKING:
    from irmd import kex
    from irmd.credentials import CaStore, Credentials, CredentialStore

log = logging.getLogger("irmd.oap")

STARTUPS_ENV = "OUROBOROS_MAX_STARTUPS"  # start:rate:full, as sshd's MaxStartups
PER_PEER_ENV = "OUROBOROS_MAX_STARTUPS_PER_PEER"
MAX_STARTUPS = (10, 30, 100)
PER_PEER = 10
ABSENT_OK_FOR = 1.0  # seconds a role directory found trusted stays so without a look (only root could change it)
AES_256_GCM = 901


REFUSALS = RateLog(logger=log)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an allocation established, for the application that gets the flow."""

    cipher: int = 0  # the negotiated cipher's NID; 0: a plain flow
    key: bytes = b""
    peer_crt: bytes = b""  # the peer's certificate (DER), whose key signed its OAP header
    peer_ca: bool = False  # that certificate chains to this IRMd's CA store
    seq_iv: bool = False  # both ends number their IVs: replays can be refused

    def reply(self, reply: m.FlowReply) -> m.FlowReply:
        if self == PLAIN and not reply.qos.cypher_s:
            return reply  # a plain flow's reply says so already
        qos = dataclasses.replace(reply.qos, cypher_s=oap.KEY_BITS.get(self.cipher, 0))
        return dataclasses.replace(reply, qos=qos, cipher=self.cipher, key=self.key, peer_crt=self.peer_crt,
                                   peer_ca=self.peer_ca, seq_iv=self.seq_iv)  # fmt: skip


PLAIN = Outcome()


@dataclasses.dataclass(frozen=True)
class Answer:
    """The accepting side's part of the key exchange, for its response."""

    cipher: int = 0
    kdf: int = 0
    kex: bytes = b""
    data: bytes = b""


@dataclasses.dataclass
class Attempt:
    """One allocation attempt's request, kept until its response arrives."""

    name: str
    request: oap.Header | None  # None: no OAP (joining a broadcast layer, as 0.23)
    config: SecConfig = NONE
    key: kex.KexKey | None = None  # our ephemeral key-exchange key
    expect: str = ""  # why the peer must prove itself (fail closed on an anonymous answer); "": it need not

    @property
    def data(self) -> bytes:
        return self.request.raw if self.request is not None else b""


class Startups:
    """Allocations in flight at the accepting side (waiting for a process, being checked), bounded
    as sshd's MaxStartups start:rate:full per layer, and to `per_peer` from any one known peer."""

    def __init__(
        self,
        start: int = 10,
        rate: int = 30,
        full: int = 100,
        per_peer: int = PER_PEER,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < start <= full or not 0 <= rate <= 100 or per_peer < 1:
            raise ValueError(f"max startups {start}:{rate}:{full} per peer {per_peer}: expected 0 < start <= full, "
                             f"0 <= rate <= 100, per peer >= 1")  # fmt: skip
        self.start, self.rate, self.full, self.per_peer, self.rng = start, rate, full, per_peer, rng
        self.layers: Counter[str] = Counter()
        self.peers: Counter[tuple[str, str]] = Counter()

    @classmethod
    def from_env(cls) -> Startups:
        try:
            start, rate, full = (int(x) for x in os.environ.get(STARTUPS_ENV, "10:30:100").split(":"))
            return cls(start, rate, full, int(os.environ.get(PER_PEER_ENV, str(PER_PEER))))
        except ValueError as e:
            log.error("%s/%s: %s; using 10:30:100 and %d per peer", STARTUPS_ENV, PER_PEER_ENV, e, PER_PEER)
            return cls()

    def refuse(self, layer: str, peer: str, local: bool = False) -> str | None:
        """Why a new allocation may not start now, or None. A `local` peer (a user of this host, known
        by uid) is held to its own share only: another user's flood must not refuse it."""
        n = self.layers[layer]
        if peer and self.peers[(layer, peer)] >= self.per_peer:
            return f"{self.per_peer} allocations from {peer} already in flight in layer {layer!r}"
        if local:
            return None
        if n >= self.full:
            return f"{n} allocations already in flight in layer {layer!r}"
        if n >= self.start:
            p = (self.rate + (100 - self.rate) * (n - self.start) / max(self.full - self.start, 1)) / 100
            if self.rng() < p:
                return f"{n} allocations in flight in layer {layer!r}: refused {p:.0%} of new ones"
        return None

    @contextlib.contextmanager
    def admit(self, layer: str, peer: str, local: bool = False) -> Iterator[None]:
        """Hold a place while the allocation is in flight. Local peers count only in their own share,
        so the layer's pool (for peers known by an address at best) cannot be filled by one local user."""
        why = self.refuse(layer, peer, local)
        if why is not None:
            REFUSALS.log("flow refused: %s", why)
            raise Busy(f"busy: {why}; try again later")
        pool = None if local else layer
        if pool is not None:
            self.layers[pool] += 1
        self.peers[(layer, peer)] += 1
        try:
            yield
        finally:
            if pool is not None:
                _leave(self.layers, pool)
            _leave(self.peers, (layer, peer))


def _leave(counter: Counter[Any], key: Any) -> None:
    """One fewer in flight; a count that reaches zero goes (the counters hold only what is in flight)."""
    if counter[key] <= 1:
        del counter[key]
    else:
        counter[key] -= 1


class Oap:
    def __init__(
        self,
        reg: Registry | None = None,
        base: Path | None = None,
        clock: Callable[[], int] = time.time_ns,
        startups: Startups | None = None,
    ) -> None:
        self.reg = reg or Registry()
        self.base = str(base or security_dir())
        self.clock = clock  # CLOCK_REALTIME in ns, as the timestamps on the wire
        self.replay = oap.ReplayCache()
        self._credentials: CredentialStore | None = None
        self._ca: CaStore | None = None
        self.startups = startups or Startups.from_env()
        # role directory (client/, server/) -> until when its names' missing directories are known to
        # be ones only root or we could make: checking the walk costs ~100 µs, twice per local flow
        self._absent_ok: dict[str, float] = {}

    @property
    def credentials(self) -> CredentialStore:
        from irmd.credentials import CredentialStore

        if self._credentials is None:
            self._credentials = CredentialStore()
        return self._credentials

    @property
    def ca(self) -> CaStore:
        from irmd.credentials import CaStore

        if self._ca is None:
            self._ca = CaStore(Path(self.base) / CA_DIR)
        return self._ca

    def _files(self, name: str, role: str) -> tuple[SecConfig, Credentials | None]:
        entry = self.reg.names.get(name)
        overrides = entry.sec if entry is not None else {}
        # Most names have no directory of files here: one access() (no exception raised) says so.
        if not overrides and ((where := role_dir(name, role, self.base)) is None or not os.access(where, os.F_OK)):
            if where is not None:
                self._check_absent(where)
            return NONE, None
        from irmd import kex
        from irmd.credentials import CredentialError

        enc, crt, key = role_files(name, overrides, role, self.base)
        try:
            config = load_enc_conf(enc)
            creds = self.credentials.load(crt, key)
        except (EncConfError, CredentialError) as e:
            raise OapError(EAUTH if isinstance(e, CredentialError) else ECRYPT, str(e)) from None
        if config.encrypt:
            kex.check_kex(config.kex)
        return config, creds

    def _check_absent(self, where: str) -> None:
        """OapError unless no other user could have removed the missing `where` (or could make it).
        Only root or we can make the role directory untrusted once it was found trusted, so the
        verdict is kept for ABSENT_OK_FOR seconds per role directory."""
        parent, now = os.path.dirname(where), time.monotonic()
        if self._absent_ok.get(parent, 0.0) > now:
            return
        try:
            check_absent(where)
        except PermissionError as e:
            self._absent_ok.pop(parent, None)
            raise OapError(EAUTH, str(e)) from None
        self._absent_ok[parent] = now + ABSENT_OK_FOR

    def _peer(self, hdr: oap.Header, chained: bool = False) -> tuple[bytes, bool]:
        """The peer's certificate if it proved holding its key (a valid signature), and whether
        it chains to our CA store: (b"", False) for an anonymous peer. `chained`: one that does not
        chain is refused before its signature is checked (with a key of the peer's choosing, an RSA
        one of 3072 bits and as long an exponent, that costs 20 times an allocation's work)."""
        if not hdr.crt:
            return b"", False
        from irmd import kex
        from irmd.credentials import common_name, load_der, spki

        crt = load_der(hdr.crt)
        try:
            self.ca.verify(crt)
            ca = True
        except OapError as e:
            if chained:
                raise OapError(EAUTH, f"the client's certificate does not chain to this IRMd's CA store: "
                                      f"{e.reason}") from None  # fmt: skip
            REFUSALS.log("peer %r (%s): %s", common_name(crt), oap.fingerprint(spki(crt)), e.reason, level=logging.INFO)
            ca = False
        kex.verify(crt.public_key(), hdr.md_nid, hdr.signed, hdr.sig)
        return hdr.crt, ca

    # -- the allocating side ---------------------------------------------------------------------

    def request(self, name: str, qos: QosSpec, join: bool = False, *, host: bool = True) -> Attempt:
        """A new request: a fresh id and timestamp (a retry is never taken for a replay), the
        name's client certificate if it has one, and an ephemeral public key when it encrypts.
        Joining a broadcast layer has no peer to answer: no OAP, as 0.23's flow_join.

        host: the allocation is the host's (an admin's), which the name's client certificate speaks
        for; a user's goes anonymous: that key is root's, and a server takes whom it names as the host."""
        if join:
            return Attempt(name, None)
        try:
            config, creds = self._files(name, "client")
            creds = creds if host else None
            expect = self._expectation(config, creds, qos.cypher_s)
            if qos.cypher_s and not config.encrypt:
                config = APP_DEFAULT  # the application asks for encryption; its enc.conf does not
            config = _at_least(config, qos.cypher_s)
            key, public = _ephemeral(config)
            raw = oap.encode(os.urandom(oap.ID_SIZE), self.clock(), cipher_nid=config.cipher, kdf_nid=config.kdf,
                             md_nid=config.md, crt=creds.der if creds else b"",
                             kex=public, data=oap.SEQ_IV if key else b"",
                             sign=_signer(creds, config.md))  # fmt: skip
        except OapError as e:
            REFUSALS.log("flow to %s: %s", name, e.reason, level=logging.ERROR)  # any user may ask again and again
            raise error_class(e.code)(f"flow to {name!r}: {e.reason}") from None
        return Attempt(name, oap.decode(raw), config, key, expect)

    def _expectation(self, config: SecConfig, creds: Credentials | None, cypher_s: int) -> str:
        """Why the peer must prove itself with a certificate, or "": when this IRMd's CA store can
        verify one and the flow is encrypted (a key agreed with an anonymous answerer is a key
        shared with whoever answered) or we prove our own identity to the name (mutual, or not at all)."""
        if not (config.encrypt or cypher_s or creds is not None) or not self.ca.configured:
            return ""
        why = "the flow is encrypted" if config.encrypt or cypher_s else "this host has a client certificate for it"
        return f"{why} and this IRMd's CA store ({self.ca.directory}) can verify it"

    def complete(self, attempt: Attempt, data: bytes) -> Outcome:
        """Check the response to our request: its id and request hash, the server's identity, and
        with encryption its part of the key exchange; the outcome, or a refusal that says why."""
        if attempt.request is None:
            return Outcome()
        try:
            rsp = oap.check_response(attempt.request, data)
            peer_crt, peer_ca = self._peer(rsp)
            if not peer_crt and attempt.expect:
                raise OapError(EAUTH, f"{attempt.name!r} must prove itself ({attempt.expect}), but its peer "
                                      f"presented no certificate")  # fmt: skip
            if peer_crt and (cn := _common_name(peer_crt)) != attempt.name:
                raise OapError(EAUTH, f"the peer's certificate is for {cn!r}, not {attempt.name!r}")
            outcome = Outcome(peer_crt=peer_crt, peer_ca=peer_ca)
            if attempt.key is not None:
                outcome = self._client_kex(attempt, rsp, outcome)
        except OapError as e:
            REFUSALS.log("flow to %s: %s", attempt.name, e.reason)
            raise error_class(e.code)(f"flow to {attempt.name!r} refused: {e.reason}") from None
        return outcome

    @staticmethod
    def _client_kex(attempt: Attempt, rsp: oap.Header, outcome: Outcome) -> Outcome:
        config = attempt.config
        assert attempt.key is not None
        if not rsp.cipher_nid or not rsp.kex:
            raise OapError(ECRYPT, "the peer did not take part in the key exchange (no cipher or key)")
        if oap.rank(oap.CIPHER_RANK, rsp.cipher_nid) < oap.rank(oap.CIPHER_RANK, config.cipher):
            raise OapError(ECRYPT, f"the peer's cipher {oap.CIPHERS[rsp.cipher_nid]} is weaker than "
                                   f"{oap.CIPHERS[config.cipher]}")  # fmt: skip
        kdf = config.kdf
        if rsp.kdf_nid:
            if oap.rank(oap.DIGEST_RANK, rsp.kdf_nid) < oap.rank(oap.DIGEST_RANK, kdf):
                raise OapError(ECRYPT, f"the peer's KDF {oap.DIGESTS[rsp.kdf_nid][0]} is weaker than ours")
            kdf = rsp.kdf_nid
        from irmd import kex

        key = kex.derive(attempt.key, rsp.kex, kdf)
        return dataclasses.replace(outcome, cipher=rsp.cipher_nid, key=key, seq_iv=rsp.data == oap.SEQ_IV)

    # -- the accepting side ----------------------------------------------------------------------

    def startup(
        self, layer: str, peer: str = "", uid: int | None = None, admin: bool = False
    ) -> contextlib.AbstractContextManager[None]:
        """Hold a place among the allocations in flight, or refuse with EBUSY. `uid`: the allocating
        user when it is on this host (held to its own share); an `admin` of this host is never refused."""
        if admin:
            return contextlib.nullcontext()
        if uid is not None:
            return self.startups.admit(layer, f"uid {uid}", local=True)
        return self.startups.admit(layer, peer)

    def serve(self, name: str, data: bytes, cypher_s: int = 0, replay: bool = True) -> tuple[bytes, Outcome]:
        """Check a request for `name` (window and replay first: they cost nothing) and build the
        response, or refuse the flow. `cypher_s`: the accepting process requires encryption.
        `replay`: False for a request this IRMd built itself for a flow on this host, which no one
        else saw to replay; it then takes no room in the replay memory all peers share, which a local
        user's allocations would otherwise fill for every remote peer's."""
        try:
            hdr = oap.decode(data)
            if replay:
                self.replay.check(hdr, self.clock())  # remembered even if a later step fails, as 0.23
            config, creds = self._files(name, "server")
            config = _at_least(config, cypher_s)
            peer_crt, peer_ca = self._peer(hdr, chained=True)
            outcome, ours = Outcome(peer_crt=peer_crt, peer_ca=peer_ca), Answer()
            if hdr.kex:
                outcome, ours = self._server_kex(hdr, config, outcome)
            elif config.encrypt or cypher_s:
                raise OapError(ECRYPT, f"{name!r} requires encryption; the request offers no key exchange")
            else:
                # A plain flow: nothing binds the client's signed request to it, so whoever got hold of
                # the request (a server the client reached, a hijacked name) could send it on as its own
                # and hold the flow in the client's name. Only a key exchange under the signature (only
                # the client can complete it) makes the certificate the flow's peer.
                outcome = PLAIN
            response = oap.encode(hdr.id, self.clock(), cipher_nid=ours.cipher, kdf_nid=ours.kdf, md_nid=config.md,
                                  crt=creds.der if creds else b"", kex=ours.kex, data=ours.data,
                                  req_hash=oap.request_hash(hdr), sign=_signer(creds, config.md))  # fmt: skip
        except OapError as e:
            REFUSALS.log("flow for %s refused: %s", name, e.reason)
            raise error_class(e.code)(f"flow for {name!r} refused: {e.reason}") from None
        return response, outcome

    @staticmethod
    def _server_kex(hdr: oap.Header, config: SecConfig, outcome: Outcome) -> tuple[Outcome, Answer]:
        """Negotiate as 0.23's do_server_kex: the stronger cipher and KDF of the two, the client's
        key exchange unless weaker than ours; then our ephemeral key and the shared secret."""
        if hdr.kex_raw or hdr.kex_client_encap:
            raise OapError(ECRYPT, "KEM key exchanges (ML-KEM, hybrid) are not supported here")
        if oap.rank(oap.CIPHER_RANK, hdr.cipher_nid) > oap.rank(oap.CIPHER_RANK, config.cipher):
            cipher = hdr.cipher_nid
        elif config.cipher:
            cipher = config.cipher
        else:
            raise OapError(ECRYPT, "encryption requested without a cipher")
        kdf = max(hdr.kdf_nid, config.kdf, key=lambda nid: oap.rank(oap.DIGEST_RANK, nid))
        from irmd import kex

        algo = kex.peer_kex(hdr.kex)
        if oap.rank(oap.KEX_RANK, algo) < oap.rank(oap.KEX_RANK, config.kex):
            raise OapError(ECRYPT, f"the client's key exchange {oap.KEXES[algo]} is weaker than "
                                   f"{oap.KEXES[config.kex]}")  # fmt: skip
        ours = kex.keypair(algo)
        key = kex.derive(ours, hdr.kex, kdf)
        seq_iv = hdr.data == oap.SEQ_IV
        answer = Answer(cipher, kdf, kex.public_der(ours), oap.SEQ_IV if seq_iv else b"")
        return dataclasses.replace(outcome, cipher=cipher, key=key, seq_iv=seq_iv), answer


def _ephemeral(config: SecConfig) -> tuple[kex.KexKey | None, bytes]:
    """Our ephemeral key-exchange key and its public part, when the flow encrypts."""
    if not config.encrypt:
        return None, b""
    from irmd import kex

    key = kex.keypair(config.kex)
    return key, kex.public_der(key)


def _common_name(der: bytes) -> str:
    from irmd.credentials import common_name, load_der

    return common_name(load_der(der))


def _at_least(config: SecConfig, cypher_s: int) -> SecConfig:
    """The config with a cipher of at least `cypher_s` key bits (AES-256-GCM if it names a weaker one):
    both sides keep the stronger cipher, so the flow gets the key length its application asked for."""
    if cypher_s and oap.KEY_BITS.get(config.cipher, 0) < cypher_s:
        return dataclasses.replace(config, cipher=AES_256_GCM)
    return config


def _signer(creds: Credentials | None, md_nid: int) -> Callable[[bytes], bytes] | None:
    if creds is None:
        return None
    from irmd import kex

    return lambda signed: kex.sign(creds.key, md_nid, signed)
