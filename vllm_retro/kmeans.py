"""Segment clustering: spherical inner-product k-means over keys, all KV heads at once.

Plain torch, deterministic. ``spherical_kmeans`` returns cluster assignments;
``cluster_layout`` turns them into the cluster-contiguous layout the index stores.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sums(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """Per-cluster sums: ``x [H, n, D]``, ``assign [H, n]`` -> ``[H, n_clusters, D]``.

    A one-hot matrix product: inside vLLM's CPU worker ``index_add_`` and
    ``scatter_add_`` took ~60 ms per call (vs ~1 ms outside), the matmul does not.
    """
    h, n, d = x.shape
    onehot = torch.zeros(h, n_clusters, n, dtype=x.dtype, device=x.device)
    onehot.scatter_(1, assign.unsqueeze(1), 1.0)
    return torch.bmm(onehot, x)


def spherical_kmeans(keys: torch.Tensor, n_clusters: int, iters: int,
                     values: Optional[torch.Tensor] = None,
                     value_weight: float = 0.0) -> torch.Tensor:
    """Clusters each head's keys by cosine similarity of mean-centred keys.

    Centroids start at strided tokens (token ``i * n // n_clusters``); each
    iteration assigns every key to the most similar unit centroid and moves
    the centroid to the normalised mean of its members (an emptied cluster keeps
    its previous centroid). A final assignment follows the last update.

    With ``value_weight > 0`` (``RetroConfig.kmeans_value_weight``) each point is
    the normalised concatenation ``[k', value_weight * v']`` of its centred,
    normalised key ``k'`` and value ``v'``: clusters then also group tokens whose
    values agree, so a cluster's mean value is closer to the attention-weighted
    value its estimate stands for. Only the assignment changes; the summaries
    are computed from the keys and values as before.

    Args:
        keys: ``[num_heads, n, head_dim]``.
        n_clusters: clusters per head, ``1 <= n_clusters <= n``.
        iters: update iterations (0: strided centroids only).
        values: ``[num_heads, n, head_dim]``, required when ``value_weight > 0``.
        value_weight: weight of the values in the clustered points (0: keys only).

    Returns:
        ``[num_heads, n]`` int64 cluster ids in ``[0, n_clusters)``.
    """
    h, n, d = keys.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    x = keys.to(_compute_dtype(keys.dtype))
    x = x - x.mean(dim=1, keepdim=True)
    x = torch.nn.functional.normalize(x, dim=-1)
    if value_weight > 0:
        if values is None or values.shape != keys.shape:
            raise ValueError("value_weight > 0 needs values shaped like keys")
        y = values.to(x.dtype)
        y = torch.nn.functional.normalize(y - y.mean(dim=1, keepdim=True), dim=-1)
        x = torch.nn.functional.normalize(torch.cat([x, value_weight * y], dim=-1), dim=-1)
    init = torch.div(torch.arange(n_clusters, device=keys.device) * n, n_clusters,
                     rounding_mode="floor")
    cent = x[:, init, :].clone()
    assign = torch.argmax(torch.bmm(x, cent.transpose(1, 2)), dim=-1)
    for _ in range(iters):
        sums = segment_sums(x, assign, n_clusters)
        norms = sums.norm(dim=-1, keepdim=True)
        cent = torch.where(norms > 0, sums / norms.clamp_min(1e-30), cent)
        assign = torch.argmax(torch.bmm(x, cent.transpose(1, 2)), dim=-1)
    return assign


class ClusterLayout(NamedTuple):
    """One segment in cluster-contiguous order, per head.

    order: ``[H, n]`` token indices of the segment sorted by cluster.
    sizes: ``[H, C]`` int64 tokens per cluster (may be 0).
    starts: ``[H, C]`` int64 offset of each cluster's first token within ``order``.
    centroids: ``[H, C, D]`` mean key of each cluster (zero for empty clusters).
    value_sums: ``[H, C, D]`` sum of the values of each cluster.
    key_vars: ``[H, C, D]`` per-channel (population) variance of each cluster's
        keys around its centroid (zero for empty and single-token clusters).
    """

    order: torch.Tensor
    sizes: torch.Tensor
    starts: torch.Tensor
    centroids: torch.Tensor
    value_sums: torch.Tensor
    key_vars: torch.Tensor


def cluster_layout(keys: torch.Tensor, values: torch.Tensor, assign: torch.Tensor,
                   n_clusters: int) -> ClusterLayout:
    """Sorts a segment by cluster and computes per-cluster centroid, value sum and
    per-channel key variance.

    Args:
        keys, values: ``[H, n, D]``.
        assign: ``[H, n]`` cluster ids from :func:`spherical_kmeans`.

    Centroids are true means of the original (uncentred) keys, so ``q . c`` is
    the mean logit of the cluster's keys. The variance is computed from the
    centred keys (``mean((k - c)^2)`` per channel, not from sums of squares, which
    cancel badly for keys far from the origin); with it ``0.5 * sum_d q_d^2 var_d``
    is the second-order term of the cluster's log-mass (see
    :func:`vllm_retro.attention.cluster_log_mass`).
    """
    h, n, d = keys.shape
    order = torch.sort(assign, dim=1, stable=True).indices
    sizes = torch.zeros(h, n_clusters, dtype=torch.int64, device=keys.device)
    sizes.scatter_add_(1, assign, torch.ones_like(assign))
    starts = torch.cumsum(sizes, dim=1) - sizes
    cdt = _compute_dtype(keys.dtype)
    key_sums = segment_sums(keys.to(cdt), assign, n_clusters)
    value_sums = segment_sums(values.to(cdt), assign, n_clusters)
    n = sizes.clamp_min(1).unsqueeze(-1).to(cdt)
    centroids = key_sums / n
    kc = keys.to(cdt)
    dev = kc - torch.gather(centroids, 1, assign.unsqueeze(-1).expand(-1, -1, d))
    key_vars = segment_sums(dev * dev, assign, n_clusters) / n
    return ClusterLayout(order, sizes, starts, centroids, value_sums, key_vars)


def cluster_value_vars(values: torch.Tensor, assign: torch.Tensor,
                       value_sums: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``[H, C]`` mean squared deviation ``(1/n) sum_i |v_i - mean v|^2`` of each
    cluster's values from its mean value (``RetroConfig.retrieval_rank``
    "error_value"); zero for empty clusters. ``value_sums``, ``sizes`` from
    :func:`cluster_layout`."""
    cdt = value_sums.dtype
    d = values.shape[-1]
    nn = sizes.clamp_min(1).unsqueeze(-1).to(cdt)
    dv = values.to(cdt) - torch.gather(value_sums / nn, 1,
                                       assign.unsqueeze(-1).expand(-1, -1, d))
    sq = (dv * dv).sum(-1, keepdim=True)
    return (segment_sums(sq, assign, value_sums.shape[1]) / nn).squeeze(-1)


def kv_cross_rank1(keys: torch.Tensor, values: torch.Tensor, assign: torch.Tensor,
                   centroids: torch.Tensor, value_sums: torch.Tensor, sizes: torch.Tensor,
                   chunk: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Leading singular pair of each cluster's key-value cross-covariance
    ``X = (1/n) sum_i (k_i - c)(v_i - mean v)^T ~ sigma u w^T`` (``RetroConfig.
    value_correction``).

    Args:
        keys, values: ``[H, n, D]``; assign ``[H, n]``; centroids, value_sums
            ``[H, C, D]`` and sizes ``[H, C]`` from :func:`cluster_layout`.

    Returns:
        ``(sigma * u, w)``, both ``[H, C, D]`` in the compute dtype (zero for
        clusters of fewer than two tokens). Sums of outer products are accumulated
        over ``chunk`` tokens at a time.
    """
    h, n, d = keys.shape
    c = centroids.shape[1]
    cdt = centroids.dtype
    nn = sizes.clamp_min(1).unsqueeze(-1).to(cdt)
    ix = assign.unsqueeze(-1).expand(-1, -1, d)
    dk = keys.to(cdt) - torch.gather(centroids, 1, ix)
    dv = values.to(cdt) - torch.gather(value_sums / nn, 1, ix)
    cross = torch.zeros(h, c, d * d, dtype=cdt, device=keys.device)
    for a in range(0, n, chunk):
        outer = torch.einsum("hnd,hne->hnde", dk[:, a:a + chunk], dv[:, a:a + chunk])
        cross.scatter_add_(1, assign[:, a:a + chunk].unsqueeze(-1).expand(-1, -1, d * d),
                           outer.reshape(h, -1, d * d))
    cross = cross.reshape(h, c, d, d) / nn.unsqueeze(-1)
    # w is the top eigenvector of X^T X and sigma u = X w: the SVD's leading pair
    # (up to its sign) from a symmetric eigensolver, ~2.5x faster than a full SVD
    # of every D x D matrix, which was most of the value correction's build time.
    w = torch.linalg.eigh(cross.transpose(-1, -2) @ cross).eigenvectors[..., :, -1]
    su = (cross @ w.unsqueeze(-1)).squeeze(-1)
    keep = (sizes >= 2).to(cdt).unsqueeze(-1)
    return su * keep, w * keep
