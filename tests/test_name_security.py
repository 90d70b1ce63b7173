"""A name's security files as an administrator sets them: `irm name create N sencpath P ...`,
irmd.conf's server_enc_file..., the defaults under the security directory, enc.conf's grammar,
and `irm dump config` keeping them."""

from __future__ import annotations

from pathlib import Path

import pytest

from irmd import cli
from irmd.config import ConfigError, plan
from irmd.reg import Registry
from irmd.secfiles import (
    APP_DEFAULT,
    DEFAULT,
    NONE,
    SEC_KEYS,
    EncConfError,
    check_sec,
    load_enc_conf,
    parse_enc_conf,
    read_file,
    role_files,
    sec_paths,
    security_dir,
)
from irmd.state import as_config
from proto import messages as m
from proto.errors import InvalidArgument


def test_the_default_files_are_0_23s_layout(tmp_path: Path) -> None:
    paths = sec_paths("pong", {}, tmp_path)
    assert paths["server_enc_file"] == str(tmp_path / "server/pong/enc.conf")
    assert paths["server_crt_file"] == str(tmp_path / "server/pong/crt.pem")
    assert paths["client_key_file"] == str(tmp_path / "client/pong/key.pem")
    assert set(paths) == set(SEC_KEYS)


@pytest.mark.parametrize("name", ["/tmp/x", "../server/files", "a/b", "..", "."])
def test_a_name_that_is_no_single_directory_name_has_no_files(tmp_path: Path, name: str) -> None:
    """Any user may allocate to any name: a name must never point the IRMd at files of its choosing."""
    assert set(role_files(name, {}, "client", str(tmp_path))) == {""}
    assert set(sec_paths(name, {}, tmp_path).values()) == {""}
    assert load_enc_conf("") == NONE  # what "" comes to: no files, a plain flow


def test_security_files_are_read_only_as_regular_files_and_without_blocking(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "enc.conf"
    os.mkfifo(fifo)  # nobody writes to it: an open that waited would never return
    with pytest.raises(PermissionError, match="not a regular file"):
        read_file(str(fifo), 100)
    with pytest.raises(EncConfError, match="not a regular file"):
        load_enc_conf(fifo)
    key = tmp_path / "key.pem"
    key.write_bytes(b"x" * 10)
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="accessible by others"):
        read_file(str(key), 100, private=True)
    key.chmod(0o600)
    assert read_file(str(key), 100, private=True) == b"x" * 10
    with pytest.raises(PermissionError, match="more than the 5"):
        read_file(str(key), 5)


def test_the_security_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUROBOROS_SECURITY_DIR", str(tmp_path))
    assert security_dir() == tmp_path
    monkeypatch.delenv("OUROBOROS_SECURITY_DIR")
    assert security_dir() == Path("/etc/ouroboros/security")  # root, as the tests run


def test_irm_name_create_takes_0_23s_six_paths(tmp_path: Path) -> None:
    files = {w: tmp_path / w for w in ("sencpath", "scrtpath", "skeypath", "cencpath", "ccrtpath", "ckeypath")}
    for f in files.values():
        f.write_text("")
    args = ["name", "create", "pong", "lb", "spillover"] + [x for w, f in files.items() for x in (w, str(f))]
    msg = cli.parse(args)
    assert isinstance(msg, m.NameCreate) and msg.lb == "spillover"
    assert msg.sec == {
        "server_enc_file": str(files["sencpath"]),
        "server_crt_file": str(files["scrtpath"]),
        "server_key_file": str(files["skeypath"]),
        "client_enc_file": str(files["cencpath"]),
        "client_crt_file": str(files["ccrtpath"]),
        "client_key_file": str(files["ckeypath"]),
    }


def test_irm_name_create_resolves_paths_and_refuses_missing_files(tmp_path: Path) -> None:
    (tmp_path / "crt.pem").write_text("")
    (tmp_path / "link.pem").symlink_to(tmp_path / "crt.pem")
    msg = cli.parse(["name", "create", "pong", "scrt", str(tmp_path / "link.pem")])  # a unique prefix works
    assert isinstance(msg, m.NameCreate) and msg.sec == {"server_crt_file": str(tmp_path / "crt.pem")}
    with pytest.raises(cli.UsageError, match="No such file"):
        cli.parse(["name", "create", "pong", "skeypath", str(tmp_path / "missing.pem")])


def test_the_irmd_takes_only_known_keys_and_absolute_paths() -> None:
    assert check_sec({"server_enc_file": "/etc/x"}) == {"server_enc_file": "/etc/x"}
    with pytest.raises(InvalidArgument, match="unknown security file"):
        check_sec({"root_shell": "/bin/sh"})
    with pytest.raises(InvalidArgument, match="absolute"):
        check_sec({"server_key_file": "key.pem"})


def test_a_config_file_sets_them_relative_to_itself(tmp_path: Path) -> None:
    conf = tmp_path / "irmd.toml"
    conf.write_text('[name.pong]\nserver_crt_file = "sec/crt.pem"\nserver_key_file = "/abs/key.pem"\n'
                    'client_enc_file = "enc.conf"\n')  # fmt: skip
    (step,) = [msg for _, msg in plan(conf).steps if isinstance(msg, m.NameCreate)]
    assert step.sec == {
        "server_crt_file": str(tmp_path / "sec/crt.pem"),
        "server_key_file": "/abs/key.pem",
        "client_enc_file": str(tmp_path / "enc.conf"),
    }
    conf.write_text("[name.pong]\nserver_key_file = 3\n")
    with pytest.raises(ConfigError, match="server_key_file: expected a path"):
        plan(conf)


def test_dump_config_keeps_the_paths() -> None:
    reg = Registry()
    reg.create_name("pong").sec = {"server_crt_file": "/s/crt.pem"}
    assert 'server_crt_file = "/s/crt.pem"' in as_config([], reg)


# -- enc.conf ------------------------------------------------------------------------------------------


def test_enc_conf_defaults_none_and_keys() -> None:
    assert parse_enc_conf("") == DEFAULT == parse_enc_conf("# only a comment\n")
    assert parse_enc_conf("none\n") == NONE and not NONE.encrypt
    got = parse_enc_conf("kex = X25519\ncipher=chacha20-poly1305\nkdf=sha512\ndigest=sha384\nkem_mode=client\n")
    assert (got.kex, got.cipher, got.kdf, got.md, got.client_encap) == (1034, 1018, 674, 673, True)
    assert APP_DEFAULT.kex == 1034 and APP_DEFAULT.cipher == 901


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("kex=P-256\n", "unknown kex"),
        ("cipher=rot13\n", "unknown cipher"),
        ("kdf=md5\n", "unknown kdf"),
        ("kem_mode=both\n", "kem_mode"),
    ],
)
def test_enc_conf_refuses_unknown_values_with_the_line(text: str, why: str) -> None:
    with pytest.raises(EncConfError, match=f"line 1: {why}"):
        parse_enc_conf(text)


def test_a_missing_enc_conf_is_plain_and_an_unreadable_one_an_error(tmp_path: Path) -> None:
    assert load_enc_conf(tmp_path / "nope") == NONE
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(EncConfError, match="cannot read"):
        load_enc_conf(tmp_path / "bin")
