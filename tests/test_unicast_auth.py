"""The unicast layer's cryptography, sans-IO: key exchange, per-PDU seals and their replay
window, member keys on disk (0600, refused otherwise), and the bindings of keys to addresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipcp.unicast import auth


def sessions(psk_a: bytes, psk_b: bytes) -> tuple[auth.Session, auth.Session]:
    a, b = auth.KeyExchange(psk_a), auth.KeyExchange(psk_b)
    transcript = a.nonce + a.eph + b.nonce + b.eph
    return a.complete(b.eph, transcript, True), b.complete(a.eph, transcript, False)


def test_both_ends_derive_the_same_keys_and_confirmations_only_with_the_same_layer_key() -> None:
    i, r = sessions(auth.layer_psk("k"), auth.layer_psk("k"))
    assert i.tx == r.rx and i.rx == r.tx and i.tx != i.rx
    r.check(b"initiator", i.confirmation(b"initiator"))
    with pytest.raises(auth.Forged):
        r.check(b"initiator", i.confirmation(b"responder"))  # a role's confirmation is its own
    i2, r2 = sessions(auth.layer_psk("k"), auth.layer_psk("other"))
    with pytest.raises(auth.Forged):
        r2.check(b"initiator", i2.confirmation(b"initiator"))


def test_a_degenerate_ephemeral_is_refused() -> None:
    with pytest.raises(auth.Forged):
        auth.KeyExchange(b"k" * 32).complete(b"\x00" * 32, b"t", True)
    with pytest.raises(auth.Forged):
        auth.KeyExchange(b"k" * 32).complete(b"\x01" * 7, b"t", True)


def test_seals_open_once_in_any_order_within_the_window_and_never_when_altered() -> None:
    sealer, opener = auth.Sealer(b"k" * 32), auth.Opener(b"k" * 32)
    pdus = [sealer.seal_bytes(bytes([n % 256]) * 10) for n in range(auth.WINDOW + 10)]
    assert bytes(opener.open(pdus[5])) == b"\x05" * 10
    assert bytes(opener.open(pdus[3])) == b"\x03" * 10  # reordered below: fine, once
    with pytest.raises(auth.Replayed):
        opener.open(pdus[3])
    opener.open(pdus[-1])
    with pytest.raises(auth.Replayed):
        opener.open(pdus[4])  # more than WINDOW behind the newest: too old to tell
    altered = bytearray(pdus[-2])
    altered[9] ^= 1
    with pytest.raises(auth.Forged):
        opener.open(bytes(altered))
    opener.open(pdus[-2])  # the altered copy did not burn its sequence number
    with pytest.raises(auth.Forged):
        opener.open(b"short")
    with pytest.raises(auth.Forged):
        auth.Opener(b"x" * 32).open(sealer.seal_bytes(b"other key"))


def test_a_member_key_is_made_once_0600_and_refused_if_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "ipcp" / "n1.key"
    first = auth.Identity.load(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert auth.Identity.load(path).pub == first.pub  # kept: a reboot is the same member
    sig = first.sign(b"lsu")
    auth.verify(first.pub, b"lsu", sig)
    with pytest.raises(auth.Forged):
        auth.verify(first.pub, b"lsU", sig)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="mode 0600"):
        auth.Identity.load(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a member key"):
        auth.Identity.load(path)
    link = tmp_path / "ipcp" / "n2.key"
    link.symlink_to(path)
    with pytest.raises(OSError):
        auth.Identity.load(link)  # never through a symlink


def test_state_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OUROBOROS_STATE_DIR", str(tmp_path))
    assert auth.state_dir() == tmp_path


def test_bindings_hold_an_address_and_a_name_for_their_first_key_until_released() -> None:
    b = auth.Bindings()
    b.admit(1, "n1", b"A" * 32)
    b.admit(9, "n1", b"A" * 32)  # the same member under a second address: its key proves it
    with pytest.raises(auth.Forged, match="address 1"):
        b.admit(1, "x", b"B" * 32)
    with pytest.raises(auth.Forged, match="name 'n1'"):
        b.admit(2, "n1", b"B" * 32)
    b.release(1)
    with pytest.raises(auth.Forged):
        b.admit(2, "n1", b"B" * 32)  # 9 still holds the name
    b.release(9)
    b.admit(2, "n1", b"B" * 32)
    b.admit(1, "", b"C" * 32)
