"""Authenticated and encrypted flows between C Ouroboros 0.23 and ours, both ways over udp4: names
with certificates from one test CA that both irmds trust, enc.conf policies, client certificates,
and the refusals that must say why (an untrusted or missing identity, a plain flow to a name that
requires encryption). Each side keeps its security files as 0.23 does; the C irmd's directory
(compiled in) is bound over from the test's, inside its own mount namespace."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BIN, wait_for
from pki import Pki, certificate, new_key

from flowlib import flow_accept, flow_alloc, qos
from flowlib.irm import IrmClient
from proto.errors import AuthenticationFailed, EncryptionFailed, FlowError, FlowTimeout

pytest.importorskip("test_interop", reason="needs the C interop harness (tests/net/test_interop.py)")
from test_interop import C_PAUSE, C_TRIES, LAYER, CNode, Pair, c_alloc, c_ouroboros, c_tries, pair, received  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.net, pytest.mark.timeout(180)]


def c_security_dir(prefix: Path) -> Path:
    """Where the C irmd looks for its security files: compiled in (GNUInstallDirs' sysconfdir)."""
    binary = (prefix / "sbin" / "irmd").read_bytes()
    found = re.search(rb"(/[\x21-\x7e]*?/ouroboros/security)/cacert\x00", binary)
    assert found, f"no security directory in {prefix}/sbin/irmd"
    return Path(found.group(1).decode())


@pytest.fixture
def security(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Pki, Pki]:
    """(ours, C's): two security directories and one CA both trust; our irmd and flowlib use ours."""
    ours, theirs = Pki(tmp_path / "security-ours"), Pki(tmp_path / "security-c")
    theirs.ca, theirs.ca_key = ours.ca, ours.ca_key
    ours.trust()
    theirs.trust()
    monkeypatch.setenv("OUROBOROS_SECURITY_DIR", str(ours.base))  # before `pair` starts our irmd
    monkeypatch.setenv("OUROBOROS_KNOWN_NAMES", str(tmp_path / "known_names"))
    monkeypatch.delenv("OUROBOROS_STRICT_NAMES", raising=False)
    return ours, theirs


def restart_c(p: Pair, security_dir: Path) -> subprocess.Popen[bytes]:
    """The C irmd again, in its network namespace, with `security_dir` bound where it looks: it
    loads its CA store when it starts. Mounts are its own (a private mount namespace)."""
    target = c_security_dir(p.c.prefix)
    top = target
    while not top.exists():
        top = top.parent
    if top in (Path("/"), Path("/etc")):
        pytest.skip(f"{target} is not under a directory a tmpfs may cover for one C irmd")
    cover = "" if top == target else f"mount -t tmpfs tmpfs {top} && mkdir -p {target} && "
    p.c.proc.terminate()
    p.c.proc.wait(10)
    script = (f"mount -t tmpfs tmpfs /dev/shm && mkdir -p /var/run/ouroboros && mount -t tmpfs tmpfs "
              f"/var/run/ouroboros && {cover}mount --bind {security_dir} {target} && exec env "
              f"{' '.join(p.c.env)} irmd --stdout")  # fmt: skip
    log = p.lab.tmp / "c-irmd-secure.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", p.c.ns, "unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    p.c = CNode(p.c.ns, p.c.prefix, log, proc)
    wait_for(lambda: proc.poll() is not None or p.c.run("irm", "ipcp", "list").returncode == 0, 10, "the C irmd")
    assert proc.poll() is None, f"the C irmd exited:\n{p.c.log_text()}"
    return proc


@pytest.fixture
def secure(security: tuple[Pki, Pki], pair: Pair) -> Iterator[tuple[Pair, Pki, Pki]]:  # noqa: F811
    """(`security` first: our irmd starts in `pair` and reads its directory from the environment.)
    The udp layer both sides bootstrap as 0.23's documentation does; ours names the C node a peer: a
    signed OAP response (a certificate, ~0.7 kB) is more than 3 times a C request, the most our udp
    IPCP answers an address nothing vouches for (anti-amplification)."""
    proc = restart_c(pair, security[1].base)
    try:
        pair.c.bootstrap("type", "udp4", "name", "u", "layer", LAYER, "ip", pair.c_ip)
        pair.ours.irmd.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", LAYER,
                              "ip", pair.our_ip, "peer", pair.c_ip)  # fmt: skip
        yield pair, *security
    finally:
        for c_proc in pair.procs:
            c_proc.kill()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def identity(pki: Pki, name: str, role: str = "server", enc: str | None = None, trusted: bool = True) -> None:
    if trusted:
        crt, key = pki.issue(name)
    else:
        key = new_key()
        crt = certificate(name, key)  # self-signed: no CA vouches for it
    pki.serve_as(name, crt, key, role)
    if enc is not None:
        pki.enc_conf(name, enc, role)


def c_pings_refused(p: Pair, why: Callable[[], bool]) -> None:
    """C's oping to py-pong gets no answer, tried again (C 0.23 under load loses a request before
    it reaches us, as c_tries) until `why` shows the refusal was the reason."""
    for _ in range(C_TRIES):
        r = p.c.run("oping", "-n", "py-pong", "-c", "1", timeout=60)
        assert not received(r.stdout, 1), r.stdout + p.logs()
        if why():
            return
        time.sleep(C_PAUSE)
    pytest.fail(f"C's oping was never refused for the reason expected:{p.logs()}")


ECHO_REQUEST, ECHO_REPLY = 0, 1  # 0.23 oping's message types (a 32-bit type in network order first)


def ping_c(p: Pair, name: str, **kw: object) -> tuple[object, int]:
    """Our flow to C's `oping --listen` for `name`, one ping answered on it: (flow.peer,
    flow.qos.cypher_s). oping, not oecho, serves: 0.23's oecho exits when an accept fails, as one does
    under load when C's udp4 IPCP answers before it noted where the request came from, and each try
    after that raced the C irmd's 1 s for a newly started oecho to accept; oping accepts on."""
    irm = IrmClient(p.ours.irmd.sock)
    body = struct.pack("!IIQQ", ECHO_REQUEST, 7, 0, 0) + b"Client says hi!"
    try:
        with c_alloc(lambda: flow_alloc(name, qos.raw, 10, irm=irm, **kw)) as flow:  # type: ignore[arg-type]
            flow.set_timeout(10)
            flow.write(body)
            assert flow.read() == struct.pack("!I", ECHO_REPLY) + body[4:]
            return flow.peer, flow.qos.cypher_s
    except FlowError as e:
        e.add_note(p.logs())  # what each irmd saw, in the report of a test that did not expect this
        raise
    finally:
        irm.close()


def c_refuses(p: Pair, error: type[FlowError], c_says: str, **kw: object) -> None:
    """Our flow to C's c-pong fails with `error` ("refused"), C's log saying why (`c_says`). Or it
    times out while C's log shows that refusal: under load 0.23's udp4 IPCP may lose the refusal
    it was handed (it answers before it noted where the request came from, or its irmd's call to
    it times out: "IPCP alloc_resp timed out"). The refusal is C's to make, not its delivery."""
    try:
        ping_c(p, "c-pong", **kw)
    except error as e:
        assert "refused" in str(e)
    except FlowTimeout as e:
        c_log = p.c.log_text()
        if not (c_says in c_log and "OAP processing failed for c-pong" in c_log):
            raise AssertionError(f"no refusal from C in its log: {e}") from e
    else:
        pytest.fail(f"C allocated a flow it should have refused ({c_says})")
    assert c_says in p.c.log_text(), p.logs()


# -- ours to C ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "enc",
    ["", "cipher=chacha20-poly1305\nkex=X25519\n", "kex=secp384r1\ncipher=aes-128-gcm\n"],
    ids=["defaults", "chacha-x25519", "p384-aes128"],
)
def test_we_reach_a_c_server_that_requires_encryption_and_proves_its_name(
    secure: tuple[Pair, Pki, Pki], enc: str
) -> None:
    p, ours, theirs = secure
    identity(theirs, "c-pong", enc=enc)
    p.c_serve("c-pong", "oping", "--listen")
    if "secp384r1" in enc:
        ours.enc_conf("c-pong", "kex=secp384r1\n", role="client")  # X25519 ranks below what C asks
    peer, bits = ping_c(p, "c-pong", encrypt=True)
    assert peer is not None and (peer.name, peer.verified) == ("c-pong", "ca")  # type: ignore[attr-defined]
    assert bits == 256  # the stronger of the two sides' ciphers: ours (AES-256-GCM) over C's AES-128-GCM


def test_our_oping_reaches_a_c_oping_server_encrypted(secure: tuple[Pair, Pki, Pki]) -> None:
    p, _, theirs = secure
    identity(theirs, "c-pong", enc="")
    p.c_serve("c-pong", "oping", "--listen")
    r = c_tries(lambda: p.ours.irmd.run("oping", "-n", "c-pong", "-c", "3", "-i", "100", "--encrypt", timeout=60))
    assert received(r.stdout, 3), r.stdout + r.stderr + p.logs()


def test_a_c_server_refuses_our_plain_flow_when_it_requires_encryption(secure: tuple[Pair, Pki, Pki]) -> None:
    p, _, theirs = secure
    identity(theirs, "c-pong", enc="")
    p.c_serve("c-pong", "oping", "--listen")
    c_refuses(p, EncryptionFailed, "KEX requested without info")


def test_a_c_server_we_cannot_vouch_for_is_refused_until_pinned(secure: tuple[Pair, Pki, Pki]) -> None:
    p, _, theirs = secure
    identity(theirs, "c-pong", enc="", trusted=False)
    p.c_serve("c-pong", "oping", "--listen")  # serves many flows: an abandoned one holds nothing up

    def oping(**env: str) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "oping"), "-n", "c-pong", "-c", "3", "-i", "100", "--encrypt"]
        return c_tries(
            lambda: subprocess.run(argv, env={**p.ours.irmd.env, **env}, capture_output=True, text=True, timeout=60)
        )

    r = oping()
    assert not received(r.stdout, 3) and "neither this IRMd's CA store nor" in r.stderr, r.stdout + r.stderr
    r = oping(OUROBOROS_STRICT_NAMES="accept-new")
    assert received(r.stdout, 3), r.stdout + r.stderr + p.logs()
    known = Path(os.environ["OUROBOROS_KNOWN_NAMES"]).read_text()
    assert known.startswith("c-pong SHA256:") and "CN=c-pong" in known
    r = oping()  # pinned now
    assert received(r.stdout, 3), r.stdout + r.stderr + p.logs()


def test_our_client_certificate_is_verified_by_the_c_server(secure: tuple[Pair, Pki, Pki]) -> None:
    p, ours, theirs = secure
    identity(theirs, "c-pong", enc="")
    identity(ours, "c-pong", role="client")  # a client certificate from the CA C trusts
    p.c_serve("c-pong", "oping", "--listen")
    ping_c(p, "c-pong", encrypt=True)
    identity(ours, "c-pong", role="client", trusted=False)  # one C cannot verify: refused there
    c_refuses(p, AuthenticationFailed, "Failed to authenticate client", encrypt=True)


# -- C to ours ----------------------------------------------------------------------------------


@pytest.mark.parametrize("enc", ["", "cipher=chacha20-poly1305\n"], ids=["defaults", "chacha"])
def test_a_c_client_reaches_our_server_that_requires_encryption(secure: tuple[Pair, Pki, Pki], enc: str) -> None:
    p, ours, theirs = secure
    identity(ours, "py-pong", enc=enc)
    theirs.enc_conf("py-pong", "", role="client")  # C encrypts only where its client enc.conf says so
    p.serve("py-pong", "oping", "--listen")
    r = c_tries(lambda: p.c.run("oping", "-n", "py-pong", "-c", "3", "-i", "100", timeout=60))
    assert received(r.stdout, 3), r.stdout + r.stderr + p.logs()


def test_a_plain_c_client_is_refused_by_our_server_that_requires_encryption(secure: tuple[Pair, Pki, Pki]) -> None:
    p, ours, _ = secure
    identity(ours, "py-pong", enc="")
    p.serve("py-pong", "oping", "--listen")
    c_pings_refused(p, lambda: "'py-pong' requires encryption" in p.ours.irmd.log_text())


def test_a_c_client_refuses_our_server_when_its_ca_cannot_vouch_for_it(secure: tuple[Pair, Pki, Pki]) -> None:
    p, ours, theirs = secure
    identity(ours, "py-pong", enc="", trusted=False)
    theirs.enc_conf("py-pong", "", role="client")
    p.serve("py-pong", "oping", "--listen")
    c_pings_refused(p, lambda: "Failed to authenticate server" in p.c.log_text() or "verify" in p.c.log_text())


def test_a_c_client_certificate_names_the_client_to_our_server(secure: tuple[Pair, Pki, Pki]) -> None:
    p, ours, theirs = secure
    identity(ours, "py-peer", enc="")
    crt, key = theirs.issue("c-client")
    theirs.serve_as("py-peer", crt, key, role="client")  # what C presents when it allocates to py-peer
    theirs.enc_conf("py-peer", "", role="client")
    p.ours.irmd.irm_ok("bind", "process", str(os.getpid()), "name", "py-peer")
    p.ours.irmd.irm_ok("name", "register", "py-peer", "layer", LAYER)
    p.c.ok("irm", "name", "create", "py-peer")  # 0.23 allocates only to names it knows
    server = IrmClient(p.ours.irmd.sock)
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(flow_accept, None, 30, irm=server)
            p.c_spawn("c-client", "oping", "-n", "py-peer", "-c", "1")
            with pending.result(40) as flow:
                assert flow.peer is not None and (flow.peer.name, flow.peer.verified) == ("c-client", "ca")
                assert flow.qos.cypher_s == 256
    finally:
        server.close()


def test_encrypted_reliable_flows_both_ways(secure: tuple[Pair, Pki, Pki]) -> None:
    p, ours, theirs = secure
    identity(theirs, "c-pong", enc="")
    identity(ours, "py-pong", enc="")
    theirs.enc_conf("py-pong", "", role="client")
    p.c_serve("c-pong", "oping", "--listen")
    p.serve("py-pong", "oping", "--listen")
    r = c_tries(
        lambda: p.ours.irmd.run("oping", "-n", "c-pong", "-c", "3", "-i", "100", "-q", "data", "--encrypt", timeout=60)
    )
    assert received(r.stdout, 3), "ours -> C: " + r.stdout + r.stderr + p.logs()
    r = c_tries(lambda: p.c.run("oping", "-n", "py-pong", "-c", "3", "-i", "100", "-q", "data", timeout=60))
    assert received(r.stdout, 3), "C -> ours: " + r.stdout + r.stderr + p.logs()
