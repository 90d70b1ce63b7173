"""irm: the administration tool, with the grammar of Ouroboros 0.23's irm.

Keywords may be shortened to any prefix, which means the first keyword in 0.23's order that it
begins; every command is one small function that turns parsed words into one control message.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from irmd.secfiles import IRM_WORDS
from irmd.usage import USAGE
from proto import messages as m
from proto.control import open_channel, request_all
from proto.errors import FlowError
from proto.names import IPCP_TYPES, LB_POLICIES, is_pattern, wildcard_match
from proto.options import MULTI, TYPE_OPTIONS, OptionError, bootstrap_conf, choice, did_you_mean, text
from proto.version import text as version_text
from transports.wire import Message

if TYPE_CHECKING:
    from transports.channel import SyncChannel

UsageError = OptionError  # a command line that does not follow the grammar


def match(word: str, choices: list[str], what: str) -> str:
    """The keyword `word` abbreviates: itself, else the first of `choices` it begins. `choices` are
    in the order 0.23's irm tries them, so a prefix means what it means there (`c` is create)."""
    if word in choices:
        return word
    for candidate in choices:
        if word and candidate.startswith(word):
            return candidate
    raise UsageError(
        f'"{word}" is unknown: expected {what} as one of {{{" ".join(choices)}}}'
        + (_renamed(word, choices) or did_you_mean(word, choices))
    )


# Words of an irm older than 0.23 that ouroboros-tutorial(7) still shows: (the keyword that
# replaced it, which must be a choice where the hint applies, and how 0.23 spells the command).
RENAMED = {
    "reg": ("name", "irm name register <name> layer <layer>"),
    "unreg": ("name", "irm name unregister <name> layer <layer>"),
    "if": ("dev", "dev <interface name>"),
}


def _renamed(word: str, choices: list[str]) -> str:
    keyword, spelling = RENAMED.get(word, ("", ""))
    return f'; "{word}" is the word of an older irm, 0.23 says "{spelling}"' if keyword in choices else ""


@dataclasses.dataclass
class Words:
    """Keyword/value pairs after the command words, plus flags and `-- args`."""

    values: dict[str, list[str]]
    flags: set[str]
    rest: list[str]

    def one(self, key: str, required: bool = False) -> str:
        got = self.values.get(key, [])
        if len(got) > 1 and key not in MULTI:
            raise UsageError(f'"{key}" given {len(got)} times: expected once')
        if required and not got:
            raise UsageError(f'missing "{key} <value>"')
        return got[0] if got else ""


def parse_words(
    args: list[str],
    keys: list[str],
    flags: list[str] = (),  # type: ignore[assignment]
    rest: bool = False,
    whole: frozenset[str] = frozenset(),
) -> Words:
    """`keys` in 0.23's order of matching; a flag goes where `keys` lists it, else after them. Words in
    `whole` are taken only when spelt out, as 0.23's irm compares them (strcmp, not a prefix)."""
    values: dict[str, list[str]] = {}
    seen: set[str] = set()
    choices = [*keys, *(f for f in flags if f not in keys)]
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--" and rest:
            return Words(values, seen, args[i + 1 :])
        key = match(word, [c for c in choices if c not in whole or c == word], "an option")
        if key in flags:
            seen.add(key)
            i += 1
            continue
        if i + 1 >= len(args):
            raise UsageError(f'"{key}" needs a value')
        values.setdefault(key, []).append(args[i + 1])
        i += 2
    return Words(values, seen, [])


# -- commands ------------------------------------------------------------------


def ipcp_create(args: list[str]) -> Message:
    w = parse_words(args, ["type", "name"])
    return m.IpcpCreate(w.one("name", True), choice(*IPCP_TYPES)("type", w.one("type", True)))


def ipcp_destroy(args: list[str]) -> Message:
    return m.IpcpDestroy(parse_words(args, ["name"]).one("name", True))


# Ouroboros's irm spells dev as device (and matches its prefixes).
SPELLINGS = {"device": "dev"}
# bootstrap's words in the order 0.23's irm tries them (irm_ipcp_bootstrap.c), then ours
BOOTSTRAP_WORDS = [
    "type", "layer", "name", "hash", "ip", "dns", "device", "ethertype", "addr", "eid", "ttl", "port",
    "autobind", "addr_auth", "directory", "dht_alpha", "dht_k", "dht_t_expire", "dht_t_refresh",
    "dht_t_replicate", "routing", "ls_t_timeo", "ls_t_update", "ls_t_recalc", "congestion",
]  # fmt: skip
BOOTSTRAP_WORDS += sorted({k for opts in TYPE_OPTIONS.values() for k in opts} - set(BOOTSTRAP_WORDS))
# the order in which 0.23's bootstrap matches a prefix of the type (`type u` is unicast)
BOOTSTRAP_TYPES = ["unicast", "broadcast", "udp4", "udp6", "eth-dix", "eth-llc", "local"]


def ipcp_bootstrap(args: list[str]) -> Message:
    w = parse_words(args, BOOTSTRAP_WORDS, ["autobind"])
    for spelling, key in SPELLINGS.items():
        if spelling in w.values:
            w.values.setdefault(key, []).extend(w.values.pop(spelling))
    kind = w.one("type")
    if kind:  # no type is a prefix of one before it, so the first one kind begins is also exact
        kind = next((t for t in BOOTSTRAP_TYPES if t.startswith(kind)), None) or choice(*IPCP_TYPES)("type", kind)
    conf = bootstrap_conf(kind, {k: v for k, v in w.values.items() if k not in ("name", "layer", "type")})
    return m.IpcpBootstrap(w.one("name", True), w.one("layer", True), kind, "autobind" in w.flags, conf)


def ipcp_enroll(args: list[str]) -> Message:
    w = parse_words(args, ["name", "type", "layer", "dst", "autobind", "key"], ["autobind"])
    kind = w.one("type")
    if kind:
        choice("unicast", "broadcast")("type", kind)
    if not w.one("layer") and not w.one("dst"):
        raise UsageError('enroll needs "layer <layer>" or "dst <destination>"')
    key = text("key", w.one("key")) if w.one("key") else ""
    return m.IpcpEnroll(w.one("name", True), w.one("layer"), w.one("dst"), kind, "autobind" in w.flags, key)


COMPONENTS = ("dt", "mgmt")


def _connect(args: list[str], connect: bool) -> Message:
    w = parse_words(args, ["name", "dst", "component", *(["qos"] if connect else [])])
    comp = _component(w.one("component") or "*")
    qos = w.one("qos") or "raw"
    choice("raw", "best", "voice", "video", "data")("qos", qos)
    return m.IpcpConnect(w.one("name", True), w.one("dst", True), comp, qos, connect)


def _component(word: str) -> str:
    """The component to (dis)connect, "" for both. 0.23 takes a pattern (`*`, the default, is
    both); a prefix names one too (`d` is dt)."""
    if not is_pattern(word):
        return match(word, list(COMPONENTS), "a component")
    hits = [c for c in COMPONENTS if wildcard_match(word, c)]
    if not hits:
        raise UsageError(f'bad component "{word}": the pattern matches none of {{{" ".join(COMPONENTS)}}}')
    return hits[0] if len(hits) == 1 else ""


def ipcp_connect(args: list[str]) -> Message:
    return _connect(args, True)


def ipcp_disconnect(args: list[str]) -> Message:
    return _connect(args, False)


def ipcp_show(args: list[str]) -> Message:
    if len(args) == 1:  # irm ipcp show NAME
        return m.IpcpInfoReq(args[0])
    return m.IpcpInfoReq(parse_words(args, ["name"]).one("name", True))


def ipcp_list(args: list[str]) -> Message:
    w = parse_words(args, ["type", "name", "layer"])
    kind = w.one("type")  # a type 0.23 does not know is refused there too, not an empty list
    return m.IpcpList(w.one("name"), w.one("layer"), choice(*IPCP_TYPES)("type", kind) if kind else "")


# Where `bind program` looks for a program: $PATH, or the PATH of the command run() was given
SEARCH_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("SEARCH_PATH", default=None)


def _bind(kind: str, bind: bool, args: list[str]) -> Message:
    """`irm bind KIND TARGET name N ...` (and unbind): KIND is program, process or ipcp."""
    if not args:
        raise UsageError(f"missing the {kind} to {'bind' if bind else 'unbind'}")
    target = args[0]
    if kind == "process" and not (target.isdigit() and len(target) <= 10):  # as the IRMd checks it
        raise UsageError(f'bad pid "{target}": expected a number')
    auto = ["auto"] if bind and kind == "program" else []
    w = parse_words(args[1:], ["name"], auto, rest=bind, whole=frozenset(auto))  # `auto` whole, as 0.23
    if kind == "program":  # one in $PATH, else a file here as 0.23's realpath() finds it (that
        # one first there: here a file in the current directory never shadows a program in $PATH)
        import shutil  # here: its imports (bz2, lzma, fnmatch) cost every other command ~3 ms

        here = os.path.isfile(target) and os.access(target, os.X_OK)
        found = shutil.which(target, path=SEARCH_PATH.get()) or (target if here else None)
        if found is None and bind:
            raise UsageError(f'program "{target}" not found (not executable or not in PATH)')
        target = os.path.abspath(found or target)
    name = w.one("name", required=bind)
    return m.Bind(kind, target, name, "auto" in w.flags, w.rest, bind)


BIND_KINDS = ("program", "process", "ipcp")


def _name_arg(args: list[str]) -> tuple[str, list[str]]:
    if not args:
        raise UsageError("missing the name")
    return args[0], args[1:]


def name_create(args: list[str]) -> Message:
    name, rest = _name_arg(args)
    w = parse_words(rest, ["lb", *IRM_WORDS])
    lb = w.one("lb") or "round-robin"
    sec = {IRM_WORDS[word]: _existing(word, w.one(word)) for word in IRM_WORDS if w.one(word)}
    return m.NameCreate(name, choice(*LB_POLICIES)("lb", lb), sec)


def _existing(word: str, path: str) -> str:
    """A security file path, resolved as 0.23's irm does (realpath; the file must exist)."""
    try:
        return os.path.realpath(path, strict=True)
    except OSError as e:
        raise UsageError(f'{word} "{path}": {e.strerror}') from None


def name_destroy(args: list[str]) -> Message:
    name, rest = _name_arg(args)
    parse_words(rest, [])
    return m.NameDestroy(name)


def _name_reg(args: list[str], register: bool) -> Message:
    name, rest = _name_arg(args)
    w = parse_words(rest, ["layer", "ipcp"])
    layers, ipcps = w.values.get("layer", []), w.values.get("ipcp", [])
    if not layers and not ipcps:
        raise UsageError('missing "layer <layer>" or "ipcp <ipcp>"')
    return m.NameRegister(name, layers, register, ipcps)


def name_register(args: list[str]) -> Message:
    return _name_reg(args, True)


def name_unregister(args: list[str]) -> Message:
    return _name_reg(args, False)


def name_list(args: list[str]) -> Message:
    """`irm name list [PREFIX]` as ouroboros(8) has it; 0.23's irm takes `irm name list list PREFIX`.
    A lone word that abbreviates `list` is that keyword without its value, so every name, as there."""
    if len(args) == 1:
        return m.NameList(prefix="" if args[0] and "list".startswith(args[0]) else args[0])
    return m.NameList(prefix=parse_words(args, ["list"]).one("list"))


def flow_list(args: list[str]) -> Message:
    parse_words(args, [])
    return m.FlowList()


def dump_config(args: list[str]) -> Message:
    parse_words(args, [])
    return m.Dump("config")


def dump_graph(args: list[str]) -> Message:
    fmt = match(args.pop(0), ["text", "dot", "json"], "a graph format") if args else "text"
    parse_words(args, [])
    return m.Dump(fmt)


COMMANDS: dict[str, Any] = {
    "ipcp": {
        "create": ipcp_create, "destroy": ipcp_destroy, "bootstrap": ipcp_bootstrap,
        "enroll": ipcp_enroll, "connect": ipcp_connect, "disconnect": ipcp_disconnect,
        "list": ipcp_list, "show": ipcp_show,
    },
    "bind": {kind: functools.partial(_bind, kind, True) for kind in BIND_KINDS},
    "unbind": {kind: functools.partial(_bind, kind, False) for kind in BIND_KINDS},
    "name": {
        "create": name_create, "destroy": name_destroy, "register": name_register,
        "unregister": name_unregister, "list": name_list,
    },
    "flow": {"list": flow_list},
    "dump": {"config": dump_config, "graph": dump_graph},
}  # fmt: skip


class HelpAsked(Exception):
    """`irm [LEVEL...] help`: print the usage of that level."""

    def __init__(self, path: tuple[str, ...]) -> None:
        super().__init__(" ".join(path))
        self.path = path


def parse(argv: list[str]) -> Message:
    """Turn a command line into the message for the IRMd, or raise UsageError (with the `path` of
    the command whose usage to show) or HelpAsked."""
    node: Any = COMMANDS
    words = list(argv)
    path: list[str] = []
    try:
        while isinstance(node, dict):
            if not words:
                raise UsageError(f"expected {' '.join(['irm', *path])} {{{' '.join(node)}}}")
            word = match(words.pop(0), [*node, "help"], f"{' '.join(['irm', *path])} OPERATION")
            if word == "help":
                raise HelpAsked(tuple(path))
            path.append(word)
            node = node[word]
        return node(words)  # type: ignore[no-any-return]
    except UsageError as e:
        e.path = tuple(path)  # type: ignore[attr-defined]
        raise


EMPTY = {m.IpcpList: "No IPCPs in system.", m.NameList: "No names in system.", m.FlowList: "No flows in system."}


def render_info(info: m.IpcpInfo) -> str:
    """What an IPCP tells of itself: each section a titled table."""
    return "\n".join(
        f"{section.name}:\n"
        + render(m.Table(section.columns, [dict(zip(section.columns, row, strict=False)) for row in section.rows]))
        for section in info.sections
    )


JSON_FLAGS = ("-j", "--json")  # as iproute2's -j: the same answers as JSON, for scripts


def as_json(msg: Message, reply: Message) -> str:
    """A reply as JSON: a list's rows as objects, a show's sections as lists of objects, a dump as data."""
    data: Any
    if isinstance(reply, m.Table):
        data = reply.rows
    elif isinstance(reply, m.IpcpInfo):
        data = {s.name: [dict(zip(s.columns, row, strict=False)) for row in s.rows] for s in reply.sections}
    elif isinstance(reply, m.Text) and isinstance(msg, m.Dump) and msg.what == "config":
        import tomllib  # only `irm dump` reads TOML: not loaded at every start

        data = tomllib.loads(reply.text)
    elif isinstance(reply, m.Text) and isinstance(msg, m.Dump) and msg.what == "json":
        return reply.text
    else:
        data = {"ok": True}
    return json.dumps(data, indent=2) + "\n"


def split_json(args: list[str]) -> tuple[list[str], bool]:
    """The command line without -j/--json (before any `--`: a bound program's own arguments stay)."""
    end = args.index("--") if "--" in args else len(args)
    words = [a for a in args[:end] if a not in JSON_FLAGS]
    return words + args[end:], len(words) < end


def render(table: m.Table, empty: str | None = "(none)") -> str:
    """The table boxed as 0.23's irm draws it; without rows `empty`, or the bare header if None."""
    if not table.rows and empty is not None:
        return empty
    widths = {c: max([len(c), *(len(r.get(c, "")) for r in table.rows)]) for c in table.columns}
    rule = "+" + "+".join("-" * (widths[c] + 2) for c in table.columns) + "+"

    def line(cells: dict[str, str]) -> str:
        return "| " + " | ".join(cells[c].ljust(widths[c]) for c in table.columns) + " |"

    return "\n".join(
        [
            rule,
            line({c: c for c in table.columns}),
            rule,
            *(line({c: r.get(c, "") for c in table.columns}) for r in table.rows),
            rule,
        ]
    )


def run(
    argv: list[str],
    sock: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    timeout: float = 60,
    path: str | None = None,
) -> int:
    """One irm command: its output written to `out` and `err` (stdout, stderr), its exit status
    returned; the IRMd at `sock` (default: where OUROBOROS_SOCK or the system's says), given `timeout`
    s to answer; programs to bind looked for in `path` (default: $PATH)."""
    out, err = out or sys.stdout, err or sys.stderr
    searching = SEARCH_PATH.set(path)
    try:
        return _run(argv, out, err, sock, timeout)
    finally:
        SEARCH_PATH.reset(searching)  # the caller's context keeps its own


def _run(argv: list[str], out: TextIO, err: TextIO, sock: Path | None, timeout: float) -> int:
    args, want_json = split_json(argv)
    if not args or args[0] in ("-h", "--help"):
        out.write(USAGE[()])
        return 0 if args else 255  # as 0.23's irm alone
    if args[0] == "--version":
        out.write(version_text("irm") + "\n")
        return 0
    try:
        msg = parse(args)
        if want_json and isinstance(msg, m.Dump) and msg.what != "config":
            msg = m.Dump("json")  # the graph as data
    except HelpAsked as e:
        out.write(USAGE[e.path])
        return 0
    except UsageError as e:
        err.write(f"irm: {e}\n")
        out.write(USAGE[getattr(e, "path", ())])
        return 1  # as 0.23's irm: scripts tell a grammar error from a refusal by the message alone
    try:
        channel = open_channel(sock)
        try:
            if _no_such_ipcp(channel, msg, timeout):
                return 0
            reply = request_all(channel, msg, timeout=timeout)
            names_exist = _names_exist(channel, msg, reply, timeout)
        finally:
            channel.close()
    except FlowError as e:
        err.write(f"irm: {e}\n")
        return 1
    if want_json:
        out.write(as_json(msg, reply))
    elif isinstance(reply, m.Table):
        # A name list's prefix that matches nothing is an empty table, not "no names", unless there
        # are no names at all (0.23's irm filters what it lists: it says so before any filter).
        matched_none = isinstance(msg, m.NameList) and bool(msg.prefix) and names_exist
        said_none = not reply.rows and not matched_none and type(msg) in EMPTY
        # 0.23's irm follows "No IPCPs in system." (and names) with an empty line
        out.write(render(reply, None if matched_none else EMPTY.get(type(msg), "(none)")) + "\n" * (1 + said_none))
    elif isinstance(reply, m.Text):
        out.write(reply.text)
    elif isinstance(reply, m.IpcpInfo):
        out.write(render_info(reply) + "\n")
    # Done is said by the exit status alone, as Ouroboros's irm does.
    return 0


def _names_exist(channel: SyncChannel, msg: Message, reply: Message, timeout: float) -> bool:
    """Whether the IRMd has any name, asked only when a name list's prefix matched none."""
    if not (isinstance(msg, m.NameList) and msg.prefix and isinstance(reply, m.Table) and not reply.rows):
        return True
    every = request_all(channel, m.NameList(), timeout=timeout)
    return not isinstance(every, m.Table) or bool(every.rows)


def _no_such_ipcp(channel: SyncChannel, msg: Message, timeout: float) -> bool:
    """Whether `msg` destroys or unbinds an IPCP that is not there, while others are: 0.23's irm finds
    the IPCP among those it lists and, finding none of that name, does nothing and exits 0 (a teardown
    script run twice goes on). With no IPCP at all, a destroy's refusal stands (0.23 exits 1 too),
    while an unbind from a name still exits 0, as there."""
    if isinstance(msg, m.IpcpDestroy):
        name, from_a_name = msg.name, False
    elif isinstance(msg, m.Bind) and msg.kind == "ipcp" and not msg.bind:
        name, from_a_name = msg.target, bool(msg.name)
    else:
        return False
    ipcps = request_all(channel, m.IpcpList(), timeout=timeout)
    rows = ipcps.rows if isinstance(ipcps, m.Table) else []
    return (bool(rows) or from_a_name) and all(row.get("name") != name for row in rows)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
    except BrokenPipeError:  # irm ... | head
        sys.stderr.close()
        code = 0
    sys.exit(code)
