"""Opt-in accuracy options of the wave index (issue 16), against float64 references.

``shared_head_budget``: the layer's retrieved clusters are shared by its KV heads.
Checked: validation and the GPU refusal, the per-head counts against an
independent brute-force allocation, the output against float64 exact attention
over the chosen clusters, identity with the default for one KV head, and that a
spread head gets more clusters than a peaked one (with lower total error).

The other options of the issue have their checks below (validation, GPU support or
refusal, the public op, float64 brute force), and the named option set that combines
them (``preset "accuracy"``): expansion, overrides, clear refusals, and its error on
real SmolLM2 attention against the defaults'.
"""

import math

import pytest
import torch

from test_wave_index import SMALL, clustered_kv, peaked_query
from vllm_retro import RetroConfig, WaveIndex, full_attention
from vllm_retro.index.paged import check_config_for_paged


def _steady_lse(index, qg, scale):
    st = torch.cat([index.sink_keys, index.tail_keys], 1)
    return torch.logsumexp(torch.einsum("hgd,htd->hgt", qg, st) * scale, -1)


def _brute_counts(index, qg, scale, n_ret):
    """Independent allocation: per head the library ranking (sum over the group of
    the softmax of the cluster log-masses); claims exp(logit - total) summed over
    the group in rank order; one per head, then the largest remaining claims,
    picked one at a time in Python (ties: lower head, then better rank)."""
    lm = index.cluster_log_mass(qg, scale)                          # [H, G, C]
    lse_s = _steady_lse(index, qg, scale)
    h, g, c = lm.shape
    cands = []
    for hh in range(h):
        score = torch.softmax(lm[hh], -1).sum(0)
        order = sorted(range(c), key=lambda i: (-score[i].item(), i))
        total = [torch.logaddexp(torch.logsumexp(lm[hh, gg], 0), lse_s[hh, gg]).item()
                 for gg in range(g)]
        for r, ci in enumerate(order[1:], start=1):
            claim = sum(math.exp(lm[hh, gg, ci].item() - total[gg]) for gg in range(g))
            cands.append((-claim, hh, r))
    counts = [1] * h
    for _, hh, _ in sorted(cands)[:(n_ret - 1) * h]:
        counts[hh] += 1
    return counts


def test_shared_head_budget_validation_and_gpu_refusal():
    with pytest.raises(ValueError, match="shared_head_budget"):
        RetroConfig(shared_head_budget=1)
    with pytest.raises(ValueError, match="shared_head_budget"):
        RetroConfig(shared_head_budget=True, error_bound=0.1)
    cfg = RetroConfig.from_dict({"shared_head_budget": True})
    assert cfg.shared_head_budget and not RetroConfig().shared_head_budget
    assert any("shared_head_budget" in r for r in check_config_for_paged(cfg, 16))
    assert not any("shared_head_budget" in r for r in check_config_for_paged(RetroConfig(), 16))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_counts_match_brute_force_and_output_matches_float64(seed):
    k, v, c = clustered_kv(3, 3000, 32, n_centres=48, seed=seed)
    cfg = RetroConfig(retrieval_fraction=0.05, estimation_fraction=0.0,
                      min_retrieval_tokens=0, shared_head_budget=True, **SMALL)
    index = WaveIndex.build(k, v, cfg)
    q = peaked_query(c, 2, seed=50 + seed, sharp=0.4)
    # Make head 0's attention flat so that the allocation is uneven.
    q[:2] *= 0.05
    scale = 1 / math.sqrt(32)
    qg = q.reshape(3, 2, 32)
    n_ret, _ = index.budget()
    sel = index.select_clusters(qg, scale, _steady_lse(index, qg, scale))
    counts = sel.k_retrieved.tolist()
    assert counts == _brute_counts(index, qg, scale, n_ret)
    assert sum(counts) == n_ret * 3 and min(counts) >= 1 and len(set(counts)) > 1
    # Output: float64 exact attention over sinks, tail and each head's top-k clusters.
    out = index.attend(q, scale)
    cid = index.cluster_ids()
    ref = torch.empty_like(out)
    for hh in range(3):
        keep = sel.retrieved[hh, :counts[hh]]
        tok = torch.isin(cid[hh], keep)
        kk = torch.cat([index.sink_keys[hh], index.keys[hh][tok], index.tail_keys[hh]])
        vv = torch.cat([index.sink_values[hh], index.values[hh][tok], index.tail_values[hh]])
        for gg in range(2):
            p = torch.softmax(kk @ q[2 * hh + gg] * scale, 0)
            ref[2 * hh + gg] = p @ vv
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert abs(index.last_stats.clusters_retrieved - n_ret) < 1e-12


def test_shared_equals_default_with_one_kv_head():
    k, v, c = clustered_kv(1, 2500, 32, seed=5)
    base = dict(retrieval_fraction=0.04, min_retrieval_tokens=0, **SMALL)
    a = WaveIndex.build(k, v, RetroConfig(**base))
    b = WaveIndex.build(k, v, RetroConfig(shared_head_budget=True, **base))
    for s in range(3):
        q = peaked_query(c, 4, seed=s, sharp=0.5)
        torch.testing.assert_close(a.attend(q), b.attend(q), rtol=0, atol=0)


def test_shared_budget_moves_clusters_to_the_spread_head():
    """Head 0's queries attend one centre sharply, head 1's are spread over many:
    at the same total budget the spread head gets more clusters and the summed
    error drops (measured on this data: 0.88x of the per-head budget's)."""
    k, v, c = clustered_kv(2, 6000, 64, n_centres=96, noise=0.3, seed=9)
    base = dict(segment_size=2048, retrieval_fraction=0.03, min_retrieval_tokens=0)
    per_head = WaveIndex.build(k, v, RetroConfig(**base))
    shared = WaveIndex.build(k, v, RetroConfig(shared_head_budget=True, **base))
    e_ph = e_sh = 0.0
    for s in range(3):
        q = peaked_query(c, 2, seed=60 + s, sharp=2.0)
        q[2:] = peaked_query(c, 2, seed=90 + s, sharp=0.3)[2:]
        ref = full_attention(q, k, v)
        e_ph += ((per_head.attend(q) - ref).norm(dim=-1) / ref.norm(dim=-1)).sum().item()
        e_sh += ((shared.attend(q) - ref).norm(dim=-1) / ref.norm(dim=-1)).sum().item()
        qg = q.reshape(2, 2, 64)
        sel = shared.select_clusters(qg, 1 / 8.0, _steady_lse(shared, qg, 1 / 8.0))
        assert sel.k_retrieved[1] > sel.k_retrieved[0]
        assert sel.k_retrieved.sum().item() == 2 * shared.budget()[0]
    assert e_sh < 0.95 * e_ph, (e_sh, e_ph)


def test_public_op_honours_shared_head_budget():
    """``ops.decode_attention`` (what the vLLM CPU backend calls) gives the shared
    budget's output, not the per-head default's."""
    from vllm_retro.ops import decode_attention
    k, v, c = clustered_kv(3, 3000, 32, n_centres=48, seed=4)
    cfg = RetroConfig(retrieval_fraction=0.05, estimation_fraction=0.1,
                      min_retrieval_tokens=0, shared_head_budget=True, **SMALL)
    shared = WaveIndex.build(k, v, cfg)
    per_head = WaveIndex.build(k, v, RetroConfig(retrieval_fraction=0.05,
                                                 estimation_fraction=0.1,
                                                 min_retrieval_tokens=0, **SMALL))
    q = peaked_query(c, 2, seed=54, sharp=0.4)
    q[:2] *= 0.05   # an uneven allocation, so the two budgets differ
    scale = 1 / math.sqrt(32)
    want = shared.attend(q, scale)
    got = decode_attention(shared, q, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(decode_attention(per_head, q, scale), want, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------
# ``variance_cap`` and ``bound_margin`` (issue 16): validation, GPU refusal, the C++
# kernel against the reference, and the one-sided bound's guarantees.

def _true_outside(index, q, scale):
    """[H, G] true softmax mass (real keys, float64) outside the exact set the
    index selects for ``q``, and the per-head exact-set sizes."""
    h = index.num_kv_heads
    qg = q.reshape(h, -1, index.head_dim).double()
    sel = index.select_clusters(qg, scale, _steady_lse(index, qg, scale))
    retrieved = torch.zeros_like(index.sizes, dtype=torch.bool)
    retrieved.scatter_(1, sel.retrieved, sel.retrieved_valid)
    tok_in = torch.gather(retrieved, 1, index.cluster_ids())
    logits = torch.einsum("hgd,htd->hgt", qg, index.keys.double()) * scale
    lse_all = torch.logaddexp(torch.logsumexp(logits, -1), _steady_lse(index, qg, scale))
    out = (torch.exp(logits - lse_all.unsqueeze(-1)) * (~tok_in).unsqueeze(1)).sum(-1)
    return out, sel.k_retrieved


def test_variance_cap_and_bound_margin_validation_and_gpu_refusal():
    for bad in (-0.1, float("nan"), 51.0, "1", True):
        with pytest.raises(ValueError, match="variance_cap"):
            RetroConfig(variance_cap=bad)
    for bad in (-0.5, 21.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="bound_margin"):
            RetroConfig(error_bound=0.1, bound_margin=bad)
    # Another margin than the default without the bounded mode is a mistake.
    with pytest.raises(ValueError, match="bound_margin.*error_bound"):
        RetroConfig(bound_margin=1.0)
    cfg = RetroConfig.from_dict({"variance_cap": 1.0, "error_bound": 0.1,
                                 "bound_margin": None})
    assert (cfg.variance_cap, cfg.bound_margin) == (1.0, None)
    # The bounded mode's defaults: the one-sided estimate, the exact set capped at half.
    assert (RetroConfig().variance_cap, RetroConfig().bound_margin,
            RetroConfig().max_retrieval_fraction) == (2.0, 0.5, 0.5)
    # The GPU kernels take the cap (tests/kernels/test_paged_decode_attention.py).
    assert check_config_for_paged(RetroConfig(variance_cap=1.0), 16) == []


def test_bound_margin_leaves_the_fixed_budget_mode_alone():
    """Without ``error_bound`` the margin is not used: the fixed-budget mode gives
    the same output and exact set with the default margin or none (another value is
    refused there); with ``error_bound`` each larger margin grows the exact set
    (reference and C++ op equal throughout)."""
    from vllm_retro.ops import decode_attention, has_extension
    k, v, c = clustered_kv(3, 2600, 32, n_centres=40, noise=0.6, seed=23)
    q = peaked_query(c, 2, seed=91, sharp=0.6)
    for bounded in (False, True):
        outs, ks = [], []
        for margin in (None, 0.5, 4.0):
            extra = dict(error_bound=0.02) if bounded else {}
            if margin == 4.0 and not bounded:   # refused there: read at the default
                margin = 0.5
            index = WaveIndex.build(k, v, RetroConfig(bound_margin=margin, **extra, **SMALL))
            outs.append(index.attend(q))
            ks.append(index.last_stats.clusters_retrieved)
            if has_extension():
                got = decode_attention(index, q)
                assert ((got - outs[-1]).norm() / outs[-1].norm()).item() < 1e-10
        if bounded:
            assert ks[0] < ks[1] < ks[2], ks   # each margin reads more
        else:
            assert ks[0] == ks[1] == ks[2]
            assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_variance_cap_and_bound_margin_kernel_matches_reference(dtype):
    """The C++ op (``ops.decode_attention``) equals the torch reference with a
    non-default variance cap (fixed and bounded modes) and with the one-sided
    bound; the options change the result."""
    from vllm_retro.ops import decode_attention, has_extension
    if not has_extension():
        pytest.skip("vllm_retro._C not built")
    k, v, c = clustered_kv(3, 2600, 32, n_centres=40, noise=0.6, seed=21)
    base = WaveIndex.build(k.to(dtype), v.to(dtype), RetroConfig(**SMALL))
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    cfgs = [dict(variance_cap=0.0), dict(variance_cap=0.7), dict(variance_cap=6.0),
            dict(error_bound=0.05, max_retrieval_fraction=0.5, variance_cap=1.0,
                 bound_margin=None),
            dict(error_bound=0.05, max_retrieval_fraction=0.5, bound_margin=0.0),
            dict(error_bound=0.01, max_retrieval_fraction=0.5, bound_margin=0.5)]
    for i, ch in enumerate(cfgs):
        index = WaveIndex.build(k.to(dtype), v.to(dtype), RetroConfig(**SMALL, **ch))
        for group in (1, 3):
            q = peaked_query(c, group, seed=70 + i, sharp=0.6).to(dtype)
            want = index.attend(q)
            k_ref = index.last_stats.clusters_retrieved
            got = decode_attention(index, q)
            assert index.last_stats.clusters_retrieved == k_ref
            assert ((got - want).norm() / want.norm()).item() < tol
            if ch.get("variance_cap", 2.0) < 1.0:   # below most clusters' term
                assert not torch.allclose(got.double(), base.attend(q).double(), atol=1e-6)


def test_one_sided_outside_dominates_the_mean_estimate():
    """For every exact-set size k the one-sided outside mass is at least the mean
    estimate's (inside at the Jensen lower bound, outside uncapped + margin), and it
    grows with the margin, so the exact set only grows."""
    k, v, c = clustered_kv(2, 4000, 32, n_centres=48, noise=0.6, seed=31)
    scale = 1 / math.sqrt(32)
    mean = WaveIndex.build(k, v, RetroConfig(error_bound=0.02, bound_margin=None, **SMALL))
    for s in range(4):
        q = peaked_query(c, 2, seed=80 + s, sharp=0.5)
        qg = q.reshape(2, 2, 32)
        lse_s = _steady_lse(mean, qg, scale)
        logits = mean.cluster_log_mass(qg, scale)
        order = torch.argsort(torch.softmax(logits, -1).sum(1), dim=1, descending=True,
                              stable=True)
        lg = torch.gather(logits, 2, order.unsqueeze(1).expand_as(logits))
        total = torch.logaddexp(torch.logsumexp(lg, -1), lse_s)
        est = (1 - torch.exp(lse_s - total).unsqueeze(-1)
               - torch.cumsum(torch.exp(lg - total.unsqueeze(-1)), -1))
        prev_out, prev_k = est, mean.select_clusters(qg, scale, lse_s).k_retrieved
        for margin in (0.0, 0.5, 2.0):
            mean.config = RetroConfig(error_bound=0.02, bound_margin=margin, **SMALL)
            out = mean._one_sided_outside(qg, scale, order, lse_s)
            assert (out >= prev_out - 1e-12).all()
            k_now = mean.select_clusters(qg, scale, lse_s).k_retrieved
            assert (k_now >= prev_k).all()
            prev_out, prev_k = out, k_now
        assert (prev_k > mean.budget()[0]).any()
        mean.config = RetroConfig(error_bound=0.02, bound_margin=None, **SMALL)


def test_one_sided_bound_holds_on_true_mass_where_the_mean_estimate_fails():
    """Wide clusters (keys with large spread around their centres): the mean
    estimate of the outside mass misses the bound for some query heads, the
    one-sided estimate (margin 0.5) keeps the TRUE outside mass within it for all."""
    k, v, c = clustered_kv(2, 6000, 64, n_centres=64, noise=1.0, seed=41)
    scale = 1 / 8.0
    eps = 0.05
    base = dict(segment_size=2048, error_bound=eps, max_retrieval_fraction=1.0)
    mean = WaveIndex.build(k, v, RetroConfig(bound_margin=None, **base))
    one = WaveIndex.build(k, v, RetroConfig(**base))   # the default margin, 0.5
    worst_mean, worst_one = [], []
    for s in range(6):
        q = peaked_query(c, 2, seed=300 + s, sharp=0.5)
        worst_mean.append(_true_outside(mean, q, scale)[0].max().item())
        t, k_one = _true_outside(one, q, scale)
        worst_one.append(t.max().item())
        assert k_one.max().item() < one.num_clusters
    assert max(worst_one) <= eps, worst_one
    assert max(worst_mean) > eps, worst_mean


# ---------------------------------------------------------------------------------
# ``kmeans_value_weight`` (issue 16): k-means over [key, weight * value].

def _within_cluster_var(index, which):
    """Size-weighted mean over clusters of the per-channel variance of ``which``
    ("keys" or "values") around the cluster mean."""
    x = getattr(index, which).double()
    cid = index.cluster_ids()
    h, c, d = index.num_kv_heads, index.num_clusters, index.head_dim
    sums = torch.zeros(h, c, d, dtype=torch.float64).scatter_add_(
        1, cid.unsqueeze(-1).expand(-1, -1, d), x)
    means = sums / index.sizes.clamp_min(1).unsqueeze(-1)
    dev = x - torch.gather(means, 1, cid.unsqueeze(-1).expand(-1, -1, d))
    return (dev * dev).sum(-1).mean().item()


def test_kmeans_value_weight_validation_and_gpu_support():
    from vllm_retro.kmeans import spherical_kmeans
    for bad in (-0.1, 10.5, float("nan"), "1", True):
        with pytest.raises(ValueError, match="kmeans_value_weight"):
            RetroConfig(kmeans_value_weight=bad)
    assert RetroConfig().kmeans_value_weight == 0.0
    cfg = RetroConfig.from_dict({"kmeans_value_weight": 0.7})
    assert cfg.kmeans_value_weight == 0.7
    # The GPU index build clusters keys with values too (tests/test_paged_index.py).
    assert check_config_for_paged(cfg, 16) == []
    with pytest.raises(ValueError, match="values"):
        spherical_kmeans(torch.randn(2, 64, 8), 4, 2, value_weight=0.5)


def test_kmeans_value_weight_groups_values_and_keeps_decode_exact():
    """Values drawn from 4 centres independently of the key clusters: weighting the
    values into the clustered points lowers the within-cluster value spread (so a
    cluster's mean value is a better stand-in); weight 0 is the keys-only index,
    bit for bit; and with every cluster retrieved the output is exact attention."""
    k, _, c = clustered_kv(2, 2600, 32, n_centres=24, noise=0.25, seed=61)
    g = torch.Generator().manual_seed(62)
    v_centres = torch.randn(2, 4, 32, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 4, (2, 2600), generator=g)
    v = torch.gather(v_centres, 1, pick.unsqueeze(-1).expand(-1, -1, 32)) + \
        0.1 * torch.randn(2, 2600, 32, generator=g, dtype=torch.float64)
    base = dict(retrieval_fraction=0.05, min_retrieval_tokens=0, **SMALL)
    keys_only = WaveIndex.build(k, v, RetroConfig(**base))
    zero = WaveIndex.build(k, v, RetroConfig(kmeans_value_weight=0.0, **base))
    joint = WaveIndex.build(k, v, RetroConfig(kmeans_value_weight=1.0, **base))
    assert torch.equal(keys_only.positions, zero.positions)
    assert _within_cluster_var(joint, "values") < 0.5 * _within_cluster_var(keys_only,
                                                                              "values")
    joint.config = joint.config.replace(retrieval_fraction=1.0, estimation_fraction=0.0)
    q = peaked_query(c, 2, seed=62, sharp=0.5)
    torch.testing.assert_close(joint.attend(q), full_attention(q, k, v),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------
# ``value_correction`` (issue 16): the rank-1 key-value cross-covariance of each
# cluster corrects the value an estimated cluster stands for.

def test_value_correction_validation_gpu_layout_and_public_op():
    """Validated as a bool; accepted by the GPU path (its layout gets the two extra
    float rows per index page); ``ops.decode_attention`` (the vLLM CPU backend's
    entry: the C++ kernel, or the reference without the extension) gives the
    reference's corrected output (float64: within 1e-12)."""
    from vllm_retro.ops import decode_attention
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match="value_correction"):
            RetroConfig(value_correction=bad)
    cfg = RetroConfig.from_dict({"value_correction": True})
    assert cfg.value_correction and not RetroConfig().value_correction
    assert not any("value_correction" in r for r in check_config_for_paged(cfg, 16))
    from vllm_retro.backend.gpu import PagedIndexManager
    mgr = PagedIndexManager.__new__(PagedIndexManager)
    for c, slots in ((cfg, 5), (RetroConfig(), 3)):
        mgr.config = c
        lay = mgr.layout_for(2, 32, torch.bfloat16, 16)
        assert lay.float_slots == slots and lay.value_correction == (slots == 5)
        assert lay.float_bytes == 2 * slots * 32 * 2
    k, v, c = clustered_kv(2, 1500, 32, n_centres=30, seed=71)
    base = dict(retrieval_fraction=0.05, estimation_fraction=0.5, min_retrieval_tokens=0,
                **SMALL)
    on = WaveIndex.build(k, v, RetroConfig(value_correction=True, **base))
    off = WaveIndex.build(k, v, RetroConfig(**base))
    q = peaked_query(c, 3, seed=72, sharp=0.3)
    want = on.attend(q)
    torch.testing.assert_close(decode_attention(on, q, None), want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(off.attend(q), want, rtol=0, atol=1e-9)
    # Turned on over clusters built without it: refused, not silently uncorrected.
    off.config = off.config.replace(value_correction=True)
    with pytest.raises(ValueError, match="value_correction"):
        off.attend(q)


def test_value_correction_factors_are_the_leading_singular_pair():
    """``sigma u w^T`` of every cluster equals the best rank-1 approximation of its
    cross-covariance, computed here cluster by cluster from the clustered tokens."""
    k, v, _ = clustered_kv(2, 700, 16, n_centres=12, seed=73)
    idx = WaveIndex.build(k, v, RetroConfig(value_correction=True, **SMALL))
    assert idx.kv_u.shape == idx.centroids.shape == idx.kv_w.shape
    for h in range(2):
        for ci in range(idx.num_clusters):
            s, n = idx.starts[h, ci].item(), idx.sizes[h, ci].item()
            got = torch.outer(idx.kv_u[h, ci], idx.kv_w[h, ci])
            if n < 2:
                assert torch.count_nonzero(got) == 0
                continue
            kk, vv = idx.keys[h, s:s + n], idx.values[h, s:s + n]
            x = (kk - kk.mean(0)).T @ (vv - vv.mean(0)) / n
            uu, sv, vh = torch.linalg.svd(x)
            torch.testing.assert_close(got, sv[0] * torch.outer(uu[:, 0], vh[0]),
                                       rtol=1e-9, atol=1e-9)


def test_value_correction_recovers_values_linear_in_keys():
    """Values that vary along one key direction inside each cluster: the estimated
    clusters' mean values miss that, the corrected ones recover most of it (error
    against float64 dense attention at least halved); with no cluster estimated
    the option changes nothing, bit for bit."""
    k, _, c = clustered_kv(2, 2000, 32, n_centres=40, noise=0.15, seed=74)
    g = torch.Generator().manual_seed(75)
    a = torch.randn(2, 1, 32, generator=g, dtype=torch.float64)
    w0 = torch.randn(2, 1, 32, generator=g, dtype=torch.float64)
    v = 0.3 * torch.randn(2, 40, 32, generator=g, dtype=torch.float64)
    near = torch.einsum("htd,hcd->htc", k, c).argmax(-1)   # the centre of each key
    dev = k - torch.gather(c, 1, near.unsqueeze(-1).expand(-1, -1, 32))
    v = torch.gather(v, 1, near.unsqueeze(-1).expand(-1, -1, 32)) + \
        4.0 * (dev * a).sum(-1, keepdim=True) * w0
    base = dict(retrieval_fraction=0.02, estimation_fraction=0.6, min_retrieval_tokens=0,
                **SMALL)
    on = WaveIndex.build(k, v, RetroConfig(value_correction=True, **base))
    off = WaveIndex.build(k, v, RetroConfig(**base))
    q = peaked_query(c, 2, seed=76, sharp=0.15) + 2.0 * a.repeat_interleave(2, 0)[:, 0]
    ref = full_attention(q, k, v)
    err = lambda o: ((o - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item()
    e_on, e_off = err(on.attend(q)), err(off.attend(q))
    assert e_on < 0.5 * e_off, (e_on, e_off)
    for idx in (on, off):
        idx.config = idx.config.replace(estimation_fraction=0.0)
    torch.testing.assert_close(on.attend(q), off.attend(q), rtol=0, atol=0)


# ---------------------------------------------------------------------------------
# ``retrieval_rank`` (issue 16, fifth pass): inside the candidate band (the top
# ``n_ret + n_est`` clusters by estimated mass) the exact set is the ``n_ret``
# clusters with the largest expected estimation error instead of the largest mass.

ERROR_RANKS = ("error", "error_value")


def test_retrieval_rank_validation_gpu_refusal_and_public_op():
    """Validated against its allowed values and the bounded mode; "error_value"
    refused by the GPU path ("error" runs there: its kernels' tests are in
    tests/kernels); ``ops.decode_attention`` gives the reference's output (the C++
    kernel runs "error", float64 within 1e-12; "error_value" falls back to the
    reference)."""
    from vllm_retro.ops import decode_attention
    for bad in ("Error", "errors", "", 1, None, True, "mass "):
        with pytest.raises(ValueError, match="retrieval_rank"):
            RetroConfig(retrieval_rank=bad)
    with pytest.raises(ValueError, match="retrieval_rank"):
        RetroConfig(retrieval_rank="error", error_bound=0.1)
    RetroConfig(retrieval_rank="mass", error_bound=0.1)
    assert RetroConfig().retrieval_rank == "mass"
    for rr in ERROR_RANKS:
        cfg = RetroConfig.from_dict({"retrieval_rank": rr})
        assert cfg.retrieval_rank == rr
        assert any("retrieval_rank" in r for r in check_config_for_paged(cfg, 16)) == (
            rr == "error_value")
    assert not any("retrieval_rank" in r for r in check_config_for_paged(RetroConfig(), 16))
    k, v, c = clustered_kv(2, 1500, 32, n_centres=30, seed=81)
    base = dict(retrieval_fraction=0.05, estimation_fraction=0.3, min_retrieval_tokens=0,
                **SMALL)
    q = peaked_query(c, 3, seed=82, sharp=0.3)
    mass = WaveIndex.build(k, v, RetroConfig(**base)).attend(q)
    for rr in ("error", "error_value"):
        idx = WaveIndex.build(k, v, RetroConfig(retrieval_rank=rr, **base))
        want = idx.attend(q)
        torch.testing.assert_close(decode_attention(idx, q, None), want, rtol=1e-12,
                                   atol=1e-12)
        assert not torch.allclose(want, mass, rtol=0, atol=1e-9)
    # The value spread is stored at build: turned on afterwards it is refused.
    idx = WaveIndex.build(k, v, RetroConfig(**base))
    idx.config = idx.config.replace(retrieval_rank="error_value")
    with pytest.raises(ValueError, match="error_value"):
        idx.attend(q)


def _brute_error_selection(index, q, scale, rr):
    """Independent float64 selection, cluster by cluster in Python: log-masses from
    the summaries, the mass ranking (softmax over clusters summed over the group,
    ties by cluster id), the band, the error proxy from the clusters' real values
    (value spread and mean value recomputed from the stored tokens), and the exact
    set. Returns per head (band sorted by error, {id: (-error, mass rank)}, mass
    order), n_ret and the band size."""
    h, g = index.num_kv_heads, q.shape[0] // index.num_kv_heads
    cap = index.config.variance_cap
    n_ret, n_est = index.budget()
    c = index.num_clusters
    band = min(c, n_ret + n_est)
    st_k = torch.cat([index.sink_keys, index.tail_keys], 1)
    st_v = torch.cat([index.sink_values, index.tail_values], 1)
    heads = []
    for hh in range(h):
        lm, tt = [[0.0] * c for _ in range(g)], [[0.0] * c for _ in range(g)]
        for gg in range(g):
            qq = q[hh * g + gg].double()
            for ci in range(c):
                n = int(index.sizes[hh, ci])
                t = 0.5 * scale * scale * float((qq * qq * index.key_vars[hh, ci]).sum())
                lm[gg][ci] = (math.log(n) + scale * float(qq @ index.centroids[hh, ci])
                              + min(t, cap)) if n else -math.inf
                tt[gg][ci] = t
        score = [sum(math.exp(lm[gg][ci] - max(lm[gg])) /
                     sum(math.exp(x - max(lm[gg])) for x in lm[gg]) for gg in range(g))
                 for ci in range(c)]
        order = sorted(range(c), key=lambda ci: (-score[ci], ci))
        err = {}
        for r, ci in enumerate(order[:band]):
            s, n = int(index.starts[hh, ci]), int(index.sizes[hh, ci])
            vv = index.values[hh, s:s + n].double()
            mean = vv.mean(0)
            sigma = math.sqrt(float(((vv - mean) ** 2).sum(1).mean()))
            e = 0.0
            for gg in range(g):
                qq = q[hh * g + gg].double()
                ls = torch.logsumexp(st_k[hh] @ qq * scale, 0).item()
                total = math.log(sum(math.exp(x) for x in lm[gg]) + math.exp(ls))
                m = math.exp(lm[gg][ci] - total)
                if rr == "error_value":
                    p = torch.softmax(st_k[hh] @ qq * scale, 0)
                    o, wsum = math.exp(ls - total) * (p @ st_v[hh].double()), math.exp(ls - total)
                    for cj in order[:band]:       # steady part and the band's mean values
                        sj, nj = int(index.starts[hh, cj]), int(index.sizes[hh, cj])
                        if nj:
                            o = o + math.exp(lm[gg][cj] - total) * \
                                index.values[hh, sj:sj + nj].double().mean(0)
                            wsum += math.exp(lm[gg][cj] - total)
                    d = float((mean - o / wsum).norm())
                    e += m * (tt[gg][ci] * d + math.sqrt(2 * tt[gg][ci]) * sigma)
                else:
                    e += m * tt[gg][ci]
            err[ci] = (-e, r)
        heads.append((sorted(order[:band], key=lambda ci: err[ci]), err, order))
    return heads, n_ret, band


@pytest.mark.parametrize("seed,rr", [(0, "error"), (1, "error_value"), (2, "error"),
                                     (4, "error_value"), (5, "error_value")])
def test_error_rank_matches_brute_force_float64(seed, rr):
    """On fresh random clustered KV and queries, the exact and estimated sets equal
    an independent float64 brute force, and the output equals float64 attention
    over sinks, tail and the exact clusters merged with the estimate of the rest of
    the band, computed cluster by cluster."""
    k, v, c = clustered_kv(2, 1400, 16, n_centres=24, noise=0.4, seed=100 + seed)
    cfg = RetroConfig(retrieval_fraction=0.06, estimation_fraction=0.25,
                      min_retrieval_tokens=0, retrieval_rank=rr, **SMALL)
    index = WaveIndex.build(k, v, cfg)
    q = peaked_query(c, 2, seed=200 + seed, sharp=0.3)
    scale = 0.25
    qg = q.reshape(2, 2, 16)
    brute, n_ret, band = _brute_error_selection(index, q, scale, rr)
    heads = [b[0] for b in brute]
    sel = index.select_clusters(qg, scale, _steady_lse(index, qg, scale))
    for hh in range(2):
        got_r = set(sel.retrieved[hh][sel.retrieved_valid[hh]].tolist())
        got_e = set(sel.estimated[hh][sel.estimated_valid[hh]].tolist())
        assert got_r == set(heads[hh][:n_ret])
        assert got_e == set(heads[hh][n_ret:band])
        # Same band as the mass ranking: exact + estimated cover its top n_ret + n_est.
        assert got_r | got_e == set(brute[hh][2][:band])
    # ... but a different exact set on at least one head.
    assert any(set(heads[hh][:n_ret]) != set(brute[hh][2][:n_ret]) for hh in range(2))
    out = index.attend(q, scale)
    ref = torch.empty_like(out)
    for hh in range(2):
        parts_o, parts_l = [], []
        kk = [index.sink_keys[hh], index.tail_keys[hh]]
        vv = [index.sink_values[hh], index.tail_values[hh]]
        for ci in heads[hh][:n_ret]:
            s, n = int(index.starts[hh, ci]), int(index.sizes[hh, ci])
            kk.append(index.keys[hh, s:s + n])
            vv.append(index.values[hh, s:s + n])
        kk, vv = torch.cat(kk), torch.cat(vv)
        for gg in range(2):
            qq = q[2 * hh + gg]
            logits = [kk @ qq * scale]
            vals = [vv]
            for ci in heads[hh][n_ret:band]:
                n = int(index.sizes[hh, ci])
                t = 0.5 * scale * scale * float((qq * qq * index.key_vars[hh, ci]).sum())
                logits.append(torch.tensor([math.log(n) + scale * float(
                    qq @ index.centroids[hh, ci]) + min(t, cfg.variance_cap)],
                    dtype=torch.float64))
                vals.append((index.value_sums[hh, ci] / n).unsqueeze(0))
            p = torch.softmax(torch.cat(logits), 0)
            ref[2 * hh + gg] = p @ torch.cat(vals)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed,rr", [(5, "error"), (6, "error_value")])
def test_error_rank_shared_budget_counts_match_brute_force(seed, rr):
    """With ``shared_head_budget`` the layer's ``n_ret * H`` exact clusters go to
    every head's top error proxy plus the largest other proxies of the heads'
    bands (picked here one at a time in Python); the band stays the mass band, so
    every head's exact + estimated clusters are its top ``n_ret + n_est``."""
    k, v, c = clustered_kv(3, 1400, 16, n_centres=24, noise=0.4, seed=100 + seed)
    cfg = RetroConfig(retrieval_fraction=0.06, estimation_fraction=0.25,
                      min_retrieval_tokens=0, retrieval_rank=rr, shared_head_budget=True,
                      **SMALL)
    index = WaveIndex.build(k, v, cfg)
    q = peaked_query(c, 2, seed=300 + seed, sharp=0.3)
    q[:2] *= 0.1                          # head 0 flat: the allocation is uneven
    scale = 0.25
    qg = q.reshape(3, 2, 16)
    brute, n_ret, band = _brute_error_selection(index, q, scale, rr)
    cands = sorted((brute[hh][1][ci][0], hh, i) for hh in range(3)
                   for i, ci in enumerate(brute[hh][0][1:], 1))
    counts = [1] * 3
    for _, hh, _ in cands[:(n_ret - 1) * 3]:
        counts[hh] += 1
    sel = index.select_clusters(qg, scale, _steady_lse(index, qg, scale))
    assert sel.k_retrieved.tolist() == counts and len(set(counts)) > 1
    for hh in range(3):
        got_r = set(sel.retrieved[hh][sel.retrieved_valid[hh]].tolist())
        got_e = set(sel.estimated[hh][sel.estimated_valid[hh]].tolist())
        assert got_r == set(brute[hh][0][:counts[hh]])
        assert got_e == set(brute[hh][0][counts[hh]:band])


def test_retrieval_rank_mass_is_bit_identical_to_the_mass_ranking():
    """"mass" (the default) changes nothing: the output equals, bit for bit, the
    C++ kernel's (today's ranking, when built) and an index built with the value
    spread stored ("error_value") then switched to "mass"; the exact set is the
    prefix of the mass order. And an error rank with no estimated band (n_est 0)
    reads the same clusters as "mass", bit for bit."""
    from vllm_retro import ops
    k, v, c = clustered_kv(2, 2000, 32, n_centres=30, seed=91)
    base = dict(retrieval_fraction=0.04, estimation_fraction=0.3, min_retrieval_tokens=0,
                **SMALL)
    mass = WaveIndex.build(k, v, RetroConfig(**base))
    stored = WaveIndex.build(k, v, RetroConfig(retrieval_rank="error_value", **base))
    assert stored.value_vars.shape == mass.sizes.shape and mass.value_vars.numel() == 0
    stored.config = stored.config.replace(retrieval_rank="mass")
    for s in range(3):
        q = peaked_query(c, 2, seed=400 + s, sharp=0.4)
        want = mass.attend(q)
        torch.testing.assert_close(stored.attend(q), want, rtol=0, atol=0)
        if ops.has_extension():
            torch.testing.assert_close(ops.decode_attention(mass, q, None), want,
                                       rtol=1e-12, atol=1e-12)
        qg = q.reshape(2, 2, 32)
        sel = mass.select_clusters(qg, 1 / math.sqrt(32),
                                   _steady_lse(mass, qg, 1 / math.sqrt(32)))
        lm = mass.cluster_log_mass(qg, 1 / math.sqrt(32))
        order = torch.argsort(torch.softmax(lm, -1).sum(1), dim=1, descending=True,
                              stable=True)
        assert torch.equal(sel.retrieved, order)
        n_ret, _ = mass.budget()
        assert sel.retrieved_valid.sum(1).tolist() == [n_ret, n_ret]
    no_band = dict(base, estimation_fraction=0.0)
    a = WaveIndex.build(k, v, RetroConfig(**no_band))
    b = WaveIndex.build(k, v, RetroConfig(retrieval_rank="error", **no_band))
    q = peaked_query(c, 2, seed=499, sharp=0.4)
    torch.testing.assert_close(b.attend(q), a.attend(q), rtol=0, atol=0)


def test_cluster_value_vars_match_the_tokens():
    """The stored value spread is the mean squared deviation of each cluster's
    values from its mean value, recomputed here cluster by cluster."""
    k, v, _ = clustered_kv(2, 900, 16, n_centres=12, seed=95)
    idx = WaveIndex.build(k, v, RetroConfig(retrieval_rank="error_value", **SMALL))
    assert idx.value_vars.shape == idx.sizes.shape
    for h in range(2):
        for ci in range(idx.num_clusters):
            s, n = idx.starts[h, ci].item(), idx.sizes[h, ci].item()
            vv = idx.values[h, s:s + n]
            want = ((vv - vv.mean(0)) ** 2).sum(1).mean() if n else torch.tensor(0.0)
            torch.testing.assert_close(idx.value_vars[h, ci], want.double(),
                                       rtol=1e-10, atol=1e-12)


# --- adaptive_budget (sixth pass): per-query exact-set size from a difficulty history


def test_adaptive_budget_validation_gpu_refusal_and_public_op():
    """Validated as a number in [0, 1] and against the bounded mode; refused by the
    GPU path; ``ops.decode_attention`` runs the reference for it."""
    from vllm_retro.ops import decode_attention
    for bad in (-0.1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="adaptive_budget"):
            RetroConfig(adaptive_budget=bad)
    with pytest.raises(ValueError, match="adaptive_budget"):
        RetroConfig(adaptive_budget=0.5, error_bound=0.1)
    assert RetroConfig().adaptive_budget == 0.0
    cfg = RetroConfig.from_dict({"adaptive_budget": 0.5})
    assert cfg.adaptive_budget == 0.5
    assert any("adaptive_budget" in r for r in check_config_for_paged(cfg, 16))
    assert not any("adaptive_budget" in r for r in check_config_for_paged(RetroConfig(), 16))
    k, v, c = clustered_kv(2, 1500, 32, n_centres=30, seed=83)
    base = dict(retrieval_fraction=0.05, estimation_fraction=0.3, min_retrieval_tokens=0,
                **SMALL)
    a = WaveIndex.build(k, v, RetroConfig(adaptive_budget=0.8, **base))
    b = WaveIndex.build(k, v, RetroConfig(adaptive_budget=0.8, **base))
    for s in range(4):
        q = peaked_query(c, 3, seed=84 + s, sharp=0.1 + 0.2 * s)
        torch.testing.assert_close(decode_attention(a, q, None), b.attend(q),
                                   rtol=0, atol=0)
    assert a.adaptive_history.shape == (2, 4)


def test_adaptive_budget_off_is_bit_identical_and_first_step_is_the_fixed_budget():
    """0 (the default) ignores any history: output bit-identical to an index without
    the option over a stream of queries. On, the first step (history = itself,
    percentile 1/2) reads the fixed budget, bit for bit."""
    k, v, c = clustered_kv(2, 2000, 32, n_centres=30, seed=93)
    for extra in ({}, dict(retrieval_rank="error"), dict(shared_head_budget=True)):
        base = dict(retrieval_fraction=0.04, estimation_fraction=0.3,
                    min_retrieval_tokens=0, **SMALL, **extra)
        fixed = WaveIndex.build(k, v, RetroConfig(**base))
        off = WaveIndex.build(k, v, RetroConfig(adaptive_budget=0.0, **base))
        on = WaveIndex.build(k, v, RetroConfig(adaptive_budget=0.9, **base))
        off.adaptive_history = torch.rand(2, 7, dtype=torch.float64)
        torch.testing.assert_close(on.attend(peaked_query(c, 2, seed=500, sharp=0.4)),
                                   fixed.attend(peaked_query(c, 2, seed=500, sharp=0.4)),
                                   rtol=0, atol=0)
        for s in range(5):
            q = peaked_query(c, 2, seed=501 + s, sharp=0.1 * s)
            torch.testing.assert_close(off.attend(q), fixed.attend(q), rtol=0, atol=0)


def _brute_adaptive_step(index, q, scale, rr, hist, a, shared):
    """Independent float64 adaptive sizes and exact sets of one query: the ranking
    (mass claims, or the error proxy inside the band from
    :func:`_brute_error_selection`), the signal (score summed over band ranks
    ``n_ret .. n_ret + n_est``), its mid-rank percentile among ``hist + [signal]``
    per head (Python lists), the size rule, and with ``shared`` the sum redistributed
    one cluster at a time (every head keeps one). Returns (sizes, exact sets per
    head, signals)."""
    h, g = index.num_kv_heads, q.shape[0] // index.num_kv_heads
    n_ret, n_est = index.budget()
    c = index.num_clusters
    if rr == "mass":
        qg = q.reshape(h, g, -1)
        lm = index.cluster_log_mass(qg, scale).double()
        lse_s = _steady_lse(index, qg, scale)
        ranked, scores = [], []
        for hh in range(h):
            score = torch.softmax(lm[hh], -1).sum(0)
            order = sorted(range(c), key=lambda i: (-score[i].item(), i))
            tot = [torch.logaddexp(torch.logsumexp(lm[hh, gg], 0), lse_s[hh, gg]).item()
                   for gg in range(g)]
            ranked.append(order)
            scores.append([sum(math.exp(lm[hh, gg, ci].item() - tot[gg]) for gg in range(g))
                           for ci in order])
        k_max, lo, hi = c, n_ret, n_ret + n_est
    else:
        brute, n_ret, band = _brute_error_selection(index, q, scale, rr)
        ranked = [b[0] for b in brute]
        scores = [[-b[1][ci][0] for ci in b[0]] for b in brute]
        k_max, lo, hi = band, n_ret, band
    sig, sizes = [], []
    for hh in range(h):
        s = sum(scores[hh][lo:hi])
        hs = hist[hh] + [s]
        p = (sum(x < s for x in hs) + 0.5 * sum(x == s for x in hs)) / len(hs)
        sizes.append(min(max(1, math.floor(n_ret * (1 + a * (2 * p - 1)) + 0.5)), k_max))
        sig.append(s)
    if shared:
        total = sum(sizes)
        cands = sorted((-scores[hh][r], hh, r) for hh in range(h)
                       for r in range(1, len(scores[hh]) if rr == "mass" else k_max))
        sizes = [1] * h
        for _, hh, _ in cands[:total - h]:
            sizes[hh] += 1
    return sizes, [set(ranked[hh][:sizes[hh]]) for hh in range(h)], sig


@pytest.mark.parametrize("rr,shared,a", [("mass", False, 0.5), ("mass", True, 0.9),
                                         ("error", False, 0.9), ("error", True, 0.5),
                                         ("error_value", False, 0.7)])
def test_adaptive_sizes_match_brute_force_float64(rr, shared, a):
    """Over a stream of fresh random queries (sharp and flat mixed), every step's
    exact-set sizes and sets equal the float64 brute force with its own Python
    history; the sizes vary, stay in [n_ret (1 - a), n_ret (1 + a)] rounded (per head
    without ``shared``), and their mean over the stream is the fixed budget's to
    within one cluster; the history holds the signals."""
    h = 3 if shared else 2
    k, v, c = clustered_kv(h, 1400, 16, n_centres=24, noise=0.4, seed=700)
    cfg = RetroConfig(retrieval_fraction=0.08, estimation_fraction=0.25,
                      min_retrieval_tokens=0, retrieval_rank=rr, shared_head_budget=shared,
                      adaptive_budget=a, **SMALL)
    index = WaveIndex.build(k, v, cfg)
    n_ret, _ = index.budget()
    scale = 0.25
    hist = [[] for _ in range(h)]
    seen = []
    for step in range(12):
        q = peaked_query(c, 2, seed=800 + step, sharp=0.05 + 0.1 * (step % 5))
        if step % 3 == 0:
            q[:2] *= 0.2                          # a flat head now and then
        qg = q.reshape(h, 2, 16)
        sizes, sets, sig = _brute_adaptive_step(index, q, scale, rr, hist, a, shared)
        out = index.attend(q, scale)
        sel = index.select_clusters(qg, scale, _steady_lse(index, qg, scale))
        assert sel.k_retrieved.tolist() == sizes, step
        for hh in range(h):
            assert set(sel.retrieved[hh][sel.retrieved_valid[hh]].tolist()) == sets[hh]
            hist[hh] = (hist[hh] + [sig[hh]])[-64:]
            if not shared:
                assert (math.floor(n_ret * (1 - a) + 0.5) <= sizes[hh]
                        <= math.floor(n_ret * (1 + a) + 0.5))
        assert index.adaptive_history.shape == (h, step + 1)
        torch.testing.assert_close(index.adaptive_history,
                                   torch.tensor(hist, dtype=torch.float64),
                                   rtol=1e-9, atol=1e-15)
        seen += sizes
        assert torch.isfinite(out).all()
    assert len(set(seen)) > 1
    assert abs(sum(seen) / len(seen) - n_ret) <= 1.0


def test_rest_estimate_validation_gpu_refusal_and_public_op():
    """Validated as a weight in [0, 1]; refused by the GPU path; ``ops.decode_attention``
    runs the reference for it; with nothing skipped it changes nothing."""
    from vllm_retro.ops import decode_attention
    for bad in (-0.1, 1.5, float("nan"), True, "yes", None):
        with pytest.raises(ValueError, match="rest_estimate"):
            RetroConfig(rest_estimate=bad)
    cfg = RetroConfig.from_dict({"rest_estimate": 0.5})
    assert cfg.rest_estimate == 0.5 and RetroConfig().rest_estimate == 0.0
    assert any("rest_estimate" in r for r in check_config_for_paged(cfg, 16))
    assert not any("rest_estimate" in r for r in check_config_for_paged(RetroConfig(), 16))
    k, v, c = clustered_kv(2, 1500, 32, n_centres=30, seed=91)
    base = dict(retrieval_fraction=0.05, estimation_fraction=0.2, min_retrieval_tokens=0,
                **SMALL)
    on = WaveIndex.build(k, v, RetroConfig(rest_estimate=1.0, **base))
    q = peaked_query(c, 3, seed=92, sharp=0.3)
    want = on.attend(q)
    torch.testing.assert_close(decode_attention(on, q, None), want, rtol=0, atol=0)
    off = WaveIndex.build(k, v, RetroConfig(**base))
    assert not torch.allclose(off.attend(q), want, rtol=0, atol=1e-9)
    # Nothing skipped (every cluster not retrieved is estimated): no rest term.
    all_est = dict(base, estimation_fraction=0.95)
    a = WaveIndex.build(k, v, RetroConfig(rest_estimate=1.0, **all_est)).attend(q)
    b = WaveIndex.build(k, v, RetroConfig(**all_est)).attend(q)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("seed,weight", [(0, 1.0), (1, 0.5), (2, 0.25)])
def test_rest_estimate_matches_float64_brute_force(seed, weight):
    """One cluster retrieved per head, none estimated: every other cluster is in the
    rest. Brute force in float64, token by token: the sinks and tail and the
    retrieved cluster's tokens exactly, plus one pseudo-token per KV head whose mass
    is ``weight`` times the sum over the other clusters of ``size exp(s q.c +
    min(s^2/2 q^2.var, cap))`` and whose value is those clusters' tokens' mean
    value."""
    k, v, c = clustered_kv(2, 900, 16, n_centres=12, seed=100 + seed)
    k, v = k.double(), v.double()
    cfg = RetroConfig(rest_estimate=weight, retrieval_fraction=1e-9, estimation_fraction=0.0,
                      min_retrieval_tokens=0, **SMALL)
    idx = WaveIndex.build(k, v, cfg)
    q = peaked_query(c.double(), 4, seed=200 + seed, sharp=0.2)
    s = 1 / math.sqrt(16)
    got = idx.attend(q)
    h, g = idx.num_kv_heads, q.shape[0] // idx.num_kv_heads
    ids = idx.cluster_ids()
    nc = idx.num_clusters

    def logm(hh, qv, j):
        if not idx.sizes[hh, j]:
            return -math.inf
        return (math.log(idx.sizes[hh, j].item()) + s * float(qv @ idx.centroids[hh, j])
                + min(0.5 * s * s * float((qv * qv) @ idx.key_vars[hh, j]), cfg.variance_cap))

    for hh in range(h):
        lm = [[logm(hh, q[hh * g + gg], j) for j in range(nc)] for gg in range(g)]
        # The library's ranking: the GQA group's softmax over clusters, summed.
        score = [0.0] * nc
        for gg in range(g):
            z = max(lm[gg])
            tot = sum(math.exp(x - z) for x in lm[gg])
            for j in range(nc):
                score[j] += math.exp(lm[gg][j] - z) / tot
        top = max(range(nc), key=lambda j: (score[j], -j))
        for gg in range(g):
            qv = q[hh * g + gg]
            ks = [idx.sink_keys[hh], idx.tail_keys[hh], idx.keys[hh][ids[hh] == top]]
            vs = [idx.sink_values[hh], idx.tail_values[hh], idx.values[hh][ids[hh] == top]]
            kk, vv = torch.cat(ks), torch.cat(vs)
            w = [math.exp(s * float(qv @ kt)) for kt in kk]
            num = sum(wi * vt for wi, vt in zip(w, vv))
            den = sum(w)
            rest = [j for j in range(nc) if j != top and idx.sizes[hh, j]]
            mass = weight * sum(math.exp(lm[gg][j]) for j in rest)
            mean = sum(idx.values[hh][ids[hh] == j].sum(0) for j in rest) / sum(
                idx.sizes[hh, j].item() for j in rest)
            want = (num + mass * mean) / (den + mass)
            torch.testing.assert_close(got[hh * g + gg], want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ presets
def test_presets_expand_override_and_refuse_clearly():
    from vllm_retro.config import PRESETS
    acc = RetroConfig.from_dict({"preset": "accuracy"})
    assert acc == RetroConfig(**PRESETS["accuracy"])
    assert (acc.cluster_size, acc.kmeans_value_weight, acc.variance_cap,
            acc.value_correction, acc.retrieval_rank, acc.estimation_fraction) == \
        (4, 0.7, 1.0, True, "error", 0.3)
    assert RetroConfig.from_dict({"preset": "default"}) == RetroConfig()
    # Explicit options win over the preset's; the rest stays the preset's.
    mine = RetroConfig.from_dict({"preset": "accuracy", "cluster_size": 8,
                                  "segment_size": 1024})
    assert (mine.cluster_size, mine.segment_size, mine.value_correction) == (8, 1024, True)
    assert RetroConfig.from_preset("accuracy", cluster_size=8, segment_size=1024) == mine
    with pytest.raises(ValueError, match="preset must be one of"):
        RetroConfig.from_dict({"preset": "fast"})
    with pytest.raises(ValueError, match="preset must be one of"):
        RetroConfig.from_preset(None)
    with pytest.raises(ValueError, match="unknown retro option"):
        RetroConfig.from_dict({"preset": "accuracy", "cluster_sise": 8})
    # A conflict names the preset and the option that clashed with it.
    with pytest.raises(ValueError, match="preset 'accuracy'.*error_bound"):
        RetroConfig.from_dict({"preset": "accuracy", "error_bound": 0.1})
    with pytest.raises(ValueError, match="preset 'accuracy'.*cluster_size"):
        RetroConfig.from_dict({"preset": "accuracy", "cluster_size": 0})
    # What a worker reads from vLLM's additional_config.
    from types import SimpleNamespace
    from vllm_retro.worker_state import retro_config_from_vllm
    vc = SimpleNamespace(additional_config={"retro": {"preset": "accuracy",
                                                      "segment_size": 1024}})
    assert retro_config_from_vllm(vc) == RetroConfig.from_preset("accuracy",
                                                                 segment_size=1024)
    # The GPU kernels run every member; the wave buffer's one-entry-per-block layout
    # is the only refusal, with its reason.
    assert check_config_for_paged(acc, 16) == []
    reasons = check_config_for_paged(acc.replace(wave_buffer=True), 16)
    assert len(reasons) == 1 and "wave buffer" in reasons[0], reasons


def _real_errors(qkv, cfg):
    """Per query head, relative error of the host wave index's output against the
    captured model's attention output (float64 inputs), and the mean exact read."""
    errs, reads = [], []
    for layer in qkv["keys"]:
        k, v = qkv["keys"][layer].double(), qkv["values"][layer].double()
        for i, p in enumerate(qkv["query_positions"].tolist()):
            index = WaveIndex.build(k[:, :p + 1], v[:, :p + 1], cfg)
            out = index.attend(qkv["queries"][layer][i].double(), qkv["scale"])
            ref = qkv["outputs"][layer][i].double()
            errs.append((out - ref).norm(dim=-1) / ref.norm(dim=-1))
            reads.append(index.last_stats.exact_fraction)
    return torch.cat(errs), sum(reads) / len(reads)


def test_accuracy_preset_on_real_attention(real_qkv):
    """The "accuracy" preset against the defaults on real SmolLM2 attention (3
    layers, 6 queries, 9 query heads), both at 3% of clusters exact without the
    token floor (the same exact read: sinks and recent window dominate at 1.5K
    tokens). Measured: median 1.25% / p90 6.6% against 2.9% / 19%. Bounds: the
    preset's median at most 2% and its p90 at most half the default's; a preset
    whose options did not reach the index (or a broken estimate) fails both."""
    base = dict(segment_size=512, min_retrieval_tokens=0, retrieval_fraction=0.03)
    e_def, r_def = _real_errors(real_qkv, RetroConfig(**base))
    e_acc, r_acc = _real_errors(real_qkv, RetroConfig.from_preset("accuracy", **base))
    assert abs(r_acc - r_def) < 0.01, (r_acc, r_def)
    assert e_acc.median() <= 0.02, e_acc.median()
    assert e_acc.quantile(0.9) <= 0.5 * e_def.quantile(0.9), \
        (e_acc.quantile(0.9), e_def.quantile(0.9))


def test_variance_form_validation():
    """``variance_form``: "diagonal" (default) or "isotropic", the latter only with
    the 8-bit summaries that store the mean key variance; the GPU pools take it."""
    assert RetroConfig().variance_form == "diagonal"
    assert RetroConfig(variance_form="isotropic").variance_form == "isotropic"
    for bad in ("spherical", "", None, 1):
        with pytest.raises(ValueError, match="variance_form must be one of"):
            RetroConfig(variance_form=bad)
    with pytest.raises(ValueError, match="variance_form 'isotropic'.*summary_bits 8"):
        RetroConfig(variance_form="isotropic", summary_bits=16)
    cfg = RetroConfig.from_dict({"variance_form": "isotropic"})
    assert cfg.variance_form == "isotropic"
