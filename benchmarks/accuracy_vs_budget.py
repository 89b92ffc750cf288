"""Accuracy of sparse decode attention vs. fraction of tokens read, on real Q/K/V.

Role: the accuracy benchmark of the wave index against baselines, on the
post-RoPE attention data of SmolLM2-135M captured by ``capture_qkv.py`` (run
automatically when its file is missing).

For every chosen layer and every captured decode position ``p`` (the query at
``p`` attends the causal prefix, keys ``[0, p]``, ``T = p + 1`` tokens) it
computes the float64 dense reference and, for each target fraction ``f`` of
tokens read exactly (``f * T`` tokens per KV head, sinks and recent window
included), these methods:

* ``wave``: ``WaveIndex`` tripartite attention (exact sinks + tail + retrieved
  clusters, estimated clusters, rest skipped), estimation_fraction 0.232. The
  index is built once per layer over the prefix before the first query position
  (segment_size 2048, so the 8K context has several segments) and then grows
  with ``append`` one token per decode step, as in serving (the tail is the 64
  recent tokens plus the tokens decoded since, not yet clustered).
  ``retrieval_fraction`` is set per query to the cluster count whose tokens, in
  the index's own ranking, come closest to the target (averaged over KV heads).
* ``wave_noest``: the same without estimation (estimation_fraction 0).
* ``wave_first_order``: ``wave`` with the index's key variances set to zero, i.e.
  the first-order cluster log-mass ``q.c*s + ln size`` for ranking and
  estimation (the library's rule before the variance term).
* ``ivf``: faiss IndexIVFFlat, inner product, nlist = middle tokens / 16, lists
  probed in centroid-IP order until the target is reached; exact attention over
  every token of the probed lists (= IVF-Flat search with k = all scanned).
* ``quest``: Quest page selection (16-token pages, per-channel key min/max,
  bound ``sum_d max(q_d min_d, q_d max_d)``), top pages until the target.
* ``oracle``: the true top tokens (by true softmax probability); upper bound of
  any token-granular selection at that budget.
* ``sink_recent``: sinks (4) + recent window (64) only; one point.

IVF, Quest and oracle share the GQA policy of ``baselines.py`` (per query head
ranking, round-robin union per KV head, every query head of the group attends
the union) and always add sinks 4 + recent 64.

Metrics (per query head; means over query heads, positions and layers; also per
layer): ``rel_err = ||o - o_ref|| / ||o_ref||`` and ``recall`` = the true softmax
mass (float64, real keys) of the tokens attended exactly. For ``wave`` also
``recall_with_estimated`` (true mass of exact + estimated-cluster tokens) and
the estimated fraction. ``fraction_read`` is the measured exact-token fraction.

``wave_default``: one point at the library's default retrieval_fraction 0.018
(a fraction of clusters, not of tokens) with estimation 0.232.

Accuracy-bounded mode (``RetroConfig(error_bound=eps)`` with the mean estimate
of the outside mass, ``bound_margin`` None and the cap 25% (the one-sided rule, the
library's default, is the text axis' ``bounded_one_sided``), retrieval floor one
cluster, estimation 0.232): exact fraction read, the selection's own estimate of
the mass outside the exact set (from the clusters' log-masses, as
``_bounded_retrieval`` computes it), the TRUE outside mass (real keys, per query
head), the share of queries whose true outside mass is <= eps, the cap hit rate
and the output error (``bounded``: the library's log-mass ``q.c*s + ln size +
min(s^2/2 sum_d q_d^2 var_d, 2)``, ``var`` the per-cluster, per-channel key
variance the index stores; ``bounded_first_order``: the same index with zero
key variances, i.e. ``q.c*s + ln size``). ``bounded_variants_exact_only``
replays the same rule offline (exact part only, no estimation) with the
library's log-mass (``library``; its k must equal the library's,
``same_k_as_library``), the first-order one (``centroid``) and the uncapped
second-order one (``gauss``).

Ranking ablation (exact attention only, per-head token budget, same clusters):
the library's ranking (sum over the group of softmax of its log-mass, above)
against the first-order log-mass (``centroid``), softmax(q.c*s) without the size
term, max over the group of q.c (IVF-style), the uncapped second-order term
(``gauss``), and the oracle cluster ranking (true mass).
The ablation and the bounded variants run on every ``--ablation-stride``-th
decode position (default 4) to keep the runtime down.

Output: ``--out`` JSON plus a PNG of the same stem (rel. error and recall vs
fraction read) and ``<stem>_ranking.png`` (ranking ablation).

Text axis (``--texts code,prose,json,table,needles``, issue 16): one capture per
text kind (``capture_qkv.py --text KIND``); per text, layer and target read
fraction the median and p90 of the relative error and the median recall over
every query head and position, for oracle top-k, wave variants (``--variants``:
the library's ranking, ``shared_head_budget``, finer clusters, estimation and
window sizes), RetroInfer's fixed split (1.8% retrieved / 23.2% estimated), the
library default and ``error_bound`` (share of query heads whose true outside mass
is within the bound). Writes ``accuracy_texts.json`` + PNG. ``--decompose``
instead splits the error at 3% read into estimated-cluster mass, estimated-cluster
value and skipped clusters (``accuracy_decomposition.json``). Tables:
``docs/accuracy.md``.

Usage: python benchmarks/accuracy_vs_budget.py [--layers 2,8,15,22,29]
       [--fractions 0.005,0.01,0.02,0.03,0.05,0.1,0.2,1.0] [--eps 0.05,0.1,0.2]
       [--out benchmarks/results/accuracy_vs_budget.json] [--ablation-stride 4]
       [--threads 1]
       python benchmarks/accuracy_vs_budget.py --texts code,prose,json,table,needles
       [--variants wave,wave_shared,...] [--num-queries 32] [--decompose]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from vllm_retro import RetroConfig, WaveIndex, full_attention  # noqa: E402
from vllm_retro.attention import cluster_log_mass, group_query  # noqa: E402

import baselines as B  # noqa: E402
import capture_qkv  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "accuracy_vs_budget.json")
DEFAULT_FRACTIONS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 1.0)
DEFAULT_EPS = (0.05, 0.1, 0.2)
DEFAULT_LAYERS = (2, 8, 15, 22, 29)
# Fractions alone: the token floor (min_retrieval_tokens, 512 by default) would hide
# every fraction below 6.25% of this 8K capture.
BASE_CONFIG = RetroConfig(segment_size=2048, min_retrieval_tokens=0)
RANK_RULES = ("library", "centroid", "no_size", "max_qc", "gauss", "oracle_cluster")


def write_json(res: dict, path: str) -> None:
    """Write a result file with floats at 6 significant digits: the measurements'
    noise is far above that, and full float64 reprs double the files' size."""
    def rounded(x):
        if isinstance(x, float):
            return float(f"{x:.6g}") if math.isfinite(x) else x
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rounded(v) for v in x]
        return x
    with open(path, "w") as fh:
        json.dump(rounded(res), fh, indent=1)


def _record(acc: dict, key, **vals) -> None:
    for k, v in vals.items():
        acc[key][k].append(v.detach().double().reshape(-1) if torch.is_tensor(v)
                           else torch.tensor([float(v)], dtype=torch.float64))


def _frac(mask: torch.Tensor) -> float:
    """Mean over KV heads of the exact-token fraction of an ``[H, T]`` mask."""
    return mask.double().mean().item()


def first_order(index: WaveIndex) -> WaveIndex:
    """Shallow copy of ``index`` with zero key variances: its cluster log-mass is
    the first-order ``q.c*s + ln size`` (ranking, bound and estimation)."""
    fo = copy.copy(index)
    fo.key_vars = torch.zeros_like(index.key_vars)
    return fo


def rank_scores(index: WaveIndex, query: torch.Tensor, scale: float, probs: torch.Tensor,
                rule: str, cluster_of: torch.Tensor) -> torch.Tensor:
    """``[H, C]`` cluster scores of one ranking rule (see module doc); higher first.

    Args:
        index: built ``WaveIndex`` over ``[0, T)``; query ``[Hq, D]``;
        probs: ``[H, G, T]`` true probabilities (oracle rule only);
        cluster_of: ``index.cluster_ids()``.
    """
    h = index.num_kv_heads
    q = group_query(query.double(), h)
    sizes = index.sizes
    empty = (sizes == 0)
    qc = torch.einsum("hgd,hcd->hgc", q, index.centroids.double()) * scale
    qc = qc.masked_fill(empty.unsqueeze(1), float("-inf"))
    lns = torch.log(sizes.double()).unsqueeze(1)
    if rule == "library":
        sc = torch.softmax(index.cluster_log_mass(q, scale), -1).nan_to_num(0.0).sum(1)
    elif rule == "centroid":
        sc = torch.softmax(qc + lns, -1).nan_to_num(0.0).sum(1)
    elif rule == "no_size":
        sc = torch.softmax(qc, -1).sum(1)
    elif rule == "max_qc":
        sc = qc.amax(1)
    elif rule == "gauss":
        corr = 0.5 * scale ** 2 * torch.einsum("hgd,hcd->hgc", q * q,
                                               index.key_vars.double())
        sc = torch.softmax(qc + lns + corr, -1).nan_to_num(0.0).sum(1)
    elif rule == "oracle_cluster":
        pt = torch.gather(probs, 2, index.positions.unsqueeze(1).expand(-1, probs.shape[1], -1))
        sc = torch.zeros(h, index.num_clusters, dtype=torch.float64)
        sc.scatter_add_(1, cluster_of, pt.sum(1))
    else:
        raise ValueError(rule)
    return sc.masked_fill(empty, float("-inf"))


def evaluate_layer(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                   qpos: Sequence[int], scale: float, fractions: Sequence[float],
                   eps_list: Sequence[float], base: RetroConfig = BASE_CONFIG,
                   ablation_stride: int = 4) -> Dict[tuple, Dict[str, List[torch.Tensor]]]:
    """All methods on one layer.

    Args:
        keys, values: ``[H, T_max, D]`` float32; queries: ``[Q, Hq, D]`` for the
            increasing decode positions ``qpos`` (query ``i`` attends ``[0, qpos[i]]``).
        ablation_stride: run the ranking ablation and the bounded-mode variants on
            every ``ablation_stride``-th position (0: never).

    Returns:
        ``{(method, target): {metric: [tensor per query position]}}``.
    """
    acc: Dict[tuple, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    sinks, recent = base.sink_tokens, base.recent_tokens
    p0 = int(qpos[0])
    grown = WaveIndex.build(keys[:, :p0].float(), values[:, :p0].float(), base)
    quest = B.QuestPages(keys, page_size=16, sinks=sinks, recent=recent)
    ivf = B.FaissIVF(keys, p0 + 1, sinks=sinks, recent=recent, cluster_size=base.cluster_size)
    for i, p in enumerate(qpos):
        p = int(p)
        t = p + 1
        grown.append(keys[:, p:p + 1].float(), values[:, p:p + 1].float())
        index = WaveIndex.build(keys[:, :t].float(), values[:, :t].float(), base)
        assert index.seq_len == grown.seq_len == t and index.tail_len == recent
        kp, vp = keys[:, :t].double(), values[:, :t].double()
        q = queries[i]
        logits = B.true_logits(q, kp, scale)                              # [H, G, T]
        probs = torch.softmax(logits, dim=-1)
        ref = full_attention(q.double(), kp, vp, scale)

        def exact_method(name, target, mask):
            out = B.attention_from_logits(logits, vp, mask)
            _record(acc, (name, target), frac=_frac(mask), err=B.rel_error(out, ref),
                    recall=B.mass_of(probs, mask))

        def wave_method(name, target, idx, cfg):
            idx.config = cfg
            out = idx.attend(q.float(), scale)
            exact, est, k_ret, est_out = B.wave_sets(idx, q.float(), scale)
            st = idx.last_stats
            if abs(_frac(exact) - st.exact_fraction) > 1e-9:
                raise AssertionError(f"exact set mismatch {_frac(exact)} vs {st.exact_fraction}")
            rec = B.mass_of(probs, exact)
            steady = idx.sink_keys.shape[1] + idx.tail_len
            ret_tok = st.exact_fraction * t - steady
            mean_size = idx.num_clustered_tokens / max(1, idx.num_clusters)
            vals = dict(frac=st.exact_fraction, err=B.rel_error(out, ref), recall=rec,
                        recall_with_estimated=B.mass_of(probs, exact | est),
                        est_frac=st.estimated_fraction,
                        clusters_retrieved=st.clusters_retrieved,
                        retrieved_cluster_size_ratio=ret_tok / max(st.clusters_retrieved, 1e-9)
                        / mean_size)
            if cfg.error_bound is not None:
                cap = idx.bounded_cap(1)
                vals.update(true_outside=1.0 - rec, est_outside=est_out.reshape(-1),
                            capped=(k_ret >= cap).double())
            _record(acc, (name, target), **vals)

        def wave_budget(idx, total):
            """retrieval_fraction whose clusters come closest to ``total`` exact tokens."""
            idx.config = base
            steady = idx.sink_keys.shape[1] + idx.tail_len
            n = B.cluster_token_budget(idx, q.float(), scale, total - steady)
            return min(1.0, (n - 0.5) / idx.num_clusters)

        exact_method("sink_recent", 0.0, B.steady_mask(keys.shape[0], t, sinks, recent))
        selectors = {"oracle": B.oracle_topk(probs, sinks, recent),
                     "quest": quest.prepare(q, t), "ivf": ivf.prepare(q, t)}
        cid = index.cluster_ids()
        scores = {}
        do_abl = bool(ablation_stride) and i % ablation_stride == 0
        if do_abl:
            scores = {r: rank_scores(index, q, scale, probs, r, cid) for r in RANK_RULES}
            # Estimated log-mass per cluster for the bounded-mode variants.
            qg = group_query(q.double(), index.num_kv_heads)
            lg_first = (torch.einsum("hgd,hcd->hgc", qg, index.centroids.double()) * scale
                        + torch.log(index.sizes.double()).unsqueeze(1))
            bound_logits = {
                "library": index.cluster_log_mass(qg, scale),
                "centroid": lg_first,
                "gauss": lg_first + 0.5 * scale ** 2 *
                torch.einsum("hgd,hcd->hgc", qg * qg, index.key_vars.double())}
        ef0 = base.estimation_fraction
        index_fo = first_order(index)
        for f in fractions:
            total = f * t
            for name, sel in selectors.items():
                exact_method(name, f, sel(total - (min(sinks, t) + recent)))
            rf = wave_budget(index, total)
            wave_method("wave", f, index, base.replace(
                retrieval_fraction=rf, estimation_fraction=min(ef0, 1.0 - rf)))
            wave_method("wave_noest", f, index, base.replace(
                retrieval_fraction=rf, estimation_fraction=0.0))
            rf_fo = wave_budget(index_fo, total)
            wave_method("wave_first_order", f, index_fo, base.replace(
                retrieval_fraction=rf_fo, estimation_fraction=min(ef0, 1.0 - rf_fo)))
            rf = wave_budget(grown, total)
            wave_method("wave_append", f, grown, base.replace(
                retrieval_fraction=rf, estimation_fraction=min(ef0, 1.0 - rf)))
            steady = index.sink_keys.shape[1] + index.tail_len
            for rule, sc in scores.items():
                exact_method("rank_" + rule, f,
                             B.ranked_cluster_mask(index, sc, total - steady, cid))
        # The library's default operating point (retrieval 0.018, estimation 0.232).
        wave_method("wave_default", RetroConfig().retrieval_fraction, index, base)
        lse_st = B.steady_lse(index, q, scale) if do_abl else None
        for eps in eps_list:
            cfg = base.replace(retrieval_fraction=1e-4, error_bound=eps, **MEAN_BOUND)
            wave_method("bounded", eps, index, cfg)
            wave_method("bounded_first_order", eps, index_fo, cfg)
            if not do_abl:
                continue
            index.config = cfg
            cap = index.bounded_cap(1)
            k_lib = B.wave_sets(index, q.float(), scale)[2]
            for rule, lg in bound_logits.items():
                exact, k, est_out = B.bounded_cluster_mask(index, lg, lse_st, eps, 1, cap, cid)
                rec = B.mass_of(probs, exact)
                out = B.attention_from_logits(logits, vp, exact)
                _record(acc, ("bounded_" + rule, eps), frac=_frac(exact),
                        err=B.rel_error(out, ref), recall=rec, true_outside=1.0 - rec,
                        est_outside=est_out.reshape(-1), capped=(k >= cap).double(),
                        same_k_as_library=(k == k_lib).double())
    return acc


def _summ(vals: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(vals)


def summarise(per_layer: Dict[int, dict], layers: Sequence[int]) -> dict:
    """Per-method curves from the per-layer accumulators of :func:`evaluate_layer`."""
    keys = sorted({k for acc in per_layer.values() for k in acc}, key=lambda k: (k[0], k[1]))
    out: Dict[str, list] = defaultdict(list)
    for key in keys:
        name, target = key
        pt = {"error_bound" if name.startswith("bounded") else "target_fraction": target}
        metrics = per_layer[layers[0]][key].keys()
        for m in metrics:
            allv = torch.cat([_summ(per_layer[l][key][m]) for l in layers])
            lay = {str(l): _summ(per_layer[l][key][m]).mean().item() for l in layers}
            label = {"frac": "fraction_read", "err": "rel_err"}.get(m, m)
            pt[label] = allv.mean().item()
            pt[label + "_per_layer"] = lay
            if m in ("err", "true_outside", "frac"):
                pt[label + "_p95"] = torch.quantile(allv, 0.95).item()
            if m == "true_outside":
                pt["true_outside_max"] = allv.max().item()
                pt["share_true_outside_le_eps"] = (allv <= target).double().mean().item()
                pt["share_true_outside_le_eps_per_layer"] = {
                    str(l): (_summ(per_layer[l][key][m]) <= target).double().mean().item()
                    for l in layers}
            if m == "est_outside":
                pt["share_est_outside_le_eps"] = (allv <= target + 1e-12).double().mean().item()
        out[name].append(pt)
    return dict(out)


def interp_at(points: List[dict], f: float, metric: str) -> Optional[float]:
    """Metric at read fraction ``f``, linear in log(fraction) between measured
    points (None outside the measured range)."""
    pts = sorted((p["fraction_read"], p[metric]) for p in points if p["fraction_read"] < 0.999)
    for (f0, v0), (f1, v1) in zip(pts, pts[1:]):
        if f0 <= f <= f1 and f1 > f0:
            w = (math.log(f) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return v0 + w * (v1 - v0)
    return None


STYLE = {
    "wave": dict(color="C0", marker="o", label="wave index (tripartite)"),
    "wave_noest": dict(color="C9", marker="o", ls="--", label="wave index, no estimation"),
    "wave_first_order": dict(color="C5", marker="v", ls="--", lw=1,
                             label="wave index, first-order log-mass q.c s + ln size"),
    "wave_append": dict(color="C0", marker="x", ls=":", lw=1,
                        label="wave index, grown by append (tail 64..127)"),
    "ivf": dict(color="C1", marker="s", label="faiss IVF-Flat (IP)"),
    "quest": dict(color="C2", marker="^", label="Quest pages (16)"),
    "oracle": dict(color="k", marker=".", ls=":", label="oracle top-k tokens"),
}


def plot(res: dict, path: str) -> None:
    """Two panels: rel. error (log-log) and recall vs fraction read."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = res["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, st in STYLE.items():
        pts = sorted((p for p in curves.get(name, []) if p["fraction_read"] < 0.999),
                     key=lambda p: p["fraction_read"])
        if not pts:
            continue
        x = [p["fraction_read"] for p in pts]
        axes[0].plot(x, [p["rel_err"] for p in pts], **st)
        axes[1].plot(x, [p["recall"] for p in pts], **st)
        if name == "wave":
            axes[1].plot(x, [p["recall_with_estimated"] for p in pts], color="C0", ls="-.",
                         lw=1, label="wave: true mass of exact + estimated clusters")
    for p in curves.get("sink_recent", []):
        for ax, m in zip(axes, ("rel_err", "recall")):
            ax.plot([p["fraction_read"]], [p[m]], "rX", ms=10,
                    label="sinks 4 + recent 64 only")
    for p in curves.get("wave_default", []):
        for ax, m in zip(axes, ("rel_err", "recall")):
            ax.plot([p["fraction_read"]], [p[m]], "D", color="navy", ms=8, mfc="none",
                    label="wave, library default retrieval_fraction=0.018")
    for p in res.get("bounded", []):
        for ax, m in zip(axes, ("rel_err", "recall")):
            ax.plot([p["fraction_read"]], [p[m]], "*", color="C4", ms=13)
            ax.annotate(f"eps={p['error_bound']:g}", (p["fraction_read"], p[m]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8, color="C4")
    for p in res.get("bounded_first_order", []):
        for ax, m in zip(axes, ("rel_err", "recall")):
            ax.plot([p["fraction_read"]], [p[m]], "*", color="0.5", ms=11, mfc="none")
    axes[0].plot([], [], "*", color="C4", ms=13, label="wave, error_bound=eps")
    axes[0].plot([], [], "*", color="0.5", ms=11, mfc="none",
                 label="wave, error_bound=eps, first-order log-mass")
    axes[0].set(xscale="log", yscale="log", xlabel="fraction of tokens read exactly",
                ylabel="attention output rel. error ||o-o_ref||/||o_ref|| (mean)")
    axes[1].set(xscale="log", xlabel="fraction of tokens read exactly",
                ylabel="recall: true softmax mass of exactly attended tokens (mean)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    h, l = axes[1].get_legend_handles_labels()
    keep = [(hh, ll) for hh, ll in zip(h, l) if "estimated" in ll]
    axes[1].legend(*zip(*keep), fontsize=8, loc="lower right") if keep else None
    m = res["meta"]
    fig.suptitle(f"{m['model_short']}, {m['num_tokens']} tokens of {m['text_short']}, layers "
                 f"{','.join(map(str, m['layers']))}, {m['num_queries']} decode positions "
                 f"(sanity: max rel. err at 100% read = {res['sanity_max_err_at_full']:.1e})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ranking(res: dict, path: str) -> None:
    """Ranking ablation: rel. error and recall vs fraction read, exact-only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = res.get("ranking_ablation", {})
    if not curves:
        return
    labels = {"library": "sum_g softmax(q.c s + ln size + min(s^2/2 q^2.var, 2))  [library]",
              "centroid": "sum_g softmax(q.c s + ln size)  (first order)",
              "no_size": "sum_g softmax(q.c s)  (no ln size)",
              "max_qc": "max_g q.c  (IVF-style)",
              "gauss": "q.c s + ln size + s^2/2 q^2.var  (uncapped)",
              "oracle_cluster": "oracle cluster ranking (true mass)"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, (rule, lab) in enumerate(labels.items()):
        pts = sorted((p for p in curves.get(rule, []) if p["fraction_read"] < 0.999),
                     key=lambda p: p["fraction_read"])
        if not pts:
            continue
        x = [p["fraction_read"] for p in pts]
        ls = ":" if rule == "oracle_cluster" else "-"
        axes[0].plot(x, [p["rel_err"] for p in pts], marker="o", ls=ls, color=f"C{i}", label=lab)
        axes[1].plot(x, [p["recall"] for p in pts], marker="o", ls=ls, color=f"C{i}", label=lab)
    axes[0].set(xscale="log", yscale="log", xlabel="fraction of tokens read exactly",
                ylabel="rel. error (exact part only, no estimation)")
    axes[1].set(xscale="log", xlabel="fraction of tokens read exactly",
                ylabel="recall (true mass of exact set)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("wave-index clusters, cluster ranking rules at a per-head token budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(layers: Sequence[int], fractions: Sequence[float], eps_list: Sequence[float],
        out: str, data: str, num_queries: int = 0, ablation_stride: int = 4) -> dict:
    import faiss
    import transformers
    t_start = time.time()
    cap = capture_qkv.load_or_capture(data)
    meta = cap["meta"]
    missing = [l for l in layers if l not in cap["keys"]]
    if missing:
        raise SystemExit(f"layers {missing} not in the capture {data} (has {meta['layers']})")
    qpos = [int(x) for x in cap["query_positions"]]
    sel = list(range(len(qpos)))
    if num_queries and num_queries < len(qpos):
        sel = sel[-num_queries:]
    per_layer = {}
    for l in layers:
        t0 = time.time()
        per_layer[l] = evaluate_layer(cap["keys"][l], cap["values"][l],
                                      cap["queries"][l][sel], [qpos[i] for i in sel],
                                      cap["scale"], fractions, eps_list,
                                      ablation_stride=ablation_stride)
        print(f"layer {l}: {time.time() - t0:.1f}s", flush=True)
    curves = summarise(per_layer, list(layers))
    bounded = curves.pop("bounded", [])
    bounded_fo = curves.pop("bounded_first_order", [])
    bounded_variants = {k[len("bounded_"):]: curves.pop(k) for k in list(curves)
                        if k.startswith("bounded_")}
    ablation_curves = {k[len("rank_"):]: curves.pop(k) for k in list(curves) if k.startswith("rank_")}
    full = [p["rel_err"] for pts in curves.values() for p in pts
            if p.get("target_fraction") == 1.0]
    tables = {}
    for name, pts in curves.items():
        if name in ("sink_recent", "wave_default"):
            continue
        tables[name] = {f"{f:g}": {"rel_err": interp_at(pts, f, "rel_err"),
                                   "recall": interp_at(pts, f, "recall")}
                        for f in (0.01, 0.02, 0.05)}
        low = min(pts, key=lambda p: p["fraction_read"])
        tables[name]["lowest_point"] = {k: low[k] for k in ("fraction_read", "rel_err", "recall")}
    res = {
        "description": __doc__.split("\n")[0],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "faiss": faiss.__version__, "transformers": transformers.__version__},
        "meta": {
            "model": meta["model"], "model_short": "SmolLM2-135M-Instruct (Q4_1)",
            "text_source": meta["text_source"], "text_short": "Python stdlib source",
            "num_tokens": meta["num_tokens"], "layers": list(layers),
            "num_queries": len(sel), "query_positions": [qpos[sel[0]], qpos[sel[-1]]],
            "num_q_heads": meta["num_q_heads"], "num_kv_heads": meta["num_kv_heads"],
            "head_dim": meta["head_dim"], "scale": cap["scale"],
            "capture_output_check_max_rel_err": meta["output_check_max_rel_err"],
        },
        "wave_config": BASE_CONFIG.to_dict(),
        "baseline_config": {"sinks": BASE_CONFIG.sink_tokens, "recent": BASE_CONFIG.recent_tokens,
                            "quest_page_size": 16, "ivf_nlist": "ceil(middle tokens / 16)",
                            "ivf_exact_set": "all tokens of probed lists",
                            "gqa_policy": "per query head ranking, round-robin union per KV head"},
        "definitions": {
            "fraction_read": "tokens attended exactly (sinks, recent/tail, retrieved units) / "
                             "prefix tokens, mean over KV heads and queries",
            "rel_err": "||o - o_ref|| / ||o_ref|| per query head vs float64 dense attention",
            "recall": "true softmax mass (float64, real keys) of the tokens attended exactly",
            "recall_with_estimated": "wave only: true mass of exact + estimated-cluster tokens",
            "true_outside": "bounded mode: 1 - recall, per query head",
            "est_outside": "bounded mode: the selection's own estimate of the mass outside "
                           "the exact set from the clusters' log-masses (as "
                           "_bounded_retrieval computes it)",
            "cluster_log_mass": "library: ln size + s q.c + min(s^2/2 sum_d q_d^2 var_d, 2); "
                                "first_order: ln size + s q.c",
            "capped": "bounded mode: share of (KV head, query) whose exact set hit "
                      "max_retrieval_fraction",
            "table_at": "values at exactly 1/2/5% read, interpolated linearly in "
                        "log(fraction) between measured points (null: outside the range)",
        },
        "fractions": list(fractions), "error_bounds": list(eps_list),
        "methods": curves,
        "bounded": bounded,
        "bounded_first_order": bounded_fo,
        "bounded_variants_exact_only": bounded_variants,
        "ranking_ablation": ablation_curves,
        "table_at": tables,
        "sanity_max_err_at_full": max(full) if full else float("nan"),
        "runtime_s": round(time.time() - t_start, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(res, out)
    stem = os.path.splitext(out)[0]
    plot(res, stem + ".png")
    plot_ranking(res, stem + "_ranking.png")
    return res


# ===================================================================== text axis
# ``--texts``: the issue-16 measurement. One capture per text kind
# (``capture_qkv.py --text KIND``), a serving-like index per (layer, config): built
# over the prefix before the first captured position, then grown by ``append`` one
# token per decode step. Distributions (median, p90) over every query head of every
# captured position, per text kind and per layer.
TEXT_FRACTIONS = (0.01, 0.015, 0.02, 0.03, 0.05, 0.1)
TEXT_EPS = (0.2, 0.1, 0.05, 0.02, 0.01)
# RetroInfer's published operating point: 1.8% of clusters retrieved, 23.2% estimated.
RETROINFER = dict(retrieval_fraction=0.018, estimation_fraction=0.232)
GOAL = dict(read=0.03, median=0.02, p90=0.05, bound_share=0.99)

def _combo(**changes) -> tuple:
    """(changes, label) of a variant whose label just lists its changes."""
    return changes, "wave, " + ", ".join(k if v is True else f"{k} {v}" if isinstance(v, str)
                                         else f"{k} {v:g}"
                                         for k, v in changes.items())


# name -> (config changes over BASE_CONFIG, label). Index-shaping changes
# (cluster_size, recent_tokens, sink_tokens) get an index of their own.
TEXT_VARIANTS: Dict[str, tuple] = {
    "wave": ({}, "wave index (library ranking, estimation 0.232)"),
    "wave_est_all": ({"estimation_fraction": None},
                     "wave, every non-retrieved cluster estimated"),
    "wave_ef10": _combo(estimation_fraction=0.1),
    "wave_ef15": _combo(estimation_fraction=0.15),
    "wave_shared": ({"shared_head_budget": True},
                    "wave, shared_head_budget (clusters shared by the KV heads)"),
    "wave_cs8": _combo(cluster_size=8),
    "wave_recent32": ({"recent_tokens": 32}, "wave, recent window 32"),
    "wave_recent128": ({"recent_tokens": 128}, "wave, recent window 128"),
    "wave_sinks64": ({"sink_tokens": 64}, "wave, 64 sink tokens"),
    "wave_vcap1": ({"variance_cap": 1.0}, "wave, variance_cap 1 (ranking and estimation)"),
    "wave_vcap1_ef10": _combo(variance_cap=1.0, estimation_fraction=0.1),
    "wave_kv05": _combo(kmeans_value_weight=0.5),
    "wave_kv07": _combo(kmeans_value_weight=0.7),
    "wave_kv07_vcap1": _combo(kmeans_value_weight=0.7, variance_cap=1.0),
    "wave_shared_vcap1": _combo(shared_head_budget=True, variance_cap=1.0),
    "wave_shared_kv07": _combo(shared_head_budget=True, kmeans_value_weight=0.7),
    "wave_shared_kv07_vcap1": _combo(shared_head_budget=True, kmeans_value_weight=0.7,
                                     variance_cap=1.0),
    "wave_vc": ({"value_correction": True}, "wave, value_correction (rank-1)"),
    "wave_vc_vcap1": _combo(value_correction=True, variance_cap=1.0),
    "wave_kv07_vcap1_vc": _combo(kmeans_value_weight=0.7, variance_cap=1.0,
                                 value_correction=True),
    "wave_shared_kv07_vcap1_vc": _combo(shared_head_budget=True, kmeans_value_weight=0.7,
                                        variance_cap=1.0, value_correction=True),
    "wave_shared_vc_vcap1": _combo(shared_head_budget=True, variance_cap=1.0,
                                   value_correction=True),
    "wave_kv05_vcap1_vc": _combo(kmeans_value_weight=0.5, variance_cap=1.0,
                                 value_correction=True),
    "wave_shared_kv05_vcap1_vc": _combo(shared_head_budget=True, kmeans_value_weight=0.5,
                                        variance_cap=1.0, value_correction=True),
    # Fifth pass: error-aware choice of the exact clusters inside the candidate band,
    # alone and on top of earlier combinations.
    **{f"wave_{base}{tag}": _combo(**opts, retrieval_rank=rank)
       for base, opts in (
           ("", {}),
           ("shared_", dict(shared_head_budget=True)),
           ("kv05_vcap1_vc_", dict(kmeans_value_weight=0.5, variance_cap=1.0,
                                   value_correction=True)),
           ("shared_kv05_vcap1_vc_", dict(shared_head_budget=True, kmeans_value_weight=0.5,
                                          variance_cap=1.0, value_correction=True)),
           ("shared_kv07_vcap1_vc_", dict(shared_head_budget=True, kmeans_value_weight=0.7,
                                          variance_cap=1.0, value_correction=True)))
       for tag, rank in (("err", "error"), ("errv", "error_value"))},
    # Sixth pass: per-query adaptive exact budget (same mean read), alone and on top
    # of the fifth pass's best combinations.
    **{f"wave_{base}ad{tag}": _combo(**opts, adaptive_budget=a)
       for base, opts in (
           ("", {}),
           ("kv05_vcap1_vc_err_", dict(kmeans_value_weight=0.5, variance_cap=1.0,
                                       value_correction=True, retrieval_rank="error")),
           ("shared_kv05_vcap1_vc_errv_", dict(shared_head_budget=True,
                                               kmeans_value_weight=0.5, variance_cap=1.0,
                                               value_correction=True,
                                               retrieval_rank="error_value")),
           ("shared_kv07_vcap1_vc_errv_", dict(shared_head_budget=True,
                                               kmeans_value_weight=0.7, variance_cap=1.0,
                                               value_correction=True,
                                               retrieval_rank="error_value")))
       for tag, a in (("05", 0.5), ("09", 0.9))},
}
# 8-bit cluster summaries (design §6.4: the summaries are 2/3 of the bytes a GPU
# decode step reads at 128K): a benchmark-side simulation, not a library option.
# ``summary_bits`` 8 rounds each cluster's centroid and key variance (``"centroid"``:
# the centroid only) to int8 with one fp32 scale per (cluster, KV head) vector,
# max |x| / 127, after the build and after every append (idempotent: a rounded
# vector keeps its scale); the value sums stay full precision. Halves the score
# pass's bytes (or a quarter with the centroid only) at 128K.
SUMMARY_VARIANTS = {
    "wave_q8": ({"summary_bits": 8}, "wave, 8-bit centroids and key variances"),
    "wave_q8c": ({"summary_bits": 8, "summary_fields": "centroid"},
                 "wave, 8-bit centroids (key variances full precision)"),
    # mean_value_bits 8 on the GPU: the mean values (value sum / size) in 8 bits too.
    "wave_q8v": ({"summary_bits": 8, "summary_fields": "all"},
                 "wave, 8-bit centroids, key variances and mean values"),
    # The score stage's bytes per cluster and head: 8-bit centroid + 4-bit key
    # variance (unsigned, 0..15 times one scale: 192 B instead of 256 at D 128), or
    # no variance term at all (128 B).
    "wave_q8v4": ({"summary_bits": 8, "summary_fields": "var4"},
                  "wave, 8-bit centroids, 4-bit key variances"),
    "wave_q8_vcap0": ({"summary_bits": 8, "variance_cap": 0.0},
                      "wave, 8-bit centroids, no key-variance term"),
    # Ranked by the first-order log-mass (ln size + s q.c: the score stage reads the
    # centroids only, 128 B), estimated with the key-variance term (read for the
    # estimated clusters only).
    "wave_q8_rank1": ({"summary_bits": 8, "variance_term": "rank_first_order"},
                      "wave, 8-bit, ranked without the key-variance term"),
    # ... ranked with an isotropic variance term (one float per cluster and head:
    # s^2/2 |q|^2 mean_d var_d, capped as the full term), estimated with the full one.
    "wave_q8_rankiso": ({"summary_bits": 8, "variance_term": "rank_isotropic"},
                        "wave, 8-bit, ranked with an isotropic variance term"),
    # ... and estimated with it too (the per-channel variances not read at all).
    "wave_q8_iso": ({"summary_bits": 8, "variance_term": "isotropic"},
                    "wave, 8-bit, isotropic variance term (ranking and estimate)"),
    "wave_q8v4_rank1": ({"summary_bits": 8, "summary_fields": "var4",
                         "variance_term": "rank_first_order"},
                        "wave, 8-bit centroids, 4-bit variances, ranked without them"),
    "wave_shared_kv05_vcap1_vc_errv_q8": (
        {"shared_head_budget": True, "kmeans_value_weight": 0.5, "variance_cap": 1.0,
         "value_correction": True, "retrieval_rank": "error_value", "summary_bits": 8},
        "shared + kv 0.5 + cap 1 + vc + errv, 8-bit centroids and key variances"),
}
TEXT_VARIANTS.update(SUMMARY_VARIANTS)
# Seventh pass: the skipped clusters as one pseudo-token (rest_estimate), alone and on
# the fifth pass's best combinations.
TEXT_VARIANTS.update({
    f"wave_{base}rest{tag}": _combo(**TEXT_VARIANTS[f"wave_{base}".rstrip("_")][0],
                                    rest_estimate=w)
    for base in ("", "ef10_", "shared_kv07_vcap1_vc_errv_", "shared_kv05_vcap1_vc_errv_",
                 "shared_kv07_vcap1_vc_errv_ad09_", "shared_kv05_vcap1_vc_errv_ad09_")
    for tag, w in (("", 1.0), ("05", 0.5), ("025", 0.25))})
# ... each of the combinations above with 8-token clusters (twice the summaries per
# clustered token).
TEXT_VARIANTS.update({
    "wave_cs8_" + name[len("wave_"):]: _combo(cluster_size=8, **changes)
    for name, (changes, _) in list(TEXT_VARIANTS.items())
    if name.startswith(("wave_shared_kv05_vcap1_vc_errv", "wave_shared_kv07_vcap1_vc_errv"))})
# ... and with 4-token clusters (four times the summaries per token).
TEXT_VARIANTS.update({
    f"wave_cs4_{base}": _combo(cluster_size=4, **TEXT_VARIANTS[f"wave_{base}"][0])
    for base in ("shared_kv07_vcap1_vc_errv_rest05", "shared_kv05_vcap1_vc_errv_rest05")})
# Ablation of the 4-token stack: which parts carry the gain (what to port first).
TEXT_VARIANTS.update({
    "wave_cs4": _combo(cluster_size=4),
    "wave_cs4_vcap1": _combo(cluster_size=4, variance_cap=1.0),
    "wave_cs4_vcap1_vc": _combo(cluster_size=4, variance_cap=1.0, value_correction=True),
    "wave_cs4_vcap1_vc_errv": _combo(cluster_size=4, variance_cap=1.0, value_correction=True,
                                     retrieval_rank="error_value"),
    **{f"wave_cs{cs}_kv07_vcap1_vc_errv": _combo(cluster_size=cs, kmeans_value_weight=0.7,
                                                 variance_cap=1.0, value_correction=True,
                                                 retrieval_rank="error_value")
       for cs in (4, 8)},
    "wave_cs4_vcap1_rest05": _combo(cluster_size=4, variance_cap=1.0, rest_estimate=0.5),
    # The members the GPU path has (fifteenth session): no error rank.
    **{f"wave_cs{cs}_kv07_vcap1_vc": _combo(cluster_size=cs, kmeans_value_weight=0.7,
                                            variance_cap=1.0, value_correction=True)
       for cs in (4, 8)},
    # The GPU stack plus the mass-only error rank (no value term: what the decode
    # kernels can rank by from the score stage's outputs alone).
    **{f"wave_cs{cs}_kv07_vcap1_vc_err": _combo(cluster_size=cs, kmeans_value_weight=0.7,
                                                variance_cap=1.0, value_correction=True,
                                                retrieval_rank="error")
       for cs in (4, 8)},
    "wave_cs4_shared_kv07_vcap1_vc_errv": _combo(
        cluster_size=4, **TEXT_VARIANTS["wave_shared_kv07_vcap1_vc_errv"][0]),
})
TEXT_VARIANTS["wave_cs4_shared_kv07_vcap1_vc_errv_rest05_q8"] = _combo(
    **TEXT_VARIANTS["wave_cs4_shared_kv07_vcap1_vc_errv_rest05"][0], summary_bits=8)
# ... and with 8-bit summaries: the same summary bytes per token as 16-token clusters.
TEXT_VARIANTS["wave_cs8_shared_kv07_vcap1_vc_errv_ad09_rest05_q8"] = _combo(
    **TEXT_VARIANTS["wave_cs8_shared_kv07_vcap1_vc_errv_ad09_rest05"][0], summary_bits=8)
SIM_FIELDS = ("summary_bits", "summary_fields", "variance_term")
# The GPU path's semantics: the decode kernels' torch twin
# (``reference.paged_decode_attention``) over the paged index in a bf16 cache, with
# the kernels' bucket selection; the index built once over the prompt (the tokens
# before the first captured position), every later token in the steady tail, as
# serving does between updates. ``retrieval_rank`` "error": the kernels' error rank
# (``reference.error_proxy``). Recall is not measured for these rows (NaN).
PAGED_SELECT = "bucket"
_GPU_STACK = dict(kmeans_value_weight=0.7, variance_cap=1.0, value_correction=True)
PAGED_VARIANTS: Dict[str, tuple] = {
    **{f"paged_cs{cs}_kv07_vcap1_vc{tag}": (
        dict(cluster_size=cs, **_GPU_STACK, **rank),
        f"GPU twin (bf16, bucket), cluster_size {cs}, kmeans_value_weight 0.7, "
        f"variance_cap 1, value_correction" + (", retrieval_rank error" if rank else ""))
       for cs in (4, 8, 16) for tag, rank in (("", {}), ("_err", dict(retrieval_rank="error")))},
    # The same in a float32 cache: what the bf16 rounding of K/V and summaries costs.
    "paged32_cs4_kv07_vcap1_vc_err": (
        dict(cluster_size=4, **_GPU_STACK, retrieval_rank="error", cache_dtype="float32"),
        "GPU twin (fp32 cache, bucket), cluster_size 4, kmeans_value_weight 0.7, "
        "variance_cap 1, value_correction, retrieval_rank error"),
    "paged_cs4_kv05_vcap1_vc_err": (
        dict(cluster_size=4, kmeans_value_weight=0.5, variance_cap=1.0,
             value_correction=True, retrieval_rank="error"),
        "GPU twin (bf16, bucket), cluster_size 4, kmeans_value_weight 0.5, variance_cap 1, "
        "value_correction, retrieval_rank error"),
    # The estimated band's size (its mean values and corrections are most of the
    # stack's bytes after the summaries).
    **{f"paged_cs4_kv07_vcap1_vc_err_ef{round(ef * 100):02d}": (
        dict(cluster_size=4, **_GPU_STACK, retrieval_rank="error", estimation_fraction=ef),
        "GPU twin (bf16, bucket), cluster_size 4, kmeans_value_weight 0.7, variance_cap 1, "
        f"value_correction, retrieval_rank error, estimation_fraction {ef:g}")
       for ef in (0.05, 0.1, 0.3)},
    "paged": ({}, "GPU twin (bf16, bucket), library options"),
    # The library options with a smaller estimated band (fewer mean values read,
    # a shorter estimated zone in the attention kernel).
    **{f"paged_ef{round(ef * 100):02d}": (
        dict(estimation_fraction=ef),
        f"GPU twin (bf16, bucket), library options, estimation_fraction {ef:g}")
       for ef in (0.05, 0.1, 0.15)},
    "paged_err": (dict(retrieval_rank="error"), "GPU twin (bf16, bucket), retrieval_rank error"),
}
TEXT_VARIANTS.update(PAGED_VARIANTS)


def _rounded(x: torch.Tensor, top: float) -> torch.Tensor:
    """``x`` rounded to integers times one scale per last-dim vector (max|x| / top)."""
    sc = x.abs().amax(dim=-1, keepdim=True) / top
    sc = torch.where(sc > 0, sc, torch.ones_like(sc))
    return (torch.round(x / sc).clamp(-top, top) * sc).to(x.dtype)


def quantize_summaries(idx: WaveIndex, bits: int, fields: str = "both") -> None:
    """Rounds ``idx``'s centroids (and key variances, ``fields`` "both", or those at 4
    bits unsigned, "var4"; and the mean values, ``fields`` "all": each cluster's
    value sum becomes its size times the rounded mean) in place to ``bits``-bit
    integers with one scale per (KV head, cluster) vector."""
    top = float(2 ** (bits - 1) - 1)
    names = ("centroids", "key_vars") if fields in ("both", "all") else ("centroids",)
    for name in names:
        x = getattr(idx, name)
        if x.numel():
            setattr(idx, name, _rounded(x, top))
    if fields == "var4" and idx.key_vars.numel():
        # non-negative: 4 bits unsigned, 0..15 times max / 15
        idx.key_vars = _rounded(idx.key_vars, 15.0)
    if fields == "all" and idx.value_sums.numel():
        n = idx.sizes.clamp_min(1).unsqueeze(-1).to(idx.value_sums.dtype)
        idx.value_sums = _rounded(idx.value_sums / n, top) * n


def _channel_mean(key_vars: torch.Tensor) -> torch.Tensor:
    """Each cluster's key variance averaged over channels, in every channel (a view)."""
    return key_vars.mean(-1, keepdim=True).expand_as(key_vars)


def simulate_variance_term(idx: WaveIndex, form: str) -> None:
    """Changes the key-variance term of ``idx``'s cluster log-masses (a simulation):
    "rank_first_order" ranks by ``ln size + s q.c`` (no term), "rank_isotropic" by
    the term with each cluster's key variance averaged over channels (``min(s^2/2
    |q|^2 mean_d var_d, cap)``), both keeping the full log-mass for the estimate (the
    selection's ``log_mass`` replaced after ranking); "isotropic" replaces the
    index's key variances by their channel means, so ranking and estimate alike use
    the averaged term (the GPU's ``variance_form`` "isotropic", whose estimate is the
    score stage's log-mass); call it again after each append (new segments)."""
    if form == "isotropic":
        if idx.key_vars.numel():
            idx.key_vars = _channel_mean(idx.key_vars).clone()
        return
    select = idx.select_clusters

    def changed(q_, s_):
        if form == "rank_first_order":
            return cluster_log_mass(q_, idx.centroids, idx.sizes, None, s_)
        return cluster_log_mass(q_, idx.centroids, idx.sizes, _channel_mean(idx.key_vars), s_,
                                idx.config.variance_cap)

    def ranked(q, scale, steady_lse, observe=False):
        full = idx.cluster_log_mass(q, scale)
        idx.cluster_log_mass = changed
        try:
            sel = select(q, scale, steady_lse, observe)
        finally:
            del idx.cluster_log_mass
        return dataclasses.replace(sel, log_mass=full)

    idx.select_clusters = ranked


# The accuracy-bounded mode at every eps, two rules: the one-sided estimate of the
# outside mass (the library's defaults, read from them: margin 0.5 nats, cap half
# the clusters) and the mean estimate (``bound_margin`` None, cap 25%: the
# library's rule before).
ONE_SIDED = dict(bound_margin=BASE_CONFIG.bound_margin,
                 max_retrieval_fraction=BASE_CONFIG.max_retrieval_fraction)
MEAN_BOUND = dict(bound_margin=None, max_retrieval_fraction=0.25)
INDEX_FIELDS = ("cluster_size", "recent_tokens", "sink_tokens", "segment_size",
                "kmeans_iters", "kmeans_value_weight", "value_correction")


def _variant_cfg(changes: dict, rf: float) -> RetroConfig:
    """Config of a variant at retrieval fraction ``rf`` (estimation_fraction None:
    every cluster not retrieved is estimated)."""
    ch = {k: v for k, v in changes.items() if k not in SIM_FIELDS}
    ef = ch.pop("estimation_fraction", BASE_CONFIG.estimation_fraction)
    ef = 1.0 - rf if ef is None else min(ef, 1.0 - rf)
    return BASE_CONFIG.replace(retrieval_fraction=rf, estimation_fraction=ef, **ch)


def paged_text_points(acc: dict, name: str, keys: torch.Tensor, values: torch.Tensor,
                      queries: torch.Tensor, qpos: Sequence[int], scale: float,
                      fractions: Sequence[float]) -> None:
    """Points of a :data:`PAGED_VARIANTS` variant: per query and target read
    fraction ``f``, the header's retrieved count is the number of mean-size clusters
    that fill ``f * context`` minus the steady tokens (at least one), the
    estimated count ``estimation_fraction`` of the clusters; the read recorded is
    the twin's own count."""
    from paged_vs_wave import PagedPrompt
    changes = dict(PAGED_VARIANTS[name][0])
    rank = changes.pop("retrieval_rank", "mass")
    dtype = getattr(torch, changes.pop("cache_dtype", "bfloat16"))
    cfg = BASE_CONFIG.replace(**changes)
    idx = PagedPrompt(keys.float(), values.float(), int(qpos[0]), cfg, dtype)
    c = idx.num_clusters
    clustered = max(1, idx.clustered_end - idx.sink_end)
    n_est_of = lambda n_ret: min(c - n_ret, math.ceil(cfg.estimation_fraction * c))
    for i, p in enumerate(qpos):
        t = int(p) + 1
        q = queries[i].to(dtype).float()
        ref = full_attention(queries[i].double(), keys[:, :t].double(),
                             values[:, :t].double(), scale)
        steady = idx.sink_end + t - idx.clustered_end
        for f in fractions:
            n_ret = max(1, min(c, round((f * t - steady) * c / clustered)))
            idx.set_budget(n_ret, n_est_of(n_ret))
            out, st = idx.attend(q, t, scale, PAGED_SELECT, rank)
            _record(acc, (name, f), frac=(st[0] / st[2]).item(),
                    err=B.rel_error(out, ref),
                    recall=torch.full((queries.shape[1],), float("nan"), dtype=torch.float64))


def evaluate_text_layer(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                        qpos: Sequence[int], scale: float, fractions: Sequence[float],
                        eps_list: Sequence[float], variants: Sequence[str]
                        ) -> Dict[tuple, Dict[str, List[torch.Tensor]]]:
    """Wave variants, oracle top-k, RetroInfer's split, the library default and the
    accuracy-bounded mode on one layer of one text (see the text-axis note above).

    Returns ``{(method, target): {metric: [tensor per query position]}}`` with
    per-query-head ``err`` and ``recall`` and per-query ``frac``.
    """
    acc: Dict[tuple, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
    p0 = int(qpos[0])
    for v in [v for v in variants if v in PAGED_VARIANTS]:
        paged_text_points(acc, v, keys, values, queries, qpos, scale, fractions)
    variants = [v for v in variants if v not in PAGED_VARIANTS]
    idx_cfgs = {}

    def key_of(ch):
        return tuple((f, ch.get(f, getattr(BASE_CONFIG, f))) for f in INDEX_FIELDS) + \
            tuple((f, ch.get(f)) for f in SIM_FIELDS)

    for v in variants:
        ch = TEXT_VARIANTS[v][0]
        key = key_of(ch)
        idx_cfgs.setdefault(key, BASE_CONFIG.replace(**{f: x for f, x in key
                                                        if f not in SIM_FIELDS}))
    # retrieval_rank "error_value" needs each cluster's value spread, stored at build:
    # every index stores it when a variant needs it (the other variants ignore it).
    if any(TEXT_VARIANTS[v][0].get("retrieval_rank") == "error_value" for v in variants):
        idx_cfgs = {k: c.replace(retrieval_rank="error_value") for k, c in idx_cfgs.items()}
    indexes = {k: WaveIndex.build(keys[:, :p0].float(), values[:, :p0].float(), c)
               for k, c in idx_cfgs.items()}
    quant = {k: (dict(k)["summary_bits"], dict(k)["summary_fields"] or "both")
             for k in indexes if dict(k)["summary_bits"]}
    for k, (bits, fields) in quant.items():
        quantize_summaries(indexes[k], bits, fields)
    for k, idx in indexes.items():
        if dict(k)["variance_term"]:
            simulate_variance_term(idx, dict(k)["variance_term"])

    def index_of(changes):
        return indexes[key_of(changes)]

    if key_of({}) not in indexes:   # the reference rows (RetroInfer, default) need it
        indexes[key_of({})] = WaveIndex.build(keys[:, :p0].float(), values[:, :p0].float(),
                                              BASE_CONFIG)
    base_index = index_of({})
    # adaptive_budget: each (variant, target) keeps its own difficulty history on the
    # shared index, swapped in around its attend (as one serving index would).
    histories: Dict[tuple, Optional[torch.Tensor]] = {}
    for i, p in enumerate(qpos):
        p = int(p)
        t = p + 1
        for k, idx in indexes.items():
            idx.append(keys[:, p:p + 1].float(), values[:, p:p + 1].float())
            assert idx.seq_len == t
            if k in quant:
                quantize_summaries(idx, *quant[k])
            if dict(k)["variance_term"] == "isotropic":
                simulate_variance_term(idx, "isotropic")
        kp, vp = keys[:, :t].double(), values[:, :t].double()
        q = queries[i]
        logits = B.true_logits(q, kp, scale)
        probs = torch.softmax(logits, dim=-1)
        ref = full_attention(q.double(), kp, vp, scale)

        def wave_point(name, target, idx, cfg):
            idx.config = cfg
            out = idx.attend(q.float(), scale)
            exact, est, _, _ = B.wave_sets(idx, q.float(), scale)
            st = idx.last_stats
            if abs(_frac(exact) - st.exact_fraction) > 1e-9:
                raise AssertionError(f"exact set mismatch {_frac(exact)} vs {st.exact_fraction}")
            rec = B.mass_of(probs, exact)
            vals = dict(frac=st.exact_fraction, err=B.rel_error(out, ref), recall=rec,
                        recall_with_estimated=B.mass_of(probs, exact | est),
                        est_frac=st.estimated_fraction)
            if cfg.error_bound is not None:
                vals["true_outside"] = 1.0 - rec
            _record(acc, (name, target), **vals)

        st_sinks = base_index.sink_keys.shape[1]
        oracle = B.oracle_topk(probs, BASE_CONFIG.sink_tokens, BASE_CONFIG.recent_tokens)
        for f in fractions:
            total = f * t
            mask = oracle(total - (st_sinks + BASE_CONFIG.recent_tokens))
            out = B.attention_from_logits(logits, vp, mask)
            _record(acc, ("oracle", f), frac=_frac(mask), err=B.rel_error(out, ref),
                    recall=B.mass_of(probs, mask))
            for v in variants:
                ch = TEXT_VARIANTS[v][0]
                idx = index_of(ch)
                idx.config = _variant_cfg(ch, BASE_CONFIG.retrieval_fraction)
                steady = idx.sink_keys.shape[1] + idx.tail_len
                n = B.cluster_token_budget(idx, q.float(), scale, total - steady)
                rf = min(1.0, (n - 0.5) / idx.num_clusters)
                idx.adaptive_history = histories.get((v, f))
                wave_point(v, f, idx, _variant_cfg(ch, rf))
                histories[(v, f)] = idx.adaptive_history
                idx.adaptive_history = None
        wave_point("retroinfer", RETROINFER["retrieval_fraction"], base_index,
                   BASE_CONFIG.replace(**RETROINFER))
        wave_point("wave_default", RetroConfig().retrieval_fraction, base_index,
                   BASE_CONFIG.replace(min_retrieval_tokens=RetroConfig().min_retrieval_tokens))
        for eps in eps_list:
            wave_point("bounded", eps, base_index,
                       BASE_CONFIG.replace(retrieval_fraction=1e-4, error_bound=eps,
                                           **MEAN_BOUND))
            wave_point("bounded_one_sided", eps, base_index,
                       BASE_CONFIG.replace(retrieval_fraction=1e-4, error_bound=eps,
                                           **ONE_SIDED))
    return acc


def _dist(v: torch.Tensor) -> dict:
    return {"mean": v.mean().item(), "median": torch.quantile(v, 0.5).item(),
            "p90": torch.quantile(v, 0.9).item()}


def summarise_text(per_layer: Dict[int, dict], layers: Sequence[int]) -> Dict[str, list]:
    """Per-method points of one text: fraction read (mean), error and recall
    distributions over all query heads and positions, and per layer."""
    keys = sorted({k for acc in per_layer.values() for k in acc}, key=lambda k: (k[0], k[1]))
    out: Dict[str, list] = defaultdict(list)
    for name, target in keys:
        cat = lambda m, ls=layers: torch.cat([torch.cat(per_layer[l][(name, target)][m])
                                              for l in ls])
        pt = {"target": target, "fraction_read": cat("frac").mean().item(),
              "fraction_read_p90": torch.quantile(cat("frac"), 0.9).item()}
        err, rec = cat("err"), cat("recall")
        pt.update({f"rel_err_{k}": x for k, x in _dist(err).items()})
        pt.update({f"recall_{k}": x for k, x in _dist(rec).items()})
        pt["recall_p10"] = torch.quantile(rec, 0.1).item()
        m = per_layer[layers[0]][(name, target)]
        if "recall_with_estimated" in m:
            pt["recall_with_estimated_median"] = torch.quantile(
                cat("recall_with_estimated"), 0.5).item()
            pt["estimated_fraction"] = cat("est_frac").mean().item()
        if "true_outside" in m:
            to = cat("true_outside")
            pt["true_outside_p99"] = torch.quantile(to, 0.99).item()
            pt["share_true_outside_le_eps"] = (to <= target).double().mean().item()
        pt["per_layer"] = {}
        for l in layers:
            e, r = cat("err", [l]), cat("recall", [l])
            lay = {"fraction_read": cat("frac", [l]).mean().item(),
                   "rel_err_median": torch.quantile(e, 0.5).item(),
                   "rel_err_p90": torch.quantile(e, 0.9).item(),
                   "recall_median": torch.quantile(r, 0.5).item()}
            if "true_outside" in m:
                lay["share_true_outside_le_eps"] = (
                    cat("true_outside", [l]) <= target).double().mean().item()
            pt["per_layer"][str(l)] = lay
        out[name].append(pt)
    return dict(out)


def interp_read(points: List[dict], f: float, metric: str) -> Optional[float]:
    """``metric`` at read fraction ``f``, linear in log(fraction) between the two
    measured points around it (None outside the measured range)."""
    pts = sorted((p["fraction_read"], p[metric]) for p in points)
    for (f0, v0), (f1, v1) in zip(pts, pts[1:]):
        if f0 <= f <= f1 and f1 > f0:
            w = (math.log(f) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return v0 + w * (v1 - v0)
    return None


TEXT_STYLE = {"oracle": dict(color="k", marker=".", label="oracle top-k tokens (exact only)")}


def plot_texts(res: dict, path: str) -> None:
    """One panel per text: median (solid) and p90 (dashed) rel. error vs read, the
    goal box, RetroInfer's split and the default as single points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    texts = list(res["texts"])
    fig, axes = plt.subplots(1, len(texts), figsize=(4.2 * len(texts), 4.4), squeeze=False)
    names = ["oracle"] + list(res["variants"])
    # The default cycle repeats after 10 colours; more variants take tab20's.
    colour = (lambda j: plt.get_cmap("tab20")(j % 20)) if len(names) > 10 else \
        (lambda j: f"C{j}")
    for ax, text in zip(axes[0], texts):
        curves = res["texts"][text]["methods"]
        for j, name in enumerate(names):
            st = TEXT_STYLE.get(name, dict(color=colour(j), marker="o",
                                           label=res["variants"].get(name, name)))
            pts = sorted(curves.get(name, []), key=lambda p: p["fraction_read"])
            if not pts:
                continue
            x = [p["fraction_read"] for p in pts]
            ax.plot(x, [p["rel_err_median"] for p in pts], ms=4, **st)
            ax.plot(x, [p["rel_err_p90"] for p in pts], color=st["color"], ls="--", lw=1)
        for name, mk, lab in (("retroinfer", "D", "RetroInfer split 1.8% / 23.2% (median; p90 hollow)"),
                              ("wave_default", "s", "library default, floor 512 (median)")):
            for p in curves.get(name, []):
                ax.plot([p["fraction_read"]], [p["rel_err_median"]], mk, color="navy", ms=7,
                        label=lab)
                ax.plot([p["fraction_read"]], [p["rel_err_p90"]], mk, color="navy", ms=7,
                        mfc="none")
        g = res["goal"]
        ax.add_patch(matplotlib.patches.Rectangle((1e-3, 1e-4), g["read"] - 1e-3,
                                                  g["median"] - 1e-4, color="g", alpha=0.12))
        ax.plot([g["read"]], [g["p90"]], "g+", ms=12, mew=2)
        ax.set(xscale="log", yscale="log", xlim=(0.008, 0.13), ylim=(3e-3, 0.6),
               xlabel="fraction of tokens read exactly", title=text)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("attention output rel. error: median (solid), p90 (dashed)")
    h, l = axes[0][0].get_legend_handles_labels()
    uniq = dict(zip(l, h))
    fig.legend(uniq.values(), uniq.keys(), loc="lower center", ncol=3, fontsize=8)
    # Room for the legend below the panels (it grows with the variants).
    rows = math.ceil(len(uniq) / 3)
    fig.set_figheight(4.4 + 0.17 * rows)
    bottom = (0.17 * rows + 0.55) / (4.4 + 0.17 * rows)
    m = res["meta"]
    fig.suptitle(f"{m['model_short']}, {m['num_tokens']} tokens per text, layers "
                 f"{','.join(map(str, m['layers']))}, last {m['num_queries']} positions, every "
                 "head; green: goal (median <= 2% at <= 3% read; + p90 5%)", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_texts(texts: Sequence[str], layers: Sequence[int], fractions: Sequence[float],
              eps_list: Sequence[float], out: str, num_queries: int,
              variants: Sequence[str]) -> dict:
    """The text-axis benchmark over ``texts``; writes ``out`` (JSON) and its PNG."""
    t_start = time.time()
    unknown = [v for v in variants if v not in TEXT_VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {sorted(TEXT_VARIANTS)}")
    res_texts, meta0 = {}, None
    for text in texts:
        path = capture_qkv.default_out(text)
        if not os.path.exists(path):
            raise SystemExit(f"{path} missing: run benchmarks/capture_qkv.py --text {text} "
                             f"--layers {','.join(map(str, layers))}")
        cap = torch.load(path, weights_only=False)
        meta = cap["meta"]
        missing = [l for l in layers if l not in cap["keys"]]
        if missing:
            raise SystemExit(f"layers {missing} not in {path} (has {meta['layers']})")
        qpos = [int(x) for x in cap["query_positions"]]
        sel = list(range(len(qpos)))[-num_queries:] if num_queries else list(range(len(qpos)))
        per_layer = {}
        for l in layers:
            t0 = time.time()
            per_layer[l] = evaluate_text_layer(
                cap["keys"][l], cap["values"][l], cap["queries"][l][sel],
                [qpos[i] for i in sel], cap["scale"], fractions, eps_list, variants)
            print(f"{text} layer {l}: {time.time() - t0:.1f}s", flush=True)
        curves = summarise_text(per_layer, list(layers))
        at = {}
        for name in ["oracle"] + list(variants):
            at[name] = {f"{f:g}": {m: interp_read(curves[name], f, m)
                                   for m in ("rel_err_median", "rel_err_p90", "recall_median")}
                        for f in (0.02, 0.03)}
        res_texts[text] = {"text_source": meta["text_source"], "num_tokens": meta["num_tokens"],
                           "query_positions": [qpos[sel[0]], qpos[sel[-1]]],
                           "capture_output_check_max_rel_err": meta["output_check_max_rel_err"],
                           "methods": curves, "at_read": at}
        meta0 = meta0 or meta
    res = {
        "description": "accuracy vs read fraction per text type (issue 16)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "meta": {"model_short": "SmolLM2-135M-Instruct (Q4_1)", "model": meta0["model"],
                 "num_tokens": meta0["num_tokens"], "layers": list(layers),
                 "num_queries": len(sel), "num_q_heads": meta0["num_q_heads"],
                 "num_kv_heads": meta0["num_kv_heads"], "head_dim": meta0["head_dim"]},
        "goal": GOAL,
        "wave_config": BASE_CONFIG.to_dict(), "retroinfer": RETROINFER,
        "variants": {v: TEXT_VARIANTS[v][1] for v in variants},
        "variant_changes": {v: TEXT_VARIANTS[v][0] for v in variants},
        "definitions": {
            "fraction_read": "tokens attended exactly (sinks, recent/tail, retrieved "
                             "clusters) / prefix tokens, mean over KV heads and queries; "
                             "estimated clusters are not counted",
            "rel_err_*": "||o - o_ref|| / ||o_ref|| per query head vs float64 dense "
                         "attention; mean / median / p90 over heads, positions, layers",
            "recall_*": "true softmax mass of the tokens attended exactly, per query head",
            "oracle": "true top tokens by softmax probability (GQA union per KV head) + "
                      "sinks 4 + recent 64, exact attention only, no estimation",
            "retroinfer": "wave index at retrieval_fraction 0.018, estimation 0.232, no "
                          "token floor",
            "wave_default": "library defaults (retrieval 0.018, floor 512 tokens, "
                            "estimation 0.232) on segment_size 2048",
            "bounded": "error_bound=eps, the mean estimate (bound_margin None; floor one "
                       "cluster, cap 25%): share of query heads whose TRUE outside mass "
                       "is <= eps",
            "bounded_one_sided": "error_bound=eps with bound_margin %g (one-sided outside-"
                                 "mass estimate), cap %g%% (the library's defaults)" % (
                                     ONE_SIDED["bound_margin"],
                                     100 * ONE_SIDED["max_retrieval_fraction"]),
            "at_read": "median/p90 at exactly 2% and 3% read, linear in log(fraction) "
                       "between measured points (null: outside the measured range)",
        },
        "fractions": list(fractions), "error_bounds": list(eps_list),
        "texts": res_texts,
        "runtime_s": round(time.time() - t_start, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(res, out)
    plot_texts(res, os.path.splitext(out)[0] + ".png")
    return res


def print_texts(res: dict) -> None:
    r = lambda v: "  -  " if v is None else f"{100 * v:5.1f}"
    for text, tr in res["texts"].items():
        print(f"== {text}")
        for name, at in tr["at_read"].items():
            print(f"  {name:16s} " + "  ".join(
                f"@{f}: med {r(v['rel_err_median'])}% p90 {r(v['rel_err_p90'])}% "
                f"rec {r(v['recall_median'])}%" for f, v in at.items()))
        for name in ("retroinfer", "wave_default", "bounded", "bounded_one_sided"):
            for p in tr["methods"].get(name, []):
                extra = (f" share<=eps {p['share_true_outside_le_eps']:.3f}"
                         if "share_true_outside_le_eps" in p else "")
                print(f"  {name:12s} {p['target']:<6g} read {r(p['fraction_read'])}% med "
                      f"{r(p['rel_err_median'])}% p90 {r(p['rel_err_p90'])}%{extra}")


# ------------------------------------------------------------ error decomposition
DECOMP_COMBOS = ("est_mass_mean_value", "true_mass_mean_value", "est_mass_true_value",
                 "true_mass_true_value")


def decompose_layer(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                    qpos: Sequence[int], scale: float, target: float = 0.03,
                    stride: int = 4) -> Dict[str, List[torch.Tensor]]:
    """Where the wave index's error at ``target`` read comes from (float64).

    For every ``stride``-th position the index is built over the prefix and the
    library's exact/estimated split chosen for ``target``; the output is then
    recomputed with each estimated cluster's (log-mass, value) taken either from
    its summaries (``est``: the library's capped log-mass, mean value) or from its
    real keys (``true``: ``ln sum_i exp(s q.k_i)`` and the attention-weighted mean
    of its values). ``est_mass_mean_value`` is the library's own output;
    ``true_mass_true_value`` leaves only the skipped clusters as error. Also the
    log-mass error (est - true, nats) of the estimated clusters.
    """
    from vllm_retro.attention import partial_attention
    acc: Dict[str, list] = defaultdict(list)
    h = keys.shape[0]
    for i in range(0, len(qpos), stride):
        t = int(qpos[i]) + 1
        kp, vp = keys[:, :t].double(), values[:, :t].double()
        idx = WaveIndex.build(kp, vp, BASE_CONFIG)
        q = queries[i].double()
        ref = full_attention(q, kp, vp, scale)
        steady = idx.sink_keys.shape[1] + idx.tail_len
        n = B.cluster_token_budget(idx, q, scale, target * t - steady)
        idx.config = BASE_CONFIG.replace(retrieval_fraction=min(1.0, (n - 0.5) / idx.num_clusters))
        qg = group_query(q, h)
        g, c, d = qg.shape[1], idx.num_clusters, idx.head_dim
        sk = torch.cat([idx.sink_keys, idx.tail_keys], 1)
        sv = torch.cat([idx.sink_values, idx.tail_values], 1)
        out_s, lse_s = partial_attention(qg, sk, sv, scale)
        sel = idx.select_clusters(qg, scale, lse_s)
        ret = torch.zeros(h, c, dtype=torch.bool).scatter_(1, sel.retrieved, sel.retrieved_valid)
        est = torch.zeros(h, c, dtype=torch.bool).scatter_(1, sel.estimated, sel.estimated_valid)
        cid = idx.cluster_ids()
        tl = torch.einsum("hgd,htd->hgt", qg, idx.keys) * scale              # [H, G, N]
        mx = tl.amax(-1, keepdim=True)
        e = torch.exp(tl - mx)
        mass = torch.zeros(h, g, c, dtype=torch.float64).scatter_add_(
            2, cid.unsqueeze(1).expand_as(e), e)
        wv = torch.stack([torch.zeros(g, c, d, dtype=torch.float64).index_add_(
            1, cid[hh], e[hh].unsqueeze(-1) * idx.values[hh].unsqueeze(0)) for hh in range(h)])
        true_lm = torch.log(mass) + mx                                     # -inf if empty
        true_v = (wv / mass.clamp_min(1e-300).unsqueeze(-1)).nan_to_num(0.0)
        est_lm = idx.cluster_log_mass(qg, scale)
        mean_v = (idx.value_sums / idx.sizes.clamp_min(1).unsqueeze(-1)).unsqueeze(1).expand(
            -1, g, -1, -1)
        r1, e1 = ret.unsqueeze(1), est.unsqueeze(1)
        for name in DECOMP_COMBOS:
            lm_e = est_lm if name.startswith("est_mass") else true_lm
            v_e = mean_v if name.endswith("mean_value") else true_v
            lm = torch.where(r1, true_lm, torch.where(e1, lm_e, torch.full_like(true_lm,
                                                                              -math.inf)))
            vv = torch.where(r1.unsqueeze(-1), true_v, v_e)
            w = torch.softmax(torch.cat([lse_s.unsqueeze(-1), lm], -1), -1)
            out = w[..., :1] * out_s + torch.einsum("hgc,hgcd->hgd", w[..., 1:], vv)
            acc[name].append(B.rel_error(out.reshape(h * g, d), ref))
        acc["est_logmass_error"].append((est_lm - true_lm)[e1.expand_as(true_lm)
                                                          & torch.isfinite(true_lm)])
    return acc


def run_decomposition(texts: Sequence[str], layers: Sequence[int], out: str,
                      target: float = 0.03, stride: int = 4) -> dict:
    """:func:`decompose_layer` over texts and layers; writes ``out`` (JSON)."""
    t0 = time.time()
    res = {"description": "wave index error at %g read, decomposed: estimated clusters "
                          "from their summaries vs from their real keys" % target,
           "definitions": {
               "est_mass_mean_value": "the library's output: estimated clusters weigh "
                                      "their capped log-mass over their mean value",
               "true_mass_mean_value": "estimated clusters with their true log-mass "
                                       "ln sum_i exp(s q.k_i), mean value",
               "est_mass_true_value": "estimated log-mass, attention-weighted mean value",
               "true_mass_true_value": "estimated clusters exact: only skipped clusters err",
               "est_logmass_error": "nats, estimated - true log-mass of estimated clusters",
               "rel_err": "per query head vs float64 dense attention"},
           "target_read": target, "layers": list(layers), "position_stride": stride,
           "wave_config": BASE_CONFIG.to_dict(), "texts": {}}
    for text in texts:
        cap = torch.load(capture_qkv.default_out(text), weights_only=False)
        qpos = [int(x) for x in cap["query_positions"]]
        acc: Dict[str, list] = defaultdict(list)
        for l in layers:
            part = decompose_layer(cap["keys"][l], cap["values"][l], cap["queries"][l], qpos,
                                   cap["scale"], target, stride)
            for k, v in part.items():
                acc[k] += v
        res["texts"][text] = {k: _dist(torch.cat(v)) | {
            "p10": torch.quantile(torch.cat(v), 0.1).item()} for k, v in acc.items()}
        print(f"{text}: " + "  ".join(f"{k} med {100 * x['median']:.2f}% p90 "
                                      f"{100 * x['p90']:.2f}%" for k, x in
                                      res["texts"][text].items() if k in DECOMP_COMBOS),
              flush=True)
    res["runtime_s"] = round(time.time() - t0, 1)
    write_json(res, out)
    return res


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)))
    ap.add_argument("--fractions", default=None,
                    help="target read fractions (default: "
                         f"{','.join(f'{f:g}' for f in DEFAULT_FRACTIONS)}; text axis: "
                         f"{','.join(f'{f:g}' for f in TEXT_FRACTIONS)})")
    ap.add_argument("--eps", default=None,
                    help="error bounds of the accuracy-bounded mode (default "
                         f"{','.join(f'{f:g}' for f in DEFAULT_EPS)}; text axis: "
                         f"{','.join(f'{f:g}' for f in TEXT_EPS)})")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--data", default=capture_qkv.DEFAULT_OUT, help="capture file")
    ap.add_argument("--num-queries", type=int, default=0,
                    help="use only the last N captured positions (0: all)")
    ap.add_argument("--ablation-stride", type=int, default=4,
                    help="ranking ablation / bounded variants on every N-th position (0: off)")
    ap.add_argument("--texts", default="",
                    help="text-axis mode (issue 16): comma list of capture_qkv text kinds "
                         f"{capture_qkv.TEXT_KINDS}; writes --out (default "
                         "benchmarks/results/accuracy_texts.json)")
    ap.add_argument("--variants", default="wave,wave_est_all",
                    help=f"text-axis mode: wave variants, of {sorted(TEXT_VARIANTS)}")
    ap.add_argument("--decompose", action="store_true",
                    help="with --texts: only the error decomposition at 3%% read (estimated "
                         "clusters from summaries vs real keys) -> "
                         "benchmarks/results/accuracy_decomposition.json")
    ap.add_argument("--decompose-stride", type=int, default=4,
                    help="decomposition: every N-th captured position")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/faiss threads (default 1: on a shared 2-core machine more "
                         "threads oversubscribe and run ~8x slower; 0: library default)")
    a = ap.parse_args(argv)
    a.fractions_given, a.eps_given = a.fractions is not None, a.eps is not None
    if a.fractions is None:
        a.fractions = ",".join(f"{f:g}" for f in DEFAULT_FRACTIONS)
    if a.eps is None:
        a.eps = ",".join(f"{f:g}" for f in DEFAULT_EPS)
    if a.threads:
        import faiss
        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    if a.texts and a.decompose:
        out = a.out if a.out != DEFAULT_OUT else os.path.join(
            ROOT, "benchmarks", "results", "accuracy_decomposition.json")
        res = run_decomposition([x for x in a.texts.split(",") if x],
                                [int(x) for x in a.layers.split(",")], out,
                                stride=a.decompose_stride)
        print(f"wrote {out} in {res['runtime_s']}s")
        return
    if a.texts:
        fr = _floats(a.fractions) if a.fractions_given else TEXT_FRACTIONS
        eps = _floats(a.eps) if a.eps_given else TEXT_EPS
        out = a.out if a.out != DEFAULT_OUT else os.path.join(
            ROOT, "benchmarks", "results", "accuracy_texts.json")
        res = run_texts([x for x in a.texts.split(",") if x],
                        [int(x) for x in a.layers.split(",")], fr, eps, out, a.num_queries,
                        [x for x in a.variants.split(",") if x])
        print(f"wrote {out} (+ png) in {res['runtime_s']}s")
        print_texts(res)
        return
    res = run([int(x) for x in a.layers.split(",")], _floats(a.fractions), _floats(a.eps),
              a.out, a.data, a.num_queries, a.ablation_stride)
    print(f"wrote {a.out} (+ png) in {res['runtime_s']}s; "
          f"max rel err at 100% read: {res['sanity_max_err_at_full']:.2e}")
    rnd = lambda v: None if v is None else round(v, 4)
    for name, tab in res["table_at"].items():
        print(f"{name:12s} " + "  ".join(
            f"{f}: err {rnd(v['rel_err'])} rec {rnd(v['recall'])}"
            + (f" (at {v['fraction_read']:.4f})" if "fraction_read" in v else "")
            for f, v in tab.items()))
    for p in res["methods"].get("wave_default", []):
        print(f"wave_default rf=0.018: read {p['fraction_read']:.4f} err {p['rel_err']:.4f} "
              f"rec {p['recall']:.4f}")
    for name in ("bounded", "bounded_first_order"):
        for p in res[name]:
            print(f"{name} eps={p['error_bound']}: read {p['fraction_read']:.4f} "
                  f"true_out {p['true_outside']:.4f} (p95 {p['true_outside_p95']:.4f}) "
                  f"share<=eps {p['share_true_outside_le_eps']:.3f} est_out "
                  f"{p['est_outside']:.4f} capped {p['capped']:.3f} err {p['rel_err']:.4f}")
    for rule, pts in res["bounded_variants_exact_only"].items():
        for p in pts:
            print(f"bounded[{rule}] eps={p['error_bound']}: read {p['fraction_read']:.4f} "
                  f"true_out {p['true_outside']:.4f} share<=eps "
                  f"{p['share_true_outside_le_eps']:.3f} est_out {p['est_outside']:.4f} "
                  f"same_k_as_library {p['same_k_as_library']:.3f} err(exact only) "
                  f"{p['rel_err']:.4f}")


if __name__ == "__main__":
    main()
