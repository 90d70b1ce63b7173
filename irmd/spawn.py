"""How the IRMd starts processes: IPCPs (its own code, isolated from its caller's working directory
and environment) and bound programs (as their binding's owner, with a clean environment, in /).

Nothing of the IRMd's environment or working directory reaches what it starts, except the socket
to find it by: an admin's PYTHONPATH or LD_PRELOAD must not become a started service's code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pwd
import re
import shutil
import sys
from pathlib import Path
from typing import Protocol

from irmd.forkserver import PROJECT_ROOT, ForkError, ForkServer
from irmd.identity import file_head
from transports.unix import SOCK_ENV, TrustError, check_trusted_file

log = logging.getLogger("irmd")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INTERPRETERS_MAX = 4  # #! lines the kernel follows one behind the other (BINPRM_MAX_RECURSION)
KEPT = ("LANG", "LC_ALL", "TZ")  # locale and time zone: how to speak, never what to run
# `python -I` ignores PYTHON* variables, the user's site directory and the working directory; the
# project comes from where this IRMd's own code is, so an IPCP runs the code its IRMd runs.
IPCP_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); from ipcp.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


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
    `#!/usr/bin/env NAME` finds in the safe PATH too). Otherwise whoever may write any of them runs
    code as `uid` at the next flow to its name."""
    _check_file(path, uid)
    script = path
    for _ in range(INTERPRETERS_MAX):
        run = _interpreters(script)
        if not run:
            return
        for interpreter in run:
            try:
                _check_file(interpreter, uid)
            except TrustError as e:
                raise TrustError(e.errno, f"{e.strerror} (the interpreter of {script})") from None
        script = run[-1]
    raise TrustError(0, f"{path}: more than {INTERPRETERS_MAX} interpreters, one behind the other")


def _check_file(path: str, uid: int) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise TrustError(e.errno, f"{path}: {e.strerror}") from None
    check_trusted_file(path, st, uid)


def _interpreters(path: str) -> list[str]:
    """What the kernel runs for the script at `path` (started in /, with the safe PATH): the program
    its `#!` line names, and, for `env`, the program env finds too; [] for a file without `#!`."""
    try:
        head = file_head(path)
    except OSError as e:
        raise TrustError(e.errno, f"{path}: {e.strerror}") from None
    if not head.startswith(b"#!"):
        return []
    # As the kernel reads the line: the interpreter up to the first blank, the rest one argument.
    line = head[2:].split(b"\n", 1)[0].decode(errors="surrogateescape")
    interpreter, arg = re.fullmatch(r"[ \t]*([^ \t]*)[ \t]*(.*?)[ \t]*", line).groups()  # type: ignore[union-attr]
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
    if forks is not None and not forks.lost:
        try:
            return await forks.spawn(kind, name, str(sock), env, out.fd)
        except ForkError as e:
            log.warning("ipcp %s: the fork server failed (%s); executing it", name, e)
    return await asyncio.create_subprocess_exec(
        *ipcp_command(kind, name, sock), stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
        cwd="/", env=env, stdout=out.fd, stderr=out.fd,
    )  # fmt: skip


async def start_program(path: str, args: list[str], owner: int, sock: Path, out: Output) -> asyncio.subprocess.Process:
    """Start a bound program as its owner: in its own session, stdin /dev/null, cwd /, a clean environment;
    its stdout and stderr one pipe for the IRMd to log, at a bounded rate (a program may print what its
    clients send: straight into the IRMd's log, its stderr grew it without bound)."""
    who = run_as(owner, os.geteuid())
    creds: dict[str, object] = {}
    if who.uid is not None:
        creds = {"user": who.uid, "group": who.gid, "extra_groups": os.getgrouplist(who.user, who.gid or 0)
                 if who.user != str(who.uid) else []}  # fmt: skip
    return await asyncio.create_subprocess_exec(
        path, *args, stdin=asyncio.subprocess.DEVNULL, start_new_session=True, cwd="/",
        env=clean_env(sock, who, out), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, **creds,  # type: ignore[arg-type]
    )  # fmt: skip
