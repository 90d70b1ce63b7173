"""What the small tools (oping, operf, oecho) share: option parsing and the server loop.

The server loop is the event API's canonical use: one thread, one FlowSet that
listens for new flows, idle flows reaped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import sys
import time
from collections.abc import Callable

from flowlib import Event, EventQueue, EventType, Flow, FlowError, FlowSet, fevent, qos
from flowlib.qos import QosSpec

_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str, default_unit: str = "ms") -> float:
    """'10' (in default_unit), '10ms', '2s', '1m' -> seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", text.strip())
    if match is None:
        raise ValueError(f"bad duration {text!r}: expected a number with an optional unit ms|s|m|h|d")
    return float(match.group(1)) * _UNITS[match.group(2) or default_unit]


def qos_arg(text: str) -> QosSpec:
    try:
        return qos.by_name(text)
    except ValueError as e:
        raise SystemExit(f"{sys.argv[0]}: {e}") from None


def fail(tool: str, err: Exception) -> None:
    print(f"{tool}: {err}", file=sys.stderr)
    sys.exit(1)


def serve(tool: str, on_sdu: Callable[[Flow, bytes], bytes | None], idle_timeout: float) -> None:
    """Accept flows and answer each SDU with on_sdu's reply, until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.WARNING)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fset, fq = FlowSet(), EventQueue()
    try:
        fset.listen()
    except FlowError as e:
        fail(tool, e)
    print(f"Ouroboros {tool} server started.", flush=True)
    last_seen: dict[Flow, float] = {}
    while not stop:
        try:
            fevent(fset, fq, 0.1)
        except InterruptedError:
            continue
        except FlowError as e:  # the IRMd went away
            print(f"{tool}: {e}", file=sys.stderr)
            break
        now = time.monotonic()
        for ev in fq:
            _handle(ev, fset, last_seen, on_sdu, now)
        for flow, seen in list(last_seen.items()):
            if now - seen > idle_timeout:
                print(f"Flow {flow.flow_id} timed out.", flush=True)
                _drop(flow, fset, last_seen)
    for flow in list(last_seen):
        _drop(flow, fset, last_seen)
    with contextlib.suppress(FlowError):
        fset.close()


def _handle(ev: Event, fset: FlowSet, last_seen: dict[Flow, float],
            on_sdu: Callable[[Flow, bytes], bytes | None], now: float) -> None:
    flow = ev.flow
    if ev.type is EventType.ALLOC:
        print(f"New flow {flow.flow_id}.", flush=True)
        last_seen[flow] = now
    elif ev.type is EventType.PKT:
        last_seen[flow] = now
        try:
            reply = on_sdu(flow, flow.read())
            if reply is not None:
                flow.write(reply)
        except FlowError:
            _drop(flow, fset, last_seen)
    else:
        print(f"Flow {flow.flow_id} {'deallocated' if ev.type is EventType.DEALLOC else 'down'}.", flush=True)
        _drop(flow, fset, last_seen)


def _drop(flow: Flow, fset: FlowSet, last_seen: dict[Flow, float]) -> None:
    fset.remove(flow)
    last_seen.pop(flow, None)
    flow.close()
