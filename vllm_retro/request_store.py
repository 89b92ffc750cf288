"""RequestIndexStore: the wave indexes of the running requests of one worker.

One store per worker (owned by the backend's per-worker state, passed to the
attention impls). It maps ``(request id, layer name)`` to a :class:`WaveIndex`,
frees every index of a request when it finishes, is aborted or preempted, and
keeps the bytes held under a host-memory budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

from .wave_index import WaveIndex


class HostMemoryExceeded(RuntimeError):
    """A request's index would push the store past its host-memory budget."""


@dataclass
class StoreStats:
    """Running totals since the store was made.

    ``decode_calls`` and the fraction sums cover the index's own attend calls (one
    per decode row and layer). The vLLM backend (``backend/cpu.py``) also counts
    every decode row's reads, dense ones included, for its stats line and vLLM's
    ``/metrics``: rows on the index / dense (once per row, at the first layer), and
    per row and layer the tokens read exactly / estimated / in context (summed over
    KV heads) and the bytes read versus what dense attention would read.
    """

    decode_calls: int = 0
    exact_fraction_sum: float = 0.0
    estimated_fraction_sum: float = 0.0
    builds: int = 0
    freed_requests: int = 0
    retro_rows: int = 0
    dense_rows: int = 0
    exact_tokens: int = 0
    estimated_tokens: int = 0
    context_tokens: int = 0
    kv_bytes_read: int = 0
    kv_bytes_dense: int = 0

    def mean(self, total: float) -> float:
        return total / self.decode_calls if self.decode_calls else 0.0

    def minus(self, other: "StoreStats") -> "StoreStats":
        return StoreStats(*(getattr(self, f) - getattr(other, f)
                            for f in self.__dataclass_fields__))

    def copy(self) -> "StoreStats":
        return StoreStats(*(getattr(self, f) for f in self.__dataclass_fields__))


@dataclass
class RequestIndexStore:
    """Indexes of running requests, keyed by request id then layer name.

    Attributes:
        budget_bytes: host memory the indexes may hold together (None: no limit).
    """

    budget_bytes: Optional[int] = None
    _indexes: Dict[str, Dict[str, WaveIndex]] = field(default_factory=dict)
    _bytes: Dict[Tuple[str, str], int] = field(default_factory=dict)
    _total_bytes: int = 0
    stats: StoreStats = field(default_factory=StoreStats)

    def get(self, req_id: str, layer: str) -> Optional[WaveIndex]:
        return self._indexes.get(req_id, {}).get(layer)

    def put(self, req_id: str, layer: str, index: WaveIndex) -> None:
        """Stores (or re-accounts, after it grew) the index of ``(req_id, layer)``.

        Raises HostMemoryExceeded, storing nothing, if the budget would be exceeded.
        """
        key = (req_id, layer)
        new = index.nbytes()
        grow = new - self._bytes.get(key, 0)
        if self.budget_bytes is not None and grow > 0 and \
                self._total_bytes + grow > self.budget_bytes:
            raise HostMemoryExceeded(
                f"retro index of request {req_id!r} needs {grow} more bytes; "
                f"{self._total_bytes} of {self.budget_bytes} budget bytes in use")
        layers = self._indexes.setdefault(req_id, {})
        if layers.get(layer) is not index:
            self.stats.builds += 1
        layers[layer] = index
        self._bytes[key] = new
        self._total_bytes += grow

    def drop_layer(self, req_id: str, layer: str) -> None:
        layers = self._indexes.get(req_id)
        if layers is not None and layers.pop(layer, None) is not None:
            self._total_bytes -= self._bytes.pop((req_id, layer))

    def free(self, req_ids: Iterable[str]) -> int:
        """Drops every index of these requests; returns how many requests had one."""
        n = 0
        for r in req_ids:
            layers = self._indexes.pop(r, None)
            if layers is not None:
                n += 1
                for layer in layers:
                    self._total_bytes -= self._bytes.pop((r, layer))
        self.stats.freed_requests += n
        return n

    def retain_only(self, live_req_ids: Iterable[str]) -> int:
        """Frees the indexes of every request not in ``live_req_ids``."""
        live = set(live_req_ids)
        return self.free([r for r in self._indexes if r not in live])

    def request_ids(self) -> Tuple[str, ...]:
        return tuple(self._indexes)

    def nbytes(self) -> int:
        """Bytes held by all stored indexes (as of their last ``put``)."""
        return self._total_bytes

    def record_decode(self, index: WaveIndex) -> None:
        st = index.last_stats
        if st is not None:
            self.stats.decode_calls += 1
            self.stats.exact_fraction_sum += st.exact_fraction
            self.stats.estimated_fraction_sum += st.estimated_fraction
