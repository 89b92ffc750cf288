"""Reads a decode-kernel sweep (benchmarks/decode_kernel_sweep.py JSON) and prints
``RETRO_DECODE_MAX_SPLIT=N`` when a max split other than the default (32) was
faster over all swept cases together (sum of each case's time relative to its
default, at least 3% less), else nothing. Used between GPU calls so the next
call's engine runs with the measured best, without an edit in between.

    python scripts/gpu/pick_split.py /tmp/retro-gpu-out/decode_kernel_sweep_h200.json
"""
import json
import sys

CANDIDATES = {"programs/SM 4, split 16": 16, "programs/SM 4, split 64": 64}


def main(path: str) -> None:
    with open(path) as f:
        cases = json.load(f)["cases"]
    score = {}
    for c in cases:
        t = {v["variant"]: v.get("graph_us") for v in c["variants"]}
        if not t.get("default"):
            return
        for name in ["default", *CANDIDATES]:
            if t.get(name) is None:
                score[name] = float("inf")
            else:
                score[name] = score.get(name, 0.0) + t[name] / t["default"]
    best = min(score, key=score.get) if score else "default"
    if best != "default" and score[best] <= 0.97 * score["default"]:
        print(f"RETRO_DECODE_MAX_SPLIT={CANDIDATES[best]}")
    print(f"pick_split: {score}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
