"""IBP depot: one local user holds every connection slot of a depot reached through a non-local layer.

A flow's client is known by uid only when it comes through the local layer; through any other
layer (udp4 here; the unicast layer `net` of configs/demo.toml, which is the only one depot1 is
registered in) every client, local users included, is the one identity `layer:NAME`. uid 65534
opens 16 idle connections (--client-connections) and root is turned away (`-66`) for as long as
the attacker keeps them (--idle-timeout, 300 s, then again).
"""

from __future__ import annotations

import subprocess
import sys

from lab import BIN, CHECKOUT, irmd, lab, main, nobody_popen, spawn, stop, wait_for

sys.path.insert(0, str(CHECKOUT / "tests"))
from helpers import free_port

HOLDER = r"""
import time
from apps.ibp.client import Connection
held = []
for i in range(16):
    c = Connection("depot1", timeout=20)
    c.status()
    held.append(c)
print("holding", len(held), flush=True)
time.sleep(120)
"""

ROOT = r"""
from apps.ibp.client import Connection
from apps.ibp import wire as w
try:
    with Connection("depot1", timeout=20) as c:
        print("status ok: capacity", c.status().get("capacity"))
except w.IbpError as e:
    print("refused:", e)
"""


def attack() -> bool:
    with lab("ibpslots") as d, irmd(d, local=False) as ir:
        port = str(free_port(["127.0.0.1"]))
        ir.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "lan", "ip", "127.0.0.1", "port", port)
        depot = spawn(
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
                "lan",
            ],
            ir.env,
            d / "depot.log",
        )
        holder = None
        try:
            wait_for(lambda: "depot1" in ir.irm("name", "list").stdout, 40, "the depot")

            def root_status() -> str:
                return subprocess.run(
                    [str(BIN / "python"), "-c", ROOT], env=ir.env, capture_output=True, text=True, timeout=60
                ).stdout.strip()

            before = root_status()
            print("root before:", before)
            holder = nobody_popen(ir, HOLDER, stdout=subprocess.PIPE)
            assert holder.stdout is not None
            print("attacker (uid 65534):", holder.stdout.readline().strip())
            during = root_status()
            print("root during:", during)
            return before.startswith("status ok") and during.startswith("refused")
        finally:
            if holder is not None:
                stop(holder)
            stop(depot)


if __name__ == "__main__":
    main(attack, 200)
