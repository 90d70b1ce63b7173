"""Shared fixtures: a real IRMd per test, the irm CLI against it, a local layer, flowlib clients.

Every IRMd runs on its own socket under tmp_path and is always stopped at
teardown (SIGTERM, then SIGKILL), after which the fixture checks that it
exited cleanly, removed its socket and left none of its children behind.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import IrmdProc, start_irmd, stop_irmd
from hypothesis import settings
from unicast_net import Cluster

import flowlib.irm
from flowlib.irm import IrmClient, call
from proto import messages as m


def _raise_nofile() -> None:
    """The 1,000-flow test holds two fds per flow in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_nofile()


def _interruptible() -> None:
    """A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would
    every process a test starts: Ctrl-C could not reach them as it reaches a user's. A handler of our
    own resets it to the default in every program started from here."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_interruptible()

# Hypothesis's per-example deadline is a timing assertion: on two shared CPUs running other
# tests (xdist workers, IRMds) a slow example is load, not a bug. Every test has a timeout.
settings.register_profile("shared-cpus", deadline=None)
settings.load_profile("shared-cpus")

# The tests' order, for the workers to finish together: longest first (seconds from a full run, in
# durations.json; a test not listed is short). Tests sharing a module-scoped fixture (a lab of daemons)
# form one xdist_group, run on one worker as one unit; with --dist loadgroup --no-loadscope-reorder a
# free worker takes the next unit in this order.
DURATIONS = json.loads((Path(__file__).parent / "durations.json").read_text())


@pytest.hookimpl(tryfirst=True)  # before xdist appends the group to the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def unit(item: pytest.Item) -> str:
        group = item.get_closest_marker("xdist_group")
        return f"@{group.args[0] if group.args else group.kwargs['name']}" if group else item.nodeid

    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs is not None and any(d[-1].scope == "module" for d in defs.name2fixturedefs.values())
        if shared and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    units = {item: unit(item) for item in items}
    seconds: dict[str, float] = {}
    for item, name in units.items():
        seconds[name] = seconds.get(name, 0.0) + DURATIONS.get(item.nodeid, 0.0)
    items.sort(key=lambda item: -seconds[units[item]])  # stable: a unit's tests stay in their order


@pytest.fixture
def irmd(tmp_path: Path) -> Iterator[IrmdProc]:
    """A real irmd on its own socket, stopped and checked at teardown."""
    proc = start_irmd(tmp_path)
    try:
        yield proc
    finally:
        stop_irmd(proc)


@pytest.fixture
def irm(irmd: IrmdProc) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`irm(*args)` runs the irm CLI against the test's irmd."""
    return irmd.irm


@pytest.fixture
def local_layer(irmd: IrmdProc) -> str:
    """A bootstrapped local IPCP 'lo' in layer 'local'; returns the layer name."""
    irmd.request(m.IpcpBootstrap("lo", "local", "local"))
    irmd.note_children()
    return "local"


@pytest.fixture
def client_factory(irmd: IrmdProc) -> Iterator[Callable[[], IrmClient]]:
    """New in-process IRMd connections (IrmClient) for this test's irmd, closed at teardown."""
    clients: list[IrmClient] = []

    def make() -> IrmClient:
        c = IrmClient(irmd.sock)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def default_client(irmd: IrmdProc, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point flowlib's per-process default client at this test's irmd (and drop it after)."""
    monkeypatch.setenv("OUROBOROS_SOCK", str(irmd.sock))
    monkeypatch.setattr(flowlib.irm, "_default", None)
    yield
    client = flowlib.irm._default
    if client is not None:
        client.close()


@pytest.fixture
def bound_name(irmd: IrmdProc, local_layer: str, client_factory: Callable[[], IrmClient]) -> str:
    """A name this test process is bound to and that is registered in the local layer."""
    name = "tester"
    # What irm would send, over a connection of this process that stays open for the test
    # (a process's bindings end with its last connection to the IRMd).
    keeper = client_factory()
    call(keeper.channel, m.NameCreate(name, "round-robin"), timeout=30)  # a name made by a bind spills over
    call(keeper.channel, m.Bind("process", str(os.getpid()), name), timeout=30)
    call(keeper.channel, m.NameRegister(name, [local_layer]), timeout=30)
    return name


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Hosts on loopback, one IRMd each (tests/unicast_net.py), all stopped at the end."""
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()
