"""IBP depot: a client makes the depot open flows as root to any registered name (a confused deputy).

SEND/MCOPY by default go to any registered name, and the depot allocates those flows with its own
IRMd connection: every other service sees them come from the depot's uid (root) and counts them
against root's limits. uid 65534 asks a root depot for 16 copies at once to `files` (a Styx
server, not a depot): each copy's flow holds one of root's 16 Styx connection slots until the
server's attach timeout, and root's own `styx cat files:/hello.txt` is refused meanwhile.
"""

from __future__ import annotations

import subprocess
import threading
import time

from lab import BIN, irmd, lab, main, nobody_popen, spawn, stop, wait_for

ATTACKER = r"""
import sys, threading, time
from apps.ibp.client import Connection
from apps.ibp.capability import Capability
from apps.ibp import wire as w
with Connection("depot1", timeout=30) as c:
    rcap, wcap, mcap = c.allocate(1024, 600)
    c.store(wcap, [b"x" * 64], 64)
target = Capability("files", "0", "a" * 64, "b" * 64, "WRITE")   # not a depot: the root Styx server
results = []
def copy():
    while True:  # each copy holds its flow until the target gives up on it; then again
        try:
            with Connection("depot1", timeout=60) as c:
                c.copy(rcap, target)
            results.append("ok")
        except w.IbpError as e:
            results.append(str(e)[:80])
            time.sleep(1)  # refused at once: again later (a tight loop would be a flow-allocation flood)
threads = [threading.Thread(target=copy) for _ in range(int(sys.argv[1]))]
for t in threads:
    t.start()
print("copies asked", len(threads), flush=True)
for t in threads:
    t.join()
print("copies ended:", results[:2], flush=True)
"""


def attack() -> bool:
    with lab("ibpdeputy") as d, irmd(d) as ir:
        export = d / "export"
        export.mkdir()
        (export / "hello.txt").write_text("hello\n")
        procs = [
            spawn(
                [str(BIN / "styx"), "-v", "serve", "--name", "files", "--layer", "local", "--root", str(export)],
                ir.env,
                d / "servers.log",
            ),
            spawn(
                [
                    str(BIN / "ibp"),
                    "depot",
                    "--name",
                    "depot1",
                    "--dir",
                    str(d / "depot1"),
                    "--capacity",
                    "16M",
                    "--layer",
                    "local",
                ],
                ir.env,
                d / "servers.log",
            ),
        ]
        attacker = None
        try:
            wait_for(lambda: all(n in ir.irm("name", "list").stdout for n in ("files", "depot1")), 40, "the servers")

            def cat() -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [str(BIN / "styx"), "cat", "files:/hello.txt"],
                    env=ir.env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )

            before = cat()
            print("root's styx cat before:", before.returncode, before.stdout.strip(), before.stderr.strip()[-160:])
            attacker = nobody_popen(ir, ATTACKER, "16", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert attacker.stdout is not None
            print("attacker (uid 65534, a client of depot1):", attacker.stdout.readline().strip())
            refused = threading.Event()
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not refused.is_set():
                during = cat()
                if during.returncode != 0:
                    print("root's styx cat during:", during.returncode, during.stderr.strip()[-200:])
                    refused.set()
                time.sleep(2)
            log = (d / "servers.log").read_text(errors="replace")
            print("styx refused root's flows:", log.count("too many connections from user root"))
            return before.returncode == 0 and refused.is_set()
        finally:
            if attacker is not None:
                stop(attacker)
                print("attacker:", (attacker.stdout.read() if attacker.stdout else "").strip()[-300:])
            print(
                "\n".join(
                    ln for ln in (d / "servers.log").read_text(errors="replace").splitlines() if "ended: flow" not in ln
                )[-3000:]
            )
            for p in procs:
                stop(p)


if __name__ == "__main__":
    main(attack, 240)
