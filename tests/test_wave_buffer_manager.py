"""The wave buffer in the GPU backend's manager (design §8, issue 14), on CPU tensors.

``PagedIndexManager`` with ``wave_buffer`` mirrors each request's indexed zone to
the host mirror right after the build, publishes the mirrored end as the row's
horizon (header word ``HDR_HORIZON``), reports it to vLLM's scheduler through the
worker's ``MirrorReporter``, and frees the mirror and the cluster cache's entries
when the request leaves (by its index-pool pages, the device tables' keys, before
the pages go back to the allocator). Driven like ``tests/test_index_pool.py``'s
manager tests: the connector's step metadata, K/V written into the layers' caches
as prefill does.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import ConfigDouble, paged_manager
from vllm_retro.backend.connector import RetroStepMetadata
from vllm_retro.index import paged
from vllm_retro.index.paged import HDR_CLUSTERED_END, I_SIZE, I_START, PagedIndexLayout
from vllm_retro.request_table import RequestUpdate

H, G, D, BS, NB, LAYERS = 2, 4, 32, 16, 200, 2
OPTS = {"segment_size": 256, "update_interval": 64, "recent_tokens": 32,
        "min_retrieval_tokens": 0, "wave_buffer": True}
ROW_BYTES = 2 * D * 8                     # float64 [K | V] of one token and head
TOKEN_BYTES = LAYERS * H * ROW_BYTES      # mirror bytes per clustered token


def _manager(max_num_seqs=4, max_model_len=4096, **opts):
    cfg = ConfigDouble(
        additional_config={"retro": dict(OPTS, **opts)},
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=0),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
        model_config=SimpleNamespace(get_num_attention_heads=lambda pc: H * G,
                                     max_model_len=max_model_len),
        parallel_config=SimpleNamespace(rank=0))
    mgr = paged_manager(cfg)
    lay = PagedIndexLayout(H, D, BS, torch.float64)
    mgr.register_kv_caches({f"model.layers.{i}.self_attn.attn": lay.make_cache(NB)
                            for i in range(LAYERS)})
    return mgr


@pytest.fixture
def wave_header():
    """The header word of the horizon."""
    return paged.HDR_HORIZON


def _wave_manager(**opts):
    return _manager(**opts)


def _write_kv(mgr, blocks, L, seed):
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(L)
    kvs = []
    for kv in mgr.kv_caches.values():
        x = torch.randn(L, H, 2 * D, generator=g, dtype=torch.float64)
        kv[torch.tensor(blocks)[pos // BS], :, pos % BS] = x
        kvs.append(x)
    return kvs


def _prefill(mgr, rid, blocks, L, seed, prompt_len=None):
    """K/V for ``L`` tokens in every layer, then the connector steps after which the
    manager indexes (and mirrors) a prompt of ``prompt_len`` (default ``L``)."""
    kvs = _write_kv(mgr, blocks, L, seed)
    plen = L if prompt_len is None else prompt_len
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, True, list(blocks), 0,
                                                         plen)]))
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, False, [], plen, -1, 1)]))
    return kvs


def _step(mgr, rid, computed):
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate(rid, False, [], computed, -1, 1)]))


def _blocks(first, L):
    return list(range(first, first + math.ceil(L / BS)))


def _check_mirror_equals_pages(mgr, e):
    """Every mirrored cluster's rows and every mirrored page equal the (cluster-
    ordered) paged K/V at their positions, bit for bit (the tables keyed by the
    blocks' pool pages); none of the request's pages above the mirrored end is
    addressed."""
    m, row, s = mgr.mirror, e.ibt_row, mgr.sink_end // BS
    pages = mgr.index_alloc.pages_of(row)
    bt = torch.tensor(e.blocks)
    for li, (name, kv) in enumerate(mgr.kv_caches.items()):
        pool = mgr.pools[name]
        for b in range(s, e.mirrored_end // BS):
            pg = pages[b - s]
            for h in range(H):
                first, size = m.cluster_addr[pg, li, h].tolist()
                ent = pool.ipart[pg, h]
                assert size == int(ent[I_SIZE])
                if size:
                    p = torch.arange(int(ent[I_START]), int(ent[I_START]) + size)
                    assert torch.equal(m.arena[first:first + size],
                                       kv[bt[p // BS], h, p % BS])
                r = int(m.page_row[pg, li, h])
                p = torch.arange(b * BS, (b + 1) * BS)
                assert torch.equal(m.arena[r:r + BS], kv[bt[p // BS], h, p % BS])
        above = pages[e.mirrored_end // BS - s:]
        assert (m.page_row[above, li] == -1).all()
        assert (m.cluster_addr[above, li] == 0).all()


def test_mirror_horizon_and_report_follow_the_index(wave_header):
    mgr = _wave_manager()
    rep = mgr.reporter
    L, P = 1000, 900                      # K/V of 1000 tokens, a prompt of 900
    blocks = _blocks(1, L)
    _prefill(mgr, "a", blocks, L, seed=1, prompt_len=P)
    e = mgr.requests.entries["a"]
    end0 = (P - OPTS["recent_tokens"]) // BS * BS
    assert e.clustered_end == end0 and e.mirror == "on" and e.mirrored_end == end0
    assert int(mgr.headers[blocks[0], wave_header]) == end0
    assert int(mgr.headers[blocks[0], HDR_CLUSTERED_END]) == end0
    assert rep.horizon("a") == end0
    assert rep.take().horizons == {0: {"a": end0}}
    _check_mirror_equals_pages(mgr, e)
    assert mgr.mirror.bytes_mirrored() == (end0 - mgr.sink_end) * TOKEN_BYTES
    # decode: one update_interval closes, is indexed and mirrored; the horizon follows
    _step(mgr, "a", L)
    end1 = end0 + OPTS["update_interval"]
    assert e.clustered_end == e.mirrored_end == end1
    assert int(mgr.headers[blocks[0], wave_header]) == end1
    assert rep.take().horizons == {0: {"a": end1}}
    _check_mirror_equals_pages(mgr, e)
    _step(mgr, "a", L)                    # nothing new: no report
    assert rep.take() is None
    st = mgr.stats()
    assert st["mirrored_requests"] == 1 and st["mirror_refused"] == 0
    assert st["host_mirrored_gib"] * 2**30 == (end1 - mgr.sink_end) * TOKEN_BYTES
    assert st["cache_hits"] == st["cache_misses"] == 0


def test_refused_mirror_stays_resident_and_is_counted(wave_header):
    """A host budget for one prompt: the second request is refused a mirror, keeps
    its index (horizon 0, nothing reported, counted once), the first one's later
    segment does not fit (its horizon stops), and the second is mirrored once the
    first finishes and its own index grows."""
    zone = (900 - 32) // BS * BS - BS      # clustered tokens of a 900-token prompt
    mgr = _wave_manager(host_memory_gib=(zone + 8) * TOKEN_BYTES / 2**30)
    rep = mgr.reporter
    ba, bb = _blocks(1, 1000), _blocks(100, 1000)
    _prefill(mgr, "a", ba, 1000, seed=1, prompt_len=900)
    _prefill(mgr, "b", bb, 1000, seed=2, prompt_len=800)
    a, b = mgr.requests.entries["a"], mgr.requests.entries["b"]
    assert a.mirror == "on" and b.mirror == "refused"
    assert b.clustered_end > 0 and b.ibt_row >= 0              # still indexed
    assert int(mgr.headers[bb[0], wave_header]) == 0
    assert rep.horizon("b") == 0 and set(rep.take().horizons[0]) == {"a"}
    _step(mgr, "b", 830)                  # nothing new for b: not retried, not recounted
    assert mgr.stats()["mirror_refused"] == 1
    # a's later segment does not fit either: its mirror stops, its horizon stays
    _step(mgr, "a", 1000)
    assert a.mirror == "stopped" and a.mirrored_end < a.clustered_end
    assert int(mgr.headers[ba[0], wave_header]) == a.mirrored_end
    assert mgr.stats()["mirror_stopped"] == 1
    mgr.on_step(RetroStepMetadata(finished=["a"]))
    assert mgr.mirror.bytes_reserved() == 0
    _step(mgr, "b", 900)                  # b's index grows: it is mirrored now
    assert b.mirror == "on" and b.mirrored_end == b.clustered_end
    assert rep.horizon("b") == b.clustered_end
    _check_mirror_equals_pages(mgr, b)
    assert mgr.stats()["mirror_refused"] == 1


def _cache_entries(mgr, pages):
    """(slots holding, table entries of) keys of the pool ``pages``."""
    c = mgr.cache
    per = c.num_keys // c.key_shape[0]
    pages = torch.as_tensor(list(pages), dtype=torch.long)
    mine = torch.isin(c.slot_key.div(per, rounding_mode="floor"), pages) & (c.slot_key >= 0)
    return int(mine.sum()), int((c.table[:-1].view(-1, per)[pages] >= 0).sum())


def _admit_all(mgr, row):
    """Puts every page of ``row`` (all layers and heads) into the cluster cache (as
    admission after a step)."""
    c, sh = mgr.cache, mgr.mirror.shape
    pages = torch.tensor(mgr.index_alloc.pages_of(row))
    keys = c.keys(pages.view(-1, 1, 1), torch.arange(sh.num_layers).view(1, -1, 1),
                  torch.arange(sh.num_kv_heads).view(1, 1, -1)).reshape(-1)
    c.admit(keys, mgr.mirror)
    c.next_step()


@pytest.mark.parametrize("how", ["finished", "preempted", "restarted"])
def test_remove_frees_mirror_cache_and_horizon(wave_header, how):
    mgr = _wave_manager()
    L = 900
    ba = _blocks(1, L)
    _prefill(mgr, "a", ba, L, seed=1)
    row = mgr.requests.entries["a"].ibt_row
    pages = mgr.index_alloc.pages_of(row)
    _admit_all(mgr, row)
    assert _cache_entries(mgr, pages)[0] > 0 and mgr.mirror.bytes_reserved() > 0
    mgr.cache.miss_keys[:3] = mgr.cache.keys(pages[0], 0, torch.arange(H).tolist() + [0])
    mgr.cache.miss_count.fill_(3)                 # misses of a pending at removal
    if how == "restarted":               # resumed from token 0 with new blocks
        mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", True, _blocks(100, L),
                                                             0, L)]))
    else:
        mgr.on_step(RetroStepMetadata(finished=["a"],
                                      num_preempted=int(how == "preempted")))
    assert mgr.mirror.bytes_reserved() == 0 and mgr.mirror.request_slots() == ()
    assert mgr.mirror.alloc.num_free_extents == 1
    assert _cache_entries(mgr, pages) == (0, 0)
    assert (mgr.cache.miss_keys[:3] == -1).all()
    assert (mgr.mirror.page_row == -1).all() and (mgr.mirror.cluster_addr == 0).all()
    assert mgr.reporter.horizon("a") == 0
    assert int(mgr.headers[ba[0], wave_header]) == 0
    assert mgr.index_alloc.free_rows == mgr.index_alloc.num_rows


def test_reused_row_and_pages_do_not_see_the_previous_mirror(wave_header):
    """Request a (long) finishes with its pages cached; c gets a's index-table row
    and pool pages and is shorter: those pages' mirror and cache entries hold c's
    K/V only, and a's pages c did not get are unmirrored and uncached."""
    mgr = _wave_manager()
    _prefill(mgr, "a", _blocks(1, 1400), 1400, seed=1)
    row = mgr.requests.entries["a"].ibt_row
    pages_a = mgr.index_alloc.pages_of(row)
    _admit_all(mgr, row)
    assert _cache_entries(mgr, pages_a)[0] > 0
    mgr.on_step(RetroStepMetadata(finished=["a"]))
    bc = list(reversed(_blocks(1, 600)))                # a's block ids, reused
    _prefill(mgr, "c", bc, 600, seed=3)
    c = mgr.requests.entries["c"]
    pages_c = mgr.index_alloc.pages_of(c.ibt_row)
    assert c.ibt_row == row and c.mirror == "on"
    assert pages_c and set(pages_c) <= set(pages_a)     # a's pool pages, reused
    assert _cache_entries(mgr, pages_a) == (0, 0)
    _check_mirror_equals_pages(mgr, c)                  # c's K/V, nothing beyond
    rest = sorted(set(pages_a) - set(pages_c))
    assert rest and (mgr.mirror.page_row[rest] == -1).all()
    assert mgr.mirror.bytes_mirrored() == (c.mirrored_end - mgr.sink_end) * TOKEN_BYTES


def test_address_tables_are_sized_by_the_pool_only():
    """The mirror's and the cache's device tables have one entry per (pool page,
    layer, KV head): the same whatever max_num_seqs and max_model_len (which size
    the index table and the mirror's host slots only)."""
    shapes = []
    for seqs, max_len in ((1, 1024), (4, 4096), (64, 1 << 20)):
        mgr = _wave_manager(max_num_seqs=seqs, max_model_len=max_len)
        p = mgr.index_alloc.num_pages
        assert p == mgr.pools[mgr.first_layer].num_pages
        assert mgr.index_alloc.max_pages == max_len // BS
        assert tuple(mgr.mirror.page_row.shape) == (p, LAYERS, H)
        assert tuple(mgr.mirror.cluster_addr.shape) == (p, LAYERS, H, 2)
        assert mgr.cache.table.numel() == p * LAYERS * H + 1
        v = mgr.wave_views[mgr.first_layer]
        assert (v.num_pages, v.num_layers, v.num_kv_heads) == (p, LAYERS, H)
        shapes.append((p, mgr.cache.table.numel()))
    assert len(set(shapes)) == 1


def test_released_request_refuses_a_dense_read(wave_header):
    """A request that reported a horizon may not be read through its block table:
    a prefill row of it goes through the mirror (listed for the step's plan), and a
    request unknown to the table that reported is refused."""
    mgr = _wave_manager()
    _prefill(mgr, "a", _blocks(1, 900), 900, seed=1)
    assert mgr.reporter.horizon("a") > 0
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", False, [], 900, -1, 4)]))
    assert [e.req_id for e in mgr.released_prefills.values()] == ["a"]
    mgr.reporter.mirrored("x", 64)
    with pytest.raises(RuntimeError, match="no index header"):
        mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("x", False, [], 900, -1, 1)]))


def test_prompt_beyond_the_prefill_lag_is_mirrored_while_it_is_prefilled():
    """With ``prefill_resident_tokens`` 300, a 1,400-token prompt prefilled to 1,000
    tokens has its segments behind the lag clustered, mirrored and reported before
    it completes; the next prefill step's plan finds its row by its first block,
    cuts the released blocks out of its block table and fails loudly on a row of
    another length or a missing row."""
    from vllm_retro.backend.gpu import RetroMetadata
    from vllm_retro.memory.released_prefill import ReleasedRow
    mgr = _wave_manager(prefill_resident_tokens=300)
    assert mgr.prefill_lag == 300
    blocks = _blocks(1, 1400)
    _write_kv(mgr, blocks, 1000, seed=3)
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", True, list(blocks), 0,
                                                         1400, 500)]))
    assert mgr.reporter.horizon("a") == 0          # 500 computed: nothing 300 behind
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", False, [], 500, -1, 500)]))
    assert mgr.reporter.horizon("a") == 0          # 200 behind: less than a segment
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", False, [], 1000, -1, 200)]))
    s = mgr.sink_end
    e = mgr.requests.entries["a"]
    assert e.clustered_end == s + 512 and mgr.reporter.horizon("a") == s + 512
    assert mgr.mirror.bytes_mirrored() == 512 * TOKEN_BYTES
    assert list(mgr.released_prefills.values()) == [e]
    bt = torch.zeros(2, 100, dtype=torch.int32)
    bt[0, :10] = torch.arange(150, 160)                         # another request first
    bt[1, :len(blocks)] = torch.tensor(blocks)
    sl = torch.tensor([160, 1200], dtype=torch.int32)
    pf = SimpleNamespace(block_table=bt, seq_lens=sl)

    def md(qs):
        return RetroMetadata(num_decodes=0, decode_block_table=bt[:0],
                             decode_seq_lens=sl[:0], prefill=pf, num_decode_tokens=0,
                             num_actual_tokens=qs[-1], prefill_query_start=qs)
    plan = mgr.plan_released_prefill(md([0, 16, 216]))
    assert plan.rows == [ReleasedRow(row=1, slot=e.ibt_row, horizon=s + 512)]
    cbt, csl = plan.compacted
    assert csl.tolist() == [160, 1200 - 512]
    assert cbt[1, :s // BS].tolist() == blocks[:s // BS]
    assert cbt[1, s // BS: s // BS + 5].tolist() == blocks[(s + 512) // BS:][:5]
    assert torch.equal(cbt[0], bt[0])
    with pytest.raises(RuntimeError, match="scheduled tokens"):
        mgr.plan_released_prefill(md([0, 16, 100]))
    pf.block_table = bt[:1]
    pf.seq_lens = sl[:1]
    with pytest.raises(RuntimeError, match="not found"):
        mgr.plan_released_prefill(md([0, 16]))


def test_mirror_near_the_host_budget_goes_segment_by_segment():
    """A prompt mirrored behind its prefill lag, then at its end a zone larger than
    the host budget has left: the zone goes segment by segment and the horizon stops
    at the last whole segment that fit (every layer holds it), counted once."""
    budget_tokens = 900
    mgr = _wave_manager(prefill_resident_tokens=300,
                        host_memory_gib=budget_tokens * TOKEN_BYTES / 2**30)
    blocks = _blocks(1, 1400)
    _write_kv(mgr, blocks, 1400, seed=4)
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", True, list(blocks), 0,
                                                         1400, 1000)]))
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", False, [], 1000, -1, 400)]))
    s = mgr.sink_end
    e = mgr.requests.entries["a"]
    assert mgr.reporter.horizon("a") == s + 512 and e.mirror == "on"
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("a", False, [], 1400, -1, 1)]))
    segs = paged.plan_segments(s + 512, 1400, 1400, mgr.config, BS)
    assert len(segs) >= 2 and e.clustered_end == segs[-1][1]
    fit = [p1 for p0, p1 in segs if p1 - s <= budget_tokens]
    assert e.mirror == "stopped" and mgr.mirror_stopped == 1
    assert mgr.reporter.horizon("a") == e.mirrored_end == max(fit)
    assert mgr.mirror.bytes_mirrored() <= budget_tokens * TOKEN_BYTES
    for li in range(LAYERS):      # every layer holds the zone up to the horizon
        assert mgr.mirror.zone_pieces(e.ibt_row, li, s, e.mirrored_end, 10_000)


def test_wave_buffer_off_builds_nothing():
    mgr = _manager(wave_buffer=False)
    assert mgr.mirror is None and mgr.cache is None and mgr.reporter is None
    _prefill(mgr, "a", _blocks(1, 900), 900, seed=1)
    assert "cache_hits" not in mgr.stats()


# ------------------------------------------------------------------- end to end
def _decode(mgr, rows, q, name, wave):
    from vllm_retro.kernels import paged_decode_attention
    bt = torch.zeros(len(rows), 128, dtype=torch.int32)
    for r, (blocks, _) in enumerate(rows):
        bt[r, :len(blocks)] = torch.tensor(blocks)
    sl = torch.tensor([L for _, L in rows])
    kw = {"wave": mgr.wave_views[name]} if wave else {}
    return paged_decode_attention(q, mgr.kv_caches[name], mgr.layout, bt, sl,
                                  mgr.headers, mgr.index_alloc.ibt, mgr.pools[name],
                                  mgr.sink_end, 0.2, **kw)


def test_decode_with_released_blocks_equals_wave_buffer_off():
    """Two requests indexed with the wave buffer on and off (same K/V, same index):
    with every block below the horizon poisoned with NaN (as if vLLM had handed it
    to another request), decode through the cache / mirror equals decode from the
    pages with the wave buffer off, before and after admission fills the cache."""
    L = 1100
    ba, bb = _blocks(1, L), _blocks(100, L)
    off, on = _manager(wave_buffer=False), _manager(cluster_cache_gib=2**-20)
    for mgr in (off, on):
        _prefill(mgr, "a", ba, L, seed=1)
        _prefill(mgr, "b", bb, L, seed=2)
    assert on.wave_views
    for blocks in (ba, bb):
        e = on.requests.entries["a" if blocks is ba else "b"]
        assert e.mirrored_end == e.clustered_end > 0
        poison = torch.tensor(blocks[on.sink_end // BS:e.mirrored_end // BS])
        for kv in on.kv_caches.values():
            kv[poison] = float("nan")
    q = torch.randn(2, H * G, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    rows = [(ba, L), (bb, L)]
    for step in range(3):
        for name in on.kv_caches:
            want = _decode(off, rows, q, name, wave=False)
            got = _decode(on, rows, q, name, wave=True)
            assert not torch.isnan(got).any()
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for mgr in (on, off):        # next step: admission of this step's misses
            mgr.on_step(RetroStepMetadata(updates=[
                RequestUpdate("a", False, [], L, -1, 1),
                RequestUpdate("b", False, [], L, -1, 1)]))
    # Whether the CPU twin counts lookups is the kernel side's business; the GPU
    # engine test asserts the cache's counters.
    print("cache after 3 steps:", {k: v for k, v in on.stats().items() if "cache" in k})


def test_step_metadata_carries_scheduled_tokens():
    """The connector's step metadata names each request's query tokens (what the
    multi-token refusal above reads)."""
    from vllm_retro.backend.connector import step_metadata
    new = SimpleNamespace(req_id="n", block_ids=([1, 2],), num_computed_tokens=0,
                          prompt_token_ids=list(range(20)))
    cached = SimpleNamespace(req_ids=["c"], new_block_ids=[None], num_computed_tokens=[40],
                             resumed_req_ids=set())
    so = SimpleNamespace(finished_req_ids=set(), preempted_req_ids=set(),
                         scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                         num_scheduled_tokens={"n": 20, "c": 1})
    meta = step_metadata(so, {})
    assert [(u.req_id, u.num_scheduled) for u in meta.updates] == [("n", 20), ("c", 1)]
    del so.num_scheduled_tokens
    assert [u.num_scheduled for u in step_metadata(so, {}).updates] == [-1, -1]


def test_wave_counters_reach_the_metrics_payload(wave_header):
    """The manager's wave-buffer counters ride in the worker's stats payload and
    vLLM's log line (``RetroConnectorStats.reduce``)."""
    from vllm_retro.backend.metrics import RetroConnectorStats, gpu_snapshot
    mgr = _wave_manager()
    _prefill(mgr, "a", _blocks(1, 900), 900, seed=1)
    _admit_all(mgr, mgr.requests.entries["a"].ibt_row)
    pages = mgr.index_alloc.pages_of(mgr.requests.entries["a"].ibt_row)
    mgr.cache.lookup(mgr.cache.keys(torch.tensor(pages + list(range(NB - 8, NB))), 0, 0))
    snap = gpu_snapshot(mgr)
    assert snap["cache_admitted"] > 0 and snap["cache_hits"] > 0 and snap["cache_misses"] > 0
    assert snap["pcie_bytes"] == (snap["cache_misses"] + snap["cache_admitted"]) * \
        mgr.cache.page_bytes
    red = RetroConnectorStats({"workers": {"0": {"seq": 1, "values": snap}}}).reduce()
    assert 0 < red["wave_cache_hit_rate"] < 1 and red["wave_mirror_refused"] == 0


def test_auto_index_pool_covers_the_mirrored_tokens():
    """The automatic index pool adds, with the wave buffer, the index (and decode
    scratch) of every token the host budget can mirror: a page of the pool per
    block of KV the mirror holds, on top of the share sized for the KV cache."""
    from vllm_retro.backend.gpu import index_pool_auto_bytes
    from vllm_retro.config import INDEX_POOL_AUTO_FRACTION
    from vllm_retro.kernels.triton_decode import DecodeWorkspace
    lay = PagedIndexLayout(8, 128, 16, torch.bfloat16)
    layers, hq = 32, 32
    usable = 128 * 2**30
    base = index_pool_auto_bytes(usable, lay, layers, hq)
    assert base == pytest.approx(INDEX_POOL_AUTO_FRACTION * usable)
    host = 100 * 2**30
    per_page = lay.index_bytes * layers + DecodeWorkspace.page_bytes(8, 4)
    extra = index_pool_auto_bytes(usable, lay, layers, hq, host) - base
    blocks = host // (16 * 8 * 128 * 2 * 2 * layers)        # 16 tokens of K and V, bf16
    assert extra == pytest.approx(blocks * per_page)
    # Llama-3-8B shape: 100 GiB of host mirror hold ~800K tokens, whose index is ~10 GiB.
    assert 9.5 * 2**30 < extra < 11 * 2**30


@pytest.mark.parametrize("opts", [dict(value_correction=True), dict(cluster_size=8),
                                  dict(preset="accuracy")])
def test_auto_index_pool_keeps_pool_and_kv_balanced(opts):
    """For a layout whose index costs more per KV byte (the value correction's rows,
    several entries per block, the error rank's scratch), the automatic pool still
    holds the index of as many tokens as the KV cache beside it holds, as the base
    fraction does for the default layout: the memory the two split, ``A``, is what
    the base share implies, and pool / (index bytes per token) equals (A - pool) /
    (KV bytes per token) within 0.5%."""
    from vllm_retro.backend.gpu import index_pool_auto_bytes, pool_page_bytes
    from vllm_retro.config import INDEX_POOL_AUTO_FRACTION, RetroConfig
    from vllm_retro.index.paged import FLOAT_SLOTS
    cfg = RetroConfig.from_dict(opts)
    err = cfg.retrieval_rank == "error"
    lay = PagedIndexLayout.for_config(cfg, 8, 128, 16, torch.bfloat16)
    layers, hq, usable = 32, 32, 128 * 2**30
    kv_tok = lay.kv_page_bytes * layers / 16
    base = PagedIndexLayout(8, 128, 16, torch.bfloat16, float_slots=FLOAT_SLOTS)
    r0 = pool_page_bytes(base, layers, hq) / 16 / kv_tok
    a = INDEX_POOL_AUTO_FRACTION * usable * (1 + r0) / r0
    pool = index_pool_auto_bytes(usable, lay, layers, hq, error_rank=err)
    idx_tok = pool_page_bytes(lay, layers, hq, err) * lay.entries_per_block / 16
    assert idx_tok > 1.3 * r0 * kv_tok              # a layout that really costs more
    assert pool / idx_tok == pytest.approx((a - pool) / kv_tok, rel=5e-3)
    # The default layout keeps the measured fraction.
    assert index_pool_auto_bytes(usable, base, layers, hq) == \
        pytest.approx(INDEX_POOL_AUTO_FRACTION * usable)
