"""irm: the administration tool, with the grammar of Ouroboros 0.23's irm.

Keywords may be shortened to any unique prefix; every command is one small
function that turns parsed words into one control message for the IRMd.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any

from irmd.secfiles import IRM_WORDS
from proto import messages as m
from proto.control import call, open_channel
from proto.errors import FlowError
from proto.names import IPCP_TYPES, LB_POLICIES
from proto.options import MULTI, TYPE_OPTIONS, OptionError, bootstrap_conf, choice, text
from transports.wire import Message

UsageError = OptionError  # a command line that does not follow the grammar


def match(word: str, choices: list[str], what: str) -> str:
    """The keyword `word` abbreviates, exactly or as a unique prefix."""
    if word in choices:
        return word
    hits = [c for c in choices if c.startswith(word)] if word else []
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise UsageError(f'"{word}" is ambiguous for {what}: could be {", ".join(hits)}')
    raise UsageError(f'"{word}" is unknown: expected {what} as one of {{{" ".join(choices)}}}')


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


def parse_words(args: list[str], keys: list[str], flags: list[str] = (), rest: bool = False) -> Words:  # type: ignore[assignment]
    values: dict[str, list[str]] = {}
    seen: set[str] = set()
    choices = list(keys) + list(flags)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--" and rest:
            return Words(values, seen, args[i + 1 :])
        key = match(word, choices, "an option")
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
    w = parse_words(args, ["name", "type"])
    return m.IpcpCreate(w.one("name", True), choice(*IPCP_TYPES)("type", w.one("type", True)))


def ipcp_destroy(args: list[str]) -> Message:
    return m.IpcpDestroy(parse_words(args, ["name"]).one("name", True))


def ipcp_bootstrap(args: list[str]) -> Message:
    options = sorted({k for opts in TYPE_OPTIONS.values() for k in opts})
    w = parse_words(args, ["name", "layer", "type", *options], ["autobind"])
    kind = w.one("type")
    if kind:
        choice(*IPCP_TYPES)("type", kind)
    conf = bootstrap_conf(kind, {k: v for k, v in w.values.items() if k not in ("name", "layer", "type")})
    return m.IpcpBootstrap(w.one("name", True), w.one("layer", True), kind, "autobind" in w.flags, conf)


def ipcp_enroll(args: list[str]) -> Message:
    w = parse_words(args, ["name", "layer", "dst", "type", "key"], ["autobind"])
    kind = w.one("type")
    if kind:
        choice("unicast", "broadcast")("type", kind)
    if not w.one("layer") and not w.one("dst"):
        raise UsageError('enroll needs "layer <layer>" or "dst <destination>"')
    key = text("key", w.one("key")) if w.one("key") else ""
    return m.IpcpEnroll(w.one("name", True), w.one("layer"), w.one("dst"), kind, "autobind" in w.flags, key)


def _connect(args: list[str], connect: bool) -> Message:
    w = parse_words(args, ["name", "dst", "component", *(["qos"] if connect else [])])
    comp = w.one("component")
    if comp:
        comp = match(comp, ["dt", "mgmt"], "a component")
    qos = w.one("qos") or "raw"
    choice("raw", "best", "voice", "video", "data")("qos", qos)
    return m.IpcpConnect(w.one("name", True), w.one("dst", True), comp, qos, connect)


def ipcp_connect(args: list[str]) -> Message:
    return _connect(args, True)


def ipcp_disconnect(args: list[str]) -> Message:
    return _connect(args, False)


def ipcp_list(args: list[str]) -> Message:
    w = parse_words(args, ["name", "layer", "type"])
    return m.IpcpList(w.one("name"), w.one("layer"), w.one("type"))


def _bind(args: list[str], bind: bool) -> Message:
    if not args:
        raise UsageError("expected {program process ipcp}")
    kind = match(args[0], ["program", "process", "ipcp"], "what to bind")
    if len(args) < 2:
        raise UsageError(f'missing the {kind} to {"bind" if bind else "unbind"}')
    target = args[1]
    w = parse_words(args[2:], ["name"], ["auto"] if bind and kind == "program" else [], rest=bind)
    if kind == "program":
        found = shutil.which(target)
        if found is None and bind:
            raise UsageError(f'program "{target}" not found (not executable or not in PATH)')
        target = os.path.abspath(found or target)
    name = w.one("name", required=bind)
    return m.Bind(kind, target, name, "auto" in w.flags, w.rest, bind)


def bind(args: list[str]) -> Message:
    return _bind(args, True)


def unbind(args: list[str]) -> Message:
    return _bind(args, False)


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
    layers = parse_words(rest, ["layer"]).values.get("layer", [])
    if not layers:
        raise UsageError('missing "layer <layer>"')
    return m.NameRegister(name, layers, register)


def name_register(args: list[str]) -> Message:
    return _name_reg(args, True)


def name_unregister(args: list[str]) -> Message:
    return _name_reg(args, False)


def name_list(args: list[str]) -> Message:
    parse_words(args, [])
    return m.NameList()


def flow_list(args: list[str]) -> Message:
    parse_words(args, [])
    return m.FlowList()


def dump_config(args: list[str]) -> Message:
    parse_words(args, [])
    return m.Dump("config")


def dump_graph(args: list[str]) -> Message:
    fmt = match(args.pop(0), ["text", "dot"], "a graph format") if args else "text"
    parse_words(args, [])
    return m.Dump(fmt)


COMMANDS: dict[str, Any] = {
    "ipcp": {
        "create": ipcp_create, "destroy": ipcp_destroy, "bootstrap": ipcp_bootstrap,
        "enroll": ipcp_enroll, "connect": ipcp_connect, "disconnect": ipcp_disconnect,
        "list": ipcp_list,
    },
    "bind": bind,
    "unbind": unbind,
    "name": {
        "create": name_create, "destroy": name_destroy, "register": name_register,
        "unregister": name_unregister, "list": name_list,
    },
    "flow": {"list": flow_list},
    "dump": {"config": dump_config, "graph": dump_graph},
}  # fmt: skip

USAGE = """usage: irm OPERATION ...
  irm ipcp create    name N type {local|unicast|broadcast|udp4|udp6|eth-dix|eth-llc}
  irm ipcp bootstrap name N layer L [type T] [autobind] [type options]
      local: [hash H]   udp4/udp6: ip ADDR [port 3435] [dns ADDR] [peer ADDR]... [members 1024]
      udp/eth, for tests only: [impair loss=PCT,dup=PCT,reorder=PCT]
      eth-dix: dev IFACE [ethertype 0xA000] [hash H]   eth-llc: dev IFACE [hash H]
      unicast: [addr 4] [eid 8] [ttl 60] [routing {link_state|lfa|ecmp}]
               [congestion {none|mb-ecn}] [hash {SHA3_224|SHA3_256|SHA3_384|SHA3_512}]
               [directory DHT] [addr_auth flat] [key SECRET]
  irm ipcp enroll    name N [layer L] [dst D] [type T] [autobind] [key SECRET]
  irm ipcp connect   name N dst D [component {dt|mgmt}] [qos {raw|best|voice|video|data}]
  irm ipcp disconnect name N dst D [component {dt|mgmt}]
  irm ipcp list [name N] [layer L] [type T]  |  irm ipcp destroy name N
  irm bind program PATH name N [auto] [-- ARGS...] | bind process PID name N | bind ipcp I name N
  irm unbind program PATH [name N] | unbind process PID [name N] | unbind ipcp I [name N]
  irm name create N [lb {round-robin|spillover}] [sencpath P] [scrtpath P] [skeypath P]
                  [cencpath P] [ccrtpath P] [ckeypath P]   | irm name destroy N
      security files (server/client enc.conf, crt.pem, key.pem); default:
      <security dir>/{server,client}/N/..., the security dir $OUROBOROS_SECURITY_DIR,
      /etc/ouroboros/security for root, else ~/.config/ouroboros/security
  irm name register N layer L [layer L2 ...] | irm name unregister N layer L [layer L2 ...]
  irm name list | irm flow list
  irm dump config                 the running state as a config file (irmd --config takes it)
  irm dump graph [text|dot]       the layers and what runs over what, as text or Graphviz dot
Keywords may be abbreviated to any unique prefix."""


def parse(argv: list[str]) -> Message:
    """Turn a command line into the message for the IRMd, or raise UsageError."""
    node: Any = COMMANDS
    words = list(argv)
    path: list[str] = []
    while isinstance(node, dict):
        if not words:
            raise UsageError(f"expected {' '.join(['irm', *path])} {{{' '.join(node)}}}")
        word = match(words.pop(0), list(node), f"{' '.join(['irm', *path])} OPERATION")
        path.append(word)
        node = node[word]
    return node(words)  # type: ignore[no-any-return]


def render(table: m.Table) -> str:
    if not table.rows:
        return "(none)"
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in table.rows)) for c in table.columns}
    rule = "+" + "+".join("-" * (widths[c] + 2) for c in table.columns) + "+"

    def line(cells: dict[str, str]) -> str:
        return "| " + " | ".join(cells[c].ljust(widths[c]) for c in table.columns) + " |"

    return "\n".join([rule, line({c: c for c in table.columns}), rule,
                      *(line({c: r.get(c, "") for c in table.columns}) for r in table.rows), rule])


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("help", "-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    try:
        msg = parse(args)
    except UsageError as e:
        print(f"irm: {e}", file=sys.stderr)
        print("try 'irm help'", file=sys.stderr)
        sys.exit(2)
    try:
        channel = open_channel()
        try:
            reply, _ = call(channel, msg, timeout=60)
        finally:
            channel.close()
    except FlowError as e:
        print(f"irm: {e}", file=sys.stderr)
        sys.exit(1)
    try:
        if isinstance(reply, m.Table):
            print(render(reply))
        elif isinstance(reply, m.Ok) and reply.text:
            print(reply.text)
    except BrokenPipeError:  # irm ... | head
        sys.stderr.close()
