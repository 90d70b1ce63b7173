"""Manual pages and bash/zsh completion for every tool, made from the parsers the tools themselves use
(`make man`, `make completions`), so what they say cannot drift from what the tools take.

    python -m apps.manuals man DIR          # DIR/man1/TOOL.1 for each tool
    python -m apps.manuals completions DIR  # DIR/bash/ouroboros-py (source it), DIR/zsh/_ouroboros-py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from irmd.cli import COMMANDS
from irmd.usage import USAGE
from proto.version import text as version_text

PACKAGE = "ouroboros-py"
NOT_ARGPARSE = {"irm", "plumb"}  # tools with their own grammar (0.23's irm, ssh's command line)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


@contextlib.contextmanager
def _capturing() -> Iterator[None]:
    """While in effect, parsing a command line raises _Captured with the parser instead."""
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> NoReturn:
        raise _Captured(self)

    # parse_known_args too: a tool that takes words it says are unknown in words of its own (ovpn's)
    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = capture  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved  # type: ignore[method-assign]


def tools() -> dict[str, str]:
    """The console scripts of this package: name -> module:function."""
    return {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.dist is not None and ep.dist.name == PACKAGE
    }


def parser_of(entry: str) -> argparse.ArgumentParser:
    """The parser a tool's main builds, caught as it is about to parse (nothing else runs)."""
    module, _, attr = entry.partition(":")
    main: Callable[[list[str]], object] = getattr(importlib.import_module(module), attr.strip())
    with _capturing():
        try:
            main([])
        except _Captured as c:
            return c.parser
    raise LookupError(f"{entry} parsed no command line with argparse")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {
        name: sub for a in p._actions if isinstance(a, argparse._SubParsersAction) for name, sub in a.choices.items()
    }


def _options(p: argparse.ArgumentParser) -> list[str]:
    return [s for a in p._actions for s in a.option_strings if a.help != argparse.SUPPRESS]


def _irm_words(path: tuple[str, ...]) -> list[str]:
    """What may follow `irm PATH`: the next level's operations, or the command's keywords."""
    node: Any = COMMANDS
    for word in path:
        node = node.get(word, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        return [*node, "help"]
    keys = re.findall(r"^\s*\[?([a-z][a-z_]*)\b", USAGE.get(path, ""), re.MULTILINE)
    return list(dict.fromkeys(k for k in keys if k not in ("where", "if", "usage")))


# -- completion --------------------------------------------------------------------------------


_EMPTY = "''"  # the empty path, as a case pattern


def _case(prog: str, table: dict[str, list[str]]) -> str:
    """A bash function completing PROG: the words that may follow the longest command path known
    (`irm ipcp bootstrap`, `styx serve`) among the words typed so far, options and values aside."""
    fn = "_ouroboros_" + re.sub(r"\W", "_", prog)
    table = {"": [], **table}  # the top level ends the search
    arms = "\n".join(
        f"            {shlex.quote(path) if path else _EMPTY}) words={shlex.quote(' '.join(words))}; break ;;"
        for path, words in table.items()
    )
    return f"""{fn}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} path="" w words=""
    for w in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$w" in -*) ;; *) path="${{path:+$path }}$w" ;; esac
    done
    while :; do
        case "$path" in
{arms}
        esac
        case "$path" in *" "*) path=${{path% *}} ;; *) path="" ;; esac
    done
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    [ ${{#COMPREPLY[@]}} -gt 0 ] || COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -F {fn} {prog}
"""


def _table(p: argparse.ArgumentParser, path: str = "") -> dict[str, list[str]]:
    subs = _subparsers(p)
    table = {path: [*subs, *_options(p)]}
    for name, sub in subs.items():
        table |= _table(sub, f"{path} {name}".strip())
    return table


def _irm_table() -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}

    def walk(path: tuple[str, ...]) -> None:
        table[" ".join(path)] = _irm_words(path)
        node: Any = COMMANDS
        for word in path:
            node = node[word]
        if isinstance(node, dict):
            for word in node:
                walk((*path, word))

    walk(())
    return table


def bash_completion() -> str:
    out = [f"# bash completion for the {PACKAGE} tools; made by `make completions` from their parsers.", ""]
    for prog, entry in sorted(tools().items()):
        if prog == "irm":
            out.append(_case(prog, _irm_table()))
        elif prog == "plumb":
            out.append(
                _case(
                    prog,
                    {
                        "": [
                            "-q",
                            "-v",
                            "-V",
                            "-i",
                            "-l",
                            "-recipe=",
                            "-user=",
                            "-infifo=",
                            "-outfifo=",
                            "-socket=",
                            "-export=",
                            "-key=",
                            "--help",
                            "--version",
                        ]
                    },
                )
            )
        else:
            out.append(_case(prog, _table(parser_of(entry))))
    return "\n".join(out)


ZSH = f"""#compdef {" ".join(["irm", "irmd"])}
# zsh completion for the {PACKAGE} tools: the bash completion, through zsh's bashcompinit.
autoload -U +X bashcompinit && bashcompinit
source "${{0:A:h}}/../bash/{PACKAGE}"
"""


# -- manual pages ------------------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _option_lines(p: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    fmt = p._get_formatter()
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._SubParsersAction):
            continue
        head = fmt._format_action_invocation(a)
        lines += [".TP", f"\\fB{_roff(head)}\\fR", _roff(fmt._expand_help(a) if a.help else "")]
    return lines


def man_page(prog: str, p: argparse.ArgumentParser | None, usage: str = "") -> str:
    today = datetime.date.today().isoformat()
    version = version_text(prog)
    synopsis = usage or (p.format_usage().removeprefix("usage: ") if p else prog)
    lines = [
        f'.TH {prog.upper()} 1 "{today}" "{_roff(version)}" "{PACKAGE} manual"',
        ".SH NAME",
        f"{_roff(prog)} \\- {_roff((p.description if p else '') or 'a tool of ' + PACKAGE)}",
        ".SH SYNOPSIS",
        ".nf",
        _roff(synopsis.rstrip()),
        ".fi",
    ]
    if p is not None:
        lines += [".SH OPTIONS", *_option_lines(p)]
        for name, sub in _subparsers(p).items():
            lines += [
                f'.SH "{_roff(prog)} {_roff(name)}"',
                ".nf",
                _roff(sub.format_usage().removeprefix("usage: ")),
                ".fi",
                _roff(sub.description or ""),
                *_option_lines(sub),
            ]
    lines += [".SH SEE ALSO", "irm(1), irmd(1); the documents under docs/ in the source tree"]
    return "\n".join(lines) + "\n"


def man_pages() -> dict[str, str]:
    pages = {}
    for prog, entry in sorted(tools().items()):
        if prog == "irm":
            pages[prog] = man_page(prog, None, USAGE[()] + "\n" + "\n".join(USAGE[k] for k in USAGE if k))
        elif prog == "plumb":
            from apps.netplumb.client import USAGE as PLUMB_USAGE

            pages[prog] = man_page(prog, None, PLUMB_USAGE.removeprefix("usage: "))
        else:
            pages[prog] = man_page(prog, parser_of(entry))
    return pages


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m apps.manuals", description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["man", "completions"])
    ap.add_argument("dir", type=Path)
    args = ap.parse_args(argv)
    if args.what == "man":
        out = args.dir / "man1"
        out.mkdir(parents=True, exist_ok=True)
        for prog, page in man_pages().items():
            (out / f"{prog}.1").write_text(page)
        print(f"{len(list(out.glob('*.1')))} manual pages in {out} (read one: man -l {out}/irmd.1)")
    else:
        (args.dir / "bash").mkdir(parents=True, exist_ok=True)
        (args.dir / "zsh").mkdir(parents=True, exist_ok=True)
        (args.dir / "bash" / PACKAGE).write_text(bash_completion())
        (args.dir / "zsh" / f"_{PACKAGE}").write_text(ZSH)
        print(f"bash: . {args.dir / 'bash' / PACKAGE}   zsh: fpath+=({args.dir / 'zsh'})")


if __name__ == "__main__":
    main()
