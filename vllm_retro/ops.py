"""Python entry points of the native kernels (``torch.ops.vllm_retro.*``).

:func:`decode_attention` runs tripartite decode attention of one query over a
:class:`~vllm_retro.wave_index.WaveIndex` with the C++ CPU kernel
``torch.ops.vllm_retro.retro_decode_attention`` when the extension
``vllm_retro._C`` is built and the index lives on the CPU, and falls back to the
torch reference :meth:`WaveIndex.attend` otherwise. Both give the same result (up to
floating-point rounding) and both set ``index.last_stats``.

Shapes: ``Hq`` query heads, ``H`` KV heads (``Hq % H == 0``), ``D`` head dim.
Build the extension with ``pip install --no-build-isolation -e .`` (or
``python setup.py build_ext --inplace``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import compute_dtype, default_scale
from .wave_index import AttendStats, WaveIndex

__all__ = ["decode_attention", "has_extension"]

_EXT: Optional[bool] = None


def has_extension() -> bool:
    """Whether ``vllm_retro._C`` imports and registers ``retro_decode_attention``."""
    global _EXT
    if _EXT is None:
        try:
            from . import _C  # noqa: F401  (loading registers the ops)
            _EXT = hasattr(torch.ops.vllm_retro, "retro_decode_attention")
        except (ImportError, OSError, RuntimeError, AttributeError):
            _EXT = False
    return _EXT


def decode_attention(index: WaveIndex, query: torch.Tensor, scale: Optional[float] = None,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tripartite attention of one decode query over ``index``.

    Same semantics as :meth:`WaveIndex.attend` (fixed-fraction and accuracy-bounded
    modes), computed by the C++ kernel when available.

    Args:
        index: the layer's wave index (``H`` KV heads, head dim ``D``).
        query: ``[Hq, D]``, ``Hq`` a multiple of ``H``; any float dtype.
        scale: logit scale, default ``1/sqrt(D)``.
        out: optional ``[Hq, D]`` float tensor to write into (any float dtype; the
            kernel accumulates in float32, float64 for float64 KV).

    Returns:
        ``[Hq, D]``: ``out`` if given, else a new tensor in the compute dtype
        (float64 for float64 KV, else float32).

    Raises:
        ValueError: bad query shape or an empty index.
    """
    if query.dim() != 2 or query.shape[1] != index.head_dim:
        raise ValueError(f"query must be [num_q_heads, {index.head_dim}], got "
                         f"{tuple(query.shape)}")
    if query.shape[0] % index.num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({query.shape[0]}) must be a multiple of "
                         f"num_kv_heads ({index.num_kv_heads})")
    if index.seq_len == 0:
        raise ValueError("attend on an empty index")
    if out is not None and (out.dim() != 2 or tuple(out.shape) != tuple(query.shape)):
        raise ValueError(f"out must be {tuple(query.shape)}, got {tuple(out.shape)}")

    # The C++ kernel implements the per-head budgets of the fixed-fraction and
    # bounded modes, the rank-1 value correction and the "error" rank; the
    # shared-budget option (per-head counts from one layer-wide top-k), the
    # "error_value" rank (it needs the steady part's output first), the per-query
    # adaptive budget and rest_estimate exist in the torch reference only, so they
    # run there.
    cfg = index.config
    if not (has_extension() and index.device.type == "cpu" and query.device.type == "cpu"
            and not cfg.shared_head_budget
            and cfg.retrieval_rank in ("mass", "error")
            and not cfg.adaptive_budget
            and not cfg.rest_estimate):
        res = index.attend(query, scale)
        if out is None:
            return res
        out.copy_(res)
        return out

    scale = default_scale(index.head_dim, scale)
    if out is None:
        out = torch.empty(query.shape, dtype=compute_dtype(index.dtype), device=query.device)
    n_ret, n_est = index.budget()
    c = index.num_clusters
    vc = (index.value_corr_pair() if c > 0 else None) or (None, None)
    error_bound, max_ret = 0.0, -1
    if cfg.error_bound is not None and c > 0:
        error_bound = float(cfg.error_bound)
        max_ret = index.bounded_cap(n_ret)
    stats = torch.ops.vllm_retro.retro_decode_attention(
        query, index.sink_keys, index.sink_values, index.tail_keys, index.tail_values,
        index.keys, index.values, index.centroids, index.value_sums, index.key_vars,
        index.sizes, index.starts, n_ret, n_est, scale, out, None, error_bound, max_ret,
        float(cfg.variance_cap),
        -1.0 if cfg.bound_margin is None else float(cfg.bound_margin),
        vc[0], vc[1], cfg.retrieval_rank == "error" and c > 0)
    _set_stats(index, stats)
    return out


def _set_stats(index: WaveIndex, stats: torch.Tensor) -> None:
    """``index.last_stats`` from the kernel's ``[H, 3]`` (clusters retrieved, tokens
    retrieved, tokens estimated), as :meth:`WaveIndex.attend` reports them."""
    c = index.num_clusters
    if c == 0:
        index.last_stats = AttendStats(1.0, 0.0, 0.0, 0)
        return
    mean = stats.double().mean(dim=0).tolist()
    total = float(index.seq_len)
    steady = index.sink_keys.shape[1] + index.tail_len
    index.last_stats = AttendStats(exact_fraction=(steady + mean[1]) / total,
                                   estimated_fraction=mean[2] / total,
                                   clusters_retrieved=mean[0], clusters_total=c)
