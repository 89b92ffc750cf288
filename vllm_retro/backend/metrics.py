"""Retro's statistics in vLLM's own metrics: the OpenAI server's Prometheus
``/metrics`` and the engine's periodic stats log.

vLLM carries numbers from the workers to the front end through the KV connector,
and retro already owns the engine's connector (:mod:`.connector`):

1. worker: after each step's forward the model runner calls
   ``RetroConnector.get_kv_connector_stats()``, which returns a
   :class:`RetroConnectorStats` when this worker's numbers changed;
2. executor: with several workers, vLLM merges their stats with
   :meth:`RetroConnectorStats.aggregate`;
3. engine core: the scheduler puts ``stats.to_dict()`` into ``SchedulerStats`` (only
   when the engine collects stats: the server does unless ``--disable-log-stats``);
4. front end: vLLM's Prometheus logger builds :class:`RetroPromMetrics` through
   ``RetroConnector.build_prom_metrics`` and calls ``observe`` with each payload;
   its logging logger prints :meth:`RetroConnectorStats.reduce` as
   "KV Transfer metrics: ...".

The payload holds each worker's totals since it started (with a sequence number),
not per-step deltas: merging is "newest per worker", a dropped payload loses
nothing, and the front end turns totals into Prometheus counter increments.

What a worker reports: on CPUs the host store's counters (:class:`StoreStats`, read
at every step: they are plain integers); on GPUs the paged-index manager's device
counters (``PagedIndexManager.stats()``, one host sync, so read at most once per
``GPU_READ_INTERVAL_S``: the last step's numbers can arrive a step late). Metric
names and meanings: ``docs/metrics.md``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)

# Totals since the worker started. Rows and requests are the same on every
# tensor- or pipeline-parallel worker (each sees the whole batch), so workers
# combine by max; tokens, bytes and faults are per worker's heads and layers, so
# they add up.
COUNTERS = ("retro_rows", "dense_rows", "exact_tokens", "estimated_tokens",
            "context_tokens", "kv_bytes_read", "kv_bytes_dense", "index_faults")
GAUGES = ("index_bytes", "indexed_requests")
_MAX_OVER_WORKERS = frozenset(("retro_rows", "dense_rows", "indexed_requests"))

GPU_READ_INTERVAL_S = 1.0


def combine_workers(workers: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """One engine's values from its workers' latest snapshots (``{rank: {"seq",
    "values"}}``): max over workers for rows and requests, sum for the rest. A
    name no worker reports (e.g. bytes on GPUs) is left out."""
    out: Dict[str, float] = {}
    for snap in workers.values():
        for name, v in snap["values"].items():
            if name not in out:
                out[name] = v
            elif name in _MAX_OVER_WORKERS:
                out[name] = max(out[name], v)
            else:
                out[name] += v
    return out


def merge_newest(into: Dict[str, Dict[str, Any]], workers: Dict[str, Dict[str, Any]]
                 ) -> None:
    """Keeps, per worker, the snapshot with the higher sequence number."""
    for rank, snap in workers.items():
        old = into.get(rank)
        if old is None or snap["seq"] > old["seq"]:
            into[rank] = snap


class RetroConnectorStats(KVConnectorStats):
    """Retro's stats payload: ``data = {"workers": {rank: {"seq": n, "values":
    {name: total}}}}`` (names from :data:`COUNTERS` and :data:`GAUGES`)."""

    def __init__(self, data: Optional[Dict[str, Any]] = None) -> None:
        data = dict(data or {})
        workers = data.get("workers", {})
        if not isinstance(workers, dict):
            raise TypeError(f"retro stats: 'workers' must be a dict, got "
                            f"{type(workers).__name__}")
        # Own copy of the mapping: aggregate() merges into it, and vLLM hands the
        # same payload to its Prometheus and its logging loggers.
        data["workers"] = dict(workers)
        super().__init__(data=data)

    @property
    def workers(self) -> Dict[str, Dict[str, Any]]:
        return self.data["workers"]

    def reset(self) -> None:
        self.data = {"workers": {}}

    def aggregate(self, other: KVConnectorStats) -> "RetroConnectorStats":
        if not isinstance(other, RetroConnectorStats):
            raise TypeError(f"cannot merge retro stats with {type(other).__name__}")
        merge_newest(self.workers, other.workers)
        return self

    def is_empty(self) -> bool:
        return not self.workers

    def reduce(self) -> Dict[str, int | float]:
        """Totals since start, for vLLM's stats log line."""
        v = combine_workers(self.workers)
        ctx = v.get("context_tokens", 0)
        out: Dict[str, int | float] = {
            "retro_decode_rows_total": int(v.get("retro_rows", 0)),
            "dense_decode_rows_total": int(v.get("dense_rows", 0)),
            "exact_fraction": round(v.get("exact_tokens", 0) / ctx, 4) if ctx else 0.0,
            "estimated_fraction": round(v.get("estimated_tokens", 0) / ctx, 4)
            if ctx else 0.0,
            "index_MiB": round(v.get("index_bytes", 0) / 2**20, 1),
            "indexed_requests": int(v.get("indexed_requests", 0)),
        }
        if "cache_hits" in v:       # GPU wave buffer: its cache and host mirror
            looked = v["cache_hits"] + v.get("cache_misses", 0)
            out["wave_cache_hit_rate"] = round(v["cache_hits"] / looked, 4) if looked else 0.0
            out["wave_host_GiB"] = round(v.get("host_gib", 0.0), 2)
            out["wave_mirror_refused"] = int(v.get("mirror_refused", 0))
        return out


class WorkerStatsReporter:
    """Worker side: a :class:`RetroConnectorStats` of this worker's snapshot when it
    changed since the last one sent, at most once per ``min_interval_s``."""

    def __init__(self, rank: int, read: Callable[[], Dict[str, float]],
                 min_interval_s: float = 0.0) -> None:
        self._rank = str(rank)
        self._read = read
        self.min_interval_s = min_interval_s
        self._last_read = -float("inf")
        self._last: Optional[Dict[str, float]] = None
        self._seq = 0

    def take(self) -> Optional[RetroConnectorStats]:
        now = time.monotonic()
        if now - self._last_read < self.min_interval_s:
            return None
        self._last_read = now
        values = self._read()
        if values == self._last:
            return None
        self._last = values
        self._seq += 1
        return RetroConnectorStats(
            {"workers": {self._rank: {"seq": self._seq, "values": dict(values)}}})


def gpu_snapshot(manager) -> Dict[str, int]:
    """The GPU worker's values from its ``PagedIndexManager``: the decode kernels'
    counters (counted at the first layer, token counts summed over KV heads), the
    requests that found the index pool full, the bytes of the index pool (reserved
    up front, used or not), and the requests the worker holds."""
    values = dict(manager.stats())
    layout, alloc = manager.layout, manager.index_alloc
    values["index_bytes"] = (0 if layout is None or alloc is None else
                             layout.index_bytes * alloc.num_pages * len(manager.pools))
    values["indexed_requests"] = len(manager.requests.entries)
    return values


def reporter_for(worker, vllm_config) -> WorkerStatsReporter:
    """The reporter of the connector's worker side: the CPU lifecycle (which has
    ``snapshot``) or the GPU paged-index manager."""
    rank = getattr(vllm_config.parallel_config, "rank", 0)
    snapshot = getattr(worker, "snapshot", None)
    if snapshot is not None:
        return WorkerStatsReporter(rank, snapshot)
    return WorkerStatsReporter(rank, lambda: gpu_snapshot(worker), GPU_READ_INTERVAL_S)


# name in the payload -> (Prometheus name, help text). Counters get "_total".
COUNTER_METRICS = {
    "exact_tokens": ("vllm:retro_exact_tokens", "Context tokens read exactly by retro "
                     "decode attention (sinks, recent window, retrieved clusters; "
                     "dense rows count every token), summed over KV heads."),
    "estimated_tokens": ("vllm:retro_estimated_tokens", "Context tokens whose "
                         "attention retro estimated from cluster summaries, summed "
                         "over KV heads."),
    "context_tokens": ("vllm:retro_context_tokens", "Context tokens of every decode "
                       "attention row, summed over KV heads: the denominator of the "
                       "exact and estimated fractions."),
    "kv_bytes_read": ("vllm:retro_kv_read_bytes", "Bytes retro decode attention read "
                      "(exact K/V plus cluster summaries). CPU backend only."),
    "kv_bytes_dense": ("vllm:retro_kv_dense_bytes", "Bytes dense attention would have "
                       "read for the same decode rows. CPU backend only."),
    "index_faults": ("vllm:retro_index_faults", "Requests whose index work raised; "
                     "they continued with dense attention. CPU backend only."),
}
ROWS_METRIC = ("vllm:retro_decode_rows", "Decode rows (one per request and step) by "
               "attention path: retro = through the wave index, dense = every token "
               "read (context too short for an index, or a fallback).")
GAUGE_METRICS = {
    "exact_fraction": ("vllm:retro_exact_fraction", "Fraction of context tokens read "
                       "exactly by decode attention since the engine started."),
    "estimated_fraction": ("vllm:retro_estimated_fraction", "Fraction of context "
                           "tokens estimated from cluster summaries since the engine "
                           "started."),
    "index_bytes": ("vllm:retro_index_bytes", "Bytes of the wave indexes: host "
                    "memory of the live requests' indexes (CPU), the index pool "
                    "(GPU, reserved up front)."),
    "indexed_requests": ("vllm:retro_indexed_requests", "Requests the workers hold "
                         "an index for (a finished request's is freed at the next "
                         "step)."),
}
INFO_METRIC = ("vllm:retro_config_info", "Retro's options of this engine (value 1).")


class RetroPromMetrics(KVConnectorPromMetrics):
    """Front end: retro's Prometheus metrics, fed with each engine's payloads.

    Counters move by the change of the engines' totals; the fractions are the
    totals' ratios, so ``rate()`` of the token counters gives them per window."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        labels = list(labelnames)
        self._counters = {k: self._counter_cls(name=n, documentation=doc,
                                               labelnames=labels)
                          for k, (n, doc) in COUNTER_METRICS.items()}
        self._rows = self._counter_cls(name=ROWS_METRIC[0], documentation=ROWS_METRIC[1],
                                       labelnames=labels + ["path"])
        self._gauges = {k: self._gauge_cls(name=n, documentation=doc, labelnames=labels,
                                           multiprocess_mode="mostrecent")
                        for k, (n, doc) in GAUGE_METRICS.items()}
        self._workers: Dict[int, Dict[str, Dict[str, Any]]] = {}
        self._counted: Dict[int, Dict[str, float]] = {}
        self._set_info(vllm_config, labels)

    def _set_info(self, vllm_config, labels) -> None:
        from ..worker_state import retro_config_from_vllm
        options = retro_config_from_vllm(vllm_config).to_dict()
        info = self._gauge_cls(name=INFO_METRIC[0], documentation=INFO_METRIC[1],
                               labelnames=labels + sorted(options),
                               multiprocess_mode="mostrecent")
        values = [str(options[k]) for k in sorted(options)]
        for engine_labels in self.per_engine_labelvalues.values():
            info.labels(*engine_labels, *values).set(1)

    def observe(self, transfer_stats_data: Dict[str, Any], engine_idx: int = 0):
        workers = self._workers.setdefault(engine_idx, {})
        merge_newest(workers, RetroConnectorStats(transfer_stats_data).workers)
        totals = combine_workers(workers)
        counted = self._counted.setdefault(engine_idx, {})
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in totals.items():
            if name not in COUNTERS:
                continue
            # Totals only grow (newest snapshot per worker), so this is >= 0.
            delta = value - counted.get(name, 0)
            if delta <= 0:
                continue
            counted[name] = value
            if name in ("retro_rows", "dense_rows"):
                self._rows.labels(*labels, name.split("_")[0]).inc(delta)
            else:
                self._counters[name].labels(*labels).inc(delta)
        ctx = totals.get("context_tokens", 0)
        if ctx:
            self._gauges["exact_fraction"].labels(*labels).set(
                totals.get("exact_tokens", 0) / ctx)
            self._gauges["estimated_fraction"].labels(*labels).set(
                totals.get("estimated_tokens", 0) / ctx)
        for name in GAUGES:
            if name in totals:
                self._gauges[name].labels(*labels).set(totals[name])
