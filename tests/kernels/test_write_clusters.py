"""``write_clusters`` (the index build's last step): the Triton kernel against its
torch twin, and the twin against the cache before the build (the segment's K/V
reordered per head into cluster order, bit-exactly) and float64 statistics of each
cluster's rows read at its contiguous positions (in Triton's CPU interpreter
without a GPU). The summaries go to shuffled index-pool pages unrelated to the
segments' block ids; no other pool page is written. Fresh random inputs per
test, from its own seed."""

import pytest
import torch

from vllm_retro.index.paged import I_SIZE, I_START, IndexPool, PagedIndexLayout
from vllm_retro.kernels import reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed, m, nbs, c, dtype, h=2, d=32, nb=60):
    g = torch.Generator().manual_seed(seed)
    lay = PagedIndexLayout(h, d, 16, dtype)
    kv = lay.make_cache(nb)
    kv.copy_(torch.randn(kv.shape, generator=g).to(dtype))
    blocks = torch.randperm(nb, generator=g)[:m * nbs].view(m, nbs)
    pages = torch.randperm(nb + 30, generator=g)[:m * nbs].view(m, nbs)
    pool = IndexPool(lay, nb + 30)
    n = nbs * 16
    p0s = torch.tensor([16 * (1 + 5 * j) for j in range(m)], dtype=torch.int32)
    # Skewed cluster sizes, some empty: assignments drawn from a power law.
    w = torch.rand(c, generator=g) ** 4
    w[0] = 0.0
    assign = torch.multinomial(w, m * h * n, replacement=True, generator=g).view(m * h, n)
    vals, order = torch.sort(assign, dim=1, stable=True)
    bounds = torch.searchsorted(vals, torch.arange(c + 1).expand(m * h, c + 1).contiguous())
    return (lay, kv, pool, blocks, pages, p0s, order, bounds[:, :c],
            bounds[:, 1:] - bounds[:, :c])


def _cache_copy(lay, kv, device="cpu"):
    """A copy of a cache in vLLM's view (strides kept)."""
    out = lay.make_cache(kv.shape[0], device)
    out.copy_(kv)
    return out


def _check_against_float64(lay, kv, before, pool, blocks, pages, p0s, order, starts,
                           sizes, tol):
    """The written index and the reordered K/V against ``before`` (the cache before
    the build): per segment and head, position ``p0 + e`` holds the K/V token
    ``p0 + order[e]`` had (so the segment's rows are a permutation of the original
    and every cluster is contiguous at ``[p0 + start, p0 + start + size)``), other
    heads and blocks are untouched, and each summary equals float64 statistics of
    its cluster's rows as they now lie in the cache."""
    fpart, ipart = pool.fpart.cpu(), pool.ipart.cpu()
    h, d, bs = lay.num_kv_heads, lay.head_dim, lay.block_size
    m, nbs = blocks.shape
    n = nbs * bs
    c = starts.shape[1]
    e = torch.arange(n)
    outside = torch.ones(kv.shape[0], dtype=torch.bool)
    outside[blocks.reshape(-1)] = False
    assert torch.equal(kv[outside], before[outside])     # other blocks untouched
    unused = torch.ones(pool.num_pages, dtype=torch.bool)
    unused[pages.reshape(-1)] = False
    assert (fpart[unused] == 0).all() and (ipart[unused] == 0).all()   # other pages too
    for j in range(m):
        p0 = int(p0s[j])
        for hh in range(h):
            s = j * h + hh
            rows = kv[blocks[j, e // bs], hh, e % bs]                      # [n, 2D]
            orig = before[blocks[j, e // bs], hh, e % bs]
            tok = order[s].long()
            assert torch.equal(rows, orig[tok])           # position e <- token order[e]
            assert sorted(tok.tolist()) == list(range(n))  # a permutation of the segment
            for ci in range(nbs):
                blk = pages[j, ci]
                if ci >= c:
                    assert ipart[blk, hh, I_SIZE] == 0 and ipart[blk, hh, I_START] == 0
                    continue
                size, start = int(sizes[s, ci]), int(starts[s, ci])
                assert ipart[blk, hh, I_SIZE] == size
                assert ipart[blk, hh, I_START] == p0 + start
                # The cluster's rows, read where the decode reads them: positions
                # [p0 + start, p0 + start + size) of this head.
                pos = torch.arange(start, start + size)
                kvt = kv[blocks[j, pos // bs], hh, pos % bs].double()
                assert torch.equal(kvt, orig[tok[start:start + size]].double())
                f = fpart[blk, hh].double()
                if size == 0:
                    assert (f == 0).all()
                    continue
                k, v = kvt[:, :d], kvt[:, d:]
                for got, want in ((f[0], k.mean(0)), (f[1], k.var(0, unbiased=False)),
                                  (f[2], v.mean(0))):
                    assert (got - want).abs().max().item() <= tol * (1 + want.abs().max().item())


@pytest.mark.parametrize("m,nbs,c", [(1, 6, 6), (2, 8, 5)])
def test_twin_writes_float64_statistics(m, nbs, c):
    lay, kv, pool, blocks, pages, p0s, order, starts, sizes = _case(
        m + 100 * c, m, nbs, c, torch.float64)
    before = _cache_copy(lay, kv)
    reference.write_clusters(kv, lay, pool, blocks, pages, p0s, order, starts, sizes)
    _check_against_float64(lay, kv, before, pool, blocks, pages, p0s, order, starts, sizes,
                           1e-12)


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("m,nbs,c", [(1, 6, 6), (2, 8, 5)])
def test_triton_kernel_matches_twin(m, nbs, c):
    pytest.importorskip("triton")
    from vllm_retro.kernels import triton_cluster_write as tcw
    if DEV == "cpu" and type(tcw._write_kernel).__name__ != "InterpretedFunction":
        pytest.skip("kernel module was compiled for a GPU before the interpreter was on")
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    lay, kv, pool, blocks, pages, p0s, order, starts, sizes = _case(7 * m + c, m, nbs, c, dt)
    want = _cache_copy(lay, kv)
    reference.write_clusters(want, lay, pool, blocks, pages, p0s, order, starts, sizes)
    got = _cache_copy(lay, kv, DEV)
    gpool = IndexPool(lay, pool.num_pages, DEV)
    tcw.write_clusters_triton(got, lay, gpool, blocks.to(DEV), pages.to(DEV), p0s.to(DEV),
                              order.to(DEV), starts.to(DEV), sizes.to(DEV))
    got = _cache_copy(lay, got)
    fw, iw = pool.fpart, pool.ipart
    fg, ig = gpool.fpart.cpu(), gpool.ipart.cpu()
    assert torch.equal(ig, iw)
    # fp32 statistics in both; the 16-bit store rounds them (one ulp apart at most).
    tol = 1e-5 if dt == torch.float32 else 8e-3
    err = ((fg.float() - fw.float()).abs() / (1 + fw.float().abs())).max().item()
    assert err <= tol, err
    assert torch.equal(got, want)   # the K/V reordered bit-exactly, as the twin does
    assert not torch.equal(got, kv)   # (the case does move tokens)
    _check_against_float64(lay, got, kv, gpool, blocks, pages, p0s, order, starts, sizes,
                           1e-5 if dt == torch.float32 else 1e-2)
