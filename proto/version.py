"""What every tool prints for --version: its name, this implementation's version, and the version of
Ouroboros whose interfaces (wire formats, irm grammar, tool options) it follows."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

OUROBOROS = "0.23.0"


def ours() -> str:
    import importlib.metadata  # ~9 ms to import: only when a version is printed, not at every tool's start

    try:
        return importlib.metadata.version("ouroboros-py")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def text(prog: str) -> str:
    return f"{prog} (ouroboros-py {ours()}, Ouroboros {OUROBOROS})"


def add_version(parser: argparse.ArgumentParser) -> None:
    """--version: print the version and exit 0."""
    import argparse  # here: irm and plumb, which parse their own words, start without it

    class Version(argparse.Action):
        """argparse's "version" action, the text worked out when --version is given."""

        def __call__(
            self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, opt: Any = None
        ) -> None:
            sys.stdout.write(text(parser.prog) + "\n")  # on stdout, as argparse's own version action
            parser.exit()

    parser.add_argument("--version", action=Version, nargs=0, help="print the version and exit")
