"""Which ops of the compiled extension ``vllm_retro._C`` have CUDA kernels here (it
builds with CUDA only where nvcc and a CUDA torch are present): one lookup per op,
cached, for every caller that picks a CUDA op or its fallback."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def has_cuda_kernel(op: str) -> bool:
    """Whether ``torch.ops.vllm_retro.<op>`` has a CUDA kernel (the extension
    imports and was built with CUDA)."""
    try:
        from .. import _C  # noqa: F401  (loading registers the ops)
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"vllm_retro::{op}",
                                                                   "CUDA"))
    except Exception:  # no extension, or one without the op
        return False
