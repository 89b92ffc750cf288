"""Triton kernels of the index build's spherical k-means (GPU).

Role: :func:`segment_keys` gathers a segment's keys from vLLM's paged cache,
mean-centred and normalised (16-bit points for the products);
:func:`kmeans_update` turns the accumulated sums into the next centroids;
:func:`kmeans_assign` is the nearest-centroid step of
:func:`vllm_retro.index.paged._kmeans_triton` for ``S`` independent problems
(segments x KV heads), fused with the accumulation of the next update's cluster
sums. The torch form (``bmm`` into an ``[S, n, C]`` similarity matrix, ``argmax``,
``index_add_``) writes and reads that matrix every iteration (76 MB per segment of
8K tokens and 8 heads at 546 clusters); here the similarities stay in registers
(tiles of ``BN`` points x ``BC`` centroids on tensor cores, a running arg-max), so
an iteration reads the points and centroids once.

Twins: ``argmax(x @ cent^T)`` per point in fp32 (first maximum on ties) and
``index_add_`` of the points by assignment; ``normalize(k - k.mean())``;
``normalize(sums)`` keeping the old centroid of an empty cluster
(tests/kernels/test_kmeans_assign.py).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit(do_not_specialize=["n", "C"])
def _assign_kernel(x_ptr, xf_ptr, c_ptr, a_ptr, sums_ptr, n, C,
                   D: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                   ACC: tl.constexpr, SELF_SUM: tl.constexpr):
    """Program (problem s, point tile t): nearest centroid of points t*BN + [0, BN)."""
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    rows = t * BN + tl.arange(0, BN)
    rm = rows < n
    d = tl.arange(0, D)
    x = tl.load(x_ptr + (s * n + rows)[:, None] * D + d[None, :], mask=rm[:, None], other=0.0)
    best = tl.full([BN], _NEG_INF, tl.float32)
    arg = tl.zeros([BN], tl.int32)
    for c0 in range(0, C, BC):
        cc = c0 + tl.arange(0, BC)
        cm = cc < C
        cen = tl.load(c_ptr + (s * C + cc)[:, None] * D + d[None, :], mask=cm[:, None],
                      other=0.0)
        sim = tl.dot(x, tl.trans(cen))
        sim = tl.where(cm[None, :], sim, _NEG_INF)
        m = tl.max(sim, 1)
        am = tl.argmax(sim, 1, tie_break_left=True).to(tl.int32)
        upd = m > best            # strict: the earlier chunk keeps a tie
        arg = tl.where(upd, c0 + am, arg)
        best = tl.where(upd, m, best)
    tl.store(a_ptr + s * n + rows, arg, mask=rm)
    if ACC:
        if SELF_SUM:
            xf = x.to(tl.float32)
        else:
            xf = tl.load(xf_ptr + (s * n + rows)[:, None] * D + d[None, :],
                         mask=rm[:, None], other=0.0).to(tl.float32)
        tl.atomic_add(sums_ptr + (s * C + arg.to(tl.int64))[:, None] * D + d[None, :], xf,
                      mask=rm[:, None], sem="relaxed")


#: Tiles of the assignment (points x centroids per program) and warps; a benchmark
#: may override them (benchmarks/index_build_bench.py --assign-tiles), and so may
#: RETRO_KMEANS_ASSIGN_TILES=BNxBCxWARPS for tuning runs.
ASSIGN_TUNE = dict(BN=128, BC=64, num_warps=4)   # best of 5 tilings on an H200
if os.environ.get("RETRO_KMEANS_ASSIGN_TILES"):
    ASSIGN_TUNE.update(zip(("BN", "BC", "num_warps"),
                           map(int, os.environ["RETRO_KMEANS_ASSIGN_TILES"].split("x"))))


def kmeans_assign(x: torch.Tensor, cent: torch.Tensor, x_sum: Optional[torch.Tensor] = None,
                  sums: Optional[torch.Tensor] = None, *, int32: bool = False) -> torch.Tensor:
    """Nearest centroid (largest dot product) of every point.

    Args:
        x: ``[S, n, D]`` points (the dtype of the products: bf16 on GPUs, fp32 in
            the interpreter), contiguous; ``D`` a power of two >= 16.
        cent: ``[S, C, D]`` centroids, same dtype, contiguous.
        x_sum, sums: optional ``[S, n, D]`` points to sum (any float dtype; ``x``
            itself sums the product points) and ``[S, C, D]`` fp32 accumulator:
            ``sums[s, a]`` += ``x_sum[s, i]`` for every point ``i`` assigned to ``a``
            (the caller zeroes ``sums``).
        int32: return int32 assignments (else int64).
    Returns ``[S, n]`` assignments (first maximum on ties).
    """
    s, n, d = x.shape
    c = cent.shape[1]
    if cent.shape != (s, c, d) or cent.dtype != x.dtype:
        raise ValueError(f"kmeans_assign: centroids {tuple(cent.shape)} {cent.dtype} do not "
                         f"match points {tuple(x.shape)} {x.dtype}")
    if d & (d - 1) or d < 16:
        raise ValueError(f"kmeans_assign: head size {d} is not a power of two >= 16")
    acc = sums is not None
    if acc and (x_sum is None or x_sum.shape != x.shape or sums.shape != (s, c, d)
                or sums.dtype != torch.float32 or not x_sum.is_floating_point()):
        raise ValueError("kmeans_assign: sums needs points x_sum [S, n, D] and an fp32 "
                         "accumulator [S, C, D]")
    x = x.contiguous()
    cent = cent.contiguous()
    out = torch.empty(s, n, dtype=torch.int32, device=x.device)
    if s == 0 or n == 0:
        return out if int32 else out.long()
    self_sum = acc and x_sum is x
    if acc and not self_sum:
        x_sum = x_sum.contiguous()
    t = dict(ASSIGN_TUNE)
    if d > 128 and not os.environ.get("RETRO_KMEANS_ASSIGN_TILES"):
        # Wider points (keys with values, kmeans_value_weight): half the points per
        # program keeps the summed fp32 tile at 128 values per thread.
        t["BN"] = min(t["BN"], 64)
    grid = (s, triton.cdiv(n, t["BN"]))
    _assign_kernel[grid](x, x_sum if acc else x, cent, out, sums if acc else out, n, c,
                         D=d, BN=t["BN"], BC=t["BC"], ACC=acc, SELF_SUM=self_sum,
                         num_warps=t["num_warps"])
    return out if int32 else out.long()


# ------------------------------------------------------------ centroid update
@triton.jit(do_not_specialize=["C"])
def _update_kernel(sums_ptr, c_ptr, C, D: tl.constexpr, BC: tl.constexpr,
                   ZERO: tl.constexpr):
    """Program (problem s, centroid tile t): centroid = sums / |sums| (kept where
    the cluster is empty); the sums zeroed for the next accumulation."""
    s = tl.program_id(0).to(tl.int64)
    cc = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = cc < C
    d = tl.arange(0, D)
    off = (s * C + cc)[:, None] * D + d[None, :]
    sm = tl.load(sums_ptr + off, mask=cm[:, None], other=0.0)
    nrm = tl.sqrt(tl.sum(sm * sm, 1))
    upd = cm & (nrm > 0)
    new = sm / tl.maximum(nrm, 1e-30)[:, None]
    tl.store(c_ptr + off, new.to(c_ptr.dtype.element_ty), mask=upd[:, None])
    if ZERO:
        tl.store(sums_ptr + off, tl.zeros([BC, D], tl.float32), mask=cm[:, None])


def kmeans_update(sums: torch.Tensor, cent: torch.Tensor, zero: bool = True) -> None:
    """In place: ``cent[s, j] = sums[s, j] / |sums[s, j]|`` where ``sums[s, j]`` is
    non-zero (an empty cluster keeps its centroid), cast to ``cent``'s dtype; then
    ``sums`` zeroed (``zero``). ``sums`` ``[S, C, D]`` fp32, ``cent`` ``[S, C, D]``,
    both contiguous."""
    s, c, d = sums.shape
    if cent.shape != sums.shape or sums.dtype != torch.float32:
        raise ValueError("kmeans_update: fp32 sums and centroids of one shape")
    if not (sums.is_contiguous() and cent.is_contiguous()):
        raise ValueError("kmeans_update: contiguous tensors")
    if s == 0 or c == 0:
        return
    bc = 32
    _update_kernel[(s, triton.cdiv(c, bc))](sums, cent, c, D=d, BC=bc, ZERO=zero,
                                            num_warps=4)


# ------------------------------------------------------------- segment keys
@triton.jit
def _segment_key_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, blk_ptr, nbs, n,
                      H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
    """This program's (segment x head s, token tile t) keys from the pages, fp32:
    (s, rows, row mask, channels, keys ``[BN, D]``)."""
    s = tl.program_id(0)
    job = s // H
    h = s % H
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    rm = rows < n
    d = tl.arange(0, D)
    blk = tl.load(blk_ptr + job.to(tl.int64) * nbs + rows // BS, mask=rm, other=0)
    ptr = (kv_ptr + blk.to(tl.int64)[:, None] * kv_s0 + h * kv_s1
           + (rows % BS)[:, None] * kv_s2 + d[None, :] * kv_s3)
    k = tl.load(ptr, mask=rm[:, None], other=0.0).to(tl.float32)
    return s, rows, rm, d, k


@triton.jit(do_not_specialize=["nbs", "n"])
def _key_sum_kernel(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, blk_ptr, nbs, sum_ptr, n,
                    H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
    """Program (segment x head s, token tile t): adds the tile's keys into sum[s]."""
    s, rows, rm, d, k = _segment_key_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, blk_ptr, nbs,
                                          n, H, D, BS, BN)
    tl.atomic_add(sum_ptr + s.to(tl.int64) * D + d, tl.sum(k, 0), sem="relaxed")


@triton.jit(do_not_specialize=["nbs", "n"])
def _key_norm_kernel(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, blk_ptr, nbs, sum_ptr, out_ptr, n,
                     H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr):
    """Program (s, t): the tile's keys minus the segment mean, normalised."""
    s, rows, rm, d, k = _segment_key_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, blk_ptr, nbs,
                                          n, H, D, BS, BN)
    mean = tl.load(sum_ptr + s.to(tl.int64) * D + d) / n
    x = k - mean[None, :]
    nrm = tl.sqrt(tl.sum(x * x, 1))
    x = x / tl.maximum(nrm, 1e-12)[:, None]
    tl.store(out_ptr + (s.to(tl.int64) * n + rows)[:, None] * D + d[None, :],
             x.to(out_ptr.dtype.element_ty), mask=rm[:, None])


def segment_keys(kv_cache: torch.Tensor, seg_blocks: torch.Tensor, head_dim: int,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """The keys of ``m`` equal-length segments, mean-centred per segment and head and
    normalised: ``[m * H, n, D]`` in ``out_dtype`` (problem ``job * H + h``).

    ``kv_cache``: vLLM's ``(NB, H, bs, 2D)`` view (keys in the first ``D`` of the
    last dim); ``seg_blocks``: ``[m, n / bs]`` physical blocks of each segment's
    tokens, in order (segments start at a block boundary).
    """
    nb_total, h, bs, _ = kv_cache.shape
    m, nbs = seg_blocks.shape
    n = nbs * bs
    d = head_dim
    seg_blocks = seg_blocks.contiguous()
    sums = torch.zeros(m * h, d, dtype=torch.float32, device=kv_cache.device)
    out = torch.empty(m * h, n, d, dtype=out_dtype, device=kv_cache.device)
    if m == 0 or n == 0:
        return out
    bn = 64
    grid = (m * h, triton.cdiv(n, bn))
    st = kv_cache.stride()
    _key_sum_kernel[grid](kv_cache, st[0], st[1], st[2], st[3], seg_blocks, nbs, sums, n,
                          H=h, D=d, BS=bs, BN=bn, num_warps=4)
    _key_norm_kernel[grid](kv_cache, st[0], st[1], st[2], st[3], seg_blocks, nbs, sums, out,
                           n, H=h, D=d, BS=bs, BN=bn, num_warps=4)
    return out
