"""Prefill attention of a request whose early blocks were released during its prefill
(the wave buffer's 1M-token path): resident blocks through a compacted block table,
released tokens read back from the host mirror in pieces, merged by log-sum-exp.
Checked in float64 against full causal attention over the cache before the release,
with the released blocks poisoned (NaN) so any read of them shows."""

import math

import pytest
import torch

from conftest import filled_cache, index_pool_of, mirror_segment, segment_job  # noqa: E402
from vllm_retro.config import RetroConfig
from vllm_retro.index.paged import PagedIndexLayout, build_segments, plan_segments, sink_end
from vllm_retro.memory import HostMirror, MirrorShape
from vllm_retro.memory.released_prefill import (ReleasedRow, compact_block_table,
                                                merge_partial_, reference_dense_attn,
                                                reference_paged_attn,
                                                released_prefill_attention)

CFG = RetroConfig(segment_size=256, update_interval=64, recent_tokens=32, cluster_size=16,
                  min_retrieval_tokens=0, kmeans_iters=3)
H, D, BS, G = 2, 16, 16, 2


def _full_reference(kv, blocks, n_keys, q, scale):
    """float64 causal attention of queries at positions ``[n_keys - L, n_keys)``."""
    pos = torch.arange(n_keys)
    kvt = kv[blocks[pos // BS], :, pos % BS]                     # [n, H, 2D]
    L = q.shape[0]
    k = kvt[..., :D].repeat_interleave(G, 1)
    v = kvt[..., D:].repeat_interleave(G, 1)
    s = torch.einsum("lhd,nhd->hln", q.double(), k.double()) * scale
    mask = pos.unsqueeze(0) <= torch.arange(n_keys - L, n_keys).unsqueeze(1)
    s = s.masked_fill(~mask.unsqueeze(0), float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("hln,nhd->lhd", p, v.double())


@pytest.mark.parametrize("piece_tokens", [100, 256, 600])
def test_released_prefill_equals_full_attention_before_release(piece_tokens):
    lay = PagedIndexLayout(H, D, BS, torch.float64)
    nb, prompt, computed, chunk, lag = 160, 1400, 1000, 200, 300
    scale = 1.0 / math.sqrt(D)
    g = torch.Generator().manual_seed(7)
    # Two layers over one block table (vLLM's: one table for all layers).
    kv0, blocks = filled_cache(lay, nb, computed + chunk, seed=11)
    kv1 = lay.make_cache(nb)
    pos = torch.arange(computed + chunk)
    kv1[blocks[pos // BS], :, pos % BS] = torch.randn(computed + chunk, H, 2 * D,
                                                        generator=g, dtype=torch.float64)
    layers = [(kv0, blocks), (kv1, blocks)]
    segs = plan_segments(0, computed, prompt, CFG, BS, prefill_lag=lag)
    se = sink_end(CFG, BS)
    assert segs == [(se, se + 256), (se + 256, se + 512)]
    shape = MirrorShape.for_layout(lay, max_requests=2, num_layers=2, num_pages=nb)
    m = HostMirror(shape, 4 * prompt * shape.bytes_per_token())
    m.reserve(1, segs[0][1] - segs[0][0])
    for li, (kv, blk) in enumerate(layers):
        for p0, p1 in segs:
            build_segments(kv, lay, index_pool_of(lay, kv), [segment_job(lay, kv, blk, p0, p1)],
                           CFG)
            mirror_segment(m, 1, li, kv, lay, blk, p0, p1)
    horizon = segs[-1][1]
    # A second prefill row (another request, nothing released) in other blocks.
    other_len, other_q = 300, 40
    free = torch.tensor(sorted(set(range(1, nb)) - set(blocks.tolist())))
    other_blocks = free[:math.ceil(other_len / BS)]
    for kv, _ in layers:
        p = torch.arange(other_len)
        kv[other_blocks[p // BS], :, p % BS] = torch.randn(other_len, H, 2 * D, generator=g,
                                                            dtype=torch.float64)
    q_main = torch.randn(chunk, H * G, D, generator=g, dtype=torch.float64)
    q_other = torch.randn(other_q, H * G, D, generator=g, dtype=torch.float64)
    want = [(_full_reference(kv, blocks, computed + chunk, q_main, scale),
             _full_reference(kv, other_blocks, other_len, q_other, scale)) for kv, _ in layers]
    # Release: the blocks [sink_end, horizon) go back (poisoned here).
    for kv, _ in layers:
        kv[blocks[se // BS: horizon // BS]] = float("nan")
    width = math.ceil((computed + chunk) / BS) + 2
    bt = torch.zeros(2, width, dtype=torch.int32)
    bt[0, :len(blocks)] = blocks[:width].int()
    bt[1, :len(other_blocks)] = other_blocks.int()
    seq_lens = torch.tensor([computed + chunk, other_len], dtype=torch.int32)
    rows = [ReleasedRow(row=0, slot=1, horizon=horizon)]
    qs = [0, chunk, chunk + other_q]
    query = torch.cat([q_main, q_other])
    compacted = compact_block_table(bt, seq_lens, rows, se, BS)
    assert compacted[1].tolist() == [computed + chunk - (horizon - se), other_len]
    assert torch.equal(compacted[0][1], bt[1])
    staging = (torch.empty(piece_tokens * H * 2 * D, dtype=torch.float64),
               torch.empty(piece_tokens, H, D, dtype=torch.float64),
               torch.empty(piece_tokens, H, D, dtype=torch.float64))
    for li, (kv, _) in enumerate(layers):
        out = torch.empty_like(query)
        released_prefill_attention(query, qs, bt, seq_lens, rows, m, li, se, BS,
                                   reference_paged_attn(kv, qs, scale),
                                   reference_dense_attn(scale), staging, out,
                                   compacted=compacted)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:chunk], want[li][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[chunk:], want[li][1], rtol=1e-10, atol=1e-12)
    # The pieces tile the released zone exactly; a horizon past the mirror is refused.
    pieces = m.zone_pieces(1, 0, se, horizon, piece_tokens)
    assert all(sum(t1 - t0 for _, _, t0, t1 in pc) <= piece_tokens for pc in pieces)
    assert sum(t1 - t0 for pc in pieces for _, _, t0, t1 in pc) == horizon - se
    assert len(pieces) == -(-(horizon - se) // piece_tokens)
    with pytest.raises(ValueError, match="holds"):
        m.zone_pieces(1, 0, se, horizon + BS * 16, piece_tokens)
    with pytest.raises(ValueError, match="tile"):
        m.zone_pieces(1, 0, se + BS, horizon, piece_tokens)


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
