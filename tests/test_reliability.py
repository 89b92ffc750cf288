"""Reliability: bad options, host-memory budget, aborts at scale, isolation, faults."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import close_llm, generate_tokens, make_llm, retro_state
from test_vllm_backend import FULL, SMALL, text_prompts
from vllm_retro import RetroConfig, WaveIndex
from vllm_retro.admission import index_bytes_per_token

FIELDS = [f for f in RetroConfig.__dataclass_fields__]
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-10**7, 10**7),
                      st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=5), st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS + ["bogus_option"]), ANY_VALUE, max_size=4))
def test_fuzzed_options_are_valid_or_name_the_option(options):
    """Any mapping either gives a config that passes its own checks again, or
    raises ValueError whose message names one of the offending keys."""
    try:
        cfg = RetroConfig.from_dict(options)
    except ValueError as e:
        assert any(k in str(e) for k in options), (options, str(e))
        return
    assert RetroConfig.from_dict(cfg.to_dict()) == cfg
    assert 0 < cfg.retrieval_fraction <= 1 and cfg.segment_size >= 64


def test_bad_option_named_at_engine_start(tiny_model):
    for opts, name in [({"retrieval_fraction": 7}, "retrieval_fraction"),
                       ({"recent_tokens": "many"}, "recent_tokens"),
                       ({"host_memory_gib": -1}, "host_memory_gib")]:
        with pytest.raises(Exception, match=name):
            make_llm(tiny_model, "retro", opts)


def test_memory_estimate_bounds_real_index():
    cfg = RetroConfig(segment_size=512, update_interval=256)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(2, 5000, 64).to(dtype)
        index = WaveIndex.build(k, k.clone(), cfg)
        for i in range(300):
            index.append(k[:, i:i + 1], k[:, i:i + 1])
        per_tok = index.nbytes() / index.seq_len
        bound = index_bytes_per_token(2, 64, k.element_size(), cfg)
        # Tail capacity (<= 2 x (update_interval + recent)) is the only excess.
        slack = 2 * (cfg.update_interval + cfg.recent_tokens) * 2 * 2 * 64 * k.element_size()
        assert 0.8 * bound <= per_tok <= bound + slack / index.seq_len, (per_tok, bound)


def test_request_over_host_budget_is_refused_others_run(tiny_model):
    """With a 1 MiB index budget a 2000-token request is refused with a clear error
    before it is scheduled; the engine keeps serving shorter requests correctly."""
    prompts = text_prompts(tiny_model, [2000, 60])
    llm = make_llm(tiny_model, "retro", dict(FULL, host_memory_gib=1 / 1024))
    with pytest.raises(Exception, match="host_memory_gib"):  # VLLMValidationError (HTTP 400)
        generate_tokens(llm, prompts[:1], 8)
    out = generate_tokens(llm, prompts[1:], 8)
    close_llm(llm)
    llm = make_llm(tiny_model)
    dense = generate_tokens(llm, prompts[1:], 8)
    close_llm(llm)
    assert out == dense


def test_500_requests_with_random_aborts_free_all_memory(tiny_model):
    """500 requests of random lengths (20-220 tokens, small segments so most get
    clustered), about a third aborted a few steps after they start: afterwards the
    index memory is back to its idle level (zero, plus at most the one 8-token
    request used to flush the last finishes: 2 layers x a 64-row tail buffer x
    K and V x 2 heads x 64 dims x 4 bytes = 131 KiB)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    rng = random.Random(0)
    pool = text_prompts(tiny_model, [300])[0]
    llm = make_llm(tiny_model, "retro",
                   {"segment_size": 64, "update_interval": 32, "recent_tokens": 16},
                   max_num_seqs=32)
    engine, state = llm.llm_engine, retro_state(llm)
    idle = state.store.nbytes()
    live, abort_at, aborted, started, peak, step = set(), {}, 0, 0, 0, 0
    while started < 500 or live:
        while started < 500 and len(live) < 32:
            rid = f"q{started}"
            engine.add_request(rid, TokensPrompt(prompt_token_ids=pool[:rng.randint(20, 220)]),
                               SamplingParams(max_tokens=rng.randint(1, 10),
                                              temperature=0.0, ignore_eos=True))
            live.add(rid)
            if rng.random() < 0.35:
                abort_at[rid] = step + rng.randint(1, 4)
            started += 1
        for out in engine.step():
            if out.finished:
                live.discard(out.request_id)
        step += 1
        due = [r for r in live if abort_at.get(r, -1) <= step and r in abort_at]
        if due:
            engine.abort_request(due)
            live.difference_update(due)
            aborted += len(due)
        peak = max(peak, state.store.nbytes())
    generate_tokens(llm, [pool[:8]], 1)      # carries the last finishes to the worker
    after = state.store.nbytes()
    n_req = len(state.store.request_ids())
    close_llm(llm)
    print(f"500 requests, {aborted} aborted, index memory idle {idle} B, "
          f"peak {peak} B, after {after} B")
    assert aborted > 80 and peak > 1_000_000
    assert n_req <= 1 and after - idle <= 140_000, (n_req, after)


def test_concurrent_requests_are_isolated(tiny_model):
    """Eight requests, each with its own secret, run together equal each run alone,
    token for token; one request's KV never reaches another's attention."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = text_prompts(tiny_model, [900])[0]
    prompts = []
    for i in range(8):
        secret = tok(f" secret-{i}-{'xyzw'[i % 4] * 3}-{1000 + 37 * i} ")["input_ids"]
        cut = 100 * (i + 1)
        prompts.append(base[:cut] + secret + base[cut:cut + 200 + 40 * i])
    llm = make_llm(tiny_model, "retro", SMALL)
    together = generate_tokens(llm, prompts, 24)
    alone = [generate_tokens(llm, [p], 24)[0] for p in prompts]
    close_llm(llm)
    assert together == alone


def test_fault_in_one_request_does_not_fail_others(tiny_model, monkeypatch):
    """An exception inside retro's decode for one request drops that request's
    index and it finishes on the dense path (same tokens as dense); the engine and
    the other requests carry on."""
    import vllm_retro.backend.cpu as backend
    real = backend.decode_attention
    calls = {"n": 0}

    def flaky(index, query, scale=None, out=None):
        calls["n"] += 1
        if index.seq_len % 7 == 3 and index.seq_len > 400:
            raise RuntimeError("injected fault")
        return real(index, query, scale, out=out)

    monkeypatch.setattr(backend, "decode_attention", flaky)
    prompts = text_prompts(tiny_model, [300, 420, 500], offset=9000)
    llm = make_llm(tiny_model, "retro", FULL)
    out = generate_tokens(llm, prompts, 16)
    faults = retro_state(llm).faults
    close_llm(llm)
    monkeypatch.setattr(backend, "decode_attention", real)
    llm = make_llm(tiny_model)
    dense = generate_tokens(llm, prompts, 16)
    close_llm(llm)
    assert faults > 0, "no fault was injected"
    assert out == dense


def _variant_model(tiny_model, tmp_path, arch: str, **cfg_overrides):
    """A random 1-layer model of another shape, with the tiny model's tokenizer."""
    import shutil
    import transformers
    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    kw = dict(vocab_size=2048, hidden_size=256, intermediate_size=512,
              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=4096, bos_token_id=0, eos_token_id=1)
    kw.update(cfg_overrides)
    model_cls(cfg_cls(**kw)).save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_model}/{name}", tmp_path / name)
    return str(tmp_path)


@pytest.mark.parametrize("arch,overrides,reason", [
    ("Mistral", {"sliding_window": 128}, "sliding-window"),
    ("Llama", {"hidden_size": 192, "num_attention_heads": 4, "head_dim": 48}, "head size 48"),
])
def test_unsupported_models_refused_with_reason(tiny_model, tmp_path, arch, overrides, reason):
    path = _variant_model(tiny_model, tmp_path, arch, **overrides)
    with pytest.raises(Exception, match=reason):
        make_llm(path, "retro", max_model_len=1024)


def test_quantized_kv_cache_refused_with_reason(tiny_model):
    """An fp8 KV cache would hand the index quantized keys it cannot score; retro
    refuses it at engine start, naming the option."""
    with pytest.raises(Exception, match=r"retro attention backend does not support: "
                                        r"kv_cache_dtype='fp8'"):
        make_llm(tiny_model, "retro", max_model_len=1024, kv_cache_dtype="fp8")
