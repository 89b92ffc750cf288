"""The wave buffer's host tier on CPU tensors: the arena allocator, admission by host
memory (reserve, refuse, free, soak), and the mirror of clustered segments checked
against a recomputation from the paged cache and its index."""

import random

import pytest
import torch

from conftest import filled_cache, index_pool_of, mirror_segment, segment_job  # noqa: E402
from vllm_retro.config import RetroConfig
from vllm_retro.index.paged import (I_SIZE, I_START, PagedIndexLayout, build_segments,
                                    plan_segments)
from vllm_retro.memory import ExtentAllocator, HostMemoryExceeded, HostMirror, MirrorShape

CFG = RetroConfig(segment_size=256, update_interval=64, recent_tokens=32, cluster_size=16,
                  min_retrieval_tokens=0, kmeans_iters=3)




def test_extent_allocator_first_fit_coalesces_and_refuses_double_free():
    a = ExtentAllocator(100)
    x, y, z = a.alloc(30), a.alloc(30), a.alloc(30)
    assert (x, y, z) == (0, 30, 60) and a.alloc(11) is None and a.in_use == 90
    a.free(y, 30)
    assert a.alloc(31) is None and a.alloc(20) == 30     # first fit in the hole
    with pytest.raises(ValueError):
        a.free(y + 5, 10)                                   # part of a live extent
    with pytest.raises(ValueError):
        a.free(50, 10)                                      # a free extent
    a.free(30, 20)
    a.free(x, 30)
    a.free(z, 30)
    assert a.in_use == 0 and a.num_free_extents == 1 and a.largest_free == 100


def _shape(**kw):
    base = dict(max_requests=4, num_layers=2, num_kv_heads=2, head_dim=8, block_size=16,
                num_pages=64, dtype=torch.float32)
    base.update(kw)
    return MirrorShape(**base)


def test_admission_refuses_cleanly_and_soak_returns_every_byte():
    s = _shape()
    per_tok = s.bytes_per_token()                    # 2 layers x 2 heads x 64 B
    m = HostMirror(s, 1000 * per_tok)
    m.reserve(0, 600)
    with pytest.raises(HostMemoryExceeded, match="host_memory_gib"):
        m.reserve(1, 500)
    assert m.request_slots() == (0,) and m.bytes_reserved() == 600 * per_tok
    with pytest.raises(ValueError):
        m.reserve(0, 10)                             # slot still held
    assert m.free(0, []) == 600 * per_tok and m.bytes_reserved() == 0
    # Soak: random reserve/free cycles of varying sizes, refusals included.
    rng = random.Random(0)
    live, refused = set(), 0
    for _ in range(3000):
        slot = rng.randrange(s.max_requests)
        if slot in live:
            m.free(slot, [slot])
            live.discard(slot)
        else:
            try:
                m.reserve(slot, rng.randrange(1, 500))
                live.add(slot)
            except HostMemoryExceeded:
                refused += 1
        assert m.bytes_reserved() <= m.capacity_bytes
    for slot in list(live):
        m.free(slot, [])
    assert refused > 0 and m.bytes_reserved() == 0
    assert m.alloc.num_free_extents == 1 and m.alloc.largest_free == m.alloc.capacity


def _indexed(lay, L, seed, nb=80, originals=None):
    kv, blocks = filled_cache(lay, nb, L, seed)
    if originals is not None:   # each token's K/V before the build reordered them
        pos = torch.arange(L)
        originals.append(kv[blocks[pos // lay.block_size], :, pos % lay.block_size].clone())
    segs = plan_segments(0, L, L, CFG, lay.block_size)
    for p0, p1 in segs:
        build_segments(kv, lay, index_pool_of(lay, kv), [segment_job(lay, kv, blocks, p0, p1)], CFG)
    return kv, blocks, segs


def test_mirror_is_cluster_contiguous_and_equals_the_paged_cache():
    """Every cluster's arena rows are its K/V read from the pages at its contiguous
    positions ``[start, start + size)`` (float64: exact), the mirrored rows of a
    segment and head are a permutation of the tokens' original K/V (every clustered
    token mirrored once), and each page of the mirror is the K/V of its logical
    block, at the block's pool page (here the block id: ``index_pool_of``)."""
    lay = PagedIndexLayout(2, 16, 16, torch.float64)
    bs, h, d = 16, 2, 16
    L = 700
    orig = []
    layers = [_indexed(lay, L, seed, originals=orig) for seed in (1, 2)]
    shape = MirrorShape.for_layout(lay, max_requests=3, num_layers=2, num_pages=80)
    m = HostMirror(shape, 4 * L * shape.bytes_per_token())
    assert tuple(m.page_row.shape) == (80, 2, 2)
    assert tuple(m.cluster_addr.shape) == (80, 2, 2, 2)
    segs = layers[0][2]
    clustered = segs[-1][1] - segs[0][0]
    m.reserve(2, clustered // 2)          # half: the rest goes to a second extent
    for li, (kv, blocks, sg) in enumerate(layers):
        assert sg == segs
        for p0, p1 in sg:
            assert mirror_segment(m, 2, li, kv, lay, blocks, p0, p1) is None
    assert m.bytes_mirrored() == clustered * shape.bytes_per_token()
    # Layer 0 filled the reservation; layer 1's two segments took one extent each.
    assert len(m._requests[2].extents) == 3
    for li, (kv, blocks, _) in enumerate(layers):
        ipart = index_pool_of(lay, kv).ipart
        for p0, p1 in segs:
            for hh in range(h):
                seen = []
                for b in range(p0 // bs, p1 // bs):
                    size = int(ipart[blocks[b], hh, I_SIZE])
                    start = int(ipart[blocks[b], hh, I_START])
                    pg = int(blocks[b])
                    got = m.cluster_rows(pg, li, hh)
                    assert got.shape[0] == size
                    # The page of block b: the K/V at its 16 positions, this head.
                    prow = int(m.page_row[pg, li, hh])
                    assert torch.equal(m.arena[prow: prow + bs], kv[blocks[b], hh])
                    if size == 0:
                        continue
                    pos = torch.arange(start, start + size)
                    want = kv[blocks[pos // bs], hh, pos % bs]
                    assert torch.equal(got, want)
                    seen.append(got)
                # All the segment's tokens, each once: a permutation of the original
                # rows of this head (random rows: all distinct).
                rows = torch.cat(seen)
                ref = orig[li][p0:p1, hh]
                match = (rows[:, None, :] == ref[None, :, :]).all(-1)
                assert (match.sum(0) == 1).all() and (match.sum(1) == 1).all()
    # Rows outside the clustered zone (sinks, recent window) are not mirrored.
    kv0, blocks0, _ = layers[0]
    for b in (0, segs[-1][1] // bs):
        pg = int(blocks0[b])
        assert int(m.page_row[pg, 0, 0]) == -1 and int(m.cluster_addr[pg, 0, 0, 1]) == 0
    held = m.bytes_reserved()
    pages = torch.cat([blk for _, blk, _ in layers]).unique()
    assert (m.page_row >= 0).any()
    assert m.free(2, pages) == held and m.bytes_reserved() == 0
    assert (m.page_row == -1).all() and (m.cluster_addr == 0).all()


def test_mirror_beyond_budget_raises_and_keeps_the_request_freeable():
    lay = PagedIndexLayout(2, 16, 16, torch.float32)
    kv, blocks, segs = _indexed(lay, 700, seed=5)
    shape = MirrorShape.for_layout(lay, max_requests=2, num_layers=1, num_pages=80)
    first = segs[0][1] - segs[0][0]
    m = HostMirror(shape, first * shape.bytes_per_token())
    m.reserve(0, first)
    mirror_segment(m, 0, 0, kv, lay, blocks, *segs[0])
    with pytest.raises(ValueError, match="position order"):
        mirror_segment(m, 0, 0, kv, lay, blocks, *segs[0])  # again: would leak its rows
    with pytest.raises(HostMemoryExceeded):
        mirror_segment(m, 0, 0, kv, lay, blocks, *segs[1])
    assert m.free(0, blocks) == m.capacity_bytes and m.bytes_reserved() == 0
    assert (m.page_row == -1).all()
    with pytest.raises(ValueError):
        mirror_segment(m, 0, 0, kv, lay, blocks, 17, 64)    # not block-aligned
