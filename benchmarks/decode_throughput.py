"""Decode throughput through ``vllm.LLM``: retro and FLASH_ATTN side by side.

Llama-3-8B shape (``load_format="dummy"``, bf16), token-id prompts of random ids,
vLLM's defaults otherwise (V2 model runner, FULL_AND_PIECEWISE CUDA graphs,
gpu_memory_utilization 0.92). For each backend, in its own child process (so each
engine gets the whole GPU), for each context a batch sweep up to the largest batch
the backend's KV cache holds. The engine is stepped by hand: the prefill phase lasts
until every request has its first token; the decode phase is timed from the step after
that one (retro builds a prompt's index before its first decode step, so that step
counts as prefill) to the last token (``decode_tok_s`` = decode tokens / decode
seconds, ``tpot_ms`` = decode seconds / decode steps). ``index_build_s``: GPU time
of retro's index builds during the prefill phase, per request. ``peak_gpu_gib``:
device memory in use after the batch (vLLM preallocates its KV cache, so this is
the engine's footprint). ``--shape tiny`` dry-runs the harness on a CPU machine
(with a dense backend, e.g. ``--backends CPU_ATTN``: retro's records read the GPU
path's device counters).

Retro's records carry the device counters of its kernels (``retro_rows`` decode
rows served over an index, ``dense_rows`` rows attended exactly because they had
no index yet) and the fractions read exactly / estimated; a retro record with no
retro rows fails the run (a silent fallback to dense must be impossible to miss).

    python benchmarks/decode_throughput.py --contexts 32768,131072 \
        --out benchmarks/results/decode_throughput_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=1 << 20, hidden_act="silu",
    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=128000,
    eos_token_id=128001)


# A small shape for dry runs of the harness on a CPU machine.
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=4096,
            torch_dtype="float32")
SHAPES = {"llama3-8b": LLAMA3_8B, "tiny": TINY}


def write_model(path: str, shape: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(SHAPES[shape], f)
    return path


def gpu_used_gib():
    """Device memory in use (the engine's KV cache, weights, graphs), or None."""
    import torch
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def retro_manager():
    """The in-process engine's retro worker state (its ``PagedIndexManager``): its
    counters say what retro's kernels served."""
    from vllm_retro.worker_state import _STATES
    st = [s for s in _STATES.values() if s.paged is not None]
    if not st:
        raise SystemExit("retro selected but no paged-index state in this process")
    return st[0].paged


def batch_plan(requested, largest: int, wave: bool, max_batch: int = 0,
               max_num_seqs: int = 0) -> list:
    """The batches one context runs, ascending: the requested ones the KV cache
    holds plus its ``largest`` (with the wave buffer every requested one and not
    ``largest``: mirrored requests give their blocks back after prefill, so batches
    beyond the cache are the point); none if not one request fits; at most
    ``max_batch``; and none above ``max_num_seqs`` (the engine's), where the engine
    would decode the batch in turns (not a measurement of that batch: it becomes
    ``max_num_seqs``)."""
    if largest <= 0:
        return []
    req = {int(b) for b in requested}
    plan = {b for b in req if b <= largest or wave} | (set() if wave else {largest})
    if max_batch:
        plan = {b for b in plan if b <= max_batch}
    if max_num_seqs:
        plan = {min(b, max_num_seqs) for b in plan}
    return sorted(plan)


def child(a) -> None:
    # In-process engine core, so the retro counters of the worker are readable here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model = write_model(a.model_dir, a.shape)
    max_ctx = max(map(int, a.contexts.split(",")))
    kw = dict(model=model, load_format="dummy", skip_tokenizer_init=True,
              max_model_len=max_ctx + a.output_tokens + 16, seed=0,
              enable_prefix_caching=False)
    if a.max_num_seqs:
        kw["max_num_seqs"] = a.max_num_seqs
    if torch.cuda.is_available():
        kw.update(dtype="bfloat16", gpu_memory_utilization=0.92)
    else:  # dry run of the harness on a CPU machine
        kw.update(dtype="float32", enforce_eager=True)
    if a.backend == "retro":
        kw["attention_backend"] = "retro"
        kw["additional_config"] = {"retro": json.loads(a.retro_options)}
        wave = bool(json.loads(a.retro_options).get("wave_buffer"))
    else:
        wave = False
        kw["attention_backend"] = a.backend
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    eng = llm.llm_engine
    cc = eng.vllm_config.cache_config
    capacity = cc.num_gpu_blocks * cc.block_size
    state = retro_manager() if a.backend == "retro" else None
    g = torch.Generator().manual_seed(0)
    vocab = min(100000, SHAPES[a.shape]["vocab_size"])
    recs = []
    rid = 0
    for ctx in map(int, a.contexts.split(",")):
        largest = capacity // (ctx + a.output_tokens + 16)
        batches = batch_plan(a.batches.split(","), largest, wave,
                             a.max_batch, eng.vllm_config.scheduler_config.max_num_seqs)
        for b in batches:
            params = SamplingParams(max_tokens=a.output_tokens, ignore_eos=True,
                                    temperature=0.0)
            before = state.stats() if state else None
            mid = None
            build0 = state.index_build_seconds() if state else 0.0
            ids = []
            for _ in range(b):
                toks = torch.randint(100, vocab - 1, (ctx,), generator=g).tolist()
                eng.add_request(str(rid), TokensPrompt(prompt_token_ids=toks), params)
                ids.append(str(rid))
                rid += 1
            t_start = time.perf_counter()
            got = dict.fromkeys(ids, 0)
            t_first = t_win = None
            steps_decode = steps_win = 0
            finished_early = False
            steps_any = 0        # steps with at least one decode row
            step_s = []          # wall time of each step after t_first
            while eng.has_unfinished_requests():
                steps_any += any(v >= 2 for v in got.values())
                ts = time.perf_counter()
                outs = eng.step()
                if t_first is not None:
                    step_s.append(time.perf_counter() - ts)
                for o in outs:
                    got[o.request_id] = len(o.outputs[0].token_ids)
                done = any(v >= a.output_tokens for v in got.values())
                if t_first is None and all(v >= 2 for v in got.values()):
                    t_first = time.perf_counter()
                    tok_first = sum(got.values())
                    finished_early = done
                elif t_first is not None:
                    steps_decode += 1
                    if steps_decode == 1 and state is not None and wave:
                        # Host memory is sampled while every request decodes: the
                        # mirrors are freed as requests finish.
                        mid = state.stats()
                    if t_win is None and done:
                        # The window in which all b requests decode together ends
                        # with the first finish (requests admitted later, e.g. into
                        # blocks the wave buffer released, finish later).
                        t_win, tok_win, steps_win = time.perf_counter(), sum(got.values()), \
                            steps_decode
            t_end = time.perf_counter()
            if t_win is None or finished_early:
                t_win, tok_win, steps_win = t_end, sum(got.values()), steps_decode
            dec_tokens = tok_win - tok_first
            dec_s = t_win - t_first
            rec = dict(backend=(a.label or a.backend) if a.backend == "retro" else a.backend,
                       context=ctx, batch=b,
                       decode_tok_s=dec_tokens / dec_s if dec_s > 0 else None,
                       tpot_ms=1e3 * dec_s / max(1, steps_win),
                       # The window's median and slowest step: a few slow steps (a
                       # newly mirrored request's cold cache) move the mean.
                       tpot_median_ms=1e3 * statistics.median(step_s[:steps_win])
                       if step_s[:steps_win] else None,
                       tpot_max_ms=1e3 * max(step_s[:steps_win], default=0.0),
                       # Every step of the window (wall ms, in order): the distribution
                       # behind the mean (e.g. band re-ranking's full and re-ranking steps).
                       step_ms=[round(1e3 * t, 3) for t in step_s[:steps_win]],
                       decode_steps=steps_win,
                       # False: a request finished before the last one decoded, so
                       # no step ran all b together (output_tokens too short).
                       concurrent=not finished_early,
                       prefill_s=t_first - t_start,
                       peak_gpu_gib=gpu_used_gib(),
                       kv_capacity_tokens=capacity, largest_batch=largest)
            if state:
                after = state.stats()
                d = {k: after[k] - before[k] for k in after}
                ctx_tok = max(1, d["context_tokens"])
                rec.update(retro_rows=d["retro_rows"], dense_rows=d["dense_rows"],
                           flash_rows=d.get("flash_rows", 0),
                           reranked_rows=d.get("reranked_rows", 0),
                           exact_fraction=d["exact_tokens"] / ctx_tok,
                           estimated_fraction=d["estimated_tokens"] / ctx_tok,
                           index_build_s=(state.index_build_seconds() - build0) / b)
                if "cache_hits" in d:
                    # The wave buffer: host memory held while all requests decode, the
                    # cluster cache's hit rate over its page reads, and the bytes
                    # that crossed PCIe per decode step (misses read by attention +
                    # pages admitted, both whole pages).
                    looked = d["cache_hits"] + d["cache_misses"]
                    pb = state.cache.page_bytes
                    mid = mid or after
                    rec.update(host_gib=mid["host_mirrored_gib"],
                               host_reserved_gib=mid["host_gib"],
                               mirrored_requests=mid["mirrored_requests"],
                               cache_hit_rate=d["cache_hits"] / looked if looked else None,
                               pcie_gib_per_step=(d["cache_misses"] + d["cache_admitted"])
                               * pb / 2**30 / max(1, steps_any),
                               mirror_refused=d["mirror_refused"])
                # Every decode row is accounted for: on retro's kernels, or on
                # FlashAttention only through the dense switch (dense_below), which
                # counts them; a silent fallback leaves both at zero.
                if d["retro_rows"] + d.get("flash_rows", 0) == 0:
                    raise SystemExit(f"retro served no decode rows at {ctx}x{b}: {d}")
            recs.append(rec)
            print(json.dumps(rec), flush=True)
            # Written after every record: a run cut short keeps what it measured.
            with open(a.child_out, "w") as f:
                json.dump(dict(startup_s=startup, records=recs), f)
    prof = None
    if a.profile:
        ctx, b = map(int, a.profile.split("x"))
        room = eng.vllm_config.model_config.max_model_len - ctx - 1
        prof = profile_decode(eng, ctx, b, vocab, g, rid, max_tokens=room, state=state)
        print("profile " + json.dumps(prof), flush=True)
    with open(a.child_out, "w") as f:
        json.dump(dict(startup_s=startup, records=recs, profile=prof), f)


def profile_decode(eng, ctx: int, batch: int, vocab: int, g, rid: int, max_tokens: int,
                   state=None, steps: int = 24) -> dict:
    """Where a decode step's time goes: ``batch`` requests of ``ctx`` tokens; after
    every request's first token, three phases of ``steps`` decode steps each: no
    profiler (wall time per step), the torch profiler (device time per step, the top
    kernels and named ranges, the top host operations by self time), and Python's
    cProfile (host functions by cumulative time per step: where the host spends a
    step when the GPU waits for it). The requests may produce ``max_tokens`` (all
    the room the model length leaves: the first ones decode while the later ones
    prefill, and none may finish inside the phases) and are aborted afterwards.
    ``decode_rows_per_step`` (from retro's counters, ``state``) says how many rows
    each phase's steps really had."""
    import cProfile
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    from profiling import per_step, top
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    got = {}
    for i in range(batch):
        toks = torch.randint(100, vocab - 1, (ctx,), generator=g).tolist()
        eng.add_request(f"prof{rid + i}", TokensPrompt(prompt_token_ids=toks), params)
        got[f"prof{rid + i}"] = 0
    while not all(v >= 2 for v in got.values()):
        for o in eng.step():
            got[o.request_id] = len(o.outputs[0].token_ids)

    rows = {}

    def run(n, phase):
        """(wall seconds, steps run) over up to ``n`` steps (fewer once all finish)."""
        before = state.stats() if state is not None else None
        t0 = time.perf_counter()
        done = 0
        for _ in range(n):
            if not eng.has_unfinished_requests():
                break
            eng.step()
            done += 1
        wall = time.perf_counter() - t0
        if state is not None:
            after = state.stats()
            served = ("retro_rows", "dense_rows", "flash_rows")
            rows[phase] = round(sum(after.get(k, 0) - before.get(k, 0) for k in served)
                                / max(1, done), 2)
        return wall, max(1, done)

    plain_s, plain_n = run(steps, "plain")
    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    with profile(activities=acts) as p:
        wall, n = run(steps, "torch_profiler")
    dev, host, ranges = per_step(p, n)
    pr = cProfile.Profile()
    pr.enable()
    py_s, py_n = run(steps, "cprofile")
    pr.disable()
    py = {f"{os.path.basename(fn)}:{line}:{name}": 1e6 * ct / py_n
          for (fn, line, name), (cc, nc, tt, ct, callers) in pstats.Stats(pr).stats.items()}
    eng.abort_request(list(got))
    while eng.has_unfinished_requests():
        eng.step()
    return dict(context=ctx, batch=batch, steps=n, decode_rows_per_step=rows,
                wall_ms_per_step_plain=1e3 * plain_s / plain_n,
                wall_ms_per_step=1e3 * wall / n,
                device_us_per_step=round(sum(dev.values()), 1),
                retro_ranges_device_us_per_step=ranges,
                top_kernels_us_per_step=top(dev), top_host_us_per_step=top(host),
                python_wall_ms_per_step=1e3 * py_s / py_n,
                top_python_cumulative_us_per_step=top(py, 40))


def plot(res: dict, path: str) -> None:
    """Decode tok/s per (context, batch) for dense, retro and retro with the wave
    buffer (records labelled ``retro+wb...``): per family and context the latest
    run's records, with other batches measured the same day (a rerun replaces older
    code's figures); and retro's ratio over dense at the same context (largest batch
    against largest batch)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def family(be):
        return ("dense (FLASH_ATTN)" if be == "FLASH_ATTN" else
                "retro + wave buffer" if be.startswith("retro+wb") else
                "retro, accuracy preset" if be.startswith("retro+preset") else "retro")

    def run_no(r):
        return r.get("run") if r.get("run") is not None else -1
    # A record whose requests did not all decode together measured no batch.
    records = [r for r in res["records"] if r.get("concurrent", True)]
    newest = {}
    for r in records:
        k = (family(r["backend"]), r["context"])
        if k not in newest or run_no(r) >= run_no(newest[k]):
            newest[k] = r
    latest = {}
    for r in records:
        k = (family(r["backend"]), r["context"])
        if r.get("date") != newest[k].get("date") and run_no(r) != run_no(newest[k]):
            continue
        key = k + (r["batch"],)
        if key not in latest or run_no(r) >= run_no(latest[key]):
            latest[key] = r
    fams = ["dense (FLASH_ATTN)", "retro", "retro + wave buffer", "retro, accuracy preset"]
    ctxs = sorted({c for _, c, _ in latest})
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 5), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs):
        top = {}
        for fam, mk in zip(fams, ("s-", "o-", "^-", "D-")):
            rs = sorted((r for (f, c, _), r in latest.items() if f == fam and c == ctx),
                        key=lambda r: r["batch"])
            if rs:
                ax.plot([r["batch"] for r in rs], [r["decode_tok_s"] for r in rs], mk,
                        label=fam)
                top[fam] = rs[-1]
        title = f"context {ctx // 1024}K"
        dense = top.get(fams[0])
        if dense:
            for fam in fams[1:]:
                if fam in top:
                    t = top[fam]
                    title += (f"\n{fam}: {t['decode_tok_s']:.0f} tok/s at {t['batch']} = "
                              f"x{t['decode_tok_s'] / dense['decode_tok_s']:.2f} dense's "
                              f"{dense['decode_tok_s']:.0f} at {dense['batch']}")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_ylabel("decode tokens/s")
        ax.legend()
    # Two lines: one context's panel is narrower than the title on one line.
    fig.suptitle(f"Decode throughput through vllm.LLM, Llama-3-8B shape\n{res['device']} "
                 "(each backend's latest runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_children(script: str, out: str, backends) -> tuple:
    """Runs ``script`` with this command line once per backend, each in a child
    process (each engine gets the whole GPU), the child writing ``out.<backend>.partial``.
    Returns ``([(backend, the child's JSON)], [failures])``."""
    parts, failed = [], []
    for be in backends:
        part = out + f".{be}.partial"
        if os.path.exists(part):
            os.remove(part)
        print("running", be, flush=True)
        r = subprocess.run([sys.executable, os.path.abspath(script), "--backend", be,
                            "--child-out", part] + sys.argv[1:])
        if r.returncode != 0:
            failed.append(f"{be} ({r.returncode})")
        if os.path.exists(part):
            with open(part) as f:
                parts.append((be, json.load(f)))
    return parts, failed


def result_header() -> dict:
    """Device, date, versions and command of a results JSON."""
    import torch
    import vllm
    return dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                date=datetime.date.today().isoformat(),
                versions=dict(vllm=vllm.__version__, torch=torch.__version__),
                command="python " + " ".join(sys.argv))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plot", help="only plot this results JSON (to the same name .png)")
    ap.add_argument("--backends", default="retro,FLASH_ATTN")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--max-batch", type=int, default=0)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=0,
                    help="vLLM's max_num_seqs (0: its default); bounds the CUDA-graph "
                         "capture sizes, so a smaller value shortens engine start-up")
    ap.add_argument("--retro-options", default="{}")
    ap.add_argument("--label", default="",
                    help="backend name in retro's records (e.g. retro+wb with "
                         "--retro-options '{\"wave_buffer\": true}')")
    ap.add_argument("--profile", default="",
                    help="CTXxB: after the sweep, profile the decode steps of B requests "
                         "of CTX tokens (wall vs device time per step, top kernels and "
                         "host operations); printed and stored per backend")
    ap.add_argument("--model-dir", default="/tmp/llama3-8b-shape")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", default="benchmarks/results/decode_throughput_h200.json")
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.plot:
        with open(a.plot) as f:
            return plot(json.load(f), a.plot.rsplit(".", 1)[0] + ".png")
    if a.backend:
        return child(a)
    results = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            results = json.load(f)
    # This run replaces the earlier records of its (backend, context) pairs only.
    labels = [a.label or be if be == "retro" else be for be in a.backends.split(",")]
    ctxs = set(map(int, a.contexts.split(",")))
    records = [r for r in results.get("records", [])
               if not (r["backend"] in labels and r["context"] in ctxs)]
    profiles = results.get("profiles", {})
    parts, failed = run_children(__file__, a.out, a.backends.split(","))
    # The decode kernels' switches of this run, on its records too: runs with other
    # switches (and labels) share one results file.
    env = {k: v for k, v in os.environ.items() if k.startswith(("RETRO_DECODE_", "RETRO_KMEANS_"))}
    for be, got in parts:
        if env:
            for r in got["records"]:
                r["env"] = env
        records += got["records"]
        if got.get("profile"):
            profiles[be] = got["profile"]
    res = dict(result_header(), records=records)
    if profiles:
        res["profiles"] = profiles
    if env:
        res["env"] = env
    if failed:
        res["failed"] = failed
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)
    if failed:
        raise SystemExit("failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
