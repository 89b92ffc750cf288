"""Attention math shared by the index and the tests: dense reference, partial
attention with log-sum-exp, the cluster estimate, and the log-sum-exp merge.

Shapes: ``H`` KV heads, ``G`` query heads per KV head (GQA group), ``T`` tokens,
``D`` head dim. Computation runs in float64 for float64 inputs, else float32.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_query(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[Hq, D]`` -> ``[H, G, D]``; query head ``h*G + g`` belongs to KV head ``h``
    (vLLM's and HF's GQA convention)."""
    hq, d = query.shape
    if hq % num_kv_heads != 0:
        raise ValueError(
            f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return query.reshape(num_kv_heads, hq // num_kv_heads, d)


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def full_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Dense softmax attention of one decode query over all keys.

    Args:
        query: ``[Hq, D]``; keys, values: ``[H, T, D]`` with ``Hq % H == 0``.
        scale: logit scale, default ``1/sqrt(D)``.

    Returns:
        ``[Hq, D]`` in the compute dtype.
    """
    out, _ = partial_attention(group_query(query, keys.shape[0]), keys, values,
                               default_scale(query.shape[-1], scale))
    return out.reshape(query.shape[0], -1)


def partial_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      scale: float, mask: Optional[torch.Tensor] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over a subset of tokens, with its log-sum-exp.

    Args:
        query: ``[H, G, D]``; keys, values: ``[H, T, D]``.
        mask: optional ``[H, T]`` bool, True where the token takes part.

    Returns:
        out ``[H, G, D]`` (zero where no token takes part) and lse ``[H, G]``
        (``-inf`` there).
    """
    cdt = compute_dtype(query.dtype)
    logits = torch.einsum("hgd,htd->hgt", query.to(cdt), keys.to(cdt)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return _softmax_out(logits, values.to(cdt))


def estimated_attention(query: torch.Tensor, centroids: torch.Tensor,
                        sizes: torch.Tensor, value_sums: torch.Tensor, scale: float,
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention mass and output of clusters estimated from their summaries.

    Each cluster stands for ``size`` keys equal to its centroid, each carrying the
    cluster's mean value: logit ``q.c*scale + ln(size)`` over value ``sum/size``.

    Args:
        query: ``[H, G, D]``; centroids, value_sums: ``[H, C, D]``; sizes ``[H, C]``.

    Returns:
        out ``[H, G, D]`` and lse ``[H, G]`` as :func:`partial_attention`.
    """
    cdt = compute_dtype(query.dtype)
    sizes_f = sizes.to(cdt)
    logits = torch.einsum("hgd,hcd->hgc", query.to(cdt), centroids.to(cdt)) * scale
    logits = logits + torch.log(sizes_f).unsqueeze(1)  # -inf for empty clusters
    means = value_sums.to(cdt) / sizes_f.clamp_min(1).unsqueeze(-1)
    return _softmax_out(logits, means)


def _softmax_out(logits: torch.Tensor, values: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe.unsqueeze(-1))
    return torch.einsum("hgt,htd->hgd", probs, values), lse


def merge_partials(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merges normalised partial outputs by their log-sum-exps.

    Args:
        outs: each ``[..., D]``; lses: each ``[...]`` (``-inf`` for empty parts).

    Returns:
        the merged output and its lse.
    """
    lse = torch.logsumexp(torch.stack(list(lses)), dim=0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.zeros_like(outs[0])
    for o, l in zip(outs, lses):
        out = out + torch.exp(l - safe).unsqueeze(-1) * o
    return out, lse
