"""flowlib/FRCT: an unauthenticated peer makes netplumbd (root) hold 64 MiB per connection.

FRCT keeps up to WINDOW (1,024) out-of-order PDUs per flow, each as large as the layer's MTU
(65,535 bytes on a local layer), whatever the application has read: a window counted in PDUs, not
bytes. uid 65534, with no key, opens its 3 unauthenticated connections (--per-peer-startups; a
remote peer gets all 10 of --max-startups) and sends PDUs 1..1023 of each, never PDU 0: nothing
reaches netplumbd's handshake, which waits --login-grace-time (15 s) while its flow engine holds
~64 MiB per flow ("nothing is buffered beyond one SDU", docs/security/netplumb.md). The attacker
repeats when the grace time ends.
"""

from __future__ import annotations

import subprocess
import time

import lab  # noqa: F401 - the checkout and tests/ on sys.path
from lab import main, nobody_popen, rss_mb, stop
from netplumb_lab import running_lab
from test_netplumb_hostile import OUT_OF_ORDER as ATTACKER

FLOWS = 3


def attack() -> bool:
    with running_lab([]) as np:
        assert np.proc is not None
        before = rss_mb(np.proc.pid)
        attacker = nobody_popen(np.irmd, ATTACKER, str(FLOWS), stdout=subprocess.PIPE)
        try:
            assert attacker.stdout is not None
            print("attacker (uid 65534, no key):", attacker.stdout.readline().strip())
            time.sleep(2)
            after = rss_mb(np.proc.pid)
        finally:
            stop(attacker)
        print(f"netplumbd's resident memory: {before:.0f} MB before, {after:.0f} MB after")
        return after - before > 100


if __name__ == "__main__":
    main(attack, 200)
