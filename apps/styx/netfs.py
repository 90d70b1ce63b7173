"""An Inferno-style net/ tree: flows allocated, accepted and used by file I/O alone.

net/clone reserves conversation N (reading it says N); `connect NAME [QOS]` or
`announce NAME [LAYER...]` written to its ctl; N/listen waits for a flow; N/data moves SDUs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque
from dataclasses import dataclass, field

from apps.styx.tree import Handle, StyxError, Synth, SynthDir, SynthFile, WouldBlock, text_file
from flowlib import Flow, FlowError, flow_alloc, qos
from flowlib.irm import call, default_client
from proto import messages as m

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
NET_PERM = 0o660
MAX_BACKLOG = 64  # flows waiting for a listen, per announced name


@dataclass
class Conv:
    """One conversation: a numbered directory under net/."""

    n: int
    state: str = "idle"  # idle | connected | announced | closed
    flow: Flow | None = None
    local: str = ""
    remote: str = ""
    rbuf: bytes = b""  # the rest of an SDU longer than the last read asked for
    refs: int = 0
    backlog: deque[Flow] = field(default_factory=deque)

    def status(self) -> str:
        extra = f" flow {self.flow.flow_id} layer {self.flow.layer} mtu {self.flow.mtu}" if self.flow else ""
        return f"{self.n} {self.state} local {self.local or '-'} remote {self.remote or '-'}{extra}\n"


class NetFs:
    """The conversations, shared by every client of the server."""

    def __init__(self, reserved: frozenset[str] = frozenset()) -> None:
        self.reserved = reserved  # names this server answers as: never handed to a listen
        self.lock = threading.Lock()
        self.convs: dict[int, Conv] = {}
        self.announced: dict[str, Conv] = {}
        self._next = 0

    # -- the serving loop's hook -------------------------------------------------------------

    def route(self, flow: Flow) -> bool:
        """Claim a flow arriving for an announced name (True), else leave it to the 9P server."""
        with self.lock:
            conv = self.announced.get(flow.name)
            if conv is None:
                return False
            if len(conv.backlog) >= MAX_BACKLOG:
                log.warning("net: backlog of %s full, refusing flow %s", flow.name, flow.flow_id)
                flow.close()
                return True
            conv.backlog.append(flow)
            return True

    # -- conversations -------------------------------------------------------------------------

    def new_conv(self) -> Conv:
        with self.lock:
            conv = Conv(self._next, refs=1)
            self.convs[conv.n] = conv
            self._next += 1
            return conv

    def conv(self, n: int) -> Conv:
        with self.lock:
            conv = self.convs.get(n)
        if conv is None:
            raise StyxError(f"conversation {n} is gone")
        return conv

    def hold(self, conv: Conv) -> None:
        with self.lock:
            conv.refs += 1

    def release(self, conv: Conv) -> None:
        """An open file of the conversation closed; the last one hangs it up."""
        with self.lock:
            conv.refs -= 1
            if conv.refs > 0:
                return
            self.convs.pop(conv.n, None)
        self.hangup(conv)

    def hangup(self, conv: Conv) -> None:
        with self.lock:
            flows = [*conv.backlog, *([conv.flow] if conv.flow else [])]
            conv.backlog.clear()
            conv.flow = None
            name = conv.local if conv.state == "announced" else ""
            if name and self.announced.get(name) is conv:
                del self.announced[name]
            else:
                name = ""
            conv.state = "closed"
        for f in flows:
            f.close()
        if name:
            with contextlib.suppress(FlowError):
                irm = default_client()
                call(irm.channel, m.Bind("process", str(os.getpid()), name, bind=False), 10)

    def ctl(self, conv: Conv, command: str) -> str | None:
        words = command.split()
        if not words:
            raise StyxError("empty command")
        verb, args = words[0], words[1:]
        if verb == "connect":
            return self._connect(conv, args)
        if verb == "announce":
            return self._announce(conv, args)
        if verb == "hangup":
            self.hangup(conv)
            return None
        raise StyxError(f"unknown ctl command '{verb}': expected connect NAME [QOS] | announce NAME [LAYER...] | "
                        "hangup")

    def _connect(self, conv: Conv, args: list[str]) -> str | None:
        if len(args) not in (1, 2):
            raise StyxError("usage: connect NAME [raw|best|voice|video|data]")
        if conv.state != "idle":
            raise StyxError(f"conversation {conv.n} is {conv.state}")
        try:
            spec = qos.by_name(args[1]) if len(args) == 2 else qos.data
        except ValueError as e:
            raise StyxError(str(e)) from None
        try:
            flow = flow_alloc(args[0], qos=spec, timeout=CONNECT_TIMEOUT)
        except FlowError as e:
            raise StyxError(f"connect {args[0]}: {e}") from None
        with self.lock:
            conv.flow, conv.state, conv.remote, conv.local = flow, "connected", args[0], flow.layer
        return None

    def _announce(self, conv: Conv, args: list[str]) -> str | None:
        if not args:
            raise StyxError("usage: announce NAME [LAYER...]")
        name, layers = args[0], args[1:]
        if name in self.reserved:
            raise StyxError(f"'{name}' is this server's own name")
        if conv.state != "idle":
            raise StyxError(f"conversation {conv.n} is {conv.state}")
        with self.lock:
            if name in self.announced:
                raise StyxError(f"'{name}' is already announced")
            self.announced[name] = conv
            conv.state, conv.local = "announced", name
        try:
            irm = default_client()
            irm.bind(name)
            if layers:
                try:
                    irm.register(name, layers)
                except FlowError as e:
                    if "exist" not in str(e).lower():
                        raise
        except FlowError as e:
            with self.lock:
                del self.announced[name]
                conv.state, conv.local = "idle", ""
            raise StyxError(f"announce {name}: {e}") from None
        return None

    def accept(self, conv: Conv) -> Conv:
        """A flow that arrived for the announced name, as a new conversation; WouldBlock if none yet."""
        with self.lock:
            if conv.state != "announced":
                raise StyxError(f"conversation {conv.n} is not announced")
            if not conv.backlog:
                raise WouldBlock()
            flow = conv.backlog.popleft()
            new = Conv(self._next, "connected", flow, conv.local, f"flow {flow.flow_id}", refs=1)
            self.convs[new.n] = new
            self._next += 1
            return new

    # -- the tree ------------------------------------------------------------------------------------

    def mount(self, parent: SynthDir) -> SynthDir:
        net = SynthDir("net", parent, self._conv_dirs)
        net.add(SynthFile("clone", net, lambda _mode, _user: CtlHandle(self, self.new_conv()), NET_PERM))
        return net

    def _conv_dirs(self, parent: SynthDir) -> list[Synth]:
        with self.lock:
            convs = sorted(self.convs)
        return [self._conv_dir(parent, n) for n in convs]

    def _conv_dir(self, parent: SynthDir, n: int) -> SynthDir:
        d = SynthDir(str(n), parent)

        def opener(kind: str) -> SynthFile:
            def do_open(_mode: int, _user: str) -> Handle:
                conv = self.conv(n)
                if kind == "listen":
                    return CtlHandle(self, self.accept(conv))
                self.hold(conv)
                return CtlHandle(self, conv) if kind == "ctl" else DataHandle(self, conv)

            return SynthFile(kind, d, do_open, NET_PERM)

        for kind in ("ctl", "data", "listen"):
            d.add(opener(kind))
        d.add(text_file("local", d, lambda: self.conv(n).local + "\n"))
        d.add(text_file("remote", d, lambda: self.conv(n).remote + "\n"))
        d.add(text_file("status", d, lambda: self.conv(n).status()))
        return d


class CtlHandle(Handle):
    """An open ctl (or clone, or listen) file: reads say N, writes are commands."""

    def __init__(self, net: NetFs, conv: Conv) -> None:
        self.net = net
        self.conv = conv

    def read(self, offset: int, count: int) -> bytes:
        return str(self.conv.n).encode()[offset : offset + count]

    def write(self, offset: int, data: bytes) -> int:
        try:
            command = data.decode().strip()
        except UnicodeDecodeError:
            raise StyxError("ctl commands are UTF-8 text") from None
        self.net.ctl(self.conv, command)
        return len(data)

    def close(self) -> None:
        self.net.release(self.conv)


class DataHandle(Handle):
    """An open data file: each read returns (part of) one SDU, each write sends SDUs."""

    def __init__(self, net: NetFs, conv: Conv) -> None:
        self.net = net
        self.conv = conv

    def _flow(self) -> Flow:
        flow = self.conv.flow
        if flow is None:
            raise StyxError(f"conversation {self.conv.n} is not connected")
        return flow

    def read(self, offset: int, count: int) -> bytes:
        conv = self.conv
        if not conv.rbuf:
            if conv.state == "closed":
                return b""
            flow = self._flow()
            ready, _, _ = select.select([flow], [], [], 0)  # an SDU, or the end of the flow
            if not ready:
                raise WouldBlock(flow)
            try:
                conv.rbuf = flow.read()
            except FlowError:
                return b""  # the peer hung up: end of file
        out, conv.rbuf = conv.rbuf[:count], conv.rbuf[count:]
        return out

    def write(self, offset: int, data: bytes) -> int:
        flow = self._flow()
        try:
            for i in range(0, len(data), flow.mtu):
                flow.write(data[i : i + flow.mtu])
        except FlowError as e:
            raise StyxError(f"write: {e}") from None
        return len(data)

    def close(self) -> None:
        self.net.release(self.conv)
