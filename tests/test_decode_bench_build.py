"""The decode kernel benchmarks' cache and index construction
(``benchmarks/decode_kernel_bench.py:make_batch``, also used by
``decode_kernel_sweep.py``) on CPU tensors: each row's index in its own index-table
row and shuffled pool pages; with every cluster retrieved the twin equals dense
attention, with the default budget it reads less. (The benchmarks themselves need
a GPU; this keeps their set-up runnable.)"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))


def test_make_batch_builds_per_row_indexes(monkeypatch):
    import decode_kernel_bench as kb
    import decode_kernel_sweep  # noqa: F401  (its imports resolve)
    from vllm_retro.config import RetroConfig
    from vllm_retro.index.paged import HDR_IBT_ROW
    from vllm_retro.kernels import reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")      # the torch build on CPUs
    monkeypatch.setattr(kb, "DT", torch.float32)
    cfg = RetroConfig(segment_size=512, update_interval=128)
    q = torch.randn(2, kb.HQ, kb.D, generator=torch.Generator().manual_seed(0))
    for full in (True, False):
        lay, kv, bt, sl, hdr, S, ix = kb.make_batch(2500, 2, cfg, full=full, device="cpu")
        rows = hdr[bt[:, 0].long(), HDR_IBT_ROW].tolist()
        assert rows[0] != rows[1]
        out, st = reference.paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool,
                                                   S, 0.088)
        dense = reference.dense_paged_attention(q, kv, lay, bt, sl, 0.088)
        if full:
            assert ((out - dense).norm() / dense.norm()).item() < 1e-5
            assert (st[:, 0] == st[:, 2]).all()
        else:
            assert (st[:, 0] < st[:, 2]).all() and (st[:, 1] > 0).all()


def test_make_batch_wave_modes_read_the_same_kv(monkeypatch):
    """``make_batch(wave=...)``: every row's zone mirrored, its horizon at the zone's
    end; "hit" caches every page, "miss" none. With the zone's paged blocks then
    poisoned (NaN), the twin through the view still gives the output of the clean
    run without it, bit for bit: those tokens come from the cache (hit) or the
    arena (miss)."""
    import decode_kernel_bench as kb
    from vllm_retro.config import RetroConfig
    from vllm_retro.index.paged import HDR_CLUSTERED_END, HDR_HORIZON
    from vllm_retro.kernels import reference
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kb, "DT", torch.float32)
    cfg = RetroConfig(segment_size=512, update_interval=128)
    q = torch.randn(2, kb.HQ, kb.D, generator=torch.Generator().manual_seed(1))
    for mode in ("hit", "miss"):
        lay, kv, bt, sl, hdr, S, ix = kb.make_batch(2500, 2, cfg, device="cpu", wave=mode)
        first = hdr[bt[:, 0].long()]
        E = first[:, HDR_CLUSTERED_END]
        assert (first[:, HDR_HORIZON] == E).all() and (E > S).all()
        cached = int((ix.cache.slot_key[:-1] >= 0).sum())
        assert cached == (int((E - S).sum()) // lay.block_size * lay.num_kv_heads
                          if mode == "hit" else 0)
        plain, _ = reference.paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool,
                                                    S, 0.088)
        for r in range(2):
            kv[bt[r, S // lay.block_size:int(E[r]) // lay.block_size].long()] = float("nan")
        out, _ = reference.paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool,
                                                  S, 0.088, wave=ix.wave)
        assert torch.equal(out, plain), mode


def test_throughput_batch_plan():
    """``decode_throughput.batch_plan``: the requested batches the KV cache holds
    plus its largest; with the wave buffer the requested ones beyond it instead;
    capped by ``--max-batch``; none above ``--max-num-seqs`` (the engine would run
    such a batch in turns)."""
    from decode_throughput import batch_plan
    assert batch_plan([1, 2, 8], 3, False) == [1, 2, 3]
    assert batch_plan([1, 2], 3, False, max_num_seqs=2) == [1, 2]
    assert batch_plan([6], 6, False, max_num_seqs=8) == [6]
    assert batch_plan([8, 10], 5, True, max_num_seqs=16) == [8, 10]
    assert batch_plan([8, 10], 5, True, max_num_seqs=8) == [8]
    assert batch_plan([1, 4], 6, False, max_batch=4) == [1, 4]
    assert batch_plan([1, 2], 0, False) == [] and batch_plan([1], 0, True) == []


def test_row_groups_cover_the_batch_and_slices_attend_alike(monkeypatch):
    """The sweep's row-group variants run each group's rows as views of the batch
    (query, block table, seq_lens, output rows): the groups cover every row once, and
    the twin over each group's views gives the whole batch's rows."""
    import decode_kernel_bench as kb
    from decode_kernel_sweep import row_groups
    from vllm_retro.config import RetroConfig
    from vllm_retro.kernels import reference
    for b in range(1, 9):
        for n in range(1, b + 1):
            gs = row_groups(b, n)
            assert len(gs) == n and gs[0][0] == 0 and gs[-1][1] == b
            assert all(lo < hi for lo, hi in gs)
            assert all(gs[i][1] == gs[i + 1][0] for i in range(n - 1))
            sizes = [hi - lo for lo, hi in gs]
            assert max(sizes) - min(sizes) <= 1
    for bad in ((3, 0), (3, 4)):
        try:
            row_groups(*bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"row_groups{bad} accepted")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kb, "DT", torch.float32)
    cfg = RetroConfig(segment_size=512, update_interval=128)
    lay, kv, bt, sl, hdr, S, ix = kb.make_batch(2500, 3, cfg, device="cpu")
    q = torch.randn(3, kb.HQ, kb.D, generator=torch.Generator().manual_seed(1))
    whole, _ = reference.paged_decode_attention(q, kv, lay, bt, sl, hdr, ix.ibt, ix.pool,
                                                S, 0.088, select="bucket")
    for lo, hi in row_groups(3, 2):
        part, _ = reference.paged_decode_attention(q[lo:hi], kv, lay, bt[lo:hi], sl[lo:hi],
                                                   hdr, ix.ibt, ix.pool, S, 0.088,
                                                   select="bucket")
        assert torch.equal(part, whole[lo:hi])
