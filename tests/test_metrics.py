"""Retro's statistics on their way into vLLM's metrics (``backend/metrics.py``):
the worker payload, its merging across workers and steps, the Prometheus metrics
the front end makes of it, the GPU worker's reading of its paged-index manager
(run on CPU tensors), and the offline reading of the rows through vLLM's metrics
(``vllm_retro.offline.decode_rows``). The OpenAI server's ``/metrics`` end to end:
``tests/test_server.py::test_prometheus_metrics_match_engine``."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import (ConfigDouble, close_llm, generate_tokens, make_llm, paged_manager,
                      retro_state, text_prompts)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vllm_retro.backend.metrics import (GPU_READ_INTERVAL_S, RetroConnectorStats,
                                        RetroPromMetrics, WorkerStatsReporter,
                                        combine_workers, gpu_snapshot, reporter_for)
from vllm_retro.offline import decode_rows


def _snap(seq, **values):
    return {"seq": seq, "values": values}


def _payload(**workers):
    return {"workers": {rank.lstrip("w"): snap for rank, snap in workers.items()}}


def test_payload_merges_newest_per_worker_and_combines_workers():
    a = RetroConnectorStats(_payload(w0=_snap(2, retro_rows=10, dense_rows=1,
                                              exact_tokens=100, context_tokens=400,
                                              index_bytes=50, indexed_requests=2)))
    b = RetroConnectorStats(_payload(
        w0=_snap(1, retro_rows=5, dense_rows=0, exact_tokens=40, context_tokens=200,
                 index_bytes=70, indexed_requests=3),
        w1=_snap(1, retro_rows=10, dense_rows=1, exact_tokens=60, context_tokens=400,
                 index_bytes=30, indexed_requests=2)))
    merged = a.aggregate(b)
    assert merged.workers["0"]["seq"] == 2          # the older snapshot of 0 lost
    v = combine_workers(merged.workers)
    # Both workers decode the same rows of the same requests: max; their heads'
    # tokens and their index memory add up.
    assert v == dict(retro_rows=10, dense_rows=1, exact_tokens=160, context_tokens=800,
                     index_bytes=80, indexed_requests=2)
    r = merged.reduce()
    assert r["retro_decode_rows_total"] == 10 and r["dense_decode_rows_total"] == 1
    assert r["exact_fraction"] == 0.2 and r["estimated_fraction"] == 0.0
    assert not merged.is_empty()
    merged.reset()
    assert merged.is_empty() and merged.reduce()["exact_fraction"] == 0.0
    # The payload is what crosses processes: plain dicts, rebuilt by the connector.
    from vllm_retro.backend.connector import RetroConnector
    again = RetroConnector.build_kv_connector_stats(b.to_dict())
    assert combine_workers(again.workers) == combine_workers(b.workers)


def test_payload_refuses_foreign_stats_and_bad_data():
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    with pytest.raises(TypeError, match="retro stats"):
        RetroConnectorStats(_payload()).aggregate(KVConnectorStats(data={}))
    with pytest.raises(TypeError, match="workers"):
        RetroConnectorStats({"workers": [1, 2]})


def test_reporter_sends_only_changes_with_growing_sequence():
    values = {"retro_rows": 0, "index_bytes": 0}
    rep = WorkerStatsReporter(3, lambda: dict(values))
    first = rep.take()
    assert first.workers == {"3": {"seq": 1, "values": values}}
    assert rep.take() is None                       # nothing changed
    values["retro_rows"] = 4
    second = rep.take()
    assert second.workers["3"] == {"seq": 2, "values": {"retro_rows": 4, "index_bytes": 0}}


def _prom(registry, retro_options=None):
    types = {cls: functools.partial(cls, registry=registry)
             for cls in (Gauge, Counter, Histogram)}
    cfg = SimpleNamespace(kv_transfer_config=None,
                          additional_config={"retro": retro_options or {}})
    return RetroPromMetrics(cfg, types, ["model_name", "engine"],
                            {0: ["m", "0"], 1: ["m", "1"]})


def test_prometheus_metrics_from_worker_totals():
    reg = CollectorRegistry()
    prom = _prom(reg, {"segment_size": 1024})
    labels = {"model_name": "m", "engine": "0"}

    def val(name, **extra):
        return reg.get_sample_value(name, dict(labels, **extra))

    totals = dict(retro_rows=3, dense_rows=1, exact_tokens=30, estimated_tokens=20,
                  context_tokens=100, kv_bytes_read=400, kv_bytes_dense=1000,
                  index_faults=0, index_bytes=500, indexed_requests=1)
    prom.observe(_payload(w0=_snap(1, **totals)), engine_idx=0)
    assert val("vllm:retro_decode_rows_total", path="retro") == 3
    assert val("vllm:retro_decode_rows_total", path="dense") == 1
    assert val("vllm:retro_exact_tokens_total") == 30
    assert val("vllm:retro_context_tokens_total") == 100
    assert val("vllm:retro_kv_read_bytes_total") == 400
    assert val("vllm:retro_kv_dense_bytes_total") == 1000
    assert val("vllm:retro_exact_fraction") == 0.3
    assert val("vllm:retro_estimated_fraction") == 0.2
    assert val("vllm:retro_index_bytes") == 500 and val("vllm:retro_indexed_requests") == 1

    # Newer totals move the counters by their change; a stale payload (lower
    # sequence number, e.g. merged late) changes nothing.
    later = dict(totals, retro_rows=8, exact_tokens=70, context_tokens=300,
                 index_bytes=0, indexed_requests=0)
    prom.observe(_payload(w0=_snap(3, **later)), engine_idx=0)
    prom.observe(_payload(w0=_snap(2, **totals)), engine_idx=0)
    assert val("vllm:retro_decode_rows_total", path="retro") == 8
    assert val("vllm:retro_exact_tokens_total") == 70
    assert val("vllm:retro_exact_fraction") == pytest.approx(70 / 300)
    assert val("vllm:retro_index_bytes") == 0 and val("vllm:retro_indexed_requests") == 0

    # A second worker of the same engine adds its tokens; its rows are the same rows.
    prom.observe(_payload(w1=_snap(1, **later)), engine_idx=0)
    assert val("vllm:retro_decode_rows_total", path="retro") == 8
    assert val("vllm:retro_exact_tokens_total") == 140

    # Engines are kept apart.
    prom.observe(_payload(w0=_snap(1, **totals)), engine_idx=1)
    assert reg.get_sample_value("vllm:retro_decode_rows_total",
                                {"model_name": "m", "engine": "1", "path": "retro"}) == 3
    assert val("vllm:retro_decode_rows_total", path="retro") == 8

    # The options, one info series per engine; a build without a counter (GPU:
    # no byte counts) does not show it.
    info = [s for m in reg.collect() if m.name == "vllm:retro_config_info"
            for s in m.samples]
    assert len(info) == 2 and all(s.value == 1 for s in info)
    assert info[0].labels["segment_size"] == "1024"
    assert info[0].labels["retrieval_fraction"] == "0.018"
    reg2 = CollectorRegistry()
    gpu_like = {k: v for k, v in totals.items() if not k.startswith(("kv_", "index_f"))}
    _prom(reg2).observe(_payload(w0=_snap(1, **gpu_like)))
    assert reg2.get_sample_value("vllm:retro_kv_read_bytes_total", labels) is None
    assert reg2.get_sample_value("vllm:retro_exact_tokens_total", labels) == 30


def test_gpu_worker_reads_its_paged_index_manager():
    """The GPU path's numbers, from a real ``PagedIndexManager`` on CPU tensors: a
    request's prompt is indexed by the connector's step events, one decode step of
    the reference kernel counts its statistics, the snapshot reads them."""
    from vllm_retro.backend.connector import RetroStepMetadata
    from vllm_retro.index.paged import PagedIndexLayout
    from vllm_retro.kernels import paged_decode_attention
    from vllm_retro.request_table import RequestUpdate

    h, g, d, bs, nb, n_layers, L = 2, 4, 32, 16, 80, 2, 900
    cfg = ConfigDouble(
        additional_config={"retro": {"segment_size": 256, "update_interval": 64,
                                     "recent_tokens": 32, "min_retrieval_tokens": 0}},
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=0),
        scheduler_config=SimpleNamespace(max_num_seqs=2),
        model_config=SimpleNamespace(get_num_attention_heads=lambda pc: h * g),
        parallel_config=SimpleNamespace(rank=0))
    mgr = paged_manager(cfg)
    lay = PagedIndexLayout(h, d, bs, torch.float32)
    mgr.register_kv_caches({f"model.layers.{i}.self_attn.attn": lay.make_cache(nb)
                            for i in range(n_layers)})
    gen = torch.Generator().manual_seed(0)
    blocks = list(range(1, math.ceil(L / bs) + 2))
    for kv in mgr.kv_caches.values():            # the prompt's K/V, as prefill writes it
        pos = torch.arange(L)
        kv[torch.tensor(blocks)[pos // bs], :, pos % bs] = \
            torch.randn(L, h, 2 * d, generator=gen)
    assert gpu_snapshot(mgr)["indexed_requests"] == 0
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("r", True, blocks, 0, L)]))
    mgr.on_step(RetroStepMetadata(updates=[RequestUpdate("r", False, [], L)]))
    assert mgr.requests.entries["r"].clustered_end > 0     # the prompt was indexed

    q = torch.randn(1, h * g, d, generator=gen)
    bt = torch.tensor([blocks], dtype=torch.int32)
    paged_decode_attention(q, mgr.kv_caches[mgr.first_layer], mgr.layout, bt,
                           torch.tensor([L + 1]), mgr.headers, mgr.index_alloc.ibt,
                           mgr.pools[mgr.first_layer], mgr.sink_end, 0.125,
                           workspace=mgr.workspace, count_stats=True)
    snap = gpu_snapshot(mgr)
    assert snap["retro_rows"] == 1 and snap["dense_rows"] == 0
    assert snap["context_tokens"] == (L + 1) * h
    assert 0 < snap["exact_tokens"] < snap["context_tokens"]
    assert 0 < snap["estimated_tokens"] <= snap["context_tokens"] - snap["exact_tokens"]
    # Without a GPU the pool is allocated at registration: one page per KV block.
    assert snap["index_bytes"] == lay.index_bytes * nb * n_layers
    assert snap["index_pool_full"] == 0
    assert snap["indexed_requests"] == 1

    rep = reporter_for(mgr, cfg)        # GPU: the device counters read at most 1/s
    assert rep.min_interval_s == GPU_READ_INTERVAL_S
    assert rep.take().workers["0"]["values"] == snap
    mgr.on_step(RetroStepMetadata(finished=["r"]))
    assert gpu_snapshot(mgr)["indexed_requests"] == 0


def test_decode_rows_of_an_offline_engine(tiny_model):
    """``decode_rows`` reads the engine's rows from vLLM's metrics: the same counts
    as the worker's own counters, each request's rows on its path."""
    llm = make_llm(tiny_model, "retro", {"segment_size": 256, "update_interval": 128,
                                         "recent_tokens": 32, "min_retrieval_tokens": 64},
                   disable_log_stats=False)
    try:
        # The 1,500-token prompt is indexed at prefill: its 8 decode rows are
        # retro's; the 40-token one has no index: its 4 rows are dense.
        generate_tokens(llm, text_prompts(tiny_model, [1500, 40]), [9, 5])
        rows = decode_rows(llm)
        st = retro_state(llm).store.stats
        assert rows == {"retro": st.retro_rows, "dense": st.dense_rows}
        assert rows == {"retro": 8, "dense": 4}
    finally:
        close_llm(llm)


def test_decode_rows_needs_the_engines_statistics():
    with pytest.raises(RuntimeError, match="disable_log_stats=False"):
        decode_rows(SimpleNamespace(llm_engine=SimpleNamespace(log_stats=False)))
