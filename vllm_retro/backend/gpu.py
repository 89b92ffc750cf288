"""The ``retro`` attention backend on GPUs (vLLM 0.26, FlashAttention build).

* Prefill rows (query length > 1) run vLLM's FlashAttention on their rows alone;
  a prompt larger than the KV cache, released behind its prefill front (wave
  buffer), attends to its released tokens exactly from the host mirror
  (:mod:`vllm_retro.memory.released_prefill`).
* Decode rows (query length 1) run :func:`vllm_retro.kernels.paged_decode_attention`
  over the paged wave index (:mod:`vllm_retro.index.paged`): one fixed launch
  sequence per layer for all decode rows, reading only device buffers whose
  addresses never change, so pure-decode steps are captured in vLLM's FULL CUDA
  graphs (``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``). A row without an
  index yet (short context) is attended exactly, by the same kernels.
* With ``dense_below`` (:class:`DenseSwitch`), a step of at most
  :data:`DENSE_MAX_ROWS` decode rows whose contexts average fewer tokens than that
  runs vLLM's FlashAttention for all its rows instead (few short rows: retro's
  fixed chain of kernels costs more than dense reads). Captured pure-decode graphs
  of at most that many rows hold both paths; the metadata builder disables the
  nodes of the path not taken before the replay (:mod:`.graph_paths`).
* The index lives in retro's own index pool (:class:`~vllm_retro.index.paged.IndexPool`
  per layer, addressed through the index table ``ibt`` of an
  :class:`~vllm_retro.index.paged.IndexAllocator`), allocated when the attention
  layers are built (before vLLM profiles memory, so vLLM sizes its KV cache around
  it); vLLM's KV pages are stock, unpadded pages. Pages and rows are freed when a
  request finishes, aborts or is preempted; a request that finds the pool full is
  attended exactly and counted (``index_pool_full``).
* :class:`PagedIndexManager` (one per worker) keeps the request table and, before
  each forward (the connector's ``start_load_kv``), clusters the segments that
  closed, for every layer, on the GPU, and updates the per-request headers.
* With ``wave_buffer`` (issue 14, design §8) the manager also owns the pinned host
  mirror and the GPU cluster cache (:mod:`vllm_retro.memory`): right after a
  request's segments are indexed it copies them to the mirror, publishes the
  mirrored end as the row's *horizon* in its header (the decode kernels then read
  K/V below it from the cache / mirror, never through the block table) and reports
  it to vLLM's scheduler, which releases the blocks below it (``kv_spec``).

What the kernels served is counted on the device (rows with / without an index,
tokens read exactly / estimated) and logged; tests assert on these counters.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .. import compat
from ..config import CLUSTER_CACHE_AUTO_FRACTION, INDEX_POOL_AUTO_FRACTION, RetroConfig
# The header words and header_row / make_headers are looked up on the module when
# used: the wave buffer's header word (HDR_HORIZON) comes with the kernels that read it.
from ..index import paged as _paged
from ..index.paged import (IndexAllocator, IndexPool, PagedIndexLayout, SegmentJob,
                           budget, build_segments, check_config_for_paged, clusters_in,
                           plan_segments, sink_end)
from ..kernels import DecodeWorkspace, paged_decode_attention, triton_decode
from ..request_table import RequestTable
from ..transfer import to_device
from . import graph_paths
from .connector import RetroStepMetadata
from .refusals import RetroBackendTraits, refuse, unsupported_reasons

_DenseBackend, _DenseBuilder, _DenseImpl = compat.dense_backend_classes()
AttentionCGSupport = compat.attention_cg_support()
logger = compat.logger(__name__)

#: What the GPU backend supports, declared once (``refusals`` names the rest).
SUPPORTED_HEAD_SIZES = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")
KERNEL_BLOCK_SIZE = 16
#: Band re-ranking (``rank_interval`` > 1) with one phase for the batch (every row
#: ranks in full on the same steps; ``IndexPool.band_phase``). RETRO_BAND_PHASE=0 keeps
#: each row's own phase, for A/B measurements of the two forms on one machine.
BAND_PHASE = os.environ.get("RETRO_BAND_PHASE", "1") != "0"


class RetroBackend(RetroBackendTraits, _DenseBackend):
    """Dense prefill + paged-wave-index decode. Registered in vLLM's CUSTOM slot."""

    supported_dtypes = list(SUPPORTED_DTYPES)
    supported_kv_cache_dtypes = list(SUPPORTED_KV_CACHE_DTYPES)

    @staticmethod
    def get_impl_cls():
        return RetroImpl

    @staticmethod
    def get_builder_cls():
        return RetroMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes():
        return [KERNEL_BLOCK_SIZE]

    @classmethod
    def get_supported_head_sizes(cls) -> list:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in SUPPORTED_HEAD_SIZES

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype is None or kv_cache_dtype in SUPPORTED_KV_CACHE_DTYPES

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla,
                             has_sink, use_sparse, use_mm_prefix, device_capability):
        if block_size is not None and block_size != KERNEL_BLOCK_SIZE:
            return f"retro needs KV block size {KERNEL_BLOCK_SIZE}, got {block_size}"
        return None


@dataclass
class RetroMetadata:
    """One step's attention metadata for retro layers (decode rows first).

    num_decodes: leading rows with one query token. decode_block_table /
    decode_seq_lens: their rows of vLLM's (persistent) block table and seq_lens.
    prefill: FlashAttention metadata of the remaining rows (None: none).
    num_decode_tokens: query tokens of the decode rows; num_actual_tokens: of all rows.
    prefill_query_start: host offsets of the prefill rows' queries (from 0).
    released_plan: the step's plan for prefill rows with released tokens, made by
    the first layer that needs it (:meth:`PagedIndexManager.plan_released_prefill`).
    """

    num_decodes: int
    decode_block_table: torch.Tensor
    decode_seq_lens: torch.Tensor
    prefill: Optional[object]
    num_decode_tokens: int
    num_actual_tokens: int
    prefill_query_start: Optional[List[int]] = None
    released_plan: Optional[object] = None
    # The dense switch: ``dense`` this step runs vLLM's FlashAttention for every row
    # (``flash``: its metadata over all rows); during graph capture ``flash`` and
    # ``switch`` are set but ``dense`` is not (the graph holds both paths; the
    # switch disables one before each replay).
    dense: bool = False
    flash: Optional[object] = None
    switch: Optional["DenseSwitch"] = None


class RetroMetadataBuilder(_DenseBuilder):
    """Splits a step into decode rows (retro kernels) and prefill rows (FA)."""

    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    supports_update_block_table = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        return cls._cudagraph_support

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self._slice = None
        self._capturing = False
        logger.info("retro attention backend (GPU, paged index) active for %d layers "
                    "(decode kernels: %s)", len(layer_names),
                    f"selection {triton_decode.SELECT}, score stage {triton_decode.SCORE_IMPL}"
                    if triton_decode is not None else "none, Triton missing: the twin serves")

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        from .cpu import slice_common_metadata
        cm = common_attn_metadata
        n = cm.num_reqs
        qsl = cm.query_start_loc_cpu[:n + 1]
        qlen = (qsl[1:] - qsl[:-1]).tolist()  # a CPU tensor: no device sync
        nd = 0
        # Rows padded for a CUDA graph have no query token; they count as decode
        # rows (their seq_len is 0, so the kernels only zero their output).
        while nd < n and qlen[nd] <= 1:
            nd += 1
        switch = manager_for(self.vllm_config).dense_switch(self.device)
        dense = switch is not None and not self._capturing and switch.choose(
            getattr(cm, "seq_lens_cpu_upper_bound", None), nd, cm.max_seq_len,
            sum(1 for q in qlen[:nd] if q == 1))
        if dense:
            # One FlashAttention build for all rows (its schedule buffer is shared:
            # a second build in the step would overwrite the first one's).
            return RetroMetadata(num_decodes=nd, decode_block_table=cm.block_table_tensor[:nd],
                                 decode_seq_lens=cm.seq_lens[:nd], prefill=None,
                                 num_decode_tokens=int(qsl[nd]),
                                 num_actual_tokens=cm.num_actual_tokens, dense=True,
                                 flash=super().build(0, cm, fast_build))
        prefill = flash = None
        if nd < n:
            # Cascade attention off: the prefix is shared with decode rows.
            prefill = super().build(0, slice_common_metadata(cm, nd, n), fast_build)
        elif switch is not None and self._capturing and nd <= DENSE_MAX_ROWS:
            # The captured graph holds the dense path too (pure decode: one build);
            # only graphs a dense step can replay (at most DENSE_MAX_ROWS rows, as
            # padded): larger ones hold retro's kernels alone.
            flash = super().build(0, cm, fast_build)
        nd_tok = int(qsl[nd])
        return RetroMetadata(num_decodes=nd,
                             decode_block_table=cm.block_table_tensor[:nd],
                             decode_seq_lens=cm.seq_lens[:nd],
                             prefill=prefill, num_decode_tokens=nd_tok,
                             num_actual_tokens=cm.num_actual_tokens,
                             prefill_query_start=None if prefill is None else
                             [int(x) - int(qsl[nd]) for x in qsl[nd:n + 1]], flash=flash,
                             switch=switch if flash is not None else None)

    def build_for_cudagraph_capture(self, common_attn_metadata):
        self._capturing = True
        try:
            return self.build(0, common_attn_metadata)
        finally:
            self._capturing = False


class RetroImpl(_DenseImpl):
    """Attention impl: FlashAttention for prefill rows, retro kernels for decode rows."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                 sliding_window, kv_cache_dtype, logits_soft_cap=None,
                 attn_type=None, kv_sharing_target_layer_name=None, sinks=None,
                 **kwargs) -> None:
        refuse(unsupported_reasons(
            head_size=head_size, head_sizes=SUPPORTED_HEAD_SIZES,
            kv_cache_dtype=kv_cache_dtype, kv_cache_dtypes=SUPPORTED_KV_CACHE_DTYPES,
            attn_type=attn_type, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
            logits_soft_cap=logits_soft_cap, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name))
        if attn_type is None:
            attn_type = compat.attention_type_decoder()
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks, **kwargs)
        self._manager = manager_for(compat.current_vllm_config())
        self._manager.note_layer(num_kv_heads, head_size, num_heads)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:
            return output.fill_(0)  # profiling run, as FlashAttention
        md: RetroMetadata = attn_metadata
        if md.dense:
            return super().forward(layer, query, key, value, kv_cache, md.flash, output)
        nd = md.num_decodes
        if nd:
            if md.switch is not None and torch.cuda.is_current_stream_capturing():
                # Both paths in the graph, each run only when the step calls for it
                # (the builder's switch: the one that picks the path per step).
                dense_impl = super()
                md.switch.capture_both(
                    lambda: dense_impl.forward(layer, query, key, value, kv_cache,
                                               md.flash, output),
                    lambda: self._decode(layer, query, kv_cache, md, output))
            else:
                self._decode(layer, query, kv_cache, md, output)
        if md.prefill is not None:
            t0, t1 = md.num_decode_tokens, md.num_actual_tokens
            if self._manager.released_prefills:
                self._prefill_released(layer, query[t0:t1], kv_cache, md, output[t0:t1])
            else:
                super().forward(layer, query[t0:t1], key[t0:t1], value[t0:t1], kv_cache,
                                md.prefill, output[t0:t1])
        return output

    def _decode(self, layer, query, kv_cache, md: RetroMetadata, output) -> None:
        """Retro's kernels for the step's decode rows."""
        mgr = self._manager
        nd = md.num_decodes
        if not mgr.decode_ready():
            # vLLM's CUDA-graph memory profiling (the V1 runner's
            # profile_cudagraph_memory) runs dummy decodes before any KV cache
            # exists: no request can be in them.
            output[:nd].zero_()
            return
        # Wave buffer: the layer's view of the cluster cache and host mirror,
        # built once at registration (fixed addresses for CUDA graphs).
        wave = mgr.wave_views.get(layer.layer_name)
        kw = {} if wave is None else {"wave": wave}
        paged_decode_attention(
            query[:nd].view(nd, self.num_heads, self.head_size), kv_cache,
            mgr.layout, md.decode_block_table, md.decode_seq_lens, mgr.headers,
            mgr.index_alloc.ibt, mgr.pools[layer.layer_name], mgr.sink_end, self.scale,
            out=output[:nd].view(nd, self.num_heads, self.head_size),
            workspace=mgr.workspace,
            count_stats=layer.layer_name == mgr.first_layer,
            variance_cap=mgr.config.variance_cap,
            retrieval_rank=mgr.config.retrieval_rank, **kw)

    def _prefill_released(self, layer, query, kv_cache, md: RetroMetadata, output):
        """Prefill rows of a step where some request's early tokens were released
        (wave buffer, design §8.2): FlashAttention over each row's resident blocks
        (a compacted block table), plus, for the released rows, exact attention to
        the tokens read back from the host mirror, merged by log-sum-exp."""
        from ..memory.released_prefill import released_prefill_attention
        mgr = self._manager
        if md.released_plan is None:
            md.released_plan = mgr.plan_released_prefill(md)
        plan = md.released_plan
        pf = md.prefill
        n = md.num_actual_tokens - md.num_decode_tokens
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        paged_attn, dense_attn = flash_attn_pair(
            kv_cache, self.head_size, self.scale, self.vllm_flash_attn_version,
            pf.query_start_loc, pf.max_query_len, pf.max_seq_len, plan.cu_lens)
        released_prefill_attention(
            q, md.prefill_query_start, pf.block_table, pf.seq_lens, plan.rows,
            mgr.mirror, mgr.layer_index[layer.layer_name], mgr.sink_end,
            mgr.layout.block_size, paged_attn, dense_attn, mgr.prefill_staging, out,
            compacted=plan.compacted)


def flash_attn_pair(kv_cache: torch.Tensor, head_size: int, scale: float, fa_version: int,
                    query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int,
                    cu_lens):
    """The two attention calls of :func:`~vllm_retro.memory.released_prefill.
    released_prefill_attention` on vLLM's FlashAttention: causal over the paged
    cache ``[NB, H, bs, 2D]`` (its FlashAttention layout) through a given block
    table and key counts, and non-causal over contiguous K/V ``[n, H, D]``; both
    return ``(out [T, Hq, D], lse [Hq, T])``. ``cu_lens(q_len, k_len)`` gives the
    ``cu_seqlens`` pair of a dense call on the device."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func
    kc, vc = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    fa = dict(softmax_scale=scale, return_softmax_lse=True, fa_version=fa_version)

    def paged_attn(q, block_table, seq_lens):
        return flash_attn_varlen_func(
            q=q, k=kc, v=vc, cu_seqlens_q=query_start_loc, max_seqlen_q=max_query_len,
            seqused_k=seq_lens, max_seqlen_k=max_seq_len, causal=True,
            block_table=block_table, **fa)

    def dense_attn(q, k, v):
        cu_q, cu_k = cu_lens(q.shape[0], k.shape[0])
        return flash_attn_varlen_func(
            q=q, k=k, v=v, cu_seqlens_q=cu_q, max_seqlen_q=q.shape[0], cu_seqlens_k=cu_k,
            max_seqlen_k=k.shape[0], causal=False, **fa)
    return paged_attn, dense_attn


# ---------------------------------------------------------------- per worker
STAT_NAMES = ("retro_rows", "dense_rows", "exact_tokens", "estimated_tokens",
              "context_tokens", "reranked_rows", "carried_rows")
# Requests that found the index pool (or the index table's rows) full: attended
# exactly, each counted once (host-side, in PagedIndexManager.stats()).
POOL_FULL_STAT = "index_pool_full"
# Decode rows served by vLLM's FlashAttention through the dense switch (host-side).
FLASH_ROWS_STAT = "flash_rows"
# Spare index-table rows above max_num_seqs.
IBT_ROW_MARGIN = 8
# Released tokens read back per piece by a prefill row (staging: 2 x 8 MiB per 1K
# tokens at H=8, D=128, bf16, allocated with the wave buffer).
PREFILL_PIECE_TOKENS = 32768
# Without a GPU (CPU tests) the cluster cache's auto size: this share of the mirror.
CPU_CACHE_MIRROR_SHARE = 8


#: The most decode rows a dense step may have (measured on the H200 at 32K: dense
#: faster at one and two rows, retro 2.6x faster at the largest batch).
DENSE_MAX_ROWS = 2


class DenseSwitch:
    """Per step, vLLM's FlashAttention or retro's kernels for all decode rows
    (``dense_below``). The choice (:meth:`choose`) is made on the host from the
    rows' sequence-length bounds when the step's metadata is built. A captured
    graph of at most :data:`DENSE_MAX_ROWS` rows holds both paths
    (:meth:`capture_both`, :class:`graph_paths.GraphPaths`), and :meth:`choose`
    disables the nodes of the path not taken before the replay (only when the
    choice changes). ``flash_rows`` counts the decode rows served by
    FlashAttention."""

    def __init__(self, threshold: int, anchor: Optional[torch.Tensor] = None,
                 ops=None) -> None:
        self.threshold = int(threshold)
        self.flash_rows = 0
        # Graphs holding both paths (None: no CUDA graphs, e.g. the CPU tests).
        self.paths = None if anchor is None else graph_paths.GraphPaths(anchor, ops)

    def choose(self, seq_lens_upper: Optional[torch.Tensor], num_decodes: int,
               max_seq_len: int, real_rows: int) -> bool:
        """Whether this step runs dense (:func:`dense_step`); makes the captured
        graphs take that path and counts ``real_rows`` (decode rows with a query
        token) when it does."""
        dense = dense_step(seq_lens_upper, num_decodes, max_seq_len, self.threshold,
                           real_rows)
        if self.paths is not None:
            self.paths.take(dense)
        if dense:
            self.flash_rows += real_rows
        return dense

    def capture_both(self, dense_fn, retro_fn) -> None:
        """Captures ``dense_fn()`` and then ``retro_fn()`` into the graph being
        captured on this thread; at replay only the path :meth:`choose` took runs."""
        graph = graph_paths.capturing_graph()
        if graph is None or self.paths is None:
            raise RuntimeError("retro dense switch: a CUDA graph is being captured but not "
                               "through torch.cuda.CUDAGraph after graph_paths.install()")
        self.paths.capture(graph, dense_fn, retro_fn)


def dense_step(seq_lens_upper: Optional[torch.Tensor], num_decodes: int, max_seq_len: int,
               threshold: int, real_rows: Optional[int] = None) -> bool:
    """Whether a step's decode rows run vLLM's FlashAttention: at most
    :data:`DENSE_MAX_ROWS` rows with a query token (``real_rows``; default
    ``num_decodes``) whose contexts average fewer than ``threshold`` tokens (0:
    never). Retro's step is a chain of five dependent kernels whose latency at one
    or two rows outweighs the bytes it saves on short contexts; at more rows its
    batched kernels win (32K: 2.6x dense's throughput at the largest batch).
    ``seq_lens_upper``: host upper bounds of the step's sequence lengths (decode
    rows first, padding rows 0; None: ``max_seq_len`` bounds every row)."""
    rows = num_decodes if real_rows is None else real_rows
    # num_decodes counts the rows a CUDA graph pads the step to: a graph of more
    # than DENSE_MAX_ROWS rows holds no dense path.
    if threshold <= 0 or rows <= 0 or max(rows, num_decodes) > DENSE_MAX_ROWS:
        return False
    if seq_lens_upper is not None:
        total = int(seq_lens_upper[:num_decodes].sum())
    else:
        total = rows * int(max_seq_len)
    return total < rows * threshold


@dataclass
class ReleasedPrefillPlan:
    """One step's prefill rows with released tokens (for all layers): the rows, the
    compacted block table and key counts, and the ``cu_seqlens`` pairs of the
    released pieces (made once, reused by every layer)."""

    rows: list
    compacted: tuple
    _cu: Dict[tuple, tuple] = field(default_factory=dict)

    def cu_lens(self, q_len: int, k_len: int) -> tuple:
        key = (q_len, k_len)
        cu = self._cu.get(key)
        if cu is None:
            dev = self.compacted[0].device
            cu = self._cu[key] = (to_device([0, q_len], torch.int32, dev),
                                  to_device([0, k_len], torch.int32, dev))
        return cu


def pool_page_bytes(lay: PagedIndexLayout, num_layers: int, hq: int,
                    error_rank: bool = False) -> int:
    """Device bytes one index-pool page costs: its index in every layer plus the
    decode workspace's scratch for it (``hq`` query heads; ``error_rank``: with
    the error rank's scratch)."""
    h = lay.num_kv_heads
    return lay.index_bytes * num_layers + DecodeWorkspace.page_bytes(h, max(1, hq // h),
                                                                     error_rank)


def index_pool_auto_bytes(usable_b: float, lay: PagedIndexLayout, num_layers: int,
                          hq: int, host_b: int = 0, error_rank: bool = False) -> float:
    """The index pool's automatic size (``index_pool_gib`` 0):
    :data:`~vllm_retro.config.INDEX_POOL_AUTO_FRACTION` of the memory vLLM may use
    (about the index of a full KV cache), plus, with the wave buffer, the index of
    the tokens the host mirror's ``host_b`` bytes hold: mirrored requests give their
    KV blocks back but keep their index. Without that share the requests past the
    KV cache's capacity find the pool full and are attended exactly (measured on the
    H200 at 128K x 8: TPOT 47.8 ms against 17.2 ms with the pool sized for them)."""
    # The fraction was measured for the base layout (3 float rows per page, one page
    # per KV block), where it gives the pool the index of about as many tokens as
    # the KV cache then holds: the pool's share of the memory the two split is
    # r0 / (1 + r0), r0 the index bytes per KV byte. A layout with r index bytes
    # per KV byte (value_correction's 5 rows, 2 or 4 pages per block, the error
    # rank's scratch) keeps that balance at r / (1 + r): scaling the share by r / r0
    # instead would give the pool the index of far more tokens than the smaller KV
    # cache can hold (4-token clusters with the correction: 56% of the memory for
    # the pool, ~2.5x the KV cache's tokens).
    base = dataclasses.replace(lay, float_slots=_paged.FLOAT_SLOTS, entries_per_block=1)
    page_b = pool_page_bytes(lay, num_layers, hq, error_rank)
    kv_b = lay.kv_page_bytes * num_layers
    r = page_b * lay.entries_per_block / kv_b
    r0 = pool_page_bytes(base, num_layers, hq) / kv_b
    grow = (r / (1 + r)) / (r0 / (1 + r0))
    return INDEX_POOL_AUTO_FRACTION * usable_b * grow + host_b / kv_b * page_b * \
        lay.entries_per_block


class PagedIndexManager:
    """One worker's paged-index state: layout, KV caches, headers, workspace,
    request table and the index maintenance run before each forward."""

    def __init__(self, vllm_config, requests: RequestTable) -> None:
        from ..worker_state import retro_config_from_vllm
        self.config: RetroConfig = retro_config_from_vllm(vllm_config)
        # Weak: the worker state (a process global, dropped when the config dies)
        # holds this manager; a strong reference would keep a closed engine's
        # config alive, and through its forward context every KV cache.
        self._vllm_config = weakref.ref(vllm_config)
        self.requests = requests
        requests.on_remove = self._on_remove
        self.layout: Optional[PagedIndexLayout] = None
        # Index storage: one IndexPool per layer (a list until the KV caches are
        # registered, then by layer name), the index table, and whether they were
        # allocated before vLLM measured free memory.
        self._pool_list: List[IndexPool] = []
        self.pools: Dict[str, IndexPool] = {}
        self.index_alloc: Optional[IndexAllocator] = None
        # Band re-ranking's shared phase (rank_interval > 1), and the step count behind it.
        self.band_phase: Optional[torch.Tensor] = None
        self._band_step = 0
        # The carried rank reference (rank_reference "carried"): [layers, ibt rows, H]
        # float32, each layer's pool a view; a request's rows zeroed with its header.
        self.rank_ref: Optional[torch.Tensor] = None
        self.pool_presized = False
        self._pool_layout: Optional[PagedIndexLayout] = None
        self.index_pool_full = 0
        self.kv_caches: Dict[str, torch.Tensor] = {}
        self.headers: Optional[torch.Tensor] = None
        self._profiling_logged = False
        self.workspace: Optional[DecodeWorkspace] = None
        self.first_layer: Optional[str] = None
        self.sink_end = 0
        self.segments_built = 0
        self.index_build_s = 0.0
        self._build_events: list = []
        self.last_log_time = time.monotonic()
        self.logged = [0] * len(STAT_NAMES)
        self.logged_flash = 0
        self._head = None
        # Wave buffer (design §8): host mirror, cluster cache, per-layer kernel views
        # (by layer name), the reporter of horizons, and its counters.
        self.mirror = None
        self.cache = None
        self.wave_views: Dict[str, object] = {}
        self.reporter = None
        if self.config.wave_buffer:
            from . import kv_spec
            self.reporter = kv_spec.reporter_for(vllm_config)
        self.mirror_refused = 0
        self.mirror_stopped = 0
        # Release during prefill (design §8.2): the lag behind the prefill front
        # (set when the KV caches are registered), the step's prefill requests with
        # released tokens (by first block id), and the read-back staging buffers.
        self.prefill_lag: Optional[int] = None
        self.released_prefills: Dict[int, object] = {}
        self.prefill_staging = None
        self.wave_steps = 0
        self._wave_rows = False
        self._wave_logged = [0, 0, 0, 0]   # hits, misses, admitted, steps last logged
        # The dense switch (``dense_below``), made by the first metadata build.
        self.switch: Optional[DenseSwitch] = None
        self._switch_checked = False

    @property
    def vllm_config(self):
        vc = self._vllm_config()
        if vc is None:
            raise RuntimeError("retro: the engine whose config this index manager "
                               "served was closed")
        return vc

    def dense_switch(self, device) -> Optional[DenseSwitch]:
        """The worker's :class:`DenseSwitch` (None: ``dense_below`` 0, or FULL CUDA
        graphs where neither this torch nor ``vllm_retro._C`` can hold two paths in
        a graph, which is logged once). Made before vLLM captures any graph (the
        first layer's :meth:`note_layer`): it makes torch keep captured graphs."""
        if not self._switch_checked:
            self._switch_checked = True
            t = self.config.dense_below
            cc = getattr(self.vllm_config, "compilation_config", None)
            mode = getattr(cc, "cudagraph_mode", None)
            full = bool(mode is not None and mode.has_full_cudagraphs())
            if t and full and not graph_paths.available():
                logger.warning("retro: dense_below %d is off: this torch (CUDAGraph "
                               "keep_graph, torch 2.8+) or vllm_retro._C (built without "
                               "CUDA?) cannot hold two paths in a CUDA graph, which the "
                               "switch needs under FULL CUDA graphs", t)
            elif t:
                anchor = None
                if full:
                    graph_paths.install()
                    anchor = torch.zeros(1, dtype=torch.int8, device=device)
                self.switch = DenseSwitch(t, anchor)
                logger.info("retro: decode steps of at most %d rows whose contexts average "
                            "fewer than %d tokens run FlashAttention (dense_below)",
                            DENSE_MAX_ROWS, t)
        return self.switch

    # ---------------------------------------------------------------- set-up
    def note_layer(self, num_kv_heads: int, head_size: int, num_heads: int = 0) -> None:
        """Called by every retro layer's impl as the model is built: on a GPU, the
        first call allocates the index pools of all layers, the index table and the
        decode workspace, before vLLM's memory profiling (so vLLM sizes the KV cache
        around them). Elsewhere (or if that fails) they are allocated when the KV
        caches are registered."""
        self._head = (num_kv_heads, head_size)
        if torch.cuda.is_available() and not self._switch_checked:
            # Before vLLM captures a graph: the switch makes torch keep them.
            self.dense_switch(torch.device("cuda", torch.cuda.current_device()))
        if self._pool_list or not torch.cuda.is_available():
            return
        try:
            self._presize_pools(num_kv_heads, head_size, num_heads)
        except Exception as exc:  # noqa: BLE001 (allocated at registration instead)
            logger.warning("retro: index pool not allocated before KV sizing (%s); it "
                           "will be allocated at KV-cache registration, outside vLLM's "
                           "memory accounting", exc)
            self._pool_list = []
            return
        if self.config.wave_buffer:
            # Not caught: a host budget that cannot be pinned or a cache that does
            # not fit is a configuration error, reported as such.
            vc = self.vllm_config
            dev = torch.device("cuda", torch.cuda.current_device())
            util = float(getattr(vc.cache_config, "gpu_memory_utilization", 0.9))
            usable = util * torch.cuda.get_device_properties(dev).total_memory
            self._allocate_wave(self._pool_layout, len(self._pool_list), dev,
                                auto_cache_b=CLUSTER_CACHE_AUTO_FRACTION * usable)

    def _presize_pools(self, h: int, d: int, hq: int) -> None:
        vc = self.vllm_config
        mc = vc.model_config
        dtype = mc.dtype
        kvd = getattr(vc.cache_config, "cache_dtype", "auto")
        if kvd in ("float16", "bfloat16"):
            dtype = getattr(torch, kvd)
        num_layers = int(mc.get_num_layers(vc.parallel_config))
        dev = torch.device("cuda", torch.cuda.current_device())
        lay = self.layout_for(h, d, dtype, KERNEL_BLOCK_SIZE)
        budget_b = self.config.index_pool_gib * 2**30
        if not budget_b:
            util = float(getattr(vc.cache_config, "gpu_memory_utilization", 0.9))
            total = torch.cuda.get_device_properties(dev).total_memory
            budget_b = index_pool_auto_bytes(
                util * total, lay, num_layers, hq or h,
                self._wave_host_bytes() if self.config.wave_buffer else 0,
                error_rank=self._error_rank)
        self._allocate_index(lay, num_layers, hq or h, dev, budget_b=budget_b)
        self.pool_presized = True

    @property
    def _error_rank(self) -> bool:
        """Whether the decode kernels choose the exact set by the error rank (its
        scratch is part of each pool page's cost)."""
        return self.config.retrieval_rank == "error"

    def _carried_rank_reference(self) -> bool:
        """Whether the decode kernels (or the twin, without Triton) rank by the
        carried reference."""
        if triton_decode is None:
            return self.config.carries_rank_reference
        return triton_decode.carries_rank_reference(self.config)

    def _wave_host_bytes(self) -> int:
        from . import kv_spec
        return kv_spec.wave_host_bytes(self.config, self.vllm_config)

    def _allocate_index(self, lay: PagedIndexLayout, num_layers: int, hq: int, dev,
                        budget_b: float = 0.0, num_pages: int = 0) -> None:
        """The pools (``num_pages``, or as many as ``budget_b`` bytes buy with the
        workspace's scratch per page), the index table and the decode workspace."""
        vc = self.vllm_config
        h = lay.num_kv_heads
        g = max(1, hq // h)
        scratch = DecodeWorkspace.page_bytes(h, g, self._error_rank)
        page_b = pool_page_bytes(lay, num_layers, hq, self._error_rank)
        if not num_pages:
            num_pages = int(budget_b // page_b)
        num_pages = max(1, num_pages)
        max_seqs = vc.scheduler_config.max_num_seqs
        max_len = getattr(getattr(vc, "model_config", None), "max_model_len", None) or \
            num_pages * lay.block_size
        max_pages = -(-int(max_len) // lay.block_size) * lay.entries_per_block
        self._pool_list = [IndexPool(lay, num_pages, dev, summary_bits=self.config.summary_bits,
                                     mean_value_bits=self.config.mean_value_bits,
                                     variance_form=self.config.variance_form,
                                     rank_interval=self.config.rank_interval)
                           for _ in range(num_layers)]
        if self.config.rank_interval > 1 and BAND_PHASE:
            # Band re-ranking's phase, shared by every layer's pool and advanced once
            # per step (_on_step): the batch's rows rank in full on the same steps.
            self.band_phase = torch.zeros(1, dtype=torch.int32, device=dev)
            for pool in self._pool_list:
                pool.band_phase = self.band_phase
        self.index_alloc = IndexAllocator(num_pages, max_seqs + IBT_ROW_MARGIN, max_pages,
                                          dev)
        if self._carried_rank_reference():
            self.rank_ref = torch.zeros(num_layers, self.index_alloc.ibt.shape[0], h,
                                        dtype=torch.float32, device=dev)
            for i, pool in enumerate(self._pool_list):
                pool.rank_ref = self.rank_ref[i]
        cc = vc.compilation_config
        max_rows = max(max_seqs, getattr(cc, "max_cudagraph_capture_size", None) or 0)
        self.workspace = DecodeWorkspace(num_pages, h, g, lay.head_dim, max_rows, dev,
                                         error_rank=self._error_rank)
        self._pool_layout = lay
        total = num_pages * page_b
        logger.info("retro: index pool of %d pages x %d layers (%d B of index per page "
                    "and layer, %d B of decode scratch per page; %.2f GiB in all), "
                    "index table %d rows x %d pages", num_pages, num_layers,
                    lay.index_bytes, scratch, total / 2**30,
                    max_seqs + IBT_ROW_MARGIN, max_pages)

    def _allocate_wave(self, lay: PagedIndexLayout, num_layers: int, dev,
                       auto_cache_b: Optional[float] = None) -> None:
        """The wave buffer's host mirror and GPU cluster cache (after the index
        pool and table: the device tables are keyed by pool page, the mirror's host
        extents by index-table row).

        The mirror: ``host_memory_gib`` of host memory, else
        :func:`~vllm_retro.memory.host_mirror.default_host_budget_bytes`; pinned on
        CUDA; its address tables (12 B per pool page, layer and KV head) on
        ``dev``. The cache: ``cluster_cache_gib``, else ``auto_cache_b``
        (on a GPU :data:`~vllm_retro.config.CLUSTER_CACHE_AUTO_FRACTION` of the
        memory vLLM may use), else (CPU tests) 1/:data:`CPU_CACHE_MIRROR_SHARE` of
        the mirror; never more pages than the mirror holds. Called before vLLM
        profiles memory on a GPU, so the tables and the cache count as non-KV
        memory and vLLM sizes its KV cache around them."""
        from ..memory.cluster_cache import ClusterCache
        from ..memory.host_mirror import HostMirror, MirrorShape
        cfg, alloc = self.config, self.index_alloc
        self.mirror = self.cache = None
        self.wave_views = {}
        shape = MirrorShape.for_layout(lay, alloc.num_rows, num_layers, alloc.num_pages)
        host_b = self._wave_host_bytes()
        page_b = lay.block_size * 2 * lay.head_dim * lay.elem_size
        keys = alloc.num_pages * num_layers * lay.num_kv_heads
        arena_pages = max(1, host_b // page_b)
        if cfg.cluster_cache_gib:
            cache_b = cfg.cluster_cache_gib * 2**30
        elif auto_cache_b is not None:
            cache_b = auto_cache_b
        else:
            cache_b = arena_pages * page_b / CPU_CACHE_MIRROR_SHARE
        slots = max(1, min(ClusterCache.slots_for_bytes(int(cache_b), lay.block_size,
                                                        lay.head_dim, lay.dtype),
                           arena_pages))
        # Device bytes: the mirror's two tables (12 B per key), the cache's lookup
        # table (8 B per key), its slots (a page + 16 B of bookkeeping each) and the
        # decode workspace's resolved page addresses (8 B per row, KV head and page
        # of the index table).
        ws = self.workspace
        src_b = ws.max_rows * ws.num_kv_heads * alloc.ibt.shape[1] * 8
        # Staging of released tokens read back by prefill rows: a raw piece and its
        # K and V split token-major.
        piece = PREFILL_PIECE_TOKENS
        stage_elems = piece * lay.num_kv_heads * 2 * lay.head_dim
        stage_b = 2 * stage_elems * lay.elem_size
        dev_b = keys * 20 + (slots + 1) * (page_b + 16) + src_b + stage_b
        if dev.type == "cuda":
            free = torch.cuda.mem_get_info(dev)[0]
            if dev_b > 0.9 * free:
                raise ValueError(
                    f"retro wave buffer: the cluster cache ({slots} pages, "
                    f"{slots * page_b / 2**30:.2f} GiB) and the address tables "
                    f"({keys * 20 / 2**30:.2f} GiB for {alloc.num_pages} index-pool pages "
                    f"x {num_layers} layers x {lay.num_kv_heads} KV heads) need more than "
                    f"the free device memory ({free / 2**30:.2f} GiB); lower "
                    "cluster_cache_gib or index_pool_gib")
        self.mirror = HostMirror(shape, host_b, dev, pin=dev.type == "cuda")
        self.cache = ClusterCache.for_mirror(self.mirror, slots)
        self.prefill_staging = (
            torch.empty(stage_elems, dtype=lay.dtype, device=dev),
            torch.empty(piece, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype, device=dev),
            torch.empty(piece, lay.num_kv_heads, lay.head_dim, dtype=lay.dtype, device=dev))
        ws.wave_src_table(alloc.ibt.shape[1])     # before CUDA-graph capture
        logger.info("retro wave buffer: host mirror %.2f GiB%s (%d request slots), "
                    "cluster cache %d pages = %.2f GiB (%s), address tables %.2f GiB "
                    "(%d pool pages x %d layers x %d KV heads); %.2f GiB of device "
                    "memory in all", host_b / 2**30,
                    " pinned" if dev.type == "cuda" else "", alloc.num_rows, slots,
                    slots * page_b / 2**30,
                    "cluster_cache_gib" if cfg.cluster_cache_gib else
                    "auto, capped at the mirror's size", keys * 20 / 2**30,
                    alloc.num_pages, num_layers, lay.num_kv_heads, dev_b / 2**30)

    def layout_for(self, num_kv_heads: int, head_size: int, dtype, block_size: int
                   ) -> PagedIndexLayout:
        reasons = check_config_for_paged(self.config, block_size)
        if reasons:
            raise ValueError("retro (GPU) cannot use these options: " + "; ".join(reasons))
        lay = PagedIndexLayout.for_config(self.config, num_kv_heads, head_size, block_size,
                                          dtype)
        lay.check()
        return lay

    def register_kv_caches(self, kv_caches: Dict[str, torch.Tensor]) -> None:
        if not kv_caches:
            raise ValueError("retro: no KV caches to register")
        names = sorted(kv_caches, key=_layer_order)
        first = kv_caches[names[0]]
        if not isinstance(first, torch.Tensor) or first.dim() != 4:
            raise ValueError("retro: unexpected KV cache layout "
                             f"{type(first).__name__} {getattr(first, 'shape', None)}")
        nb, h, bs, two_d = first.shape
        self.layout = self.layout_for(h, two_d // 2, first.dtype, bs)
        for n in names:
            self.layout.check_cache(kv_caches[n])  # stock (unpadded) pages
        self.kv_caches = {n: kv_caches[n] for n in names}
        self.first_layer = names[0]
        self.sink_end = sink_end(self.config, bs)
        dev = first.device
        self.headers = _paged.make_headers(nb, dev)
        realloc = self.config.wave_buffer and (self.mirror is None or
                                               self.mirror.device != dev)
        if (len(self._pool_list) != len(names) or self._pool_layout != self.layout
                or self._pool_list[0].device != dev):
            if self._pool_list:
                logger.warning("retro: the index pool allocated at model construction "
                               "does not match the KV caches (%d layers, %s); "
                               "reallocated outside vLLM's memory accounting",
                               len(names), self.layout)
            self._pool_list = []
            self.pool_presized = False
            hq = self.vllm_config.model_config.get_num_attention_heads(
                self.vllm_config.parallel_config)
            # Without a pre-sized pool (CPU tests, or a failed pre-sizing): index_pool_gib,
            # else on a GPU the auto share of the memory still free (the KV cache
            # already took its part), elsewhere one page per KV block (the former
            # in-page capacity).
            budget_b = self.config.index_pool_gib * 2**30
            if not budget_b and dev.type == "cuda":
                budget_b = INDEX_POOL_AUTO_FRACTION * torch.cuda.mem_get_info(dev)[0]
            self._allocate_index(self.layout, len(names), hq, dev, budget_b=budget_b,
                                 num_pages=0 if budget_b else nb)
            realloc = self.config.wave_buffer
        if realloc:
            # Without pre-sizing (CPU tests, a failed pre-sizing or a mismatch): the
            # auto cache on a GPU takes its share of the memory still free.
            auto = (CLUSTER_CACHE_AUTO_FRACTION * torch.cuda.mem_get_info(dev)[0]
                    if dev.type == "cuda" else None)
            if dev.type == "cuda":
                logger.warning("retro wave buffer: allocated at KV-cache registration, "
                               "outside vLLM's memory accounting")
            self._allocate_wave(self.layout, len(names), dev, auto_cache_b=auto)
        # Every layer its own pool (all of one shape, so which is whose is arbitrary).
        self.pools = dict(zip(names, self._pool_list))
        if self.config.wave_buffer:
            self.build_wave_views()
            from . import kv_spec
            self.prefill_lag = kv_spec.prefill_lag(
                self.config.prefill_resident_tokens,
                kv_spec.prefill_margin_tokens(self.config, self.vllm_config), nb * bs)
            logger.info("retro wave buffer: prompts release their tokens more than %d "
                        "behind the prefill front (KV cache %d tokens)",
                        self.prefill_lag, nb * bs)
        if dev.type == "cuda":
            self._compile_build_kernels(dev)

    @property
    def layer_index(self) -> Dict[str, int]:
        """Layer name -> the layer's index in the mirror and the cache (the sorted
        layer order of the KV caches)."""
        return {n: i for i, n in enumerate(self.kv_caches)}

    def build_wave_views(self) -> None:
        """The per-layer views the decode kernels read (once: CUDA graphs capture
        their addresses)."""
        self.wave_views = {}
        if self.cache is not None:
            self.wave_views = {n: self.cache.view(self.mirror, i)
                               for n, i in self.layer_index.items()}

    def _compile_build_kernels(self, device) -> None:
        """Runs the index build once on a scratch cache of the same layout, so the
        Triton kernels compile at start-up and not inside the first request's build
        (about a second, which would be charged to that request)."""
        t0 = time.perf_counter()
        bs = self.layout.block_size
        n_blocks = max(4, -(-self.config.cluster_size // bs))
        scratch = self.layout.make_cache(n_blocks + 1, device)
        blocks = torch.arange(n_blocks + 1, device=device)
        npg = n_blocks * self.layout.entries_per_block
        pool = IndexPool(self.layout, npg, device)
        build_segments(scratch, self.layout, pool,
                       [SegmentJob(blocks, bs, bs * (n_blocks + 1),
                                   torch.arange(npg, device=device))], self.config)
        torch.cuda.synchronize(device)
        logger.info("retro: index build kernels ready (%.1f s)", time.perf_counter() - t0)

    def decode_ready(self) -> bool:
        """True once the KV caches are registered. Before that, decode rows can only
        be the dummy rows of vLLM's memory profiling (no KV block exists for a
        request yet): False, logged once, when retro's connector is configured to
        register them later; otherwise (no connector: the caches would never be
        registered and every decode would be dummy) an error."""
        if self.headers is not None:
            return True
        from .connector import CONNECTOR_NAME
        ktc = getattr(self.vllm_config, "kv_transfer_config", None)
        if getattr(ktc, "kv_connector", None) != CONNECTOR_NAME:
            raise RuntimeError(
                "retro: decode rows before the KV caches were registered with the "
                "retro connector (is kv_transfer_config the RetroConnector?)")
        if not self._profiling_logged:
            self._profiling_logged = True
            logger.info("retro: dummy decode rows before the KV caches exist (vLLM's "
                        "memory profiling): zero output, not counted")
        return False

    # ----------------------------------------------------------- maintenance
    def on_step(self, meta: RetroStepMetadata) -> None:
        # A named range, so a profile of the engine shows retro's host time per step.
        with torch.profiler.record_function("retro::on_step"):
            self._on_step(meta)

    def _on_step(self, meta: RetroStepMetadata) -> None:
        entries = self.requests.apply(meta)
        if self.headers is None:
            return
        if self.band_phase is not None:
            # (a fill kernel with the value as its argument: no host sync)
            self._band_step = (self._band_step + 1) % self.config.rank_interval
            self.band_phase.fill_(self._band_step)
        if self.reporter is not None:
            self._check_released(meta, entries)
        if self._wave_rows:
            # The last forward had rows reading below a horizon: admit the pages its
            # attention recorded as misses (device ops only, no host sync; ordered
            # after that forward and before this one on the stream), then advance the
            # cache's LRU clock. Once per step for all layers (one LRU pass).
            with torch.profiler.record_function("retro::admit"):
                self.cache.admit_misses(self.mirror, self.cache.miss_limit())
                self.cache.next_step()
            self.wave_steps += 1
        new = [e for e in entries if e.is_new]
        if new:
            firsts = [e.blocks[0] for e in new if e.blocks]
            if firsts:
                dev = self.headers.device
                self.headers.index_fill_(0, to_device(firsts, torch.long, dev), 0)
            for e in new:
                e.is_new = False
        with torch.profiler.record_function("retro::maintain"):
            self._maintain(entries)
        if self.reporter is not None:
            # After the maintenance: this step's prefill reads what it mirrored.
            self.released_prefills = {
                e.blocks[0]: e for e in entries
                if e.num_scheduled > 1 and e.blocks and self.horizon_of(e) > self.sink_end}
        self._wave_rows = self.mirror is not None and any(
            e.mirrored_end > self.sink_end for e in entries)
        self._maybe_log()

    def _check_released(self, meta: RetroStepMetadata, entries) -> None:
        """A request whose horizon was reported may have lost its blocks below it:
        fail it loudly rather than let a dense path read them through the block
        table (design §8.2). A reset header, or a request missing from the table (its
        row has no header), would have the decode kernels read every position
        through the block table. Rows with more than one query token read their
        released tokens from the mirror (:meth:`plan_released_prefill`)."""
        rep = self.reporter
        if len(entries) != len(meta.updates):
            for u in meta.updates:
                if u.req_id not in self.requests.entries:
                    rep.require_paged_kv(u.req_id, "it is not in retro's request "
                                         "table, so its rows have no index header")
        for e in entries:
            if e.is_new:
                rep.require_paged_kv(e.req_id, "its index header is being reset")

    def _on_remove(self, e) -> None:
        """A request left the table (finished, aborted, preempted, restarted): its
        mirror and cache entries, then its index-table row and pool pages go back.

        Order matters: the mirror's and the cache's device tables are keyed by pool
        page, so the row's pages (read from the allocator while it still holds
        them) are cleared in both, pending miss keys included, before the allocator
        can hand them to another request (which must never see this one's mirror).
        The header is zeroed so that no later row naming this first block reads
        this request's index or mirror."""
        if e.ibt_row >= 0:
            alloc = self.index_alloc
            if alloc is not None and (self.mirror is not None or self.cache is not None):
                # one copy to the device for both tables
                pages = to_device(alloc.pages_of(e.ibt_row), torch.long, alloc.ibt.device)
                if self.mirror is not None:
                    self.mirror.free(e.ibt_row, pages)
                if self.cache is not None:
                    self.cache.invalidate_pages(pages)
            if alloc is not None:
                alloc.release(e.ibt_row)
        if self.headers is not None and e.blocks:
            self.headers[e.blocks[0]].fill_(0)
        if self.reporter is not None:
            # the connector forgets these too; direct callers (tests) rely on this
            self.reporter.forget([e.req_id])
        e.ibt_row = -1
        e.mirrored_end = 0
        e.mirror = ""

    def _pages_for(self, e, end: int) -> bool:
        """Makes ``e``'s index-table row cover its clustered zone up to ``end``; False
        (nothing taken, counted once per request) when the pool or the rows are full."""
        alloc, bs = self.index_alloc, self.layout.block_size
        need = (end - self.sink_end) // bs * self.layout.entries_per_block
        if e.ibt_row < 0:
            row = alloc.acquire(need)
            ok = row is not None
            if ok:
                e.ibt_row = row
        else:
            ok = alloc.extend(e.ibt_row, need - len(alloc.pages_of(e.ibt_row))) is not None
        if not ok and not e.pool_full_counted:
            e.pool_full_counted = True
            self.index_pool_full += 1
            logger.warning("retro: index pool full (%d pages, %d rows free); request %s "
                           "is attended %s", alloc.free_pages, alloc.free_rows, e.req_id,
                           "exactly" if e.ibt_row < 0 else "with its index so far")
        return ok

    def _maintain(self, entries) -> None:
        cfg, bs = self.config, self.layout.block_size
        jobs: Dict[int, List[SegmentJob]] = {}
        touched = []
        block_ids = {}      # per touched request: its block ids up to clustered_end
        new_segs = {}       # per touched request: this step's segments
        dev = self.headers.device
        for e in entries:
            # With the wave buffer, a prompt is clustered (then mirrored and
            # released) behind its prefill front too, unless it has no mirror.
            lag = self.prefill_lag if e.mirror in ("", "on") else None
            segs = plan_segments(e.clustered_end, e.num_computed, e.prompt_len, cfg, bs,
                                 prefill_lag=lag)
            if not segs:
                continue
            end = segs[-1][1]
            if len(e.blocks) * bs < end:
                logger.warning("retro: request %s has %d blocks for %d tokens; not "
                               "indexed this step", e.req_id, len(e.blocks), end)
                continue
            if not self._pages_for(e, end):
                continue
            blocks = to_device(e.blocks[:end // bs], torch.long, dev)
            block_ids[e.req_id] = blocks
            for job in self.index_alloc.segment_jobs(e.ibt_row, blocks, segs,
                                                     self.sink_end, bs,
                                                     self.layout.entries_per_block):
                jobs.setdefault(job.p1 - job.p0, []).append(job)
                e.num_clusters += clusters_in(job.p1 - job.p0, cfg)
            e.clustered_end = end
            new_segs[e.req_id] = segs
            touched.append(e)
        if not touched:
            return
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if dev.type == "cuda" else None
        if ev:
            ev[0].record()
        for name, kv in self.kv_caches.items():
            for group in jobs.values():
                build_segments(kv, self.layout, self.pools[name], group, cfg)
        if self.mirror is not None:
            with torch.profiler.record_function("retro::mirror"):
                for e in touched:
                    self._mirror_request(e, block_ids[e.req_id], new_segs[e.req_id])
        rows = []
        for e in touched:
            n_ret, n_est = budget(e.num_clusters, e.clustered_end - self.sink_end, cfg)
            row = [e.clustered_end, n_ret, n_est, e.num_clusters, e.ibt_row]
            rows.append(_paged.header_row(*row, horizon=self.horizon_of(e)))
        idx = to_device([e.blocks[0] for e in touched], torch.long, dev)
        self.headers[idx] = to_device(rows, torch.int32, dev)
        if self.rank_ref is not None:
            # A built or grown index has no reference yet: its next step ranks as "step".
            self.rank_ref.index_fill_(1, to_device([e.ibt_row for e in touched], torch.long,
                                                   dev), 0)
        if self.reporter is not None:
            # A report is a promise (kv_spec): from now on this worker reads the
            # request's K/V below the horizon only from the wave buffer. The header
            # just written says so to this step's kernels already; the scheduler gets
            # the report after this step's forward and releases the blocks at its next
            # schedule, so vLLM's later writes into them are ordered after the copies
            # issued above on this stream.
            for e in touched:
                h = self.horizon_of(e)
                if h:
                    self.reporter.mirrored(e.req_id, h)
        self.segments_built += sum(len(g) for g in jobs.values())
        if ev:
            ev[1].record()
            self._build_events.append(ev)

    def plan_released_prefill(self, md: RetroMetadata) -> ReleasedPrefillPlan:
        """Which prefill rows of this step are requests with released tokens, found
        by their first block (the key of the request's header; one small read of
        the block table, in prefill steps with such rows only), with the compacted
        block table shared by all layers. Fails loudly if such a request has no row
        or a row of another length: its released blocks must never be read."""
        from ..memory.released_prefill import ReleasedRow, compact_block_table
        pf = md.prefill
        qs = md.prefill_query_start
        first = pf.block_table[:, 0].tolist()
        rows, seen = [], set()
        for r, fb in enumerate(first):
            e = self.released_prefills.get(int(fb))
            if e is None:
                continue
            if qs[r + 1] - qs[r] != e.num_scheduled:
                raise RuntimeError(
                    f"retro: request {e.req_id!r} has {e.num_scheduled} scheduled tokens "
                    f"but its prefill row {r} has {qs[r + 1] - qs[r]}")
            rows.append(ReleasedRow(row=r, slot=e.ibt_row, horizon=self.horizon_of(e)))
            seen.add(e.req_id)
        for e in self.released_prefills.values():
            if e.req_id not in seen:
                self.reporter.require_paged_kv(e.req_id, "its prefill row was not found "
                                               "among the step's rows")
        compacted = compact_block_table(pf.block_table, pf.seq_lens, rows, self.sink_end,
                                        self.layout.block_size)
        return ReleasedPrefillPlan(rows, compacted)

    def horizon_of(self, e) -> int:
        """The horizon ``e``'s header carries: the end of its mirrored zone (a token
        position, block-aligned, ``<= clustered_end``), 0 when nothing is mirrored
        (wave buffer off, refused, or not yet mirrored)."""
        if e.mirrored_end <= self.sink_end:
            return 0
        return e.mirrored_end

    def _mirror_request(self, e, blocks: torch.Tensor, segs) -> None:
        """Copies ``e``'s newly indexed zone ``[mirrored_end, clustered_end)`` of
        every layer to the host mirror (arena extents of its index-table row, the
        mirror's request slot; addresses at its pool pages): in one range when the
        host budget has room for it, else segment by segment (``segs``: this step's;
        a range before them, not mirrored when it was indexed, goes first),
        advancing ``e.mirrored_end`` past each range once every layer holds it.

        The first time, the request reserves its clustered zone in the arena; when
        that fails (HostMemoryExceeded) nothing is held, the request stays resident
        (attended from its pages, never released), is counted and logged once, and
        tries again when its index next grows. A later segment that does not fit
        stops the mirror there: the horizon stays at the last whole segment.

        The copies are issued on the current stream before the step's forward (the
        build wrote the cluster-ordered K/V just before, on the same stream), so this
        step's kernels and whatever vLLM later writes into released blocks are
        ordered after them."""
        from ..memory.host_mirror import HostMemoryExceeded
        if e.ibt_row < 0 or e.mirror == "stopped":
            return
        row, bs = e.ibt_row, self.layout.block_size
        if e.mirror != "on":
            try:
                self.mirror.reserve(row, e.clustered_end - self.sink_end)
            except HostMemoryExceeded as exc:
                if e.mirror != "refused":
                    self.mirror_refused += 1
                    logger.warning("retro wave buffer: request %s is not mirrored and "
                                   "stays in GPU memory: %s", e.req_id, exc)
                e.mirror = "refused"
                return
            e.mirror = "on"
            e.mirrored_end = self.sink_end
        if e.clustered_end <= e.mirrored_end:
            return
        s = self.sink_end // bs
        n_all = e.clustered_end - e.mirrored_end
        if self.mirror.can_place(row, self.layout.num_kv_heads * n_all, len(self.kv_caches)):
            # One copy per layer for the whole new zone (the usual case: few calls).
            ranges = [(e.mirrored_end, e.clustered_end)]
        else:
            # Near the host budget: whole segments, all layers each, as far as they go.
            ranges = [(p0, p1) for p0, p1 in segs if p0 >= e.mirrored_end]
            first = ranges[0][0] if ranges else e.clustered_end
            if e.mirrored_end < first:
                ranges.insert(0, (e.mirrored_end, first))
        pages_of = self.index_alloc.pages_of(row)
        for p0, p1 in ranges:
            pages = to_device(pages_of[p0 // bs - s:p1 // bs - s], torch.long, blocks.device)
            try:
                for li, (name, kv) in enumerate(self.kv_caches.items()):
                    self.mirror.mirror_segment(row, li, kv, self.layout, blocks, p0, p1,
                                               self.pools[name], pages)
            except HostMemoryExceeded as exc:
                e.mirror = "stopped"
                self.mirror_stopped += 1
                logger.warning("retro wave buffer: request %s stays mirrored up to token "
                               "%d only (its newer segments stay in GPU memory): %s",
                               e.req_id, e.mirrored_end, exc)
                return
            e.mirrored_end = p1

    def index_build_seconds(self) -> float:
        """GPU time spent building index segments since start (syncs the device)."""
        for a, b in self._build_events:
            b.synchronize()
            self.index_build_s += a.elapsed_time(b) / 1e3
        self._build_events.clear()
        return self.index_build_s

    # ----------------------------------------------------------------- stats
    def stats(self) -> Dict[str, float]:
        """Device counters since start (one host sync; two with the wave buffer).

        With ``wave_buffer``: the cluster cache's page hits, misses, admissions,
        evictions and hit rate; ``pcie_bytes``, an estimate of the bytes read from
        the host mirror since start (each miss read once by attention and each
        admitted page once more by admission, a page each); the mirror's host GiB
        reserved and mirrored; requests holding a mirror; requests refused one (no
        host memory: resident) and requests whose mirror stopped short."""
        if self.workspace is None:
            out = dict.fromkeys(STAT_NAMES, 0)
        else:
            out = dict(zip(STAT_NAMES, self.workspace.stats.tolist()))
        out[POOL_FULL_STAT] = self.index_pool_full
        out[FLASH_ROWS_STAT] = 0 if self.switch is None else self.switch.flash_rows
        if self.cache is not None:
            cs = self.cache.stats()
            for k in ("hits", "misses", "admitted", "evicted", "hit_rate"):
                out["cache_" + k] = cs[k]
            out["pcie_bytes"] = (cs["misses"] + cs["admitted"]) * self.cache.page_bytes
        if self.mirror is not None:
            out["host_gib"] = self.mirror.bytes_reserved() / 2**30
            out["host_mirrored_gib"] = self.mirror.bytes_mirrored() / 2**30
            out["mirrored_requests"] = len(self.mirror.request_slots())
            out["mirror_refused"] = self.mirror_refused
            out["mirror_stopped"] = self.mirror_stopped
        return out

    def _maybe_log(self) -> None:
        interval = self.config.log_stats_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self.last_log_time < interval:
            return
        self.last_log_time = now
        stats = self.stats()
        cur = [stats[k] for k in STAT_NAMES]
        d = [a - b for a, b in zip(cur, self.logged)]
        self.logged = cur
        flash = stats[FLASH_ROWS_STAT] - self.logged_flash
        self.logged_flash = stats[FLASH_ROWS_STAT]
        if d[0] + d[1] + flash == 0 and self.requests.freed == 0:
            return
        if self.mirror is not None:
            self._log_wave(stats)
        ctx = max(1, d[4])
        logger.info("retro: %d decode rows on the index (%d re-ranked their last band, "
                    "%d ranked by the carried reference), "
                    "%d exact (no index yet), %d on FlashAttention (dense_below); "
                    "%.2f%% of tokens read exactly, %.2f%% estimated; %d live requests, "
                    "%d segments indexed; index pool %d of %d pages free, %d requests "
                    "found it full", d[0], d[5], d[6], d[1], flash, 100.0 * d[2] / ctx,
                    100.0 * d[3] / ctx, len(self.requests.entries), self.segments_built,
                    self.index_alloc.free_pages, self.index_alloc.num_pages,
                    self.index_pool_full)


    def _log_wave(self, st: Dict[str, float]) -> None:
        w = [st["cache_hits"], st["cache_misses"], st["cache_admitted"], self.wave_steps]
        dh, dm, da, ds = (a - b for a, b in zip(w, self._wave_logged))
        self._wave_logged = w
        # Estimate: each miss read once by attention, each admitted page once more.
        pcie = (dm + da) * self.cache.page_bytes
        logger.info("retro wave buffer: cluster cache %d hits, %d misses (%.1f%% hits) "
                    "since the last line, %d pages admitted and %d evicted since start; "
                    "~%.2f MiB over PCIe per step; host mirror %.3f GiB reserved, %.3f "
                    "GiB mirrored, %d requests mirrored, %d refused (resident), %d "
                    "stopped short",
                    dh, dm, 100.0 * dh / max(1, dh + dm), st["cache_admitted"],
                    st["cache_evicted"], pcie / max(1, ds) / 2**20, st["host_gib"],
                    st["host_mirrored_gib"], st["mirrored_requests"],
                    st["mirror_refused"], st["mirror_stopped"])


def _layer_order(name: str):
    import re
    nums = [int(x) for x in re.findall(r"\d+", name)]
    return (nums, name)


def manager_for(vllm_config) -> PagedIndexManager:
    """The :class:`PagedIndexManager` of the worker owning ``vllm_config``."""
    from ..worker_state import state_for
    st = state_for(vllm_config)
    if st.paged is None:
        st.paged = PagedIndexManager(vllm_config, st.requests)
    return st.paged

