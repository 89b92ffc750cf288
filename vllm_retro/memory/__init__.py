"""The wave buffer's memory tiers (issue 14): the pinned host mirror of clustered KV
(:mod:`.host_mirror`) and the GPU cluster cache in front of it (:mod:`.cluster_cache`).

Layering: ``backend/`` -> ``memory/`` -> ``index/`` -> ``kernels/``; nothing here
imports vLLM. The GPU backend (``backend/gpu.py``) allocates both and drives them
from its index maintenance; docs/design.md §8 says what is built.
"""

from .host_mirror import (ExtentAllocator, HostMemoryExceeded, HostMirror, MirrorShape,
                          default_host_budget_bytes)

__all__ = ["ExtentAllocator", "HostMemoryExceeded", "HostMirror", "MirrorShape",
           "default_host_budget_bytes"]
