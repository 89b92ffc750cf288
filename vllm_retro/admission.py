"""Host-memory admission: refuse, at the front door, requests whose wave indexes
could never fit in ``host_memory_gib``.

This is the CPU path's check, where the index and its KV live in host memory. On
a GPU the index lives in GPU memory and ``host_memory_gib`` bounds the wave
buffer's mirror, which stops at its budget (the rest of the request stays in GPU
blocks); vLLM's start-up check of ``max_model_len`` counts that
(``RetroSpec.max_memory_usage_bytes``), so nothing is checked here.

The estimate is an upper bound of what :class:`~vllm_retro.wave_index.WaveIndex`
holds per token (checked against ``WaveIndex.nbytes`` in the tests). Requests
that fit alone but not beside the running ones are not refused: when the budget
runs out mid-flight, the request that overflows decodes densely (its KV stays in
vLLM's paged cache), with a warning.
"""

from __future__ import annotations

import functools
from typing import Optional

from .config import RetroConfig

# Per-cluster tensors besides the token KV: centroid, value sum, key variance
# (D floats each, compute dtype float32) and size + start (int64).
CLUSTER_VECTORS = 3
CLUSTER_INT64S = 2


def index_bytes_per_token(num_kv_heads: int, head_dim: int, kv_dtype_bytes: int,
                          config: RetroConfig) -> float:
    """Upper bound of index bytes per token of one layer (all KV heads)."""
    kv = 2 * head_dim * kv_dtype_bytes + 8      # keys + values + position
    per_cluster = CLUSTER_VECTORS * head_dim * 4 + CLUSTER_INT64S * 8
    if config.value_correction:                 # sigma*u and w of each cluster
        per_cluster += 2 * head_dim * 4
    if config.retrieval_rank == "error_value":  # each cluster's value spread
        per_cluster += 4
    return num_kv_heads * (kv + per_cluster / config.cluster_size)


def request_index_bytes(vllm_config, num_tokens: int) -> int:
    """Upper bound of host memory the indexes of one request of ``num_tokens``
    tokens take across the model's layers. The tail buffer grows by doubling, so
    up to ``update_interval + recent_tokens`` extra rows are counted."""
    from .worker_state import retro_config_from_vllm
    cfg = retro_config_from_vllm(vllm_config)
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    layers = mc.get_num_layers(pc)
    per_tok = index_bytes_per_token(mc.get_num_kv_heads(pc), mc.get_head_size(),
                                    mc.dtype.itemsize, cfg)
    tokens = num_tokens + 2 * (cfg.update_interval + cfg.recent_tokens)
    return int(layers * per_tok * tokens)


def check_request_fits(vllm_config, prompt_len: int, max_tokens: Optional[int]) -> None:
    """Raises vLLM's ``VLLMValidationError`` (HTTP 400 from the server) if a request of
    ``prompt_len + max_tokens`` tokens cannot fit in the host-memory budget."""
    from .worker_state import retro_config_from_vllm
    cfg = retro_config_from_vllm(vllm_config)
    if cfg.host_memory_gib is None:
        return
    total = prompt_len + (max_tokens or vllm_config.model_config.max_model_len - prompt_len)
    need = request_index_bytes(vllm_config, total)
    budget = int(cfg.host_memory_gib * (1 << 30))
    if need > budget:
        raise _validation_error(
            f"retro: this request ({prompt_len} prompt + up to {total - prompt_len} "
            f"output tokens) needs about {need / 2**30:.3f} GiB of host memory for its "
            f"KV index, more than the host_memory_gib budget of "
            f"{cfg.host_memory_gib} GiB; shorten the prompt or max_tokens")


def _validation_error(msg: str) -> Exception:
    try:
        from vllm.exceptions import VLLMValidationError
        return VLLMValidationError(msg)
    except ImportError:
        return ValueError(msg)


def wrap_process_inputs(original):
    """Wraps ``InputProcessor.process_inputs`` with :func:`check_request_fits`."""

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        from .vllm_plugin import retro_selected
        from . import compat
        if retro_selected(self.vllm_config) and compat.is_cpu_platform():
            sp = getattr(request, "sampling_params", None)
            check_request_fits(self.vllm_config, len(request.prompt_token_ids or ()),
                               getattr(sp, "max_tokens", None))
        return request

    return process_inputs
