"""Who a depot's client is, as far as the kernel or the IRMd vouch for it: the identity its
per-client limits are counted against.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from proto import messages as m

_PROC_TCP = {socket.AF_INET: Path("/proc/net/tcp"), socket.AF_INET6: Path("/proc/net/tcp6")}


def flow_identity(reply: m.FlowReply) -> str:
    """A local flow's allocator by uid (the IRMd has it from SO_PEERCRED); a remote one by its layer,
    as no remote identity reaches the application yet."""
    if reply.peer_uid >= 0:
        return f"uid:{reply.peer_uid}"
    return f"layer:{reply.layer}"


def tcp_identity(sock: socket.socket) -> str:
    """A TCP client by the uid owning its socket when it is on this host, else by its address."""
    try:
        host = sock.getpeername()[0]
    except OSError:
        return "tcp:?"
    uid = local_tcp_uid(sock)
    return f"uid:{uid}" if uid is not None else f"tcp:{host}"


def local_tcp_uid(sock: socket.socket) -> int | None:
    """The owner of a loopback connection's other end, from the kernel's socket table (as identd).

    None for remote peers, or when the peer is gone before we look.
    """
    try:
        local, remote = sock.getsockname(), sock.getpeername()
        if not ipaddress.ip_address(remote[0].split("%")[0]).is_loopback:
            return None
        table = _PROC_TCP[sock.family].read_text()
    except (OSError, ValueError, KeyError):
        return None
    # The peer's socket is the row whose local end is our remote end and whose remote end is ours.
    want = (_proc_addr(sock.family, remote[0], remote[1]), _proc_addr(sock.family, local[0], local[1]))
    for row in table.splitlines()[1:]:
        cols = row.split()
        if len(cols) > 7 and (cols[1], cols[2]) == want and cols[7].isdigit():
            return int(cols[7])
    return None


def _proc_addr(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp writes it: the raw bytes in host-order words, then the port."""
    packed = socket.inet_pton(family, host.split("%")[0])
    order = -1 if sys.byteorder == "little" else 1
    words = "".join(packed[i : i + 4][::order].hex().upper() for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"
