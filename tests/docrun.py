"""Run a Markdown document's shell blocks as a reader would type them, one shell per document.

Fenced blocks say what they hold: `sh` (commands, one per line), `console` (`$ command` lines, each
followed by the output it shows), `python`, or anything else (`text`, `toml`, ...), which is never
run. A block is skipped when the line before it is `<!-- not run: WHY -->`; a python block runs only
after `<!-- run -->`; `<!-- sh` ... `-->` holds commands run unseen (a setup a reader has already
done). Each document runs in its own mount, network and pid namespaces, with fresh /tmp, /run and
HOME, its shell's output on a terminal: nothing a document starts outlives its run or meets another's.

A daemon started in the background (`irmd &`, `oping -l &`, `styx serve ... &`: see `daemon`) is
waited for until it says READY=1 (sd_notify), as a reader waits for a daemon before using it; other
background commands are only started. A `console` command must print each line shown (digits,
spaces and the checkout's path aside; `…` stands for anything) in that order, and fail when what it
shows is its own error (`irm: ...`); any other command must succeed.
"""

from __future__ import annotations

import dataclasses
import os
import pty
import re
import select
import shlex
import subprocess
import threading
import time
from pathlib import Path

from proto.service import ReadyListener

FENCE = re.compile(r"^(```+)\s*([\w-]*)\s*$")
SKIP = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")
RUN = "<!-- run -->"
HIDDEN_START, HIDDEN_END = "<!-- sh", "-->"
SHELL_TAGS = ("sh", "console")
KNOWN_TAGS = (*SHELL_TAGS, "python", "text", "toml", "json", "xml", "dot")
COMMAND_TIMEOUT = 180.0
READY_TIMEOUT = 90.0
SERVERS = ("oping", "operf", "oecho", "ocbr")  # with -l, they serve
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PRIVATE = ("/tmp", "/run", "/var/lib/ouroboros", "/etc/ouroboros")  # fresh and empty for each document


class DocError(AssertionError):
    """A document says something that does not hold (or cannot be run as it is written)."""


@dataclasses.dataclass
class Command:
    where: str  # FILE:LINE
    text: str
    expected: list[str] = dataclasses.field(default_factory=list)  # what a console block shows after it
    python: bool = False  # text is a python program

    @property
    def background(self) -> bool:
        """Whether it ends in `&` (before any comment)."""
        lexer = shlex.shlex(self.text.split("\n")[-1], posix=True, punctuation_chars=True)
        try:
            tokens = list(lexer)
        except ValueError:
            return False
        return bool(tokens) and tokens[-1] == "&"

    @property
    def words(self) -> list[str]:
        """The command's words from its program on: past variable assignments, `env` and `ip netns exec NS`."""
        try:
            words = shlex.split(self.text.split("\n")[0], comments=True)
        except ValueError:
            return []
        while words:
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "env":
                words = words[1:]
            elif words[:3] == ["ip", "netns", "exec"]:
                words = words[4:]
            else:
                break
        return words

    @property
    def program(self) -> str:
        """The command's program, for telling its error lines."""
        return os.path.basename(self.words[0]) if self.words else ""

    @property
    def daemon(self) -> bool:
        """A program that says READY=1 once it serves (proto.service): the irmd, servers, depots."""
        prog, args = self.program, self.words[1:]
        return (
            prog in ("irmd", "netplumbd")
            or (prog in SERVERS and bool({"-l", "--listen"} & set(args)))
            or (prog == "styx" and bool({"serve", "bridge"} & set(args)))
            or (prog == "ibp" and "depot" in args)
        )

    @property
    def must_fail(self) -> bool:
        """A console command whose shown output opens with its own error line."""
        first = next((line for line in self.expected if line.strip()), "")
        return bool(self.program) and first.startswith(f"{self.program}: ")


@dataclasses.dataclass
class Block:
    where: str
    tag: str
    lines: list[str]
    skip: str = ""  # why it is not run
    run: bool = False  # a python block marked to run
    hidden: bool = False


def blocks(path: Path) -> list[Block]:
    """The document's fenced blocks and hidden setups, in order, with their markers; an untagged fence
    is an error (say what it holds, so nothing meant to run goes unchecked)."""
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == HIDDEN_START:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == HIDDEN_END)
            out.append(Block(f"{path.name}:{i + 1}", "sh", lines[i + 1 : end], hidden=True))
            i = end + 1
            continue
        fence = FENCE.match(line)
        if fence is None:
            i += 1
            continue
        ticks, tag = fence.groups()
        end = next(
            j for j in range(i + 1, len(lines)) if lines[j].startswith(ticks) and not lines[j].strip("`").strip()
        )
        where = f"{path.name}:{i + 1}"
        if tag not in KNOWN_TAGS:
            raise DocError(
                f"{where}: a fenced block must say what it holds ({', '.join(KNOWN_TAGS)}), not {tag or 'nothing'}"
            )
        before = lines[i - 1].strip() if i else ""
        skip = SKIP.match(before)
        out.append(Block(where, tag, lines[i + 1 : end], skip.group(1) if skip else "", before == RUN))
        i = end + 1
    return out


def _joined(lines: list[str], start: int) -> tuple[str, int]:
    """The command starting at lines[start], with its continuations (a trailing \\ or a here-document)."""
    text, i = lines[start], start + 1
    while text.endswith("\\") and i < len(lines):
        text, i = text + "\n" + lines[i], i + 1
    heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", text)
    if heredoc:
        while i < len(lines):
            text, i = text + "\n" + lines[i], i + 1
            if lines[i - 1].strip() == heredoc.group(1):
                break
    return text, i


def commands(block: Block) -> list[Command]:
    """What a block asks to run: a python program, or its shell commands (with what a console block
    shows after each)."""
    line_no = int(block.where.rsplit(":", 1)[1]) + 1
    file = block.where.rsplit(":", 1)[0]
    if block.tag == "python":
        return [Command(block.where, "\n".join(block.lines), python=True)]
    out: list[Command] = []
    i = 0
    while i < len(block.lines):
        line = block.lines[i]
        if block.tag == "console":
            if not line.startswith("$ "):
                if out:
                    out[-1].expected.append(line)
                i += 1
                continue
            text, j = _joined([line[2:], *block.lines[i + 1 :]], 0)
            out.append(Command(f"{file}:{line_no + i}", text))
            i += j
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        text, i2 = _joined(block.lines, i)
        out.append(Command(f"{file}:{line_no + i}", text))
        i = i2
    return out


def normalize(line: str, root: str) -> str:
    """A line as compared: the checkout's path, numbers and spacing may differ from what the page shows."""
    line = line.replace(root, "ROOT")
    line = re.sub(r"/\S*/\.venv/bin/", "ROOT/.venv/bin/", line)
    line = re.sub(r"\d+(\.\d+)?", "0", line)
    line = line.replace("µs", "ms")
    return " ".join(line.split())


def shown(line: str) -> bool:
    """Whether a shown output line is compared: not an elision, not a table's rule."""
    s = line.strip()
    return bool(s) and s not in ("...", "…") and not re.fullmatch(r"[+\-]+", s)


def check_output(cmd: Command, output: str, root: str) -> None:
    got = [normalize(line, root) for line in output.splitlines()]
    at = 0
    for want in (normalize(line, root) for line in cmd.expected if shown(line)):
        pattern = re.compile(".*".join(map(re.escape, want.split("…"))))
        hit = next((k for k in range(at, len(got)) if pattern.search(got[k])), None)
        if hit is None:
            raise DocError(f"{cmd.where}: `{cmd.text}` did not print, in this order:\n  {want}\nit printed:\n{output}")
        at = hit + 1


class Session:
    """One shell, as a reader's terminal: commands in, output out (on a pty), in private namespaces."""

    def __init__(self, root: Path, scratch: Path) -> None:
        self.root = root
        self.scratch = scratch  # seen inside at /run/doctest
        self.home = scratch / "home"
        self.home.mkdir()
        master, slave = pty.openpty()
        self.master = master
        script_r, self.script = os.pipe()
        setup = " && ".join(
            [
                "mount --make-rprivate /",
                *(f"{{ [ -e {d} ] || mkdir -p {d}; }} && mount -t tmpfs doctest {d}" for d in PRIVATE[1:]),
                f"mkdir -p /run/doctest && mount --bind {scratch} /run/doctest",
                f"mount -t tmpfs doctest {PRIVATE[0]}",
                "ip link set lo up",
                f"exec bash --norc --noprofile /dev/fd/{script_r}",
            ]
        )
        env = {
            "PATH": SAFE_PATH,
            "HOME": "/run/doctest/home",
            "TERM": "dumb",
            "LANG": "C.UTF-8",
            "USER": "root",
            "LOGNAME": "root",
        }
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", setup],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            cwd=root,
            env=env,
            pass_fds=(script_r,),
            start_new_session=True,
        )
        os.close(slave)
        os.close(script_r)
        self.buf = b""
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.seq = 0
        self.transcript: list[str] = []
        self.pid_ns = ""

    def _read(self) -> None:
        # Polls, so that close() can stop it before closing the pty: a reader left blocked on a
        # closed fd would read the next session's pty, which reuses the number, and steal its output.
        while not self.stopping.is_set():
            if not select.select([self.master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.buf += b"\0EOF"
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()

    def _send(self, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(self.script, data) :]

    def _until(self, marker: bytes, timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        with self.cond:
            while marker not in self.buf:
                if b"\0EOF" in self.buf:
                    raise DocError(f"{what}: the shell ended:\n{self._text(self.buf)}")
                if not self.cond.wait(deadline - time.monotonic()) and time.monotonic() >= deadline:
                    raise DocError(f"{what}: no end after {timeout:.0f} s; so far:\n{self._text(self.buf)}")
            head, _, self.buf = self.buf.partition(marker)
            end, _, self.buf = self.buf.partition(b"\n")
            return head + b"\0" + end

    @staticmethod
    def _text(data: bytes) -> str:
        return data.decode(errors="replace").replace("\r\n", "\n").replace("\r", "")

    def run(self, cmd: Command) -> None:
        self.seq += 1
        mark = f"\x1e{self.seq}\x1e"
        listener = None
        text = cmd.text
        if cmd.python:
            program = self.scratch / f"block{self.seq}.py"
            program.write_text(cmd.text + "\n")
            text = f"python /run/doctest/{program.name}"
        elif cmd.background and cmd.daemon:
            listener = ReadyListener(self.scratch / f"ready{self.seq}")
            text = (
                f"export NOTIFY_SOCKET=/run/doctest/ready{self.seq}\n{text}\nunset NOTIFY_SOCKET\n"
                f"printf '\\035%s\\n' \"$!\""
            )  # its pid: on a line of its own, after a \x1d
        self.transcript.append(f"$ {cmd.text}")
        # The status goes out on a line of its own: \x1e never appears in what a program prints. Then, as
        # an interactive shell does before its prompt, finished jobs leave the table (%1 is the next one).
        self._send(f"{text}\nprintf '\\n{mark}%s\\n' \"$?\"; jobs >/dev/null\n")
        raw = self._until(mark.encode(), COMMAND_TIMEOUT, f"{cmd.where}: `{cmd.text}`")
        head, _, status = raw.rpartition(b"\0")
        output = self._text(head).removesuffix("\n")
        self.transcript.append(output)
        if listener is not None:
            head, _, pid = head.rpartition(b"\x1d")
            pid = pid.split(b"\n")[0]
            output = self._text(head).removesuffix("\n")
            self.transcript[-1] = output
            try:
                if not listener.wait(lambda: self._alive(int(pid)), READY_TIMEOUT):
                    raise DocError(
                        f"{cmd.where}: `{cmd.text}` never said it was ready (READY=1) within "
                        f"{READY_TIMEOUT:.0f} s:\n{output}\n{self.drain()}"
                    )
            finally:
                listener.close()
            return
        code = int(status or b"1")
        if cmd.must_fail and code == 0:
            raise DocError(f"{cmd.where}: `{cmd.text}` succeeded; the page shows it failing:\n{output}")
        if not cmd.must_fail and code != 0:
            raise DocError(f"{cmd.where}: `{cmd.text}` failed with status {code}:\n{output}")
        if cmd.expected:
            check_output(cmd, output, str(self.root))

    def _alive(self, pid: int) -> bool:
        """Whether the process the shell knows as `pid` (in its pid namespace) still runs."""
        shell_ns = self._ns()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != shell_ns:
                    continue
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
            if nspid and int(nspid[-1]) == pid and state != "Z":
                return True
        return False

    def _ns(self) -> str:
        """The shell's pid namespace (unshare's child runs in it)."""
        if not self.pid_ns:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            self.pid_ns = os.readlink(f"/proc/{kids[0]}/ns/pid")
        return self.pid_ns

    def drain(self) -> str:
        """What the shell printed since the last command (the background jobs' lines)."""
        with self.cond:
            data, self.buf = self.buf, b""
        return self._text(data)

    def close(self) -> None:
        """End the shell: its pid namespace goes with it, and everything started there."""
        os.close(self.script)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stopping.set()
        self.reader.join()
        os.close(self.master)


def run_document(path: Path, root: Path, scratch: Path) -> list[str]:
    """Run every runnable block of the document at `path`, in order; returns the transcript."""
    todo = [
        c
        for b in blocks(path)
        if not b.skip and (b.tag in SHELL_TAGS or (b.tag == "python" and b.run))
        for c in commands(b)
    ]
    session = Session(root, scratch)
    try:
        for cmd in todo:
            session.run(cmd)
    except DocError as e:
        raise DocError(f"{e}\n--- the session so far ---\n" + "\n".join(session.transcript[-40:])) from None
    finally:
        session.close()
    return session.transcript
