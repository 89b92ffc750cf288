"""In-process vLLM engines for tests, benchmarks and examples on this CPU machine.

One place for what every offline run needs: environment defaults (set before vLLM
is imported: in-process engine core, the V1 model runner on CPUs, no hub, no usage stats, a
small CPU KV cache), an engine with the project's usual arguments (uni executor,
eager, seed 0, float32) and its shutdown, and retro's decode-row counters of any
engine (``decode_rows``). Nothing here imports vLLM at import time.
"""

from __future__ import annotations

import gc
import os
from typing import Optional


def set_offline_env(kv_cache_gib: int = 1) -> None:
    """Environment defaults of an offline, in-process engine (existing values win)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not _has_cuda():
        # The CPU build's runner is the V1 runner; GPUs keep vLLM's default (V2).
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def make_llm(model: str, backend: Optional[str] = None, retro: Optional[dict] = None,
             **kw):
    """``vllm.LLM`` in this process (uni executor, eager, seed 0, float32, 8K context
    unless ``kw`` says otherwise); ``backend`` is an attention backend name (None:
    vLLM's default), ``retro`` the retro options."""
    from vllm import LLM
    # A dropped engine's reference cycles hold its KV caches until collected, and
    # vLLM sizes the new engine's cache from the device memory free now.
    _collect()
    args = dict(dtype="float32", max_model_len=8192, enforce_eager=True,
                distributed_executor_backend="uni", seed=0,
                additional_config={"retro": dict(retro or {})})
    args.update(kw)
    if backend:
        args["attention_backend"] = backend
    return LLM(model, **args)


def _collect() -> None:
    """Collect garbage and hand the CUDA caching allocator's free blocks back."""
    gc.collect()
    if _has_cuda():
        import torch
        torch.cuda.empty_cache()


def close_llm(llm) -> None:
    """Shuts the engine core down and collects it, so the next engine starts clean
    (the caller's reference to ``llm`` is dead weight after this; drop it)."""
    cfg = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    if cfg is not None:
        from .worker_state import drop_state
        drop_state(cfg)
        del cfg
    # An in-process worker's KV connector is a process global: drop it, or the
    # next engine of this process would inherit retro's connector.
    try:
        from vllm.distributed.kv_transfer.kv_transfer_state import \
            ensure_kv_transfer_shutdown
        ensure_kv_transfer_shutdown()
    except ImportError:
        pass
    del llm
    _collect()
    # vLLM keeps one CUDA-graph memory pool handle per process (a class attribute
    # of the platform); once the closed engine's graphs are collected that pool is
    # gone, and capturing the next engine's graphs into it fails inside PyTorch's
    # allocator. A fresh handle for the next engine.
    try:
        from vllm.platforms import current_platform
        if getattr(type(current_platform), "_global_graph_pool", None) is not None:
            type(current_platform)._global_graph_pool = None
    except Exception:
        pass


def retro_state(llm):
    """The retro worker state of an in-process engine (None: retro not used)."""
    from .worker_state import existing_state
    return existing_state(llm.llm_engine.vllm_config)


def decode_rows(llm) -> dict:
    """Decode rows retro's backend has served since the engine started, by path:
    ``{"retro": n, "dense": m}`` (``dense``: rows whose context had no index yet,
    or a fallback), from the workers' totals that vLLM's metrics carry to the front
    end (``docs/metrics.md``; every tensor-parallel worker sees the whole batch).
    Works whatever the executor (in-process, ``mp``, Ray) and wherever the engine
    core runs; the engine needs its statistics on
    (``LLM(..., disable_log_stats=False)``). GPU workers read their device counters
    at most once a second (``backend.metrics.GPU_READ_INTERVAL_S``): the last
    second's rows show up with a later step. On GPUs the totals include the engine
    start's warm-up rows (vLLM's CUDA-graph captures run the decode kernels on dummy
    batches): count a workload's rows as the difference across it. An engine
    without retro gives zeros."""
    engine = getattr(llm, "llm_engine", None)
    if engine is None or not getattr(engine, "log_stats", False):
        raise RuntimeError("retro's decode-row counters travel with vLLM's statistics, "
                           "which this engine does not collect: create it with "
                           "LLM(..., disable_log_stats=False)")
    from .backend.metrics import ROWS_METRIC
    rows = {"retro": 0, "dense": 0}
    for metric in llm.get_metrics():
        path = metric.labels.get("path")
        if metric.name == ROWS_METRIC[0] and path in rows:
            rows[path] += int(metric.value)
    return rows
