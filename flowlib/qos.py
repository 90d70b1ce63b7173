"""QoS specifications for applications: the presets and QosSpec of proto.qos, under flowlib's name."""

from proto.qos import (
    DEFAULT_PEER_TIMEOUT,
    PRESETS,
    UINT32_MAX,
    UINT64_MAX,
    QosSpec,
    best_effort,
    by_name,
    data,
    raw,
    raw_no_errors,
    video,
    voice,
)

__all__ = [
    "DEFAULT_PEER_TIMEOUT",
    "PRESETS",
    "UINT32_MAX",
    "UINT64_MAX",
    "QosSpec",
    "best_effort",
    "by_name",
    "data",
    "raw",
    "raw_no_errors",
    "video",
    "voice",
]
