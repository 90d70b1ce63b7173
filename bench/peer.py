"""The processes a suite talks to: a flow server, a raw-socket server, and a raw allocation broker.

`python -m bench.peer flow NAME` binds itself to NAME and serves sessions on flows; the raw modes
get their sockets as inherited descriptors (see `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import socket
import subprocess

from bench import session
from bench.packet import PacketLink
from bench.stack import tool
from flowlib import EventQueue, EventType, FlowDown, FlowSet, FlowTimeout, fevent

ALLOC = b"A"
DEALLOC = b"D"
OK = b"K"
IDLE = 10.0  # seconds a raw session may stay silent


def flow_server(name: str) -> None:
    """Bind to `name`, listen, say "ready", then serve each flow's session as its first SDU comes.

    A flow closed before any SDU (the allocation benchmark) is just deallocated.
    """
    subprocess.run([tool("irm"), "bind", "process", str(os.getpid()), "name", name], check=True)
    fset, queue = FlowSet(), EventQueue()
    fset.listen()
    print("ready", flush=True)
    while True:
        fevent(fset, queue)
        for ev in queue:
            if ev.type is EventType.PKT:
                fset.remove(ev.flow)
                # A session whose flow's end never reaches us (a lost word on a lossy layer; or a
                # layer that says nothing, as C's udp4) must not hold up the next one for ever.
                ev.flow.set_timeout(IDLE)
                with contextlib.suppress(FlowDown, FlowTimeout):
                    session.serve(ev.flow.read, ev.flow.write)
                ev.flow.close()
            elif ev.type is not EventType.ALLOC:
                ev.flow.close()


def raw_server(ctrl: socket.socket) -> None:
    """Serve one session on each socket passed over `ctrl` (SCM_RIGHTS), until it closes.

    A packet socket comes with "LOCAL_MAC PEER_MAC" (hex) as its message: it carries frames.
    """
    while True:
        msg, fds, _, _ = socket.recv_fds(ctrl, 64, 1)
        if not fds:
            return
        with socket.socket(fileno=fds[0]) as sock, contextlib.suppress(TimeoutError):
            sock.settimeout(IDLE)  # a session whose end marker was lost must not hold up the next
            if sock.family == socket.AF_PACKET:
                local, peer = (bytes.fromhex(w) for w in msg.decode().split())
                link = PacketLink(sock, local, peer)
                session.serve(link.recv, link.send)
            else:
                session.serve(functools.partial(sock.recv, session.RECV_BUF), sock.send)


def broker(client: socket.socket, listener: socket.socket) -> None:
    """Allocation baseline: per ALLOC, a socketpair; one end to the listener, one to the client."""
    while req := client.recv(16):
        if req != ALLOC:
            client.send(OK)  # DEALLOC: nothing to release, just the round trip
            continue
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours, theirs:
            socket.send_fds(listener, [ALLOC], [theirs.fileno()])
            socket.send_fds(client, [ALLOC], [ours.fileno()])


def listener(sock: socket.socket) -> None:
    """The broker's other side: take each socket it passes and close it."""
    while True:
        _, fds, _, _ = socket.recv_fds(sock, 16, 1)
        if not fds:
            return
        socket.socket(fileno=fds[0]).close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    sub.add_parser("flow", help="serve sessions on flows to NAME").add_argument("name")
    sub.add_parser("raw", help="serve sessions on sockets passed over FD").add_argument("fd", type=int)
    b = sub.add_parser("broker", help="allocation baseline broker")
    b.add_argument("client_fd", type=int)
    b.add_argument("listener_fd", type=int)
    sub.add_parser("listener", help="allocation baseline listener").add_argument("fd", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s[%(process)d] %(levelname)s %(message)s")
    if args.mode == "flow":
        flow_server(args.name)
    elif args.mode == "raw":
        raw_server(socket.socket(fileno=args.fd))
    elif args.mode == "broker":
        broker(socket.socket(fileno=args.client_fd), socket.socket(fileno=args.listener_fd))
    else:
        listener(socket.socket(fileno=args.fd))


if __name__ == "__main__":
    main()
