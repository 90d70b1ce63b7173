"""netplumb key files: id/id.pub, authorized_keys options, known_hosts pinning, spent one-time keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apps.netplumb.keys import (
    AuthorizedKeys,
    HostKeyChanged,
    Identity,
    KeyFileError,
    KnownHosts,
    SpentKeys,
    parse_authorized_line,
    public_line,
)

KEY = Identity.generate()
LINE = public_line(KEY.public, "me@here")


def test_identity_files_round_trip_and_private_is_0600(tmp_path: Path) -> None:
    pub = KEY.save(tmp_path / "id", "me@here")
    assert Identity.load(tmp_path / "id").public == KEY.public
    assert os.stat(tmp_path / "id").st_mode & 0o777 == 0o600
    text = pub.read_text()
    assert text.count("\n") == 1 and text.startswith("ed25519 ")
    assert parse_authorized_line(text, "x") is not None  # appendable to authorized_keys as is


def test_bad_private_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("hello\n")
    with pytest.raises(KeyFileError, match="not a netplumb private key"):
        Identity.load(tmp_path / "id")
    with pytest.raises(KeyFileError, match="plumb-keygen"):
        Identity.load(tmp_path / "nope")


def test_authorized_line_options() -> None:
    k = parse_authorized_line(f'allow="tar cat",users="backup" {LINE}', "f:1")
    assert k is not None
    assert k.allow == frozenset({"tar", "cat"}) and k.users == frozenset({"backup"}) and k.comment == "me@here"
    assert k.permits(["tar", "x"]) is None
    assert k.permits(["/bin/cat"]) is None
    assert "allowlist" in (k.permits(["rm", "-rf", "/"]) or "")


def test_command_bound_key_runs_only_that_command() -> None:
    k = parse_authorized_line(f'one-time,command="tar x -C \\"/tmp/a b\\"" {LINE}', "f:1")
    assert k is not None and k.one_time
    assert k.permits(["tar", "x", "-C", "/tmp/a b"]) is None
    assert k.permits(["tar", "x", "-C", "/tmp"]) is not None


@pytest.mark.parametrize("line, why", [
    ("rsa AAAA", "unknown option .rsa."),
    ("ed25519 !!!", "base64"),
    ("ed25519 AAAA", "32 bytes"),
    (f"bogus {LINE}", "unknown option"),
    (f"one-time {LINE}", "bound to a command"),
    (f'allow {LINE}', "needs a value"),
    (f'allow="x"{LINE}', "expected ','"),
], ids=["rsa", "bad-base64", "short-key", "bogus-option", "one-time-alone", "allow-alone", "no-comma"])
def test_bad_authorized_lines_are_named(line: str, why: str) -> None:
    with pytest.raises(KeyFileError, match=why):
        parse_authorized_line(line, "file:3")


def test_authorized_keys_file_skips_comments_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "ak"
    path.write_text(f"# mine\n\n{LINE}\n")
    keys = AuthorizedKeys.load(path)
    assert [k.line for k in keys.find(KEY.public)] == [3]
    assert keys.find(Identity.generate().public) == []


def test_known_hosts_pins_on_first_use_then_matches(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    assert known.check("host2", KEY.public) is True
    assert known.check("host2", KEY.public) is False
    assert known.check("host3", Identity.generate().public) is True


def test_known_hosts_refuses_a_changed_key(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "known_hosts")
    known.check("host2", KEY.public)
    with pytest.raises(HostKeyChanged, match="CHANGED"):
        known.check("host2", Identity.generate().public)
    assert known.lookup("host2") == KEY.public  # the pin stays


def test_spent_keys_are_spent_once(tmp_path: Path) -> None:
    spent = SpentKeys(tmp_path / "spent")
    assert not spent.spent(KEY.public)
    assert spent.spend(KEY.public) is True
    assert spent.spend(KEY.public) is False
    assert SpentKeys(tmp_path / "spent").spent(KEY.public)
