"""Torch reference twins of the decode kernels (the specification they are tested against).

:func:`paged_decode_attention` is tripartite decode attention over the paged wave
index (:mod:`vllm_retro.index.paged`), one row and KV head at a time, in float32
(float64 for float64 inputs). Semantics, per row ``r`` (context ``L = seq_lens[r]``,
header ``hdr = headers[block_table[r, 0]]``, index-table row ``ix = ibt[hdr[HDR_IBT_ROW]]``:
cluster entry ``i``'s summaries at pool page ``ix[i]``) and KV head ``h`` with its
``G`` query heads:

* ``L == 0`` (a padded row): the output is zero.
* no index (``clustered_end == 0``): exact attention over all ``L`` tokens.
* otherwise the steady zone ``[0, sink_end) + [clustered_end, L)`` is exact; the
  cluster entries of logical blocks ``[sink_end/bs, clustered_end/bs)`` get the
  log-mass ``s q.c + ln size + min(s^2/2 sum_d q_d^2 var_d, CAP)`` (``-inf`` for
  empty ones), the softmax over the entries summed over the group ranks them
  (ties: lower entry first); the top ``n_retrieve`` are attended exactly (a
  cluster's tokens are the positions ``[start, start + size)``, kept inside
  ``[sink_end, clustered_end)``: the index build made each cluster contiguous per
  KV head), the next ``n_estimate`` contribute their log-mass over their
  mean value, the rest are skipped (``select="bucket"``: :func:`bucket_selection`
  instead, scores in one bin of a log-scale histogram ranked by entry). All parts
  form one softmax. With the value
  correction in the pool (``pool.value_correction``), an estimated cluster's value
  for query head ``g`` is ``mean v + s (q_g . sigma u) w`` (slots ``F_SIGMA_U``,
  ``F_W``), as :func:`vllm_retro.attention.estimated_attention` with ``value_corr``.
* with a wave buffer view (``wave``, :mod:`.wave_view`), a retrieved token at a
  position below the row's horizon ``min(hdr[HDR_HORIZON], clustered_end)`` is
  read from the cluster cache (slot ``cache_table[key] >= 0``) or else the host
  arena (row ``page_row[key] >= 0``), ``key = (page * layers + layer) * H + h``
  with ``page = ix[pos // bs - sink_end // bs]`` the pool page of the token's
  logical block, never through the block table; a token in neither (or with no
  pool page in ``[0, num_pages)``, or whose ibt row is outside ``ibt``) is left
  out. Without a view the horizon is ignored. (The twin neither stamps
  nor counts; the kernel's bookkeeping is tested against a plain count.)
* band re-ranking (``pool.rank_interval`` ``k > 1``, :func:`band_reranks`): a
  row whose header's ``HDR_BAND_AT`` (the context length of its last full
  ranking; 0: none) lies 1 to ``k - 1`` tokens back ranks only that step's band:
  the ``n = n_retrieve + n_estimate`` entries whose pool pages the band table
  (:meth:`IndexPool.band_table`) holds, entry ``k`` at ``[ix[k // 16], h, k %
  16]``, in that order, scored with this step's query; the selection above runs
  on them alone (its top ``n_retrieve`` exact, the rest estimated), and every
  entry outside the band is skipped. Any other row ranks all entries and writes its band to the
  table (entry ``k``: the page of the ``k``-th retrieved entry, then of the
  estimated, each in the selection's order) and ``L`` to ``HDR_BAND_AT`` (both
  the twin and the kernels write them).

* the carried rank reference (``pool.rank_ref``, ``[ibt rows, H]`` float32:
  ``RetroConfig.rank_reference`` "carried"; bucket selection and mass rank only):
  a row-head whose reference ``R = rank_ref[hdr[HDR_IBT_ROW], h]`` has nonzero bits
  ranks by ``sum_g exp(lg_g - R)`` binned by :func:`bound_digits`, any other as
  above; every row-head with an index then stores its largest log-mass (over the
  group and the entries, when finite) as its reference for the next call.

Returns the output ``[B, Hq, D]`` and per-row statistics ``[B, 5]`` float64:
tokens read exactly, tokens estimated, tokens in context (summed over KV heads),
1 where the row re-ranked its band, 1 where its KV head 0 ranked by the carried
reference.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from ..attention import VARIANCE_CORRECTION_CAP
from ..index.paged import (BAND_PACK, F_CENTROID, F_KEY_VAR, F_SIGMA_U, F_VALUE_MEAN,
                           F_W, FLOAT_SLOTS, HDR_BAND_AT, HDR_CLUSTERED_END, HDR_HORIZON,
                           HDR_IBT_ROW, HDR_N_ESTIMATE, HDR_N_RETRIEVE, I_SIZE, I_START,
                           IndexPool, PagedIndexLayout)
from .wave_view import WaveBufferView

# The decode kernels' selection modes (``triton_decode.SELECT``; the twin's ``select``):
# "bucket" (:func:`bucket_selection`) or "exact" (the top counts by score).
SELECTIONS = ("bucket", "exact")
# How the decode kernels choose the exact set inside the band (RetroConfig.retrieval_rank
# values the GPU path implements).
RANKS = ("mass", "error")


def selection_from_env() -> str:
    """The kernels' selection mode: ``RETRO_DECODE_SELECT`` (default "bucket");
    another value is an error (a typo must not fall back to some selection)."""
    select = os.environ.get("RETRO_DECODE_SELECT", "bucket")
    if select not in SELECTIONS:
        raise ValueError(f"RETRO_DECODE_SELECT must be one of {SELECTIONS}, not {select!r}")
    return select


# The selection histogram (the kernels' stage 2): bins of 1/2^SUB_BITS binade of the
# float32 score over WINDOW_BINADES binades centred on the mean score's binade.
SUB_BITS = 5
WINDOW_BINADES = 16
NBINS = WINDOW_BINADES << SUB_BITS


def _window_digits(score: torch.Tensor, top: int) -> torch.Tensor:
    """Histogram bin of each value of ``score`` (``[C]``, >= 0, as float32): the
    kernels' digit of its float32 bit pattern, 1/2^SUB_BITS of a binade per bin over
    the ``WINDOW_BINADES`` binades ending with biased binade ``top``, values outside
    the window in its end bins."""
    key = score.float().view(torch.int32).long()
    lo = (top - WINDOW_BINADES + 1) << SUB_BITS
    return ((key >> (23 - SUB_BITS)) - lo).clamp(0, NBINS - 1)


def score_digits(score: torch.Tensor, group: int) -> torch.Tensor:
    """Histogram bin of each cluster's ranking score: the window centred on the
    mean score's binade (:func:`_window_digits`)."""
    mean = torch.tensor(float(group), dtype=torch.float32) / torch.tensor(
        float(max(score.numel(), 1)), dtype=torch.float32)
    return _window_digits(score, (int(mean.view(torch.int32)) >> 23)
                          + WINDOW_BINADES // 2 - 1)


def bound_digits(score: torch.Tensor, group: int) -> torch.Tensor:
    """Histogram bin of each cluster's carried rank key (``RetroConfig.rank_reference``
    "carried"): the window's top binade ``group``'s own (keys up to ``group``, their
    bound when the reference is the step's own largest log-mass, are inside it)."""
    g = torch.tensor(float(group), dtype=torch.float32)
    return _window_digits(score, int(g.view(torch.int32)) >> 23)


def bucket_selection(score: torch.Tensor, n_ret: int, n_est: int, group: int,
                     digits: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(retrieved, estimated) entry indices, in entry order, of the "bucket"
    selection: scores in one histogram bin (:func:`score_digits`: 1/32 of a binade,
    within ~2% of each other) count as equal, ties to the lower entry. The
    retrieved are the ``n_ret`` largest so ranked, the estimated the next
    ``n_est``: the exact selection's counts, its sets up to the order inside the
    threshold bins. ``digits``: the bins, if placed otherwise than
    :func:`score_digits` places them (``[C]`` in ``[0, NBINS)``)."""
    dg = score_digits(score, group) if digits is None else digits
    c = dg.numel()
    hist = torch.bincount(dg, minlength=NBINS)
    ge = c - hist.cumsum(0) + hist                             # keys in bins >= b

    def top(k: int) -> torch.Tensor:
        sel = torch.zeros(c, dtype=torch.bool)
        if k <= 0:
            return sel
        b = int(torch.nonzero(ge >= k).flatten().max())
        sel |= dg > b
        inside = torch.nonzero(dg == b).flatten()
        sel[inside[:k - int(sel.sum())]] = True
        return sel
    ret = top(n_ret)
    band = top(n_ret + n_est)
    return torch.nonzero(ret).flatten(), torch.nonzero(band & ~ret).flatten()


def mass_selection(score: torch.Tensor, n_ret: int, n_est: int, group: int,
                   select: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(retrieved, estimated) entry indices of the mass rank: the top ``n_ret`` and
    the next ``n_est`` by ``score`` (``select`` "bucket": :func:`bucket_selection`,
    in entry order; "exact": in rank order, ties to the lower entry)."""
    if select == "bucket":
        return bucket_selection(score, n_ret, n_est, group)
    order = torch.argsort(score, descending=True, stable=True)
    return order[:n_ret], order[n_ret:n_ret + n_est]


def error_digits(err: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each cluster's error proxy (``[C]``, >= 0, as float32) for
    the error rank's selection: the same 1/32-binade bins as :func:`score_digits`,
    over the ``WINDOW_BINADES`` binades that end with the largest proxy's (the
    proxies have no natural scale to centre on; the rank keeps the largest ones,
    smaller ones clamp to bin 0)."""
    key = err.float().view(torch.int32)
    return _window_digits(err, int(key.max()) >> 23 if key.numel() else 0)


def error_proxy(q: torch.Tensor, lg: torch.Tensor, kvar: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``[C]`` the GPU error rank's proxy (``retrieval_rank`` "error"): the
    expected log-mass error of each cluster were it estimated, ``sum_g m_g t_g``
    with ``m_g = exp(lg_g - lse_g)`` the cluster's share of query head ``g``'s
    attention among the clusters (``lg`` ``[G, C]``: :func:`cluster_log_mass`) and
    ``t_g = s^2/2 sum_d q_d^2 var_d`` the uncapped key-variance term (``q [G, D]``,
    ``kvar [C, D]``). As :meth:`vllm_retro.wave_index.WaveIndex.cluster_error_proxy`
    with "error", but normalised over the clusters alone (the wave index adds the
    steady part to the total: the decode kernels rank before they attend it)."""
    cdt = q.dtype
    t = ((q * q) @ kvar.to(cdt).T) * (0.5 * scale * scale)
    m = torch.softmax(lg, dim=-1).nan_to_num(0.0)
    return (m * t).sum(dim=0)


def error_selection(score: torch.Tensor, err: torch.Tensor, n_ret: int, n_est: int,
                    group: int, select: str = "bucket"
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(retrieved, estimated) entry indices, in entry order, of the error rank: the
    band is the top ``n_ret + n_est`` by ``score`` (as the mass ranking selects
    it, ``select``), the retrieved its ``n_ret`` largest ``err`` (``select``
    "bucket": :func:`error_digits` bins, ties to the lower entry; "exact": ties to
    the lower entry), the estimated the rest of the band."""
    band = torch.sort(torch.cat(mass_selection(score, n_ret, n_est, group, select))).values
    if select == "bucket":
        dg = error_digits(err)[band]
        # Descending bin, then ascending entry: the bins are small integers.
        pick = torch.argsort(-dg * (band.numel() + 1) + torch.arange(band.numel()))
    else:
        pick = torch.argsort(err[band].float(), descending=True, stable=True)
    sel = torch.zeros(band.numel(), dtype=torch.bool)
    sel[pick[:n_ret]] = True
    return band[sel], band[~sel]


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cluster_log_mass(q: torch.Tensor, cent: torch.Tensor, kvar: torch.Tensor,
                     sizes: torch.Tensor, scale: float,
                     cap: float = VARIANCE_CORRECTION_CAP) -> torch.Tensor:
    """``[G, C]`` log-mass of clusters (see module doc) for ``q [G, D]``; ``cap``
    bounds the variance term (``RetroConfig.variance_cap``)."""
    cdt = q.dtype
    lg = (q @ cent.to(cdt).T) * scale
    lg = lg + torch.log(sizes.to(cdt)).unsqueeze(0)
    corr = ((q * q) @ kvar.to(cdt).T) * (0.5 * scale * scale)
    return lg + corr.clamp(max=cap)


def _band_slots(band_tab: torch.Tensor, pbs: torch.Tensor, n: int):
    """(row page, word) of a row-head's band entries ``0..n-1`` in the band table
    (entry ``k`` at the row's page ``k // BAND_PACK``, word ``k % BAND_PACK``), on the
    table's device."""
    k = torch.arange(n)
    dev = band_tab.device
    return pbs[k // BAND_PACK].to(dev), (k % BAND_PACK).to(dev)


def _band_entries(band_tab: torch.Tensor, pbs: torch.Tensor, kh: int, n: int
                  ) -> torch.Tensor:
    """Pool pages of a row-head's ``n`` band entries (the band table's packing)."""
    rows, words = _band_slots(band_tab, pbs, n)
    return band_tab[rows, kh, words].cpu().long()


def band_reranks(hdr, L: int, rank_interval: int, phase: Optional[int] = None) -> bool:
    """Whether a row (header ``hdr``, context ``L``) re-ranks its last band
    (``RetroConfig.rank_interval``; module doc). ``phase``: the step's place in the
    interval shared by all rows (``IndexPool.band_phase``): at 0 every row ranks in
    full, so the rows of a batch rank on the same steps; None: each row by its own
    last full ranking only."""
    at = int(hdr[HDR_BAND_AT])
    return (rank_interval > 1 and int(hdr[HDR_CLUSTERED_END]) > 0 and at > 0
            and 1 <= L - at < rank_interval and (phase is None or phase != 0))


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                           layout: PagedIndexLayout, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, headers: torch.Tensor,
                           ibt: torch.Tensor, pool: IndexPool,
                           sink_end: int, scale: float,
                           variance_cap: float = VARIANCE_CORRECTION_CAP,
                           wave: Optional[WaveBufferView] = None, select: str = "exact",
                           retrieval_rank: str = "mass"
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`vllm_retro.kernels.paged_decode_attention`.

    Args:
        query: ``[B, Hq, D]``. kv_cache: vLLM's ``(NB, H, bs, 2D)`` view.
            block_table: ``[B, max_blocks]`` int. seq_lens: ``[B]`` int.
            headers: ``[NB, HDR_WORDS]`` int32. ibt: the index table ``[R,
            max_pages]`` int32. pool: the layer's :class:`IndexPool`. sink_end:
            first clustered token. variance_cap: cap of the clusters' variance term.
        wave: the layer's wave buffer view (None: everything through the block
            table).
        select: "exact" (the top n_retrieve / n_estimate) or "bucket"
            (:func:`bucket_selection`, the kernels' ``SELECT = "bucket"``).
        retrieval_rank: "mass" (the top ``n_retrieve`` by score are exact) or
            "error" (:func:`error_selection` with :func:`error_proxy`: the same
            band, its exact part chosen by expected estimation error).
    """
    if select not in SELECTIONS:
        raise ValueError(f"select must be 'exact' or 'bucket', not {select!r}")
    if retrieval_rank not in RANKS:
        raise ValueError(f"retrieval_rank must be one of {RANKS}, not {retrieval_rank!r}")
    b, hq, d = query.shape
    h, bs = layout.num_kv_heads, layout.block_size
    g = hq // h
    cdt = _cdt(query.dtype)
    out = torch.zeros(b, hq, d, dtype=cdt, device=query.device)
    stats = torch.zeros(b, 5, dtype=torch.float64)
    ri = getattr(pool, "rank_interval", 1)
    if ri > 1 and (select != "bucket" or retrieval_rank != "mass"):
        raise ValueError("band re-ranking (rank_interval > 1) needs the bucket selection "
                         "and the mass rank")
    band_tab = pool.band_table() if ri > 1 else None
    ref = getattr(pool, "rank_ref", None)
    if ref is not None and (select != "bucket" or retrieval_rank != "mass" or ri > 1):
        raise ValueError("the carried rank reference needs the bucket selection, the mass "
                         "rank and rank_interval 1")
    # (The references every row reads: those of the step before.)
    ref_in = None if ref is None else ref.detach().float().cpu().clone()
    ph = getattr(pool, "band_phase", None) if ri > 1 else None
    phase = None if ph is None else int(ph.reshape(-1)[0])
    # Dequantized when the pool keeps 8-bit summaries (what the kernel reads).
    fpart = pool.summaries(torch.arange(pool.num_pages, device=pool.device)).cpu()
    ipart = pool.ipart.cpu()
    ibt = ibt.cpu().long()
    if wave is not None:
        wave.check(kv_cache, h, bs, d, pool.num_pages, devices=False)
        w_table = wave.cache_table.cpu()
        w_rows = wave.page_row.cpu().reshape(-1).long()
        w_kv = wave.cache_kv.cpu()
        w_arena = wave.arena.cpu()
    for r in range(b):
        L = int(seq_lens[r])
        if L == 0:
            continue
        bt = block_table[r].long()
        hdr = headers[int(bt[0])].tolist()
        E = hdr[HDR_CLUSTERED_END]
        irow = hdr[HDR_IBT_ROW]
        hz = 0
        if E:
            steady = torch.cat([torch.arange(0, sink_end), torch.arange(E, L)])
            epb = layout.entries_per_block
            pbs = ibt[hdr[HDR_IBT_ROW], :(E // bs - sink_end // bs) * epb]  # pool pages
            if wave is not None:
                hz = min(hdr[HDR_HORIZON], E)
        else:
            steady = torch.arange(0, L)
            lbs = pbs = torch.arange(0)
        steady_slots = bt[steady // bs] * bs + steady % bs
        stats[r, 2] = L * h
        rerank = len(pbs) > 0 and band_reranks(hdr, L, ri, phase)
        stats[r, 3] = float(rerank)
        for kh in range(h):
            q = query[r, kh * g:(kh + 1) * g].to(cdt)                      # [G, D]
            slots = steady_slots
            est_logits = torch.empty(g, 0, dtype=cdt)
            est_vals = torch.empty(0, d, dtype=cdt)
            est_coef = torch.empty(g, 0, dtype=cdt)      # value correction (q . sigma u) s
            est_w = torch.empty(0, d, dtype=cdt)
            n_exact = len(steady)
            n_est_tok = 0
            if len(pbs):
                c = len(pbs)
                n_ret = max(0, min(c, hdr[HDR_N_RETRIEVE]))
                n_est = max(0, min(c - n_ret, hdr[HDR_N_ESTIMATE]))
                # The entries ranked: all, or (re-ranking) the last band's pages.
                ent = (_band_entries(band_tab, pbs, kh, n_ret + n_est) if rerank
                       else pbs)
                f = fpart[ent, kh].to(cdt)                                   # [C, 3, D]
                iw = ipart[ent, kh].long()                                   # [C, 2]
                sizes = iw[:, I_SIZE]
                lg = cluster_log_mass(q, f[:, F_CENTROID], f[:, F_KEY_VAR], sizes, scale,
                                      variance_cap)
                if ref is not None and int(ref_in[irow, kh].view(torch.int32)) != 0:
                    # Relative to the request's largest log-mass of its last step.
                    score = torch.exp(lg.float() - ref_in[irow, kh]).sum(dim=0)
                    ret, est = bucket_selection(score, n_ret, n_est, g,
                                                digits=bound_digits(score, g))
                    if kh == 0:
                        stats[r, 4] = 1.0
                else:
                    score = torch.softmax(lg, dim=-1).nan_to_num(0.0).sum(dim=0)
                    if retrieval_rank == "error":
                        err = error_proxy(q, lg, f[:, F_KEY_VAR], scale)
                        ret, est = error_selection(score, err, n_ret, n_est, g, select)
                    else:
                        ret, est = mass_selection(score, n_ret, n_est, g, select)
                if ref is not None:
                    top = lg.max().float()
                    if torch.isfinite(top):
                        ref[irow, kh] = top.to(ref.device)
                if band_tab is not None and not rerank:
                    sel_pages = ent[torch.cat([ret, est])].to(torch.int32)
                    rows, words = _band_slots(band_tab, pbs, len(sel_pages))
                    band_tab[rows, kh, words] = sel_pages.to(band_tab.device)
                # A retrieved cluster's tokens: positions [start, start + size) (the
                # build made each cluster contiguous per head), within [S, E).
                tok = torch.cat([torch.arange(int(iw[i, I_START]),
                                              int(iw[i, I_START]) + int(sizes[i]))
                                 for i in ret.tolist()] or [torch.arange(0)])
                n_exact += len(tok)
                tok = tok[(tok >= sink_end) & (tok < min(E, L))]
                est_logits = lg[:, est]
                est_vals = f[est, F_VALUE_MEAN]
                if pool.value_correction:
                    # An estimated cluster's value is mean v + s (q . sigma u) w, one
                    # per query head (RetroConfig.value_correction).
                    est_coef = (q @ f[est, F_SIGMA_U].T) * scale
                    est_w = f[est, F_W]
                n_est_tok = int(sizes[est].sum())
                if hz > 0:
                    kv_tok = _wave_tokens(kv_cache, bt, tok, hz, ibt, hdr[HDR_IBT_ROW],
                                          sink_end, kh, wave, w_table, w_rows, w_kv,
                                          w_arena)
                else:
                    kv_tok = kv_cache[bt[tok // bs], kh, tok % bs]
            else:
                kv_tok = kv_cache[:0, kh, 0]
            kvt = torch.cat([kv_cache[slots // bs, kh, slots % bs],
                             kv_tok.to(kv_cache.device)]).to(cdt)             # [T, 2D]
            logits = torch.cat([(q @ kvt[:, :d].T) * scale, est_logits], dim=1)
            vals = torch.cat([kvt[:, d:], est_vals], dim=0)
            p = torch.softmax(logits, dim=-1)
            o = p @ vals
            if est_w.shape[0]:
                o = o + (p[:, p.shape[1] - est_w.shape[0]:] * est_coef) @ est_w
            out[r, kh * g:(kh + 1) * g] = o
            stats[r, 0] += n_exact
            stats[r, 1] += n_est_tok
        if band_tab is not None and E and not rerank:
            headers[int(bt[0]), HDR_BAND_AT] = L
    return out, stats


def _wave_tokens(kv_cache, bt, tok, hz, ibt, row, sink_end, kh, wave, table, page_row,
                 cache_kv, arena):
    """``[T', 2D]`` K/V of retrieved tokens ``tok`` (in order, within ``[sink_end,
    clustered_end)``) of KV head ``kh``: at or above the horizon ``hz`` through the
    block table, below it from the cache slot or the arena rows of their page (keyed
    by the pool page ``ibt[row, pos // bs - sink_end // bs]``); tokens below it in
    neither are dropped."""
    bs = kv_cache.shape[2]
    out = torch.zeros(len(tok), kv_cache.shape[-1], dtype=kv_cache.dtype)
    paged = tok >= hz
    tp = tok[paged]
    out[paged] = kv_cache[bt[tp // bs], kh, tp % bs].cpu()
    below = ~paged
    if 0 <= row < ibt.shape[0]:
        ent = (tok // bs - sink_end // bs).clamp(0, ibt.shape[1] - 1)
        pg = torch.where(below, ibt[row][ent], -1)
    else:
        pg = torch.full_like(tok, -1)
    ok = below & (pg >= 0) & (pg < wave.num_pages)
    key = wave.key(pg.clamp(0, wave.num_pages - 1), kh)
    slot = torch.where(ok, table[key], -1)
    arow = torch.where(ok, page_row[key], -1)
    in_cache = ok & (slot >= 0)
    in_arena = ok & (slot < 0) & (arow >= 0)
    off = tok % bs
    out[in_cache] = cache_kv[slot[in_cache], off[in_cache]]
    out[in_arena] = arena[arow[in_arena] + off[in_arena]]
    return out[paged | in_cache | in_arena]


def dense_paged_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                          layout: PagedIndexLayout, block_table: torch.Tensor,
                          seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Full attention of each row over its whole context, in float64 (the target
    the tripartite result is compared with)."""
    b, hq, d = query.shape
    h, bs = layout.num_kv_heads, layout.block_size
    g = hq // h
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for r in range(b):
        L = int(seq_lens[r])
        if L == 0:
            continue
        pos = torch.arange(L)
        bt = block_table[r].long()
        kv = kv_cache[bt[pos // bs], :, pos % bs].double()                   # [L, H, 2D]
        for kh in range(h):
            q = query[r, kh * g:(kh + 1) * g].double()
            p = torch.softmax((q @ kv[:, kh, :d].T) * scale, dim=-1)
            out[r, kh * g:(kh + 1) * g] = p @ kv[:, kh, d:]
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def write_clusters(kv_cache: torch.Tensor, layout: PagedIndexLayout, pool: IndexPool,
                   seg_blocks: torch.Tensor, seg_pages: torch.Tensor, p0s: torch.Tensor,
                   order: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor) -> None:
    """Reference of :func:`vllm_retro.kernels.write_clusters`: writes ``m`` clustered
    segments of equal length ``n`` into the index pool and reorders their K/V in
    place (in vLLM's pages) into cluster order.

    Args:
        kv_cache: vLLM's ``(NB, H, bs, 2D)`` view. pool: the layer's index pool.
        seg_blocks: ``[m, n / bs]`` physical blocks of each segment, in order.
        seg_pages: ``[m, e n / bs]`` pool pages of each segment, in order (``e`` the
            layout's ``entries_per_block``; ``C <= e n / bs``).
        p0s: ``[m]`` first token position of each segment (block-aligned).
        order: ``[m * H, n]`` the segment's token indices (0..n-1) in cluster order
            (problem ``job * H + h``). starts / sizes: ``[m * H, C]`` each cluster's
            first entry in ``order`` and its size.

    Per head ``h``, logical position ``p0 + e`` of the segment receives the K/V
    (head ``h``) that token ``p0 + order[e]`` had, so cluster ``j`` occupies
    ``[p0 + start, p0 + start + size)``. Cluster ``j`` goes to the segment's ``j``-th
    page: centroid (mean key), per-channel key variance and mean value (zeros if
    empty), size and first position ``p0 + start``; pages ``j >= C`` get size and
    start 0. Statistics in float32 (float64 for float64 caches), stored in the
    cache's dtype; the K/V are moved bit-exactly.
    """
    h, bs, d = layout.num_kv_heads, layout.block_size, layout.head_dim
    m, nbs = seg_blocks.shape
    n = nbs * bs
    c = starts.shape[1]
    dev = kv_cache.device
    cdt = _cdt(kv_cache.dtype)
    fpart, ipart = pool.fpart, pool.ipart
    sb = seg_blocks.long()
    sp = seg_pages.long().to(fpart.device)
    order = order.long().view(m, h, n)
    sizes = sizes.long().view(m, h, c)
    starts = starts.long().view(m, h, c)
    # Each entry's cluster, in cluster order.
    ent = torch.arange(n, device=dev)
    cid = (torch.searchsorted(starts.reshape(m * h, c).contiguous(),
                              ent.expand(m * h, n).contiguous(), right=True) - 1)
    cid = cid.view(m, h, n)
    job = torch.arange(m, device=dev).view(m, 1, 1).expand(m, h, n)
    head = torch.arange(h, device=dev).view(1, h, 1).expand(m, h, n)
    # The original K/V in cluster order (a gather: a copy, read before any write).
    kv_src = kv_cache[sb[job, order // bs], head, order % bs]                 # [m, H, n, 2D]
    kv = kv_src.to(cdt)
    k, v = kv[..., :d], kv[..., d:]
    cnt = sizes.clamp_min(1).unsqueeze(-1).to(cdt)

    def per_cluster(x):
        out = torch.zeros(m, h, c, d, dtype=cdt, device=dev)
        return out.scatter_add_(2, cid.unsqueeze(-1).expand(m, h, n, d), x)

    cent = per_cluster(k) / cnt
    vmean = per_cluster(v) / cnt
    dev_k = k - torch.gather(cent, 2, cid.unsqueeze(-1).expand(m, h, n, d))
    kvar = per_cluster(dev_k * dev_k) / cnt
    cblk = sp[:, :c]                                                          # [m, C]
    summ = torch.stack([cent, kvar, vmean], dim=3)                            # [m, H, C, 3, D]
    fpart[cblk, :, :FLOAT_SLOTS] = summ.permute(0, 2, 1, 3, 4).to(fpart.dtype)
    p0 = p0s.long().to(dev).view(m, 1, 1)
    ipart[cblk, :, I_SIZE] = sizes.permute(0, 2, 1).to(torch.int32)
    ipart[cblk, :, I_START] = (starts + p0).permute(0, 2, 1).to(torch.int32)
    if c < sp.shape[1]:
        ipart[sp[:, c:], :, I_SIZE] = 0
        ipart[sp[:, c:], :, I_START] = 0
    # Cluster-contiguous K/V: entry e of head h goes to logical position p0 + e.
    pos = ent.view(1, 1, n).expand(m, h, n)
    kv_cache[sb[job, pos // bs], head, pos % bs] = kv_src


def write_value_correction(kv_cache: torch.Tensor, layout: PagedIndexLayout,
                           pool: IndexPool, seg_blocks: torch.Tensor,
                           seg_pages: torch.Tensor, starts: torch.Tensor,
                           sizes: torch.Tensor, iters: int) -> None:
    """Reference of :func:`vllm_retro.kernels.write_value_correction`: writes each
    cluster's value-correction pair into slots ``F_SIGMA_U`` and ``F_W`` of its index
    page (``RetroConfig.value_correction``, the paged counterpart of
    :func:`vllm_retro.kmeans.kv_cross_rank1`): the leading singular pair of the key-
    value cross-covariance ``X = (1/n) sum_i (k_i - c)(v_i - mean v)^T ~ sigma u
    w^T``, ``sigma u`` and the unit ``w`` (zero for clusters of fewer than two
    tokens), found by ``iters`` power iterations from the cluster's first key
    deviation, without forming ``X`` (each step two passes over the tokens: ``X w =
    (1/n) sum_i dk_i (dv_i . w)``, ``X^T u = (1/n) sum_i dv_i (dk_i . u)``). The sign
    of the pair is arbitrary, the correction ``(q . sigma u) w`` is not.

    Runs after :func:`~vllm_retro.kernels.write_clusters` (the segments' K/V are
    cluster-contiguous, cluster ``j`` at entries ``[starts[j], starts[j] +
    sizes[j])``); arguments as there (``starts``, ``sizes`` ``[m * H, C]``).
    Statistics in float32 (float64 for float64 caches), stored in the pool's dtype.
    """
    h, bs, d = layout.num_kv_heads, layout.block_size, layout.head_dim
    m, nbs = seg_blocks.shape
    n = nbs * bs
    c = starts.shape[1]
    dev = kv_cache.device
    cdt = torch.promote_types(kv_cache.dtype, torch.float32)
    ent = torch.arange(n, device=dev)
    kv = kv_cache[seg_blocks.long()[:, ent // bs], :, ent % bs]                # [m, n, H, 2D]
    kv = kv.permute(0, 2, 1, 3).reshape(m * h, n, 2 * d).to(cdt)
    starts = starts.long().reshape(m * h, c)
    sizes = sizes.long().reshape(m * h, c)
    cid = torch.searchsorted(starts.contiguous(), ent.expand(m * h, n).contiguous(),
                             right=True) - 1                                   # [mH, n]
    cid = cid.clamp_min(0)
    ix = cid.unsqueeze(-1).expand(m * h, n, d)
    cnt = sizes.clamp_min(1).unsqueeze(-1).to(cdt)

    def per_cluster(x):
        out = torch.zeros(m * h, c, d, dtype=cdt, device=dev)
        return out.scatter_add_(1, ix, x)

    dk = kv[..., :d]
    dk = dk - torch.gather(per_cluster(dk) / cnt, 1, ix)
    dv = kv[..., d:]
    dv = dv - torch.gather(per_cluster(dv) / cnt, 1, ix)
    del kv

    def x_times(w):      # X w, w [mH, C, D]
        return per_cluster(dk * (dv * torch.gather(w, 1, ix)).sum(-1, keepdim=True)) / cnt

    def xt_times(u):     # X^T u
        return per_cluster(dv * (dk * torch.gather(u, 1, ix)).sum(-1, keepdim=True)) / cnt

    first = starts.clamp(0, n - 1).unsqueeze(-1).expand(m * h, c, d)
    u = torch.nn.functional.normalize(torch.gather(dk, 1, first), dim=-1)
    w = torch.nn.functional.normalize(xt_times(u), dim=-1)
    for _ in range(iters):
        u = torch.nn.functional.normalize(x_times(w), dim=-1)
        w = torch.nn.functional.normalize(xt_times(u), dim=-1)
    su = x_times(w)
    keep = (sizes >= 2).to(cdt).unsqueeze(-1)
    su, w = su * keep, w * keep
    cblk = seg_pages.long().to(pool.device)[:, :c]                                 # [m, C]
    pair = torch.stack([su, w], dim=2).view(m, h, c, 2, d).permute(0, 2, 1, 3, 4)  # [m, C, H, 2, D]
    pool.fpart[cblk, :, F_SIGMA_U:F_W + 1] = pair.to(pool.fpart.dtype)
