"""Decode kernels of the paged wave index.

:func:`paged_decode_attention` is the public op: the Triton kernels
(:mod:`.triton_decode`) when the tensors are on a CUDA device or Triton's CPU
interpreter is on (``TRITON_INTERPRET=1``), else the torch twin
(:func:`.reference.paged_decode_attention`, the specification, re-exported as
``reference``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference
from .wave_view import WaveBufferView
from ..attention import VARIANCE_CORRECTION_CAP
from ..index.paged import IndexPool, PagedIndexLayout

try:
    from .triton_cluster_write import write_clusters_triton, write_value_correction_triton
    from . import triton_decode
    from .triton_decode import (DecodeWorkspace, interpreting,
                                paged_decode_attention_triton)
    HAS_TRITON = True
except ImportError:  # CPU-only installs without Triton: the twin serves
    HAS_TRITON = False
    triton_decode = None  # type: ignore[assignment]
    DecodeWorkspace = None  # type: ignore[assignment,misc]
    paged_decode_attention_triton = None  # type: ignore[assignment]
    write_clusters_triton = None  # type: ignore[assignment]
    write_value_correction_triton = None  # type: ignore[assignment]

    def interpreting() -> bool:  # type: ignore[misc]
        return False

__all__ = ["paged_decode_attention", "write_clusters", "write_value_correction",
           "DecodeWorkspace", "reference", "HAS_TRITON", "WaveBufferView"]


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the ops here run their Triton kernels for tensors like ``t``: on
    CUDA, or on the CPU while ``TRITON_INTERPRET=1`` is set and the kernels were
    defined for the interpreter."""
    if not HAS_TRITON:
        return False
    return t.is_cuda or (interpreting() and
                         os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


def write_clusters(kv_cache: torch.Tensor, layout: PagedIndexLayout, pool: IndexPool,
                   seg_blocks: torch.Tensor, seg_pages: torch.Tensor, p0s: torch.Tensor,
                   order: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor) -> None:
    """Writes clustered segments (summaries, sizes, starts) into the index pool at
    their pages and reorders their K/V in place into cluster order, per KV head:
    the Triton kernel where :func:`uses_triton`, else the twin. Arguments and
    semantics: :func:`.reference.write_clusters`."""
    fn = write_clusters_triton if uses_triton(kv_cache) else reference.write_clusters
    fn(kv_cache, layout, pool, seg_blocks, seg_pages, p0s, order, starts, sizes)


def write_value_correction(kv_cache: torch.Tensor, layout: PagedIndexLayout,
                           pool: IndexPool, seg_blocks: torch.Tensor,
                           seg_pages: torch.Tensor, starts: torch.Tensor,
                           sizes: torch.Tensor, iters: int) -> None:
    """Writes each cluster's value-correction pair (``RetroConfig.value_correction``)
    after :func:`write_clusters`: the Triton kernel where :func:`uses_triton` (and
    the cache is not float64), else the twin. Arguments and semantics:
    :func:`.reference.write_value_correction`."""
    fn = (write_value_correction_triton
          if uses_triton(kv_cache) and kv_cache.dtype != torch.float64
          else reference.write_value_correction)
    fn(kv_cache, layout, pool, seg_blocks, seg_pages, starts, sizes, iters)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                           layout: PagedIndexLayout, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, headers: torch.Tensor,
                           ibt: torch.Tensor, pool: IndexPool, sink_end: int,
                           scale: float, out: Optional[torch.Tensor] = None,
                           workspace=None, count_stats: bool = False,
                           variance_cap: float = VARIANCE_CORRECTION_CAP,
                           wave: Optional[WaveBufferView] = None,
                           retrieval_rank: str = "mass") -> torch.Tensor:
    """Tripartite decode attention of ``B`` rows over the paged wave index.

    Args:
        query: ``[B, Hq, D]``. kv_cache: vLLM's ``(NB, H, bs, 2D)`` view.
            block_table: ``[>=B, max_blocks]`` int. seq_lens: ``[>=B]`` int
            (0: padded row, output zero). headers: ``[NB, HDR_WORDS]`` int32.
            ibt: the index table ``[R, max_pages]`` int32 (rows through the header's
            ``HDR_IBT_ROW``). pool: the layer's :class:`IndexPool`.
            sink_end: first clustered token. scale: softmax scale.
        out: ``[B, Hq, D]`` (any float dtype), written in full; allocated (query's
            dtype) if None.
        workspace: a :class:`DecodeWorkspace` (created if None, which a CUDA graph
            must not do: pass a persistent one there).
        count_stats: add the call's statistics to ``workspace.stats`` (rows with an
            index, rows without, tokens read exactly, estimated, in context, rows
            that re-ranked their last band: ``pool.rank_interval``, rows ranked by
            the carried reference: ``pool.rank_ref``).
        variance_cap: cap of the clusters' variance term (``RetroConfig.variance_cap``).
        wave: the layer's :class:`WaveBufferView` when rows may have released blocks:
            retrieved tokens below a row's horizon (header ``HDR_HORIZON``) are read
            from the cluster cache or the host arena, never through the block table
            (the kernels also stamp, count and record misses; the twin does not).
            None: the horizon is ignored.
        retrieval_rank: how the exact set is chosen inside the band
            (``RetroConfig.retrieval_rank``): "mass", or "error" (by expected
            estimation error, :func:`.reference.error_proxy`; the kernels need
            the bucket selection).
    Returns ``out``.
    """
    b, hq, d = query.shape
    if out is None:
        out = torch.empty(b, hq, d, dtype=query.dtype, device=query.device)
    if uses_triton(query):
        if workspace is None:
            h = layout.num_kv_heads
            workspace = DecodeWorkspace(pool.num_pages, h, hq // h, d, max(1, b),
                                        query.device,
                                        error_rank=retrieval_rank == "error")
        return paged_decode_attention_triton(query, kv_cache, layout, block_table, seq_lens,
                                             headers, ibt, pool, sink_end, scale, out, workspace,
                                             count_stats, variance_cap, wave, retrieval_rank)
    # The twin selects as the kernels would (their SELECT; without Triton the same
    # variable read here).
    select = triton_decode.SELECT if HAS_TRITON else reference.selection_from_env()
    o, st = reference.paged_decode_attention(query[:b], kv_cache, layout, block_table[:b],
                                             seq_lens[:b], headers, ibt, pool, sink_end,
                                             scale, variance_cap, wave, select,
                                             retrieval_rank)
    out.copy_(o)
    if count_stats and workspace is not None:
        lens = seq_lens[:b].cpu()
        idx = headers[block_table[:b, 0].long().cpu(), 0].cpu() > 0
        live = lens > 0
        add = torch.tensor([int((live & idx).sum()), int((live & ~idx).sum()),
                            int(st[:, 0].sum()), int(st[:, 1].sum()), int(st[:, 2].sum()),
                            int(st[:, 3].sum()), int(st[:, 4].sum())], dtype=torch.int64)
        workspace.stats += add.to(workspace.stats.device)
    return out
