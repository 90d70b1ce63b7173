"""irmd: the IPC Resource Manager daemon's command line. It checks a config file, starts the
IRMd (irmd.core) on its socket, boots the file into it and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from pathlib import Path

from irmd.config import ConfigError, Step, apply_config, plan
from irmd.core import Irmd
from irmd.limits import LimitError, Limits, parse_options
from transports.unix import irmd_sock_path

log = logging.getLogger("irmd")


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(args: argparse.Namespace) -> int:
    steps: list[Step] = []
    if args.config:
        try:  # what the file says is checked before anything starts
            steps = plan(Path(args.config))
        except ConfigError as e:
            log.error("%s", e)
            return 1
    irmd = Irmd(irmd_sock_path(args.sock), args.limits)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="irmd", description="The Ouroboros IPC Resource Manager daemon.")
    parser.add_argument("--sock", help="control socket (default: $OUROBOROS_SOCK or the per-user default)")
    parser.add_argument("--config", metavar="FILE.toml", help="create, bootstrap, bind and register from a file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--limit", action="append", default=[], metavar="KEY=N",
                        help=f"a per-user or per-connection limit (docs/security/irmd.md): {', '.join(Limits.keys())}")
    args = parser.parse_args(argv)
    try:
        args.limits = parse_options(args.limit)
    except LimitError as e:
        parser.error(str(e))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s",
    )
    _raise_nofile()
    if args.sock:
        os.environ["OUROBOROS_SOCK"] = args.sock  # spawned programs find this irmd
    sys.exit(asyncio.run(_serve(args)))
