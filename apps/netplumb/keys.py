"""Long-term Ed25519 identities and the files that hold them: id, id.pub, authorized_keys, known_hosts.

Parsing is strict and line-oriented; a bad line names its file and line number. Modes are checked
as OpenSSH's StrictModes does, and every file or directory made here is private (0600, 0700).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import os
import re
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nacl.bindings import crypto_hash_sha256
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from transports.unix import TrustError, resolve_trusted

KEY_TYPE = "ed25519"
PRIVATE_TAG = "netplumb-ed25519-private"
KEY_SIZE = 32
MAX_KEY_FILE = 1 << 20


class KeyFileError(ValueError):
    """A key file or key line that cannot be used."""


class HostKeyChanged(KeyFileError):
    """The server's key is not the one pinned in known_hosts."""


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "netplumb"


def private_dir(path: Path) -> Path:
    """Make `path` and its missing parents, each mode 0700 (Path.mkdir gives parents the umask's mode)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
    return path


def open_private(path: Path, flags: int) -> int:
    """Open (creating) a file of ours, mode 0600 even if it existed looser; never through a symlink."""
    private_dir(path.parent)
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, text: str) -> None:
    with os.fdopen(open_private(path, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(text)


def check_private_key_mode(path: Path, st: os.stat_result) -> None:
    """StrictModes for a private key: no one but its owner may read it."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: mode {mode:04o} is too open: a private key must be readable by its owner only (chmod 600 {path})"
        )


def check_trusted_file(path: Path, st: os.stat_result) -> None:
    """StrictModes for a file that grants trust (authorized_keys, known_hosts, spent keys): owned by us
    or root, and neither it nor a directory above it writable by anyone else (a sticky directory, like
    /tmp, is fine: others cannot replace what is ours in it)."""
    me = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, me):
        raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by uid {me} or root: refusing it")
    if mode & 0o022:
        raise KeyFileError(f"{path}: mode {mode:04o} is writable by group or others: refusing it (chmod go-w {path})")
    # Every directory and link on the way, as the kernel resolves the path: a link of another user's
    # there (to a file of root's) is that user's to turn to another.
    try:
        resolve_trusted(path, me)
    except TrustError as e:
        raise KeyFileError(f"{path}: {e.strerror}, which lets others replace it: refusing it") from None


def fingerprint(public: bytes) -> str:
    """As OpenSSH prints a key's: SHA256: and the unpadded base64 of its SHA-256 (libsodium's, as the
    session's BLAKE2b: see session_keys)."""
    return "SHA256:" + base64.b64encode(crypto_hash_sha256(public)).decode().rstrip("=")


def public_line(public: bytes, comment: str = "") -> str:
    text = f"{KEY_TYPE} {base64.b64encode(public).decode()}"
    return f"{text} {comment}" if comment else text


def parse_public(b64: str, where: str) -> bytes:
    try:
        key = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(f"{where}: the key is not base64") from None
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"{where}: an {KEY_TYPE} key has {KEY_SIZE} bytes, not {len(key)}")
    return key


@dataclass(frozen=True)
class Identity:
    """A long-term key pair."""

    signing: SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @property
    def public(self) -> bytes:
        return bytes(self.signing.verify_key)

    def sign(self, message: bytes) -> bytes:
        return bytes(self.signing.sign(message).signature)

    def private_text(self) -> str:
        return f"{PRIVATE_TAG} {base64.b64encode(bytes(self.signing)).decode()}\n"

    @classmethod
    def from_text(cls, text: str, where: str) -> Identity:
        words = text.split()
        if len(words) != 2 or words[0] != PRIVATE_TAG:
            raise KeyFileError(f"{where}: not a netplumb private key (expected '{PRIVATE_TAG} BASE64')")
        seed = parse_public(words[1], where)
        return cls(SigningKey(seed))

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            text = _read(path, check_private_key_mode)
        except FileNotFoundError:
            raise KeyFileError(f"no key at {path}: run plumb-keygen") from None
        return cls.from_text(text, str(path))

    def save(self, path: Path, comment: str = "") -> Path:
        """Write the private key and PATH.pub (both 0600, in 0700 directories); returns the .pub path."""
        write_private(path, self.private_text())
        pub = path.with_name(path.name + ".pub")
        write_private(pub, public_line(self.public, comment) + "\n")
        return pub

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path, "netplumbd host key")
        return ident


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(public).verify(message, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def _read(path: Path, check: Callable[[Path, os.stat_result], None] = check_trusted_file) -> str:
    """The file's text, once `check` passed on the file actually opened."""
    with open(path, "rb") as f:
        check(path, os.fstat(f.fileno()))
        data = f.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: larger than {MAX_KEY_FILE} bytes")
    return data.decode("utf-8", "replace")


# -- authorized_keys ------------------------------------------------------------

OPTION_NAMES = {"allow", "users", "command", "one-time"}
_OPTION = re.compile(r'([a-z-]+)(?:="((?:[^"\\]|\\.)*)")?')


@dataclass(frozen=True)
class AuthorizedKey:
    """One line of authorized_keys: a client key and what it may do (apps/netplumb/policy.py decides).

    allow: programs (names found in the server's PATH, or absolute paths) this key may run, None = any;
    users: the accounts it runs as, the first by default (none: netplumbd's own account only);
    command: the only command line it may run; one_time: accepted once, then spent.
    """

    public: bytes
    comment: str = ""
    allow: frozenset[str] | None = None
    users: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    one_time: bool = False
    line: int = 0


def parse_authorized_line(text: str, where: str) -> AuthorizedKey | None:
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    opts: dict[str, str | None] = {}
    if not line.startswith(KEY_TYPE + " "):
        pos = 0
        while True:
            m = _OPTION.match(line, pos)
            if m is None:
                raise KeyFileError(f'{where}: bad options (expected name or name="value", comma-separated)')
            name = m.group(1)
            if name not in OPTION_NAMES:
                raise KeyFileError(f"{where}: unknown option {name!r} (known: {', '.join(sorted(OPTION_NAMES))})")
            value = m.group(2)
            opts[name] = None if value is None else re.sub(r"\\(.)", r"\1", value)
            pos = m.end()
            if line[pos : pos + 1] == ",":
                pos += 1
                continue
            if line[pos : pos + 1] != " ":
                raise KeyFileError(f"{where}: expected ',' or a space after option {name!r}")
            line = line[pos:].strip()
            break
    words = line.split(None, 2)
    if len(words) < 2 or words[0] != KEY_TYPE:
        raise KeyFileError(f"{where}: expected '[options] {KEY_TYPE} BASE64 [comment]'")
    public = parse_public(words[1], where)
    for name in ("allow", "users", "command"):
        if name in opts and opts[name] is None:
            raise KeyFileError(f'{where}: option {name!r} needs a value: {name}="..."')
    if "one-time" in opts and opts["one-time"] is not None:
        raise KeyFileError(f"{where}: option 'one-time' takes no value")
    command = None
    if opts.get("command") is not None:
        try:
            command = tuple(shlex.split(opts["command"] or ""))
        except ValueError as e:
            raise KeyFileError(f"{where}: command: {e}") from None
        if not command:
            raise KeyFileError(f"{where}: command is empty")
    if "one-time" in opts and command is None:
        raise KeyFileError(f'{where}: a one-time key must be bound to a command="..."')
    allow_text = opts.get("allow")
    allow = None if allow_text is None else frozenset(re.split(r"[\s,]+", allow_text.strip())) - {""}
    users = tuple(dict.fromkeys(u for u in re.split(r"[\s,]+", (opts.get("users") or "").strip()) if u))
    return AuthorizedKey(public, words[2] if len(words) > 2 else "", allow, users, command, "one-time" in opts, 0)


@dataclass
class AuthorizedKeys:
    """The keys a server admits, read afresh on every connection (edits apply at once)."""

    path: Path
    keys: list[AuthorizedKey] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> AuthorizedKeys:
        try:
            text = _read(path)
        except FileNotFoundError:
            raise KeyFileError(f"no authorized keys file at {path}") from None
        keys = []
        for n, line in enumerate(text.splitlines(), 1):
            key = parse_authorized_line(line, f"{path}:{n}")
            if key is not None:
                keys.append(AuthorizedKey(key.public, key.comment, key.allow, key.users, key.command, key.one_time, n))
        return cls(path, keys)

    def find(self, public: bytes) -> list[AuthorizedKey]:
        return [k for k in self.keys if k.public == public]


class SpentKeys:
    """One-time keys already used, kept next to authorized_keys so a restart does not revive them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def spent(self, public: bytes) -> bool:
        try:
            return base64.b64encode(public).decode() in _read(self.path).split()
        except FileNotFoundError:
            return False

    def spend(self, public: bytes) -> bool:
        """Mark spent; False if it already was. The test and the mark are one step under an exclusive
        lock on the file, so of two sessions racing with one key exactly one gets True."""
        fd = open_private(self.path, os.O_RDWR | os.O_APPEND)
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the file closes
            check_trusted_file(self.path, os.fstat(fd))
            line = base64.b64encode(public)
            if line in f.read(MAX_KEY_FILE + 1).split():
                return False
            f.write(line + b"\n")
            f.flush()
            os.fsync(fd)
        return True


# -- known_hosts -------------------------------------------------------------------


class KnownHosts:
    """Server keys pinned by name on first use ('NAME ed25519 BASE64' lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, host: str) -> bytes | None:
        try:
            text = _read(self.path)
        except FileNotFoundError:
            return None
        for n, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) < 3 or words[1] != KEY_TYPE:
                raise KeyFileError(f"{self.path}:{n}: expected 'NAME {KEY_TYPE} BASE64'")
            if words[0] == host:
                return parse_public(words[2], f"{self.path}:{n}")
        return None

    def check(self, host: str, public: bytes) -> bool:
        """True if newly pinned, False if it matched; raises HostKeyChanged if it differs."""
        pinned = self.lookup(host)
        if pinned == public:
            return False
        if pinned is not None:
            raise HostKeyChanged(
                f"WARNING: the key of {host!r} has CHANGED (now {fingerprint(public)}, pinned "
                f"{fingerprint(pinned)} in {self.path}). Someone may be impersonating it, or its key "
                f"was replaced; if you trust the new key, remove the line for {host!r} from {self.path}."
            )
        with os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "w") as f:
            f.write(f"{host} {public_line(public)}\n")
        return True
