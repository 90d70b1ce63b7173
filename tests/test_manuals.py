"""Manual pages and shell completion come from the tools' own parsers (apps/manuals.py): every tool
has a page naming its options, completion offers each level's words, and every tool says --version."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import BIN

from apps import manuals

TOOLS = sorted(manuals.tools())


def test_every_console_script_is_known() -> None:
    assert {"irmd", "irm", "oping", "styx", "ibp", "exnode", "plumb", "netplumbd", "lors_upload"} <= set(TOOLS)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_says_its_version(tool: str) -> None:
    flag = "-V" if tool == "plumb" else "--version"
    r = subprocess.run([str(BIN / tool), flag], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "ouroboros-py" in r.stdout and "0.23" in r.stdout, (r.stdout, r.stderr)


def test_man_pages_list_each_option_of_the_parser(tmp_path: Path) -> None:
    manuals.main(["man", str(tmp_path)])
    pages = {p.stem: p.read_text() for p in (tmp_path / "man1").glob("*.1")}
    assert set(pages) == set(TOOLS)
    for tool, entry in manuals.tools().items():
        assert pages[tool].startswith(f".TH {tool.upper()} 1 ")
        if tool not in manuals.NOT_ARGPARSE:
            for option in manuals._options(manuals.parser_of(entry)):
                assert option.replace("-", "\\-") in pages[tool], (tool, option)
    assert "bootstrap" in pages["irm"] and "\\-infifo" in pages["plumb"]


def complete(script: Path, *words: str) -> list[str]:
    """What bash's completion offers after `words` (the last one being typed)."""
    fn = "_ouroboros_" + words[0].replace("-", "_")
    line = " ".join(f"'{w}'" for w in words)
    r = subprocess.run(
        [
            "bash",
            "--norc",
            "-c",
            f'. {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; {fn}; printf "%s\\n" "${{COMPREPLY[@]}}"',
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion_offers_each_levels_words(tmp_path: Path) -> None:
    manuals.main(["completions", str(tmp_path)])
    script = tmp_path / "bash" / "ouroboros-py"
    assert complete(script, "irm", "ip") == ["ipcp"]
    assert complete(script, "irm", "ipcp", "boot") == ["bootstrap"]
    assert complete(script, "irm", "ipcp", "bootstrap", "name", "lo", "la") == ["layer"]
    assert complete(script, "irmd", "--check") == ["--check-config"]
    assert complete(script, "styx", "serve", "--na") == ["--name"]
    assert "--version" in complete(script, "oping", "--ver")
    assert (tmp_path / "zsh" / "_ouroboros-py").read_text().startswith("#compdef ")
