"""The engine's alarm: a timerfd another thread sets, which wakes the engine's thread at that time and
not before."""

from __future__ import annotations

import select
import time

import pytest

from flowlib.alarm import alarm


@pytest.mark.timeout(10)
def test_the_alarm_rings_at_its_time_not_before_and_take_clears_it() -> None:
    a = alarm()
    assert a is not None, "timerfd is Linux's: this machine has it"
    poller = select.epoll()
    poller.register(a.fd, select.EPOLLIN)
    start = time.monotonic()
    a.set(start + 0.2)
    assert poller.poll(0.05) == []
    assert poller.poll(2) == [(a.fd, select.EPOLLIN)]
    assert time.monotonic() - start >= 0.19
    a.take()
    assert poller.poll(0) == []
    a.take()  # nothing to take: no error


@pytest.mark.timeout(10)
def test_a_time_gone_by_rings_at_once_and_a_later_setting_replaces_an_earlier_one() -> None:
    a = alarm()
    assert a is not None
    poller = select.epoll()
    poller.register(a.fd, select.EPOLLIN)
    a.set(time.monotonic() - 5)
    assert poller.poll(1) == [(a.fd, select.EPOLLIN)]
    a.take()
    a.set(time.monotonic() + 0.05)
    a.set(time.monotonic() + 30)  # the engine moved its look later: the earlier setting is gone
    assert poller.poll(0.2) == []
