"""The tools' command lines beside C Ouroboros 0.23's: the same words to C's tools (with a C irmd and a
local layer, in namespaces of their own: bench/cstack.py) and to ours (with our irmd and a local layer),
the same exit status and stdout.

Only what needs no flow is compared whole: a refusal, a bad value, a name nobody serves. A usage is
compared by its first lines (ours lists options of its own as well); ours adds what went wrong on
stderr, where C's says nothing. The differences docs/tools.md lists are left out.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import IrmdProc

from bench import cstack, netns

# (argv, how many lines of stdout must be C's: None for all of them)
CATALOGUE: list[tuple[tuple[str, ...], int | None]] = [
    (("oping", "--help"), 1),
    (("oping", "-h"), 1),
    (("oping", "-n"), 1),
    (("oping", "-l", "--bogus"), 1),
    (("oping", "-c", "1"), 2),  # "No server specified.", then the usage
    (("oping", "-n", "x", "-i", "2x"), None),
    (("oping", "-n", "x", "-d", "1w"), None),
    (("oping", "-n", "x", "-i", "0.5"), None),  # a fraction of a ms
    (("oping", "-n", "x", "-i", "1.5ms"), None),
    (("oping", "-n", "nobody", "-c", "1"), None),
    (("operf", "--help"), 1),
    (("operf", "--bogus"), 1),
    (("operf",), None),
    (("operf", "-n", "x", "-t", "tri"), None),
    (("operf", "-n", "x", "-r", "1x"), None),
    (("operf", "-n", "x", "-d", "1y"), None),
    (("operf", "-n", "x", "-d", "0.5"), None),
    (("operf", "-n", "nobody", "-d", "10"), None),
    (("ocbr", "--help"), 0),  # C's usage says "Usage: cbr", ours "Usage: ocbr"
    (("ocbr", "-l", "--bogus"), 0),
    (("ocbr", "-d", "1"), 1),
    (("ocbr", "-n", "x", "-s", "524289"), None),
    (("ocbr", "-n", "x", "-s", "-1"), None),
    (("ocbr", "-n", "x", "-r", "0"), None),
    (("ocbr", "-n", "nobody", "-d", "1"), None),
    (("oecho", "--help"), 1),
    (("oecho", "--bogus"), 1),
    (("oecho",), None),  # nobody serves "oecho"
    (("obc", "--help"), 1),
    (("obc",), 3),  # "Please specify a name.", an empty line, the usage
    (("obc", "-n", "nolayer"), None),
    (("ovpn", "--help"), 1),
    (("ovpn", "-h"), 1),
    (("ovpn", "--bogus"), None),
    (("ovpn", "-n"), None),  # getopt's words on stderr, nothing on stdout
    (("ovpn", "-i", "10.0.0.1", "--name"), None),
    (("ovpn", "-n", "-i", "10.0.0.1", "-m", "255.0.0.0"), 3),  # "-i" is the name: 10.0.0.1 left over
    (("ovpn", "-i", "x"), 3),
    (("ovpn", "-i", "10.0.0.1"), 3),
    (("ovpn", "-m", "255.0.0.0"), 3),
    (("ovpn", "-i", "10.0.0.1", "-m", "255.0.255.0"), 3),
    (("ovpn", "x", "-i", "10.0.0.1", "-m", "255.0.0.0"), 3),
    (("ovpn", "-n", "nobody", "-i", "10.0.0.1", "-m", "255.0.0.0"), None),
]


def _head(out: str, lines: int | None) -> list[str]:
    return out.splitlines()[:lines]


@pytest.mark.timeout(300)
@pytest.mark.skipif(cstack.why_not() is not None, reason=f"C Ouroboros 0.23: {cstack.why_not()}")
def test_the_tools_answer_a_command_line_as_0_23s(irmd: IrmdProc, local_layer: str, tmp_path: Path) -> None:
    with netns.Netns("otool") as ns, cstack.CStack(cstack.DIRECT, ns.ns, tmp_path) as cs:
        cs.irm("ipcp", "bootstrap", "type", "local", "name", "lo", "layer", "local")
        for argv, lines in CATALOGUE:
            c = subprocess.run(
                [*cs._enter(), *argv], env=cs.build.env(), capture_output=True, text=True, timeout=60, check=False
            )
            ours = irmd.run(*argv, timeout=60)
            assert ours.returncode == c.returncode, (argv, c.stdout, ours.stdout + ours.stderr)
            assert _head(ours.stdout, lines) == _head(c.stdout, lines), (argv, c.stdout, ours.stdout)
