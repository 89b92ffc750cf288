"""Host-to-device copies of small index tensors that do not stall the host.

A copy from pageable host memory to a CUDA device waits until the stream has
drained (the driver stages it through pinned memory only once earlier work is
done), so ``torch.tensor(list, device="cuda")`` inside a decode step's bookkeeping
makes the host wait for the previous step's forward and undoes vLLM's
asynchronous scheduling. :func:`to_device` stages through PyTorch's pinned-memory
cache instead and copies with ``non_blocking``: stream-ordered, no wait. The
pinned block goes back to the cache once the copy has completed (PyTorch records
the copy's stream on it).
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` (numbers, a sequence of them, or a tensor) as a ``dtype`` tensor on
    ``device``; on CUDA through pinned memory, without a host-device sync."""
    device = torch.device(device)
    if isinstance(values, torch.Tensor) and values.device.type != "cpu":
        return values.to(device=device, dtype=dtype)
    t = torch.as_tensor(values, dtype=dtype, device="cpu")
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
