"""The IRMd's running state as text: a config file that boots the same (`irm dump config`),
and the graph of layers, what runs over what (`irm dump graph`, as text or Graphviz dot).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import tomli_w

from irmd.reg import Ipcp, Name, Registry
from irmd.views import REDACTED, redact

# The IPCPs an irmd.conf lists first are the ones the others run over.
TYPE_ORDER = ("local", "eth-dix", "eth-llc", "udp4", "udp6", "broadcast", "unicast")


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


def _ipcp_pids(ipcps: Sequence[Ipcp]) -> set[int]:
    return {i.pid for i in ipcps}


def _everything(entry: Name) -> bool:
    return True


def _args(args: list[str]) -> str | list[str]:
    """A program's arguments as irmd.conf writes them (one string, split at spaces), or as a list of
    words when one holds a space or is empty, so that they come back exactly."""
    return " ".join(args) if all(a and not any(c.isspace() for c in a) for a in args) else list(args)


def as_config(ipcps: Sequence[Ipcp], reg: Registry, shown: Callable[[Name], bool] = _everything) -> str:
    """A TOML config file (docs/config.md) that recreates this state when an irmd boots from it, and
    that an irmd booted from it dumps again the same.

    Only the names `shown` are in it (a user sees their own); secrets (layer keys) never are.
    """
    notes = ["# The running state of this IRMd, as `irmd --config` takes it (written by `irm dump config`)."]
    doc: dict[str, Any] = {}
    ipcp_pids = _ipcp_pids(ipcps)
    for entry in sorted(reg.names.values(), key=lambda e: e.name):
        if entry.pids & ipcp_pids or not shown(entry):
            continue  # an IPCP's own names: autobind makes them again
        table: dict[str, Any] = {}
        if entry.programs:
            progs = list(entry.programs.values())
            table["prog"] = [p.path for p in progs]
            if any(p.args for p in progs):
                table["args"] = [_args(p.args) for p in progs]
            table["auto"] = any(p.auto for p in progs)
        table["lb"] = entry.lb
        table.update(sorted(entry.sec.items()))
        if entry.pids:
            notes.append(
                f"# name {entry.name}: bound to processes {', '.join(map(str, sorted(entry.pids)))}, "
                "which a config file does not keep"
            )
        doc.setdefault("name", {})[entry.name] = table
    for ipcp in sorted(ipcps, key=lambda i: (TYPE_ORDER.index(i.type) if i.type in TYPE_ORDER else 99, i.name)):
        table = {}
        joined = ipcp.joined
        if "bootstrap" in joined:
            table["bootstrap"] = joined["bootstrap"]
            for key, value in sorted(redact(joined["conf"]).items()):
                if value == REDACTED:
                    notes.append(
                        f"# [{ipcp.type}.{ipcp.name}] {key}: a secret, never dumped (write it there to "
                        "boot from this file)"
                    )
                else:
                    table[key] = value
        elif "enrol" in joined:
            table["enrol"] = joined["enrol"]
        if joined.get("autobind"):
            table["autobind"] = True
        if ipcp.conns:
            table["conn"] = list(ipcp.conns)
        names = sorted(e.name for e in reg.names.values()
                       if ipcp.name in e.regs and not e.pids & ipcp_pids and shown(e))  # fmt: skip
        if names:
            table["reg"] = names
        doc.setdefault(ipcp.type, {})[ipcp.name] = table
    return "\n".join(notes) + "\n\n" + tomli_w.dumps(doc, multiline_strings=False)


def _edges(ipcps: Sequence[Ipcp], reg: Registry) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(layer -> the layers its IPCP runs over, name -> the layers it is registered in)."""
    by_pid = {i.pid: i for i in ipcps}
    over: dict[str, set[str]] = {i.layer: set() for i in ipcps if i.layer}
    for flow in reg.flows.values():  # an IPCP's flows are what it runs over
        upper = by_pid.get(flow.pid)
        if upper is not None and upper.layer and flow.layer != upper.layer:
            over[upper.layer].add(flow.layer)
    names: dict[str, set[str]] = {}
    for entry in reg.names.values():
        layers = set(reg.layers_of(entry))
        ipcp = next((by_pid[p] for p in entry.pids if p in by_pid), None)
        if ipcp is not None:  # an IPCP's name in a lower layer: that layer carries its own
            if ipcp.layer:
                over[ipcp.layer] |= layers - {ipcp.layer}
        elif layers:
            names[entry.name] = layers
    return over, names


def _names(members: Sequence[Ipcp]) -> str:
    return ", ".join(i.name for i in members)


def _members(members: Sequence[Ipcp]) -> str:
    return f"{members[0].type} ({_names(members)})"


def layer_graph(
    ipcps: Sequence[Ipcp], reg: Registry, fmt: str = "text", shown: Callable[[Name], bool] = _everything
) -> str:
    """What runs over what on this host: layers over layers, applications' names (those `shown`) over layers."""
    over, names = _edges(ipcps, reg)
    names = {n: layers for n, layers in names.items() if shown(reg.names[n])}
    of_layer: dict[str, list[Ipcp]] = {}
    for i in ipcps:
        if i.layer:
            of_layer.setdefault(i.layer, []).append(i)
    if fmt == "json":  # irm --json dump graph
        graph = [
            {
                "layer": layer,
                "type": members[0].type,
                "ipcps": [i.name for i in members],
                "over": sorted(over.get(layer, ())),
            }
            for layer, members in sorted(of_layer.items())
        ]
        apps = [{"name": n, "layers": sorted(layers)} for n, layers in sorted(names.items())]
        return json.dumps({"layers": graph, "names": apps}, indent=2) + "\n"
    if fmt == "dot":
        dot = ["digraph layers {", "  rankdir=TB;", "  node [fontname=Helvetica];"]
        for layer, members in sorted(of_layer.items()):
            label = _q(f"{layer}\n{_members(members)}")
            dot.append(f"  {_q('layer ' + layer)} [shape=box, label={label}];")
        for layer, lowers in sorted(over.items()):
            dot += [f"  {_q('layer ' + layer)} -> {_q('layer ' + low)};" for low in sorted(lowers)]
        for name, layers in sorted(names.items()):
            dot.append(f"  {_q(name)} [shape=ellipse];")
            dot += [f"  {_q(name)} -> {_q('layer ' + layer)};" for layer in sorted(layers)]
        return "\n".join([*dot, "}"]) + "\n"
    if not of_layer:
        return "(no layers)\n"
    below = set().union(*over.values()) if over else set()
    lines: list[str] = []

    def show(layer: str, depth: int, seen: frozenset[str]) -> None:
        members = of_layer.get(layer)
        what = f"{members[0].type} ipcp{'s' if len(members) > 1 else ''} {_names(members)}" if members else "not here"
        apps = sorted(n for n, layers in names.items() if layer in layers)
        lines.append(f"{'    ' * depth}{'└── ' if depth else ''}{layer} ({what})"
                     + (f"  names: {', '.join(apps)}" if apps else ""))  # fmt: skip
        for low in sorted(over.get(layer, ())):
            if low not in seen:
                show(low, depth + 1, seen | {low})

    for top in sorted(set(of_layer) - below) or sorted(of_layer):
        show(top, 0, frozenset({top}))
    return "\n".join(lines) + "\n"
