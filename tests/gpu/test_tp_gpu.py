"""Retro in workers of their own inside vLLM 0.26: a Ray worker on one GPU, and
tensor parallelism on two GPUs through the two executors users pick for it, vLLM's
own worker processes (``mp``, its default for several GPUs) and Ray. With two GPUs
each worker holds half of the KV heads (the tiny model's two: one per GPU), indexes
its heads at prefill and decodes them with retro's kernels.

The decode rows are counted in the workers' processes; the tests read them where a
user would, in the front end, through vLLM's metrics
(``vllm_retro.offline.decode_rows``), so a silent dense fallback in any worker fails.
Skipped without CUDA, the tensor-parallel tests with fewer than two GPUs; one live
engine at a time (a module of its own).
"""

import time

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

from conftest import generate_with_logprobs, text_prompts  # noqa: E402
from test_engine_gpu import (FULL, LENGTHS, MAX_TOKENS, SMALL,  # noqa: E402
                             assert_same_or_near_tie, gpu_llm)

# NCCL's all-reduce only: vLLM's custom all-reduce and its symmetric-memory form are
# not what this test is about (and multicast stays off on shared hosts).
TP = dict(tensor_parallel_size=2, disable_custom_all_reduce=True,
          disable_log_stats=False)


def tp_llm(model, executor, backend=None, retro=None, tp=2):
    return gpu_llm(model, backend, retro, distributed_executor_backend=executor,
                   **dict(TP, tensor_parallel_size=tp))


def settled_rows(llm, model):
    """The engine's rows once every worker's latest totals have reached the front
    end: GPU workers read their device counters at most once per
    ``GPU_READ_INTERVAL_S``, so after that interval one prefill-only request (it adds
    no decode row) makes each worker report again."""
    from vllm_retro.backend.metrics import GPU_READ_INTERVAL_S
    from vllm_retro.offline import decode_rows
    time.sleep(GPU_READ_INTERVAL_S + 0.5)
    generate_with_logprobs(llm, text_prompts(model, [24], offset=40000), [1])
    return decode_rows(llm)


def rows_across(llm, model, work):
    """``work()``'s result and the decode rows the workers counted while it ran: the
    totals also hold the engine start's warm-up rows (its CUDA-graph captures'
    dummy batches), so the rows are the difference across it."""
    before = settled_rows(llm, model)
    result = work()
    after = settled_rows(llm, model)
    return result, {k: after[k] - before[k] for k in after}


def shut_ray_down():
    """vLLM's Ray executor leaves its placement group (both GPUs) behind at
    shutdown; the next engine of this process would wait for GPUs forever."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


def full_retrieval_run(model, executor, prompts, tp=2):
    """Retro with every cluster exact through ``executor``: the outputs and the rows
    its workers counted for them (Ray shut down afterwards)."""
    from vllm_retro.offline import close_llm
    llm = tp_llm(model, executor, "retro", FULL, tp=tp)
    try:
        return rows_across(llm, model,
                           lambda: generate_with_logprobs(llm, prompts, MAX_TOKENS))
    finally:
        close_llm(llm)
        if executor == "ray":
            shut_ray_down()


def assert_dense_output_on_retro_rows(out, rows, dense_out):
    """Every decode row counted, the indexed prompts' on retro's kernels, and the
    output dense's or a bf16 near-tie."""
    assert rows["retro"] + rows["dense"] == sum(m - 1 for m in MAX_TOKENS), rows
    assert rows["retro"] > 0, rows
    assert_same_or_near_tie([t for t, _ in out], dense_out)


def test_ray_worker_on_one_gpu(tiny_model):
    """The Ray executor with one worker: the plugin loads in the Ray worker, its
    kernels serve the indexed rows there, and with every cluster exact the output
    is dense's (in-process) or a bf16 near-tie."""
    from vllm_retro.offline import close_llm
    prompts = text_prompts(tiny_model, LENGTHS)
    llm = gpu_llm(tiny_model)
    dense_out = generate_with_logprobs(llm, prompts, MAX_TOKENS)
    close_llm(llm)
    out, rows = full_retrieval_run(tiny_model, "ray", prompts, tp=1)
    assert_dense_output_on_retro_rows(out, rows, dense_out)


@pytest.fixture(scope="module")
def dense_tp(tiny_model):
    from vllm_retro.offline import close_llm
    prompts = text_prompts(tiny_model, LENGTHS)
    llm = tp_llm(tiny_model, "mp")
    out = generate_with_logprobs(llm, prompts, MAX_TOKENS)
    close_llm(llm)
    return prompts, out


@two_gpus
@pytest.mark.parametrize("executor", ["mp", "ray"])
def test_tensor_parallel_full_retrieval_matches_dense(tiny_model, dense_tp, executor):
    """Every cluster exact on both workers: dense's output under the same
    parallelism (or a bf16 near-tie), and the rows the workers counted are retro's
    for the indexed prompts and add up to every decode row."""
    prompts, dense_out = dense_tp
    out, rows = full_retrieval_run(tiny_model, executor, prompts)
    assert_dense_output_on_retro_rows(out, rows, dense_out)


@two_gpus
def test_tensor_parallel_default_budget(tiny_model):
    """The default budget on two workers: the indexed prompts decode through
    retro's kernels (each worker its heads), a request alone as in the batch."""
    from vllm_retro.offline import close_llm
    prompts = text_prompts(tiny_model, [900, 1400, 2000, 2500], offset=20000)
    llm = tp_llm(tiny_model, "mp", "retro", SMALL)
    try:
        (together, alone), rows = rows_across(llm, tiny_model, lambda: (
            [t for t, _ in generate_with_logprobs(llm, prompts, [16] * 4)],
            [generate_with_logprobs(llm, [p], [16])[0] for p in prompts]))
    finally:
        close_llm(llm)
    assert rows["retro"] + rows["dense"] == 2 * 4 * 15 and rows["retro"] > 0, rows
    assert_same_or_near_tie(together, alone)
