"""Prefill attention of a request whose early blocks were released during its prefill
(the wave buffer's 1M-token path): resident blocks through a compacted block table,
released tokens read back from the host mirror in pieces, merged by log-sum-exp.
Checked in float64 against full causal attention over the cache before the release,
with the released blocks poisoned (NaN) so any read of them shows."""

import math

import pytest
import torch

from vllm_retro.config import RetroConfig
from vllm_retro.index.paged import (IndexPool, PagedIndexLayout, SegmentJob, build_segments,
                                    plan_segments, sink_end)
from vllm_retro.memory import HostMirror, MirrorShape
from vllm_retro.memory.released_prefill import (ReleasedRow, compact_block_table,
                                                merge_partial_, reference_dense_attn,
                                                reference_paged_attn,
                                                released_prefill_attention)

CFG = RetroConfig(segment_size=256, update_interval=64, recent_tokens=32, cluster_size=16,
                  min_retrieval_tokens=0, kmeans_iters=3)
H, D, BS, G = 2, 16, 16, 2


def _full_reference(kv, blocks, n_keys, q, scale):
    """float64 causal attention of queries ``q [L, Hq, D]`` at positions
    ``[n_keys - L, n_keys)`` over the request's first ``n_keys`` tokens."""
    h, d = kv.shape[1], kv.shape[-1] // 2
    g = q.shape[1] // h
    pos = torch.arange(n_keys)
    kvt = kv[blocks[pos // BS], :, pos % BS].double()              # [n, H, 2D]
    L = q.shape[0]
    k = kvt[..., :d].repeat_interleave(g, 1)
    v = kvt[..., d:].repeat_interleave(g, 1)
    s = torch.einsum("lhd,nhd->hln", q.double(), k) * scale
    mask = pos.unsqueeze(0) <= torch.arange(n_keys - L, n_keys).unsqueeze(1)
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("hln,nhd->lhd", p, v)


def _scenario(dtype, device, h=H, d=D, cfg=CFG, computed=1000, chunk=200, lag=300,
              prompt=1400, nb=160, pin=False):
    """Two layers of a paged cache (one block table) holding a request prefilled to
    ``computed`` tokens plus this step's ``chunk`` (its K/V written, as vLLM does
    before attention) and a second request; the first one's segments behind
    ``lag`` clustered and mirrored, then its released blocks poisoned with NaN.
    Returns the step's inputs and the float64 attention before the release."""
    lay = PagedIndexLayout(h, d, BS, dtype)
    g = torch.Generator().manual_seed(7)
    n = computed + chunk
    blocks = torch.randperm(nb - 1, generator=g)[:math.ceil(n / BS) + 1] + 1
    other_len, other_q = 300, 40
    free = torch.tensor(sorted(set(range(1, nb)) - set(blocks.tolist())))
    other_blocks = free[:math.ceil(other_len / BS)]
    layers = []
    for _ in range(2):
        kv = lay.make_cache(nb, device)
        for blk, ln in ((blocks, n), (other_blocks, other_len)):
            p = torch.arange(ln)
            kv[blk[p // BS].to(device), :, (p % BS).to(device)] = \
                torch.randn(ln, h, 2 * d, generator=g, dtype=torch.float64).to(device, dtype)
        layers.append(kv)
    segs = plan_segments(0, computed, prompt, cfg, BS, prefill_lag=lag)
    se = sink_end(cfg, BS)
    assert segs and segs[0][0] == se
    shape = MirrorShape.for_layout(lay, max_requests=2, num_layers=2, num_pages=nb)
    m = HostMirror(shape, 4 * prompt * shape.bytes_per_token(), device, pin=pin)
    m.reserve(1, segs[0][1] - segs[0][0])
    bdev = blocks.to(device)
    for li, kv in enumerate(layers):
        pool = IndexPool(lay, nb, device)
        for p0, p1 in segs:
            build_segments(kv, lay, pool, [SegmentJob(bdev, p0, p1, bdev[p0 // BS:p1 // BS])],
                           cfg)
            m.mirror_segment(1, li, kv, lay, bdev, p0, p1, pool, bdev[p0 // BS:p1 // BS])
    horizon = segs[-1][1]
    hq = h * G
    q_main = torch.randn(chunk, hq, d, generator=g, dtype=torch.float64)
    q_other = torch.randn(other_q, hq, d, generator=g, dtype=torch.float64)
    scale = 1.0 / math.sqrt(d)
    want = []
    for kv in layers:
        kc = kv.cpu().double()
        want.append(torch.cat([_full_reference(kc, blocks, n, q_main, scale),
                               _full_reference(kc, other_blocks, other_len, q_other, scale)]))
    for kv in layers:   # the release: another request's now (poisoned here)
        kv[bdev[se // BS: horizon // BS]] = float("nan")
    width = math.ceil(n / BS) + 2
    bt = torch.zeros(2, width, dtype=torch.int32)
    bt[0, :len(blocks)] = blocks[:width].int()
    bt[1, :len(other_blocks)] = other_blocks.int()
    seq_lens = torch.tensor([n, other_len], dtype=torch.int32)
    return dict(layers=layers, mirror=m, horizon=horizon, se=se, segs=segs,
                bt=bt.to(device), seq_lens=seq_lens.to(device), qs=[0, chunk, chunk + other_q],
                query=torch.cat([q_main, q_other]).to(device, dtype), want=want, scale=scale,
                rows=[ReleasedRow(row=0, slot=1, horizon=horizon)], n=n, chunk=chunk)


def _staging(piece_tokens, dtype, device, h=H, d=D):
    return (torch.empty(piece_tokens * h * 2 * d, dtype=dtype, device=device),
            torch.empty(piece_tokens, h, d, dtype=dtype, device=device),
            torch.empty(piece_tokens, h, d, dtype=dtype, device=device))


@pytest.mark.parametrize("piece_tokens", [100, 256, 600])
def test_released_prefill_equals_full_attention_before_release(piece_tokens):
    sc = _scenario(torch.float64, "cpu")
    se, horizon, m = sc["se"], sc["horizon"], sc["mirror"]
    assert sc["segs"] == [(se, se + 256), (se + 256, se + 512)]
    compacted = compact_block_table(sc["bt"], sc["seq_lens"], sc["rows"], se, BS)
    assert compacted[1].tolist() == [sc["n"] - (horizon - se), 300]
    assert torch.equal(compacted[0][1], sc["bt"][1])
    staging = _staging(piece_tokens, torch.float64, "cpu")
    for li, kv in enumerate(sc["layers"]):
        out = torch.empty_like(sc["query"])
        released_prefill_attention(sc["query"], sc["qs"], sc["bt"], sc["seq_lens"],
                                   sc["rows"], m, li, se, BS,
                                   reference_paged_attn(kv, sc["qs"], sc["scale"]),
                                   reference_dense_attn(sc["scale"]), staging, out,
                                   compacted=compacted)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, sc["want"][li], rtol=1e-10, atol=1e-12)
    # The pieces tile the released zone exactly; a horizon past the mirror is refused.
    pieces = m.zone_pieces(1, 0, se, horizon, piece_tokens)
    assert all(sum(t1 - t0 for _, _, t0, t1 in pc) <= piece_tokens for pc in pieces)
    assert sum(t1 - t0 for pc in pieces for _, _, t0, t1 in pc) == horizon - se
    assert len(pieces) == -(-(horizon - se) // piece_tokens)
    with pytest.raises(ValueError, match="holds"):
        m.zone_pieces(1, 0, se, horizon + BS * 16, piece_tokens)
    with pytest.raises(ValueError, match="tile"):
        m.zone_pieces(1, 0, se + BS, horizon, piece_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and vLLM's FlashAttention")
@pytest.mark.parametrize("piece_tokens", [1000, 4096])
def test_released_prefill_on_flash_attention_equals_full_attention(piece_tokens):
    """The GPU path of ``RetroImpl._prefill_released``: vLLM's FlashAttention (paged,
    compacted block table; dense over the mirror's pieces read from pinned memory),
    bf16 at Llama-3-8B's head shape, against float64 attention before the release
    (tolerance: bf16 rounding of inputs and output)."""
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm_retro.backend.gpu import ReleasedPrefillPlan, flash_attn_pair
    dev = torch.device("cuda")
    cfg = RetroConfig(segment_size=1024, update_interval=128, recent_tokens=64,
                      cluster_size=16, min_retrieval_tokens=0, kmeans_iters=3)
    sc = _scenario(torch.bfloat16, dev, h=8, d=128, cfg=cfg, computed=6000, chunk=512,
                   lag=1500, prompt=9000, nb=520, pin=True)
    se = sc["se"]
    assert sc["horizon"] >= se + 4096
    compacted = compact_block_table(sc["bt"], sc["seq_lens"], sc["rows"], se, BS)
    plan = ReleasedPrefillPlan(sc["rows"], compacted)
    qs = sc["qs"]
    qsl = torch.tensor(qs, dtype=torch.int32, device=dev)
    staging = _staging(piece_tokens, torch.bfloat16, dev, h=8, d=128)
    for li, kv in enumerate(sc["layers"]):
        paged, dense = flash_attn_pair(kv, 128, sc["scale"], get_flash_attn_version(head_size=128),
                                       qsl, max(qs[1] - qs[0], qs[2] - qs[1]), sc["n"],
                                       plan.cu_lens)
        out = torch.empty_like(sc["query"])
        released_prefill_attention(sc["query"], qs, sc["bt"], sc["seq_lens"], sc["rows"],
                                   sc["mirror"], li, se, BS, paged, dense, staging, out,
                                   compacted=compacted)
        got = out.double().cpu()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, sc["want"][li], rtol=2e-2, atol=2e-2)


def test_merge_partial_is_attention_over_the_union():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(30, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(30, 2, 8, generator=g, dtype=torch.float64)
    attn = reference_dense_attn(0.3)
    want, want_lse = attn(q, k, v)
    acc, lse = attn(q, k[:7], v[:7])
    acc, lse = acc.float(), lse.float()
    for a, b in ((7, 19), (19, 30)):
        merge_partial_(acc, lse, *attn(q, k[a:b], v[a:b]))
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-5)
