"""irmd: the IPC Resource Manager daemon's command line. It checks a config file, starts the
IRMd (irmd.core) on its socket, boots the file into it and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from irmd import spawn
from irmd.config import DEFAULT_PATH, ConfigError, Plan, apply_config, plan
from irmd.core import Irmd
from irmd.forkserver import ForkServer
from irmd.limits import LimitError, Limits, option_values
from irmd.spawn import Output
from proto import logs
from proto.service import nofile_to_hard, notify_ready
from proto.version import ours
from transports.unix import TrustError, irmd_sock_path, make_sock_dir

log = logging.getLogger("irmd")


def _fork_server() -> ForkServer | None:
    try:
        return ForkServer.start()
    except OSError as e:
        print(f"irmd: no IPCP fork server ({e.strerror}): IPCPs will be executed", file=sys.stderr)
        return None


async def _serve(args: argparse.Namespace, output: Output, forks: ForkServer | None) -> int:
    boot = Plan([])
    if args.config:
        try:  # what the file says is checked before anything starts
            boot = plan(Path(args.config))
        except ConfigError as e:
            log.error("%s", e)
            return 1
    steps = boot.steps
    limits = boot.limits.with_values(args.limits)  # the command line's --limit over the file's [limits]
    limits = limits.fit_descriptors(args.nofile)
    irmd = Irmd(irmd_sock_path(args.sock), limits, output, forks)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, irmd.stop)
    await irmd.start()
    status = 0
    try:
        if steps:
            try:
                await apply_config(irmd, steps, Path(args.config))
            except ConfigError as e:  # what only running it shows stops the boot too
                log.error("%s", e)
                status = 1
                irmd.stop()
        if not status:
            notify_ready(f"serving on {irmd.sock_path}")
        await irmd.wait_stopped()
    finally:
        await irmd.shutdown()
    return status


VERSION = "0.23.0"  # the Ouroboros version whose interfaces this irmd speaks
USAGE = f"""Usage: irmd
         [--config <path> (Path to configuration file, default: {DEFAULT_PATH} if it exists)]
         [--stdout  (Log to stdout instead of stderr or the log file)]
         [--version (Print version number and exit)]
         [--check-config <path> (Check a configuration file without starting, exit status 0 if it boots)]
         [--sock <path> (Control socket, default: $OUROBOROS_SOCK or {irmd_sock_path()})]
         [--limit <key>=<n> (A limit: {", ".join(Limits.keys())})]
         [--log <path> (Log to this file; default: stderr, or <socket>.log when stderr is a terminal)]
         [-v, --verbose (Log more: debug messages, for the IPCPs too)]
         [-q, --quiet (Log less: warnings and errors only; -qq: errors only)]
         [--log-level <level> (debug, info, warning, error or critical)]

"""  # ends with an empty line, as 0.23's


class _Parser(argparse.ArgumentParser):
    """Ouroboros's irmd answers a bad command line with its usage on stdout and exit status 1; what
    was wrong goes to stderr, as irm's grammar errors."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"irmd: {message}\n")
        sys.stdout.write(USAGE)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="irmd", usage=USAGE, add_help=False)
    parser.add_argument(
        "--sock", metavar="PATH", help=f"the control socket (default: $OUROBOROS_SOCK, else {irmd_sock_path()})"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f'boot from this config file (default: {DEFAULT_PATH} if it exists; "" for none)',
    )
    parser.add_argument(
        "--check-config",
        metavar="PATH",
        help="check a config file as --config would, without starting; exit 0 if it would boot",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(
        "--limit", action="append", default=[], metavar="KEY=N", help=f"a limit: {', '.join(Limits.keys())}"
    )
    parser.add_argument("-h", "--help", action="store_true", help="print the usage and exit")
    logs.add_arguments(parser, destination=True)
    args = parser.parse_args(argv)
    if args.help:
        print(USAGE, end="")
        sys.exit(0)
    if args.version:
        print(f"Ouroboros version {VERSION} (ouroboros-py {ours()})")
        sys.exit(0)
    if args.check_config is not None:
        sys.exit(check_config(Path(args.check_config)))
    try:
        args.limits = option_values(args.limit)
    except LimitError as e:
        parser.error(str(e))
    if args.config is None and DEFAULT_PATH.exists():
        args.config = str(DEFAULT_PATH)  # --config "" boots from no file
    sock = irmd_sock_path(args.sock)
    try:  # made as the server makes it, so the log file beside the socket has a place to go
        make_sock_dir(sock.parent, 0o755 if os.geteuid() == 0 else 0o700)
    except TrustError as e:
        sys.exit(f"irmd: will not serve from {sock.parent}: {e.strerror}")
    spawn.keep_nofile()  # what the programs it starts get back
    args.nofile = nofile_to_hard()  # before the fork server: the IPCPs it forks inherit the limit
    forks = _fork_server()  # while nothing is open, no thread runs and no handler logs
    try:
        target = logs.setup("irmd", args, base=logging.INFO, default_file=logs.default_log_file(sock), sock=sock)
    except logs.LogFileError as e:
        sys.exit(f"irmd: {e.strerror}")
    if target.path is not None and not args.log:
        print(f"irmd: logging to {target.path}", file=sys.stderr, flush=True)
    if forks is None:
        log.info("IPCPs are executed: no fork server (code from outside the project is loaded, or no fork)")
    if args.sock:
        os.environ["OUROBOROS_SOCK"] = args.sock  # spawned programs find this irmd
    # What the IRMd starts logs where it logs: a file given or chosen (their stdout and stderr), or its stdout.
    output = Output(target.fd if target.path is not None or args.stdout else None, target.child_env())
    sys.exit(asyncio.run(_serve(args, output, forks)))


def check_config(path: Path) -> int:
    """What --config would find wrong with the file before starting anything (what only running it
    shows, an enrollment no member answers, cannot be checked here)."""
    try:
        boot = plan(path)
    except ConfigError as e:
        print(f"irmd: {e}", file=sys.stderr)
        return 1
    ipcps, names = boot.ipcps, boot.names
    print(f"{path}: fine ({len(ipcps)} IPCP{'s' * (len(ipcps) != 1)}, {len(names)} name{'s' * (len(names) != 1)})")
    return 0
