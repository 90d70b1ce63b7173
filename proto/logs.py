"""How every daemon of the stack logs: one line per record, tagged with host (or socket), component
and pid, at the level -v/-q set (passed down to what an IRMd starts), to a file, the journal or stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import socket
import stat
import sys
import time
from pathlib import Path

from proto.visible import VisibleFilter
from transports.unix import irmd_sock_path

LEVEL_ENV = "OUROBOROS_LOG_LEVEL"  # an IRMd's level, for the IPCPs and programs it starts
LADDER = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
LOG_MODE = 0o640


def host_tag(sock: Path | None = None) -> str:
    """Who logs, among the IRMds of a machine: the host's name for an IRMd on its usual socket
    (.../ouroboros/irmd.sock), else the socket's name (several IRMds on one host: a.sock is "a")."""
    sock = sock or irmd_sock_path()
    return socket.gethostname() if (sock.name, sock.parent.name) == ("irmd.sock", "ouroboros") else sock.stem


def default_log_file(sock: Path) -> Path:
    """Where an IRMd started on a terminal logs: beside its socket, under the socket's name."""
    return sock.with_suffix(".log")


class LineFormatter(logging.Formatter):
    """`TIME HOST COMPONENT[PID] LEVEL: message`; for the journal, `<PRIORITY>HOST COMPONENT[PID]: message`
    (journald stamps the time); the logger's name too when debugging. A record's `tag` (extra) stands
    for COMPONENT[PID]: an IRMd logs what the programs it started print under their names."""

    def __init__(self, host: str, component: str, journal: bool = False, modules: bool = False) -> None:
        super().__init__()
        self.host = host
        self.tag = f"{component}[{os.getpid()}]"
        self.journal = journal
        self.modules = modules

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        tag = getattr(record, "tag", None)
        prefix = f"{self.host} {tag or self.tag}"
        where = f" {record.name}:" if self.modules and tag is None else ""
        if self.journal:
            lines = text.splitlines() or [""]  # journald takes one entry per line
            return "\n".join(f"<{PRIORITY.get(record.levelno, 6)}>{prefix}:{where} {line}" for line in lines)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d} {prefix} {record.levelname}:{where} {text}"


class ShortFormatter(logging.Formatter):
    """`TOOL: level: message`, for a person at a terminal."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"{self.component}: {record.levelname.lower()}: {text}"


class FdHandler(logging.Handler):
    """Each record one write(2) on a descriptor: lines of several processes appending to one file
    (an IRMd, its IPCPs, the programs it started) never interleave."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(errors="replace")
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:
            self.handleError(record)


class LogFileError(OSError):
    """A log file that cannot be opened, or is not one to append to safely."""


def open_log(path: Path) -> int:
    """Open `path` to append, creating it 0640: never through a symlink, and only a regular file that
    belongs to us (in a shared directory such as /tmp another user could have put anything there) and
    has no other name (where fs.protected_hardlinks is 0, anyone may link root's /etc/shadow there)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOG_MODE)
    except OSError as e:
        raise LogFileError(e.errno, f"cannot open the log file {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o002 or st.st_nlink != 1:
        os.close(fd)
        raise LogFileError(
            0, f"will not log to {path}: not a regular file of ours that only we can write, under this one name"
        )
    return fd


def on_journal(fd: int) -> bool:
    """Whether `fd` is systemd's journal stream for this service ($JOURNAL_STREAM is its device:inode)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    with contextlib.suppress(OSError):
        st = os.fstat(fd)
        return expected == f"{st.st_dev}:{st.st_ino}"
    return False


def add_arguments(parser: argparse.ArgumentParser, *, quiet: bool = True, destination: bool = False) -> None:
    """The logging options every daemon takes: -v (more), -q (less; not where -q means something else),
    --log-level; with `destination`, --log FILE and --stdout too."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more: each -v one level down (info, then debug)"
    )
    if quiet:
        group.add_argument(
            "-q", "--quiet", action="count", default=0, help="log less: each -q one level up (warning, then error)"
        )
    group.add_argument(
        "--log-level",
        choices=list(LEVELS),
        type=str.lower,
        metavar="LEVEL",
        help=f"log from this level up: {', '.join(LEVELS)} (default: ${LEVEL_ENV} if set)",
    )
    if destination:
        group.add_argument("--log", metavar="FILE", help="log to FILE (appended to)")
        group.add_argument("--stdout", action="store_true", help="log to stdout")


def level_of(args: argparse.Namespace, base: int) -> int:
    """--log-level, else `base` (or $OUROBOROS_LOG_LEVEL) moved a step per -v and -q."""
    if getattr(args, "log_level", None):
        return LEVELS[args.log_level]
    base = LEVELS.get(os.environ.get(LEVEL_ENV, "").lower(), base)
    step = LADDER.index(base) - getattr(args, "verbose", 0) + getattr(args, "quiet", 0)
    return LADDER[max(0, min(step, len(LADDER) - 1))]


@dataclasses.dataclass(frozen=True)
class LogTarget:
    """Where a daemon's lines went: what it hands the processes it starts as their stderr (fd), the
    file (if any) and the level to pass down."""

    fd: int
    level: int
    path: Path | None = None
    journal: bool = False

    @property
    def level_name(self) -> str:
        return logging.getLevelName(self.level).lower()

    def child_env(self) -> dict[str, str]:
        """What a started process needs to log as this daemon does."""
        env = {LEVEL_ENV: self.level_name}
        if self.journal and (stream := os.environ.get("JOURNAL_STREAM")):
            env["JOURNAL_STREAM"] = stream
        return env


def setup(
    component: str,
    args: argparse.Namespace | None = None,
    *,
    base: int = logging.WARNING,
    default_file: Path | None = None,
    sock: Path | None = None,
    daemon: bool = True,
) -> LogTarget:
    """Send this process's log records to one place, formatted as every daemon's are (a tool that is no
    daemon, such as a client, says `TOOL: level: message` on stderr, unless told --log).

    The place: stdout with --stdout; the file --log names; else stderr, which under systemd is the
    journal; but an interactive daemon (stderr a terminal) given a `default_file` logs there instead,
    so its lines do not bury what the user types and reads.
    """
    args = args or argparse.Namespace()
    level = level_of(args, base)
    path: Path | None = None
    if getattr(args, "stdout", False):
        fd = sys.stdout.fileno()
    elif getattr(args, "log", None):
        path = Path(args.log)
    elif default_file is not None and os.isatty(sys.stderr.fileno()):
        path = default_file
    if path is not None:
        fd = open_log(path)
    elif not getattr(args, "stdout", False):
        fd = sys.stderr.fileno()
    journal = path is None and on_journal(fd)
    handler = FdHandler(fd)
    # What a peer or another user put in a message (a name, a reason, a path) stays within its line.
    handler.addFilter(VisibleFilter())
    if daemon or path is not None:
        handler.setFormatter(LineFormatter(host_tag(sock), component, journal, modules=level <= logging.DEBUG))
    else:
        handler.setFormatter(ShortFormatter(component))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if path is not None and path == default_file:  # what the user must act on still reaches the terminal
        tty = FdHandler(sys.stderr.fileno())
        tty.addFilter(VisibleFilter())
        tty.setLevel(logging.WARNING)
        tty.setFormatter(ShortFormatter(component))
        root.addHandler(tty)
    root.setLevel(level)
    return LogTarget(fd, level, path, journal)
