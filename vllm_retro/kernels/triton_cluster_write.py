"""Triton kernel writing clustered segments into the paged index (GPU index build).

Role: :func:`write_clusters` is the last step of the index build. The segments'
K/V (all heads) are first copied out of vLLM's pages into a temporary (one torch
gather); then one program per (segment x KV head, cluster) reads the cluster's
keys and values from the copy in cluster order (the tokens sorted by their k-means
assignment), writes them back into the pages at the cluster's logical positions
``[p0 + start, p0 + start + size)`` of that head (the in-place, per-head reorder
that makes every cluster contiguous), computes its centroid, key variance and
mean value (fp32, two passes: the variance about the centroid, not E[k^2] -
mean^2) and writes them, the cluster's size and first position into the layer's
index pool, at the segment's ``j``-th pool page (a segment has ``entries_per_block``
pages per block). Clusters of a segment cover its
positions exactly once, so the programs' writes are disjoint, and every read is
from the copy.

Twin: :func:`vllm_retro.kernels.reference.write_clusters`
(tests/kernels/test_write_clusters.py).

:func:`write_value_correction_triton` (``RetroConfig.value_correction``, after the
write): one program per (segment x KV head, cluster) reads the cluster's now
contiguous K/V a tile at a time, its mean key and value, then runs the power
iterations of its key-value cross-covariance's leading pair on the tiles (each
step two passes over the cluster's tokens, from cache), and writes ``sigma u`` and
``w`` to the page's rows ``F_SIGMA_U`` and ``F_W``. Twin:
:func:`vllm_retro.kernels.reference.write_value_correction`
(tests/kernels/test_value_correction.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index.paged import F_SIGMA_U, F_W, I_SIZE, I_START, IndexPool, PagedIndexLayout

_I_SIZE = tl.constexpr(I_SIZE)
_I_START = tl.constexpr(I_START)
_F_SIGMA_U = tl.constexpr(F_SIGMA_U)
_F_W = tl.constexpr(F_W)


@triton.jit(do_not_specialize=["n", "C", "nbs", "npg"])
def _write_kernel(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, src_ptr, src_s0, src_s1, src_s2,
                  src_s3, fp_ptr, fp_s0, fp_s1, fp_s2, ip_ptr, ip_s0, ip_s1, blk_ptr, pg_ptr, nbs,
                  npg, p0_ptr, ord_ptr, st_ptr, sz_ptr, n, C, H: tl.constexpr,
                  D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr):
    """Program (s = job * H + h, segment page j < npg): cluster j of problem s, or an
    empty slot when j >= C. ``src [m, nbs, H, BS, 2D]`` (last stride 1): the
    segments' K/V before the reorder."""
    s = tl.program_id(0)
    j = tl.program_id(1)
    job = s // H
    h = s % H
    brow = blk_ptr + job.to(tl.int64) * nbs
    cblk = tl.load(pg_ptr + job.to(tl.int64) * npg + j).to(tl.int64)   # pool page
    ip_c = ip_ptr + cblk * ip_s0 + h * ip_s1
    if j >= C:
        tl.store(ip_c + _I_SIZE, 0)
        tl.store(ip_c + _I_START, 0)
    else:
        p0 = tl.load(p0_ptr + job)
        start = tl.load(st_ptr + s.to(tl.int64) * C + j)
        size = tl.load(sz_ptr + s.to(tl.int64) * C + j)
        d = tl.arange(0, D)
        i = tl.arange(0, T)
        orow = ord_ptr + s.to(tl.int64) * n
        srow = src_ptr + job.to(tl.int64) * src_s0 + h * src_s2
        acc_k = tl.zeros([D], tl.float32)
        acc_v = tl.zeros([D], tl.float32)
        for t0 in range(0, size, T):
            m = t0 + i < size
            e = start + t0 + i
            tok = tl.load(orow + e, mask=m, other=0)
            sp = (srow + (tok // BS).to(tl.int64)[:, None] * src_s1
                  + (tok % BS)[:, None] * src_s3 + d[None, :])
            k = tl.load(sp, mask=m[:, None], other=0.0)
            v = tl.load(sp + D, mask=m[:, None], other=0.0)
            acc_k += tl.sum(k.to(tl.float32), 0)
            acc_v += tl.sum(v.to(tl.float32), 0)
            # Entry e (token tok's K/V) goes to the segment's logical position e.
            pb = tl.load(brow + e // BS, mask=m, other=0).to(tl.int64)
            kp = (kv_ptr + pb[:, None] * kv_s0 + h * kv_s1 + (e % BS)[:, None] * kv_s2
                  + d[None, :] * kv_s3)
            tl.store(kp, k, mask=m[:, None])
            tl.store(kp + D * kv_s3, v, mask=m[:, None])
        cnt = tl.maximum(size, 1).to(tl.float32)
        cent = acc_k / cnt
        acc_q = tl.zeros([D], tl.float32)
        for t0 in range(0, size, T):
            m = t0 + i < size
            tok = tl.load(orow + start + t0 + i, mask=m, other=0)
            sp = (srow + (tok // BS).to(tl.int64)[:, None] * src_s1
                  + (tok % BS)[:, None] * src_s3 + d[None, :])
            dk = tl.load(sp, mask=m[:, None], other=0.0).to(tl.float32) - cent[None, :]
            acc_q += tl.sum(tl.where(m[:, None], dk * dk, 0.0), 0)
        fp_c = fp_ptr + cblk * fp_s0 + h * fp_s1 + d
        ety = fp_ptr.dtype.element_ty
        tl.store(fp_c, cent.to(ety))
        tl.store(fp_c + fp_s2, (acc_q / cnt).to(ety))
        tl.store(fp_c + 2 * fp_s2, (acc_v / cnt).to(ety))
        tl.store(ip_c + _I_SIZE, size)
        tl.store(ip_c + _I_START, p0 + start)


def write_clusters_triton(kv_cache: torch.Tensor, layout: PagedIndexLayout,
                          pool: IndexPool, seg_blocks: torch.Tensor,
                          seg_pages: torch.Tensor, p0s: torch.Tensor, order: torch.Tensor,
                          starts: torch.Tensor, sizes: torch.Tensor) -> None:
    """See :func:`vllm_retro.kernels.reference.write_clusters` (same arguments;
    ``order``, ``starts``, ``sizes`` and ``p0s`` int32, on the cache's device)."""
    h, bs, d = layout.num_kv_heads, layout.block_size, layout.head_dim
    m, nbs = seg_blocks.shape
    npg = seg_pages.shape[1]
    n = nbs * bs
    c = starts.shape[1]
    if m == 0:
        return
    fpart, ipart = pool.fpart, pool.ipart
    # The segments' K/V before the reorder: [m, nbs, H, bs, 2D], contiguous.
    src = kv_cache[seg_blocks.long()]
    st = kv_cache.stride()
    i32 = torch.int32
    _write_kernel[(m * h, npg)](
        kv_cache, st[0], st[1], st[2], st[3], src, src.stride(0), src.stride(1),
        src.stride(2), src.stride(3), fpart, fpart.stride(0), fpart.stride(1),
        fpart.stride(2), ipart, ipart.stride(0), ipart.stride(1),
        seg_blocks.contiguous(), seg_pages.to(torch.int64).contiguous(), nbs, npg,
        p0s.to(i32).contiguous(),
        order.to(i32).contiguous(), starts.to(i32).contiguous(),
        sizes.to(i32).contiguous(), n, c, H=h, D=d, BS=bs, T=16, num_warps=2)


@triton.jit
def _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, t0,
             D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr):
    """Keys and values ``[T, D]`` (float32, zero past the cluster) of the cluster's
    entries ``t0 .. t0 + T`` (logical positions ``start + t``)."""
    i = tl.arange(0, T)
    d = tl.arange(0, D)
    m = t0 + i < size
    e = start + t0 + i
    pb = tl.load(brow + e // BS, mask=m, other=0).to(tl.int64)
    base = kv_ptr + pb * kv_s0 + h * kv_s1 + (e % BS).to(tl.int64) * kv_s2
    k = tl.load(base[:, None] + d[None, :] * kv_s3, mask=m[:, None], other=0.0)
    v = tl.load(base[:, None] + (D + d[None, :]) * kv_s3, mask=m[:, None], other=0.0)
    return k.to(tl.float32), v.to(tl.float32), m


@triton.jit
def _vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, cent, vmean, x,
              TRANS: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr):
    """``X x`` (``TRANS``: ``X^T x``) for the cluster's cross-covariance ``X = (1/n)
    sum_i dk_i dv_i^T``: ``(1/n) sum_i dk_i (dv_i . x)`` (``sum_i dv_i (dk_i . x)``)."""
    acc = tl.zeros([D], tl.float32)
    for t0 in range(0, size, T):
        k, v, m = _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, t0, D,
                           BS, T)
        dk = tl.where(m[:, None], k - cent[None, :], 0.0)
        dv = tl.where(m[:, None], v - vmean[None, :], 0.0)
        if TRANS:
            acc += tl.sum(dv * tl.sum(dk * x[None, :], 1)[:, None], 0)
        else:
            acc += tl.sum(dk * tl.sum(dv * x[None, :], 1)[:, None], 0)
    return acc / tl.maximum(size, 1).to(tl.float32)


@triton.jit
def _unit(x):
    """``x / max(|x|, 1e-12)`` (torch's ``normalize``)."""
    return x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), 1e-12)


@triton.jit(do_not_specialize=["C", "nbs", "npg"])
def _vc_kernel(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, fp_ptr, fp_s0, fp_s1, fp_s2, blk_ptr,
               pg_ptr, nbs, npg, st_ptr, sz_ptr, C, ITERS: tl.constexpr, H: tl.constexpr,
               D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr):
    """Program (s = job * H + h, cluster j < C): the value-correction pair of cluster
    j of problem s (zeros below two tokens)."""
    s = tl.program_id(0)
    j = tl.program_id(1)
    job = s // H
    h = s % H
    brow = blk_ptr + job.to(tl.int64) * nbs
    cblk = tl.load(pg_ptr + job.to(tl.int64) * npg + j).to(tl.int64)
    start = tl.load(st_ptr + s.to(tl.int64) * C + j)
    size = tl.load(sz_ptr + s.to(tl.int64) * C + j)
    d = tl.arange(0, D)
    fp_c = fp_ptr + cblk * fp_s0 + h * fp_s1 + d
    ety = fp_ptr.dtype.element_ty
    su = tl.zeros([D], tl.float32)
    w = tl.zeros([D], tl.float32)
    if size >= 2:
        acc_k = tl.zeros([D], tl.float32)
        acc_v = tl.zeros([D], tl.float32)
        for t0 in range(0, size, T):
            k, v, m = _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, t0,
                               D, BS, T)
            acc_k += tl.sum(k, 0)
            acc_v += tl.sum(v, 0)
        cent = acc_k / size.to(tl.float32)
        vmean = acc_v / size.to(tl.float32)
        # From the first entry's key deviation, as the twin.
        k0, v0, m0 = _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, 0, D,
                            BS, T)
        u = _unit(tl.sum(tl.where((tl.arange(0, T) == 0)[:, None], k0 - cent[None, :], 0.0),
                         0))
        w = _unit(_vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, cent,
                            vmean, u, True, D, BS, T))
        for it in range(ITERS):
            u = _unit(_vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size,
                                cent, vmean, w, False, D, BS, T))
            w = _unit(_vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size,
                                cent, vmean, u, True, D, BS, T))
        su = _vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, cent,
                       vmean, w, False, D, BS, T)
    tl.store(fp_c + _F_SIGMA_U * fp_s2, su.to(ety))
    tl.store(fp_c + _F_W * fp_s2, w.to(ety))


def write_value_correction_triton(kv_cache: torch.Tensor, layout: PagedIndexLayout,
                                  pool: IndexPool, seg_blocks: torch.Tensor,
                                  seg_pages: torch.Tensor, starts: torch.Tensor,
                                  sizes: torch.Tensor, iters: int) -> None:
    """See :func:`vllm_retro.kernels.reference.write_value_correction` (same
    arguments; float32 statistics)."""
    h, bs, d = layout.num_kv_heads, layout.block_size, layout.head_dim
    m, nbs = seg_blocks.shape
    npg = seg_pages.shape[1]
    c = starts.shape[1]
    if m == 0 or c == 0:
        return
    fpart = pool.fpart
    st = kv_cache.stride()
    i32 = torch.int32
    _vc_kernel[(m * h, c)](
        kv_cache, st[0], st[1], st[2], st[3], fpart, fpart.stride(0), fpart.stride(1),
        fpart.stride(2), seg_blocks.contiguous(), seg_pages.to(torch.int64).contiguous(),
        nbs, npg, starts.to(i32).contiguous(), sizes.to(i32).contiguous(), c,
        ITERS=int(iters), H=h, D=d, BS=bs, T=16, num_warps=4)
