"""Request identity and lifecycle for retro, through vLLM's KV-connector API.

vLLM gives an attention backend neither request ids nor lifecycle events. Of the
ways to get them, the KV connector (``KVConnectorBase_V1``) is the one public
plugin surface that both of vLLM 0.26's model runners (V1 and the default V2)
drive in the same way, before every forward, FULL CUDA-graph replays included:

* scheduler side (engine core): :meth:`RetroConnector.build_connector_meta` turns
  each step's ``SchedulerOutput`` into a small :class:`RetroStepMetadata` (new and
  resumed requests with their KV block ids and prompt length, appended blocks,
  computed-token counts, finished / aborted / preempted ids);
* worker side: :meth:`RetroConnector.bind_connector_metadata`, which both runners
  call before the step's forward, hands it to the worker (the request table, then
  the index maintenance of :mod:`vllm_retro.backend.gpu` or the host-index
  lifecycle of :mod:`vllm_retro.backend.cpu`).

The same connector carries retro's statistics back from the workers into vLLM's
metrics (``get_kv_connector_stats`` / ``build_kv_connector_stats`` /
``build_prom_metrics``; :mod:`.metrics`), and, with ``wave_buffer`` on, each
worker's mirrored horizons to the scheduler's block managers
(``build_connector_worker_meta`` -> ``update_connector_output``; :mod:`.kv_spec`).

The runners' own hooks (``_update_states`` in V1, ``execute_model`` / ``finish_requests``
in V2) would also see these events, but they are private, differ between the two
runners and between releases; the connector API is versioned, shared and also the
route the wave buffer (block release, host mirror) and worker-side metrics need.
Its costs: it takes vLLM's single connector slot (a user's own
``--kv-transfer-config`` is refused with a reason), and the API is marked
experimental. The plugin sets the connector up itself when retro is selected.

Decode kernels never need request ids: a row's request is named by its first KV
block (prefix caching is off, so that block is the request's own), which the
kernels read from the block table on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1,
                                                               KVConnectorMetadata,
                                                               KVConnectorRole)

from .. import compat
from ..request_table import RequestUpdate
from .metrics import RetroConnectorStats, RetroPromMetrics, reporter_for

CONNECTOR_NAME = "RetroConnector"
CONNECTOR_MODULE = "vllm_retro.backend.connector"

logger = compat.logger(__name__)


@dataclass
class RetroStepMetadata(KVConnectorMetadata):
    """One step's lifecycle events, scheduler -> workers (see :class:`RequestTable`)."""

    updates: List[RequestUpdate] = field(default_factory=list)
    finished: List[str] = field(default_factory=list)
    num_preempted: int = 0


def _group0(block_ids) -> List[int]:
    """Block ids of KV-cache group 0 (retro models have exactly one group)."""
    if block_ids is None:
        return []
    if len(block_ids) and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


def step_metadata(scheduler_output, prompt_lens: Dict[str, int]) -> RetroStepMetadata:
    """:class:`RetroStepMetadata` of one ``SchedulerOutput`` (vLLM 0.26 / 0.32)."""
    meta = RetroStepMetadata()
    preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
    meta.finished = sorted(set(scheduler_output.finished_req_ids) | preempted)
    meta.num_preempted = len(preempted)
    sched = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    for nr in scheduler_output.scheduled_new_reqs:
        plen = prompt_lens.get(nr.req_id)
        if plen is None:
            toks = nr.prompt_token_ids
            plen = len(toks) if toks is not None else int(nr.prompt_embeds.shape[0])
        meta.updates.append(RequestUpdate(nr.req_id, True, _group0(nr.block_ids),
                                          nr.num_computed_tokens, plen,
                                          int(sched.get(nr.req_id, -1))))
    cached = scheduler_output.scheduled_cached_reqs
    resumed = set(getattr(cached, "resumed_req_ids", None) or ())
    flags = getattr(cached, "resumed_from_preemption", None)
    for i, rid in enumerate(cached.req_ids):
        reset = rid in resumed or bool(flags[i] if flags is not None else False)
        meta.updates.append(RequestUpdate(
            rid, reset, _group0(cached.new_block_ids[i]), cached.num_computed_tokens[i],
            prompt_lens.get(rid, -1) if reset else -1, int(sched.get(rid, -1))))
    return meta


class RetroConnector(KVConnectorBase_V1):
    """Retro's KV connector: moves no KV, carries the request lifecycle to the worker."""

    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._prompt_lens: Dict[str, int] = {}
        self._worker = None
        self._stats = None
        from ..worker_state import retro_config_from_vllm
        self._wave_buffer = retro_config_from_vllm(vllm_config).wave_buffer
        self._mirror = None     # worker: this worker's MirrorReporter (wave_buffer)
        self._horizons = None   # scheduler: the block pool's MirrorHorizons (wave_buffer)
        if role == KVConnectorRole.WORKER:
            self._worker = _worker_side(vllm_config)
            self._stats = reporter_for(self._worker, vllm_config)
            if self._wave_buffer:
                from . import kv_spec
                self._mirror = kv_spec.reporter_for(vllm_config)

    # ----------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        self._prompt_lens[request.request_id] = request.num_prompt_tokens

    def on_new_request(self, request) -> None:
        self._prompt_lens[request.request_id] = request.num_prompt_tokens

    def build_connector_meta(self, scheduler_output) -> RetroStepMetadata:
        return step_metadata(scheduler_output, self._prompt_lens)

    def request_finished(self, request, block_ids) -> tuple[bool, Optional[dict]]:
        self._prompt_lens.pop(request.request_id, None)
        return False, None

    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        """Both builds call this once the scheduler's KV-cache manager exists: the
        mirrored horizons reach the RetroManagers of this pool through it."""
        if self._wave_buffer:
            from . import kv_spec
            self._horizons = kv_spec.horizons_for(gpu_block_pool)
            self._horizons.world_size = self._vllm_config.parallel_config.world_size

    def update_connector_output(self, connector_output) -> None:
        """Scheduler: the workers' aggregated mirrored horizons (wave_buffer)."""
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if meta is None:
            return
        from . import kv_spec
        if not isinstance(meta, kv_spec.RetroWorkerMeta) or self._horizons is None:
            raise TypeError(f"retro connector got worker metadata "
                            f"{type(meta).__name__} (wave_buffer "
                            f"{'on' if self._wave_buffer else 'off'})")
        self._horizons.apply(meta)

    # -------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: Dict[str, Any]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata) -> None:
        # Both vLLM builds bind the step's metadata before the forward (0.32 starts
        # KV loads only after launching it), so the step's events are applied here.
        super().bind_connector_metadata(connector_metadata)
        if not isinstance(connector_metadata, RetroStepMetadata):
            raise TypeError(f"retro connector got {type(connector_metadata).__name__} "
                            "metadata")
        if self._mirror is not None:
            # finished, aborted, preempted and resumed requests start over
            self._mirror.forget(connector_metadata.finished)
            self._mirror.forget(u.req_id for u in connector_metadata.updates if u.reset)
        self._worker.on_step(connector_metadata)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return

    def build_connector_worker_meta(self):
        """Worker: the horizons the host mirror reached since the last step."""
        return None if self._mirror is None else self._mirror.take()

    # ---------------------------------------------------------------- metrics
    def get_kv_connector_stats(self) -> Optional[RetroConnectorStats]:
        """Worker: this worker's statistics when they changed (runners call this
        after every forward); scheduler: none."""
        return None if self._stats is None else self._stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: Optional[dict] = None) -> RetroConnectorStats:
        return RetroConnectorStats(data)

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames,
                           per_engine_labelvalues) -> RetroPromMetrics:
        return RetroPromMetrics(vllm_config, metric_types, labelnames,
                                per_engine_labelvalues)


def _worker_side(vllm_config):
    """What a step's events drive in this worker: the paged-index manager on GPUs,
    the host-index lifecycle on CPUs. Both own ``RetroWorkerState.requests``."""
    if compat.is_cpu_platform():
        from .cpu import CpuLifecycle
        return CpuLifecycle(vllm_config)
    from .gpu import manager_for
    return manager_for(vllm_config)


def kv_transfer_config():
    """The ``KVTransferConfig`` that installs :class:`RetroConnector`."""
    from vllm.config import KVTransferConfig
    return KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                            kv_connector_module_path=CONNECTOR_MODULE)
