"""Recipes: labelled multi-command pipelines as the seed describes (`label:`, `|`, `&`, `>%label`,
`2>%label`, `<`, `>`, `>>`, `2>`, `2>>`, `2>&1`); a strict parser, and the job the runner starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from apps.netplumb.endpoints import open_within
from apps.netplumb.jobs import Exe, Launch, pipes, wait_unreaped

MAX_COMMANDS = 256
OPEN_TIMEOUT = 10.0  # seconds a redirection waits for the other end of a named pipe
LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Longest first: the operators a token may start with.
OPERATORS = ("2>&1", "2>>", "2>", ">>", ">", "<", "|", "&", ";")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the line."""


@dataclass(frozen=True)
class File:
    path: str
    append: bool = False


@dataclass(frozen=True)
class ToLabel:
    label: str


@dataclass(frozen=True)
class ToNext:
    """`|`: into the next command's stdin."""


@dataclass(frozen=True)
class ToStdout:
    """`2>&1`: where stdout goes. first: it came before stdout was redirected (see _check)."""

    first: bool = False


@dataclass(frozen=True)
class SessionStdout:
    """`2>&1 >file`: stderr goes where stdout was before the `>`, the session's stdout, as in sh."""


Target = File | ToLabel | ToNext | ToStdout | SessionStdout


@dataclass
class Command:
    argv: list[str]
    line: int
    label: str | None = None
    stdin: File | None = None
    stdout: Target | None = None  # None: the session's stdout
    stderr: Target | None = None  # None: the session's stderr
    wait: bool = True  # False after `|` or `&`: start the next one at once
    fed: bool = False  # something writes into this command's stdin (`|` or `>%label`)


@dataclass
class _Token:
    text: str
    op: bool  # an unquoted operator


def tokenize(line: str, n: int) -> Iterator[_Token]:
    """Words with sh-style quotes and backslashes; operators split off; '#' starts a comment. One at
    a time: the parser stops at the first error, not after the whole line is in tokens."""
    word: list[str] = []
    i, in_word = 0, False

    def end_word() -> Iterator[_Token]:
        nonlocal word, in_word
        if in_word:
            yield _Token("".join(word), False)
        word, in_word = [], False

    while i < len(line):
        c = line[i]
        if c in " \t\r":
            yield from end_word()
            i += 1
        elif c == "#" and not in_word:
            break
        elif c == "'":
            j = line.find("'", i + 1)
            if j < 0:
                raise RecipeError(f"line {n}: unterminated ' quote")
            word.append(line[i + 1 : j])
            in_word = True
            i = j + 1
        elif c == '"':
            i += 1
            while i < len(line) and line[i] != '"':
                if line[i] == "\\" and i + 1 < len(line) and line[i + 1] in '"\\$`':
                    i += 1
                word.append(line[i])
                i += 1
            if i >= len(line):
                raise RecipeError(f'line {n}: unterminated " quote')
            in_word = True
            i += 1
        elif c == "\\":
            if i + 1 >= len(line):
                raise RecipeError(f"line {n}: a backslash at the end of the line")
            word.append(line[i + 1])
            in_word = True
            i += 2
        else:
            op = next((o for o in OPERATORS if line.startswith(o, i)), None)
            if op is not None and op.startswith("2") and in_word:
                op = None  # 'x2>' is a word then '>'
            if op is not None:
                yield from end_word()
                yield _Token(op, True)
                i += len(op)
            else:
                word.append(c)
                in_word = True
                i += 1
    yield from end_word()


def parse_recipe(text: str) -> list[Command]:
    """Commands in order; raises RecipeError naming the line of the first problem."""
    commands: list[Command] = []
    current: Command | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        tokens = tokenize(raw, n)
        for tok in tokens:
            if current is None:
                current = Command([], n)
                if not tok.op and tok.text.endswith(":") and LABEL.fullmatch(tok.text[:-1]):
                    current.label = tok.text[:-1]
                    continue
            if not tok.op:
                current.argv.append(tok.text)
                continue
            if tok.text in ("|", "&", ";"):
                if not current.argv:
                    raise RecipeError(f"line {n}: {tok.text!r} without a command before it")
                current.wait = tok.text == ";"
                if tok.text == "|":
                    current.stdout = _set(current.stdout, ToNext(), "stdout", n)
                _append(commands, current)
                current = None
                continue
            if tok.text == "2>&1":
                current.stderr = _set(current.stderr, ToStdout(first=current.stdout is None), "stderr", n)
                continue
            after = next(tokens, None)
            if after is None or after.op:
                raise RecipeError(f"line {n}: {tok.text!r} needs a file name or %label after it")
            target = after.text
            if tok.text == "<":
                if target.startswith("%"):
                    raise RecipeError(f"line {n}: '<%label' is not a thing: send to a label with '>%label'")
                current.stdin = File(target)
                continue
            dest: Target
            if target.startswith("%"):
                if tok.text not in (">", "2>"):
                    raise RecipeError(f"line {n}: a label takes '>%label' or '2>%label', not {tok.text!r}")
                # The seed writes the label as it is defined, colon and all: '>%label3:'.
                name = target[1:-1] if target.endswith(":") else target[1:]
                if not LABEL.fullmatch(name):
                    raise RecipeError(f"line {n}: bad label {target!r}")
                dest = ToLabel(name)
            else:
                dest = File(target, append=tok.text.endswith(">>"))
            if tok.text.startswith("2"):
                current.stderr = _set(current.stderr, dest, "stderr", n)
            else:
                current.stdout = _set(current.stdout, dest, "stdout", n)
        if current is not None:  # the end of a line ends its command (unless it ended in | or &)
            if not current.argv:
                raise RecipeError(f"line {n}: label {current.label!r} without a command")
            _append(commands, current)
            current = None
    _check(commands)
    return commands


def _append(commands: list[Command], cmd: Command) -> None:
    # Counted as each is added: checked once a line, one line of 'a|a|...' built 32,000 commands
    # (16 MB, 0.3 s) out of a 64 KiB recipe before it was refused.
    if len(commands) >= MAX_COMMANDS:
        raise RecipeError(f"line {cmd.line}: more than {MAX_COMMANDS} commands")
    commands.append(cmd)


def _set(old: Target | None, new: Target, what: str, n: int) -> Target:
    if old is not None:
        raise RecipeError(f"line {n}: {what} is redirected twice")
    return new


def _check(commands: list[Command]) -> None:
    if not commands:
        raise RecipeError("the recipe has no commands")
    labels: dict[str, int] = {}
    for i, cmd in enumerate(commands):
        if cmd.label is not None:
            if cmd.label in labels:
                raise RecipeError(f"line {cmd.line}: label {cmd.label!r} is used twice")
            labels[cmd.label] = i
    for cmd in commands:
        # sh applies redirections left to right, after the pipe: `2>&1` copies stdout as it stands
        # then, so a later `>file` or `>%label` moves stdout only; a `|`, made first, takes both.
        if isinstance(cmd.stderr, ToStdout) and cmd.stderr.first and isinstance(cmd.stdout, File | ToLabel):
            cmd.stderr = SessionStdout()
    for i, cmd in enumerate(commands):
        for target in (cmd.stdout, cmd.stderr):
            if isinstance(target, ToLabel):
                if target.label not in labels:
                    raise RecipeError(f"line {cmd.line}: no command is labelled {target.label!r}")
                if labels[target.label] == i:
                    raise RecipeError(f"line {cmd.line}: a command cannot feed its own stdin")
                commands[labels[target.label]].fed = True
            elif isinstance(target, ToNext):
                if i + 1 >= len(commands):
                    raise RecipeError(f"line {cmd.line}: '|' at the end of the recipe pipes into nothing")
                commands[i + 1].fed = True
    for cmd in commands:
        if cmd.fed and cmd.stdin is not None:
            raise RecipeError(f"line {cmd.line}: stdin comes from both a pipe and '<'")


@dataclass
class _Plan:
    """File descriptors of every command, and after which command each can be closed."""

    fds: list[tuple[int, int, int]] = field(default_factory=list)
    last_use: dict[int, int] = field(default_factory=dict)


class RecipeJob:
    """Runs a parsed recipe: all pipes and files opened first (with this process's rights, in its
    working directory), then commands in order, waiting for each unless it ended in `|` or `&`.
    The status is the first non-zero one, else 0. exes: each command's program, as resolved."""

    def __init__(
        self, commands: list[Command], exes: list[Exe], launch: Launch, open_timeout: float = OPEN_TIMEOUT
    ) -> None:
        if len(exes) != len(commands):
            raise RecipeError(f"{len(exes)} programs for {len(commands)} commands")
        (ci, self.stdin), (co, self.stdout), (ce, self.stderr) = pipes()
        self._commands = commands
        self._exes = exes
        self._kwargs = launch.popen_kwargs()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._status = 0
        self._lock = threading.Lock()
        self._cancelled = False
        self._reaped = False
        opened: list[int] = [ci, co, ce]
        try:
            plan = self._plan(commands, open_timeout, ci, co, ce, opened)
        except BaseException:
            for fd in (*opened, self.stdin, self.stdout, self.stderr):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._thread = threading.Thread(target=self._run, args=(plan, ce), daemon=True, name="recipe")
        self._thread.start()

    @staticmethod
    def _plan(commands: list[Command], open_timeout: float, ci: int, co: int, ce: int, opened: list[int]) -> _Plan:
        def open_file(f: File, write: bool) -> int:
            flags = (os.O_WRONLY | os.O_CREAT | (os.O_APPEND if f.append else os.O_TRUNC)) if write else os.O_RDONLY
            try:
                fd = open_within(f.path, flags, open_timeout)
            except TimeoutError:
                raise RecipeError(
                    f"cannot open {f.path}: nothing opened the other end of this named pipe within {open_timeout:g} s"
                ) from None
            except OSError as e:
                raise RecipeError(f"cannot open {f.path}: {e.strerror}") from None
            opened.append(fd)
            return fd

        labels = {c.label: i for i, c in enumerate(commands) if c.label is not None}
        inputs: dict[int, tuple[int, int]] = {}
        for i, cmd in enumerate(commands):
            if cmd.fed:
                r, w = os.pipe()
                opened += [r, w]
                inputs[i] = (r, w)
        plan = _Plan()
        stdin_taken = False
        devnull = os.open(os.devnull, os.O_RDONLY)
        opened.append(devnull)

        def dest(t: Target | None, i: int, default: int) -> int:
            if t is None:
                return default
            if isinstance(t, File):
                return open_file(t, True)
            if isinstance(t, ToLabel):
                return inputs[labels[t.label]][1]
            if isinstance(t, ToNext):
                return inputs[i + 1][1]
            raise AssertionError(t)

        for i, cmd in enumerate(commands):
            if cmd.fed:
                fin = inputs[i][0]
            elif cmd.stdin is not None:
                fin = open_file(cmd.stdin, False)
            elif not stdin_taken:
                fin, stdin_taken = ci, True
            else:
                fin = devnull
            fout = dest(cmd.stdout, i, co)
            if isinstance(cmd.stderr, ToStdout):
                ferr = fout
            elif isinstance(cmd.stderr, SessionStdout):
                ferr = co
            else:
                ferr = dest(cmd.stderr, i, ce)
            plan.fds.append((fin, fout, ferr))
        for fd in opened:
            plan.last_use[fd] = -1
        for i, triple in enumerate(plan.fds):
            for fd in triple:
                plan.last_use[fd] = i
        return plan

    def _run(self, plan: _Plan, ce: int) -> None:
        def close_after(i: int) -> None:
            for fd, last in list(plan.last_use.items()):
                if last <= i:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    del plan.last_use[fd]

        close_after(-1)
        for i, (cmd, exe, (fin, fout, ferr)) in enumerate(zip(self._commands, self._exes, plan.fds, strict=True)):
            with self._lock:  # the check and the start, so that a cancel cannot slip between them
                if self._cancelled:
                    break
                try:
                    proc = exe.popen(cmd.argv, stdin=fin, stdout=fout, stderr=ferr, **self._kwargs)
                except OSError as e:
                    with contextlib.suppress(OSError):
                        os.write(ferr, f"recipe line {cmd.line}: cannot run {cmd.argv[0]}: {e.strerror}\n".encode())
                    self._status = self._status or 127
                    break
                self._procs.append(proc)
            close_after(i)
            if cmd.wait:
                self._note(wait_unreaped(proc))
        close_after(len(self._commands))

    def _note(self, code: int) -> None:
        with self._lock:
            if self._status == 0:
                self._status = code

    def wait(self) -> int:
        """Until every command has ended; they stay unreaped (see reap)."""
        self._thread.join()
        for proc in list(self._procs):
            self._note(wait_unreaped(proc))
        return self._status

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True

    def signal(self, sig: int) -> None:
        """To every command's process group, those that ended included: their pids are still the
        job's (wait_unreaped), so the signal reaches what is left of each group and nothing else."""
        with self._lock:
            if self._reaped:
                return
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)

    def reap(self) -> None:
        with self._lock:
            self._reaped = True
            for proc in self._procs:
                proc.wait()
