"""Launch-parameter sweep of retro's Triton decode kernels on a GPU.

For each (context, batch), the decode step of :mod:`decode_kernel_bench` (same
cache, index and default budget) is timed as a CUDA graph for a list of variants:
one kernel's launch parameters overridden (tile sizes, warps, pipeline stages),
the programs per (row, KV head), or the score stage run by the extension's CUDA kernel
("score cuda": needs ``vllm_retro._C`` built with CUDA, ``scripts/gpu/run.sh
BUILD_EXT=1``; its per-kernel times are recorded beside the default's). Every
variant's output is checked against the default variant's (same selection, fp32
accumulation: relative error below 1e-2; variants of the other rank reference than
the first's, loosely) before it is timed, and the per-kernel
device times, split and each kernel's resources (registers, shared memory,
programs per SM) of every variant are recorded. Each step is timed twice: replayed
back to back (``graph_us``: what one layer's data left in L2 by the last replay is
worth) and after overwriting a buffer of 4x the L2 before each replay
(``graph_us_cold_l2``: as in the engine, where the other layers ran in between; a
variant that shrinks the working set gains less there). The winners are what ``TUNE`` /
``TUNE_SMALL_BATCH`` in ``vllm_retro/kernels/triton_decode.py`` should say.

    python benchmarks/decode_kernel_sweep.py --cases 131072x1,131072x8 --out sweep.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decode_kernel_bench import (BS, D, DT, H, HQ, graph_of, make_batch,  # noqa: E402
                                 per_kernel_us, time_ms)
from vllm_retro.config import RetroConfig  # noqa: E402
from vllm_retro.index.paged import (HDR_BAND_AT, HDR_IBT_ROW, IndexPool,  # noqa: E402
                                    quantize_mean_values, quantize_summaries)
from vllm_retro.kernels import DecodeWorkspace, paged_decode_attention  # noqa: E402
from vllm_retro.kernels import triton_decode as td  # noqa: E402

# (name, kernel, overrides), (name, "pps", (programs per SM, max_split)),
# (name, "pps+<kernel>", (programs per SM, overrides)), (name, "asplit", the
# attention kernel's own max split), (name, "pdl"[+asplit], ...) (programmatic
# dependent launch of kernels 2-5), (name, "score_impl", triton_decode.SCORE_IMPL:
# "cuda" is the extension's CUDA score kernel, an error where it is not built),
# (name, "groups", (row groups, programs per SM of each, stagger in us): :func:`grouped_step`),
# (name, "multi" / "all", {kernel: overrides}: TUNE only / both tuning tables) or
# (name, "carry"[+<kind>] / "step"[+<kind>], ...): any of these with rank_reference
# "carried" / "step" (the others rank as the configuration says, where they can: the
# carried form needs the mass rank, bucket selection and no band re-ranking).
VARIANTS = [
    ("default", None, {}),
    # The selection modes (triton_decode.SELECT): "bucket" (the default: whole
    # histogram bins at the thresholds, no candidate kernel) and "exact" (the exact
    # top counts: a candidate kernel searches the threshold bins). The sets differ
    # among near-tied clusters, so the outputs too.
    ("select bucket", "select", "bucket"),
    ("select exact", "select", "exact"),
    # The error rank (retrieval_rank "error"): the exact set chosen inside the band by
    # expected estimation error; one launch more (the band kernel), the score kernel
    # stores each entry's variance terms, the key kernel an error key. Other sets,
    # so other outputs.
    ("rank error", "rank", "error"),
    ("programs/SM 2", "pps", (2, 0)),
    ("programs/SM 3", "pps", (3, 0)),
    ("programs/SM 6", "pps", (6, 0)),
    ("programs/SM 8", "pps", (8, 0)),
    ("programs/SM 16", "pps", (16, 0)),
    ("programs/SM 4, split 64", "pps", (4, 64)),
    ("programs/SM 8, attend TR16 RG32", "pps+attend", (8, dict(TR=16, RG=32))),
    ("programs/SM 8, score CH32", "pps+score", (8, dict(CH=32))),
    ("programs/SM 4, split 16", "pps", (4, 16)),
    # The selection kernels' grids at one or two rows aimed at the small-batch score
    # kernel's 2 programs per SM (one wave; triton_decode.SMALL_BATCH_SELECT_PROGRAMS_PER_SM
    # is 4, as at larger batches: the key and list kernels share the split).
    ("small-batch selection at 2 per SM", "sel_pps", 2),
    # ... the score kernel alone at 2 per SM (its own split; keys and lists keep 4;
    # the default) and on the shared split (4 per SM).
    ("small-batch score at 2 per SM", "score_pps", 2),
    ("small-batch score at 4 per SM", "score_pps", 4),
    ("PDL", "pdl", None),
    # PDL is on above two rows by default (triton_decode.PDL): the variant without.
    ("no PDL", "no_pdl", None),
    ("PDL, attend split 64", "pdl+asplit", 64),
    ("attend split 64", "asplit", 64),
    ("attend split 128", "asplit", 128),
    ("score cuda", "score_impl", "cuda"),
    # The attention stage on the extension's CUDA kernel (csrc/cuda/paged_attend.cu).
    ("attend cuda", "attend_impl", "cuda"),
    ("score CH64 w4", "score", dict(CH=64, num_warps=4)),
    # ... or the large-batch score kernel (4 warps, 128 registers: 4 per SM, 528).
    ("score CH64 w4 r128", "score", dict(CH=64, num_warps=4, maxnreg=128)),
    ("attend TS64", "attend", dict(TS=64)),
    # At one row a program gets ~32 steady tokens and ~60 estimated clusters at 128K
    # (32 programs per row-head): the small-batch 64-wide tiles run half empty
    # (Nsight Compute, twenty-fourth session: ~1,250 + ~900 of 4,133 instructions per warp).
    ("attend TS32 TE32", "attend", dict(TS=32, TE=32)),
    ("attend TS64 TE64", "attend", dict(TS=64, TE=64)),
    ("attend w8", "attend", dict(num_warps=8)),
    ("cand CB1024", "cand", dict(CB=1024)),
    # The last program's threshold search on fewer lanes when both buckets are small
    # (at 32K a bucket holds ~10-50 keys; the search's 5 rounds reduce [CB, 16] tiles).
    ("cand CBS64", "cand", dict(CBS=64)),
    ("cand CBS128", "cand", dict(CBS=128)),
    ("cand CBS0", "cand", dict(CBS=0)),
    # The small-batch steady tiles before the fourteenth session.
    ("attend TS128", "attend", dict(TS=128)),
    ("cand CB1024 w16", "cand", dict(CB=1024, num_warps=16)),
    # Nsight Compute at 128K x 8: 8 warps x 128 registers fit 2 candidate programs
    # per SM (512 programs in 1.94 waves); 4 warps should fit 4 (one wave).
    ("cand w4", "cand", dict(num_warps=4)),
    ("cand w4 RB128", "cand", dict(num_warps=4, RB=128)),
    # Score and attend are latency-bound gathers at 4 programs x 4 warps per SM:
    # more bytes in flight per program.
    ("score st3", "score", dict(num_stages=3)),
    ("score CH128 w8", "score", dict(CH=128, num_warps=8)),
    ("attend st3", "attend", dict(num_stages=3)),
    ("attend TR64", "attend", dict(TR=64)),
    ("key CHE512", "key", dict(CHE=512)),
    ("key w8", "key", dict(num_warps=8)),
    # Smaller attention tiles need fewer registers (more programs per SM), which the
    # wave path (--wave) is short of.
    ("attend TR16", "attend", dict(TR=16)),
    ("attend TR16 RG16", "attend", dict(TR=16, RG=16)),
    # summary_bits 8: the score stage reads int8 centroids / variances (a copy of
    # the pool, quantized; its output differs from the default's by the
    # quantization, so it is compared with a looser bound).
    ("summaries 8-bit", "q8", None),
    # ... and 16-bit ones (the default before the thirteenth session).
    ("summaries 16-bit", "b16", None),
    # ... with the score kernel held to 128 registers (4 programs per SM at 4 warps
    # instead of 3; the sm_90 compile spills 8 bytes).
    ("summaries 8-bit, score maxnreg 128", "q8+score", dict(maxnreg=128)),
    ("summaries 8-bit, score CH32", "q8+score", dict(CH=32)),
    # 8-bit summaries and mean values (mean_value_bits 8): the attention stage reads
    # D + 4 bytes per estimated cluster and head instead of 2D.
    ("mean values 8-bit", "mv8", None),
    # The isotropic variance term (IndexPool.variance_form "isotropic"): the score
    # stage reads each entry's centroid and mean key variance, not its variance vector
    # (D + 12 instead of 2D + 8 bytes per entry and head; docs/accuracy.md, "Fewer
    # bytes per cluster for the score stage").
    ("variance isotropic", "iso", None),
    # Band re-ranking (rank_interval 4, 8-bit summaries): a full ranking's step (the
    # default's kernels plus the band's writes) and a re-ranking step (the score,
    # key and list kernels over the last band's ~25% of the entries; its band
    # written by a full step at the context one token shorter, same query), and the
    # latter with the isotropic variance term.
    ("band full step", "band", "full"),
    ("band re-rank step", "band", "rerank"),
    ("band re-rank step isotropic", "band", "rerank_iso"),
    # value_correction's cost: the attention kernel's VC variant reading sigma u
    # (zeros here, so the output is the default's) and w for every estimated cluster.
    ("value correction", "vc", None),
    # The score kernel without the 128-register cap of TUNE (the default since the
    # fourteenth session: a compiler change had made it 138 registers, 3 per SM).
    ("score maxnreg none", "score", dict(maxnreg=None)),
    # The score kernel's plain form: the element-wise work of a tile on the 16 rows of
    # the tensor-core products, not the G query-head rows (the fold, XR, is the
    # default since the twenty-second session: 634 -> 498 SASS instructions per tile
    # at sm_90; Nsight Compute at 128K x 6 had shown ~48 warp instructions per entry
    # at 0.44 issued per scheduler and cycle).
    ("score plain", "score", dict(XR=False)),
    # The score kernel's partial log-sum-exp per element of the tile, reduced once
    # after the loop (EL: no per-tile reductions across the warps, five barriers per
    # tile fewer at sm_90), and ln size by the hardware's approximate log2 (FLOG: a
    # ~20-instruction polynomial per entry fewer); both (the default since the
    # forty-first session): 502 -> 403 SASS instructions per 64-entry tile (sm_90,
    # Triton 3.6), 61.2 -> 59.6 us at 128K x 6 (H100). The variants without them:
    ("score EL off", "score", dict(EL=False)),
    ("score FLOG off", "score", dict(FLOG=False)),
    ("score EL FLOG off", "score", dict(EL=False, FLOG=False)),
    # The score kernel's parts (not scores: DIAG bits leave out 1 the small per-entry
    # gathers, 4 the logits' stores): where a tile's time goes.
    ("score diag no small", "score", dict(DIAG=1)),
    ("score diag no stores", "score", dict(DIAG=4)),
    ("score diag neither", "score", dict(DIAG=5)),
    # The score kernel on the selection kernels' contiguous ranges (CONTIG).
    ("score CONTIG", "score", dict(CONTIG=True)),
    # RetroConfig.rank_reference "carried" (design §7, "Dropping the key kernel"): the
    # keys relative to the previous step's largest log-mass, written and binned by the
    # score kernel (contiguous ranges, one relaxed atomic per entry); the key kernel
    # only sums the ranges' histograms and stores the next reference. After one step
    # that sets the references (another selection: compared loosely).
    ("rank carried", "carry", {}),
    ("rank step", "step", {}),
    ("rank carried SV1", "carry+score", dict(SV1=True)),
    ("rank carried SV1 PFS", "carry+score", dict(SV1=True, PFS=True)),
    # The candidates together ("all": each kernel's overrides in both tuning tables).
    ("score SV1 attend ECONTIG", "all", dict(score=dict(SV1=True), attend=dict(ECONTIG=True))),
    ("rank carried SV1 attend ECONTIG", "carry+all",
     dict(score=dict(SV1=True), attend=dict(ECONTIG=True))),
    # The small gathers (size, 8-bit scales) one tile ahead: their round trip was
    # exposed once per tile (without them, "score diag no small", the kernel took 24%
    # less at 128K x 6 on an H100).
    ("score PFS", "score", dict(PFS=True)),
    ("score PFS CONTIG", "score", dict(PFS=True, CONTIG=True)),
    # ... from one 32-byte sector per entry (the size beside the 8-bit scales in slot
    # 1, not in the int part: one sector per entry fewer).
    ("score SV1", "score", dict(SV1=True)),
    ("score SV0", "score", dict(SV1=False)),
    ("score SV1 PFS", "score", dict(SV1=True, PFS=True)),
    ("score SV1 CONTIG", "score", dict(SV1=True, CONTIG=True)),
    # The attention kernel's softmax on the G4 query-head rows (XR) and on the
    # products' 16 rows (plain), whichever is the default.
    ("attend XR", "attend", dict(XR=True)),
    ("attend plain", "attend", dict(XR=False)),
    # The retrieved and estimated zones' first index loads issued before the steady
    # zone's tiles, and each retrieved group's successor during its tiles.
    ("attend PRE", "attend", dict(PRE=True)),
    # Each program's estimated clusters a contiguous range of the list, not every
    # NS-th entry (a tile's list reads share sectors and index-table entries).
    ("attend ECONTIG", "attend", dict(ECONTIG=True)),
    # The steady zone in a loop of its own and each retrieved token's position
    # checked in every tile (the form before SMG, the default since the thirty-fourth
    # session; SMG with RG 16 / TR 64 measured then: no better).
    ("attend SMG off", "attend", dict(SMG=False)),
    # Larger groups of retrieved clusters: each group starts with a chain of three
    # dependent loads (index table, list, block table) before its first K/V load.
    # One or two rows (TUNE_SMALL_BATCH): without the 168-register cap Triton 3.6
    # gives the kernel 232 registers (2 programs per SM instead of 3) and more loads
    # in flight per program.
    ("attend maxnreg none", "attend", dict(maxnreg=None)),
    # ... and held to 128 (4 programs per SM instead of 3: the small-batch variant
    # takes 143 registers at sm_90 since the softmax on the query-head rows).
    ("attend maxnreg 128", "attend", dict(maxnreg=128)),
    # Above two rows both long kernels hold 4 programs of 4 warps per SM (<= 128
    # registers): held to 96, 5 fit (score 8 bytes of stack at sm_90, attention 80),
    # and with the grids aimed at 5 per SM more gathers are in flight.
    ("score maxnreg 96", "score", dict(maxnreg=96)),
    ("attend maxnreg 96", "attend", dict(maxnreg=96)),
    ("programs/SM 5", "pps", (5, 0)),
    ("programs/SM 5, score maxnreg 96", "pps+score", (5, dict(maxnreg=96))),
    ("programs/SM 5, attend maxnreg 96", "pps+attend", (5, dict(maxnreg=96))),
    ("programs/SM 5, maxnreg 96", "pps+multi", (5, dict(score=dict(maxnreg=96),
                                                         attend=dict(maxnreg=96)))),
    # The attention kernel's products on 16-bit caches: the logits' one product (QB,
    # the default: the query holds bf16 values, so the two-product form's low part is
    # zero) against two; the values' one product (PB: probabilities rounded to bf16,
    # as FlashAttention's) against two.
    ("attend QB off", "attend", dict(QB=False)),
    ("attend PB", "attend", dict(PB=True)),
    ("attend RG16", "attend", dict(RG=16)),
    ("attend RG32", "attend", dict(RG=32)),
    # The attention kernel's parts (not attention: the loops of the other zones left
    # out; ZONES bits 1 steady, 2 retrieved, 4 estimated): what each zone and the
    # fixed part (prologue, partials, merge) cost.
    ("attend zones none", "attend", dict(ZONES=0)),
    ("attend zones steady", "attend", dict(ZONES=1)),
    ("attend zones retrieved", "attend", dict(ZONES=2)),
    ("attend zones estimated", "attend", dict(ZONES=4)),
    ("attend zones steady+retrieved", "attend", dict(ZONES=3)),
    # The wave variant of the attention kernel at batches above SMALL_BATCH
    # (triton_decode.TUNE_WAVE; with --wave): its own retrieved tile.
    ("wave attend TR32", "wave_attend", dict(TR=32)),
    ("wave attend PRE", "wave_attend", dict(PRE=True)),
    ("wave attend TR32 st3", "wave_attend", dict(TR=32, num_stages=3)),
    # TR 32 is the plain kernel's tile (78 us at 128K x 8 against 95 with TR 16); the
    # wave variant needs 144 registers for it (3 programs per SM): held to 128 (4).
    ("wave attend TR32 maxnreg 128", "wave_attend", dict(TR=32, maxnreg=128)),
    # The selection kernels take 4 tiles per range at 128K x 8 (1,024 entries per
    # program), each a chain of dependent loads (and, for the candidates, atomics
    # with return): one tile per range. Key tiles are [G4, CHE] since the twelfth
    # session (were [16, CHE]: "key CHE512" was slower then).
    ("key CHE1024", "key", dict(CHE=1024)),
    ("cand RB1024", "cand", dict(RB=1024)),
    ("collect RB1024", "collect", dict(RB=1024)),
    ("selection tiles 1024", "multi", dict(key=dict(CHE=1024), cand=dict(RB=1024),
                                           collect=dict(RB=1024))),
    # The programs per row-head as a function of the padded batch (before the
    # thirteenth session) instead of the rows with context (triton_decode.DYNAMIC_SPLIT);
    # they differ on padded cases ("131072x16:10").
    ("static split", "static", None),
    # 10 rows in a 16-row graph (131072x16:10): the dynamic split gives 6 programs per
    # row-head, so a range holds ~1,365 entries: two 1,024-entry tiles per selection
    # kernel (candidates 1.01 -> 1.31 ms per step from 8 to 10 rows). One tile each:
    # With --wave: the page lookups in the list kernel (triton_decode.RESOLVE_IN_COLLECT,
    # the default) or in their own kernel, one launch more per layer.
    ("resolve in collect", "in_collect", None),
    ("resolve kernel", "resolve_kernel", None),
    ("selection tiles 2048", "multi", dict(key=dict(CHE=2048), cand=dict(RB=2048),
                                           collect=dict(RB=2048))),
    # The KV cache in vLLM's HND layout (physical [NB][H][bs][2D]: a KV head's tokens
    # of a block contiguous, 8 KB, so a cluster's 16 tokens are one run of 512 B rows
    # instead of 16 rows at a 4 KB stride, NHD's [NB][bs][H][2D]); the same logical
    # view and contents, so the output is the default's.
    ("KV HND", "kv_layout", "HND"),
    ("selection tiles 2048 w8", "multi", dict(key=dict(CHE=2048, num_warps=8),
                                              cand=dict(RB=2048),
                                              collect=dict(RB=2048, num_warps=8))),
    # The batch's rows in groups, each group's launch sequence on a stream of its own
    # (forked and joined inside the graph), each grid aimed at pps programs per SM:
    # (groups, pps, stagger in us). A layer's time is ~42 us fixed (the kernels'
    # chains of dependent loads, in lockstep across the rows) plus ~17 per row at 6-8
    # rows (H100): groups out of phase could run one group's chains while another
    # group's tiles stream. stagger: group i starts i x that many us later (a spin
    # kernel on its stream), so their stages do not line up. Measured on an H100:
    # in phase equal to the default, out of phase 13-24% slower (a program's rate is
    # its own gathers in flight; docs/perf-notes.md, thirty-ninth session).
    ("row groups 2, 2/SM", "groups", (2, 2, 0.0)),
    ("row groups 2, 2/SM, stagger 6us", "groups", (2, 2, 6.0)),
    ("row groups 2, 2/SM, stagger 15us", "groups", (2, 2, 15.0)),
    ("row groups 2, 4/SM", "groups", (2, 4, 0.0)),
    ("row groups 2, 4/SM, stagger 10us", "groups", (2, 4, 10.0)),
    ("row groups 3, 1/SM", "groups", (3, 1, 0.0)),
]


def q8_copy(pool: IndexPool, mean_values: bool = False) -> IndexPool:
    """A copy of ``pool`` with 8-bit summaries (every page quantized); with
    ``mean_values`` the mean values in 8 bits too (``mean_value_bits`` 8)."""
    out = IndexPool(pool.layout, pool.num_pages, pool.device, summary_bits=8,
                    mean_value_bits=8 if mean_values else 16)
    out.fpart.copy_(pool.fpart)
    out.ipart.copy_(pool.ipart)
    pages = torch.arange(pool.num_pages, device=pool.device)
    quantize_summaries(out, pages)
    if mean_values:
        quantize_mean_values(out, pages)
    return out


def vc_copy(pool: IndexPool) -> IndexPool:
    """A copy of ``pool`` in the value correction's layout (5 float rows): ``sigma
    u`` zero (every correction 0: the default's output), ``w`` random."""
    lay = dataclasses.replace(pool.layout, float_slots=5)
    out = IndexPool(lay, pool.num_pages, pool.device, summary_bits=pool.summary_bits,
                    mean_value_bits=pool.mean_value_bits)
    out.fpart[:, :, :3].copy_(pool.fpart)
    out.fpart[:, :, 4].normal_()
    out.ipart.copy_(pool.ipart)
    return out


def row_groups(batch: int, n: int) -> list:
    """``n`` contiguous row ranges ``(lo, hi)`` covering ``batch`` rows, as even as
    possible (the first ones one row longer)."""
    if not 1 <= n <= batch:
        raise ValueError(f"{n} row groups for a batch of {batch}")
    q, r = divmod(batch, n)
    bounds, lo = [], 0
    for i in range(n):
        hi = lo + q + (1 if i < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def grouped_step(groups, stagger_us, q, kv, lay, bt, sl, hdr, ix, pool, S, scale, out, ws,
                 pps, rank):
    """The step as one launch sequence per row group, each on its own stream with a
    workspace of its own (the partials and histograms are indexed by the row-head
    within a call) and grids aimed at ``pps`` programs per SM; forked from and joined
    to the current stream (so a CUDA graph captures them as parallel branches).
    Group ``i`` waits ``i * stagger_us`` first (a spin kernel). With ``count`` the
    returned step sets ``ws.stats`` to the sum of the groups' counters."""
    streams = [torch.cuda.Stream() for _ in groups]
    wss = [DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, max(hi - lo, 8), "cuda",
                           programs_per_sm=pps, error_rank=rank == "error")
           for lo, hi in groups]
    # (clock_rate: kHz)
    cycles = int(stagger_us * 1e-3 * torch.cuda.get_device_properties(0).clock_rate)

    def step(count=False):
        cur = torch.cuda.current_stream()
        for i, ((lo, hi), s, w) in enumerate(zip(groups, streams, wss)):
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                if count:
                    w.stats.zero_()
                if stagger_us and i:
                    torch.cuda._sleep(cycles * i)
                paged_decode_attention(q[lo:hi], kv, lay, bt[lo:hi], sl[lo:hi], hdr, ix.ibt,
                                       pool, S, scale, out=out[lo:hi], workspace=w,
                                       count_stats=count, wave=ix.wave, retrieval_rank=rank)
        for s in streams:
            cur.wait_stream(s)
        if count:
            ws.stats.copy_(torch.stack([w.stats for w in wss]).sum(0))
    return step


def carried_copy(pool: IndexPool, ix) -> IndexPool:
    """``pool`` with its own carried rank references (none set: the first step
    ranks as "step" and sets them)."""
    out = copy.copy(pool)
    out.rank_ref = torch.zeros(ix.ibt.shape[0], H, device="cuda")
    return out


def run_case(ctx: int, batch: int, cfg: RetroConfig, key_scale: float = 1.0,
             variants=None, shuffle_pages: bool = True, wave: str = "",
             real: int = 0) -> dict:
    """One (context, batch) case; ``real`` < batch: only the first ``real`` rows have
    context, the others are padding (seq_len 0), as vLLM pads a decode batch to its
    CUDA-graph size."""
    scale = 1 / math.sqrt(D)
    # The batch is built with 16-bit summaries; the variants read them or an 8-bit
    # copy, the default variant what the configuration's ``summary_bits`` says.
    lay, kv, bt, sl, hdr, S, ix = make_batch(ctx, batch, dataclasses.replace(cfg, summary_bits=16),
                                             key_scale=key_scale,
                                             shuffle_pages=shuffle_pages, wave=wave)
    real = real or batch
    sl[real:] = 0
    pool16 = ix.pool
    pool8 = q8_copy(pool16)
    pool_default = pool8 if cfg.summary_bits == 8 else pool16
    pool8v = q8_copy(pool16, mean_values=True) if variants is None or \
        "mean values 8-bit" in variants else None
    pool8i = None
    if variants is None or "variance isotropic" in variants:
        pool8i = q8_copy(pool16)
        pool8i.variance_form = "isotropic"
    pool_band = pool_band_iso = None
    if variants is None or any(v.startswith("band") for v in variants):
        pool_band, pool_band_iso = q8_copy(pool16), q8_copy(pool16)
        pool_band.rank_interval = pool_band_iso.rank_interval = 4
        pool_band_iso.variance_form = "isotropic"
    pool_vc = vc_copy(pool_default) if variants is None or \
        "value correction" in variants else None
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    # The configuration's rank reference (RetroConfig.rank_reference): the variants
    # that can rank carried do, after one step that sets the references.
    base_carry = td.carries_rank_reference(cfg)
    base_pool = carried_copy(pool_default, ix) if base_carry else pool_default
    ref = None
    ref_carry = base_carry
    if wave:
        # The view's pages hold the paged cache's K/V: every variant must give the
        # output of the run without it.
        ws0 = DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, max(batch, 8), "cuda")
        ref = torch.empty(batch, HQ, D, device="cuda", dtype=torch.float32)
        for _ in range(2 if base_carry else 1):
            paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, base_pool, S, scale,
                                   out=ref, workspace=ws0)
        del ws0
    base_tune = copy.deepcopy(td.TUNE)
    base_small = copy.deepcopy(td.TUNE_SMALL_BATCH)
    base_impl = td.SCORE_IMPL
    base_attend_impl = td.ATTEND_IMPL
    base_wave = copy.deepcopy(td.TUNE_WAVE)
    base_dyn = td.DYNAMIC_SPLIT
    base_in_collect = td.RESOLVE_IN_COLLECT
    base_select = td.SELECT
    base_sel_pps = td.SMALL_BATCH_SELECT_PROGRAMS_PER_SM
    base_score_pps = td.SMALL_BATCH_SCORE_PROGRAMS_PER_SM
    base_pdl = td.PDL
    td.RECORD_RESOURCES = True
    # Overwritten before each cold-L2 timing: 4x the L2 (50 MB on an H100, 60 on an H200).
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    l2_flush = torch.empty(4 * l2, dtype=torch.uint8, device="cuda")
    res = []
    for name, kernel, over in VARIANTS:
        if variants is not None and name not in variants:
            continue
        td.TUNE = copy.deepcopy(base_tune)
        td.TUNE_SMALL_BATCH = copy.deepcopy(base_small)
        td.TUNE_WAVE = copy.deepcopy(base_wave)
        td.SCORE_IMPL = base_impl
        td.ATTEND_IMPL = base_attend_impl
        td.SELECT = base_select
        td.SMALL_BATCH_SELECT_PROGRAMS_PER_SM = base_sel_pps
        td.SMALL_BATCH_SCORE_PROGRAMS_PER_SM = base_score_pps
        td.LAST_KERNELS.clear()   # (else the programs/SM line shows earlier variants' stages)
        max_split = pps = attend_split = 0
        rank = "mass"
        td.PDL = True if kernel and kernel.startswith("pdl") else \
            False if kernel == "no_pdl" else base_pdl
        td.DYNAMIC_SPLIT = kernel != "static"
        td.RESOLVE_IN_COLLECT = ((base_in_collect or kernel == "in_collect")
                                 and kernel != "resolve_kernel")
        if kernel in ("static", "in_collect", "resolve_kernel"):
            kernel = None
        kv_use = kv
        if kernel == "kv_layout":
            # The same contents in a cache of that layout (same logical view).
            kv_use, kernel = lay.make_cache(kv.shape[0], kv.device, over), None
            kv_use.copy_(kv)
        pool = pool_default
        if kernel and kernel.startswith(("q8", "b16", "mv8", "vc", "iso")):
            pool = {"q8": pool8, "b16": pool16, "mv8": pool8v,
                    "vc": pool_vc, "iso": pool8i}[kernel.split("+")[0]]
            kernel = kernel.split("+", 1)[1] if "+" in kernel else None
        # Other summaries than the default's: the output differs by their quantization.
        err_limit = 1e-2 if pool in (pool_default, pool_vc) else 0.1
        if pool is pool8i:   # another variance term: another ranking and estimate
            err_limit = 0.3
        # The attention kernel's parts are not attention: timed, not compared.
        diagnostic = ((kernel == "attend" and over.get("ZONES", 7) != 7)
                      or (kernel == "score" and over.get("DIAG", 0) != 0))
        if diagnostic:
            err_limit = float("inf")
        if kernel == "select":
            td.SELECT, kernel, err_limit = over, None, 0.2
        if kernel == "rank":
            rank, kernel, err_limit = over, None, 0.2
        band = None
        if kernel == "band":
            band, kernel = over, None
            pool = pool_band_iso if band == "rerank_iso" else pool_band
            td.SELECT = "bucket"
            # (re-ranking normalizes over the band: on the flat random data other
            # near-ties win; full steps select as the default)
            err_limit = 0.05 if band == "full" else 0.3
            hdr[:, HDR_BAND_AT] = 0
        form = kernel.split("+", 1)[0] if kernel else None
        carry = form == "carry" or (base_carry and form != "step" and rank == "mass"
                                    and band is None and td.SELECT == "bucket")
        if form in ("carry", "step"):
            kernel = kernel.split("+", 1)[1] if "+" in kernel else None
        if carry:
            pool = carried_copy(pool, ix)
        if kernel and kernel.startswith("pps+"):
            pps, over = over
            kernel = kernel[4:]
        if kernel == "wave_attend":
            td.TUNE_WAVE["attend"].update(over)
            kernel = None
        elif kernel == "multi":
            for k, o in over.items():
                td.TUNE[k].update(o)
            kernel = None
        elif kernel == "all":
            for k, o in over.items():
                td.TUNE[k].update(o)
                td.TUNE_SMALL_BATCH.get(k, {}).update(o)
            kernel = None
        elif kernel in ("pdl", "no_pdl"):
            kernel = None
        elif kernel == "pdl+asplit":
            attend_split, kernel = over, None
        elif kernel == "score_impl":
            td.SCORE_IMPL, kernel = over, None
        elif kernel == "attend_impl":
            td.ATTEND_IMPL, kernel = over, None
        elif kernel == "asplit":
            attend_split, kernel = over, None
        elif kernel == "pps":
            pps, max_split = over
        elif kernel == "sel_pps":
            td.SMALL_BATCH_SELECT_PROGRAMS_PER_SM, kernel = over, None
        elif kernel == "score_pps":
            td.SMALL_BATCH_SCORE_PROGRAMS_PER_SM, kernel = over, None
        groups = None
        if kernel == "groups":
            (ngroups, pps, stagger_us), kernel = over, None
            groups = row_groups(batch, ngroups)
        if kernel and kernel != "pps":
            td.TUNE[kernel].update(over)
            td.TUNE_SMALL_BATCH.get(kernel, {}).update(over)
        ws = DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, max(batch, 8), "cuda",
                             max_split=max_split, programs_per_sm=pps,
                             attend_max_split=attend_split, error_rank=rank == "error")
        out = torch.empty(batch, HQ, D, device="cuda", dtype=torch.float32)

        def step(count=False):
            paged_decode_attention(q, kv_use, lay, bt, sl, hdr, ix.ibt, pool, S, scale,
                                   out=out, workspace=ws, count_stats=count, wave=ix.wave,
                                   retrieval_rank=rank)
        if groups is not None:
            step = grouped_step(groups, stagger_us, q, kv_use, lay, bt, sl, hdr, ix, pool, S,
                                scale, out, ws, pps, rank)
        try:
            if td.SCORE_IMPL == "cuda" and not td.cuda_score_available():
                raise RuntimeError("torch.ops.vllm_retro.paged_score has no CUDA kernel "
                                   "(build the extension: scripts/gpu/run.sh BUILD_EXT=1)")
            if td.ATTEND_IMPL == "cuda" and not td.cuda_attend_available():
                raise RuntimeError("torch.ops.vllm_retro.paged_attend has no CUDA kernel "
                                   "(build the extension: scripts/gpu/run.sh BUILD_EXT=1)")
            if band in ("rerank", "rerank_iso"):
                # The band of the step before (context one token shorter, same query).
                paged_decode_attention(q, kv_use, lay, bt, torch.where(sl > 0, sl - 1, 0), hdr,
                                       ix.ibt, pool, S, scale, out=out, workspace=ws,
                                       wave=ix.wave)
            if carry:
                # The step that sets the references (each row-head ranks as "step").
                step()
                irows = hdr[bt[:real, 0].long(), HDR_IBT_ROW].long()
                assert pool.rank_ref[irows].ne(0).all(), "no reference written"
            ws.stats.zero_()
            c0 = ix.cache.counters.tolist() if wave else None
            step(True)
            torch.cuda.synchronize()
            st = ws.stats.tolist()
            assert st[0] == real, f"retro kernels did not serve every row: {st}"
            if carry:
                n_car = int(ws.rank_mode[:real * H].sum())
                assert n_car == real * H, f"{n_car} of {real * H} row-heads ranked carried"
            if band is not None:
                want = real if band.startswith("rerank") else 0
                assert st[5] == want, f"band {band}: {st[5]} rows re-ranked, not {want}"
            if wave:
                c1 = ix.cache.counters.tolist()
                hits, misses = c1[0] - c0[0], c1[1] - c0[1]
                assert (hits > 0 and misses == 0) if wave == "hit" else \
                    (misses > 0 and hits == 0), f"wave {wave}: {hits} hits, {misses} misses"
            if ref is None:
                ref, ref_carry = out.clone(), carry
            if carry != ref_carry:
                # (another bin window: on the flat random data the threshold bin cuts
                # other near-ties, as band re-ranking's does)
                err_limit = max(err_limit, 0.3)
            err = ((out - ref).norm() / ref.norm()).item()
            if err > err_limit:
                raise AssertionError(f"output differs from the default variant: {err:.2e}")
            gr = graph_of(step)
            t = time_ms(gr.replay) * 1e3
            t_cold = time_ms(gr.replay, flush=l2_flush) * 1e3
            rec = dict(variant=name, graph_us=round(t, 2), graph_us_cold_l2=round(t_cold, 2),
                       rel_err_vs_default=err, **({"diagnostic": True} if diagnostic else {}),
                       exact_fraction=st[2] / max(1, st[4]),
                       estimated_fraction=st[3] / max(1, st[4]),
                       split=ws.nsplit(batch), score_split=ws.nsplit_score(batch),
                       attend_split=ws.nsplit_attend(batch),
                       per_kernel_us={k[:40]: v for k, v in per_kernel_us(step).items()},
                       resources=td.kernel_resources(
                           torch.cuda.get_device_properties(0).multi_processor_count))
        except Exception as exc:  # a failing variant is a finding, not a crash
            rec = dict(variant=name, error=f"{type(exc).__name__}: {exc}"[:300])
        res.append(rec)
        print(f"  {ctx}x{batch} {name:24s} {rec.get('graph_us', rec.get('error'))} "
              f"(cold L2 {rec.get('graph_us_cold_l2')}) "
              f"split {rec.get('split')}/{rec.get('attend_split')} per kernel "
              f"{json.dumps(rec.get('per_kernel_us', {}))} programs/SM "
              f"{ {k: v['programs_per_sm'] for k, v in rec.get('resources', {}).items()} }",
              flush=True)
        del ws, kv_use
    td.TUNE, td.TUNE_SMALL_BATCH, td.SCORE_IMPL = base_tune, base_small, base_impl
    td.ATTEND_IMPL = base_attend_impl
    td.SELECT = base_select
    td.TUNE_WAVE = base_wave
    td.PDL = base_pdl
    td.SMALL_BATCH_SELECT_PROGRAMS_PER_SM = base_sel_pps
    td.SMALL_BATCH_SCORE_PROGRAMS_PER_SM = base_score_pps
    td.DYNAMIC_SPLIT = base_dyn
    td.RESOLVE_IN_COLLECT = base_in_collect
    ws = DecodeWorkspace(ix.pool.num_pages, H, HQ // H, D, max(batch, 8), "cuda")
    out = torch.empty(batch, HQ, D, device="cuda", dtype=DT)
    def default_step():
        paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, base_pool, S, scale,
                               out=out, workspace=ws, wave=ix.wave)
    default_step()   # (sets the carried references)
    prof = per_kernel_us(default_step)
    ok = [r for r in res if "graph_us" in r]
    full = [r for r in ok if not r.get("diagnostic")]
    best = min(full, key=lambda r: r["graph_us"]) if full else None
    # The best programs per SM alone (what RETRO_DECODE_PROGRAMS_PER_SM can set).
    pps = {"default": td.PROGRAMS_PER_SM}
    pps.update({name: over[0] for name, kind, over in VARIANTS
                if kind == "pps" and over[1] == 0})
    only = [r for r in ok if r["variant"] in pps]
    best_pps = pps[min(only, key=lambda r: r["graph_us"])["variant"]] if only else None
    print(f"BEST_PPS {best_pps} at {ctx}x{batch}; default per kernel (us): "
          + json.dumps({k[:40]: v for k, v in prof.items()}), flush=True)
    out = dict(context=ctx, batch=batch, rows_with_context=real, variants=res, best=best,
               best_programs_per_sm=best_pps, default_per_kernel_us=prof, wave=wave or None)
    if wave:
        c = ix.cache.counters.tolist()
        out["wave_counters"] = dict(hits=c[0], misses=c[1], admitted=c[2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="131072x1,131072x8")
    ap.add_argument("--key-scale", type=float, default=1.0,
                    help="multiply the keys (1e-4: the flat scores of dummy weights)")
    ap.add_argument("--variants", default="",
                    help="';'-separated variant names to run, spaces written as '_' "
                         "(e.g. 'default;programs/SM_16'; default: all)")
    ap.add_argument("--pages", default="shuffled", choices=("shuffled", "sequential", "both"),
                    help="index-pool page order: scattered (after churn), in order, or "
                         "each case in both orders")
    ap.add_argument("--wave", default="", choices=("", "hit", "miss"),
                    help="retrieved clusters read through a wave buffer view: every page "
                         "in the cluster cache (hit: the engine's steady state) or none "
                         "(miss: from pinned host memory)")
    ap.add_argument("--retro-options", default="{}",
                    help="RetroConfig options (JSON) of every case, e.g. "
                         "'{\"estimation_fraction\": 0.15}' (default: the library's)")
    ap.add_argument("--out", default="benchmarks/results/decode_kernel_sweep_h200.json")
    a = ap.parse_args()
    options = json.loads(a.retro_options)
    cfg = RetroConfig.from_dict(options)
    names = {n.replace(" ", "_"): n for n, _, _ in VARIANTS}
    variants = None
    if a.variants:
        # Names as listed (spaces) or as typed in a shell (underscores).
        want = {v.strip().replace(" ", "_") for v in a.variants.split(";")}
        if want - set(names):
            raise SystemExit(f"unknown variants {sorted(want - set(names))}; known: "
                             f"{sorted(names)}")
        variants = {names[v] for v in want}
    orders = {"shuffled": [True], "sequential": [False], "both": [True, False]}[a.pages]
    cases = []
    for c in a.cases.split(","):
        # CTXxB, or CTXxB:R (R rows with context, padded to B)
        c, _, real = c.partition(":")
        ctx, b = map(int, c.split("x"))
        for shuffled in orders:
            rec = run_case(ctx, b, cfg, a.key_scale, variants, shuffled, a.wave,
                           int(real or 0))
            rec["pool_pages"] = "shuffled" if shuffled else "sequential"
            cases.append(rec)
            torch.cuda.empty_cache()
    res = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
               versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
               command=" ".join(sys.argv), block_size=BS, key_scale=a.key_scale,
               retro_options=options, cases=cases)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
