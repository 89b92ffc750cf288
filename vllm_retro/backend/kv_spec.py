"""vLLM block release for the wave buffer (issue 14): ``RetroSpec`` + ``RetroManager``.

With ``wave_buffer`` on, retro's attention layers report :class:`RetroSpec` (a
``FullAttentionSpec`` with vLLM's stock page size (the index lives in retro's own
index pool, not in the pages) that adds the steady
zone: sink tokens and recent window). vLLM's scheduler then builds a
:class:`RetroManager` for the group (``KVCacheSpecRegistry``), which frees a
running request's blocks the way vLLM's own sliding-window managers do
(``remove_skipped_blocks``, called by ``allocate_slots`` each step on the
processed-token basis): released blocks go back to the block pool and are
replaced by the null block in the request's list.

A block is released only when all of these hold (``RetroManager.release_end``):

* it lies in ``[sink blocks, (processed - recent_tokens) // block_size)``: the
  sinks (at least one block, which also names the request on the worker) and
  the recent window stay;
* it lies below the request's *mirrored horizon*: every worker (all TP/PP ranks)
  reported that tokens ``[0, horizon)`` of the request are in the host mirror.
  With nothing reported, nothing is released. The worker reports during a
  prompt's prefill only the tokens more than the *prefill lag*
  (:func:`prefill_lag`) behind its front, so prompts that fit the KV cache keep
  every block until they are complete, and a larger one (a 1M-token request)
  streams its early blocks to host memory while it is prefilled.

Admission: :meth:`RetroSpec.max_memory_usage_bytes` (vLLM's start-up check that
one request of ``max_model_len`` fits) counts only what cannot go to the host
mirror, and :class:`RetroManager` caps the blocks vLLM reserves for admitting a
request (``scheduler_reserve_full_isl``) at the KV cache's size: a prompt larger
than the cache is admitted when the whole cache is free and stays within it.

The horizon travels worker -> scheduler through vLLM's KV-connector channel
(both 0.26 and 0.32): the worker-side :class:`MirrorReporter` collects what the
host mirror finished, :meth:`RetroConnector.build_connector_worker_meta` returns
it as :class:`RetroWorkerMeta`, vLLM aggregates the workers' metas
(``KVOutputAggregator``) into ``KVConnectorOutput.kv_connector_worker_meta``,
and the scheduler-side connector hands it (``update_connector_output``) to the
:class:`MirrorHorizons` that the managers of the same block pool read.

A report is a promise: from the step after it, that worker never reads the
request's blocks below the horizon from vLLM's paged cache (the worker's block
table is append-only, so a released entry goes stale and is reused by other
requests). In particular a request that reported a horizon can no longer be
attended densely: :meth:`MirrorReporter.require_paged_kv` fails it loudly.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from .. import compat
from .refusals import refuse


# ----------------------------------------------------------------- refusals
def wave_buffer_reasons(*, cpu_platform: bool, enable_prefix_caching: bool) -> List[str]:
    """Why the wave buffer's block release cannot run here (empty: it can)."""
    reasons = []
    if cpu_platform:
        reasons.append(
            "wave_buffer on the CPU backend (it keeps every request's index in host "
            "memory and decodes densely from vLLM's paged cache when a row has no "
            "index, which released blocks would break; the wave buffer is built for "
            "the GPU paged index, vLLM 0.26)")
    if enable_prefix_caching:
        reasons.append(
            "wave_buffer with prefix caching (a released block's KV would be missing "
            "from the cache hits of later requests)")
    return reasons


def dense_after_release_message(req_id: str, what: str) -> str:
    return (f"retro: request {req_id!r} cannot be attended densely ({what}): its KV "
            "blocks outside the sinks and recent window may have been released to "
            "other requests (wave_buffer); the request fails instead of reading "
            "another request's KV")


# -------------------------------------------------------------------- spec
@dataclass(frozen=True, kw_only=True)
class RetroSpec(FullAttentionSpec):
    """A retro layer's KV-cache spec when ``wave_buffer`` is on.

    Attributes:
        retro_sink_tokens: leading tokens whose blocks are never released (the
            sinks rounded up to whole blocks, at least one block).
        retro_recent_tokens: trailing tokens whose blocks are never released.
    """

    retro_sink_tokens: int
    retro_recent_tokens: int
    # Release during prefill (see prefill_lag) and what the host mirror can hold:
    # the option (0: automatic), the margin kept free for chunks in flight, and the
    # tokens (all layers) the host budget holds.
    retro_prefill_resident_tokens: int = 0
    retro_prefill_margin_tokens: int = 0
    retro_host_tokens: int = 0

    def _retro_fields(self) -> tuple:
        return (self.retro_sink_tokens, self.retro_recent_tokens,
                self.retro_prefill_resident_tokens, self.retro_prefill_margin_tokens,
                self.retro_host_tokens)

    @classmethod
    def merge(cls, specs: List["RetroSpec"]) -> "RetroSpec":
        """As ``FullAttentionSpec.merge`` (same page layout everywhere), keeping the
        steady zone and the release parameters, which all layers of the group must
        share."""
        if not all(isinstance(s, RetroSpec) for s in specs):
            raise ValueError("retro: all layers of a KV-cache group must report "
                             "RetroSpec when wave_buffer is on")
        zones = {s._retro_fields() for s in specs}
        if len(zones) != 1:
            raise ValueError(f"retro: layers of one KV-cache group disagree on the "
                             f"steady zone (sink, recent tokens) or the release "
                             f"parameters: {sorted(zones)}")
        base = FullAttentionSpec.merge(specs)
        sink, recent, resident, margin, host = zones.pop()
        return cls(**compat.spec_fields(base), retro_sink_tokens=sink,
                   retro_recent_tokens=recent, retro_prefill_resident_tokens=resident,
                   retro_prefill_margin_tokens=margin, retro_host_tokens=host)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """What one request of ``max_model_len`` needs in GPU blocks: the tokens the
        host mirror cannot take, at least the steady zone and the prefill margin
        (never more than full attention's)."""
        full = super().max_memory_usage_bytes(vllm_config)
        n = int(vllm_config.model_config.max_model_len)
        floor = self.retro_sink_tokens + self.retro_recent_tokens + \
            self.retro_prefill_margin_tokens
        need = max(n - self.retro_host_tokens, floor)
        return min(full, -(-need // self.block_size) * self.page_size_bytes)


def prefill_margin_tokens(config, vllm_config=None) -> int:
    """Tokens of the KV cache kept free of a prefilling request's resident zone:
    four scheduled chunks (the one being allocated, the ones in flight while a
    report travels to the scheduler) and two segments (clustering cuts whole
    segments, so the reported horizon trails the lag by up to one)."""
    sc = getattr(vllm_config, "scheduler_config", None)
    chunk = int(getattr(sc, "max_num_batched_tokens", 0) or 8192)
    return 4 * chunk + 2 * config.segment_size


def prefill_lag(resident_tokens: int, margin_tokens: int, kv_tokens: int) -> int:
    """How far behind the prefill front a prompt's tokens stay in GPU blocks: the
    ``prefill_resident_tokens`` option, else (0) the KV cache's ``kv_tokens`` less
    the margin, at least half the cache (a small cache is not emptied into host
    memory by every prompt). The workers use it for what they cluster, mirror and
    report during prefill."""
    if resident_tokens:
        return int(resident_tokens)
    return max(int(kv_tokens) // 2, int(kv_tokens) - int(margin_tokens))


def wave_host_bytes(config, vllm_config=None) -> int:
    """The host mirror's budget: ``host_memory_gib``, else this worker's share of
    :func:`~vllm_retro.memory.host_mirror.default_host_budget_bytes` (the workers
    of one engine, TP x PP, as a rule share one host rather than each pinning 3/4
    of its memory)."""
    from ..memory.host_mirror import default_host_budget_bytes
    if config.host_memory_gib:
        return int(config.host_memory_gib * 2**30)
    workers = int(getattr(getattr(vllm_config, "parallel_config", None),
                          "world_size", 1) or 1)
    return default_host_budget_bytes() // max(1, workers)


def retro_spec(spec: FullAttentionSpec, config, vllm_config=None) -> RetroSpec:
    """``spec`` as a :class:`RetroSpec` for ``config`` (``vllm_config``: the chunk
    size, the number of layers and workers, for the release parameters)."""
    from ..index.paged import sink_end
    host_tokens = 0
    mc = getattr(vllm_config, "model_config", None)
    if mc is not None:
        layers = int(mc.get_num_layers(vllm_config.parallel_config))
        per_token = layers * spec.page_size_bytes // spec.block_size
        host_tokens = wave_host_bytes(config, vllm_config) // max(1, per_token)
    return RetroSpec(**compat.spec_fields(spec),
                     retro_sink_tokens=sink_end(config, spec.block_size),
                     retro_recent_tokens=config.recent_tokens,
                     retro_prefill_resident_tokens=config.prefill_resident_tokens,
                     retro_prefill_margin_tokens=prefill_margin_tokens(config, vllm_config),
                     retro_host_tokens=host_tokens)


# ------------------------------------------------- scheduler-side horizons
class MirrorHorizons:
    """Per request: the token count that every worker has mirrored to host.

    One instance per vLLM block pool (:func:`horizons_for`), shared by the
    scheduler-side connector (writes) and the pool's :class:`RetroManager` s
    (read). A request's horizon is the minimum over the ``world_size`` ranks, and
    0 until every rank has reported. Reports for requests that no attached
    manager holds (finished, preempted) are dropped, so a late report cannot
    leak into a resumed request.
    """

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size
        self._ranks: Dict[str, Dict[int, int]] = {}
        self._managers: "weakref.WeakSet" = weakref.WeakSet()

    def attach(self, manager) -> None:
        self._managers.add(manager)

    def _held(self, req_id: str) -> bool:
        return any(req_id in m.req_to_blocks for m in self._managers)

    def update(self, rank: int, req_id: str, tokens: int) -> bool:
        """Rank ``rank`` mirrored tokens ``[0, tokens)`` of ``req_id``; True if kept."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"retro: mirror report from rank {rank}, world size "
                             f"{self.world_size}")
        if not self._held(req_id):
            return False
        per_rank = self._ranks.setdefault(req_id, {})
        per_rank[rank] = max(per_rank.get(rank, 0), int(tokens))
        return True

    def apply(self, meta: Optional["RetroWorkerMeta"]) -> None:
        if meta is None:
            return
        for rank, reqs in meta.horizons.items():
            for req_id, tokens in reqs.items():
                self.update(rank, req_id, tokens)

    def get(self, req_id: str) -> int:
        per_rank = self._ranks.get(req_id)
        if not per_rank or len(per_rank) < self.world_size:
            return 0
        return min(per_rank.values())

    def drop(self, req_id: str) -> None:
        self._ranks.pop(req_id, None)

    def __len__(self) -> int:
        return len(self._ranks)


_HORIZONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def horizons_for(block_pool) -> MirrorHorizons:
    """The :class:`MirrorHorizons` of ``block_pool`` (created on first use)."""
    h = _HORIZONS.get(block_pool)
    if h is None:
        h = _HORIZONS[block_pool] = MirrorHorizons()
    return h


# ------------------------------------------------------------------ manager
class RetroManager(FullAttentionManager):
    """Full-attention block manager that releases mirrored blocks outside the
    steady zone (see the module docstring for the rule)."""

    def __init__(self, kv_cache_spec: RetroSpec, **kwargs) -> None:
        caching = bool(kwargs.get("enable_caching"))
        refuse(wave_buffer_reasons(cpu_platform=False, enable_prefix_caching=caching))
        super().__init__(kv_cache_spec, **kwargs)
        self.sink_blocks = max(1, math.ceil(kv_cache_spec.retro_sink_tokens /
                                            self.block_size))
        self.recent_tokens = kv_cache_spec.retro_recent_tokens
        self.horizons = horizons_for(self.block_pool)
        self.horizons.attach(self)
        self.num_released_blocks = 0
        # Admission (scheduler_reserve_full_isl): a request reserves at most the
        # KV cache's blocks; a larger prompt is released behind its prefill lag
        # (prefill_lag), so it never holds more.
        compat.set_admission_cap(self, max(1, self.block_pool.num_gpu_blocks - 1))

    def release_end(self, processed: int, num_prompt_tokens: Optional[int],
                    horizon: int) -> int:
        """End (exclusive, in blocks) of the releasable range that starts at
        ``sink_blocks``; ``<= sink_blocks`` means nothing is releasable. During a
        prompt's prefill too: the worker reports a horizon then only for tokens
        far behind the front, which later chunks read back from the mirror."""
        recent_end = (processed - self.recent_tokens) // self.block_size
        mirrored_end = min(horizon, processed) // self.block_size
        return min(recent_end, mirrored_end)

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: Optional[int] = None) -> None:
        end = self.release_end(processed_computed_tokens, num_prompt_tokens,
                               self.horizons.get(request_id))
        if end <= self.sink_blocks:
            return
        free_before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, self.sink_blocks, end)
        self.num_released_blocks += self.block_pool.get_num_free_blocks() - free_before

    def free(self, request_id: str) -> None:
        """Finish, abort and preemption: the remaining blocks go back to the pool
        and the request's horizon is forgotten (a resumed request recomputes its
        KV and mirrors it again)."""
        super().free(request_id)
        self.horizons.drop(request_id)


# ------------------------------------------------------ worker-side reports
@dataclass
class RetroWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler: ``horizons[rank][req_id]`` = tokens mirrored to host."""

    horizons: Dict[int, Dict[str, int]] = field(default_factory=dict)

    def aggregate(self, other: "RetroWorkerMeta") -> "RetroWorkerMeta":
        merged = {r: dict(reqs) for r, reqs in self.horizons.items()}
        for rank, reqs in other.horizons.items():
            mine = merged.setdefault(rank, {})
            for req_id, tokens in reqs.items():
                mine[req_id] = max(mine.get(req_id, 0), tokens)
        return RetroWorkerMeta(merged)


class MirrorReporter:
    """One worker's mirrored horizons, reported to the scheduler once per step.

    The host mirror calls :meth:`mirrored` when tokens ``[0, tokens)`` of a
    request are in host memory for every retro layer of this worker (and the
    worker will read them from there from the next step on); the connector calls
    :meth:`take` after each step and :meth:`forget` for finished, preempted and
    resumed requests.
    """

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self._reported: Dict[str, int] = {}
        self._pending: Dict[str, int] = {}

    def mirrored(self, req_id: str, tokens: int) -> None:
        tokens = int(tokens)
        if tokens > self._reported.get(req_id, 0):
            self._reported[req_id] = tokens
            self._pending[req_id] = tokens

    def horizon(self, req_id: str) -> int:
        return self._reported.get(req_id, 0)

    def forget(self, req_ids: Iterable[str]) -> None:
        for r in req_ids:
            self._reported.pop(r, None)
            self._pending.pop(r, None)

    def take(self) -> Optional[RetroWorkerMeta]:
        if not self._pending:
            return None
        meta = RetroWorkerMeta({self.rank: self._pending})
        self._pending = {}
        return meta

    def require_paged_kv(self, req_id: str, what: str) -> None:
        """Raise if ``req_id`` may have lost blocks (a horizon was reported): a
        dense fallback or any read of its paged KV below the horizon must fail
        loudly instead of reading blocks now owned by other requests."""
        if self._reported.get(req_id, 0) > 0:
            raise RuntimeError(dense_after_release_message(req_id, what))


_REPORTERS: Dict[int, MirrorReporter] = {}


def reporter_for(vllm_config) -> MirrorReporter:
    """The worker's :class:`MirrorReporter` (one per ``VllmConfig`` object)."""
    key = id(vllm_config)
    rep = _REPORTERS.get(key)
    if rep is None:
        rank = getattr(getattr(vllm_config, "parallel_config", None), "rank", 0) or 0
        rep = _REPORTERS[key] = MirrorReporter(rank)
        weakref.finalize(vllm_config, _REPORTERS.pop, key, None)
    return rep


def existing_reporter(vllm_config) -> Optional[MirrorReporter]:
    return _REPORTERS.get(id(vllm_config))


# ------------------------------------------------------------- registration
def ensure_registered(vllm_config=None) -> None:
    """Register ``RetroSpec -> RetroManager`` (grouped with full attention) in
    vLLM's ``KVCacheSpecRegistry``; idempotent. The built-in specs are registered
    first: vLLM registers them lazily only while the registry is empty, so a
    plugin registering first would otherwise hide them all."""
    if vllm_config is None:
        vllm_config = compat.current_vllm_config_or_none()
    KVCacheSpecRegistry._ensure_registered(vllm_config)
    KVCacheSpecRegistry.register(RetroSpec, RetroManager,
                                 uniform_type_base_spec=FullAttentionSpec)


# Wherever this module is imported (the worker making the spec, the engine core
# unpickling the workers' specs), RetroSpec is registered before vLLM checks it.
ensure_registered()
