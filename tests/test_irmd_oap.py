"""The IRMd's OAP (irmd.oap) between two IRMds' worth of state, without sockets: the allocating
side's request and completion, the accepting side's checks and answer, and every refusal."""

from __future__ import annotations

import pytest

from irmd.oap import Oap
from proto import oap
from transports.channel import HandlerError

T0 = 1_800_000_000_000_000_000
MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_plain_allocation_round_trips(clock: Clock) -> None:
    client, server = Oap(clock), Oap(clock)
    attempt = client.request("pong")
    assert len(attempt.data) == 36
    answer, _ = server.serve("pong", attempt.data)
    assert len(answer) == 84
    client.complete(attempt, answer)


def test_every_attempt_has_a_fresh_id_and_timestamp(clock: Clock) -> None:
    client = Oap(clock)
    a = client.request("pong")
    clock.now += 1
    b = client.request("pong")
    assert a.request.id != b.request.id and a.request.timestamp != b.request.timestamp


def test_a_replayed_request_is_refused_with_eauth(clock: Clock) -> None:
    client, server = Oap(clock), Oap(clock)
    attempt = client.request("pong")
    server.serve("pong", attempt.data)
    clock.now += 10 * MS
    with pytest.raises(HandlerError, match="replay") as e:
        server.serve("pong", attempt.data)
    assert e.value.code == oap.EAUTH


def test_a_stale_request_is_refused(clock: Clock) -> None:
    attempt = Oap(clock).request("pong")
    clock.now += 21_000 * MS
    with pytest.raises(HandlerError, match="too old"):
        Oap(clock).serve("pong", attempt.data)


@pytest.mark.parametrize("data", [b"", b"x" * 35, bytes(36) + b"!"])
def test_a_malformed_request_is_refused(clock: Clock, data: bytes) -> None:
    with pytest.raises(HandlerError) as e:
        Oap(clock).serve("pong", data)
    assert e.value.code == oap.EAUTH


def test_a_response_to_another_request_fails_the_allocation(clock: Clock) -> None:
    client, server = Oap(clock), Oap(clock)
    mine, other = client.request("pong"), client.request("pong")
    answer, _ = server.serve("pong", other.data)
    with pytest.raises(HandlerError, match="does not match"):
        client.complete(mine, answer)
    with pytest.raises(HandlerError):
        client.complete(mine, b"")  # a peer that answered without OAP
