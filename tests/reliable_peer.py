"""A bulk-transfer peer for the reliable-flow tests: run as a process, or import its pieces.

    python tests/reliable_peer.py sink --bytes N --result out.json [--delay-read S]
    python tests/reliable_peer.py source --name sink --bytes N [--chunk 1400] [--qos data] [--encrypt]

The sink accepts one flow (the test binds its pid to a name), reads until N bytes or the flow ends,
and writes what it got (bytes, SDUs, sha256, seconds from first to last byte) as JSON. The source
allocates a flow, writes N seeded pseudo-random bytes in chunks, closes (which waits for FRCT to
have everything acknowledged) and prints the same JSON for its side. Both honour OUROBOROS_SOCK.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flowlib import Flow, FlowDown, FlowError, flow_accept, flow_alloc, qos  # noqa: E402
from flowlib.irm import IrmClient  # noqa: E402


def payload(n: int, seed: int = 1) -> bytes:
    """n seeded pseudo-random bytes: no pattern a broken reassembly could reproduce by accident."""
    return random.Random(seed).randbytes(n)


def send_all(flow: Flow, data: bytes, chunk: int) -> float:
    """Write `data` in SDUs of `chunk` bytes; returns the seconds the writes took."""
    view = memoryview(data)
    write = flow.write
    start = time.monotonic()
    for i in range(0, len(data), chunk):
        write(view[i : i + chunk])
    return time.monotonic() - start


def receive_all(flow: Flow, nbytes: int, timeout: float = 30.0) -> dict[str, Any]:
    """Read until nbytes arrived, the flow ended, or nothing came for `timeout` seconds."""
    digest = hashlib.sha256()
    got = sdus = biggest = 0
    first = last = 0.0
    end = "complete"
    flow.set_timeout(timeout)
    read = flow.read
    try:
        while got < nbytes:
            sdu = read()
            if not sdus:
                first = time.monotonic()
            digest.update(sdu)
            got += len(sdu)
            sdus += 1
            biggest = max(biggest, len(sdu))
        last = time.monotonic()
    except FlowDown:
        end = "down"
    except FlowError as e:
        end = f"{type(e).__name__}: {e}"
    return {
        "bytes": got,
        "sdus": sdus,
        "max_sdu": biggest,
        "sha256": digest.hexdigest(),
        "seconds": (last or time.monotonic()) - first if sdus else 0.0,
        "end": end,
    }


@dataclasses.dataclass
class Sink:
    """A sink process accepting one flow for `name`; `result()` waits for it and returns its JSON."""

    proc: subprocess.Popen[str]
    name: str
    result_path: Path

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the sink did not finish in {timeout} s") from None
        if not self.result_path.exists():
            out = self.proc.stdout.read() if self.proc.stdout else ""
            raise AssertionError(f"the sink wrote no result (exit {self.proc.returncode}):\n{out}")
        return dict(json.loads(self.result_path.read_text()))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def start_sink(
    irmd: Any, layer: str, name: str, nbytes: int, tmp: Path, delay_read: float = 0.0, read_timeout: float = 30.0
) -> Sink:
    """Run a sink for `name` against `irmd` (a tests/helpers.IrmdProc): registered in `layer`, bound by pid."""
    result = tmp / f"{name}.json"
    irmd.irm_ok("name", "register", name, "layer", layer)
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "sink",
            "--bytes",
            str(nbytes),
            "--result",
            str(result),
            "--delay-read",
            str(delay_read),
            "--timeout",
            str(read_timeout),
        ],
        env=irmd.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sink = Sink(proc, name, result)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "accepting":
        sink.kill()
        raise AssertionError(f"the sink did not start: {line}")
    irmd.irm_ok("bind", "process", str(proc.pid), "name", name)
    return sink


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["sink", "source"])
    p.add_argument("--name", default="sink")
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--chunk", type=int, default=1400)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--qos", default="data")
    p.add_argument("--encrypt", action="store_true")
    p.add_argument("--result", type=Path)
    p.add_argument("--delay-read", type=float, default=0.0, help="sink: wait this long before reading")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.role == "sink":
        irm = IrmClient()  # connected before the test binds us: the IRMd waits for a bound process it knows
        print("accepting", flush=True)
        flow = flow_accept(timeout=60, irm=irm)
        print(f"accepted {flow.flow_id} qos {flow.qos}", flush=True)
        time.sleep(args.delay_read)
        result = receive_all(flow, args.bytes, args.timeout)
        result["qos"] = repr(flow.qos)
        flow.close()
    else:
        data = payload(args.bytes, args.seed)
        flow = flow_alloc(args.name, qos=qos.by_name(args.qos), timeout=20, encrypt=args.encrypt)
        t0 = time.monotonic()
        send_all(flow, data, args.chunk)
        flow.close()
        result = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "seconds": time.monotonic() - t0}
    text = json.dumps(result)
    if args.result:
        args.result.write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
