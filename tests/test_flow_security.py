"""Authenticated and encrypted flows end to end through a real IRMd and local layer: what an
application sees (flow.peer, flow.qos.cypher_s, the data), the user's known names, the policies
(a server's enc.conf, flow_accept asking for encryption, client certificates), and every refusal
saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import IrmdProc, free_port, start_irmd, stop_irmd, wait_for
from pki import Pki, certificate, new_key
from unicast_net import Cluster
from unicast_net import Host as UnicastHost

from flowlib import Flow, flow_accept, flow_alloc, qos
from flowlib.crypto import OVERHEAD
from flowlib.irm import IrmClient, call
from proto import messages as m
from proto.errors import AuthenticationFailed, EncryptionFailed

ENCRYPTED = qos.QosSpec(cypher_s=256)


class Site:
    """One IRMd with a security directory, a local layer and servers in this process."""

    def __init__(self, tmp: Path, irmd: IrmdProc, pool: ThreadPoolExecutor) -> None:
        self.tmp, self.irmd, self.pool = tmp, irmd, pool
        self.pki = Pki(tmp / "security")
        self.known = tmp / "known_names"
        self.clients: list[IrmClient] = []

    def client(self) -> IrmClient:
        c = IrmClient(self.irmd.sock)
        self.clients.append(c)
        return c

    def serve(self, name: str, want: qos.QosSpec | None = None) -> tuple[IrmClient, Callable[[], Future[Flow]]]:
        """A server of `name` (bound and registered); each call of the second value accepts one flow."""
        server = self.client()
        call(server.channel, m.Bind("process", str(os.getpid()), name), timeout=10)
        if not any(name == r["name"] and "local" in r["layers"] for r in self.irmd.table("name", "list")):
            call(server.channel, m.NameRegister(name, ["local"]), timeout=10)
        return server, lambda: self.pool.submit(flow_accept, want, 10, irm=server)

    def alloc(self, name: str, spec: qos.QosSpec = qos.raw, **kw: object) -> Flow:
        return flow_alloc(name, spec, 10, irm=self.client(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    tmp_path = Path(tempfile.mkdtemp(prefix="oap-", dir="/tmp"))  # uid 65534 must reach the socket
    tmp_path.chmod(0o755)
    sec = tmp_path / "security"
    sec.mkdir()
    irmd = start_irmd(tmp_path, env={"OUROBOROS_SECURITY_DIR": str(sec)})
    monkeypatch.setenv("OUROBOROS_KNOWN_NAMES", str(tmp_path / "known_names"))
    monkeypatch.delenv("OUROBOROS_STRICT_NAMES", raising=False)
    pool = ThreadPoolExecutor(4)
    s = Site(tmp_path, irmd, pool)
    try:
        irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        irmd.note_children()
        yield s
    finally:
        for c in s.clients:
            c.close()
        pool.shutdown(wait=True, cancel_futures=True)
        stop_irmd(irmd)
        shutil.rmtree(tmp_path, ignore_errors=True)


def exchange(cli: Flow, srv: Flow) -> None:
    cli.write(b"ping" * 100)
    assert srv.read() == b"ping" * 100
    srv.write(b"pong")
    assert cli.read() == b"pong"


# -- encryption ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [qos.raw, qos.data], ids=["raw", "data"])
def test_an_encrypted_flow_carries_data_and_both_ends_know_it(site: Site, spec: qos.QosSpec) -> None:
    _, accept = site.serve("pong")
    pending = accept()
    with site.alloc("pong", spec, encrypt=True) as cli, pending.result(10) as srv:
        assert cli.qos.cypher_s == srv.qos.cypher_s == 256
        assert cli.peer is None and srv.peer is None  # encrypted, but nobody proved who they are
        exchange(cli, srv)
        if spec is qos.raw:
            assert cli.mtu == 65535 - OVERHEAD


def test_only_ciphertext_crosses_the_flow(site: Site) -> None:
    server, _ = site.serve("pong")
    pending = site.pool.submit(server.accept, 10)  # the raw end, below flowlib's crypto
    with site.alloc("pong", encrypt=True) as cli:
        reply, fd = pending.result(10)
        assert reply.cipher == 901 and len(reply.key) == 32
        cli.write(b"SECRET MESSAGE " * 10)
        with os.fdopen(fd, "rb", buffering=0) as raw_end:
            packet = raw_end.read(4096)
        assert b"SECRET" not in packet and len(packet) == 150 + OVERHEAD


def test_a_server_whose_enc_conf_requires_encryption_refuses_a_plain_flow(site: Site) -> None:
    site.pki.enc_conf("pong", "kex=prime256v1\n")
    _, accept = site.serve("pong")
    pending = accept()
    with pytest.raises(EncryptionFailed, match="'pong' requires encryption"):
        site.alloc("pong")
    with site.alloc("pong", encrypt=True) as cli, pending.result(10) as srv:
        exchange(cli, srv)


def test_flow_accept_asking_for_encryption_refuses_plain_flows_at_the_irmd(site: Site) -> None:
    _, accept = site.serve("pong", ENCRYPTED)
    pending = accept()
    with pytest.raises(EncryptionFailed, match="requires encryption"):
        site.alloc("pong")
    assert not pending.done()  # the server never saw the plain flow
    with site.alloc("pong", encrypt=True) as cli, pending.result(10) as srv:
        assert srv.qos.cypher_s == 256
        exchange(cli, srv)


# -- server identities: CA and known names ----------------------------------------------------------


def test_a_server_certified_by_the_ca_store_is_the_peer(site: Site) -> None:
    crt, key = site.pki.issue("pong")
    site.pki.serve_as("pong", crt, key)
    site.pki.trust()
    _, accept = site.serve("pong")
    pending = accept()
    with site.alloc("pong", encrypt=True) as cli, pending.result(10) as srv:
        assert cli.peer is not None and (cli.peer.name, cli.peer.verified) == ("pong", "ca")
        assert cli.peer.subject == "CN=pong" and cli.peer.fingerprint.startswith("SHA256:")
        exchange(cli, srv)
    assert not site.known.exists()  # the CA vouched: nothing to pin


def test_an_unknown_server_key_is_refused_unless_accept_new_then_pinned(site: Site) -> None:
    crt, key = site.pki.issue("pong")  # the CA store is empty: only pins can vouch
    site.pki.serve_as("pong", crt, key)
    _, accept = site.serve("pong")
    accept()
    with pytest.raises(AuthenticationFailed, match=r"neither this IRMd.s CA store nor .* vouches") as e:
        site.alloc("pong")
    assert "SHA256:" in str(e.value) and "accept-new" in str(e.value)
    pending = accept()
    with site.alloc("pong", encrypt=True, accept_new=True) as cli, pending.result(10) as srv:
        assert cli.peer is not None and cli.peer.verified == "new"
        exchange(cli, srv)
    assert site.known.read_text().startswith(f"pong {cli.peer.fingerprint} CN=pong")
    assert site.known.stat().st_mode & 0o777 == 0o600
    pending = accept()
    with site.alloc("pong") as cli2, pending.result(10):
        assert cli2.peer is not None and cli2.peer.verified == "pinned"


def test_a_changed_key_is_refused_with_both_fingerprints(site: Site) -> None:
    crt, key = site.pki.issue("pong")
    site.pki.serve_as("pong", crt, key)
    _, accept = site.serve("pong")
    pending = accept()
    with site.alloc("pong", accept_new=True) as cli, pending.result(10):
        old = cli.peer.fingerprint if cli.peer else ""
    impostor_key = new_key()
    site.pki.serve_as("pong", certificate("pong", impostor_key), impostor_key)
    accept()
    with pytest.raises(AuthenticationFailed, match="CHANGED") as e:
        site.alloc("pong", encrypt=True, accept_new=True)  # accept-new never takes a changed key
    assert old in str(e.value) and str(e.value).count("SHA256:") == 2


def test_an_anonymous_answer_for_a_pinned_name_is_refused(site: Site) -> None:
    site.known.write_text("pong SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA CN=pong\n")
    site.known.chmod(0o600)
    _, accept = site.serve("pong")
    accept()
    with pytest.raises(AuthenticationFailed, match="proved no identity"):
        site.alloc("pong", encrypt=True)


def test_a_known_names_file_others_may_write_is_not_trusted(site: Site) -> None:
    crt, key = site.pki.issue("pong")
    site.pki.serve_as("pong", crt, key)
    _, accept = site.serve("pong")
    accept()
    site.known.write_text("")
    site.known.chmod(0o666)
    with pytest.raises(AuthenticationFailed, match="is writable by others"):
        site.alloc("pong", accept_new=True)


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user's directory, and root's pins")
def test_root_neither_pins_nor_trusts_through_a_directory_another_user_controls() -> None:
    """root running a tool with another user's environment (sudo -E: XDG_CONFIG_HOME, HOME) reads and
    writes known_names under that user's directory: the user could lead root's pin to a file of
    their choosing, or put pins there for root to trust. Neither is done; root's own pins work."""
    from cryptography.hazmat.primitives import serialization

    from flowlib.identity import KnownNames, server_identity

    crt = certificate("pong", new_key()).public_bytes(serialization.Encoding.DER)

    def verified(known: KnownNames) -> str:
        reply = m.FlowReply(1, "local", 1400, qos.raw, "pong", peer_crt=crt)
        peer = server_identity("pong", reply, accept_new=True, known=known)
        assert peer is not None
        return peer.verified

    with tempfile.TemporaryDirectory(prefix="pins-") as tmp:  # pytest's own is closed to other users
        top = Path(tmp)
        top.chmod(0o755)
        target = top / "target"  # a directory of root's that eve wants a file in (cron.d, say)
        target.mkdir()
        eve = top / "eve"
        eve.mkdir()
        os.chown(eve, 65534, 65534)
        as_eve = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        subprocess.run([*as_eve, "ln", "-s", str(target), str(eve / "ouroboros")], check=True, timeout=10)
        with pytest.raises(AuthenticationFailed, match="not pinning 'pong'"):
            verified(KnownNames(eve / "ouroboros" / "known_names"))
        assert list(target.iterdir()) == []
        # Pins root wrote once, in a directory eve owns: eve may replace them; not trusted.
        (eve / "cfg").mkdir()
        (eve / "cfg" / "known_names").write_text("pong SHA256:x\n")
        with pytest.raises(AuthenticationFailed, match="not trusting the pins"):
            verified(KnownNames(eve / "cfg" / "known_names"))
        # Root's own directory, beside: pinned, then known.
        mine = KnownNames(top / "root" / "ouroboros" / "known_names")
        assert verified(mine) == "new"
        assert verified(mine) == "pinned"


def test_a_uid_without_an_account_has_no_pins_rather_than_no_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    from flowlib.identity import KNOWN_NAMES_ENV, KnownNames, known_names_path

    def no_account(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for var in (KNOWN_NAMES_ENV, "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.setattr(pwd, "getpwuid", no_account)
    assert known_names_path() == Path("/nonexistent/.config/ouroboros/known_names")
    assert KnownNames().pins("pong") == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("brk", ["\r", "\x0b", "\x0c", "\x1c", "\x1e", "\x85", "\u2028", "\u2029"])
def test_a_subject_holding_a_line_break_pins_nothing_for_another_name(tmp_path: Path, brk: str) -> None:
    """A server reached once with accept-new wrote its certificate's subject into known_names: one
    holding a line break (other than \\n) started a line of its own, `bank <its own key>`, which the
    reader took as a pin: the impostor was then taken for bank, whose real pin it had outvoted."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from pki import DAY, NOW

    from flowlib.identity import KnownNames, Peer, server_identity

    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def der(cn: str, key: ec.EllipticCurvePrivateKey, org: str = "Org") -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)])  # fmt: skip
        crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
               .sign(key, hashes.SHA256()))  # fmt: skip
        return crt.public_bytes(serialization.Encoding.DER)

    known = KnownNames(tmp_path / "known_names")

    def verified(name: str, crt: bytes, accept_new: bool = False) -> str:
        reply = m.FlowReply(1, "local", 1400, qos.raw, name, peer_crt=crt)
        peer = server_identity(name, reply, accept_new=accept_new, known=known)
        assert peer is not None
        return peer.verified

    bank = der("bank", new_key())
    assert verified("bank", bank, accept_new=True) == "new"
    while "+" in (fp := Peer.of(der("x", evil := new_key()), "new").fingerprint):  # RFC 4514 escapes a "+"
        pass
    games = der("games", evil, f"Games{brk}bank {fp} x")
    assert brk in Peer.of(games, "new").subject  # the library does not escape it
    assert verified("games", games, accept_new=True) == "new"
    assert known.pins("games") == [fp] and known.pins("bank") == [Peer.of(bank, "new").fingerprint]
    with pytest.raises(AuthenticationFailed, match="has CHANGED"):
        verified("bank", der("bank", evil))
    # The legitimate use beside it: both keys pinned stay pinned, each for its own name.
    assert verified("bank", bank) == "pinned"
    assert verified("games", games) == "pinned"
    # A file a poisoned writer left behind reads as one line per "\n" too.
    known.path.write_text(f"games {fp} O=Games{brk}bank {fp} x,CN=games\n")
    assert known.pins("bank") == [] and known.pins("games") == [fp]


# -- client certificates ---------------------------------------------------------------------------------


def test_a_client_certificate_tells_the_server_who_connected(site: Site) -> None:
    site.pki.trust()
    crt, key = site.pki.issue("alice")
    site.pki.serve_as("pong", crt, key, role="client")
    _, accept = site.serve("pong")
    refused = accept()
    with pytest.raises(AuthenticationFailed, match="'pong' must prove itself"):
        site.alloc("pong", encrypt=True)  # the client proves itself only to a server that does too
    refused.result(10).close()  # the server's end of the flow its client then refused
    site.pki.serve_as("pong", *site.pki.issue("pong"))
    pending = accept()
    with site.alloc("pong", encrypt=True) as cli, pending.result(10) as srv:
        assert srv.peer is not None and (srv.peer.name, srv.peer.verified) == ("alice", "ca")
        assert cli.peer is not None and (cli.peer.name, cli.peer.verified) == ("pong", "ca")
        exchange(cli, srv)


# -- as an unprivileged user ------------------------------------------------------------------------------


ATTACK = r"""
import sys
from flowlib import flow_alloc
try:
    flow_alloc(sys.argv[1], timeout=5)
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(0)
print("ALLOCATED")
"""


def test_nobody_cannot_get_a_plain_flow_to_an_encrypting_server_while_the_owner_can_talk(site: Site) -> None:
    _, accept = site.serve("pong", ENCRYPTED)
    pending = accept()
    env = dict(site.irmd.env, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", ATTACK,
                        "pong"], env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "EncryptionFailed" in r.stdout and "requires encryption" in r.stdout, r.stdout + r.stderr
    with site.alloc("pong", encrypt=True) as cli, pending.result(10) as srv:
        exchange(cli, srv)


ALLOC_ENCRYPTED = r"""
import sys
from flowlib import flow_alloc
with flow_alloc(sys.argv[1], timeout=10, encrypt=True) as f:
    f.write(b"hello")
    f.set_timeout(10)
    f.read()
print("ALLOCATED")
"""


@pytest.mark.timeout(60)
def test_the_hosts_client_certificate_speaks_for_its_admins_not_for_any_user(site: Site) -> None:
    """A name's client certificate (client/<name>/) is the host's, its key root's: the IRMd signs with it
    for root's allocations, and uid 65534's go anonymous, or the server would take them for the host's."""
    site.pki.trust()
    site.pki.serve_as("pong", *site.pki.issue("pong"))
    site.pki.serve_as("pong", *site.pki.issue("host-a"), role="client")
    _, accept = site.serve("pong")
    pending = accept()
    env = dict(site.irmd.env, PYTHONPATH=str(Path(__file__).resolve().parent.parent), HOME="/nonexistent")
    user = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                             ALLOC_ENCRYPTED, "pong"], env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        with pending.result(10) as srv:
            assert srv.read() == b"hello"
            srv.write(b"bye")
            assert srv.peer is None, f"uid 65534's flow came as {srv.peer.name!r} ({srv.peer.verified})"
        assert user.communicate(timeout=20)[0] == "ALLOCATED\n"  # it still gets its flow, as itself
    finally:
        user.kill()
        user.wait()
    pending = accept()
    with site.alloc("pong", encrypt=True) as cli, pending.result(10) as srv:
        assert srv.peer is not None and (srv.peer.name, srv.peer.verified) == ("host-a", "ca")
        exchange(cli, srv)


DROP_ENC_CONF_AND_ALLOC = r"""
import os, sys
from flowlib import flow_alloc
os.unlink(sys.argv[1])  # root's file, in a directory uid 65534 may write: gone, and with it the policy
try:
    flow_alloc(sys.argv[2], timeout=5).close()
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(0)
print("ALLOCATED")
"""


@pytest.mark.timeout(60)
def test_a_names_files_in_a_directory_another_user_may_write_are_not_trusted(site: Site) -> None:
    """server/pong/ was given to uid 65534 (chown): it deletes root's enc.conf there, which required
    encryption, and would get a plain flow. The IRMd trusts a name's files, and their absence, only
    where no user but root or its own could have changed them: pong is refused, saying why; ping's
    files, root's alone, still work."""
    site.pki.enc_conf("pong", "kex=prime256v1\n")
    site.pki.enc_conf("ping", "kex=prime256v1\n")
    os.chown(site.pki.base / "server" / "pong", 65534, 65534)
    _, accept = site.serve("pong")
    site.serve("ping")  # this process serves both
    pending = accept()
    env = dict(site.irmd.env, PYTHONPATH=str(Path(__file__).resolve().parent.parent), HOME="/nonexistent")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                        DROP_ENC_CONF_AND_ALLOC, str(site.pki.base / "server" / "pong" / "enc.conf"), "pong"],
                       env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert "ALLOCATED" not in r.stdout, "uid 65534 got a plain flow to a server that requires encryption"
    assert "belongs to uid 65534" in r.stdout, r.stdout + r.stderr
    assert not pending.done()
    with site.alloc("ping", encrypt=True) as cli, pending.result(10) as srv:
        exchange(cli, srv)


# -- an anonymous impostor on another host ------------------------------------------------------------


ANSWER = r"""
import json
from flowlib import flow_accept
print("ready", flush=True)
while True:
    try:
        f = flow_accept(timeout=60)
        f.set_timeout(10)
        data = bytes(f.read())
    except Exception as e:
        print(json.dumps({"event": type(e).__name__}), flush=True)
        continue
    # Said before the answer: the test stops this process once the answer came.
    print(json.dumps({"read": data.decode(), "cypher_s": f.qos.cypher_s}), flush=True)
    f.write(b"got " + data)
"""


@pytest.mark.timeout(120)
def test_an_impostor_without_a_certificate_gets_no_encrypted_flow_for_a_name_a_ca_can_verify(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host A trusts the CA that certifies `files`; hostile host B serves `files` without a
    certificate (its admin bound a uid 65534 process to it). A's client, with no pin, is refused
    rather than encrypting to B; once B holds the name's certificate, the same flow works."""
    d = Path(tempfile.mkdtemp(prefix="oap-anon-", dir="/tmp"))
    d.chmod(0o755)
    monkeypatch.setenv("OUROBOROS_KNOWN_NAMES", str(d / "known_names"))  # no pins: the CA alone decides
    monkeypatch.delenv("OUROBOROS_STRICT_NAMES", raising=False)
    pki = Pki(d / "sec-a")
    pki.trust()
    port = str(free_port(["127.0.0.1", "127.0.0.2"]))
    hosts: list[IrmdProc] = []
    answer: subprocess.Popen[str] | None = None
    try:
        for name, sec in (("a", pki.base), ("b", d / "sec-b")):
            hosts.append(start_irmd(d, name, env={"OUROBOROS_SECURITY_DIR": str(sec)}))
        a, b = hosts
        for irmd, me, peer in ((a, "127.0.0.1", "127.0.0.2"), (b, "127.0.0.2", "127.0.0.1")):
            irmd.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "lan", "ip", me, "port", port,
                        "peer", peer)  # fmt: skip
            irmd.note_children()
        answer = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                   "-c", ANSWER], env=dict(b.env, PYTHONPATH=str(Path(__file__).parent.parent),
                                                           HOME="/nonexistent"),
                                  stdout=subprocess.PIPE, text=True, cwd="/")  # fmt: skip
        assert answer.stdout is not None and answer.stdout.readline() == "ready\n"
        b.irm_ok("bind", "process", str(answer.pid), "name", "files")
        b.irm_ok("name", "register", "files", "layer", "lan")
        client = IrmClient(a.sock)
        try:
            with pytest.raises(AuthenticationFailed, match=r"'files' must prove itself \(the flow is encrypted"):
                flow_alloc("files", timeout=15, encrypt=True, irm=client)
            Pki.serve_as(pki, "files", *pki.issue("files"))  # B gets the name's certificate, as the real server
            (d / "sec-b").mkdir(exist_ok=True)
            (pki.base / "server").rename(d / "sec-b" / "server")
            with flow_alloc("files", timeout=15, encrypt=True, irm=client) as f:
                assert f.peer is not None and (f.peer.name, f.peer.verified) == ("files", "ca")
                f.write(b"the password is hunter2")
                f.set_timeout(10)
                assert f.read() == b"got the password is hunter2"
        finally:
            client.close()
    finally:
        if answer is not None:
            answer.kill()
            out = answer.communicate(timeout=10)[0]
        for irmd in hosts:
            stop_irmd(irmd)
        shutil.rmtree(d, ignore_errors=True)
    reads = [line for line in out.splitlines() if '"read"' in line]
    assert reads == ['{"read": "the password is hunter2", "cypher_s": 256}'], out  # only the certified flow


# -- across a unicast layer ---------------------------------------------------------------------------


def _host(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, name: str, pki: Pki) -> UnicastHost:
    monkeypatch.setenv("OUROBOROS_SECURITY_DIR", str(pki.base))  # each host's irmd reads its own
    (host,) = cluster.start([name])
    return host


@pytest.mark.timeout(180)
def test_across_a_unicast_layer_the_named_server_is_reached_and_an_impostor_is_not(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real, client_side, impostor = Pki(tmp_path / "b"), Pki(tmp_path / "a"), Pki(tmp_path / "c", "Impostor CA")
    client_side.ca, client_side.ca_key = real.ca, real.ca_key
    client_side.trust()
    crt, key = real.issue("pong")
    real.serve_as("pong", crt, key)
    real.enc_conf("pong", "")
    crt, key = impostor.issue("pong")  # a certificate for the name, from a CA the client does not trust
    impostor.serve_as("pong", crt, key)
    a = _host(cluster, monkeypatch, "a", client_side)
    b = _host(cluster, monkeypatch, "b", real)
    c = _host(cluster, monkeypatch, "c", impostor)
    cluster.udp([a, b, c])
    a.irm_ok("ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
    for h, n in ((b, "n2"), (c, "n3")):
        h.irm_ok("ipcp", "enroll", "type", "unicast", "name", n, "layer", "net", "dst", "n1", "autobind")
        h.irm_ok("ipcp", "connect", "name", n, "dst", "n1")
    for h in (a, b, c):
        h.irmd.note_children()
    b.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    b.irm_ok("name", "register", "pong", "layer", "net")
    wait_for(lambda: "requires encryption" in a.irmd.run("oping", "-n", "pong", "-c", "1", timeout=30).stderr,
             60, "pong to refuse a plain flow, saying why, across the layer")  # fmt: skip
    r = a.irmd.run("oping", "-n", "pong", "-c", "3", "-i", "10", "--encrypt", timeout=60)
    assert "3 packets transmitted, 3 received" in r.stdout, r.stdout + r.stderr
    b.irm_ok("name", "unregister", "pong", "layer", "net")  # the impostor takes the name over
    c.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    c.irm_ok("name", "register", "pong", "layer", "net")
    deadline = time.monotonic() + 60
    while True:
        r = a.irmd.run("oping", "-n", "pong", "-c", "1", "--encrypt", timeout=30)
        if "vouches for" in r.stderr or time.monotonic() > deadline:
            break
        time.sleep(1)  # until the directory points at the impostor
    assert "neither this IRMd's CA store" in r.stderr and "1 received" not in r.stdout, r.stdout + r.stderr


@pytest.mark.timeout(30)
def test_the_strict_names_setting_decides_for_an_unknown_key_and_never_for_a_changed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$OUROBOROS_STRICT_NAMES (read only once a key is unknown): "yes" or unset refuses an unknown
    key, "accept-new" pins it; a changed key is refused either way, and a pinned one passes."""
    from cryptography.hazmat.primitives import serialization

    from flowlib.identity import KnownNames, server_identity

    known = KnownNames(tmp_path / "known_names")

    def reply(crt: bytes) -> m.FlowReply:
        return m.FlowReply(1, "local", 1400, qos.raw, "pong", peer_crt=crt)

    ours, other = (certificate("pong", new_key()).public_bytes(serialization.Encoding.DER) for _ in range(2))
    for strict in (None, "yes"):
        if strict is None:
            monkeypatch.delenv("OUROBOROS_STRICT_NAMES", raising=False)
        else:
            monkeypatch.setenv("OUROBOROS_STRICT_NAMES", strict)
        with pytest.raises(AuthenticationFailed, match="accept-new"):
            server_identity("pong", reply(ours), known=known)
    monkeypatch.setenv("OUROBOROS_STRICT_NAMES", "accept-new")
    first = server_identity("pong", reply(ours), known=known)
    assert first is not None and first.verified == "new"
    with pytest.raises(AuthenticationFailed, match="has CHANGED"):
        server_identity("pong", reply(other), known=known)
    again = server_identity("pong", reply(ours), known=known)
    assert again is not None and again.verified == "pinned"
