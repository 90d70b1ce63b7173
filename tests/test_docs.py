"""The documents work as written: every shell block of README.md and docs/*.md runs, in order, in a
fresh shell of its own (tests/docrun.py), and shows what the page shows. A block that cannot run here
says why on the page (`<!-- not run: ... -->`)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import docrun
import pytest
from docrun import DocError, blocks, commands, run_document

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*/*.md"))]


def runnable(doc: Path) -> bool:
    try:
        return any(not b.skip and (b.tag in ("sh", "console") or b.run) for b in blocks(doc))
    except DocError:
        return True  # test_every_block_says_what_it_holds says what is wrong


RUNNABLE = [d for d in DOCS if runnable(d)]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs each page in private namespaces: needs root")


def ids(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=ids)
def test_every_block_says_what_it_holds(doc: Path) -> None:
    for block in blocks(doc):
        commands(block)


@needs_root
@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", RUNNABLE, ids=ids)
def test_document_runs_as_written(doc: Path, tmp_path: Path) -> None:
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.exists() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        # The pages' `make` would reinstall it, with no network in their namespaces, several at once.
        pytest.fail(".venv is older than pyproject.toml: run `make venv` before the documents")
    run_document(doc, ROOT, tmp_path)


def page(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(text))
    return path


def test_an_untagged_block_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DocError, match="must say what it holds"):
        blocks(page(tmp_path, "```\nirm ipcp list\n```\n"))


@needs_root
@pytest.mark.timeout(120)
def test_a_page_that_lies_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that fails, output that differs, an error that is not one: each is caught."""
    monkeypatch.setattr(docrun, "READY_TIMEOUT", 3.0)
    for text, why in [
        ("```sh\nfalse\n```\n", "failed with status 1"),
        ("```console\n$ echo hello\nworld\n```\n", "did not print"),
        ("```console\n$ printf 'printf: oops'\nprintf: oops\n```\n", "succeeded; the page shows it failing"),
        ("```sh\n.venv/bin/irmd --log /proc/none &\n```\n", "never said it was ready"),
    ]:
        scratch = tmp_path / str(abs(hash(text)))
        scratch.mkdir()
        with pytest.raises(DocError, match=why):
            run_document(page(scratch, text), ROOT, scratch)
    ok = tmp_path / "ok"
    ok.mkdir()
    run_document(page(ok, "```console\n$ echo pid 123 up\npid 9 up\n```\n<!-- not run: no\n-->\n"), ROOT, ok)
