"""Bench: stdin->stdout MB/s through `plumb HOST cat` over a local flow, against an echo of the
same bytes through a raw reliable flow (no encryption, no TAP1), measured in one run.

    python -m apps.netplumb.bench [--mb 20] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from flowlib import FlowDown, flow_accept, flow_alloc, qos
from flowlib.irm import default_client

BIN = Path(sys.executable).parent
SDU = 32 * 1024


def echo_server(name: str) -> None:
    """The baseline's peer: echo every SDU of every flow (one at a time)."""
    irm = default_client()
    irm.bind(name)
    irm.register(name, ["local"])
    print("ready", flush=True)
    while True:
        with flow_accept() as flow:
            try:
                while True:
                    flow.write(flow.read())
            except FlowDown:
                pass


def raw_round_trip(name: str, data: bytes) -> float:
    """Seconds to push data through the echo flow and get all of it back."""
    flow = flow_alloc(name, qos=qos.data, timeout=10)
    t0 = time.monotonic()

    def send() -> None:
        view = memoryview(data)
        for i in range(0, len(view), SDU):
            flow.write(view[i:i + SDU])

    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while got < len(data):
        got += len(flow.read())
    elapsed = time.monotonic() - t0
    sender.join()
    flow.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m apps.netplumb.bench")
    ap.add_argument("--mb", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--echo", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        echo_server(args.echo)
        return
    tmp = Path(tempfile.mkdtemp(prefix="npbench."))
    sock = tmp / "irmd.sock"
    env = {**os.environ, "OUROBOROS_SOCK": str(sock), "HOME": str(tmp)}
    env.pop("XDG_CONFIG_HOME", None)
    os.environ.update(OUROBOROS_SOCK=str(sock), HOME=str(tmp))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([str(BIN / "irmd"), "--sock", str(sock)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while not sock.exists():
            time.sleep(0.05)
        irm = [str(BIN / "irm")]
        subprocess.run([*irm, "ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local"],
                       env=env, check=True, capture_output=True)
        subprocess.run([str(BIN / "plumb-keygen")], env=env, check=True, capture_output=True)
        auth = tmp / "authorized_keys"
        auth.write_text((tmp / ".config/netplumb/id.pub").read_text())
        procs.append(subprocess.Popen([str(BIN / "netplumbd"), "--name", "npbench", "--layer", "local",
                                       "--authorized-keys", str(auth), "--host-key", str(tmp / "hk")], env=env))
        echo = subprocess.Popen([sys.executable, "-m", "apps.netplumb.bench", "--echo", "npecho"], env=env,
                                stdout=subprocess.PIPE)
        procs.append(echo)
        assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
        data = os.urandom(args.mb * 1_000_000)
        plumb = [str(BIN / "plumb"), "npbench"]
        subprocess.run([*plumb, "true"], env=env, check=True, capture_output=True)  # pin the key
        rows: dict[str, list[float]] = {"raw": [], "plumb": [], "startup": []}
        for _ in range(args.runs):
            rows["raw"].append(raw_round_trip("npecho", data))
            t0 = time.monotonic()
            subprocess.run([*plumb, "true"], env=env, check=True, capture_output=True)
            rows["startup"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            r = subprocess.run([*plumb, "cat"], env=env, input=data, capture_output=True, check=True)
            rows["plumb"].append(time.monotonic() - t0)
            assert r.stdout == data, "plumb cat corrupted the stream"
        raw, total, startup = (statistics.median(rows[k]) for k in ("raw", "plumb", "startup"))
        mb = len(data) / 1e6
        print(f"{args.mb} MB, median of {args.runs} runs")
        print(f"raw reliable flow echo:        {mb / raw:7.1f} MB/s")
        print(f"plumb cat (whole command):     {mb / total:7.1f} MB/s  ratio {raw / total:.2f}")
        print(f"plumb cat (minus plumb true, {startup:.2f} s): {mb / (total - startup):7.1f} MB/s  "
              f"ratio {raw / (total - startup):.2f}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
