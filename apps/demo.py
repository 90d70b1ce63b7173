"""`make demo`: boot an IRMd from a config file and show flows working, then stop it.

Each step is a command a user could type; its output is shown as is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = [
    ["irm", "ipcp", "list"],
    ["irm", "name", "list"],
    ["oping", "-n", "pong", "-c", "5", "-i", "200"],
    ["oecho"],
    ["operf", "-n", "sink", "-t", "2"],
    ["irm", "flow", "list"],
]


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name  # the venv's console scripts
    return str(here) if here.exists() else (shutil.which(name) or name)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = Path(args[0] if args else "configs/demo.toml")
    with tempfile.TemporaryDirectory(prefix="ouroboros-demo-") as tmp:
        sock = Path(tmp) / "irmd.sock"
        bindir = str(Path(sys.executable).parent)  # so the IRMd finds the programs bound by name
        env = dict(os.environ, OUROBOROS_SOCK=str(sock), PATH=f"{bindir}:{os.environ.get('PATH', '')}")
        print(f"$ irmd --config {config}", flush=True)
        irmd = subprocess.Popen([_tool("irmd"), "--sock", str(sock), "--config", str(config)], env=env)
        try:
            deadline = time.monotonic() + 15
            while not sock.exists() and irmd.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            # The config is applied once the layer shows up in the list.
            while time.monotonic() < deadline and b"operational" not in subprocess.run(
                    [_tool("irm"), "ipcp", "list"], env=env, capture_output=True).stdout:
                time.sleep(0.1)
            failed = irmd.poll() is not None
            for step in [] if failed else STEPS:
                print(f"\n$ {' '.join(step)}", flush=True)
                failed |= subprocess.run([_tool(step[0]), *step[1:]], env=env).returncode != 0
        finally:
            print("\n$ kill -TERM irmd", flush=True)
            irmd.send_signal(signal.SIGTERM)
            code = irmd.wait(timeout=15)
        clean = code == 0 and not sock.exists()
        print(f"\nirmd stopped ({'cleanly' if clean else f'status {code}'}); demo {'FAILED' if failed else 'done'}.")
        return 1 if failed or not clean else 0


if __name__ == "__main__":
    sys.exit(main())
