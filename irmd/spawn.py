"""How the IRMd starts processes: IPCPs (its own code, isolated from its caller's working directory
and environment) and bound programs (as their binding's owner, with a clean environment, in /).

Nothing of the IRMd's environment or working directory reaches what it starts, except the socket
to find it by: an admin's PYTHONPATH or LD_PRELOAD must not become a started service's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pwd
import re
import resource
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from irmd import elf
from irmd.forkserver import PROJECT_ROOT, ForkError, ForkServer
from irmd.identity import file_head, shebang
from proto.login import login_umask
from proto.service import lower_nofile
from transports.unix import SOCK_ENV, TrustError, check_dirs, check_trusted_file

log = logging.getLogger("irmd")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INTERPRETERS_MAX = 4  # #! lines the kernel follows one behind the other (BINPRM_MAX_RECURSION)
KEPT = ("LANG", "LC_ALL", "TZ")  # locale and time zone: how to speak, never what to run
# The IRMd's own configuration its IPCPs (run as the IRMd's user, never a client's) share: where
# members keep their keys. Without it an IRMd given a state directory had its IPCPs write to /var/lib.
IPCP_KEPT = ("OUROBOROS_STATE_DIR",)
# `python -I` ignores PYTHON* variables, the user's site directory and the working directory; the
# project comes from where this IRMd's own code is, so an IPCP runs the code its IRMd runs.
IPCP_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from ipcp.__main__ import main; sys.exit(main(sys.argv[1:]))"
)
# The loader's dynamic string tokens, as glibc's is_dst reads them: $NAME not followed by a letter,
# digit or _, or ${NAME}. What $LIB and $PLATFORM stand for is the loader's build and the CPU's, not
# known here for sure: each of these values is checked, and the directory the value is chosen in too.
TOKEN = re.compile(r"\$(?:\{(ORIGIN|LIB|PLATFORM)\}|(ORIGIN|LIB|PLATFORM)(?![A-Za-z0-9_]))")
MULTIARCH = getattr(sys.implementation, "_multiarch", "")  # Debian's $LIB: lib/x86_64-linux-gnu
LIBS = tuple(dict.fromkeys(("lib", "lib64", "lib32", "libx32", f"lib/{MULTIARCH}" if MULTIARCH else "lib")))
PLATFORMS = tuple(dict.fromkeys((os.uname().machine, "haswell", "xeon_phi")))  # glibc's own names on x86
TOKENS_MAX = 4  # tokens in one entry: each $LIB or $PLATFORM multiplies the paths to check
# The soft descriptor limit the IRMd was started with (None: not kept), which the programs it starts get
# back: it raises its own to the hard limit (a service manager's 524,288), and a program that passes a
# descriptor past FD_SETSIZE (1,024) to select() writes past its fd_set, as systemd warns.
_started_nofile: int | None = None


def keep_nofile() -> None:
    """Remember the soft RLIMIT_NOFILE now, before the IRMd raises its own, for the programs it starts."""
    global _started_nofile
    _started_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _program_limits() -> None:  # pragma: no cover - runs in the forked child, before exec
    if _started_nofile is not None:
        lower_nofile(_started_nofile)


class Child(Protocol):
    """A process the IRMd started and watches: executed (asyncio's Process) or forked (Forked)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class Output:
    """Where what the IRMd starts writes: the IRMd's log (fd None: its own stdout and stderr), and the
    environment that makes it log as the IRMd does (its level, the journal)."""

    fd: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RunAs:
    """The user a started program runs as; uid None: as the IRMd itself (no change)."""

    uid: int | None
    gid: int | None
    home: str
    user: str


def run_as(owner: int, irmd_uid: int) -> RunAs:
    """A program runs as its binding's owner. Only a root IRMd can switch users; a non-root IRMd runs
    everything as itself (no owner can then be more than it)."""
    target = owner if irmd_uid == 0 else irmd_uid
    try:
        entry = pwd.getpwuid(target)
        home, user, gid = entry.pw_dir, entry.pw_name, entry.pw_gid
    except KeyError:  # a uid without a passwd entry: its own group, home /
        home, user, gid = "/", str(target), target
    if target == irmd_uid:
        return RunAs(None, None, home, user)
    return RunAs(target, gid, home, user)


def check_program(path: str, uid: int) -> None:
    """TrustError unless only root or `uid` (whom it runs as) could have written the program at
    `path`, and what the kernel runs for it: the file (links followed) and every directory above it,
    as written and as its links lead, belong to one of them and are not writable by others (sticky
    directories such as /tmp allowed above the file), as sshd wants of its AuthorizedKeysCommand;
    and so does the interpreter a script's `#!` line names, and its own interpreter in turn (what
    `#!/usr/bin/env NAME` finds in the safe PATH too); and for each of them that is an ELF program,
    what the dynamic loader takes for it (_check_loaded). Otherwise whoever may write any of them runs
    code as `uid` at the next flow to its name."""
    _check_file(path, uid)
    _check_loaded(path, uid)
    script = path
    for _ in range(INTERPRETERS_MAX):
        run = _interpreters(script)
        if not run:
            return
        for interpreter in run:
            with _part_of(f"the interpreter of {script}"):
                _check_file(interpreter, uid)
                _check_loaded(interpreter, uid)
        script = run[-1]
    raise TrustError(0, f"{path}: more than {INTERPRETERS_MAX} interpreters, one behind the other")


@contextlib.contextmanager
def _part_of(what: str) -> Iterator[None]:
    """A TrustError within says which part of the program it is about."""
    try:
        yield
    except TrustError as e:
        raise TrustError(e.errno, f"{e.strerror} ({what})") from None


def _check_file(path: str, uid: int) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise TrustError(e.errno, f"{path}: {e.strerror}") from None
    check_trusted_file(path, st, uid)


def _check_loaded(path: str, uid: int) -> None:
    """TrustError unless no one but root and `uid` could have written what the dynamic loader takes
    for the ELF program at `path` (nothing for any other file): its loader (PT_INTERP) is a file
    _check_file takes; every directory of its DT_RPATH and DT_RUNPATH (both, though the loaders read
    RPATH only without RUNPATH) is one check_dirs takes strictly (a sticky leaf would let others add
    a library), and one that does not exist is missing from such a directory (no one else can make
    it); a library it names by path (DT_NEEDED or DT_AUDIT with a '/') is such a file.
    A malformed ELF file is refused: what the loader would make of it is not known.
    Not followed: the libraries it loads by name, and theirs (found in those directories or the
    system's), and the hardware-capability subdirectories the loader also searches in each."""
    try:
        found = elf.read(path)
    except OSError as e:
        raise TrustError(e.errno, f"{path}: {e.strerror}") from None
    except elf.ElfError as e:
        raise TrustError(0, f"{path}: a malformed ELF file: {e}") from None
    if found is None:
        return
    origin = os.path.dirname(os.path.realpath(path))  # $ORIGIN: as /proc/self/exe, links resolved
    if found.interp is not None:
        with _part_of(f"the ELF interpreter of {path}"):
            _check_file(os.path.join("/", found.interp), uid)  # a relative one: from the working directory, /
    for tag, values in (("RPATH", found.rpath), ("RUNPATH", found.runpath)):
        for value in filter(None, values):  # an empty value is no entry (an empty entry in one is)
            with _part_of(f"a {tag} directory of {path}"):
                directories: dict[str, None] = {}  # each checked once
                for entry in value.split(":"):
                    paths, choices = _loader_paths(entry, origin)
                    directories.update(dict.fromkeys(paths + choices))
                for directory in directories:
                    _check_dir(directory, uid)
    libraries = found.needed + tuple(name for value in found.audit for name in value.split(":"))
    for name in (name for name in libraries if "/" in name):  # one without is looked for in the directories
        with _part_of(f"a library {path} loads by path"):
            files, choices = _loader_paths(name, origin)
            for library in files:
                if os.path.lexists(library):
                    _check_file(library, uid)
                else:  # not there: no one else may make it
                    _check_dir(library, uid)
            for directory in choices:
                _check_dir(directory, uid)


def _check_dir(path: str, uid: int) -> None:
    """A directory the loader looks in (or a library's path) only root or `uid` could change, strictly
    (a sticky one would let others add a library); one not there, only they could make."""
    check_dirs(Path(path), uid, strict_leaf=True, missing_ok=True)


def _loader_paths(entry: str, origin: str) -> tuple[list[str], list[str]]:
    """The paths the loader may make of `entry` (an RPATH or RUNPATH directory, or a library's path)
    with its tokens replaced, and the directories where $LIB or $PLATFORM choose an entry of theirs;
    TrustError for an entry judged unsafe whatever it stands for:
    - an empty or relative one (ld.so's empty entry is the working directory): the working directory
      is / when the IRMd starts the program, but the program may change it before it loads a library
      (dlopen searches the RUNPATH too), so any directory another user can write could be it;
    - a $NAME or ${NAME} other than ORIGIN, LIB and PLATFORM: glibc takes it as it is written, musl
      drops the whole list (and reads $ORIGINX as $ORIGIN and X); real programs never have one."""
    tokens = list(TOKEN.finditer(entry))
    if entry.count("$") != len(tokens):
        raise TrustError(0, f"{entry!r} holds a $ the loaders do not read alike (only $ORIGIN, $LIB, $PLATFORM)")
    if len(tokens) > TOKENS_MAX:
        raise TrustError(0, f"{entry!r} holds more than {TOKENS_MAX} tokens")
    paths, choices, done = [""], list[str](), 0
    for token in tokens:
        name = token.group(1) or token.group(2)
        paths = [p + entry[done : token.start()] for p in paths]
        if name != "ORIGIN":  # each value, and the directory it is chosen in (for a value not listed here)
            choices.extend(os.path.dirname(p) for p in paths)
        values = (origin,) if name == "ORIGIN" else LIBS if name == "LIB" else PLATFORMS
        paths, done = [p + value for p in paths for value in values], token.end()
    paths = [p + entry[done:] for p in paths]
    if not all(p.startswith("/") for p in paths + choices):
        what = "an empty entry is" if not entry else f"{entry!r} is"
        raise TrustError(0, f"{what} relative to the working directory, which the program may change")
    return paths, choices


def _interpreters(path: str) -> list[str]:
    """What the kernel runs for the script at `path` (started in /, with the safe PATH): the program
    its `#!` line names, and, for `env`, the program env finds too; [] for a file without `#!`."""
    try:
        head = file_head(path)
    except OSError as e:
        raise TrustError(e.errno, f"{path}: {e.strerror}") from None
    if (line := shebang(head)) is None:
        return []
    interpreter, arg = line
    if not interpreter:
        raise TrustError(0, f"{path}: its #! line names no interpreter")
    interpreter = os.path.join("/", interpreter)  # a relative one from the working directory, /
    if os.path.basename(interpreter) != "env":
        return [interpreter]
    runs = _env_program(arg.split())
    if runs is None:
        raise TrustError(0, f"{path}: cannot tell which program env runs for its #! line")
    program, search = runs
    found = program if "/" in program else shutil.which(program, path=search)
    if found is None:
        raise TrustError(0, f"{path}: env finds no {program} in {search}")
    return [interpreter, os.path.join("/", found)]


def _env_program(words: list[str]) -> tuple[str, str] | None:
    """The program `env WORDS` runs (as -S splits them), and the PATH it is looked for in: the first
    word that is neither an option nor a variable's setting (PATH's changes where it is looked for);
    None when an option could change it otherwise (-C, or one not known here)."""
    path = SAFE_PATH
    while words:
        word, words = words[0], words[1:]
        if word == "--":
            return (words[0], path) if words else None
        if word in ("-u", "--unset"):
            path = os.defpath if words[:1] == ["PATH"] else path  # execvp's own, as with no PATH
            words = words[1:]
        elif word in ("-i", "--ignore-environment", "-"):
            path = os.defpath
        elif word in ("-S", "--split-string", "-0", "--null"):
            continue
        elif word.startswith("-S") and len(word) > 2:
            words = [word[2:], *words]
        elif word.startswith("-"):
            return None
        elif "=" in word:
            path = word[5:] if word.startswith("PATH=") else path
        else:
            return word, path
    return None


def clean_env(sock: Path, who: RunAs, out: Output) -> dict[str, str]:
    env = {"PATH": SAFE_PATH, "HOME": who.home, "USER": who.user, "LOGNAME": who.user, SOCK_ENV: str(sock)}
    env.update({k: v for k in KEPT if (v := os.environ.get(k))})
    return env | out.env


def ipcp_command(kind: str, name: str, sock: Path) -> list[str]:
    return [sys.executable, "-I", "-c", IPCP_BOOT, PROJECT_ROOT, kind, name, str(sock)]


async def start_ipcp(kind: str, name: str, sock: Path, out: Output, forks: ForkServer | None = None) -> Child:
    """An IPCP process, logging where the IRMd logs (its stderr is the IRMd's log): forked by the
    IRMd's fork server if it has one, else executed."""
    env = clean_env(sock, run_as(os.geteuid(), os.geteuid()), out)
    env.update({k: v for k in IPCP_KEPT if (v := os.environ.get(k))})
    if forks is not None and not forks.lost:
        try:
            return await forks.spawn(kind, name, str(sock), env, out.fd)
        except ForkError as e:
            log.warning("ipcp %s: the fork server failed (%s); executing it", name, e)
    return await asyncio.create_subprocess_exec(
        *ipcp_command(kind, name, sock), stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        cwd="/", env=env, stdout=out.fd, stderr=out.fd, umask=login_umask(),
    )  # fmt: skip


async def start_program(path: str, args: list[str], owner: int, sock: Path, out: Output) -> asyncio.subprocess.Process:
    """Start a bound program as its owner: in its own session, stdin /dev/null, cwd /, a clean environment;
    its stdout and stderr one pipe for the IRMd to log, at a bounded rate (a program may print what its
    clients send: straight into the IRMd's log, its stderr grew it without bound); with a login's umask,
    not the IRMd's (under umask 0 every file it made was anyone's to rewrite), and the descriptor limit
    the IRMd was started with, not the one it raised for itself."""
    who = run_as(owner, os.geteuid())
    creds: dict[str, object] = {}
    if who.uid is not None:
        creds = {"user": who.uid, "group": who.gid, "extra_groups": os.getgrouplist(who.user, who.gid or 0)
                 if who.user != str(who.uid) else []}  # fmt: skip
    return await asyncio.create_subprocess_exec(
        path, *args, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, cwd="/",
        env=clean_env(sock, who, out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        umask=login_umask(), preexec_fn=_program_limits, **creds,  # type: ignore[arg-type]
    )  # fmt: skip
