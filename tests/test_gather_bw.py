"""``scripts/gpu/gather_bw.py``'s KV-run gathers on the interpreter: the register
form and the TMA-box form read the same items (random KV-head runs of 4, 8 and 16
rows of a paged cache's rows), so their xor of everything read is the xor of the
items' elements computed with torch."""
import functools
import operator
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "gpu"))


@pytest.mark.parametrize("box", [4, 8, 16])
def test_kv_run_gathers_read_the_items(box, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gb = pytest.importorskip("gather_bw")
    pytest.importorskip("triton.tools.tensor_descriptor")
    g = torch.Generator().manual_seed(box)
    heads, cols, block = 2, 16, 16
    src = torch.randint(-2 ** 15, 2 ** 15, (8 * block, heads * cols), generator=g,
                        dtype=torch.int32).to(torch.int16)
    items = gb.kv_run_items(3 * (32 // box), src.shape[0], heads, cols, box, block, "cpu", g)
    assert (items[:, 0] % box == 0).all() and (items[:, 0] + box <= src.shape[0]).all()
    assert ((items[:, 1] >= 0) & (items[:, 1] < heads)).all()
    want = 0
    for r0, h in items.tolist():
        want ^= functools.reduce(operator.xor,
                                 src[r0:r0 + box, h * cols:(h + 1) * cols].flatten().tolist())
    for tma, unroll in ((False, 1), (True, 1), (True, 3)):
        fn, out = gb.gather_runs(src, items, box, programs=2, tma=tma, stages=2, cols=cols,
                                 unroll=unroll)
        fn()
        assert gb.run_checksum(out) == want, f"tma={tma} unroll={unroll}"
