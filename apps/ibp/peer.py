"""Who a depot's client is, as far as the kernel or the IRMd vouch for it: the identity its
per-client limits are counted against.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any

from proto import messages as m

_PROC_TCP = {socket.AF_INET: Path("/proc/net/tcp"), socket.AF_INET6: Path("/proc/net/tcp6")}


def flow_identity(reply: m.FlowReply) -> str:
    """A local flow's allocator by uid (the IRMd has it from SO_PEERCRED); a remote one by its layer,
    as no remote identity reaches the application yet."""
    if reply.peer_uid >= 0:
        return f"uid:{reply.peer_uid}"
    return f"layer:{reply.layer}"


IPV6_CLIENT_PREFIX = 64  # the bits of an IPv6 address that name one remote client


def tcp_identity(sock: socket.socket) -> str:
    """A TCP client by the uid owning its socket when it is on this host, else by its address: an
    IPv4 one as such (whether it reached an IPv4 or a dual-stack IPv6 listener), an IPv6 one by its
    /64. A host or site is handed a /64 at least and may use any address in it (privacy addresses
    change by design), so per address one remote client would have 2**64 sets of quotas."""
    try:
        address = unmapped(sock.getpeername()[0])
    except (OSError, ValueError):
        return "tcp:?"
    uid = local_tcp_uid(sock)
    if uid is not None:
        return f"uid:{uid}"
    if address.version == 6:
        return f"tcp:{ipaddress.IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False)}"
    return f"tcp:{address}"


def unmapped(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address, an IPv4-mapped IPv6 one (`::ffff:127.0.0.1`, how a dual-stack listener sees an
    IPv4 peer) as the IPv4 address it is, so that it is classified (loopback or not) as that."""
    address = ipaddress.ip_address(text.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def local_tcp_uid(sock: socket.socket) -> int | None:
    """The owner of a local connection's other end, from the kernel's socket table (as identd): one
    from a loopback address or from any other address of this host (a user who reaches the depot
    by the host's own name is that user, not an address every local user shares).

    None for remote peers, or when the peer is gone before we look.
    """
    try:
        local, remote = sock.getsockname(), sock.getpeername()
        if not own_address(sock.family, remote):
            return None
    except (OSError, ValueError):
        return None
    # The peer's socket is the row whose local end is our remote end and whose remote end is ours:
    # in our own family's table, or, for an IPv4 peer of a dual-stack listener (an AF_INET socket),
    # in /proc/net/tcp under the unmapped addresses.
    ends = [(sock.family, remote[0], local[0])]
    if sock.family == socket.AF_INET6 and unmapped(remote[0]).version == 4:
        ends.append((socket.AF_INET, str(unmapped(remote[0])), str(unmapped(local[0]))))
    for family, peer, ours in ends:
        uid = _owner(family, _proc_addr(family, peer, remote[1]), _proc_addr(family, ours, local[1]))
        if uid is not None:
            return uid
    return None


def own_address(family: socket.AddressFamily, peer: tuple[Any, ...]) -> bool:
    """Whether `peer` (a socket address of `family`) is one of this host's: a loopback one, or one
    a socket can be bound to (the kernel answers EADDRNOTAVAIL for any other). A cheap test, so a
    remote peer costs no read of the socket table."""
    address = unmapped(peer[0])
    if address.is_loopback:
        return True
    where: tuple[Any, ...] = (str(address), 0)
    if address.version == 4:
        family = socket.AF_INET
    else:
        where = (str(address), 0, 0, peer[3] if len(peer) > 3 else 0)  # a link-local one needs its scope
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind(where)
    except OSError:
        return False
    return True


def _owner(family: socket.AddressFamily, peer: str, ours: str) -> int | None:
    """The uid of the row of `family`'s socket table from `peer` to `ours`."""
    try:
        table = _PROC_TCP[family].read_text()
    except OSError:
        return None
    for row in table.splitlines()[1:]:
        cols = row.split()
        if len(cols) > 7 and (cols[1], cols[2]) == (peer, ours) and cols[7].isdigit():
            return int(cols[7])
    return None


def _proc_addr(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp writes it: the raw bytes in host-order words, then the port."""
    packed = socket.inet_pton(family, host.split("%")[0])
    order = -1 if sys.byteorder == "little" else 1
    words = "".join(packed[i : i + 4][::order].hex().upper() for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"
