"""The irm tool against a real IRMd: exit codes, messages, tables, bindings, registrations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import (
    BIN,
    IrmdProc,
    accepted_pair,
    descendants_of,
    free_port,
    irmd_env,
    parse_table,
    pid_alive,
    wait_for,
)

from flowlib import qos
from flowlib.irm import IrmClient
from proto import messages as m
from proto.errors import InvalidArgument

IrmFn = Callable[..., subprocess.CompletedProcess[str]]


def test_a_successful_command_exits_zero_and_says_nothing_as_ouroboros_does(irm: IrmFn) -> None:
    r = irm("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_unknown_word_exits_nonzero_naming_the_word(irm: IrmFn) -> None:
    r = irm("ipcp", "frobnicate", "name", "x")
    assert r.returncode != 0
    assert '"frobnicate" is unknown' in r.stderr and "did you mean" not in r.stderr  # nothing is close


def test_exit_status_of_grammar_errors_is_0_23s(irm: IrmFn) -> None:
    """0.23's irm: 255 alone (the usage printed), 1 for any word it cannot take, as for a refusal."""
    r = irm()
    assert r.returncode == 255 and r.stdout.startswith("Usage: irm")
    for words in (("foo",), ("ipcp",), ("ipcp", "create"), ("ipcp", "create", "name", "x", "type", "bogus")):
        assert irm(*words).returncode == 1, words


def test_a_near_miss_gets_a_suggestion(irm: IrmFn) -> None:
    r = irm("ipcp", "bootstrp", "name", "x", "type", "local", "layer", "l")
    assert r.returncode == 1 and r.stderr.startswith('irm: "bootstrp" is unknown')
    assert 'did you mean "bootstrap"?' in r.stderr
    r = irm("ipcp", "bootstrap", "name", "x", "type", "locl", "layer", "l")
    assert r.returncode == 1 and 'did you mean "local"?' in r.stderr
    r = irm("ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", "l", "ip", "127.0.0.1", "prot", "9")
    assert r.returncode == 1 and 'did you mean "port"?' in r.stderr


@pytest.mark.parametrize("op", ["bind", "unbind"])
def test_a_pid_that_is_no_number_is_a_grammar_error_with_the_usage(irm: IrmFn, op: str) -> None:
    r = irm(op, "process", "abc", "name", "x")
    assert r.returncode == 1 and r.stderr == 'irm: bad pid "abc": expected a number\n', r.stderr
    assert r.stdout.startswith(f"Usage: irm {op} process <pid>")


def test_bad_value_exits_nonzero_naming_the_expected_form(irm: IrmFn) -> None:
    r = irm("ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4", "ip", "1.2.3.4", "port", "70000")
    assert r.returncode != 0
    assert 'bad port "70000": expected a number from 1 to 65535' in r.stderr


def test_a_udp_ipcp_is_refused_the_unspecified_address_as_by_0_23(irm: IrmFn) -> None:
    for kind, addr in (("udp4", "0.0.0.0"), ("udp6", "::")):
        r = irm("ipcp", "bootstrap", "name", "u", "type", kind, "layer", "l", "ip", addr)
        assert r.returncode != 0 and f'Cannot use IPv{kind[-1]} address: "{addr}".' in r.stderr
    r = irm("ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", "l", "ip", "127.0.0.1", "peer", "0.0.0.0")
    assert r.returncode != 0 and 'Cannot use IPv4 address: "0.0.0.0".' in r.stderr


def test_a_udp_ipcp_checks_its_address_itself_whoever_asks(irmd: IrmdProc) -> None:
    """Not every client is irm: the IPCP refuses the unspecified address sent straight to the IRMd."""
    with pytest.raises(InvalidArgument, match=re.escape('Cannot use IPv4 address: "0.0.0.0"')):
        irmd.request(m.IpcpBootstrap("u", "l", "udp4", False, {"ip": "0.0.0.0"}))
    irmd.note_children()
    assert all(row["layer"] != "l" for row in irmd.table("ipcp", "list"))


def test_binding_a_fifo_as_a_program_is_refused_without_blocking(irmd: IrmdProc, tmp_path: Path) -> None:
    fifo = tmp_path / "prog"
    os.mkfifo(fifo, 0o755)  # executable to root, and an open that waits for a writer
    r = irmd.irm("bind", "program", str(fifo), "name", "x")
    assert r.returncode == 1 and "is not an executable file" in r.stderr
    assert irmd.irm_ok("ipcp", "list").returncode == 0


def test_request_the_irmd_refuses_exits_nonzero_with_its_reason(irm: IrmFn) -> None:
    r = irm("ipcp", "destroy", "name", "ghost")
    assert r.returncode != 0
    assert "ipcp 'ghost' not found" in r.stderr


def test_registering_with_an_ipcp_in_no_layer_says_so_not_that_it_is_missing(irm: IrmFn) -> None:
    assert irm("ipcp", "create", "name", "fresh", "type", "local").returncode == 0
    for pattern in ("fresh", "fr*"):
        r = irm("name", "register", "web", "ipcp", pattern)
        assert r.returncode == 1 and "ipcp 'fresh' is in no layer yet" in r.stderr, r.stderr
        assert "not found" not in r.stderr and "no ipcp here matches" not in r.stderr
    assert "web" not in irm("name", "list").stdout  # refused before the name was made


def test_irm_without_an_irmd_exits_nonzero_saying_it_cannot_reach_it(tmp_path: Path) -> None:
    r = subprocess.run(
        [str(BIN / "irm"), "ipcp", "list"],
        env=irmd_env(tmp_path / "none.sock"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "cannot reach the IRMd" in r.stderr


def test_irm_help_prints_the_operations_and_exits_zero(irmd: IrmdProc) -> None:
    r = irmd.irm("help")
    assert r.returncode == 0
    assert r.stdout == "Usage: irm [OPERATION]\n\nwhere OPERATION in { ipcp bind unbind name flow dump }\n"


@pytest.mark.parametrize("level", ["ipcp", "bind", "unbind", "name", "flow", "dump"])
def test_every_level_has_its_help(irmd: IrmdProc, level: str) -> None:
    r = irmd.irm(level, "help")
    assert r.returncode == 0 and r.stdout.startswith(f"Usage: irm {level} [OPERATION]\n\nwhere OPERATION in {{")


def test_a_command_missing_what_it_needs_prints_its_usage(irmd: IrmdProc) -> None:
    r = irmd.irm("ipcp", "bootstrap", "name", "x")
    assert r.returncode == 1 and 'missing "layer <value>"' in r.stderr
    assert r.stdout.startswith("Usage: irm ipcp bootstrap\n")
    assert "[dht_k <replication factor> (default: 8)]" in r.stdout


def test_empty_tables_say_so_as_ouroboros_does(irmd: IrmdProc) -> None:
    """Word for word, with the empty line 0.23's irm prints after it."""
    for args, says in (
        (("ipcp", "list"), "No IPCPs in system.\n\n"),
        (("name", "list"), "No names in system.\n\n"),
        (("name", "list", "list", "absent"), "No names in system.\n\n"),  # no names at all: before any filter
        (("flow", "list"), "No flows in system.\n\n"),
    ):
        assert irmd.irm_ok(*args).stdout == says, args


def test_a_name_list_prefix_that_matches_nothing_is_an_empty_table(irmd: IrmdProc) -> None:
    irmd.irm_ok("name", "create", "present")
    out = irmd.irm_ok("name", "list", "absent").stdout
    assert "No names" not in out and out.splitlines()[1].split("|")[1].strip() == "name"
    assert parse_table(out) == []


@pytest.mark.parametrize("word", ["list", "l", "li"])
def test_name_list_list_without_a_value_lists_every_name_as_0_23(irmd: IrmdProc, word: str) -> None:
    """0.23's irm takes a lone word that abbreviates `list` for the keyword, with no filter."""
    irmd.irm_ok("name", "create", "present")
    assert [r["name"] for r in irmd.table("name", "list", word)] == ["present"]


def test_a_registration_refused_for_a_missing_layer_leaves_no_name_behind(irmd: IrmdProc) -> None:
    r = irmd.irm("name", "register", "orphan", "layer", "nolayer")
    assert r.returncode == 1 and "layer 'nolayer' not found" in r.stderr
    assert irmd.table("name", "list") == []


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


def test_removing_what_is_not_there_exits_as_0_23s_irm(irmd: IrmdProc) -> None:
    """A teardown script run twice goes on: destroying or unbinding an IPCP that is not there (while
    others are), unregistering a name from where it is not, exit 0 and do nothing, as 0.23's irm.
    What is refused there stays refused: no IPCP at all, a name that does not exist."""
    r = irmd.irm("ipcp", "destroy", "name", "ghost")
    assert r.returncode == 1 and "ipcp 'ghost' not found" in r.stderr  # no IPCP at all
    r = irmd.irm("unbind", "ipcp", "ghost", "name", "foo")  # 0.23 looks it up among none: nothing to do
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "loc", "type", "local")
    irmd.irm_ok("name", "create", "foo")
    for words in (
        ("ipcp", "destroy", "name", "ghost"),
        ("unbind", "ipcp", "ghost", "name", "foo"),
        ("name", "unregister", "foo", "layer", "loc"),
        ("name", "unregister", "foo", "layer", "elsewhere"),
        ("name", "unregister", "foo", "ipcp", "ghost"),
    ):
        r = irmd.irm(*words)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), words
    r = irmd.irm("name", "unregister", "nobody", "layer", "loc")
    assert r.returncode == 1 and "name 'nobody' not found" in r.stderr
    irmd.irm_ok("name", "register", "foo", "layer", "loc")  # and what is there goes
    irmd.irm_ok("name", "unregister", "foo", "layer", "loc", "layer", "elsewhere")
    assert irmd.table("name", "list")[0]["layers"] in ("", "-")
    irmd.irm_ok("ipcp", "destroy", "name", "lo")
    assert irmd.table("ipcp", "list") == []


def test_creating_an_ipcp_twice_is_refused(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "create", "name", "lo", "type", "local")
    r = irmd.irm("ipcp", "create", "name", "lo", "type", "local")
    assert r.returncode != 0 and "already exists" in r.stderr


def test_a_layer_may_have_several_ipcps_in_one_irmd(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo2", "layer", local_layer, "type", "local")
    irmd.note_children()
    assert [r["name"] for r in irmd.table("ipcp", "list", "layer", local_layer)] == ["lo", "lo2"]
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)  # with both
    irmd.irm_ok("name", "unregister", "pong", "ipcp", "lo")
    assert irmd.table("name", "list")[0]["layers"] == local_layer  # still through lo2


def test_ipcp_destroy_stops_its_process(irmd: IrmdProc, local_layer: str) -> None:
    pid = irmd.ipcp_pid("lo")
    irmd.irm_ok("ipcp", "destroy", "name", "lo")
    assert irmd.table("ipcp", "list") == []
    wait_for(lambda: not pid_alive(pid), 5, "the destroyed IPCP to exit")


def test_autobind_binds_the_ipcp_to_its_name_and_layer_and_registers_them_below(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local", "autobind")
    assert irmd.table("name", "list") == []  # as in Ouroboros, only unicast and broadcast IPCPs autobind
    irmd.irm_ok("ipcp", "bootstrap", "name", "n1", "layer", "net", "type", "unicast", "autobind")
    irmd.note_children()
    pid = irmd.ipcp_pid("n1")
    names = {r["name"]: r for r in irmd.table("name", "list")}
    assert names["n1"]["pids"] == names["net"]["pids"] == str(pid)
    assert names["n1"]["layers"] == names["net"]["layers"] == "local"


def test_name_create_and_destroy(irmd: IrmdProc) -> None:
    irmd.irm_ok("name", "create", "pong", "lb", "spillover")
    assert [(r["name"], r["lb"]) for r in irmd.table("name", "list")] == [("pong", "spillover")]
    irmd.irm_ok("name", "destroy", "pong")
    assert irmd.table("name", "list") == []


def test_name_create_of_an_existing_name_succeeds_and_leaves_it_as_it_was(irmd: IrmdProc) -> None:
    """As 0.23's irmd (name_create: -EEXIST is 0): a setup script run a second time goes on."""
    irmd.irm_ok("name", "create", "pong", "lb", "spillover")
    r = irmd.irm("name", "create", "pong", "lb", "round-robin")
    assert r.returncode == 0, r.stderr
    assert [(r["name"], r["lb"]) for r in irmd.table("name", "list")] == [("pong", "spillover")]


def test_name_list_takes_a_prefix_to_show_only_the_names_that_begin_with_it(irmd: IrmdProc) -> None:
    for name in ("oping.a", "oping.b", "echo"):
        irmd.irm_ok("name", "create", name)
    assert [r["name"] for r in irmd.table("name", "list", "oping.")] == ["oping.a", "oping.b"]  # ouroboros(8)
    assert [r["name"] for r in irmd.table("name", "list", "list", "ec")] == ["echo"]  # 0.23's irm
    assert irmd.table("name", "list", "nothing") == []  # an empty table, as 0.23's irm


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


def test_destroying_a_registered_name_unregisters_it_first(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    irmd.irm_ok("name", "destroy", "pong")
    assert irmd.table("name", "list") == []
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)  # the IPCP let go of it: it registers anew


def test_registering_twice_is_no_error(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    r = irmd.irm("name", "register", "pong", "layer", "nowhere")
    assert r.returncode == 1 and "layer 'nowhere' not found" in r.stderr


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
    assert sorted((r["id"], r["role"]) for r in rows) == sorted([(str(cli.flow_id), "src"), (str(srv.flow_id), "dst")])
    for row in rows:
        assert (row["pid"], row["name"], row["layer"], row["ipcp"], row["state"], row["mtu"], row["qos"]) == (
            str(os.getpid()),
            bound_name,
            local_layer,
            "lo",
            "allocated",
            "65535",
            "reliable",
        )


def test_tables_have_a_header_and_ruled_borders(irmd: IrmdProc, local_layer: str) -> None:
    lines = irmd.irm_ok("ipcp", "list").stdout.splitlines()
    assert lines[0].startswith("+-") and lines[2].startswith("+-") and lines[-1].startswith("+-")
    assert [c.strip() for c in lines[1].strip("|").split("|")] == ["pid", "name", "type", "layer", "state"]
    assert len(parse_table("\n".join(lines))) == 1


def test_ipcp_names_in_bootstrap_and_layers_in_register_take_patterns(irmd: IrmdProc) -> None:
    for name in ("u1", "u2", "v1"):
        irmd.irm_ok("ipcp", "create", "name", name, "type", "local")
    irmd.note_children()
    irmd.irm_ok("ipcp", "bootstrap", "name", "u*", "layer", "ul")
    assert {(r["name"], r["layer"]) for r in irmd.table("ipcp", "list")} == {("u1", "ul"), ("u2", "ul"), ("v1", "-")}
    irmd.irm_ok("ipcp", "bootstrap", "name", "v1", "layer", "vl")
    irmd.irm_ok("name", "register", "both", "layer", "*l")
    irmd.irm_ok("name", "register", "one", "ipcp", "u1")
    layers = {r["name"]: r["layers"] for r in irmd.table("name", "list")}
    assert layers == {"both": "ul,vl", "one": "ul"}
    irmd.irm_ok("name", "unregister", "both", "ipcp", "u*")
    assert {r["name"]: r["layers"] for r in irmd.table("name", "list")}["both"] == "vl"
    r = irmd.irm("ipcp", "bootstrap", "name", "w*", "layer", "wl", "type", "local")
    assert r.returncode == 1 and "no ipcp here matches 'w*'" in r.stderr  # a pattern makes no IPCP


def test_enroll_without_a_type_makes_a_unicast_ipcp(irmd: IrmdProc, local_layer: str) -> None:
    r = irmd.irm("ipcp", "enroll", "name", "n2", "dst", "nobody-here")
    irmd.note_children()
    assert r.returncode == 1 and "nobody-here" in r.stderr and "ipcp n2 stopped" in r.stderr
    assert "created ipcp n2 (unicast, pid" in irmd.log_text()
    assert irmd.table("ipcp", "list", "name", "n2") == []  # made for the enrollment, gone with it


def test_ipcp_show_prints_what_the_ipcp_tells_of_itself(irmd: IrmdProc) -> None:
    irmd.irm_ok("ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net")
    irmd.note_children()
    out = irmd.irm_ok("ipcp", "show", "name", "n1").stdout
    assert out.startswith("ipcp:\n+") and "| n1 " in out and "net" in out
    r = irmd.irm("ipcp", "show", "name", "nosuch")
    assert r.returncode == 1 and "ipcp 'nosuch' not found" in r.stderr


SELF_REGISTERING = """
import sys
from flowlib.irm import IrmClient
from proto import messages as m
from proto.errors import InvalidArgument
irm = IrmClient()
irm.bind(sys.argv[1])
irm.register(sys.argv[1], ["local"])
print("registered", flush=True)
sys.stdin.read()  # serves until told to go
"""


def test_a_name_a_server_registered_for_itself_goes_with_it(irmd: IrmdProc, local_layer: str) -> None:
    """As a server started by hand with --layer: its registration is its own; an admin's is not."""
    irmd.irm_ok("name", "create", "kept")
    irmd.irm_ok("name", "register", "kept", "layer", local_layer)
    servers = []
    for name in ("gone", "kept"):
        proc = subprocess.Popen(
            [sys.executable, "-c", SELF_REGISTERING, name],
            env=irmd.env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "registered\n"
        servers.append(proc)

    def layers() -> dict[str, str]:
        return {r["name"]: r["layers"] for r in irmd.table("name", "list")}

    assert layers() == {"gone": local_layer, "kept": local_layer}
    for proc in servers:
        proc.communicate("", timeout=30)
    wait_for(lambda: layers()["gone"] == "-", 10, "the server's own registration to go")
    assert layers()["kept"] == local_layer  # registered by the admin: stays
    r = irmd.run("oping", "-n", "gone", "-c", "1", "--timeout", "5")
    assert r.returncode != 0 and "gone" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_failed_bootstrap_or_enroll_leaves_no_ipcp_behind(irmd: IrmdProc, local_layer: str) -> None:
    before = descendants_of(irmd.pid)
    r = irmd.irm("ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", "lan", "ip", "192.0.2.1")
    assert r.returncode == 1 and "cannot bind 192.0.2.1" in r.stderr and "ipcp u stopped" in r.stderr, r.stderr
    r = irmd.irm("ipcp", "enroll", "name", "n2", "layer", "nosuch")
    assert r.returncode == 1 and "ipcp n2 stopped" in r.stderr, r.stderr
    assert [row["name"] for row in irmd.table("ipcp", "list")] == ["lo"]
    wait_for(lambda: descendants_of(irmd.pid) <= before, 10, "the IPCPs made for them to exit")
    irmd.irm_ok("ipcp", "create", "name", "kept", "type", "udp4")  # one made beforehand is the admin's: it stays
    r = irmd.irm("ipcp", "bootstrap", "name", "kept", "layer", "lan", "ip", "192.0.2.1")
    assert r.returncode == 1 and "stopped" not in r.stderr
    assert "kept" in {row["name"] for row in irmd.table("ipcp", "list")}
    assert " WARNING: " not in irmd.log_text()  # asked to stop, an IPCP's exit is no news


def test_flows_show_their_counters_and_every_list_show_and_dump_speaks_json(irmd: IrmdProc) -> None:
    port = free_port(["127.0.0.1"])
    irmd.irm_ok("ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", "lan", "ip", "127.0.0.1", "port", str(port))
    irmd.irm_ok("ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net", "autobind")
    irmd.irm_ok("bind", "program", "oping", "name", "counted", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "counted", "layer", "net")
    ping = subprocess.Popen(
        [str(BIN / "oping"), "-n", "counted", "-c", "400", "-i", "20"],
        env=irmd.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def counted() -> dict[str, dict[str, str]]:
            return {r["role"]: r for r in json.loads(irmd.irm_ok("--json", "flow", "list").stdout)}

        def both_counted() -> dict[str, dict[str, str]] | None:
            # "-" is a count the IPCP did not tell (the flow not in its table yet, or it answered late)
            rows = counted()
            known = len(rows) == 2 and all(r[k].isdigit() for r in rows.values() for k in ("sent", "received"))
            return rows if known and int(rows["dst"]["received"]) >= 3 else None

        rows = wait_for(both_counted, 30, "pings counted on both ends")
        irmd.note_children()
        assert int(rows["src"]["sent"]) >= 3 and int(rows["src"]["received"]) >= 1 and rows["dst"]["dropped"] == "0"
        table = {r["role"]: r for r in irmd.table("flow", "list")}
        assert set(table["src"]) == set(rows["src"]) and table["src"]["id"] == rows["src"]["id"]  # the same, as JSON
    finally:
        ping.kill()
        ping.wait()
    show = json.loads(irmd.irm_ok("ipcp", "show", "n1", "-j").stdout)
    assert {"ipcp", "neighbours", "forwarding", "counters", "flows"} <= set(show)
    assert {r["field"]: r["value"] for r in show["ipcp"]}["layer"] == "net"
    assert {r["name"] for r in json.loads(irmd.irm_ok("-j", "ipcp", "list").stdout)} == {"u", "n1"}
    assert "counted" in {r["name"] for r in json.loads(irmd.irm_ok("-j", "name", "list").stdout)}
    assert json.loads(irmd.irm_ok("-j", "dump", "config").stdout)["unicast"]["n1"]["bootstrap"] == "net"
    graph = json.loads(irmd.irm_ok("--json", "dump", "graph").stdout)
    assert {"layer": "net", "type": "unicast", "ipcps": ["n1"], "over": ["lan"]} in graph["layers"]
    assert {"name": "counted", "layers": ["net"]} in graph["names"]
    irmd.irm_ok("bind", "program", "oecho", "name", "x", "--", "--json")  # a program's own arguments stay
    assert json.loads(irmd.irm_ok("-j", "dump", "config").stdout)["name"]["x"]["args"] == ["--json"]
