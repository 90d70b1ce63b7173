"""Who a depot's client is, as far as the kernel or the IRMd vouch for it: the identity its
per-client limits are counted against.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from proto import messages as m

_PROC_TCP = {socket.AF_INET: Path("/proc/net/tcp"), socket.AF_INET6: Path("/proc/net/tcp6")}


def flow_identity(reply: m.FlowReply, peer_addr: str = "") -> str:
    """A local flow's allocator by uid (the IRMd has it from SO_PEERCRED); a remote one by the host its
    layer vouches for (`peer_addr`, m.FlowPeer: a unicast member's address, a udp peer's IP or IPv6
    /64), as a TCP client by its address; only a flow whose layer names no peer is its layer's."""
    if reply.peer_uid >= 0:
        return f"uid:{reply.peer_uid}"
    if peer_addr:
        return f"peer:{reply.layer}/{peer_addr}"
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
    """The owner of a local connection's other end, as the kernel's socket table has it (as identd):
    one from a loopback address or from any other address of this host (a user who reaches the depot
    by the host's own name is that user, not an address every local user shares).

    None for remote peers, and for a peer whose socket is gone before we look: a socket its process
    closed lingers as a row with no owner (FIN_WAIT2 or TIME_WAIT), which the kernel lists with uid 0,
    though the data it sent may still wait to be read: any local user who closed right after sending
    would be root. The row is asked for by its addresses (sock_diag, one look-up in the kernel's hash
    as `ss` makes); the whole table is read only where the kernel cannot be asked so, as reading it
    costs time with every socket of the host, and this runs for every connection accepted.
    """
    try:
        local, remote = sock.getsockname(), sock.getpeername()
        if not own_address(sock.family, remote):
            return None
    except (OSError, ValueError):
        return None
    # The peer's socket is the row whose local end is our remote end and whose remote end is ours:
    # in our own family's table, or, for an IPv4 peer of a dual-stack listener (an AF_INET socket),
    # under the unmapped addresses (AF_INET).
    scope = remote[3] if sock.family == socket.AF_INET6 and len(remote) > 3 else 0
    ends = [(sock.family, (remote[0], remote[1]), (local[0], local[1]))]
    if sock.family == socket.AF_INET6 and unmapped(remote[0]).version == 4:
        ends.append((socket.AF_INET, (str(unmapped(remote[0])), remote[1]), (str(unmapped(local[0])), local[1])))
    try:
        for family, peer, ours in ends:
            row = _diag(family, peer, ours, scope)
            if row is not None:
                return _uid(*row)
        # No such row: the peer is gone, if the kernel finds ours (else it cannot be asked so)
        if _diag(sock.family, (local[0], local[1]), (remote[0], remote[1]), scope) is not None:
            return None
    except OSError:  # no sock_diag here (an old kernel, a sandbox): the table, read whole
        pass
    for family, peer, ours in ends:
        row = _owner(family, _proc_addr(family, *peer), _proc_addr(family, *ours))
        if row is not None:
            return _uid(*row)
    return None


def _uid(uid: int, inode: int) -> int | None:
    """A row's owner, unless the row is no open socket's (inode 0): then the kernel's uid is no one's."""
    return uid if inode else None


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


def _owner(family: socket.AddressFamily, peer: str, ours: str) -> tuple[int, int] | None:
    """(uid, inode) of the row of `family`'s socket table from `peer` to `ours`."""
    try:
        table = _PROC_TCP[family].read_text()
    except OSError:
        return None
    for row in table.splitlines()[1:]:
        cols = row.split()
        if len(cols) > 9 and (cols[1], cols[2]) == (peer, ours) and cols[7].isdigit() and cols[9].isdigit():
            return int(cols[7]), int(cols[9])
    return None


# sock_diag (linux/sock_diag.h, linux/inet_diag.h): one TCP socket asked for by its addresses.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NO_COOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_DIAG_MSG = 72  # struct inet_diag_msg: family, state, timer, retrans, the socket's id (48), then 5 u32
_DIAG_UID = 64  # ... idiag_uid's offset in it; idiag_inode follows
DIAG_TIMEOUT = 1.0  # s the kernel has to answer (it answers at once)


def _diag(
    family: socket.AddressFamily, local: tuple[str, int], remote: tuple[str, int], scope: int = 0
) -> tuple[int, int] | None:
    """(uid, inode) of the TCP socket of `family` from `local` to `remote`, asked of the kernel; None
    if there is none. OSError if the kernel cannot be asked (no sock_diag)."""

    def addr(host: str) -> bytes:
        return socket.inet_pton(family, host.split("%")[0]).ljust(16, b"\0")

    sockid = struct.pack("!HH", local[1], remote[1]) + addr(local[0]) + addr(remote[0])
    sockid += struct.pack("=III", scope, _NO_COOKIE, _NO_COOKIE)
    body = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(DIAG_TIMEOUT)
        nl.send(_NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body)
        data = nl.recv(8192)
    if len(data) < _NLMSG.size + 4:
        raise OSError(errno.EPROTO, "a short sock_diag answer")
    _, kind, _, seq, _ = _NLMSG.unpack_from(data)
    if kind == _NLMSG_ERROR:
        err = -struct.unpack_from("=i", data, _NLMSG.size)[0]
        if err == errno.ENOENT:
            return None
        raise OSError(err, os.strerror(err))
    if kind != _SOCK_DIAG_BY_FAMILY or seq != 1 or len(data) < _NLMSG.size + _DIAG_MSG:
        raise OSError(errno.EPROTO, "an unexpected sock_diag answer")
    uid, inode = struct.unpack_from("=II", data, _NLMSG.size + _DIAG_UID)
    return uid, inode


def _proc_addr(family: int, host: str, port: int) -> str:
    """An address as /proc/net/tcp writes it: the raw bytes in host-order words, then the port."""
    packed = socket.inet_pton(family, host.split("%")[0])
    order = -1 if sys.byteorder == "little" else 1
    words = "".join(packed[i : i + 4][::order].hex().upper() for i in range(0, len(packed), 4))
    return f"{words}:{port:04X}"
