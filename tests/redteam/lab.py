"""What every red-team script shares: a scratch directory uid 65534 can reach, an IRMd started
and always stopped, code run as uid 65534, a hard time limit and the one-word verdict.

Each script under tests/redteam/ is run as root (`.venv/bin/python tests/redteam/NAME.py`) and
prints VULNERABLE or SAFE on its last line (exit status 1 or 0; 2 if the setup itself failed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(CHECKOUT), str(CHECKOUT / "tests")]

from helpers import BIN, IrmdProc, start_irmd, stop_irmd, wait_for  # noqa: E402

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
PY = sys.executable

__all__ = [
    "BIN",
    "CHECKOUT",
    "NOBODY",
    "PY",
    "IrmdProc",
    "as_nobody",
    "irmd",
    "lab",
    "main",
    "nobody_popen",
    "wait_for",
]


def _alarm(seconds: int) -> None:
    def expired(*_: object) -> None:
        raise TimeoutError(f"the script's {seconds} s limit passed")

    signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)


@contextlib.contextmanager
def lab(prefix: str) -> Iterator[Path]:
    """A directory under /tmp that uid 65534 can read and enter, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=f"rt-{prefix}-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def irmd(d: Path, name: str = "irmd", env: dict[str, str] | None = None, local: bool = True) -> Iterator[IrmdProc]:
    """An IRMd whose socket uid 65534 can reach; with a local layer "local" by default."""
    from proto import messages as m

    proc = start_irmd(d, name, env=env)
    try:
        if local:
            proc.request(m.IpcpBootstrap("lo", "local", "local"))
        proc.note_children()
        yield proc
    finally:
        proc.note_children()
        stop_irmd(proc, check=False)


def _nobody_env(ir: IrmdProc | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(ir.env) if ir is not None else dict(os.environ)
    env.update(PYTHONPATH=str(CHECKOUT), PYTHONDONTWRITEBYTECODE="1", HOME="/tmp")
    env.update(extra or {})
    return env


def as_nobody(
    ir: IrmdProc | None, code: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as uid 65534 (against `ir` if given) and wait for it."""
    return subprocess.run(
        [*AS_NOBODY, PY, "-c", code, *args],
        env=_nobody_env(ir, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )


def nobody_popen(
    ir: IrmdProc | None, code: str, *args: str, env: dict[str, str] | None = None, **kw: object
) -> subprocess.Popen[str]:
    """Start Python `code` as uid 65534 in the background (stop it with stop())."""
    return subprocess.Popen(
        [*AS_NOBODY, PY, "-c", code, *args], env=_nobody_env(ir, env), text=True, cwd="/", start_new_session=True, **kw
    )  # type: ignore[call-overload]


def spawn(args: list[str], env: dict[str, str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session, its output appended to `log` (stop it with stop())."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **kw
        )  # type: ignore[call-overload, no-any-return]


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started, then SIGKILL it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def last_json(r: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"the attacker printed no result (status {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def main(attack: Callable[[], bool | None], limit: int = 240) -> None:
    """Run `attack` (True: it got through; False: it was stopped; None: setup failed) within `limit` s."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        print("SETUP FAILED: run as root with setpriv installed")
        sys.exit(2)
    _alarm(limit)
    try:
        got_through = attack()
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"SETUP FAILED: {e}")
        sys.exit(2)
    finally:
        signal.alarm(0)
    if got_through is None:
        print("SETUP FAILED")
        sys.exit(2)
    print("VULNERABLE" if got_through else "SAFE")
    sys.exit(1 if got_through else 0)
