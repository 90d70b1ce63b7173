"""QoS specifications for applications: the presets and QosSpec of proto.qos, under flowlib's name."""

from proto.qos import PRESETS, UINT32_MAX, UINT64_MAX, QosSpec, best_effort, by_name, data, raw, video, voice

__all__ = ["PRESETS", "UINT32_MAX", "UINT64_MAX", "QosSpec", "best_effort", "by_name", "data", "raw", "video",
           "voice"]
