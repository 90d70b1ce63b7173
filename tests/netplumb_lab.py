"""A netplumb lab for the trust tests: netplumbd as root beside an IRMd that any user reaches, and
clients of any uid (the attacker is uid 65534, through setpriv), each with its own key files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, start_irmd, stop_irmd, wait_for

from proto import messages as m

NOBODY = 65534
PY = str(BIN / "python")
SETPRIV = shutil.which("setpriv") or "setpriv"  # by its path: a test may give the client an odd PATH

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="the attacker is played as uid 65534 through setpriv, which needs root (CI runs as root)",
)


def as_uid(uid: int) -> list[str]:
    return [] if uid == 0 else [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


@dataclass
class Client:
    """A user of plumb: its uid, its config dir (XDG_CONFIG_HOME), its key."""

    name: str
    uid: int
    config: Path
    key: Path

    @property
    def public_line(self) -> str:
        return self.key.with_name(self.key.name + ".pub").read_text().strip()


class Lab:
    """An IRMd and a local layer in a world-readable dir; netplumbd (root) serving 'host2'."""

    def __init__(self, root: Path, irmd: IrmdProc) -> None:
        self.root = root
        self.irmd = irmd
        self.auth = root / "server" / "authorized_keys"
        self.auth.parent.mkdir(mode=0o700)
        self.auth.write_text("")
        self.recipes = root / "server" / "recipes"
        self.log = root / "server" / "netplumbd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.irmd.env, "PYTHONDONTWRITEBYTECODE": "1", **extra}

    def client(self, name: str, uid: int = 0, options: str = "", authorize: bool = True) -> Client:
        """A key pair made by that user (so its files are that user's), admitted with `options`."""
        home = self.root / "clients" / name
        home.mkdir(parents=True)
        os.chown(home, uid, uid)
        key = home / "netplumb" / "id"
        subprocess.run(
            [*as_uid(uid), str(BIN / "plumb-keygen"), "-f", str(key)],
            env=self.env(),
            check=True,
            capture_output=True,
            timeout=30,
        )
        c = Client(name, uid, home, key)
        if authorize:
            self.authorize(c, options)
        return c

    def authorize(self, c: Client, options: str = "") -> None:
        with open(self.auth, "a") as f:
            f.write(f"{options + ' ' if options else ''}{c.public_line}\n")

    def daemon_argv(self, recipes: Path | None = None) -> list[str]:
        """netplumbd with the lab's keys and recipes (or `recipes`)."""
        return [
            str(BIN / "netplumbd"),
            "--authorized-keys",
            str(self.auth),
            "--host-key",
            str(self.root / "server" / "host_key"),
            "--recipe-dir",
            str(recipes or self.recipes),
        ]

    def start_refused(self, recipes: Path | None = None) -> subprocess.CompletedProcess[str]:
        """netplumbd started as `daemon_argv` and run to its end, which a bad file makes quick."""
        return subprocess.run(self.daemon_argv(recipes), env=self.env(), capture_output=True, text=True, timeout=30)

    def start(self, *args: str) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.daemon_argv(), "--name", "host2", "--layer", "local", "-v", *args],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )
        wait_for(lambda: "serving with key" in self.log_text() or self.proc.poll() is not None, 15, "netplumbd")
        assert self.proc.poll() is None, self.log_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def plumb(
        self, c: Client, *args: str, input: bytes = b"", env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*as_uid(c.uid), str(BIN / "plumb"), "host2", f"-key={c.key}", *args],
            input=input,
            capture_output=True,
            timeout=timeout,
            cwd=c.config,
            env=self.env(XDG_CONFIG_HOME=str(c.config), **(env or {})),
        )

    def popen_plumb(self, c: Client, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*as_uid(c.uid), str(BIN / "plumb"), "host2", f"-key={c.key}", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=c.config,
            env=self.env(XDG_CONFIG_HOME=str(c.config), **(env or {})),
        )

    @contextlib.contextmanager
    def sessions(self, c: Client, n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
        """`n` sessions of `c` running a command that said it is up and then waits; killed at the end
        (the list may be added to)."""
        running = [self.popen_plumb(c, "sh", "-c", "echo up; exec sleep 60") for _ in range(n)]
        try:
            for p in running:
                assert p.stdout is not None and p.stdout.readline() == b"up\n"
            yield running
        finally:
            for p in running:
                p.kill()
                p.wait()

    def py(self, uid: int, code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Python as `uid`, with the checkout importable (an attacker's script)."""
        return subprocess.run(
            [*as_uid(uid), PY, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env=self.env(PYTHONPATH=str(Path.cwd())),
        )

    def popen_py(self, uid: int, code: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*as_uid(uid), PY, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.root,
            env=self.env(PYTHONPATH=str(Path.cwd())),
        )


@contextlib.contextmanager
def lab_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is 0700), removed after."""
    d = Path(tempfile.mkdtemp(prefix="np-lab-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def running_lab(args: Sequence[str] | None = ()) -> Iterator[Lab]:
    """The lab with netplumbd started with `args` (None: not started); clients come before or after."""
    with lab_dir() as d:
        irmd = start_irmd(d)
        lab = Lab(d, irmd)
        try:
            irmd.request(m.IpcpBootstrap("lo", "local", "local"))
            irmd.note_children()
            if args is not None:
                lab.start(*args)
            yield lab
        finally:
            lab.stop()
            stop_irmd(irmd, check=False)
