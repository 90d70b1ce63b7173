"""Runs irm commands for the tests in one long-lived process per test worker: the irm tool's own code
(irmd.cli.run), without an interpreter started for each of the suite's ~1,600 commands (~60 ms of CPU each).

The commands come from a process other than the test's, as the tool's would: the IRMd ends a process's
bindings with that process's last connection, so a test that binds its own pid must not be the one
that connects for irm. The runner ends when its parent closes its stdin (or dies).

    python tests/irm_runner.py SOCKET     # serves one JSON request per connection, a thread each
"""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _serve_one(conn: socket.socket) -> None:
    from irmd.cli import run

    with conn:
        req = json.loads(_recv_all(conn))
        out, err = io.StringIO(), io.StringIO()
        try:
            code = run(req["argv"], Path(req["sock"]), out, err, timeout=req["timeout"], path=req["path"])
        except Exception as e:  # the tool would have died with a traceback: say so, as its status 1
            code, err = 1, io.StringIO(f"irm (runner): {type(e).__name__}: {e}\n")
        conn.sendall(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue()}).encode())


def serve(path: str) -> None:
    import irmd.cli  # noqa: F401  (loaded once, before the first request)

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    # the parent's stdin pipe closes when it exits or dies: then so does this process
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


class Runner:
    """The test worker's side: starts the runner at its first use, stops it at exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._path = ""

    def _started(self) -> str:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._path = os.path.join(tempfile.mkdtemp(prefix="irm-runner-"), "sock")
                root = str(Path(__file__).resolve().parent.parent)
                self._proc = subprocess.Popen(
                    [sys.executable, __file__, self._path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True, env={**os.environ, "PYTHONPATH": root}, cwd=root,
                )  # fmt: skip
                assert self._proc.stdout is not None and self._proc.stdout.readline() == "ready\n"
                atexit.register(self.stop)
            return self._path

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None:
                assert self._proc.stdin is not None
                self._proc.stdin.close()
                self._proc.wait(10)
                self._proc = None
                shutil.rmtree(os.path.dirname(self._path), ignore_errors=True)

    def run(self, argv: list[str], sock: Path, path: str | None, timeout: float) -> subprocess.CompletedProcess[str]:
        request: dict[str, Any] = {"argv": argv, "sock": str(sock), "path": path, "timeout": timeout}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout + 10)
            conn.connect(self._started())
            conn.sendall(json.dumps(request).encode())
            conn.shutdown(socket.SHUT_WR)
            try:
                reply = json.loads(_recv_all(conn))
            except TimeoutError:
                raise subprocess.TimeoutExpired(["irm", *argv], timeout) from None
        return subprocess.CompletedProcess(["irm", *argv], reply["code"], reply["out"], reply["err"])


RUNNER = Runner()

if __name__ == "__main__":
    serve(sys.argv[1])
