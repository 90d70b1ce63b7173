"""Where a name's security files live and what its enc.conf asks, as Ouroboros 0.23 spells both:
<security dir>/{server,client}/<name>/{enc.conf,crt.pem,key.pem}, overridable per name.

Pure text and paths (no cryptography), shared by irm, the config file and the IRMd.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from proto.errors import InvalidArgument

SECURITY_ENV = "OUROBOROS_SECURITY_DIR"

# (irmd.conf key, irm name create word, role, default file): src/irmd/configfile.c, irm_name_create.c
SEC_FILES = (
    ("server_enc_file", "sencpath", "server", "enc.conf"),
    ("server_crt_file", "scrtpath", "server", "crt.pem"),
    ("server_key_file", "skeypath", "server", "key.pem"),
    ("client_enc_file", "cencpath", "client", "enc.conf"),
    ("client_crt_file", "ccrtpath", "client", "crt.pem"),
    ("client_key_file", "ckeypath", "client", "key.pem"),
)
SEC_KEYS = tuple(key for key, *_ in SEC_FILES)
IRM_WORDS = {word: key for key, word, *_ in SEC_FILES}
CA_DIR = "cacert"
MAX_ENC_CONF = 64 * 1024  # bytes of an enc.conf read


def security_dir() -> Path:
    """$OUROBOROS_SECURITY_DIR; else /etc/ouroboros/security for root (0.23 built with prefix /usr),
    else the user's ~/.config/ouroboros/security."""
    if env := os.environ.get(SECURITY_ENV):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/etc/ouroboros/security")
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "ouroboros" / "security"


def check_sec(sec: dict[str, str]) -> dict[str, str]:
    """A name's security file overrides as given to NameCreate: known keys, absolute paths."""
    for key, path in sec.items():
        if key not in SEC_KEYS:
            raise InvalidArgument(f"unknown security file {key!r}: expected one of {', '.join(SEC_KEYS)}")
        if not os.path.isabs(path) or "\0" in path:
            raise InvalidArgument(f"{key} {path!r}: expected an absolute path")
    return dict(sec)


def sec_paths(name: str, overrides: dict[str, str], base: Path | str | None = None) -> dict[str, str]:
    """The six files of `name`: the overrides given at `irm name create`, else the defaults ("" where
    the name has no directory: see role_dir)."""
    root = str(base or security_dir())
    return {key: overrides.get(key) or _in(role_dir(name, role, root), file) for key, _, role, file in SEC_FILES}


def role_dir(name: str, role: str, base: str) -> str | None:
    """Where `name`'s files as a server or a client are, unless irmd.conf names them one by one; None
    for a name that is no single directory name ("/" in it, "." or ".."): any user may allocate to any
    name, so a name must never lead the IRMd to files of the user's choosing."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        return None
    return os.path.join(base, role, name)


def _in(where: str | None, file: str) -> str:
    return "" if where is None else os.path.join(where, file)  # "": a file that is not there


def role_files(name: str, overrides: dict[str, str], role: str, base: str) -> tuple[str, str, str]:
    """(enc.conf, crt.pem, key.pem) of `name` as a server or a client: what every allocation reads."""
    where = role_dir(name, role, base)
    enc, crt, key = (overrides.get(f"{role}_{f}_file") or _in(where, f"{f}.{ext}")
                     for f, ext in (("enc", "conf"), ("crt", "pem"), ("key", "pem")))  # fmt: skip
    return enc, crt, key


def read_file(path: str, limit: int, private: bool = False) -> bytes:
    """A security file's first `limit` bytes, as the IRMd may trust it: it must be a regular file, and
    one that holds a key (`private`) root's or ours and not open to others, checked on the descriptor
    read (no swap between check and read). Opened without blocking: a FIFO put in its place must not
    hold the IRMd's loop. FileNotFoundError if it is missing; PermissionError (an OSError) if it is
    not fit to read: every security file must be one only root or the IRMd's user could have written
    (theirs, not writable by others, reached through no directory or link of another user's)."""
    from irmd.identity import open_regular  # here: irm, which takes only the words from this module, starts without it
    from transports.unix import TrustError, check_trusted_file

    fd, st = open_regular(path)
    try:
        try:  # what a security file says (a CA, a policy, an identity) is only root's or ours to say
            check_trusted_file(path, st, os.geteuid())
        except TrustError as e:
            raise PermissionError(f"{e.strerror}: another user could have written it") from None
        if private and st.st_mode & 0o077:
            raise PermissionError(f"{path} is accessible by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                                  f"a private key must be mode 0600 or stricter")  # fmt: skip
        if private and st.st_uid not in (0, os.geteuid()):
            raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to this IRMd's user or root")
        if st.st_size > limit:
            raise PermissionError(f"{path} is {st.st_size} bytes: more than the {limit} such a file may have")
        chunks, left = [], limit
        while left and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- enc.conf (src/lib/crypt.c parse_sec_config) ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SecConfig:
    """A name's key-exchange policy, by NID; kex 0 means a plain flow."""

    kex: int = 0
    cipher: int = 0
    kdf: int = 0
    md: int = 0
    client_encap: bool = False  # kem_mode = client

    @property
    def encrypt(self) -> bool:
        return self.kex != 0


NONE = SecConfig()
# An enc.conf without keys, as 0.23: P-256, AES-256-GCM, HKDF-SHA-256, SHA-256 signatures.
DEFAULT = SecConfig(415, 901, 672, 672)
# What an application asking for encryption (qos cypher_s, encrypt=True) gets without an enc.conf:
# X25519 is as strong as P-256 by 0.23's ranking and cheaper.
APP_DEFAULT = SecConfig(1034, 901, 672, 672)


class EncConfError(ValueError):
    """An enc.conf line 0.23 would refuse."""


def _nid(table: dict[int, str], value: str, what: str) -> int:
    for nid, name in table.items():
        if name == value:
            return nid
    raise EncConfError(f"unknown {what} {value!r}: expected one of {', '.join(table.values())}")


def parse_enc_conf(text: str) -> SecConfig:
    """An enc.conf: `none`, or key=value lines over the defaults (kex, cipher, kdf, digest, kem_mode)."""
    from proto import oap  # here, as open_regular

    fields = dataclasses.asdict(DEFAULT)
    digests = {nid: name for nid, (name, _) in oap.DIGESTS.items()}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line == "none":
            return NONE
        key, eq, value = (part.strip() for part in line.partition("="))
        try:
            if not eq:
                continue  # 0.23 skips lines without '='
            if key == "kex":
                fields["kex"] = _nid(oap.KEXES, value, "kex")
            elif key == "cipher":
                fields["cipher"] = _nid(oap.CIPHERS, value, "cipher")
            elif key == "kdf":
                fields["kdf"] = _nid(digests, value, "kdf")
            elif key == "digest":
                fields["md"] = _nid(digests, value, "digest")
            elif key == "kem_mode":
                if value not in ("server", "client"):
                    raise EncConfError(f"kem_mode {value!r}: expected server or client")
                fields["client_encap"] = value == "client"
        except EncConfError as e:
            raise EncConfError(f"line {number}: {e}") from None
    return SecConfig(**fields)


def check_absent(path: Path | str) -> None:
    """PermissionError unless a security file missing at `path` is one only root or the IRMd's user
    could have removed: the directory it is missing from is theirs and not writable by others, or
    sticky (a fresh tmpfs, /etc/ouroboros made 1777), where no one else may remove or rename their
    entries. A missing enc.conf means plain: another user must not get there by deleting it. One
    who makes the missing file in a sticky directory gets refusals, not plain flows: a file or
    directory of theirs is never believed (read_file, role_files)."""
    from transports.unix import TrustError, check_dirs

    try:
        check_dirs(Path(path), os.geteuid(), strict_leaf=False, missing_ok=True)
    except TrustError as e:
        raise PermissionError(f"{path} is missing: {e.strerror}: another user could have removed it") from None


def load_enc_conf(path: Path | str) -> SecConfig:
    """A missing file means plain, as 0.23; an unreadable or bad one raises EncConfError."""
    try:
        text = read_file(str(path), MAX_ENC_CONF).decode()
    except FileNotFoundError:
        try:
            check_absent(path)
        except PermissionError as e:
            raise EncConfError(str(e)) from None
        return NONE
    except (OSError, UnicodeDecodeError) as e:
        raise EncConfError(f"{path}: cannot read: {e}") from None
    try:
        return parse_enc_conf(text)
    except EncConfError as e:
        raise EncConfError(f"{path}: {e}") from None
