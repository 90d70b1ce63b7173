"""The netplumb suite: bytes through `plumb HOST cat` over a local-layer flow (TAP1 framing,
encryption, a remote process), against the same bytes echoed through a reliable flow.

The plumb figure is the whole command as a user runs it, start-up (key agreement, the remote
process) included: 20 MB a run, stdin to the remote cat and back to stdout, checked byte for byte.
plumb and netplumbd keep their bytecode, as installed programs do (in the stack's directory: with
PYTHONDONTWRITEBYTECODE set, as here, every run would compile every module it imports, a third of
plumb's start).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

from bench import hosts, session
from bench.harness import BenchError, Row, Suite, median_row
from bench.stack import Stack, tool
from flowlib import qos
from flowlib.irm import IrmClient

NAME = "bench-plumb"
SIZE = 20_000_000
SDU = 32 * 1024
MAX_RUNS = 5  # the machine is shared: a median of five pairs
READY_TRIES = 50
NO_BYTECODE = "PYTHONDONTWRITEBYTECODE"


def run(runs: int) -> list[Row]:
    n = min(runs, MAX_RUNS)
    with Stack() as st, contextlib.ExitStack() as ex:
        st.irm("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
        cached = {"PYTHONPYCACHEPREFIX": str(st.dir / "pycache")}
        env = {k: v for k, v in os.environ.items() if k != NO_BYTECODE} | cached
        env["HOME"] = str(st.dir / "home")  # keys and known_hosts stay in the stack
        subprocess.run([tool("plumb-keygen")], env=env, check=True, capture_output=True, timeout=30)
        auth = st.dir / "authorized_keys"
        auth.write_text((st.dir / "home" / ".config" / "netplumb" / "id.pub").read_text())
        st.spawn(["env", "-u", NO_BYTECODE, *(f"{k}={v}" for k, v in cached.items()), tool("netplumbd"),
                  "--name", NAME, "--authorized-keys", str(auth), "--host-key", str(st.dir / "host_key")],
                 "netplumbd")  # fmt: skip
        st.irm("name", "register", NAME, "layer", "local")
        hosts.flow_server(st, "local")
        irm = IrmClient(st.sock)
        ex.callback(irm.close)
        plumb = [tool("plumb"), NAME]
        for _ in range(READY_TRIES):  # netplumbd binds itself as it starts; the first call pins its key
            if subprocess.run([*plumb, "true"], env=env, capture_output=True, timeout=30).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise BenchError("netplumbd never answered `plumb true`")
        data = os.urandom(SIZE)
        pairs = [hosts.in_turns(i, lambda: _plumb(plumb, env, data), lambda: _echo(irm, data)) for i in range(n)]
    return [median_row(f"netplumb.cat_{SIZE // 1_000_000}MB", "MB/s", [p for p, _ in pairs], [e for _, e in pairs],
                       "reliable flow echo (no TAP1, no encryption)")]  # fmt: skip


def _plumb(plumb: list[str], env: dict[str, str], data: bytes) -> float:
    start = time.monotonic()
    done = subprocess.run([*plumb, "cat"], env=env, input=data, capture_output=True, timeout=120)
    elapsed = time.monotonic() - start
    if done.returncode != 0 or done.stdout != data:
        raise BenchError(f"plumb cat returned {len(done.stdout)} bytes, status {done.returncode}")
    return SIZE / elapsed / 1e6


def _echo(irm: IrmClient, data: bytes) -> float:
    with hosts.alloc(irm, qos.data) as flow:
        flow.write(session.ECHO)
        if flow.read() != session.READY:
            raise BenchError("the echo peer did not get ready")
        view = memoryview(data)
        start = time.monotonic()
        sender = threading.Thread(target=lambda: [flow.write(view[i : i + SDU]) for i in range(0, SIZE, SDU)])
        sender.start()
        got = 0
        while got < SIZE:
            got += len(flow.read())
        elapsed = time.monotonic() - start
        sender.join()
    return SIZE / elapsed / 1e6


SUITE = Suite("netplumb", "plumb HOST cat (TAP1, encryption, remote process) vs a reliable flow echo", run)
