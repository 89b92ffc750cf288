"""Request identity and lifecycle for retro, through vLLM's KV-connector API.

vLLM gives an attention backend neither request ids nor lifecycle events. Of the
ways to get them, the KV connector (``KVConnectorBase_V1``) is the one public
plugin surface that both of vLLM 0.26's model runners (V1 and the default V2)
drive in the same way, before every forward, FULL CUDA-graph replays included:

* scheduler side (engine core): :meth:`RetroConnector.build_connector_meta` turns
  each step's ``SchedulerOutput`` into a small :class:`RetroStepMetadata` (new and
  resumed requests with their KV block ids and prompt length, appended blocks,
  computed-token counts, finished / aborted / preempted ids);
* worker side: :meth:`RetroConnector.start_load_kv` hands it to the worker's retro
  state (:meth:`RequestTable.apply`, then the index maintenance of
  :mod:`vllm_retro.backend.gpu`) before the step's forward.

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

CONNECTOR_NAME = "RetroConnector"
CONNECTOR_MODULE = "vllm_retro.backend.connector"

logger = compat.logger(__name__)


@dataclass
class RequestUpdate:
    """What one step changes of one scheduled request.

    reset: the request (re)starts from token 0 (new, or resumed after preemption):
        ``blocks`` replace its block list and its index starts over.
    blocks: KV block ids appended (or, with ``reset``, the whole list).
    num_computed: tokens whose KV is in the cache before this step's forward.
    prompt_len: prompt tokens (-1 when unchanged).
    """

    req_id: str
    reset: bool
    blocks: List[int]
    num_computed: int
    prompt_len: int = -1


@dataclass
class RetroStepMetadata(KVConnectorMetadata):
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
    for nr in scheduler_output.scheduled_new_reqs:
        plen = prompt_lens.get(nr.req_id)
        if plen is None:
            toks = nr.prompt_token_ids
            plen = len(toks) if toks is not None else int(nr.prompt_embeds.shape[0])
        meta.updates.append(RequestUpdate(nr.req_id, True, _group0(nr.block_ids),
                                          nr.num_computed_tokens, plen))
    cached = scheduler_output.scheduled_cached_reqs
    resumed = set(getattr(cached, "resumed_req_ids", None) or ())
    flags = getattr(cached, "resumed_from_preemption", None)
    for i, rid in enumerate(cached.req_ids):
        reset = rid in resumed or bool(flags[i] if flags is not None else False)
        meta.updates.append(RequestUpdate(
            rid, reset, _group0(cached.new_block_ids[i]), cached.num_computed_tokens[i],
            prompt_lens.get(rid, -1) if reset else -1))
    return meta


@dataclass
class RequestEntry:
    """Worker-side state of one running request."""

    req_id: str
    blocks: List[int]
    prompt_len: int
    num_computed: int = 0
    clustered_end: int = 0       # end of the clustered zone (0: no index yet)
    num_clusters: int = 0        # clusters with tokens, over all segments
    is_new: bool = True          # header not yet reset on the device


class RequestTable:
    """The running requests of one worker, kept from the connector's metadata."""

    def __init__(self) -> None:
        self.entries: Dict[str, RequestEntry] = {}
        self.preemptions = 0
        self.freed = 0

    def apply(self, meta: RetroStepMetadata) -> List[RequestEntry]:
        """Applies one step; returns the entries scheduled in it."""
        for rid in meta.finished:
            if self.entries.pop(rid, None) is not None:
                self.freed += 1
        self.preemptions += meta.num_preempted
        out = []
        for u in meta.updates:
            e = self.entries.get(u.req_id)
            if u.reset or e is None:
                if e is None and not u.reset:
                    logger.warning("retro: request %s scheduled without having been "
                                   "announced; indexing it from its next restart",
                                   u.req_id)
                    continue
                plen = u.prompt_len if u.prompt_len >= 0 else u.num_computed
                e = RequestEntry(u.req_id, list(u.blocks), plen)
                self.entries[u.req_id] = e
            else:
                e.blocks.extend(u.blocks)
            e.num_computed = u.num_computed
            out.append(e)
        return out


class RetroConnector(KVConnectorBase_V1):
    """Retro's KV connector: moves no KV, carries the request lifecycle to the worker."""

    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._prompt_lens: Dict[str, int] = {}
        self._worker = None
        if role == KVConnectorRole.WORKER:
            # The worker's paged-index manager: it owns the request table.
            from .gpu import manager_for
            self._worker = manager_for(vllm_config)

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

    # -------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: Dict[str, Any]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RetroStepMetadata)
        self._worker.on_step(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        return

    def wait_for_save(self) -> None:
        return


def kv_transfer_config():
    """The ``KVTransferConfig`` that installs :class:`RetroConnector`."""
    from vllm.config import KVTransferConfig
    return KVTransferConfig(kv_connector=CONNECTOR_NAME, kv_role="kv_both",
                            kv_connector_module_path=CONNECTOR_MODULE)
