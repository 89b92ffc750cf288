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
