"""Where does retro lose task accuracy? Layer-group and zone ablations on the prompts
of ``task_accuracy.py`` where retro (default budget) scored below dense.

Each variant is one ``vllm.LLM`` (retro, ``segment_size`` 1024) over the same
prompts; its score and greedy token match rate against dense are reported.

* ``layers=A-B``: retro decode only in layers A..B (inclusive); every other layer
  decodes densely. Done by wrapping the backend's ``RetroImpl._mirror_prefill`` /
  ``_decode_row`` *in this process only* (a layer whose prefill is not mirrored has
  no index, and the backend decodes it with vLLM's dense kernel); the library code
  is not changed.
* retro options (``retrieval_fraction``, ``estimation_fraction``, ``error_bound``
  ...) as ``key=value``: the zone sizes.

    python benchmarks/task_accuracy_diagnose.py \\
        --variant "" --variant layers=0-9 --variant estimation_fraction=0

Measured before the token floor existed, so "retro" below is the fraction alone
(``min_retrieval_tokens`` 0 today; ``benchmarks/results/task_accuracy_diagnose.json``;
mean score over the 6 default cells, dense 0.917; token match rate with dense in
brackets):
retro everywhere 0.097 (0.45); retro in no layer 0.917 (1.00, checks the gating);
retro only in layers 0-9 0.444 (0.62), 10-19 0.542 (0.61), 20-29 0.500 (0.63);
layers 3-29 0.208 (0.46); layers 3-20 0.319 (0.58); estimation_fraction=0 0.375
(0.48); retrieval_fraction=0.1 0.778 (0.80, 15% read exactly);
retrieval_fraction=0.25 0.819 (0.85, 30%); error_bound=0.1 0.444 (0.52, 11.5%).
The loss is spread over all layers (each third alone costs about half of it),
not in a few of them; the retrieved budget is what buys it back. Later (this
session's variants, not in the JSON): rf 0.25 with estimation 0, rf 0.25 with
estimation 0.75 and rf 0.5 all scored 0.819 with the same per-prompt pattern; the
prompts they lose sit at near-ties of dense itself (top-1 logit margin 0.04 on the
multi-value prompt), which led to ``task_teacher_forced.py`` and the 512-token floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import task_accuracy as ta  # noqa: E402  (sets the environment first)

# task, length, depth of the cells where retro < dense in the first full run.
DEFAULT_CELLS = ["niah_multivalue:2048:0", "niah_multivalue:2048:0.75",
                 "vt:2048:0.5", "vt:2048:1", "niah_multikey:4096:0.25",
                 "niah_multivalue:4096:0.25"]


def parse_variant(text: str):
    layers, opts = None, dict(ta.BASE_RETRO)
    for part in filter(None, text.split(",")):
        k, v = part.split("=", 1)
        if k == "layers":
            lo, hi = (int(x) for x in v.split("-"))
            layers = set(range(lo, hi + 1))
        else:
            opts[k] = json.loads(v)
    return layers, opts


def gate_layers(layers):
    """Retro decode only in ``layers`` (None: all), for engines made afterwards."""
    from vllm_retro.backend.cpu import RetroImpl
    if not hasattr(RetroImpl, "_diag_orig"):
        RetroImpl._diag_orig = (RetroImpl._mirror_prefill, RetroImpl._decode_row)
    mirror, decode = RetroImpl._diag_orig
    if layers is None:
        RetroImpl._mirror_prefill, RetroImpl._decode_row = mirror, decode
        return

    def layer_of(name):
        return int(name.split("layers.")[1].split(".")[0])

    def m(self, rb, row, name, *a):
        return mirror(self, rb, row, name, *a) if layer_of(name) in layers else False

    def d(self, rb, row, name, *a):
        return decode(self, rb, row, name, *a) if layer_of(name) in layers else False
    RetroImpl._mirror_prefill, RetroImpl._decode_row = m, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(DEFAULT_CELLS))
    ap.add_argument("--variant", action="append", default=None,
                    help="comma-separated layers=A-B and retro key=value ('' = retro "
                         "default); repeatable")
    ap.add_argument("--model-dir", default=os.path.join(ta.ROOT, ".cache", "smollm2-135m"))
    ap.add_argument("--out", default=None, help="JSON output (default: none)")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    samples = []
    for cell in args.cells.split(","):
        task, length, depth = cell.split(":")
        samples.append(ta.build_sample(tok, task, int(length), float(depth), 0,
                                       ta.Filler(ta.TASK_FILLER[task])))
    variants = args.variant if args.variant is not None else [""]
    t0 = time.perf_counter()
    dense = ta.run_config(args.model_dir, "dense", None, samples, tok)
    rows = {"dense": {"scores": dense["scores"], "mean": sum(dense["scores"]) / len(samples)}}
    print(f"dense scores {[round(x, 2) for x in dense['scores']]}", flush=True)
    for v in variants:
        layers, opts = parse_variant(v)
        gate_layers(layers)
        run = ta.run_config(args.model_dir, v or "retro", opts, samples, tok)
        rates = [ta.match_rate(a, b) for a, b in zip(run["tokens"], dense["tokens"])]
        row = {"scores": run["scores"], "mean": sum(run["scores"]) / len(samples),
               "match_rate": sum(rates) / len(rates), "match_rates": rates,
               "retro_stats": run["retro_stats"], "texts": run["texts"]}
        rows[v or "retro"] = row
        st = run["retro_stats"] or {}
        print(f"{v or 'retro':<40} score {row['mean']:.3f} match {row['match_rate']:.3f}"
              f"  per prompt {[round(x, 2) for x in run['scores']]}"
              f"  exact {st.get('exact_fraction', 0):.3f}"
              f"  ({run['generate_s']:.0f}s)", flush=True)
    gate_layers(None)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"cells": args.cells.split(","), "dense_texts": dense["texts"],
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
