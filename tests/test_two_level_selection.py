"""The two-level selection study (``benchmarks/two_level_selection.py``) on a random
index: the meta-clusters' summaries against a float64 recomputation from their
children, the kept set's coverage, and the restricted selection (everything kept:
the flat output; less: exact and estimated sets inside the kept children)."""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))


def _index():
    from vllm_retro import RetroConfig, WaveIndex
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 1200, 16, generator=g)
    v = torch.randn(2, 1200, 16, generator=g)
    cfg = RetroConfig(segment_size=256, update_interval=128, min_retrieval_tokens=0,
                      sink_tokens=4, recent_tokens=16)
    return WaveIndex.build(k, v, cfg), g


def test_meta_summaries_match_their_children():
    import two_level_selection as T
    idx, _ = _index()
    meta = T.meta_clusters(idx, fanout=4, block=16)
    h, c, d = idx.centroids.shape
    of = meta["of"]
    assert of.shape == (h, c) and int(of.max()) + 1 == meta["sizes"].shape[1]
    # Each block of 16 clusters has its own ceil(16 / 4) meta ids.
    assert meta["sizes"].shape[1] == sum(math.ceil(min(16, c - a) / 4) for a in range(0, c, 16))
    for hh in range(h):
        for m in range(meta["sizes"].shape[1]):
            ch = (of[hh] == m).nonzero().flatten()
            if ch.numel() == 0:
                assert meta["sizes"][hh, m] == 0
                continue
            s = idx.sizes[hh, ch].double()
            cen = idx.centroids[hh, ch].double()
            mc = (s[:, None] * cen).sum(0) / s.sum()
            var = (s[:, None] * (idx.key_vars[hh, ch].double() + (cen - mc) ** 2)).sum(0) / s.sum()
            assert meta["sizes"][hh, m].item() == s.sum().item()
            assert torch.allclose(meta["centroids"][hh, m], mc, rtol=1e-9, atol=1e-12)
            assert torch.allclose(meta["key_vars"][hh, m], var, rtol=1e-9, atol=1e-12)


def test_restricted_selection():
    import two_level_selection as T
    idx, g = _index()
    meta = T.meta_clusters(idx, fanout=4, block=16)
    q = torch.randn(4, 16, generator=g)
    scale = 0.25
    flat = idx.attend(q, scale)
    kept, scored = T.kept_clusters(idx, meta, q, scale, 1.0)
    assert kept.all()
    with T.Restricted(idx, kept) as r:
        same = idx.attend(q, scale)
    assert torch.equal(same, flat) and r.lost == 0.0
    assert "select_clusters" not in vars(idx) and "cluster_log_mass" not in vars(idx)
    kept, scored = T.kept_clusters(idx, meta, q, scale, 0.3)
    c = idx.num_clusters
    assert (kept.sum(dim=1) >= math.ceil(0.3 * c) - 1).all() and (kept.sum(dim=1) < c).all()
    n_meta = meta["sizes"].shape[1]
    assert abs(scored - (n_meta + kept.sum(dim=1).double().mean().item()) / c) < 1e-12
    seen = {}
    orig = idx.select_clusters

    with T.Restricted(idx, kept) as r:
        inner = idx.select_clusters

        def spy(*a, **kw):
            seen["sel"] = sel = inner(*a, **kw)
            return sel
        idx.select_clusters = spy
        out = idx.attend(q, scale)
        idx.select_clusters = inner
    assert idx.select_clusters == orig
    sel = seen["sel"]
    for ids, valid in ((sel.retrieved, sel.retrieved_valid), (sel.estimated, sel.estimated_valid)):
        assert torch.gather(kept, 1, ids)[valid].all()
    assert sel.retrieved_valid.any() and 0.0 <= r.lost <= 1.0
    assert torch.isfinite(out).all() and not torch.equal(out, flat)
