"""Third-party 9P clients for the Styx tests, each in a venv of its own, made once and kept in /tmp.

`make test` runs this file before the suite, so that no test's timeout covers a pip install."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

PY9P_VENV = Path("/tmp/checks-venv-python9p")  # where ../shared/checks/6-styx keeps python-9p
P9FS_VENV = Path("/tmp/styx-p9fs-venv")


def venv_python(venv: Path, package: str) -> str:
    """A python with `package` in a venv of its own (python-9p and p9fs both install a module
    named py9p, so each gets one). Made on first use, under a lock (tests run in parallel
    workers); the test is skipped if pip cannot."""
    python = venv / "bin" / "python"
    installed = venv / f".{package}-installed"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed.exists():
            try:
                if not python.exists():
                    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
                subprocess.run(
                    [str(python), "-m", "pip", "install", "-q", package], check=True, timeout=300, capture_output=True
                )
            except (subprocess.SubprocessError, OSError) as e:
                pytest.skip(f"{package} is not installable here: {e}")
            installed.touch()
    return str(python)


def py9p_python() -> str:
    """python-9p: a client on plan9port's C codec."""
    return venv_python(Path(os.environ.get("STYX_PY9P_VENV", PY9P_VENV)), "python-9p")


def p9fs_python() -> str:
    """p9fs: an fsspec 9P client, and py9p's server."""
    return venv_python(Path(os.environ.get("STYX_P9FS_VENV", P9FS_VENV)), "p9fs")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for make in (py9p_python, p9fs_python):
        try:
            make()
        except pytest.skip.Exception as e:  # the tests that need it skip, saying why
            logging.warning("%s", e)
