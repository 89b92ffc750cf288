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


# Cap (nats) of the second-order term of a cluster's log-mass; see cluster_log_mass.
VARIANCE_CORRECTION_CAP = 2.0


def cluster_log_mass(query: torch.Tensor, centroids: torch.Tensor, sizes: torch.Tensor,
                     key_vars: Optional[torch.Tensor], scale: float,
                     cap: Optional[float] = VARIANCE_CORRECTION_CAP) -> torch.Tensor:
    """Estimated log softmax mass ``ln sum_i exp(s q.k_i)`` of each cluster's keys.

    ``ln size + s q.c + min(s^2/2 sum_d q_d^2 var_d, VARIANCE_CORRECTION_CAP)``:
    the centroid term ``size * exp(s q.c)`` alone is the exp of the mean logit,
    which underestimates the mean of the exps (Jensen); the second-order term is
    the Gaussian (diagonal-covariance) correction from the per-channel key
    variance. It is capped because a cluster's true correction is at most
    ``max_i s q.(k_i - c)`` and grows only linearly in ``q`` once one key
    dominates, while the quadratic term keeps growing: on real SmolLM2 keys it
    overshoots by +0.3 nats for clusters whose term is 1-2 nats and by +0.8 at
    2-4 nats. Uncapped, it is worse than no correction at 1-2% read; capped at
    1-3 nats it is better than none at every budget (-13% to -32% error at 2
    nats). 1 nat gives a little less error at a fixed budget, but in
    accuracy-bounded mode it underestimates the outside mass more often; 2 nats
    keeps the bound nearly as often as uncapped (see
    ``benchmarks/accuracy_vs_budget.py``).

    Args:
        query: ``[H, G, D]``; centroids, key_vars: ``[H, C, D]``; sizes ``[H, C]``.
        key_vars: ``None`` for the first-order estimate ``ln size + s q.c`` only.
        cap: cap of the second-order term (``RetroConfig.variance_cap``); ``None``:
            uncapped (the upper estimate of the one-sided bound,
            ``RetroConfig.bound_margin``).

    Returns:
        ``[H, G, C]`` in the compute dtype; ``-inf`` for empty clusters.
    """
    cdt = compute_dtype(query.dtype)
    q = query.to(cdt)
    logits = torch.einsum("hgd,hcd->hgc", q, centroids.to(cdt)) * scale
    logits = logits + torch.log(sizes.to(cdt)).unsqueeze(1)  # -inf for empty clusters
    if key_vars is not None:
        corr = torch.einsum("hgd,hcd->hgc", q * q, key_vars.to(cdt)) * (0.5 * scale * scale)
        logits = logits + (corr if cap is None else corr.clamp(max=cap))
    return logits


def estimated_attention(query: torch.Tensor, centroids: torch.Tensor,
                        sizes: torch.Tensor, value_sums: torch.Tensor, scale: float,
                        key_vars: Optional[torch.Tensor] = None,
                        cap: float = VARIANCE_CORRECTION_CAP,
                        value_corr: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention mass and output of clusters estimated from their summaries.

    Each cluster carries its estimated log-mass (:func:`cluster_log_mass`: logit
    ``ln size + q.c*scale`` plus the capped variance term when ``key_vars`` is
    given) over the cluster's mean value ``sum/size``.

    Args:
        query: ``[H, G, D]``; centroids, value_sums, key_vars: ``[H, C, D]``;
        sizes ``[H, C]``.
        value_corr: ``(sigma u, w)``, each ``[H, C, D]``
            (:func:`vllm_retro.kmeans.kv_cross_rank1`): each cluster's value becomes
            ``mean v + scale (q . sigma u) w`` (``RetroConfig.value_correction``).

    Returns:
        out ``[H, G, D]`` and lse ``[H, G]`` as :func:`partial_attention`.
    """
    cdt = compute_dtype(query.dtype)
    sizes_f = sizes.to(cdt)
    logits = cluster_log_mass(query, centroids, sizes, key_vars, scale, cap)
    means = value_sums.to(cdt) / sizes_f.clamp_min(1).unsqueeze(-1)
    if value_corr is None:
        return _softmax_out(logits, means)
    # First-order change of the softmax-weighted mean value with the query:
    # mean v + s X^T q, X ~ (sigma u) w^T (RetroConfig.value_correction).
    su, w = value_corr
    coef = torch.einsum("hgd,hcd->hgc", query.to(cdt), su.to(cdt)) * scale
    vals = means.unsqueeze(1) + coef.unsqueeze(-1) * w.to(cdt).unsqueeze(1)  # [H,G,C,D]
    return _softmax_out(logits, vals)


def _softmax_out(logits: torch.Tensor, values: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax of ``logits [H, G, T]`` over values ``[H, T, D]`` (shared by the
    group's query heads) or ``[H, G, T, D]`` (one set per query head)."""
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - safe.unsqueeze(-1))
    pattern = "hgt,htd->hgd" if values.dim() == 3 else "hgt,hgtd->hgd"
    return torch.einsum(pattern, probs, values), lse


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
