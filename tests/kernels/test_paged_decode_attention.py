"""The Triton decode kernels against their torch twin (and dense attention).

Without a GPU the kernels run in Triton's CPU interpreter (``tests/conftest.py``
imports Triton and the kernels with ``TRITON_INTERPRET=1``), so shapes stay small.
Every test draws fresh random inputs from its own seed.
"""

import dataclasses
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from vllm_retro.config import RetroConfig  # noqa: E402
from vllm_retro.index.paged import (HDR_IBT_ROW, HDR_WORDS, I_SIZE,  # noqa: E402
                                    I_START, SIZE_WORD, IndexAllocator, IndexPool,
                                    PagedIndexLayout, budget, build_segments,
                                    entries_per_block, header_row, make_headers,
                                    plan_segments, quantize_mean_values,
                                    quantize_summaries, sink_end)
from conftest import cpu_cache  # noqa: E402
from vllm_retro.kernels import reference  # noqa: E402

H, D, BS, G = 2, 32, 16, 4
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CFG = RetroConfig(segment_size=256, update_interval=64, recent_tokens=32, cluster_size=32)


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _td():
    """The kernel module, its kernels interpreted when there is no GPU (reloaded if
    something imported it before the interpreter was switched on)."""
    td = importlib.import_module("vllm_retro.kernels.triton_decode")
    if DEV == "cpu":
        from triton.runtime.interpreter import InterpretedFunction
        import triton.language.standard as std
        if not isinstance(std._sum_combine, InterpretedFunction):
            pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set (its "
                        "library functions are not interpretable): run tests/kernels "
                        "in a process of its own")
        if not isinstance(td._score_kernel, InterpretedFunction):
            td = importlib.reload(td)
    return td


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Scene:
    """One KV cache with ragged rows: each row its own blocks (never block 0), its
    random K/V, its index (built as the engine builds it, or crafted) and header.
    The index lives in an :class:`IndexPool` of ``num_blocks + 37`` pages handed out
    in a shuffled order (a row's pages are neither contiguous nor ordered, and
    unrelated to its block ids), through an :class:`IndexAllocator` whose rows are
    taken in a shuffled order too."""

    def __init__(self, num_blocks: int, dtype=torch.float32, max_blocks: int = 260,
                 head_dim: int = D, num_pages: int = 0, summary_bits: int = 16,
                 mean_value_bits: int = 16, value_correction: bool = False, cfg=None,
                 variance_form: str = "diagonal", rank_interval: int = 1,
                 kv_layout: str = "NHD"):
        self.D = head_dim
        self.cfg = cfg or CFG
        self.epb = entries_per_block(self.cfg, BS)
        self.lay = PagedIndexLayout(H, head_dim, BS, dtype,
                                    float_slots=5 if value_correction else 3,
                                    entries_per_block=self.epb)
        self.kv = self.lay.make_cache(num_blocks, DEV, kv_layout)
        self.headers = make_headers(num_blocks, DEV)
        num_pages = num_pages or (num_blocks + 37) * self.epb
        self.pool = IndexPool(self.lay, num_pages, DEV, summary_bits=summary_bits,
                              mean_value_bits=mean_value_bits, variance_form=variance_form,
                              rank_interval=rank_interval)
        self.alloc = IndexAllocator(num_pages, 11, max_blocks * self.epb, DEV)
        self.alloc.shuffle(int(torch.randint(0, 1 << 30, ())))
        self.free = (torch.randperm(num_blocks - 1) + 1).tolist()
        self.max_blocks = max_blocks
        self.rows = []          # (seq_len, block row [max_blocks] int32)
        self.orig = []          # each row's K/V as written, before any index build
        self.S = sink_end(self.cfg, BS)

    def _blocks(self, n: int) -> torch.Tensor:
        row = torch.zeros(self.max_blocks, dtype=torch.int32)
        row[:n] = torch.tensor([self.free.pop() for _ in range(n)], dtype=torch.int32)
        return row

    def add(self, L: int, index: str = "build", n_ret=None, n_est=None, cent=None,
            kv_row=None):
        """A row of ``L`` tokens (``kv_row [L, H, 2D]``, else random); ``index``:
        "build" (plan/build_segments: reorders the K/V), "craft" (one cluster per
        block, its tokens in place, given centroids, zero variance) or "none".
        Returns the row's clustered_end."""
        row = self._blocks(math.ceil(L / BS) + 2 if L else 0)
        self.rows.append((L, row))
        if kv_row is None:
            kv_row = torch.randn(L, H, 2 * self.D)
        kv_row = kv_row.to(self.kv.dtype)
        self.orig.append(kv_row)
        if L == 0:
            return 0
        blocks = row.long().to(DEV)
        pos = torch.arange(L, device=DEV)
        self.kv[blocks[pos // BS], :, pos % BS] = kv_row.to(DEV)
        E = 0
        if index == "build":
            segs = plan_segments(0, L, L, self.cfg, BS)
            assert segs, "context too short for an index"
            E = segs[-1][1]
            irow = self.alloc.acquire((E - self.S) // BS * self.epb)
            by_len = {}
            for job in self.alloc.segment_jobs(irow, blocks, segs, self.S, BS, self.epb):
                by_len.setdefault(job.p1 - job.p0, []).append(job)
            for js in by_len.values():
                build_segments(self.kv, self.lay, self.pool, js, self.cfg)
        elif index == "craft":
            assert self.epb == 1, "crafted indexes hold one cluster per block"
            E = (L - CFG.recent_tokens) // BS * BS
            irow = self.alloc.acquire((E - self.S) // BS)
            self._craft(blocks, irow, E, cent)
        if E:
            c = (E - self.S) // BS * self.epb
            nr, ne = budget(c, E - self.S, self.cfg)
            nr = nr if n_ret is None else n_ret
            ne = ne if n_est is None else n_est
            self.headers[blocks[0]] = torch.tensor(header_row(E, nr, ne, c, irow),
                                                   dtype=torch.int32, device=DEV)
        return E

    def pages(self, r: int) -> torch.Tensor:
        """Row r's pool pages (cluster entry order), [] without an index."""
        L, row = self.rows[r]
        hdr = self.headers[int(row[0])].tolist() if L else [0] * HDR_WORDS
        if not hdr[0]:
            return torch.zeros(0, dtype=torch.long)
        return self.alloc.ibt[hdr[HDR_IBT_ROW],
                              :(hdr[0] - self.S) // BS * self.epb].long().cpu()

    def _craft(self, blocks, irow, E, cent):
        fpart, ipart = self.pool.fpart, self.pool.ipart
        S = self.S
        lb = torch.arange(S // BS, E // BS, device=DEV)
        pb = torch.tensor(self.alloc.pages_of(irow), device=DEV).long()
        ipart[pb, :, I_SIZE] = BS
        ipart[pb, :, I_START] = (lb * BS).int()[:, None].expand(-1, H)
        v = self.kv[blocks[lb]][..., self.D:].float()                     # [C, H, BS, D]
        fpart[pb, :, 0] = cent.to(DEV, fpart.dtype)                        # [C, H, D]
        fpart[pb, :, 1] = 0
        fpart[pb, :, 2] = v.mean(dim=2).to(fpart.dtype)

    def tensors(self):
        bt = torch.stack([r for _, r in self.rows]).to(DEV)
        sl = torch.tensor([L for L, _ in self.rows], dtype=torch.int32, device=DEV)
        return bt, sl

    def cpu_cache(self):
        return cpu_cache(self.lay, self.kv)


def run_both(scene: Scene, q: torch.Tensor, scale: float, out_dtype=torch.float32,
             ws=None, td=None, variance_cap=2.0, select=None, retrieval_rank="mass"):
    """(Triton output, twin output, twin stats, workspace) for the scene's rows; the
    twin selects as the kernels do (``select``: default ``td.SELECT``)."""
    td = td or _td()
    bt, sl = scene.tensors()
    b = len(scene.rows)
    if ws is None:
        ws = td.DecodeWorkspace(scene.pool.num_pages, H, G, D, 8, DEV)
    ws.stats.zero_()
    out = torch.full((b, H * G, D), float("nan"), dtype=out_dtype, device=DEV)
    td.paged_decode_attention_triton(q.to(DEV), scene.kv, scene.lay, bt, sl, scene.headers,
                                     scene.alloc.ibt, scene.pool, scene.S, scale, out, ws,
                                     count_stats=True, variance_cap=variance_cap,
                                     retrieval_rank=retrieval_rank)
    ref, st = reference.paged_decode_attention(q.cpu(), scene.cpu_cache(), scene.lay,
                                               bt.cpu(), sl.cpu(), scene.headers.cpu(),
                                               scene.alloc.ibt, scene.pool, scene.S, scale,
                                               variance_cap, select=select or td.SELECT,
                                               retrieval_rank=retrieval_rank)
    return out.cpu(), ref, st, ws


def dense_original(scene: Scene, q: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 full attention of each row over the K/V it was given (before any
    index build reordered them)."""
    b = len(scene.rows)
    out = torch.zeros(b, H * G, scene.D, dtype=torch.float64)
    for r, kv in enumerate(scene.orig):
        if len(kv) == 0:
            continue
        kv = kv.double()
        for kh in range(H):
            qh = q[r, kh * G:(kh + 1) * G].double()
            p = torch.softmax((qh @ kv[:, kh, :scene.D].T) * scale, dim=-1)
            out[r, kh * G:(kh + 1) * G] = p @ kv[:, kh, scene.D:]
    return out


def expected_stats(scene: Scene, st: torch.Tensor) -> list:
    idx = [L > 0 and int(scene.headers[int(r[0]), 0]) > 0 for L, r in scene.rows]
    live = [L > 0 for L, _ in scene.rows]
    return [sum(idx), sum(lv and not i for lv, i in zip(live, idx)),
            int(st[:, 0].sum()), int(st[:, 1].sum()), int(st[:, 2].sum()),
            int(st[:, 3].sum()), int(st[:, 4].sum())]


def selection(scene: Scene, ws, r: int, kh: int):
    """(retrieved clusters as sorted (start, size), estimated entry indices) that the
    kernels chose for row r, head kh (read back from the workspace lists: white-box,
    for precise failures)."""
    pbs = scene.pages(r)
    lists = ws.lists.cpu()
    n_ret, n_est = ws.counts[r * H + kh].tolist()

    def word(k, w):
        return int(lists[pbs[k // 16], kh, 2 * (k % 16) + w])
    ret = sorted((word(k, 0), word(k, 1)) for k in range(n_ret))
    est = sorted(pbs.tolist().index(word(k, 0)) for k in range(n_ret, n_ret + n_est))
    return ret, est


def _twin_log_mass(scene: Scene, q: torch.Tensor, r: int, kh: int, scale: float):
    """(log-masses ``[G, C]`` of row r's cluster entries for head kh, their key
    variances, n_retrieve and n_estimate clamped as the twin clamps them, the
    entries' ipart rows)."""
    bt, _ = scene.tensors()
    bt = bt[r].long().cpu()
    ipart = scene.pool.ipart.cpu()
    hdr = scene.headers[int(bt[0])].tolist()
    pbs = scene.pages(r)
    f = scene.pool.summaries(pbs.to(scene.pool.device))[:, kh].float().cpu()
    lg = reference.cluster_log_mass(q[r, kh * G:(kh + 1) * G].float(), f[:, 0], f[:, 1],
                                    ipart[pbs, kh, I_SIZE].long(), scale)
    c = len(pbs)
    nr = min(c, hdr[1])
    ne = min(c - nr, hdr[2])
    return lg, f[:, 1], nr, ne, ipart[pbs, kh]


def twin_scores(scene: Scene, q: torch.Tensor, r: int, kh: int, scale: float):
    """(ranking score of each of row r's cluster entries for head kh, n_retrieve,
    n_estimate clamped as the twin clamps them, the entries' ipart rows)."""
    lg, _, nr, ne, iw = _twin_log_mass(scene, q, r, kh, scale)
    return torch.softmax(lg, -1).nan_to_num(0.0).sum(0), nr, ne, iw


def _as_lists(iw, ret, est):
    """Retrieved as sorted (start, size), estimated as sorted entry indices."""
    return (sorted((int(iw[i, I_START]), int(iw[i, I_SIZE])) for i in ret.tolist()),
            sorted(est.tolist()))


def twin_selection(scene: Scene, q: torch.Tensor, r: int, kh: int, scale: float,
                   select: str = None):
    """What :func:`selection` reads back, as the twin selects it (``select``: default
    the kernels' ``SELECT``)."""
    score, nr, ne, iw = twin_scores(scene, q, r, kh, scale)
    return _as_lists(iw, *reference.mass_selection(score, nr, ne, G,
                                                   select or _td().SELECT))


# ----------------------------------------------------------------------- tests
@pytest.mark.parametrize("select", ["bucket", "exact"])
def test_ragged_batch_matches_twin(monkeypatch, select):
    """Both selections (``SELECT``): output, statistics and lists equal the twin's."""
    monkeypatch.setattr(_td(), "SELECT", select)
    torch.manual_seed(1)
    sc = Scene(260)
    sc.add(900)                          # index: several segments, empty clusters
    sc.add(0)                            # padded row (block table row of zeros)
    sc.add(300, index="none")            # no index: exact over its whole context
    sc.add(700, n_ret=4, n_est=9)        # index, explicit budget
    for r in (0, 3):    # pool pages neither contiguous nor ordered, unrelated to blocks
        p = sc.pages(r)
        assert len(p) > 16 and not torch.equal(p, p.sort().values)
    q = torch.randn(4, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2)
    assert not torch.isnan(out).any(), "output elements left unwritten"
    assert out[1].abs().max() == 0
    for r in (0, 2, 3):
        assert _rel(out[r], ref[r]) < 2e-3, (r, _rel(out[r], ref[r]))
    assert ws.stats.tolist() == expected_stats(sc, st)
    assert ws.stats[0] == 2 and ws.stats[1] == 1
    for r in (0, 3):
        for kh in range(H):
            assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2)


def test_clusters_smaller_than_a_block_match_twin():
    """``cluster_size`` below the KV block size (issue 16's small clusters on the GPU
    index; 4 is the ``"accuracy"`` preset's, and any divisor of the block takes the
    same code with another ``EPB``): ``bs / cluster_size`` index entries (pool pages)
    per KV block, every kernel counting ``entries_per_block`` entries per clustered
    block. Kernel == twin (output, selection, statistics) on a ragged batch; with
    every cluster retrieved the output is float64 full attention over the original
    K/V."""
    cluster_size = 4
    cfg = dataclasses.replace(CFG, cluster_size=cluster_size)
    epb = BS // cluster_size
    torch.manual_seed(20 + cluster_size)
    sc = Scene(260, cfg=cfg)
    assert sc.lay.entries_per_block == epb
    E0 = sc.add(900)
    sc.add(0)
    sc.add(300, index="none")
    sc.add(700, n_ret=6, n_est=25)
    E4 = sc.add(600, n_ret=10 ** 6, n_est=0)          # every cluster exact
    assert len(sc.pages(0)) == (E0 - sc.S) // BS * epb
    sizes = sc.pool.ipart[sc.pages(0).to(DEV), :, I_SIZE].cpu()
    assert sizes.sum(0).tolist() == [E0 - sc.S] * H and (sizes > 0).float().mean() > 0.5
    q = torch.randn(5, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2)
    assert not torch.isnan(out).any() and out[1].abs().max() == 0
    for r in (0, 2, 3, 4):
        assert _rel(out[r], ref[r]) < 2e-3, (r, _rel(out[r], ref[r]))
    assert ws.stats.tolist() == expected_stats(sc, st)
    for r in (0, 3):
        for kh in range(H):
            assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2)
    assert E4 > sc.S
    dense = dense_original(sc, q, 0.2)
    assert _rel(ref[4], dense[4]) < 1e-5 and _rel(out[4], dense[4]) < 2e-3


def test_entries_per_block_validation():
    """Clusters must divide a block into 1, 2 or 4 entries; not with the wave buffer
    (its cache and mirror keep one entry per block); the layout rejects other
    counts and a build whose clusters outnumber the layout's entries."""
    from vllm_retro.index.paged import check_config_for_paged
    assert check_config_for_paged(dataclasses.replace(CFG, cluster_size=8), 16) == []
    assert check_config_for_paged(dataclasses.replace(CFG, cluster_size=4), 16) == []
    for cs in (2, 6, 12):
        assert any("cluster_size" in r for r in
                   check_config_for_paged(dataclasses.replace(CFG, cluster_size=cs), 16))
    assert any("wave buffer" in r for r in check_config_for_paged(
        dataclasses.replace(CFG, cluster_size=8, wave_buffer=True), 16))
    with pytest.raises(ValueError, match="entries_per_block"):
        PagedIndexLayout(H, D, BS, torch.float32, entries_per_block=3).check()
    sc = Scene(40)                                   # one entry per block ...
    sc.add(300, index="none")
    blocks = sc.rows[0][1].long().to(DEV)
    irow = sc.alloc.acquire(16)
    job = sc.alloc.segment_jobs(irow, blocks, [(sc.S, sc.S + 256)], sc.S, BS)
    with pytest.raises(ValueError, match="clusters"):  # ... but 8-token clusters
        build_segments(sc.kv, sc.lay, sc.pool, job, dataclasses.replace(CFG, cluster_size=8))


@pytest.mark.parametrize("dynamic", [True, False])
def test_padded_batch_spreads_over_the_grid(monkeypatch, dynamic):
    """A batch padded to a CUDA-graph size (trailing rows of seq_len 0): with the
    dynamic split the rows in use get the programs per row-head of their own count
    (here 4 for 5 rows of 8, against 3 for the padded 8), read on the device; either
    way every row equals the twin and the padding rows are zeros."""
    td = _td()
    monkeypatch.setattr(td, "DYNAMIC_SPLIT", dynamic)
    torch.manual_seed(5)
    sc = Scene(420)
    for L in (700, 650, 900, 520, 610):
        sc.add(L)
    for _ in range(3):
        sc.add(0)
    q = torch.randn(8, H * G, D)
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, programs_per_sm=3,
                            num_sms=16, max_split=8)
    assert ws.nsplit(8) == 3 and ws.nsplit(5) == 4
    ws.score_max.fill_(float("nan"))
    out, ref, st, ws = run_both(sc, q, 0.2, ws=ws, td=td)
    assert not torch.isnan(out).any(), "output elements left unwritten"
    assert out[5:].abs().max() == 0
    assert _rel(out[:5], ref[:5]) < 2e-3, _rel(out[:5], ref[:5])
    assert ws.stats.tolist() == expected_stats(sc, st)
    written = (~ws.score_max[:5 * H, :, 0].isnan()).sum(1).cpu()
    assert (written == (4 if dynamic else 3)).all(), written


def _two_rows_checked(seed: int, n_ret: int, n_est: int, **pool_kw):
    """Two indexed rows (the second with the given budget) run by the kernel and the
    twin, checked equal (output and selection): (output, float64 full attention,
    twin stats, workspace, scene)."""
    torch.manual_seed(seed)
    sc = Scene(260, **pool_kw)
    sc.add(900)
    sc.add(700, n_ret=n_ret, n_est=n_est)
    q = torch.randn(2, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2)
    assert _rel(out, ref) < 2e-3, (pool_kw, _rel(out, ref))
    for r in (0, 1):
        for kh in range(H):
            assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2)
    return out, dense_original(sc, q, 0.2), st, ws, sc


def _forms_scene(seed: int, blocks: int = 260, unindexed: int = 0, **pool_kw):
    """(scene, queries) of the forms tests: two indexed rows with small budgets (several
    tiles and retrieved groups per program, a partial last tile) around an empty row,
    and with ``unindexed`` a fourth row of that many tokens without an index."""
    torch.manual_seed(seed)
    sc = Scene(blocks, **pool_kw)
    sc.add(900, n_ret=6, n_est=20)
    sc.add(0)
    sc.add(700, n_ret=4, n_est=9)
    if unindexed:
        sc.add(unindexed, index="none")
    return sc, torch.randn(len(sc.rows), H * G, D)


@pytest.mark.parametrize("kernel,knob,tiles,rank", [
    ("score", "XR", dict(CH=16), "mass"),
    ("score", "XR", dict(CH=16), "error"),
    ("score", "PFS", dict(CH=16), "mass"),
    ("score", "SV1", dict(CH=16), "mass"),
    ("score", "SV1", dict(CH=16), "error"),
    ("attend", "XR", dict(TS=16, TE=16, TR=16, RG=2), "mass"),
    ("attend", "PRE", dict(TS=16, TE=16, TR=16, RG=2, SMG=False), "mass"),
])
@pytest.mark.parametrize("bits", [16, 8])
def test_kernel_forms_compute_the_same(monkeypatch, kernel, knob, tiles, rank, bits):
    """Two forms of a kernel that must compute the same values: the score kernel's
    element-wise work on the query heads' rows (``XR``) and on the products' rows; its
    small gathers one tile ahead (``PFS``) and in their tile; the small gathers as
    one vector of slot 1 (``SV1``, 8-bit summaries; at 16 bits the same form) and as
    three loads; the
    attention kernel's softmax on the query heads' rows (``XR``) and on the products'
    rows; its zones' first addresses loaded up front (``PRE``) and in turn. Bit-equal
    outputs and logits, each the twin's, over several tiles (and retrieved groups) per
    program and a partial last tile; ``rank`` "error": the score kernel also stores
    the variance terms the error rank reads."""
    td = _td()
    sc, q = _forms_scene(37 + bits, summary_bits=bits)
    got = []
    for on in (False, True):
        for table in (td.TUNE, td.TUNE_SMALL_BATCH):
            monkeypatch.setitem(table, kernel, dict(table[kernel], **tiles, **{knob: on}))
        ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, max_split=1,
                                error_rank=rank == "error")
        out, ref, st, ws = run_both(sc, q, 0.2, ws=ws, retrieval_rank=rank)
        assert _rel(out, ref) < 2e-3, (on, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st)
        got.append((out, ws.logits.cpu()))
    assert len(sc.pages(0)) % 16 and len(sc.pages(0)) > 32, "several tiles, a partial last"
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])


@pytest.mark.parametrize("knob,bits", [("EL", 16), ("EL", 8), ("FLOG", 16), ("FLOG", 8),
                                       ("CONTIG", 8)])
def test_score_kernel_lse_and_log_forms(monkeypatch, knob, bits):
    """The score kernel's partial log-sum-exp per element of the tile, reduced once
    after the loop (``EL``), against the per-tile reductions: the same logits and
    partial maxima bit for bit, the partial sums to float rounding, the same
    selection (the twin's) and output; ``ln size`` by the hardware's approximate log2
    (``FLOG``, GPU only): logits within its relative error, the same selection;
    contiguous ranges (``CONTIG``): the same logits, output and selection."""
    td = _td()
    if knob == "FLOG" and td.interpreting():
        pytest.skip("FLOG is inline PTX: GPU only (the interpreter keeps the exact log)")
    sc, q = _forms_scene(53 + bits, summary_bits=bits)
    got = []
    for on in (False, True):
        for table in (td.TUNE, td.TUNE_SMALL_BATCH):
            monkeypatch.setitem(table, "score", dict(table["score"], CH=16, **{knob: on}))
        ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, max_split=2)
        out, ref, st, ws = run_both(sc, q, 0.2, ws=ws)
        assert _rel(out, ref) < 2e-3, (on, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st)
        for r in (0, 2):
            for kh in range(H):
                assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2), (on, r)
        got.append([t.cpu().clone() for t in (out, ws.logits, ws.score_max, ws.score_sum)])
    assert len(sc.pages(0)) % 16 and len(sc.pages(0)) > 32, "several tiles, a partial last"
    (o0, l0, m0, s0), (o1, l1, m1, s1) = got
    if knob == "EL":
        assert torch.equal(l0, l1) and torch.equal(m0, m1)
        assert _rel(s1, s0) < 1e-6, _rel(s1, s0)
    elif knob == "CONTIG":
        assert torch.equal(l0, l1)
    else:
        fin = torch.isfinite(l0)
        assert torch.equal(fin, torch.isfinite(l1))
        assert torch.allclose(l1[fin], l0[fin], rtol=1e-5, atol=1e-5)
    assert _rel(o1, o0) < 1e-5, _rel(o1, o0)


@pytest.mark.parametrize("knob,tiles", [("SMG", dict(TS=16, TE=16, TR=16, RG=2)),
                                        ("SMG", dict(TR=32, RG=8)),
                                        ("ECONTIG", dict(TE=16))])
def test_attention_forms_match_up_to_order(monkeypatch, knob, tiles):
    """Attention kernel forms that sum the same terms in another order: ``SMG`` (a
    program's steady tokens lead its first retrieved group's tiles) and ``ECONTIG``
    (each program's estimated clusters a contiguous range of the list, not every
    NS-th entry). Each equals the form without it up to the summation order, and the
    twin, on indexed rows (several groups and tiles per program, a partial last one),
    an empty row and a row without index (its whole context steady), with one and
    three programs per row-head (ranges of unequal sizes)."""
    td = _td()
    sc, q = _forms_scene(43, blocks=300, unindexed=300)
    for split in (1, 3):
        got = []
        for on in (False, True):
            for table in (td.TUNE, td.TUNE_SMALL_BATCH):
                monkeypatch.setitem(table, "attend", dict(table["attend"], **tiles, **{knob: on}))
            ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, max_split=split)
            out, ref, st, ws = run_both(sc, q, 0.2, ws=ws)
            assert _rel(out, ref) < 2e-3, (on, split, _rel(out, ref))
            assert ws.stats.tolist() == expected_stats(sc, st)
            got.append(out)
        assert _rel(got[1], got[0]) < 1e-5, (split, _rel(got[1], got[0]))


def test_attention_zones_knob_only_leaves_loops_out(monkeypatch):
    """The attention kernel's measurement knob ``ZONES``: all three bits are the
    attention bit for bit; none writes zeros (no zone, no mass); each single zone
    writes finite values that differ from the attention (its loop alone ran)."""
    td = _td()
    torch.manual_seed(41)
    sc = Scene(260)
    sc.add(900, n_ret=6, n_est=20)
    sc.add(700, n_ret=4, n_est=9)
    q = torch.randn(2, H * G, D)
    outs = {}
    for zones in (None, 7, 0, 1, 2, 4):
        for table in (td.TUNE, td.TUNE_SMALL_BATCH):
            over = {} if zones is None else {"ZONES": zones}
            monkeypatch.setitem(table, "attend", dict(table["attend"], **over))
        outs[zones], ref, _, _ = run_both(sc, q, 0.2)
    assert _rel(outs[None], ref) < 2e-3
    assert torch.equal(outs[7], outs[None])
    assert torch.equal(outs[0], torch.zeros_like(outs[0]))
    for zones in (1, 2, 4):
        assert torch.isfinite(outs[zones]).all()
        assert _rel(outs[zones], outs[None]) > 1e-3, zones


@pytest.mark.skipif(DEV == "cpu", reason="the 16-bit tensor-core products (NATIVE) "
                    "run on a GPU only; the interpreter takes fp32 products")
@pytest.mark.parametrize("rows", [2, 4])
def test_attention_product_forms_on_16bit_caches(monkeypatch, rows):
    """bf16 cache and query: the logits' one-product form (``QB``, the default) gives
    the two-product form's output bit for bit; the values' one-product form (``PB``,
    probabilities rounded to bf16 as FlashAttention's) stays within bf16 rounding of
    both and of the twin. Small (one or two rows) and large-batch tables."""
    td = _td()
    torch.manual_seed(53 + rows)
    sc = Scene(400, dtype=torch.bfloat16)
    for r in range(rows):
        sc.add((900, 700, 0, 820)[r], n_ret=(None, 4, None, 7)[r])
    q = torch.randn(rows, H * G, D).bfloat16()
    outs = {}
    base = [(table, dict(table["attend"])) for table in (td.TUNE, td.TUNE_SMALL_BATCH)]
    for form in ({"QB": False}, {}, {"PB": True}):
        for table, tune in base:
            monkeypatch.setitem(table, "attend", dict(tune, **form))
        out, ref, st, ws = run_both(sc, q, 1 / math.sqrt(D), out_dtype=torch.float32)
        assert _rel(out, ref) < 2e-2, (form, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st)
        outs[tuple(form.items())] = out
    assert torch.equal(outs[(("QB", False),)], outs[()])
    assert 0 < _rel(outs[(("PB", True),)], outs[()]) < 1e-2


@pytest.mark.parametrize("rank", ["mass", "error"])
def test_isotropic_variance_term_matches_twin(rank):
    """``variance_form`` "isotropic" (8-bit summaries): the score stage's variance
    term is ``s^2/2 |q|^2 vbar`` with each entry's stored mean key variance. The
    stored mean is the rounded variance vector's channel mean (float64); the
    kernel's log-masses (white-box), output, selection and counters are the twin's,
    whose summaries then carry that mean in every channel; and the log-masses are
    not the diagonal form's (the variant is not a no-op on this scene)."""
    td = _td()
    torch.manual_seed(43)
    sc = Scene(260, summary_bits=8, variance_form="isotropic")
    sc.add(900)
    sc.add(700, n_ret=5, n_est=11)
    q = torch.randn(2, H * G, D)
    pages = torch.cat([sc.pages(0), sc.pages(1)]).to(sc.pool.device)
    qv, sv = sc.pool.q8_views()
    vbar = qv[pages, :, 0, D:2 * D].double().mean(-1) * sv[pages, :, 1, 1].double()
    torch.testing.assert_close(sv[pages, :, 1, 2].double(), vbar, rtol=1e-6, atol=1e-12)
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV,
                            error_rank=rank == "error")
    out, ref, st, ws = run_both(sc, q, 0.2, ws=ws, retrieval_rank=rank)
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    assert ws.stats.tolist() == expected_stats(sc, st)
    if rank == "mass":
        for r in (0, 1):
            for kh in range(H):
                assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2)
    logits = ws.logits.cpu()
    for r in (0, 1):
        pbs = sc.pages(r)
        for kh in (0, H - 1):
            lg = _twin_log_mass(sc, q, r, kh, 0.2)[0]                    # [G, C]
            torch.testing.assert_close(logits[pbs, kh, :].T, lg, rtol=1e-4, atol=1e-4)
    sc.pool.variance_form = "diagonal"
    diag = _twin_log_mass(sc, q, 0, 0, 0.2)[0]
    sc.pool.variance_form = "isotropic"
    gap = diag - _twin_log_mass(sc, q, 0, 0, 0.2)[0]
    assert gap[torch.isfinite(gap)].abs().max() > 1e-2      # (empty clusters: -inf)


def test_isotropic_variance_needs_8bit_summaries():
    """A pool refuses an unknown variance form, and "isotropic" without 8-bit
    summaries (the mean is stored beside their scales)."""
    lay = PagedIndexLayout(H, D, BS, torch.float32)
    with pytest.raises(ValueError, match="variance_form must be one of"):
        IndexPool(lay, 4, DEV, summary_bits=8, variance_form="spherical")
    with pytest.raises(ValueError, match="needs summary_bits 8"):
        IndexPool(lay, 4, DEV, variance_form="isotropic")


def _pool_copy(pool: IndexPool) -> IndexPool:
    """An independent copy of ``pool`` (its own tensors) on the CPU."""
    out = IndexPool.__new__(IndexPool)
    out.__dict__.update(pool.__dict__)
    out.fpart, out.ipart = pool.fpart.cpu().clone(), pool.ipart.cpu().clone()
    return out


def _steps_scene(seed: int, rows: int, **pool_kw):
    """(scene, indexed rows) of the multi-step tests: two indexed rows with 8-bit
    summaries, with ``rows`` 4 a padded row and one without an index between them."""
    torch.manual_seed(seed)
    sc = Scene(260, summary_bits=8, **pool_kw)
    sc.add(900)
    if rows == 4:
        sc.add(0)
        sc.add(300, index="none")
    sc.add(700, n_ret=5, n_est=11)
    return sc, (0, rows - 1)


def _step_both(td, sc, ws, bt, sl, q, twin_hdr, twin_pool):
    """One decode step of the kernels (the scene's headers and pool) and of the twin
    (its own ``twin_hdr`` and ``twin_pool``), bucket selection: (out, twin out, twin
    stats)."""
    ws.stats.zero_()
    out = torch.full((len(sl), H * G, D), float("nan"), device=DEV)
    td.paged_decode_attention_triton(q.to(DEV), sc.kv, sc.lay, bt, sl, sc.headers,
                                     sc.alloc.ibt, sc.pool, sc.S, 0.2, out, ws,
                                     count_stats=True)
    ref, st = reference.paged_decode_attention(
        q, sc.cpu_cache(), sc.lay, bt.cpu(), sl.cpu(), twin_hdr, sc.alloc.ibt.cpu(),
        twin_pool, sc.S, 0.2, select="bucket")
    return out, ref, st


@pytest.mark.parametrize("rows", [4, 2])
def test_band_reranking_matches_twin_over_steps(monkeypatch, rows):
    """``rank_interval`` 3 over five decode steps of growing contexts: steps 0 and 3
    rank every entry and write the band (table and header), steps 1, 2 and 4
    re-rank the last band with their own query. Kernel and twin, each on its own
    copy of the headers and the pool, agree every step on the output, the
    counters (re-ranked rows included), the band table and ``HDR_BAND_AT``; a
    re-ranking step selects inside the band only, and not what a full ranking of
    its query selects (the mode is not a no-op here). Four rows (a padded one and
    one without an index among them) and two (the score kernel on its own split):
    a re-ranking row runs on fewer programs than a full ranking."""
    td = _td()
    monkeypatch.setattr(td, "SELECT", "bucket")
    sc, indexed = _steps_scene(47, rows, rank_interval=3)
    twin_pool, twin_hdr = _pool_copy(sc.pool), sc.headers.cpu().clone()
    bt, sl0 = sc.tensors()
    band = sc.pool.band_table()
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV)
    differs = 0
    for step in range(5):
        sl = torch.where(sl0 > 0, sl0 + step, 0)
        q = torch.randn(rows, H * G, D)
        out, ref, st = _step_both(td, sc, ws, bt, sl, q, twin_hdr, twin_pool)
        rerank = step in (1, 2, 4)
        assert st[:, 3].tolist() == [float(rerank and r in indexed) for r in range(rows)]
        assert _rel(out, ref) < 2e-3, (step, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st), step
        assert torch.equal(sc.headers.cpu(), twin_hdr), step
        at = 0 if step < 3 else 3
        for r in indexed:
            assert int(twin_hdr[int(bt[r, 0]), reference.HDR_BAND_AT]) == int(sl0[r]) + at
            pbs = sc.pages(r)
            n_ret, n_est = ws.counts[r * H].tolist()
            nb = n_ret + n_est
            assert 0 < nb < len(pbs)
            k = torch.arange(nb)
            tb = band.cpu()[pbs[k // 16], :, k % 16]                          # [nb, H]
            tt = twin_pool.band_table()[pbs[k // 16], :, k % 16]
            assert torch.equal(tb, tt), (step, r)
            for kh in range(H):
                ret, est = selection(sc, ws, r, kh)
                if not rerank:
                    continue
                # Inside the band: retrieved starts and estimated pages are band's.
                bpages = set(tb[:, kh].tolist())
                ip = sc.pool.ipart.cpu()
                starts = {(int(ip[pg, kh, I_START]), int(ip[pg, kh, I_SIZE])) for pg in bpages}
                assert set(ret) <= starts
                assert {int(pbs[e]) for e in est} <= bpages
                full = twin_selection(sc, q.to(sc.pool.device).cpu(), r, kh, 0.2, "bucket")
                differs += (ret, est) != full
    assert differs > 0


def test_band_reranking_follows_the_shared_phase(monkeypatch):
    """With the pool's shared phase (``IndexPool.band_phase``, the engine's step
    counter modulo ``rank_interval``) every row ranks in full on the phase's 0 steps,
    whatever its own last full ranking: kernel and twin agree on output, counters,
    headers and band every step, and the rows re-rank exactly when ``1 <= L - at <
    rank_interval`` and the phase is not 0 (here: steps 1, 3 and 4 of phases 1, 2, 0,
    1, 2; without the phase step 2 would re-rank)."""
    td = _td()
    monkeypatch.setattr(td, "SELECT", "bucket")
    sc, _ = _steps_scene(59, 2, rank_interval=3)
    twin_pool, twin_hdr = _pool_copy(sc.pool), sc.headers.cpu().clone()
    sc.pool.band_phase = torch.zeros(1, dtype=torch.int32, device=DEV)
    twin_pool.band_phase = torch.zeros(1, dtype=torch.int32)
    bt, sl0 = sc.tensors()
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV)
    reranked = []
    for step, phase in enumerate((1, 2, 0, 1, 2)):
        sc.pool.band_phase.fill_(phase)
        twin_pool.band_phase.fill_(phase)
        sl = sl0 + step
        q = torch.randn(2, H * G, D)
        out, ref, st = _step_both(td, sc, ws, bt, sl, q, twin_hdr, twin_pool)
        assert _rel(out, ref) < 2e-3, (step, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st), step
        assert torch.equal(sc.headers.cpu(), twin_hdr), step
        reranked.append(st[:, 3].tolist())
    assert reranked == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert not reference.band_reranks(twin_hdr[int(bt[0, 0])], int(sl0[0]) + 4, 3, phase=0)
    assert reference.band_reranks(twin_hdr[int(bt[0, 0])], int(sl0[0]) + 4, 3)


def test_rank_interval_is_validated():
    """The band re-ranking's needs, refused with clear errors: 8-bit summaries (its
    table lives in their spare words) and the mass rank, in the options and the
    pool; the kernels refuse the exact selection."""
    with pytest.raises(ValueError, match="rank_interval must be in"):
        RetroConfig(rank_interval=0)
    with pytest.raises(ValueError, match="set summary_bits 8"):
        RetroConfig(rank_interval=4, summary_bits=16)
    with pytest.raises(ValueError, match="does not combine with retrieval_rank"):
        RetroConfig(rank_interval=4, retrieval_rank="error")
    assert RetroConfig(rank_interval=4).rank_interval == 4
    lay = PagedIndexLayout(H, D, BS, torch.float32)
    with pytest.raises(ValueError, match="needs summary_bits 8"):
        IndexPool(lay, 4, DEV, rank_interval=2)
    with pytest.raises(ValueError, match="rank_interval must be an integer"):
        IndexPool(lay, 4, DEV, summary_bits=8, rank_interval=0)


def _carried_keys(lg: torch.Tensor, ref: float) -> torch.Tensor:
    """``[C]`` the carried rank keys of log-masses ``lg [G, C]`` (float32)."""
    return torch.exp(lg.float() - ref).sum(0)


@pytest.mark.parametrize("rows,max_split", [(4, 0), (2, 0), (4, 3)])
def test_carried_rank_reference_matches_twin_over_steps(monkeypatch, rows, max_split):
    """``rank_reference`` "carried" over three decode steps: step 0 has no reference
    (each row-head ranks as "step" and the key kernel stores its largest log-mass),
    later steps rank by ``sum_g exp(lg_g - R)`` with the score kernel writing the
    keys and the range histograms. Kernel and twin, each with its own references,
    agree every step on the output, counters and selections; the kernels' keys are
    the carried keys (white-box: the key kernel did not rewrite them); the
    references equal the twin's, each the largest log-mass of that step. A zeroed
    reference (the host rewrote the request's header) sends that request, alone, back
    to "step" for one step; no reference is written for a row without an index or
    any index-table row not in use. Four rows (a padded one and one without an index
    among them) and two (the small-batch tuning); and a split of 3 ranges in slots of
    4 (the key kernel's histogram slices: more slices than programs)."""
    td = _td()
    monkeypatch.setattr(td, "SELECT", "bucket")
    sc, indexed = _steps_scene(61, rows)
    bt, sl0 = sc.tensors()
    irows = [int(sc.headers[int(bt[r, 0]), HDR_IBT_ROW]) for r in indexed]
    sc.pool.rank_ref = torch.zeros(sc.alloc.ibt.shape[0], H, device=DEV)
    twin_pool = _pool_copy(sc.pool)
    twin_pool.rank_ref = torch.zeros(sc.alloc.ibt.shape[0], H)
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV, max_split=max_split)
    if max_split:
        assert ws.nsplit(rows) == 3 and ws.ns_pow2 == 4
    for step in range(3):
        if step == 2:   # the host rewrote the first row's header: no reference
            sc.pool.rank_ref[irows[0]] = 0
            twin_pool.rank_ref[irows[0]] = 0
        before = twin_pool.rank_ref.clone()
        sl = torch.where(sl0 > 0, sl0 + step, 0)
        q = torch.randn(rows, H * G, D)
        out, ref, st = _step_both(td, sc, ws, bt, sl, q, sc.headers.cpu(), twin_pool)
        assert _rel(out, ref) < 2e-3, (step, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st), step
        mode = ws.rank_mode.cpu()
        for r, irow in zip(indexed, irows):
            carried = step == 1 or (step == 2 and r != indexed[0])
            assert mode[r * H:(r + 1) * H].tolist() == [int(carried)] * H, (step, r)
            pbs = sc.pages(r)
            for kh in range(H):
                lg, _, nr, ne, iw = _twin_log_mass(sc, q, r, kh, 0.2)
                assert float(twin_pool.rank_ref[irow, kh]) == float(lg.max())
                if not carried:
                    continue
                key = _carried_keys(lg, float(before[irow, kh]))
                k = torch.arange(len(pbs))
                got = ws.keys.cpu()[pbs[k // 16], kh, k % 16].view(torch.float32)
                # (8-bit summaries: the kernels' log-masses within ~1e-4 of the twin's)
                assert torch.allclose(got, key, rtol=1e-3, atol=0), (step, r, kh)
                want = reference.bucket_selection(key, nr, ne, G,
                                                  digits=reference.bound_digits(key, G))
                assert selection(sc, ws, r, kh) == _as_lists(iw, *want), (step, r, kh)
        got_ref = sc.pool.rank_ref.cpu()
        assert torch.allclose(got_ref, twin_pool.rank_ref, rtol=1e-4, atol=1e-4), \
            (step, got_ref[irows], twin_pool.rank_ref[irows])
        unused = [i for i in range(got_ref.shape[0]) if i not in irows]
        assert not got_ref[unused].any(), "a reference outside the indexed rows"


def test_carried_rank_reference_is_validated(monkeypatch):
    """The carried reference's needs, refused with clear errors: the mass rank and
    one ranking per step in the options; the bucket selection and a reference table
    of the index table's rows and the pool's heads in the kernels."""
    with pytest.raises(ValueError, match="rank_reference must be one of"):
        RetroConfig(rank_reference="last")
    with pytest.raises(ValueError, match="needs retrieval_rank 'mass' and rank_interval 1"):
        RetroConfig(rank_reference="carried", retrieval_rank="error")
    with pytest.raises(ValueError, match="needs retrieval_rank 'mass' and rank_interval 1"):
        RetroConfig(rank_reference="carried", rank_interval=2)
    assert RetroConfig(rank_reference="carried").carries_rank_reference
    # "auto" (the default): carried where it can be, else the step's reference.
    assert RetroConfig().rank_reference == "auto"
    assert RetroConfig().carries_rank_reference
    assert not RetroConfig(retrieval_rank="error").carries_rank_reference
    assert not RetroConfig(rank_interval=4).carries_rank_reference
    assert not RetroConfig(rank_reference="step").carries_rank_reference
    assert not RetroConfig.from_preset("accuracy").carries_rank_reference
    td = _td()
    torch.manual_seed(5)
    sc = Scene(60, summary_bits=8)
    sc.add(500)
    bt, sl = sc.tensors()
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV)
    out = torch.empty(1, H * G, D, device=DEV)
    q = torch.randn(1, H * G, D, device=DEV)

    def call():
        td.paged_decode_attention_triton(q, sc.kv, sc.lay, bt, sl, sc.headers,
                                         sc.alloc.ibt, sc.pool, sc.S, 0.2, out, ws)
    sc.pool.rank_ref = torch.zeros(sc.alloc.ibt.shape[0], H + 1, device=DEV)
    with pytest.raises(ValueError, match="rank_ref must be a contiguous float32"):
        call()
    sc.pool.rank_ref = torch.zeros(sc.alloc.ibt.shape[0], H, device=DEV)
    monkeypatch.setattr(td, "SELECT", "exact")
    with pytest.raises(ValueError, match="needs the bucket selection"):
        call()


def test_bound_digits_place_the_window_at_the_group_size():
    """The carried keys' bins: the window's top binade is G's own (a key of G, every
    query head's mass on one cluster at the reference, is in it), 1/32 binade per
    bin, 16 binades down; larger and smaller keys share the end bins; the kernels'
    bound (a mean WIN/2 - 1 binades below G's) gives the same bins."""
    nbin = reference.NBINS // reference.WINDOW_BINADES     # bins per binade
    top = reference.NBINS - 1
    for g in (1, 3, 4, 8):
        e = math.floor(math.log2(g))                          # G's binade
        keys = torch.tensor([2.0 ** (e - k) for k in range(reference.WINDOW_BINADES)]
                            + [float(g), 2.0 ** (e + 1), 2.0 ** (e - 16), 0.0])
        dg = reference.bound_digits(keys, g).tolist()
        w = reference.WINDOW_BINADES
        assert dg[:w] == [(w - 1 - k) * nbin for k in range(w)], g
        assert dg[w] // nbin == w - 1 and dg[w + 1] == top and dg[w + 2] == dg[w + 3] == 0
        c = 1 << (w // 2 - 1)
        key = keys.float().view(torch.int32).long()
        mean = torch.tensor(float(g) / c, dtype=torch.float32)
        lo = ((int(mean.view(torch.int32)) >> 23) - w // 2) << reference.SUB_BITS
        assert ((key >> (23 - reference.SUB_BITS)) - lo).clamp(0, top).tolist() == dg


def test_band_reranking_refuses_the_exact_selection(monkeypatch):
    td = _td()
    monkeypatch.setattr(td, "SELECT", "exact")
    torch.manual_seed(5)
    sc = Scene(60, summary_bits=8, rank_interval=2)
    sc.add(500)
    bt, sl = sc.tensors()
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 8, DEV)
    out = torch.empty(1, H * G, D, device=DEV)
    with pytest.raises(ValueError, match="needs the bucket selection"):
        td.paged_decode_attention_triton(torch.randn(1, H * G, D, device=DEV), sc.kv, sc.lay,
                                         bt, sl, sc.headers, sc.alloc.ibt, sc.pool, sc.S,
                                         0.2, out, ws)


def test_pdl_is_used_above_two_rows_on_gpus_that_have_it(monkeypatch):
    """Programmatic dependent launch: by default above SMALL_BATCH rows on compute
    capability 9.0 and later only; RETRO_DECODE_PDL's forced values win; never in the
    interpreter."""
    td = _td()
    if DEV == "cpu":
        assert not td.pdl_for(8, torch.device("cuda", 0))
    caps = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(td, "interpreting", lambda: False)
    monkeypatch.setattr(td.torch.cuda, "get_device_capability", lambda i: caps[i])
    monkeypatch.setattr(td, "_PDL_DEVICES", {})
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.setattr(td, "PDL", None)
    assert [td.pdl_for(n, hopper) for n in (1, 2, 3, 8)] == [False, False, True, True]
    assert not td.pdl_for(8, ampere) and not td.pdl_for(8, torch.device("cpu"))
    monkeypatch.setattr(td, "PDL", False)
    assert not td.pdl_for(8, hopper)
    monkeypatch.setattr(td, "PDL", True)
    assert td.pdl_for(1, ampere)


def test_8bit_summaries_match_twin_and_stay_near_16bit():
    """``summary_bits`` 8: the score stage reads int8 centroids and variances with a
    scale per cluster (kernel == twin, which dequantizes; same selection); the
    output stays within the quantization's reach of the 16-bit pool's on the same
    index (same K/V, same build), and both as far from full attention."""
    o16, dense, *_ = _two_rows_checked(5, 4, 9, summary_bits=16)
    o8, _, _, _, sc = _two_rows_checked(5, 4, 9, summary_bits=8)
    pages = sc.pages(0).to(DEV)
    f16 = sc.pool.fpart[pages][:, :, 2]         # the mean value stays 16-bit
    assert torch.equal(f16, sc.pool.summaries(pages)[:, :, 2].to(f16.dtype))
    e16, e8 = _rel(o16, dense), _rel(o8, dense)
    print(f"rel. error vs full attention: 16-bit {e16:.4f}, 8-bit {e8:.4f}")
    assert _rel(o8, o16) < 0.1 and e8 < 1.25 * e16 + 0.01


def test_8bit_mean_values_match_twin_and_stay_near_16bit():
    """``mean_value_bits`` 8: the attention stage reads each estimated cluster's
    mean value as int8 and its scale (kernel == twin, which dequantizes; the
    selection does not change); the output stays within the rounding's reach of the
    16-bit pool's on the same index, equally far from full attention."""
    o16, dense, *_ = _two_rows_checked(6, 3, 20, mean_value_bits=16)
    o8, _, st, ws, sc = _two_rows_checked(6, 3, 20, mean_value_bits=8)
    assert ws.stats.tolist() == expected_stats(sc, st) and st[:, 1].sum() > 0
    e16, e8 = _rel(o16, dense), _rel(o8, dense)
    assert 0 < _rel(o8, o16) < 0.01 and e8 < 1.05 * e16 + 0.002, (_rel(o8, o16), e16, e8)


def test_value_correction_matches_twin_and_corrects_the_estimate():
    """``value_correction`` on the GPU path: the pool's slots 3 and 4 hold each
    cluster's ``sigma u`` and ``w`` (built by ``write_value_correction``) and the
    attention stage adds ``s (q . sigma u) w`` to each estimated cluster's value:
    kernel == twin (output and selection). On values linear in the keys (the case
    the first-order term models) with small logit spreads, it brings the output
    closer to float64 full attention than the mean values alone, most of the
    output's mass being estimated (1 cluster exact, 30 estimated)."""
    g = torch.Generator().manual_seed(11)
    mix = torch.randn(H, D, D, generator=g) / math.sqrt(D)

    def planted(L):
        k = torch.randn(L, H, D, generator=g)
        v = torch.einsum("lhd,hde->lhe", k, mix) + 0.05 * torch.randn(L, H, D, generator=g)
        return torch.cat([k, v], dim=-1)

    # The same K/V for both arms: the comparison is of the estimate alone.
    kv0, kv1 = planted(900), planted(700)
    outs, errs = {}, {}
    for vc in (False, True):
        torch.manual_seed(4)
        sc = Scene(260, value_correction=vc)
        sc.add(900, kv_row=kv0, n_ret=1, n_est=30)
        sc.add(700, kv_row=kv1, n_ret=1, n_est=30)
        q = 0.3 * torch.randn(2, H * G, D, generator=torch.Generator().manual_seed(5))
        out, ref, st, ws = run_both(sc, q, 0.2)
        assert _rel(out, ref) < 2e-3, (vc, _rel(out, ref))
        for r in (0, 1):
            for kh in range(H):
                assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2)
        if vc:
            f = sc.pool.fpart[sc.pages(0).to(DEV)].cpu()           # [C, H, 5, D]
            assert f[:, :, 3].abs().sum() > 0 and f[:, :, 4].abs().sum() > 0
        outs[vc], errs[vc] = ref, _rel(ref, dense_original(sc, q, 0.2))
    print(f"rel. error vs full attention: mean values {errs[False]:.4f}, "
          f"value correction {errs[True]:.4f}")
    assert _rel(outs[True], outs[False]) > 1e-4
    assert errs[True] < 0.9 * errs[False], errs


def test_quantize_mean_values_round_trip():
    """Each mean-value element within half a scale step, the scale in the slot after
    the D int8 values; the centroid and variance slots untouched; pages not
    quantized keep their bytes."""
    lay = PagedIndexLayout(H, D, BS, torch.bfloat16)
    pool = IndexPool(lay, 5, DEV, mean_value_bits=8)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, H, 3, D, generator=g)
         * torch.logspace(-2, 2, 5).view(5, 1, 1, 1)).to(torch.bfloat16)
    x[3, 0, 2] = 0
    pool.fpart.copy_(x.to(DEV))
    pages = torch.tensor([0, 3, 4], device=DEV)
    quantize_mean_values(pool, pages)
    got = pool.summaries(torch.arange(5, device=DEV)).cpu()
    for p in (0, 3, 4):
        want = x[p, :, 2].float()
        step = want.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
        assert ((got[p, :, 2] - want).abs() <= step / 2 + 1e-6 * step).all()
        assert torch.equal(pool.fpart[p, :, :2].cpu(), x[p, :, :2])
    assert torch.equal(got[3, 0, 2], torch.zeros(D))
    assert torch.equal(pool.fpart[[1, 2]].cpu(), x[[1, 2]])
    with pytest.raises(ValueError, match="mean_value_bits"):
        IndexPool(lay, 2, DEV, mean_value_bits=4)
    with pytest.raises(ValueError, match="mean_value_bits"):
        RetroConfig(mean_value_bits=12)
    assert RetroConfig.from_dict({"mean_value_bits": 8}).mean_value_bits == 8
    assert RetroConfig().mean_value_bits == 16


def test_quantize_summaries_round_trip():
    """Each element within half a scale step; an all-zero vector keeps scale 1; the
    entry's size is kept beside the scales."""
    lay = PagedIndexLayout(H, D, BS, torch.float32)
    pool = IndexPool(lay, 6, DEV, summary_bits=8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, H, 3, D, generator=g) * torch.logspace(-3, 2, 6).view(6, 1, 1, 1)
    x[:, :, 1] = x[:, :, 1].abs()
    x[2, 1, 0] = 0
    pool.fpart.copy_(x.to(DEV))
    sizes = torch.randint(0, 300, (6, H), generator=g, dtype=torch.int32)
    pool.ipart[:, :, I_SIZE] = sizes.to(DEV)
    pages = torch.tensor([0, 2, 3, 5], device=DEV)
    quantize_summaries(pool, pages)
    got = pool.summaries(torch.arange(6, device=DEV)).cpu()
    # the size beside the scales, as float32 (the score stage's one 16-byte vector)
    sv = pool.q8_views()[1].cpu()
    assert torch.equal(sv[pages.cpu(), :, 1, SIZE_WORD], sizes[pages.cpu()].float())
    for p in (0, 2, 3, 5):
        for v in range(2):
            want = x[p, :, v]
            step = want.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127
            assert ((got[p, :, v] - want).abs() <= step / 2 + 1e-6 * step).all()
        assert torch.equal(got[p, :, 2], x[p, :, 2])
    # pages not quantized keep their bytes
    assert torch.equal(pool.fpart[[1, 4]].cpu(), x[[1, 4]])
    assert torch.equal(got[2, 1, 0], torch.zeros(D))
    with pytest.raises(ValueError, match="summary_bits"):
        IndexPool(lay, 2, DEV, summary_bits=4)


def test_variance_cap_reaches_the_score_stage():
    """``RetroConfig.variance_cap`` (issue 16) is a launch parameter: with the
    first-order log-mass (cap 0) the kernels equal the twin with cap 0, whose
    output differs from the default cap's."""
    torch.manual_seed(5)
    sc = Scene(120)
    sc.add(900, n_ret=3, n_est=20)
    q = torch.randn(1, H * G, D) * 2.0     # a larger variance term
    out, ref, st, ws = run_both(sc, q, 0.2, variance_cap=0.0)
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    assert ws.stats.tolist() == expected_stats(sc, st)
    ref2, _ = reference.paged_decode_attention(q, sc.cpu_cache(), sc.lay, *[
        t.cpu() for t in sc.tensors()], sc.headers.cpu(), sc.alloc.ibt, sc.pool, sc.S, 0.2)
    assert _rel(ref2, ref) > 1e-2, _rel(ref2, ref)   # well above the kernel tolerance


def test_small_batch_selection_target():
    """At one or two rows the selection kernels' grids aim at
    ``SMALL_BATCH_SELECT_PROGRAMS_PER_SM`` programs per SM, the score kernel's at
    ``SMALL_BATCH_SCORE_PROGRAMS_PER_SM`` (2: one wave of its 2 resident programs per
    SM at two rows), the attention kernel's at ``PROGRAMS_PER_SM``; a launch of more
    rows keeps its own target for any rows in use (a padded CUDA graph). Llama-3-8B
    shape (8 KV heads) on 132 SMs."""
    td = _td()
    assert td.PROGRAMS_PER_SM == 4
    ws = td.DecodeWorkspace(64, 8, 4, 128, 8, "cpu", num_sms=132, max_split=32)
    assert [ws.nsplit(b) for b in (1, 2, 3, 8)] == [32, 32, 22, 8]
    assert [ws.nsplit_score(b) for b in (1, 2, 3, 8)] == [32, 16, 22, 8]
    assert [ws.nsplit_attend(b) for b in (1, 2, 3, 8)] == [32, 32, 22, 8]
    assert ws.nsplit_score(2, 3) == 32


def test_small_batch_selection_at_the_score_kernels_residency(monkeypatch):
    """With the small-batch target at 2 per SM (the score kernel's residency) two rows
    get 16 selection programs per row-head (one wave of 264) and the attention kernel
    keeps 32; a 3-row launch sized for 2 rows in use keeps the large target."""
    td = _td()
    monkeypatch.setattr(td, "SMALL_BATCH_SELECT_PROGRAMS_PER_SM", 2)
    ws = td.DecodeWorkspace(64, 8, 4, 128, 8, "cpu", num_sms=132, max_split=32)
    assert (ws.select_target(2), ws.select_target(3)) == (264, 528)
    assert [ws.nsplit(b) for b in (1, 2, 3, 8)] == [32, 16, 22, 8]
    assert [ws.nsplit_attend(b) for b in (1, 2, 3, 8)] == [32, 32, 22, 8]
    assert ws.nsplit(2, 3) == 32


def test_score_kernel_on_a_split_of_its_own(monkeypatch):
    """The score kernel on a smaller split than the key and list kernels'
    (``SMALL_BATCH_SCORE_PROGRAMS_PER_SM``): the key kernel's log-sum-exp reads the
    partial slots up to its own split, which the score kernel filled past its own
    with neutral values (the slots start as NaN here, so one left unwritten shows).
    Output, selection and counters are the twin's."""
    td = _td()
    monkeypatch.setattr(td, "SMALL_BATCH_SCORE_PROGRAMS_PER_SM", 1)
    torch.manual_seed(13)
    sc = Scene(220)
    sc.add(900, n_ret=5, n_est=12)
    sc.add(700, n_ret=4, n_est=9)
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 4, DEV, num_sms=4,
                            programs_per_sm=8, max_split=4)
    assert (ws.nsplit(2), ws.nsplit_score(2)) == (4, 1)
    ws.score_max.fill_(float("nan"))
    ws.score_sum.fill_(float("nan"))
    q = torch.randn(2, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2, ws=ws, td=td)
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    assert ws.stats.tolist() == expected_stats(sc, st)
    for r in (0, 1):
        for kh in range(H):
            assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, 0.2)


@pytest.mark.parametrize("split,attend_split", [(2, 4), (4, 2)])
def test_attention_split_differs_from_selection_split(split, attend_split):
    """The attention kernel runs its own number of programs per (row, KV head);
    finer or coarser than the selection kernels', the result is the twin's."""
    td = _td()
    torch.manual_seed(11)
    sc = Scene(200)
    sc.add(900)
    sc.add(300, index="none")
    ws = td.DecodeWorkspace(sc.pool.num_pages, H, G, D, 4, DEV, max_split=split,
                            attend_max_split=attend_split)
    assert ws.nsplit(2) == split and ws.nsplit_attend(2) == attend_split
    q = torch.randn(2, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2, ws=ws, td=td)
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    assert ws.stats.tolist() == expected_stats(sc, st)


def test_bf16_cache_and_output():
    torch.manual_seed(2)
    sc = Scene(160, dtype=torch.bfloat16)
    sc.add(800)
    sc.add(200, index="none")
    q = torch.randn(2, H * G, D).bfloat16()
    out, ref, st, ws = run_both(sc, q, 1 / math.sqrt(D), out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and not torch.isnan(out).any()
    assert _rel(out, ref) < 2e-2, _rel(out, ref)
    assert ws.stats.tolist() == expected_stats(sc, st)


def test_hnd_cache_layout_matches_twin(monkeypatch):
    """vLLM's HND cache layout (a KV head's tokens of a block contiguous): the index
    build and the decode kernels read it through the view's strides. Kernel against
    twin with the index built on an HND cache; and the output of an NHD scene
    unchanged when its cache is moved to the HND layout. (The selection kernels never
    read K/V, so the default selection stands for both.)"""
    td = _td()
    select = "bucket"
    monkeypatch.setattr(td, "SELECT", select)
    scale = 1 / math.sqrt(D)
    for layout in ("HND", "NHD"):
        sc = Scene(200, kv_layout=layout)
        assert sc.kv.shape[1:] == (H, BS, 2 * D)
        assert sc.kv.stride(2) == (2 * D if layout == "HND" else H * 2 * D)
        for L in (900, 0, 517, 700):
            sc.add(L, index="build" if L > 600 else "none")
        q = torch.randn(len(sc.rows), H * G, D)
        out, ref, st, ws = run_both(sc, q, scale, select=select)
        assert _rel(out, ref) < 1e-5, (layout, _rel(out, ref))
        assert ws.stats.tolist() == expected_stats(sc, st)
    hnd = sc.lay.make_cache(sc.kv.shape[0], DEV, "HND")
    hnd.copy_(sc.kv)
    sc.kv = hnd
    assert torch.equal(run_both(sc, q, scale, select=select)[0], out)


def test_unknown_cache_layout_is_refused():
    lay = PagedIndexLayout(H, D, BS, torch.float32)
    with pytest.raises(ValueError, match="layout"):
        lay.make_cache(4, kv_layout="NDH")


def test_all_clusters_retrieved_is_dense():
    """Every cluster retrieved: kernel and twin over the reordered cache equal
    float64 full attention over the ORIGINAL K/V (order invariance), as does dense
    attention over the reordered cache (what vLLM's own kernels compute)."""
    torch.manual_seed(3)
    sc = Scene(140)
    E = sc.add(1000, n_ret=10**6, n_est=0)
    assert E
    q = torch.randn(1, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2)
    bt, sl = sc.tensors()
    dense = dense_original(sc, q, 0.2)
    L = 1000
    pos = torch.arange(L)
    now = sc.cpu_cache()[bt[0].long().cpu()[pos // BS], :, pos % BS]
    assert not torch.equal(now, sc.orig[0])          # the build moved K/V
    assert _rel(ref, dense) < 1e-5
    assert _rel(out, dense) < 1e-5
    dense_now = reference.dense_paged_attention(q, sc.cpu_cache(), sc.lay, bt.cpu(),
                                                sl.cpu(), 0.2)
    assert _rel(dense_now, dense) < 1e-5
    assert ws.stats[2] == 1000 * H and ws.stats[3] == 0


@pytest.mark.parametrize("smg", [False, True])
def test_retrieved_positions_are_bounds_checked(monkeypatch, smg):
    """Starts come from index bytes: a cluster whose start lies outside the row's
    clustered zone (corrupt or stale bytes) reads only the part of it inside
    ``[sink_end, clustered_end)``, never another row's or the steady zone's tokens
    twice; kernel and twin (which keeps only the in-zone positions) agree; so does
    the attention kernel's ``SMG`` form (its clusters clamped once each)."""
    td = _td()
    for table in (td.TUNE, td.TUNE_SMALL_BATCH):
        monkeypatch.setitem(table, "attend", dict(table["attend"], SMG=smg))
    torch.manual_seed(8)
    sc = Scene(200)
    cent = torch.randn(60, H, D)
    E0 = sc.add(sc.S + 60 * BS + 40, index="craft", n_ret=6, n_est=0, cent=cent)
    sc.add(500, index="none")
    fpart, ipart = sc.pool.fpart, sc.pool.ipart
    pages = sc.pages(0)
    # Make three clusters stand out, then point them outside the zone: before the
    # sinks' end, across the zone's end, and far beyond the context.
    q = torch.randn(2, H * G, D)
    for j, start in ((0, sc.S - 8), (1, E0 - 8), (2, 10**6)):
        blk = pages[j]
        fpart[blk, :, 0] = (q[0].view(H, G, D).mean(1) * 3).to(DEV, fpart.dtype)
        ipart[blk, :, I_START] = start
    out, ref, st, ws = run_both(sc, q, 0.2)
    assert not torch.isnan(out).any()
    assert _rel(out, ref) < 2e-3, _rel(out, ref)
    assert ws.stats.tolist() == expected_stats(sc, st)
    for kh in range(H):
        ret, _ = selection(sc, ws, 0, kh)
        assert {(sc.S - 8, BS), (E0 - 8, BS), (10**6, BS)} <= set(ret)   # they were read
        assert (ret, _) == twin_selection(sc, q, 0, kh, 0.2)



def test_batch_above_sixteen_rows_matches_twin():
    """A batch of 18 rows (the launcher's row class above 16: every program scans up
    to 512 rows for the last one with context), the last two padded: every row as
    the twin, padding rows zero."""
    torch.manual_seed(13)
    sc = Scene(200)
    sc.add(700)
    for _ in range(14):
        sc.add(40, index="none")
    sc.add(500, n_ret=3, n_est=5)
    sc.add(0)
    sc.add(0)
    q = torch.randn(18, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2, ws=_td().DecodeWorkspace(
        sc.pool.num_pages, H, G, D, 18, DEV))
    assert not torch.isnan(out).any() and out[16:].abs().max() == 0
    for r in range(16):
        assert _rel(out[r], ref[r]) < 2e-3, (r, _rel(out[r], ref[r]))
    assert ws.stats.tolist() == expected_stats(sc, st)
    assert ws.stats[0] == 2 and ws.stats[1] == 14


def test_bucket_selection_matches_twin(monkeypatch):
    """``SELECT = "bucket"``: scores in a threshold's histogram bin count as equal
    (ties to the lower entry). The kernels' lists equal the twin's bucket selection
    (white-box), with the exact selection's counts; every retrieved score is within
    one bin (1/32 binade) of the exact n_retrieve-th; outputs and statistics match
    the twin, and the output is no further from float64 full attention than the
    exact selection's by more than 0.02."""
    td = _td()
    monkeypatch.setattr(td, "SELECT", "bucket")
    torch.manual_seed(11)
    sc = Scene(260)
    sc.add(900)
    sc.add(0)
    sc.add(300, index="none")
    sc.add(700, n_ret=4, n_est=9)
    q = torch.randn(4, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2, select="bucket")
    assert not torch.isnan(out).any() and out[1].abs().max() == 0
    for r in (0, 2, 3):
        assert _rel(out[r], ref[r]) < 2e-3, (r, _rel(out[r], ref[r]))
    assert ws.stats.tolist() == expected_stats(sc, st)
    bt, _ = sc.tensors()
    crowded = 0          # row-heads whose retrieval bin holds more than one score
    for r in (0, 3):
        for kh in range(H):
            ret, est = selection(sc, ws, r, kh)
            score, nr, ne, _ = twin_scores(sc, q, r, kh, 0.2)
            assert len(ret) == nr and len(est) == ne
            assert (ret, est) == twin_selection(sc, q, r, kh, 0.2, select="bucket")
            kth = score.sort(descending=True).values[nr - 1]
            tr, _ = reference.bucket_selection(score, nr, ne, G)
            assert score[tr].min() >= kth / 2 ** (1 / 32) * (1 - 1e-6)
            dg = reference.score_digits(score, G)
            crowded += int((dg == dg[score.argsort(descending=True)[nr - 1]]).sum() > 1)
    assert crowded > 0, "no threshold bin shared: the ties inside a bin went untested"
    # Random keys spread attention thinly (far from full attention at this budget
    # in both modes): ranking inside a bin by entry must not cost accuracy.
    dense = dense_original(sc, q, 0.2)
    exact, _ = reference.paged_decode_attention(q, sc.cpu_cache(), sc.lay, bt.cpu(),
                                                sc.tensors()[1].cpu(), sc.headers.cpu(),
                                                sc.alloc.ibt, sc.pool, sc.S, 0.2)
    for r in (0, 3):
        assert _rel(out[r], dense[r]) <= _rel(exact[r], dense[r]) + 0.02


def test_bucket_selection_twin_edges():
    """The twin's buckets on crafted scores: equal scores share a bin (the lowest
    entries are taken), budgets of 0 and of every entry, and a spread of scores
    where the bucket selection is the exact one."""
    g = 4
    c = 64
    score = torch.full((c,), g / c)                  # all equal: one bin
    ret, est = reference.bucket_selection(score, 3, 5, g)
    assert ret.tolist() == [0, 1, 2] and est.tolist() == [3, 4, 5, 6, 7]
    score = 2.0 ** torch.linspace(-12, 0, c)         # distinct bins (3 per binade)
    score = score[torch.randperm(c, generator=torch.Generator().manual_seed(0))]
    ret, est = reference.bucket_selection(score, 0, 0, g)
    assert len(ret) == 0 and len(est) == 0
    ret, est = reference.bucket_selection(score, c, 0, g)
    assert len(ret) == c and len(est) == 0
    ret, est = reference.bucket_selection(score, 4, 10, g)
    order = torch.argsort(score, descending=True)
    assert set(ret.tolist()) == set(order[:4].tolist())
    assert set(est.tolist()) == set(order[4:14].tolist())
    # Bins placed by the caller: the default placement given explicitly selects the
    # same; bins that reverse the order select the other end.
    dg = reference.score_digits(score, g)
    r2, e2 = reference.bucket_selection(score, 4, 10, g, digits=dg)
    assert torch.equal(r2, ret) and torch.equal(e2, est)
    r3, _ = reference.bucket_selection(score, 4, 0, g, digits=reference.NBINS - 1 - dg)
    assert set(r3.tolist()) == set(order[-4:].tolist())
    with pytest.raises(ValueError, match="select"):
        reference.paged_decode_attention(torch.zeros(1, 2, 4), torch.zeros(1, 1, 1, 8),
                                         None, None, None, None, None, None, 0, 1.0,
                                         select="top")


def test_unknown_selection_mode_is_refused_at_import():
    """``RETRO_DECODE_SELECT`` other than "bucket" / "exact" stops the import with a
    message naming the variable (a typo must not fall back to some selection)."""
    env = dict(os.environ, RETRO_DECODE_SELECT="top")
    r = subprocess.run([sys.executable, "-c", "import vllm_retro.kernels.triton_decode"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "RETRO_DECODE_SELECT must be one of ('bucket', 'exact'), not 'top'" in r.stderr


@pytest.mark.parametrize("chunk,small", [(0, 0), (64, 0), (0, 16)])
def test_ties_pick_lower_entries_like_twin(monkeypatch, chunk, small):
    """Crafted indexes whose cluster summaries repeat: exact score ties, broken by
    the lower entry index. Row 0: 40 entries, 3 distinct summaries; row 1: 200 equal
    entries but 4. chunk=64: threshold buckets of more than 64 keys are searched in
    chunks (the path of huge buckets); small=16: buckets of at most 16 keys are
    searched on 16 lanes (``CBS``; row 0's, not row 1's)."""
    td = _td()
    if chunk:
        for k in ("cand", "collect"):
            monkeypatch.setitem(td.TUNE, k, dict(td.TUNE[k], CB=chunk))
    if small:
        for t in (td.TUNE, td.TUNE_SMALL_BATCH):
            monkeypatch.setitem(t, "cand", dict(t["cand"], CBS=small))
    torch.manual_seed(4)
    scale = 0.25
    sc = Scene(320)
    groups = (torch.randint(-2, 3, (3, H, D)) * 0.25)
    c0 = 40
    cent0 = groups[torch.tensor([0 if j % 5 == 0 else 1 if j % 5 == 1 else 2
                                 for j in range(c0)])]
    sc.add(sc.S + c0 * BS + 40, index="craft", n_ret=5, n_est=6, cent=cent0)
    c1 = 200
    cent1 = groups[2].expand(c1, H, D).clone()
    cent1[150:154] = groups[0]
    sc.add(sc.S + c1 * BS + 40, index="craft", n_ret=7, n_est=30, cent=cent1)
    q = (torch.randint(-4, 5, (2, H * G, D)) * 0.125)
    out, ref, st, ws = run_both(sc, q, scale)
    for r in range(2):
        for kh in range(H):
            assert selection(sc, ws, r, kh) == twin_selection(sc, q, r, kh, scale), (r, kh)
        assert _rel(out[r], ref[r]) < 2e-3
    assert ws.stats.tolist() == expected_stats(sc, st)


def test_budget_larger_than_clusters_is_clamped():
    torch.manual_seed(5)
    sc = Scene(200)
    sc.add(600, n_ret=3, n_est=10**6)     # everything after the top 3 is estimated
    sc.add(500, n_ret=10**6, n_est=7)     # everything retrieved, nothing estimated
    sc.add(520, n_ret=0, n_est=10**6)     # nothing retrieved, everything estimated
    q = torch.randn(3, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2)
    assert _rel(out, ref) < 2e-3
    assert ws.stats.tolist() == expected_stats(sc, st)
    for r in range(3):
        assert selection(sc, ws, r, 1) == twin_selection(sc, q, r, 1, 0.2)


def test_launch_sequence_does_not_depend_on_data(monkeypatch):
    """One workspace, two calls over different contexts and headers: the same grids,
    each result equal to the twin's (as a CUDA graph replay requires)."""
    torch.manual_seed(6)
    td = _td()
    launches = []

    class Rec:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launches.append((self.name, tuple(grid)))
            return self.fn[grid]

    names = [n for n in dir(td) if n.endswith("_kernel")]
    for name in names:
        monkeypatch.setattr(td, name, Rec(name, getattr(td, name)))
    ws = td.DecodeWorkspace(437, H, G, D, 4, DEV)
    seqs = []
    for calls in range(2):
        sc = Scene(400)
        if calls == 0:
            sc.add(700)
            sc.add(150, index="none")
            sc.add(0)
        else:
            sc.add(0)
            sc.add(1100, n_ret=2, n_est=40)
            sc.add(650)
        q = torch.randn(3, H * G, D)
        before = len(launches)
        out, ref, st, _ = run_both(sc, q, 0.2, ws=ws, td=td)
        seqs.append(launches[before:])
        assert not torch.isnan(out).any()
        assert _rel(out, ref) < 2e-3
        assert ws.stats.tolist() == expected_stats(sc, st)
    # (the resolve kernel runs with a wave buffer view only; the candidate kernel
    # with the exact selection only; the band kernel with the error rank only)
    skipped = {"_resolve_kernel", "_band_kernel"} | (
        {"_cand_kernel"} if td.SELECT == "bucket" else set())
    assert seqs[0] == seqs[1] and len(seqs[0]) == len(set(names) - skipped)


def twin_error_selection(scene: Scene, q: torch.Tensor, r: int, kh: int, scale: float):
    """What :func:`selection` reads back, as the twin's error rank selects it."""
    lg, kvar, nr, ne, iw = _twin_log_mass(scene, q, r, kh, scale)
    score = torch.softmax(lg, -1).nan_to_num(0.0).sum(0)
    err = reference.error_proxy(q[r, kh * G:(kh + 1) * G].float(), lg, kvar, scale)
    return _as_lists(iw, *reference.error_selection(score, err, nr, ne, G))


def test_error_rank_matches_twin(monkeypatch):
    """``retrieval_rank="error"`` (the band kernel between the key and list kernels):
    on ragged rows (built indexes, a padded row, a row without index, explicit,
    estimation-free and clamped budgets) the kernels' lists equal the twin's error
    selection (white-box), outputs and statistics the twin's; the rank changes the
    retrieved set against the mass rank on some row-head (else this test could not
    tell them apart), and with every cluster retrieved the result is float64 full
    attention."""
    td = _td()
    monkeypatch.setattr(td, "SELECT", "bucket")
    torch.manual_seed(21)
    sc = Scene(400)
    sc.add(900)
    sc.add(0)
    sc.add(300, index="none")
    sc.add(700, n_ret=4, n_est=9)
    sc.add(640, n_ret=5, n_est=0)             # band = the retrieved set
    sc.add(600, n_ret=3, n_est=10**6)         # band = every cluster
    sc.add(500, n_ret=10**6, n_est=3)         # every cluster retrieved
    q = torch.randn(7, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.2, retrieval_rank="error")
    assert not torch.isnan(out).any() and out[1].abs().max() == 0
    for r in (0, 2, 3, 4, 5, 6):
        assert _rel(out[r], ref[r]) < 2e-3, (r, _rel(out[r], ref[r]))
    assert ws.stats.tolist() == expected_stats(sc, st)
    changed = 0
    for r in (0, 3, 4, 5, 6):
        for kh in range(H):
            ret, est = selection(sc, ws, r, kh)
            assert (ret, est) == twin_error_selection(sc, q, r, kh, 0.2), (r, kh)
            mret, mest = twin_selection(sc, q, r, kh, 0.2, select="bucket")
            assert len(ret) == len(mret) and len(est) == len(mest)
            # Same band, as the mass rank selects it.
            band = {s for s, _ in ret} | {int(sc.pool.ipart.cpu()[sc.pages(r)[i], kh, I_START])
                                          for i in est}
            assert band == {s for s, _ in mret} | {
                int(sc.pool.ipart.cpu()[sc.pages(r)[i], kh, I_START]) for i in mest}
            changed += ret != mret
    assert changed > 0
    dense = dense_original(sc, q, 0.2)
    assert _rel(ref[6], dense[6]) < 1e-5 and _rel(out[6], dense[6]) < 1e-5


def test_error_selection_twin():
    """The twin's error rank on fresh random scores and errors: the band is the mass
    rank's, the retrieved its top ``n_ret`` errors by bin (every retrieved error
    within one bin, 1/32 binade, of the exact ``n_ret``-th of the band), ties to the
    lower entry; all-zero errors retrieve the band's lowest entries; budgets of 0."""
    gen = torch.Generator().manual_seed(17)
    c, g = 300, 4
    for trial in range(20):
        score = torch.softmax(torch.randn(g, c, generator=gen) * 3, -1).sum(0)
        err = torch.rand(c, generator=gen) ** 4 * 10.0 ** float(torch.randint(-3, 3, (1,),
                                                                               generator=gen))
        nr, ne = int(torch.randint(1, 20, (1,), generator=gen)), int(
            torch.randint(0, 60, (1,), generator=gen))
        ret, est = reference.error_selection(score, err, nr, ne, g)
        r0, e0 = reference.bucket_selection(score, nr, ne, g)
        band = torch.cat([r0, e0]).sort().values
        assert torch.equal(torch.cat([ret, est]).sort().values, band)
        assert len(ret) == nr and len(est) == len(e0)
        kth = err[band].double().sort(descending=True).values[nr - 1]
        assert err[ret].double().min() >= kth / 2 ** (1 / 32) * (1 - 1e-6)
        exact_ret, _ = reference.error_selection(score, err, nr, ne, g, select="exact")
        xband = score.argsort(descending=True, stable=True)[:nr + ne]
        assert set(exact_ret.tolist()) == set(xband[err[xband].double().argsort(
            descending=True, stable=True)[:nr]].tolist())
    zero = torch.zeros(c)
    ret, est = reference.error_selection(score, zero, 3, 10, g)
    band = torch.cat([ret, est]).sort().values
    assert ret.tolist() == band[:3].tolist()
    ret, est = reference.error_selection(score, err, 0, 0, g)
    assert len(ret) == 0 and len(est) == 0
    dg = reference.error_digits(torch.tensor([1.0, 0.5, 2.0 ** -20, 0.0]))
    assert dg.tolist() == [reference.NBINS - 32, reference.NBINS - 64, 0, 0]


def test_error_rank_refusals(monkeypatch):
    """The error rank needs the bucket selection; the decode kernels know "mass" and
    "error" only ("error_value" needs the steady part's output: refused by the
    paged index's config check too, with its reason)."""
    td = _td()
    torch.manual_seed(2)
    sc = Scene(60)
    sc.add(500)
    q = torch.randn(1, H * G, D)
    monkeypatch.setattr(td, "SELECT", "exact")
    with pytest.raises(ValueError, match="bucket selection"):
        run_both(sc, q, 0.2, retrieval_rank="error")
    monkeypatch.setattr(td, "SELECT", "bucket")
    with pytest.raises(ValueError, match="retrieval_rank must be one of"):
        run_both(sc, q, 0.2, retrieval_rank="error_value")
    from vllm_retro.index.paged import check_config_for_paged
    assert check_config_for_paged(CFG.replace(retrieval_rank="error"), BS) == []
    assert any("error_value" in r for r in
               check_config_for_paged(CFG.replace(retrieval_rank="error_value"), BS))


def test_index_width_refused_beyond_int32(monkeypatch):
    """The kernels form addresses from 32-bit indices and strides widened once: a
    cache whose block stride reaches 2^31 elements is refused with a clear error
    (shapes and strides only: a meta tensor, nothing allocated), not indexed with a
    wrapped offset; a stride just below passes the check."""
    td = _td()
    big = torch.empty(0, device="meta").as_strided((4, H, BS, 2 * D), (2**31, 2 * D * BS, 2 * D, 1))
    with pytest.raises(ValueError, match="below 2\\^31"):
        td._check_index_width(torch.zeros(2, 3), big)
    ok = torch.empty(0, device="meta").as_strided((4, H, BS, 2 * D), (2**31 - 1, 2 * D * BS, 2 * D, 1))
    td._check_index_width(ok)
    torch.manual_seed(3)
    sc = Scene(60)
    sc.add(500)
    q = torch.randn(1, H * G, D)
    kv = sc.kv
    monkeypatch.setattr(sc, "kv", torch.empty(0, device="meta", dtype=kv.dtype).as_strided(
        kv.shape, (2**31,) + kv.stride()[1:]))
    with pytest.raises(ValueError, match="below 2\\^31"):
        run_both(sc, q, 0.2)


def _ragged_scene(dtype, head_dim: int) -> Scene:
    """Six ragged rows for the CUDA-against-Triton tests: an index of several
    segments, a row with seq_len 0, a row without an index, an explicit budget."""
    sc = Scene(400, dtype=dtype, head_dim=head_dim)
    for L, kw in ((900, {}), (0, {}), (300, {"index": "none"}),
                  (700, {"n_ret": 4, "n_est": 9}), (1500, {}), (520, {})):
        sc.add(L, **kw)
    return sc


@pytest.mark.skipif(DEV != "cuda", reason="the CUDA score kernel needs a GPU")
@pytest.mark.parametrize("head_dim,group,dtype", [
    (128, 4, torch.bfloat16), (64, 8, torch.bfloat16), (32, 16, torch.bfloat16),
    (128, 3, torch.bfloat16), (256, 2, torch.bfloat16), (128, 4, torch.float16),
    (64, 4, torch.float32)])
def test_cuda_score_matches_triton(monkeypatch, head_dim, group, dtype):
    """The CUDA score kernel (``torch.ops.vllm_retro.paged_score``, selected by
    ``SCORE_IMPL = "cuda"``) against Triton's ``_score_kernel`` on the same inputs:
    ragged rows (an index of several segments with empty clusters, a row with
    seq_len 0, a row without an index, an explicit budget), batches of 1, 3 and 6 rows
    (so 32 down to a few programs per row-head). The log-masses at every entry's
    block address (-inf at the same entries), each program's partial max / sum-exp
    (query heads < G) agree to 1e-3 (relative and absolute): both accumulate in fp32,
    but Triton's products are split high/low 16-bit tensor-core products, the CUDA
    kernel's fp32 FMAs (and the sum-exp order differs). The call zeroes exactly the
    batch's hist / ncand rows, and the decode output stays the twin's."""
    td = _td()
    if not td.cuda_score_available():
        pytest.skip("vllm_retro._C is not built with CUDA (scripts/gpu/run.sh BUILD_EXT=1)")
    # The outputs are compared under the exact selection, which scores within 1e-3
    # change only at exact near-ties; the bucket selection takes whole histogram bins,
    # and a score crossing a bin edge reorders the threshold bin (the same inputs give
    # the same lists: the bucket tests above).
    monkeypatch.setattr(td, "SELECT", "exact")
    from vllm_retro.attention import VARIANCE_CORRECTION_CAP
    torch.manual_seed(12)
    sc = _ragged_scene(dtype, head_dim)
    bt, sl = sc.tensors()
    sb = sc.S // BS
    scale = 1 / math.sqrt(head_dim)
    nan = float("nan")
    for b in (1, 3, 6):
        q = torch.randn(b, H * group, head_dim, device=DEV).to(dtype)
        runs = {}
        for impl in ("triton", "cuda"):
            monkeypatch.setattr(td, "SCORE_IMPL", impl)
            ws = td.DecodeWorkspace(sc.pool.num_pages, H, group, head_dim, 8, DEV)
            for t in (ws.logits, ws.score_max, ws.score_sum):
                t.fill_(nan)
            out = torch.full((b, H * group, head_dim), nan, device=DEV)
            td.paged_decode_attention_triton(q, sc.kv, sc.lay, bt[:b], sl[:b], sc.headers,
                                             sc.alloc.ibt, sc.pool, sc.S, scale, out, ws)
            runs[impl] = (ws, out)
        (wt, ot), (wc, oc) = runs["triton"], runs["cuda"]
        ns = wt.nsplit(b)
        for r in range(b):
            blocks = sc.pages(r).to(DEV)
            lt, lc = wt.logits[blocks], wc.logits[blocks]
            assert not lc.isnan().any(), f"row {r}: log-masses left unwritten"
            torch.testing.assert_close(lc, lt, rtol=1e-3, atol=1e-3, msg=f"b={b} row {r}")
        rows = b * H
        for name in ("score_max", "score_sum"):
            pt = getattr(wt, name)[:rows, :ns, :group]
            pc = getattr(wc, name)[:rows, :ns, :group]
            torch.testing.assert_close(pc, pt, rtol=1e-3, atol=1e-3, msg=f"b={b} {name}")
        assert _rel(oc, ot) < 1e-2, _rel(oc, ot)
        ref, _ = reference.paged_decode_attention(q.cpu(), sc.cpu_cache(), sc.lay,
                                                  bt[:b].cpu(), sl[:b].cpu(),
                                                  sc.headers.cpu(), sc.alloc.ibt, sc.pool,
                                                  sc.S, scale)
        assert _rel(oc, ref) < 2e-2, _rel(oc, ref)
        # The op alone: hist / ncand rows of the batch zeroed, the others untouched.
        wc.hist.fill_(7)
        wc.ncand.fill_(7)
        fpart, ipart = sc.pool.fpart, sc.pool.ipart
        torch.ops.vllm_retro.paged_score(q, fpart, ipart, bt[:b], sc.alloc.ibt, sl[:b],
                                         sc.headers,
                                         wc.logits, wc.score_max, wc.score_sum, wc.hist,
                                         wc.ncand, sb, BS, ns, scale,
                                         float(VARIANCE_CORRECTION_CAP))
        assert (wc.hist[:rows] == 0).all() and (wc.ncand[:rows] == 0).all()
        assert (wc.hist[rows:] == 7).all() and (wc.ncand[rows:] == 7).all()


def test_public_op(monkeypatch):
    """``vllm_retro.kernels.paged_decode_attention`` runs the kernels here (GPU or
    interpreter), allocating the output and a workspace when none are given."""
    import vllm_retro.kernels as K
    td = _td()
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(K, "paged_decode_attention_triton", td.paged_decode_attention_triton)
    monkeypatch.setattr(K, "DecodeWorkspace", td.DecodeWorkspace)
    assert K.uses_triton(torch.zeros(1, device=DEV))
    torch.manual_seed(7)
    sc = Scene(100)
    sc.add(640)
    bt, sl = sc.tensors()
    q = torch.randn(1, H * G, D)
    out = K.paged_decode_attention(q.to(DEV), sc.kv, sc.lay, bt, sl, sc.headers,
                                   sc.alloc.ibt, sc.pool, sc.S, 0.2)
    ref, _ = reference.paged_decode_attention(q, sc.cpu_cache(), sc.lay, bt.cpu(), sl.cpu(),
                                              sc.headers.cpu(), sc.alloc.ibt, sc.pool,
                                              sc.S, 0.2)
    assert out.shape == (1, H * G, D) and _rel(out, ref) < 2e-3
    assert HDR_WORDS == sc.headers.shape[1]


@pytest.mark.skipif(DEV != "cuda", reason="the CUDA attention kernel needs a GPU")
@pytest.mark.parametrize("head_dim,group,dtype", [
    (128, 4, torch.bfloat16), (64, 3, torch.bfloat16), (128, 1, torch.float16),
    (64, 2, torch.float16)])
def test_cuda_attend_matches_triton(monkeypatch, head_dim, group, dtype):
    """The CUDA attention kernel (``torch.ops.vllm_retro.paged_attend``, selected by
    ``ATTEND_IMPL = "cuda"``) against Triton's ``_attend_kernel`` after the same
    selection kernels: ragged rows (an index of several segments, a row with seq_len
    0, a row without an index, an explicit budget), batches of 1, 3 and 6 rows (32 down
    to a few programs per row-head), trailing padded rows (the split follows the rows
    in use), float32 and 16-bit outputs. Both read the same lists; the CUDA kernel
    multiplies in fp32, Triton's products are split high/low 16-bit tensor-core
    products: outputs within 1e-3, and within bf16 rounding of the twin."""
    td = _td()
    if not td.cuda_attend_available():
        pytest.skip("vllm_retro._C is not built with CUDA (scripts/gpu/run.sh BUILD_EXT=1)")
    # Against the twin under the exact selection (as test_cuda_score_matches_triton:
    # the GPU's 16-bit score products move a score across a bucket edge now and then).
    monkeypatch.setattr(td, "SELECT", "exact")
    torch.manual_seed(19)
    sc = _ragged_scene(dtype, head_dim)
    bt, sl = sc.tensors()
    scale = 1 / math.sqrt(head_dim)
    nan = float("nan")
    cases = [(1, sl[:1], torch.float32), (3, sl[:3], torch.float32), (6, sl, torch.float32),
             (6, torch.where(torch.arange(6, device=DEV) < 4, sl, 0), torch.float32),
             (6, sl, dtype)]
    for b, lens, out_dtype in cases:
        q = torch.randn(b, H * group, head_dim, device=DEV).to(dtype)
        runs = {}
        for impl in ("triton", "cuda"):
            monkeypatch.setattr(td, "ATTEND_IMPL", impl)
            ws = td.DecodeWorkspace(sc.pool.num_pages, H, group, head_dim, 8, DEV)
            out = torch.full((b, H * group, head_dim), nan, device=DEV, dtype=out_dtype)
            td.paged_decode_attention_triton(q, sc.kv, sc.lay, bt[:b], lens, sc.headers,
                                             sc.alloc.ibt, sc.pool, sc.S, scale, out, ws)
            assert not out.isnan().any(), (impl, b)
            assert not ws.tickets.any(), "every row-head's ticket is back at 0"
            runs[impl] = out.float()
        tol = 1e-3 if out_dtype == torch.float32 else 1e-2
        assert _rel(runs["cuda"], runs["triton"]) < tol, (b, _rel(runs["cuda"], runs["triton"]))
        padded = lens[:b] == 0
        assert not runs["cuda"][padded].any(), "rows without context give zeros"
        ref, _ = reference.paged_decode_attention(q.cpu(), sc.cpu_cache(), sc.lay,
                                                  bt[:b].cpu(), lens.cpu(), sc.headers.cpu(),
                                                  sc.alloc.ibt, sc.pool, sc.S, scale,
                                                  select="exact")
        assert _rel(runs["cuda"], ref) < 2e-2, _rel(runs["cuda"], ref)


def test_cuda_attend_is_not_taken_where_it_does_not_fit(monkeypatch):
    """``ATTEND_IMPL = "cuda"`` falls back to Triton for calls the CUDA kernel was not
    built for (here: the interpreter and a float32 cache of head dim 32): the
    output is still the twin's."""
    td = _td()
    monkeypatch.setattr(td, "ATTEND_IMPL", "cuda")
    torch.manual_seed(23)
    sc = Scene(200)
    sc.add(800)
    sc.add(300, index="none")
    q = torch.randn(2, H * G, D)
    out, ref, st, ws = run_both(sc, q, 0.3)
    assert _rel(out, ref) < 1e-5
    assert ws.stats.tolist() == expected_stats(sc, st)
