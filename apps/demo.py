"""`make demo`: boot an IRMd from configs/demo.toml and use every part of the stack once.

Each step is a shell command a user could type; its output is shown as is. The daemons' logs go to a
file, named at the end, and the IRMd is stopped after.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from proto.service import ReadyListener

BOOT_TIMEOUT = 60.0  # seconds for the IRMd to apply the config and say it is ready

SETUP = """
mkdir -p "$DEMO_DIR/files" "$DEMO_DIR/depot1" "$HOME"
echo "Hello from a Styx service over a flow." > "$DEMO_DIR/files/hello.txt"
plumb-keygen >/dev/null && cp "$HOME/.config/netplumb/id.pub" "$DEMO_DIR/authorized_keys"
"""

STEPS = [
    "irm ipcp list",
    "irm name list",
    "irm dump graph",
    "oping -n pong -c 3 -i 100",
    "oecho",
    "operf -n sink -t 1",
    "styx ls -l files:/",
    "styx cat files:/hello.txt",
    'echo "written over 9P" | styx put files:/from-demo.txt && cat "$DEMO_DIR/files/from-demo.txt"',
    'ibp allocate depot1 --size 1M --duration 1h | tee "$DEMO_DIR/caps"',
    'head -c 300000 /dev/urandom > "$DEMO_DIR/blob"'
    ' && ibp store "$(grep -o "ibp://[^ ]*WRITE" "$DEMO_DIR/caps")" < "$DEMO_DIR/blob"'
    ' && ibp load "$(grep -o "ibp://[^ ]*READ" "$DEMO_DIR/caps")" > "$DEMO_DIR/blob.back"'
    ' && cmp "$DEMO_DIR/blob" "$DEMO_DIR/blob.back" && echo "300000 bytes stored in depot1 and loaded back intact"',
    "ibp status depot1",
    "plumb host1 uname -sr",
    "echo 'piped through netplumb' | plumb host1 tr a-z A-Z",
    "irm flow list",
]


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_vars(scratch: Path) -> dict[str, str]:
    """What configs/demo.toml takes from the environment: its scratch directory, a free UDP port on
    127.0.0.1, and a key of this run's for its unicast layer. Every user of the host reaches
    127.0.0.1: without a key, any of them joined the layer and served its names (depot1, host1)."""
    return {"DEMO_DIR": str(scratch), "DEMO_PORT": str(_free_udp_port()), "DEMO_KEY": secrets.token_hex(16)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = Path(args[0] if args else "configs/demo.toml").resolve()
    fd, log_name = tempfile.mkstemp(prefix="ouroboros-demo-", suffix=".log")  # kept: the story's backstage
    os.close(fd)
    log = Path(log_name)
    with tempfile.TemporaryDirectory(prefix="ouroboros-demo-") as tmp:
        sock = Path(tmp) / "irmd.sock"
        bindir = str(Path(sys.executable).parent)  # the venv's console scripts, for us and the IRMd
        env = dict(
            os.environ,
            OUROBOROS_SOCK=str(sock),
            PATH=f"{bindir}:{os.environ.get('PATH', '')}",
            HOME=str(Path(tmp) / "home"),
            **demo_vars(Path(tmp)),
        )
        if subprocess.run(["sh", "-ec", SETUP], env=env).returncode != 0:
            print("demo: setting up the scratch directory failed", file=sys.stderr)
            return 1
        print(f"$ irmd --config {config} --log {log}", flush=True)
        ready = ReadyListener(Path(tmp) / "notify.sock")
        irmd = subprocess.Popen(
            [
                shutil.which("irmd", path=env["PATH"]) or "irmd",
                "--sock",
                str(sock),
                "--config",
                str(config),
                "--log",
                str(log),
            ],
            env=env | ready.env,
            stdin=subprocess.DEVNULL,
        )
        failed = False
        try:
            failed = not ready.wait(lambda: irmd.poll() is None, BOOT_TIMEOUT)
            if failed:
                print(f"demo: the irmd did not boot; the end of {log}:", flush=True)
                print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-10:]), flush=True)
            for step in [] if failed else STEPS:
                print(f"\n$ {step}", flush=True)
                # stdin /dev/null: the demo takes no input, and a step that forwards stdin (plumb)
                # would take what the user types next
                if subprocess.run(["sh", "-c", step], env=env, stdin=subprocess.DEVNULL, timeout=60).returncode:
                    failed = True
                    print(f"demo: step failed: {step}", flush=True)
        finally:
            ready.close()
            print("\n$ kill -TERM irmd", flush=True)
            irmd.send_signal(signal.SIGTERM)
            code = irmd.wait(timeout=20)
        clean = code == 0 and not sock.exists()
        print(f"\nirmd stopped ({'cleanly' if clean else f'status {code}'}); demo {'FAILED' if failed else 'done'}.")
        print(f"The daemons' logs (irmd, IPCPs, the servers it started): {log}")
        return 1 if failed or not clean else 0


if __name__ == "__main__":
    sys.exit(main())
