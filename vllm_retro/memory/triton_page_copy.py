"""Fills cluster-cache slots with pages of the host mirror: one Triton program per page.

The rows to read are computed on the device (:meth:`ClusterCache.admit`), so the
copy cannot go through the host's copy calls without reading them back. Instead
the kernel reads the arena itself: on CUDA the arena is pinned host memory, which
under unified virtual addressing has a device address (Triton's launcher asks the
driver for it, ``CU_POINTER_ATTRIBUTE_DEVICE_POINTER``), so the loads cross PCIe
directly (zero-copy). On CPU tensors the kernel runs in Triton's interpreter
(``TRITON_INTERPRET=1`` when this module is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_pages_kernel(src, dst, rows, slots, PAGE_ELEMS: tl.constexpr,
                       ROW_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    row = tl.load(rows + i).to(tl.int64)
    slot = tl.load(slots + i).to(tl.int64)
    # Entries not admitted carry slot -1: skipping them saves their PCIe reads.
    if slot >= 0:
        for off in range(0, PAGE_ELEMS, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            m = idx < PAGE_ELEMS
            x = tl.load(src + row * ROW_ELEMS + idx, mask=m)
            tl.store(dst + slot * PAGE_ELEMS + idx, x, mask=m)


def interpreting() -> bool:
    """Whether the kernel runs in Triton's CPU interpreter (decided at import)."""
    return type(_copy_pages_kernel).__name__ == "InterpretedFunction"


def copy_pages(arena: torch.Tensor, cache_kv: torch.Tensor, rows: torch.Tensor,
               slots: torch.Tensor) -> None:
    """``cache_kv[slots[i]] = arena[rows[i] : rows[i] + page_tokens]`` for every ``i``.

    ``arena``: ``[rows, 2D]`` (pinned host memory for a CUDA cache); ``cache_kv``:
    ``[slots, page_tokens, 2D]``, contiguous; ``rows``/``slots``: ``[N]`` int on the
    cache's device, distinct slots; slot -1: nothing copied for that entry.
    """
    n = rows.numel()
    if n == 0:
        return
    if arena.dtype != cache_kv.dtype or not (arena.is_contiguous() and
                                             cache_kv.is_contiguous()):
        raise ValueError("copy_pages: arena and cache must be contiguous, of one dtype")
    page_elems = cache_kv[0].numel()
    block = min(4096, triton.next_power_of_2(page_elems))
    _copy_pages_kernel[(n,)](arena, cache_kv, rows.contiguous(), slots.contiguous(),
                             PAGE_ELEMS=page_elems, ROW_ELEMS=arena.shape[1], BLOCK=block)
