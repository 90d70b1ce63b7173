"""The irm command grammar (irmd.cli.parse), without an IRMd."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from irmd.cli import UsageError, parse
from proto import messages as m


def test_full_keywords_parse_to_the_request() -> None:
    assert parse(["ipcp", "bootstrap", "name", "lo", "layer", "local", "type", "local"]) == m.IpcpBootstrap(
        "lo", "local", "local", False, {}
    )


def test_ipcp_operation_may_be_abbreviated() -> None:
    assert parse(["ipcp", "b", "name", "lo", "layer", "local"]) == m.IpcpBootstrap("lo", "local")


def test_every_keyword_may_be_abbreviated_at_once() -> None:
    assert parse(["n", "r", "pong", "l", "local"]) == m.NameRegister("pong", ["local"], True)


def test_options_may_be_abbreviated_to_a_unique_prefix() -> None:
    msg = parse(["ip", "bo", "na", "u1", "la", "net", "ty", "unicast", "ro", "lfa", "auto"])
    assert msg == m.IpcpBootstrap("u1", "net", "unicast", True, {"routing": "lfa"})


def test_register_takes_several_layers() -> None:
    assert parse(["name", "register", "x", "layer", "a", "layer", "b"]) == m.NameRegister("x", ["a", "b"])


def test_unregister_is_a_register_request_with_register_false() -> None:
    assert parse(["name", "unregister", "x", "layer", "a"]) == m.NameRegister("x", ["a"], False)


def test_list_commands_parse() -> None:
    assert parse(["ipcp", "list", "type", "local"]) == m.IpcpList("", "", "local")
    assert parse(["name", "list"]) == m.NameList()
    assert parse(["flow", "list"]) == m.FlowList()


def test_name_list_takes_a_prefix_as_ouroboros_8_and_0_23s_irm_spell_it() -> None:
    assert parse(["name", "list", "oping"]) == m.NameList(prefix="oping")
    assert parse(["name", "list", "l", "oping"]) == m.NameList(prefix="oping")


def test_a_broadcast_layer_takes_the_hash_of_its_name_as_ouroboros_8_says() -> None:
    assert parse(["ipcp", "bootstrap", "type", "broadcast", "name", "b", "layer", "bc", "hash", "SHA3_512"]) == (
        m.IpcpBootstrap("b", "bc", "broadcast", False, {"hash": "SHA3_512"})
    )


def test_bind_process_parses_pid_and_name() -> None:
    assert parse(["bind", "process", "123", "name", "x"]) == m.Bind("process", "123", "x")


def test_bind_program_resolves_the_program_in_path_and_keeps_its_args() -> None:
    msg = parse(["bind", "program", "sh", "name", "x", "auto", "--", "-c", "true"])
    assert isinstance(msg, m.Bind)
    assert msg.kind == "program" and msg.target.startswith("/") and msg.target.endswith("/sh")
    assert (msg.name, msg.auto, msg.args) == ("x", True, ["-c", "true"])


def test_bind_program_given_a_relative_path_sends_an_absolute_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prog = tmp_path / "server"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    msg = parse(["bind", "program", "./server", "name", "x"])
    assert isinstance(msg, m.Bind) and msg.target == str(prog)


def test_bind_program_takes_a_file_in_the_current_directory_not_in_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("my-server-xyz", "sh"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.chdir(tmp_path)
    msg = parse(["bind", "program", "my-server-xyz", "name", "x"])  # as 0.23's realpath() finds it
    assert isinstance(msg, m.Bind) and msg.target == str(tmp_path / "my-server-xyz")
    msg = parse(["bind", "program", "sh", "name", "x"])  # but never in place of one in $PATH
    assert isinstance(msg, m.Bind) and msg.target == shutil.which("sh")


def test_unbind_process_name_is_optional() -> None:
    assert parse(["unbind", "process", "123"]) == m.Bind("process", "123", "", bind=False)


def test_udp4_bootstrap_options_are_checked_and_normalised() -> None:
    msg = parse(
        [
            "ipcp",
            "bootstrap",
            "name",
            "u",
            "layer",
            "l",
            "type",
            "udp4",
            "ip",
            "127.0.0.1",
            "port",
            "0x1000",
            "peer",
            "10.0.0.1",
            "peer",
            "10.0.0.2",
        ]
    )
    assert isinstance(msg, m.IpcpBootstrap)
    assert msg.conf == {"ip": "127.0.0.1", "port": "4096", "peer": "10.0.0.1,10.0.0.2"}


def test_eth_dix_ethertype_is_normalised_to_hex() -> None:
    msg = parse(
        ["ipcp", "bootstrap", "name", "e", "layer", "l", "type", "eth-dix", "dev", "eth0", "ethertype", "0xA000"]
    )
    assert isinstance(msg, m.IpcpBootstrap)
    assert msg.conf == {"dev": "eth0", "ethertype": "0xa000"}


def test_connect_defaults_to_both_components_and_raw_qos() -> None:
    assert parse(["ipcp", "connect", "name", "a", "dst", "b"]) == m.IpcpConnect("a", "b", "", "raw", True)
    assert parse(["ipcp", "disc", "name", "a", "dst", "b", "comp", "m"]) == m.IpcpConnect(
        "a", "b", "mgmt", "raw", False
    )


# -- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # irm_ipcp.c tries create, destroy, bootstrap, enroll, connect, disconnect, list, help
        (["ipcp", "c", "name", "x", "type", "local"], m.IpcpCreate("x", "local")),
        (["ipcp", "d", "name", "x"], m.IpcpDestroy("x")),
        (["ipcp", "co", "name", "a", "dst", "b"], m.IpcpConnect("a", "b", "", "raw", True)),
        (["ipcp", "di", "name", "a", "dst", "b"], m.IpcpConnect("a", "b", "", "raw", False)),
        # irm_ipcp_bootstrap.c: type, layer, name, hash, ip, dns, device, ethertype, addr, eid, ttl,
        # port, autobind, addr_auth, ..., dht_t_expire, ..., ls_t_timeo, ls_t_update, ls_t_recalc
        (
            ["ipcp", "bootstrap", "n", "x", "l", "y", "t", "unicast", "a", "2", "au", "ls_t_", "90", "dht_t", "99"],
            m.IpcpBootstrap("x", "y", "unicast", True, {"addr": "2", "ls_t_timeo": "90", "dht_t_expire": "99"}),
        ),
        (
            ["ipcp", "bootstrap", "n", "x", "l", "y", "t", "eth-dix", "de", "lo", "e", "0xA001"],
            m.IpcpBootstrap("x", "y", "eth-dix", False, {"dev": "lo", "ethertype": "0xa001"}),
        ),
        # the type's value too: unicast, broadcast, udp4, udp6, eth-dix, eth-llc, local
        (["ipcp", "bootstrap", "name", "x", "layer", "y", "type", "u"], m.IpcpBootstrap("x", "y", "unicast")),
        (
            ["ipcp", "bootstrap", "name", "x", "layer", "y", "type", "udp", "ip", "127.0.0.1", "p", "99"],
            m.IpcpBootstrap("x", "y", "udp4", False, {"ip": "127.0.0.1", "port": "99"}),
        ),
        (
            ["ipcp", "bootstrap", "name", "x", "layer", "y", "type", "eth", "dev", "lo"],
            m.IpcpBootstrap("x", "y", "eth-dix", False, {"dev": "lo"}),
        ),
        (["ipcp", "bootstrap", "name", "x", "layer", "y", "type", "l"], m.IpcpBootstrap("x", "y", "local")),
        # ours come after 0.23's: "p" is port, "pe" peer; "i" is ip, "im" impair
        (
            ["ipcp", "bootstrap", "name", "x", "layer", "y", "type", "udp4", "i", "127.0.0.1", "pe", "127.0.0.2"],
            m.IpcpBootstrap("x", "y", "udp4", False, {"ip": "127.0.0.1", "peer": "127.0.0.2"}),
        ),
        # irm_ipcp_enroll.c: name, type, layer, dst, autobind
        (["ipcp", "enroll", "n", "x", "a", "d", "y"], m.IpcpEnroll("x", "", "y", "", True)),
        # irm_name_create.c: lb, sencpath, scrtpath, skeypath, cencpath, ccrtpath, ckeypath
        (["name", "create", "x", "l", "spillover"], m.NameCreate("x", "spillover")),
        # irm_bind.c: program, process, ipcp
        (["bind", "pr", "sh", "name", "x"], m.Bind("program", "", "x")),
        (["unbind", "proc", "12", "n", "x"], m.Bind("process", "12", "x", bind=False)),
    ],
)
def test_a_prefix_means_the_first_keyword_it_begins_in_0_23s_order(argv: list[str], expected: m.Message) -> None:
    got = parse(argv)
    if isinstance(got, m.Bind) and got.kind == "program":
        got = dataclasses.replace(got, target="")  # where sh is differs per host
    assert got == expected


@pytest.mark.parametrize("word", ["c", "cencpath"])
def test_name_create_takes_the_first_security_path_a_prefix_begins(word: str, tmp_path: Path) -> None:
    (tmp_path / "enc.conf").write_text("")
    msg = parse(["name", "create", "x", word, str(tmp_path / "enc.conf")])
    assert isinstance(msg, m.NameCreate) and list(msg.sec) == ["client_enc_file"]


def test_the_component_is_a_pattern_as_in_0_23_or_a_prefix() -> None:
    def component(word: str) -> str:
        msg = parse(["ipcp", "connect", "name", "a", "dst", "b", "component", word])
        assert isinstance(msg, m.IpcpConnect)
        return msg.component

    assert [component(w) for w in ("*", "m*", "d*", "dt", "mgmt", "d", "m")] == [
        "",
        "mgmt",
        "dt",
        "dt",
        "mgmt",
        "dt",
        "mgmt",
    ]
    with pytest.raises(UsageError, match=re.escape('bad component "x*": the pattern matches none of {dt mgmt}')):
        component("x*")


def test_an_empty_word_abbreviates_nothing() -> None:
    # 0.23 would take "" for the first keyword of the list; an empty word is a quoting mistake here
    with pytest.raises(UsageError, match='"" is unknown'):
        parse(["ipcp", "", "name", "x", "type", "local"])


@pytest.mark.parametrize(
    ("argv", "word", "hint"),
    [
        # ouroboros-tutorial(7) spells both as an irm older than 0.23 did; 0.23 refuses them too
        (
            ["reg", "name", "my.oping.server", "layer", "llc"],
            "reg",
            '0.23 says "irm name register <name> layer <layer>"',
        ),
        (
            ["ipcp", "bootstrap", "type", "eth-llc", "name", "llc", "layer", "llc", "if", "lo"],
            "if",
            '0.23 says "dev <interface name>"',
        ),
    ],
)
def test_the_old_tutorial_spellings_are_refused_saying_the_new_ones(argv: list[str], word: str, hint: str) -> None:
    with pytest.raises(UsageError, match=f'"{word}" is unknown') as err:
        parse(argv)
    assert hint in str(err.value)


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["frobnicate"], "frobnicate"),
        (["ipcp", "explode", "name", "x"], "explode"),
        (["name", "register", "x", "layr", "local"], "layr"),
        (["ipcp", "bootstrap", "name", "x", "layer", "l", "colour", "red"], "colour"),
        (["bind", "prog", "sh", "name", "x", "automatic"], "automatic"),
        (["bind", "prog", "sh", "name", "x", "au"], "au"),  # 0.23 compares `auto` whole (strcmp)
        (["flow", "list", "extra"], "extra"),
    ],
)
def test_unknown_word_is_an_error_naming_the_word(argv: list[str], word: str) -> None:
    with pytest.raises(UsageError, match=f'"{word}" is unknown'):
        parse(argv)


def test_unknown_operation_error_lists_the_expected_words() -> None:
    with pytest.raises(UsageError) as err:
        parse(["ipcp", "explode"])
    for op in ("create", "bootstrap", "enroll", "list", "destroy"):
        assert op in str(err.value)


def test_missing_operation_lists_the_choices() -> None:
    with pytest.raises(UsageError, match=re.escape("expected irm ipcp {create")):
        parse(["ipcp"])


def test_missing_required_option_is_named() -> None:
    with pytest.raises(UsageError, match='missing "layer'):
        parse(["ipcp", "bootstrap", "name", "x"])


def test_option_without_value_is_an_error() -> None:
    with pytest.raises(UsageError, match='"name" needs a value'):
        parse(["ipcp", "destroy", "name"])


def test_option_given_twice_is_an_error() -> None:
    with pytest.raises(UsageError, match='"name" given 2 times'):
        parse(["ipcp", "destroy", "name", "a", "name", "b"])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4", "ip", "127.0.0.1", "port", "70000"],
            'bad port "70000": expected a number from 1 to 65535',
        ),
        (
            ["ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4", "ip", "127.0.0.1", "port", "http"],
            'bad port "http": expected a number from 1 to 65535',
        ),
        (
            ["ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4", "ip", "300.1.2.3"],
            'bad ip "300.1.2.3": expected an IPv4 address',
        ),
        (
            ["ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4", "ip", "::1"],
            'bad ip "::1": expected an IPv4 address',
        ),
        (
            ["ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp6", "ip", "10.0.0.1"],
            'bad ip "10.0.0.1": expected an IPv6 address',
        ),
        (
            ["ipcp", "bootstrap", "name", "e", "layer", "l", "type", "eth-dix", "dev", "eth0", "ethertype", "0x10"],
            'bad ethertype "0x10": expected hex 0x0600-0xFFFE',
        ),
        (
            ["ipcp", "bootstrap", "name", "e", "layer", "l", "type", "eth-dix", "dev", "eth0", "ethertype", "beef!"],
            'bad ethertype "beef!": expected hex',
        ),
        (
            ["ipcp", "bootstrap", "name", "n", "layer", "l", "type", "unicast", "routing", "ospf"],
            'bad routing "ospf": expected one of {link_state lfa ecmp}',
        ),
        (
            ["ipcp", "bootstrap", "name", "n", "layer", "l", "type", "unicast", "hash", "MD5"],
            'bad hash "MD5": expected one of {SHA3_224',
        ),
        (
            ["ipcp", "bootstrap", "name", "n", "layer", "l", "type", "unicast", "ttl", "0"],
            'bad ttl "0": expected a number from 1 to 255',
        ),
        (
            ["ipcp", "create", "name", "n", "type", "tcp"],
            'bad type "tcp": expected one of {local unicast broadcast udp4 udp6 eth-dix eth-llc}',
        ),
        (
            ["ipcp", "list", "type", "tcp"],
            'bad type "tcp": expected one of {local unicast broadcast udp4 udp6 eth-dix eth-llc}',
        ),
        (["name", "create", "x", "lb", "random"], 'bad lb "random": expected one of {round-robin spillover}'),
        (
            ["ipcp", "connect", "name", "a", "dst", "b", "qos", "fast"],
            'bad qos "fast": expected one of {raw best voice video data}',
        ),
    ],
)
def test_bad_value_is_an_error_naming_the_value_and_the_expected_form(argv: list[str], expected: str) -> None:
    with pytest.raises(UsageError) as err:
        parse(argv)
    assert expected in str(err.value)


def test_option_of_another_ipcp_type_is_rejected_naming_the_valid_ones() -> None:
    with pytest.raises(UsageError, match=re.escape('"ttl" does not apply to type local: expected one of {hash}')):
        parse(["ipcp", "bootstrap", "name", "x", "layer", "l", "type", "local", "ttl", "5"])


def test_udp_bootstrap_needs_an_ip() -> None:
    with pytest.raises(UsageError, match='missing "ip <address>" for type udp4'):
        parse(["ipcp", "bootstrap", "name", "u", "layer", "l", "type", "udp4"])


def test_eth_bootstrap_needs_a_device() -> None:
    with pytest.raises(UsageError, match='missing "dev <interface>" for type eth-llc'):
        parse(["ipcp", "bootstrap", "name", "e", "layer", "l", "type", "eth-llc"])


def test_enroll_needs_a_layer_or_a_destination() -> None:
    with pytest.raises(UsageError, match="enroll needs"):
        parse(["ipcp", "enroll", "name", "x"])


def test_bind_of_a_program_not_in_path_is_an_error() -> None:
    with pytest.raises(UsageError, match='program "no-such-program-xyz" not found'):
        parse(["bind", "program", "no-such-program-xyz", "name", "x"])


def test_bind_needs_a_name() -> None:
    with pytest.raises(UsageError, match='missing "name'):
        parse(["bind", "process", "1"])
