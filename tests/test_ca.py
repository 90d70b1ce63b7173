"""The congestion avoidance core (ipcp/unicast/ca.py), sans-IO: marks from queue depths, the
receiver's echo of marks and delivery rate, and the sender's pace following them."""

from __future__ import annotations

import itertools

import pytest

from ipcp.unicast import ca
from ipcp.unicast.dt import UniFlow


def test_marks_start_above_a_standing_burst_and_grow_with_the_queue() -> None:
    assert ca.ecn_level(0, 200_000) == 0
    assert ca.ecn_level(20_000, 200_000) == 0  # a tenth full: a burst being drained
    assert ca.ecn_level(50_000, 200_000) == 64
    assert ca.ecn_level(200_000, 200_000) == 255
    assert ca.ecn_level(10**9, 200_000) == 255
    assert ca.ecn_level(5, 0) == 255  # no capacity known: anything queued is too much


def test_receiver_reports_a_climbing_rate_unasked_then_is_silent_until_the_first_mark() -> None:
    rx = ca.Receiver(0.0)
    t, reports = 0.0, []
    for per_ms in (1, 2, 4, 8, 8, 8, 8):  # a sender slow-starting to 8 MB/s, 50 ms at each pace
        for _ in range(50):
            t += 0.001
            reports += [u for _ in range(per_ms) if (u := rx.on_pdu(0, 1000, t)) is not None]
    assert all(u.ece == 0 for u in reports)
    assert [round(u.rate / 1e6) for u in reports] == [1, 2, 4, 8]  # each climb once; the plateau not
    first = rx.on_pdu(80, 1000, t)
    assert first is not None and first.ece == 80


def test_a_slow_starting_sender_goes_no_faster_than_twice_what_arrives() -> None:
    tx = ca.Sender(0.0)
    t = 0.0
    tx.on_update(ca.Update(0, 1e6), t)  # the receiver: 1 MB/s arrives
    for _ in range(20):
        t += ca.RATE_WINDOW
        tx.admit(1000, t)
    assert tx.slow_start and tx.rate == pytest.approx(2e6)
    tx.on_update(ca.Update(0, 2e6), t)  # it got through: go on
    t += ca.RATE_WINDOW
    tx.admit(1000, t)
    assert tx.rate > 2e6


def test_a_slow_starting_sender_does_not_run_ahead_of_slow_echoes() -> None:
    """On a loaded host the first echo may take tens of ms: until it comes the sender keeps its initial
    rate, and an echo of less than half its rate brings it back to twice that (before, it had grown
    tenfold and flooded the queue it could not yet hear of)."""
    tx = ca.Sender(0.0)
    t = 0.0
    for _ in range(10):
        t += ca.RATE_WINDOW
        tx.admit(1000, t)
    assert tx.rate == ca.INITIAL_RATE
    for _ in range(5):
        tx.on_update(ca.Update(0, tx.rate), t)
        t += ca.RATE_WINDOW
        tx.admit(1000, t)
    fast = tx.rate
    assert fast > 5 * ca.INITIAL_RATE
    tx.on_update(ca.Update(0, fast / 8), t)  # what arrives lags far behind
    t += ca.RATE_WINDOW
    tx.admit(1000, t)
    assert tx.rate == pytest.approx(fast / 4)
    t += ca.STALE + ca.RATE_WINDOW  # no echo for long: the receiver is idle or gone, the path is free
    tx.admit(1000, t)
    assert tx.rate > fast / 4


def test_receiver_measures_its_delivery_rate_over_busy_windows() -> None:
    rx = ca.Receiver(0.0)
    t = 0.0
    for _ in range(200):  # 1000 bytes every ms: 1 MB/s
        t += 0.001
        rx.on_pdu(0, 1000, t)
    assert rx.rate == pytest.approx(1e6, rel=0.15)
    rx.on_pdu(0, 1000, t + 5.0)  # after an idle spell: no new figure from it
    assert rx.rate == pytest.approx(1e6, rel=0.15)


def test_receiver_updates_every_few_marks_then_once_when_it_is_over() -> None:
    rx = ca.Receiver(0.0)
    step = ca.UPDATE_GAP / 5  # updates 8 PDUs apart are more than UPDATE_GAP apart; all within RATE_WINDOW
    times = iter(i * step for i in range(1000))
    updates = [rx.on_pdu(100, 1000, next(times)) for _ in range(1 + 3 * ca.UPDATE_EVERY)]
    assert sum(u is not None for u in updates) == 4
    after = [rx.on_pdu(0, 1000, t := next(times)) for _ in range(20)]
    sent = [u for u in after if u is not None]
    assert [u.ece for u in sent][-1] == 0 and len([u for u in sent if u.ece == 0]) == 1
    assert all(rx.on_pdu(0, 1000, t) is None for _ in range(10))  # silent again


def test_marks_that_come_and_go_with_every_pdu_do_not_make_the_receiver_update_for_each() -> None:
    """Each update is signed: a sender or forwarder flipping the mark on every PDU gets one update per
    UPDATE_GAP, and the last state still reaches the sender."""
    rx = ca.Receiver(0.0)
    t, updates = 0.0, []
    for i in range(10_000):  # 0.1 s of PDUs every 10 µs, marked 1, 0, 1, 0...
        t += 1e-5
        if (u := rx.on_pdu(i & 1 ^ 1, 100, t)) is not None:
            updates.append((t, u))
    assert 10 <= len(updates) <= 0.1 / ca.UPDATE_GAP + 1
    assert all(b - a >= ca.UPDATE_GAP for (a, _), (b, _) in itertools.pairwise(updates))
    for _ in range(5):  # unmarked from now on: the end of it is told, once the gap allows
        t += ca.UPDATE_GAP
        if (u := rx.on_pdu(0, 100, t)) is not None:
            updates.append((t, u))
    assert updates[-1][1].ece == 0


def test_sender_slow_starts_then_lands_below_the_delivery_rate_on_congestion() -> None:
    tx = ca.Sender(0.0)
    assert tx.paced and tx.rate == ca.INITIAL_RATE
    t = 0.0
    for _ in range(10):
        tx.on_update(ca.Update(0, tx.rate), t)  # all of it arrives
        t += ca.RATE_WINDOW
        tx.admit(1000, t)
    assert tx.rate > 10 * ca.INITIAL_RATE  # grew by half each window
    tx.on_update(ca.Update(128, 2e6), t)
    assert not tx.slow_start and tx.rate == pytest.approx(2e6 * 0.5)
    tx.on_update(ca.Update(128, 1e6), t + ca.HOLD / 2)  # within a round trip: the same congestion
    assert tx.rate == pytest.approx(1e6)
    tx.on_update(ca.Update(64, 1e6), t + ca.HOLD)
    assert tx.rate == pytest.approx(0.75e6)


def test_sender_never_goes_below_its_floor() -> None:
    tx = ca.Sender(0.0)
    for i in range(50):
        tx.on_update(ca.Update(255, 10.0), i * ca.HOLD)
    assert tx.rate == ca.MIN_RATE


def test_sender_waits_as_long_as_its_rate_asks() -> None:
    tx = ca.Sender(0.0)
    tx.on_update(ca.Update(128, 2e6), 0.0)  # 1 MB/s
    assert tx.admit(int(ca.BURST), 0.0) == 0.0  # a burst goes at once
    assert tx.admit(10_000, 0.0) == pytest.approx(0.01)  # then 10 kB take 10 ms
    assert tx.admit(10_000, 0.02) == pytest.approx(0.0, abs=1e-9)  # paid for by the wait


def test_sender_grows_back_when_congestion_ends_or_goes_unheard() -> None:
    tx = ca.Sender(0.0)
    tx.on_update(ca.Update(128, 1e6), 0.0)
    slow = tx.rate
    tx.admit(1000, 0.05)  # congested, heard recently: no growth
    assert tx.rate == slow
    t = 0.05 + ca.STALE + 0.01
    tx.admit(1000, t)  # the receiver went quiet: it is over
    assert tx.ece == 0
    assert tx.rate == pytest.approx(slow + 2 * ca.INCREASE)  # additive, and never for more than 2 windows
    t = ca.QUIET + 0.1
    while tx.paced and t < 10:
        t += ca.RATE_WINDOW
        tx.admit(1000, t)
    assert tx.slow_start and not tx.paced  # long quiet: fast again, and no longer paced at all
    assert tx.admit(10**6, t) == 0.0


def test_policies_by_name_and_what_the_data_path_asks_of_them() -> None:
    with pytest.raises(ValueError, match="unknown congestion policy 'bbr'"):
        ca.by_name("bbr")
    nop, ecn = ca.by_name("none"), ca.by_name("mb-ecn")
    assert (nop.name, nop.holds, ecn.name, ecn.holds) == ("none", False, "mb-ecn", True)
    flow = UniFlow(1, None)  # type: ignore[arg-type]
    nop.flow_added(flow, 0.0)
    assert flow.rx is None and flow.tx is None
    ecn.flow_added(flow, 0.0)
    assert isinstance(flow.rx, ca.Receiver) and isinstance(flow.tx, ca.Sender)
    queued = [0]
    ecn.n1_added(7, lambda: queued[0], 1000)
    nop.n1_added(7, lambda: queued[0], 1000)
    queued[0] = 900  # a queue 90% full, looked at every SAMPLE_EVERY PDUs, averaged
    levels = [ecn.level(7) for _ in range(ca.SAMPLE_EVERY * 40)]
    assert levels[0] == 0 and levels[-1] > ca.MARK_FROM and levels == sorted(levels)
    assert nop.level(7) == 0 and ecn.level(8) == 0  # no queue known: no mark
    ecn.n1_removed(7)
    assert ecn.level(7) == 0


@pytest.mark.parametrize("ece", [0, 1, 255, -1, 1 << 40])
@pytest.mark.parametrize("rate", [5e-324, 1e-300, 1e-3, 0.0, -1.0, -1e308, float("nan"), float("inf"), float("-inf")])
def test_a_hostile_update_leaves_every_wait_finite_and_short(ece: int, rate: float) -> None:
    """A FlowUpdate is a remote member's numbers: a rate of 1e-300 once made the next wait 1e303 s, a
    timer the data transfer thread's poll could not take (OverflowError: the IPCP ended); a negative
    one made the pace NaN. The pace stays at MIN_RATE or above, and a real update is heard after."""
    tx = ca.Sender(0.0)
    t = 0.0
    tx.on_update(ca.Update(ece, rate), t)
    waits = []
    for _ in range(50):  # as the data path sends: a burst, then it waits as long as it was told
        waits.append(tx.admit(8 * 1500, t))
        t += waits[-1] + 0.001
    most = 2 * 8 * 1500 / ca.MIN_RATE  # a burst's debt made at the old pace, paid at the new
    assert all(0.0 <= w <= most for w in waits), max(waits)
    assert tx.rate >= ca.MIN_RATE and 0 <= tx.ece <= 255
    tx.on_update(ca.Update(128, 2e6), t + 1.0)  # the peer's real word still counts
    assert tx.rate == pytest.approx(1e6)
