"""The GPU path's semantics on real attention: the paged index's twin against the
host wave index, both against float64 full attention.

Role: the GPU decode kernels compute exactly :func:`vllm_retro.kernels.reference.
paged_decode_attention` (tested to 2e-6), so this twin on real SmolLM2 Q/K/V (the
capture of ``capture_qkv.py``) says how far the GPU path's design is from the CPU
path's (:class:`vllm_retro.wave_index.WaveIndex`) at the same options: segmentation
by ``plan_segments`` (the prompt indexed once, after its last token), sinks rounded
to a KV block, summaries stored in the KV dtype (float32 here, bf16 as on the GPU).
The prompt is the text before the first captured query position; every captured
query then decodes over the prompt plus the tokens after it. ``--select`` adds a
"paged bf16/fp32 <mode>" column per cluster-selection mode other than "exact" (e.g.
``bucket``, the kernels' near-tie selection).

    python benchmarks/paged_vs_wave.py [--data benchmarks/data/smollm2_qkv.pt]
        [--select exact,bucket]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_retro.attention import full_attention  # noqa: E402
from vllm_retro.config import RetroConfig  # noqa: E402
from vllm_retro.index.paged import (IndexAllocator, IndexPool,  # noqa: E402
                                    PagedIndexLayout, budget, build_segments, clusters_in,
                                    header_row, make_headers,
                                    plan_segments, sink_end)
from vllm_retro.kernels import reference  # noqa: E402
from vllm_retro.wave_index import WaveIndex  # noqa: E402

BS = 16


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


class PagedPrompt:
    """A prompt indexed as the GPU path indexes it (the twin's inputs): ``k``, ``v``
    ``[H, T, D]`` in a paged cache of ``dtype`` (block 0 holds the header), the
    index built once over the first ``prompt`` tokens by ``plan_segments``; every
    token after them is in the steady tail."""

    def __init__(self, k, v, prompt, cfg, dtype):
        h, t, d = k.shape
        self.cfg, self.prompt = cfg, prompt
        self.layout = lay = PagedIndexLayout.for_config(cfg, h, d, BS, dtype)
        epb = lay.entries_per_block
        nblk = math.ceil(t / BS)
        self.kv = kv = lay.make_cache(nblk + 1)
        kvv = torch.zeros(h, nblk * BS, 2 * d)
        kvv[:, :t, :d], kvv[:, :t, d:] = k, v
        kv[1:] = kvv.view(h, nblk, BS, 2 * d).permute(1, 0, 2, 3).to(dtype)
        blocks = torch.arange(1, nblk + 1)
        segs = plan_segments(0, prompt, prompt, cfg, BS)
        self.sink_end = S = sink_end(cfg, BS)
        self.pool = pool = IndexPool(lay, nblk * epb, summary_bits=cfg.summary_bits)
        self.alloc = alloc = IndexAllocator(nblk * epb, 1, nblk * epb)
        self.irow = alloc.acquire((segs[-1][1] - S) // BS * epb if segs else 0)
        groups = {}
        for job in alloc.segment_jobs(self.irow, blocks, segs, S, BS, epb):
            groups.setdefault(job.p1 - job.p0, []).append(job)
        for g in groups.values():
            build_segments(kv, lay, pool, g, cfg)
        self.headers = make_headers(nblk + 1, "cpu")
        self.clustered_end = segs[-1][1] if segs else 0
        self.num_clusters = sum(clusters_in(p1 - p0, cfg) for p0, p1 in segs)
        self.block_table = blocks.view(1, -1).int()
        self.set_budget(*budget(self.num_clusters, self.clustered_end - S, cfg))

    def set_budget(self, n_ret: int, n_est: int) -> None:
        """The header's (retrieved, estimated) cluster counts."""
        if self.clustered_end:
            self.headers[1] = torch.tensor(header_row(self.clustered_end, n_ret, n_est,
                                                      self.num_clusters, self.irow),
                                           dtype=torch.int32)

    def attend(self, q, context, scale, select="exact", retrieval_rank="mass"):
        """The twin's output ``[Hq, D]`` and statistics ``[3]`` (tokens read exactly,
        estimated, in context) for query ``q [Hq, D]`` over the first ``context``
        tokens."""
        out, st = reference.paged_decode_attention(
            q.unsqueeze(0), self.kv, self.layout, self.block_table,
            torch.tensor([context]), self.headers, self.alloc.ibt, self.pool,
            self.sink_end, scale, self.cfg.variance_cap, select=select,
            retrieval_rank=retrieval_rank)
        return out[0], st[0]


def paged_errors(k, v, queries, qpos, scale, cfg, dtype, select="exact"):
    """Relative errors and exact fractions of the paged twin for every query."""
    idx = PagedPrompt(k, v, int(qpos[0]), cfg, dtype)
    rank = cfg.retrieval_rank if cfg.retrieval_rank in reference.RANKS else "mass"
    errs, fracs = [], []
    for i, p in enumerate(qpos):
        p = int(p)
        q = queries[i].to(dtype).float()
        out, st = idx.attend(q, p + 1, scale, select, rank)
        ref = full_attention(queries[i].double(), k[:, :p + 1].double(),
                             v[:, :p + 1].double(), scale)
        errs.append(rel(out, ref))
        fracs.append((st[0] / st[2]).item())
    return errs, fracs


def wave_errors(k, v, queries, qpos, scale, cfg):
    prompt = int(qpos[0])
    idx = WaveIndex.build(k[:, :prompt].float(), v[:, :prompt].float(), cfg)
    errs, fracs = [], []
    done = prompt
    for i, p in enumerate(qpos):
        p = int(p)
        if p + 1 > done:
            idx.append(k[:, done:p + 1].float(), v[:, done:p + 1].float())
            done = p + 1
        out = idx.attend(queries[i].float(), scale)
        ref = full_attention(queries[i].double(), k[:, :p + 1].double(),
                             v[:, :p + 1].double(), scale)
        errs.append(rel(out, ref))
        fracs.append(idx.last_stats.exact_fraction)
    return errs, fracs


def q(xs, f):
    s = sorted(xs)
    return s[min(len(s) - 1, int(f * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="benchmarks/data/smollm2_qkv.pt")
    ap.add_argument("--options", default='{"segment_size": 1024}')
    ap.add_argument("--select", default="exact",
                    help="comma list of selection modes; each but exact adds paged columns")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    data = torch.load(a.data, weights_only=False)
    cfg = RetroConfig(**json.loads(a.options))
    scale = float(data["scale"])
    qpos = data["query_positions"].tolist()
    res = {}
    for layer in data["keys"]:
        k, v = data["keys"][layer].float(), data["values"][layer].float()
        qs = data["queries"][layer].float()
        runs = {"wave (CPU)": lambda: wave_errors(k, v, qs, qpos, scale, cfg)}
        for s in ["exact"] + [s for s in a.select.split(",") if s != "exact"]:
            for dn, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                name = f"paged {dn}" + ("" if s == "exact" else f" {s}")
                runs[name] = lambda dt=dt, s=s: paged_errors(k, v, qs, qpos, scale, cfg, dt, s)
        row = {}
        for name, fn in runs.items():
            e, f = fn()
            row[name] = dict(median_err=q(e, 0.5), p90_err=q(e, 0.9),
                             exact_fraction=sum(f) / len(f))
        res[layer] = row
        print(f"layer {layer}: " + " | ".join(
            f"{n}: med {100 * r['median_err']:.2f}% p90 {100 * r['p90_err']:.2f}% "
            f"read {100 * r['exact_fraction']:.1f}%" for n, r in row.items()), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(data=a.data, options=a.options, layers=res), f, indent=1)


if __name__ == "__main__":
    main()
