"""The frct suite: reliable flows and encrypted flows against raw flows on the same udp4 layer.

Two irmds on loopback (127.0.0.1 serves, 127.0.0.2 allocates), a udp4 layer between them.

- goodput: a reliable flow (qos.data, FRCT with retransmission, in order) against a raw flow
  (qos.raw), 1,400-byte SDUs for a second each; the sink counts what it was handed, which on a
  reliable flow is only bytes delivered in order. At 0% loss, and at 5% loss on a second layer
  whose shims drop 5% of outgoing SDUs (the test-only `impair loss=5`, on both). There the raw
  figure is what survives the loss, so the ratio is reliable goodput / lossy raw throughput.
- encryption: an encrypted raw flow (flow_alloc(..., encrypt=True): the IRMds' OAP exchange
  agrees an X25519 key, then AES-256-GCM per packet in 0.23's format, sealed and opened in the
  applications' own threads) against a plain raw flow on the 0% layer.

Every figure is measured min(runs, MAX_RUNS) times, the two sides in alternating order.
"""

from __future__ import annotations

import contextlib
import logging

from bench import hosts
from bench.harness import Goal, Row, Suite, median_row
from flowlib import QosSpec, qos

log = logging.getLogger(__name__)

A_IP, B_IP = "127.0.0.1", "127.0.0.2"
MAX_RUNS = 3
SIZE = 1400
SECONDS = 1.0
RAW_FLOW = "raw flow, same layer"


def run(runs: int) -> list[Row]:
    n = min(runs, MAX_RUNS)
    return [*_layer(n, 0), *_layer(n, 5)]


def _layer(runs: int, loss: int) -> list[Row]:
    opts = ("impair", f"loss={loss}") if loss else ()
    with contextlib.ExitStack() as ex:
        _, _, irm = hosts.udp_pair(ex, A_IP, B_IP, *opts)

        def measure(spec: QosSpec = qos.raw, encrypt: bool = False) -> tuple[float, float]:
            return hosts.on_flow(hosts.alloc(irm, spec, encrypt), lambda s, r, t: hosts.one_way(s, r, t, SECONDS, SIZE))

        good: list[tuple[float, float]] = []
        for i in range(runs):
            rel, raw = hosts.in_turns(i, lambda: measure(qos.data), lambda: measure(qos.raw))
            log.info("frct %d%% loss run %d/%d: reliable %.1f MB/s, raw %.1f MB/s", loss, i + 1, runs, rel[1], raw[1])
            good.append((rel[1], raw[1]))
        rows = [
            median_row(f"frct.goodput_{SIZE}B_loss{loss}", "MB/s", [g for g, _ in good], [r for _, r in good],
                       RAW_FLOW + (f" (both {loss}% loss)" if loss else "")),
        ]  # fmt: skip
        if loss:
            return rows
        enc: list[tuple[float, float]] = []
        for i in range(runs):
            e, p = hosts.in_turns(i, lambda: measure(encrypt=True), lambda: measure())
            log.info("frct encryption run %d/%d: encrypted %.1f MB/s, plain %.1f MB/s", i + 1, runs, e[1], p[1])
            enc.append((e[1], p[1]))
        rows.append(median_row(f"frct.encrypted_raw_{SIZE}B", "MB/s", [e for e, _ in enc], [p for _, p in enc],
                               "plain raw flow, same layer", Goal(">=", 0.75)))  # fmt: skip
        return rows


SUITE = Suite("frct", "reliable and encrypted flows vs raw flows on a loopback udp4 layer", run)
