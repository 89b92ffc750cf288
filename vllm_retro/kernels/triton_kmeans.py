"""Triton assignment step of the index build's spherical k-means (GPU).

Role: :func:`kmeans_assign` is the nearest-centroid step of
:func:`vllm_retro.index.paged._kmeans_device` for ``S`` independent problems
(segments x KV heads), fused with the accumulation of the next update's cluster
sums. The torch form (``bmm`` into an ``[S, n, C]`` similarity matrix, ``argmax``,
``index_add_``) writes and reads that matrix every iteration (76 MB per segment of
8K tokens and 8 heads at 546 clusters); here the similarities stay in registers
(tiles of ``BN`` points x ``BC`` centroids on tensor cores, a running arg-max), so
an iteration reads the points and centroids once.

Twin: ``argmax(x @ cent^T)`` per point in fp32 (first maximum on ties) and
``index_add_`` of the points by assignment (tests/kernels/test_kmeans_assign.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _assign_kernel(x_ptr, xf_ptr, c_ptr, a_ptr, sums_ptr, n, C,
                   D: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
                   ACC: tl.constexpr):
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
        xf = tl.load(xf_ptr + (s * n + rows)[:, None] * D + d[None, :], mask=rm[:, None],
                     other=0.0)
        tl.atomic_add(sums_ptr + (s * C + arg.to(tl.int64))[:, None] * D + d[None, :], xf,
                      mask=rm[:, None], sem="relaxed")


def kmeans_assign(x: torch.Tensor, cent: torch.Tensor, x_sum: Optional[torch.Tensor] = None,
                  sums: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Nearest centroid (largest dot product) of every point.

    Args:
        x: ``[S, n, D]`` points (the dtype of the products: bf16 on GPUs, fp32 in
            the interpreter), contiguous; ``D`` a power of two >= 16.
        cent: ``[S, C, D]`` centroids, same dtype, contiguous.
        x_sum, sums: optional ``[S, n, D]`` fp32 points and ``[S, C, D]`` fp32
            accumulator: ``sums[s, a]`` += ``x_sum[s, i]`` for every point ``i``
            assigned to ``a`` (the caller zeroes ``sums``).
    Returns ``[S, n]`` int64 assignments (first maximum on ties).
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
                or sums.dtype != torch.float32 or x_sum.dtype != torch.float32):
        raise ValueError("kmeans_assign: sums needs fp32 x_sum [S, n, D] and sums [S, C, D]")
    x = x.contiguous()
    cent = cent.contiguous()
    out = torch.empty(s, n, dtype=torch.int32, device=x.device)
    if s == 0 or n == 0:
        return out.long()
    bn, bc = 64, 64
    grid = (s, triton.cdiv(n, bn))
    _assign_kernel[grid](x, x_sum if acc else x, cent, out, sums if acc else out, n, c,
                         D=d, BN=bn, BC=bc, ACC=acc, num_warps=4)
    return out.long()
