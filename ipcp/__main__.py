"""Entry point of an IPCP process, as the IRMd spawns it: python -m ipcp TYPE NAME SOCK."""

from __future__ import annotations

import importlib
import sys

from ipcp.base import Ipcp, run_ipcp

# Each type's module and class; modules are imported only for the type run.
KINDS: dict[str, tuple[str, str]] = {
    "local": ("ipcp.local", "LocalIpcp"),
    "udp4": ("ipcp.udp", "UdpIpcp"),
    "udp6": ("ipcp.udp", "Udp6Ipcp"),
    "eth-dix": ("ipcp.eth", "EthDixIpcp"),
    "eth-llc": ("ipcp.eth", "EthLlcIpcp"),
    "unicast": ("ipcp.unicast.ipcp", "UnicastIpcp"),
    "broadcast": ("ipcp.broadcast", "BroadcastIpcp"),
}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m ipcp TYPE NAME IRMD_SOCK", file=sys.stderr)
        return 2
    kind, name, sock = argv
    if kind not in KINDS:
        print(f"ipcp: type {kind!r} is not available (have: {', '.join(KINDS)})", file=sys.stderr)
        return 2
    module, cls_name = KINDS[kind]
    cls: type[Ipcp] = getattr(importlib.import_module(module), cls_name)
    name_process(f"ipcpd-{kind}", f"ipcpd-{kind} {name}")
    run_ipcp(cls, name, sock)
    return 0


def name_process(comm: str, title: str) -> None:
    """As C's IPCPs are named: `comm` in ps, top and pgrep, `title` as the command line (ps -f, pgrep -f)."""
    import setproctitle  # here: only what runs an IPCP or the fork server pays for it

    setproctitle.setproctitle(title)
    with open("/proc/self/comm", "w") as f:
        f.write(comm[:15])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
