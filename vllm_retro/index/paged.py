"""The paged wave index: the GPU form of the wave index, in a retro-owned index pool.

vLLM's paged KV cache (FlashAttention layout, vLLM 0.26) keeps per layer a page of
``block_size`` tokens per block: ``[block_size, H, 2D]`` (K then V of each head),
unpadded (a stock page). The index lives beside it, in an :class:`IndexPool` per
layer that retro allocates itself: ``P`` index pages, one page holding the index
entry of the cluster that lives "in" one clustered block of one request:

* float part ``fpart [P, H, 3, D]`` in the KV dtype: the centroid (mean key),
  per-channel key variance and mean value of one cluster;
* int part ``ipart [P, H, 2]`` int32: the cluster's size (word :data:`I_SIZE`)
  and the logical position of its first token (word :data:`I_START`).

A request's pool pages are found through retro's own *index table* ``ibt [R,
max_pages]`` int32 (:class:`IndexAllocator`, which also hands out rows and pages
from free lists and takes them back on finish, abort and preemption): cluster entry
``i`` of the row (logical block ``sink_end / bs + i``) has its index at pool page
``ibt[row, i]``, where ``row`` is the header's :data:`HDR_IBT_ROW`. Pool pages
never go stale when vLLM reuses a block id (issue 14 releases blocks): they are
retro's, freed only when the request leaves. The decode workspace's per-entry
scratch (``logits``, ``keys``, ``cands``, ``lists``) is addressed through the same
table (:class:`vllm_retro.kernels.triton_decode.DecodeWorkspace`).

A request's clustered zone ``[sink_end, clustered_end)`` is cut into segments
(multiples of ``block_size`` tokens, aligned to blocks). A segment of ``n`` tokens
over logical blocks ``[p0/bs, p1/bs)`` gets ``e n / bs`` pool pages (``e`` the
layout's ``entries_per_block``: 1, or ``bs / cluster_size`` for clusters smaller
than a block) and has ``C = ceil(n / cluster_size) <= e n / bs`` clusters; cluster
``j`` lives in the segment's ``j``-th page and pages ``j >= C`` hold empty clusters
(size 0). A row's cluster entries are therefore ``e (clustered_end - sink_end) /
bs``.

**Cluster-contiguous KV.** The index build reorders the segment's keys and values
in place in vLLM's pages, per KV head: cluster ``j`` (``size_j`` tokens,
``start_j`` tokens of lower clusters before it) occupies the logical positions
``[p0 + start_j, p0 + start_j + size_j)`` of that head, so a retrieved cluster is
read as position -> the row's block table -> K/V, with no permutation in between.
This is exact: cached keys already carry their rotary position, and attention over
a set of keys and values does not depend on their order (per KV head, for any
query that sees all of them). It is safe because a segment is built only once all
its tokens are in the cache and it ends at least ``recent_tokens`` before the last
one (:func:`plan_segments`; during a prompt's prefill, only with the wave buffer's
prefill lag, at least that lag before the prefill front): every later query (decode
tokens, later prefill chunks, any dense kernel of vLLM) sees every token of the
segment, so vLLM's own kernels compute the same attention over the reordered pages. Prefix caching (which would
share reordered blocks with requests whose queries see part of a segment) is
refused. Sinks, the unclustered tail and the recent window are never reordered.

K/V reads go through the request's own block table (positions are unchanged); the
starts are positions, not physical slots, and the decode kernels bounds-check them
to the row's clustered zone, so even stale index bytes cannot make one request
read another's KV.

Per request, one row of a small header table, indexed by the request's first
physical block (its own, since prefix caching is off; the sinks' block, never
released), gives the decode kernels ``clustered_end`` (0: no index, the row is
attended exactly in full), the per-request budget (clusters retrieved / estimated)
and the request's ``ibt`` row.

Byte counts (Llama-3-8B shape: H=8, D=128, bf16, block 16): KV page 65,536 B,
index page 6,208 B per clustered block and layer (float part 6,144 B, int part
64 B; 9.5% of the KV page) plus 4 B of ``ibt`` per clustered block.
"""


from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..config import VARIANCE_FORMS, RetroConfig
from ..transfer import to_device

# Header table columns (int32), one row per request, at the request's first block.
HDR_CLUSTERED_END = 0
HDR_N_RETRIEVE = 1
HDR_N_ESTIMATE = 2
HDR_NUM_CLUSTERS = 3
HDR_IBT_ROW = 4        # the request's row of the index table (valid when clustered)
# Tokens of the clustered zone mirrored to the host wave buffer (block-aligned, at
# most clustered_end; 0: none). Below it the decode kernels read a retrieved
# cluster's K/V from the wave buffer (cluster cache or pinned arena), never through
# the block table: vLLM may have released and reused those blocks (design §8.3).
HDR_HORIZON = 5
# The context length of the request's last decode step that ranked all its clusters
# (RetroConfig.rank_interval > 1; 0: none since the index last changed). Written by
# the decode kernels, reset to 0 whenever the host writes the row (index built or
# grown): the steps between full rankings re-rank that step's band
# (:meth:`IndexPool.band_table`).
HDR_BAND_AT = 6
HDR_WORDS = 7

# Float part rows. With RetroConfig.value_correction two more: the leading singular
# pair (sigma u, w) of the cluster's key-value cross-covariance.
F_CENTROID, F_KEY_VAR, F_VALUE_MEAN = 0, 1, 2
F_SIGMA_U, F_W = 3, 4
FLOAT_SLOTS, FLOAT_SLOTS_VC = 3, 5
# Index entries per KV block the GPU index supports (clusters of a block, a half or a
# quarter of a block).
ENTRIES_PER_BLOCK = (1, 2, 4)
# Power iterations of the value correction's rank-1 pair at index build
# (:func:`vllm_retro.kernels.write_value_correction`).
VC_POWER_ITERS = 10

# Int part words (int32) per (index page, head): the cluster's size, the logical position
# of its first token.
I_SIZE, I_START = 0, 1
INT_WORDS = 2

PAGE_ALIGN = 256


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class PagedIndexLayout:
    """Byte layout of one layer's KV page with the retro index in its padding."""

    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    #: float rows per (index page, head): :data:`FLOAT_SLOTS`, or
    #: :data:`FLOAT_SLOTS_VC` with ``value_correction``.
    float_slots: int = FLOAT_SLOTS
    #: index entries (pool pages) per KV block: 1, or ``block_size / cluster_size``
    #: (2 or 4) for clusters smaller than a block (:func:`entries_per_block`).
    entries_per_block: int = 1

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def kv_page_bytes(self) -> int:
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.elem_size

    @property
    def float_bytes(self) -> int:
        return self.num_kv_heads * self.float_slots * self.head_dim * self.elem_size

    @property
    def int_words(self) -> int:
        """int32 words per head: the cluster's size and start (:data:`I_SIZE`,
        :data:`I_START`)."""
        return INT_WORDS

    @property
    def int_bytes(self) -> int:
        return self.num_kv_heads * self.int_words * 4

    @property
    def index_bytes(self) -> int:
        return self.float_bytes + self.int_bytes

    @property
    def page_bytes(self) -> int:
        """vLLM's page per block and layer: the KV alone (unpadded; the index lives
        in the :class:`IndexPool`)."""
        return self.kv_page_bytes

    @classmethod
    def for_config(cls, config: RetroConfig, num_kv_heads: int, head_dim: int,
                   block_size: int, dtype: torch.dtype) -> "PagedIndexLayout":
        """The layout a configuration needs: the value correction's rows
        (``value_correction``), the entries per block of its ``cluster_size``."""
        return cls(num_kv_heads, head_dim, block_size, dtype,
                   float_slots=FLOAT_SLOTS_VC if config.value_correction else FLOAT_SLOTS,
                   entries_per_block=entries_per_block(config, block_size))

    @property
    def value_correction(self) -> bool:
        """Whether index pages hold the value correction's pair (slots
        :data:`F_SIGMA_U`, :data:`F_W`)."""
        return self.float_slots == FLOAT_SLOTS_VC

    def check_rows(self) -> None:
        """Rows and entries per page and block: values the index supports."""
        if self.entries_per_block not in ENTRIES_PER_BLOCK:
            raise ValueError(f"retro paged index: entries_per_block must be one of "
                             f"{ENTRIES_PER_BLOCK}, got {self.entries_per_block!r}")
        if self.float_slots not in (FLOAT_SLOTS, FLOAT_SLOTS_VC):
            raise ValueError(f"retro paged index: float_slots must be {FLOAT_SLOTS} or "
                             f"{FLOAT_SLOTS_VC}, got {self.float_slots!r}")

    def check(self) -> None:
        self.check_rows()
        if self.kv_page_bytes % 4 or self.float_bytes % 4:
            raise ValueError("retro paged index needs 4-byte aligned page parts")

    def check_cache(self, kv_cache: torch.Tensor) -> None:
        """Checks a layer's KV cache view ``(NB, H, bs, 2D)``: vLLM's stock
        FlashAttention pages (page stride = :attr:`page_bytes`)."""
        if tuple(kv_cache.shape[1:]) != (self.num_kv_heads, self.block_size,
                                          2 * self.head_dim):
            raise ValueError(f"retro: KV cache shape {tuple(kv_cache.shape)} does not "
                             f"match the layout")
        if kv_cache.stride(0) * self.elem_size != self.page_bytes:
            raise ValueError(
                f"retro: KV page stride {kv_cache.stride(0) * self.elem_size} B != "
                f"expected unpadded page {self.page_bytes} B")

    def make_cache(self, num_blocks: int, device="cpu", kv_layout: str = "NHD") -> torch.Tensor:
        """A zeroed KV cache in vLLM's view (tests and benchmarks): logical
        ``(NB, H, bs, 2D)``, physical ``[NB][bs][H][2D]`` (vLLM's "NHD" layout, its
        default) or ``[NB][H][bs][2D]`` ("HND")."""
        h, d, bs = self.num_kv_heads, self.head_dim, self.block_size
        if kv_layout == "HND":
            return torch.zeros(num_blocks, h, bs, 2 * d, dtype=self.dtype, device=device)
        if kv_layout != "NHD":
            raise ValueError(f"KV cache layout {kv_layout!r}: 'NHD' or 'HND'")
        raw = torch.zeros(num_blocks, bs, h, 2 * d, dtype=self.dtype, device=device)
        return raw.permute(0, 2, 1, 3)


class IndexPool:
    """One layer's index storage (retro-owned, fixed address): ``num_pages`` index
    pages, page ``p`` the index entry of one clustered block of one request.

    * ``fpart`` ``[P, H, S, D]`` in the KV dtype: centroid, key variance, mean value
      (``S`` = ``layout.float_slots``: 3; 5 with ``value_correction``, then also
      ``sigma u`` and ``w``, :func:`vllm_retro.kernels.write_value_correction`);
    * ``ipart`` ``[P, H, INT_WORDS]`` int32: size (:data:`I_SIZE`), first position
      (:data:`I_START`).

    With ``summary_bits`` 8 (option ``summary_bits``) the build stores the centroid
    and the key variance in 8 bits (:func:`quantize_summaries`): slot 0 of ``fpart``
    holds them as int8 (``D`` bytes each, one symmetric scale per cluster, head and
    vector), slot 1 begins with the two float32 scales, slot 2 is the mean value as
    before. The score stage then reads ``2D + 8`` bytes per cluster and head
    instead of ``4D`` (bf16); the memory and the mean value are unchanged. With
    ``mean_value_bits`` 8 (option ``mean_value_bits``) slot 2 holds the mean value
    as int8 (``D`` bytes) followed by its float32 scale (:func:`quantize_mean_values`):
    an estimated cluster's value then costs ``D + 4`` bytes.

    8-bit summaries also keep the key variance's mean over channels (of the rounded
    vector; float32, after the two scales in slot 1) and the entry's size (float32,
    word :data:`SIZE_WORD` of slot 1: scales, mean variance and size are one 16-byte
    vector). With ``variance_form``
    "isotropic" the score stage reads it instead of the variance vector: the
    variance term becomes ``s^2/2 |q|^2 mean_d var_d`` and a cluster costs ``D + 12``
    bytes there (:meth:`summaries` returns that mean in every channel, which is what
    the kernel computes with). "diagonal" (default): the vector.

    With ``rank_interval`` > 1 (option ``rank_interval``; needs 8-bit summaries)
    the decode kernels keep each request's band, per KV head, in slot 1's 32-bit
    words 4 to 19 (:meth:`band_table`): the pool page of the ``k``-th band entry of
    the head's last full ranking at word ``k % 16`` of the row's page ``k // 16``
    (packed as the decode lists). No memory is added.

    Which pages a request owns is the :class:`IndexAllocator`'s business."""

    def __init__(self, layout: PagedIndexLayout, num_pages: int, device="cpu",
                 summary_bits: int = 16, mean_value_bits: int = 16,
                 variance_form: str = "diagonal", rank_interval: int = 1) -> None:
        h, d = layout.num_kv_heads, layout.head_dim
        if summary_bits not in (8, 16):
            raise ValueError(f"IndexPool: summary_bits must be 8 or 16, got {summary_bits}")
        if variance_form not in VARIANCE_FORMS:
            raise ValueError(f"IndexPool: variance_form must be one of {VARIANCE_FORMS}, got "
                             f"{variance_form!r}")
        if variance_form == "isotropic" and summary_bits != 8:
            raise ValueError("IndexPool: variance_form 'isotropic' needs summary_bits 8 "
                             "(the mean variance is stored beside the 8-bit scales)")
        if mean_value_bits not in (8, 16):
            raise ValueError(f"IndexPool: mean_value_bits must be 8 or 16, got "
                             f"{mean_value_bits}")
        if isinstance(rank_interval, bool) or not isinstance(rank_interval, int) \
                or rank_interval < 1:
            raise ValueError(f"IndexPool: rank_interval must be an integer >= 1, got "
                             f"{rank_interval!r}")
        if rank_interval > 1 and summary_bits != 8:
            raise ValueError("IndexPool: rank_interval > 1 keeps the band in the 8-bit "
                             "summaries' spare words: needs summary_bits 8")
        if rank_interval > 1 and d * layout.elem_size // 4 < BAND_WORD + BAND_PACK:
            raise ValueError("IndexPool: rank_interval > 1 needs a head of at least "
                             f"{4 * (BAND_WORD + BAND_PACK)} bytes (the band's words)")
        if 8 in (summary_bits, mean_value_bits) and (d * layout.elem_size) % 4:
            raise ValueError("IndexPool: 8-bit summaries need a head of a multiple of 4 "
                             "bytes")
        if mean_value_bits == 8 and layout.elem_size < 2:
            raise ValueError("IndexPool: 8-bit mean values need a KV dtype of at least "
                             "2 bytes (the scale follows the D int8 values in the slot)")
        self.layout = layout
        self.num_pages = int(num_pages)
        self.summary_bits = summary_bits
        self.mean_value_bits = mean_value_bits
        self.variance_form = variance_form
        self.rank_interval = rank_interval
        # The engine step's place in the interval, shared by every layer's pool (a
        # persistent ``[1]`` int32 device tensor the owner advances once per step,
        # CUDA-graph safe): at 0 every row ranks in full (reference.band_reranks).
        # None: each row keeps the phase of its own last full ranking.
        self.band_phase: Optional[torch.Tensor] = None
        # RetroConfig.rank_reference "carried": ``[ibt rows, H]`` float32, per request
        # (its index-table row) and KV head the largest log-mass of its last decode
        # step, written by the decode kernels and read by the next step's score
        # kernel (all-zero bits: none; the owner zeroes a request's row whenever it
        # writes the request's header). None: every step normalizes its own scores.
        self.rank_ref: Optional[torch.Tensor] = None
        layout.check_rows()
        self.fpart = torch.zeros(self.num_pages, h, layout.float_slots, d, dtype=layout.dtype,
                                 device=device)
        self.ipart = torch.zeros(self.num_pages, h, INT_WORDS, dtype=torch.int32,
                                 device=device)

    @property
    def device(self) -> torch.device:
        return self.fpart.device

    @property
    def value_correction(self) -> bool:
        return self.layout.value_correction

    def to(self, device) -> "IndexPool":
        out = IndexPool.__new__(IndexPool)
        out.layout, out.num_pages = self.layout, self.num_pages
        out.summary_bits = self.summary_bits
        out.mean_value_bits = self.mean_value_bits
        out.variance_form = self.variance_form
        out.rank_interval = self.rank_interval
        out.band_phase = None if self.band_phase is None else self.band_phase.to(device)
        out.rank_ref = None if self.rank_ref is None else self.rank_ref.to(device)
        out.fpart, out.ipart = self.fpart.to(device), self.ipart.to(device)
        return out

    def q8_views(self):
        """``(int8 view [P, H, 3, D * elem], float32 view [P, H, 3, D * elem / 4])``
        of ``fpart``: the 8-bit summaries' bytes and scales."""
        return self.fpart.view(torch.int8), self.fpart.view(torch.float32)

    def band_table(self) -> torch.Tensor:
        """``[P, H, BAND_PACK]`` int32 view of the band words (``rank_interval`` > 1):
        slot 1's 32-bit words from :data:`BAND_WORD` on, after the 8-bit summaries'
        two scales, mean variance and size. Band entry ``k`` of a row-head is at the row's
        page ``k // BAND_PACK``, word ``k % BAND_PACK``."""
        if self.summary_bits != 8:
            raise ValueError("IndexPool.band_table: the band lives in the 8-bit "
                             "summaries' spare words (summary_bits 8)")
        return self.fpart.view(torch.int32)[:, :, 1, BAND_WORD:BAND_WORD + BAND_PACK]

    def summaries(self, pages: torch.Tensor) -> torch.Tensor:
        """``[n, H, S, D]`` centroid, key variance and mean value (then the value
        correction's pair, if the layout has it) of the entries at
        ``pages`` (float32, or the pool's dtype if wider), dequantized when the pool
        keeps 8-bit summaries; with ``variance_form`` "isotropic" the key variance is
        its mean over channels in every channel."""
        f = self.fpart[pages].to(torch.promote_types(self.fpart.dtype, torch.float32))
        if 8 not in (self.summary_bits, self.mean_value_bits):
            return f
        d = self.layout.head_dim
        q, sc = self.q8_views()
        q, sc = q[pages].to(f.dtype), sc[pages].to(f.dtype)
        if self.summary_bits == 8:
            f[:, :, 0] = q[:, :, 0, :d] * sc[:, :, 1, 0:1]
            f[:, :, 1] = q[:, :, 0, d:2 * d] * sc[:, :, 1, 1:2]
            if self.variance_form == "isotropic":
                f[:, :, 1] = sc[:, :, 1, 2:3]
        if self.mean_value_bits == 8:
            f[:, :, 2] = q[:, :, 2, :d] * sc[:, :, 2, d // 4:d // 4 + 1]
        return f


#: The 32-bit word of a page's slot 1 (per head) holding the entry's size as a
#: float32 with 8-bit summaries (beside the two scales and the mean variance: the
#: score stage reads the four words as one 16-byte vector).
SIZE_WORD = 3
#: The first 32-bit word of a page's slot 1 (per head) holding band table entries
#: (:meth:`IndexPool.band_table`): after the two scales, the mean variance and the
#: size; and how many (the decode lists' packing).
BAND_WORD = 4
BAND_PACK = 16

#: The largest magnitude of an 8-bit summary element (symmetric int8).
Q8_MAX = 127


def quantize_summaries(pool: IndexPool, pages: torch.Tensor) -> None:
    """Rewrites the centroid and key variance of the entries at ``pages`` (written
    in the KV dtype by the build) as 8 bits with one scale each per entry and head:
    ``x = q * scale``, ``scale = max|x| / 127`` (1 for an all-zero vector). Rounding
    error at most ``scale / 2`` per element. Device ops only."""
    d = pool.layout.head_dim
    pg = pages.long().to(pool.device).reshape(-1)
    if not pg.numel():
        return
    q, scale = _q8(pool.fpart[pg, :, :2])                               # [n, H, 2, (D)]
    qv, sv = pool.q8_views()
    qv[pg, :, 0, :2 * d] = q.flatten(2)                  # centroid, then variance
    sv[pg, :, 1, 0:2] = scale
    # The rounded variance's mean over channels: variance_form "isotropic"'s number.
    sv[pg, :, 1, 2] = q[:, :, 1].float().mean(-1) * scale[:, :, 1]
    sv[pg, :, 1, SIZE_WORD] = pool.ipart[pg, :, I_SIZE].float()


def _q8(x: torch.Tensor):
    """``(q, scale)``: ``x``'s last-dim vectors as int8 ``q`` times one float32
    ``scale`` each, ``max|x| / 127`` (1 for an all-zero vector)."""
    f = x.float()
    amax = f.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / Q8_MAX, torch.ones_like(amax))
    q = torch.round(f / scale.unsqueeze(-1)).clamp_(-Q8_MAX, Q8_MAX).to(torch.int8)
    return q, scale


def quantize_mean_values(pool: IndexPool, pages: torch.Tensor) -> None:
    """Rewrites the mean value of the entries at ``pages`` (slot 2, written in the
    KV dtype by the build) as ``D`` int8 values followed by their float32 scale
    (byte ``D`` of the slot): ``x = q * scale``, ``scale = max|x| / 127`` (1 for an
    all-zero vector), per entry and head. Device ops only."""
    d = pool.layout.head_dim
    pg = pages.long().to(pool.device).reshape(-1)
    if not pg.numel():
        return
    q, scale = _q8(pool.fpart[pg, :, 2])                                # [n, H, (D)]
    qv, sv = pool.q8_views()
    qv[pg, :, 2, :d] = q
    sv[pg, :, 2, d // 4] = scale


class IndexAllocator:
    """The index table and its host-side allocator (one per worker, all layers).

    ``ibt`` ``[num_rows, max_pages]`` int32, a persistent device tensor (CUDA graphs
    read it; never reallocated): row ``r``'s column ``i`` is the pool page of the
    cluster entry ``i`` of the request holding row ``r``. Rows and pages come from
    free lists (:meth:`acquire`, :meth:`extend`) and go back with :meth:`release`.
    Nothing here syncs with the device; ``extend`` writes the new columns with one
    host-to-device copy."""

    def __init__(self, num_pages: int, num_rows: int, max_pages: int, device="cpu") -> None:
        self.num_pages = int(num_pages)
        self.num_rows = int(num_rows)
        self.max_pages = int(max_pages)
        self.ibt = torch.zeros(self.num_rows, self.max_pages, dtype=torch.int32,
                               device=device)
        self._free_pages: List[int] = list(range(self.num_pages - 1, -1, -1))
        self._free_rows: List[int] = list(range(self.num_rows - 1, -1, -1))
        self._pages: dict = {}   # row -> its pages, in entry order

    @property
    def free_pages(self) -> int:
        return len(self._free_pages)

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def shuffle(self, seed: int = 0) -> None:
        """Hands the free pages and rows out in a random order from now on (tests
        and benchmarks: requests whose pages are neither contiguous nor ordered)."""
        g = torch.Generator().manual_seed(seed)
        self._free_pages = [self._free_pages[i] for i in
                            torch.randperm(len(self._free_pages), generator=g).tolist()]
        self._free_rows = [self._free_rows[i] for i in
                           torch.randperm(len(self._free_rows), generator=g).tolist()]

    def pages_of(self, row: int) -> List[int]:
        return list(self._pages[row])

    def acquire(self, num_pages: int) -> Optional[int]:
        """A fresh row with ``num_pages`` pages, or None (nothing taken) when rows or
        pages run short."""
        if not self._free_rows or num_pages > min(self.free_pages, self.max_pages):
            return None
        row = self._free_rows.pop()
        self._pages[row] = []
        self.extend(row, num_pages)
        return row

    def extend(self, row: int, num_pages: int) -> Optional[List[int]]:
        """Appends ``num_pages`` pages to ``row`` (written into ``ibt``); returns
        them, or None (nothing taken) when the pool or the row is full."""
        have = self._pages[row]
        if num_pages > self.free_pages or len(have) + num_pages > self.max_pages:
            return None
        new = [self._free_pages.pop() for _ in range(num_pages)]
        if new:
            self.ibt[row, len(have):len(have) + num_pages] = to_device(
                new, torch.int32, self.ibt.device)
        have.extend(new)
        return new

    def segment_jobs(self, row: int, block_ids: torch.Tensor,
                     segs: Sequence[Tuple[int, int]], sink_end: int,
                     block_size: int, epb: int = 1) -> List["SegmentJob"]:
        """:class:`SegmentJob` s for segments ``[(p0, p1)]`` of the request holding
        ``row`` (its pages must cover them: entries ``epb * i`` to ``epb * (i + 1) -
        1`` belong to logical block ``sink_end / bs + i``; ``epb`` the layout's
        ``entries_per_block``)."""
        pages = to_device(self._pages[row], torch.long, block_ids.device)
        s = sink_end // block_size
        return [SegmentJob(block_ids, p0, p1,
                           pages[(p0 // block_size - s) * epb:(p1 // block_size - s) * epb])
                for p0, p1 in segs]

    def release(self, row: int) -> None:
        """Gives a row and all its pages back (no-op for an unknown row)."""
        pages = self._pages.pop(row, None)
        if pages is None:
            return
        self._free_pages.extend(reversed(pages))
        self._free_rows.append(row)


def sink_end(config: RetroConfig, block_size: int) -> int:
    """First token of the clustered zone: the sinks rounded up to whole blocks (at
    least one block, whose index space holds no cluster)."""
    return max(block_size, _round_up(config.sink_tokens, block_size))


def entries_per_block(config: RetroConfig, block_size: int) -> int:
    """Index entries (pool pages) per KV block: 1 for ``cluster_size >= block_size``,
    else ``block_size / cluster_size`` (valid only if it is in
    :data:`ENTRIES_PER_BLOCK`: :func:`check_config_for_paged`)."""
    if config.cluster_size >= block_size:
        return 1
    return block_size // config.cluster_size


def check_config_for_paged(config: RetroConfig, block_size: int) -> List[str]:
    """Reasons the paged (GPU) index cannot use this config; empty if it can."""
    reasons = []
    if config.cluster_size < block_size:
        epb = block_size // config.cluster_size
        if block_size % config.cluster_size or epb not in ENTRIES_PER_BLOCK:
            reasons.append(f"cluster_size {config.cluster_size} < KV block size "
                           f"{block_size} must divide it into "
                           f"{' or '.join(str(e) for e in ENTRIES_PER_BLOCK[1:])} "
                           "index entries per block")
        if config.wave_buffer:
            reasons.append(f"cluster_size {config.cluster_size} < KV block size "
                           f"{block_size} with the wave buffer (its cluster cache and "
                           "host mirror keep one index entry per KV block)")
    if config.update_interval % block_size:
        reasons.append(f"update_interval {config.update_interval} is not a multiple of "
                       f"the KV block size {block_size}")
    if config.segment_size % block_size:
        reasons.append(f"segment_size {config.segment_size} is not a multiple of the "
                       f"KV block size {block_size}")
    if config.error_bound is not None:
        reasons.append("error_bound (accuracy-bounded mode) is not implemented by the "
                       "GPU decode kernels yet")
    if config.shared_head_budget:
        reasons.append("shared_head_budget is not implemented by the GPU decode kernels yet")
    if config.retrieval_rank == "error_value":
        reasons.append("retrieval_rank 'error_value' (needs the steady part's output "
                       "before selection) is not implemented by the GPU decode kernels: "
                       "use 'error'")
    elif config.retrieval_rank == "error":
        from ..kernels.reference import selection_from_env
        if selection_from_env() != "bucket":
            reasons.append("retrieval_rank 'error' needs the decode kernels' bucket "
                           "selection (RETRO_DECODE_SELECT=bucket, the default)")
    if config.adaptive_budget:
        reasons.append(f"adaptive_budget {config.adaptive_budget} (per-query exact-set "
                       "size from a difficulty history) is not implemented by the GPU "
                       "decode kernels")
    if config.rest_estimate:
        reasons.append("rest_estimate (the skipped clusters as one pseudo-token) is not "
                       "implemented by the GPU decode kernels")
    if config.dense_below and config.wave_buffer:
        reasons.append(f"dense_below {config.dense_below} with wave_buffer: a dense step "
                       "attends through vLLM's blocks, which the wave buffer releases")
    return reasons


# ------------------------------------------------------------------ planning
def plan_segments(clustered_end: int, computed: int, prompt_len: int,
                  config: RetroConfig, block_size: int,
                  prefill_lag: Optional[int] = None) -> List[Tuple[int, int]]:
    """New segments ``[(p0, p1)]`` for a request whose KV exists for ``computed``
    tokens and whose clustered zone ends at ``clustered_end`` (0: none yet).

    While the prompt is being prefilled nothing is clustered, unless
    ``prefill_lag`` is given (the wave buffer's release during prefill): then
    whole segments of ``segment_size`` tokens (rounded down to blocks) are cut
    from what lies more than ``prefill_lag`` tokens behind the prefill front, so
    they can be mirrored and released before the prompt ends.

    Once the whole prompt is in the cache, whatever lies between the clustered
    zone (the sinks, at first) and the recent window is cut into
    ``floor(pending / segment_size)`` near-equal, block-aligned segments when it
    holds at least ``segment_size`` tokens (the first clustering waits for that);
    later, ``update_interval`` tokens at a time. So a prompt prefilled in chunks
    is indexed as if it came in one piece, up to where a lagging prefill
    clustering stopped.
    """
    bs = block_size
    s = sink_end(config, bs)
    start = clustered_end or s
    if computed < prompt_len:
        if prefill_lag is None:
            return []
        seg = max(bs, config.segment_size // bs * bs)
        end = (computed - prefill_lag) // bs * bs
        n = max(0, (end - start) // seg)
        return [(start + i * seg, start + (i + 1) * seg) for i in range(n)]
    end = (computed - config.recent_tokens) // bs * bs
    out: List[Tuple[int, int]] = []
    pending = end - start
    if clustered_end == 0 and pending < config.segment_size:
        return []
    if pending >= config.segment_size:
        n_seg = pending // config.segment_size
        bounds = [start + (i * pending // n_seg) // bs * bs for i in range(n_seg)] + [end]
        return list(zip(bounds[:-1], bounds[1:]))
    while end - start >= config.update_interval:
        out.append((start, start + config.update_interval))
        start += config.update_interval
    return out


def clusters_in(n_tokens: int, config: RetroConfig) -> int:
    return max(1, math.ceil(n_tokens / config.cluster_size))


def budget(num_clusters: int, clustered_tokens: int, config: RetroConfig) -> Tuple[int, int]:
    """(retrieved, estimated) clusters for a request, as :meth:`WaveIndex.budget`."""
    c = num_clusters
    if c == 0:
        return 0, 0
    floor = math.ceil(config.min_retrieval_tokens * c / max(1, clustered_tokens))
    n_ret = min(c, max(1, math.ceil(config.retrieval_fraction * c), floor))
    n_est = min(c - n_ret, math.ceil(config.estimation_fraction * c))
    return n_ret, n_est


# ------------------------------------------------------------------ building
def _strided_init(n: int, n_clusters: int, device) -> torch.Tensor:
    """Indices of the initial centroids: every ``n / n_clusters``-th point."""
    return torch.div(torch.arange(n_clusters, device=device) * n, n_clusters,
                     rounding_mode="floor")


def kmeans_points(keys: torch.Tensor, values: Optional[torch.Tensor] = None,
                  value_weight: float = 0.0) -> torch.Tensor:
    """The points the index build clusters, ``[S, n, D]`` (``[S, n, 2D]`` with values),
    fp32, as :func:`vllm_retro.kmeans.spherical_kmeans` forms them: each key mean-
    centred per problem and normalised; with ``value_weight > 0``
    (``RetroConfig.kmeans_value_weight``) :func:`_with_values` of those and the
    values centred and normalised likewise. ``keys`` (and ``values``) ``[S, n, D]``
    of any float dtype."""
    x = keys.float()
    x = torch.nn.functional.normalize(x - x.mean(dim=1, keepdim=True), dim=-1)
    if value_weight > 0:
        if values is None or values.shape != keys.shape:
            raise ValueError("kmeans_points: value_weight > 0 needs values shaped like keys")
        y = values.float()
        y = torch.nn.functional.normalize(y - y.mean(dim=1, keepdim=True), dim=-1)
        x = _with_values(x, y, value_weight)
    return x


def _with_values(k: torch.Tensor, v: torch.Tensor, value_weight: float,
                 out_dtype: torch.dtype = torch.float32, chunk: int = 8) -> torch.Tensor:
    """``normalise([k', w v'])`` of centred, normalised keys and values ``[S, n, D]``:
    the value-aware build's points, ``[S, n, 2D]`` in ``out_dtype``. Formed in fp32
    ``chunk`` problems at a time, so the GPU build's temporaries are the output and
    one chunk's fp32 points, not ``S`` problems' (same values as in one piece)."""
    s, n, d = k.shape
    out = torch.empty(s, n, 2 * d, dtype=out_dtype, device=k.device)
    for i in range(0, s, chunk):
        out[i:i + chunk] = torch.nn.functional.normalize(
            torch.cat([k[i:i + chunk].float(), value_weight * v[i:i + chunk].float()],
                      dim=-1), dim=-1)
    return out


def _kmeans_torch(x: torch.Tensor, n_clusters: int, iters: int,
                  values: Optional[torch.Tensor] = None,
                  value_weight: float = 0.0) -> torch.Tensor:
    """Spherical k-means of ``x [S, n, D]`` (S independent problems) in torch ops, as
    :func:`vllm_retro.kmeans.spherical_kmeans`: the points of :func:`kmeans_points`
    (mean-centred, normalised keys, with their values when ``value_weight > 0``),
    strided initial centroids, ``iters`` updates then a final assignment (fp32
    similarities, sums by ``index_add_``). The CPU form, and the twin of
    :func:`_kmeans_triton`."""
    x = kmeans_points(x, values, value_weight)
    s, n, d = x.shape
    cent = x[:, _strided_init(n, n_clusters, x.device), :].clone()
    offs = (torch.arange(s, device=x.device) * n_clusters).unsqueeze(1)
    assign = torch.argmax(torch.bmm(x, cent.transpose(1, 2)), dim=-1)
    flat_x = x.reshape(s * n, d)
    for _ in range(iters):
        sums = torch.zeros(s * n_clusters, d, dtype=x.dtype, device=x.device)
        sums.index_add_(0, (assign + offs).reshape(-1), flat_x)
        sums = sums.view(s, n_clusters, d)
        norms = sums.norm(dim=-1, keepdim=True)
        cent = torch.where(norms > 0, sums / norms.clamp_min(1e-30), cent)
        assign = torch.argmax(torch.bmm(x, cent.transpose(1, 2)), dim=-1)
    return assign


def _kmeans_triton(xs: torch.Tensor, n_clusters: int, iters: int) -> torch.Tensor:
    """:func:`_kmeans_torch`'s algorithm on points already centred and normalised
    (``xs [S, n, D]``, the products' dtype): Triton assignment (sums accumulated from
    ``xs`` itself) and centroid update kernels. Returns ``[S, n]`` int32."""
    from ..kernels.triton_kmeans import kmeans_assign, kmeans_update
    s, n, d = xs.shape
    cent = xs[:, _strided_init(n, n_clusters, xs.device), :].contiguous()
    sums = torch.zeros(s, n_clusters, d, dtype=torch.float32, device=xs.device)
    assign = kmeans_assign(xs, cent, xs, sums, int32=True)
    for it in range(iters):
        last = it == iters - 1
        kmeans_update(sums, cent, zero=not last)
        assign = kmeans_assign(xs, cent, None if last else xs, None if last else sums,
                               int32=True)
    return assign


@dataclass
class SegmentJob:
    """One segment to index: the request's physical block ids (``[nblocks]`` int64,
    on the cache's device, covering at least ``p1``), its token range and its pool
    pages (``[(p1 - p0) / bs]`` int64 on the device: the ``ibt`` entries of the
    segment's blocks, in order)."""

    block_ids: torch.Tensor
    p0: int
    p1: int
    pages: torch.Tensor


def build_segments(kv_cache: torch.Tensor, layout: PagedIndexLayout, pool: IndexPool,
                   jobs: Sequence[SegmentJob], config: RetroConfig,
                   max_batch_bytes: int = 768 << 20) -> None:
    """Clusters the keys of ``jobs`` (all of the same length) for one layer, writes
    the clusters into the layer's index pool (at each job's pages) and reorders
    each segment's K/V in place, per KV head, into cluster order (see the module
    doc).

    ``kv_cache``: vLLM's view ``(NB, H, bs, 2D)``. ``pool``: the layer's pool.
    """
    if not jobs:
        return
    n = jobs[0].p1 - jobs[0].p0
    if any(j.p1 - j.p0 != n for j in jobs):
        raise ValueError("build_segments: jobs of one call must have equal lengths")
    bs, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    if n % bs or any(j.p0 % bs for j in jobs):
        raise ValueError("build_segments: segments must be block-aligned")
    c = clusters_in(n, config)
    # Temporaries per segment and head, in bytes per key element. The torch k-means
    # (CPU) holds the keys in fp32 a few times over (~24) and an [n, C] similarity
    # matrix; with kmeans_value_weight the values' points and the 2D-wide
    # concatenation double that. The Triton one (GPU) holds the points in bf16 (2;
    # with values the keys' and values' points and their concatenation, 8: one
    # segment's fp32 concatenation at a time, see _with_values) and fp32 centroids
    # and sums ([C, width]: under 2). The reorder adds a copy of the segment's K/V
    # (2 elements per key element). Several segments per call: fewer, larger launches.
    # With value_correction on the CPU (the torch twin of write_value_correction,
    # after the k-means): the segment's K/V in fp32 and their deviations from the
    # cluster means, and one gathered vector per token (~28); the GPU kernel reads
    # each cluster from the cache and holds nothing per token.
    valued = config.kmeans_value_weight > 0
    if kv_cache.is_cuda:
        per_elem = (8 if valued else 2) + 2
    else:
        per_elem = 24 + (24 if valued else 0)
    if pool.value_correction and not kv_cache.is_cuda:
        per_elem = max(per_elem, 28)
    per_job = (h * n * d * (per_elem + 2 * layout.elem_size)
               + (0 if kv_cache.is_cuda else h * n * c * 4))
    step = max(1, max_batch_bytes // per_job)
    epb = layout.entries_per_block
    if any(len(j.pages) != n // bs * epb for j in jobs):
        raise ValueError(f"build_segments: a job needs {epb} pool page(s) per block")
    if c > n // bs * epb:
        raise ValueError(f"build_segments: {c} clusters in a segment of {n // bs * epb} "
                         "index entries (cluster_size below the layout's entry size)")
    for i in range(0, len(jobs), step):
        _build_batch(kv_cache, layout, pool, jobs[i:i + step], n, c, config)


def _build_batch(kv_cache, layout: PagedIndexLayout, pool: IndexPool,
                 jobs: Sequence[SegmentJob], n: int, c: int, config: RetroConfig) -> None:
    from ..kernels import uses_triton, write_clusters, write_value_correction
    bs, h, d = layout.block_size, layout.num_kv_heads, layout.head_dim
    dev = kv_cache.device
    m = len(jobs)
    seg_blocks = torch.stack([j.block_ids[j.p0 // bs: j.p1 // bs] for j in jobs])  # [m, n/bs]
    seg_pages = torch.stack([j.pages.to(dev) for j in jobs]).long()                # [m, n/bs]
    p0s = to_device([j.p0 for j in jobs], torch.int32, dev)
    w = config.kmeans_value_weight
    if uses_triton(kv_cache):
        from ..kernels.triton_kmeans import segment_keys
        sim_dtype = torch.bfloat16 if kv_cache.is_cuda else torch.float32
        xs = segment_keys(kv_cache, seg_blocks, d, sim_dtype)                  # [mH, n, D]
        if w > 0:
            # The values (the last D of each token row), centred and normalised by
            # the same kernels; the points [k', w v'] normalised (2D wide).
            xv = segment_keys(kv_cache[..., d:], seg_blocks, d, sim_dtype)
            xs = _with_values(xs, xv, w, sim_dtype, chunk=h)
            del xv
        assign = _kmeans_triton(xs, c, config.kmeans_iters)
    else:
        pos = torch.arange(n, device=dev)
        kv = kv_cache[seg_blocks[:, pos // bs].reshape(-1), :, (pos % bs).repeat(m), :]
        kv = kv.view(m, n, h, 2 * d).permute(0, 2, 1, 3).float().reshape(m * h, n, 2 * d)
        assign = _kmeans_torch(kv[..., :d], c, config.kmeans_iters,               # [mH, n]
                               values=kv[..., d:] if w > 0 else None, value_weight=w)
    vals, order = torch.sort(assign, dim=1, stable=True)
    # Cluster j's entries are [starts[j], starts[j] + sizes[j]) of the sorted order.
    probe = torch.arange(c + 1, device=dev, dtype=vals.dtype).expand(m * h, c + 1)
    bounds = torch.searchsorted(vals.contiguous(), probe.contiguous())
    starts = bounds[:, :c]
    sizes = bounds[:, 1:] - starts
    write_clusters(kv_cache, layout, pool, seg_blocks, seg_pages, p0s, order, starts, sizes)
    if pool.value_correction:
        write_value_correction(kv_cache, layout, pool, seg_blocks, seg_pages, starts, sizes,
                               VC_POWER_ITERS)
    if pool.summary_bits == 8:
        quantize_summaries(pool, seg_pages)
    if pool.mean_value_bits == 8:
        quantize_mean_values(pool, seg_pages)


def make_headers(num_blocks: int, device) -> torch.Tensor:
    """The header table: ``[num_blocks, HDR_WORDS]`` int32, zero (no index)."""
    return torch.zeros(num_blocks, HDR_WORDS, dtype=torch.int32, device=device)


def header_row(clustered_end: int, n_ret: int, n_est: int, num_clusters: int,
               ibt_row: int = 0, *, horizon: int = 0) -> List[int]:
    """One header row (``HDR_WORDS`` ints). ``horizon``: mirrored tokens of the
    clustered zone (block-aligned, ``<= clustered_end``; 0: none)."""
    if horizon < 0 or horizon > max(clustered_end, 0):
        raise ValueError(f"header_row: horizon {horizon} outside [0, clustered_end "
                         f"{clustered_end}]")
    row = [0] * HDR_WORDS
    row[HDR_CLUSTERED_END] = clustered_end
    row[HDR_N_RETRIEVE] = n_ret
    row[HDR_N_ESTIMATE] = n_est
    row[HDR_NUM_CLUSTERS] = num_clusters
    row[HDR_IBT_ROW] = ibt_row
    row[HDR_HORIZON] = horizon
    return row
