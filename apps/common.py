"""What the small tools (oping, operf, oecho, ocbr) share: option parsing and the server loop.

The server loop is the event API's canonical use: one thread, one FlowSet that
listens for new flows, idle flows reaped.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import re
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, ParamSpec

from flowlib import (
    FLOWFDEFAULT,
    FLOWFWNOBLOCK,
    FLOWGTXQLEN,
    FLOWSFLAGS,
    Event,
    EventQueue,
    EventType,
    Flow,
    FlowError,
    FlowSet,
    FlowWouldBlock,
    IrmdUnreachable,
    fevent,
    flow_alloc,
    qos,
)
from flowlib.qos import QosSpec
from proto.errors import Code
from proto.messages import DIRECT
from proto.service import nofile_to_hard, notify_ready
from proto.visible import visible

PER_CLIENT = 64  # flows one local user (or one verified remote peer) holds at a server at once
NOFILE_CEILING = 1 << 16  # descriptors a tool's server takes at most, whatever the hard limit
FD_RESERVE = 64  # a server's descriptors users' flows leave to its admins' flows and to itself
ANONYMOUS = "anonymous peers"  # remote peers that prove no name: counted per host, and all of them together
BACKLOG_RETRY = 0.002  # seconds between tries of replies kept for a slow reader
HANDOVER = 2.0  # seconds a server waits for a reply to leave before it closes a flow it let go
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
RATES = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def duration(text: str, default_unit: str = "ms") -> float:
    """'10' (in default_unit), '10ms', '2s', '1m' -> seconds (C's tools take ms without a unit)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text.strip())
    if match is None:
        raise ValueError(f"bad duration {text!r}: expected a number with an optional unit ms|s|m|h|d")
    return float(match.group(1)) * _UNITS[match.group(2) or default_unit]


def c_duration(text: str) -> float:
    """A time option of C's tools (`duration` in ms): whole ms, as C's keep theirs. One that comes to
    a fraction of a ms is refused, as C's refuses every fraction (`-i 0.5`: `Unknown time unit: .5.`),
    not rounded (`-i 0.5` would be 0, back to back); a fraction of a larger unit is ours (`0.5s`)."""
    seconds = duration(text)
    if abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
        raise ValueError(f"bad duration {text!r}: not a whole number of ms")
    return seconds


def ms(seconds: float) -> int:
    """A duration in whole ms, as C's tools keep theirs (a fraction of ours is rounded)."""
    return round(seconds * 1000)


def c_units(parse: Callable[[str], float], what: str) -> Callable[[str], float]:
    """`parse` for an option of C's tools: a unit it does not know ends the program with status 1,
    in C's words ("Unknown time unit: x.")."""

    def check(text: str) -> float:
        try:
            return parse(text)
        except ValueError:
            number = re.match(r"\d*", text.strip())  # what C's strtol reads: the unit is what follows
            print(f"Unknown {what} unit: {text.strip()[number.end() if number else 0 :]}.")
            sys.exit(1)

    return check


def c_long(text: str) -> int:
    """A whole number as C's tools read theirs (strtol): its leading digits, what follows ignored
    (`-d 10s` to ocbr is 10, `-s 100B` is 100), none at all 0."""
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match.group(1)) if match else 0


def c_decimal(text: str) -> float:
    """As c_long, a fraction allowed (ours: `ocbr -d 1.5` is 1.5 s where C's reads 1)."""
    match = re.match(r"\s*([+-]?\d+(?:\.\d+)?)", text)
    return float(match.group(1)) if match else 0.0


class CParser(argparse.ArgumentParser):
    """A tool's command line, as C's: options matched whole (unless `allow_abbrev`: getopt_long's tools
    take a prefix of a long option); on one it does not take, its usage on stdout and `usage_status`
    (oping's and ovpn's 1, operf's, ocbr's, oecho's and obc's 0); what was wrong goes to stderr (ours).
    -h and --help print the usage too, laid out as C's, and end with `help_status` (C's oping takes no
    --help of its own: it prints its usage for it as for any word it does not know, and exits 1)."""

    def __init__(
        self, *args: Any, usage_status: int, help_status: int | None = None, usage_on_error: bool = True, **kw: Any
    ) -> None:
        kw.setdefault("allow_abbrev", False)  # C's strcmp: options whole
        kw["add_help"] = False  # ours, below: C's layout and status
        super().__init__(*args, **kw)
        self.usage_status = usage_status
        self.usage_on_error = usage_on_error  # False: getopt's way, only what was wrong, on stderr
        self.help_status = usage_status if help_status is None else help_status
        self.add_argument("-h", "--help", action=_Help, help="display this help text and exit")

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        if not self.usage_on_error:
            sys.exit(self.usage_status)
        self.exit_with_usage(self.usage_status)

    def exit_with_usage(self, status: int) -> NoReturn:
        print(self.format_help(), end="", flush=True)
        sys.exit(status)

    def format_help(self) -> str:
        """C's layout: "Usage: TOOL [OPTION]...", what it does, then an option a line, its short and long
        forms in a column (a long one alone indented as if a short one came first), --help last."""
        actions = [a for a in self._actions if a.option_strings and a.help != argparse.SUPPRESS]
        actions.sort(key=lambda a: isinstance(a, _Help))
        heads = [
            ", ".join(a.option_strings) if a.option_strings[0][1] != "-" else "    " + ", ".join(a.option_strings)
            for a in actions
        ]
        column = 24  # C's oping's: a head that does not fit leaves its text to the lines below
        lines = [f"Usage: {self.prog} [OPTION]...", *textwrap.wrap(self.description or "", 79), ""]
        for head, a in zip(heads, actions, strict=True):
            text = textwrap.wrap(a.help % {"prog": self.prog} if a.help else "", 79 - 2 - column)
            if len(head) >= column:
                lines.append(f"  {head}")
            else:
                lines.append(f"  {head:<{column}}{text.pop(0) if text else ''}".rstrip())
            lines += [" " * (2 + column) + more for more in text]
        return "\n".join(lines) + "\n"


class _Help(argparse.Action):
    """-h, --help: C's usage, on stdout, and the tool's status for it."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        assert isinstance(parser, CParser)
        parser.exit_with_usage(parser.help_status)


P = ParamSpec("P")


def ends_quietly(main: Callable[P, None]) -> Callable[P, None]:
    """A tool's main that ends as C's do, saying nothing, where it would end in a traceback: when the
    reader of its stdout goes away (`oping -n x | head -3`) it exits 1, as C's die of SIGPIPE; on a
    SIGINT it does not take itself (an oecho client waiting), it dies of it, as C's without a handler."""

    @functools.wraps(main)
    def run(*args: P.args, **kw: P.kwargs) -> None:
        try:
            try:
                main(*args, **kw)
            finally:
                sys.stdout.flush()  # what is still buffered fails here, not in the interpreter's exit
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is quiet too
            sys.exit(1)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    return run


def rate(text: str, default_unit: str = "") -> float:
    """'100' (in default_unit), '10k', '2M', '1G' -> bits/s, as C's operf and ocbr read -r."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kMG]?)", text.strip())
    if match is None:
        raise ValueError(f"bad rate {text!r}: expected a number of bits/s with an optional unit k|M|G")
    value = float(match.group(1)) * RATES[match.group(2) or default_unit]
    if value <= 0:
        raise ValueError(f"bad rate {text!r}: expected more than 0 bits/s")
    return value


class Pacer:
    """A constant bit rate, as C's operf and ocbr keep it: each SDU is due a gap after the last, the gap
    slept (`sleep`) or waited out spinning; ours sleeps all but its last SPIN seconds even then. A wait
    ends early once `stopped()` (a Ctrl-C), as C's sleep does: a slow rate's gap may be seconds long."""

    SPIN = 0.0002
    SLICE = 0.1  # seconds slept at most before `stopped` is asked again

    def __init__(self, bits_per_s: float, size: int, sleep: bool, stopped: Callable[[], bool] = lambda: False) -> None:
        self.gap = size * 8 / bits_per_s
        self.sleep = sleep
        self.stopped = stopped
        self.start = time.monotonic()

    def wait(self, sent: int) -> None:
        """Until the SDU after `sent` of them is due."""
        due = self.start + sent * self.gap
        spun = 0.0 if self.sleep else self.SPIN
        while not self.stopped() and (left := due - time.monotonic() - spun) > 0:
            time.sleep(min(left, self.SLICE))
        if not self.sleep:
            while time.monotonic() < due and not self.stopped():
                pass


def qos_arg(text: str) -> QosSpec:
    try:
        return qos.by_name(text)
    except ValueError as e:
        raise SystemExit(f"{sys.argv[0]}: {e}") from None


def fail(tool: str, err: Exception, line: str = "", status: int = 1) -> NoReturn:
    """End a tool: C's `line` on stdout first, if it has one (for scripts that look for it), then what
    went wrong on stderr (ours), and C's status."""
    if line:
        print(line, flush=True)
    print(f"{tool}: {err}", file=sys.stderr)
    sys.exit(status)


# What C's clients print on stdout when flow_alloc fails (oping with the negative errno it got), and
# their exit status: ocbr and oecho return -1 from main.
ALLOC_FAILED = {
    "oping": ("Failed to allocate flow: {errno}.", 1),
    "operf": ("Failed to allocate flow.", 1),
    "ocbr": ("Failed to allocate flow.", 255),
    "oecho": ("Failed to allocate flow.", 255),
}
# The errno a C client gets from flow_alloc for each of our refusals (0.23's ENAME 1007, EIPCP 1003, ...).
C_ERRNO = {Code.ENOENT: -1007, Code.ETIMEDOUT: -110, Code.EPERM: -1, Code.ECRYPT: -1008, Code.EAUTH: -1009}
EIPCP = -1003  # what 0.23's irmd answers for any other failure of the IPCP or the peer


def alloc_failed(tool: str, err: FlowError) -> NoReturn:
    """A client's flow_alloc failed: C's line on stdout, for scripts that look for it, what went
    wrong on stderr (ours), and C's status. No IRMd is said as every tool says it: C's fail to start."""
    if isinstance(err, IrmdUnreachable) or tool not in ALLOC_FAILED:
        fail(tool, err)
    line, status = ALLOC_FAILED[tool]
    fail(tool, err, line.format(errno=C_ERRNO.get(err.code, EIPCP) if err.code else EIPCP), status)


def alloc(tool: str, args: argparse.Namespace, timeout: float | None) -> Flow:
    """The client's flow to args.name (args.qos, args.encrypt); args.size cut to its MTU, as C's tools say."""
    try:
        flow = flow_alloc(args.name, qos=args.qos, timeout=timeout, encrypt=args.encrypt)
    except FlowError as e:
        alloc_failed(tool, e)
    if args.size > flow.mtu:
        print(f"Packet size truncated to {flow.mtu} bytes.")
        args.size = flow.mtu
    return flow


def on_signals(stop: Callable[[], None]) -> None:
    """What C's clients stop on: SIGINT, SIGTERM, SIGHUP."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop())


def client_of(flow: Flow) -> str | None:
    """Whom a flow is counted against: a local user by the uid the kernel told the IRMd, a remote peer by
    its verified name, or else by the host its layer vouches for (Flow.peer_addr); None for the
    server's admins (root, its own uid), never refused."""
    if flow.peer_uid is not None:
        return None if flow.peer_uid in (0, os.geteuid()) else f"uid {flow.peer_uid}"
    if flow.peer is not None:
        return f"peer {visible(flow.peer.name)}"  # a certificate's name: shown as text, whatever it holds
    if addr := flow.peer_addr():
        return f"host {visible(addr)} of layer {visible(flow.layer)}"
    return f"{ANONYMOUS} of layer {visible(flow.layer)}"  # a layer that names no host: one client of it


def proves_nothing(flow: Flow) -> bool:
    """A remote peer proving no name: a host at most, as its layer says."""
    return flow.peer_uid is None and flow.peer is None


class FlowQuota:
    """The flows each client of a server holds (`client_of`): at most `per_client` each, and `total` for
    all clients but the admins together, so that one user's flows leave room for the others and root's.
    Remote peers proving no name are counted per host, and hold at most half of `total` together, so
    that many hosts leave the host's own users and the verified peers the other half."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = max(total, 1)
        self.anonymous_room = max(self.total // 2, 1)
        # A host proving no name holds at most half of that room (a client's share at least): another host
        # still gets in. Its flows outlive its own deallocations when the shim's rate drops their notices
        # (until the peer is found silent), so a client's share alone locked out a host allocating briskly.
        self.per_host = max(per_client, self.anonymous_room // 2)
        self.held: dict[Flow, str] = {}
        self.counts: dict[str, int] = {}
        self.anonymous: set[Flow] = set()  # of `held`, the flows of peers proving no name
        self.said: set[str] = set()  # refusals told (once, until whoever was refused holds fewer again)

    def take(self, flow: Flow) -> bool:
        """Count a new flow in, or say why it is refused (once per stretch of refusals) and return False."""
        who = client_of(flow)
        if who is None:
            return True
        held, nameless = self.counts.get(who, 0), proves_nothing(flow)
        why = ""
        if held >= (self.per_host if nameless else self.per_client) or len(self.held) >= self.total:
            why = f"{who} holds {held} flows, its limit here."
        elif nameless and len(self.anonymous) >= self.anonymous_room:
            who = ANONYMOUS  # what is refused: all of them, for now
            why = f"{ANONYMOUS} hold {len(self.anonymous)} flows, half of what clients hold here."
        if why:
            if who not in self.said:
                self.said.add(who)
                print(f"Flow {flow.flow_id} refused: {why}", flush=True)
            return False
        self.held[flow] = who
        self.counts[who] = held + 1
        if nameless:
            self.anonymous.add(flow)
        return True

    def give(self, flow: Flow) -> None:
        who = self.held.pop(flow, None)
        if who is None:
            return
        self.counts[who] -= 1
        self.said.discard(who)
        if flow in self.anonymous:
            self.anonymous.discard(flow)
            self.said.discard(ANONYMOUS)
        if not self.counts[who]:
            del self.counts[who]


def serve(
    tool: str,
    on_sdu: Callable[[Flow, bytes], bytes | None],
    idle_timeout: float,
    poll: bool = False,
    banner: str = "",
    on_end: Callable[[Flow], None] | None = None,
    on_tick: Callable[[float], None] | None = None,
    max_flows: int = 0,
    greeting: str = "",
    new_flow: str = "New flow {}.",
    ends: str = "said",
) -> None:
    """Accept flows and answer each SDU with on_sdu's reply, until SIGINT/SIGTERM. `tool` is the
    program's name ("oping"): its errors say it, its banner the server's kind, as C's ("ping"),
    unless `greeting` gives the whole line (oecho's); `new_flow` is the line for a flow (its id in {}).

    `poll` spins on fevent without sleeping (C's `--poll`: lower latency, a core busy);
    `on_end` hears of each flow as it goes, before it is closed; `on_tick` of the time, every
    0.1 s at least; with `max_flows`, no more flows are taken while that many are open.
    `ends` says how a flow ends: "said" ("Flow N deallocated." when its peer lets go), "silent"
    (as C's oping server: nothing then, and "Flow N timed out." once it has been idle for
    `idle_timeout`), or "after_reply" (as C's oecho server: one SDU answered, then the flow closed).
    """
    server = Server(tool, on_sdu, idle_timeout, on_end, on_tick, max_flows, new_flow, ends)
    server.run(poll, greeting or f"Ouroboros {tool.removeprefix('o')} server started.{banner}")


class Server:
    """One thread, one FlowSet that listens for new flows; idle flows reaped."""

    def __init__(
        self,
        tool: str,
        on_sdu: Callable[[Flow, bytes], bytes | None],
        idle_timeout: float,
        on_end: Callable[[Flow], None] | None = None,
        on_tick: Callable[[float], None] | None = None,
        max_flows: int = 0,
        new_flow: str = "New flow {}.",
        ends: str = "said",
    ) -> None:
        self.tool = tool
        self.ends = ends
        self.on_sdu = on_sdu
        self.on_end = on_end
        self.on_tick = on_tick
        self.max_flows = max_flows
        self.listening = False
        self.idle_timeout = idle_timeout
        self.fset = FlowSet()
        self.last_seen: dict[Flow, float] = {}
        self.closing: dict[Flow, float] = {}  # flows answered and let go (oecho's): closed when their reply left
        # Flows whose peer reads its replies slower than it sends: their replies wait here, and their
        # SDUs are not read (the flow is out of the set) until the replies have left
        self.backlog: dict[Flow, collections.deque[bytes]] = {}
        self.stop = False
        self.new_flow = new_flow  # the line for a new flow, its id in {}
        self.quota = FlowQuota(PER_CLIENT, nofile_to_hard(NOFILE_CEILING) - FD_RESERVE)

    def run(self, poll: bool, banner: str) -> None:
        on_signals(lambda: setattr(self, "stop", True))  # as C's servers: SIGHUP too ends it, status 0
        fq = EventQueue()
        try:
            self._listen(True)
        except FlowError as e:
            fail(self.tool, e)
        print(banner, flush=True)
        notify_ready()
        wait = 0.0 if poll else 0.1

        def waited() -> float:  # a backlog is tried again soon: its peer reads, only slower
            return min(wait, BACKLOG_RETRY) if self.backlog else wait

        for now in rounds(self.tool, self.fset, fq, waited, lambda: self.stop):
            for ev in fq:
                self._handle(ev, now)
            self._flush(now)
            for flow, deadline in list(self.closing.items()):
                if now > deadline or (flow not in self.backlog and not self._queued(flow)):
                    self.backlog.pop(flow, None)
                    del self.closing[flow]
                    self.quota.give(flow)
                    flow.close()
            for flow, seen in list(self.last_seen.items()):
                if now - seen > self.idle_timeout:
                    print(f"Flow {flow.flow_id} timed out.", flush=True)
                    self._drop(flow)
            if self.on_tick is not None:
                self.on_tick(now)
            if self.max_flows:
                with contextlib.suppress(FlowError):
                    self._listen(len(self.last_seen) < self.max_flows)
        for flow in list(self.last_seen):
            self._drop(flow)
        for flow in self.closing:
            flow.close()
        with contextlib.suppress(FlowError):
            self.fset.close()

    def _listen(self, enabled: bool) -> None:
        self.listening = switch_listening(self.fset, self.listening, enabled)

    def _handle(self, ev: Event, now: float) -> None:
        flow = ev.flow
        if ev.type is EventType.ALLOC:
            if not self.quota.take(flow):
                self.fset.remove(flow)
                flow.close()
                return
            print(self.new_flow.format(flow.flow_id), flush=True)
            self.last_seen[flow] = now
            # One thread serves every flow: a reply never waits for its peer to read (a client that
            # sends and never reads would hold the server, and every other client, for good).
            with contextlib.suppress(FlowError):
                flow.fccntl(FLOWSFLAGS, FLOWFDEFAULT | FLOWFWNOBLOCK)
        elif ev.type is EventType.PKT:
            self.last_seen[flow] = now
            try:
                reply = self.on_sdu(flow, flow.read())
                if reply is not None:
                    self._reply(flow, reply)
            except FlowError:
                self._drop(flow)
                return
            if self.ends == "after_reply":  # closed once the reply has left, waited for in the loop
                self._drop(flow, close=False)
                self.closing[flow] = now + HANDOVER
        elif ev.type is EventType.UP or flow in self.fset:  # FLOWFDOWN set or cleared: the flow stays
            print(f"Flow {flow.flow_id} {(ev.type.name or '').lower()}.", flush=True)
        elif self.ends == "silent":
            # Its events have left the set. As 0.23's server, the flow stays (`irm flow list`: dealloc)
            # until the idle reaper says it timed out and closes it, its place in the quota with it:
            # held at most idle_timeout, each counted meanwhile, so no client piles them up.
            pass
        else:
            how = {EventType.DEALLOC: "deallocated", EventType.PEER: "lost its peer (FLOW_PEER)"}.get(ev.type, "down")
            print(f"Flow {flow.flow_id} {how}.", flush=True)
            self._drop(flow)

    def _reply(self, flow: Flow, reply: bytes) -> None:
        """Send a reply; if its peer has not read the ones before, keep it and read no more of the
        flow until it has left. The peer's sends then wait, as with 0.23's server blocking in its
        write, but no other client waits with them (one thread serves every flow)."""
        held = self.backlog.get(flow)
        if held is not None:
            held.append(reply)
            return
        try:
            flow.write(reply)
        except FlowWouldBlock:
            self.backlog[flow] = collections.deque([reply])
            self.fset.remove(flow)

    def _flush(self, now: float) -> None:
        """Replies kept for flows whose peers read slowly, sent as far as they go now; a flow whose
        replies have all left is read again. One that takes none for idle_timeout times out."""
        for flow, held in list(self.backlog.items()):
            try:
                while held:
                    flow.write(held[0])
                    held.popleft()
                    if flow in self.last_seen:
                        self.last_seen[flow] = now
            except FlowWouldBlock:
                continue
            except FlowError:
                self._drop(flow)
                continue
            del self.backlog[flow]
            if flow in self.last_seen:
                self.fset.add(flow)

    @staticmethod
    def _queued(flow: Flow) -> bool:
        try:
            return bool(flow.fccntl(FLOWGTXQLEN))
        except FlowError:
            return False

    def _drop(self, flow: Flow, close: bool = True) -> None:
        self.fset.remove(flow)
        if close:
            self.backlog.pop(flow, None)
        if self.last_seen.pop(flow, None) is not None and self.on_end is not None:
            self.on_end(flow)
        if close:  # else its quota is given back as it is closed, its reply gone
            self.quota.give(flow)
            flow.close()


def handed_over(flow: Flow, within: float = 2.0) -> None:
    """Until the layer has taken what was written to `flow` (at most `within` s): a flow closed at once
    may take its last SDU with it."""
    deadline = time.monotonic() + within
    while flow.fccntl(FLOWGTXQLEN) and time.monotonic() < deadline:
        time.sleep(0.005)


def rounds(
    tool: str, fset: FlowSet, fq: EventQueue, wait: float | Callable[[], float], stopped: Callable[[], bool]
) -> Iterator[float]:
    """A server's event loop: the time of each round once `fset`'s events are in `fq` (or `wait` s
    passed; asked each round if it is a function), until `stopped()` or the IRMd goes."""
    while not stopped():
        try:
            fevent(fset, fq, wait() if callable(wait) else wait)
        except InterruptedError:
            continue
        except FlowError as e:  # the IRMd went away
            print(f"{tool}: {e}", file=sys.stderr)
            return
        yield time.monotonic()


def switch_listening(fset: FlowSet, listening: bool, enabled: bool) -> bool:
    """Listen on `fset`, or stop (at a server's flow limit, saying so as C's servers do), when that
    changes; the new state."""
    if enabled != listening:
        if not enabled:
            print("Can't accept any more flows, waiting.", flush=True)
        fset.listen(enabled)
    return enabled


def stack_report(flow: Flow, lost: int) -> list[str]:
    """What the stack here knows of a flow's repairs and losses, for a tool's summary: FRCT's
    retransmissions and RTT (where the flow runs FRCT) and, when packets were lost, whether this
    host's IPCP dropped them, and why (where it sees the flow's packets)."""
    try:
        stats = flow.stats(ask_ipcp=lost > 0)
    except (FlowError, OSError) as e:
        return [f"(no counters from the IRMd: {e})"]
    lines = []
    if (f := stats.frct) is not None:
        rtt = f"{f.rtt * 1000:.3f} ms" if f.rtt is not None else "not measured"
        lines.append(
            f"frct: {f.sent} sent, {f.received} received, {f.retransmitted} retransmitted, "
            f"{f.dropped} dropped, srtt {rtt}"
        )
    if (ipcp := stats.ipcp) is not None and lost > 0:
        if ipcp.where():
            lines.append(f"{lost} lost; {ipcp.where()}")
        elif ipcp.data == "ipcp":
            lines.append(f"{lost} lost; none dropped at ipcp {ipcp.ipcp} here: lost on the way or at the peer")
        elif ipcp.data == DIRECT:
            lines.append(f"{lost} lost; no IPCP here sees this flow's packets (direct), so none can say where")
    return lines
