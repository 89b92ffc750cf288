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
write): one program (one warp) per (segment x KV head, cluster) finds the leading
singular pair of the cluster's key-value cross-covariance ``X`` by the twin's power
iterations and writes ``sigma u`` and ``w`` to the page's rows ``F_SIGMA_U`` and
``F_W``. A cluster of up to ``VC_HELD_TOKENS`` tokens (nearly all of them) is read
twice: once for its tokens' key and value Gram matrices (``[n, n]``, on the tensor
cores), on which every step of the iteration runs, and once to turn the result back
into D dimensions. A larger one streams its now contiguous K/V from cache, a tile
at a time, on every step (two passes each). Twin:
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

# The value correction's clusters of up to this many tokens (a power of two >= 32)
# take the Gram path, larger ones the streamed one. At 16-token clusters k-means
# leaves ~1% of them above 32 (SmolLM2's keys); 64 would not fit in one warp.
VC_HELD_TOKENS = 32


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
    """Keys and values ``[T, D]`` (the cache's dtype, zero past the cluster) of the
    cluster's entries ``t0 .. t0 + T`` (logical positions ``start + t``)."""
    i = tl.arange(0, T)
    d = tl.arange(0, D)
    m = t0 + i < size
    e = start + t0 + i
    pb = tl.load(brow + e // BS, mask=m, other=0).to(tl.int64)
    base = kv_ptr + pb * kv_s0 + h * kv_s1 + (e % BS).to(tl.int64) * kv_s2
    k = tl.load(base[:, None] + d[None, :] * kv_s3, mask=m[:, None], other=0.0)
    v = tl.load(base[:, None] + (D + d[None, :]) * kv_s3, mask=m[:, None], other=0.0)
    return k, v, m


@triton.jit
def _vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, cent, vmean, x,
              TRANS: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr):
    """``X x`` (``TRANS``: ``X^T x``) for the cluster's cross-covariance ``X = (1/n)
    sum_i dk_i dv_i^T``: ``(1/n) sum_i dk_i (dv_i . x)`` (``sum_i dv_i (dk_i . x)``),
    one pass over the cluster's tokens in cache."""
    acc = tl.zeros([D], tl.float32)
    for t0 in range(0, size, T):
        k, v, m = _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, t0, D,
                           BS, T)
        dk = tl.where(m[:, None], k.to(tl.float32) - cent[None, :], 0.0)
        dv = tl.where(m[:, None], v.to(tl.float32) - vmean[None, :], 0.0)
        if TRANS:
            acc += tl.sum(dv * tl.sum(dk * x[None, :], 1)[:, None], 0)
        else:
            acc += tl.sum(dk * tl.sum(dv * x[None, :], 1)[:, None], 0)
    return acc / tl.maximum(size, 1).to(tl.float32)


@triton.jit
def _unit(x):
    """``x / max(|x|, 1e-12)`` (torch's ``normalize``)."""
    return x / tl.maximum(tl.sqrt(tl.sum(x * x, 0)), 1e-12)


@triton.jit
def _vc_pair_streamed(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size,
                      ITERS: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                      T: tl.constexpr):
    """``(sigma u, w)`` of a cluster of any size (at least two tokens): the twin's
    steps, each product a pass over the cluster's tokens in cache, ``T`` at a time."""
    acc_k = tl.zeros([D], tl.float32)
    acc_v = tl.zeros([D], tl.float32)
    for t0 in range(0, size, T):
        k, v, m = _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, t0,
                           D, BS, T)
        acc_k += tl.sum(k.to(tl.float32), 0)
        acc_v += tl.sum(v.to(tl.float32), 0)
    cent = acc_k / size.to(tl.float32)
    vmean = acc_v / size.to(tl.float32)
    # From the first entry's key deviation, as the twin.
    k0, v0, m0 = _vc_tile(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, 0, D,
                          BS, T)
    u = _unit(tl.sum(tl.where((tl.arange(0, T) == 0)[:, None],
                              k0.to(tl.float32) - cent[None, :], 0.0), 0))
    w = _unit(_vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, cent,
                        vmean, u, True, D, BS, T))
    for it in range(ITERS):
        u = _unit(_vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size,
                            cent, vmean, w, False, D, BS, T))
        w = _unit(_vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size,
                            cent, vmean, u, True, D, BS, T))
    su = _vc_apply(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, cent,
                   vmean, w, False, D, BS, T)
    return su, w


@triton.jit
def _centred_gram(base, m, size, cnt, kv_s3, OFF: tl.constexpr, D: tl.constexpr,
                  DC: tl.constexpr, TR: tl.constexpr, NATIVE: tl.constexpr):
    """``G [TR, TR]``, ``G_ij = (x_i - mean) . (x_j - mean)`` for the cluster's keys
    (``OFF`` 0) or values (``OFF`` D), zero past the cluster (``base`` its tokens'
    row pointers, ``m`` its live rows). The raw products ``R = x x^T`` accumulate
    ``DC`` dimensions at a time (16-bit values multiply exactly on the tensor cores
    with ``NATIVE``, else in fp32); the centring is on the small matrix, ``G = R - r
    1^T - 1 r^T + mu`` with ``r_i = x_i . mean = (1/n) sum_j R_ij`` and ``mu = mean
    . mean``."""
    g = tl.zeros([TR, TR], tl.float32)
    for c0 in tl.static_range(0, D, DC):
        dd = OFF + c0 + tl.arange(0, DC)
        x = tl.load(base[:, None] + dd[None, :] * kv_s3, mask=m[:, None], other=0.0)
        if NATIVE:
            g = tl.dot(x, tl.trans(x), g)
        else:
            xf = x.to(tl.float32)
            g = tl.dot(xf, tl.trans(xf), g, input_precision="ieee")
    r1 = tl.sum(g, 1) / cnt            # r as a column ...
    r0 = tl.sum(g, 0) / cnt            # ... and as a row (g is symmetric)
    mu = tl.sum(r1, 0) / cnt
    i = tl.arange(0, TR)
    live = (i < size)[:, None] & (i < size)[None, :]
    return tl.where(live, g - r1[:, None] - r0[None, :] + mu, 0.0)


@triton.jit
def _rescale(x):
    """``x / max|x|`` (zero stays zero): keeps the power iteration's coefficient
    vectors in range whatever the scale of the K/V."""
    return x / tl.maximum(tl.max(tl.abs(x), 0), 1e-30)


@triton.jit
def _vc_pair_held(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, fp_c, fp_s2,
                  ITERS: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  TR: tl.constexpr, DC: tl.constexpr, DE: tl.constexpr,
                  NATIVE: tl.constexpr):
    """Writes ``sigma u`` and ``w`` of a cluster of 2 to ``TR`` tokens (row pointer
    ``fp_c``): the twin's power iteration run in the span of the cluster's tokens.
    With ``DK``, ``DV`` the ``[n, D]`` deviations from the means, ``Gk = DK DK^T``
    and ``Gv = DV DV^T``, a ``w`` of the form ``DV^T b`` gives ``X w ~ DK^T (Gv b)``
    and a ``u = DK^T a`` gives ``X^T u ~ DV^T (Gk a)``; the twin's start, ``u ~ dk_0``
    (the first entry's key deviation), is ``a = e_0``. So each step is a product
    with a ``[TR, TR]`` matrix (not a pass over ``[n, D]``), and only the end returns
    to D dimensions: ``w = unit(DV^T b)``, ``sigma u = X w``."""
    i = tl.arange(0, TR)
    m = i < size
    e = start + i
    pb = tl.load(brow + e // BS, mask=m, other=0).to(tl.int64)
    base = kv_ptr + pb * kv_s0 + h * kv_s1 + (e % BS).to(tl.int64) * kv_s2
    cnt = size.to(tl.float32)
    gk = _centred_gram(base, m, size, cnt, kv_s3, 0, D, DC, TR, NATIVE)
    gv = _centred_gram(base, m, size, cnt, kv_s3, D, D, DC, TR, NATIVE)
    # Gk and Gv are symmetric: alternating the reduced axis keeps each vector in the
    # layout the next product broadcasts it in. a and b are rescaled, not
    # normalised: only their directions matter.
    b = _rescale(tl.sum(tl.where(i[None, :] == 0, gk, 0.0), 1))         # Gk e_0
    for it in range(ITERS):
        a = _rescale(tl.sum(gv * b[:, None], 0))
        b = _rescale(tl.sum(gk * a[None, :], 1))
    # Back in D dimensions, DE at a time (the cluster's values and keys in fp32
    # would not fit in one warp's registers): w ~ DV^T b, s = DV w and sigma u =
    # DK^T s / n without forming the deviations (b, s and the rows past the cluster
    # are zero). w is stored once its norm over all D is known, by a second pass
    # over the values (the first's expressions: the compiler may reuse them).
    sb = tl.sum(b, 0)
    nrm = 0.0
    svm = 0.0
    sv = tl.zeros([TR], tl.float32)
    for c0 in tl.static_range(0, D, DE):
        dd = D + c0 + tl.arange(0, DE)
        v = tl.load(base[:, None] + dd[None, :] * kv_s3, mask=m[:, None], other=0.0)
        v = v.to(tl.float32)
        vmean = tl.sum(v, 0) / cnt
        wc = tl.sum(v * b[:, None], 0) - sb * vmean
        nrm += tl.sum(wc * wc, 0)
        svm += tl.sum(vmean * wc, 0)
        sv += tl.sum(v * wc[None, :], 1)
    inv = 1.0 / tl.maximum(tl.sqrt(nrm), 1e-12)
    s = tl.where(m, (sv - svm) * inv, 0.0)
    ss = tl.sum(s, 0)
    ety = fp_c.dtype.element_ty
    for c0 in tl.static_range(0, D, DE):
        dd = D + c0 + tl.arange(0, DE)
        v = tl.load(base[:, None] + dd[None, :] * kv_s3, mask=m[:, None], other=0.0)
        v = v.to(tl.float32)
        wc = (tl.sum(v * b[:, None], 0) - sb * (tl.sum(v, 0) / cnt)) * inv
        tl.store(fp_c + _F_W * fp_s2 + (dd - D), wc.to(ety))
    for c0 in tl.static_range(0, D, DE):
        dd = c0 + tl.arange(0, DE)
        k = tl.load(base[:, None] + dd[None, :] * kv_s3, mask=m[:, None], other=0.0)
        k = k.to(tl.float32)
        su = (tl.sum(k * s[:, None], 0) - ss * (tl.sum(k, 0) / cnt)) / cnt
        tl.store(fp_c + _F_SIGMA_U * fp_s2 + dd, su.to(ety))


@triton.jit(do_not_specialize=["C", "nbs", "npg"])
def _vc_kernel(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, fp_ptr, fp_s0, fp_s1, fp_s2, blk_ptr,
               pg_ptr, nbs, npg, st_ptr, sz_ptr, C, ITERS: tl.constexpr, H: tl.constexpr,
               D: tl.constexpr, BS: tl.constexpr, T: tl.constexpr, TR: tl.constexpr,
               DC: tl.constexpr, DE: tl.constexpr, NATIVE: tl.constexpr):
    """Program (s = job * H + h, cluster j < C): the value-correction pair of cluster
    j of problem s (zeros below two tokens): up to ``TR`` tokens by the Gram path
    (with ``TR / 2`` rows where they suffice: a quarter of the iteration's work, half
    of the rest), more streamed ``T`` tokens at a time."""
    s = tl.program_id(0)
    j = tl.program_id(1)
    job = s // H
    h = s % H
    brow = blk_ptr + job.to(tl.int64) * nbs
    cblk = tl.load(pg_ptr + job.to(tl.int64) * npg + j).to(tl.int64)
    start = tl.load(st_ptr + s.to(tl.int64) * C + j)
    size = tl.load(sz_ptr + s.to(tl.int64) * C + j)
    fp_c = fp_ptr + cblk * fp_s0 + h * fp_s1
    if size >= 2 and size <= TR // 2:
        _vc_pair_held(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, fp_c, fp_s2,
                      ITERS, D, BS, TR // 2, DC, DE, NATIVE)
    elif size >= 2 and size <= TR:
        _vc_pair_held(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start, size, fp_c, fp_s2,
                      ITERS, D, BS, TR, DC, DE, NATIVE)
    else:
        d = tl.arange(0, D)
        su = tl.zeros([D], tl.float32)
        w = tl.zeros([D], tl.float32)
        if size >= 2:
            su, w = _vc_pair_streamed(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, brow, h, start,
                                      size, ITERS, D, BS, T)
        ety = fp_ptr.dtype.element_ty
        tl.store(fp_c + _F_SIGMA_U * fp_s2 + d, su.to(ety))
        tl.store(fp_c + _F_W * fp_s2 + d, w.to(ety))


def _interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (its 16-bit dot is
    unreliable: fp32 products there)."""
    return type(_vc_kernel).__name__ == "InterpretedFunction"


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
    # One warp per cluster: the Gram path's small matrices are then neither split
    # across warps (no cross-warp reductions) nor replicated in each. fp32 caches
    # (tests) take four: their tiles are twice the registers.
    sixteen = kv_cache.dtype in (torch.bfloat16, torch.float16)
    _vc_kernel[(m * h, c)](
        kv_cache, st[0], st[1], st[2], st[3], fpart, fpart.stride(0), fpart.stride(1),
        fpart.stride(2), seg_blocks.contiguous(), seg_pages.to(torch.int64).contiguous(),
        nbs, npg, starts.to(i32).contiguous(), sizes.to(i32).contiguous(), c,
        ITERS=int(iters), H=h, D=d, BS=bs, T=16, TR=VC_HELD_TOKENS, DC=min(32, d),
        DE=min(64, d), NATIVE=sixteen and not _interpreting(),
        num_warps=1 if sixteen else 4)
