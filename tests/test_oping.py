"""oping end to end over the local layer, with the server started on demand by the IRMd."""

from __future__ import annotations

import re
import time

import pytest
from helpers import IrmdProc


@pytest.fixture
def pong(irmd: IrmdProc, local_layer: str) -> str:
    """'pong' served by `oping -l`, which the IRMd starts when a flow arrives."""
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    return "pong"


def test_oping_gets_every_reply_from_an_auto_started_server(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "3", "-i", "10")
    assert r.returncode == 0, r.stderr
    assert "3 packets transmitted, 3 received" in r.stdout
    assert "0% packet loss" in r.stdout
    assert r.stdout.count(f"64 bytes from {pong}: seq=") == 3


def test_oping_reuses_the_running_server_for_a_second_ping(irmd: IrmdProc, pong: str) -> None:
    irmd.run("oping", "-n", pong, "-c", "1")
    r = irmd.run("oping", "-n", pong, "-c", "2", "-i", "10", "-s", "1000", "-Q")
    assert "2 packets transmitted, 2 received" in r.stdout
    assert "seq=" not in r.stdout  # quiet
    log = irmd.log_text()
    assert len(re.findall(r"INFO started \S*oping -l \(pid \d+\) for 'pong'", log)) == 1
    assert log.count("New flow") == 2  # the server's output: both flows went to the one server


def test_oping_to_an_unregistered_name_fails_fast_saying_not_found(irmd: IrmdProc, local_layer: str) -> None:
    start = time.monotonic()
    r = irmd.run("oping", "-n", "nobody", "-c", "1")
    assert time.monotonic() - start < 5.0
    assert r.returncode != 0
    assert "not found" in r.stderr


def test_oping_with_no_layer_up_fails_fast_saying_not_found(irmd: IrmdProc) -> None:
    start = time.monotonic()
    r = irmd.run("oping", "-n", "nobody", "-c", "1")
    assert time.monotonic() - start < 5.0
    assert r.returncode != 0 and "not found" in r.stderr


def test_oping_to_a_registered_name_nobody_serves_fails_with_a_reason(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("name", "register", "idle", "layer", local_layer)
    start = time.monotonic()
    r = irmd.run("oping", "-n", "idle", "-c", "1")
    assert time.monotonic() - start < 5.0
    assert r.returncode != 0 and "no process is accepting flows for 'idle'" in r.stderr


def test_oping_after_unregister_fails_saying_not_found(irmd: IrmdProc, pong: str, local_layer: str) -> None:
    irmd.irm_ok("name", "unregister", pong, "layer", local_layer)
    r = irmd.run("oping", "-n", pong, "-c", "1")
    assert r.returncode != 0 and "not found" in r.stderr


def test_oping_without_a_server_name_is_a_usage_error(irmd: IrmdProc) -> None:
    r = irmd.run("oping", "-c", "1")
    assert r.returncode == 2 and "No server specified" in r.stderr


def test_oping_works_over_a_local_layer_with_another_hash(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local", "hash", "SHA3_512")
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", "local")
    r = irmd.run("oping", "-n", "pong", "-c", "2", "-i", "10")
    assert "2 packets transmitted, 2 received" in r.stdout, r.stderr


def test_oping_with_a_reliable_qos_gets_every_reply(irmd: IrmdProc, pong: str) -> None:
    r = irmd.run("oping", "-n", pong, "-c", "3", "-i", "10", "-q", "data")
    assert "3 packets transmitted, 3 received" in r.stdout, r.stderr
