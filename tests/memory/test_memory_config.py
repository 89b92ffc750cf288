"""The wave buffer's options: defaults, validation with readable errors, and the
cache sizing helper."""

import pytest
import torch

from vllm_retro.config import RetroConfig
from vllm_retro.memory import default_host_budget_bytes
from vllm_retro.memory.cluster_cache import ClusterCache


def test_wave_buffer_options_validate():
    cfg = RetroConfig()
    assert cfg.wave_buffer is False and cfg.cluster_cache_gib == 0.0
    on = RetroConfig.from_dict({"wave_buffer": True, "cluster_cache_gib": 12.5,
                                "host_memory_gib": 100, "prefill_resident_tokens": 600_000,
                                "summary_bits": 8})
    assert RetroConfig.from_dict(on.to_dict()) == on
    for bad, field in [({"wave_buffer": 1}, "wave_buffer"),
                       ({"wave_buffer": "yes"}, "wave_buffer"),
                       ({"wave_buffer": True, "cluster_cache_gib": -1}, "cluster_cache_gib"),
                       ({"wave_buffer": True, "cluster_cache_gib": float("nan")},
                        "cluster_cache_gib"),
                       ({"wave_buffer": True, "cluster_cache_gib": True}, "cluster_cache_gib"),
                       ({"cluster_cache_gib": 4.0}, "set wave_buffer"),
                       ({"wave_buffer": True, "prefill_resident_tokens": -1},
                        "prefill_resident_tokens"),
                       ({"wave_buffer": True, "prefill_resident_tokens": 1.5},
                        "prefill_resident_tokens"),
                       ({"prefill_resident_tokens": 4096}, "set wave_buffer"),
                       ({"summary_bits": 4}, "summary_bits"),
                       ({"summary_bits": 8.0}, "summary_bits"),
                       ({"summary_bits": True}, "summary_bits")]:
        with pytest.raises(ValueError, match=field):
            RetroConfig.from_dict(bad)


def test_cache_slots_for_bytes_and_default_host_budget():
    # One 16-token page of a bf16 head of 128: 16 x 256 x 2 B = 8 KiB.
    assert ClusterCache.slots_for_bytes(1 << 30, 16, 128, torch.bfloat16) == 131072
    assert ClusterCache.slots_for_bytes(8191, 16, 128, torch.bfloat16) == 0
    b = default_host_budget_bytes()
    assert 0 < b and default_host_budget_bytes(0.5) < b
