"""Decode attention per layer on the GPU: retro's paged kernels beside FlashAttention 3.

For each (context, batch): a paged KV cache in vLLM 0.26's layout (stock pages,
Llama-3-8B shape: 32 query / 8 KV heads, d=128, bf16, block 16) with random K/V,
indexed as the engine indexes a prompt (``plan_segments`` + ``build_segments``,
default options), then timed:

* retro: :func:`vllm_retro.kernels.paged_decode_attention`, eager and captured in
  a CUDA graph (how vLLM runs pure-decode steps);
* FA3: vLLM's ``flash_attn_varlen_func`` over the same paged cache (dense);
* the bytes floor: the bytes retro's default budget must read (cluster summaries,
  exact tokens' K/V, estimated clusters' mean values) over the measured copy
  bandwidth.

Correctness first: with every cluster retrieved, retro's output is compared with
FA3's (bf16 tolerance), and the default-budget output is compared with the torch
twin on a small context. Medians of CUDA-event timings over rotating inputs.

    python benchmarks/decode_kernel_bench.py --out benchmarks/results/decode_kernel_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vllm_retro.config import RetroConfig  # noqa: E402
from vllm_retro.index.paged import (HDR_HORIZON, IndexAllocator, IndexPool,  # noqa: E402
                                    PagedIndexLayout, budget, build_segments,
                                    clusters_in, header_row,
                                    make_headers, plan_segments, sink_end)
from vllm_retro.kernels import DecodeWorkspace, paged_decode_attention  # noqa: E402
from vllm_retro.kernels import reference  # noqa: E402
from vllm_retro.kernels import triton_decode as td  # noqa: E402

HQ, H, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
# FA3 per layer on this H200 through vLLM's backend (../shared/gpu/README.md), ms.
FA3_REFERENCE_MS = {"32768x1": 0.074, "131072x1": 0.169, "524288x1": 0.562,
                    "32768x8": 0.289, "131072x8": 1.033}


def bandwidth_tbs() -> float:
    x = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(20):
        ev[0].record(); y.copy_(x); ev[1].record(); torch.cuda.synchronize()
        ts.append(ev[0].elapsed_time(ev[1]))
    ms = sorted(ts)[len(ts) // 2]
    return 2 * x.numel() / (ms * 1e-3) / 1e12


def make_batch(ctx: int, batch: int, cfg: RetroConfig, full: bool = False, seed: int = 0,
               key_scale: float = 1.0, device: str = "cuda", shuffle_pages: bool = True,
               wave: str = ""):
    """A cache holding ``batch`` requests of ``ctx`` tokens, indexed as the engine
    indexes them (each request its own index-table row and pool pages, handed out
    shuffled); returns the layout, cache, block tables, seq_lens, headers, sink end
    and ``ix`` (``ix.ibt``, ``ix.pool``: the index table and the layer's pool).
    ``shuffle_pages=False`` hands pool pages out in order (each request's index
    contiguous in the pool, as in a fresh engine) instead of scattered (after churn).

    ``key_scale`` multiplies the keys: a tiny scale (1e-4) gives what an engine with
    ``load_format="dummy"`` weights gives, every cluster's log-mass ~ ln(size), so
    thousands of bitwise-equal ranking keys (the selection's worst case).

    ``wave`` ("hit" or "miss"): every request's clustered zone is also mirrored to a
    host mirror (one layer) and its horizon set to the zone's end, as the wave
    buffer leaves a released request; "hit" admits every page into a cluster cache
    that holds them all (a warm cache: the engine's steady state at 128K x 8),
    "miss" none (every retrieved page read from pinned host memory). ``ix.wave``
    is the layer's view for ``paged_decode_attention(wave=...)``. The paged cache
    keeps the K/V too, so the output equals the run without the view."""
    dev = device
    g = torch.Generator(device=dev).manual_seed(seed)
    lay = PagedIndexLayout.for_config(cfg, H, D, BS, DT)
    epb = lay.entries_per_block
    nblk = math.ceil((ctx + 1) / BS)
    nb = batch * nblk + 1
    kv = lay.make_cache(nb, dev)
    perm = torch.randperm(nb - 1, device=dev, generator=g) + 1
    bt = perm[:batch * nblk].view(batch, nblk).int()
    for r in range(batch):
        blocks = bt[r].long()
        x = torch.randn(nblk, H, BS, 2 * D, device=dev, dtype=torch.float32, generator=g)
        x[..., :D] *= key_scale
        kv[blocks] = x.to(DT)
    headers = make_headers(nb, dev)
    S = sink_end(cfg, BS)
    segs = plan_segments(0, ctx, ctx, cfg, BS)
    pool = IndexPool(lay, nb * epb, dev, summary_bits=cfg.summary_bits,
                     mean_value_bits=cfg.mean_value_bits)
    alloc = IndexAllocator(nb * epb, batch, nblk * epb, dev)
    if shuffle_pages:
        alloc.shuffle(seed)
    rows = []                                   # (index-table row, clustered end)
    for r in range(batch):
        E = segs[-1][1] if segs else 0
        irow = alloc.acquire(max(0, (E - S) // BS) * epb)
        rows.append((irow, E))
        jobs = {}
        for job in alloc.segment_jobs(irow, bt[r].long(), segs, S, BS, epb):
            jobs.setdefault(job.p1 - job.p0, []).append(job)
        for js in jobs.values():
            build_segments(kv, lay, pool, js, cfg)
        c = sum(clusters_in(p1 - p0, cfg) for p0, p1 in segs)
        n_ret, n_est = (c, 0) if full else budget(c, E - S, cfg)
        headers[bt[r, 0].long()] = torch.tensor(header_row(E, n_ret, n_est, c, irow),
                                                dtype=torch.int32, device=dev)
    seq_lens = torch.full((batch,), ctx + 1, dtype=torch.int32, device=dev)
    # The decode token itself (written by vLLM's cache update before attention).
    for r in range(batch):
        blk = bt[r, ctx // BS].long()
        kv[blk, :, ctx % BS] = torch.randn(H, 2 * D, device=dev, dtype=DT, generator=g)
    ix = SimpleNamespace(ibt=alloc.ibt, pool=pool, wave=None)
    if wave:
        ix.mirror, ix.cache, ix.wave = wave_buffer(wave, lay, kv, bt, headers, S, alloc, pool,
                                                   rows)
    return lay, kv, bt, seq_lens, headers, S, ix


def wave_buffer(mode: str, lay, kv, bt, headers, S: int, alloc, pool, rows):
    """(mirror, cache, layer view) of :func:`make_batch`'s ``wave`` mode."""
    from vllm_retro.memory import HostMirror, MirrorShape
    from vllm_retro.memory.cluster_cache import ClusterCache
    if mode not in ("hit", "miss"):
        raise ValueError(f"wave mode {mode!r}: 'hit' or 'miss'")
    dev = kv.device
    h, bs = lay.num_kv_heads, lay.block_size
    shape = MirrorShape(alloc.ibt.shape[0], 1, h, lay.head_dim, bs, pool.num_pages, lay.dtype)
    tokens = sum(max(0, E - S) for _, E in rows)
    mirror = HostMirror(shape, max(1, tokens * h) * shape.row_bytes + (1 << 20), device=dev)
    cache = ClusterCache.for_mirror(mirror, max(1, tokens // bs * h))   # room for every page
    keys = []
    for r, (irow, E) in enumerate(rows):
        if E <= S:
            continue
        mirror.reserve(irow, E - S)
        pages = alloc.ibt[irow, :(E - S) // bs].long()
        mirror.mirror_segment(irow, 0, kv, lay, bt[r].long(), S, E, pool, pages)
        headers[bt[r, 0].long(), HDR_HORIZON] = E
        keys.append(cache.keys(pages[:, None], 0, torch.arange(h, device=dev)).reshape(-1))
    if mode == "hit" and keys:
        cache.admit(torch.cat(keys), mirror)
        cache.next_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return mirror, cache, cache.view(mirror, 0)


def has_fa3() -> bool:
    try:
        import vllm.vllm_flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def fa3(q, kv, bt, seq_lens, scale, out):
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    k, v = kv.transpose(1, 2).split(D, dim=-1)
    b = q.shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32, device="cuda")
    return flash_attn_varlen_func(q, k, v, max_seqlen_q=1, cu_seqlens_q=cu,
                                  max_seqlen_k=int(seq_lens.max()), seqused_k=seq_lens,
                                  softmax_scale=scale, causal=True, block_table=bt,
                                  out=out, fa_version=3)


def time_ms(fn, iters=50, flush: "torch.Tensor | None" = None) -> float:
    """Median milliseconds of ``fn`` (a CUDA graph's replay, say) over ``iters``
    calls. ``flush``: a buffer larger than the GPU's L2, overwritten before each
    timed call (outside the timed span), so each call starts with a cold L2 as a
    layer's step does in the engine, where 31 other layers ran since."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(iters)]
    for a, b in ev:
        if flush is not None:
            flush.zero_()
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2]


def per_kernel_us(fn, iters=20) -> dict:
    """Device time of each kernel of ``fn`` (us per call), from the CUDA profiler;
    empty where the profiler is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        from profiling import device_us
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        res = {}
        for e in prof.key_averages():
            t = device_us(e)
            if t > 0:
                res[e.key] = res.get(e.key, 0.0) + t / iters
        return {k: round(v, 2) for k, v in sorted(res.items(), key=lambda kv: -kv[1])}
    except Exception as exc:  # profiling is a diagnostic: never fail the benchmark on it
        print(f"per-kernel profile unavailable: {exc}", flush=True)
        return {}


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        fn()
    return gr


def decode_options(cfg: RetroConfig) -> dict:
    """The decode op's options that come from the config (as the backend passes
    them)."""
    return dict(variance_cap=cfg.variance_cap, retrieval_rank=cfg.retrieval_rank)


def bench_case(ctx: int, batch: int, cfg: RetroConfig, bw: float,
               key_scale: float = 1.0) -> dict:
    scale = 1 / math.sqrt(D)
    lay, kv, bt, sl, hdr, S, ix = make_batch(ctx, batch, cfg, key_scale=key_scale)
    ws = DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, max(batch, 8), "cuda",
                         error_rank=cfg.retrieval_rank == "error")
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    out = torch.empty(batch, HQ, D, device="cuda", dtype=DT)
    out_fa = torch.empty_like(out)

    def run_retro(count=False):
        paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool, S, scale, out=out,
                               workspace=ws, count_stats=count, **decode_options(cfg))

    carried = td.carries_rank_reference(cfg)
    if carried:
        # As the backend (RetroConfig.rank_reference): one reference per index-table
        # row and KV head, set by a first step that ranks with this step's reference.
        ix.pool.rank_ref = torch.zeros(ix.ibt.shape[0], H, device="cuda")
        run_retro()
    ws.stats.zero_()
    run_retro(True)
    torch.cuda.synchronize()
    st = ws.stats.tolist()  # rows idx, rows no idx, exact tok, est tok, ctx tok, .., carried
    assert st[0] == batch, f"retro kernels did not serve the rows with an index: {st}"
    assert st[6] == (batch if carried else 0), f"carried rank reference rows: {st}"
    exact_frac = st[2] / st[4]
    est_frac = st[3] / st[4]
    eager = time_ms(run_retro)
    gr = graph_of(run_retro)
    graph = time_ms(gr.replay)
    fa = time_ms(lambda: fa3(q, kv, bt, sl, scale, out_fa)) if has_fa3() else float("nan")
    kernels = per_kernel_us(run_retro)
    # Bytes retro must read: all cluster summaries (centroid + variance + size),
    # exact tokens' K/V (retrieved clusters are contiguous positions: no permutation
    # entries), estimated clusters' mean values.
    c_entries = ((hdr[bt[:, 0].long(), 0].double() - S).clamp_min(0).sum().item() / BS
                 * lay.entries_per_block)
    summ = c_entries * H * (2 * D * 2 + 4)
    exact = st[2] * (2 * D * 2)
    # Each estimated cluster's mean value (with value_correction also sigma u and w).
    est_b = (st[3] / cfg.cluster_size) * D * 2 * (3 if lay.value_correction else 1)
    floor_us = (summ + exact + est_b) / (bw * 1e12) * 1e6
    dense_bytes = batch * (ctx + 1) * H * 2 * D * 2
    return dict(context=ctx, batch=batch, retro_eager_ms=eager, retro_graph_ms=graph,
                fa3_ms=fa, floor_us=floor_us, dense_floor_us=dense_bytes / (bw * 1e12) * 1e6,
                speedup_vs_fa3=fa / graph, graph_over_floor=graph * 1e3 / floor_us,
                exact_fraction=exact_frac, estimated_fraction=est_frac,
                retro_rows=st[0], dense_rows=st[1], carried_rows=st[6],
                per_kernel_us=kernels)


def check_full_vs_dense(cfg: RetroConfig) -> float:
    """Every cluster retrieved: retro must equal dense attention, FA3 where vLLM is
    installed, else the float64 twin (relative error returned)."""
    ctx, batch = 20000, 3
    lay, kv, bt, sl, hdr, S, ix = make_batch(ctx, batch, cfg, full=True, seed=1)
    scale = 1 / math.sqrt(D)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    out = torch.empty(batch, HQ, D, device="cuda", dtype=DT)
    ws = DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, 8, "cuda",
                         error_rank=cfg.retrieval_rank == "error")
    paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool, S, scale, out=out,
                           workspace=ws, **decode_options(cfg))
    if has_fa3():
        ref = fa3(q, kv, bt, sl, scale, torch.empty_like(out))
    else:
        kv_cpu = kv.cpu()
        ref = reference.dense_paged_attention(q.cpu(), kv_cpu, lay, bt.cpu(), sl.cpu(), scale).to(out.device)
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_vs_twin(cfg: RetroConfig) -> float:
    ctx, batch = 12000, 2
    lay, kv, bt, sl, hdr, S, ix = make_batch(ctx, batch, cfg, seed=2)
    scale = 1 / math.sqrt(D)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    out = torch.empty(batch, HQ, D, device="cuda", dtype=torch.float32)
    ws = DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, 8, "cuda",
                         error_rank=cfg.retrieval_rank == "error")
    paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool, S, scale, out=out,
                           workspace=ws, **decode_options(cfg))
    kv_cpu = kv.cpu()
    ref, _ = reference.paged_decode_attention(q.cpu(), kv_cpu, lay, bt.cpu(), sl.cpu(),
                                              hdr.cpu(), ix.ibt.cpu(), ix.pool.to("cpu"), S,
                                              scale, cfg.variance_cap, select=td.SELECT,
                                              retrieval_rank=cfg.retrieval_rank)
    return ((out.cpu() - ref).norm() / ref.norm()).item()


def plot(res: dict, path: str) -> None:
    """Bars per (context, batch): retro (graph), FA3 (the faster of this run and the
    reference table), the bytes floor of retro's budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = res["records"]
    ref = dict(FA3_REFERENCE_MS, **res.get("fa3_reference_ms", {}))

    def best_fa3_us(r):
        here = r["fa3_ms"] if r["fa3_ms"] == r["fa3_ms"] else float("inf")
        return 1e3 * min(here, ref.get(f"{r['context']}x{r['batch']}", float("inf")))
    fa = [best_fa3_us(r) for r in recs]
    labels = [f"{r['context'] // 1024}K x{r['batch']}" for r in recs]
    retro = [r["retro_graph_ms"] * 1e3 for r in recs]
    floor = [r["floor_us"] for r in recs]
    x = range(len(recs))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.27
    ax.bar([i - w for i in x], fa, w,
           label="FA3 dense (faster of this run and the reference table)")
    ax.bar(list(x), retro, w, label="retro, CUDA graph")
    ax.bar([i + w for i in x], floor, w, label="retro bytes floor")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("us per layer")
    ax.set_yscale("log")
    ax.set_title(f"Decode attention per layer, Llama-3-8B shape, {res['device']}")
    ax.set_ylim(top=1e4)   # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", help="only plot this results JSON (to the same name .png)")
    ap.add_argument("--contexts", default="32768,131072,524288")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-tokens-in-cache", type=int, default=1 << 20,
                    help="skip (context, batch) pairs above this many tokens")
    ap.add_argument("--key-scale", type=float, default=1.0,
                    help="multiply the keys (1e-4: the flat scores of dummy weights)")
    ap.add_argument("--retro-options", default="{}",
                    help="RetroConfig options as JSON, e.g. '{\"cluster_size\": 8}'")
    ap.add_argument("--out", default="benchmarks/results/decode_kernel_h200.json")
    a = ap.parse_args()
    if a.plot:
        with open(a.plot) as f:
            return plot(json.load(f), a.plot.rsplit(".", 1)[0] + ".png")
    cfg = RetroConfig.from_dict(json.loads(a.retro_options))
    bw = bandwidth_tbs()
    err_full = check_full_vs_dense(cfg)
    err_twin = check_vs_twin(cfg)
    print(f"copy bandwidth {bw:.2f} TB/s; full retrieval vs dense rel err {err_full:.2e}; "
          f"default budget vs twin rel err {err_twin:.2e}", flush=True)
    assert err_full < 2e-2 and err_twin < 2e-2
    recs = []
    for ctx in map(int, a.contexts.split(",")):
        for b in map(int, a.batches.split(",")):
            if ctx * b > a.max_tokens_in_cache:
                continue
            t0 = time.time()
            r = bench_case(ctx, b, cfg, bw, a.key_scale)
            recs.append(r)
            print(f"ctx {ctx:>7} b {b}: retro graph {r['retro_graph_ms'] * 1e3:7.1f} us "
                  f"eager {r['retro_eager_ms'] * 1e3:7.1f} us | FA3 {r['fa3_ms'] * 1e3:7.1f} us"
                  f" | floor {r['floor_us']:5.1f} us | x{r['speedup_vs_fa3']:.2f} vs FA3, "
                  f"{r['graph_over_floor']:.1f}x floor | exact {100 * r['exact_fraction']:.2f}%"
                  f" est {100 * r['estimated_fraction']:.2f}% ({time.time() - t0:.0f}s)",
                  flush=True)
            print("   per kernel (us):", ", ".join(f"{k.split('(')[0]} {v:.1f}" for k, v
                                                   in r["per_kernel_us"].items()), flush=True)
            torch.cuda.empty_cache()
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
               versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
               command=" ".join(sys.argv), copy_tbs=bw, key_scale=a.key_scale,
               select=td.SELECT,
               full_retrieval_rel_err=err_full,
               full_retrieval_reference="FA3" if has_fa3() else "float64 dense twin",
               default_vs_twin_rel_err=err_twin, records=recs)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, a.out.rsplit(".", 1)[0] + ".png")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
