"""An Inferno-style net/ tree: flows allocated, accepted and used by file I/O alone.

net/clone reserves conversation N (reading it says N); `connect NAME [QOS]` or
`announce NAME [LAYER...]` written to its ctl; N/listen waits for a flow; N/data moves SDUs.
Each client has its own net/, and its agent's IRMd connection allocates, binds and accepts.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from apps.styx.agent import Peer
from apps.styx.server import DEFAULT_LIMITS, Limits
from apps.styx.tree import Handle, StyxError, Synth, SynthDir, SynthFile, WouldBlock, text_file
from flowlib import FLOWFNONBLOCK, Fccntl, Flow, FlowError, FlowWouldBlock, flow_alloc, qos
from flowlib.flow import establish
from flowlib.irm import call
from proto import messages as m
from transports.unix import close_fds

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
NET_PERM = 0o660


class ConvState(enum.Enum):
    IDLE = "idle"
    CONNECTED = "connected"
    ANNOUNCED = "announced"
    CLOSED = "closed"


# What a ctl command does to a conversation; any other (state, command) pair is refused.
TRANSITIONS = {
    (ConvState.IDLE, "connect"): ConvState.CONNECTED,
    (ConvState.IDLE, "announce"): ConvState.ANNOUNCED,
}


@dataclass
class Conv:
    """One conversation: a numbered directory under net/."""

    n: int
    state: ConvState = ConvState.IDLE
    flow: Flow | None = None
    local: str = ""
    remote: str = ""
    rbuf: bytes = b""  # the rest of an SDU longer than the last read asked for
    refs: int = 0
    incoming: bool = False  # made by a listen: a call to accept or reject
    backlog: deque[Flow] = field(default_factory=deque)

    def status(self) -> str:
        # The state is the first word, as netstat(1) on Plan 9 and Inferno takes it; N is the directory.
        extra = f" flow {self.flow.flow_id} layer {self.flow.layer} mtu {self.flow.mtu}" if self.flow else ""
        return f"{self.state.value} local {self.local or '-'} remote {self.remote or '-'}{extra}\n"

    def next_state(self, command: str) -> ConvState:
        nxt = TRANSITIONS.get((self.state, command))
        if nxt is None:
            raise StyxError(f"conversation {self.n} is {self.state.value}: cannot {command}")
        return nxt


class NetFs:
    """One client's conversations."""

    def __init__(self, peer: Peer, reserved: frozenset[str] = frozenset(), limits: Limits = DEFAULT_LIMITS) -> None:
        self.peer = peer
        self.reserved = reserved  # names this server answers as: never announced
        self.limits = limits
        self.lock = threading.Lock()
        self.convs: dict[int, Conv] = {}
        self.announced: dict[str, Conv] = {}
        self._next = 0
        self._listening = False

    # -- conversations -------------------------------------------------------------------------

    def new_conv(self) -> Conv:
        with self.lock:
            if len(self.convs) >= self.limits.fids:
                raise StyxError(f"too many conversations (limit {self.limits.fids})")
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

    def _flows(self) -> int:
        return sum((c.flow is not None) + len(c.backlog) for c in self.convs.values())

    def _room(self) -> None:
        with self.lock:
            if self._flows() >= self.limits.flows:
                raise StyxError(f"too many flows (limit {self.limits.flows})")

    def hangup(self, conv: Conv) -> None:
        with self.lock:
            flows = [*conv.backlog, *([conv.flow] if conv.flow else [])]
            conv.backlog.clear()
            conv.flow = None
            name = conv.local if conv.state is ConvState.ANNOUNCED else ""
            if name and self.announced.get(name) is conv:
                del self.announced[name]
            else:
                name = ""
            conv.state = ConvState.CLOSED
        for f in flows:
            f.close()
        if name:
            with contextlib.suppress(FlowError):
                call(self.peer.irm().channel, m.Bind("process", str(self.peer.agent_pid), name, bind=False), 10)

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
        if verb in ("accept", "reject"):
            return self._answer(conv, verb, args)
        raise StyxError(
            f"unknown ctl command '{verb}': expected connect NAME [QOS] | announce NAME [LAYER...] | hangup"
            " | accept [N] | reject [N] [CAUSE]"
        )

    def _answer(self, conv: Conv, verb: str, args: list[str]) -> str | None:
        """accept(2) and reject(2) write `accept N` and `reject N CAUSE` to the ctl a listen opened.
        A flow is already allocated when listen yields it, so accepting does nothing more and rejecting
        hangs the call up (the cause goes to the log only: the IRMd carries none to the caller)."""
        if args and args[0] != str(conv.n):
            raise StyxError(f"{verb} {args[0]}: this is conversation {conv.n}")
        if not conv.incoming or conv.state is not ConvState.CONNECTED:
            raise StyxError(f"conversation {conv.n} is {conv.state.value}: no incoming call to {verb}")
        if verb == "reject":
            # The cause is the client's text, up to a message long: the log keeps its start only.
            log.info("net: conversation %d rejected: %.80s", conv.n, " ".join(args[1:]) or "no cause")
            self.hangup(conv)
        return None

    def _connect(self, conv: Conv, args: list[str]) -> str | None:
        if len(args) not in (1, 2):
            raise StyxError("usage: connect NAME [raw|best|voice|video|data]")
        nxt = conv.next_state("connect")
        self.peer.require_acts("connect")
        try:
            spec = qos.by_name(args[1]) if len(args) == 2 else qos.data
        except ValueError as e:
            raise StyxError(str(e)) from None
        self._room()
        try:
            flow = flow_alloc(args[0], qos=spec, timeout=CONNECT_TIMEOUT, irm=self.peer.irm())
        except FlowError as e:
            raise StyxError(f"connect {args[0]}: {e}") from None
        with self.lock:
            conv.flow, conv.state, conv.remote, conv.local = flow, nxt, args[0], flow.layer
        return None

    def _announce(self, conv: Conv, args: list[str]) -> str | None:
        if not args:
            raise StyxError("usage: announce NAME [LAYER...]")
        name, layers = args[0], args[1:]
        if name in self.reserved:
            raise StyxError(f"'{name}' is this server's own name")
        nxt = conv.next_state("announce")
        self.peer.require_acts("announce")
        with self.lock:
            if name in self.announced:
                raise StyxError(f"'{name}' is already announced")
            self.announced[name] = conv
            conv.state, conv.local = nxt, name
        try:
            irm = self.peer.irm()
            # The agent's process is what the IRMd binds, as the client's own: its flows come to us.
            call(irm.channel, m.Bind("process", str(self.peer.agent_pid), name), 10)
            if layers:
                try:
                    irm.register(name, layers)
                except FlowError as e:
                    if "exist" not in str(e).lower():
                        raise
            if not self._listening:
                irm.listen(True)
                self._listening = True
        except FlowError as e:
            with self.lock:
                del self.announced[name]
                conv.state, conv.local = ConvState.IDLE, ""
            raise StyxError(f"announce {name}: {e}") from None
        return None

    def _arrivals(self) -> None:
        """File the flows the IRMd pushed to the agent's connection under their announced names."""
        irm = self.peer.irm()
        try:
            arrived = irm.take_arrived()
        except FlowError as e:
            raise StyxError(f"listen: {e}") from None
        for reply, fd in arrived:
            with self.lock:
                conv = self.announced.get(reply.name)
                room = self._flows() < self.limits.flows
            if conv is None or not room:
                log.info(
                    "net: refusing flow %d for %s: %s",
                    reply.flow_id,
                    reply.name,
                    "not announced" if conv is None else "too many flows",
                )
                close_fds([fd])
                irm.dealloc(reply.flow_id)
                continue
            try:
                flow = establish(reply, fd, irm, client=False)
            except FlowError as e:
                log.info("net: flow %d for %s failed: %s", reply.flow_id, reply.name, e)
                continue
            with self.lock:
                conv.backlog.append(flow)

    def accept(self, conv: Conv) -> Conv:
        """A flow that arrived for the announced name, as a new conversation; WouldBlock if none yet."""
        if conv.state is not ConvState.ANNOUNCED:
            # Its state, as for a refused ctl command: a listen its announcement's hangup ended says closed.
            raise StyxError(f"conversation {conv.n} is {conv.state.value}: cannot listen")
        self._arrivals()
        with self.lock:
            if not conv.backlog:
                raise WouldBlock(self.peer.irm().wakeup_fd)
            flow = conv.backlog.popleft()
            new = Conv(self._next, ConvState.CONNECTED, flow, conv.local, f"flow {flow.flow_id}", refs=1, incoming=True)
            self.convs[new.n] = new
            self._next += 1
            return new

    # -- the tree ------------------------------------------------------------------------------------

    def mount(self, parent: SynthDir) -> SynthDir:
        net = SynthDir("net", parent, self._conv_dirs, owner=self.peer.user.name)
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

    def write(self, offset: int, data: bytes | memoryview) -> int:
        try:
            command = str(data, "utf-8").strip()
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
        # Parked writes' progress, by the identity of their data (the parked request holds it, so
        # the identity is not reused while the entry stands): data -> bytes sent so far.
        self._sending: dict[int, tuple[bytes | memoryview, int]] = {}

    def _flow(self) -> Flow:
        flow = self.conv.flow
        if flow is None:
            raise StyxError(f"conversation {self.conv.n} is not connected")
        return flow

    def _nonblocking_flow(self) -> Flow:
        """The conversation's flow, its reads and writes made non-blocking: the data file never waits
        on the connection's thread, where a peer that sends or reads nothing would hold it for ever,
        past a Tflush and past the client's leaving. What must wait is parked (WouldBlock)."""
        flow = self._flow()
        flags = flow.fccntl(Fccntl.GFLAGS)
        if flags & FLOWFNONBLOCK != FLOWFNONBLOCK:
            flow.fccntl(Fccntl.SFLAGS, flags | FLOWFNONBLOCK)
        return flow

    def read(self, offset: int, count: int) -> bytes:
        """(Part of) the next SDU, or WouldBlock until one comes: a flow readable for a record that
        carries none (a keepalive) is no SDU yet."""
        conv = self.conv
        if not conv.rbuf:
            if conv.state is ConvState.CLOSED:
                return b""
            flow = self._nonblocking_flow()
            try:
                conv.rbuf = flow.read()
            except FlowWouldBlock:
                raise WouldBlock(flow) from None
            except FlowError:
                return b""  # the peer hung up: end of file
        out, conv.rbuf = conv.rbuf[:count], conv.rbuf[count:]
        return out

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """All of `data`, as SDUs of at most the flow's MTU; WouldBlock while the flow's window takes
        no more, the write resumed where it stopped when retried. Never a short write: Plan 9's
        mount driver returns one to the program, and its programs take that for a failed write."""
        kept, sent = self._sending.pop(id(data), (data, 0))  # first: a write that fails keeps nothing
        sent = sent if kept is data else 0
        flow = self._nonblocking_flow()
        try:
            for i in range(sent, len(data), flow.mtu):
                sent += flow.write(data[i : i + flow.mtu])
        except FlowWouldBlock:
            self._sending[id(data)] = (data, sent)
            raise WouldBlock() from None  # retried on the server's timer; a Tflush ends the wait
        except FlowError as e:
            raise StyxError(f"write: {e}") from None
        return sent

    def abandoned(self, data: bytes | memoryview) -> None:
        self._sending.pop(id(data), None)

    def close(self) -> None:
        self.net.release(self.conv)
