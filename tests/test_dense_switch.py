"""The GPU backend's dense switch (``dense_below``): which steps run vLLM's
FlashAttention, the predicates a captured graph reads, and the row counter. The
switch itself inside CUDA graphs runs in ``tests/gpu/test_engine_gpu.py``."""

import torch

from vllm_retro.backend.gpu import DENSE_MAX_ROWS, DenseSwitch, dense_step


def test_dense_step_rows_and_average_context():
    ub = torch.tensor([30000, 9000, 0, 0, 5000], dtype=torch.int32)
    assert dense_step(ub, 2, 30000, 20000, real_rows=2)       # average 19,500
    assert not dense_step(ub, 2, 30000, 19500, real_rows=2)   # not below
    assert not dense_step(ub, 2, 30000, 0, real_rows=2)       # off
    assert not dense_step(ub, 0, 30000, 40000)                # no decode rows
    # One row padded to a CUDA graph of two: dense; two rows padded to four: that
    # graph holds no dense path (only graphs of at most DENSE_MAX_ROWS rows do).
    assert dense_step(ub[1:], 2, 9000, 10000, real_rows=1)
    assert not dense_step(ub, 4, 30000, 20000, real_rows=2)
    # Rows after the decode rows (prefill rows) do not count.
    assert dense_step(ub, 2, 30000, 19501) and not dense_step(ub, 1, 30000, 30000)
    # More than DENSE_MAX_ROWS rows: retro's batched kernels, however short.
    many = torch.full((DENSE_MAX_ROWS + 1,), 100, dtype=torch.int32)
    assert not dense_step(many, DENSE_MAX_ROWS + 1, 100, 40000)
    assert dense_step(many, DENSE_MAX_ROWS, 100, 40000)
    # Without host bounds the longest sequence bounds every row.
    assert dense_step(None, 2, 16000, 16001) and not dense_step(None, 2, 16000, 16000)


def test_switch_sets_predicates_and_counts_rows():
    sw = DenseSwitch(40000, "cpu")
    assert not bool(sw.pred_dense) and bool(sw.pred_retro)
    ub = torch.tensor([20000, 0], dtype=torch.int32)
    assert sw.choose(ub, 2, 20000, real_rows=1)
    assert bool(sw.pred_dense) and not bool(sw.pred_retro) and sw.flash_rows == 1
    assert sw.choose(ub, 2, 20000, real_rows=1) and sw.flash_rows == 2
    long = torch.tensor([50000], dtype=torch.int32)
    assert not sw.choose(long, 1, 50000, real_rows=1)
    assert not bool(sw.pred_dense) and bool(sw.pred_retro) and sw.flash_rows == 2
