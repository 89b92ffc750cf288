"""The paged wave index (GPU layout) on CPU tensors: segment planning, the index
written into the KV pages, the connector's request bookkeeping and the worker's
maintenance, checked against float64 recomputation and the reference twin."""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import cpu_cache, filled_cache  # noqa: E402
from vllm_retro.config import RetroConfig
from vllm_retro.index.paged import (HDR_CLUSTERED_END, HDR_IBT_ROW, HDR_N_RETRIEVE,
                                    HDR_WORDS, I_SIZE, I_START, IndexAllocator, IndexPool,
                                    PagedIndexLayout, _kmeans_torch, build_segments, budget,
                                    check_config_for_paged, plan_segments, sink_end)
from vllm_retro.kernels.reference import dense_paged_attention, paged_decode_attention

CFG = RetroConfig(segment_size=256, update_interval=64, recent_tokens=32, cluster_size=16,
                  min_retrieval_tokens=0)


def _index(lay, num_pages, rows=4, max_pages=64, seed=0):
    """An index pool and allocator whose pages are handed out in a shuffled order."""
    pool = IndexPool(lay, num_pages)
    alloc = IndexAllocator(num_pages, rows, max_pages)
    alloc.shuffle(seed)
    return pool, alloc


def _build(kv, lay, pool, alloc, blocks, segs, cfg, irow=None):
    """Indexes segments ``segs`` of one request (one build call per segment, as
    the engine's later updates do); returns its index-table row."""
    s = sink_end(cfg, lay.block_size)
    need = (segs[-1][1] - s) // lay.block_size
    if irow is None:
        irow = alloc.acquire(need)
    else:
        alloc.extend(irow, need - len(alloc.pages_of(irow)))
    for job in alloc.segment_jobs(irow, blocks, segs, s, lay.block_size):
        build_segments(kv, lay, pool, [job], cfg)
    return irow


def test_plan_segments_waits_for_prompt_and_aligns():
    bs = 16
    assert plan_segments(0, 500, 900, CFG, bs) == []           # prompt not done
    segs = plan_segments(0, 900, 900, CFG, bs)
    s = sink_end(CFG, bs)
    assert segs[0][0] == s and all(b % bs == 0 and a % bs == 0 for a, b in segs)
    assert all(a == b for (_, a), (b, _) in zip(segs, segs[1:]))  # contiguous
    end = segs[-1][1]
    assert end == (900 - CFG.recent_tokens) // bs * bs
    assert all(CFG.segment_size <= b - a < 2 * CFG.segment_size for a, b in segs)
    # Decode: nothing until update_interval tokens left the recent window.
    first = end + CFG.recent_tokens + 64
    assert plan_segments(end, first - 1, 900, CFG, bs) == []
    assert plan_segments(end, first, 900, CFG, bs) == [(end, end + 64)]
    # Too short for a first segment.
    assert plan_segments(0, 200, 200, CFG, bs) == []


def test_plan_segments_behind_a_prefill_lag_then_rest_at_prompt_end():
    """With the wave buffer's prefill lag, whole segments are cut from what lies more
    than ``lag`` tokens behind the prefill front; at the prompt's end the rest is cut
    near-equally as an unchunked prompt would be."""
    bs, lag, prompt = 16, 300, 2000
    s = sink_end(CFG, bs)
    assert plan_segments(0, 500, prompt, CFG, bs, prefill_lag=lag) == []   # 200 behind
    segs = plan_segments(0, 900, prompt, CFG, bs, prefill_lag=lag)         # 600 behind
    assert segs == [(s, s + 256), (s + 256, s + 512)]
    ce = segs[-1][1]
    assert plan_segments(ce, 900, prompt, CFG, bs, prefill_lag=lag) == []
    more = plan_segments(ce, 1400, prompt, CFG, bs, prefill_lag=lag)
    assert more == [(ce, ce + 256), (ce + 256, ce + 512)]
    ce = more[-1][1]
    # Without a lag nothing is clustered before the prompt ends (as before).
    assert plan_segments(ce, 1900, prompt, CFG, bs) == []
    rest = plan_segments(ce, prompt, prompt, CFG, bs, prefill_lag=lag)
    end = (prompt - CFG.recent_tokens) // bs * bs
    assert rest[0][0] == ce and rest[-1][1] == end
    assert all(a == b for (_, a), (b, _) in zip(rest, rest[1:]))
    assert all(CFG.segment_size <= b - a < 2 * CFG.segment_size for a, b in rest)
    # Then decode as usual.
    assert plan_segments(end, end + CFG.recent_tokens + 64, prompt, CFG, bs) == \
        [(end, end + 64)]


def test_paged_options_refused_with_reasons():
    bad = RetroConfig(cluster_size=6, update_interval=1000, error_bound=0.1, dense_below=4096,
                      wave_buffer=True)
    reasons = " ".join(check_config_for_paged(bad, 16))
    assert "cluster_size" in reasons and "update_interval" in reasons and \
        "error_bound" in reasons and "dense_below 4096 with wave_buffer" in reasons
    assert check_config_for_paged(RetroConfig(), 16) == []
    # The dense switch alone is supported (a step's rows all dense, or all retro).
    assert check_config_for_paged(RetroConfig(dense_below=40960), 16) == []
    assert check_config_for_paged(RetroConfig(kmeans_value_weight=0.7), 16) == []
    assert check_config_for_paged(RetroConfig(cluster_size=8), 16) == []


def test_kmeans_points_are_the_reference_points():
    """The paged build's points equal :func:`vllm_retro.kmeans.spherical_kmeans`'s
    (float64 recomputation): keys only, and keys with values at a weight; so does
    the whole k-means (same assignment as the reference on the same keys)."""
    from vllm_retro.index.paged import kmeans_points
    from vllm_retro.kmeans import spherical_kmeans
    g = torch.Generator().manual_seed(3)
    k = torch.randn(3, 96, 16, generator=g) + 2.0
    v = torch.randn(3, 96, 16, generator=g) - 1.0
    for w in (0.0, 0.5):
        x = kmeans_points(k, v, w).double()
        kd, vd = k.double(), v.double()
        kn = torch.nn.functional.normalize(kd - kd.mean(1, keepdim=True), dim=-1)
        vn = torch.nn.functional.normalize(vd - vd.mean(1, keepdim=True), dim=-1)
        want = kn if w == 0 else torch.nn.functional.normalize(torch.cat([kn, w * vn], -1),
                                                                dim=-1)
        assert x.shape == want.shape and torch.allclose(x, want, atol=1e-6)
        a = _kmeans_torch(k, 8, 5, values=v, value_weight=w)
        assert torch.equal(a, spherical_kmeans(k, 8, 5, values=v, value_weight=w))
    with pytest.raises(ValueError, match="values"):
        kmeans_points(k, None, 0.5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("cluster_size,value_weight", [(16, 0.0), (32, 0.0), (16, 0.7)])
def test_build_segments_writes_a_consistent_index(cluster_size, value_weight, impl, request):
    """Both build paths (torch ops on CPU; the Triton kernels, in the interpreter
    here) reorder each segment's K/V per head into cluster order (a permutation of
    the original rows, each cluster contiguous at its start, its members the tokens
    the k-means assigned to it) and write float64-exact cluster statistics; nothing
    outside the segments moves. With ``kmeans_value_weight`` the k-means clusters
    keys with their values (the reference's points, :func:`kmeans_points`)."""
    if impl == "triton":
        pytest.importorskip("triton")
        request.getfixturevalue("triton_interpreter")
        from vllm_retro.kernels import uses_triton
        if not uses_triton(torch.zeros(1)):
            pytest.skip("Triton kernels were compiled for a GPU before the interpreter was on")
    cfg = CFG.replace(cluster_size=cluster_size, kmeans_value_weight=value_weight)
    lay = PagedIndexLayout(2, 32, 16, torch.float32)
    L = 700
    kv, blocks = filled_cache(lay, 80, L, seed=cluster_size + int(10 * value_weight))
    before = cpu_cache(lay, kv)
    bs = 16
    pos = torch.arange(L)
    orig = before[blocks[pos // bs], :, pos % bs]                            # [L, H, 2D]
    segs = plan_segments(0, L, L, cfg, 16)
    assigns = {}
    for p0, p1 in segs:
        # The k-means assignment the build computes (deterministic), for the check.
        kv_seg = orig[p0:p1].permute(1, 0, 2).float()
        assigns[p0] = _kmeans_torch(kv_seg[..., :32], math.ceil((p1 - p0) / cluster_size),
                                    cfg.kmeans_iters, values=kv_seg[..., 32:],
                                    value_weight=value_weight)
    pool, alloc = _index(lay, 90)
    irow = _build(kv, lay, pool, alloc, blocks, segs, cfg)
    pages = torch.tensor(alloc.pages_of(irow))
    after = kv[blocks[pos // bs], :, pos % bs]                               # [L, H, 2D]
    fpart, ipart = pool.fpart, pool.ipart
    s, e = segs[0][0], segs[-1][1]
    assert torch.equal(after[:s], orig[:s]) and torch.equal(after[e:], orig[e:])
    moved = False
    for p0, p1 in segs:
        n = p1 - p0
        c = math.ceil(n / cluster_size)
        seg_blocks = pages[(p0 - s) // bs:(p1 - s) // bs]   # the segment's pool pages
        for h in range(2):
            rows, want = after[p0:p1, h], orig[p0:p1, h]
            # A permutation of the original rows (random rows: all distinct).
            match = (rows[:, None, :] == want[None, :, :]).all(-1)           # [n, n]
            assert (match.sum(1) == 1).all() and (match.sum(0) == 1).all()
            src = match.int().argmax(1)                  # position p0 + i held token src[i]
            moved |= not torch.equal(src, torch.arange(n))
            sizes = ipart[seg_blocks, h, I_SIZE].long()
            starts = ipart[seg_blocks, h, I_START].long()
            assert int(sizes.sum()) == n and (sizes[c:] == 0).all()
            a = assigns[p0][h]
            assert torch.equal(sizes[:c], torch.bincount(a, minlength=c))
            for j in range(c):
                if sizes[j] == 0:
                    continue
                i0 = int(starts[j]) - p0
                members = src[i0:i0 + sizes[j]]
                assert (a[members] == j).all()    # the tokens the k-means put there
                kvt = rows[i0:i0 + sizes[j]].double()
                k, v = kvt[:, :32], kvt[:, 32:]
                f = fpart[seg_blocks[j], h].double()
                assert torch.allclose(f[0], k.mean(0), atol=1e-5)
                assert torch.allclose(f[1], k.var(0, unbiased=False), atol=1e-5)
                assert torch.allclose(f[2], v.mean(0), atol=1e-5)
    assert moved


def test_full_retrieval_twin_equals_dense_and_budget_reads_less():
    """With every cluster retrieved, the twin over the reordered cache equals float64
    full attention over the ORIGINAL K/V (attention is order-invariant per head)."""
    lay = PagedIndexLayout(2, 32, 16, torch.float64)
    L = 900
    kv, blocks = filled_cache(lay, 80, L, seed=3)
    before = cpu_cache(lay, kv)
    segs = plan_segments(0, L, L, CFG, 16)
    pool, alloc = _index(lay, 100)
    alloc.acquire(3)                      # another request's row: not row 0
    irow = _build(kv, lay, pool, alloc, blocks, segs, CFG)
    s, e = sink_end(CFG, 16), segs[-1][1]
    c = (e - s) // 16
    headers = torch.zeros(80, HDR_WORDS, dtype=torch.int32)
    bt = blocks.unsqueeze(0).int()
    q = torch.randn(1, 8, 32, dtype=torch.float64)
    sl = torch.tensor([L])
    headers[blocks[0], HDR_CLUSTERED_END] = e
    headers[blocks[0], HDR_N_RETRIEVE] = c
    headers[blocks[0], HDR_IBT_ROW] = irow
    out, st = paged_decode_attention(q, kv, lay, bt, sl, headers, alloc.ibt, pool, s, 0.2)
    ref = dense_paged_attention(q, before, lay, bt, sl, 0.2)
    assert not torch.equal(kv, before)            # the build did move K/V
    assert (out - ref).norm() / ref.norm() < 1e-10
    assert st[0, 0] == 2 * L
    n_ret, n_est = budget(c, e - s, CFG)
    headers[blocks[0], 1:3] = torch.tensor([n_ret, n_est], dtype=torch.int32)
    out, st = paged_decode_attention(q, kv, lay, bt, sl, headers, alloc.ibt, pool, s, 0.2)
    assert st[0, 0] < 2 * L and st[0, 1] > 0 and torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_dense_attention_unchanged_by_the_build(impl, request):
    """The property vLLM's own (dense) kernels rely on: after the build reordered the
    segments' K/V, full attention of any query that sees the whole segment zone
    (every later decode token) is unchanged, to fp tolerance, for every row sharing
    the cache; the reorder is per head (heads differ), and the sinks and tail stay
    in place."""
    if impl == "triton":
        pytest.importorskip("triton")
        request.getfixturevalue("triton_interpreter")
        from vllm_retro.kernels import uses_triton
        if not uses_triton(torch.zeros(1)):
            pytest.skip("Triton kernels were compiled for a GPU before the interpreter was on")
    lay = PagedIndexLayout(2, 32, 16, torch.float32)
    g = torch.Generator().manual_seed(21)
    kv = lay.make_cache(150)
    lens = [900, 620]
    free = (torch.randperm(149, generator=g) + 1).tolist()
    rows = []
    for L in lens:
        nblk = math.ceil(L / 16)
        blocks = torch.tensor([free.pop() for _ in range(nblk)])
        pos = torch.arange(L)
        kv[blocks[pos // 16], :, pos % 16] = torch.randn(L, 2, 64, generator=g)
        rows.append(blocks)
    before = cpu_cache(lay, kv)
    pool, alloc = _index(lay, 120)
    for blocks, L in zip(rows, lens):
        _build(kv, lay, pool, alloc, blocks, plan_segments(0, L, L, CFG, 16), CFG)
    bt = torch.zeros(2, 64, dtype=torch.int32)
    for r, blocks in enumerate(rows):
        bt[r, :len(blocks)] = blocks.int()
    q = torch.randn(2, 8, 32, generator=g)
    sl = torch.tensor(lens)
    want = dense_paged_attention(q, before, lay, bt, sl, 0.2)
    got = dense_paged_attention(q, kv, lay, bt, sl, 0.2)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    # Not vacuous: the positions moved, differently per head.
    r0 = rows[0]
    pos = torch.arange(lens[0])
    a, b = before[r0[pos // 16], :, pos % 16], kv[r0[pos // 16], :, pos % 16]
    assert not torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a[:, 1], b[:, 1])
    s = sink_end(CFG, 16)
    assert torch.equal(a[:s], b[:s])
    # A query that sees only part of a segment would NOT be invariant (why the
    # build waits for the whole prompt and stays out of the recent window).
    part = torch.tensor([s + 100, lens[1]])
    assert (dense_paged_attention(q, kv, lay, bt, part, 0.2)
            - dense_paged_attention(q, before, lay, bt, part, 0.2))[0].abs().max() > 1e-3


def _sched(new=(), cached=(), finished=(), preempted=(), resumed=()):
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, prompt_token_ids=[0] * p,
                                            block_ids=(list(b),), num_computed_tokens=c)
                            for r, p, b, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, _, _ in cached], resumed_req_ids=set(resumed),
            new_block_ids=[(list(b),) if b is not None else None for _, b, _ in cached],
            num_computed_tokens=[c for _, _, c in cached]),
        finished_req_ids=set(finished), preempted_req_ids=set(preempted))


def test_connector_metadata_and_request_table():
    from vllm_retro.backend.connector import step_metadata
    from vllm_retro.request_table import RequestTable
    t = RequestTable()
    lens = {"a": 40, "b": 30}
    e = t.apply(step_metadata(_sched(new=[("a", 40, [5, 6, 7], 0), ("b", 30, [9, 10], 0)]),
                              lens))
    assert [x.req_id for x in e] == ["a", "b"] and t.entries["a"].blocks == [5, 6, 7]
    t.apply(step_metadata(_sched(cached=[("a", [8], 40), ("b", None, 30)]), lens))
    assert t.entries["a"].blocks == [5, 6, 7, 8] and t.entries["a"].num_computed == 40
    # b preempted, then resumed with new blocks: its entry restarts.
    t.apply(step_metadata(_sched(cached=[("a", None, 41)], preempted=["b"]), lens))
    assert "b" not in t.entries and t.preemptions == 1
    t.apply(step_metadata(_sched(cached=[("b", [3, 4], 0)], resumed=["b"]), lens))
    assert t.entries["b"].blocks == [3, 4] and t.entries["b"].prompt_len == 30
    assert t.entries["b"].is_new
    t.apply(step_metadata(_sched(finished=["a", "b"]), lens))
    assert not t.entries and t.freed == 3
