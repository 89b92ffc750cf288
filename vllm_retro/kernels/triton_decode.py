"""Triton decode attention over the paged wave index (the GPU twin of
:func:`vllm_retro.kernels.reference.paged_decode_attention`).

Role: one decode step of one layer for a batch of ragged rows, inside a CUDA graph.
Every launch has a grid that depends only on the batch size ``B`` and the model's
shape (``H`` KV heads, ``G`` query heads per KV head, head size ``D``), never on
context lengths or header contents, and the call allocates nothing: the graph is
captured once and replayed for any contexts. Rows are independent; each reads its
own header (``headers[block_table[r, 0]]``), its index-table row (``ix = ibt[hdr[
HDR_IBT_ROW]]``: cluster entry ``i``'s summaries, size and start at pool page
``ix[i]`` of the layer's :class:`~vllm_retro.index.paged.IndexPool`) and context
length. K/V are read through vLLM's block table (positions).

Launch sequence (``NS`` programs per (row, KV head); a row's ``C`` cluster
entries are cut into ``NS`` contiguous ranges where a kernel works by range). The
grids are ``(B*H, NSG)`` with ``NSG = workspace.nsplit(B // 2 + 1, B)``; each program
derives ``NS = workspace.nsplit(R)`` (capped by ``NSG``) on the device from ``R``,
the rows up to the last one with context (:func:`_program`): a batch that vLLM
padded to its CUDA-graph size with empty rows keeps the whole GPU busy, and the
programs beyond ``NS`` (or of the padding rows) return at once:

1. ``_score_kernel``: the log-mass of every cluster entry for the
   ``G`` query heads (``[G, chunk]`` tiles, centroid and key variance read once),
   stored page-addressed in ``workspace.logits``, and each program's partial
   max / sum-exp per query head. Zeroes the row-head's histogram. (With
   ``SCORE_IMPL = "cuda"`` its CUDA twin ``torch.ops.vllm_retro.paged_score``,
   ``csrc/cuda/paged_score.cu``, runs instead where the extension has it.)
2. ``_key_kernel``: the per-query-head log-sum-exp from the partials;
   each entry's ranking score ``sum_g exp(logit - lse_g)`` stored as its float bit
   pattern (an int32 key that sorts like the score, scores being >= 0); a histogram
   of a fine log-scale digit of the keys (atomically summed per row-head).
   With the error rank (``retrieval_rank="error"``, bucket selection only) the
   score kernel also stores each entry's uncapped variance terms, the key kernel
   an error key per entry (``sum_g p_g t_g``, :func:`~.reference.error_proxy`),
   and ``_band_kernel`` runs next: the band (the top ``n_retrieve + n_estimate``
   by score) and the histogram of its error keys, from which the list kernel
   retrieves the band's ``n_retrieve`` largest errors (five launches per layer).
3. ``_cand_kernel``: exact selection, part 1. From the histogram every
   program knows the buckets of the two thresholds (the ``n_retrieve``-th and the
   ``(n_retrieve + n_estimate)``-th largest key); it appends its range's keys in
   those buckets, with their entry index, to two candidate lists (atomically
   reserved positions: their order does not matter) and counts its keys above the
   buckets. The last program of the row-head to finish (atomic ticket) finds both
   threshold keys by a 4-bits-at-a-time counting search over the candidates, and
   how many keys equal to each are taken (ties go to the lower entry index, as the
   twin's stable descending argsort).
   With :data:`SELECT` "bucket" this kernel is not launched: keys in a
   threshold's histogram bin count as equal (ties to the lower entry), the key
   kernel also stores each range's histogram, and the list kernel takes its
   offsets from the lower ranges' histograms (four launches per layer).
4. ``_collect_kernel``: each range derives its offsets in the
   selection lists from the lower ranges' counts and candidates, then writes its
   retrieved clusters (first token position, size) and estimated clusters
   (pool page) to the lists, in entry order; statistics.
5. ``_attend_kernel`` (``NSA`` programs per row-head, from
   ``workspace.nsplit_attend`` as above: its own split, it only merges partials):
   program ``p`` attends the work items congruent to ``p`` mod ``NSA`` of three
   kinds (steady-zone tokens; tokens of the retrieved clusters: token position
   (the cluster's start + offset; the index build made each cluster contiguous
   per KV head) -> the row's block table -> K/V slot;
   estimated clusters as pseudo-tokens with their log-mass over their mean
   value), one online softmax in fp32 for all ``G`` query heads of the KV head; the
   last program of the row-head to finish merges the ``NSA`` partials into ``out``
   (in ``out``'s dtype; zeros for rows without context). With a wave buffer view
   (``wave=``, the ``WAVE`` variant), retrieved tokens below the row's mirrored
   horizon are read from the GPU cluster cache or the pinned host arena instead of
   the block table (vLLM may have released those blocks): a kernel before the
   attention kernel (``_resolve_kernel``) looks each visited page up, updates the
   cache's stamps, counters and miss buffer (:mod:`.wave_view`) and writes the
   page's source to the workspace, which the attention kernel reads per token
   (with :data:`RESOLVE_IN_COLLECT` the list kernel does it instead, for the
   clusters it has just listed).

Band re-ranking (``IndexPool.rank_interval`` > 1, :func:`~.reference.band_reranks`):
a row whose last full ranking (header ``HDR_BAND_AT``) lies 1 to ``rank_interval -
1`` tokens back ranks only that ranking's band: stages 1, 2 and 4 take its entries'
pool pages from the band table (:meth:`IndexPool.band_table`) instead of the index
table, the key and list kernels on a split scaled to the band; a full ranking's list
kernel writes the band and the header word. With a shared phase
(``IndexPool.band_phase``, advanced once per engine step) every row ranks in full on
the phase's 0 steps, so a batch's rows rank on the same steps: a kernel's time is its
slowest program's, and one row ranking in full makes the whole step a full one.

"Last program" hand-offs: each program writes its part, passes a CTA barrier and
takes a ticket with an acq_rel atomic at GPU scope; the program drawing the last
ticket reads the others' parts (L1-bypassing loads) and resets the ticket. No
program ever waits for another, so any grid size is safe.

Scratch whose size depends on the context lives at the row's own pool pages
(``[num_pages, ...]`` buffers, addressed through the index table like the index),
so it is bounded by the index pool and never by ``max_rows * max_model_len``: the
logits of cluster entry ``i`` at ``logits[ix[i], h, :]``; the key of entry ``i``
and list entry ``k`` packed 16 to a page at ``keys[ix[i // 16], h, i % 16]`` and
``lists[ix[k // 16], h, 2 (k % 16) + {0, 1}]`` (candidate list entries likewise
in ``cands``). Pool pages belong to one request until it leaves, so rows never
share scratch, even when vLLM reuses a block id.

Precision: fp32 accumulation everywhere. With 16-bit caches on the GPU the matrix
products run on 16-bit tensor cores with the fp32 operand (query, squared query,
probabilities) split into a high and a low 16-bit part (about 16 significant bits,
as exact as the bf16 data); fp32 caches (and the interpreter) use fp32 products.
"""

from __future__ import annotations

import inspect
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..attention import VARIANCE_CORRECTION_CAP
from ..index.paged import (HDR_BAND_AT, HDR_CLUSTERED_END, HDR_HORIZON, HDR_IBT_ROW,
                           HDR_N_ESTIMATE, HDR_N_RETRIEVE, I_SIZE, I_START, SIZE_WORD,
                           IndexPool, PagedIndexLayout)
from . import extension, reference
from .wave_view import W_HITS, W_MISSES, WaveBufferView

# Globals read inside kernels must be constexpr objects.
_NEG_INF = tl.constexpr(float("-inf"))
# The query's low int8 part counts steps of 1/254 of one high step (|residual| <= 1/2).
_Q8_LO = tl.constexpr(254)
_LN2 = tl.constexpr(0.6931471805599453)
_SIZE_WORD = tl.constexpr(SIZE_WORD)
_INT_MAX = tl.constexpr(2147483647)
_HDR_CE = tl.constexpr(HDR_CLUSTERED_END)
_HDR_NR = tl.constexpr(HDR_N_RETRIEVE)
_HDR_NE = tl.constexpr(HDR_N_ESTIMATE)
_HDR_IBT = tl.constexpr(HDR_IBT_ROW)
_HDR_HZ = tl.constexpr(HDR_HORIZON)
_HDR_BA = tl.constexpr(HDR_BAND_AT)
_W_HITS = tl.constexpr(W_HITS)
_W_MISSES = tl.constexpr(W_MISSES)
_I_SIZE = tl.constexpr(I_SIZE)
_I_START = tl.constexpr(I_START)

PACK = 16              # selection keys / list entries per block-table lookup
LIST_WORDS = 2 * PACK  # int32 words per (block, head) in DecodeWorkspace.lists
CAND_WORDS = 4 * PACK  # ... in DecodeWorkspace.cands (two lists of (key, entry) pairs)
CAND_WORDS_C = tl.constexpr(CAND_WORDS)
# The histogram digit resolves 1/32 of a binade over 16 binades around the mean score
# (edges clamp): the twin's constants (reference.score_digits).
SUB_BITS, WINDOW_BINADES, NBINS = (reference.SUB_BITS, reference.WINDOW_BINADES,
                                   reference.NBINS)

# Launch meta-parameters (tile sizes in entries / tokens, warps, pipeline stages),
# measured on an H200 (Llama-3-8B shape, bf16 cache): TUNE for batches of more than
# SMALL_BATCH rows, updated by TUNE_SMALL_BATCH for smaller ones (few programs: larger
# tiles pay; many programs: occupancy pays). A benchmark may override them.
TUNE = {
    # maxnreg: 4 programs per SM need <= 128 registers; a compiler change that
    # crosses it loses a quarter of the resident programs (a second wave at 128K x 8).
    # XR: the products' 16 rows folded to the query heads' 4 before the element-wise
    # work: 634 -> 498 SASS instructions per 64-entry tile and no spill at 8-bit
    # summaries, 128 registers (sm_90, Triton 3.6; bit-equal outputs).
    # SV1: the size and 8-bit scales from one 32-byte sector per entry: the carried
    # form (rank_reference) 134.9 against 137.3 us per layer at 128K x 6, 86.9
    # against 88.6 at x 3; the step form 142.9 against 143.3 at x 6 (H100,
    # forty-third session; bit-equal outputs).
    "score": dict(CH=64, num_warps=4, num_stages=2, maxnreg=128, XR=True, EL=True, FLOG=True,
                  SV1=True),
    # Selection tiles of 1,024 entries: one tile per program's range at 128K x 8
    # (keys 19 -> 16, candidates 30 -> 22, lists 17 -> 14 us per layer); at one or
    # two rows the ranges are shorter and 256 stays (TUNE_SMALL_BATCH).
    "key": dict(CHE=1024, num_warps=4),
    # CB: threshold buckets up to CB keys are searched in registers, larger in chunks;
    # CBS > 0: buckets up to CBS keys on CBS lanes. CBS=128: 54.0 against 59.2 us per
    # layer at 32K x 1, within +-1 us at 128K x 1 / 8 / 16 (fifteenth session's sweep).
    "cand": dict(RB=1024, CB=512, CBS=128, num_warps=8),
    "collect": dict(RB=1024, CB=1024, num_warps=4),
    # The error rank's band kernel: the key kernel's tiles (not yet tuned on a GPU).
    "band": dict(CHE=1024, num_warps=4),
    # RG: retrieved clusters per group (each group starts with a chain of three
    # dependent loads): 32 took 60.2 / 74.0 us at 128K x 6 / 8 against 63.9 / 79.8
    # with 8 (twenty-first session); at one row 8 stays (TUNE_SMALL_BATCH).
    # XR: the softmax on the query heads' G4 rows (as the score kernel's): 0.3-1.4 us
    # less per layer at 32K / 128K x 1 / 6 / 8 on an H100 (twenty-fifth session).
    # SMG: the steady zone in the retrieved stream, clusters clamped once each: the
    # attention kernel 25.0 -> 22.4 us at 128K x 1, 61.8 -> 60.4 at x 6, 75.1 -> 73.9
    # at x 8, 14.0 -> 12.9 at 32K x 1 (H100, thirty-fourth session).
    "attend": dict(TS=32, RG=32, TR=32, TE=32, num_warps=4, num_stages=2, maxnreg=128,
                   XR=True, SMG=True),
    # The wave buffer's page lookups (walks the retrieved clusters like the attention
    # kernel, in tiles of its own: every visited page's source is written whatever
    # the tiling; 32-token tiles: 21.5 us per layer at 128K x 8, 33 with 16).
    "resolve": dict(RG=8, TR=32, num_warps=4),
}
SMALL_BATCH = 2
# Programs per SM the grids aim at (``DecodeWorkspace.nsplit``): the kernels are
# latency-bound (chains of dependent gathers), so more resident programs pay; 4 beat
# 2, 8 and 16 at 128K x 6 on an H200 (decode_kernel_sweep_h200.json). The environment
# variable RETRO_DECODE_PROGRAMS_PER_SM overrides it for tuning runs.
PROGRAMS_PER_SM = int(os.environ.get("RETRO_DECODE_PROGRAMS_PER_SM", "4"))
# ... for the selection kernels (score, keys, lists: one split) at SMALL_BATCH rows or
# fewer. Their score kernel (8 warps, ~127 registers on sm_90) holds 2 programs per
# SM, so at two rows its 32 programs per row-head (512 > 264 resident) run in two
# waves (14 -> 29 us from one row to two at 128K). Aimed at 2 (16 programs per
# row-head at two rows) the score kernel fits one wave, but the key and list kernels,
# which share its split, lose what it gains at 128K: 84.1 against 79.7 us per layer
# at 128K x 2, while 32K x 2 gains (37.3 against 44.8; H100, twenty-sixth session).
# So 4 (the split as at larger batches).
SMALL_BATCH_SELECT_PROGRAMS_PER_SM = 4
# ... for the score kernel alone at SMALL_BATCH rows or fewer (at most the above): 2
# gives it its own split, one wave at two rows, while the key and list kernels keep
# theirs (its program 0 fills the partial slots between the two splits with neutral
# values for the key kernel's log-sum-exp): 76.9 against 82.6 us per layer at 128K x
# 2, 39.0 against 45.1 at 32K x 2, one row unchanged (the split is the same there;
# H100, twenty-seventh session).
SMALL_BATCH_SCORE_PROGRAMS_PER_SM = 2
# The most programs per (row, KV head): it binds at batches of one or two rows only
# (RETRO_DECODE_MAX_SPLIT overrides it for tuning runs).
MAX_SPLIT = int(os.environ.get("RETRO_DECODE_MAX_SPLIT", "32"))
# The attention kernel's own cap (it only merges partials, so it may split finer
# than the selection kernels, whose range bookkeeping grows with the split);
# 0: the same as MAX_SPLIT. RETRO_DECODE_ATTEND_MAX_SPLIT overrides it.
ATTEND_MAX_SPLIT = int(os.environ.get("RETRO_DECODE_ATTEND_MAX_SPLIT", "0"))
# Programmatic dependent launch (Hopper): kernels 2-5 are launched as dependents of
# the one before, start their independent prologue (row, header, block table)
# while it finishes, and wait (griddepcontrol.wait) before reading its outputs;
# every kernel lets its dependents launch early. None (the default): on above
# SMALL_BATCH rows, where it took 1.9-9.2 us off a layer (128K x 3 / 4 / 6 / 8, 32K
# x 4 / 8; 330 -> 334 tok/s end to end at 128K x 3) and off at one or two rows, where
# it added ~5 us (H100, twenty-fifth session); only on GPUs that have it (compute
# capability 9.0 and later). RETRO_DECODE_PDL=1 / 0 (or the attribute True / False)
# forces it on / off. Never in the interpreter.
PDL = {"1": True, "0": False}.get(os.environ.get("RETRO_DECODE_PDL", ""))
# With a wave buffer, the list kernel also resolves the pages its range's retrieved
# clusters visit (what _resolve_kernel does, on the list entries it has just
# written: one launch, prologue and list read fewer per layer): 216 against 235 us
# per layer at 128K x 8 (every page cached), 694 against 650 tok/s end to end at
# 128K x 10 (fifteenth session). RETRO_DECODE_RESOLVE_IN_COLLECT=0 (or the
# attribute) turns it off.
RESOLVE_IN_COLLECT = os.environ.get("RETRO_DECODE_RESOLVE_IN_COLLECT", "1") == "1"
# The programs per row-head follow the rows with context (a batch padded to its
# CUDA-graph size spreads over the whole grid): :func:`_program`. Off: a function
# of the padded batch. RETRO_DECODE_DYNAMIC_SPLIT=0 (or the attribute) turns it off.
DYNAMIC_SPLIT = os.environ.get("RETRO_DECODE_DYNAMIC_SPLIT", "1") == "1"
TUNE_SMALL_BATCH = {
    "score": dict(CH=128, num_warps=8, num_stages=2, maxnreg=None, XR=True, EL=True,
                  FLOG=True),
    "key": dict(CHE=256),
    "band": dict(CHE=256),
    "cand": dict(RB=256),
    "collect": dict(RB=256),
    # Held to 128 registers: 4 programs per SM instead of 3 (no spill on bf16 / fp16
    # caches, sm_90, Triton 3.6): 80 against 92 us per layer at 128K x 2, 44 against
    # 55 at 32K x 2, unchanged at one row; 231 against 219 tok/s end to end at 128K
    # x 2 (H100, twenty-sixth session). Uncapped, Triton 3.6 gives it 143. The wave
    # variant likewise: 87.0 against 99.5 us at 128K x 2 (every page cached).
    "attend": dict(TS=32, TE=32, RG=8, maxnreg=128),
}
# ... for float32 caches on a GPU (any batch): the score kernel's fold spills there
# (984 bytes at 128 registers, sm_90), so it keeps the plain form (the interpreter
# keeps the fold: registers do not exist there, and its tests compare the two forms).
TUNE_FP32 = {"score": dict(XR=False)}
# ... at one or two rows, for the attention variants the register cap would make
# spill (sm_90, Triton 3.6): the value correction's (two more vectors per estimated
# cluster: 160 registers uncapped) and float32 caches' (166-189 uncapped, already
# 1,312 bytes of spill at 168): uncapped.
TUNE_SMALL_BATCH_UNCAPPED = {"attend": dict(maxnreg=None)}
# The attention kernel's wave-buffer variant at batches above SMALL_BATCH: its extra
# source word per token costs registers (144 at 32-token retrieved tiles: 3 programs
# per SM); held to 128 (4 per SM, no spill) the 32-token tiles take 87.5 us per layer
# at 128K x 8 (every page cached) against 105 for 16-token tiles.
TUNE_WAVE = {"attend": dict(TR=32, RG=8, maxnreg=128)}
# Selection (stages 3-4): "bucket" (default): keys in the histogram bin of a
# threshold (scores within 1/32 of a binade of each other) count as equal, ties to
# the lower entry: the exact selection's counts, no exact search, no candidate kernel
# (the list kernel reads the key kernel's per-range histograms), four launches per
# layer; 10-19% faster per layer on the H200 (docs/benchmarks.md), as accurate on
# real attention (docs/accuracy.md). "exact": the n_retrieve / n_retrieve + n_estimate
# largest keys, ties to the lower entry, as the twin's stable argsort (five launches).
# RETRO_DECODE_SELECT sets it at import; a benchmark may set the attribute.
SELECT = reference.selection_from_env()
# Implementation of stage 1 (issue 13: the hot path in vllm_retro._C where it measures
# faster): "triton" (default) or "cuda", the extension's torch.ops.vllm_retro.paged_score
# (csrc/cuda/paged_score.cu; same outputs), used where the extension was built with CUDA
# (else Triton). RETRO_DECODE_SCORE_IMPL sets it at import; a benchmark may set the
# attribute.
SCORE_IMPL = os.environ.get("RETRO_DECODE_SCORE_IMPL", "triton")
# ... of stage 5, the attention: "triton" (default) or "cuda", the extension's
# torch.ops.vllm_retro.paged_attend (csrc/cuda/paged_attend.cu: fp32 products on CUDA
# cores, no tiles; same partials and output), where the extension has it and the call is
# one it was built for (16-bit cache and query of one dtype, head dim 64 / 128, up to 4
# query heads per KV head, no wave buffer, 16-bit mean values, no value correction; else
# Triton). RETRO_DECODE_ATTEND_IMPL sets it at import; a benchmark may set the attribute.
ATTEND_IMPL = os.environ.get("RETRO_DECODE_ATTEND_IMPL", "triton")
# Diagnostics for tuning runs: with RECORD_RESOURCES set, each launch keeps its
# compiled kernel in LAST_KERNELS (by stage) so a benchmark can read registers,
# spills and shared memory, i.e. how many programs fit on an SM
# (:func:`kernel_resources`).
RECORD_RESOURCES = False
LAST_KERNELS: dict = {}


def cuda_score_available() -> bool:
    """Whether ``torch.ops.vllm_retro.paged_score`` has a CUDA kernel (the extension
    ``vllm_retro._C`` imports and was built with CUDA)."""
    return extension.has_cuda_kernel("paged_score")


def cuda_attend_available() -> bool:
    """Whether ``torch.ops.vllm_retro.paged_attend`` has a CUDA kernel."""
    return extension.has_cuda_kernel("paged_attend")


def _vector_rows(t: torch.Tensor) -> bool:
    """Rows the CUDA kernels read in 16-byte vectors: unit innermost stride, the other
    strides and the base 16-byte aligned."""
    vec = 16 // t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st % vec == 0 for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n > 1))


def _cuda_attend_fits(query, kv_cache, fpart, block_table, seq_lens, out, g, bs,
                      wave, mv8, vc) -> bool:
    """Whether this call can run on the CUDA attention kernel (:data:`ATTEND_IMPL`)."""
    i32 = torch.int32
    return (ATTEND_IMPL == "cuda" and query.is_cuda and not interpreting() and wave is None
            and not mv8 and not vc and bs == 16 and g <= 4 and query.shape[2] in (64, 128)
            and kv_cache.dtype in (torch.bfloat16, torch.float16)
            and query.dtype == kv_cache.dtype == fpart.dtype
            and block_table.dtype == i32 and seq_lens.dtype == i32
            and block_table.stride(1) == 1 and seq_lens.stride(0) == 1
            and out.stride(2) == 1
            and _vector_rows(query) and _vector_rows(kv_cache) and _vector_rows(fpart)
            and cuda_attend_available())


def _tune(kernel: str, num_rows: int, wave: bool = False, vc: bool = False,
          fp32: bool = False) -> dict:
    """A kernel's launch meta-parameters: TUNE, then the tables of the batch class,
    the wave buffer, the value correction (``vc``) and float32 caches (``fp32``;
    TUNE_FP32 compiled for a GPU only) that apply."""
    cfg = dict(TUNE[kernel])
    if num_rows <= SMALL_BATCH:
        cfg.update(TUNE_SMALL_BATCH.get(kernel, {}))
        if vc or fp32:
            cfg.update(TUNE_SMALL_BATCH_UNCAPPED.get(kernel, {}))
    elif wave:
        cfg.update(TUNE_WAVE.get(kernel, {}))
    if fp32 and not interpreting():
        cfg.update(TUNE_FP32.get(kernel, {}))
    if interpreting():
        cfg.pop("FLOG", None)   # inline PTX: the interpreter keeps the exact logarithm
    return cfg


def carries_rank_reference(config) -> bool:
    """Whether the kernels rank by the carried reference under ``config`` (a
    ``RetroConfig``): as its ``carries_rank_reference`` says, "auto" only with the
    bucket selection (:data:`SELECT`; "carried" without it is refused at launch)."""
    return config.carries_rank_reference and (config.rank_reference == "carried"
                                              or SELECT == "bucket")


def pdl_for(num_rows: int, device: torch.device) -> bool:
    """Whether a step of ``num_rows`` decode rows on ``device`` launches with PDL
    (see ``PDL``)."""
    if interpreting():
        return False
    if PDL is not None:
        return bool(PDL)
    return num_rows > SMALL_BATCH and _has_pdl(device)


_PDL_DEVICES: dict = {}


def _has_pdl(device: torch.device) -> bool:
    """Whether ``device`` supports programmatic dependent launch (sm_90 and later)."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL_DEVICES:
        _PDL_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_DEVICES[idx]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def interpreting() -> bool:
    """Whether this module's kernels run in Triton's CPU interpreter: they do when
    ``TRITON_INTERPRET=1`` was set as the module was imported (asked of a helper:
    tests wrap the ``*_kernel`` objects to record their launches)."""
    return type(_program).__name__ == "InterpretedFunction"


class ErrorScratch(NamedTuple):
    """The error rank's scratch in a :class:`DecodeWorkspace` (see its doc)."""
    tvar: torch.Tensor          # [num_pages, H, G] fp32
    keys2: torch.Tensor         # [num_pages, H, 16] int32
    hist2: torch.Tensor         # [max_rows*H, NBINS] int32
    emax: torch.Tensor          # [max_rows*H] int32
    range_hist2: torch.Tensor   # [selection programs, NBINS] int32


class DecodeWorkspace:
    """Persistent scratch of :func:`paged_decode_attention_triton`, allocated once.

    The tensors never change address (CUDA graphs captured once read them); one
    workspace serves every layer (each call rewrites what it reads). Addressed by
    index-pool page (bounded by the pool, see the module doc):

    * ``logits`` ``[num_pages, H, G]`` fp32: cluster log-masses;
    * ``keys`` ``[num_pages, H, 16]`` int32: selection keys, 16 entries per page;
    * ``cands`` ``[num_pages, H, 64]`` int32: the two threshold candidate lists,
      (key, entry index) pairs, words 0-31 and 32-63;
    * ``lists`` ``[num_pages, H, 32]`` int32: the selection lists (retrieved:
      first token position, size; estimated: pool page, size).

    Per (row, KV head), sized by ``max_rows``: ``hist`` ``[max_rows*H, NBINS]``,
    ``ncand`` ``[max_rows*H, 2]`` (candidates per list), ``counts`` ``[max_rows*H,
    2]`` (retrieved, estimated), ``sel`` ``[max_rows*H, 4]`` (threshold keys and ties
    taken), ``ranges`` ``[max_rows*H, NSP, 2]`` (per range: keys above each bucket),
    ``tickets`` ``[2, max_rows*H]`` (zero between calls), ``rank_mode``
    ``[max_rows*H]`` (1: the score kernel wrote the keys, the carried rank
    reference), the score partials
    ``score_max`` / ``score_sum`` ``[max_rows*H, NSP, GP]`` and the attention partials
    ``part_o`` / ``part_m`` / ``part_l`` (``B * nsplit(B) * H * G`` rows of ``D`` / 1
    values, sized for the worst ``B <= max_rows``).

    ``stats`` int64 ``[7]``: rows with an index, rows without one, tokens read
    exactly, tokens estimated, context tokens (token counts summed over KV heads),
    rows that re-ranked their last band (``rank_interval``), rows ranked by the
    carried reference (``rank_reference``; KV head 0's); counted per layer call.
    Calls with ``count_stats`` add to it; the owner reads and zeroes it.

    The error rank (``retrieval_rank`` "error", :meth:`error_buffers`, allocated at
    construction with ``error_rank`` or on the first call that needs them):
    ``tvar`` ``[num_pages, H, G]`` fp32 (each entry's uncapped variance term),
    ``keys2`` ``[num_pages, H, 16]`` int32 (error keys), per row-head ``hist2``
    ``[max_rows*H, NBINS]`` and ``emax`` ``[max_rows*H]``, and per selection program
    the band's error histogram as counts in bins >= b (as :meth:`range_hist`).
    """

    def __init__(self, num_pages: int, num_kv_heads: int, group_size: int,
                 head_dim: int, max_rows: int, device, *, max_split: int = 0,
                 num_sms: int = 0, programs_per_sm: int = 0, attend_max_split: int = 0,
                 error_rank: bool = False):
        dev = torch.device(device)
        self.device = dev
        self.num_pages = int(num_pages)
        self.num_kv_heads = h = int(num_kv_heads)
        self.group_size = g = int(group_size)
        self.head_dim = d = int(head_dim)
        self.max_rows = int(max_rows)
        self.gp = max(16, _next_pow2(g))   # tl.dot needs >= 16 rows
        if not num_sms:
            num_sms = (torch.cuda.get_device_properties(dev).multi_processor_count
                       if dev.type == "cuda" else 132)
        if not max_split:
            # The interpreter runs programs one by one: keep the grids small there.
            max_split = 4 if interpreting() else MAX_SPLIT
        self.max_split = int(max_split)
        self.ns_pow2 = _next_pow2(self.max_split)
        if not attend_max_split:
            attend_max_split = (ATTEND_MAX_SPLIT or self.max_split) if not interpreting() \
                else self.max_split
        self.attend_max_split = int(attend_max_split)
        self.attend_ns_pow2 = _next_pow2(self.attend_max_split)
        # Several programs per SM hide the latency of the dependent gathers.
        self.target_programs = (programs_per_sm or PROGRAMS_PER_SM) * int(num_sms)
        self.small_select_programs = min(
            self.target_programs, SMALL_BATCH_SELECT_PROGRAMS_PER_SM * int(num_sms))
        self.small_score_programs = min(
            self.small_select_programs, SMALL_BATCH_SCORE_PROGRAMS_PER_SM * int(num_sms))
        cap = max(b * max(self.nsplit(b), self.nsplit_attend(b))
                  for b in range(1, self.max_rows + 1))
        rows = self.max_rows * h
        f32, i32 = torch.float32, torch.int32
        nb, nsp = self.num_pages, self.ns_pow2
        self.logits = torch.zeros(nb, h, g, dtype=f32, device=dev)
        self.keys = torch.zeros(nb, h, PACK, dtype=i32, device=dev)
        self.lists = torch.zeros(nb, h, LIST_WORDS, dtype=i32, device=dev)
        self.cands = torch.zeros(nb, h, CAND_WORDS, dtype=i32, device=dev)
        self.hist = torch.zeros(rows, NBINS, dtype=i32, device=dev)
        self.ncand = torch.zeros(rows, 2, dtype=i32, device=dev)
        self.counts = torch.zeros(rows, 2, dtype=i32, device=dev)
        self.sel = torch.zeros(rows, 4, dtype=i32, device=dev)
        self.ranges = torch.zeros(rows, nsp, 2, dtype=i32, device=dev)
        self.tickets = torch.zeros(2, rows, dtype=i32, device=dev)
        self.score_max = torch.zeros(rows, nsp, self.gp, dtype=f32, device=dev)
        self.score_sum = torch.zeros(rows, nsp, self.gp, dtype=f32, device=dev)
        self.part_o = torch.zeros(cap * h * g * d, dtype=f32, device=dev)
        self.part_m = torch.zeros(cap * h * g, dtype=f32, device=dev)
        self.part_l = torch.zeros(cap * h * g, dtype=f32, device=dev)
        self.stats = torch.zeros(7, dtype=torch.int64, device=dev)
        self.rank_mode = torch.zeros(rows, dtype=i32, device=dev)
        self.wave_src: Optional[torch.Tensor] = None
        self._range_hist: Optional[torch.Tensor] = None
        self._error: Optional[ErrorScratch] = None
        if SELECT == "bucket":
            self.range_hist(0)     # before any capture
        if error_rank:
            self.error_buffers(0)

    def _not_capturing(self, what: str, call: str) -> None:
        """Scratch allocated lazily must not be allocated under CUDA-graph capture
        (the graph would keep a pool address the next capture reuses)."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"DecodeWorkspace: {what} must be allocated before "
                               f"CUDA-graph capture (run one eager decode call{call} first)")

    def range_hist(self, programs: int) -> torch.Tensor:
        """``[programs, NBINS]`` int32: each selection program's histogram of its
        range (the bucket selection, :data:`SELECT`), indexed by its grid position
        ``(row*H + head) * grid_y + p``; allocated on the first call for the
        largest grid of ``max_rows`` (~1-2K programs, 2-4 MiB), outside capture."""
        t = self._range_hist
        if t is None or t.shape[0] < programs:
            self._not_capturing("the bucket selection's histograms", "")
            most = self._selection_programs()
            t = self._range_hist = torch.zeros(max(most, programs), NBINS,
                                               dtype=torch.int32, device=self.device)
        return t

    def _selection_programs(self) -> int:
        """Selection programs of the largest grid of ``max_rows`` rows."""
        return max(b * self.num_kv_heads * max(self.nsplit(b // 2 + 1, b), self.nsplit(b))
                   for b in range(1, self.max_rows + 1))

    def error_buffers(self, programs: int) -> ErrorScratch:
        """The error rank's scratch (see the class doc), allocated on the first
        call, outside capture."""
        e = self._error
        if e is None or e.range_hist2.shape[0] < programs:
            self._not_capturing("the error rank's scratch", "")
            h, g, nb, dev = self.num_kv_heads, self.group_size, self.num_pages, self.device
            rows = self.max_rows * h
            e = self._error = ErrorScratch(
                torch.zeros(nb, h, g, dtype=torch.float32, device=dev),
                torch.zeros(nb, h, PACK, dtype=torch.int32, device=dev),
                torch.zeros(rows, NBINS, dtype=torch.int32, device=dev),
                torch.zeros(rows, dtype=torch.int32, device=dev),
                torch.zeros(max(self._selection_programs(), programs), NBINS,
                            dtype=torch.int32, device=dev))
        return e

    def wave_src_table(self, max_pages: int) -> torch.Tensor:
        """``[max_rows*H, max_pages]`` int64: per row-head and logical page, where
        the resolve kernel found the page (with a wave buffer); allocated on the
        first call (outside CUDA-graph capture: the engine's first forward is
        eager), grown if an index table has more pages. Only the entries of the
        pages a call's retrieved clusters visit are written and read."""
        t = self.wave_src
        if t is None or t.shape[1] < max_pages:
            self._not_capturing("the wave buffer's page table", " with the wave view")
            t = self.wave_src = torch.full((self.max_rows * self.num_kv_heads, max_pages),
                                           -1, dtype=torch.int64, device=self.device)
        return t

    @staticmethod
    def page_bytes(num_kv_heads: int, group_size: int, error_rank: bool = False) -> int:
        """Scratch bytes per index-pool page (``logits``, ``keys``, ``cands``,
        ``lists``; 3,712 B for H=8, G=4; the error rank's ``tvar`` and ``keys2`` add
        640 B), shared by the layers."""
        words = group_size + PACK + CAND_WORDS + LIST_WORDS
        if error_rank:
            words += group_size + PACK
        return 4 * num_kv_heads * words

    def select_target(self, batch: int) -> int:
        """Resident programs the selection kernels' grids aim at in a launch of
        ``batch`` rows (its tuning class: SMALL_BATCH rows or fewer, or more)."""
        return self.small_select_programs if batch <= SMALL_BATCH else self.target_programs

    def nsplit(self, num_rows: int, batch: int = 0) -> int:
        """Programs per (row, KV head) of the selection kernels for ``num_rows`` rows
        in a launch of ``batch`` (default ``num_rows``): enough to fill the GPU at
        small batches, one at large ones (a function of the batch size only, so a
        captured graph's grids hold for any contexts)."""
        return self._split(num_rows, self.max_split, self.select_target(batch or num_rows))

    def score_target(self, batch: int) -> int:
        """Resident programs the score kernel's grid aims at (at most
        :meth:`select_target`)."""
        return self.small_score_programs if batch <= SMALL_BATCH else self.target_programs

    def nsplit_score(self, num_rows: int, batch: int = 0) -> int:
        """Programs per (row, KV head) of the score kernel (at most :meth:`nsplit`)."""
        return self._split(num_rows, self.max_split, self.score_target(batch or num_rows))

    def nsplit_attend(self, num_rows: int) -> int:
        """Programs per (row, KV head) of the attention kernel (as :meth:`nsplit`,
        capped by ``attend_max_split``; its kernels hold 4 programs per SM at every
        batch)."""
        return self._split(num_rows, self.attend_max_split, self.target_programs)

    def _split(self, num_rows: int, cap: int, target: int) -> int:
        # Rounded down: a grid just over the resident programs runs a second, nearly
        # empty wave (128K x 8 on an H200: 9 programs per row-head, 576 > 528, took
        # 357 us; 5 took 316, decode_kernel_sweep_batch_h200.json).
        want = target // (max(1, num_rows) * self.num_kv_heads)
        return max(1, min(cap, want))



# ------------------------------------------------------------------ helpers
@triton.jit
def _pdl_launch(PDL: tl.constexpr):
    """Lets the next kernel (a programmatic dependent) start launching."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Waits until the kernel this one depends on has finished and its writes are
    visible; every read of an earlier kernel's output and every write comes after."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H: tl.constexpr, BP: tl.constexpr):
    """(row-head, its range p, programs per row-head NS, rows in use NR, active) of
    program (row-head, p) of a ``(NROWS*H, MSPLIT)`` grid.

    The split is a function of the rows in use, read on the device (DYN): rows up to
    the last one with context; else all NROWS. vLLM pads a decode batch to its next
    CUDA-graph size with rows of seq_len 0: a graph captured for 16 rows and replayed
    with 10 then spreads the 10 rows' work over the programs the 16 would have had
    (``TGT // (NR*H)`` per row-head, at most MSPLIT) instead of running it on 10/16
    of them. The launcher sizes MSPLIT for the smallest batch it expects to be padded
    to NROWS; a smaller one still gets every entry, on MSPLIT programs per row-head.
    Row-head and range are the program's own ids, not values derived from the
    loaded lengths: the compiler keeps them (and every address computed from them)
    in uniform registers (derived from a load they cost the attention kernel 26
    registers per thread). NROWS and MSPLIT are arguments equal to the grid's
    dimensions, not ``tl.num_programs``: with Triton 3.6 the latter raised the score
    kernel from 106 to 138 registers (3 programs per SM instead of 4: 113 us per
    layer at 128K x 8 instead of 65)."""
    r = tl.arange(0, BP)
    L = tl.load(seq_ptr + r, mask=r < NROWS, other=0)
    last = tl.max(tl.where(L > 0, r + 1, 0), 0)
    nr = tl.where(DYN != 0, tl.maximum(last, 1), NROWS)
    ns = tl.maximum(tl.minimum(MSPLIT, TGT // (nr * H)), 1)
    rh = tl.program_id(0)
    p = tl.program_id(1)
    return rh, p, ns, nr, (rh < nr * H) & (p < ns)


@triton.jit
def _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr, hdr_s0, r, SB,
              BS: tl.constexpr, EPB: tl.constexpr = 1):
    """Context length, block-table row, index-table row (cluster entry ``i``'s
    pool page at ``ix_row[i]``), first block, clustered_end (0: no index or no
    context) and number of cluster entries of row ``r``."""
    L = tl.load(seq_ptr + r).to(tl.int32)
    bt_row = bt_ptr + r.to(tl.int64) * bt_s0
    blk0 = tl.load(bt_row).to(tl.int64)
    E = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_CE)
    E = tl.where(L > 0, E, 0)
    C = tl.maximum(E // BS - SB, 0) * EPB          # EPB index entries per KV block
    irow = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_IBT)
    irow = tl.where(E > 0, irow, 0)      # (no index: every ix_row load is masked)
    ix_row = ibt_ptr + irow.to(tl.int64) * ibt_s0
    return L, bt_row, ix_row, blk0, E, C


@triton.jit
def _budget(hdr_ptr, hdr_s0, blk0, C):
    """(retrieved, estimated) clusters, clamped as the twin clamps them."""
    nr = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_NR)
    ne = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_NE)
    n_ret = tl.maximum(tl.minimum(C, nr), 0)
    n_est = tl.maximum(tl.minimum(C - n_ret, ne), 0)
    return n_ret, n_est


@triton.jit
def _band_rows(hdr_ptr, hdr_s0, blk0, L, E, C, NS, RI, ph_ptr, PHASE: tl.constexpr):
    """(re-ranks, entries ranked, programs) of a row: whether it re-ranks its last
    band (``rank_interval`` RI; PHASE: not on the steps where the shared phase
    ``ph_ptr[0]`` is 0; :func:`~.reference.band_reranks`), and then the
    band's ``n_retrieve + n_estimate`` entries on ``NS`` scaled to them (as many
    entries per program as a full ranking has: the key and list kernels' time is
    their programs' fixed work, not their entries: 11 against 15 us at 128K x 6 on
    an H100), else all ``C`` on ``NS``."""
    at = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_BA)
    n_ret, n_est = _budget(hdr_ptr, hdr_s0, blk0, C)
    back = L - at
    rr = (E > 0) & (at > 0) & (back >= 1) & (back < RI)
    if PHASE:
        rr = rr & (tl.load(ph_ptr) != 0)
    nb = n_ret + n_est
    ns_b = tl.maximum((NS * nb + C - 1) // tl.maximum(C, 1), 1)
    return rr, tl.where(rr, nb, C), tl.where(rr, tl.minimum(ns_b, NS), NS)


@triton.jit
def _entry_pages(ix_row, i, valid, rr, bd_ptr, bd_s0, bd_s1, h, BAND: tl.constexpr,
                 PK: tl.constexpr = 16, BRANCH: tl.constexpr = True):
    """Pool pages (int32) of ranked entries ``i``: ``ix_row[i]``, or on a row that
    re-ranks its band (``rr``, with BAND) the band table's: entry ``i``'s page at
    ``bd[ix_row[i // PK], h, i % PK]``. BRANCH: a branch on the row, so a full
    ranking's loads carry no dependency on the band's (the score kernel's pipeline);
    else both loads masked and a select (fewer live values across the branch)."""
    if BAND and not BRANCH:
        bm = valid & (i < tl.where(rr, _INT_MAX, 0))
        pm = valid & (i < tl.where(rr, 0, _INT_MAX))
        lb, slot = _pack_page(ix_row, i, bm, PK)
        pb = tl.load(_band_addr(bd_ptr, bd_s0, bd_s1, lb, h, slot), mask=bm, other=0)
        pg = tl.load(ix_row + i, mask=pm, other=0)
        pg = tl.where(bm, pb, pg)
    elif BAND:
        if rr:
            lb, slot = _pack_page(ix_row, i, valid, PK)
            pg = tl.load(_band_addr(bd_ptr, bd_s0, bd_s1, lb, h, slot), mask=valid, other=0)
        else:
            pg = tl.load(ix_row + i, mask=valid, other=0)
    else:
        pg = tl.load(ix_row + i, mask=valid, other=0)
    return pg


@triton.jit
def _pack_page(ix_row, pos, mask, PK: tl.constexpr):
    """(row page ``ix_row[pos // PK]``, slot ``pos % PK``) of item ``pos`` of a
    row-head list packed PK items to a page."""
    pu = pos.to(tl.uint32)              # (non-negative on the lanes that load)
    lb = tl.load(ix_row + (pu // PK).to(tl.int32), mask=mask, other=0)
    return lb, (pu % PK).to(tl.int32)


@triton.jit
def _band_addr(bd_ptr, bd_s0, bd_s1, lb, h, slot):
    """Address of band table word ``slot`` of head ``h`` at row page ``lb`` (the band
    table's packing, :meth:`IndexPool.band_table`; ``lb``, ``slot`` from :func:`_pack_page`)."""
    return bd_ptr + _wide_mad(lb, bd_s0, h * bd_s1 + slot)


@triton.jit
def _range(C, p, NS, PK: tl.constexpr):
    """Entry range [lo, hi) of program p: whole packs, contiguous, NS ranges."""
    per = (C + PK - 1) // PK
    per = (per + NS - 1) // NS * PK
    lo = p * per
    return lo, tl.minimum(C, lo + per), per


@triton.jit
def _digit(key, mean_bits, SUB: tl.constexpr, NB: tl.constexpr, WIN: tl.constexpr):
    """Histogram bin of a key: 1/2^SUB binade steps over WIN binades centred on the
    mean score's binade; monotone in the key (out-of-window keys clamp to the ends)."""
    lo = ((mean_bits >> 23) - WIN // 2) << SUB
    return tl.minimum(tl.maximum((key >> (23 - SUB)) - lo, 0), NB - 1)


@triton.jit
def _mean_bits(C, G: tl.constexpr):
    return (G / tl.maximum(C, 1).to(tl.float32)).to(tl.int32, bitcast=True)


@triton.jit
def _bound_bits(G: tl.constexpr, WIN: tl.constexpr):
    """The ``mean_bits`` that puts :func:`_digit`'s window at the carried keys'
    bound (``RetroConfig.rank_reference`` "carried", :func:`~.reference.bound_digits`):
    its top binade G's own, i.e. centred WIN/2 - 1 binades below it."""
    return tl.full([], G / (1 << (WIN // 2 - 1)), tl.float32).to(tl.int32, bitcast=True)


@triton.jit
def _bucket(hist, bins, total, k):
    """Bin holding the k-th largest key, keys above that bin, keys in it."""
    ge = total - tl.cumsum(hist, 0) + hist
    b = tl.maximum(tl.max(tl.where(ge >= k, bins, -1), 0), 0)
    above = tl.sum(tl.where(bins > b, hist, 0), 0)
    inside = tl.sum(tl.where(bins == b, hist, 0), 0)
    return b, above, inside


@triton.jit
def _packed(base_ptr, ix_row, h, pos, mask, H: tl.constexpr, W: tl.constexpr,
            PK: tl.constexpr, SLOT: tl.constexpr):
    """Address of item ``pos`` of a row-head list packed PK items (SLOT words each)
    to an index-pool page of the row (``ix_row[pos // PK]``; W words per page and
    head)."""
    lb, slot = _pack_page(ix_row, pos, mask, PK)
    return base_ptr + (lb.to(tl.uint32).to(tl.int64) * (H * W) + (h * W + slot * SLOT))


@triton.jit
def _dot(a, b, NATIVE: tl.constexpr, PREC: tl.constexpr):
    """``a [M, K]`` fp32 @ ``b [K, N]`` (the cache's dtype), fp32 result. NATIVE 1 (or
    True): two 16-bit tensor-core products with ``a`` split into high and low parts
    (about 16 significant bits of ``a``; ``b`` is exact); 2: one 16-bit product, ``a``
    rounded to ``b``'s dtype (exact where ``a`` holds values of that dtype); 0 (False):
    an fp32 product."""
    if NATIVE == 2:
        return tl.dot(a.to(b.dtype), b)
    elif NATIVE:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        return tl.dot(lo, b, acc=tl.dot(hi, b))
    else:
        return tl.dot(a, b.to(tl.float32), input_precision=PREC)


@triton.jit
def _q8_split(a):
    """``a [M, K]`` fp32 as ``s * (hi + lo / Q8_LO)`` with int8 ``hi``, ``lo`` and one
    fp32 scale ``s = max|a| / 127``: about 15 bits relative to ``max|a|``, far finer
    than the int8 summaries it multiplies (half a step of 1/127 of their max)."""
    amax = tl.max(tl.max(tl.abs(a), 1), 0)
    s = tl.where(amax > 0, amax / 127.0, 1.0)
    t = a / s
    hi = _rint(t)
    lo = _rint((t - hi) * _Q8_LO)
    return hi.to(tl.int8), lo.to(tl.int8), s


@triton.jit
def _rint(x):
    """Round half away from zero (exact on the interpreter and the GPU alike)."""
    return tl.where(x >= 0, tl.floor(x + 0.5), -tl.floor(0.5 - x))


@triton.jit
def _fold_rows(x, GP: tl.constexpr, G4: tl.constexpr, N: tl.constexpr):
    """``x [GP, N]`` -> ``[G4, N]``: row ``g`` is the sum of rows ``g, g + G4, ...``
    (exact where only the first G4 rows are non-zero: a product's padded rows)."""
    return tl.sum(tl.reshape(x, [GP // G4, G4, N]), 0)


@triton.jit
def _pad_rows(x, GP: tl.constexpr, G4: tl.constexpr, N: tl.constexpr):
    """``x [G4, N]`` -> ``[GP, N]``: ``x`` in the first G4 rows, zeros below (the
    tensor-core products' least M is 16 rows)."""
    if GP == G4:
        return x
    else:
        rep = tl.reshape(tl.broadcast_to(x[None, :, :], [GP // G4, G4, N]), [GP, N])
        return tl.where((tl.arange(0, GP) < G4)[:, None], rep, tl.zeros_like(rep))


@triton.jit
def _q8_acc(hi, lo, b):
    """``(hi + lo / Q8_LO) @ b`` times Q8_LO, exact in int32, for int8 ``hi``, ``lo``
    ``[M, K]`` and int8 ``b [K, N]`` on integer tensor cores: two exact int32
    products combined in int32 (``|hi @ b| * Q8_LO + |lo @ b| < 2^31`` for K <= 256).
    :func:`_q8_float` converts it."""
    return tl.dot(hi, b, out_dtype=tl.int32) * _Q8_LO + tl.dot(lo, b, out_dtype=tl.int32)


@triton.jit
def _q8_float(acc):
    """:func:`_q8_acc`'s product as float32 (one conversion)."""
    return acc.to(tl.float32) * (1.0 / _Q8_LO)


# The grid's split (MSPLIT, a function of the batch) is not specialized: Triton
# compiles a variant per class of an integer argument's value (1, multiples of 16,
# others), and an eager step with a row count no CUDA graph was captured for (a
# mixed prefill / decode step: 3 rows split 32 ways, a multiple of 16, where the
# 4-row graph splits 22 ways) compiled new variants in the middle of serving (~2 s
# per kernel, vLLM's JIT monitor warned of it on the H200). NROWS stays specialized:
# unspecialized it moved the registers of the one- and two-row variants (sm_90
# compile check), while with MSPLIT alone every variant compiles as before; eager
# steps of 9-15 rows (NROWS in the "other" class with BP 16, whose graph of 16 rows
# is a multiple of 16) may still compile once.
_BATCH_ARGS = ["MSPLIT"]
# NROWS keeps its "== 1" specialization (the one-row variants) but not the
# divisibility by 16: one variant for every batch size above one in a BP class.
_NO_ALIGN = (dict(do_not_specialize_on_alignment=["NROWS"])
             if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters
             else {})


# ------------------------------------------------------------------ 1. scores
@triton.jit
def _score_small(fs_ptr, fs_s0, fs_s1, fs_s2, ip_ptr, ip_s0, ip_s1, blk, valid, h,
                 Q8: tl.constexpr, ISO: tl.constexpr = False, SV1: tl.constexpr = False):
    """(centroid scale, variance scale, size) of the entries at pool pages ``blk``:
    the score stage's small per-entry gathers (the scales are 1 without ``Q8``;
    with ``ISO`` the second is the key variance's mean over channels). SV1 (with
    ``Q8``): the size too from slot 1's first 16 bytes (as float32,
    :data:`~vllm_retro.index.paged.SIZE_WORD`), so the three share one 32-byte sector
    per entry instead of two sectors of two tensors (a ``[CH, 4]`` vector load instead
    costs layout conversions through shared memory at sm_90)."""
    sb8 = fs_ptr + _wide_mad(blk, fs_s0, h * fs_s1 + fs_s2)   # (read with Q8 only)
    if Q8 and SV1:
        size = tl.load(sb8 + _SIZE_WORD, mask=valid, other=0.0)
    else:
        size = tl.load(ip_ptr + _wide_mad(blk, ip_s0, h * ip_s1 + _I_SIZE), mask=valid,
                       other=0)
    if Q8:
        sc_c = tl.load(sb8, mask=valid, other=0.0)
        sc_v = tl.load(sb8 + (2 if ISO else 1), mask=valid, other=0.0)
    else:
        sc_c = tl.full(blk.shape, 1.0, tl.float32)
        sc_v = tl.full(blk.shape, 1.0, tl.float32)
    return sc_c, sc_v, size


@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _score_kernel(q_ptr, q_sb, q_sh, q_sd, fp_ptr, fp_s0, fp_s1, fp_s2, fp_s3,
                  fq_ptr, fq_s0, fq_s1, fs_ptr, fs_s0, fs_s1, fs_s2,
                  ip_ptr, ip_s0, ip_s1, bt_ptr, bt_s0, ibt_ptr, ibt_s0, seq_ptr, hdr_ptr, hdr_s0,
                  lg_ptr, pm_ptr, ps_ptr, hist_ptr, ncand_ptr, scale, SB,
                  NROWS, TGT, MSPLIT, DYN, BP: tl.constexpr,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  DP: tl.constexpr, BS: tl.constexpr, NSP: tl.constexpr,
                  CH: tl.constexpr, NB: tl.constexpr, CAP: tl.constexpr,
                  NATIVE: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False,
                  Q8: tl.constexpr = False,
                  EPB: tl.constexpr = 1, ERR: tl.constexpr = False, tv_ptr=None,
                  hist2_ptr=None, emax_ptr=None, XR: tl.constexpr = False,
                  G4: tl.constexpr = 16, NEUTRAL: tl.constexpr = False,
                  ISO: tl.constexpr = False, BAND: tl.constexpr = False, RI=1,
                  bd_ptr=None, bd_s0=0, bd_s1=0, ph_ptr=None, PHASE: tl.constexpr = False,
                  EL: tl.constexpr = False, FLOG: tl.constexpr = False,
                  DIAG: tl.constexpr = 0, CONTIG: tl.constexpr = False,
                  CARRY: tl.constexpr = False, keys_ptr=None, rgh_ptr=None, ref_ptr=None,
                  mode_ptr=None, PK: tl.constexpr = 16, SUB: tl.constexpr = 1,
                  WIN: tl.constexpr = 1, PFS: tl.constexpr = False,
                  SV1: tl.constexpr = False):
    """Program (row*H + head, p): log-masses of entries p, p+NS, ... (see module doc).

    SV1 (with Q8): the small gathers from one 32-byte sector per entry
    (:func:`_score_small`).

    PFS: each tile's small gathers (size and 8-bit scales, :func:`_score_small`) are
    issued one tile ahead, after the tile before has used its own (the software
    pipeline carries the summaries' loads, not these). Leaving them out took 24% off
    the kernel at 128K x 6 (H100); whether for their round trip, which this hides, or
    for their sectors, which ``SV1`` halves, is what the two forms measure.

    DIAG (a measurement knob, not attention: wrong log-masses): bit 1 leaves out the
    small per-entry gathers (size 16, scales 1), bit 4 the logits' stores; where a
    tile's time goes. (Tiles built in registers instead of the summaries' loads cost a
    layout conversion per tile, more than the loads: not a measurement of them.)

    CONTIG: contiguous ranges of entries (the selection kernels' :func:`_range`)
    instead of entries p, p + NS, ...

    CARRY (``RetroConfig.rank_reference`` "carried"; with EL and CONTIG, on the
    selection kernels' split): a row-head whose reference ``R`` (the request's word
    of ``ref``, ``[ibt rows, H]`` float32: its largest log-mass of the last step;
    zero bits: none) is set also writes the selection's keys ``sum_g exp(lg_g - R)``
    (packed, as the key kernel does) and its range's histogram of their bins
    (:func:`_bound_bits`: the window's top binade is G's), as counts in bins
    >= b at ``rgh_ptr[(row*H + head) * MSPLIT + p]`` (one relaxed atomic per entry
    into that row, then its suffix sums), the key kernel's work for that row-head;
    program 0 stores whether it did (``mode``, read by the key and list kernels).
    A ``[G, CH]`` tile's keys cost ~23% more instructions per tile at sm_90
    (``tl.histogram`` per tile, a ballot loop per bin: +127%).

    EL: the partial log-sum-exp runs per element of the ``[GX, CH]`` tile (each lane
    its own running max and sum, one exponential per element and tile) and is reduced
    over the entries once, after the loop: the per-tile reductions over the entries
    cross the warps (shared memory and five barriers per tile at sm_90).

    FLOG (GPU only: inline PTX, which the interpreter does not run): ``ln size`` as
    ``log2(size) ln 2`` with the hardware's approximate base-2 logarithm (``lg2.approx``,
    relative error ~2^-22) instead of the full-precision natural logarithm (a
    ~20-instruction polynomial per entry and lane at sm_90; ``tl.log2`` compiles to one
    as well).

    BAND (``rank_interval`` RI > 1): a row that re-ranks its last band
    (:func:`_band_rows`) scores the band's entries, whose pages the band table
    ``bd`` (``[P, H, 16]`` int32, :meth:`IndexPool.band_table`) holds packed at the
    row's pages (on all NS programs; the key and list kernels scale their split to
    the band, the key kernel reading the partial slots up to the unscaled one).

    ISO (``IndexPool.variance_form`` "isotropic"; with Q8): the variance term is
    ``s^2/2 |q_g|^2 vbar`` with each entry's stored mean key variance ``vbar``: the
    variance vectors are not read (half the tile bytes, half the products).

    NEUTRAL (the score kernel on a split of its own, smaller than the key kernel's):
    program 0 also stores neutral partials (max -inf, sum 0) in the slots from NS on,
    which the key kernel reads up to its own split.

    XR: the products' ``GP`` rows (16: the tensor cores' least) are folded to the
    ``G4`` query-head rows right after them (the padded rows are exact zeros, the
    query's padding being zero), so the element-wise work of a tile runs on ``[G4,
    CH]`` instead of ``[GP, CH]`` (a quarter of the lanes' elements for G = 4); with
    Q8 the int32 products are folded, before their conversions and scales.

    ERR (the error rank, ``retrieval_rank`` "error"): also each entry's uncapped
    variance term ``t_g`` (``tv``, addressed as the logits), and program 0 zeroes
    the row-head's band histogram and largest error key.

    Q8: the pool keeps 8-bit centroids and key variances (``fq``: ``fpart``'s int8
    view, both vectors in slot 0; ``fs``: its float32 view, the two scales first in
    slot 1). The query and its square are split once per program into two int8
    parts with one scale (:func:`_q8_split`); the int8 tiles enter integer
    tensor-core products as they are (no conversion per element) and each cluster's
    scale multiplies its product."""
    _pdl_launch(PDL)
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    rr = E < 0
    if BAND:
        # (All NS programs: each scores a quarter of a full ranking's entries. On
        # fewer, as the key and list kernels, the latency-bound score stage took 41
        # instead of 26 us at 128K x 6 on an H100.)
        rr, C, _ = _band_rows(hdr_ptr, hdr_s0, blk0, L, E, C, NS, RI, ph_ptr, PHASE)
    if p == 0:
        # Later kernels accumulate into these; zeroed here so every call starts clean.
        tl.store(hist_ptr + rh * NB + tl.arange(0, NB), tl.zeros([NB], tl.int32))
        tl.store(ncand_ptr + rh * 2 + tl.arange(0, 2), tl.zeros([2], tl.int32))
        if ERR:
            tl.store(hist2_ptr + rh * NB + tl.arange(0, NB), tl.zeros([NB], tl.int32))
            tl.store(emax_ptr + rh, 0)
        if NEUTRAL:
            sp = tl.arange(0, NSP)
            gn = tl.arange(0, GP)
            nofs = (rh * NSP + sp)[:, None] * GP + gn[None, :]
            nmask = (sp >= NS)[:, None] & (gn >= 0)[None, :]
            tl.store(pm_ptr + nofs, tl.full([NSP, GP], _NEG_INF, tl.float32), mask=nmask)
            tl.store(ps_ptr + nofs, tl.zeros([NSP, GP], tl.float32), mask=nmask)
    d = tl.arange(0, DP)
    dm = d < D
    # With Q8 the query is split on its G4 query-head rows and the int8 parts padded
    # to the products' GP rows with zeros afterwards: the rounding work of the padded
    # rows (zeros) is not done per program.
    QR: tl.constexpr = G4 if Q8 else GP
    gq = tl.arange(0, QR)
    q = tl.load(q_ptr + r.to(tl.int64) * q_sb + (h * G + gq)[:, None] * q_sh + d[None, :] * q_sd,
                mask=(gq < G)[:, None] & dm[None, :], other=0.0).to(tl.float32)
    qq = q * q
    if Q8:
        qh4, ql4, sq = _q8_split(q)
        qh, ql = _pad_rows(qh4, GP, G4, DP), _pad_rows(ql4, GP, G4, DP)
        if not ISO:
            qqh4, qql4, sqq = _q8_split(qq)
            qqh, qql = _pad_rows(qqh4, GP, G4, DP), _pad_rows(qql4, GP, G4, DP)
    # The rows of the element-wise work: the query heads' G4 (XR) or the products' GP.
    GX: tl.constexpr = G4 if XR else GP
    gx = tl.arange(0, GX)
    gxm = gx < G
    if ISO:
        # |q_g|^2 on the element-wise rows (zero on padded rows).
        tl.static_assert(Q8, "the isotropic variance term needs 8-bit summaries")
        q2 = tl.sum(qq, 1)
        q2x = tl.sum(tl.where(gx[:, None] == gq[None, :], q2[None, :], 0.0), 1)
    if EL:
        m_run = tl.full([GX, CH], _NEG_INF, tl.float32)
        s_run = tl.zeros([GX, CH], tl.float32)
    else:
        m_run = tl.full([GX], _NEG_INF, tl.float32)
        s_run = tl.zeros([GX], tl.float32)
    if CONTIG:
        c_lo, c_hi, _ = _range(C, p, NS, PK)
        n_mine = tl.maximum(c_hi - c_lo, 0)
        i = c_lo + tl.arange(0, CH)
        valid = i < c_hi
    else:
        n_mine = tl.maximum(C - p + NS - 1, 0) // NS
        # The next tile's pool pages are loaded before this tile's summaries are
        # used (a hand-made pipeline stage over the index-table indirection).
        i = p + NS * tl.arange(0, CH)
        valid = i < C
    if CARRY:
        tl.static_assert(EL and CONTIG, "CARRY is a form of the EL and CONTIG kernel")
        # (E > 0: the ibt row is the request's; no index, no reference.)
        irow = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_IBT)
        r_key = tl.load(ref_ptr + irow.to(tl.int64) * H + h, mask=C > 0, other=0.0)
        carried = (C > 0) & (r_key.to(tl.int32, bitcast=True) != 0)
        if p == 0:
            tl.store(mode_ptr + rh, carried.to(tl.int32))
        bound = _bound_bits(G, WIN)
        krow = rgh_ptr + (rh * MSPLIT + p).to(tl.int64) * NB
        if carried:
            tl.store(krow + tl.arange(0, NB), tl.zeros([NB], tl.int32))
            tl.debug_barrier()   # (the zeros before any thread's atomics)
    blk = _entry_pages(ix_row, i, valid, rr, bd_ptr, bd_s0, bd_s1, h, BAND).to(tl.int64)
    if PFS:
        sc_c, sc_v, size = _score_small(fs_ptr, fs_s0, fs_s1, fs_s2, ip_ptr, ip_s0, ip_s1,
                                        blk, valid, h, Q8, ISO, SV1)
    for m0 in range(0, n_mine, CH):
        cm = valid[:, None] & dm[None, :]
        if DIAG & 1:
            sc_c = tl.full([CH], 1.0, tl.float32)
            sc_v = tl.full([CH], 1.0, tl.float32)
            size = tl.where(valid, 16, 0)
        elif not PFS:
            sc_c, sc_v, size = _score_small(fs_ptr, fs_s0, fs_s1, fs_s2, ip_ptr, ip_s0,
                                            ip_s1, blk, valid, h, Q8, ISO, SV1)
        if Q8:
            qb = fq_ptr + _wide_mad(blk, fq_s0, h * fq_s1)
            cen = tl.load(qb[:, None] + d[None, :], mask=cm, other=0)
            if not ISO:
                var = tl.load(qb[:, None] + D + d[None, :], mask=cm, other=0)
        else:
            fb = fp_ptr + _wide_mad(blk, fp_s0, h * fp_s1)
            cen = tl.load(fb[:, None] + d[None, :] * fp_s3, mask=cm, other=0.0)
            var = tl.load(fb[:, None] + fp_s2 + d[None, :] * fp_s3, mask=cm, other=0.0)
        if CONTIG:
            i_n = c_lo + m0 + CH + tl.arange(0, CH)
            valid_n = i_n < c_hi
        else:
            i_n = p + NS * (m0 + CH + tl.arange(0, CH))
            valid_n = i_n < C
        blk_n = _entry_pages(ix_row, i_n, valid_n, rr, bd_ptr, bd_s0, bd_s1, h,
                             BAND).to(tl.int64)
        if Q8:
            qc_i = _q8_acc(qh, ql, tl.trans(cen))
            if XR:   # (in int32, before the conversions and scales)
                qc_i = _fold_rows(qc_i, GP, G4, CH)
            qc = _q8_float(qc_i) * (sq * sc_c)[None, :]
            if ISO:
                qv = q2x[:, None] * sc_v[None, :]
            else:
                qv_i = _q8_acc(qqh, qql, tl.trans(var))
                if XR:
                    qv_i = _fold_rows(qv_i, GP, G4, CH)
                qv = _q8_float(qv_i) * (sqq * sc_v)[None, :]
        else:
            qc = _dot(q, tl.trans(cen), NATIVE, PREC)
            qv = _dot(qq, tl.trans(var), NATIVE, PREC)
            if XR:
                qc, qv = _fold_rows(qc, GP, G4, CH), _fold_rows(qv, GP, G4, CH)
        # Same operation order as the twin: s q.c + ln size + min(s^2/2 q^2.var, CAP).
        sz = tl.maximum(size, 1).to(tl.float32)
        if FLOG:
            lsz = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [sz],
                                            dtype=tl.float32, is_pure=True, pack=1) * _LN2
        else:
            lsz = tl.log(sz)
        lg = qc * scale + lsz[None, :]
        tv = qv * (0.5 * scale * scale)
        lg = lg + tl.minimum(tv, CAP)
        lg = tl.where((valid & (size > 0))[None, :], lg, _NEG_INF)
        if not (DIAG & 4):
            tl.store(lg_ptr + blk[None, :] * (H * G) + h * G + gx[:, None], lg,
                     mask=gxm[:, None] & valid[None, :])
        if ERR:
            tl.store(tv_ptr + blk[None, :] * (H * G) + h * G + gx[:, None], tv,
                     mask=gxm[:, None] & valid[None, :])
        if CARRY:
            if carried:
                kp = tl.where(gxm[:, None], tl.exp(lg - r_key), 0.0)
                key = tl.sum(kp, 0).to(tl.int32, bitcast=True)   # >= 0: sorts as float
                tl.store(_packed(keys_ptr, ix_row, h, i, valid, H, PK, PK, 1), key,
                         mask=valid)
                # Relaxed: the counts are read after the barrier below, by this program.
                tl.atomic_add(krow + _digit(key, bound, SUB, NB, WIN), 1, mask=valid,
                              sem="relaxed")
        if EL:
            # One exponential per element: the smaller of (running max, logit) over
            # the larger; a new max rescales the running sum by it.
            hi = tl.maximum(m_run, lg)
            hs = tl.where(hi == _NEG_INF, 0.0, hi)   # no exp(-inf - -inf)
            e = tl.exp(tl.minimum(m_run, lg) - hs)
            s_run = tl.where(lg > m_run, s_run * e + 1.0, s_run + e)
            m_run = hi
        else:
            m_new = tl.maximum(m_run, tl.max(lg, 1))
            m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)  # no exp(-inf - -inf)
            s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), 1)
            m_run = m_new
        if PFS:
            # The next tile's small gathers, in flight while this tile finishes and
            # the next one's summaries arrive.
            sc_c, sc_v, size = _score_small(fs_ptr, fs_s0, fs_s1, fs_s2, ip_ptr, ip_s0,
                                            ip_s1, blk_n, valid_n, h, Q8, ISO, SV1)
        blk, valid, i = blk_n, valid_n, i_n
    if CARRY:
        if carried:
            nb = tl.arange(0, NB)
            tl.debug_barrier()   # (every thread's atomics before the row is read)
            # (.cg: the atomics' values are in L2)
            cnt = tl.load(krow + nb, cache_modifier=".cg")
            # Every thread has its counts before any stores (the scan exchanges them).
            tl.store(krow + nb, tl.sum(cnt, 0) - tl.cumsum(cnt, 0) + cnt)
    if EL:
        m_el = m_run
        m_run = tl.max(m_el, 1)
        m_safe = tl.where(m_run == _NEG_INF, 0.0, m_run)
        s_run = tl.sum(s_run * tl.exp(m_el - m_safe[:, None]), 1)
    tl.store(pm_ptr + (rh * NSP + p) * GP + gx, m_run)
    tl.store(ps_ptr + (rh * NSP + p) * GP + gx, s_run)


# ------------------------------------------------------------------ 2. keys
@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _key_kernel(lg_ptr, keys_ptr, hist_ptr, pm_ptr, ps_ptr, bt_ptr, bt_s0, ibt_ptr,
                ibt_s0, seq_ptr, hdr_ptr, hdr_s0, SB, NROWS, TGT, MSPLIT, DYN,
                BP: tl.constexpr,
                H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, G4: tl.constexpr,
                BS: tl.constexpr, NSP: tl.constexpr, CHE: tl.constexpr, NB: tl.constexpr,
                SUB: tl.constexpr, WIN: tl.constexpr, PK: tl.constexpr,
                PDL: tl.constexpr = False,
                EPB: tl.constexpr = 1, BUCKET: tl.constexpr = False, rgh_ptr=None,
                ERR: tl.constexpr = False, tv_ptr=None, keys2_ptr=None, emax_ptr=None,
                BAND: tl.constexpr = False, RI=1, bd_ptr=None, bd_s0=0, bd_s1=0,
                ph_ptr=None, PHASE: tl.constexpr = False, CARRY: tl.constexpr = False,
                ref_ptr=None, mode_ptr=None):
    """Program (row*H + head, p): keys of the entries of range p and their digit
    histogram, added atomically to the row-head's histogram. BAND: as the score
    kernel's (a row re-ranking its band has the band's entries). Tiles are ``[G4, CHE]``
    (``G4`` = G rounded up to a power of two; no product here, so no padding to the
    16 rows of ``GP``); the partials are strided by ``GP``.

    BUCKET (:data:`SELECT` "bucket"): also the range's own histogram, as counts of
    its keys in bins >= b, at ``rgh_ptr[(row*H + head) * MSPLIT + p]`` (the list
    kernel's offsets).

    ERR (the error rank): also each entry's error key, the bits of ``sum_g
    p_g t_g`` (its share of each query head's attention among the entries times
    the uncapped variance term, :func:`~.reference.error_proxy`), at ``keys2``
    (packed as the keys), and the row-head's largest error key (atomic max at
    ``emax``, zeroed by the score kernel).

    CARRY (``RetroConfig.rank_reference`` "carried", with BUCKET): program 0 stores
    the row-head's largest log-mass of this step (the score partials' maxima) as the
    request's reference for its next step (``ref``, ``[ibt rows, H]``). A row-head
    whose keys the score kernel wrote (its ``mode`` word) is left to it but for its
    histogram: its programs sum its ranges' counts in bins >= b into ``hist``, each
    program its slices of ``NB // NSP`` bins."""
    _pdl_launch(PDL)
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    rr = E < 0
    NSF = NS     # the score kernel's partial slots: up to the unscaled split
    if BAND:
        rr, C, NS = _band_rows(hdr_ptr, hdr_s0, blk0, L, E, C, NS, RI, ph_ptr, PHASE)
        if p >= NS:
            return
    _pdl_wait(PDL)
    sp = tl.arange(0, NSP)
    if CARRY:
        tl.static_assert(BUCKET and not ERR and not BAND,
                         "the carried reference ranks by mass with the bucket selection")
        tl.static_assert(NB % NSP == 0, "the histogram splits into NSP slices")
        carried = tl.load(mode_ptr + rh) != 0
        if carried:
            # The score kernel did the ranges' work: the row-head's histogram is the
            # sum of the ranges' counts in bins >= b, less those in bins >= b + 1, in
            # NSP slices of bins spread over the row-head's programs.
            NBS: tl.constexpr = NB // NSP
            nb = tl.arange(0, NBS)
            mine = sp < NS
            rows = rgh_ptr + (rh * MSPLIT + sp).to(tl.int64)[:, None] * NB
            for s0 in range(p, NSP, NS):
                b = s0 * NBS + nb
                ge = tl.sum(tl.load(rows + b[None, :], mask=mine[:, None] & (b >= 0)[None, :],
                                    other=0), 0)
                ge1 = tl.sum(tl.load(rows + (b + 1)[None, :],
                                     mask=mine[:, None] & (b < NB - 1)[None, :], other=0), 0)
                tl.store(hist_ptr + rh * NB + b, ge - ge1)
            if p > 0:
                return
    g = tl.arange(0, G4)
    gm = g < G
    pofs = (rh * NSP + sp)[:, None] * GP + g[None, :]
    # (Scalar conditions enter masks as bounds: the interpreter mishandles vec & scalar.)
    pmask = (sp < tl.where(C > 0, NSF, 0))[:, None] & (g >= 0)[None, :]
    pm = tl.load(pm_ptr + pofs, mask=pmask, other=_NEG_INF)
    ps = tl.load(ps_ptr + pofs, mask=pmask, other=0.0)
    mx = tl.max(pm, 0)
    mx_safe = tl.where(mx == _NEG_INF, 0.0, mx)
    tot = tl.sum(ps * tl.exp(pm - mx_safe[None, :]), 0)
    # lse = -inf when a query head has no non-empty entry: its scores are 0 (the
    # twin's nan_to_num of an all -inf softmax).
    has = tot > 0
    lse = mx_safe + tl.log(tl.where(has, tot, 1.0))
    if CARRY:
        if p == 0:
            top = tl.max(tl.where(gm, mx, _NEG_INF), 0)
            irow = tl.load(hdr_ptr + blk0 * hdr_s0 + _HDR_IBT)
            tl.store(ref_ptr + irow.to(tl.int64) * H + h, top, mask=(C > 0) & (top > _NEG_INF))
        if carried:
            return
    mean_bits = _mean_bits(C, G)
    lo, hi, per = _range(C, p, NS, PK)
    hist = tl.zeros([NB], tl.int32)
    bad = tl.zeros([CHE], tl.int32)
    emax = tl.zeros([CHE], tl.int32)
    for i0 in range(lo, hi, CHE):
        i = i0 + tl.arange(0, CHE)
        valid = i < hi
        eblk = _entry_pages(ix_row, i, valid, rr, bd_ptr, bd_s0, bd_s1, h, BAND).to(tl.int64)
        lg = tl.load(lg_ptr + eblk[None, :] * (H * G) + h * G + g[:, None],
                     mask=gm[:, None] & valid[None, :], other=_NEG_INF)
        pr = tl.where(has[:, None], tl.exp(lg - lse[:, None]), 0.0)
        key = tl.sum(pr, 0).to(tl.int32, bitcast=True)   # score >= 0: bits sort as floats
        tl.store(_packed(keys_ptr, ix_row, h, i, valid, H, PK, PK, 1), key, mask=valid)
        if ERR:
            tv = tl.load(tv_ptr + eblk[None, :] * (H * G) + h * G + g[:, None],
                         mask=gm[:, None] & valid[None, :], other=0.0)
            err = tl.maximum(tl.sum(pr * tv, 0), 0.0).to(tl.int32, bitcast=True)
            tl.store(_packed(keys2_ptr, ix_row, h, i, valid, H, PK, PK, 1), err, mask=valid)
            emax = tl.maximum(emax, tl.where(valid, err, 0))
        dg = tl.where(valid, _digit(key, mean_bits, SUB, NB, WIN), 0)
        hist += tl.histogram(dg, NB)
        bad += (valid == 0).to(tl.int32)
    # Masked-out lanes were counted in bin 0.
    hist -= tl.where(tl.arange(0, NB) == 0, tl.sum(bad, 0), 0)
    # Relaxed: only later launches read the sums, and the default acq_rel puts a full
    # GPU memory barrier (MEMBAR.ALL.GPU at sm_90) before each of a thread's atomics.
    tl.atomic_add(hist_ptr + rh * NB + tl.arange(0, NB), hist, mask=hist > 0, sem="relaxed")
    if BUCKET:
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        tl.store(rgh_ptr + (rh * MSPLIT + p).to(tl.int64) * NB + tl.arange(0, NB), ge)
    if ERR:
        top = tl.max(emax, 0)
        tl.atomic_max(emax_ptr + rh, top, mask=top > 0, sem="relaxed")


# ------------------------------------------------------------------ 2b. the error rank's band
@triton.jit
def _edigit(key, top_bits, SUB: tl.constexpr, NB: tl.constexpr, WIN: tl.constexpr):
    """Histogram bin of an error key: 1/2^SUB binade steps over the WIN binades
    ending with the largest key's (``top_bits``); smaller keys clamp to bin 0
    (:func:`~.reference.error_digits`)."""
    lo = ((top_bits >> 23) - WIN + 1) << SUB
    return tl.minimum(tl.maximum((key >> (23 - SUB)) - lo, 0), NB - 1)


@triton.jit
def _threshold(hist, rg, sp, p, total, k, NB: tl.constexpr):
    """The top ``k`` of ``total`` keys by bucket (ties to the lower entry), from the
    row-head's histogram ``hist`` and the ranges' counts in bins >= b (rows ``rg``):
    the threshold bin ``t`` (NB: none), the keys taken from it ``need``, and the
    keys of the ranges below ``p`` above it and in it."""
    b, above, n = _bucket(hist, tl.arange(0, NB), total, k)
    t = tl.where(k > 0, b, NB)
    need = tl.where(k > 0, k - above, 0)
    a, e = _lower_counts(rg, sp, p, total, t, NB)
    return t, need, a, e


@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _band_kernel(keys_ptr, keys2_ptr, hist_ptr, hist2_ptr, emax_ptr, rgh_ptr, rgh2_ptr,
                 bt_ptr, bt_s0, ibt_ptr, ibt_s0, seq_ptr, hdr_ptr, hdr_s0, SB, NROWS, TGT,
                 MSPLIT, DYN, BP: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                 BS: tl.constexpr, NSP: tl.constexpr, CHE: tl.constexpr,
                 NB: tl.constexpr, SUB: tl.constexpr, WIN: tl.constexpr, PK: tl.constexpr,
                 PDL: tl.constexpr = False, EPB: tl.constexpr = 1):
    """Program (row*H + head, p), the error rank only: which entries of range p are
    in the band (the top ``n_retrieve + n_estimate`` by score, as the list kernel
    decides it), and the histogram of their error keys' bins (:func:`_edigit`),
    added atomically to the row-head's (``hist2``) and stored per range as counts
    in bins >= b (``rgh2``, the list kernel's offsets)."""
    _pdl_launch(PDL)
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    n_ret, n_est = _budget(hdr_ptr, hdr_s0, blk0, C)
    _pdl_wait(PDL)
    sp = tl.arange(0, NSP)
    hist = tl.load(hist_ptr + rh * NB + tl.arange(0, NB))
    rg = rgh_ptr + (rh * MSPLIT + sp).to(tl.int64) * NB
    t2, need2, a2, e2 = _threshold(hist, rg, sp, p, C, n_ret + n_est, NB)
    mean_bits = _mean_bits(C, G)
    top = tl.load(emax_ptr + rh)
    lo, hi, per = _range(C, p, NS, PK)
    hist2 = tl.zeros([NB], tl.int32)
    out = tl.zeros([CHE], tl.int32)
    for i0 in range(lo, hi, CHE):
        i = i0 + tl.arange(0, CHE)
        valid = i < hi
        key = tl.load(_packed(keys_ptr, ix_row, h, i, valid, H, PK, PK, 1), mask=valid,
                      other=-1)
        v = _digit(key, mean_bits, SUB, NB, WIN)
        eq2 = valid & (v == t2)
        r2 = e2 + tl.cumsum(eq2.to(tl.int32), 0) - 1
        inb = valid & ((v > t2) | (eq2 & (r2 < need2)))
        key2 = tl.load(_packed(keys2_ptr, ix_row, h, i, inb, H, PK, PK, 1), mask=inb,
                       other=0)
        hist2 += tl.histogram(tl.where(inb, _edigit(key2, top, SUB, NB, WIN), 0), NB)
        out += (inb == 0).to(tl.int32)
        e2 += tl.sum(eq2.to(tl.int32), 0)
    # Entries outside the band were counted in bin 0.
    hist2 -= tl.where(tl.arange(0, NB) == 0, tl.sum(out, 0), 0)
    tl.atomic_add(hist2_ptr + rh * NB + tl.arange(0, NB), hist2, mask=hist2 > 0,
                  sem="relaxed")   # (read by later launches only, as the key histogram)
    ge = tl.sum(hist2, 0) - tl.cumsum(hist2, 0) + hist2
    tl.store(rgh2_ptr + (rh * MSPLIT + p).to(tl.int64) * NB + tl.arange(0, NB), ge)


# ------------------------------------------------------------------ 3. thresholds
@triton.jit
def _cand_load(cand_ptr, word0, ix_row, h, j, jv, H: tl.constexpr, PK: tl.constexpr):
    """(key, entry index) of candidates ``j`` of the list at ``word0`` (pairs packed
    16 to a pool page: ``cands[ix[j // 16], h, word0 + 2 (j % 16) + {0, 1}]``)."""
    a = _packed(cand_ptr + word0, ix_row, h, j, jv, H, CAND_WORDS_C, PK, 2)
    key = tl.load(a, mask=jv, other=-1, cache_modifier=".cg")
    idx = tl.load(a + 1, mask=jv, other=0, cache_modifier=".cg")
    return key, idx


@triton.jit
def _kth_step(thr, key, jv, sh):
    """Counts of the keys (where ``jv``) >= thr + j * 2^sh for j < 16 (int32: with
    keys < 2^31, the candidates that wrap negative in the top nibble count 0)."""
    cand = thr + (tl.arange(0, 16) << sh)
    cnt = tl.sum(((key[:, None] >= cand[None, :]) & jv[:, None]).to(tl.int32), 0)
    return tl.where(cand < 0, 0, cnt)


@triton.jit
def _kth2(k1, v1, rem1, k2, v2, rem2, pre1, pre2, nib0):
    """The ``rem``-th largest (1-based) of the keys (>= 0) where ``v``, for two key
    sets at once: the largest t with #{key >= t} >= rem, built 4 bits at a time (a
    short loop instead of a sort: one program runs it, so code size and latency
    matter) from nibble ``nib0`` down, starting at ``pre`` (bits every key of the
    set shares above that nibble; 0 and 0 for a full search). Garbage for rem <= 0."""
    t1 = pre1
    t2 = pre2
    j16 = tl.arange(0, 16)
    for nib in range(nib0, 8):
        sh = 28 - 4 * nib
        c1 = _kth_step(t1, k1, v1, sh)
        c2 = _kth_step(t2, k2, v2, sh)
        t1 = t1 + (tl.max(tl.where(c1 >= rem1, j16, 0), 0) << sh)
        t2 = t2 + (tl.max(tl.where(c2 >= rem2, j16, 0), 0) << sh)
    return t1, t2


@triton.jit
def _kth_regs(cand_ptr, w2, ix_row, h, c1, c2, rem1, rem2, pre1, pre2, nib0,
              H: tl.constexpr, PK: tl.constexpr, N: tl.constexpr):
    """:func:`_kth2` over both candidate lists (``c1``, ``c2 <= N`` entries) loaded
    into ``N`` lanes; also the candidates above each threshold. Returns (t1, t2,
    g1, g2)."""
    jb = tl.arange(0, N)
    x1, i1 = _cand_load(cand_ptr, 0, ix_row, h, jb, jb < c1, H, PK)
    x2, i2 = _cand_load(cand_ptr, w2, ix_row, h, jb, jb < c2, H, PK)
    t1, t2 = _kth2(x1, jb < c1, rem1, x2, jb < c2, rem2, pre1, pre2, nib0)
    g1 = tl.sum(((jb < c1) & (x1 > t1)).to(tl.int32), 0)
    g2 = tl.sum(((jb < c2) & (x2 > t2)).to(tl.int32), 0)
    return t1, t2, g1, g2


@triton.jit
def _kth_any(cand_ptr, w2, ix_row, h, c1, c2, rem1, rem2, pre1, pre2, nib0, C,
             H: tl.constexpr, PK: tl.constexpr, CB: tl.constexpr):
    """Both thresholds and the candidates above them: in registers when both lists
    hold at most ``CB`` candidates (the usual case: buckets of a few dozen to a few
    hundred keys), else in chunks."""
    if (c1 <= CB) & (c2 <= CB):
        t1, t2, g1, g2 = _kth_regs(cand_ptr, w2, ix_row, h, c1, c2, rem1, rem2, pre1, pre2,
                                   nib0, H, PK, CB)
    else:
        t1 = _kth_chunks(cand_ptr, 0, ix_row, h, c1, rem1, pre1, nib0, H, PK, CB)
        t2 = _kth_chunks(cand_ptr, w2, ix_row, h, c2, rem2, pre2, nib0, H, PK, CB)
        g1, e1 = _count_chunks(cand_ptr, 0, ix_row, h, c1, t1, C, H, PK, CB)
        g2, e2 = _count_chunks(cand_ptr, w2, ix_row, h, c2, t2, C, H, PK, CB)
    return t1, t2, g1, g2


@triton.jit
def _kth_chunks(cand_ptr, word0, ix_row, h, n, rem, pre, nib0, H: tl.constexpr,
                PK: tl.constexpr, CB: tl.constexpr):
    """:func:`_kth2` for one list of ``n > CB`` candidates read in chunks (buckets
    this large only come from nearly flat score distributions)."""
    thr = pre
    j16 = tl.arange(0, 16)
    for nib in range(nib0, 8):
        sh = 28 - 4 * nib
        cnt = tl.zeros([16], tl.int32)
        for j0 in range(0, n, CB):
            jj = j0 + tl.arange(0, CB)
            jv = jj < n
            kk, ii = _cand_load(cand_ptr, word0, ix_row, h, jj, jv, H, PK)
            cnt += _kth_step(thr, kk, jv, sh)
        thr = thr + (tl.max(tl.where(cnt >= rem, j16, 0), 0) << sh)
    return thr


@triton.jit
def _count_chunks(cand_ptr, word0, ix_row, h, n, thr, lo, H: tl.constexpr,
                  PK: tl.constexpr, CB: tl.constexpr):
    """Candidates with key > thr, and with key == thr and entry index < lo."""
    gt = lo * 0
    eq = gt
    for j0 in range(0, n, CB):
        jj = j0 + tl.arange(0, CB)
        jv = jj < n
        kk, ii = _cand_load(cand_ptr, word0, ix_row, h, jj, jv, H, PK)
        gt += tl.sum((jv & (kk > thr) & (ii < lo)).to(tl.int32), 0)
        eq += tl.sum((jv & (kk == thr) & (ii < lo)).to(tl.int32), 0)
    return gt, eq


@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _cand_kernel(keys_ptr, cand_ptr, hist_ptr, ncand_ptr, rng_ptr, sel_ptr, cnt_ptr,
                 tick_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, seq_ptr, hdr_ptr, hdr_s0, SB,
                 NROWS, TGT, MSPLIT, DYN, BP: tl.constexpr,
                 H: tl.constexpr, G: tl.constexpr, BS: tl.constexpr, RB: tl.constexpr,
                 NB: tl.constexpr, SUB: tl.constexpr, WIN: tl.constexpr,
                 PK: tl.constexpr, NSP: tl.constexpr, CB: tl.constexpr,
                 PDL: tl.constexpr = False, CBS: tl.constexpr = 0,
                 EPB: tl.constexpr = 1):
    """Program (row*H + head, p): the keys of range p in the thresholds' histogram
    buckets go to two candidate lists (positions reserved atomically: their order
    does not matter), and the keys above the buckets are counted; the last program
    of the row-head finds both threshold keys and the ties taken at each.
    (Not launched with the bucket selection: the list kernel reads the key
    kernel's per-range histograms instead.)"""
    _pdl_launch(PDL)
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    n_ret, n_est = _budget(hdr_ptr, hdr_s0, blk0, C)
    _pdl_wait(PDL)
    k1 = n_ret
    k2 = n_ret + n_est
    use1 = k1 > 0
    use2 = k2 > k1
    bins = tl.arange(0, NB)
    hist = tl.load(hist_ptr + rh * NB + bins)
    b1, above1, n1 = _bucket(hist, bins, C, k1)
    b2, above2, n2 = _bucket(hist, bins, C, k2)
    share = use1 & use2 & (b1 == b2)     # one bucket holds both thresholds: one list
    mean_bits = _mean_bits(C, G)
    lo, hi, per = _range(C, p, NS, PK)
    a1 = lo * 0
    a2 = a1
    for i0 in range(lo, hi, RB):
        i = i0 + tl.arange(0, RB)
        valid = i < hi
        key = tl.load(_packed(keys_ptr, ix_row, h, i, valid, H, PK, PK, 1), mask=valid,
                      other=0)
        dg = _digit(key, mean_bits, SUB, NB, WIN)
        f1 = valid & (dg == tl.where(use1, b1, -1))
        f2 = valid & (dg == tl.where(use2, tl.where(share, -1, b2), -1))
        m1 = tl.sum(f1.to(tl.int32), 0)
        m2 = tl.sum(f2.to(tl.int32), 0)
        o1 = tl.atomic_add(ncand_ptr + rh * 2, m1, mask=m1 > 0, sem="relaxed")
        o2 = tl.atomic_add(ncand_ptr + rh * 2 + 1, m2, mask=m2 > 0, sem="relaxed")
        p1 = o1 + tl.cumsum(f1.to(tl.int32), 0) - 1
        p2 = o2 + tl.cumsum(f2.to(tl.int32), 0) - 1
        w1 = _packed(cand_ptr, ix_row, h, p1, f1, H, CAND_WORDS_C, PK, 2)
        tl.store(w1, key, mask=f1)
        tl.store(w1 + 1, i, mask=f1)
        w2 = _packed(cand_ptr + 2 * PK, ix_row, h, p2, f2, H, CAND_WORDS_C, PK, 2)
        tl.store(w2, key, mask=f2)
        tl.store(w2 + 1, i, mask=f2)
        a1 += tl.sum((valid & (dg > b1)).to(tl.int32), 0)
        a2 += tl.sum((valid & (dg > b2)).to(tl.int32), 0)
    tl.store(rng_ptr + (rh * NSP + p) * 2, a1)
    tl.store(rng_ptr + (rh * NSP + p) * 2 + 1, a2)
    tl.debug_barrier()   # every thread's stores precede the release below
    ticket = tl.atomic_add(tick_ptr + rh, 1, sem="acq_rel", scope="gpu")
    if ticket == NS - 1:
        tl.store(tick_ptr + rh, 0)
        c1 = tl.load(ncand_ptr + rh * 2, cache_modifier=".cg")
        c2 = tl.where(share, c1, tl.load(ncand_ptr + rh * 2 + 1, cache_modifier=".cg"))
        w2 = tl.where(share, 0, 2 * PK)
        rem1 = k1 - above1
        rem2 = k2 - above2
        # Keys of an interior histogram bin share every bit above the digit's
        # (23 - SUB low mantissa bits): the search starts below them (5 nibbles
        # instead of 8 with SUB = 5). The edge bins also hold clamped keys: full search.
        lo_bin = ((mean_bits >> 23) - WIN // 2) << SUB
        in1 = ((b1 > 0) & (b1 < NB - 1)) | (use1 == 0)
        in2 = ((b2 > 0) & (b2 < NB - 1)) | (use2 == 0)
        fast = in1 & in2
        pre1 = tl.where(fast & use1, (b1 + lo_bin) << (23 - SUB), 0)
        pre2 = tl.where(fast & use2, (b2 + lo_bin) << (23 - SUB), 0)
        nib0 = tl.where(fast, (28 - (22 - SUB) // 4 * 4) // 4, 0)
        if CBS > 0:
            if (c1 <= CBS) & (c2 <= CBS):
                # Buckets of at most CBS keys: the same search on fewer lanes.
                t1, t2, g1, g2 = _kth_regs(cand_ptr, w2, ix_row, h, c1, c2, rem1, rem2,
                                           pre1, pre2, nib0, H, PK, CBS)
            else:
                t1, t2, g1, g2 = _kth_any(cand_ptr, w2, ix_row, h, c1, c2, rem1, rem2,
                                          pre1, pre2, nib0, C, H, PK, CB)
        else:
            t1, t2, g1, g2 = _kth_any(cand_ptr, w2, ix_row, h, c1, c2, rem1, rem2, pre1,
                                      pre2, nib0, C, H, PK, CB)
        # Keys equal to a threshold inside the top k: rem minus the candidates above.
        tl.store(sel_ptr + rh * 4 + 0, tl.where(use1, t1, _INT_MAX))
        tl.store(sel_ptr + rh * 4 + 1, tl.where(use1, rem1 - g1, 0))
        tl.store(sel_ptr + rh * 4 + 2, tl.where(use2, t2, _INT_MAX))
        tl.store(sel_ptr + rh * 4 + 3, tl.where(use2, rem2 - g2, 0))
        tl.store(cnt_ptr + rh * 2, n_ret)
        tl.store(cnt_ptr + rh * 2 + 1, n_est)


# ------------------------------------------------------------------ 4. lists
@triton.jit
def _lower_counts(rg, sp, p, C, t, NB: tl.constexpr):
    """Keys of the ranges below ``p`` in bins above ``t``, and in bin ``t``, from
    their histograms as counts in bins >= b (``rg``: each range's row; ``t = NB``:
    none)."""
    below = sp < tl.where((C > 0) & (t < NB), p, 0)
    ge_t = tl.load(rg + t, mask=below, other=0)
    ge_next = tl.load(rg + t + 1, mask=sp < tl.where((C > 0) & (t + 1 < NB), p, 0),
                      other=0)
    above = tl.sum(ge_next, 0)
    return above, tl.sum(ge_t, 0) - above


@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _collect_kernel(keys_ptr, cand_ptr, lists_ptr, ncand_ptr, rng_ptr, sel_ptr, stats_ptr,
                    ip_ptr, ip_s0, ip_s1, bt_ptr, bt_s0, ibt_ptr, ibt_s0, seq_ptr, hdr_ptr,
                    hdr_s0, SB, S, NROWS, TGT, MSPLIT, DYN,
                    src_ptr, src_s0, pr_ptr, ct_ptr, stamp_ptr, clock_ptr, wcnt_ptr, mk_ptr,
                    mc_ptr, MCAP, WL, WNL, WP, WR, BP: tl.constexpr,
                    H: tl.constexpr, BS: tl.constexpr, RB: tl.constexpr, PK: tl.constexpr,
                    LW: tl.constexpr, NSP: tl.constexpr, CB: tl.constexpr,
                    COUNT_STATS: tl.constexpr, PDL: tl.constexpr = False,
                    WAVE: tl.constexpr = False, RV: tl.constexpr = 32,
                    EPB: tl.constexpr = 1, BUCKET: tl.constexpr = False,
                    hist_ptr=None, rgh_ptr=None, cnt_ptr=None, G: tl.constexpr = 1,
                    NB: tl.constexpr = 1, SUB: tl.constexpr = 1, WIN: tl.constexpr = 1,
                    ERR: tl.constexpr = False, keys2_ptr=None, hist2_ptr=None,
                    rgh2_ptr=None, emax_ptr=None, BAND: tl.constexpr = False, RI=1,
                    bd_ptr=None, bd_s0=0, bd_s1=0, ph_ptr=None, PHASE: tl.constexpr = False,
                    CARRY: tl.constexpr = False, mode_ptr=None):
    """Program (row*H + head, p): the selected entries of range p, in entry order,
    into the lists: top k1 -> retrieved, next k2 - k1 -> estimated.

    BAND (``rank_interval`` RI > 1, with BUCKET): a row re-ranking its last band
    selects among the band's entries (the score kernel's); any other row also writes
    its band to the table (list position ``k``'s page at ``bd[ix[k // 16], h, k %
    16]``, packed as the lists: the retrieved, then the estimated) and, program 0 of
    head 0, its context length to the header's ``HDR_BAND_AT`` (which no program of
    this step reads as a re-ranking row: that takes a length 1 to RI - 1 tokens
    back).

    The range's list
    offsets come from the keys of lower ranges: those above the buckets (counted by
    the candidate kernel) and the candidates above / equal to the thresholds.

    WAVE (:data:`RESOLVE_IN_COLLECT`): then the pages the range's retrieved
    clusters visit below the row's horizon are resolved as :func:`_resolve_kernel`
    resolves them (the cluster cache's lookups, stamps, counters and miss buffer,
    the source table ``src``), reading back the list entries the program has just
    written (``RV`` at a time); without it the wave arguments are dummies, never
    read.

    BUCKET (:data:`SELECT` "bucket", no candidate kernel before it): the
    thresholds are the row-head's histogram bins (``hist_ptr``) holding the k-th
    keys, keys in a bin rank by entry index, the lower ranges' counts above and in
    each bin (the key kernel's per-range histograms, ``rgh_ptr``) give the
    offsets, and program 0 writes the lists' lengths (``cnt_ptr``).

    ERR (the error rank, with BUCKET): the band is the top ``n_retrieve +
    n_estimate`` by score as above; its ``n_retrieve`` entries of largest error
    key (the band kernel's histogram ``hist2`` of the band's error bins, ties to
    the lower entry; offsets from its per-range counts ``rgh2``) are retrieved,
    the rest of the band estimated.

    CARRY (``RetroConfig.rank_reference`` "carried", with BUCKET): a row-head whose
    keys the score kernel wrote (its ``mode`` word) bins them as it did
    (:func:`_bound_bits`)."""
    _pdl_launch(PDL)
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    n_ret, n_est = _budget(hdr_ptr, hdr_s0, blk0, C)
    rr = E < 0
    if BAND:
        tl.static_assert(BUCKET, "band re-ranking needs the bucket selection")
        rr, C, NS = _band_rows(hdr_ptr, hdr_s0, blk0, L, E, C, NS, RI, ph_ptr, PHASE)
        if p >= NS:
            return
    _pdl_wait(PDL)
    k1 = n_ret
    use2 = n_est > 0
    lo, hi, per = _range(C, p, NS, PK)
    sp = tl.arange(0, NSP)
    lower = sp < tl.where(C > 0, p, 0)
    if BUCKET:
        # Thresholds as bins: t = the bin, need = the keys taken from it. ERR: the
        # band by score (t2, always: its top k1 by error are retrieved), then the
        # retrieved by error bin inside it (t1: the band kernel's histogram).
        mean_bits = _mean_bits(C, G)
        if CARRY:
            carried = tl.load(mode_ptr + rh) != 0
            mean_bits = tl.where(carried, _bound_bits(G, WIN), mean_bits)
        hist = tl.load(hist_ptr + rh * NB + tl.arange(0, NB))
        rg = rgh_ptr + (rh * MSPLIT + sp).to(tl.int64) * NB
        if ERR:
            kb = k1 + n_est
        else:
            kb = tl.where(use2, k1 + n_est, 0)
        t2, need2, a2, e2 = _threshold(hist, rg, sp, p, C, kb, NB)
        if ERR:
            hist2 = tl.load(hist2_ptr + rh * NB + tl.arange(0, NB))
            rg2 = rgh2_ptr + (rh * MSPLIT + sp).to(tl.int64) * NB
            t1, need1, a1, e1 = _threshold(hist2, rg2, sp, p, kb, k1, NB)
            top = tl.load(emax_ptr + rh)
        else:
            t1, need1, a1, e1 = _threshold(hist, rg, sp, p, C, k1, NB)
        g1 = lo * 0
        g2 = g1
        if p == 0:
            tl.store(cnt_ptr + rh * 2, n_ret)
            tl.store(cnt_ptr + rh * 2 + 1, n_est)
    else:
        a1 = tl.sum(tl.load(rng_ptr + (rh * NSP + sp) * 2, mask=lower, other=0), 0)
        a2 = tl.sum(tl.load(rng_ptr + (rh * NSP + sp) * 2 + 1, mask=lower, other=0), 0)
        t1 = tl.load(sel_ptr + rh * 4 + 0)
        need1 = tl.load(sel_ptr + rh * 4 + 1)
        t2 = tl.load(sel_ptr + rh * 4 + 2)
        need2 = tl.load(sel_ptr + rh * 4 + 3)
        c1 = tl.load(ncand_ptr + rh * 2)
        c2 = tl.load(ncand_ptr + rh * 2 + 1)
        # No second list while the second threshold is in use: both share the first.
        w2 = tl.where(c2 == 0, 0, 2 * PK)
        c2 = tl.where(c2 == 0, c1, c2)
        g1, e1 = _count_chunks(cand_ptr, 0, ix_row, h, c1, t1, lo, H, PK, CB)
        g2, e2 = _count_chunks(cand_ptr, w2, ix_row, h, c2, t2, lo, H, PK, CB)
    rc = a1 + g1 + tl.minimum(need1, e1)     # list position of this range's first retrieved
    in2 = a2 + g2 + tl.minimum(need2, e2)
    ec = k1 + tl.where(use2, in2 - rc, 0)    # ... and first estimated entry
    rc0 = rc
    ret_tok = lo * 0
    est_tok = ret_tok
    # Small tiles (one or two rows) load every entry's pool page beside its key, so
    # the load does not wait for the keys and the selection (one memory latency
    # fewer per tile); larger tiles load the selected entries' pages after the
    # selection: held across it, the pages cost 1,024-entry tiles registers (134
    # instead of 128 at sm_90: 3 programs per SM, not 4).
    EARLY_PAGES: tl.constexpr = RB <= 256
    for i0 in range(lo, hi, RB):
        i = i0 + tl.arange(0, RB)
        valid = i < hi
        key = tl.load(_packed(keys_ptr, ix_row, h, i, valid, H, PK, PK, 1), mask=valid,
                      other=-1)
        if EARLY_PAGES:
            eb32 = _entry_pages(ix_row, i, valid, rr, bd_ptr, bd_s0, bd_s1, h, BAND,
                                BRANCH=False)
        if BUCKET:
            v = _digit(key, mean_bits, SUB, NB, WIN)
        else:
            v = key
        eq2 = valid & (v == t2)
        r2 = e2 + tl.cumsum(eq2.to(tl.int32), 0) - 1
        inb = valid & ((v > t2) | (eq2 & (r2 < need2)))
        if ERR:
            key2 = tl.load(_packed(keys2_ptr, ix_row, h, i, inb, H, PK, PK, 1), mask=inb,
                           other=0)
            v1 = _edigit(key2, top, SUB, NB, WIN)
            eq1 = inb & (v1 == t1)
            r1 = e1 + tl.cumsum(eq1.to(tl.int32), 0) - 1
            in1 = inb & ((v1 > t1) | (eq1 & (r1 < need1)))
        else:
            eq1 = valid & (v == t1)
            r1 = e1 + tl.cumsum(eq1.to(tl.int32), 0) - 1
            in1 = valid & ((v > t1) | (eq1 & (r1 < need1)))
        ret = in1
        est = inb & (in1 == 0)
        sel = ret | est
        lp = tl.where(ret, rc + tl.cumsum(ret.to(tl.int32), 0) - 1,
                      ec + tl.cumsum(est.to(tl.int32), 0) - 1)
        if not EARLY_PAGES:
            eb32 = _entry_pages(ix_row, i, sel, rr, bd_ptr, bd_s0, bd_s1, h, BAND,
                                BRANCH=False)
        eb = eb32.to(tl.int64)
        ib = ip_ptr + eb * ip_s0 + h * ip_s1
        size = tl.load(ib + _I_SIZE, mask=sel, other=0)
        start = tl.load(ib + _I_START, mask=ret, other=0)
        lb, slot = _pack_page(ix_row, lp, sel, PK)
        la = lists_ptr + (lb.to(tl.uint32).to(tl.int64) * (H * LW) + (h * LW + slot * 2))
        tl.store(la, tl.where(ret, start, eb.to(tl.int32)), mask=sel)
        tl.store(la + 1, size, mask=sel)
        if BAND:
            # A full ranking's band: list position lp's page, packed as the lists.
            tl.store(_band_addr(bd_ptr, bd_s0, bd_s1, lb, h, slot), eb32,
                     mask=sel & (lp < tl.where(rr, 0, _INT_MAX)))
        rc += tl.sum(ret.to(tl.int32), 0)
        ec += tl.sum(est.to(tl.int32), 0)
        e1 += tl.sum(eq1.to(tl.int32), 0)
        e2 += tl.sum(eq2.to(tl.int32), 0)
        ret_tok += tl.sum(tl.where(ret, size, 0), 0)
        est_tok += tl.sum(tl.where(est, size, 0), 0)
    if WAVE:
        # The range's retrieved clusters are list entries [rc0, rc), written above by
        # every thread of the program: visible to all after the barrier (read past L1).
        tl.debug_barrier()
        _, HZB = _wave_horizon(hdr_ptr, hdr_s0, blk0, E > 0, E, WP, WR)
        clock = tl.load(clock_ptr)
        src_row = src_ptr + rh.to(tl.int64) * src_s0
        hits = tl.zeros([], tl.int64)
        for k0 in range(rc0, rc, RV):
            k = k0 + tl.arange(0, RV)
            kok = k < rc
            la = _packed(lists_ptr, ix_row, h, k, kok, H, LW, PK, 2)
            w_start = tl.load(la, mask=kok, other=0, cache_modifier=".cg")
            w_size = tl.load(la + 1, mask=kok, other=0, cache_modifier=".cg")
            hits += _visit_pages(kok, w_start, w_size, ix_row, src_row, S, SB, E, L, HZB,
                                 WL, WNL, WP, h, clock, pr_ptr, ct_ptr, stamp_ptr, wcnt_ptr,
                                 mk_ptr, mc_ptr, MCAP, H, BS)
        tl.atomic_add(wcnt_ptr + _W_HITS, hits, mask=hits > 0, sem="relaxed")
    if BAND:
        if (p == 0) & (h == 0) & (E > 0) & (rr == 0):
            tl.store(hdr_ptr + blk0 * hdr_s0 + _HDR_BA, L)
    if COUNT_STATS:
        # (Counters the host reads after the step: relaxed atomics, no ordering needed.)
        if L > 0:
            indexed = E > 0
            exact = ret_tok
            if p == 0:
                exact += tl.where(indexed, S + L - E, L)
                tl.atomic_add(stats_ptr + 4, L.to(tl.int64), sem="relaxed")
                if h == 0:
                    tl.atomic_add(stats_ptr + tl.where(indexed, 0, 1),
                                  (ret_tok * 0 + 1).to(tl.int64), sem="relaxed")
                    if BAND:
                        tl.atomic_add(stats_ptr + 5, rr.to(tl.int64), mask=rr,
                                      sem="relaxed")
                    if CARRY:
                        tl.atomic_add(stats_ptr + 6, carried.to(tl.int64), mask=carried,
                                      sem="relaxed")
            tl.atomic_add(stats_ptr + 2, exact.to(tl.int64), sem="relaxed")
            tl.atomic_add(stats_ptr + 3, est_tok.to(tl.int64), sem="relaxed")


# ------------------------------------------------------------------ 5. attention
@triton.jit
def _online_probs(m_i, l_i, s):
    """The softmax half of an online step over logits ``s [GP, T]``: (new max, new
    sum, the old accumulator's factor, the tile's probabilities)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)   # all -inf so far: stay at 0
    alpha = tl.exp(m_i - m_safe)
    pr = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    return m_new, l_i, alpha, pr


@triton.jit
def _product_rows(x, GP: tl.constexpr, G4: tl.constexpr, XR: tl.constexpr):
    """``x [GX, N]`` as the ``[GP, N]`` operand of a product: XR (``x`` holds the G4
    query-head rows) pads it with zero rows, else it is already ``[GP, N]``."""
    if XR:
        return _pad_rows(x, GP, G4, x.shape[1])
    else:
        return x


@triton.jit
def _online(m_i, l_i, acc, s, v, NATIVE: tl.constexpr, PREC: tl.constexpr,
            GP: tl.constexpr, G4: tl.constexpr, XR: tl.constexpr):
    """One online-softmax step: logits ``s [GX, T]`` over values ``v [T, DP]`` into
    ``acc [GP, DP]`` (GX: G4 with XR, else GP)."""
    m_new, l_i, alpha, pr = _online_probs(m_i, l_i, s)
    acc = (acc * _product_rows(alpha[:, None], GP, G4, XR)
           + _dot(_product_rows(pr, GP, G4, XR), v, NATIVE, PREC))
    return m_new, l_i, acc


@triton.jit
def _wide_mad(a, s, c):
    """``a * s + c`` as int64 for non-negative ``a``, ``s``, ``c`` below 2^31 (block
    ids, pool pages, strides, offsets inside a block; int32, or int64 holding such a
    value: the low 32 bits are used): one 32 x 32 -> 64-bit multiply-add.
    Signed, the compiler sign-extends each operand and multiplies in 64 bits (four
    to five integer instructions more per token row and thread)."""
    return _wide_mul(a, s) + c.to(tl.uint32).to(tl.int64)


@triton.jit
def _wide_mul(a, s):
    """``a * s`` as int64 for non-negative int32 ``a`` and ``s`` (:func:`_wide_mad`)."""
    return a.to(tl.uint32).to(tl.int64) * s.to(tl.uint32).to(tl.int64)


@triton.jit
def _block_of(pos, BS: tl.constexpr):
    """(block index, offset in the block) of token positions ``pos`` (int32,
    non-negative on the lanes that load): unsigned, a shift and a mask for a
    power-of-two block size instead of a signed division's sign corrections."""
    pu = pos.to(tl.uint32)
    return (pu // BS).to(tl.int32), (pu % BS).to(tl.int32)


@triton.jit
def _load_kv(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, blk, off, valid, h, D: tl.constexpr,
             DP: tl.constexpr):
    """K and V ``[T, DP]`` of the tokens at (physical block, offset) ``[T]`` (both
    int32, non-negative on the lanes ``valid``)."""
    d = tl.arange(0, DP)
    base = kv_ptr + _wide_mad(blk, kv_s0, h * kv_s1 + off * kv_s2)
    lm = valid[:, None] & (d < D)[None, :]
    k = tl.load(base[:, None] + d[None, :] * kv_s3, mask=lm, other=0.0)
    v = tl.load(base[:, None] + (D + d[None, :]) * kv_s3, mask=lm, other=0.0)
    return k, v


@triton.jit
def _attend_kv(q, k, v, valid, m_i, l_i, acc, scale, QN: tl.constexpr, PN: tl.constexpr,
               PREC: tl.constexpr, GP: tl.constexpr, G4: tl.constexpr, XR: tl.constexpr):
    """Exact attention step over loaded tokens ``k``, ``v`` ``[T, DP]``: the logits'
    product in :func:`_dot`'s form ``QN``, the values' in ``PN`` (XR: the logits
    folded to the G4 query-head rows, :func:`_fold_rows`)."""
    s = _dot(q, tl.trans(k), QN, PREC)
    if XR:
        s = _fold_rows(s, GP, G4, s.shape[1])
    s = tl.where(valid[None, :], s * scale, _NEG_INF)
    return _online(m_i, l_i, acc, s, v, PN, PREC, GP, G4, XR)


@triton.jit
def _steady_addr(bt_row, p, NS, m0, n_steady, split, E, BS: tl.constexpr,
                 TS: tl.constexpr):
    """(physical block, offset, valid) of steady-zone tokens j = p + NS (m0 + [0, TS))."""
    j = p + NS * (m0 + tl.arange(0, TS))
    valid = j < n_steady
    pos = tl.where(j < split, j, j - split + E)
    bi, off = _block_of(pos, BS)
    blk = tl.load(bt_row + bi, mask=valid, other=0)
    return blk, off, valid


@triton.jit
def _est_range(n, p, NS):
    """Program p's contiguous share [lo, hi) of n items split NS ways (sizes differ
    by at most one)."""
    q = n // NS
    rem = n - q * NS
    lo = p * q + tl.minimum(p, rem)
    return lo, lo + q + (p < rem).to(tl.int32)


@triton.jit
def _estimated_addr(lists_ptr, ix_row, h, n_ret, n_est, p, NS, m0, H: tl.constexpr,
                    LW: tl.constexpr, PK: tl.constexpr, TE: tl.constexpr,
                    ECONTIG: tl.constexpr = False):
    """(pool page, valid) of estimated list entries n_ret + p + NS (m0 + [0, TE)); with
    ECONTIG of entries n_ret + lo + m0 + [0, TE), program p's contiguous range [lo,
    hi) of the n_est (:func:`_est_range`)."""
    if ECONTIG:
        lo, hi = _est_range(n_est, p, NS)
        k = n_ret + lo + m0 + tl.arange(0, TE)
        ok = k < n_ret + hi
    else:
        k = n_ret + p + NS * (m0 + tl.arange(0, TE))
        ok = k < n_ret + n_est
    blk = tl.load(_packed(lists_ptr, ix_row, h, k, ok, H, LW, PK, 2), mask=ok,
                  other=0).to(tl.int64)
    return blk, ok


@triton.jit
def _group_positions(t0, total, beg, dpos, dcst, S, E, L, TR: tl.constexpr):
    """(position, its cluster's first position, valid) of tokens ``t0 + [0, TR)``
    of a group of retrieved clusters (concatenated; the cluster's start + offset:
    the index build made each cluster contiguous per KV head). ``beg``: each
    cluster's first token in the concatenation; ``dpos`` / ``dcst``: the steps of
    (start - beg) / start from the group's previous cluster (:func:`_retrieved_group`),
    so that the clusters beginning at or before a token add up to its cluster's
    values: one comparison per (token, cluster), no range test. Starts come from
    index bytes, so positions are bounds-checked to the row's clustered zone ``[S,
    E)`` and context: no index byte can make a row read outside its context."""
    t = t0 + tl.arange(0, TR)
    began = t[:, None] >= beg[None, :]
    pos = t + tl.sum(tl.where(began, dpos[None, :], 0), 1)
    cst = tl.sum(tl.where(began, dcst[None, :], 0), 1)
    valid = (t < total) & (pos >= S) & (pos < E) & (pos < L)
    return pos, cst, valid


@triton.jit
def _retrieved_addr(t0, total, beg, dpos, dcst, bt_row, S, E, L, BS: tl.constexpr,
                    TR: tl.constexpr):
    """(physical block, offset, valid) of tokens ``t0 + [0, TR)`` of a group of
    retrieved clusters, through the row's own block table."""
    pos, _, valid = _group_positions(t0, total, beg, dpos, dcst, S, E, L, TR)
    bi, off = _block_of(pos, BS)
    kb = tl.load(bt_row + bi, mask=valid, other=0)
    return kb, off, valid


@triton.jit
def _stream_runs(lists_ptr, ix_row, h, p, NS, it, n_ret, sa0, sz0, sa1, sz1, S, E, L,
                 H: tl.constexpr, LW: tl.constexpr, PK: tl.constexpr):
    """(first position, size) of items ``it`` of program ``p``'s stream (``SMG``):
    items 0 and 1 its two steady runs (given), items ``>= 2`` the retrieved clusters
    ``p + NS (it - 2)`` (those ``< n_ret``) from the selection lists, clamped to the
    row's clustered zone ``[S, min(E, L))`` here, once per cluster: every position of
    the stream lies in the row's context, whatever the index bytes say."""
    k = p + NS * (it - 2)
    real = (it >= 2) & (k < n_ret)
    la = _packed(lists_ptr, ix_row, h, k, real, H, LW, PK, 2)
    st = tl.load(la, mask=real, other=0).to(tl.int64)
    en = st + tl.load(la + 1, mask=real, other=0).to(tl.int64)
    st = tl.maximum(st, S)
    en = tl.minimum(en, tl.minimum(E, L))
    size = tl.where(real, tl.maximum(en - st, 0), 0).to(tl.int32)
    start = tl.where(size > 0, st, 0).to(tl.int32)
    start = tl.where(it == 0, sa0, tl.where(it == 1, sa1, start))
    size = tl.where(it == 0, sz0, tl.where(it == 1, sz1, size))
    return start, size


@triton.jit
def _stream_group(lists_ptr, ix_row, h, p, NS, m0, n_ret, sa0, sz0, sa1, sz1, S, E, L,
                  H: tl.constexpr, LW: tl.constexpr, PK: tl.constexpr, RG: tl.constexpr):
    """Items ``m0 + [0, RG)`` of program ``p``'s stream (:func:`_stream_runs`), their
    tokens concatenated: (dpos, beg, total) in :func:`_retrieved_group`'s form (the
    previous item's values computed again rather than shifted in registers)."""
    i = tl.arange(0, RG)
    start, size = _stream_runs(lists_ptr, ix_row, h, p, NS, m0 + i, n_ret, sa0, sz0, sa1,
                               sz1, S, E, L, H, LW, PK)
    pok = (m0 + i >= 1) & (i > 0)
    start_p, size_p = _stream_runs(lists_ptr, ix_row, h, p, NS, m0 + i - 1, n_ret, sa0,
                                   sz0, sa1, sz1, S, E, L, H, LW, PK)
    end = tl.cumsum(size, 0)
    beg = end - size
    dpos = (start - beg) - tl.where(pok, start_p - beg + size_p, 0)
    return dpos, beg, tl.sum(size, 0)


@triton.jit
def _stream_addr(t0, total, beg, dpos, bt_row, BS: tl.constexpr, TR: tl.constexpr):
    """(physical block, offset, valid) of tokens ``t0 + [0, TR)`` of a group of
    :func:`_stream_group` (positions checked there, per run)."""
    t = t0 + tl.arange(0, TR)
    pos = t + tl.sum(tl.where(t[:, None] >= beg[None, :], dpos[None, :], 0), 1)
    valid = t < total
    bi, off = _block_of(pos, BS)
    kb = tl.load(bt_row + bi, mask=valid, other=0)
    return kb, off, valid


@triton.jit
def _retrieved_group(lists_ptr, ix_row, h, p, NS, m0, n_ret, H: tl.constexpr,
                     LW: tl.constexpr, PK: tl.constexpr, RG: tl.constexpr):
    """Program ``p``'s retrieved clusters ``p + NS * (m0 + [0, RG))`` of a row-head
    (those ``< n_ret``) from the selection lists, their tokens concatenated (``total``
    tokens): (dpos, dcst, beg, total), per cluster its first token in the
    concatenation ``beg`` and the steps of ``start - beg`` and of ``start`` (its
    first position) from the group's previous cluster (the first cluster's own
    values), :func:`_group_positions`'s form. (The previous cluster's entry is read
    again rather than shifted in registers: one more pair of loads per group, on the
    lines just read.)"""
    i = tl.arange(0, RG)
    k = p + NS * (m0 + i)
    kok = k < n_ret
    la = _packed(lists_ptr, ix_row, h, k, kok, H, LW, PK, 2)
    start = tl.load(la, mask=kok, other=0)
    size = tl.load(la + 1, mask=kok, other=0)
    pok = kok & (i > 0)
    lp = _packed(lists_ptr, ix_row, h, k - NS, pok, H, LW, PK, 2)
    start_p = tl.load(lp, mask=pok, other=0)
    size_p = tl.load(lp + 1, mask=pok, other=0)
    end = tl.cumsum(size, 0)
    beg = end - size
    # The previous cluster's start - beg is start_p - (beg - size_p); 0 before the first.
    dpos = (start - beg) - tl.where(pok, start_p - beg + size_p, 0)
    return dpos, start - start_p, beg, tl.sum(size, 0)


@triton.jit
def _page_source(ix_row, lb, mask, WL, WNL, WP, h, pr_ptr, ct_ptr, H: tl.constexpr):
    """Where the wave buffer holds logical block ``lb`` of a row-head (lanes
    ``mask``): its pool page's key ``(pg * WNL + WL) * H + h`` (``pg = ix_row[lb]``
    in ``[0, WP)``), the cluster-cache slot (``in_cache``: ``cache_table[key] >=
    0``) or else the arena row (``in_arena``: ``page_row[key] >= 0``). Returns
    (slot, arena row, in_cache, in_arena, key)."""
    pg = tl.load(ix_row + lb, mask=mask, other=-1).to(tl.int64)
    wok = mask & (pg >= 0) & (pg < WP)
    key = (tl.where(wok, pg, 0) * WNL + WL) * H + h
    # Both tables at once (independent loads; a hit's page_row word is not needed,
    # but waiting for the slot first would add a dependent load to a miss).
    slot = tl.load(ct_ptr + key, mask=wok, other=-1)
    arow = tl.load(pr_ptr + key, mask=wok, other=-1).to(tl.int64)
    return slot, arow, wok & (slot >= 0), wok & (slot < 0) & (arow >= 0), key


@triton.jit
def _source_word(slot, arow, in_cache, in_arena):
    """A resolved page's word in the source table (:data:`_SRC_CACHE` /
    :data:`_SRC_ARENA` | slot or arena row; -1: in no source)."""
    return tl.where(in_cache, _SRC_CACHE | slot, tl.where(in_arena, _SRC_ARENA | arow, -1))


@triton.jit
def _retrieved_wave(t0, total, beg, dpos, dcst, ix_row, S, SB, E, L, HZB, WL, WNL, WP, h,
                    pr_ptr, ct_ptr, H: tl.constexpr, BS: tl.constexpr, TR: tl.constexpr):
    """Tokens ``t0 + [0, TR)`` of a group of retrieved clusters below a row's readable
    horizon ``HZB`` (:func:`_wave_horizon`), as the resolve kernel sees them: per
    token its logical block ``lb`` (entry index ``pos // BS - SB`` of the row's
    index table), the pool page's key ``(pg * WNL + WL) * H + h`` (``pg =
    ix_row[lb]``, in ``[0, WP)``: the view's pool pages), and where the page is: in
    the cluster cache (``in_cache``: slot ``cache_table[key]``) or the arena
    (``in_arena``: row ``page_row[key]``). A token in neither (page neither cached
    nor mirrored, or no pool page) is in no source (left out). ``first``: the first
    token below the horizon of its cluster in its page (one lane per visit)."""
    pos, cst, valid = _group_positions(t0, total, beg, dpos, dcst, S, E, L, TR)
    below = valid & (pos < HZB)
    # pos >= S, so the entry index pos // BS - SB is >= 0 and (pos < E) below the
    # row's page count: the row's own pages, never a stale column.
    lb = pos // BS - SB
    slot, arow, in_cache, in_arena, key = _page_source(ix_row, lb, below, WL, WNL, WP, h,
                                                       pr_ptr, ct_ptr, H)
    # Positions below S were clipped: the first valid token then sits at S, a block
    # start, so "cluster start or block start" marks exactly one lane per page.
    first = below & ((pos == cst) | (pos % BS == 0))
    return lb, slot, arow, in_cache, in_arena, first, key


# A resolved page (DecodeWorkspace.wave_src): the source in bits 60-61, below them
# the cache slot or the arena row of the page's first token; -1: no source. (Indices,
# not addresses: multiplied by the strides in the attention kernel, the addresses
# keep the alignment Triton proves for stride arguments, so K/V loads vectorise.)
_SRC_CACHE = tl.constexpr(1 << 60)
_SRC_ARENA = tl.constexpr(2 << 60)
_SRC_INDEX = tl.constexpr((1 << 60) - 1)


@triton.jit
def _wave_horizon(hdr_ptr, hdr_s0, blk0, indexed, E, WP, WR):
    """(HZ, HZB) of a row with a wave buffer view: its mirrored horizon (header
    ``HDR_HORIZON``, at most its clustered end, 0 without an index), and the same
    where its index-table row and the view's pool pages can be read, else 0 (then
    nothing below ``HZ`` is read)."""
    hdr0 = hdr_ptr + blk0 * hdr_s0
    HZ = tl.where(indexed, tl.minimum(tl.load(hdr0 + _HDR_HZ), E), 0)
    wrow = tl.load(hdr0 + _HDR_IBT)
    return HZ, tl.where((wrow >= 0) & (wrow < WR) & (WP > 0), HZ, 0)


@triton.jit
def _wave_addr(t0, total, beg, dpos, dcst, bt_row, src_row, S, SB, E, L, HZ, HZB,
               kv_ptr, kv_s0, kv_s1, kv_s2, ckv_ptr, ckv_s0, ckv_s1, ar_ptr, ar_s0, h,
               BS: tl.constexpr, TR: tl.constexpr):
    """(address, valid) of tokens ``t0 + [0, TR)`` of a group of
    retrieved clusters of a row with a mirrored horizon ``HZ``: at or above it
    through the block table, below it at the page address the resolve kernel wrote
    for the row-head (``src_row[pos // BS - SB]``), never through the block table
    (vLLM may have reused those blocks); ``HZB``: :func:`_wave_horizon`'s. One
    dependent load per token, as without a wave buffer: the cache lookups happened
    in the resolve kernel."""
    pos, _, valid = _group_positions(t0, total, beg, dpos, dcst, S, E, L, TR)
    paged = valid & (pos >= HZ)
    below = valid & (pos < HZB)
    bi, off = _block_of(pos, BS)
    kb = tl.load(bt_row + bi, mask=paged, other=0)
    src = tl.load(src_row + (bi - SB), mask=below, other=-1)
    # (cache slots and arena rows are below 2^31: the launcher's _check_index_width)
    i = (src & _SRC_INDEX).to(tl.int32)
    in_cache = below & (src >= 0) & ((src & _SRC_CACHE) != 0)
    in_arena = below & (src >= 0) & ((src & _SRC_ARENA) != 0)
    ptr = tl.where(in_cache, ckv_ptr + _wide_mad(i, ckv_s0, off * ckv_s1),
                   tl.where(in_arena, ar_ptr + _wide_mul(i + off, ar_s0),
                            kv_ptr + _wide_mad(kb, kv_s0, h * kv_s1 + off * kv_s2)))
    # Every source's token rows start 16-byte aligned (head sizes are multiples of
    # 8; the cache, cluster cache and arena rows are whole heads). The select and
    # the loop that carries the result hide that from the compiler: stated here,
    # the K/V loads are 16-byte vectors, not one 2-byte load per element.
    ptr = tl.multiple_of(ptr, 16)
    return ptr, paged | in_cache | in_arena


@triton.jit
def _load_kv_at(ptr, ok, D: tl.constexpr, DP: tl.constexpr):
    """K and V ``[T, DP]`` of tokens at their own addresses (K at ``ptr``, V ``D``
    elements after it; unit element stride in every source; 16-byte aligned, see
    :func:`_wave_addr`)."""
    d = tl.arange(0, DP)
    lm = ok[:, None] & (d < D)[None, :]
    k = tl.load(ptr[:, None] + d[None, :], mask=lm, other=0.0)
    v = tl.load(ptr[:, None] + (D + d[None, :]), mask=lm, other=0.0)
    return k, v


@triton.jit
def _wave_book(slot, in_cache, in_arena, lead, clock, stamp_ptr, wcnt_ptr, mc_ptr):
    """Cluster-cache bookkeeping of one tile: per visit (``lead`` lanes) a hit stamps
    its slot with the step; a miss on a mirrored page is counted and gets an entry
    of the miss buffer (one atomic per tile with misses reserves them). Returns
    (miss lanes, their entry indices, the tile's hits): the entries for
    :func:`_wave_misses`, issued later so the atomic's round trip overlaps the
    tile's attention; the hits are added up by the caller and counted once per
    program (a warm cache hits in every tile: one atomic per tile on one shared
    counter would serialise every program of the step on it)."""
    hit = lead & in_cache
    miss = lead & in_arena
    tl.store(stamp_ptr + slot, clock + tl.zeros_like(slot), mask=hit)
    nh = tl.sum(hit.to(tl.int64), 0)
    nm = tl.sum(miss.to(tl.int64), 0)
    tl.atomic_add(wcnt_ptr + _W_MISSES, nm, mask=nm > 0, sem="relaxed")
    base = tl.atomic_add(mc_ptr, nm, mask=nm > 0, sem="relaxed")
    idx = base + tl.cumsum(miss.to(tl.int64), 0) - 1
    return miss, idx, nh


@triton.jit
def _wave_misses(miss, idx, key, mk_ptr, MCAP):
    """Appends the tile's missed page keys (entries past ``MCAP`` are dropped)."""
    tl.store(mk_ptr + idx, key, mask=miss & (idx < MCAP))


@triton.jit
def _visit_pages(ok, start, size, ix_row, src_row, S, SB, E, L, HZB, WL, WNL, WP, h, clock,
                 pr_ptr, ct_ptr, stamp_ptr, wcnt_ptr, mk_ptr, mc_ptr, MCAP,
                 H: tl.constexpr, BS: tl.constexpr):
    """Resolves the pages retrieved clusters ``(start, size)`` (lanes ``ok``) visit
    below a row's readable horizon ``HZB``, one visit per (cluster, page), as
    :func:`_resolve_kernel` does per token tile: the page's source written to
    ``src_row`` (its logical block's entry), the cache's bookkeeping
    (:func:`_wave_book`, :func:`_wave_misses`). A cluster's positions are clipped to
    ``[S, min(E, L, HZB))`` as the attention kernel clips them. Returns the hits."""
    p0 = tl.maximum(start, S)
    p1 = tl.minimum(tl.minimum(start + size, E), tl.minimum(L, HZB))
    vis = ok & (p1 > p0)
    lb0 = p0 // BS - SB                  # p0 >= S: the row's own entries
    npg = tl.where(vis, (p1 - 1) // BS - p0 // BS + 1, 0)
    hits = tl.zeros([], tl.int64)
    for j in range(0, tl.max(npg, 0)):
        on = vis & (j < npg)
        lb = lb0 + j
        slot, arow, in_cache, in_arena, key = _page_source(ix_row, lb, on, WL, WNL, WP, h,
                                                           pr_ptr, ct_ptr, H)
        tl.store(src_row + lb, _source_word(slot, arow, in_cache, in_arena), mask=on)
        miss, idx, nh = _wave_book(slot, in_cache, in_arena, on, clock, stamp_ptr, wcnt_ptr,
                                   mc_ptr)
        hits += nh
        _wave_misses(miss, idx, key, mk_ptr, MCAP)
    return hits


@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _resolve_kernel(bt_ptr, bt_s0, ibt_ptr, ibt_s0, seq_ptr, hdr_ptr, hdr_s0, lists_ptr,
                    cnt_ptr, src_ptr, src_s0, SB, S, NROWS, TGT, MSPLIT, DYN,
                    pr_ptr, ct_ptr, stamp_ptr, clock_ptr, wcnt_ptr, mk_ptr,
                    mc_ptr, MCAP, WL, WNL, WP, WR,
                    H: tl.constexpr, BS: tl.constexpr, RG: tl.constexpr, TR: tl.constexpr,
                    PK: tl.constexpr, LW: tl.constexpr, BP: tl.constexpr,
                    PDL: tl.constexpr = False,
                    EPB: tl.constexpr = 1):
    """Program (row*H + head, p), with a wave buffer: for the retrieved clusters
    congruent to p mod NS, every page they visit below the row's horizon is looked
    up in the cluster cache (hit: its slot stamped with the step and counted) or
    found in the arena (miss: counted, its key appended to the miss buffer), and its
    address written to ``src[row-head, page]`` (:data:`_SRC_CACHE` /
    :data:`_SRC_ARENA` | the cache slot or arena row of the page; -1: in no
    source), where the attention kernel reads it. A page two clusters visit is
    counted twice and written twice with the same value."""
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    indexed = E > 0
    _, HZB = _wave_horizon(hdr_ptr, hdr_s0, blk0, indexed, E, WP, WR)
    clock = tl.load(clock_ptr)
    src_row = src_ptr + rh.to(tl.int64) * src_s0
    _pdl_wait(PDL)
    n_ret = tl.where(indexed, tl.load(cnt_ptr + rh * 2), 0)
    n_mine = tl.maximum(n_ret - p + NS - 1, 0) // NS
    hits = tl.zeros([], tl.int64)
    for m0 in range(0, n_mine, RG):
        dpos, dcst, beg, total = _retrieved_group(lists_ptr, ix_row, h, p, NS, m0, n_ret,
                                                  H, LW, PK, RG)
        for t0 in range(0, total, TR):
            lb, slot, arow, in_cache, in_arena, first, key = _retrieved_wave(
                t0, total, beg, dpos, dcst, ix_row, S, SB, E, L, HZB, WL, WNL, WP, h, pr_ptr,
                ct_ptr, H, BS, TR)
            tl.store(src_row + lb, _source_word(slot, arow, in_cache, in_arena), mask=first)
            miss, idx, nh = _wave_book(slot, in_cache, in_arena, first, clock, stamp_ptr,
                                       wcnt_ptr, mc_ptr)
            hits += nh
            _wave_misses(miss, idx, key, mk_ptr, MCAP)
    tl.atomic_add(wcnt_ptr + _W_HITS, hits, mask=hits > 0, sem="relaxed")
    _pdl_launch(PDL)


@triton.jit(do_not_specialize=_BATCH_ARGS, **_NO_ALIGN)
def _attend_kernel(q_ptr, q_sb, q_sh, q_sd, kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3,
                   fp_ptr, fp_s0, fp_s1, fp_s2, fp_s3,
                   fq_ptr, fq_s0, fq_s1, fq_s2, fs_ptr, fs_s0, fs_s1, fs_s2,
                   bt_ptr, bt_s0, ibt_ptr, ibt_s0, seq_ptr, hdr_ptr, hdr_s0, lg_ptr, lists_ptr,
                   cnt_ptr,
                   po_ptr, pm_ptr, pl_ptr, tick_ptr, out_ptr, o_sb, o_sh, o_sd,
                   scale, SB, S, NROWS, TGT, MSPLIT, DYN,
                   src_ptr, src_s0, ar_ptr, ar_s0, ckv_ptr, ckv_s0, ckv_s1, WP, WR,
                   H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, G4: tl.constexpr,
                   D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                   RG: tl.constexpr, TR: tl.constexpr, TE: tl.constexpr,
                   PK: tl.constexpr, LW: tl.constexpr, NSP: tl.constexpr,
                   NATIVE: tl.constexpr, PREC: tl.constexpr, BP: tl.constexpr,
                   PDL: tl.constexpr = False, WAVE: tl.constexpr = False,
                   MV8: tl.constexpr = False, VC: tl.constexpr = False,
                   EPB: tl.constexpr = 1, XR: tl.constexpr = False,
                   PRE: tl.constexpr = False, QB: tl.constexpr = False,
                   PB: tl.constexpr = False, ZONES: tl.constexpr = 7,
                   SMG: tl.constexpr = False, ECONTIG: tl.constexpr = False):
    """Program (row*H + head, p): its share of the steady zone, of the retrieved
    clusters and of the estimated clusters (the items congruent to p mod NS; the
    steady zone's a contiguous one with SMG) -> one partial softmax; the last program
    of the row-head merges the partials into ``out``.

    WAVE: retrieved tokens below the row's horizon (header ``HDR_HORIZON``) come
    from the wave buffer, at the page addresses :func:`_resolve_kernel` wrote to
    ``src`` (the cluster cache ``ckv`` or the arena ``ar`` of the layer's
    :class:`WaveBufferView`; ``WP``: its pool pages, ``WR``: the index table's
    rows); without it those arguments are dummies, never read, and the horizon is
    ignored.

    MV8: the pool keeps 8-bit mean values (``fq``: ``fpart``'s int8 view, slot 2's
    first D bytes; ``fs``: its float32 view, the scale at slot 2's byte D): an
    estimated cluster's probability is multiplied by its scale and the int8 values
    enter the product as they are (exact in the 16-bit dtype).

    VC: the pool holds the value correction's pair (``fpart`` slots 3 and 4, ``sigma
    u`` and ``w``): an estimated cluster's value for query head ``g`` is ``mean v +
    scale (q_g . sigma u) w``, i.e. its probabilities times those coefficients enter
    one more product with ``w`` (``2D`` elements more per estimated cluster).

    XR: the softmax runs on the G4 query-head rows (as the score kernel's XR): each
    tile's logits are folded from the products' GP rows (exact: the query's padded
    rows are zeros) and its probabilities padded back for the product with V; the
    running max and sum are ``[G4]``.

    PRE: the retrieved and estimated zones' first addresses are loaded before the
    steady zone's tiles and each retrieved group's successor during its tiles (the
    same values in the same order: bit-equal outputs).

    QB (with NATIVE): the query holds values of the cache's dtype (the launcher sets
    it when the two dtypes are equal), so the logits take one 16-bit product instead
    of NATIVE's two (the low part is zero: bit-equal outputs). PB (with NATIVE): the
    probabilities enter the value products rounded to the cache's dtype, one product
    instead of two (as FlashAttention's; not bit-equal).

    ECONTIG (without PRE): a program's estimated clusters are a contiguous range of
    the list (:func:`_est_range`) instead of every NS-th entry: a tile's list entries
    share their index-table entries and 32-byte sectors.

    SMG (without WAVE and PRE): a program's share of the steady zone (a contiguous
    one: two runs of positions) leads its retrieved clusters in one stream of tiles
    (:func:`_stream_group`) instead of a loop of its own, and the clusters are
    bounds-checked once each instead of per token: one chain of tiles per program,
    no partly filled steady tile (the same terms, shared and summed in another order).

    ZONES (a measurement knob, never set by the backend): the zones whose loops run,
    bit 1 the steady zone, 2 the retrieved clusters, 4 the estimated ones (7, all:
    the attention). A sweep times the kernel with some loops left out to see what
    each zone and the fixed part (prologue, partials, merge: ``ZONES`` 0) cost; the
    output is then not the attention."""
    rh, p, NS, NR, active = _program(seq_ptr, NROWS, TGT, MSPLIT, DYN, H, BP)
    if not active:
        if (rh >= NR * H) & (p == 0):
            # A row past the last one with context (a CUDA graph's padding): zeros
            # (every element of ``out`` is written).
            zg = tl.arange(0, G4)
            zd = tl.arange(0, DP)
            zo = (out_ptr + (rh // H).to(tl.int64) * o_sb
                  + ((rh % H) * G + zg)[:, None] * o_sh + zd[None, :] * o_sd)
            tl.store(zo, tl.zeros([G4, DP], tl.float32).to(out_ptr.dtype.element_ty),
                     mask=(zg < G)[:, None] & (zd < D)[None, :])
        return
    r = rh // H
    h = rh % H
    L, bt_row, ix_row, blk0, E, C = _row_info(seq_ptr, bt_ptr, bt_s0, ibt_ptr, ibt_s0, hdr_ptr,
                                              hdr_s0, r, SB, BS, EPB)
    indexed = E > 0
    n_steady = tl.where(indexed, S + L - E, L)
    split = tl.where(indexed, S, L)      # steady index j >= split lies at E + j - split
    _pdl_wait(PDL)
    n_ret = tl.where(indexed, tl.load(cnt_ptr + rh * 2), 0)
    n_est = tl.where(indexed, tl.load(cnt_ptr + rh * 2 + 1), 0)

    # The products' forms (:func:`_dot`): the logits' (QN) and the values' (PN).
    QN: tl.constexpr = 2 if (NATIVE and QB) else (1 if NATIVE else 0)
    PN: tl.constexpr = 2 if (NATIVE and PB) else (1 if NATIVE else 0)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    gm = g < G
    dm = d < D
    q = tl.load(q_ptr + r.to(tl.int64) * q_sb + (h * G + g)[:, None] * q_sh + d[None, :] * q_sd,
                mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    # The rows of the softmax: the query heads' G4 (XR) or the products' GP.
    GX: tl.constexpr = G4 if XR else GP
    gx = tl.arange(0, GX)
    gxm = gx < G
    m_i = tl.full([GX], _NEG_INF, tl.float32)
    l_i = tl.zeros([GX], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)

    # Every loop below is software-pipelined by hand: a tile's K/V (or summary)
    # loads are issued before the next tile's chain of dependent index loads, so
    # the two latencies overlap instead of adding up.

    if PRE:
        # The first retrieved group's lists and first tile's addresses, and the first
        # estimated tile's pool pages, before the steady zone's tiles: the three
        # zones' chains of dependent index loads overlap instead of following each
        # other (and each group's successor is loaded during its tiles, below).
        if WAVE:
            HZ, HZB = _wave_horizon(hdr_ptr, hdr_s0, blk0, indexed, E, WP, WR)
            src_row = src_ptr + rh.to(tl.int64) * src_s0
        dpos, dcst, beg, total = _retrieved_group(lists_ptr, ix_row, h, p, NS, 0, n_ret, H,
                                                  LW, PK, RG)
        if WAVE:
            w_ptr, w_ok = _wave_addr(0, total, beg, dpos, dcst, bt_row, src_row, S, SB, E, L,
                                     HZ, HZB, kv_ptr, kv_s0, kv_s1, kv_s2, ckv_ptr, ckv_s0,
                                     ckv_s1, ar_ptr, ar_s0, h, BS, TR)
        else:
            r_blk, r_off, r_ok = _retrieved_addr(0, total, beg, dpos, dcst, bt_row, S, E, L,
                                                 BS, TR)
        e_blk, e_ok = _estimated_addr(lists_ptr, ix_row, h, n_ret, n_est, p, NS, 0,
                                      H, LW, PK, TE)

    # Steady zone: tokens j = p, p + NS, ... of [0, sink_end) + [clustered_end, L).
    # (Each loop has its own variable names: Triton types loop-carried values by
    # name, and the tiles of the three loops differ in size.)
    n_mine = tl.maximum(n_steady - p + NS - 1, 0) // NS
    if (ZONES & 1) == 0:
        n_mine = 0
    # (SMG: the steady zone is attended in the retrieved stream below.)
    MERGED: tl.constexpr = SMG and (not WAVE) and (not PRE)
    if not MERGED:
        s_blk, s_off, s_ok = _steady_addr(bt_row, p, NS, 0, n_steady, split, E, BS, TS)
        for m0 in range(0, n_mine, TS):
            s_k, s_v = _load_kv(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, s_blk, s_off, s_ok, h, D,
                                DP)
            s_blk_n, s_off_n, s_ok_n = _steady_addr(bt_row, p, NS, m0 + TS, n_steady, split,
                                                    E, BS, TS)
            m_i, l_i, acc = _attend_kv(q, s_k, s_v, s_ok, m_i, l_i, acc, scale, QN, PN,
                                       PREC, GP, G4, XR)
            s_blk, s_off, s_ok = s_blk_n, s_off_n, s_ok_n

    # Retrieved clusters k = p, p + NS, ... in groups of RG; a group's tokens are
    # concatenated and attended TR at a time (positions [start, start + size)).
    n_ret_mine = tl.maximum(n_ret - p + NS - 1, 0) // NS
    if (ZONES & 2) == 0:
        n_ret_mine = 0
    if WAVE:
        # Below the horizon the row's blocks may be released: K/V from the cluster
        # cache or the arena, at the page addresses the resolve kernel wrote.
        if not PRE:
            HZ, HZB = _wave_horizon(hdr_ptr, hdr_s0, blk0, indexed, E, WP, WR)
            src_row = src_ptr + rh.to(tl.int64) * src_s0
        for m0 in range(0, n_ret_mine, RG):
            if PRE:
                w_dpos, w_dcst, w_beg, w_total = dpos, dcst, beg, total
                dpos, dcst, beg, total = _retrieved_group(lists_ptr, ix_row, h, p, NS,
                                                          m0 + RG, n_ret, H, LW, PK, RG)
                w_ptr_g, w_ok_g = _wave_addr(0, total, beg, dpos, dcst, bt_row, src_row, S,
                                             SB, E, L, HZ, HZB, kv_ptr, kv_s0, kv_s1, kv_s2,
                                             ckv_ptr, ckv_s0, ckv_s1, ar_ptr, ar_s0, h, BS,
                                             TR)
            else:
                w_dpos, w_dcst, w_beg, w_total = _retrieved_group(lists_ptr, ix_row, h, p,
                                                                  NS, m0, n_ret, H, LW, PK,
                                                                  RG)
                w_ptr, w_ok = _wave_addr(0, w_total, w_beg, w_dpos, w_dcst, bt_row, src_row,
                                         S, SB, E, L, HZ, HZB, kv_ptr, kv_s0, kv_s1, kv_s2,
                                         ckv_ptr, ckv_s0, ckv_s1, ar_ptr, ar_s0, h, BS, TR)
            for t0 in range(0, w_total, TR):
                w_kt, w_vt = _load_kv_at(w_ptr, w_ok, D, DP)
                w_ptr_n, w_ok_n = _wave_addr(t0 + TR, w_total, w_beg, w_dpos, w_dcst, bt_row,
                                             src_row, S, SB, E, L, HZ, HZB, kv_ptr, kv_s0,
                                             kv_s1, kv_s2, ckv_ptr, ckv_s0, ckv_s1, ar_ptr,
                                             ar_s0, h, BS, TR)
                m_i, l_i, acc = _attend_kv(q, w_kt, w_vt, w_ok, m_i, l_i, acc, scale,
                                           QN, PN, PREC, GP, G4, XR)
                w_ptr, w_ok = w_ptr_n, w_ok_n
            if PRE:
                w_ptr, w_ok = w_ptr_g, w_ok_g
    elif MERGED:
        # One stream per program: its contiguous share of the steady zone (indices
        # [j0, j1) of [0, sink_end) + [clustered_end, L): two runs of positions),
        # then its retrieved clusters.
        c = (n_steady + NS - 1) // NS
        j0 = tl.minimum(p * c, n_steady)
        j1 = tl.minimum(j0 + c, n_steady)
        if (ZONES & 1) == 0:
            j1 = j0
        sa0 = j0
        sz0 = tl.maximum(tl.minimum(j1, split) - j0, 0)
        jb = tl.maximum(j0, split)
        sa1 = jb - split + E
        sz1 = tl.maximum(j1 - jb, 0)
        n_ret_z = n_ret if (ZONES & 2) != 0 else 0
        for m0 in range(0, n_ret_mine + 2, RG):
            x_dpos, x_beg, x_total = _stream_group(lists_ptr, ix_row, h, p, NS, m0, n_ret_z,
                                                   sa0, sz0, sa1, sz1, S, E, L, H, LW, PK,
                                                   RG)
            x_blk, x_off, x_ok = _stream_addr(0, x_total, x_beg, x_dpos, bt_row, BS, TR)
            for t0 in range(0, x_total, TR):
                x_kt, x_vt = _load_kv(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, x_blk, x_off, x_ok,
                                      h, D, DP)
                x_blk_n, x_off_n, x_ok_n = _stream_addr(t0 + TR, x_total, x_beg, x_dpos,
                                                        bt_row, BS, TR)
                m_i, l_i, acc = _attend_kv(q, x_kt, x_vt, x_ok, m_i, l_i, acc, scale,
                                           QN, PN, PREC, GP, G4, XR)
                x_blk, x_off, x_ok = x_blk_n, x_off_n, x_ok_n
    else:
        for m0 in range(0, n_ret_mine, RG):
            if PRE:
                g_dpos, g_dcst, g_beg, g_total = dpos, dcst, beg, total
                dpos, dcst, beg, total = _retrieved_group(lists_ptr, ix_row, h, p, NS,
                                                          m0 + RG, n_ret, H, LW, PK, RG)
                r_blk_g, r_off_g, r_ok_g = _retrieved_addr(0, total, beg, dpos, dcst, bt_row,
                                                           S, E, L, BS, TR)
            else:
                g_dpos, g_dcst, g_beg, g_total = _retrieved_group(lists_ptr, ix_row, h, p,
                                                                  NS, m0, n_ret, H, LW, PK,
                                                                  RG)
                r_blk, r_off, r_ok = _retrieved_addr(0, g_total, g_beg, g_dpos, g_dcst,
                                                     bt_row, S, E, L, BS, TR)
            for t0 in range(0, g_total, TR):
                r_kt, r_vt = _load_kv(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, r_blk, r_off, r_ok,
                                      h, D, DP)
                r_blk_n, r_off_n, r_ok_n = _retrieved_addr(t0 + TR, g_total, g_beg, g_dpos,
                                                           g_dcst, bt_row, S, E, L, BS, TR)
                m_i, l_i, acc = _attend_kv(q, r_kt, r_vt, r_ok, m_i, l_i, acc, scale,
                                           QN, PN, PREC, GP, G4, XR)
                r_blk, r_off, r_ok = r_blk_n, r_off_n, r_ok_n
            if PRE:
                r_blk, r_off, r_ok = r_blk_g, r_off_g, r_ok_g

    # Estimated clusters: log-mass (from the score kernel) over the mean value.
    n_mine = tl.maximum(n_est - p + NS - 1, 0) // NS
    if ECONTIG:
        tl.static_assert(not PRE, "ECONTIG: without PRE")
        e_lo, e_hi = _est_range(n_est, p, NS)
        n_mine = tl.maximum(e_hi - e_lo, 0)
    if (ZONES & 4) == 0:
        n_mine = 0
    if not PRE:
        e_blk, e_ok = _estimated_addr(lists_ptr, ix_row, h, n_ret, n_est, p, NS, 0,
                                      H, LW, PK, TE, ECONTIG)
    for m0 in range(0, n_mine, TE):
        e_s = tl.load(lg_ptr + e_blk[None, :] * (H * G) + h * G + gx[:, None],
                      mask=gxm[:, None] & e_ok[None, :], other=_NEG_INF)
        if MV8:
            e_q = tl.load(fq_ptr + (e_blk * fq_s0 + h * fq_s1 + 2 * fq_s2)[:, None]
                          + d[None, :], mask=e_ok[:, None] & dm[None, :], other=0)
            e_sc = tl.load(fs_ptr + e_blk * fs_s0 + h * fs_s1 + 2 * fs_s2 + D // 4,
                           mask=e_ok, other=0.0)
        else:
            e_v = tl.load(fp_ptr + e_blk[:, None] * fp_s0 + h * fp_s1 + 2 * fp_s2
                          + d[None, :] * fp_s3, mask=e_ok[:, None] & dm[None, :], other=0.0)
        if VC:
            e_su = tl.load(fp_ptr + e_blk[:, None] * fp_s0 + h * fp_s1 + 3 * fp_s2
                           + d[None, :] * fp_s3, mask=e_ok[:, None] & dm[None, :], other=0.0)
            e_w = tl.load(fp_ptr + e_blk[:, None] * fp_s0 + h * fp_s1 + 4 * fp_s2
                          + d[None, :] * fp_s3, mask=e_ok[:, None] & dm[None, :], other=0.0)
        e_blk_n, e_ok_n = _estimated_addr(lists_ptr, ix_row, h, n_ret, n_est, p, NS,
                                          m0 + TE, H, LW, PK, TE, ECONTIG)
        if MV8 or VC:
            m_i, l_i, e_al, e_pr = _online_probs(m_i, l_i, e_s)
            acc = acc * _product_rows(e_al[:, None], GP, G4, XR)
            if MV8:
                acc += _dot(_product_rows(e_pr * e_sc[None, :], GP, G4, XR),
                            e_q.to(fp_ptr.dtype.element_ty), PN, PREC)
            else:
                acc += _dot(_product_rows(e_pr, GP, G4, XR), e_v, PN, PREC)
            if VC:
                # (q_g . sigma u) s per estimated cluster: [GX, TE].
                e_cf = _dot(q, tl.trans(e_su), QN, PREC)
                if XR:
                    e_cf = _fold_rows(e_cf, GP, G4, TE)
                acc += _dot(_product_rows(e_pr * (e_cf * scale), GP, G4, XR), e_w, PN,
                            PREC)
        else:
            m_i, l_i, acc = _online(m_i, l_i, acc, e_s, e_v, PN, PREC, GP, G4, XR)
        e_blk, e_ok = e_blk_n, e_ok_n

    row0 = (rh * NS + p) * G     # this partial's first query-head row
    tl.store(pm_ptr + row0 + gx, m_i, mask=gxm)
    tl.store(pl_ptr + row0 + gx, l_i, mask=gxm)
    tl.store(po_ptr + (row0 + g)[:, None] * D + d[None, :], acc,
             mask=gm[:, None] & dm[None, :])
    tl.debug_barrier()   # every thread's stores precede the release below
    ticket = tl.atomic_add(tick_ptr + rh, 1, sem="acq_rel", scope="gpu")
    if ticket == NS - 1:
        # Last program of the row-head: merge the NS partials (0 if all empty).
        tl.store(tick_ptr + rh, 0)
        sp = tl.arange(0, NSP)
        g4 = tl.arange(0, G4)
        pg = (rh * NS + sp)[:, None] * G + g4[None, :]                     # [NSP, G4]
        pgm = (sp < NS)[:, None] & (g4 < G)[None, :]
        m_p = tl.load(pm_ptr + pg, mask=pgm, other=_NEG_INF, cache_modifier=".cg")
        l_p = tl.load(pl_ptr + pg, mask=pgm, other=0.0, cache_modifier=".cg")
        mx = tl.max(m_p, 0)
        w = tl.exp(m_p - tl.where(mx == _NEG_INF, 0.0, mx)[None, :])       # 0 for empty
        den = tl.sum(w * l_p, 0)
        den = tl.where(den > 0, den, 0.0)
        ob = out_ptr + r.to(tl.int64) * o_sb + d * o_sd
        for gg in tl.static_range(G):
            # one query head at a time keeps the merge's registers small
            o_p = tl.load(po_ptr + ((rh * NS + sp) * G + gg)[:, None] * D + d[None, :],
                          mask=(sp < NS)[:, None] & dm[None, :], other=0.0,
                          cache_modifier=".cg")
            wg = tl.sum(tl.where(g4[None, :] == gg, w, 0.0), 1)
            dg = tl.sum(tl.where(g4 == gg, den, 0.0), 0)
            res = tl.sum(o_p * wg[:, None], 0) / tl.where(dg > 0, dg, 1.0)
            tl.store(ob + (h * G + gg) * o_sh, res.to(out_ptr.dtype.element_ty), mask=dm)


_I32 = 2**31


def _check_index_width(*tensors: torch.Tensor) -> None:
    """The kernels widen ``index x stride`` products from 32 bits once per address
    (:func:`_wide_mad`): every size and stride of the tensors they index (so every
    block id, pool page, cache slot and arena row, and every stride argument) must
    be below 2^31. A clear error instead of a wrapped address."""
    for t in tensors:
        if max(max(t.shape, default=0), max(t.stride(), default=0)) >= _I32:
            raise ValueError(f"decode kernels index tensors with sizes and strides below "
                             f"2^31; got shape {tuple(t.shape)}, strides {t.stride()}")


# --------------------------------------------------------------------- launcher
def paged_decode_attention_triton(query: torch.Tensor, kv_cache: torch.Tensor,
                                  layout: PagedIndexLayout, block_table: torch.Tensor,
                                  seq_lens: torch.Tensor, headers: torch.Tensor,
                                  ibt: torch.Tensor, pool: IndexPool,
                                  sink_end: int, scale: float, out: torch.Tensor,
                                  workspace: DecodeWorkspace,
                                  count_stats: bool = False,
                                  variance_cap: float = VARIANCE_CORRECTION_CAP,
                                  wave: Optional[WaveBufferView] = None,
                                  retrieval_rank: str = "mass") -> torch.Tensor:
    """Tripartite decode attention of ``B`` ragged rows (semantics: the twin
    :func:`vllm_retro.kernels.reference.paged_decode_attention`); CUDA-graph safe.

    Args:
        query: ``[B, Hq, D]``. kv_cache: vLLM's ``(NB, H, bs, 2D)`` view (any
            strides). block_table: ``[>=B, max_blocks]`` int (the row of a padded row
            may be all zeros). seq_lens: ``[>=B]`` int (0: padded row).
            headers: ``[NB, HDR_WORDS]`` int32. ibt: the index table ``[R,
            max_pages]`` int32 (contiguous rows). pool: the layer's index pool.
            sink_end: first clustered token.
        out: ``[B, Hq, D]`` in any float dtype, every element written.
        workspace: scratch for at least ``B`` rows and the pool's pages.
        count_stats: add this call's statistics to ``workspace.stats``.
        variance_cap: cap of the clusters' variance term (a compile-time constant of
            the score kernel: one variant per value).
        wave: the layer's wave buffer view: retrieved tokens below each row's
            horizon (``HDR_HORIZON``) are read from the cluster cache / host arena
            and the cache's stamps, counters and miss buffer are updated
            (:mod:`.wave_view`). None: every token through the block table, the
            horizon ignored (a row with released blocks must not run so).
        retrieval_rank: "mass" or "error" (the exact set chosen inside the band by
            the expected estimation error: one more launch, the band kernel; needs
            the bucket selection, :data:`SELECT`).
    Returns ``out``.
    """
    b, hq, d = query.shape
    lay, ws = layout, workspace
    h, bs = lay.num_kv_heads, lay.block_size
    g = hq // h
    if (h, g, d) != (ws.num_kv_heads, ws.group_size, ws.head_dim) or d != lay.head_dim:
        raise ValueError(f"decode workspace shape (H={ws.num_kv_heads}, G={ws.group_size}, "
                         f"D={ws.head_dim}) does not match the call (H={h}, G={g}, D={d})")
    if b > ws.max_rows or pool.num_pages > ws.num_pages:
        raise ValueError(f"decode workspace for {ws.max_rows} rows / {ws.num_pages} pages "
                         f"got {b} rows / {pool.num_pages} pool pages")
    if ibt.dtype != torch.int32 or ibt.stride(1) != 1:
        raise ValueError("the index table must be int32 with contiguous rows")
    if sink_end % bs:
        raise ValueError("sink_end must be a multiple of the block size")
    if retrieval_rank not in reference.RANKS:
        raise ValueError(f"retrieval_rank must be one of {reference.RANKS} on the decode "
                         f"kernels, not {retrieval_rank!r}")
    err = retrieval_rank == "error"
    if err and SELECT != "bucket":
        raise ValueError("retrieval_rank 'error' needs the bucket selection "
                         f"(RETRO_DECODE_SELECT=bucket), not {SELECT!r}")
    ri = getattr(pool, "rank_interval", 1)
    if ri > 1 and (SELECT != "bucket" or err):
        raise ValueError("band re-ranking (rank_interval > 1) needs the bucket selection "
                         f"and the mass rank, not {SELECT!r} / {retrieval_rank!r}")
    ref = getattr(pool, "rank_ref", None)
    carry = ref is not None
    if carry:
        if SELECT != "bucket" or err or ri > 1:
            raise ValueError("the carried rank reference (rank_reference 'carried') needs "
                             "the bucket selection, the mass rank and rank_interval 1, not "
                             f"{SELECT!r} / {retrieval_rank!r} / {ri}")
        if (ref.dtype != torch.float32 or ref.dim() != 2 or ref.shape[0] < ibt.shape[0]
                or ref.shape[1] != h or not ref.is_contiguous() or ref.device != query.device):
            raise ValueError(f"pool.rank_ref must be a contiguous float32 [ibt rows >= "
                             f"{ibt.shape[0]}, {h}] tensor on {query.device}, got "
                             f"{ref.dtype} {tuple(ref.shape)} on {ref.device}")
    epb = lay.entries_per_block
    if wave is not None:
        if epb != 1:
            raise ValueError("the wave buffer needs one index entry per KV block (got "
                             f"entries_per_block {epb})")
        wave.check(kv_cache, h, bs, d, pool.num_pages)
    if b == 0:
        return out
    fpart, ipart = pool.fpart, pool.ipart
    _check_index_width(kv_cache, block_table, fpart, ipart, ws.logits,
                       *((wave.cache_kv, wave.arena) if wave is not None else ()))
    ns = ws.nsplit(b)
    gp, dp, nsp = ws.gp, _next_pow2(d), ws.ns_pow2
    sb = sink_end // bs
    # 16-bit caches: split 16-bit tensor-core products (not in the interpreter, whose
    # 16-bit dot is unreliable); fp32 caches: exact fp32 products.
    native = kv_cache.dtype in (torch.bfloat16, torch.float16) and not interpreting()
    fp32 = kv_cache.dtype == torch.float32
    prec = "ieee" if fp32 else "tf32"
    scale = float(scale)
    common = (block_table, block_table.stride(0), ibt, ibt.stride(0), seq_lens, headers,
              headers.stride(0))
    pdl = pdl_for(b, query.device)
    dep = dict(PDL=True, launch_pdl=True) if pdl else {}
    q8 = getattr(pool, "summary_bits", 16) == 8
    iso = getattr(pool, "variance_form", "diagonal") == "isotropic"
    # Index entries per KV block (clusters smaller than a block): a compile-time
    # constant, passed only when not 1 (the default variants stay as they are).
    ep = {"EPB": epb} if epb != 1 else {}
    # Band re-ranking (rank_interval): the band table and the interval, passed only
    # when on (the default variants stay as they are).
    if ri > 1:
        bd = pool.band_table()
        band = dict(BAND=True, RI=ri, bd_ptr=bd, bd_s0=bd.stride(0), bd_s1=bd.stride(1))
        ph = getattr(pool, "band_phase", None)
        if ph is not None:
            band.update(ph_ptr=ph, PHASE=True)
    else:
        band = {}
    # The CUDA score kernel reads 16-bit summaries, one entry per block, only.
    cuda_score = (SCORE_IMPL == "cuda" and query.is_cuda and not interpreting() and not q8
                  and epb == 1 and not err and not carry and cuda_score_available())
    # The split per row-head follows the rows in use, derived on the device
    # (:func:`_program`; DYNAMIC_SPLIT), except beside the CUDA score kernel, whose
    # grid is the static (B*H, nsplit(B)). The grids have room for the split of a
    # batch about half as large (vLLM's CUDA-graph sizes at most double).
    dyn = 1 if DYNAMIC_SPLIT and not cuda_score else 0
    b_min = b // 2 + 1 if dyn else b
    nsg, nsg_a = ws.nsplit(b_min, b), ws.nsplit_attend(b_min)
    grid, grid_a = (b * h, nsg), (b * h, nsg_a)
    # The rows every program scans for the last one with context (_program): above
    # SMALL_BATCH (whose tiles are their own variants anyway) two classes, not one
    # per power of two, so capturing vLLM's ~50 CUDA-graph sizes compiles each kernel
    # four times, not ten and more.
    bp = _next_pow2(b) if b <= SMALL_BATCH else 16 if b <= 16 else max(512, _next_pow2(b))
    split = (b, ws.select_target(b), nsg, dyn)
    split_a = (b, ws.target_programs, nsg_a, dyn)
    # The score kernel on a split of its own (SMALL_BATCH_SCORE_PROGRAMS_PER_SM): never
    # larger than the key kernel's, whose log-sum-exp reads the partial slots up to
    # its split (the score kernel fills the ones past its own with neutral values).
    # (The carried reference's score kernel writes the selection's range histograms:
    # on the selection kernels' split.)
    own = not cuda_score and not carry and ws.score_target(b) < ws.select_target(b)
    nsg_s = ws.nsplit_score(b_min, b) if own else nsg
    grid_s = (b * h, nsg_s)
    split_s = (b, ws.score_target(b), nsg_s, dyn) if own else split
    if err:
        es = ws.error_buffers(b * h * nsg)
    bucket = SELECT == "bucket"
    if bucket:
        rgh = ws.range_hist(b * h * nsg)
    if cuda_score:
        torch.ops.vllm_retro.paged_score(
            query, fpart, ipart, block_table, ibt, seq_lens, headers, ws.logits, ws.score_max,
            ws.score_sum, ws.hist, ws.ncand, sb, bs, ns, scale, float(variance_cap))
    else:
        fq, fs = pool.q8_views() if q8 else (fpart, fpart)
        score_cfg = _tune("score", b, fp32=fp32)
        if carry:
            score_cfg.update(EL=True, CONTIG=True, CARRY=True, keys_ptr=ws.keys,
                             rgh_ptr=rgh, ref_ptr=ref, mode_ptr=ws.rank_mode, PK=PACK,
                             SUB=SUB_BITS, WIN=WINDOW_BINADES)
        _keep("score", _score_kernel[grid_s](
            query, *query.stride(), fpart, *fpart.stride(),
            fq, fq.stride(0), fq.stride(1), fs, fs.stride(0), fs.stride(1), fs.stride(2),
            ipart, ipart.stride(0), ipart.stride(1), *common, ws.logits, ws.score_max,
            ws.score_sum, ws.hist, ws.ncand, scale, sb, *split_s, BP=bp,
            H=h, G=g, GP=gp, G4=_next_pow2(g), D=d, DP=dp, BS=bs, NSP=nsp, NB=NBINS,
            CAP=float(variance_cap), NATIVE=native, PREC=prec,
            **({"PDL": True} if pdl else {}), **({"Q8": True} if q8 else {}), **ep,
            **({"NEUTRAL": True} if own else {}),
            **({"ISO": True} if q8 and iso else {}),
            **(dict(ERR=True, tv_ptr=es.tvar, hist2_ptr=es.hist2, emax_ptr=es.emax)
               if err else {}), **band, **score_cfg))
    _keep("key", _key_kernel[grid](
        ws.logits, ws.keys, ws.hist, ws.score_max, ws.score_sum, *common, sb, *split, BP=bp,
        H=h, G=g, GP=gp, G4=_next_pow2(g), BS=bs, NSP=nsp, NB=NBINS, SUB=SUB_BITS,
        WIN=WINDOW_BINADES, PK=PACK, **dep, **ep,
        **(dict(BUCKET=True, rgh_ptr=rgh) if bucket else {}),
        **(dict(ERR=True, tv_ptr=es.tvar, keys2_ptr=es.keys2, emax_ptr=es.emax)
           if err else {}), **band,
        **(dict(CARRY=True, ref_ptr=ref, mode_ptr=ws.rank_mode) if carry else {}),
        **_tune("key", b)))
    if err:
        _keep("band", _band_kernel[grid](
            ws.keys, es.keys2, ws.hist, es.hist2, es.emax, rgh, es.range_hist2, *common, sb,
            *split, BP=bp,
            H=h, G=g, BS=bs, NSP=nsp, NB=NBINS, SUB=SUB_BITS, WIN=WINDOW_BINADES, PK=PACK,
            **dep, **ep, **_tune("band", b)))
    if not bucket:
        _keep("cand", _cand_kernel[grid](
            ws.keys, ws.cands, ws.hist, ws.ncand, ws.ranges, ws.sel, ws.counts,
            ws.tickets[0], *common, sb, *split, BP=bp,
            H=h, G=g, BS=bs, NB=NBINS, SUB=SUB_BITS, WIN=WINDOW_BINADES, PK=PACK, NSP=nsp,
            **dep, **ep, **_tune("cand", b)))
    in_collect = wave is not None and RESOLVE_IN_COLLECT
    if wave is not None:
        w = wave
        src = ws.wave_src_table(ibt.shape[1])
        wbook = (w.page_row, w.cache_table, w.cache_stamp, w.clock, w.counters, w.miss_keys,
                 w.miss_count, w.miss_capacity, w.layer, w.num_layers, w.num_pages,
                 ibt.shape[0])
    cargs = ((src, src.stride(0)) + wbook if in_collect
             # Never read (WAVE=False): existing tensors of the right types.
             else (ws.stats, 0, ws.ncand, ws.stats, ws.stats, ws.stats, ws.stats, ws.stats,
                   ws.stats, 0, 0, 0, 0, 0))
    tune_c = _tune("collect", b)
    if in_collect or (bucket and b > SMALL_BATCH):
        # The lookups (or the bucket thresholds) add live values: held to 128
        # registers, the list kernel keeps 4 programs per SM (the lookups: 125 on
        # sm_90 with the CPU venv's Triton; the buckets: 132 unbounded).
        tune_c.setdefault("maxnreg", 128)
    _keep("collect", _collect_kernel[grid](
        ws.keys, ws.cands, ws.lists, ws.ncand, ws.ranges, ws.sel, ws.stats, ipart,
        ipart.stride(0), ipart.stride(1), *common, sb, sink_end, *split, *cargs, BP=bp,
        H=h, BS=bs, PK=PACK, LW=LIST_WORDS, NSP=nsp, COUNT_STATS=bool(count_stats),
        **({"WAVE": True} if in_collect else {}), **dep, **ep,
        **(dict(BUCKET=True, hist_ptr=ws.hist, rgh_ptr=rgh, cnt_ptr=ws.counts, G=g,
                NB=NBINS, SUB=SUB_BITS, WIN=WINDOW_BINADES) if bucket else {}),
        **(dict(ERR=True, keys2_ptr=es.keys2, hist2_ptr=es.hist2, rgh2_ptr=es.range_hist2,
                emax_ptr=es.emax) if err else {}), **band,
        **(dict(CARRY=True, mode_ptr=ws.rank_mode) if carry else {}), **tune_c))
    mv8 = getattr(pool, "mean_value_bits", 16) == 8
    vc = getattr(pool, "value_correction", False)
    tune_a = _tune("attend", b, wave is not None, vc=vc, fp32=fp32)
    if wave is not None:
        if not in_collect:
            _keep("resolve", _resolve_kernel[grid_a](
                *common, ws.lists, ws.counts, src, src.stride(0), sb, sink_end, *split_a,
                *wbook, H=h, BS=bs, PK=PACK, LW=LIST_WORDS, BP=bp, **dep,
                **_tune("resolve", b)))
        wargs = (src, src.stride(0), w.arena, w.arena.stride(0), w.cache_kv,
                 w.cache_kv.stride(0), w.cache_kv.stride(1), w.num_pages, ibt.shape[0])
    else:
        # Never read (WAVE=False): existing tensors of the right pointer types, so
        # nothing is allocated and the variant is today's kernel.
        wargs = (ws.stats, 0, kv_cache, 0, kv_cache, 0, 0, 0, 0)
    if _cuda_attend_fits(query, kv_cache, fpart, block_table, seq_lens, out, g, bs, wave,
                         mv8, vc):
        torch.ops.vllm_retro.paged_attend(
            query, kv_cache, fpart, block_table, ibt, seq_lens, headers, ws.logits, ws.lists,
            ws.counts, ws.part_o, ws.part_m, ws.part_l, ws.tickets[1], out, sink_end,
            ws.target_programs, nsg_a, dyn, scale)
        return out
    # One product for the logits where the query holds values of the cache's dtype
    # (bit-equal: the two-product form's low part is zero). TUNE's "QB" False turns it off.
    if tune_a.pop("QB", True) and native and query.dtype == kv_cache.dtype:
        tune_a["QB"] = True
    vq, vs = pool.q8_views()
    _keep("attend", _attend_kernel[grid_a](
        query, *query.stride(), kv_cache, *kv_cache.stride(), fpart, *fpart.stride(),
        vq, vq.stride(0), vq.stride(1), vq.stride(2), vs, vs.stride(0), vs.stride(1),
        vs.stride(2),
        *common, ws.logits, ws.lists, ws.counts,
        ws.part_o, ws.part_m, ws.part_l, ws.tickets[1], out, *out.stride(),
        scale, sb, sink_end, *split_a, *wargs,
        H=h, G=g, GP=gp, G4=_next_pow2(g), D=d, DP=dp, BS=bs, PK=PACK, LW=LIST_WORDS,
        NSP=ws.attend_ns_pow2, NATIVE=native, PREC=prec, BP=bp, WAVE=wave is not None, **dep,
        **({"MV8": True} if mv8 else {}),
        **({"VC": True} if vc else {}), **ep,
        **tune_a))
    return out


def _keep(stage: str, compiled) -> None:
    if RECORD_RESOURCES:
        LAST_KERNELS[stage] = compiled


def kernel_resources(num_sms: int = 132, regs_per_sm: int = 65536,
                     smem_per_sm: int = 233472, max_warps: int = 64,
                     max_blocks: int = 32) -> dict:
    """Per stage of the last recorded launch (:data:`RECORD_RESOURCES`): registers
    per thread, spills, shared memory, warps, and the programs one SM can hold
    (defaults: an H100/H200 SM) -- a grid above ``num_sms`` times that runs in more
    than one wave."""
    res = {}
    for stage, k in LAST_KERNELS.items():
        md = getattr(k, "metadata", None)
        warps = int(getattr(md, "num_warps", 4) or 4)
        shared = int(getattr(md, "shared", 0) or 0)
        regs = int(getattr(k, "n_regs", 0) or 0)
        fit = [max_blocks, max_warps // warps]
        if regs:
            # Registers are allocated per warp in units of 256.
            per_warp = -(-regs * 32 // 256) * 256
            fit.append(regs_per_sm // (per_warp * warps))
        if shared:
            fit.append(smem_per_sm // (shared + 1024))   # + the reserved 1 KiB per block
        res[stage] = dict(regs=regs, spills=int(getattr(k, "n_spills", 0) or 0),
                          shared=shared, warps=warps, programs_per_sm=min(fit),
                          resident=min(fit) * num_sms)
    return res
