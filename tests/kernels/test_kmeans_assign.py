"""The Triton k-means kernels of the index build (GPU) against their twins: the
assignment against float64 ``argmax(x @ cent^T)`` and ``index_add_`` of the points,
the centroid update against ``normalize(sums)``, the segment keys against the
mean-centred, normalised keys gathered from the pages (in Triton's CPU interpreter
without a GPU). Fresh random inputs per test, from its own seed."""

import pytest
import torch

pytest.importorskip("triton")

from vllm_retro.index.paged import PagedIndexLayout, _kmeans_torch, _kmeans_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def _assign():
    from vllm_retro.kernels.triton_kmeans import _assign_kernel, kmeans_assign
    if DEV == "cpu" and type(_assign_kernel).__name__ != "InterpretedFunction":
        pytest.skip("kernel module was compiled for a GPU before the interpreter was on")
    return kmeans_assign


@pytest.mark.parametrize("s,n,c", [(3, 150, 37), (2, 64, 64), (1, 70, 1)])
def test_assignment_and_sums_match_float64(s, n, c):
    kmeans_assign = _assign()
    g = torch.Generator().manual_seed(s * 1000 + n + c)
    d = 32
    x = torch.nn.functional.normalize(torch.randn(s, n, d, generator=g), dim=-1)
    cent = torch.nn.functional.normalize(torch.randn(s, c, d, generator=g), dim=-1)
    sims = x.double() @ cent.double().transpose(1, 2)
    ref = sims.argmax(-1)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    xd, cd = x.to(DEV), cent.to(DEV)
    sums = torch.zeros(s, c, d, device=DEV)
    got = kmeans_assign(xd.to(dt), cd.to(dt), xd, sums).cpu()
    # Where the products' rounding could swap the best two centroids, either is right.
    top2 = sims.topk(min(2, c), dim=-1).values
    gap = top2[..., 0] - top2[..., -1] if c > 1 else torch.ones(s, n, dtype=torch.float64)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    picked = sims.gather(-1, got.unsqueeze(-1)).squeeze(-1)
    assert ((got == ref) | (gap < tol)).all()
    assert (sims.max(-1).values - picked <= tol).all()
    # Sums of the points by the kernel's own assignment, in float64.
    want = torch.zeros(s, c, d, dtype=torch.float64)
    for i in range(s):
        want[i].index_add_(0, got[i], x[i].double())
    err = (sums.cpu().double() - want).abs().max().item()
    assert err < 1e-5, err


def test_bad_shapes_are_refused():
    kmeans_assign = _assign()
    x = torch.zeros(2, 8, 32, device=DEV)
    with pytest.raises(ValueError, match="do not match"):
        kmeans_assign(x, torch.zeros(2, 4, 16, device=DEV))
    with pytest.raises(ValueError, match="power of two"):
        kmeans_assign(torch.zeros(2, 8, 24, device=DEV), torch.zeros(2, 4, 24, device=DEV))


def test_kmeans_with_triton_assignment_clusters_like_torch():
    """The whole k-means with the fused kernel: as good a clustering as the torch
    form (mean cosine similarity of keys to their cluster mean within 1%)."""
    _assign()
    g = torch.Generator().manual_seed(7)
    # Keys around 12 directions per problem, as real keys cluster.
    s, n, d, c = 2, 192, 32, 12
    base = torch.randn(s, c, d, generator=g)
    x = base[:, torch.randint(0, c, (n,), generator=g)] + 0.3 * torch.randn(s, n, d, generator=g)
    x = x.to(DEV)

    def quality(a):
        xn = torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=-1).cpu().double()
        a = a.cpu()
        tot = 0.0
        for i in range(s):
            m = torch.zeros(c, d, dtype=torch.float64).index_add_(0, a[i], xn[i])
            m = torch.nn.functional.normalize(m, dim=-1)
            tot += (xn[i] * m[a[i]]).sum(-1).mean().item()
        return tot / s

    xn = torch.nn.functional.normalize(x - x.mean(1, keepdim=True), dim=-1)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    a_tr = _kmeans_triton(xn.to(dt).contiguous(), c, 10).long()
    a_to = _kmeans_torch(x, c, 10)
    assert a_tr.shape == (s, n) and a_tr.min() >= 0 and a_tr.max() < c
    assert quality(a_tr) >= 0.99 * quality(a_to)


def test_sums_of_the_product_points_themselves():
    """``x_sum`` is ``x``: the kernel sums the (16-bit on GPUs) points it compared."""
    kmeans_assign = _assign()
    g = torch.Generator().manual_seed(11)
    s, n, c, d = 2, 100, 9, 16
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    x = torch.nn.functional.normalize(torch.randn(s, n, d, generator=g), dim=-1).to(dt)
    cent = torch.nn.functional.normalize(torch.randn(s, c, d, generator=g), dim=-1).to(dt)
    xd = x.to(DEV)
    sums = torch.zeros(s, c, d, device=DEV)
    got = kmeans_assign(xd, cent.to(DEV), xd, sums, int32=True).cpu()
    assert got.dtype == torch.int32
    want = torch.zeros(s, c, d, dtype=torch.float64)
    for i in range(s):
        want[i].index_add_(0, got[i].long(), x[i].double())
    assert (sums.cpu().double() - want).abs().max().item() < 1e-5


def test_centroid_update_matches_normalised_sums():
    _assign()
    from vllm_retro.kernels.triton_kmeans import kmeans_update
    g = torch.Generator().manual_seed(5)
    s, c, d = 3, 45, 32
    sums = torch.randn(s, c, d, generator=g)
    sums[0, 3] = 0.0          # an empty cluster keeps its centroid
    sums[2, 44] = 0.0
    old = torch.randn(s, c, d, generator=g)
    want = torch.nn.functional.normalize(sums.double(), dim=-1)
    want[0, 3], want[2, 44] = old[0, 3].double(), old[2, 44].double()
    cent = old.clone().to(DEV)
    sd = sums.clone().to(DEV)
    kmeans_update(sd, cent, zero=True)
    assert (cent.cpu().double() - want).abs().max().item() < 1e-6
    assert (sd == 0).all()
    sd = sums.clone().to(DEV)
    kmeans_update(sd, cent, zero=False)
    assert torch.equal(sd.cpu(), sums)


@pytest.mark.parametrize("m,nbs", [(1, 5), (3, 8)])
def test_segment_keys_are_centred_normalised_page_keys(m, nbs):
    _assign()
    from vllm_retro.kernels.triton_kmeans import segment_keys
    g = torch.Generator().manual_seed(m * 10 + nbs)
    lay = PagedIndexLayout(2, 32, 16, torch.float32)
    nb = 40
    kv = lay.make_cache(nb)
    kv.copy_(torch.randn(kv.shape, generator=g) + 0.5)   # a common offset to centre away
    blocks = torch.randperm(nb, generator=g)[:m * nbs].view(m, nbs)
    n = nbs * 16
    pos = torch.arange(n)
    want = torch.empty(m * 2, n, 32, dtype=torch.float64)
    for j in range(m):
        k = kv[blocks[j, pos // 16], :, pos % 16, :32].double()        # [n, H, D]
        for h in range(2):
            x = k[:, h] - k[:, h].mean(0)
            want[j * 2 + h] = torch.nn.functional.normalize(x, dim=-1)
    kvd = lay.make_cache(nb, DEV)   # vLLM's page layout on the device
    kvd.untyped_storage().copy_(kv.untyped_storage())
    got = segment_keys(kvd, blocks.to(DEV), 32, torch.float32).cpu().double()
    assert (got - want).abs().max().item() < 1e-5
