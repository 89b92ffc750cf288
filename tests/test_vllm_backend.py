"""The retro backend inside the real vLLM engine (CPU build, in-process)."""

import pytest

from conftest import close_llm, generate_tokens, make_llm, retro_state, text_prompts  # noqa: F401

# Small segments so that prompts of a few thousand tokens are clustered.
SMALL = {"segment_size": 256, "update_interval": 128, "recent_tokens": 32}
FULL = dict(SMALL, retrieval_fraction=1.0, estimation_fraction=0.0)


@pytest.fixture(scope="module")
def ragged(tiny_model):
    """Ragged prompts, ragged output lengths (some finish early), dense reference."""
    prompts = text_prompts(tiny_model, [40, 300, 900, 1700, 2600])
    max_tokens = [12, 40, 5, 33, 20]
    llm = make_llm(tiny_model)
    assert type(llm.llm_engine.vllm_config.compilation_config.static_forward_context[
        "model.layers.0.self_attn.attn"].impl).__name__ == "CPUAttentionBackendImpl"
    dense = generate_tokens(llm, prompts, max_tokens)
    close_llm(llm)
    return prompts, max_tokens, dense


def test_full_retrieval_is_token_identical_to_dense(tiny_model, ragged):
    prompts, max_tokens, dense = ragged
    llm = make_llm(tiny_model, "retro", FULL)
    impl = llm.llm_engine.vllm_config.compilation_config.static_forward_context[
        "model.layers.0.self_attn.attn"].impl
    assert type(impl).__name__ == "RetroImpl"
    out = generate_tokens(llm, prompts, max_tokens)
    st = retro_state(llm).store.stats
    close_llm(llm)
    assert out == dense
    # Every decode step of every request and layer went through the index.
    n_layers = 2
    assert st.decode_calls == n_layers * sum(m - 1 for m in max_tokens)


def test_uppercase_name_and_chunked_prefill(tiny_model, ragged):
    """`RETRO` works like `retro`; chunked prefill (256-token chunks) mirrors every
    chunk into the index; outputs stay identical to dense."""
    prompts, max_tokens, dense = ragged
    llm = make_llm(tiny_model, "RETRO", FULL, max_num_batched_tokens=256,
                   enable_chunked_prefill=True)
    out = generate_tokens(llm, prompts, max_tokens)
    close_llm(llm)
    assert out == dense


def test_per_kind_choice_gets_the_same_checks(tiny_model):
    """Retro chosen per KV-cache kind (``backend_per_kind``) instead of as the
    backend: the same start-up checks apply (prefix caching off, the lifecycle
    connector in), so two prompts sharing a 1,700-token prefix decode as dense does
    with every cluster exact, every decode row through the index. (Before the
    checks applied to per-kind choices, such an engine kept prefix caching on and
    had no connector: every decode row ran densely, 0 decode calls, silently.)"""
    from vllm_retro import vllm_plugin
    vllm_plugin.register()   # (the name "retro" resolves once the plugin is loaded)
    shared = text_prompts(tiny_model, [1700], offset=3000)[0]
    tails = text_prompts(tiny_model, [60, 90], offset=9000)
    prompts = [shared + t for t in tails]
    llm = make_llm(tiny_model, enable_prefix_caching=False)
    dense = generate_tokens(llm, prompts, 24)
    close_llm(llm)
    llm = make_llm(tiny_model, None, FULL, enable_prefix_caching=True,
                   attention_config={"backend_per_kind": {"full_attention": "retro"}})
    cfg = llm.llm_engine.vllm_config
    prefix_caching = cfg.cache_config.enable_prefix_caching
    connector = getattr(cfg.kv_transfer_config, "kv_connector", None)
    out = [generate_tokens(llm, [p], 24)[0] for p in prompts]   # the second after the first
    st = retro_state(llm).store.stats
    close_llm(llm)
    assert not prefix_caching
    assert connector == "RetroConnector"
    assert st.decode_calls == 2 * 2 * 23
    assert out == dense


def test_preemption_by_tiny_kv_cache(tiny_model):
    """A KV cache too small for the batch forces preemption (recompute): six
    400-token prompts take 4 blocks each of the 20; growing past 512 tokens needs
    blocks that are not there. The preempted requests' indexes are freed and
    rebuilt on resume, and outputs equal dense run without preemption."""
    prompts = text_prompts(tiny_model, [400] * 6, offset=5000)
    llm = make_llm(tiny_model, max_model_len=2048)
    dense = generate_tokens(llm, prompts, 200)
    close_llm(llm)
    llm = make_llm(tiny_model, "retro", FULL, num_gpu_blocks_override=20,
                   max_model_len=2048, block_size=128)
    out = generate_tokens(llm, prompts, 200)
    preemptions = retro_state(llm).preemptions
    close_llm(llm)
    assert preemptions > 0, "the KV cache was not small enough to preempt"
    assert out == dense


def test_abort_and_finish_free_every_index(tiny_model):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    llm = make_llm(tiny_model, "retro", SMALL)
    engine = llm.llm_engine
    state = retro_state(llm)
    prompts = text_prompts(tiny_model, [700, 1200, 500])
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=p),
                           SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(6):
        engine.step()
    live = state.store.request_ids()
    assert len(live) == 3
    assert all(state.store.get(r, "model.layers.1.self_attn.attn").num_clusters > 0
               for r in live)
    before = state.store.nbytes()
    engine.abort_request(["r1"])
    engine.step()
    assert sorted(r.split("-")[0] for r in state.store.request_ids()) == ["r0", "r2"]
    assert 0 < state.store.nbytes() < before
    while engine.has_unfinished_requests():
        engine.step()
    # A finish reaches the worker with the next scheduled step: one more short
    # request flushes r0 and r2; only that request's own index may remain.
    generate_tokens(llm, [prompts[2][:8]], 2)
    left = state.store.request_ids()
    close_llm(llm)
    assert len(left) <= 1 and not any(r.split("-")[0] in ("r0", "r1", "r2") for r in left), left


def test_bad_retro_option_fails_at_start(tiny_model):
    with pytest.raises(Exception, match="segment_size"):
        make_llm(tiny_model, "retro", {"segment_size": -3})
    with pytest.raises(Exception, match="unknown retro option"):
        make_llm(tiny_model, "retro", {"no_such_knob": 1})


def test_default_budget_agreement_tiny(tiny_model, ragged):
    """Random-weight attention is nearly flat, the hardest case for sparse attention;
    the greedy agreement is measured and must stay above the floor seen (it was
    ~45% of tokens before the first divergence, averaged over prompts). The fraction
    alone (no token floor): the floor would read most of these short prompts."""
    prompts, max_tokens, dense = ragged
    llm = make_llm(tiny_model, "retro", dict(SMALL, min_retrieval_tokens=0))
    out = generate_tokens(llm, prompts, max_tokens)
    st = retro_state(llm).store.stats
    close_llm(llm)
    first_div = [next((i for i, (a, b) in enumerate(zip(o, d)) if a != b), len(d))
                 for o, d in zip(out, dense)]
    assert sum(first_div) / sum(max_tokens) > 0.2, first_div
    assert st.mean(st.exact_fraction_sum) < 0.6
