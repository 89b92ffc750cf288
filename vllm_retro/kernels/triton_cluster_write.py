"""Triton kernel writing clustered segments into the paged index (GPU index build).

Role: :func:`write_clusters` is the last step of the index build: from each
segment's cluster order (the tokens sorted by their k-means assignment) one
program per (segment x KV head, cluster) reads the cluster's keys and values
straight from vLLM's pages, computes its centroid, key variance and mean value
(fp32, two passes: the variance about the centroid, not E[k^2] - mean^2) and writes
them, the cluster's size and start, and its permutation entries into the index
part of the pages. It replaces per-cluster sums by ``index_add_`` (fp32 atomics)
over gathered fp32 copies of the segment.

Twin: :func:`vllm_retro.kernels.reference.write_clusters`
(tests/kernels/test_write_clusters.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..index.paged import PagedIndexLayout


@triton.jit(do_not_specialize=["n", "C", "nbs"])
def _write_kernel(kv_ptr, kv_s0, kv_s1, kv_s2, kv_s3, fp_ptr, fp_s0, fp_s1, fp_s2,
                  ip_ptr, ip_s0, ip_s1, blk_ptr, nbs, p0_ptr, ord_ptr, st_ptr, sz_ptr,
                  n, C, H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  T: tl.constexpr):
    """Program (s = job * H + h, segment block j): cluster j of problem s, or an
    empty slot when j >= C."""
    s = tl.program_id(0)
    j = tl.program_id(1)
    job = s // H
    h = s % H
    brow = blk_ptr + job.to(tl.int64) * nbs
    cblk = tl.load(brow + j).to(tl.int64)
    ip_c = ip_ptr + cblk * ip_s0 + h * ip_s1
    if j >= C:
        tl.store(ip_c + BS, 0)
        tl.store(ip_c + BS + 1, 0)
    else:
        p0 = tl.load(p0_ptr + job)
        start = tl.load(st_ptr + s.to(tl.int64) * C + j)
        size = tl.load(sz_ptr + s.to(tl.int64) * C + j)
        d = tl.arange(0, D)
        i = tl.arange(0, T)
        orow = ord_ptr + s.to(tl.int64) * n
        acc_k = tl.zeros([D], tl.float32)
        acc_v = tl.zeros([D], tl.float32)
        for t0 in range(0, size, T):
            m = t0 + i < size
            e = start + t0 + i
            tok = tl.load(orow + e, mask=m, other=0)
            blk = tl.load(brow + tok // BS, mask=m, other=0).to(tl.int64)
            kp = (kv_ptr + blk[:, None] * kv_s0 + h * kv_s1 + (tok % BS)[:, None] * kv_s2
                  + d[None, :] * kv_s3)
            acc_k += tl.sum(tl.load(kp, mask=m[:, None], other=0.0).to(tl.float32), 0)
            acc_v += tl.sum(tl.load(kp + D * kv_s3, mask=m[:, None], other=0.0)
                            .to(tl.float32), 0)
            # Permutation entry e sits at the segment's logical position e.
            pb = tl.load(brow + e // BS, mask=m, other=0).to(tl.int64)
            tl.store(ip_ptr + pb * ip_s0 + h * ip_s1 + e % BS, p0 + tok, mask=m)
        cnt = tl.maximum(size, 1).to(tl.float32)
        cent = acc_k / cnt
        acc_q = tl.zeros([D], tl.float32)
        for t0 in range(0, size, T):
            m = t0 + i < size
            tok = tl.load(orow + start + t0 + i, mask=m, other=0)
            blk = tl.load(brow + tok // BS, mask=m, other=0).to(tl.int64)
            kp = (kv_ptr + blk[:, None] * kv_s0 + h * kv_s1 + (tok % BS)[:, None] * kv_s2
                  + d[None, :] * kv_s3)
            dk = tl.load(kp, mask=m[:, None], other=0.0).to(tl.float32) - cent[None, :]
            acc_q += tl.sum(tl.where(m[:, None], dk * dk, 0.0), 0)
        fp_c = fp_ptr + cblk * fp_s0 + h * fp_s1 + d
        ety = fp_ptr.dtype.element_ty
        tl.store(fp_c, cent.to(ety))
        tl.store(fp_c + fp_s2, (acc_q / cnt).to(ety))
        tl.store(fp_c + 2 * fp_s2, (acc_v / cnt).to(ety))
        tl.store(ip_c + BS, size)
        tl.store(ip_c + BS + 1, p0 + start)


def write_clusters_triton(kv_cache: torch.Tensor, layout: PagedIndexLayout,
                          seg_blocks: torch.Tensor, p0s: torch.Tensor, order: torch.Tensor,
                          starts: torch.Tensor, sizes: torch.Tensor) -> None:
    """See :func:`vllm_retro.kernels.reference.write_clusters` (same arguments;
    ``order``, ``starts``, ``sizes`` and ``p0s`` int32, on the cache's device)."""
    h, bs, d = layout.num_kv_heads, layout.block_size, layout.head_dim
    m, nbs = seg_blocks.shape
    n = nbs * bs
    c = starts.shape[1]
    if m == 0:
        return
    fpart, ipart = layout.views(kv_cache)
    st = kv_cache.stride()
    i32 = torch.int32
    _write_kernel[(m * h, nbs)](
        kv_cache, st[0], st[1], st[2], st[3], fpart, fpart.stride(0), fpart.stride(1),
        fpart.stride(2), ipart, ipart.stride(0), ipart.stride(1),
        seg_blocks.contiguous(), nbs, p0s.to(i32).contiguous(),
        order.to(i32).contiguous(), starts.to(i32).contiguous(),
        sizes.to(i32).contiguous(), n, c, H=h, D=d, BS=bs, T=16, num_warps=2)
