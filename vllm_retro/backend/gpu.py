"""The ``retro`` attention backend on GPUs (vLLM 0.26, FlashAttention build).

* Prefill rows (query length > 1) run vLLM's FlashAttention on their rows alone.
* Decode rows (query length 1) run :func:`vllm_retro.kernels.paged_decode_attention`
  over the paged wave index (:mod:`vllm_retro.index.paged`): one fixed launch
  sequence per layer for all decode rows, reading only device buffers whose
  addresses never change, so pure-decode steps are captured in vLLM's FULL CUDA
  graphs (``AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE``). A row without an
  index yet (short context) is attended exactly, by the same kernels.
* The index lives in the padding of vLLM's KV pages (the plugin pads the KV-cache
  spec of retro layers), so vLLM sizes and admits it with the KV.
* :class:`PagedIndexManager` (one per worker) keeps the request table and, before
  each forward (the connector's ``start_load_kv``), clusters the segments that
  closed, for every layer, on the GPU, and updates the per-request headers.

What the kernels served is counted on the device (rows with / without an index,
tokens read exactly / estimated) and logged; tests assert on these counters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import compat
from ..config import RetroConfig
from ..index.paged import (PagedIndexLayout, SegmentJob, budget, build_segments,
                           check_config_for_paged, clusters_in, header_row,
                           make_headers, plan_segments, sink_end)
from ..kernels import DecodeWorkspace, paged_decode_attention
from ..request_table import RequestTable
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
    """

    num_decodes: int
    decode_block_table: torch.Tensor
    decode_seq_lens: torch.Tensor
    prefill: Optional[object]
    num_decode_tokens: int
    num_actual_tokens: int


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
        logger.info("retro attention backend (GPU, paged index) active for %d layers",
                    len(layer_names))

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
        prefill = None
        if nd < n:
            # Cascade attention off: the prefix is shared with decode rows.
            prefill = super().build(0, slice_common_metadata(cm, nd, n), fast_build)
        nd_tok = int(qsl[nd])
        return RetroMetadata(num_decodes=nd,
                             decode_block_table=cm.block_table_tensor[:nd],
                             decode_seq_lens=cm.seq_lens[:nd],
                             prefill=prefill, num_decode_tokens=nd_tok,
                             num_actual_tokens=cm.num_actual_tokens)

    def build_for_cudagraph_capture(self, common_attn_metadata):
        return self.build(0, common_attn_metadata)


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
        self._manager.note_layer(num_kv_heads, head_size)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:
            return output.fill_(0)  # profiling run, as FlashAttention
        md: RetroMetadata = attn_metadata
        mgr = self._manager
        nd = md.num_decodes
        if nd:
            mgr.require_ready()
            paged_decode_attention(
                query[:nd].view(nd, self.num_heads, self.head_size), kv_cache,
                mgr.layout, md.decode_block_table, md.decode_seq_lens, mgr.headers,
                mgr.sink_end, self.scale,
                out=output[:nd].view(nd, self.num_heads, self.head_size),
                workspace=mgr.workspace,
                count_stats=layer.layer_name == mgr.first_layer,
                variance_cap=mgr.config.variance_cap)
        if md.prefill is not None:
            t0, t1 = md.num_decode_tokens, md.num_actual_tokens
            super().forward(layer, query[t0:t1], key[t0:t1], value[t0:t1], kv_cache,
                            md.prefill, output[t0:t1])
        return output


# ---------------------------------------------------------------- per worker
STAT_NAMES = ("retro_rows", "dense_rows", "exact_tokens", "estimated_tokens",
              "context_tokens")


class PagedIndexManager:
    """One worker's paged-index state: layout, KV caches, headers, workspace,
    request table and the index maintenance run before each forward."""

    def __init__(self, vllm_config, requests: RequestTable) -> None:
        from ..worker_state import retro_config_from_vllm
        self.config: RetroConfig = retro_config_from_vllm(vllm_config)
        self.vllm_config = vllm_config
        self.requests = requests
        self.layout: Optional[PagedIndexLayout] = None
        self.kv_caches: Dict[str, torch.Tensor] = {}
        self.headers: Optional[torch.Tensor] = None
        self.workspace: Optional[DecodeWorkspace] = None
        self.first_layer: Optional[str] = None
        self.sink_end = 0
        self.segments_built = 0
        self.index_build_s = 0.0
        self._build_events: list = []
        self.last_log_time = time.monotonic()
        self.logged = [0] * len(STAT_NAMES)
        self._head = None

    # ---------------------------------------------------------------- set-up
    def note_layer(self, num_kv_heads: int, head_size: int) -> None:
        self._head = (num_kv_heads, head_size)

    def layout_for(self, num_kv_heads: int, head_size: int, dtype, block_size: int
                   ) -> PagedIndexLayout:
        reasons = check_config_for_paged(self.config, block_size)
        if reasons:
            raise ValueError("retro (GPU) cannot use these options: " + "; ".join(reasons))
        lay = PagedIndexLayout(num_kv_heads, head_size, block_size, dtype)
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
            self.layout.views(kv_caches[n])  # checks the padded page stride
        self.kv_caches = {n: kv_caches[n] for n in names}
        self.first_layer = names[0]
        self.sink_end = sink_end(self.config, bs)
        dev = first.device
        self.headers = make_headers(nb, dev)
        # Decode rows per step: at most max_num_seqs, or a CUDA graph's padded size.
        cc = self.vllm_config.compilation_config
        max_rows = max(self.vllm_config.scheduler_config.max_num_seqs,
                       getattr(cc, "max_cudagraph_capture_size", None) or 0)
        hq = self.vllm_config.model_config.get_num_attention_heads(
            self.vllm_config.parallel_config)
        self.workspace = DecodeWorkspace(nb, h, hq // h, two_d // 2, max_rows, dev)
        if dev.type == "cuda":
            self._compile_build_kernels(dev)
        idx = self.layout.index_bytes * nb * len(names)
        logger.info("retro: paged index in %d KV blocks x %d layers (%d B of index per "
                    "block and layer, %.2f GiB in all, %.1f%% of the KV cache)", nb,
                    len(names), self.layout.index_bytes, idx / 2**30,
                    100.0 * self.layout.index_bytes / self.layout.kv_page_bytes)

    def _compile_build_kernels(self, device) -> None:
        """Runs the index build once on a scratch cache of the same layout, so the
        Triton kernels compile at start-up and not inside the first request's build
        (about a second, which would be charged to that request)."""
        t0 = time.perf_counter()
        bs = self.layout.block_size
        n_blocks = max(4, -(-self.config.cluster_size // bs))
        scratch = self.layout.make_cache(n_blocks + 1, device)
        blocks = torch.arange(n_blocks + 1, device=device)
        build_segments(scratch, self.layout, [SegmentJob(blocks, bs, bs * (n_blocks + 1))],
                       self.config)
        torch.cuda.synchronize(device)
        logger.info("retro: index build kernels ready (%.1f s)", time.perf_counter() - t0)

    def require_ready(self) -> None:
        if self.headers is None:
            raise RuntimeError(
                "retro: decode rows before the KV caches were registered with the "
                "retro connector (is kv_transfer_config the RetroConnector?)")

    # ----------------------------------------------------------- maintenance
    def on_step(self, meta: RetroStepMetadata) -> None:
        # A named range, so a profile of the engine shows retro's host time per step.
        with torch.profiler.record_function("retro::on_step"):
            self._on_step(meta)

    def _on_step(self, meta: RetroStepMetadata) -> None:
        entries = self.requests.apply(meta)
        if self.headers is None:
            return
        new = [e for e in entries if e.is_new]
        if new:
            idx = torch.tensor([e.blocks[0] for e in new if e.blocks], dtype=torch.long)
            if len(idx):
                self.headers[idx.to(self.headers.device)] = 0
            for e in new:
                e.is_new = False
        self._maintain(entries)
        self._maybe_log()

    def _maintain(self, entries) -> None:
        cfg, bs = self.config, self.layout.block_size
        jobs: Dict[int, List[SegmentJob]] = {}
        touched = []
        dev = self.headers.device
        for e in entries:
            segs = plan_segments(e.clustered_end, e.num_computed, e.prompt_len, cfg, bs)
            if not segs:
                continue
            end = segs[-1][1]
            if len(e.blocks) * bs < end:
                logger.warning("retro: request %s has %d blocks for %d tokens; not "
                               "indexed this step", e.req_id, len(e.blocks), end)
                continue
            blocks = torch.tensor(e.blocks[:end // bs], dtype=torch.long, device=dev)
            for p0, p1 in segs:
                jobs.setdefault(p1 - p0, []).append(SegmentJob(blocks, p0, p1))
                e.num_clusters += clusters_in(p1 - p0, cfg)
            e.clustered_end = end
            touched.append(e)
        if not touched:
            return
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if dev.type == "cuda" else None
        if ev:
            ev[0].record()
        for kv in self.kv_caches.values():
            for group in jobs.values():
                build_segments(kv, self.layout, group, cfg)
        rows = []
        for e in touched:
            n_ret, n_est = budget(e.num_clusters, e.clustered_end - self.sink_end, cfg)
            rows.append(header_row(e.clustered_end, n_ret, n_est, e.num_clusters))
        idx = torch.tensor([e.blocks[0] for e in touched], dtype=torch.long, device=dev)
        self.headers[idx] = torch.tensor(rows, dtype=torch.int32, device=dev)
        self.segments_built += sum(len(g) for g in jobs.values())
        if ev:
            ev[1].record()
            self._build_events.append(ev)

    def index_build_seconds(self) -> float:
        """GPU time spent building index segments since start (syncs the device)."""
        for a, b in self._build_events:
            b.synchronize()
            self.index_build_s += a.elapsed_time(b) / 1e3
        self._build_events.clear()
        return self.index_build_s

    # ----------------------------------------------------------------- stats
    def stats(self) -> Dict[str, int]:
        """Device counters since start (one host sync)."""
        if self.workspace is None:
            return dict.fromkeys(STAT_NAMES, 0)
        return dict(zip(STAT_NAMES, self.workspace.stats.tolist()))

    def _maybe_log(self) -> None:
        interval = self.config.log_stats_interval_s
        now = time.monotonic()
        if interval <= 0 or now - self.last_log_time < interval:
            return
        self.last_log_time = now
        cur = list(self.stats().values())
        d = [a - b for a, b in zip(cur, self.logged)]
        self.logged = cur
        if d[0] + d[1] == 0 and self.requests.freed == 0:
            return
        ctx = max(1, d[4])
        logger.info("retro: %d decode rows on the index, %d exact (no index yet); "
                    "%.2f%% of tokens read exactly, %.2f%% estimated; %d live requests, "
                    "%d segments indexed", d[0], d[1], 100.0 * d[2] / ctx,
                    100.0 * d[3] / ctx, len(self.requests.entries), self.segments_built)


def _layer_order(name: str):
    import re
    nums = [int(x) for x in re.findall(r"\d+", name)]
    return (nums, name)


_MANAGERS: Dict[int, PagedIndexManager] = {}


def manager_for(vllm_config) -> PagedIndexManager:
    """The :class:`PagedIndexManager` of the worker owning ``vllm_config``."""
    from ..worker_state import state_for
    st = state_for(vllm_config)
    if st.paged is None:
        st.paged = PagedIndexManager(vllm_config, st.requests)
    return st.paged


def padded_kv_cache_spec(spec, num_kv_heads: int, head_size: int, dtype):
    """``spec`` with its page padded by the paged index (retro layers on GPU)."""
    from dataclasses import replace
    lay = PagedIndexLayout(num_kv_heads, head_size, spec.block_size, dtype)
    return replace(spec, page_size_padded=lay.page_bytes)
