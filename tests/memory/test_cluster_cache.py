"""The wave buffer's GPU cluster cache on CPU tensors: its batched device-side LRU
against a plain-Python model of the same policy (exact hits, misses, victims and
contents), isolation of pool pages reused by another request, and reads through
the cache equal to reads from the host mirror of a real paged index (float64)."""

import math
import random

import pytest
import torch

from conftest import index_pool_of, mirror_segment, segment_job  # noqa: E402

from vllm_retro.config import RetroConfig
from vllm_retro.index.paged import (I_SIZE, I_START, PagedIndexLayout, build_segments,
                                    plan_segments)
from vllm_retro.memory import HostMirror, MirrorShape
from vllm_retro.memory.cluster_cache import (C_ADMITTED, C_EVICTED, C_HITS, C_MISSES,
                                             ClusterCache, _triton_interpreting)

IMPLS = pytest.mark.parametrize("impl", ["torch", "triton"])


def _use(impl, request):
    """Runs the page copies through torch ops or the Triton kernel (interpreted on
    CPU)."""
    if impl == "triton":
        pytest.importorskip("triton")
        request.getfixturevalue("triton_interpreter")
        if not (torch.cuda.is_available() or _triton_interpreting()):
            pytest.skip("the page-copy kernel was compiled for a GPU before the "
                        "interpreter was on")


class LRUModel:
    """The documented policy, one key at a time."""

    def __init__(self, num_slots):
        self.s = num_slots
        self.table, self.slot_key, self.stamp = {}, [-1] * num_slots, [-1] * num_slots
        self.clock = 0
        self.hits = self.misses = self.admitted = self.evicted = 0
        self.fill, self.lru = 0, False

    def lookup(self, keys):
        for k in keys:
            if k < 0:
                continue
            if k in self.table:
                self.stamp[self.table[k]] = self.clock
                self.hits += 1
            else:
                self.misses += 1

    def admit(self, keys, mirrored):
        want = sorted({k for k in keys if k >= 0 and k not in self.table and mirrored(k)})
        n = min(len(keys), self.s)
        if not self.lru and self.fill + n <= self.s:
            # Never filled: never-used slots in order (freed ones wait for the LRU).
            for k in want[:n]:
                self.table[k], self.slot_key[self.fill], self.stamp[self.fill] = \
                    self.fill, k, self.clock
                self.fill += 1
                self.admitted += 1
            return
        self.lru = True
        order = sorted(range(self.s), key=lambda i: (self.stamp[i], i))
        for i, k in enumerate(want[:min(len(keys), self.s)]):
            c = order[i]
            if self.stamp[c] >= self.clock:          # used in this step: not a victim
                break
            old = self.slot_key[c]
            if old >= 0:
                del self.table[old]
                self.evicted += 1
            self.table[k], self.slot_key[c], self.stamp[c] = c, k, self.clock
            self.admitted += 1

    def invalidate(self, pages, per_page):
        for c in range(self.s):
            if self.slot_key[c] >= 0 and self.slot_key[c] // per_page in pages:
                del self.table[self.slot_key[c]]
                self.slot_key[c], self.stamp[c] = -1, -1


def _synthetic_mirror(shape, seed, unmirrored=0.1):
    """A mirror whose page table maps every key to its own arena page (a few keys
    left unmirrored), filled with random rows: the policy test needs addresses and
    contents, not an index."""
    nkeys = shape.num_pages * shape.num_layers * shape.num_kv_heads
    m = HostMirror(shape, nkeys * shape.block_size * shape.row_bytes)
    g = torch.Generator().manual_seed(seed)
    m.arena.copy_(torch.randn(m.arena.shape, generator=g, dtype=m.arena.dtype))
    rows = torch.arange(nkeys, dtype=torch.int32) * shape.block_size
    drop = torch.rand(nkeys, generator=g) < unmirrored
    m.page_row.view(-1).copy_(torch.where(drop, -1, rows))
    return m


def _check_same(cache, model):
    c = cache.counters.tolist()
    assert c[C_HITS] == model.hits and c[C_MISSES] == model.misses
    assert c[C_ADMITTED] == model.admitted and c[C_EVICTED] == model.evicted
    assert cache.slot_key[:-1].tolist() == model.slot_key
    assert cache.stamp[:-1].tolist() == model.stamp
    table = cache.table[:-1]
    live = (table >= 0).nonzero().flatten().tolist()
    assert {k: int(table[k]) for k in live} == model.table


@IMPLS
def test_lru_matches_the_python_model_on_random_traces(impl, request):
    _use(impl, request)
    shape = MirrorShape(max_requests=3, num_layers=2, num_kv_heads=2, head_dim=4,
                        block_size=4, num_pages=30, dtype=torch.float64)
    m = _synthetic_mirror(shape, seed=0)
    nkeys = 30 * 2 * 2
    rng = random.Random(1)
    for slots in (7, 29, 60):
        cache = ClusterCache.for_mirror(m, slots)
        model = LRUModel(slots)
        hot = rng.sample(range(nkeys), 12)
        for step in range(60):
            cache.next_step()
            model.clock += 1
            used = []
            for _ in range(rng.randrange(1, 4)):
                n = rng.randrange(1, 12)
                keys = [rng.choice(hot) if rng.random() < 0.7 else rng.randrange(nkeys)
                        for _ in range(n)] + [-1] * rng.randrange(3)
                rng.shuffle(keys)
                kt = torch.tensor(keys)
                slot = cache.lookup(kt)
                model.lookup(keys)
                assert slot.tolist() == [model.table.get(k, -1) if k >= 0 else -1
                                         for k in keys]
                used += keys
            cache.admit(torch.tensor(used), m)
            model.admit(used, lambda k: int(m.page_row.view(-1)[k]) >= 0)
            _check_same(cache, model)
            if rng.random() < 0.1:
                pages = rng.sample(range(30), 6)        # a leaving request's pool pages
                cache.invalidate_pages(pages)
                model.invalidate(set(pages), 4)
                _check_same(cache, model)
        # Cached pages hold their keys' mirror pages.
        for c, k in enumerate(model.slot_key):
            if k >= 0:
                row = int(m.page_row.view(-1)[k])
                assert torch.equal(cache.kv[c], m.arena[row: row + 4])
        assert model.evicted > 0 and model.hits > 0 and model.fill > 0


def test_reused_pool_page_never_sees_its_previous_owner():
    """Two requests' pages are cached; the first leaves and its pool page goes to a
    new request: after ``invalidate_pages`` the page misses and reads the new
    owner's mirror rows, the other request's page stays cached."""
    shape = MirrorShape(max_requests=2, num_layers=1, num_kv_heads=1, head_dim=4,
                        block_size=4, num_pages=16, dtype=torch.float64)
    m = _synthetic_mirror(shape, seed=2, unmirrored=0.0)
    cache = ClusterCache.for_mirror(m, 16)
    k0, k1 = cache.keys(3, 0, 0), cache.keys(9, 0, 0)    # two requests' pool pages
    both = torch.stack([k0, k1])
    cache.next_step()
    assert cache.lookup(both).tolist() == [-1, -1]
    cache.admit(both, m)
    cache.next_step()
    s0, s1 = cache.lookup(both).tolist()
    assert s0 >= 0 and s1 >= 0 and s0 != s1
    assert torch.equal(cache.read_pages(both, m), torch.stack([
        m.arena[int(m.page_row.view(-1)[k]):][:4] for k in (k0, k1)]))
    # The owner of page 3 finishes; a new request gets page 3 with other data.
    cache.invalidate_pages([3])
    row = int(m.page_row.view(-1)[k0])
    m.arena[row: row + 4] = -7.0
    cache.next_step()
    assert cache.lookup(both).tolist() == [-1, s1]
    assert (cache.read_pages(k0.view(1), m) == -7.0).all()
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 3


CFG = RetroConfig(segment_size=256, update_interval=64, recent_tokens=32, cluster_size=16,
                  min_retrieval_tokens=0, kmeans_iters=3)




@IMPLS
def test_reads_through_the_cache_equal_the_mirror_and_the_paged_cache(impl, request):
    """A real index (float64), mirrored; decode-like steps retrieve random clusters
    of every layer and head through a cache far smaller than the mirror. Every
    cluster read through the cache equals its tokens in the paged cache."""
    _use(impl, request)
    lay = PagedIndexLayout(2, 16, 16, torch.float64)
    bs, h = 16, 2
    L, nl, req = 900, 2, 1
    g = torch.Generator().manual_seed(4)
    shape = MirrorShape.for_layout(lay, max_requests=2, num_layers=nl, num_pages=80)
    m = HostMirror(shape, 2 * L * shape.bytes_per_token())
    caches = []
    segs = plan_segments(0, L, L, CFG, bs)
    m.reserve(req, segs[-1][1] - segs[0][0])
    for li in range(nl):
        kv = lay.make_cache(80)
        blocks = torch.randperm(79, generator=g)[:math.ceil(L / bs) + 1] + 1
        pos = torch.arange(L)
        kv[blocks[pos // bs], :, pos % bs] = torch.randn(L, h, 32, generator=g,
                                                         dtype=torch.float64)
        for p0, p1 in segs:
            build_segments(kv, lay, index_pool_of(lay, kv), [segment_job(lay, kv, blocks, p0, p1)], CFG)
            mirror_segment(m, req, li, kv, lay, blocks, p0, p1)
        caches.append((kv, blocks))
    lb0, lb1 = segs[0][0] // bs, segs[-1][1] // bs
    cache = ClusterCache.for_mirror(m, 24)                     # of 2 x 2 x 53 pages
    rng = random.Random(5)
    for step in range(25):
        cache.next_step()
        used = []
        for li, (kv, blocks) in enumerate(caches):
            ipart = index_pool_of(lay, kv).ipart
            for hh in range(h):
                for b in rng.sample(range(lb0, lb1), 6):          # "retrieved" clusters
                    size = int(ipart[blocks[b], hh, I_SIZE])
                    if size == 0:
                        continue
                    a = int(ipart[blocks[b], hh, I_START])
                    pages = torch.arange(a // bs, (a + size - 1) // bs + 1)
                    keys = cache.keys(blocks[pages], li, hh)     # pool page = block id
                    slots = cache.lookup(keys)
                    got = cache.read_pages(keys, m, slots).reshape(-1, 32)
                    got = got[a % bs: a % bs + size]
                    pos = torch.arange(a, a + size)     # the cluster's positions
                    assert torch.equal(got, kv[blocks[pos // bs], hh, pos % bs])
                    assert torch.equal(got, m.cluster_rows(int(blocks[b]), li, hh))
                    used.append(keys)
        cache.admit(torch.cat(used), m)
    st = cache.stats()
    assert st["hits"] > 0 and st["evicted"] > 0
    pages = torch.cat([blk for _, blk in caches]).unique()
    m.free(req, pages)
    cache.invalidate_pages(pages)
    assert m.bytes_reserved() == 0 and (cache.slot_key == -1).all()
    assert (cache.table == -1).all() and (m.page_row == -1).all()


def test_admission_without_copy_hands_out_the_slots_and_rows_to_fill():
    """``copy=False`` (fused admission) installs the same keys in the same slots as
    an admission with copy and returns the rows; filling them gives the same cache."""
    shape = MirrorShape(max_requests=2, num_layers=2, num_kv_heads=2, head_dim=4,
                        block_size=4, num_pages=12, dtype=torch.float64)
    m = _synthetic_mirror(shape, seed=6, unmirrored=0.2)
    a, b = ClusterCache.for_mirror(m, 10), ClusterCache.for_mirror(m, 10)
    rng = random.Random(7)
    for _ in range(15):
        keys = torch.tensor([rng.randrange(48) for _ in range(8)] + [-1])
        for c in (a, b):
            c.next_step()
            c.lookup(keys)
        sa, ra = a.admit(keys, m)
        sb, rb = b.admit(keys, m, copy=False)
        assert torch.equal(sa, sb) and torch.equal(ra, rb)
        assert torch.equal(a.table, b.table) and torch.equal(a.stamp, b.stamp)
        for slot, row in zip(sb.tolist(), rb.tolist()):
            if slot >= 0:
                b.kv[slot] = m.arena[row: row + 4]
        assert torch.equal(a.kv[:-1], b.kv[:-1])
    assert int(a.counters[C_EVICTED]) > 0


def test_miss_buffer_admission_and_view():
    """The decode kernels' miss buffer (what ``ClusterCache.view`` shares with them):
    ``admit_misses`` admits exactly the keys below ``miss_count`` (as ``admit`` would
    from those keys) and empties the buffer; a freed request's pending misses are
    dropped; a view shares the cache's and the mirror's tensors."""
    shape = MirrorShape(max_requests=2, num_layers=2, num_kv_heads=2, head_dim=4,
                        block_size=4, num_pages=12, dtype=torch.float64)
    m = _synthetic_mirror(shape, seed=8, unmirrored=0.0)
    c, ref = ClusterCache.for_mirror(m, 5, miss_capacity=8), ClusterCache.for_mirror(m, 5)
    v = c.view(m, 1)
    assert v.miss_keys.data_ptr() == c.miss_keys.data_ptr()
    assert v.cache_table.data_ptr() == c.table.data_ptr()
    assert v.page_row.data_ptr() == m.page_row.data_ptr() and v.layer == 1
    assert v.key(5, 1) == int(c.keys(5, 1, 1)) == (5 * 2 + 1) * 2 + 1
    c.miss_keys.copy_(torch.tensor([30, 3, 30, 7, 40, 41, 42, 43]))   # 43-41: stale
    c.miss_count.fill_(5)
    c.next_step()
    ref.next_step()
    c.admit_misses(m)
    ref.admit(torch.tensor([30, 3, 30, 7, 40]), m)
    assert int(c.miss_count) == 0
    assert torch.equal(c.table, ref.table) and torch.equal(c.kv, ref.kv)
    # Pool pages 6..11 (keys 24..47) are freed with misses pending: not admitted.
    c.miss_keys.copy_(torch.tensor([25, 4, 26, 0, 0, 0, 0, 0]))
    c.miss_count.fill_(3)
    c.invalidate_pages(range(6, 12))
    c.next_step()
    c.admit_misses(m)
    live = set(c.slot_key[:-1].tolist()) - {-1}
    assert 4 in live and not live & {25, 26}
    with pytest.raises(ValueError, match="layer"):
        c.view(m, 2)


def test_admission_bound_from_earlier_steps_counts():
    """``miss_limit`` is the latest recorded step's miss count (recorded by
    ``admit_misses``; on the CPU the previous call's), rounded up to a power of two
    of at least the floor and capped at the buffer: 0 after a step without misses.
    ``admit_misses(limit=n)`` admits from the first ``n`` entries only (as ``admit``
    of those keys would) and empties the buffer either way."""
    shape = MirrorShape(max_requests=2, num_layers=2, num_kv_heads=2, head_dim=4,
                        block_size=4, num_pages=12, dtype=torch.float64)
    m = _synthetic_mirror(shape, seed=9, unmirrored=0.0)
    c, ref = ClusterCache.for_mirror(m, 40, miss_capacity=8), ClusterCache.for_mirror(m, 40)
    assert c.miss_limit() == 0                          # nothing recorded yet
    c.miss_keys.copy_(torch.tensor([30, 3, 30, 7, 40, 41, 2, 1]))
    c.miss_count.fill_(7)
    c.admit_misses(m, limit=3)
    ref.admit(torch.tensor([30, 3, 30]), m)
    assert int(c.miss_count) == 0
    assert torch.equal(c.table, ref.table) and torch.equal(c.kv, ref.kv)
    assert c.miss_limit(floor=2) == 8 and c.miss_limit(floor=1) == 8   # 7 -> 8 (cap 8)
    c.miss_count.fill_(3)
    c.admit_misses(m, limit=0)                          # dropped, not admitted
    assert torch.equal(c.table, ref.table)
    assert c.miss_limit(floor=1) == 4 and c.miss_limit(floor=2) == 4 and c.miss_limit() == 8
    c.admit_misses(m, limit=c.miss_limit())             # a step without misses
    assert c.miss_limit() == 0


def test_fresh_slots_then_lru_equal_the_lru_selection_alone():
    """While the cache has never filled, admission takes never-used slots in order
    (no LRU selection); without invalidations that is the slot the LRU selection
    picks (stamp -1, lowest slot first), so the tables, stamps and pages equal a
    cache that runs the LRU selection from the start, step by step, also after the
    cache has filled and starts to evict."""
    shape = MirrorShape(max_requests=2, num_layers=2, num_kv_heads=2, head_dim=4,
                        block_size=4, num_pages=40, dtype=torch.float64)
    m = _synthetic_mirror(shape, seed=10)
    a, b = ClusterCache.for_mirror(m, 50), ClusterCache.for_mirror(m, 50)
    b._lru = True                                       # the LRU selection only
    rng = random.Random(3)
    fresh_steps = 0
    for step in range(30):
        for c in (a, b):
            c.next_step()
        keys = torch.tensor([rng.randrange(-1, 160) for _ in range(rng.randrange(1, 12))])
        fresh_steps += not a._lru
        for c in (a, b):
            c.lookup(keys)
            c.admit(keys, m)
        for t in ("table", "slot_key", "stamp", "kv", "counters"):
            assert torch.equal(getattr(a, t), getattr(b, t)), (step, t)
    assert fresh_steps > 3 and a._lru and int(a.counters[C_EVICTED]) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_bookkeeping_never_syncs_on_cuda():
    """What the engine runs every decode step and on every finished request
    (``miss_limit`` + ``admit_misses``, in the fresh-slot phase and under the LRU
    selection; ``invalidate_pages``; ``HostMirror.free``; ``to_device``) makes no
    host-device sync: torch's sync debug mode raises on one. A sync there would make
    the host wait for the previous step's forward (vLLM schedules asynchronously)."""
    from vllm_retro.transfer import to_device
    shape = MirrorShape(max_requests=2, num_layers=2, num_kv_heads=2, head_dim=8,
                        block_size=4, num_pages=64, dtype=torch.bfloat16)
    nkeys = 64 * 2 * 2
    m = HostMirror(shape, nkeys * shape.block_size * shape.row_bytes, device="cuda")
    m.page_row.view(-1).copy_(torch.arange(nkeys, dtype=torch.int32, device="cuda")
                              * shape.block_size)
    c = ClusterCache.for_mirror(m, 40, miss_capacity=64)
    g = torch.Generator(device="cuda").manual_seed(5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(12):
            c.miss_keys.copy_(torch.randint(0, nkeys, (64,), generator=g, device="cuda"))
            c.miss_count.fill_(20 + step)
            c.admit_misses(m, c.miss_limit(floor=16))
            c.next_step()
        c.invalidate_pages(to_device([3, 5, 7], torch.int64, "cuda"))
        c.invalidate_pages([1, 2])
        m.free(0, [4, 6])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert c._lru and int(c.counters[C_ADMITTED]) > 40 and int(c.counters[C_EVICTED]) > 0
    live = (c.slot_key[:-1] >= 0).nonzero().flatten().tolist()
    for s in live:
        k = int(c.slot_key[s])
        assert int(c.table[k]) == s and k // 4 not in (1, 2, 3, 5, 7)
        row = k * shape.block_size
        assert torch.equal(c.kv[s].cpu(), m.arena[row:row + 4])
