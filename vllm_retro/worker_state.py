"""Per-worker retro state: the request table, the host index store (CPU) or the
paged-index manager (GPU), and counters.

vLLM gives attention backends neither request ids nor a lifecycle hook. Retro's
KV connector (``backend.connector``) feeds each step's lifecycle events into
``requests`` before the forward; the metadata builders and impls read it here.

One state exists per ``VllmConfig`` object: the runner, the builders, the
connector and the attention impls of one worker all hold the same config object,
and two engines in one process (tests) get separate states.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .config import RetroConfig
from .request_store import RequestIndexStore, StoreStats
from .request_table import RequestTable

RETRO_CONFIG_KEY = "retro"


def retro_config_from_vllm(vllm_config) -> RetroConfig:
    """RetroConfig from ``vllm_config.additional_config["retro"]`` (validated)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    if not isinstance(extra, dict):
        raise ValueError("additional_config must be a JSON object / dict")
    opts = extra.get(RETRO_CONFIG_KEY, {})
    if not isinstance(opts, dict):
        raise ValueError(
            f'additional_config["{RETRO_CONFIG_KEY}"] must be a dict of retro '
            f"options, got {type(opts).__name__}")
    return RetroConfig.from_dict(opts)


@dataclass
class RetroWorkerState:
    """What one worker's retro attention layers share.

    Attributes:
        config: the validated RetroConfig of this engine.
        store: host indexes of the running requests (CPU backend).
        requests: the running requests, from retro's KV connector.
        paged: the paged-index manager (GPU backend).
        known_req_ids: every request the worker currently holds (running or paused).
        failed_req_ids: requests whose index work raised; they decode densely.
    """

    config: RetroConfig
    store: RequestIndexStore
    known_req_ids: frozenset = frozenset()
    last_log_time: float = field(default_factory=time.monotonic)
    logged_stats: StoreStats = field(default_factory=StoreStats)
    step: int = 0
    preemptions: int = 0
    failed_req_ids: set = field(default_factory=set)
    faults: int = 0
    paged: Optional[Any] = None  # backend.gpu.PagedIndexManager on GPUs
    requests: RequestTable = field(default_factory=RequestTable)


_STATES: Dict[int, RetroWorkerState] = {}


def state_for(vllm_config) -> RetroWorkerState:
    """The state of the worker that owns ``vllm_config`` (created on first use)."""
    key = id(vllm_config)
    st = _STATES.get(key)
    if st is None:
        cfg = retro_config_from_vllm(vllm_config)
        budget = None if cfg.host_memory_gib is None else int(cfg.host_memory_gib * (1 << 30))
        st = RetroWorkerState(config=cfg, store=RequestIndexStore(budget))
        _STATES[key] = st
        weakref.finalize(vllm_config, _STATES.pop, key, None)
    return st


def drop_state(vllm_config) -> None:
    """Forget the state of a closed engine now, with its index pools and cached
    tensors (the config's finalizer would, once the config is collected)."""
    _STATES.pop(id(vllm_config), None)


def existing_state(vllm_config) -> Optional[RetroWorkerState]:
    return _STATES.get(id(vllm_config))
