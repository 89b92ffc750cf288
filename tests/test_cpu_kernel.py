"""C++ CPU kernel ``torch.ops.vllm_retro.retro_decode_attention`` (via
``vllm_retro.ops.decode_attention``) against the torch reference ``WaveIndex.attend``
and float64 dense attention, on fresh random clustered inputs.

Needs the extension: ``pip install --no-build-isolation -e .``. Tolerances are
relative (``||out - ref|| / ||ref||``):
  * float64 kernel vs float64 reference: 1e-10 (measured ~1e-15);
  * float32 / bfloat16 / float16 KV vs the float64 reference on the same (rounded)
    values: 2e-5 (float32 accumulation; measured ~1e-6);
  * the same low-precision index vs its own float32 torch reference: 2e-5;
  * bfloat16 / float16 / float32 KV end to end vs float64 attention of the unrounded
    data: 3e-2 / 5e-3 / 1e-4.
Inputs are continuous random data, so cluster scores never tie and the kernel's
selection equals the reference's (checked through the per-head stats).
"""

import math

import pytest
import torch

from vllm_retro import RetroConfig, WaveIndex, full_attention
from vllm_retro import ops
from vllm_retro.attention import VARIANCE_CORRECTION_CAP, group_query, partial_attention
from vllm_retro.ops import decode_attention, has_extension

pytestmark = pytest.mark.skipif(
    not has_extension(),
    reason="vllm_retro._C not built (pip install --no-build-isolation -e .)")

# The fraction-based budget (no token floor): at 2600 tokens the default 512-token
# floor would retrieve ~20% of clusters and hide the fraction and bound logic.
SMALL = dict(segment_size=512, update_interval=256, recent_tokens=32, sink_tokens=4,
             kmeans_iters=4, min_retrieval_tokens=0)


def clustered_kv(h, t, d, n_centres=40, noise=0.3, seed=0, dtype=torch.float64):
    """Keys around ``n_centres`` random centres per head (so cluster scores spread
    out), Gaussian values."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(h, n_centres, d, generator=g, dtype=torch.float64) * 1.5
    ids = torch.randint(0, n_centres, (h, t), generator=g)
    keys = torch.gather(centres, 1, ids.unsqueeze(-1).expand(-1, -1, d))
    keys = keys + noise * torch.randn(h, t, d, generator=g, dtype=torch.float64)
    values = torch.randn(h, t, d, generator=g, dtype=torch.float64)
    return keys.to(dtype), values.to(dtype), centres


def make_query(centres, group, seed, sharp=2.0):
    """Query heads pointing near one random centre per KV head plus noise."""
    g = torch.Generator().manual_seed(seed)
    h, c, d = centres.shape
    base = centres[torch.arange(h), torch.randint(0, c, (h,), generator=g)]
    q = base.unsqueeze(1) * sharp / math.sqrt(d) * 4 + \
        torch.randn(h, group, d, generator=g, dtype=torch.float64)
    return q.reshape(h * group, d)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def op(index, q, n_ret, n_est, scale=None, out=None, **kw):
    """Raw op call on an index's tensors; returns (out, stats)."""
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float64 if index.dtype == torch.float64
                          else torch.float32)
    scale = 1.0 / math.sqrt(index.head_dim) if scale is None else scale
    st = torch.ops.vllm_retro.retro_decode_attention(
        q, index.sink_keys, index.sink_values, index.tail_keys, index.tail_values,
        index.keys, index.values, index.centroids, index.value_sums, index.key_vars,
        index.sizes, index.starts, n_ret, n_est, scale, out, **kw)
    return out, st


def assert_same_stats(a, b):
    assert a.clusters_total == b.clusters_total
    assert a.clusters_retrieved == pytest.approx(b.clusters_retrieved, abs=1e-12)
    assert a.exact_fraction == pytest.approx(b.exact_fraction, abs=1e-12)
    assert a.estimated_fraction == pytest.approx(b.estimated_fraction, abs=1e-12)


@pytest.fixture(scope="module")
def index64():
    k, v, c = clustered_kv(3, 2600, 32, seed=11)
    return WaveIndex.build(k, v, RetroConfig(**SMALL)), k, v, c


def cast_index(index, dtype):
    """Copy of a float64 index with KV in ``dtype`` and summaries in float32; the
    float64 twin holds the same rounded values, so the two differ only in the
    arithmetic precision."""
    low = WaveIndex(index.num_kv_heads, index.head_dim, index.config, dtype=dtype)
    twin = WaveIndex(index.num_kv_heads, index.head_dim, index.config, dtype=torch.float64)
    for name in ("sink_keys", "sink_values", "keys", "values"):
        t = getattr(index, name).to(dtype)
        setattr(low, name, t)
        setattr(twin, name, t.double())
    for name in ("_tail_keys", "_tail_values"):
        t = getattr(index, name)[:, :index.tail_len].to(dtype)
        setattr(low, name, t)
        setattr(twin, name, t.double())
    for name in ("centroids", "value_sums", "key_vars"):
        t = getattr(index, name).float()
        setattr(low, name, t)
        setattr(twin, name, t.double())
    for ix in (low, twin):
        for name in ("positions", "sizes", "starts", "tail_len", "num_segments", "seq_len"):
            setattr(ix, name, getattr(index, name))
    return low, twin


# --------------------------------------------------------------- (a), (d): float64
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_float64_matches_reference(index64, group, seed):
    index, _, _, c = index64
    assert index.num_clusters > 50 and index.tail_len > 0
    q = make_query(c, group, seed)
    ref = index.attend(q)
    ref_stats = index.last_stats
    out = decode_attention(index, q)
    assert out.dtype == torch.float64 and out.shape == q.shape
    assert rel(out, ref) < 1e-10
    assert_same_stats(index.last_stats, ref_stats)


@pytest.mark.parametrize("n_ret,n_est", [(0, 0), (1, 0), (0, 9), (5, 30), (10**6, 10**6)])
def test_float64_budgets(index64, n_ret, n_est):
    """Any budget, clamped to the clusters present, equals the reference's."""
    index, _, _, c = index64
    q = make_query(c, 4, 5)
    cfg = index.config
    ref_index = WaveIndex(index.num_kv_heads, index.head_dim, cfg, dtype=torch.float64)
    ref_index.__dict__.update(index.__dict__)
    ref_index.budget = lambda: (min(n_ret, index.num_clusters),
                                min(n_est, index.num_clusters - min(n_ret, index.num_clusters)))
    ref = ref_index.attend(q)
    out, st = op(index, q, n_ret, n_est)
    assert rel(out, ref) < 1e-10
    k1 = min(n_ret, index.num_clusters)
    assert st.shape == (3, 3) and st[:, 0].tolist() == [k1] * 3
    assert st[:, 1].double().mean().item() / index.seq_len == pytest.approx(
        ref_index.last_stats.exact_fraction
        - (index.sink_keys.shape[1] + index.tail_len) / index.seq_len, abs=1e-12)


@pytest.mark.parametrize("error_bound", [0.05, 0.005, 0.0005])
@pytest.mark.parametrize("group", [1, 4])
def test_float64_error_bounded_mode(group, error_bound):
    k, v, c = clustered_kv(3, 2600, 32, seed=13)
    cfg = RetroConfig(error_bound=error_bound, max_retrieval_fraction=0.5, **SMALL)
    index = WaveIndex.build(k, v, cfg)
    ks = []
    for seed in range(3):
        q = make_query(c, group, 100 + seed)
        ref = index.attend(q)
        ref_stats = index.last_stats
        out = decode_attention(index, q)
        assert rel(out, ref) < 1e-10
        assert_same_stats(index.last_stats, ref_stats)
        ks.append(index.last_stats.clusters_retrieved)
    n_min = index.budget()[0]
    if error_bound <= 0.005:
        assert max(ks) > n_min  # the bound did grow the exact set


def test_explicit_k_ret_matches_bounded_reference():
    """A per-head exact-set size k_ret [H] gives the reference's accuracy-bounded
    result when fed the reference's own k_ret."""
    k, v, c = clustered_kv(3, 2600, 32, seed=17)
    # The mean estimate: at this bound the one-sided one (the default) reaches the
    # cap on every head, and the sizes must differ here.
    cfg = RetroConfig(error_bound=0.002, max_retrieval_fraction=0.5, bound_margin=None,
                      **SMALL)
    index = WaveIndex.build(k, v, cfg)
    q = make_query(c, 2, 7)
    scale = 1.0 / math.sqrt(32)
    qg = group_query(q, 3)
    _, lse = partial_attention(qg, torch.cat([index.sink_keys, index.tail_keys], 1),
                               torch.cat([index.sink_values, index.tail_values], 1), scale)
    k_ret = index.select_clusters(qg, scale, lse).k_retrieved
    assert len(set(k_ret.tolist())) > 1  # sizes differ per head
    ref = index.attend(q)
    out, st = op(index, q, 0, index.budget()[1], k_ret=k_ret)
    assert rel(out, ref) < 1e-10
    assert st[:, 0].tolist() == k_ret.tolist()


def test_key_variance_term_in_both_modes(index64):
    """The kernel uses key_vars like the reference: the test data has clusters below
    and above the cap of the variance term, the term changes the result, and the
    kernel equals the float64 reference with and without it (zero key_vars) in the
    fixed-budget and the accuracy-bounded mode."""
    index, _, _, c = index64
    q = make_query(c, 4, 8)
    qg, scale = group_query(q, 3), 1.0 / math.sqrt(index.head_dim)
    corr = torch.einsum("hgd,hcd->hgc", qg * qg, index.key_vars) * (0.5 * scale * scale)
    live = (index.sizes > 0).unsqueeze(1).expand_as(corr)
    capped = (corr[live] > VARIANCE_CORRECTION_CAP).double().mean().item()
    assert 0.05 < capped < 0.5, capped
    bounded = index.config.replace(error_bound=0.01, max_retrieval_fraction=0.5)
    for cfg in (index.config, bounded):
        outs, ks = [], []
        for zero in (False, True):
            ix = WaveIndex(index.num_kv_heads, index.head_dim, cfg, dtype=torch.float64)
            ix.__dict__.update({**index.__dict__, "config": cfg})
            if zero:
                ix.key_vars = torch.zeros_like(index.key_vars)
            ref = ix.attend(q)
            ref_stats = ix.last_stats
            out = decode_attention(ix, q)
            assert rel(out, ref) < 1e-10
            assert_same_stats(ix.last_stats, ref_stats)
            outs.append(out)
            ks.append(ix.last_stats.clusters_retrieved)
        assert rel(outs[0], outs[1]) > 1e-3
        if cfg.error_bound is not None:
            assert ks[0] != ks[1]  # the term changes the bounded exact set


# --------------------------------------------------------------- (b): low precision
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_low_precision_vs_float64_on_same_values(index64, dtype, group):
    index, _, _, c = index64
    low, twin = cast_index(index, dtype)
    for seed in range(2):
        q = make_query(c, group, 20 + seed).float()
        ref = twin.attend(q.double())
        ref_stats = twin.last_stats
        out = decode_attention(low, q)
        assert out.dtype == torch.float32
        assert rel(out, ref) < 2e-5
        assert_same_stats(low.last_stats, ref_stats)


@pytest.mark.parametrize("dtype,tol_e2e", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2),
                                           (torch.float16, 5e-3)])
def test_low_precision_index_vs_its_reference(dtype, tol_e2e):
    """An index built natively in ``dtype``: kernel vs the torch reference (float32
    arithmetic) on it, and end to end vs float64 of the unrounded data."""
    k, v, c = clustered_kv(2, 2600, 64, seed=19)
    cfg = RetroConfig(**SMALL)
    low = WaveIndex.build(k.to(dtype), v.to(dtype), cfg)
    hi = WaveIndex.build(k, v, cfg)
    q = make_query(c, 4, 3)
    for qq in (q.to(dtype), q):  # query in the KV dtype (as vLLM passes it), float64
        ref = low.attend(qq)
        ref_stats = low.last_stats
        out = decode_attention(low, qq)
        assert rel(out, ref) < 2e-5
        assert_same_stats(low.last_stats, ref_stats)
    assert rel(out, hi.attend(q)) < tol_e2e


@pytest.mark.parametrize("floor", [200, 700])
def test_token_floor_kernel_vs_reference(floor):
    """With ``min_retrieval_tokens`` raising the exact set, kernel == reference."""
    k, v, c = clustered_kv(2, 2600, 32, seed=23)
    index = WaveIndex.build(k, v, RetroConfig(**{**SMALL, "min_retrieval_tokens": floor}))
    assert index.budget()[0] > WaveIndex.build(k, v, RetroConfig(**SMALL)).budget()[0]
    q = make_query(c, 4, 5)
    ref = index.attend(q)
    ref_stats = index.last_stats
    out = decode_attention(index, q)
    assert rel(out, ref) < 1e-10
    assert_same_stats(index.last_stats, ref_stats)


def test_output_dtypes_and_strided_out(index64):
    index, _, _, c = index64
    q = make_query(c, 2, 1)
    ref = index.attend(q)
    for dt in (torch.float32, torch.bfloat16):
        out = torch.full(q.shape, float("nan"), dtype=dt)
        res = decode_attention(index, q, out=out)
        assert res is out
        assert rel(out, ref) < (1e-6 if dt == torch.float32 else 1e-2)
    big = torch.zeros(q.shape[0], 2 * q.shape[1], dtype=torch.float64)
    out = big[:, ::2]  # not contiguous: computed aside, then copied
    decode_attention(index, q, out=out)
    assert rel(out, ref) < 1e-10 and big[:, 1::2].abs().max() == 0


# --------------------------------------------------------------- (c): full retrieval
@pytest.mark.parametrize("group", [1, 3])
def test_all_clusters_retrieved_equals_full_attention(group):
    k, v, c = clustered_kv(2, 1800, 32, seed=23)
    cfg = RetroConfig(retrieval_fraction=1.0, estimation_fraction=0.0, **SMALL)
    index = WaveIndex.build(k, v, cfg)
    assert index.num_clusters > 0
    q = make_query(c, group, 4)
    out = decode_attention(index, q)
    assert rel(out, full_attention(q, k, v)) < 1e-12
    assert index.last_stats.exact_fraction == 1.0
    low, _ = cast_index(index, torch.float32)
    out32, st = op(low, q.float(), low.num_clusters, 0)
    assert rel(out32, full_attention(q, k, v)) < 2e-5
    assert st[:, 1].tolist() == [index.num_clustered_tokens] * 2


# --------------------------------------------------------------- (e): edge cases
def test_no_clusters_equals_full_attention():
    k, v, c = clustered_kv(2, 300, 32, seed=29)  # shorter than one segment
    index = WaveIndex.build(k, v, RetroConfig(**SMALL))
    assert index.num_clusters == 0
    for group in (1, 4, 7):
        q = make_query(c, group, group)
        out = decode_attention(index, q)
        assert rel(out, full_attention(q, k, v)) < 1e-12
        assert index.last_stats.exact_fraction == 1.0


def test_zero_sinks():
    k, v, c = clustered_kv(2, 2000, 32, seed=31)
    index = WaveIndex.build(k, v, RetroConfig(**{**SMALL, "sink_tokens": 0}))
    assert index.sink_keys.shape[1] == 0
    q = make_query(c, 4, 0)
    assert rel(decode_attention(index, q), index.attend(q)) < 1e-10


def test_empty_tail_and_empty_exact_set(index64):
    index, _, _, c = index64
    ix = WaveIndex(index.num_kv_heads, index.head_dim, index.config, dtype=torch.float64)
    ix.__dict__.update(index.__dict__)
    ix.tail_len = 0  # no tail tokens
    q = make_query(c, 4, 9)
    ref = ix.attend(q)
    assert rel(decode_attention(ix, q), ref) < 1e-10
    # Nothing exact at all: no sinks, no tail, no retrieved cluster; only estimates.
    ix.sink_keys = ix.sink_keys[:, :0]
    ix.sink_values = ix.sink_values[:, :0]
    ix.budget = lambda: (0, 12)
    ref = ix.attend(q)
    out, st = op(ix, q, 0, 12)
    assert rel(out, ref) < 1e-10 and st[:, 1].tolist() == [0, 0, 0]
    # ... and no estimate either: zeros, as the reference.
    out, _ = op(ix, q, 0, 0)
    assert out.abs().max() == 0


def test_empty_clusters_carry_no_mass(index64):
    """Clusters of size 0 (k-means can leave some) score 0 and add nothing."""
    index, _, _, c = index64
    ix = WaveIndex(index.num_kv_heads, index.head_dim, index.config, dtype=torch.float64)
    ix.__dict__.update(index.__dict__)
    h, n_extra = index.num_kv_heads, 5
    n = index.num_clustered_tokens
    ix.centroids = torch.cat([index.centroids, torch.randn(h, n_extra, index.head_dim,
                                                           dtype=torch.float64)], 1)
    ix.value_sums = torch.cat([index.value_sums, torch.zeros(h, n_extra, index.head_dim,
                                                             dtype=torch.float64)], 1)
    ix.key_vars = torch.cat([index.key_vars, torch.rand(h, n_extra, index.head_dim,
                                                        dtype=torch.float64)], 1)
    ix.sizes = torch.cat([index.sizes, torch.zeros(h, n_extra, dtype=torch.int64)], 1)
    ix.starts = torch.cat([index.starts, torch.full((h, n_extra), n, dtype=torch.int64)], 1)
    q = make_query(c, 2, 2)
    c_all = ix.num_clusters
    ix.budget = lambda: (c_all - 2, 2)  # forces empty clusters into both sets
    ref = ix.attend(q)
    out, st = op(ix, q, c_all - 2, 2)
    assert rel(out, ref) < 1e-10
    assert st[:, 1].tolist() == [n] * h and st[:, 2].tolist() == [0] * h


def test_fallback_without_extension(index64, monkeypatch):
    index, _, _, c = index64
    q = make_query(c, 4, 3)
    fast = decode_attention(index, q)
    monkeypatch.setattr(ops, "_EXT", False)
    assert not has_extension()
    out = torch.empty_like(fast)
    assert decode_attention(index, q, out=out) is out
    assert rel(out, fast) < 1e-10


def test_meta_shapes(index64):
    index, _, _, _ = index64
    m = lambda t: t.to("meta")
    ts = [index.sink_keys, index.sink_values, index.tail_keys, index.tail_values,
          index.keys, index.values, index.centroids, index.value_sums, index.key_vars,
          index.sizes, index.starts]
    q = torch.empty(6, index.head_dim, device="meta", dtype=torch.float64)
    st = torch.ops.vllm_retro.retro_decode_attention(q, *map(m, ts), 2, 3, 0.1,
                                                     torch.empty_like(q))
    assert st.device.type == "meta" and st.shape == (3, 3) and st.dtype == torch.int64


# --------------------------------------------------------------- (f): bad inputs
def test_bad_inputs_raise(index64):
    index, _, _, c = index64
    q = make_query(c, 2, 0)
    D = index.head_dim
    with pytest.raises(ValueError, match="query must be"):
        decode_attention(index, q[:, :-1])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(index, q[:5])
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(index, q, out=torch.empty(6, D + 1, dtype=torch.float64))
    empty = WaveIndex(3, D, index.config, dtype=torch.float64)
    with pytest.raises(ValueError, match="empty index"):
        decode_attention(empty, q)

    base = dict(query=q, sink_keys=index.sink_keys, sink_values=index.sink_values,
                tail_keys=index.tail_keys, tail_values=index.tail_values, keys=index.keys,
                values=index.values, centroids=index.centroids,
                value_sums=index.value_sums, key_vars=index.key_vars, sizes=index.sizes,
                starts=index.starts,
                n_ret=3, n_est=5, scale=0.2, out=torch.empty(6, D, dtype=torch.float64))

    def call(**changes):
        a = {**base, **changes}
        return torch.ops.vllm_retro.retro_decode_attention(
            a["query"], a["sink_keys"], a["sink_values"], a["tail_keys"], a["tail_values"],
            a["keys"], a["values"], a["centroids"], a["value_sums"], a["key_vars"],
            a["sizes"], a["starts"], a["n_ret"], a["n_est"], a["scale"], a["out"],
            **{k: a[k] for k in ("k_ret", "error_bound", "max_ret") if k in a})

    call()  # the base call is valid
    bad = [
        (dict(query=q[:5]), r"num_q_heads \(5\) must be a positive multiple of num_kv_heads \(3\)"),
        (dict(query=q[:, :-1]), "query must be"),
        (dict(query=q.long()), "query must be a floating tensor"),
        (dict(values=index.values.float()), "values must have the KV dtype"),
        (dict(keys=index.keys.int(), values=index.values.int()), "KV dtype must be"),
        (dict(keys=index.keys[:2]), r"values must be \[2, n, 32\]"),
        (dict(keys=index.keys.transpose(1, 2).contiguous().transpose(1, 2)),
         "contiguous in its last dim"),
        (dict(tail_values=index.tail_values[:, :-1]),
         "tail_keys and tail_values must have the same shape"),
        (dict(centroids=index.centroids.float(), value_sums=index.value_sums.float()),
         r"centroids must have the compute dtype \(float64 for float64 KV, else float32\) "
         "Double, got Float"),
        (dict(key_vars=index.key_vars.float()), "key_vars must have the compute dtype"),
        (dict(key_vars=index.key_vars[:, :-1]),
         "centroids and key_vars must have the same shape"),
        (dict(sizes=index.sizes.int()), "sizes must be int64"),
        (dict(starts=index.starts[:, :-1]), "starts must be"),
        (dict(starts=index.starts + 10**6), "lies outside keys"),
        (dict(sizes=-index.sizes), "lies outside keys"),
        (dict(n_ret=-1), "n_ret and n_est must be >= 0"),
        (dict(scale=float("nan")), "scale must be finite"),
        (dict(out=torch.empty(6, D + 1)), "out must be"),
        (dict(out=torch.empty(6, D, dtype=torch.int64)), "out must be a floating tensor"),
        (dict(k_ret=torch.zeros(2, dtype=torch.int64)), "k_ret must be a CPU int64 tensor"),
        (dict(k_ret=torch.full((3,), -1, dtype=torch.int64)), "k_ret must be >= 0"),
        (dict(k_ret=torch.zeros(3, dtype=torch.int64), error_bound=0.1), "not both"),
        (dict(error_bound=2.0), "error_bound must be in"),
    ]
    for changes, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            call(**changes)


# --------------------------------------------------------------- (g): accuracy options
@pytest.fixture(scope="module")
def index_vc():
    """A float64 index built with the value correction (its pair per cluster)."""
    k, v, c = clustered_kv(3, 2600, 32, seed=13)
    cfg = RetroConfig(**SMALL, value_correction=True, estimation_fraction=0.4)
    return WaveIndex.build(k, v, cfg), c


def _kernel_vs_reference(index, q, monkeypatch):
    """(kernel output, reference output) of one query; the kernel's statistics must
    equal the reference's, and the torch reference is unreachable from
    ``decode_attention`` meanwhile (a fallback fails instead of passing)."""
    ref = index.attend(q)
    ref_stats = index.last_stats

    def no_reference(*a, **k):
        raise AssertionError("decode_attention fell back to the torch reference")
    with monkeypatch.context() as mp:
        mp.setattr(index, "attend", no_reference)
        out = decode_attention(index, q)
    assert_same_stats(index.last_stats, ref_stats)
    return out, ref


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("vc,rank", [(True, "mass"), (False, "error"), (True, "error")])
@pytest.mark.parametrize("seed", [0, 1])
def test_value_correction_and_error_rank_match_reference(index_vc, monkeypatch, group, vc,
                                                         rank, seed):
    """The kernel's value correction (each estimated cluster's value plus scale (q .
    sigma u) w) and "error" rank (the band re-sorted by sum_g m_g t_g) against the
    float64 reference, at 1e-10, with the same per-head statistics; the error rank
    really changes the exact set here (else the check would be the mass rank's)."""
    base, c = index_vc
    index = WaveIndex.__new__(WaveIndex)
    index.__dict__.update(base.__dict__)
    index.config = base.config.replace(value_correction=vc, retrieval_rank=rank)
    q = make_query(c, group, seed, sharp=1.0)
    out, ref = _kernel_vs_reference(index, q, monkeypatch)
    assert rel(out, ref) < 1e-10
    # The option matters: turning it off moves the output by far more than 1e-10.
    off = index.config.replace(value_correction=False, retrieval_rank="mass")
    plain = WaveIndex.__new__(WaveIndex)
    plain.__dict__.update(index.__dict__)
    plain.config = off
    assert rel(decode_attention(plain, q), out) > 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_accuracy_preset_low_precision_vs_its_reference(dtype, monkeypatch):
    """The "accuracy" preset's decode (4-token clusters, value correction, error rank)
    in a low-precision index: the kernel against the index's own float32 torch
    reference, 2e-5 (float32 accumulation both; near-equal error proxies could
    order differently, which random clustered data does not produce)."""
    k, v, c = clustered_kv(2, 1800, 32, seed=5)
    cfg = RetroConfig.from_preset("accuracy", **SMALL)
    index = WaveIndex.build(k.to(dtype), v.to(dtype), cfg)
    q = make_query(c, 3, 2, sharp=1.0).to(dtype)
    out, ref = _kernel_vs_reference(index, q, monkeypatch)
    assert rel(out, ref) < 2e-5


def test_accuracy_option_inputs_raise(index_vc):
    index, c = index_vc
    q = make_query(c, 2, 0)
    su, w = index.kv_u, index.kv_w
    with pytest.raises(RuntimeError, match="must be given together"):
        op(index, q, 3, 5, vc_su=su)
    with pytest.raises(RuntimeError, match="one row per cluster"):
        op(index, q, 3, 5, vc_su=su[:, :-1], vc_w=w[:, :-1])
    with pytest.raises(RuntimeError, match="vc_w must have the compute dtype"):
        op(index, q, 3, 5, vc_su=su, vc_w=w.float())
    with pytest.raises(RuntimeError, match="error_rank applies to the fixed budget"):
        op(index, q, 3, 5, error_rank=True, error_bound=0.1)
    with pytest.raises(RuntimeError, match="error_rank applies to the fixed budget"):
        op(index, q, 3, 5, error_rank=True, k_ret=torch.ones(3, dtype=torch.long))
    # An index whose clusters were built without the pair: a clear error, as the
    # reference's.
    plain = WaveIndex.build(index.keys[:, :600].clone(), index.values[:, :600].clone(),
                            RetroConfig(**SMALL))
    plain.config = plain.config.replace(value_correction=True)
    with pytest.raises(ValueError, match="value_correction was turned on after"):
        decode_attention(plain, q)
