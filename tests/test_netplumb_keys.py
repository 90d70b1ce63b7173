"""netplumb key files: id/id.pub, authorized_keys options, known_hosts pinning, spent one-time keys."""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from apps.netplumb import keygen
from apps.netplumb.keys import (
    AuthorizedKeys,
    HostKeyChanged,
    Identity,
    KeyFileError,
    KnownHosts,
    SpentKeys,
    fingerprint,
    parse_authorized_line,
    public_line,
)

KEY = Identity.generate()
LINE = public_line(KEY.public, "me@here")


def test_identity_files_round_trip_and_are_private(tmp_path: Path) -> None:
    pub = KEY.save(tmp_path / "a" / "b" / "id", "me@here")
    assert Identity.load(tmp_path / "a" / "b" / "id").public == KEY.public
    for f in ("a/b/id", "a/b/id.pub"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == 0o600, f
    for d in ("a", "a/b"):  # parents made on the way are private too
        assert os.stat(tmp_path / d).st_mode & 0o777 == 0o700, d
    text = pub.read_text()
    assert text.count("\n") == 1 and text.startswith("ed25519 ")
    assert parse_authorized_line(text, "x") is not None  # appendable to authorized_keys as is


def test_a_fingerprint_is_openssh_s_sha256_form() -> None:
    digest = base64.b64encode(hashlib.sha256(KEY.public).digest()).decode().rstrip("=")
    assert fingerprint(KEY.public) == "SHA256:" + digest


def test_bad_private_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("hello\n")
    os.chmod(tmp_path / "id", 0o600)
    with pytest.raises(KeyFileError, match="not a netplumb private key"):
        Identity.load(tmp_path / "id")
    with pytest.raises(KeyFileError, match="plumb-keygen"):
        Identity.load(tmp_path / "nope")


def test_authorized_line_options() -> None:
    k = parse_authorized_line(f'allow="tar cat",users="backup nobody,backup" {LINE}', "f:1")
    assert k is not None
    assert k.allow == frozenset({"tar", "cat"}) and k.comment == "me@here"
    assert k.users == ("backup", "nobody")  # in order: the first is the default


def test_command_option_is_split_like_a_shell() -> None:
    k = parse_authorized_line(f'one-time,command="tar x -C \\"/tmp/a b\\"" {LINE}', "f:1")
    assert k is not None and k.one_time
    assert k.command == ("tar", "x", "-C", "/tmp/a b")  # what policy.plan compares argv with


@pytest.mark.parametrize(
    "line, why",
    [
        ("rsa AAAA", "unknown option .rsa."),
        ("ed25519 !!!", "base64"),
        ("ed25519 AAAA", "32 bytes"),
        (f"bogus {LINE}", "unknown option"),
        (f"one-time {LINE}", "bound to a command"),
        (f"allow {LINE}", "needs a value"),
        (f'allow="x"{LINE}', "expected ','"),
    ],
    ids=["rsa", "bad-base64", "short-key", "bogus-option", "one-time-alone", "allow-alone", "no-comma"],
)
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


def test_saving_over_a_loose_key_makes_it_private(tmp_path: Path) -> None:
    (tmp_path / "id").write_text("old")
    os.chmod(tmp_path / "id", 0o644)
    KEY.save(tmp_path / "id")
    assert os.stat(tmp_path / "id").st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o700 | 0o004])
def test_private_key_readable_by_others_is_refused_naming_file_and_mode(tmp_path: Path, mode: int) -> None:
    KEY.save(tmp_path / "id")
    os.chmod(tmp_path / "id", mode)
    with pytest.raises(KeyFileError, match=f"id: mode {mode:04o} is too open.*chmod 600"):
        Identity.load(tmp_path / "id")
    os.chmod(tmp_path / "id", 0o400)
    assert Identity.load(tmp_path / "id").public == KEY.public


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o664, 0o620])
def test_authorized_keys_writable_by_others_is_refused_naming_file_and_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "ak"
    path.write_text(f"{LINE}\n")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match=f"ak: mode {mode:04o} is writable by group or others"):
        AuthorizedKeys.load(path)
    os.chmod(path, 0o644)
    assert AuthorizedKeys.load(path).find(KEY.public)


def test_authorized_keys_in_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    (d / "ak").write_text(f"{LINE}\n")
    os.chmod(d, 0o777)
    with pytest.raises(KeyFileError, match="lets others replace it"):
        AuthorizedKeys.load(d / "ak")
    os.chmod(d, 0o1777)  # sticky, as /tmp: others cannot replace our file in it
    assert AuthorizedKeys.load(d / "ak").find(KEY.public)


def test_known_hosts_is_private_and_must_not_be_writable_by_others(tmp_path: Path) -> None:
    known = KnownHosts(tmp_path / "cfg" / "known_hosts")
    known.check("host2", KEY.public)
    assert os.stat(known.path).st_mode & 0o777 == 0o600
    assert os.stat(known.path.parent).st_mode & 0o777 == 0o700
    os.chmod(known.path, 0o666)
    with pytest.raises(KeyFileError, match="writable by group or others"):
        known.lookup("host2")


def test_spent_keys_file_is_private(tmp_path: Path) -> None:
    spent = SpentKeys(tmp_path / "spent")
    spent.spend(KEY.public)
    assert os.stat(tmp_path / "spent").st_mode & 0o777 == 0o600


def test_one_time_key_is_spent_by_exactly_one_of_many_racing(tmp_path: Path) -> None:
    """Threads, and processes (separate locks), all spending one key at once: one wins."""
    path = tmp_path / "spent"
    code = (
        "import sys; from pathlib import Path; from apps.netplumb.keys import SpentKeys; "
        f"print(SpentKeys(Path(sys.argv[1])).spend(bytes.fromhex('{KEY.public.hex()}')))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True) for _ in range(6)
    ]
    barrier = threading.Barrier(6)
    wins: list[bool] = []

    def spend() -> None:
        barrier.wait()
        wins.append(SpentKeys(path).spend(KEY.public))

    threads = [threading.Thread(target=spend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert sum(wins) + outs.count("True") == 1, (wins, outs)
    assert path.read_text().count("\n") == 1


def test_keygen_for_a_uid_without_an_account_names_the_uid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A uid with no entry in the password database (and no USER or LOGNAME) gets a key whose
    comment names the uid, not a traceback."""

    def no_account() -> str:
        raise KeyError(f"getpwuid(): uid not found: {os.getuid()}")

    monkeypatch.setattr(getpass, "getuser", no_account)
    keygen.main(["-f", str(tmp_path / "id")])
    assert (tmp_path / "id.pub").read_text().split()[-1] == f"uid{os.getuid()}@{socket.gethostname()}"
