"""What re-ranking only the last band costs in accuracy (``RetroConfig.rank_interval``).

Role: the accuracy measurement behind the GPU option ``rank_interval``, on the real
SmolLM2-135M attention that ``capture_qkv.py`` captured (the five texts of
``accuracy_vs_budget.py --texts``: consecutive decode positions, post-RoPE Q/K/V).

Per text, layer and decode position ``p`` (the last ``--num-queries`` captured ones)
a ``WaveIndex`` grown token by token (as in serving) attends the query at ``p``
with its clusters chosen from the query ``lag`` steps earlier:

* ``stale``: the earlier query's whole selection (retrieved, estimated, skipped)
  reused; the estimate and the exact attention use the current query.
* ``band``: the earlier query's band (its top ``n_retrieve + n_estimate`` clusters)
  re-ranked with the current query (softmax over the band, summed over the GQA
  group): its top ``n_retrieve`` exact, the rest of the band estimated, every
  cluster outside it skipped. This is what the decode kernels do between full
  rankings (the kernels' bucket ties aside).

Two more modes ask whether the ranking needs this step's normalization (the
softmax over the clusters per query head, which is why the GPU ranks in a kernel of
its own after the scores: the key kernel):

* ``znorm``: each query head's log-sum-exp over the clusters taken from the query
  ``lag`` steps earlier (a value the previous step could leave behind), the current
  query's log-masses normalized by it and summed over the GQA group;
* ``raw``: no per-head normalization at all (the masses summed over the group
  relative to the largest; ``lag`` does not enter);
* ``rawbin``: ``raw``'s keys relative to the largest log-mass of the query ``lag``
  steps earlier, selected as the kernels' bucket selection would with a window of
  the same 16 binades whose top is the binade above the group size (the keys'
  bound when the reference is this query's own largest): keys above or below the
  window share its end bins, ties to the lower cluster. What a score kernel writing
  its own keys with the previous step's reference would select.

``lag`` 0 is the full ranking every step (``stale``, ``band`` and ``znorm`` equal it).
With ``--isotropic`` every cluster's key variance is its mean over channels (the
GPU's ``variance_form`` "isotropic", which the options would combine with), for
ranking and estimate. Reported: median and 90th percentile of the relative error of
the attention output (per query head, against float64 full attention), per text
and mode and lag, and the fraction of tokens read exactly. Default options of
``accuracy_vs_budget.py`` (segment_size 2048, no token floor: ~3.5% read at 8K).

    python benchmarks/band_rerank_accuracy.py --texts code,prose,json,table,needles
    python benchmarks/band_rerank_accuracy.py --modes band,znorm,raw,rawbin \
        --lags 0,1,2,3 --out benchmarks/results/accuracy_rank_norm.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Dict, List, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import baselines as B  # noqa: E402
import capture_qkv  # noqa: E402
from accuracy_vs_budget import (BASE_CONFIG, simulate_variance_term,  # noqa: E402
                                write_json)
from vllm_retro import WaveIndex  # noqa: E402
from vllm_retro.attention import full_attention, group_query  # noqa: E402
from vllm_retro.kernels import reference as R  # noqa: E402
from vllm_retro.wave_index import ClusterSelection  # noqa: E402

MODES = ("stale", "band")
ALL_MODES = MODES + ("znorm", "raw", "rawbin")


class LaggedIndex(WaveIndex):
    """A wave index whose :meth:`attend` selects its clusters from another query
    (``selection_query``, ``[Hq, D]``; None: the attended one) as ``mode`` says."""

    selection_query = None
    mode = "band"

    def select_clusters(self, q, scale, steady_lse, observe=False):
        if self.mode in ("znorm", "raw", "rawbin"):
            # Same budget and sets' sizes as the full ranking; another order.
            cur = super().select_clusters(q, scale, steady_lse, observe)
            lg = cur.log_mass                                    # [H, G, C]
            if self.mode == "rawbin":
                return self._bucketed_raw(q, scale, cur)
            if self.mode == "raw":
                ref = lg.amax(dim=(1, 2), keepdim=True)
            elif self.selection_query is None:
                ref = torch.logsumexp(lg, -1, keepdim=True)
            else:
                qs = group_query(self.selection_query.to(q.dtype), self.num_kv_heads)
                ref = torch.logsumexp(self.cluster_log_mass(qs, scale), -1, keepdim=True)
            score = torch.exp(lg - ref).nan_to_num(0.0).sum(1)  # [H, C]
            order = torch.argsort(score, dim=1, descending=True, stable=True)
            return ClusterSelection(order, cur.retrieved_valid, order, cur.estimated_valid,
                                    cur.k_retrieved, lg)
        if self.selection_query is None:
            return super().select_clusters(q, scale, steady_lse, observe)
        qs = group_query(self.selection_query.to(q.dtype), self.num_kv_heads)
        prev = super().select_clusters(qs, scale, steady_lse, observe)
        if self.mode == "stale":
            return prev
        n_ret, n_est = self.budget()
        nb = min(self.num_clusters, n_ret + n_est)
        band = prev.retrieved[:, :nb]                            # [H, nb] cluster ids
        lg = self.cluster_log_mass(q, scale)                     # [H, G, C], this query
        lb = torch.gather(lg, 2, band.unsqueeze(1).expand(-1, lg.shape[1], -1))
        score = torch.softmax(lb, -1).nan_to_num(0.0).sum(1)     # over the band only
        order = torch.gather(band, 1, torch.argsort(score, dim=1, descending=True,
                                                    stable=True))
        order = torch.cat([order, prev.retrieved[:, nb:]], 1)
        return ClusterSelection(order, prev.retrieved_valid, order, prev.estimated_valid,
                                prev.k_retrieved, lg)

    def _bucketed_raw(self, q, scale, cur):
        """``rawbin``'s selection (see the module doc), as a ranking whose first
        ``n_ret`` are the retrieved and next ``n_est`` the estimated clusters."""
        lg = cur.log_mass                                        # [H, G, C]
        qs = q if self.selection_query is None else \
            group_query(self.selection_query.to(q.dtype), self.num_kv_heads)
        ref = self.cluster_log_mass(qs, scale).amax(dim=(1, 2), keepdim=True)
        key = torch.exp(lg - ref).nan_to_num(0.0).sum(1).float()  # [H, C]
        g = lg.shape[1]
        top = ((int(torch.tensor(float(g)).view(torch.int32)) >> 23) + 1) << R.SUB_BITS
        bits = key.view(torch.int32).long() >> (23 - R.SUB_BITS)
        dg = (bits - (top - R.NBINS)).clamp(0, R.NBINS - 1)
        n_ret, n_est = self.budget()
        c = self.num_clusters
        n_ret, n_est = min(n_ret, c), max(0, min(n_est, c - n_ret))
        orders = []
        for h in range(key.shape[0]):
            ret, est = R.bucket_selection(key[h], n_ret, n_est, g, digits=dg[h])
            used = torch.zeros(c, dtype=torch.bool)
            used[ret] = used[est] = True
            rest = torch.nonzero(~used).flatten()
            orders.append(torch.cat([ret, est, rest]))
        order = torch.stack(orders).to(lg.device)
        return ClusterSelection(order, cur.retrieved_valid, order, cur.estimated_valid,
                                cur.k_retrieved, lg)


def evaluate(text: str, layers: Sequence[int], lags: Sequence[int], num_queries: int,
             isotropic: bool = False, modes: Sequence[str] = MODES) -> Dict[str, dict]:
    cap = torch.load(capture_qkv.default_out(text), weights_only=False)
    qpos = [int(x) for x in cap["query_positions"]]
    if any(b - a != 1 for a, b in zip(qpos, qpos[1:])):
        raise SystemExit(f"{text}: the captured positions are not consecutive")
    scale = cap["scale"]
    first = len(qpos) - num_queries
    if first < max(lags):
        raise SystemExit(f"{text}: {len(qpos)} positions, need {num_queries} + {max(lags)}")
    errs: Dict[tuple, List[torch.Tensor]] = {(m, g): [] for m in modes for g in lags}
    read: List[float] = []
    for layer in layers:
        K, V, Q = cap["keys"][layer], cap["values"][layer], cap["queries"][layer]
        p0 = qpos[first]
        idx = LaggedIndex.build(K[:, :p0].float(), V[:, :p0].float(), BASE_CONFIG)
        for i in range(first, len(qpos)):
            p = qpos[i]
            idx.append(K[:, p:p + 1].float(), V[:, p:p + 1].float())
            if isotropic:   # (after every append: new segments bring per-channel ones)
                simulate_variance_term(idx, "isotropic")
            kp, vp = K[:, :p + 1].double(), V[:, :p + 1].double()
            ref = full_attention(Q[i].double(), kp, vp, scale)
            for mode in modes:
                idx.mode = mode
                for lag in lags:
                    idx.selection_query = Q[i - lag].float() if lag else None
                    out = idx.attend(Q[i].float(), scale)
                    errs[(mode, lag)].append(B.rel_error(out, ref))
                    if mode == modes[0] and lag == 0:
                        read.append(idx.last_stats.exact_fraction)
    res = {"exact_fraction": sum(read) / len(read), "modes": {}}
    for mode in modes:
        res["modes"][mode] = {}
        for lag in lags:
            e = torch.cat(errs[(mode, lag)]).double()
            res["modes"][mode][str(lag)] = {"rel_err_median": e.median().item(),
                                           "rel_err_p90": e.quantile(0.9).item()}
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    texts = list(res["texts"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, title in ((axes[0], "rel_err_median", "median"),
                              (axes[1], "rel_err_p90", "90th percentile")):
        for t in texts:
            for mode, ls in (("band", "-"), ("stale", ":"), ("znorm", "--"), ("raw", "-."),
                             ("rawbin", (0, (1, 1)))):
                if mode not in res["texts"][t]["modes"]:
                    continue
                d = res["texts"][t]["modes"][mode]
                lags = sorted(int(k) for k in d)
                ax.plot(lags, [100 * d[str(g)][metric] for g in lags], linestyle=ls,
                        marker="o", label=f"{t} {mode}")
        ax.set_xlabel("steps since the full ranking (lag)")
        ax.set_ylabel("relative error of the output (%)")
        ax.set_title(title)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("band re-ranking (solid), stale selection (dotted), earlier "
                 "normalization (dashed), none (dash-dot), none bucketed (dense dots); "
                 "SmolLM2-135M, "
                 f"layers {','.join(map(str, res['layers']))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", default="code,prose,json,table,needles")
    ap.add_argument("--layers", default="2,8,15,22,29")
    ap.add_argument("--lags", default="0,1,2,3,7")
    ap.add_argument("--num-queries", type=int, default=32)
    ap.add_argument("--isotropic", action="store_true",
                    help="each cluster's key variance as its mean over channels")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, of {','.join(ALL_MODES)}")
    ap.add_argument("--out", default="benchmarks/results/accuracy_band_rerank.json")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if not modes or any(m not in ALL_MODES for m in modes):
        raise SystemExit(f"--modes: choose from {','.join(ALL_MODES)}")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    layers = [int(x) for x in a.layers.split(",")]
    lags = [int(x) for x in a.lags.split(",")]
    t0 = time.time()
    res = {"description": "band re-ranking vs the stale selection (rank_interval)",
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "command": "python " + " ".join(sys.argv), "layers": layers,
           "num_queries": a.num_queries, "isotropic_variance": a.isotropic,
           "wave_config": BASE_CONFIG.to_dict(), "texts": {}}
    for text in a.texts.split(","):
        res["texts"][text] = evaluate(text, layers, lags, a.num_queries, a.isotropic, modes)
        m = res["texts"][text]["modes"]
        print(text, " ".join(f"{mode}[{g}] {100 * m[mode][g]['rel_err_median']:.2f}/"
                             f"{100 * m[mode][g]['rel_err_p90']:.2f}"
                             for mode in modes for g in m[mode]), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    write_json(res, a.out)
    plot(res, a.out.rsplit(".", 1)[0] + ".png")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
