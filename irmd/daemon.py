"""irmd: the IPC Resource Manager daemon's command line. It checks a config file, starts the
IRMd (irmd.core) on its socket, boots the file into it and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import resource
import signal
import sys
from pathlib import Path
from typing import NoReturn

from irmd.config import DEFAULT_PATH, ConfigError, Plan, apply_config, plan
from irmd.core import Irmd
from irmd.limits import LimitError, Limits, option_values
from transports.unix import irmd_sock_path

log = logging.getLogger("irmd")


def _raise_nofile() -> int:
    """Take every descriptor the hard limit allows; how many that is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def _serve(args: argparse.Namespace) -> int:
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
    irmd = Irmd(irmd_sock_path(args.sock), limits, args.stdout)
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
        await irmd.wait_stopped()
    finally:
        await irmd.shutdown()
    return status


VERSION = "0.23.0"  # the Ouroboros version whose interfaces this irmd speaks
USAGE = f"""Usage: irmd
         [--config <path> (Path to configuration file, default: {DEFAULT_PATH} if it exists)]
         [--stdout  (Log to stdout instead of stderr)]
         [--version (Print version number and exit)]
         [--sock <path> (Control socket, default: $OUROBOROS_SOCK or {irmd_sock_path()})]
         [--limit <key>=<n> (A limit: {", ".join(Limits.keys())})]
         [-v, --verbose (Log debug messages)]
"""


class _Parser(argparse.ArgumentParser):
    """Ouroboros's irmd answers a bad command line with its usage and exit status 1."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"irmd: {message}\n{USAGE}")
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="irmd", usage=USAGE, add_help=False)
    parser.add_argument("--sock", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--stdout", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--version", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--limit", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.help:
        print(USAGE, end="")
        sys.exit(0)
    if args.version:
        print(f"Ouroboros version {VERSION} (ouroboros-py {_our_version()})")
        sys.exit(0)
    try:
        args.limits = option_values(args.limit)
    except LimitError as e:
        parser.error(str(e))
    if args.config is None and DEFAULT_PATH.exists():
        args.config = str(DEFAULT_PATH)  # --config "" boots from no file
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
        stream=sys.stdout if args.stdout else sys.stderr,
    )
    args.nofile = _raise_nofile()
    if args.sock:
        os.environ["OUROBOROS_SOCK"] = args.sock  # spawned programs find this irmd
    sys.exit(asyncio.run(_serve(args)))


def _our_version() -> str:
    try:
        return importlib.metadata.version("ouroboros-py")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
