"""The decode kernels' grids fit one wave of resident programs on the GPU.

The launcher sizes its grids for ``PROGRAMS_PER_SM`` resident programs per SM
(:meth:`DecodeWorkspace.nsplit`); a kernel compiled with more registers or shared
memory than that allows runs its grid in two waves, about twice as slow. Registers
come from the GPU's own Triton (3.6 on the H200 host; the sm_90 compile check of CI
uses the CPU venv's Triton, which allocated 30 registers fewer for the score kernel
than the GPU's after one change), so this runs where the kernels run: on a GPU, in
the Llama-3-8B shape the benchmarks use (8 KV heads of 128, 4 query heads each,
bf16, 8-bit summaries) at one and two rows (the small-batch variants) and at 8 rows,
the largest batch where the grid holds 8 programs per row-head. Resources are
properties of the compiled variant, not of the data, so the rows carry a few
tokens and no index.
"""

import pytest
import torch

pytest.importorskip("triton")

from vllm_retro.index.paged import (IndexAllocator, IndexPool,  # noqa: E402
                                    PagedIndexLayout, make_headers)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="registers and residency are the GPU compiler's")

H, G, D, BS = 8, 4, 128, 16
#: Stages tuned to run their grid in one wave (the candidate kernel, 8 warps of 128
#: registers, holds 2 programs per SM and is known to take two at 8 rows; the
#: small-batch score kernel, which also holds 2, has a split of its own for that:
#: triton_decode.SMALL_BATCH_SCORE_PROGRAMS_PER_SM).
ONE_WAVE = ("score", "key", "collect", "attend")


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("wave", ["none", "resolve_kernel", "in_collect"])
def test_decode_grids_fit_one_wave(monkeypatch, wave, rows):
    """Without a wave buffer view; with one (the attention kernel's wave variant, the
    resolve kernel); with one and the lookups in the list kernel."""
    from vllm_retro.kernels import triton_decode as td
    from vllm_retro.memory import HostMirror, MirrorShape
    from vllm_retro.memory.cluster_cache import ClusterCache

    monkeypatch.setattr(td, "RECORD_RESOURCES", True)
    monkeypatch.setattr(td, "RESOLVE_IN_COLLECT", wave == "in_collect")
    td.LAST_KERNELS.clear()
    dev = "cuda"
    lay = PagedIndexLayout(H, D, BS, torch.bfloat16)
    nb = 64
    kv = lay.make_cache(nb, dev)
    headers = make_headers(nb, dev)
    pool = IndexPool(lay, 256, dev, summary_bits=8)
    alloc = IndexAllocator(256, rows, 8, dev)
    bt = torch.zeros(rows, 8, dtype=torch.int32, device=dev)
    bt[:, :2] = torch.arange(1, 2 * rows + 1, dtype=torch.int32, device=dev).view(rows, 2)
    seq = torch.full((rows,), 20, dtype=torch.int32, device=dev)
    q = torch.randn(rows, H * G, D, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    ws = td.DecodeWorkspace(pool.num_pages, H, G, D, rows, dev)
    view = None
    if wave != "none":
        mirror = HostMirror(MirrorShape(rows, 2, H, D, BS, pool.num_pages, torch.bfloat16),
                            8 << 20, device=dev, pin=True)
        view = ClusterCache.for_mirror(mirror, 64, 1024).view(mirror, 1)
    td.paged_decode_attention_triton(q, kv, lay, bt, seq, headers, alloc.ibt, pool, BS,
                                     D ** -0.5, out, ws, wave=view)
    torch.cuda.synchronize()
    res = td.kernel_resources(num_sms=sms)
    split = {"attend": ws.nsplit_attend(rows), "score": ws.nsplit_score(rows)}
    grid = {s: rows * H * split.get(s, ws.nsplit(rows)) for s in ONE_WAVE}
    short = {s: (res[s], grid[s]) for s in ONE_WAVE if res[s]["resident"] < grid[s]}
    assert not short, f"kernels in more than one wave (resources, grid programs): {short}"
