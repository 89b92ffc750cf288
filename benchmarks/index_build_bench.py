"""Index build on the GPU: what clustering one long prompt costs, and where it goes.

One request of ``--context`` tokens in a paged KV cache of the Llama-3-8B shape
(8 KV heads, d=128, bf16, block 16, random keys), indexed as the engine indexes a
prompt once it is fully computed (``plan_segments``, segments grouped by length,
``build_segments`` per layer), for ``--layers`` layers (one cache reused: the cost
per layer does not depend on the layer). Reported: wall time and CUDA-event time of
the whole build, against dense prefill of the same prompt (the issue's target: at
most 5%), and a CUDA profile of one layer's build by operator (device time), plus
the host time of that layer (launch and Python overhead).

    python benchmarks/index_build_bench.py --context 131072 --layers 32 \
        --out benchmarks/results/index_build_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_retro.config import RetroConfig  # noqa: E402
from vllm_retro.index.paged import (IndexPool, PagedIndexLayout,  # noqa: E402
                                    SegmentJob, build_segments, plan_segments, sink_end)

H, D, BS = 8, 128, 16
DENSE_PREFILL_S = {131072: 10.4, 32768: 1.2}   # ../shared/gpu/README.md, H200


def build_all(kv, lay, blocks, segs, cfg, layers):
    """Builds ``segs`` ``layers`` times (one cache and index pool reused: the cost
    per layer is the same); the pool's pages are the clustered zone's entries."""
    s = sink_end(cfg, BS)
    e = lay.entries_per_block
    pool = IndexPool(lay, blocks.numel() * e, kv.device)
    pages = torch.arange(blocks.numel() * e, device=kv.device)
    groups = {}
    for p0, p1 in segs:
        groups.setdefault(p1 - p0, []).append(
            SegmentJob(blocks, p0, p1, pages[(p0 - s) // BS * e:(p1 - s) // BS * e]))
    for _ in range(layers):
        for g in groups.values():
            build_segments(kv, lay, pool, g, cfg)
    return groups


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--assign-tiles", default="",
                    help="also time the build with these k-means assignment tiles, "
                         "BNxBCxWARPS comma-separated (e.g. 128x64x8,64x128x4)")
    ap.add_argument("--retro-options", default="{}",
                    help='retro options as JSON, e.g. \'{"kmeans_value_weight": 0.7}\' '
                         "(the value-aware build clusters 2D-wide points)")
    ap.add_argument("--out", default="benchmarks/results/index_build_h200.json")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = RetroConfig.from_dict(json.loads(a.retro_options))
    lay = PagedIndexLayout.for_config(cfg, H, D, BS, dt)
    nblk = (a.context + BS - 1) // BS
    kv = lay.make_cache(nblk + 1, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    blocks = (torch.randperm(nblk, device=dev, generator=g) + 1).long()
    kv[1:] = torch.randn(nblk, H, BS, 2 * D, device=dev, dtype=dt, generator=g)
    segs = plan_segments(0, a.context, a.context, cfg, BS)
    lens = sorted({p1 - p0 for p0, p1 in segs})
    print(f"{a.context} tokens: {len(segs)} segments of {lens} tokens, {a.layers} layers",
          flush=True)
    build_all(kv, lay, blocks, segs[:1], cfg, 1)    # warm-up (Triton compile)
    if dev == "cuda":
        torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if dev == "cuda" else None
    t0 = time.perf_counter()
    if ev:
        ev[0].record()
    build_all(kv, lay, blocks, segs, cfg, a.layers)
    if ev:
        ev[1].record()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gpu = ev[0].elapsed_time(ev[1]) / 1e3 if ev else wall
    # One layer: host time and per-operator device time.
    t1 = time.perf_counter()
    build_all(kv, lay, blocks, segs, cfg, 1)
    host_one = time.perf_counter() - t1
    prof = {}
    try:
        from torch.profiler import ProfilerActivity, profile

        from profiling import device_us
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        if dev == "cuda":
            torch.cuda.synchronize()
        with profile(activities=acts) as p:
            build_all(kv, lay, blocks, segs, cfg, 1)
            if dev == "cuda":
                torch.cuda.synchronize()
        for e in p.key_averages():
            t = device_us(e)
            if t > 0:
                prof[e.key] = dict(device_us=round(t, 1), calls=e.count)
        prof = dict(sorted(prof.items(), key=lambda kv_: -kv_[1]["device_us"])[:25])
    except Exception as exc:  # a diagnostic: never fail the benchmark on it
        print(f"profile unavailable: {exc}", flush=True)
    variants = {}
    if a.assign_tiles and dev == "cuda":
        from vllm_retro.kernels import triton_kmeans
        default = dict(triton_kmeans.ASSIGN_TUNE)
        for v in a.assign_tiles.split(","):
            bn, bc, nw = (int(x) for x in v.split("x"))
            triton_kmeans.ASSIGN_TUNE.update(BN=bn, BC=bc, num_warps=nw)
            build_all(kv, lay, blocks, segs, cfg, 1)      # compile
            torch.cuda.synchronize()
            ev[0].record()
            build_all(kv, lay, blocks, segs, cfg, 4)
            ev[1].record()
            torch.cuda.synchronize()
            variants[v] = ev[0].elapsed_time(ev[1]) / 4
            print(f"assign tiles {v}: {variants[v]:.2f} ms per layer", flush=True)
        triton_kmeans.ASSIGN_TUNE.clear()
        triton_kmeans.ASSIGN_TUNE.update(default)
    dense = DENSE_PREFILL_S.get(a.context)
    rec = dict(retro_options=json.loads(a.retro_options),
               assign_tiles_ms_per_layer=variants or None, context=a.context, layers=a.layers, segments=len(segs), segment_lengths=lens,
               wall_s=wall, gpu_s=gpu, one_layer_host_s=host_one,
               dense_prefill_s=dense, fraction_of_dense_prefill=(gpu / dense) if dense else None,
               per_op_one_layer=prof)
    print(f"build: wall {wall:.3f} s, GPU {gpu:.3f} s"
          + (f" = {100 * gpu / dense:.1f}% of dense prefill ({dense} s)" if dense else "")
          + f"; one layer on the host {1e3 * host_one:.1f} ms", flush=True)
    for k, v in list(prof.items())[:12]:
        print(f"   {v['device_us']:10.1f} us  x{v['calls']:<5d} {k[:70]}", flush=True)
    res = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
               date=datetime.date.today().isoformat(),
               versions=dict(torch=torch.__version__), command=" ".join(sys.argv),
               records=[rec])
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
