"""The Triton k-means assignment step (index build on GPUs) against its twin:
float64 ``argmax(x @ cent^T)`` and ``index_add_`` of the points (in Triton's CPU
interpreter without a GPU). Fresh random inputs per test, from its own seed."""

import pytest
import torch

pytest.importorskip("triton")

from vllm_retro.index.paged import _kmeans_device  # noqa: E402

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

    a_tr = _kmeans_device(x, c, 10, use_triton=True)
    a_to = _kmeans_device(x, c, 10, use_triton=False)
    assert a_tr.shape == (s, n) and a_tr.min() >= 0 and a_tr.max() < c
    assert quality(a_tr) >= 0.99 * quality(a_to)
