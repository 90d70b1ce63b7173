"""styx: serve a directory, the IRMd or net/ over flows; list, read and write files as NAME:/path.

`styx serve` is an ordinary Ouroboros application; `styx bridge` lets third-party
9P clients in over TCP or a unix socket.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import replace

from apps.styx import wire as w
from apps.styx.client import Client, StyxClientError
from apps.styx.identity import ANON_ACCOUNT, server_policy
from apps.styx.server import Limits
from apps.styx.transport import TransportError, dial
from apps.styx.tree import StyxError, Tree
from flowlib import FlowError
from flowlib.irm import default_client
from proto import logs
from proto.service import notify_ready, serve_until_stopped
from proto.version import add_version
from proto.visible import visible

log = logging.getLogger("styx")


class CliError(Exception):
    pass


def split_target(target: str) -> tuple[str, str]:
    """'NAME:/path' -> ('NAME', '/path'); NAME may be tcp!HOST!PORT or unix!/path."""
    name, sep, path = target.partition(":")
    if not sep or not name:
        raise CliError(f"bad target '{target}': expected NAME:/path")
    return name, path or "/"


def client(name: str, user: str | None) -> Client:
    """A client attached to the service NAME; CliError (naming it) if there is none."""
    try:
        transport = dial(name)
    except (FlowError, TransportError, ValueError) as e:
        raise CliError(str(e)) from None
    try:
        return Client(transport, user)
    except StyxClientError as e:
        transport.close()
        raise CliError(f"{name}: {e}") from None


def connect(target: str, user: str | None) -> tuple[Client, str]:
    name, path = split_target(target)
    return client(name, user), path


def mode_string(mode: int) -> str:
    kind = "d" if mode & w.DMDIR else "a" if mode & w.DMAPPEND else "-"
    bits = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return kind + bits


def entry_name(st: w.Stat) -> str:
    """A listed name as it may be shown: the server's characters that are not printable escaped
    (a name with a line break or a terminal escape would forge lines or drive the terminal)."""
    return visible(st.name) + ("/" if st.mode & w.DMDIR else "")


def stat_line(st: w.Stat) -> str:
    when = time.strftime("%b %d %H:%M", time.localtime(st.mtime))
    return f"{mode_string(st.mode)} {visible(st.uid):8} {visible(st.gid):8} {st.length:10} {when} {entry_name(st)}"


# -- commands ----------------------------------------------------------------------


def print_listing(stats: list[w.Stat], long: bool = False) -> None:
    for st in sorted(stats, key=lambda s: s.name):
        print(stat_line(st) if long else entry_name(st))


def cmd_ls(a: argparse.Namespace) -> None:
    client, path = connect(a.target, a.user)
    with client:
        print_listing(client.ls(path), a.long)


def cmd_cat(a: argparse.Namespace) -> None:
    client, path = connect(a.target, a.user)
    with client:
        qid, data = client.read_file(path)
    if qid.type & w.QTDIR:  # a directory reads as stat records: show them as ls does
        try:
            print_listing(w.stats_decode(data))
        except w.DecodeError as e:
            raise CliError(f"bad directory data: {e}") from None
        return
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def cmd_put(a: argparse.Namespace) -> None:
    data = sys.stdin.buffer.read()
    client, path = connect(a.target, a.user)
    with client:
        client.put(path, data)


def cmd_stat(a: argparse.Namespace) -> None:
    client, path = connect(a.target, a.user)
    with client:
        st = client.stat(path)
    print(
        f"name   {visible(st.name)}\nqid    type {st.qid.type:#04x} vers {st.qid.vers} path {st.qid.path:#x}\n"
        f"mode   {mode_string(st.mode)} ({st.mode:#o})\nlength {st.length}\n"
        f"uid    {visible(st.uid)}\ngid    {visible(st.gid)}\nmuid   {visible(st.muid)}\n"
        f"atime  {time.ctime(st.atime)}\nmtime  {time.ctime(st.mtime)}"
    )


def cmd_rm(a: argparse.Namespace) -> None:
    client, path = connect(a.target, a.user)
    with client:
        client.remove(path)


def cmd_mkdir(a: argparse.Namespace) -> None:
    client, path = connect(a.target, a.user)
    with client:
        client.mkdir(path)


def announce(name: str, layers: list[str]) -> None:
    """Bind this process to `name` and register it, tolerating what is already so."""
    irm = default_client()
    try:
        irm.bind(name)
    except FlowError as e:
        log.info("bind %s: %s (already bound?)", name, e)
    if layers:
        try:
            irm.register(name, layers)
        except FlowError as e:
            if "exist" not in str(e).lower() and "already" not in str(e).lower():
                raise
            log.info("register %s: %s", name, e)


def limits(a: argparse.Namespace) -> Limits:
    lim = Limits(**{k: getattr(a, k) for k in LIMIT_FLAGS if getattr(a, k, None) is not None})
    if (
        lim.msize < w.MSIZE_MIN
        or min(lim.fids, lim.pending, lim.flows, lim.conns, lim.conns_per_user) < 1
        or min(lim.attach_timeout, lim.send_timeout, lim.anon_idle_timeout) <= 0
    ):
        raise CliError(f"limits must be positive (and --msize at least {w.MSIZE_MIN})")
    return replace(lim, msize=min(lim.msize, w.MSIZE_MAX))


def cmd_serve(a: argparse.Namespace) -> None:
    from apps.styx.serve import Server  # here, as bridge: the client commands start without the server's modules

    users = frozenset(a.users.split(",")) if a.users else None
    lim = limits(a)
    tree: Tree
    if a.irm:
        from apps.styx.irmfs import IrmTree

        tree = IrmTree(frozenset({a.name} - {None}), lim)
    elif a.root:
        from apps.styx.fs import FsTree

        tree = FsTree(a.root)
    else:
        raise CliError("serve needs --root DIR or --irm")
    server = Server(tree, lim, users, server_policy(a.anon_user))
    if a.name:
        announce(a.name, a.layer)
    print(f"styx: serving {'the IRMd' if a.irm else a.root}" + (f" as {a.name}" if a.name else ""), flush=True)
    notify_ready()
    serve_until_stopped(server.serve_forever)


def cmd_mount(a: argparse.Namespace) -> None:
    from apps.styx.mount import mount

    name, _, path = a.service.partition(":")
    with client(name, a.user) as c:
        # libfuse installs its own handlers (which unmount) only over the default ones.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            mount(
                c,
                path or "/",
                a.mountpoint,
                lambda: print(f"styx: {a.service} mounted on {a.mountpoint}", flush=True),
                a.service,
            )
        except RuntimeError as e:
            raise CliError(str(e)) from None


def cmd_bridge(a: argparse.Namespace) -> None:
    from apps.styx.bridge import bridge

    def ready() -> None:
        print(f"styx: bridging {a.listen} to {a.name}", flush=True)

    try:
        serve_until_stopped(lambda: bridge(a.name, a.listen, ready, limits(a)))
    except ValueError as e:
        raise CliError(str(e)) from None


# Limits flags (--max-fids ...) and their help; defaults are Limits'.
LIMIT_FLAGS = {
    "msize": ("--msize", int, "the largest 9P message a client may negotiate"),
    "fids": ("--max-fids", int, "fids one connection may hold"),
    "pending": ("--max-pending", int, "requests of one connection waiting for an answer"),
    "flows": ("--max-flows", int, "net/ flows of one connection, arrivals waiting for a listen included"),
    "conns": ("--max-conns", int, "connections served at once"),
    "conns_per_user": ("--max-conns-per-user", int, "connections at once per user (anonymous: all are none)"),
    "attach_timeout": ("--attach-timeout", float, "seconds a connection may take to attach"),
    "send_timeout": ("--send-timeout", float, "seconds a client may leave replies untaken before it is dropped"),
    "text": ("--max-text", int, "bytes of text (the IRMd's tables, ctl answers) one connection's open files keep"),
    "anon_idle_timeout": (
        "--anon-idle-timeout",
        float,
        "seconds an anonymous client may stay attached without a request (none share slots)",
    ),
}


def add_limits(p: argparse.ArgumentParser, which: Iterable[str]) -> None:
    for key in which:
        flag, kind, helptext = LIMIT_FLAGS[key]
        p.add_argument(flag, dest=key, type=kind, help=f"{helptext} (default {getattr(Limits(), key)})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="styx", description="9P2000 file service over Ouroboros flows")
    p.add_argument("-u", "--user", help="the user name to attach as (default: yours)")
    logs.add_arguments(p)
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a directory (--root) or the IRMd and net/ (--irm)")
    s.add_argument("--name", help="bind this process to NAME (flows to NAME reach it)")
    s.add_argument("--layer", action="append", default=[], help="also register NAME in layer L (repeatable)")
    s.add_argument("--root", help="the directory to serve")
    s.add_argument("--irm", action="store_true", help="serve the IRMd as files, and net/")
    s.add_argument("--users", help="comma-separated users allowed to attach, none for anonymous clients (default: any)")
    s.add_argument(
        "--anon-user",
        default=ANON_ACCOUNT,
        help=f"as root, work for anonymous clients (user none) with this account's rights (default: {ANON_ACCOUNT})",
    )
    add_limits(s, LIMIT_FLAGS)
    s.set_defaults(func=cmd_serve)
    for name, func, helptext in [
        ("ls", cmd_ls, "list a directory"), ("cat", cmd_cat, "print a file"),
        ("put", cmd_put, "write stdin to a file (created if missing)"), ("stat", cmd_stat, "show a file's stat"),
        ("rm", cmd_rm, "remove a file or empty directory"), ("mkdir", cmd_mkdir, "make a directory"),
    ]:  # fmt: skip
        c = sub.add_parser(name, help=helptext)
        c.add_argument("target", help="NAME:/path (NAME: a flow name, or tcp!HOST!PORT / unix!/path)")
        if name == "ls":
            c.add_argument("-l", dest="long", action="store_true", help="long listing")
        c.set_defaults(func=func)
    mnt = sub.add_parser("mount", help="mount a service on a local directory (FUSE) until interrupted")
    mnt.add_argument("service", help="NAME or NAME:/path")
    mnt.add_argument("mountpoint")
    mnt.set_defaults(func=cmd_mount)
    b = sub.add_parser("bridge", help="let 9P clients on TCP or a unix socket reach NAME")
    b.add_argument("--name", required=True, help="the styx service to relay to")
    b.add_argument("--listen", required=True, help="tcp!HOST!PORT or unix!/path")
    add_limits(b, ["msize", "conns", "conns_per_user", "send_timeout"])
    b.set_defaults(func=cmd_bridge)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    logs.setup("styx", a, daemon=a.cmd in ("serve", "bridge"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        a.func(a)
    except (CliError, StyxClientError, StyxError, FlowError, TransportError) as e:
        print(f"styx: {visible(str(e))}", file=sys.stderr)  # an Rerror's words are the server's
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            sys.stderr.close()
        sys.exit(1)
