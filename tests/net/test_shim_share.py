"""A shim IPCP's flows are shared among local users: eth-llc has 62 endpoints (its LLC SAPs), and one
user allocating flows a remote server accepts, or serving flows others allocate, once took all of them,
and root's flows (and every other user's) were refused `all 62 endpoint ids are in use`.

Each non-admin user holds at most a share of an IPCP's flows (`ipcp_share_per_uid`, half), and all users
together a larger one (`ipcp_share_users`); the rest is the admins'. The attacker is uid 65534 (setpriv),
across two network namespaces joined by a veth pair, so these tests need root and `ip netns`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Host
from helpers import BIN, HOLD_FLOWS_TO, wait_for

from flowlib.flow import Flow
from flowlib.irm import IrmClient
from proto.errors import FlowError

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("setpriv") is None,
        reason="playing an unprivileged user needs root and setpriv (util-linux)",
    ),
]

LAYER = "llc"
SAPS = 62  # eth-llc's endpoints: LLC SAPs 2 to 63
NOBODY = 65534


def as_user(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


# Accepts every flow for the name it is bound to and holds it; prints how many it holds as they come.
SERVE = """
import time
from flowlib.irm import IrmClient
client, held = IrmClient(), []
print("ready", flush=True)
while True:
    try:
        held.append(client.accept(30))
    except Exception as e:
        print("accept:", e, flush=True)
        time.sleep(0.2)
        continue
    print("holds", len(held), flush=True)
"""


@contextlib.contextmanager
def process(argv: list[str], host: Host, log: Path, ready: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process of another user against `host`'s irmd, until the end of the block."""
    env = {**{k: v for k, v in host.irmd.env.items() if k != "XDG_CONFIG_HOME"}, "HOME": "/nonexistent"}
    with open(log, "wb") as out:
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd="/")
    try:
        wait_for(lambda: ready in log.read_text() or p.poll() is not None, 60, f"{argv[-3:]} to get going")
        assert p.poll() is None, log.read_text()
        yield p
    finally:
        p.kill()
        p.wait()


@contextlib.contextmanager
def root_server(host: Host, name: str) -> Iterator[list[Flow]]:
    """This process, root, accepts every flow for `name` at `host` (and holds it)."""
    host.irmd.irm_ok("bind", "process", str(os.getpid()), "name", name)
    host.irmd.irm_ok("name", "register", name, "layer", LAYER)
    client = IrmClient(host.irmd.sock)
    held: list[Flow] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                reply, fd = client.accept(0.5)
                held.append(Flow(reply, fd, client))

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield held
    finally:
        stop.set()
        t.join(5)
        for flow in held:
            with contextlib.suppress(Exception):
                flow.close()
        client.close()


def allocate(host: Host, name: str, n: int) -> tuple[list[Flow], list[str]]:
    """Root allocates `n` flows to `name` from `host`: (the flows, the errors)."""
    client = IrmClient(host.irmd.sock)
    flows, errors = [], []
    for _ in range(n):
        try:
            reply, fd = client.alloc(name, None, 10)
            flows.append(Flow(reply, fd, client))
        except FlowError as e:
            errors.append(f"{e.code} {e}")
    return flows, errors


def close(flows: list[Flow]) -> None:
    for flow in flows:
        with contextlib.suppress(Exception):
            flow.close()


@pytest.fixture
def llc(two_hosts: tuple[Host, Host]) -> Iterator[tuple[Host, Host]]:
    """Hosts a and b in an eth-llc layer, their irmds' sockets reachable by every user."""
    a, b = two_hosts
    os.chmod(a.irmd.sock.parent, 0o755)
    for host in (a, b):
        host.irmd.irm_ok("ipcp", "bootstrap", "type", "eth-llc", "name", "e", "layer", LAYER, "dev", host.dev)
        host.irmd.note_children()
    yield a, b


@pytest.mark.timeout(240)
def test_one_user_allocating_flows_takes_at_most_its_share_of_a_shims_endpoints(
    llc: tuple[Host, Host], tmp_path: Path
) -> None:
    """uid 65534 at host a allocates flows to root's server at b until refused: it gets half of eth-llc's
    62 endpoints, then EDQUOT naming the IPCP and the limit. A second user gets what is left of the users'
    share, and root still allocates beside them."""
    a, b = llc
    logs = Path(a.irmd.sock).parent
    with root_server(b, "sink"):
        hog = [*as_user(NOBODY), str(BIN / "python"), "-c", HOLD_FLOWS_TO, "sink", str(SAPS + 2)]
        with process(hog, a, logs / "hog.log", "then"):
            got = (logs / "hog.log").read_text()
            assert got.startswith(f"{SAPS // 2} then EDQUOT"), got
            assert "ipcp 'e'" in got and f"layer {LAYER!r}" in got and "ipcp_share_per_uid" in got, got
            other = [*as_user(NOBODY - 1), str(BIN / "python"), "-c", HOLD_FLOWS_TO, "sink", str(SAPS)]
            with process(other, a, logs / "other.log", "then"):
                got = (logs / "other.log").read_text()
                users = SAPS * 3 // 4  # ipcp_share_users: 75%
                assert got.startswith(f"{users - SAPS // 2} then EDQUOT"), got
                assert "ipcp_share_users" in got, got
                flows, errors = allocate(a, "sink", 4)  # root: not counted, and there is room
                close(flows)
                assert not errors and len(flows) == 4, errors


@pytest.mark.timeout(240)
def test_flows_a_users_server_accepts_count_against_its_share_and_roots_server_still_gets_its_own(
    llc: tuple[Host, Host], tmp_path: Path
) -> None:
    """uid 65534's server at b accepts every flow for its name, which root at a allocates again and again:
    b's IRMd lets it hold half of the shim's endpoints and refuses the rest of its arrivals; root's own
    server at b still gets flows."""
    a, b = llc
    logs = Path(b.irmd.sock).parent
    srv = [*as_user(NOBODY), str(BIN / "python"), "-c", SERVE]
    with process(srv, b, logs / "srv.log", "ready") as p, root_server(b, "sink") as roots:
        b.irmd.irm_ok("bind", "process", str(p.pid), "name", "usink")  # the admin binds the user's server
        b.irmd.irm_ok("name", "register", "usink", "layer", LAYER)
        flows, errors = allocate(a, "usink", SAPS // 2 + 4)
        try:
            assert len(flows) == SAPS // 2, (len(flows), errors)
            assert len(errors) == 4, errors
            wait_for(lambda: f"holds {SAPS // 2}\n" in (logs / "srv.log").read_text(), 20, "the user's server")
            mine, errors = allocate(a, "sink", 4)
            close(mine)
            assert not errors and len(mine) == 4, errors
            wait_for(lambda: len(roots) == 4, 20, "root's server to get its flows")
        finally:
            close(flows)
