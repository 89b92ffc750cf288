"""Retro chosen per KV-cache kind (``attention_config.backend_per_kind``) inside
vLLM 0.26 on a GPU: the same start-up checks as ``--attention-backend retro``
(prefix caching off, the lifecycle connector in), and retro's kernels serve the
decode rows (device counters). Skipped without CUDA; a module of its own, so no
other retro engine is alive in the process (the connector is a process global)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from conftest import text_prompts  # noqa: E402
from test_engine_gpu import (FULL, assert_same_or_near_tie, generate_with_logprobs,  # noqa: E402
                             gpu_llm, manager)


def test_per_kind_choice_gets_the_same_checks(tiny_model):
    from vllm_retro import vllm_plugin
    from vllm_retro.offline import close_llm
    vllm_plugin.register()   # (the name "retro" resolves once the plugin is loaded)
    shared = text_prompts(tiny_model, [1700], offset=3000)[0]
    prompts = [shared + t for t in text_prompts(tiny_model, [60, 90], offset=9000)]
    llm = gpu_llm(tiny_model)
    dense = generate_with_logprobs(llm, prompts, [24, 24])
    close_llm(llm)
    llm = gpu_llm(tiny_model, retro=FULL, enable_prefix_caching=True,
                  attention_config={"backend_per_kind": {"full_attention": "retro"}})
    try:
        cfg = llm.llm_engine.vllm_config
        assert not cfg.cache_config.enable_prefix_caching
        assert getattr(cfg.kv_transfer_config, "kv_connector", None) == "RetroConnector"
        mgr = manager(llm)
        before = mgr.stats()
        # One after the other: the second would hit the first's prefix in the cache.
        out = [generate_with_logprobs(llm, [p], [24])[0][0] for p in prompts]
        after = mgr.stats()
    finally:
        close_llm(llm)
    rows = after["retro_rows"] - before["retro_rows"]
    assert rows == 2 * 23 and after["dense_rows"] == before["dense_rows"], (rows, after)
    assert_same_or_near_tie(out, dense)
