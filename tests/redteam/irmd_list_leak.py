"""irmd: any local user lists every user's flows (pid, name, layer) and every binding's program.

docs/security.md gives a local user "its own flows, names and bindings"; FlowList and NameList
are answered in full to anyone. uid 65534 sees root's flow to a name and the pid that holds it.
"""

from __future__ import annotations

import subprocess
import time

from lab import BIN, as_nobody, irmd, lab, main, stop

PROBE = r"""
from flowlib.irm import call, open_channel
from proto import messages as m
ch = open_channel(None)
for msg in (m.FlowList(), m.NameList()):
    reply, _ = call(ch, msg, 10)
    for row in reply.rows:
        print(type(msg).__name__, row)
"""

SERVER = r"""
import os, threading
from flowlib import flow_accept
from flowlib.irm import IrmClient, call
from proto import messages as m
irm = IrmClient()
call(irm.channel, m.Bind("process", str(os.getpid()), "payroll-db"), 10)
call(irm.channel, m.NameRegister("payroll-db", ["local"]), 10)
print("ready", flush=True)
f = flow_accept(irm=irm)
import time; time.sleep(60)
"""


def attack() -> bool:
    with lab("listleak") as d, irmd(d) as ir:
        server = subprocess.Popen(
            [str(BIN / "python"), "-c", SERVER], env=ir.env, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        client = None
        try:
            assert server.stdout is not None
            server.stdout.readline()
            client = subprocess.Popen(
                [
                    str(BIN / "python"),
                    "-c",
                    "from flowlib import flow_alloc\nimport time\n"
                    "f = flow_alloc('payroll-db', timeout=10)\ntime.sleep(60)",
                ],
                env=ir.env,
                start_new_session=True,
            )
            time.sleep(3)
            r = as_nobody(ir, PROBE)
            print("uid 65534 sees:\n" + r.stdout.strip() + r.stderr.strip()[-300:])
            return "payroll-db" in r.stdout and f"'pid': '{client.pid}'" in r.stdout
        finally:
            for p in (client, server):
                if p is not None:
                    stop(p)


if __name__ == "__main__":
    main(attack, 120)
