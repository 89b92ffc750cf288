"""Baseline sparse-attention selectors and exact-set metrics for the accuracy benchmark.

Role: the comparison methods of ``accuracy_vs_budget.py`` (faiss IVF-Flat
inner-product retrieval, Quest page selection, oracle top-k) plus the shared
measurement helpers (masked exact attention, true softmax probabilities, GQA
union of per-query-head rankings, the wave index's exact/estimated token sets).

Every selector (``oracle_topk(...)``, ``QuestPages.prepare``, ``FaissIVF.prepare``)
ranks once per decode query and returns a callable ``budget -> mask``: the
exact-attention token mask ``[H, T]`` (bool, over the causal prefix ``[0, T)``,
``T = p + 1``) per KV head for ``budget`` middle-zone tokens. All of them include
the sink tokens ``[0, sinks)`` and the recent window ``[T - recent, T)``; the
selected units (IVF lists, Quest pages, single tokens) come from the middle zone
``[sinks, T - recent)``.

GQA policy of the baselines (IVF, Quest, oracle): each query head of a KV head's
group ranks the units on its own; the KV head reads the *union*, built round
robin over the group (every head's best unit, then every head's second best, ...)
until the token budget is reached, and all query heads of the group attend
exactly over that union. (The wave index instead ranks clusters once per KV head
by the estimated softmax mass summed over the group.)

Shapes: ``H`` KV heads, ``G`` query heads per KV head, ``Hq = H * G``, ``D`` head
dim, ``U`` units.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch

from vllm_retro.attention import group_query, partial_attention


# ---------------------------------------------------------------- metrics
def true_logits(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 scaled logits ``[H, G, T]`` of a decode query ``[Hq, D]`` over keys ``[H, T, D]``."""
    q = group_query(query.double(), keys.shape[0])
    return torch.einsum("hgd,htd->hgt", q, keys.double()) * scale


def true_probs(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 softmax probabilities of each query head over all keys.

    Args:
        query: ``[Hq, D]``; keys: ``[H, T, D]``.

    Returns:
        ``[H, G, T]`` float64.
    """
    return torch.softmax(true_logits(query, keys, scale), dim=-1)


def attention_from_logits(logits: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Exact attention restricted to the masked tokens, from precomputed logits.

    Args:
        logits: ``[H, G, T]`` float64 (:func:`true_logits`); values: ``[H, T, D]``;
        mask: ``[H, T]`` bool with at least one True per head.

    Returns:
        ``[Hq, D]`` float64.
    """
    lg = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    e = torch.exp(lg - lg.amax(dim=-1, keepdim=True))
    out = torch.einsum("hgt,htd->hgd", e, values.double()) / e.sum(-1, keepdim=True)
    return out.reshape(-1, values.shape[-1])


def masked_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 exact attention of one decode query over the masked tokens only.

    Args:
        query: ``[Hq, D]``; keys, values: ``[H, T, D]``; mask: ``[H, T]`` bool.

    Returns:
        ``[Hq, D]`` float64.
    """
    return attention_from_logits(true_logits(query, keys, scale), values, mask)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``||out_h - ref_h|| / ||ref_h||`` per query head; out, ref ``[Hq, D]`` -> ``[Hq]``."""
    ref = ref.double()
    return (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)


def mass_of(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """True softmax mass of the masked tokens per query head.

    Args:
        probs: ``[H, G, T]`` from :func:`true_probs`; mask: ``[H, T]`` bool.

    Returns:
        ``[H * G]`` float64.
    """
    return (probs * mask.unsqueeze(1).double()).sum(-1).reshape(-1)


def steady_mask(num_heads: int, t: int, sinks: int, recent: int) -> torch.Tensor:
    """``[H, T]`` bool: sinks ``[0, sinks)`` and recent window ``[T - recent, T)``."""
    m = torch.zeros(num_heads, t, dtype=torch.bool)
    m[:, :min(sinks, t)] = True
    m[:, max(0, t - recent):] = True
    return m


# ------------------------------------------------------------ GQA union
class UnionRanking:
    """Round-robin union over a GQA group of per-query-head unit rankings.

    Units are taken in order of their best rank over the group (ties: lower query
    head first) while the tokens already taken are below the budget, so the last
    unit may overshoot by less than one unit.

    Args:
        order: ``[H, G, U]`` unit ids, best first, per query head.
        unit_sizes: ``[H, U]`` tokens per unit.
    """

    def __init__(self, order: torch.Tensor, unit_sizes: torch.Tensor):
        h, g, u = order.shape
        self.shape = (h, u)
        if u == 0:
            self.merged = self.before = None
            return
        rank = torch.empty_like(order)
        rank.scatter_(2, order, torch.arange(u).expand(h, g, u).contiguous())
        best, who = rank.min(dim=1)                                     # [H, U]
        self.merged = torch.argsort(best * g + who, dim=1)              # [H, U] unit ids
        sizes = torch.gather(unit_sizes, 1, self.merged).double()
        self.before = torch.cumsum(sizes, dim=1) - sizes

    def take(self, budget: float) -> torch.Tensor:
        """``[H, U]`` bool of the units read for ``budget`` tokens per KV head."""
        sel = torch.zeros(self.shape, dtype=torch.bool)
        if budget <= 0 or self.merged is None:
            return sel
        return sel.scatter_(1, self.merged, self.before < budget)


def union_round_robin(order: torch.Tensor, unit_sizes: torch.Tensor,
                      budget: float) -> torch.Tensor:
    """One-shot :class:`UnionRanking` ``take``: ``[H, U]`` bool of selected units."""
    return UnionRanking(order, unit_sizes).take(budget)


class _UnitSelector:
    """Exact-set masks ``[H, T]`` for budgets, from a unit ranking over the middle
    zone ``[a, b)``: ``unit_of[h, j]`` is the unit of token ``a + j``."""

    def __init__(self, base_mask: torch.Tensor, a: int, b: int,
                 ranking: Optional[UnionRanking], unit_of: Optional[torch.Tensor]):
        self.base, self.a, self.b = base_mask, a, b
        self.ranking, self.unit_of = ranking, unit_of

    def __call__(self, budget: float) -> torch.Tensor:
        mask = self.base.clone()
        if self.ranking is None or budget <= 0:
            return mask
        sel = self.ranking.take(budget)
        mask[:, self.a:self.b] |= torch.gather(sel, 1, self.unit_of)
        return mask


# ---------------------------------------------------------------- oracle
def oracle_topk(probs: torch.Tensor, sinks: int, recent: int) -> _UnitSelector:
    """Selector of the true top tokens (upper bound of token-granular selection).

    Args:
        probs: ``[H, G, T]`` true probabilities.

    Returns:
        a callable ``budget -> [H, T]`` mask (sinks + recent + the union of the
        group's top middle-zone tokens, ``budget`` of them per KV head).
    """
    h, g, t = probs.shape
    base = steady_mask(h, t, sinks, recent)
    a, b = min(sinks, t), max(min(sinks, t), t - recent)
    if b <= a:
        return _UnitSelector(base, a, b, None, None)
    order = torch.argsort(probs[:, :, a:b], dim=-1, descending=True, stable=True)
    rk = UnionRanking(order, torch.ones(h, b - a, dtype=torch.int64))
    return _UnitSelector(base, a, b, rk, torch.arange(b - a).expand(h, -1))


def oracle_topk_mask(probs: torch.Tensor, budget: float, sinks: int,
                     recent: int) -> torch.Tensor:
    """``[H, T]`` mask of :func:`oracle_topk` at ``budget`` middle tokens per KV head."""
    return oracle_topk(probs, sinks, recent)(budget)


# ----------------------------------------------------------------- Quest
class QuestPages:
    """Quest-style pages over one layer's keys: per-page, per-channel key min/max.

    Pages of ``page_size`` tokens tile the middle zone from position ``sinks``;
    the page cut by the recent window is summarised over its live tokens only.
    """

    def __init__(self, keys: torch.Tensor, page_size: int = 16, sinks: int = 4,
                 recent: int = 64):
        """keys: ``[H, T_max, D]`` (all tokens the decode steps will see)."""
        self.keys = keys.double()
        self.page_size, self.sinks, self.recent = page_size, sinks, recent
        h, t, d = keys.shape
        n = (t - sinks) // page_size
        body = self.keys[:, sinks:sinks + n * page_size].reshape(h, n, page_size, d)
        self.pmin = body.amin(dim=2)                                 # [H, P, D]
        self.pmax = body.amax(dim=2)

    def prepare(self, query: torch.Tensor, t: int) -> _UnitSelector:
        """Ranks the pages for the decode query ``[Hq, D]`` at position ``t - 1``;
        returns a callable ``budget -> [H, t]`` exact-set mask."""
        h = self.keys.shape[0]
        ps, a = self.page_size, self.sinks
        b = max(a, t - self.recent)
        base = steady_mask(h, t, self.sinks, self.recent)
        if b <= a:
            return _UnitSelector(base, a, b, None, None)
        n_full = (b - a) // ps
        pmin, pmax = self.pmin[:, :n_full], self.pmax[:, :n_full]
        sizes = [ps] * n_full
        if a + n_full * ps < b:                                      # partial page
            part = self.keys[:, a + n_full * ps:b]
            pmin = torch.cat([pmin, part.amin(dim=1, keepdim=True)], dim=1)
            pmax = torch.cat([pmax, part.amax(dim=1, keepdim=True)], dim=1)
            sizes.append(b - a - n_full * ps)
        q = group_query(query.double(), h)                           # [H, G, D]
        bound = torch.maximum(torch.einsum("hgd,hpd->hgpd", q, pmin),
                              torch.einsum("hgd,hpd->hgpd", q, pmax)).sum(-1)  # [H,G,P]
        order = torch.argsort(bound, dim=-1, descending=True, stable=True)
        rk = UnionRanking(order, torch.tensor(sizes, dtype=torch.int64).expand(h, -1))
        page_of = torch.div(torch.arange(b - a), ps, rounding_mode="floor")
        return _UnitSelector(base, a, b, rk, page_of.expand(h, -1))

    def select(self, query: torch.Tensor, t: int, budget: float) -> torch.Tensor:
        """``[H, t]`` exact-set mask at ``budget`` middle tokens per KV head."""
        return self.prepare(query, t)(budget)


# ------------------------------------------------------------- faiss IVF
class FaissIVF:
    """faiss ``IndexIVFFlat`` (inner product) per KV head over the middle zone.

    Trained once on the middle-zone keys of the first decode prefix
    (``nlist = ceil(tokens / cluster_size)``), later tokens are added with
    ``add_with_ids`` as they leave the recent window. A query head probes lists
    in order of centroid inner product (the coarse quantizer's ranking, i.e. what
    ``nprobe`` walks); the exact set is every token of the probed lists, i.e. the
    result of an IVF-Flat search with ``k`` = all scanned candidates.
    """

    def __init__(self, keys: torch.Tensor, t0: int, sinks: int = 4, recent: int = 64,
                 cluster_size: int = 16, niter: int = 20, seed: int = 1234):
        """keys: ``[H, T_max, D]``; t0: first prefix length (tokens ``[0, t0)``)."""
        import faiss
        self.faiss = faiss
        self.keys = keys.float().contiguous()
        self.sinks, self.recent = sinks, recent
        h, t_max, d = keys.shape
        a, b = sinks, max(sinks, t0 - recent)
        self.nlist = max(1, math.ceil((b - a) / cluster_size))
        self.indexes, self.list_of, self._quantizers = [], [], []
        for hh in range(h):
            quant = faiss.IndexFlatIP(d)
            ivf = faiss.IndexIVFFlat(quant, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.cp.niter = niter
            ivf.cp.seed = seed
            ivf.cp.min_points_per_centroid = 1
            ivf.cp.max_points_per_centroid = 1 << 20
            x = self.keys[hh, a:b].numpy()
            ivf.train(x)
            ivf.add_with_ids(x, np.arange(a, b, dtype=np.int64))
            lof = np.full(t_max, -1, dtype=np.int64)
            for lst in range(self.nlist):
                n = ivf.invlists.list_size(lst)
                if n:
                    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n)
                    lof[np.asarray(ids, dtype=np.int64)] = lst
            self.indexes.append(ivf)
            self.list_of.append(lof)
            self._quantizers.append(quant)               # keep the quantizer alive
        self.indexed_end = b

    def _extend(self, b: int) -> None:
        """Adds middle-zone tokens ``[indexed_end, b)`` to every head's index."""
        if b <= self.indexed_end:
            return
        a = self.indexed_end
        for hh, ivf in enumerate(self.indexes):
            x = self.keys[hh, a:b].numpy()
            ivf.add_with_ids(x, np.arange(a, b, dtype=np.int64))
            _, lst = ivf.quantizer.search(x, 1)          # the list ``add`` used
            self.list_of[hh][a:b] = lst[:, 0]
        self.indexed_end = b

    def list_sizes(self) -> torch.Tensor:
        """``[H, nlist]`` int64 tokens per inverted list."""
        return torch.tensor([[ivf.invlists.list_size(l) for l in range(self.nlist)]
                             for ivf in self.indexes], dtype=torch.int64)

    def prepare(self, query: torch.Tensor, t: int) -> _UnitSelector:
        """Ranks the lists for the decode query ``[Hq, D]`` at position ``t - 1``
        (adding tokens that left the recent window first); returns a callable
        ``budget -> [H, t]`` exact-set mask."""
        h = len(self.indexes)
        a, b = self.sinks, max(self.sinks, t - self.recent)
        self._extend(b)
        base = steady_mask(h, t, self.sinks, self.recent)
        if b <= a:
            return _UnitSelector(base, a, b, None, None)
        q = group_query(query.float(), h)
        order = torch.stack([
            torch.from_numpy(ivf.quantizer.search(q[hh].contiguous().numpy(), self.nlist)[1])
            for hh, ivf in enumerate(self.indexes)])             # [H, G, nlist]
        rk = UnionRanking(order, self.list_sizes())
        lof = torch.from_numpy(np.stack([l[a:b] for l in self.list_of]))  # [H, b-a]
        return _UnitSelector(base, a, b, rk, lof)

    def select(self, query: torch.Tensor, t: int, budget: float) -> torch.Tensor:
        """``[H, t]`` exact-set mask at ``budget`` middle tokens per KV head."""
        return self.prepare(query, t)(budget)


# ------------------------------------------------------------ wave index
def wave_sets(index, query: torch.Tensor, scale: float
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token sets one ``index.attend(query)`` uses, recomputed with the index's
    own selection (same config, same ranking).

    Args:
        index: a built ``WaveIndex`` over the prefix ``[0, T)``; query: ``[Hq, D]``.

    Returns:
        exact ``[H, T]`` bool (sinks, tail, retrieved clusters), estimated ``[H, T]``
        bool (tokens of estimated clusters), k_retrieved ``[H]``, and the
        selection's own estimate of the softmax mass outside the exact set
        ``[H, G]`` (from the index's cluster log-masses, as in accuracy-bounded mode).
    """
    from vllm_retro.attention import compute_dtype
    h, t = index.num_kv_heads, index.seq_len
    cdt = compute_dtype(index.dtype)
    q = group_query(query.to(cdt), h)
    steady_k = torch.cat([index.sink_keys, index.tail_keys], dim=1)
    steady_v = torch.cat([index.sink_values, index.tail_values], dim=1)
    _, lse_s = partial_attention(q, steady_k, steady_v, scale)
    exact = torch.zeros(h, t, dtype=torch.bool)
    exact[:, :index.sink_keys.shape[1]] = True
    exact[:, index.seq_len_clustered_end():] = True
    estimated = torch.zeros(h, t, dtype=torch.bool)
    c = index.num_clusters
    if c == 0:
        return exact, estimated, torch.zeros(h, dtype=torch.int64), torch.zeros(q.shape[:2])
    sel = index.select_clusters(q, scale, lse_s)
    ret = torch.zeros(h, c, dtype=torch.bool).scatter_(1, sel.retrieved, sel.retrieved_valid)
    est = torch.zeros(h, c, dtype=torch.bool).scatter_(1, sel.estimated, sel.estimated_valid)
    cid = index.cluster_ids()
    exact.scatter_(1, index.positions, torch.gather(ret, 1, cid))   # clustered tokens only
    estimated.scatter_(1, index.positions, torch.gather(est, 1, cid))
    # Estimated outside mass, as _bounded_retrieval computes it.
    logits = index.cluster_log_mass(q, scale)
    total = torch.logaddexp(torch.logsumexp(logits, dim=-1), lse_s)           # [H, G]
    mass = torch.exp(logits - total.unsqueeze(-1)) * ret.unsqueeze(1)
    est_outside = 1.0 - torch.exp(lse_s - total) - mass.sum(-1)
    return exact, estimated, sel.k_retrieved, est_outside


def cluster_token_budget(index, query: torch.Tensor, scale: float,
                         token_budget: float) -> int:
    """Clusters per KV head to retrieve so that the retrieved tokens, in the index's
    own ranking order and averaged over KV heads, come closest to ``token_budget``
    (at least 1). Used to set ``retrieval_fraction`` for a target read fraction.
    """
    from vllm_retro.attention import compute_dtype
    c = index.num_clusters
    if c == 0 or token_budget <= 0:
        return 1
    cdt = compute_dtype(index.dtype)
    q = group_query(query.to(cdt), index.num_kv_heads)
    steady_k = torch.cat([index.sink_keys, index.tail_keys], dim=1)
    steady_v = torch.cat([index.sink_values, index.tail_values], dim=1)
    _, lse_s = partial_attention(q, steady_k, steady_v, scale)
    sel = index.select_clusters(q, scale, lse_s)
    cum = torch.cumsum(torch.gather(index.sizes, 1, sel.retrieved), dim=1).double().mean(0)
    return int(torch.argmin((cum - token_budget).abs()).item()) + 1


def ranked_cluster_mask(index, scores: torch.Tensor, token_budget: float,
                        cluster_of: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact set from an arbitrary cluster ranking with a per-head token budget.

    Args:
        index: a built ``WaveIndex``; scores: ``[H, C]`` (higher first; ``-inf``
            never taken); token_budget: clustered tokens to read per KV head.

    Returns:
        ``[H, T]`` bool: sinks, tail and the top clusters taken while the tokens
        already taken are below the budget.
    """
    h, t, c = index.num_kv_heads, index.seq_len, index.num_clusters
    exact = torch.zeros(h, t, dtype=torch.bool)
    exact[:, :index.sink_keys.shape[1]] = True
    exact[:, index.seq_len_clustered_end():] = True
    if c == 0 or token_budget <= 0:
        return exact
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    sizes = torch.gather(index.sizes, 1, order).double()
    before = torch.cumsum(sizes, dim=1) - sizes
    take = (before < token_budget) & torch.isfinite(torch.gather(scores, 1, order))
    ret = torch.zeros(h, c, dtype=torch.bool).scatter_(1, order, take)
    cid = index.cluster_ids() if cluster_of is None else cluster_of
    tok = torch.gather(ret, 1, cid)
    exact.scatter_(1, index.positions, tok)
    return exact


def bounded_cluster_mask(index, logits: torch.Tensor, steady_lse: torch.Tensor,
                         eps: float, n_min: int, cap: int,
                         cluster_of: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accuracy-bounded exact set from arbitrary cluster logits (the library's
    ``_bounded_retrieval`` rule with ``logits`` in place of its log-masses).

    Clusters are ranked by softmax of ``logits`` summed over the group; the exact
    set is the shortest ranked prefix (``n_min <= k <= cap``) whose estimated
    outside mass is ``<= eps`` for every query head of the group.

    Args:
        index: built ``WaveIndex``; logits: ``[H, G, C]`` estimated log-mass per
            cluster; steady_lse: ``[H, G]`` lse of sinks + tail.

    Returns:
        exact ``[H, T]`` bool, k ``[H]``, estimated outside mass ``[H, G]`` at k.
    """
    h, g, c = logits.shape
    score = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(1)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    lg = torch.gather(logits, 2, order.unsqueeze(1).expand_as(logits))
    total = torch.logaddexp(torch.logsumexp(lg, dim=-1), steady_lse)
    mass = torch.exp(lg - total.unsqueeze(-1))
    outside = 1.0 - torch.exp(steady_lse - total).unsqueeze(-1) - torch.cumsum(mass, -1)
    ok = outside.amax(dim=1) <= eps
    k = torch.where(ok.any(dim=1), ok.int().argmax(dim=1) + 1,
                    torch.full((h,), c, dtype=torch.int64)).clamp(min=n_min, max=cap)
    take = torch.arange(c).unsqueeze(0) < k.unsqueeze(1)
    ret = torch.zeros(h, c, dtype=torch.bool).scatter_(1, order, take)
    exact = torch.zeros(h, index.seq_len, dtype=torch.bool)
    exact[:, :index.sink_keys.shape[1]] = True
    exact[:, index.seq_len_clustered_end():] = True
    cid = index.cluster_ids() if cluster_of is None else cluster_of
    exact.scatter_(1, index.positions, torch.gather(ret, 1, cid))
    est_out = torch.gather(outside, 2, (k - 1).view(h, 1, 1).expand(h, g, 1)).squeeze(-1)
    return exact, k, est_out


def steady_lse(index, query: torch.Tensor, scale: float) -> torch.Tensor:
    """``[H, G]`` float64 log-sum-exp of the query ``[Hq, D]`` over the index's sinks + tail."""
    q = group_query(query.double(), index.num_kv_heads)
    k = torch.cat([index.sink_keys, index.tail_keys], dim=1)
    v = torch.cat([index.sink_values, index.tail_values], dim=1)
    return partial_attention(q, k, v, scale)[1]
