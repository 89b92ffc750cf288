"""Two-level cluster selection: can the score stage read fewer centroids?

Role: an accuracy study (issue 13's large-batch gap, issue 16's "two-level
centroids") on real SmolLM2 attention, before any kernel is written. On the GPU
the score stage reads every cluster's 8-bit centroid each step (~41% of a layer's
decode time at 128K x 6 on an H100). A two-level index groups each segment's
clusters into meta-clusters (spherical k-means over the centroids, ~``--fanout``
children each) with summaries of their own (size, size-weighted centroid and key
variance: what ``cluster_log_mass`` needs); a step would score the meta-clusters,
keep the best ones, and score only their children. Children of the other
meta-clusters are neither retrieved nor estimated (skipped), so the question is
how much attention mass the first level drops.

The simulation runs on the host index (``WaveIndex``, the harness's
``BASE_CONFIG`` as ``accuracy_vs_budget.py``'s "wave" rows): per query, the flat
selection at a target read fraction, then the same budget with the selection
restricted to the kept meta-clusters' children (the exact and estimated sets
both). Per (text, layer, query, query head) it records the relative error of the
output against float64 full attention, the fraction of centroids the two-level
step scores (meta-clusters + kept children, over all clusters), and how many of
the flat exact clusters the restriction loses.

Usage: python benchmarks/two_level_selection.py [--texts code,prose,json,table,needles]
       [--layers 2,8,15,22,29] [--num-queries 32] [--fractions 0.02,0.03]
       [--keeps 0.25,0.35,0.5] [--fanout 8] [--summary-bits 0|8]
       [--preset default|accuracy] [--out F]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from vllm_retro import WaveIndex, full_attention  # noqa: E402
from vllm_retro.attention import cluster_log_mass, group_query  # noqa: E402
from vllm_retro.config import PRESETS  # noqa: E402
from vllm_retro.kmeans import spherical_kmeans  # noqa: E402

import accuracy_vs_budget as A  # noqa: E402
import baselines as B  # noqa: E402
import capture_qkv  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "two_level_selection.json")


def meta_clusters(index: WaveIndex, fanout: int, block: int) -> Dict[str, torch.Tensor]:
    """Meta-clusters of ``index``'s clusters: per KV head, each run of ``block``
    consecutive clusters (about one segment: clusters are stored segment by
    segment) is grouped by spherical k-means over its centroids into
    ``ceil(n / fanout)`` meta-clusters.

    Returns ``{"of": [H, C] meta id of each cluster, "centroids": [H, M, D],
    "sizes": [H, M], "key_vars": [H, M, D]}``: the size-weighted mean centroid,
    the summed sizes and the size-weighted second moment about that mean (the
    children's own variances plus their spread), the summaries
    ``cluster_log_mass`` takes.
    """
    h, c, d = index.centroids.shape
    cen = index.centroids.double()
    sz = index.sizes.double()
    kv = index.key_vars.double()
    of = torch.empty(h, c, dtype=torch.int64)
    base = 0
    for a in range(0, c, block):
        b = min(c, a + block)
        m = max(1, math.ceil((b - a) / fanout))
        assign = spherical_kmeans(cen[:, a:b].float(), m, 8) if m > 1 else \
            torch.zeros(h, b - a, dtype=torch.int64)
        of[:, a:b] = assign + base
        base += m
    n_meta = base
    w = torch.zeros(h, n_meta, dtype=torch.float64).scatter_add_(1, of, sz)
    wc = torch.zeros(h, n_meta, d, dtype=torch.float64).scatter_add_(
        1, of.unsqueeze(-1).expand(-1, -1, d), sz.unsqueeze(-1) * cen)
    mc = wc / w.clamp_min(1).unsqueeze(-1)
    spread = kv + (cen - torch.gather(mc, 1, of.unsqueeze(-1).expand(-1, -1, d))) ** 2
    wv = torch.zeros(h, n_meta, d, dtype=torch.float64).scatter_add_(
        1, of.unsqueeze(-1).expand(-1, -1, d), sz.unsqueeze(-1) * spread)
    return {"of": of, "centroids": mc, "sizes": w,
            "key_vars": wv / w.clamp_min(1).unsqueeze(-1)}


def kept_clusters(index: WaveIndex, meta: Dict[str, torch.Tensor], query: torch.Tensor,
                  scale: float, keep: float) -> tuple:
    """``[H, C]`` bool: the children of the best meta-clusters per KV head, ranked
    as the flat selection ranks clusters (softmax of the estimated log-mass over
    the meta-clusters, summed over the GQA group), taken until their children
    cover ``keep`` of the clusters. Also returns the fraction of centroids scored
    (meta-clusters + kept children) / clusters, mean over heads."""
    q = group_query(query.double(), index.num_kv_heads)
    logm = cluster_log_mass(q, meta["centroids"], meta["sizes"], meta["key_vars"], scale,
                            index.config.variance_cap)
    score = torch.softmax(logm, dim=-1).nan_to_num(0.0).sum(dim=1)        # [H, M]
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    h, c = meta["of"].shape
    n_meta = meta["sizes"].shape[1]
    children = torch.zeros(h, n_meta, dtype=torch.float64).scatter_add_(
        1, meta["of"], torch.ones(h, c, dtype=torch.float64))
    cum = torch.cumsum(torch.gather(children, 1, order), dim=1)
    # Metas before the one that crosses ``keep * C``, and that one.
    take = (cum - torch.gather(children, 1, order)) < keep * c
    kept_meta = torch.zeros(h, n_meta, dtype=torch.bool).scatter_(1, order, take)
    kept = torch.gather(kept_meta, 1, meta["of"])
    scored = (n_meta + kept.sum(dim=1).double()).mean().item() / c
    return kept, scored


class Restricted:
    """Context in which ``index``'s selection sees only the ``kept`` clusters: the
    others' log-masses are -inf (ranked last, as a second pass that scores only the
    kept children), and they are dropped from the exact and estimated sets should
    the budget reach them. ``lost``: the share of the flat exact set (same config)
    outside ``kept``."""

    def __init__(self, index: WaveIndex, kept: torch.Tensor):
        self.index, self.kept = index, kept
        self.lost = 0.0

    def __enter__(self):
        idx, kept = self.index, self.kept
        select_orig = WaveIndex.select_clusters
        masking = [False]

        def log_mass(q, scale):
            logits = WaveIndex.cluster_log_mass(idx, q, scale)
            return logits.masked_fill(~kept.unsqueeze(1), float("-inf")) if masking[0] \
                else logits

        def select(q, scale, steady_lse, observe=False):
            flat = select_orig(idx, q, scale, steady_lse, False)
            lost = flat.retrieved_valid & ~torch.gather(kept, 1, flat.retrieved)
            self.lost = (lost.sum(dim=1).double()
                         / flat.retrieved_valid.sum(dim=1).clamp_min(1)).mean().item()
            masking[0] = True
            try:
                sel = select_orig(idx, q, scale, steady_lse, observe)
            finally:
                masking[0] = False
            return dataclasses.replace(
                sel, retrieved_valid=sel.retrieved_valid & torch.gather(kept, 1, sel.retrieved),
                estimated_valid=sel.estimated_valid & torch.gather(kept, 1, sel.estimated))

        idx.cluster_log_mass = log_mass
        idx.select_clusters = select
        return self

    def __exit__(self, *exc):
        del self.index.cluster_log_mass
        del self.index.select_clusters


def evaluate_layer(keys, values, queries, qpos, scale, fractions, keeps, fanout, block,
                   summary_bits=0, cfg=A.BASE_CONFIG):
    """Per (method, fraction): lists of per-query-head errors, per-query read and
    scored fractions, lost exact clusters. ``summary_bits`` 8: the clusters'
    centroids and key variances rounded as the GPU stores them
    (``accuracy_vs_budget.quantize_summaries``), before the meta-clusters are
    formed from them. ``cfg``: the index's options (the budget's fractions are set
    per query)."""
    p0 = int(qpos[0])
    idx = WaveIndex.build(keys[:, :p0].float(), values[:, :p0].float(), cfg)
    if summary_bits:
        A.quantize_summaries(idx, summary_bits)
    rows: Dict[tuple, Dict[str, List]] = {}

    def rec(key, **vals):
        r = rows.setdefault(key, {})
        for k, v in vals.items():
            r.setdefault(k, []).append(v)

    for i, p in enumerate(qpos):
        p = int(p)
        t = p + 1
        idx.append(keys[:, p:p + 1].float(), values[:, p:p + 1].float())
        if summary_bits:
            A.quantize_summaries(idx, summary_bits)
        meta = meta_clusters(idx, fanout, block)
        q = queries[i]
        ref = full_attention(q.double(), keys[:, :t].double(), values[:, :t].double(), scale)
        for f in fractions:
            idx.config = cfg
            steady = idx.sink_keys.shape[1] + idx.tail_len
            n = B.cluster_token_budget(idx, q.float(), scale, f * t - steady)
            rf = min(1.0, (n - 0.5) / idx.num_clusters)
            idx.config = cfg.replace(retrieval_fraction=rf, estimation_fraction=min(
                cfg.estimation_fraction, 1.0 - rf))
            out = idx.attend(q.float(), scale)
            rec(("flat", f), err=B.rel_error(out, ref).tolist(),
                frac=idx.last_stats.exact_fraction, scored=1.0, lost=0.0)
            for k in keeps:
                kept, scored = kept_clusters(idx, meta, q, scale, k)
                with Restricted(idx, kept) as r:
                    out = idx.attend(q.float(), scale)
                rec((f"keep {k:g}", f), err=B.rel_error(out, ref).tolist(),
                    frac=idx.last_stats.exact_fraction, scored=scored, lost=r.lost)
    return rows


def summarise(rows) -> Dict[str, dict]:
    out = {}
    for (method, f), r in rows.items():
        err = A._dist(torch.tensor([e for errs in r["err"] for e in errs],
                                   dtype=torch.float64))
        out.setdefault(method, {})[f"{f:g}"] = {
            "rel_err_median": err["median"],
            "rel_err_p90": err["p90"],
            "fraction_read": sum(r["frac"]) / len(r["frac"]),
            "centroids_scored": sum(r["scored"]) / len(r["scored"]),
            "exact_clusters_lost": sum(r["lost"]) / len(r["lost"]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", default="code,prose,json,table,needles")
    ap.add_argument("--layers", default="2,8,15,22,29")
    ap.add_argument("--num-queries", type=int, default=32)
    ap.add_argument("--fractions", default="0.02,0.03")
    ap.add_argument("--keeps", default="0.25,0.35,0.5")
    ap.add_argument("--fanout", type=int, default=8)
    ap.add_argument("--block", type=int, default=0,
                    help="clusters per meta-clustering run (0: segment_size / cluster_size)")
    ap.add_argument("--summary-bits", type=int, default=0, choices=(0, 8),
                    help="8: centroids and key variances in 8 bits, as on the GPU")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS),
                    help="the index's options: the harness's BASE_CONFIG with this preset")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    fractions = [float(x) for x in a.fractions.split(",")]
    keeps = [float(x) for x in a.keeps.split(",")]
    if not all(0 < k <= 1 for k in keeps) or a.fanout < 1:
        raise SystemExit("--keeps must be in (0, 1] and --fanout >= 1")
    layers = [int(x) for x in a.layers.split(",")]
    cfg = A.BASE_CONFIG.replace(**PRESETS[a.preset])
    block = a.block or cfg.segment_size // cfg.cluster_size
    t_start = time.time()
    res_texts = {}
    for text in a.texts.split(","):
        path = capture_qkv.default_out(text)
        if not os.path.exists(path):
            raise SystemExit(f"{path} missing: run benchmarks/capture_qkv.py --text {text} "
                             f"--layers {a.layers}")
        cap = torch.load(path, weights_only=False)
        qpos = [int(x) for x in cap["query_positions"]][-a.num_queries:]
        nq = len(qpos)
        all_rows: Dict[tuple, Dict[str, List]] = {}
        per_layer = {}
        for l in layers:
            t0 = time.time()
            rows = evaluate_layer(cap["keys"][l], cap["values"][l], cap["queries"][l][-nq:],
                                  qpos, cap["scale"], fractions, keeps, a.fanout, block,
                                  a.summary_bits, cfg)
            per_layer[l] = summarise(rows)
            for key, r in rows.items():
                for m, v in r.items():
                    all_rows.setdefault(key, {}).setdefault(m, []).extend(v)
            print(f"{text} layer {l}: {time.time() - t0:.1f}s", flush=True)
        res_texts[text] = {"all_layers": summarise(all_rows), "per_layer": per_layer}
        for method, by_f in res_texts[text]["all_layers"].items():
            for f, s in by_f.items():
                print(f"  {text:8s} {method:10s} read {s['fraction_read']:.4f} "
                      f"median {s['rel_err_median']:.4f} p90 {s['rel_err_p90']:.4f} "
                      f"scored {s['centroids_scored']:.3f} lost {s['exact_clusters_lost']:.4f}",
                      flush=True)
    res = {
        "description": "two-level cluster selection on real SmolLM2 attention: the flat "
                       "selection against the same budget restricted to the children of "
                       "the best meta-clusters",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": "python " + " ".join(sys.argv),
        "preset": a.preset, "wave_config": cfg.to_dict(),
        "fanout": a.fanout, "block": block, "summary_bits": a.summary_bits, "keeps": keeps,
        "fractions": fractions,
        "layers": layers, "num_queries": a.num_queries,
        "definitions": {
            "keep K": "meta-clusters taken best first until their children cover K of "
                      "the clusters; the exact and estimated sets restricted to them",
            "centroids_scored": "(meta-clusters + kept children) / clusters: the score "
                                "stage's centroid reads against the flat step's",
            "exact_clusters_lost": "share of the flat exact set outside the kept children",
            "rel_err": "||out - full||/||full|| per query head, full attention in float64",
        },
        "texts": res_texts,
        "elapsed_s": round(time.time() - t_start, 1),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    A.write_json(res, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
