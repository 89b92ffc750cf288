"""The retro-owned index pool (docs/design.md §8.3 option A, step 1) on CPU tensors:
the allocator of pool pages and index-table rows, and the GPU path's manager
(``PagedIndexManager``, run on CPU tensors with the torch twin) handing them out
and taking them back on finish, abort, preemption and restart; isolation when
vLLM reuses a finished request's block ids; a request that finds the pool full
attended exactly and counted."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import ConfigDouble, paged_manager
from vllm_retro.backend.connector import RetroStepMetadata
from vllm_retro.index.paged import (HDR_CLUSTERED_END, HDR_IBT_ROW, HDR_N_ESTIMATE,
                                    HDR_N_RETRIEVE, IndexAllocator, IndexPool,
                                    PagedIndexLayout)
from vllm_retro.kernels import reference
from vllm_retro.request_table import RequestUpdate

H, G, D, BS, NB, LAYERS = 2, 4, 32, 16, 200, 2
OPTS = {"segment_size": 256, "update_interval": 64, "recent_tokens": 32,
        "min_retrieval_tokens": 0}


# ------------------------------------------------------------------ allocator
def _check_allocator(a: IndexAllocator, owned: dict) -> None:
    """No page owned twice, free + owned = all, each row's ibt entries its pages."""
    pages = [p for row in owned for p in a.pages_of(row)]
    assert len(pages) == len(set(pages))
    assert len(pages) + a.free_pages == a.num_pages
    assert len(owned) + a.free_rows == a.num_rows
    for row, n in owned.items():
        got = a.pages_of(row)
        assert len(got) == n
        assert a.ibt[row, :n].tolist() == got


def test_allocator_soak_returns_every_page_and_row():
    rng = random.Random(3)
    a = IndexAllocator(num_pages=300, num_rows=7, max_pages=80)
    owned = {}
    refused = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            row = a.acquire(rng.randrange(0, 60))
            if row is None:
                refused += 1
            else:
                assert row not in owned
                owned[row] = len(a.pages_of(row))
        elif op < 0.7 and owned:
            row = rng.choice(list(owned))
            n = rng.randrange(0, 30)
            got = a.extend(row, n)
            if got is None:
                refused += 1       # nothing taken
            else:
                assert len(got) == n
                owned[row] += n
        elif owned:
            row = rng.choice(list(owned))
            a.release(row)
            del owned[row]
        _check_allocator(a, owned)
    for row in list(owned):
        a.release(row)
    a.release(12345)                  # unknown rows are ignored
    assert a.free_pages == 300 and a.free_rows == 7
    assert refused > 0                # the soak did hit full pools / rows


def test_allocator_refusals_take_nothing():
    a = IndexAllocator(num_pages=10, num_rows=2, max_pages=8)
    r0 = a.acquire(6)
    assert a.acquire(9) is None                       # more than max_pages
    assert a.acquire(5) is None and a.free_pages == 4  # more than the free pages
    r1 = a.acquire(4)
    assert a.acquire(0) is None                       # no free row
    assert a.extend(r0, 1) is None and a.pages_of(r0) == a.ibt[r0, :6].tolist()
    a.release(r1)
    assert a.extend(r0, 3) is None                    # row r0 would exceed max_pages
    assert len(a.extend(r0, 2)) == 2 and a.free_pages == 2


# ------------------------------------------------------------- the manager
def _vllm_config(opts, max_num_seqs=4, **attrs):
    """The parts of a vLLM config the manager reads (``attrs``: more of them)."""
    return ConfigDouble(
        additional_config={"retro": opts},
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=0),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        model_config=SimpleNamespace(get_num_attention_heads=lambda pc: H * G,
                                     max_model_len=4096),
        parallel_config=SimpleNamespace(rank=0), **attrs)


def _manager(index_pool_gib=0.0, max_num_seqs=4, **extra):
    opts = dict(OPTS, index_pool_gib=index_pool_gib) if index_pool_gib else dict(OPTS)
    opts.update(extra)
    mgr = paged_manager(_vllm_config(opts, max_num_seqs))
    lay = PagedIndexLayout(H, D, BS, torch.float64)
    mgr.register_kv_caches({f"model.layers.{i}.self_attn.attn": lay.make_cache(NB)
                            for i in range(LAYERS)})
    return mgr


def test_a_dropped_engines_state_and_caches_are_collected():
    """The worker state is a process global keyed by the engine's config; once the
    config is gone its manager, index pools and KV caches must go too (with the
    config held strongly by the manager, a closed GPU engine kept its whole KV
    cache, and the next engine in the process could not start)."""
    import gc
    import weakref

    from vllm_retro.backend.gpu import manager_for
    from vllm_retro.worker_state import _STATES, existing_state
    cfg = _vllm_config(dict(OPTS))
    mgr = manager_for(cfg)
    lay = PagedIndexLayout(H, D, BS, torch.float64)
    caches = {f"model.layers.{i}.self_attn.attn": lay.make_cache(NB) for i in range(LAYERS)}
    mgr.register_kv_caches(caches)
    rid, L = "r", 700
    blocks = list(range(1, math.ceil(L / BS) + 2))
    _prefill(mgr, rid, blocks, L, seed=3)
    assert existing_state(cfg).paged is mgr and mgr.vllm_config is cfg
    cache_ref, mgr_ref = weakref.ref(caches["model.layers.0.self_attn.attn"]), weakref.ref(mgr)
    n_states = len(_STATES)
    del cfg, mgr, caches
    gc.collect()
    assert mgr_ref() is None and cache_ref() is None
    assert len(_STATES) == n_states - 1


def _prefill(mgr, rid, blocks, L, seed):
    """Writes a prompt's K/V in every layer (as prefill does) and runs the two
    connector steps after which the manager indexes it; returns the K/V written."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(L)
    kvs = []
    for kv in mgr.kv_caches.values():
        x = torch.randn(L, H, 2 * D, generator=g, dtype=torch.float64)
        kv[torch.tensor(blocks)[pos // BS], :, pos % BS] = x
        kvs.append(x)
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, True, list(blocks), 0, L)]))
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, False, [], L)]))
    return kvs


def _decode(mgr, rows, q, layer=0, full=False, select=None):
    """The twin's output for rows ``[(blocks, L)]`` at one layer (``full``: every
    cluster retrieved, by a temporary header budget; ``select``: the twin's, by
    default "exact", or "bucket" where the pools carry rank references, which rank
    with buckets only)."""
    name = list(mgr.kv_caches)[layer]
    if select is None:
        select = "exact" if mgr.pools[name].rank_ref is None else "bucket"
    bt = torch.zeros(len(rows), 64, dtype=torch.int32)
    for r, (blocks, _) in enumerate(rows):
        bt[r, :len(blocks)] = torch.tensor(blocks)
    sl = torch.tensor([L for _, L in rows])
    hdr = mgr.headers.clone()
    if full:
        for blocks, _ in rows:
            hdr[blocks[0], HDR_N_RETRIEVE] = 10**6
            hdr[blocks[0], HDR_N_ESTIMATE] = 0
    out, st = reference.paged_decode_attention(
        q, mgr.kv_caches[name], mgr.layout, bt, sl, hdr, mgr.index_alloc.ibt,
        mgr.pools[name], mgr.sink_end, 0.2, select=select)
    return out, st


def _dense(q, kv):
    """Float64 full attention of ``q [Hq, D]`` over one request's K/V ``[L, H, 2D]``."""
    out = torch.zeros(H * G, D, dtype=torch.float64)
    for kh in range(H):
        qh = q[kh * G:(kh + 1) * G].double()
        p = torch.softmax((qh @ kv[:, kh, :D].T) * 0.2, dim=-1)
        out[kh * G:(kh + 1) * G] = p @ kv[:, kh, D:]
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_pages_return_on_finish_abort_preemption_and_restart():
    mgr = _manager()
    alloc = mgr.index_alloc
    total = alloc.num_pages
    assert mgr.pools and len(mgr.pools) == LAYERS and mgr.workspace.num_pages == total
    L = 700
    need = ((L - OPTS["recent_tokens"]) // BS * BS - mgr.sink_end) // BS
    blocks = {r: list(range(1 + 50 * i, 1 + 50 * i + math.ceil(L / BS)))
              for i, r in enumerate("abc")}
    for i, r in enumerate("abc"):
        _prefill(mgr, r, blocks[r], L, seed=i)
        e = mgr.requests.entries[r]
        assert e.clustered_end > 0 and e.ibt_row >= 0
        assert len(alloc.pages_of(e.ibt_row)) == need
        assert int(mgr.headers[blocks[r][0], HDR_IBT_ROW]) == e.ibt_row
    assert alloc.free_pages == total - 3 * need
    # finished (or aborted: the worker sees both as finished ids)
    mgr.on_step(RetroStepMetadata(finished=["a"]))
    assert alloc.free_pages == total - 2 * need
    # preempted: in the finished ids, counted as preemptions
    mgr.on_step(RetroStepMetadata(finished=["b"], num_preempted=1))
    assert alloc.free_pages == total - need and mgr.requests.preemptions == 1
    # restarted from token 0 while still in the table (resumed with new blocks)
    row_c = mgr.requests.entries["c"].ibt_row
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("c", True, blocks["a"], 0, L)]))
    assert alloc.free_pages == total and alloc.free_rows == alloc.num_rows
    assert mgr.requests.entries["c"].ibt_row == -1
    assert int(mgr.headers[blocks["a"][0], HDR_CLUSTERED_END]) == 0   # header reset
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("c", False, [], L)]))
    assert mgr.requests.entries["c"].ibt_row >= 0 and row_c >= 0
    mgr.on_step(RetroStepMetadata(finished=["c"]))
    assert alloc.free_pages == total and alloc.free_rows == alloc.num_rows


def test_manager_soak_all_pages_back():
    """Many requests of random lengths through the manager, finishing, aborting,
    being preempted and resumed in random order, some finding the pool full: at the
    end every page and row is free, and at every step no page has two owners."""
    mgr = _manager(max_num_seqs=3)
    alloc = mgr.index_alloc
    rng = random.Random(11)
    live = {}
    free_blocks = list(range(1, NB))
    rng.shuffle(free_blocks)
    for i in range(40):
        if len(live) < 3 and rng.random() < 0.7:
            L = rng.choice([200, 400, 700, 1100])
            n = math.ceil(L / BS)
            if len(free_blocks) >= n:
                blocks = [free_blocks.pop() for _ in range(n)]
                rid = f"r{i}"
                mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, True, blocks, 0,
                                                                     L)]))
                mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, False, [], L)]))
                live[rid] = blocks
        elif live:
            rid = rng.choice(list(live))
            if rng.random() < 0.5:
                mgr.on_step(RetroStepMetadata(finished=[rid],
                                              num_preempted=int(rng.random() < 0.5)))
            else:   # resumed after preemption: restarts with (the same) blocks
                blocks = live[rid]
                mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(
                    rid, True, blocks, 0, len(blocks) * BS)]))
                continue
            free_blocks.extend(live.pop(rid))
        owned = {e.ibt_row: len(alloc.pages_of(e.ibt_row))
                 for e in mgr.requests.entries.values() if e.ibt_row >= 0}
        _check_allocator(alloc, owned)
    mgr.on_step(RetroStepMetadata(finished=list(live)))
    assert alloc.free_pages == alloc.num_pages and alloc.free_rows == alloc.num_rows


def test_reused_block_ids_keep_each_request_its_own_index():
    """Request a finishes and request c gets a's block ids (in another order); b,
    still running, keeps its output bit for bit, and c's decode is its own: with
    every cluster retrieved it equals full attention over c's K/V."""
    mgr = _manager()
    L = 900
    n = math.ceil(L / BS)
    ba = list(range(1, 1 + n))
    bb = list(range(100, 100 + n))
    kva = _prefill(mgr, "a", ba, L, seed=1)
    kvb = _prefill(mgr, "b", bb, L, seed=2)
    q = torch.randn(2, H * G, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    before, _ = _decode(mgr, [(ba, L), (bb, L)], q)
    full, _ = _decode(mgr, [(ba, L), (bb, L)], q, full=True)
    assert _rel(full[0], _dense(q[0], kva[0])) < 1e-10
    assert _rel(full[1], _dense(q[1], kvb[0])) < 1e-10
    row_a = mgr.requests.entries["a"].ibt_row
    pages_a = set(mgr.index_alloc.pages_of(row_a))
    mgr.on_step(RetroStepMetadata(finished=["a"]))
    bc = list(reversed(ba))                      # a's blocks, reused by c
    kvc = _prefill(mgr, "c", bc, L, seed=3)
    e = mgr.requests.entries["c"]
    assert e.clustered_end > 0
    assert set(mgr.index_alloc.pages_of(e.ibt_row)) & pages_a   # c reuses a's pages too
    after, _ = _decode(mgr, [(bb, L)], q[1:])
    assert torch.equal(after[0], before[1])      # b untouched
    for layer in range(LAYERS):
        full, st = _decode(mgr, [(bc, L), (bb, L)], q, layer=layer, full=True)
        assert _rel(full[0], _dense(q[0], kvc[layer])) < 1e-10
        assert _rel(full[1], _dense(q[1], kvb[layer])) < 1e-10
    out, st = _decode(mgr, [(bc, L)], q[:1])
    assert st[0, 0] < st[0, 2]                   # c is served by its index


def test_pool_full_request_is_attended_exactly_and_counted():
    """A pool of 60 pages: the first request of 900 tokens takes 53, the second
    finds the pool full, is attended exactly (equal to dense) and counted once;
    once the first finishes, the second is indexed."""
    from vllm_retro.backend.metrics import gpu_snapshot
    lay = PagedIndexLayout(H, D, BS, torch.float64)
    from vllm_retro.kernels import DecodeWorkspace
    per_page = lay.index_bytes * LAYERS + DecodeWorkspace.page_bytes(H, G)
    mgr = _manager(index_pool_gib=60.5 * per_page / 2**30)
    assert mgr.index_alloc.num_pages == 60
    L = 900
    n = math.ceil(L / BS)
    b1, b2 = list(range(1, 1 + n)), list(range(100, 100 + n))
    _prefill(mgr, "r1", b1, L, seed=1)
    kv2 = _prefill(mgr, "r2", b2, L, seed=2)
    assert mgr.requests.entries["r1"].clustered_end > 0
    e2 = mgr.requests.entries["r2"]
    assert e2.clustered_end == 0 and e2.ibt_row == -1
    assert int(mgr.headers[b2[0], HDR_CLUSTERED_END]) == 0
    assert mgr.stats()["index_pool_full"] == 1
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("r2", False, [], L)]))
    assert mgr.stats()["index_pool_full"] == 1           # counted once per request
    assert gpu_snapshot(mgr)["index_pool_full"] == 1
    q = torch.randn(1, H * G, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4))
    out, st = _decode(mgr, [(b2, L)], q)
    assert st[0, 0] == st[0, 2] == L * H                 # every token read exactly
    assert _rel(out[0], _dense(q[0], kv2[0])) < 1e-12
    mgr.on_step(RetroStepMetadata(finished=["r1"]))
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("r2", False, [], L)]))
    assert mgr.requests.entries["r2"].clustered_end > 0  # indexed once pages came back


@pytest.mark.usefixtures("triton_interpreter")
def test_kernels_read_the_managers_pool():
    """The Triton kernels (interpreted on CPUs) over the manager's index table and
    pool equal the twin, for a row indexed after another request freed its pages."""
    pytest.importorskip("triton")
    from vllm_retro.kernels import uses_triton
    if not uses_triton(torch.zeros(1)):
        pytest.skip("Triton kernels were compiled for a GPU before the interpreter was on")
    from vllm_retro.kernels import paged_decode_attention
    # Summaries in the KV dtype: the kernels read a float32 copy of the pool (8-bit
    # summaries through the manager: the GPU engine tests).
    mgr = _manager(summary_bits=16)
    L = 700
    n = math.ceil(L / BS)
    ba, bb = list(range(1, 1 + n)), list(range(90, 90 + n))
    _prefill(mgr, "a", ba, L, seed=5)
    mgr.on_step(RetroStepMetadata(finished=["a"]))
    _prefill(mgr, "b", bb, L, seed=6)
    _prefill(mgr, "c", list(reversed(ba)), L, seed=7)
    rows = [(bb, L), (list(reversed(ba)), L)]
    q = torch.randn(2, H * G, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(8))
    want, _ = _decode(mgr, rows, q)
    name = mgr.first_layer
    bt = torch.zeros(2, 64, dtype=torch.int32)
    for r, (blocks, _) in enumerate(rows):
        bt[r, :len(blocks)] = torch.tensor(blocks)
    lay32 = PagedIndexLayout(H, D, BS, torch.float32)
    got = paged_decode_attention(q.float(), mgr.kv_caches[name].float(), lay32, bt,
                                 torch.tensor([L, L]), mgr.headers, mgr.index_alloc.ibt,
                                 _float_pool(mgr.pools[name]), mgr.sink_end, 0.2)
    assert _rel(got, want) < 1e-4


def _float_pool(pool: IndexPool) -> IndexPool:
    lay = PagedIndexLayout(H, D, BS, torch.float32)
    out = IndexPool(lay, pool.num_pages)
    out.fpart.copy_(pool.fpart)
    out.ipart.copy_(pool.ipart)
    return out


@pytest.mark.parametrize("extra", [{"cluster_size": 8}, {"cluster_size": 4},
                                   {"cluster_size": 8, "value_correction": True}])
def test_manager_small_clusters_and_value_correction(extra):
    """Issue 16's options through the GPU path's manager: clusters smaller than a KV
    block take ``bs / cluster_size`` pool pages per clustered block (all returned on
    finish) and ``value_correction`` gives the pages its two rows; with every
    cluster retrieved the twin is full attention over the request's K/V, and at the
    default budget it reads part of it."""
    mgr = _manager(**extra)
    epb = BS // extra["cluster_size"]
    assert mgr.layout.entries_per_block == epb
    assert mgr.layout.value_correction == bool(extra.get("value_correction"))
    alloc = mgr.index_alloc
    total = alloc.num_pages
    L = 700
    blocks = list(range(1, 1 + math.ceil(L / BS)))
    kvs = _prefill(mgr, "a", blocks, L, seed=11)
    e = mgr.requests.entries["a"]
    assert len(alloc.pages_of(e.ibt_row)) == (e.clustered_end - mgr.sink_end) // BS * epb
    q = torch.randn(1, H * G, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(12))
    for layer in range(LAYERS):
        dense = _dense(q[0], kvs[layer])
        full, _ = _decode(mgr, [(blocks, L)], q, layer=layer, full=True)
        assert _rel(full[0], dense) < 1e-10
        part, st = _decode(mgr, [(blocks, L)], q, layer=layer)
        assert 0 < st[0, 0] < L * H and torch.isfinite(part).all()
    mgr.on_step(RetroStepMetadata(finished=["a"]))
    assert alloc.free_pages == total and alloc.free_rows == alloc.num_rows


def test_decode_before_registration_is_profiling_only_with_the_connector():
    """Decode rows before the KV caches are registered: with retro's connector
    configured they can only be vLLM's memory-profiling dummy rows (no KV block
    exists for a request yet): not ready, no error; without the connector the
    caches would never be registered, so it is an error, not a silent zero."""
    from vllm_retro.backend.connector import kv_transfer_config

    def cfg(ktc):
        return _vllm_config(dict(OPTS), kv_transfer_config=ktc)

    with_conn = paged_manager(cfg(kv_transfer_config()))
    assert with_conn.decode_ready() is False
    assert with_conn.decode_ready() is False          # logged once, still not ready
    for ktc in (None, SimpleNamespace(kv_connector="SomeOtherConnector")):
        with pytest.raises(RuntimeError, match="RetroConnector"):
            paged_manager(cfg(ktc)).decode_ready()
    lay = PagedIndexLayout(H, D, BS, torch.float64)
    with_conn.register_kv_caches({f"model.layers.{i}.self_attn.attn": lay.make_cache(NB)
                                  for i in range(LAYERS)})
    assert with_conn.decode_ready() is True


def test_band_phase_is_shared_and_advances_once_per_step():
    """``rank_interval`` > 1: one phase tensor for every layer's pool, advanced once
    per engine step (modulo the interval), so the rows of a batch rank in full on
    the same steps; none without band re-ranking."""
    mgr = _manager(rank_interval=3)
    ph = mgr.band_phase
    assert ph is not None and ph.dtype == torch.int32 and ph.numel() == 1
    assert all(p.band_phase is ph for p in mgr.pools.values())
    seen = []
    for _ in range(5):
        mgr.on_step(RetroStepMetadata())
        seen.append(int(ph[0]))
    assert seen == [(seen[0] + i) % 3 for i in range(5)]
    plain = _manager()
    assert plain.band_phase is None
    assert all(p.band_phase is None for p in plain.pools.values())


def test_carried_rank_reference_tables_reset_with_the_header():
    """``rank_reference`` "carried": one ``[layers, ibt rows, H]`` float32 table,
    each layer's pool a view of its layer; writing a request's header (its index
    built) zeroes that request's references in every layer, and only those; the
    twin then ranks the request as "step" once and stores its reference (each
    layer's own); none with "step" or where "auto" cannot carry."""
    mgr = _manager(rank_reference="carried")
    ref = mgr.rank_ref
    alloc = mgr.index_alloc
    assert ref.dtype == torch.float32 and ref.shape == (LAYERS, alloc.ibt.shape[0], H)
    for i, pool in enumerate(mgr.pools.values()):
        assert pool.rank_ref.data_ptr() == ref[i].data_ptr() and pool.rank_ref.is_contiguous()
    ref.fill_(1.0)
    L = 700
    blocks = list(range(1, 1 + math.ceil(L / BS)))
    _prefill(mgr, "a", blocks, L, seed=21)
    row = mgr.requests.entries["a"].ibt_row
    assert not ref[:, row].any()
    others = [i for i in range(ref.shape[1]) if i != row]
    assert bool((ref[:, others] == 1.0).all())
    q = torch.randn(1, H * G, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(22))
    for layer in range(LAYERS):
        _decode(mgr, [(blocks, L)], q, layer=layer, select="bucket")
    assert ref[:, row].ne(0).all() and not torch.equal(ref[0, row], ref[1, row])
    plain = _manager(rank_reference="step")
    assert plain.rank_ref is None and all(p.rank_ref is None for p in plain.pools.values())
    # "auto" (the default): carried with the mass rank, not with the error rank.
    assert _manager().rank_ref is not None
    assert _manager(retrieval_rank="error").rank_ref is None


def test_band_phase_can_be_turned_off(monkeypatch):
    """``RETRO_BAND_PHASE=0`` (module switch ``BAND_PHASE``): each row keeps its own
    phase (the pools get none), for A/B runs of the two forms."""
    from vllm_retro.backend import gpu
    monkeypatch.setattr(gpu, "BAND_PHASE", False)
    mgr = _manager(rank_interval=3)
    assert mgr.band_phase is None
    assert all(p.band_phase is None for p in mgr.pools.values())
    mgr.on_step(RetroStepMetadata())
