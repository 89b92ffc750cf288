"""One very long request through ``vllm.LLM``: retro with the wave buffer vs dense vLLM.

Issue 14's 1M-token run: Llama-3-8B shape (``load_format="dummy"``, bf16), one prompt
of ``--context`` random token ids (default 1,048,576), prefilled in chunks of
``--chunk`` tokens, then ``--output-tokens`` decoded greedily. Retro runs with the
wave buffer: the prompt is clustered, mirrored to pinned host memory and released
behind its prefill front, the later chunks attend to the released tokens exactly
from the mirror (design §8.2), and decode reads them through the cluster cache.
Dense vLLM (FLASH_ATTN) is started with the same ``max_model_len``; on one H200 its
KV cache holds ~914K tokens of this shape, so it refuses at start-up, and the
refusal is recorded. Each engine runs in its own child process.

Records (``--out``, merged with what is there by (backend, context)):
``{"context", "backend", "prefill_s", "tpot_ms", "peak_gpu_gib", "host_gib", ...}``;
``prefill_s`` is the time to the first token (the prompt's prefill), the first
decode step (which clusters and mirrors the rest of the prompt) is reported on its
own, ``tpot_ms`` covers the decode steps after it. A retro record whose decode
rows were not served by retro's kernels fails the run. A progress line (tokens
prefilled, elapsed, host memory, released blocks) is printed every
``--progress-s``: a run longer than one device call runs detached
(``scripts/gpu/run.sh`` stages ``long`` / ``longwait``) and is followed there.

    python benchmarks/long_context.py --out benchmarks/results/long_context_h200.json
    python benchmarks/long_context.py --shape tiny --context 6000 --chunk 512  # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_throughput import (SHAPES, gpu_used_gib, result_header,  # noqa: E402
                               retro_manager, run_children)


def write_model(a) -> str:
    """The shape's config with room for the request (vLLM refuses a
    ``max_model_len`` above ``max_position_embeddings``; weights are dummy)."""
    os.makedirs(a.model_dir, exist_ok=True)
    cfg = dict(SHAPES[a.shape])
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"],
                                         a.context + a.output_tokens + 1024)
    with open(os.path.join(a.model_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    return a.model_dir


def _engine_kwargs(a, backend: str) -> dict:
    import torch
    model = write_model(a)
    kw = dict(model=model, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=a.context + a.output_tokens + 16, seed=0,
              enable_prefix_caching=False, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.chunk, enable_chunked_prefill=True)
    if torch.cuda.is_available():
        kw.update(dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization)
    else:  # dry run of the harness on a CPU machine
        kw.update(dtype="float32", enforce_eager=True)
    kw["attention_backend"] = backend
    if backend == "retro":
        kw["additional_config"] = {"retro": json.loads(a.retro_options)}
    return kw


def _start_profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    p = profile(activities=acts)
    p.__enter__()
    return p


def _profile_summary(p, steps: int) -> dict:
    """Device time per decode step and its top kernels (and retro's named ranges)."""
    from profiling import per_step, top
    dev, _, ranges = per_step(p, steps)
    return dict(steps=max(1, steps), device_us_per_step=round(sum(dev.values()), 1),
                retro_ranges_device_us_per_step=ranges, top_kernels_us_per_step=top(dev))


def child(a) -> None:
    # In-process engine core: the scheduler and retro's counters are readable here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rec = dict(backend=a.label or a.backend, context=a.context, chunk=a.chunk)
    t0 = time.time()
    try:
        llm = LLM(**_engine_kwargs(a, a.backend))
    except Exception as exc:  # noqa: BLE001 (the refusal is the result)
        rec.update(fits=False, error=f"{type(exc).__name__}: {exc}"[:2000])
        print(json.dumps(rec), flush=True)
        with open(a.child_out, "w") as f:
            json.dump(dict(records=[rec]), f)
        return
    rec["startup_s"] = time.time() - t0
    eng = llm.llm_engine
    cc = eng.vllm_config.cache_config
    rec["kv_capacity_tokens"] = cc.num_gpu_blocks * cc.block_size
    mc, pc = eng.vllm_config.model_config, eng.vllm_config.parallel_config
    rec["block_gib"] = (cc.block_size * mc.get_num_layers(pc) * 2 * mc.get_num_kv_heads(pc)
                        * mc.get_head_size() * mc.dtype.itemsize / 2**30)
    sched = eng.engine_core.engine_core.scheduler
    state = retro_manager() if a.backend == "retro" else None
    (kvm,) = sched.kv_cache_manager.coordinator.single_type_managers
    g = torch.Generator().manual_seed(0)
    vocab = min(100000, SHAPES[a.shape]["vocab_size"])
    toks = torch.randint(100, vocab - 1, (a.context,), generator=g).tolist()
    # --profile-steps: that many more decode steps, under the torch profiler, after
    # the timed ones (the profiler slows the steps it records).
    params = SamplingParams(max_tokens=a.output_tokens + a.profile_steps, ignore_eos=True,
                            temperature=0.0)
    prof, prof_from = None, 0
    # vLLM's warm-up and graph capture run the decode kernels too: count from here.
    before = state.stats() if state is not None else None
    eng.add_request("long", TokensPrompt(prompt_token_ids=toks), params)
    t_start = time.perf_counter()
    last_print = t_start
    times = []          # arrival time of each output token
    progress = []       # the progress lines, for the plot
    n_out = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            k = len(o.outputs[0].token_ids)
            while n_out < k:
                times.append(time.perf_counter())
                n_out += 1
        if a.profile_steps and prof is None and n_out >= a.output_tokens:
            prof, prof_from = _start_profiler(), n_out
        now = time.perf_counter()
        if now - last_print >= a.progress_s:
            last_print = now
            # The engine's request id is ours plus a suffix: the one request there.
            req = next(iter(sched.requests.values()), None)
            done = req.num_computed_tokens if req is not None else a.context
            point = dict(t_s=round(now - t_start, 1), computed_tokens=done,
                         output_tokens=n_out)
            extra = ""
            if state is not None:
                point.update(host_gib=round(state.stats().get("host_mirrored_gib", 0), 2),
                             released_blocks=getattr(kvm, "num_released_blocks", 0))
                extra = (f", host {point['host_gib']:.1f} GiB mirrored, "
                         f"{point['released_blocks']} blocks released")
            progress.append(point)
            print(f"progress: {done} of {a.context} tokens computed, {n_out} output "
                  f"tokens, {now - t_start:.0f} s{extra}", flush=True)
    if prof is not None:
        prof.__exit__(None, None, None)
        rec["profile"] = _profile_summary(prof, n_out - prof_from)
    times, n_out = times[:a.output_tokens], min(n_out, a.output_tokens)
    if n_out < 3:
        raise SystemExit(f"only {n_out} output tokens")
    gaps = [b - a for a, b in zip(times[1:], times[2:])]   # decode steps after the first
    rec.update(fits=True, prefill_s=times[0] - t_start,
               first_decode_step_s=times[1] - times[0],
               tpot_ms=1e3 * (times[-1] - times[1]) / (n_out - 2),
               # The cluster cache fills during the first decode steps (their misses
               # are read over PCIe): the median is the steady state, the mean not.
               tpot_median_ms=1e3 * statistics.median(gaps),
               tpot_max_ms=1e3 * max(gaps),
               output_tokens=n_out, peak_gpu_gib=gpu_used_gib(),
               peak_gpu_allocated_gib=(torch.cuda.max_memory_allocated() / 2**30
                                       if torch.cuda.is_available() else None),
               progress=progress)
    if state is not None:
        s = state.stats()
        d = {k: s[k] - before[k] for k in ("retro_rows", "dense_rows", "exact_tokens",
                                            "context_tokens")}
        rec.update(host_gib=s.get("host_mirrored_gib"), host_reserved_gib=s.get("host_gib"),
                   released_blocks=getattr(kvm, "num_released_blocks", None),
                   retro_rows=d["retro_rows"], dense_rows=d["dense_rows"],
                   exact_fraction=d["exact_tokens"] / max(1, d["context_tokens"]),
                   cache_hit_rate=s.get("cache_hit_rate"),
                   mirror_stopped=s.get("mirror_stopped"),
                   index_pool_full=s.get("index_pool_full"),
                   index_build_s=state.index_build_seconds())
        if d["retro_rows"] == 0:
            raise SystemExit(f"retro served no decode rows: {s}")
    print(json.dumps(rec), flush=True)
    with open(a.child_out, "w") as f:
        json.dump(dict(records=[rec]), f)


def plot(res: dict, path: str) -> None:
    """Retro's prefill of the long request over time (host memory mirrored, GPU
    blocks released) with its figures, and each backend's outcome."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = res["records"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lines = []
    for r in recs:
        if not r.get("fits"):
            lines.append(f"{r['backend']} at {r['context']:,} tokens: refused at start-up "
                         f"({r.get('error', '')[:70]}...)")
            continue
        lines.append(f"{r['backend']} at {r['context']:,} tokens: prefill "
                     f"{r['prefill_s']:.0f} s, TPOT {r['tpot_ms']:.1f} ms, peak GPU "
                     f"{r.get('peak_gpu_gib') or 0:.0f} GiB, host "
                     f"{r.get('host_gib') or 0:.0f} GiB")
        pts = [p for p in r.get("progress", []) if "host_gib" in p]
        if pts and r.get("host_gib") is not None:   # the end of the run
            end = r["prefill_s"] + r["first_decode_step_s"] + \
                r["tpot_ms"] * (r["output_tokens"] - 2) / 1e3
            pts.append(dict(t_s=end, host_gib=r["host_gib"],
                            released_blocks=r.get("released_blocks") or 0))
        if pts:
            t = [p["t_s"] for p in pts]
            ax.plot(t, [p["host_gib"] for p in pts], "o-",
                    label=f"{r['backend']}: host GiB mirrored")
            blk = r.get("block_gib", 0) or 0
            if blk:
                ax.plot(t, [p["released_blocks"] * blk for p in pts], "s--",
                        label=f"{r['backend']}: GPU GiB released")
            ax.axvline(r["prefill_s"], color="gray", lw=0.8)
    ax.set_xlabel("seconds since the request arrived")
    ax.set_ylabel("GiB")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("\n".join(lines), fontsize=7)
    fig.suptitle(f"One long request through vllm.LLM, Llama-3-8B shape, {res['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="retro,FLASH_ATTN")
    ap.add_argument("--context", type=int, default=1 << 20)
    ap.add_argument("--chunk", type=int, default=16384,
                    help="vLLM's max_num_batched_tokens: the prefill chunk")
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=4)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    ap.add_argument("--retro-options",
                    default='{"wave_buffer": true, "host_memory_gib": 100}')
    ap.add_argument("--label", default="", help="backend name in retro's record")
    ap.add_argument("--progress-s", type=float, default=30.0)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="decode steps profiled after the timed ones (0: none)")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape-long")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", default="benchmarks/results/long_context_h200.json")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.backend:
        return child(a)
    results = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)
    parts, failed = run_children(__file__, a.out, a.backends.split(","))
    # Records of several invocations are merged: each names its own command.
    command = result_header()["command"]
    new = [dict(r, command=command) for _, got in parts for r in got["records"]]
    keys = {(r["backend"], r["context"]) for r in new}
    records = [r for r in results.get("records", [])
               if (r["backend"], r["context"]) not in keys] + new
    res = dict(result_header(), records=records)
    if failed:
        res["failed"] = failed
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out, flush=True)
    plot(res, os.path.splitext(a.out)[0] + ".png")
    if failed:
        raise SystemExit("failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
