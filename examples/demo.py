"""Demo: the same greedy generation with vLLM's dense backend and with retro.

Builds a tiny random-weight Llama and a locally trained tokenizer (nothing is
downloaded), runs a few long prompts through ``vllm.LLM`` twice (dense, then
``attention_backend="retro"``) and prints both outputs, their token agreement and
retro's retrieval statistics.

    python examples/demo.py [--model-dir DIR] [--max-tokens N]
"""

import argparse
import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=os.path.join(".cache", "tiny-llama"))
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm_retro.tiny_model import build_tiny_llama, stdlib_text

    model = build_tiny_llama(args.model_dir)
    text = stdlib_text(60_000)
    prompts = [text[i * 7000:i * 7000 + n] for i, n in enumerate((1500, 3000, 6000))]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    # Small segments so that these few-thousand-token prompts get an index.
    small = {"segment_size": 512, "update_interval": 256}
    runs = [("dense", None, {}),
            ("retro, every cluster exact", "retro",
             dict(small, retrieval_fraction=1.0, estimation_fraction=0.0)),
            ("retro, default budget", "retro", small)]
    from vllm_retro.worker_state import existing_state
    results = {}
    for label, backend, opts in runs:
        kw = {"attention_backend": backend} if backend else {}
        llm = LLM(model, dtype="float32", max_model_len=4096, enforce_eager=True,
                  distributed_executor_backend="uni", seed=0,
                  additional_config={"retro": opts}, **kw)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        state = existing_state(llm.llm_engine.vllm_config)
        results[label] = (outs, time.perf_counter() - t0,
                          state.store.stats if state else None)
        del llm

    dense, t_dense, _ = results["dense"]
    for label, _, _ in runs[1:]:
        outs, secs, st = results[label]
        same = total = 0
        print(f"== {label}")
        for d, r in zip(dense, outs):
            a, b = d.outputs[0].token_ids, r.outputs[0].token_ids
            match = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            same, total = same + match, total + len(a)
            print(f"  prompt of {len(d.prompt_token_ids)} tokens: identical prefix "
                  f"{match}/{len(a)} tokens")
            print(f"    dense: {d.outputs[0].text[:60]!r}")
            print(f"    retro: {r.outputs[0].text[:60]!r}")
        print(f"  greedy agreement with dense {same}/{total} tokens; time {secs:.2f}s "
              f"(dense {t_dense:.2f}s); read {100 * st.mean(st.exact_fraction_sum):.1f}% "
              f"of tokens exactly, estimated {100 * st.mean(st.estimated_fraction_sum):.1f}%"
              f" over {st.decode_calls} decode attention calls")


if __name__ == "__main__":
    main()
