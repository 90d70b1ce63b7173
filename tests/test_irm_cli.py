"""The irm tool against a real IRMd: exit codes, messages, tables, bindings, registrations."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from helpers import BIN, IrmdProc, accepted_pair, irmd_env, parse_table, pid_alive, wait_for

from flowlib import qos
from flowlib.irm import IrmClient

IrmFn = Callable[..., subprocess.CompletedProcess[str]]


def test_successful_command_exits_zero_and_reports(irm: IrmFn) -> None:
    r = irm("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local")
    assert r.returncode == 0
    assert "ipcp lo is in layer local" in r.stdout


def test_unknown_word_exits_nonzero_naming_the_word(irm: IrmFn) -> None:
    r = irm("ipcp", "frobnicate", "name", "x")
    assert r.returncode != 0
    assert '"frobnicate" is unknown' in r.stderr


def test_bad_value_exits_nonzero_naming_the_expected_form(irm: IrmFn) -> None:
    r = irm("ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4", "ip", "1.2.3.4", "port", "70000")
    assert r.returncode != 0
    assert 'bad port "70000": expected a number from 1 to 65535' in r.stderr


def test_request_the_irmd_refuses_exits_nonzero_with_its_reason(irm: IrmFn) -> None:
    r = irm("ipcp", "destroy", "name", "ghost")
    assert r.returncode != 0
    assert "ipcp 'ghost' not found" in r.stderr


def test_irm_without_an_irmd_exits_nonzero_saying_it_cannot_reach_it(tmp_path: Path) -> None:
    r = subprocess.run([str(BIN / "irm"), "ipcp", "list"], env=irmd_env(tmp_path / "none.sock"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "cannot reach the IRMd" in r.stderr


def test_irm_help_prints_the_grammar_and_exits_zero(irmd: IrmdProc) -> None:
    r = irmd.irm("help")
    assert r.returncode == 0
    assert "irm ipcp bootstrap" in r.stdout and "unique prefix" in r.stdout


def test_empty_tables_print_none(irmd: IrmdProc) -> None:
    for args in (("ipcp", "list"), ("name", "list"), ("flow", "list")):
        assert irmd.irm_ok(*args).stdout.strip() == "(none)"


def test_ipcp_list_shows_the_bootstrapped_ipcp(irmd: IrmdProc, local_layer: str) -> None:
    rows = irmd.table("ipcp", "list")
    assert len(rows) == 1
    row = rows[0]
    assert (row["name"], row["type"], row["layer"], row["state"]) == ("lo", "local", local_layer, "operational")
    assert os.path.exists(f"/proc/{row['pid']}")


def test_ipcp_list_filters_by_name_layer_and_type(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("ipcp", "create", "name", "idle", "type", "local")
    assert {r["name"] for r in irmd.table("ipcp", "list")} == {"lo", "idle"}
    assert [r["name"] for r in irmd.table("ipcp", "list", "layer", local_layer)] == ["lo"]
    assert [r["name"] for r in irmd.table("ipcp", "list", "name", "idle")] == ["idle"]
    assert irmd.table("ipcp", "list", "type", "udp4") == []


def test_created_ipcp_is_in_init_state_until_bootstrapped(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
    assert irmd.table("ipcp", "list")[0]["state"] == "init"
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local")
    assert irmd.table("ipcp", "list")[0]["state"] == "operational"


def test_creating_an_ipcp_twice_is_refused(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
    r = irmd.irm("ipcp", "create", "name", "lo", "type", "local")
    assert r.returncode != 0 and "already exists" in r.stderr


def test_bootstrap_of_a_second_ipcp_into_the_same_layer_is_refused(irmd: IrmdProc, local_layer: str) -> None:
    r = irmd.irm("ipcp", "bootstrap", "name", "lo2", "layer", local_layer, "type", "local")
    assert r.returncode != 0 and "already has an IPCP" in r.stderr


def test_ipcp_destroy_stops_its_process(irmd: IrmdProc, local_layer: str) -> None:
    pid = irmd.ipcp_pid("lo")
    irmd.irm_ok("ipcp", "destroy", "name", "lo")
    assert irmd.table("ipcp", "list") == []
    wait_for(lambda: not pid_alive(pid), 5, "the destroyed IPCP to exit")


def test_autobind_binds_the_ipcp_to_its_name_and_layer(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local", "autobind")
    pid = irmd.ipcp_pid("lo")
    names = {r["name"]: r for r in irmd.table("name", "list")}
    assert names["lo"]["pids"] == names["local"]["pids"] == str(pid)


def test_name_create_and_destroy(irmd: IrmdProc) -> None:
    irmd.irm_ok("name", "create", "pong", "lb", "spillover")
    assert [(r["name"], r["lb"]) for r in irmd.table("name", "list")] == [("pong", "spillover")]
    irmd.irm_ok("name", "destroy", "pong")
    assert irmd.table("name", "list") == []


def test_name_create_twice_is_refused(irmd: IrmdProc) -> None:
    irmd.irm_ok("name", "create", "pong")
    r = irmd.irm("name", "create", "pong")
    assert r.returncode != 0 and "already exists" in r.stderr


def test_name_register_creates_the_name_and_lists_its_layer(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("n", "r", "pong", "l", local_layer)
    assert [(r["name"], r["layers"]) for r in irmd.table("name", "list")] == [("pong", local_layer)]


def test_name_register_in_an_unknown_layer_is_refused_naming_it(irmd: IrmdProc, local_layer: str) -> None:
    r = irmd.irm("name", "register", "pong", "layer", "nowhere")
    assert r.returncode != 0 and "layer 'nowhere' not found" in r.stderr


def test_name_unregister_removes_the_layer(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    irmd.irm_ok("name", "unregister", "pong", "layer", local_layer)
    assert irmd.table("name", "list")[0]["layers"] == "-"


def test_destroying_a_registered_name_is_refused(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    r = irmd.irm("name", "destroy", "pong")
    assert r.returncode != 0 and "unregister it first" in r.stderr


def test_bind_process_lists_the_pid_and_unbind_removes_it(irmd: IrmdProc) -> None:
    me = str(os.getpid())
    irmd.irm_ok("bind", "process", me, "name", "srv")
    assert irmd.table("name", "list")[0]["pids"] == me
    irmd.irm_ok("unbind", "process", me, "name", "srv")
    assert irmd.table("name", "list")[0]["pids"] == "-"


def test_bind_of_a_nonexistent_process_is_refused(irmd: IrmdProc) -> None:
    r = irmd.irm("bind", "process", "999999999", "name", "srv")
    assert r.returncode != 0 and "no process with pid 999999999" in r.stderr


def test_unbind_of_an_unbound_process_is_refused(irmd: IrmdProc) -> None:
    irmd.irm_ok("name", "create", "srv")
    r = irmd.irm("unbind", "process", str(os.getpid()), "name", "srv")
    assert r.returncode != 0 and "is not bound" in r.stderr


def test_bind_program_lists_its_path_and_auto(irmd: IrmdProc) -> None:
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    assert irmd.table("name", "list")[0]["programs"] == f"{BIN / 'oping'} (auto)"


def test_unbind_program_removes_it(irmd: IrmdProc) -> None:
    irmd.irm_ok("bind", "program", "oping", "name", "pong")
    irmd.irm_ok("unbind", "program", "oping", "name", "pong")
    assert irmd.table("name", "list")[0]["programs"] == "-"


def test_bind_ipcp_binds_its_pid(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("bind", "ipcp", "lo", "name", "mgmt")
    assert irmd.table("name", "list")[0]["pids"] == str(irmd.ipcp_pid("lo"))


def test_flow_list_shows_both_ends_of_an_allocated_flow(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str, local_layer: str
) -> None:
    cli, srv = accepted_pair(client_factory(), client_factory(), bound_name, qos.data)
    with cli, srv:
        rows = irmd.table("flow", "list")
    assert sorted((r["id"], r["role"]) for r in rows) == sorted(
        [(str(cli.flow_id), "src"), (str(srv.flow_id), "dst")])
    for row in rows:
        assert (row["pid"], row["name"], row["layer"], row["ipcp"], row["state"], row["mtu"], row["qos"]) == (
            str(os.getpid()), bound_name, local_layer, "lo", "allocated", "65535", "reliable")


def test_tables_have_a_header_and_ruled_borders(irmd: IrmdProc, local_layer: str) -> None:
    lines = irmd.irm_ok("ipcp", "list").stdout.splitlines()
    assert lines[0].startswith("+-") and lines[2].startswith("+-") and lines[-1].startswith("+-")
    assert [c.strip() for c in lines[1].strip("|").split("|")] == ["pid", "name", "type", "layer", "state"]
    assert len(parse_table("\n".join(lines))) == 1
