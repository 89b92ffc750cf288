"""WaveIndex: the per-request, per-layer KV index (all KV heads of one layer).

Tokens live in three zones per KV head:
  * sinks: the first ``sink_tokens`` tokens, always exact;
  * clustered segments: older tokens, k-means clustered per segment and stored
    cluster-contiguous with each cluster's centroid, size, value sum and
    per-channel key variance;
  * tail: the tokens not yet clustered (the recent window plus tokens waiting
    for the next index update), always exact.

``attend`` is the torch reference of tripartite attention; the C++/CUDA kernels
are checked against it. Shapes: ``H`` KV heads, ``D`` head dim, ``C`` clusters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .attention import (cluster_log_mass, compute_dtype, default_scale,
                        estimated_attention, group_query, merge_partials,
                        partial_attention)
from .config import ADAPTIVE_WINDOW, RetroConfig
from .kmeans import (cluster_layout, cluster_value_vars, kv_cross_rank1,
                     spherical_kmeans)


@dataclass
class AttendStats:
    """What one ``attend`` call read, averaged over KV heads.

    exact_fraction: tokens attended exactly (sinks, tail, retrieved clusters) / tokens.
    estimated_fraction: tokens covered by estimated clusters / tokens.
    clusters_retrieved: retrieved clusters per KV head (mean).
    clusters_total: clusters per KV head.
    """

    exact_fraction: float
    estimated_fraction: float
    clusters_retrieved: float
    clusters_total: int


class WaveIndex:
    """Wave index of one layer of one request.

    Build with :meth:`build`; then :meth:`attend` per decode query and
    :meth:`append` per new token(s).
    """

    def __init__(self, num_kv_heads: int, head_dim: int, config: RetroConfig,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        h, d = num_kv_heads, head_dim
        empty = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device=self.device)
        self.sink_keys = empty(h, 0, d)
        self.sink_values = empty(h, 0, d)
        # Tail as a growable buffer: rows [0, tail_len) are live.
        self._tail_keys = empty(h, 0, d)
        self._tail_values = empty(h, 0, d)
        self.tail_len = 0
        cdt = compute_dtype(dtype)
        # Clustered zone, cluster-contiguous per head.
        self.keys = empty(h, 0, d)
        self.values = empty(h, 0, d)
        self.positions = empty(h, 0, dt=torch.int64)   # original token positions
        self.centroids = empty(h, 0, d, dt=cdt)
        self.value_sums = empty(h, 0, d, dt=cdt)
        self.key_vars = empty(h, 0, d, dt=cdt)          # per-channel key variance
        # value_correction: sigma*u and w of each cluster's key-value cross-covariance
        # (kept empty, [H, 0, D], when the option is off).
        self.kv_u = empty(h, 0, d, dt=cdt)
        self.kv_w = empty(h, 0, d, dt=cdt)
        # retrieval_rank "error_value": mean squared deviation of each cluster's values
        # from its mean value, one float per cluster ([H, 0] when not needed).
        self.value_vars = empty(h, 0, dt=cdt)
        self.sizes = empty(h, 0, dt=torch.int64)
        self.starts = empty(h, 0, dt=torch.int64)      # offsets into ``keys``
        self.num_segments = 0
        self.seq_len = 0
        self.last_stats: Optional[AttendStats] = None
        # adaptive_budget: [H, n <= ADAPTIVE_WINDOW] difficulty signals of the last
        # decode steps (float64, oldest first); None before the first step.
        self.adaptive_history: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor,
              config: Optional[RetroConfig] = None) -> "WaveIndex":
        """Indexes a prompt's KV.

        Args:
            keys, values: ``[H, T, D]`` (any ``T >= 0``).
            config: defaults to ``RetroConfig()``.
        """
        if keys.dim() != 3 or keys.shape != values.shape:
            raise ValueError(
                f"keys and values must both be [num_kv_heads, seq_len, head_dim], got "
                f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if not keys.is_floating_point() or keys.dtype != values.dtype:
            raise ValueError(f"keys/values must share a floating dtype, got "
                             f"{keys.dtype} and {values.dtype}")
        index = cls(keys.shape[0], keys.shape[2], config or RetroConfig(),
                    dtype=keys.dtype, device=keys.device)
        index.append(keys, values)
        return index

    @property
    def tail_keys(self) -> torch.Tensor:
        return self._tail_keys[:, :self.tail_len]

    @property
    def tail_values(self) -> torch.Tensor:
        return self._tail_values[:, :self.tail_len]

    @property
    def num_clusters(self) -> int:
        return self.sizes.shape[1]

    @property
    def num_clustered_tokens(self) -> int:
        return self.keys.shape[1]

    def nbytes(self) -> int:
        """Bytes held by this index's tensors (tail counted at capacity)."""
        ts = (self.sink_keys, self.sink_values, self._tail_keys, self._tail_values,
              self.keys, self.values, self.positions, self.centroids,
              self.value_sums, self.key_vars, self.kv_u, self.kv_w, self.value_vars,
              self.sizes, self.starts)
        return sum(t.numel() * t.element_size() for t in ts)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Adds new tokens ``[H, n, D]``; clusters tail tokens that left the recent
        window once enough have gathered (a full segment for the first one, then
        ``update_interval`` tokens per new segment)."""
        if key.shape != value.shape or key.dim() != 3 or \
                key.shape[0] != self.num_kv_heads or key.shape[2] != self.head_dim:
            raise ValueError(
                f"append expects key/value [{self.num_kv_heads}, n, {self.head_dim}], "
                f"got {tuple(key.shape)} and {tuple(value.shape)}")
        key = key.to(self.dtype)
        value = value.to(self.dtype)
        n_sink = min(self.config.sink_tokens - self.sink_keys.shape[1], key.shape[1])
        if n_sink > 0:
            self.sink_keys = torch.cat([self.sink_keys, key[:, :n_sink]], dim=1)
            self.sink_values = torch.cat([self.sink_values, value[:, :n_sink]], dim=1)
            key, value = key[:, n_sink:], value[:, n_sink:]
        self._tail_push(key, value)
        self.seq_len += n_sink + key.shape[1]
        self._maybe_cluster()

    def _tail_push(self, key: torch.Tensor, value: torch.Tensor) -> None:
        n = key.shape[1]
        need = self.tail_len + n
        if need > self._tail_keys.shape[1]:
            cap = max(need, 2 * self._tail_keys.shape[1], 64)
            for name in ("_tail_keys", "_tail_values"):
                old = getattr(self, name)
                new = torch.empty(old.shape[0], cap, old.shape[2], dtype=old.dtype,
                                  device=old.device)
                new[:, :self.tail_len] = old[:, :self.tail_len]
                setattr(self, name, new)
        self._tail_keys[:, self.tail_len:need] = key
        self._tail_values[:, self.tail_len:need] = value
        self.tail_len = need

    def _maybe_cluster(self) -> None:
        cfg = self.config
        while True:
            pending = self.tail_len - cfg.recent_tokens
            if self.num_segments == 0:
                if pending < cfg.segment_size:
                    return
                n_seg = pending // cfg.segment_size
                bounds = [(i * pending) // n_seg for i in range(n_seg + 1)]
                tail_pos0 = self.seq_len_clustered_end()
                for a, b in zip(bounds[:-1], bounds[1:]):
                    self._add_segment(a, b, tail_pos0)
                self._tail_drop(pending)
            else:
                if pending < cfg.update_interval:
                    return
                self._add_segment(0, cfg.update_interval, self.seq_len_clustered_end())
                self._tail_drop(cfg.update_interval)

    def _tail_drop(self, n: int) -> None:
        rest = self.tail_len - n
        # Shrink a buffer sized for a whole prompt back to what decoding needs.
        cap = self._tail_keys.shape[1]
        steady = self.config.recent_tokens + self.config.update_interval
        if cap > 2 * max(rest, steady):
            cap = max(rest, steady)
        for name in ("_tail_keys", "_tail_values"):
            old = getattr(self, name)
            new = torch.empty(old.shape[0], cap, old.shape[2], dtype=old.dtype,
                              device=old.device)
            new[:, :rest] = old[:, n:self.tail_len]
            setattr(self, name, new)
        self.tail_len = rest

    def _add_segment(self, a: int, b: int, tail_pos0: int) -> None:
        """Clusters tail rows ``[a, b)`` into a new segment; ``tail_pos0`` is the
        sequence position of tail row 0."""
        k = self._tail_keys[:, a:b]
        v = self._tail_values[:, a:b]
        n = b - a
        n_clusters = max(1, math.ceil(n / self.config.cluster_size))
        assign = spherical_kmeans(k, n_clusters, self.config.kmeans_iters, values=v,
                                  value_weight=self.config.kmeans_value_weight)
        lay = cluster_layout(k, v, assign, n_clusters)
        gidx = lay.order.unsqueeze(-1).expand(-1, -1, self.head_dim)
        base = self.keys.shape[1]
        self.keys = torch.cat([self.keys, torch.gather(k, 1, gidx)], dim=1)
        self.values = torch.cat([self.values, torch.gather(v, 1, gidx)], dim=1)
        self.positions = torch.cat(
            [self.positions, lay.order + (tail_pos0 + a)], dim=1)
        self.centroids = torch.cat([self.centroids, lay.centroids], dim=1)
        self.value_sums = torch.cat([self.value_sums, lay.value_sums], dim=1)
        self.key_vars = torch.cat([self.key_vars, lay.key_vars], dim=1)
        if self.config.value_correction:
            ku, kw = kv_cross_rank1(k, v, assign, lay.centroids, lay.value_sums, lay.sizes)
            self.kv_u = torch.cat([self.kv_u, ku], dim=1)
            self.kv_w = torch.cat([self.kv_w, kw], dim=1)
        if self.config.retrieval_rank == "error_value":
            self.value_vars = torch.cat(
                [self.value_vars, cluster_value_vars(v, assign, lay.value_sums, lay.sizes)],
                dim=1)
        self.sizes = torch.cat([self.sizes, lay.sizes], dim=1)
        self.starts = torch.cat([self.starts, lay.starts + base], dim=1)
        self.num_segments += 1

    def seq_len_clustered_end(self) -> int:
        """Position of the first tail token (sinks and clustered tokens precede it)."""
        return self.sink_keys.shape[1] + self.keys.shape[1]

    # ----------------------------------------------------------------- attend
    def budget(self) -> tuple[int, int]:
        """(retrieved, estimated) clusters per head at the configured fractions, the
        retrieved count raised to cover ``min_retrieval_tokens`` at the mean size."""
        c = self.num_clusters
        if c == 0:
            return 0, 0
        cfg = self.config
        floor = math.ceil(cfg.min_retrieval_tokens * c / max(1, self.num_clustered_tokens))
        n_ret = min(c, max(1, math.ceil(cfg.retrieval_fraction * c), floor))
        n_est = min(c - n_ret, math.ceil(cfg.estimation_fraction * c))
        return n_ret, n_est

    def bounded_cap(self, n_min: int) -> int:
        """Most clusters the accuracy-bounded exact set may take, given its floor
        ``n_min``: ``ceil(max_retrieval_fraction * C)``, never below the floor."""
        c = self.num_clusters
        return min(c, max(n_min, math.ceil(self.config.max_retrieval_fraction * c)))

    def attend(self, query: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """Tripartite attention of one decode query.

        Args:
            query: ``[Hq, D]``, ``Hq`` a multiple of the KV heads.
            scale: logit scale, default ``1/sqrt(D)``.

        Returns:
            ``[Hq, D]`` in the compute dtype (float64 for float64 KV, else float32).
        """
        if query.dim() != 2 or query.shape[1] != self.head_dim:
            raise ValueError(f"query must be [num_q_heads, {self.head_dim}], got "
                             f"{tuple(query.shape)}")
        if self.seq_len == 0:
            raise ValueError("attend on an empty index")
        scale = default_scale(self.head_dim, scale)
        cdt = compute_dtype(self.dtype)
        q = group_query(query.to(cdt), self.num_kv_heads)
        steady_k = torch.cat([self.sink_keys, self.tail_keys], dim=1)
        steady_v = torch.cat([self.sink_values, self.tail_values], dim=1)
        out_s, lse_s = partial_attention(q, steady_k, steady_v, scale)
        c = self.num_clusters
        if c == 0:
            self.last_stats = AttendStats(1.0, 0.0, 0.0, 0)
            return out_s.reshape(query.shape[0], -1)

        sel = self.select_clusters(q, scale, lse_s, observe=True)
        retrieved_mask = torch.zeros(self.num_kv_heads, c, dtype=torch.bool,
                                     device=self.device)
        retrieved_mask.scatter_(1, sel.retrieved, sel.retrieved_valid)
        out_r, lse_r = self._retrieved_attention(q, scale, retrieved_mask)
        est_sizes = torch.gather(self.sizes, 1, sel.estimated)
        est_sizes = est_sizes * sel.estimated_valid
        gi = sel.estimated.unsqueeze(-1).expand(-1, -1, self.head_dim)
        out_e, lse_e = estimated_attention(
            q, torch.gather(self.centroids, 1, gi), est_sizes,
            torch.gather(self.value_sums, 1, gi), scale,
            key_vars=torch.gather(self.key_vars, 1, gi), cap=self.config.variance_cap,
            value_corr=self._value_corr(gi))
        outs, lses = [out_s, out_r, out_e], [lse_s, lse_r, lse_e]
        rest_tok = 0.0
        if self.config.rest_estimate:
            out_x, lse_x, rest_tok = self._rest_attention(q, retrieved_mask, sel)
            outs.append(out_x)
            lses.append(lse_x)
        out, _ = merge_partials(outs, lses)

        total = float(self.seq_len)
        n_ret_tok = (self.sizes * retrieved_mask).sum(dim=1).double().mean().item()
        self.last_stats = AttendStats(
            exact_fraction=(steady_k.shape[1] + n_ret_tok) / total,
            estimated_fraction=(est_sizes.sum(dim=1).double().mean().item()
                                + rest_tok) / total,
            clusters_retrieved=retrieved_mask.sum(dim=1).double().mean().item(),
            clusters_total=c)
        return out.reshape(query.shape[0], -1)

    def _rest_attention(self, q: torch.Tensor, retrieved_mask: torch.Tensor,
                        sel: "ClusterSelection"):
        """``rest_estimate`` ``w``: the skipped clusters (neither retrieved nor
        estimated) of each KV head as one pseudo-token: log-mass ``ln w`` plus the
        log-sum-exp of their estimated log-masses (the selection's, see
        :meth:`cluster_log_mass`), value their value sums over their sizes.
        Returns (out ``[H, G, D]``, lse ``[H, G]``, skipped tokens per KV head
        (mean)). On a GPU: the key stage's per-head total minus the selected
        masses, and the head's running value sum minus the selected clusters' (one
        value sum per retrieved cluster more than now: +D values each)."""
        cdt = compute_dtype(self.dtype)
        est = torch.zeros(retrieved_mask.shape, dtype=torch.int32, device=self.device)
        est.scatter_add_(1, sel.estimated, sel.estimated_valid.to(torch.int32))
        skipped = ~retrieved_mask & (est == 0) & (self.sizes > 0)
        logm = sel.log_mass.masked_fill(~skipped.unsqueeze(1), float("-inf"))   # [H, G, C]
        lse = torch.logsumexp(logm, dim=-1) + math.log(self.config.rest_estimate)
        w = skipped.to(cdt)
        vsum = torch.einsum("hc,hcd->hd", w, self.value_sums.to(cdt))
        n = (self.sizes.to(cdt) * w).sum(dim=1)                                # [H]
        mean = vsum / n.clamp_min(1).unsqueeze(-1)
        out = mean.unsqueeze(1).expand(-1, q.shape[1], -1)
        return out, lse, n.double().mean().item()

    def value_corr_pair(self):
        """``(sigma u, w)`` ``[H, C, D]`` of every cluster when ``value_correction``
        is on (None otherwise); an index built without it raises."""
        if not self.config.value_correction:
            return None
        if self.kv_u.shape[1] != self.num_clusters:
            raise ValueError("value_correction was turned on after clusters were built "
                             "without it: build the index with the option set")
        return self.kv_u, self.kv_w

    def _value_corr(self, gi: torch.Tensor):
        """``(sigma u, w)`` of the clusters gathered by ``gi`` when
        ``value_correction`` is on (None otherwise)."""
        pair = self.value_corr_pair()
        return None if pair is None else tuple(torch.gather(t, 1, gi) for t in pair)

    def cluster_log_mass(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """``[H, G, C]`` estimated log softmax mass of every cluster for the grouped
        query ``q [H, G, D]``: ``ln size + s q.c`` plus the second-order (key
        variance) term capped at ``config.variance_cap``, see
        :func:`vllm_retro.attention.cluster_log_mass`. Ranking, the accuracy bound
        (unless ``bound_margin`` is set) and the estimation zone all use it."""
        return cluster_log_mass(q, self.centroids, self.sizes, self.key_vars, scale,
                                self.config.variance_cap)

    def select_clusters(self, q: torch.Tensor, scale: float,
                        steady_lse: torch.Tensor, observe: bool = False
                        ) -> "ClusterSelection":
        """Ranks clusters by estimated softmax mass (:meth:`cluster_log_mass`, softmax
        over clusters summed over the GQA group) and splits them into retrieved and
        estimated sets (with ``retrieval_rank`` other than "mass", the retrieved set
        is chosen inside the mass band by :meth:`_error_ranked`).

        With ``adaptive_budget`` the exact-set size per KV head comes from
        :meth:`_adaptive_sizes`; ``observe`` (set by :meth:`attend`) first appends
        this query's difficulty signal to the history, so a later call with the same
        query and history (``observe`` False) selects the same sets.

        Args:
            q: ``[H, G, D]`` grouped query; steady_lse: ``[H, G]`` lse of sinks+tail.
        """
        logits = self.cluster_log_mass(q, scale)
        score = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=1)  # [H, C]
        order = torch.argsort(score, dim=1, descending=True, stable=True)
        n_ret, n_est = self.budget()
        c = self.num_clusters
        if self.config.retrieval_rank != "mass":
            # Same band as the mass ranking; the exact set chosen inside it by the
            # expected estimation error (retrieval_rank, fixed-fraction mode only).
            order, k_ret = self._error_ranked(q, scale, steady_lse, logits, order, n_ret,
                                              n_est, observe)
            band_end = torch.full_like(k_ret, min(c, n_ret + n_est))
        else:
            if self.config.error_bound is None:
                k_ret = torch.full((self.num_kv_heads,), n_ret, dtype=torch.int64,
                                   device=self.device)
                total = None
                if self.config.adaptive_budget:
                    k_ret = self._adaptive_sizes(self._claims(logits, order, steady_lse),
                                                 n_ret, n_est, c, observe)
                    total = int(k_ret.sum().item())
                if self.config.shared_head_budget:
                    k_ret = self._shared_retrieval(logits, order, steady_lse, n_ret, total)
            else:
                k_ret = self._bounded_retrieval(logits, order, steady_lse, n_ret, q, scale)
            band_end = k_ret + n_est
        rank = torch.arange(c, device=self.device).unsqueeze(0)
        retrieved_valid = rank < k_ret.unsqueeze(1)
        estimated_valid = (rank >= k_ret.unsqueeze(1)) & (rank < band_end.unsqueeze(1))
        # Both sets index the same ranking; validity masks say which entries count.
        return ClusterSelection(order, retrieved_valid, order, estimated_valid, k_ret, logits)

    def cluster_error_proxy(self, q: torch.Tensor, scale: float, steady_lse: torch.Tensor,
                            logits: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
        """``[H, K]`` expected estimation error of the clusters ``band [H, K]`` were
        they estimated (``retrieval_rank``), summed over the GQA group.

        ``m = exp(logit - total)`` is the cluster's estimated share of a query head's
        attention (``logits``: :meth:`cluster_log_mass`; ``total`` includes the
        steady part), ``t = s^2/2 sum_d q_d^2 var_d`` the uncapped key-variance term
        (the variance of the logits inside the cluster is ``2 t`` under the
        diagonal model). "error": ``m t`` (the log-mass error grows with ``t``).
        "error_value": ``m (t |mean v - o| + sqrt(2 t) sigma_v)``: the mass error
        moves the output along ``mean v - o`` (``o``: the output estimated from the
        steady part and the band's mean values), and the attention-weighted value
        differs from the mean value by at most ``sqrt(var logit) sigma_v``
        (Cauchy-Schwarz, first order). Reads only the band's summaries."""
        cdt = compute_dtype(self.dtype)
        total = torch.logaddexp(torch.logsumexp(logits, dim=-1), steady_lse)   # [H, G]
        gi = band.unsqueeze(-1).expand(-1, -1, self.head_dim)
        lb = torch.gather(logits, 2, band.unsqueeze(1).expand(-1, logits.shape[1], -1))
        m = torch.exp(lb - total.unsqueeze(-1)).nan_to_num(0.0)                 # [H, G, K]
        var = torch.gather(self.key_vars, 1, gi).to(cdt)
        t = torch.einsum("hgd,hkd->hgk", q * q, var) * (0.5 * scale * scale)
        if self.config.retrieval_rank == "error":
            return (m * t).sum(dim=1)
        if self.value_vars.shape[1] != self.num_clusters:
            raise ValueError("retrieval_rank 'error_value' was turned on after clusters "
                             "were built without it: build the index with the option set")
        sizes = torch.gather(self.sizes, 1, band).clamp_min(1).to(cdt)
        means = torch.gather(self.value_sums, 1, gi).to(cdt) / sizes.unsqueeze(-1)
        steady_k = torch.cat([self.sink_keys, self.tail_keys], dim=1)
        steady_v = torch.cat([self.sink_values, self.tail_values], dim=1)
        out_s, _ = partial_attention(q, steady_k, steady_v, scale)
        w_s = torch.exp(steady_lse - total).nan_to_num(0.0)                     # [H, G]
        norm = (w_s + m.sum(-1)).clamp_min(1e-300).unsqueeze(-1)
        o = (w_s.unsqueeze(-1) * out_s + torch.einsum("hgk,hkd->hgd", m, means)) / norm
        dist = torch.linalg.vector_norm(means.unsqueeze(1) - o.unsqueeze(2), dim=-1)
        sigma = torch.gather(self.value_vars, 1, band).to(cdt).clamp_min(0).sqrt()
        return (m * (t * dist + torch.sqrt(2 * t) * sigma.unsqueeze(1))).sum(dim=1)

    def _error_ranked(self, q: torch.Tensor, scale: float, steady_lse: torch.Tensor,
                      logits: torch.Tensor, order: torch.Tensor, n_ret: int, n_est: int,
                      observe: bool = False):
        """(order, k_ret) when ``retrieval_rank`` is not "mass": the candidate band
        (the top ``n_ret + n_est`` of the mass ranking ``order``) is re-sorted by
        :meth:`cluster_error_proxy` (descending, ties in mass order) and the rest
        keeps its mass order, so the exact set is a prefix and the estimated set the
        rest of the band. ``k_ret``: ``n_ret`` per head, or with
        ``shared_head_budget`` every head's top one plus the largest
        ``(n_ret - 1) * H`` proxies of the heads' other band entries (ties: lower
        head, then better rank)."""
        h, c = self.num_kv_heads, self.num_clusters
        band = min(c, n_ret + n_est)
        err = self.cluster_error_proxy(q, scale, steady_lse, logits, order[:, :band])
        perm = torch.argsort(err, dim=1, descending=True, stable=True)
        order = torch.cat([torch.gather(order[:, :band], 1, perm), order[:, band:]], dim=1)
        k_ret = torch.full((h,), min(n_ret, band), dtype=torch.int64, device=self.device)
        total = n_ret * h
        if self.config.adaptive_budget:
            k_ret = self._adaptive_sizes(torch.gather(err, 1, perm), min(n_ret, band),
                                         band - min(n_ret, band), band, observe)
            total = int(k_ret.sum().item())
        if not self.config.shared_head_budget or total <= h or band <= 1:
            return order, k_ret
        err = torch.gather(err, 1, perm)                                  # descending
        pick = torch.argsort(err[:, 1:].reshape(-1), descending=True,
                             stable=True)[:total - h]
        k_ret = 1 + torch.bincount(torch.div(pick, band - 1, rounding_mode="floor"),
                                   minlength=h)
        return order, k_ret

    def _claims(self, logits: torch.Tensor, order: torch.Tensor,
                steady_lse: torch.Tensor) -> torch.Tensor:
        """``[H, C]`` each ranked cluster's estimated share of its query heads'
        attention, ``sum_g exp(logit - total_g)`` (steady part in the total)."""
        lg = torch.gather(logits, 2, order.unsqueeze(1).expand_as(logits))  # ranked
        total = torch.logaddexp(torch.logsumexp(lg, dim=-1), steady_lse)    # [H, G]
        return torch.exp(lg - total.unsqueeze(-1)).nan_to_num(0.0).sum(1)

    def _adaptive_sizes(self, ranked: torch.Tensor, n_ret: int, n_est: int, k_max: int,
                        observe: bool) -> torch.Tensor:
        """``[H]`` per-query exact-set sizes (``adaptive_budget`` ``a``).

        ``ranked [H, >= n_ret + n_est]``: the ranking's score (mass claim, or error
        proxy with ``retrieval_rank``) in exact-set order. The difficulty signal is
        what the fixed budget would leave to estimation, ``sum ranked[:, n_ret:n_ret
        + n_est]``; ``p`` its mid-rank percentile among ``adaptive_history`` (0.5
        when empty); size ``floor(n_ret (1 + a (2 p - 1)) + 1/2)`` clipped to ``[1,
        k_max]``. ``observe`` appends the signal to the history first (keeping the
        last ``ADAPTIVE_WINDOW``). On a GPU: one sum over the band and a compare
        against ``ADAPTIVE_WINDOW`` floats per KV head (256 B at fp32)."""
        a = self.config.adaptive_budget
        sig = ranked[:, n_ret:n_ret + n_est].sum(dim=1).double()               # [H]
        hist = self.adaptive_history
        if hist is not None and hist.shape[0] != sig.shape[0]:
            hist = None
        if observe:
            hist = sig.unsqueeze(1) if hist is None else torch.cat(
                [hist, sig.unsqueeze(1)], dim=1)[:, -ADAPTIVE_WINDOW:]
            self.adaptive_history = hist
        if hist is None or hist.shape[1] == 0:
            p = torch.full_like(sig, 0.5)
        else:
            s = sig.unsqueeze(1)
            p = ((hist < s).sum(1) + 0.5 * (hist == s).sum(1)).double() / hist.shape[1]
        k = torch.floor(n_ret * (1.0 + a * (2.0 * p - 1.0)) + 0.5).to(torch.int64)
        return k.clamp(min=1, max=max(1, k_max))

    def _shared_retrieval(self, logits: torch.Tensor, order: torch.Tensor,
                          steady_lse: torch.Tensor, n_ret: int,
                          total: Optional[int] = None) -> torch.Tensor:
        """Per-head exact-set sizes when the layer's ``n_ret * H`` retrieved clusters
        are shared by its KV heads (``shared_head_budget``).

        A cluster's claim is its estimated share of the attention of its own query
        heads, ``sum_g exp(logit - total_g)`` with ``total_g`` the estimated total
        (steady lse and every cluster's log-mass), so claims compare across heads.
        Every head keeps its top-ranked cluster; the other ``(n_ret - 1) * H`` go to
        the largest claims among the remaining ranks (ties: lower head, then better
        rank). A head then retrieves that many clusters as a prefix of its own
        ranking, so only the count per head changes, not what a head's ranking is.
        On a GPU this is one top-k over ``H * C`` scores per sequence and layer;
        the clusters read in total stay ``n_ret * H`` (or ``total``: the sum of the
        adaptive sizes, ``adaptive_budget``)."""
        h, c = self.num_kv_heads, self.num_clusters
        claim = self._claims(logits, order, steady_lse)                     # [H, C]
        extra = (n_ret - 1) * h if total is None else total - h
        k = torch.ones(h, dtype=torch.int64, device=self.device)
        if extra <= 0 or c <= 1:
            return k
        flat = claim[:, 1:].reshape(-1)
        pick = torch.argsort(flat, descending=True, stable=True)[:extra]
        k += torch.bincount(torch.div(pick, c - 1, rounding_mode="floor"), minlength=h)
        return k

    def _bounded_retrieval(self, logits: torch.Tensor, order: torch.Tensor,
                           steady_lse: torch.Tensor, n_min: int,
                           q: Optional[torch.Tensor] = None,
                           scale: Optional[float] = None) -> torch.Tensor:
        """Smallest exact set (per KV head, in rank order) whose estimated outside
        mass is at most ``error_bound`` for every query head of the group.

        ``logits`` are the clusters' estimated log-masses (:meth:`cluster_log_mass`);
        the total is their log-sum-exp combined with the exact ``steady_lse``.
        With ``bound_margin`` set, :meth:`_one_sided_outside` replaces this mean
        estimate of the outside mass."""
        cfg = self.config
        c = self.num_clusters
        cap = self.bounded_cap(n_min)
        if cfg.bound_margin is not None:
            if q is None or scale is None:
                raise ValueError("bound_margin needs the query and scale")
            outside = self._one_sided_outside(q, scale, order, steady_lse)
        else:
            lg = torch.gather(logits, 2, order.unsqueeze(1).expand_as(logits))  # ranked
            total = torch.logaddexp(torch.logsumexp(lg, dim=-1), steady_lse)  # [H, G]
            mass = torch.exp(lg - total.unsqueeze(-1))                       # [H, G, C]
            outside = (1.0 - torch.exp(steady_lse - total).unsqueeze(-1)
                       - torch.cumsum(mass, -1))
        worst = outside.amax(dim=1)                                      # [H, C]
        ok = worst <= cfg.error_bound
        first_ok = torch.where(ok.any(dim=1), ok.int().argmax(dim=1) + 1,
                               torch.full_like(ok[:, 0], c, dtype=torch.int64))
        return first_ok.clamp(min=n_min, max=cap)

    def _one_sided_outside(self, q: torch.Tensor, scale: float, order: torch.Tensor,
                           steady_lse: torch.Tensor) -> torch.Tensor:
        """``[H, G, C]`` one-sided estimate of the softmax mass outside the exact set
        made of the top ``k = 1..C`` ranked clusters (``bound_margin`` set).

        Inside clusters count at ``lo = ln size + s q.c``, a lower bound of their
        true mass (Jensen: the mean of the exps is at least the exp of the mean
        logit); outside clusters at ``up = lo + s^2/2 sum_d q_d^2 var_d +
        bound_margin`` (uncapped). The fraction ``out / (steady + in + out)`` grows
        with ``out`` and falls with ``in``, so it is at least the mean estimate's
        for every ``k``. Sums in float64: inside as a prefix, outside as a suffix
        over the ranking."""
        cdt = compute_dtype(self.dtype)
        lo = cluster_log_mass(q, self.centroids, self.sizes, None, scale)
        up = cluster_log_mass(q, self.centroids, self.sizes, self.key_vars, scale, cap=None)
        up = up + torch.tensor(self.config.bound_margin, dtype=cdt)
        ix = order.unsqueeze(1).expand_as(lo)
        lo = torch.gather(lo, 2, ix).double()
        up = torch.gather(up, 2, ix).double()
        st = steady_lse.double()
        m = torch.maximum(up.amax(dim=-1), st)                           # [H, G]
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e_lo = torch.exp(lo - m.unsqueeze(-1))
        e_up = torch.exp(up - m.unsqueeze(-1))
        inside = torch.cumsum(e_lo, -1)
        suffix = torch.flip(torch.cumsum(torch.flip(e_up, [-1]), -1), [-1])
        out = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], -1)
        return out / (torch.exp(st - m).unsqueeze(-1) + inside + out)

    def _retrieved_attention(self, q: torch.Tensor, scale: float,
                             retrieved_mask: torch.Tensor):
        """Exact attention over the tokens of the retrieved clusters (gathered)."""
        cluster_of = self.cluster_ids()                                   # [H, N]
        token_mask = torch.gather(retrieved_mask, 1, cluster_of)
        counts = token_mask.sum(dim=1)
        t_max = int(counts.max().item()) if counts.numel() else 0
        if t_max == 0:
            h, g, d = q.shape
            return (torch.zeros(h, g, d, dtype=q.dtype, device=q.device),
                    torch.full((h, g), float("-inf"), dtype=q.dtype, device=q.device))
        # Stable sort moves each head's selected tokens to the front.
        idx = torch.argsort((~token_mask).to(torch.int8), dim=1, stable=True)[:, :t_max]
        gi = idx.unsqueeze(-1).expand(-1, -1, self.head_dim)
        k = torch.gather(self.keys, 1, gi)
        v = torch.gather(self.values, 1, gi)
        valid = torch.arange(t_max, device=q.device).unsqueeze(0) < counts.unsqueeze(1)
        return partial_attention(q, k, v, scale, mask=valid)

    def cluster_ids(self) -> torch.Tensor:
        """``[H, N]`` cluster id of each clustered token (in storage order)."""
        n = self.num_clustered_tokens
        ids = torch.arange(self.num_clusters, device=self.device)
        return torch.stack([torch.repeat_interleave(ids, s, output_size=n)
                            for s in self.sizes])


@dataclass
class ClusterSelection:
    """Clusters chosen for one query, per KV head, as ranked index tensors.

    retrieved / estimated: ``[H, K]`` cluster ids; *_valid: ``[H, K]`` bool saying
    which entries belong to the set. k_retrieved: ``[H]`` exact-set size.
    log_mass: ``[H, G, C]`` the clusters' estimated log-masses the ranking used
    (:meth:`WaveIndex.cluster_log_mass`).
    """

    retrieved: torch.Tensor
    retrieved_valid: torch.Tensor
    estimated: torch.Tensor
    estimated_valid: torch.Tensor
    k_retrieved: torch.Tensor
    log_mass: torch.Tensor
