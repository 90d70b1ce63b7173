"""What a login gets on this host, for the processes a root daemon starts for someone: the umask
login.defs names (as login and pam_umask read it), else login's own 022.
"""

from __future__ import annotations

import re
from pathlib import Path

LOGIN_DEFS = Path("/etc/login.defs")
DEFAULT_UMASK = 0o022  # login's own default, where login.defs names none


def login_umask(defs: Path = LOGIN_DEFS) -> int:
    """The umask a login gets here: login.defs' UMASK, else 022. What a started process makes is made
    as a login would make it, not with whatever umask its daemon was started under (0 under some
    service managers: every file it made would be world-writable)."""
    try:
        text = defs.read_text(errors="replace")
    except OSError:
        return DEFAULT_UMASK
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "UMASK" and re.fullmatch(r"0?[0-7]{1,3}", words[1]):
            return int(words[1], 8)
    return DEFAULT_UMASK
