"""Retro inside vLLM 0.26 on a GPU, under vLLM's defaults (V2 model runner,
FULL_AND_PIECEWISE CUDA graphs). Skipped without CUDA (CI has none; the GPU
script ``scripts/gpu/run.sh`` runs these on the H200).

Every test asserts from the device counters that retro's kernels served the
decode rows: a silent fallback to dense decoding fails loudly.
"""

import json
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from conftest import generate_tokens, generate_with_logprobs, text_prompts  # noqa: E402

SMALL = {"segment_size": 256, "update_interval": 128, "recent_tokens": 32,
         "min_retrieval_tokens": 64}
FULL = dict(SMALL, retrieval_fraction=1.0, estimation_fraction=0.0)
LENGTHS = [40, 300, 900, 1700, 2600, 3100]
MAX_TOKENS = [12, 40, 5, 33, 20, 26]
# Preemption: six 1,000-token prompts (63 blocks each) that grow by 400 tokens (25
# blocks each) in a cache of 390 blocks. Even five of them running outgrow it
# (5 x 88 = 440 blocks), so vLLM must preempt whatever it admits.
PRE_LENGTHS = [1000] * 6
PRE_TOKENS = 400
PRE_BLOCKS = 390


#: Retro options every test adds to its own (JSON), to run the suite under another
#: configuration (e.g. ``{"summary_bits": 16}``, or an option before it becomes a default).
EXTRA_OPTIONS = json.loads(os.environ.get("RETRO_GPU_TEST_OPTIONS", "{}") or "{}")


def gpu_llm(model, backend=None, retro=None, **kw):
    from vllm import LLM
    args = dict(dtype="bfloat16", max_model_len=8192, max_num_seqs=8, seed=0,
                gpu_memory_utilization=0.3, enable_prefix_caching=False)
    args.update(kw)
    if backend:
        args["attention_backend"] = backend
    if backend or retro is not None:   # (retro options without a backend: a per-kind choice)
        args["additional_config"] = {"retro": dict(retro or {}, **EXTRA_OPTIONS)}
    return LLM(model, **args)


def manager(llm):
    from vllm_retro.offline import retro_state
    st = retro_state(llm)
    assert st is not None and st.paged is not None, "retro state not found in-process"
    return st.paged


#: Logits of magnitude 16-32 (the tiny model's top logits: dense's top-2 gaps of
#: exactly 0.125 on the H200) are 0.125 apart in bf16: top-2 log-probabilities one
#: such step apart are adjacent bf16 logits, a tie at the precision the logits
#: are computed in.
BF16_LOGIT_STEP = 0.125


def is_near_tie(gap):
    return gap < 0.05 or abs(gap - BF16_LOGIT_STEP) < 1e-3


def assert_same_or_near_tie(out, dense_out, out_logprobs=None):
    """Each greedy output equals dense's, or first differs where dense's own top
    two log-probabilities are within 0.05 nats or one bf16 step of the logits apart
    (a bf16 near-tie). With ``out_logprobs`` (retro's), the largest difference of
    the chosen tokens' log-probabilities before it is reported (rounding drift)."""
    for r, (toks, (dtoks, dlp)) in enumerate(zip(out, dense_out)):
        if toks == dtoks:
            continue
        i = next(k for k, (a, b) in enumerate(zip(toks, dtoks)) if a != b)
        top = sorted(dlp[i].values(), key=lambda x: -x.logprob)
        gap = top[0].logprob - top[1].logprob
        drift = float("nan")
        if out_logprobs is not None:
            drift = max((abs(out_logprobs[r][k][t].logprob - dlp[k][t].logprob)
                         for k, t in enumerate(toks[:i])), default=0.0)
        print(f"request {r}: first difference at {i} of {len(toks)}, dense gap "
              f"{gap:.4f}, prefix drift {drift:.3f} nats")
        assert is_near_tie(gap), (
            f"request {r}: first difference at {i} of {len(toks)} is not a near-tie "
            f"(gap {gap:.4f}, prefix drift {drift:.3f})")


@pytest.fixture(scope="module")
def dense_runs(tiny_model):
    """Dense outputs of the module's prompts and of the preemption prompts (one
    engine: engines in one process are made one after another)."""
    from vllm_retro.offline import close_llm
    llm = gpu_llm(tiny_model)
    prompts = text_prompts(tiny_model, LENGTHS)
    out = generate_with_logprobs(llm, prompts, MAX_TOKENS)
    close_llm(llm)
    # Dense under the same cache size, so it is preempted at the same steps and
    # recomputes the same tokens' K/V by prefill: what is left between the two runs
    # is the decode kernels' rounding, not prefill-versus-decode K/V.
    llm = gpu_llm(tiny_model, num_gpu_blocks_override=PRE_BLOCKS, max_model_len=2048)
    pre_prompts = text_prompts(tiny_model, PRE_LENGTHS, offset=7000)
    pre_out = generate_with_logprobs(llm, pre_prompts, [PRE_TOKENS] * len(pre_prompts))
    close_llm(llm)
    return (prompts, out), (pre_prompts, pre_out)


@pytest.fixture(scope="module")
def dense(dense_runs):
    return dense_runs[0]


@pytest.fixture(scope="module")
def retro_full(tiny_model, dense):
    # After the dense engine is closed: an in-process worker's KV connector is a
    # process global, so two live engines in one process would share retro's.
    llm = gpu_llm(tiny_model, "retro", FULL)
    yield llm
    from vllm_retro.offline import close_llm
    close_llm(llm)


# Runs before any test that uses retro_full (one live engine per process).
def test_preemption_recomputes_and_reindexes(tiny_model, dense_runs):
    """A KV cache too small for the batch's growth forces preemptions; the
    preempted requests are recomputed, re-indexed, and decode as without
    preemption (full retrieval: as dense, up to bf16 near-ties)."""
    prompts, dense_out = dense_runs[1]
    llm = gpu_llm(tiny_model, "retro", FULL, num_gpu_blocks_override=PRE_BLOCKS,
                  max_model_len=2048)
    mgr = manager(llm)
    out = generate_with_logprobs(llm, prompts, [PRE_TOKENS] * len(prompts))
    pre = mgr.requests.preemptions
    st = mgr.stats()
    alloc = mgr.index_alloc
    # Every request's pool pages are owned by a live request (preempted ones gave
    # theirs back); the pool was sized before vLLM measured free memory.
    owned = sum(len(alloc.pages_of(e.ibt_row)) for e in mgr.requests.entries.values()
                if e.ibt_row >= 0)
    free_ok = alloc.free_pages + owned == alloc.num_pages
    presized = mgr.pool_presized
    from vllm_retro.offline import close_llm
    close_llm(llm)
    assert pre > 0, "no preemption happened; shrink the cache"
    assert st["retro_rows"] > 0
    assert free_ok and presized and st["index_pool_full"] == 0
    assert_same_or_near_tie([t for t, _ in out], dense_out, [lp for _, lp in out])


def test_closing_an_engine_gives_its_memory_back(tiny_model, dense_runs):
    """A closed retro engine's KV cache (here ~30% of the GPU) and index pools are
    freed in this process, so engines can follow each other (a retro worker state
    holding its config strongly once kept the whole cache: the next engine at 50%
    of an 80 GB card could not start)."""
    import gc

    from vllm_retro.offline import close_llm
    gc.collect()
    torch.cuda.empty_cache()
    free0 = torch.cuda.mem_get_info()[0]
    llm = gpu_llm(tiny_model, "retro", FULL)
    prompts = text_prompts(tiny_model, [1700, 2600], offset=3000)
    generate_tokens(llm, prompts, 8)
    rows = manager(llm).stats()["retro_rows"]
    held = free0 - torch.cuda.mem_get_info()[0]
    close_llm(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    left = free0 - torch.cuda.mem_get_info()[0]
    assert rows > 0
    assert held > 4 << 30, f"the engine held only {held / 2**30:.2f} GiB"
    assert left < 1 << 30, (f"{left / 2**30:.2f} GiB of the closed engine's "
                            f"{held / 2**30:.2f} GiB still held")


# Wave buffer: four 1,500-token prompts that decode 64 tokens each need 98 blocks
# apiece without release; a cache of 240 blocks holds two of them. With the wave
# buffer their clustered zones are mirrored, vLLM releases the blocks below the
# horizons, and all four run at once.
WAVE_LENGTHS = [1500] * 4
WAVE_TOKENS = 64
WAVE_BLOCKS = 240
WAVE_OPTS = dict(FULL, wave_buffer=True, host_memory_gib=0.5, cluster_cache_gib=0.001)


def test_wave_buffer_releases_blocks_and_keeps_outputs(tiny_model):
    """wave_buffer=True in a KV cache that holds two of the four requests without
    release: the requests are mirrored, vLLM's RetroManager releases their blocks
    below the reported horizons, more requests run at once than fit without
    release, the decode kernels read the released zone through the cluster cache
    (hits + misses counted), and every output equals the run without the wave
    buffer (full retrieval; the batches differ, so up to bf16 near-ties)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_retro.offline import close_llm
    prompts = text_prompts(tiny_model, WAVE_LENGTHS, offset=30000)
    per_req = -(-(WAVE_LENGTHS[0] + WAVE_TOKENS) // 16)
    assert WAVE_BLOCKS // per_req < len(prompts)
    llm = gpu_llm(tiny_model, "retro", FULL, max_model_len=2048)
    want = generate_with_logprobs(llm, prompts, [WAVE_TOKENS] * len(prompts))
    close_llm(llm)
    llm = gpu_llm(tiny_model, "retro", WAVE_OPTS, max_model_len=2048,
                  num_gpu_blocks_override=WAVE_BLOCKS)
    try:
        mgr = manager(llm)
        eng = llm.llm_engine
        sched = eng.engine_core.engine_core.scheduler
        (kvm,) = sched.kv_cache_manager.coordinator.single_type_managers
        params = SamplingParams(max_tokens=WAVE_TOKENS, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"wb-{i}", TokensPrompt(prompt_token_ids=p), params)
        outs, most = {}, 0
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)
            most = max(most, len(sched.running))
        released = kvm.num_released_blocks
        st = mgr.stats()
        pre = mgr.requests.preemptions
    finally:
        close_llm(llm)
    got = [next(t for k, t in outs.items() if k == f"wb-{i}" or k.startswith(f"wb-{i}-"))
           for i in range(len(prompts))]
    print(f"wave buffer: {released} blocks released, {most} requests at once, "
          f"{pre} preemptions, stats {st}")
    assert type(kvm).__name__ == "RetroManager" and released > 0
    assert most > WAVE_BLOCKS // per_req
    assert st["retro_rows"] > 0 and st["cache_hits"] + st["cache_misses"] > 0
    assert st["mirror_refused"] == 0 and st["index_pool_full"] == 0
    assert_same_or_near_tie(got, want)


def test_prompt_larger_than_the_kv_cache_is_released_while_prefilled(tiny_model):
    """The 1M-token path at small scale: a 6,000-token prompt on a KV cache of 200
    blocks (3,200 tokens), prefilled in chunks of 512 with ``prefill_resident_tokens``
    1,024. Dense vLLM cannot hold it; retro clusters, mirrors and releases the
    prompt behind its prefill front, the later chunks attend to the released tokens
    exactly from the host mirror (FlashAttention over the compacted block table and
    over the mirror's pieces), and the output equals dense attention's with every
    block (full retrieval; up to a bf16 near-tie)."""
    from vllm_retro.offline import close_llm
    prompts = text_prompts(tiny_model, [6000], offset=50000)
    llm = gpu_llm(tiny_model, max_model_len=6200, max_num_batched_tokens=512)
    want = generate_with_logprobs(llm, prompts, [24])
    close_llm(llm)
    opts = dict(FULL, wave_buffer=True, host_memory_gib=0.5, prefill_resident_tokens=1024)
    llm = gpu_llm(tiny_model, "retro", opts, max_model_len=6200,
                  max_num_batched_tokens=512, num_gpu_blocks_override=200)
    try:
        mgr = manager(llm)
        sched = llm.llm_engine.engine_core.engine_core.scheduler
        (kvm,) = sched.kv_cache_manager.coordinator.single_type_managers
        before = mgr.stats()
        got = generate_with_logprobs(llm, prompts, [24])
        st = mgr.stats()
        released = kvm.num_released_blocks
    finally:
        close_llm(llm)
    rows = {k: st[k] - before[k] for k in ("retro_rows", "dense_rows")}
    print(f"released prefill: {released} blocks released, decode rows {rows}, "
          f"stats before {before}, after {st}")
    assert released >= 6000 // 16 - 200
    # every decode row of the request on its index (23 steps after the first token)
    assert rows == {"retro_rows": 23, "dense_rows": 0}
    assert st["host_mirrored_gib"] > 0 and st["mirror_refused"] == 0
    assert_same_or_near_tie([t for t, _ in got], want)


def test_cluster_cache_moves_bytes_not_results(tiny_model):
    """The default budget with the wave buffer, the same requests and KV cache twice:
    a cluster cache that holds every page (hits after the first visit) and one of a
    few pages (nearly every visit a miss, read zero-copy from pinned host memory)
    give the same tokens, token for token: the cache moves bytes, the arithmetic and
    the schedule are the same. Afterwards the host mirror holds nothing (pinned
    memory returned on finish)."""
    from vllm_retro.offline import close_llm
    prompts = text_prompts(tiny_model, WAVE_LENGTHS, offset=40000)
    runs = {}
    for name, gib in (("large", 0.25), ("few pages", 2e-5)):
        opts = dict(SMALL, wave_buffer=True, host_memory_gib=0.5, cluster_cache_gib=gib)
        llm = gpu_llm(tiny_model, "retro", opts, max_model_len=2048,
                      num_gpu_blocks_override=WAVE_BLOCKS)
        try:
            mgr = manager(llm)
            toks = generate_tokens(llm, prompts, WAVE_TOKENS)
            st = mgr.stats()
            # The worker learns of finished requests with the next step's scheduler
            # output: one short request (never mirrored) runs that step.
            generate_tokens(llm, text_prompts(tiny_model, [16], offset=7), 1)
            left = mgr.mirror.bytes_reserved(), mgr.mirror.request_slots()
            slots = mgr.cache.num_slots
        finally:
            close_llm(llm)
        print(f"cluster cache {name} ({slots} pages): hits {st['cache_hits']}, misses "
              f"{st['cache_misses']}, admitted {st['cache_admitted']}, evicted "
              f"{st['cache_evicted']}; {st['mirrored_requests']} mirrored at the end")
        # Rows decoded before their prompt's index exists count as dense (exact).
        assert st["retro_rows"] > st["dense_rows"]
        assert st["mirror_refused"] == 0 and st["index_pool_full"] == 0
        assert left == (0, ()), f"host mirror not returned: {left}"
        runs[name] = (toks, st)
    (big, sb), (small, ss) = runs["large"], runs["few pages"]
    assert sb["cache_hits"] > ss["cache_hits"] and ss["cache_misses"] > sb["cache_misses"]
    assert ss["cache_evicted"] > 0
    assert big == small


def test_band_reranking_in_the_engine(tiny_model, dense):
    """``rank_interval`` 4 under vLLM's defaults (CUDA graphs, every layer sharing the
    header word the list kernel writes): with every cluster in the band (full
    retrieval) a re-ranking step selects what a full one does, so the outputs are
    dense's up to bf16 near-ties, while the counters show that about three decode
    rows in four of the indexed requests re-ranked their band (fewer after an index
    update, which forces a full ranking)."""
    from vllm_retro.offline import close_llm
    prompts, dense_out = dense
    llm = gpu_llm(tiny_model, "retro", dict(FULL, rank_interval=4))
    try:
        mgr = manager(llm)
        before = mgr.stats()
        out = generate_with_logprobs(llm, prompts, MAX_TOKENS)
        after = mgr.stats()
    finally:
        close_llm(llm)
    d = {k: after[k] - before[k] for k in ("retro_rows", "dense_rows", "reranked_rows")}
    print(f"band re-ranking: {d}")
    assert d["retro_rows"] + d["dense_rows"] == sum(m - 1 for m in MAX_TOKENS), d
    assert 0 < d["reranked_rows"] <= 0.75 * d["retro_rows"] + len(prompts), d
    assert_same_or_near_tie([t for t, _ in out], dense_out)


def test_carried_rank_reference_in_the_engine(tiny_model, dense):
    """``rank_reference`` "carried" under vLLM's defaults (CUDA graphs; the references
    a table the kernels write every step and the host zeroes with a header): with
    every cluster retrieved the ranking does not change what is read, so the outputs
    are dense's up to bf16 near-ties, while the counters show that most decode rows
    of the indexed requests ranked by the carried reference (all but the first step
    after each index build or growth) and every row was served."""
    from vllm_retro.offline import close_llm
    prompts, dense_out = dense
    llm = gpu_llm(tiny_model, "retro", dict(FULL, rank_reference="carried"))
    try:
        mgr = manager(llm)
        before = mgr.stats()
        out = generate_with_logprobs(llm, prompts, MAX_TOKENS)
        after = mgr.stats()
        refs = int(mgr.rank_ref.ne(0).sum())
    finally:
        close_llm(llm)
    d = {k: after[k] - before[k] for k in ("retro_rows", "dense_rows", "carried_rows")}
    print(f"carried rank reference: {d}, {refs} references set")
    assert d["retro_rows"] + d["dense_rows"] == sum(m - 1 for m in MAX_TOKENS), d
    assert 0.5 * d["retro_rows"] < d["carried_rows"] < d["retro_rows"], d
    assert_same_or_near_tie([t for t, _ in out], dense_out)


def test_dense_switch_inside_cuda_graphs(tiny_model, dense):
    """``dense_below``: a step of at most two decode rows whose contexts average
    fewer tokens runs vLLM's FlashAttention, inside the same captured graphs as
    retro's kernels (the path not taken disabled): short requests alone decode on
    FlashAttention (counted in ``flash_rows``, outputs as the dense engine's), a long
    one on retro's kernels (every cluster exact: as dense up to bf16 near-ties), and
    three short ones together on retro's kernels."""
    from vllm_retro.backend import graph_paths
    from vllm_retro.offline import close_llm
    if not graph_paths.available():
        pytest.skip("the switch under FULL CUDA graphs needs vllm_retro._C built with "
                    "CUDA (scripts/gpu/run.sh with BUILD_EXT=1)")
    prompts, dense_out = dense
    llm = gpu_llm(tiny_model, "retro", dict(FULL, dense_below=2000))
    mgr = manager(llm)
    try:
        assert mgr.switch is not None, "dense switch off although graph_paths is available"
        # The graphs of one and two rows hold both paths.
        assert mgr.switch.paths is not None and len(mgr.switch.paths) >= 2, \
            "no captured graph holds both paths"
        for i in (0, 1):                       # 40 and 300 tokens, alone
            before = mgr.stats()
            out = generate_with_logprobs(llm, [prompts[i]], [MAX_TOKENS[i]])
            after = mgr.stats()
            assert after["flash_rows"] - before["flash_rows"] == MAX_TOKENS[i] - 1
            assert after["retro_rows"] + after["dense_rows"] == \
                before["retro_rows"] + before["dense_rows"]
            assert_same_or_near_tie([out[0][0]], [dense_out[i]])
        assert mgr.switch.paths.toggles >= len(mgr.switch.paths)
        before = mgr.stats()
        out = generate_with_logprobs(llm, [prompts[5]], [MAX_TOKENS[5]])   # 3,100
        after = mgr.stats()
        assert after["flash_rows"] == before["flash_rows"]
        assert after["retro_rows"] + after["dense_rows"] - before["retro_rows"] - \
            before["dense_rows"] == MAX_TOKENS[5] - 1
        assert_same_or_near_tie([out[0][0]], [dense_out[5]])
        # Three short requests together: more rows than a dense step may have (a
        # step where fewer of them decode, the others still prefilling, may be
        # dense: so only "some rows on retro's kernels").
        before = mgr.stats()
        generate_with_logprobs(llm, prompts[:3], [8, 8, 8])
        after = mgr.stats()
        assert after["retro_rows"] + after["dense_rows"] > \
            before["retro_rows"] + before["dense_rows"]
    finally:
        close_llm(llm)


def test_starts_under_defaults(retro_full):
    cfg = retro_full.llm_engine.vllm_config
    assert cfg.kv_transfer_config.kv_connector == "RetroConnector"
    mode = cfg.compilation_config.cudagraph_mode
    assert mode.decode_mode().name == "FULL", mode
    assert os.environ.get("VLLM_USE_V2_MODEL_RUNNER") in (None, "1")
    assert cfg.use_v2_model_runner


def test_full_retrieval_matches_dense(retro_full, dense):
    """Every cluster exact: identical to FlashAttention, or the first difference is
    a bf16 near-tie in dense's own top-2 (gap < 0.05 nats); decode rows served
    by retro's kernels, with an index for the long prompts."""
    prompts, dense_out = dense
    mgr = manager(retro_full)
    before = mgr.stats()
    out = generate_with_logprobs(retro_full, prompts, MAX_TOKENS)
    after = mgr.stats()
    rows_idx = after["retro_rows"] - before["retro_rows"]
    rows_exact = after["dense_rows"] - before["dense_rows"]
    assert rows_idx + rows_exact == sum(m - 1 for m in MAX_TOKENS), (rows_idx, rows_exact)
    assert rows_idx > 0
    assert_same_or_near_tie([t for t, _ in out], dense_out)


def test_requests_leave_the_table(retro_full, tiny_model):
    """Finished and aborted requests leave the worker's request table."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    mgr = manager(retro_full)
    eng = retro_full.llm_engine
    prompts = text_prompts(tiny_model, [1200, 1500, 700], offset=5000)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"lc-{i}", TokensPrompt(prompt_token_ids=p), params)
    for _ in range(8):
        eng.step()
    # vLLM 0.26 suffixes the caller's request id ("lc-0" -> "lc-0-<hex>") inside the engine.
    ids = set(mgr.requests.entries)
    assert all(any(k == f"lc-{i}" or k.startswith(f"lc-{i}-") for k in ids)
               for i in range(3)), ids
    eng.abort_request(["lc-1"])
    while eng.has_unfinished_requests():
        eng.step()
    # A request's finish reaches the worker with the next scheduled step, so two more
    # short requests: afterwards at most the last of them may still be in the table.
    generate_tokens(retro_full, [prompts[0][:50]], 2)
    first_extra = set(mgr.requests.entries)
    generate_tokens(retro_full, [prompts[1][:50]], 2)
    left = set(mgr.requests.entries)
    assert not any(k.startswith("lc-") for k in left), left
    assert not (left & first_extra), (left, first_extra)
    assert len(left) <= 1, left


def test_isolation_together_equals_alone(retro_full, tiny_model):
    """A batch decodes each request as it would alone (the full-retrieval engine)."""
    prompts = text_prompts(tiny_model, [900, 1400, 2000, 2500], offset=20000)
    mgr = manager(retro_full)
    before = mgr.stats()["retro_rows"]
    together = generate_tokens(retro_full, prompts, 16)
    alone = [generate_with_logprobs(retro_full, [p], [16])[0] for p in prompts]
    # The batch splits the kernels' work differently (programs per row depend on the
    # batch size), so fp32 sums round differently: equal, or first different at a
    # near-tie of the request alone. Another request's KV would move far more.
    assert_same_or_near_tie(together, alone)
    assert mgr.stats()["retro_rows"] > before
