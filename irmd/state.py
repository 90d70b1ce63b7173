"""The IRMd's running state as text: a config file that boots the same (`irm dump config`),
and the graph of layers, what runs over what (`irm dump graph`, as text or Graphviz dot).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from irmd.registry import Registry

if TYPE_CHECKING:
    from irmd.daemon import Ipcp

# The IPCPs an irmd.conf lists first are the ones the others run over.
TYPE_ORDER = ("local", "eth-dix", "eth-llc", "udp4", "udp6", "broadcast", "unicast")


def _q(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text)


def _ipcp_pids(ipcps: Sequence[Ipcp]) -> set[int]:
    return {i.pid for i in ipcps}


def as_config(ipcps: Sequence[Ipcp], reg: Registry) -> str:
    """A TOML config file (docs/config.md) that recreates this state when an irmd boots from it."""
    out = ["# The running state of this IRMd, as `irmd --config` takes it (written by `irm dump config`).", ""]
    ipcp_pids = _ipcp_pids(ipcps)
    for entry in sorted(reg.names.values(), key=lambda e: e.name):
        if entry.pids & ipcp_pids:
            continue  # an IPCP's own names: autobind makes them again
        out.append(f"[name.{_q(entry.name)}]")
        if entry.programs:
            progs = list(entry.programs.values())
            out.append(f"prog = [{', '.join(_q(p.path) for p in progs)}]")
            if any(p.args for p in progs):
                out.append(f"args = [{', '.join(_q(' '.join(p.args)) for p in progs)}]")
            out.append(f"auto = {'true' if any(p.auto for p in progs) else 'false'}")
        if entry.lb != "round-robin":
            out.append(f"lb = {_q(entry.lb)}")
        out += [f"{key} = {_q(value)}" for key, value in sorted(entry.sec.items())]
        if entry.pids:
            out.append(f"# bound to processes {', '.join(map(str, sorted(entry.pids)))}: not kept in a config file")
        out.append("")
    for ipcp in sorted(ipcps, key=lambda i: (TYPE_ORDER.index(i.type) if i.type in TYPE_ORDER else 99, i.name)):
        out.append(f"[{ipcp.type}.{_q(ipcp.name)}]")
        joined = ipcp.joined
        if "bootstrap" in joined:
            out.append(f"bootstrap = {_q(joined['bootstrap'])}")
            out += [f"{key} = {_q(value)}" for key, value in sorted(joined["conf"].items())]
        elif "enrol" in joined:
            out.append(f"enrol = {_q(joined['enrol'])}")
        if joined.get("autobind"):
            out.append("autobind = true")
        if ipcp.conns:
            out.append(f"conn = [{', '.join(map(_q, ipcp.conns))}]")
        names = sorted(e.name for e in reg.names.values()
                       if ipcp.layer and ipcp.layer in e.layers and not e.pids & ipcp_pids)  # fmt: skip
        if names:
            out.append(f"reg = [{', '.join(map(_q, names))}]")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


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
        ipcp = next((by_pid[p] for p in entry.pids if p in by_pid), None)
        if ipcp is not None:  # an IPCP's name in a lower layer: that layer carries its own
            if ipcp.layer:
                over[ipcp.layer] |= entry.layers - {ipcp.layer}
        elif entry.layers:
            names[entry.name] = set(entry.layers)
    return over, names


def layer_graph(ipcps: Sequence[Ipcp], reg: Registry, fmt: str = "text") -> str:
    """What runs over what on this host: layers over layers, applications' names over layers."""
    over, names = _edges(ipcps, reg)
    of_layer = {i.layer: i for i in ipcps if i.layer}
    if fmt == "dot":
        dot = ["digraph layers {", "  rankdir=BT;", "  node [fontname=Helvetica];"]
        for layer, ipcp in sorted(of_layer.items()):
            label = _q(f"{layer}\n{ipcp.type} ({ipcp.name})")
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
        ipcp = of_layer.get(layer)
        what = f"{ipcp.type} ipcp {ipcp.name}" if ipcp else "not here"
        apps = sorted(n for n, layers in names.items() if layer in layers)
        lines.append(f"{'    ' * depth}{'└── ' if depth else ''}{layer} ({what})"
                     + (f"  names: {', '.join(apps)}" if apps else ""))  # fmt: skip
        for low in sorted(over.get(layer, ())):
            if low not in seen:
                show(low, depth + 1, seen | {low})

    for top in sorted(set(of_layer) - below) or sorted(of_layer):
        show(top, 0, frozenset({top}))
    return "\n".join(lines) + "\n"
