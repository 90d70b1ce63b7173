"""irm beside C Ouroboros 0.23's: the same commands against a C irmd and ours, the same answers.

What is compared is what a script reads: the exit status and stdout (where ours adds a line of its
own on stderr, 0.23's says nothing or prints the usage alone). The differences docs/irm.md lists
are left out. Each C irmd runs in a network and mount namespace of its own (bench/cstack.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc

from bench import cstack, netns

# In order: each runs after the ones before it, on both sides.
CATALOGUE: list[tuple[str, ...]] = [
    ("ipcp", "list"),
    ("name", "list"),
    ("name", "list", "list", "foo"),  # no names at all: said before any filter
    ("ipcp", "destroy", "name", "ghost"),  # no IPCP at all: refused
    ("unbind", "ipcp", "ghost", "name", "foo"),  # ... but an unbind from a name is nothing to do
    ("bind", "help"),
    ("unbind", "help"),
    ("name", "help"),
    ("ipcp", "create"),
    ("ipcp", "create", "name", "x"),
    ("ipcp", "destroy"),
    ("ipcp", "connect", "name", "x"),
    ("bind", "program"),
    ("bind", "process", "1"),
    ("bind", "ipcp", "lo"),
    ("unbind", "program"),
    ("unbind", "process"),
    ("unbind", "ipcp"),
    ("name", "create"),
    ("name", "destroy"),
    ("name", "create", "foo", "lb", "fast"),
    ("i", "b", "n", "lo", "t", "local", "l", "local"),
    ("name", "create", "foo"),
    ("name", "create", "foo"),  # there already: left as it is
    ("n", "reg", "foo", "layer", "local"),
    ("name", "unregister", "foo", "layer", "elsewhere"),
    ("name", "destroy", "foo"),
    ("ipcp", "destroy", "name", "ghost"),  # not there, while others are
    ("unbind", "ipcp", "ghost", "name", "foo"),
    ("ipcp", "destroy", "name", "lo"),
    ("ipcp", "list"),
]


@pytest.mark.timeout(300)
@pytest.mark.skipif(cstack.why_not() is not None, reason=f"C Ouroboros 0.23: {cstack.why_not()}")
def test_irm_answers_as_0_23s_irm(irmd: IrmdProc, tmp_path: Path) -> None:
    with netns.Netns("oirm") as ns, cstack.CStack(cstack.DIRECT, ns.ns, tmp_path) as cs:
        for words in CATALOGUE:
            c = subprocess.run(
                [*cs._enter(), "irm", *words], env=cs.build.env(), capture_output=True, text=True, timeout=60
            )
            ours = irmd.irm(*words)
            assert (ours.returncode, ours.stdout) == (c.returncode, c.stdout), words


@pytest.mark.skipif(cstack.why_not() is not None, reason=f"C Ouroboros 0.23: {cstack.why_not()}")
@pytest.mark.parametrize("bad", [["--bogus"], ["--stdout", "x"]])
def test_irmd_answers_a_bad_command_line_as_0_23s(bad: list[str]) -> None:
    """Its usage on stdout, ending with an empty line, and exit status 1. 0.23's irmd exits while
    reading its arguments; it runs in namespaces of its own all the same."""
    c = subprocess.run(
        ["unshare", "-m", "-n", "irmd", *bad], env=cstack.DIRECT.env(), capture_output=True, text=True, timeout=30
    )
    ours = subprocess.run([str(BIN / "irmd"), *bad], capture_output=True, text=True, timeout=30)
    for r in (c, ours):
        assert r.returncode == 1 and r.stdout.startswith("Usage: irmd") and r.stdout.endswith(")]\n\n"), r
    assert "[--stdout  (Log to stdout instead of " in ours.stdout
