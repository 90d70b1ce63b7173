"""Who may log in, and what a START may run, as whom, with which environment: pure functions of
(identity, request, configuration) returning the plan netplumbd carries out, or why not.

The configuration's view of the machine (accounts, programs in PATH) comes in as lookups, so the
decisions are tested exhaustively without touching it; the daemon does the I/O and follows the plan.
"""

from __future__ import annotations

import os
import pwd
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from apps.netplumb.keys import AuthorizedKey, fingerprint
from apps.netplumb.messages import Start
from apps.netplumb.recipe import RecipeError, parse_recipe

REFUSED = 126  # the status a refused START reports, as a shell's "cannot execute"
NOT_FOUND = 127  # "command not found"
DEFAULT_SHELL = "/bin/sh"  # for accounts whose shell is not a login shell (nologin, false), as _PATH_BSHELL


class Refused(Exception):
    """A START this key may not have; the message and status go back to the client."""

    def __init__(self, message: str, status: int = REFUSED) -> None:
        super().__init__(message)
        self.status = status


# -- the configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A user on this machine, as the password and group databases say."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str


@dataclass(frozen=True)
class Program:
    """A program found for a command: `path` is executed, `real` (symlinks resolved) is compared."""

    path: str
    real: str


@dataclass(frozen=True)
class Settings:
    """netplumbd's configuration, and lookups into this machine (so the policy stays pure).

    me: the account netplumbd runs as; path: the server's PATH, the only one programs are found in;
    accept_env: patterns of client variables a command may get (AcceptEnv), none by default, and
    never for a restricted key (allow=, command=);
    shells: the login shells (/etc/shells); account(name) and which(name, path): the lookups.
    """

    me: Account
    path: str
    account: Callable[[str], Account | None]
    which: Callable[[str, str], Program | None]
    accept_env: tuple[str, ...] = ()
    shells: frozenset[str] = frozenset({DEFAULT_SHELL})
    lang: str | None = None
    max_channels: int = 64


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One program to start: argv as the client gave it, executed from `exe`, which must still be the
    file `real` the policy checked when the runner opens it (None: the login shell, not checked)."""

    argv: tuple[str, ...]
    exe: str
    real: str | None = None


@dataclass(frozen=True)
class Plan:
    """What netplumbd does for a START it admitted, with the rights of `account`."""

    account: Account
    steps: tuple[Step, ...]  # a command: one; a recipe: its commands in order
    env: tuple[tuple[str, str], ...]  # the whole environment of the commands
    recipe: str | None = None  # the recipe's text (its commands are `steps`), run in the recipe directory
    cwd: str | None = None  # a command's directory: the account's home
    infifos: tuple[tuple[int, str], ...] = ()
    outfifos: tuple[tuple[int, str], ...] = ()
    sockets: tuple[tuple[int, str], ...] = ()
    line: int = 0  # the authorized_keys line that admitted it
    one_time: bool = False  # spend the key before running
    ignored_env: tuple[str, ...] = field(default=(), compare=False)  # client variables not accepted


def login(key: bytes, entries: Sequence[AuthorizedKey], spent: bool) -> str | None:
    """None if `key` may log in at all (each START is checked again), else why not."""
    if not entries:
        return f"key {fingerprint(key)} is not authorized"
    if spent and all(e.one_time for e in entries):
        return f"one-time key {fingerprint(key)} was already used"
    return None


def plan(entries: Sequence[AuthorizedKey], request: Start, settings: Settings) -> Plan:
    """The plan of the first of the key's authorized_keys lines that admits the request; else Refused
    with the first line's reason."""
    refusals = []
    for entry in entries:
        try:
            return _plan_one(entry, request, settings)
        except Refused as e:
            refusals.append(e)
    raise refusals[0] if refusals else Refused("not permitted")


def _plan_one(entry: AuthorizedKey, req: Start, s: Settings) -> Plan:
    account = _account(entry, req.user, s)
    if req.recipe is not None:
        steps = _recipe_steps(entry, req.recipe, s)
    else:
        steps = _command_step(entry, req.argv, account, s)
    channels = len(req.infifos) + len(req.outfifos) + len(req.sockets)
    if channels > s.max_channels:
        raise Refused(f"{channels} named pipes and sockets: at most {s.max_channels}")
    env, ignored = _environment(entry, req, account, s)
    return Plan(
        account,
        steps,
        env,
        req.recipe,
        account.home if req.recipe is None else None,
        req.infifos,
        req.outfifos,
        req.sockets,
        entry.line,
        entry.one_time,
        ignored,
    )


def _recipe_steps(entry: AuthorizedKey, recipe: str, s: Settings) -> tuple[Step, ...]:
    if entry.command is not None:
        raise Refused("a key bound to one command cannot run recipes")
    try:
        commands = parse_recipe(recipe)
    except RecipeError as e:
        raise Refused(f"bad recipe: {e}") from None
    return tuple(_step(tuple(c.argv), _program(c.argv[0], entry, s)) for c in commands)


def _command_step(entry: AuthorizedKey, argv: tuple[str, ...], account: Account, s: Settings) -> tuple[Step]:
    """As ssh, the account's shell runs the command line: one argument is a line as typed, several are
    quoted so that they arrive as given. A restricted key gets no shell (it would run whatever the line
    says, past the allowlist): its program is found and checked instead."""
    if entry.allow is None and entry.command is None:
        shell = account.shell if account.shell in s.shells else DEFAULT_SHELL
        line = argv[0] if len(argv) == 1 else shlex.join(argv)
        return (Step((os.path.basename(shell), "-c", line), shell),)
    words = _words(argv)
    if entry.command is not None and words != entry.command:
        raise Refused(f"this key may only run: {shlex.join(entry.command)}")
    return (_step(words, _program(words[0], entry, s)),)


def _step(argv: tuple[str, ...], program: Program) -> Step:
    return Step(argv, program.path, program.real)


def _words(argv: tuple[str, ...]) -> tuple[str, ...]:
    """A lone argument with spaces is a command line: split as a shell would, quotes and all."""
    if len(argv) != 1 or not any(c.isspace() for c in argv[0]):
        return argv
    try:
        words = tuple(shlex.split(argv[0]))
    except ValueError as e:
        raise Refused(f"command: {e}") from None
    if not words:
        raise Refused("no command given")
    return words


def _account(entry: AuthorizedKey, asked: str | None, s: Settings) -> Account:
    """The account the key runs as: the one asked for if its users= lists it, else the first listed;
    a key without users= runs as netplumbd's own account only."""
    allowed = entry.users or (s.me.name,)
    name = asked or allowed[0]
    if name not in allowed:
        raise Refused(f"this key may not run commands as {name!r}")
    account = s.me if name == s.me.name else s.account(name)
    if account is None:
        raise Refused(f"no user {name!r} here")
    if account.uid != s.me.uid and s.me.uid != 0:
        raise Refused(f"netplumbd does not run as root and cannot switch to user {name!r}")
    return account


def _program(name: str, entry: AuthorizedKey, s: Settings) -> Program:
    """The program `name` means here, found with the server's PATH (never the client's), and checked
    against the key's allowlist by the file it is."""
    if "/" in name and not name.startswith("/"):
        raise Refused(f"{name!r}: give a program found in PATH or an absolute path")
    program = s.which(name, s.path)
    if program is None:
        raise Refused(f"{name}: command not found (PATH={s.path})", NOT_FOUND)
    if entry.allow is not None:
        # The file and the name it runs under: a program may act on its argv[0] (rbash is bash, busybox
        # is every tool), so allowing rbash must not allow bash.
        allowed = {(os.path.basename(p.path), p.real) for a in entry.allow if (p := s.which(a, s.path)) is not None}
        if (os.path.basename(program.path), program.real) not in allowed:
            raise Refused(
                f"{name!r} ({program.real}) is not in this key's allowlist "
                f"({', '.join(sorted(entry.allow)) or 'empty'})"
            )
    return program


def _environment(
    entry: AuthorizedKey,
    req: Start,
    account: Account,
    s: Settings,
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """A fresh environment, plus the client's variables that match accept_env (AcceptEnv) for a key
    that may run anything. A restricted key (allow= or command=) gets none of them: the environment
    steers what its programs do (LD_PRELOAD, LD_LIBRARY_PATH, BASH_ENV, ENV, PATH, IFS, PYTHONPATH,
    TAR_OPTIONS, GIT_*...), and no list of names can say which of them an allowed program honours.
    sshd warns that AcceptEnv can bypass restricted environments and leaves it to its administrator
    (as PermitUserEnvironment, off by default, for LD_PRELOAD); here a restriction holds whatever
    --accept-env says."""
    env = {
        "PATH": s.path,
        "HOME": account.home,
        "USER": account.name,
        "LOGNAME": account.name,
        "SHELL": account.shell or "/bin/sh",
    }
    if s.lang:
        env["LANG"] = s.lang
    ignored = []
    restricted = entry.allow is not None or entry.command is not None
    for name, value in req.env:
        if not restricted and any(fnmatchcase(name, pattern) for pattern in s.accept_env):
            env[name] = value
        else:
            ignored.append(name)
    return tuple(env.items()), tuple(ignored)


def login_shells(path: str = "/etc/shells") -> frozenset[str]:
    """The login shells this machine lists; /bin/sh if it lists none."""
    try:
        with open(path) as f:
            shells = {line.strip() for line in f if line.startswith("/")}
    except OSError:
        shells = set()
    return frozenset(shells or {DEFAULT_SHELL})


def real_which(name: str, path: str) -> Program | None:
    """which(1) with `path`; the lookup Settings.which is in production."""
    if name.startswith("/"):
        found: str | None = name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    else:
        found = next(
            (
                c
                for d in path.split(os.pathsep)
                if d.startswith("/")
                for c in [os.path.join(d, name)]
                if os.path.isfile(c) and os.access(c, os.X_OK)
            ),
            None,
        )
    return None if found is None else Program(found, os.path.realpath(found))


def real_account(name: str) -> Account | None:
    """The account `name` in the password database, with its groups; the lookup Settings.account is."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return account_of(pw)


def account_of(pw: pwd.struct_passwd) -> Account:
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = (pw.pw_gid,)
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell)
