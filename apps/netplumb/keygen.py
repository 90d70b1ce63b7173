"""plumb-keygen: make the user's key pair (~/.config/netplumb/id and id.pub), or a one-time key
bound to a single command, printed as the authorized_keys line that admits it.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import socket
import sys
from pathlib import Path

from apps.netplumb.keys import Identity, config_dir, fingerprint, public_line
from proto.version import add_version


def _user() -> str:
    """Who makes the key, for its comment: the login name, else the uid (a uid with no account, as a
    container's or a service's, made getuser raise and the tool end in a traceback)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid{os.getuid()}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="plumb-keygen", description="make a netplumb key pair")
    ap.add_argument(
        "-f",
        "--file",
        type=Path,
        default=None,
        help="private key file (default ~/.config/netplumb/id, or onetime-<fp> for --one-time)",
    )
    ap.add_argument("--force", action="store_true", help="overwrite an existing key")
    ap.add_argument("-C", "--comment", default=None, help="comment in the public key line")
    ap.add_argument(
        "--one-time",
        metavar="CMD",
        nargs=argparse.REMAINDER,
        help="a key the server accepts once, for exactly this command",
    )
    add_version(ap)
    args = ap.parse_args(argv)
    ident = Identity.generate()
    comment = args.comment if args.comment is not None else f"{_user()}@{socket.gethostname()}"
    if args.one_time is not None:
        words = args.one_time[0:] if len(args.one_time) != 1 else shlex.split(args.one_time[0])
        if not words:
            ap.error("--one-time needs the command the key is for")
        path = args.file or config_dir() / f"onetime-{fingerprint(ident.public)[7:19].replace('/', '_')}"
        _save(ident, path, comment + " one-time", args.force)
        quoted = shlex.join(words).replace("\\", "\\\\").replace('"', '\\"')
        print(f'one-time,command="{quoted}" {public_line(ident.public, comment + " one-time")}')
        print(
            f"plumb-keygen: one-time key in {path}; add the line above to the server's authorized_keys "
            f"and run: plumb HOST -key={path} {shlex.join(words)}",
            file=sys.stderr,
        )
        return
    path = args.file or config_dir() / "id"
    pub = _save(ident, path, comment, args.force)
    print(f"plumb-keygen: key {fingerprint(ident.public)} in {path}, public key in {pub}")
    print(public_line(ident.public, comment))


def _save(ident: Identity, path: Path, comment: str, force: bool) -> Path:
    if path.exists() and not force:
        print(f"plumb-keygen: {path} exists; use --force to replace it", file=sys.stderr)
        sys.exit(1)
    try:
        return ident.save(path, comment)
    except OSError as e:
        print(f"plumb-keygen: cannot write {path}: {e.strerror}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
