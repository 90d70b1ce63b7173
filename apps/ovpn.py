"""ovpn: IP over a flow through a TUN device, as C Ouroboros 0.23's ovpn (as root).

`ovpn -i IP -m MASK` waits for a flow, `ovpn -n NAME -i IP -m MASK` allocates one to NAME; then each
end's TUN device (given IP/MASK, up, its MTU the flow's) carries its IP packets over the flow.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import signal
import socket
import struct
import sys
import threading
from typing import NoReturn

from apps.common import CParser, ends_quietly, fail, qos_arg
from flowlib import Flow, FlowError, InvalidArgument, flow_accept, flow_alloc, qos
from proto import logs
from proto.version import add_version
from proto.visible import visible

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
IFF_UP, IFF_RUNNING = 0x1, 0x40
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFMTU = 0x8913, 0x8914, 0x8916, 0x891C, 0x8922
IFREQ_FLAGS = struct.Struct("16sH22x")  # struct ifreq (40 bytes) with ifr_flags
IFREQ_ADDR = struct.Struct("16sHH4s16x")  # with ifr_addr: a sockaddr_in (family, port, address, zeros)
IFREQ_MTU = struct.Struct("16si20x")
BUF_SIZE = 65536
log = logging.getLogger("ovpn")
# What the device takes from the peer, and what it may change on the host: IPv4 packets only, from
# addresses routed through the tunnel. With IPv6 on, one router advertisement from the peer gave the
# host an address and a default route through the tunnel; with loose reverse-path checks, packets
# in the name of the host's LAN reached its services as if from there.
DEVICE_SYSCTLS = (
    ("ipv6", "disable_ipv6", "1"),
    ("ipv4", "rp_filter", "1"),
    ("ipv4", "accept_redirects", "0"),
    ("ipv4", "accept_source_route", "0"),
)


def mask_arg(text: str) -> ipaddress.IPv4Address | None:
    """A subnet mask, its ones first and its zeros after; None if it is none."""
    try:
        mask = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    inverted = ~int(mask) & 0xFFFFFFFF
    return None if inverted & (inverted + 1) else mask


def ip_arg(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        return None


def getopt_argv(p: CParser, argv: list[str]) -> list[str]:
    """The command line read as C's getopt_long reads it, each option's value joined to it (so that a
    value may begin with '-', as getopt takes it), non-options kept in place; an option it does not
    know, or one whose value is missing, ends the program in getopt's words, at the first of them."""
    takes_value = {s: a.nargs is None for a in p._actions for s in a.option_strings}
    longs = [s for s in takes_value if s.startswith("--")]
    words, out = list(argv), []
    while words:
        word = words.pop(0)
        if word == "--":  # the rest are not options
            out += [word, *words]
            break
        if word == "-" or not word.startswith("-"):
            out.append(word)
            continue
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            found = [name] if name in takes_value else [s for s in longs if s.startswith(name)]
            if not found:
                p.error(f"unrecognized option '{name}'")
            if len(found) > 1:
                p.error(f"option '{name}' is ambiguous; possibilities: {' '.join(repr(s) for s in found)}")
            if not takes_value[found[0]]:
                if eq:
                    p.error(f"option '{found[0]}' doesn't allow an argument")
                out.append(found[0])
            elif eq or words:
                out.append(f"{found[0]}={value if eq else words.pop(0)}")
            else:
                p.error(f"option '{found[0]}' requires an argument")
            continue
        for i, char in enumerate(word[1:], 1):  # a cluster of short options: -Ch, or -n NAME, -nNAME
            if f"-{char}" not in takes_value:
                p.error(f"invalid option -- '{char}'")
            if not takes_value[f"-{char}"]:
                out.append(f"-{char}")
            elif word[i + 1 :] or words:
                out.append(f"-{char}{word[i + 1 :] or words.pop(0)}")
                break
            else:
                p.error(f"option requires an argument -- '{char}'")
    return out


def refuse(p: CParser, line: str) -> NoReturn:
    """C's words for a command line it cannot run: what is wrong and an empty line, then the usage,
    all on stdout; status 1."""
    print(f"{line}\n")
    p.exit_with_usage(1)


def confine(dev: str) -> None:
    """Set DEVICE_SYSCTLS on `dev`, before it is up; a family the kernel lacks (no IPv6) is skipped, and
    a setting a container keeps read-only is said and left (what comes from the peer is still IPv4
    only: Tunnel.from_flow drops the rest)."""
    for family, key, value in DEVICE_SYSCTLS:
        path = f"/proc/sys/net/{family}/conf/{dev}/{key}"
        try:
            with open(path, "w") as f:
                f.write(value)
        except FileNotFoundError:
            if family == "ipv4":
                raise
            log.info("%s: no such setting (no %s): skipped", path, family)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            log.warning("cannot set %s to %s (%s): the tunnel goes on without it", path, value, e.strerror)


def tun_open(name: str, ip: ipaddress.IPv4Address, mask: ipaddress.IPv4Address, mtu: int) -> tuple[int, str]:
    """A TUN device (no packet information header), addressed, its MTU set, up; (fd, its name)."""
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        got = fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(name.encode(), IFF_TUN | IFF_NO_PI))
        dev = got[:16].rstrip(b"\0")
        confine(dev.decode())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFADDR, IFREQ_ADDR.pack(dev, socket.AF_INET, 0, ip.packed))
            fcntl.ioctl(s, SIOCSIFNETMASK, IFREQ_ADDR.pack(dev, socket.AF_INET, 0, mask.packed))
            fcntl.ioctl(s, SIOCSIFMTU, IFREQ_MTU.pack(dev, mtu))
            _, flags = IFREQ_FLAGS.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, IFREQ_FLAGS.pack(dev, 0)))
            fcntl.ioctl(s, SIOCSIFFLAGS, IFREQ_FLAGS.pack(dev, flags | IFF_UP | IFF_RUNNING))
    except BaseException:
        os.close(fd)
        raise
    return fd, dev.decode()


class Tunnel:
    """Two threads: the flow's SDUs to the TUN device, the device's packets to the flow."""

    def __init__(self, flow: Flow, tun: int) -> None:
        self.flow = flow
        self.tun = tun
        self.ended = threading.Event()
        self.dropped = 0  # packets larger than the flow carries
        self.refused = 0  # SDUs from the peer the device refused, or not IPv4 packets

    def from_flow(self) -> None:
        try:
            while True:
                sdu = self.flow.read()
                if not sdu or sdu[0] >> 4 != 4:  # the tunnel is IPv4's: nothing else from the peer reaches the host
                    self.refused += 1
                    continue
                try:
                    os.write(self.tun, sdu)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.refused += 1  # the peer's to send anything: one bad SDU must not end the tunnel
        except (FlowError, OSError) as e:
            print(f"The flow ended: {e}", flush=True)
        self.ended.set()

    def to_flow(self) -> None:
        try:
            while True:
                packet = os.read(self.tun, BUF_SIZE)
                try:
                    self.flow.write(packet)
                except InvalidArgument:
                    self.dropped += 1
        except (FlowError, OSError) as e:
            print(f"The tunnel ended: {e}", flush=True)
        self.ended.set()


def refusal(flow: Flow, peer: str | None) -> str | None:
    """Why a tunnel is not for this flow's allocator (None: it is). A local user other than root is
    refused: the tunnel puts its packets on the host's network as root's, sources of its choosing. With
    `peer` (--peer), only the peer whose certificate a CA of the host vouches for under that name (or
    one pinned), on an encrypted flow, is taken, from here or afar."""
    if flow.peer_uid is not None and flow.peer_uid not in (0, os.geteuid()):
        return f"from uid {flow.peer_uid}: only root tunnels from this host"
    if peer is not None and (flow.peer is None or flow.peer.name != peer):
        who = "an anonymous peer" if flow.peer is None else f"peer {visible(flow.peer.name)}"
        return f"from {who}: only {visible(peer)} may tunnel here (--peer)"
    return None


def accept_tunnel(timeout: float | None, peer: str | None) -> Flow:
    """The first flow `refusal` finds nothing against; each other one closed, its refusal said once."""
    said: set[str] = set()
    while True:
        flow = flow_accept(timeout=timeout)
        why = refusal(flow, peer)
        if why is None:
            return flow
        if why not in said:  # once: a loop of allocations writes no more
            said.add(why)
            print(f"Refused a flow {why}.", flush=True)
        flow.close()


@ends_quietly
def main(argv: list[str] | None = None) -> None:
    # getopt_long's: a prefix of a long option will do; what it does not take exits 1, --help 0
    p = CParser(
        prog="ovpn",
        description="Sends TCP/IP traffic over Ouroboros.",
        usage_status=1,
        help_status=0,
        usage_on_error=False,
        allow_abbrev=True,
    )
    p.add_argument("-n", "--name", help="run as client, name of ovpn server to connect to")
    p.add_argument("-i", "--ip", help="IP address to give to TUN device")
    p.add_argument("-m", "--mask", help="subnet mask to give to TUN device")
    p.add_argument("--dev", default="tun%d", help="name of the TUN device (ours; default: the kernel picks)")
    p.add_argument("-q", "--qos", type=qos_arg, default=qos.raw, help="the flow's QoS (ours; C's is raw)")
    p.add_argument("--timeout", type=float, default=None, help="allocation timeout in seconds (ours)")
    p.add_argument("--peer", help="tunnel only with the peer whose certificate proves this name, encrypted (ours)")
    logs.add_arguments(p, quiet=False)
    add_version(p)
    if os.geteuid() != 0:  # as C's: before the command line is read (`ovpn --help` too)
        print("ovpn must be run as root.")
        sys.exit(1)
    args, extra = p.parse_known_args(getopt_argv(p, sys.argv[1:] if argv is None else argv))
    logs.setup("ovpn", args)
    ip = ip_arg(args.ip) if args.ip is not None else None
    mask = mask_arg(args.mask) if args.mask is not None else None
    if args.ip is not None and ip is None:
        refuse(p, f"Invalid IP address: {args.ip}.")
    if args.mask is not None and mask is None:
        refuse(p, f"Invalid subnet mask: {args.mask}.")
    if extra:
        refuse(p, f"Unknown arguments specified: {' '.join(extra)} ")
    if ip is None or int(ip) == 0:
        refuse(p, "Please specify an IP address.")
    if mask is None:
        refuse(p, "Please specify a subnetmask.")
    try:
        if args.name is not None:
            print(f"Allocating a flow to {args.name}.", flush=True)
            flow = flow_alloc(args.name, qos=args.qos, timeout=args.timeout, encrypt=args.peer is not None)
            if (why := refusal(flow, args.peer)) is not None:  # its packets would reach this host as well
                print(f"Refused the flow {why}.", flush=True)
                flow.close()
                sys.exit(1)
        else:
            print("Waiting for a new flow...", flush=True)
            flow = accept_tunnel(args.timeout, args.peer)
    except FlowError as e:  # C's line on stdout, what went wrong on stderr (ours)
        fail("ovpn", e, f"Failed to {'allocate' if args.name is not None else 'accept'} flow.")
    print("Flow allocated.", flush=True)
    try:
        tun, dev = tun_open(args.dev, ip, mask, flow.mtu)
    except OSError as e:
        flow.close()
        fail("ovpn", e, "Failed to open tunnel device.")
    print(f"Tunnel device name is {dev}.", flush=True)
    tunnel = Tunnel(flow, tun)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda *_: tunnel.ended.set())
    print("Starting read/write threads.", flush=True)
    for target in (tunnel.from_flow, tunnel.to_flow):
        threading.Thread(target=target, daemon=True).start()
    while not tunnel.ended.wait(1.0):
        pass
    print("Shutting down...", flush=True)
    with contextlib.suppress(OSError):
        os.close(tun)
    flow.close()
