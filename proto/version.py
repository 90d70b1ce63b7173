"""What every tool prints for --version: its name, this implementation's version, and the version of
Ouroboros whose interfaces (wire formats, irm grammar, tool options) it follows."""

from __future__ import annotations

import argparse
import importlib.metadata

OUROBOROS = "0.23.0"


def ours() -> str:
    try:
        return importlib.metadata.version("ouroboros-py")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def text(prog: str) -> str:
    return f"{prog} (ouroboros-py {ours()}, Ouroboros {OUROBOROS})"


def add_version(parser: argparse.ArgumentParser) -> None:
    """--version: print the version and exit 0."""
    parser.add_argument("--version", action="version", version=text(parser.prog), help="print the version and exit")
