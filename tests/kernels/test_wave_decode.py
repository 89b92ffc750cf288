"""Decode attention over released blocks (design §8.3 step 2): retrieved clusters
below a row's mirrored horizon are read from the wave buffer (GPU cluster cache on
a hit, host arena on a miss), never through vLLM's block table.

Each test builds real indexes (``Scene`` of the decode tests: ragged rows, shuffled
pool pages and index-table rows), mirrors the clustered zone below each row's
horizon with :meth:`HostMirror.mirror_segment` (request slot = the row's ibt row,
keys = its pool pages, layer 1 of 2), then *poisons* the released blocks (NaN, or
another request's K/V, as when vLLM hands them on) and compares: the twin with the view against the twin
on the clean cache without it (bit for bit), the Triton kernel (interpreted on CPU)
against the twin, and the kernel's cache bookkeeping against a plain-Python count of
(row, head, cluster, page) visits made from the kernel's own selection lists.
"""

import dataclasses
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from test_paged_decode_attention import (BS, D, DEV, G, H, Scene, _rel, _td,  # noqa: E402
                                         selection, twin_selection)
from vllm_retro.index.paged import HDR_CLUSTERED_END, HDR_HORIZON, HDR_IBT_ROW  # noqa: E402
from vllm_retro.kernels import reference  # noqa: E402
from vllm_retro.memory import HostMirror, MirrorShape  # noqa: E402
from vllm_retro.memory.cluster_cache import (C_ADMITTED, C_EVICTED, C_HITS,  # noqa: E402
                                             C_MISSES, ClusterCache)

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture(autouse=True, params=[False, True], ids=["resolve_kernel", "in_collect"])
def resolve_in_collect(request, monkeypatch):
    """Every test with the page lookups in their own kernel and in the list kernel
    (``triton_decode.RESOLVE_IN_COLLECT``): same outputs, same bookkeeping."""
    monkeypatch.setattr(_td(), "RESOLVE_IN_COLLECT", request.param)
    return request.param

NL, LAYER = 2, 1          # the mirror holds two layers; the scene's cache is layer 1
SCALE = 0.2


class Wave:
    """A scene's host mirror, cluster cache and layer view; rows mirrored below their
    horizons, then their released blocks poisoned."""

    def __init__(self, sc: Scene, num_slots: int = 64, miss_capacity: int = 4096):
        self.sc = sc
        shape = MirrorShape(11, NL, H, D, BS, sc.pool.num_pages, sc.lay.dtype)
        self.mirror = HostMirror(shape, 4 << 20, device=DEV, pin=DEV == "cuda")
        self.cache = ClusterCache.for_mirror(self.mirror, num_slots, miss_capacity)
        self.view = self.cache.view(self.mirror, LAYER)
        self.clean = None

    def hdr(self, r):
        L, row = self.sc.rows[r]
        return self.sc.headers[int(row[0])]

    def irow(self, r):
        return int(self.hdr(r)[HDR_IBT_ROW])

    def key(self, irow, head, block):
        """The view's key of logical block ``block`` of ibt row ``irow``: its pool
        page's (what the kernel computes from the index table)."""
        page = int(self.sc.alloc.ibt[irow, block - self.sc.S // BS])
        return self.view.key(page, head)

    def release(self, horizons: dict, poison: dict = None):
        """Mirrors rows' zones ``[S, horizon)``, writes the horizons into the headers,
        keeps a clean copy of the cache (of these rows' blocks on later calls), then
        poisons the released blocks: NaN, or (``poison[r] = r2``) row r2's blocks'
        contents."""
        sc, S = self.sc, self.sc.S
        for r, hz in horizons.items():
            E = int(self.hdr(r)[HDR_CLUSTERED_END])
            assert E and hz % BS == 0 and hz <= E
            self.hdr(r)[HDR_HORIZON] = hz
            if hz > S:
                ir = self.irow(r)
                self.mirror.reserve(ir, hz - S)
                pages = sc.alloc.ibt[ir, :(hz - S) // BS]
                self.mirror.mirror_segment(ir, LAYER, sc.kv, sc.lay,
                                           sc.rows[r][1].long().to(DEV), S, hz, sc.pool, pages)
        if self.clean is None:
            self.clean = sc.cpu_cache()
        else:
            for r in horizons:
                blocks = sc.rows[r][1].long()
                self.clean[blocks] = sc.kv[blocks.to(DEV)].cpu()
        for r, hz in horizons.items():
            if hz <= S:
                continue
            blocks = sc.rows[r][1].long()[S // BS: hz // BS].to(DEV)
            src = (poison or {}).get(r)
            if src is None:
                sc.kv[blocks] = float("nan")
            else:
                other = sc.rows[src][1].long()[:len(blocks)].to(DEV)
                sc.kv[blocks] = sc.kv[other].clone()

    def admit(self, keys):
        self.cache.admit(torch.tensor(keys, dtype=torch.int64), self.mirror)

    def visits(self, ws, r, kh):
        """Page keys of row r, head kh visited below the horizon: one per (retrieved
        cluster, page it has in-zone tokens in), from the kernel's selection lists."""
        L, row = self.sc.rows[r]
        hdr = self.hdr(r).tolist()
        E, hz = hdr[HDR_CLUSTERED_END], min(hdr[HDR_HORIZON], hdr[HDR_CLUSTERED_END])
        if not (L and E):
            return []
        out = []
        for start, size in selection(self.sc, ws, r, kh)[0]:
            pages = sorted({p // BS for p in range(start, start + size)
                            if self.sc.S <= p < min(E, L, hz)})
            out += [self.key(self.irow(r), kh, pg) for pg in pages]
        return out


def run(wv: Wave, q, ws=None, td=None, select=None, retrieval_rank="mass"):
    """(kernel output with the view, twin output with the view, workspace); the twin
    selects as the kernels do (``select``: default ``td.SELECT``)."""
    td = td or _td()
    sc = wv.sc
    bt, sl = sc.tensors()
    b = len(sc.rows)
    if ws is None:
        ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV)
    out = torch.full((b, H * G, D), float("nan"), device=DEV)
    td.paged_decode_attention_triton(q.to(DEV), sc.kv, sc.lay, bt, sl, sc.headers,
                                     sc.alloc.ibt, sc.pool, sc.S, SCALE, out, ws,
                                     count_stats=True, wave=wv.view,
                                     retrieval_rank=retrieval_rank)
    ref, _ = reference.paged_decode_attention(q.cpu(), sc.cpu_cache(), sc.lay, bt.cpu(),
                                              sl.cpu(), sc.headers.cpu(), sc.alloc.ibt,
                                              sc.pool, sc.S, SCALE, wave=wv.view,
                                              select=select or td.SELECT,
                                              retrieval_rank=retrieval_rank)
    return out.cpu(), ref, ws


def unreleased(wv: Wave, q):
    """The twin without a view over the cache before the poisoning (selecting as the
    kernels do)."""
    sc = wv.sc
    bt, sl = sc.tensors()
    ref, _ = reference.paged_decode_attention(q.cpu(), wv.clean, sc.lay, bt.cpu(), sl.cpu(),
                                              sc.headers.cpu(), sc.alloc.ibt, sc.pool,
                                              sc.S, SCALE, select=_td().SELECT)
    return ref


def check_bookkeeping(wv: Wave, ws, table_before, stamp_before, counters_before):
    """Counters, stamps and miss keys of one kernel call against a plain count."""
    c = wv.cache
    table_before, stamp_before, counters_before = (
        t.cpu() for t in (table_before, stamp_before, counters_before))
    hits, misses = [], []
    rows = wv.mirror.page_row.view(-1).cpu()
    for r in range(len(wv.sc.rows)):
        for kh in range(H):
            for k in wv.visits(ws, r, kh):
                if table_before[k] >= 0:
                    hits.append(int(table_before[k]))
                elif rows[k] >= 0:
                    misses.append(k)
    d = (c.counters.cpu() - counters_before).tolist()
    assert d[C_HITS] == len(hits) and d[C_MISSES] == len(misses), (d, len(hits), len(misses))
    n = int(c.miss_count)
    assert n == len(misses)
    assert sorted(c.miss_keys[:n].tolist()) == sorted(misses)
    stamp = c.stamp.cpu().clone()
    clock = int(c.clock)
    for s in set(hits):
        assert stamp[s] == clock
        stamp[s] = stamp_before[s]
    assert torch.equal(stamp, stamp_before)      # nothing else stamped
    return len(hits), len(misses)


# ----------------------------------------------------------------------- tests
def test_released_rows_match_unreleased():
    """Ragged rows: full horizon, partial horizon (poisoned with another row's K/V),
    horizon 0, no index, padding. Empty cache: every visit is a miss read from the
    arena. (a) twin with the view on the poisoned cache == twin on the clean cache,
    bit for bit; (b) kernel == twin; (c) bookkeeping == the plain count."""
    torch.manual_seed(21)
    sc = Scene(200)
    E0 = sc.add(700)
    E1 = sc.add(600, n_ret=6, n_est=9)
    sc.add(200, index="none")
    sc.add(420)
    sc.add(0)
    wv = Wave(sc)
    hz1 = sc.S + (E1 - sc.S) // BS // 2 * BS
    wv.release({0: E0, 1: hz1, 3: 0}, poison={1: 2})
    q = torch.randn(5, H * G, D)
    out, ref, ws = run(wv, q)
    clean = unreleased(wv, q)
    assert torch.equal(ref, clean)
    assert not torch.isnan(out).any()
    assert out[4].abs().max() == 0
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    for r in (0, 1, 3):
        for kh in range(H):
            assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, SCALE)
    z = torch.zeros(4, dtype=torch.int64)
    _, n_miss = check_bookkeeping(wv, ws, wv.cache.table.clone(), wv.cache.stamp.clone(), z)
    assert n_miss > 0 and int(wv.cache.counters[C_HITS]) == 0
    # Without the view the kernel reads the poisoned blocks (what the view prevents).
    td = _td()
    bt, sl = sc.tensors()
    bad = torch.zeros(5, H * G, D, device=DEV)
    with warnings.catch_warnings():          # (the interpreter warns about the NaNs)
        warnings.simplefilter("ignore", RuntimeWarning)
        td.paged_decode_attention_triton(q.to(DEV), sc.kv, sc.lay, bt, sl, sc.headers,
                                         sc.alloc.ibt, sc.pool, sc.S, SCALE, bad, ws)
    bad = bad.cpu()
    assert torch.isnan(bad[0]).all() and _rel(bad[3], ref[3]) < 2e-3


def test_prefetched_zones_match_in_turn(monkeypatch):
    """The attention kernel's ``PRE`` form (the retrieved and estimated zones' first
    addresses loaded before the steady zone's tiles, each retrieved group's successor
    during its tiles) with a wave buffer view: bit-equal to the form that loads them
    in turn, and the twin's, over several retrieved groups per program, a partial
    horizon and a cache that fills between the two calls."""
    torch.manual_seed(23)
    td = _td()
    sc = Scene(200)
    E0 = sc.add(700, n_ret=8, n_est=12)
    E1 = sc.add(600, n_ret=6, n_est=9)
    sc.add(0)
    wv = Wave(sc)
    wv.release({0: E0, 1: sc.S + (E1 - sc.S) // BS // 2 * BS})
    q = torch.randn(3, H * G, D)
    got = []
    for on in (False, True):
        for table in (td.TUNE, td.TUNE_SMALL_BATCH, td.TUNE_WAVE):
            monkeypatch.setitem(table, "attend", dict(table["attend"], RG=2, TR=16,
                                                      PRE=on))
        ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, max_split=1)
        out, ref, _ = run(wv, q, ws=ws)
        assert not torch.isnan(out).any()
        assert _rel(out, ref) < 2e-3, (on, _rel(out, ref))
        got.append(out)
    assert torch.equal(got[0], got[1])


@pytest.mark.parametrize("select,rank", [("bucket", "mass"), ("exact", "mass"),
                                         ("bucket", "error")])
def test_selection_with_released_rows(monkeypatch, select, rank):
    """Both selections (the bucket one without a candidate kernel), and the error
    rank, with the view: released rows read from the arena as the twin's selection
    reads them, and the bookkeeping (page lookups in the list kernel, or in their
    own: the module's fixture) is the plain count."""
    td = _td()
    monkeypatch.setattr(td, "SELECT", select)
    torch.manual_seed(23)
    sc = Scene(200)
    E0 = sc.add(700)
    E1 = sc.add(600, n_ret=6, n_est=9)
    sc.add(0)
    wv = Wave(sc)
    hz1 = sc.S + (E1 - sc.S) // BS // 2 * BS
    wv.release({0: E0, 1: hz1}, poison={1: 0})
    q = torch.randn(3, H * G, D)
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, error_rank=rank == "error")
    out, ref, ws = run(wv, q, ws=ws, retrieval_rank=rank)
    assert not torch.isnan(out).any() and out[2].abs().max() == 0
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    z = torch.zeros(4, dtype=torch.int64)
    _, n_miss = check_bookkeeping(wv, ws, wv.cache.table.clone(), wv.cache.stamp.clone(), z)
    assert n_miss > 0


def test_steps_with_partial_and_evicting_cache():
    """A cache of 12 pages, partly filled up front (some pages the step reads, some
    it does not), then three decode steps with fresh queries: each step's outputs
    equal the twin's and the clean twin's, its hits / misses / stamps / miss keys
    the plain count from the table as it was; after the step ``admit_misses`` and
    ``next_step``; admissions evict (LRU) and every cached page equals its arena
    rows. The index keeps 8-bit mean values (``mean_value_bits``; the other tests
    16-bit ones)."""
    torch.manual_seed(22)
    sc = Scene(200, mean_value_bits=8)
    E0 = sc.add(800, n_ret=5, n_est=4)
    E1 = sc.add(760, n_ret=4, n_est=4)
    wv = Wave(sc, num_slots=12)
    wv.release({0: E0, 1: E1 - 2 * BS})
    c = wv.cache
    ir0, ir1 = wv.irow(0), wv.irow(1)
    wv.admit([wv.key(ir0, 0, b) for b in range(sc.S // BS, sc.S // BS + 4)]
             + [wv.key(ir1, 1, sc.S // BS + 3)])
    c.next_step()
    assert int(c.counters[C_ADMITTED]) == 5
    td = _td()
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 4, DEV)
    total_hits = 0
    for step in range(3):
        q = torch.randn(2, H * G, D) * (1 + step)
        before = (c.table.clone(), c.stamp.clone(), c.counters.clone())
        out, ref, ws = run(wv, q, ws, td)
        assert torch.equal(ref, unreleased(wv, q))
        assert _rel(out, ref) < 2e-3, (step, _rel(out, ref))
        nh, nm = check_bookkeeping(wv, ws, *before)
        total_hits += nh
        c.admit_misses(wv.mirror)
        assert int(c.miss_count) == 0
        c.next_step()
        live = (c.slot_key[:c.num_slots] >= 0).nonzero().flatten().tolist()
        rows = wv.mirror.page_row.view(-1)
        for s in live:
            k = int(c.slot_key[s])
            assert int(c.table[k]) == s
            a = int(rows[k])
            assert torch.equal(c.kv[s].cpu(), wv.mirror.arena[a:a + BS].cpu())
    assert total_hits > 0 and int(c.counters[C_EVICTED]) > 0


def test_miss_buffer_overflow_drops_keys_but_counts():
    """A miss buffer of 3 keys: the kernel counts every miss, records 3 of them (all
    real missed keys), and admission takes only those."""
    torch.manual_seed(23)
    sc = Scene(120)
    E0 = sc.add(700, n_ret=6, n_est=2)
    wv = Wave(sc, num_slots=32, miss_capacity=3)
    wv.release({0: E0})
    q = torch.randn(1, H * G, D)
    out, ref, ws = run(wv, q)
    assert _rel(out, ref) < 2e-3
    c = wv.cache
    visits = [k for kh in range(H) for k in wv.visits(ws, 0, kh)]
    assert len(visits) > 3
    assert int(c.counters[C_MISSES]) == len(visits) == int(c.miss_count)
    assert set(c.miss_keys.tolist()) <= set(visits)
    c.admit_misses(wv.mirror)
    assert int(c.counters[C_ADMITTED]) == len(set(c.miss_keys.tolist())) <= 3
    assert int(c.miss_count) == 0


def test_rows_sharing_layer_head_block_are_isolated():
    """Two requests have pages at the same (layer, head, logical block); only their
    ibt rows, hence their pool pages (the key's page), differ. The cache holds every
    page of B and
    none of A; A's released blocks hold B's K/V, B's are NaN: A still reads its own
    arena rows, B its cached pages."""
    torch.manual_seed(24)
    sc = Scene(200)
    EA = sc.add(700, n_ret=8, n_est=4)
    EB = sc.add(700, n_ret=8, n_est=4)
    wv = Wave(sc, num_slots=256)
    wv.release({0: EA, 1: EB}, poison={0: 1})
    ia, ib = wv.irow(0), wv.irow(1)
    assert ia != ib
    blocks = range(sc.S // BS, EB // BS)
    wv.admit([wv.key(ib, kh, b) for kh in range(H) for b in blocks])
    wv.cache.next_step()
    for kh in range(H):
        for b in blocks:
            assert int(wv.cache.table[wv.key(ia, kh, b)]) == -1
    q = torch.randn(2, H * G, D)
    before = (wv.cache.table.clone(), wv.cache.stamp.clone(), wv.cache.counters.clone())
    out, ref, ws = run(wv, q)
    assert torch.equal(ref, unreleased(wv, q))
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    nh, nm = check_bookkeeping(wv, ws, *before)
    assert nh == sum(len(wv.visits(ws, 1, kh)) for kh in range(H))
    assert nm == sum(len(wv.visits(ws, 0, kh)) for kh in range(H))


def test_reused_pool_pages_never_see_the_previous_owner():
    """Request A is mirrored, its pages partly cached and partly pending in the miss
    buffer; A leaves (mirror and cache forget its pool pages, then the allocator
    takes them back) and B, indexed next, gets A's pages. B's released blocks are
    NaN: B reads only its own mirror (every visit a miss, no stale hit), A's pending
    misses are never admitted, and row C (alive throughout) keeps its entries."""
    torch.manual_seed(27)
    sc = Scene(200)
    EA = sc.add(700, n_ret=8, n_est=4)
    EC = sc.add(600, n_ret=6, n_est=4)
    wv = Wave(sc, num_slots=512)
    wv.release({0: EA, 1: EC})
    c, m = wv.cache, wv.mirror
    q = torch.randn(2, H * G, D)
    run(wv, q)                                    # every visit a miss, left pending
    ia, ic = wv.irow(0), wv.irow(1)
    blocks_a = range(sc.S // BS, EA // BS)
    wv.admit([wv.key(ia, kh, b) for kh in range(H) for b in blocks_a])
    c.next_step()
    pages_a = sc.alloc.pages_of(ia)
    per_page = NL * H
    pend = c.miss_keys[:int(c.miss_count)].cpu()
    assert any(int(k) // per_page in pages_a for k in pend)
    assert (c.table[:-1].view(-1, per_page)[pages_a] >= 0).any()
    c_keys = {wv.key(ic, kh, b) for kh in range(H) for b in range(sc.S // BS, EC // BS)}
    # A leaves, as the manager's _on_remove does it: mirror, cache, then allocator.
    m.free(ia, pages_a)
    c.invalidate_pages(pages_a)
    sc.alloc.release(ia)
    L_a, row_a = sc.rows[0]
    sc.headers[int(row_a[0])] = 0
    sc.rows[0] = (0, row_a)
    assert (m.page_row[pages_a] == -1).all()
    assert (c.table[:-1].view(-1, per_page)[pages_a] == -1).all()
    assert not any(int(k) // per_page in pages_a for k in c.slot_key.tolist() if k >= 0)
    assert not any(int(k) // per_page in pages_a for k in c.miss_keys.tolist() if k >= 0)
    # B takes A's pages (the allocator hands the last freed first).
    EB = sc.add(700, n_ret=8, n_est=4)
    ib = wv.irow(2)
    pages_b = sc.alloc.pages_of(ib)
    assert set(pages_b) & set(pages_a)
    wv.release({2: EB})
    c.admit_misses(m)                             # A's pending misses: dropped
    c.next_step()
    live = {int(k) for k in c.slot_key[:-1].tolist() if k >= 0}
    assert live and live <= c_keys
    before = (c.table.clone(), c.stamp.clone(), c.counters.clone())
    out, ref, ws = run(wv, q := torch.randn(3, H * G, D))
    assert torch.equal(ref, unreleased(wv, q))
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    nh, nm = check_bookkeeping(wv, ws, *before)
    b_visits = sum(len(wv.visits(ws, 2, kh)) for kh in range(H))
    assert b_visits > 0 and nm >= b_visits
    assert nh <= sum(len(wv.visits(ws, 1, kh)) for kh in range(H))


def test_unmirrored_page_below_horizon_is_left_out():
    """A page below the horizon that the mirror does not hold (page_row -1, never
    cached) is left out, not read from the released (NaN) block: with every cluster
    retrieved the twin equals float64 attention over the context without that
    page's tokens (for that head only), and the kernel equals the twin; the page
    counts as neither hit nor miss."""
    torch.manual_seed(25)
    sc = Scene(140)
    E = sc.add(640, n_ret=10**6, n_est=0)
    wv = Wave(sc)
    wv.release({0: E})
    gone = sc.S // BS + 5
    key = wv.key(wv.irow(0), 0, gone)
    wv.mirror.page_row.view(-1)[key] = -1
    q = torch.randn(1, H * G, D)
    before = (wv.cache.table.clone(), wv.cache.stamp.clone(), wv.cache.counters.clone())
    out, ref, ws = run(wv, q)
    assert not torch.isnan(ref).any() and not torch.isnan(out).any()
    L, row = sc.rows[0]
    bt = row.long()
    for kh in range(H):
        pos = torch.tensor([p for p in range(L) if kh != 0 or p // BS != gone])
        kv = wv.clean[bt[pos // BS], kh, pos % BS].double()
        qh = q[0, kh * G:(kh + 1) * G].double()
        p = torch.softmax(qh @ kv[:, :D].T * SCALE, -1)
        assert _rel(ref[0, kh * G:(kh + 1) * G], p @ kv[:, D:]) < 1e-5, kh
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    check_bookkeeping(wv, ws, *before)
    assert key not in wv.cache.miss_keys[:int(wv.cache.miss_count)].tolist()


def test_public_op_and_view_validation(monkeypatch):
    """The public op passes the view to the kernels (interpreter) and to the twin
    (no Triton); a view that does not fit the layer is refused with ValueError."""
    import vllm_retro.kernels as K
    td = _td()
    monkeypatch.setattr(K, "paged_decode_attention_triton", td.paged_decode_attention_triton)
    monkeypatch.setattr(K, "DecodeWorkspace", td.DecodeWorkspace)
    torch.manual_seed(26)
    sc = Scene(100)
    E = sc.add(640)
    wv = Wave(sc)
    wv.release({0: E - 4 * BS})
    bt, sl = sc.tensors()
    q = torch.randn(1, H * G, D)
    args = (sc.kv, sc.lay, bt, sl, sc.headers, sc.alloc.ibt, sc.pool, sc.S, SCALE)
    clean = unreleased(wv, q)
    out = K.paged_decode_attention(q.to(DEV), *args, wave=wv.view)
    assert _rel(out, clean) < 2e-3
    if DEV == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert not K.uses_triton(q)
        assert torch.equal(K.paged_decode_attention(q, *args, wave=wv.view), clean.float())
    v = wv.view
    for bad, msg in ((dict(layer=NL), "layer"),
                     (dict(arena=v.arena.double()), "arena dtype"),
                     (dict(page_row=v.page_row.long()), "page_row"),
                     (dict(cache_table=v.cache_table[:-1]), "cache_table"),
                     (dict(cache_kv=v.cache_kv[:, :8]), "cache_kv"),
                     (dict(num_kv_heads=H + 1), "KV heads"),
                     (dict(num_pages=v.num_pages + 1), "page_row")):
        wrong = dataclasses.replace(v, **bad)
        with pytest.raises(ValueError, match=msg):
            K.paged_decode_attention(q.to(DEV), *args, wave=wrong)
    # A view consistent in itself but keyed by another page count than the pool's.
    p2 = v.num_pages + 1
    other = dataclasses.replace(
        v, num_pages=p2,
        page_row=torch.full((p2, NL, H), -1, dtype=torch.int32, device=DEV),
        cache_table=torch.full((p2 * NL * H + 1,), -1, dtype=torch.int64, device=DEV))
    with pytest.raises(ValueError, match="pool pages"):
        K.paged_decode_attention(q.to(DEV), *args, wave=other)
    with pytest.raises(ValueError, match="layer"):
        wv.cache.view(wv.mirror, NL)


def test_band_reranking_reads_released_clusters_from_the_wave_buffer(monkeypatch):
    """``rank_interval`` 2 with released blocks: a full-ranking step, then a
    re-ranking step whose retrieved clusters (chosen inside the band) are read from
    the host arena below the horizon as the full step's are (the poisoned blocks
    never reach the output); kernel == twin each step (each on its own copy of the
    headers and the pool), the re-ranking rows counted."""
    from test_paged_decode_attention import _pool_copy
    td = _td()
    monkeypatch.setattr(td, "SELECT", "bucket")
    torch.manual_seed(67)
    sc = Scene(200, summary_bits=8, rank_interval=2)
    E0 = sc.add(700)
    E1 = sc.add(600, n_ret=6, n_est=9)
    wv = Wave(sc)
    wv.release({0: E0, 1: sc.S + (E1 - sc.S) // BS // 2 * BS}, poison={1: 0})
    twin_pool, twin_hdr = _pool_copy(sc.pool), sc.headers.cpu().clone()
    bt, sl0 = sc.tensors()
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV)
    for step in range(2):
        sl = sl0 + step
        q = torch.randn(2, H * G, D)
        ws.stats.zero_()
        out = torch.full((2, H * G, D), float("nan"), device=DEV)
        td.paged_decode_attention_triton(q.to(DEV), sc.kv, sc.lay, bt, sl, sc.headers,
                                         sc.alloc.ibt, sc.pool, sc.S, SCALE, out, ws,
                                         count_stats=True, wave=wv.view)
        ref, st = reference.paged_decode_attention(
            q, sc.cpu_cache(), sc.lay, bt.cpu(), sl.cpu(), twin_hdr, sc.alloc.ibt.cpu(),
            twin_pool, sc.S, SCALE, wave=wv.view, select="bucket")
        assert st[:, 3].tolist() == [float(step == 1)] * 2
        assert not torch.isnan(out).any()
        assert _rel(out.cpu(), ref) < 2e-3, (step, _rel(out.cpu(), ref))
        assert int(ws.stats[5]) == (2 if step == 1 else 0)
        assert torch.equal(sc.headers.cpu(), twin_hdr)
