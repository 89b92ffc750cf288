"""Reads a decode-kernel sweep (benchmarks/decode_kernel_sweep.py JSON) and an index
build benchmark (benchmarks/index_build_bench.py JSON with --assign-tiles) and
prints, one per line, the ``RETRO_*`` environment assignments of the measured
best settings that beat the defaults by at least 3%: ``RETRO_DECODE_MAX_SPLIT``
(the max split with the smallest time over all swept cases together, each case
relative to its default) and ``RETRO_KMEANS_ASSIGN_TILES``. Used between GPU calls
so the next call's engine runs with the measured best, without an edit in between.

    python scripts/gpu/pick_tuning.py SWEEP.json [IBUILD.json]
"""
import json
import os
import sys

SPLITS = {"programs/SM 4, split 16": 16, "programs/SM 4, split 64": 64}
DEFAULT_TILES = "128x64x4"


def pick_split(path: str):
    with open(path) as f:
        cases = json.load(f)["cases"]
    score = {}
    for c in cases:
        t = {v["variant"]: v.get("graph_us") for v in c["variants"]}
        if not t.get("default"):
            return None
        for name in ["default", *SPLITS]:
            rel = t[name] / t["default"] if t.get(name) else float("inf")
            score[name] = score.get(name, 0.0) + rel
    print(f"pick_tuning: max split scores {score}", file=sys.stderr)
    best = min(score, key=score.get) if score else "default"
    if best != "default" and score[best] <= 0.97 * score["default"]:
        return SPLITS[best]
    return None


def pick_tiles(path: str):
    with open(path) as f:
        rec = json.load(f)["records"][0]
    t = rec.get("assign_tiles_ms_per_layer") or {}
    print(f"pick_tuning: assign tiles {t}", file=sys.stderr)
    if DEFAULT_TILES not in t:
        return None
    best = min(t, key=t.get)
    return best if best != DEFAULT_TILES and t[best] <= 0.97 * t[DEFAULT_TILES] else None


def main() -> None:
    if len(sys.argv) > 1 and os.path.exists(sys.argv[1]):
        s = pick_split(sys.argv[1])
        if s:
            print(f"RETRO_DECODE_MAX_SPLIT={s}")
    if len(sys.argv) > 2 and os.path.exists(sys.argv[2]):
        t = pick_tiles(sys.argv[2])
        if t:
            print(f"RETRO_KMEANS_ASSIGN_TILES={t}")


if __name__ == "__main__":
    main()
