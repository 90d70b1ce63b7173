"""QoS specifications (flowlib.qos): presets as C Ouroboros 0.23's qos.h, and validation."""

from __future__ import annotations

import dataclasses

import pytest

from flowlib import qos
from flowlib.qos import UINT32_MAX, UINT64_MAX, QosSpec


def test_raw_is_the_default_spec_and_unreliable() -> None:
    assert qos.raw == QosSpec()
    assert (qos.raw.loss, qos.raw.ber, qos.raw.in_order) == (1, 1, 0)
    assert not qos.raw.reliable and not qos.raw.crc and not qos.raw.frct


# C 0.23's include/ouroboros/qos.h, field by field:
# (delay, bandwidth, availability, loss, ber, in_order, max_gap, timeout)
C_PRESETS = {
    "raw": (UINT32_MAX, 0, 0, 1, 1, 0, UINT32_MAX, 120000),
    "raw_no_errors": (UINT32_MAX, 0, 0, 1, 0, 0, UINT32_MAX, 120000),
    "best_effort": (UINT32_MAX, 0, 0, 1, 0, 1, UINT32_MAX, 120000),
    "video": (100, UINT64_MAX, 3, 1, 0, 1, 100, 120000),
    "voice": (50, 100000, 5, 1, 0, 1, 50, 120000),
    "data": (1000, 0, 0, 0, 0, 1, 2000, 120000),
}


@pytest.mark.parametrize("name", sorted(C_PRESETS))
def test_presets_are_c_ouroboros_0_23s_field_for_field(name: str) -> None:
    spec = qos.PRESETS[name]
    fields = ("delay", "bandwidth", "availability", "loss", "ber", "in_order", "max_gap", "timeout")
    assert tuple(getattr(spec, f) for f in fields) == C_PRESETS[name]
    assert spec.cypher_s == 0


def test_every_preset_has_the_default_peer_timeout_and_ber_0_asks_for_a_crc() -> None:
    assert {p.timeout for p in qos.PRESETS.values()} == {qos.DEFAULT_PEER_TIMEOUT} == {120_000}
    assert [n for n, p in sorted(qos.PRESETS.items()) if p.crc] == [
        "best",
        "best_effort",
        "data",
        "raw_no_errors",
        "video",
        "voice",
    ]


def test_best_effort_asks_for_integrity_and_order_but_not_retransmission() -> None:
    assert (qos.best_effort.loss, qos.best_effort.ber, qos.best_effort.in_order) == (1, 0, 1)
    assert not qos.best_effort.reliable


def test_data_preset_is_reliable_and_in_order() -> None:
    assert qos.data.reliable
    assert (qos.data.delay, qos.data.in_order, qos.data.max_gap) == (1000, 1, 2000)


def test_voice_and_video_are_latency_bounded_and_unreliable() -> None:
    assert (qos.voice.delay, qos.voice.bandwidth, qos.voice.availability, qos.voice.max_gap) == (50, 100_000, 5, 50)
    assert (qos.video.delay, qos.video.bandwidth, qos.video.availability, qos.video.max_gap) == (
        100,
        UINT64_MAX,
        3,
        100,
    )
    assert not qos.voice.reliable and not qos.video.reliable


def test_unbounded_fields_default_to_uint32_max() -> None:
    assert qos.raw.delay == qos.raw.max_gap == UINT32_MAX


@pytest.mark.parametrize("name", ["raw", "raw_no_errors", "best", "best_effort", "video", "voice", "data"])
def test_presets_are_found_by_name(name: str) -> None:
    assert qos.by_name(name) is qos.PRESETS[name]


def test_unknown_preset_name_error_lists_the_presets() -> None:
    with pytest.raises(
        ValueError,
        match="unknown qos 'gold': expected one of best, best_effort, data, raw, raw_no_errors, video, voice",
    ):
        qos.by_name("gold")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(QosSpec)])
@pytest.mark.parametrize("value", [-1, UINT64_MAX + 1, True, 1.5, "1", None])
def test_every_field_rejects_values_that_are_not_uint64(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"qos {field}: expected a non-negative integer"):
        QosSpec(**{field: value})  # type: ignore[arg-type]


def test_bounds_of_uint64_are_accepted() -> None:
    assert QosSpec(delay=0, bandwidth=UINT64_MAX).bandwidth == UINT64_MAX


def test_specs_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        qos.raw.loss = 0  # type: ignore[misc]
