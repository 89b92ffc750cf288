"""Wave buffer, issue 14: how fast can misses of the GPU cluster cache come over PCIe?

Measures on a CUDA GPU, in one run, three ways to bring ``N`` random 16-token pages
(one mirror page: 16 rows of ``[K | V]`` of one KV head, 8 KiB at D=128, bf16) of a
pinned host arena into cache slots on the device:

* ``zero-copy``: the cluster cache's Triton kernel
  (:func:`vllm_retro.memory.triton_page_copy.copy_pages`), which reads the pinned
  arena through its device address; the page list is on the device (as the cache's
  ``admit`` computes it), nothing is read back;
* ``host gather + copy engine``: the same pages gathered by the CPU into a pinned
  staging buffer, then one ``non_blocking`` host-to-device copy and a scatter into
  the slots (needs the page list on the host: one device-to-host read per step);
* ``contiguous copy engine``: one host-to-device copy of as many contiguous bytes,
  the PCIe ceiling.

Prints GB/s per way and writes JSON (device, date, versions, command, records).
Use: ``python benchmarks/page_copy_bench.py --arena-gib 8 --pages 1024,16384,65536``;
``--dry-run`` runs the same steps on CPU tensors at a tiny size (Triton's interpreter,
no pinning, wall-clock timers) to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"    # before Triton defines the kernel


def _time_cuda(fn, reps: int) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, timed with CUDA events."""
    if DRY:
        return _time_host(fn, reps)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _time_host(fn, reps: int) -> float:
    """Median wall seconds of ``fn`` (which synchronises) over ``reps`` runs."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arena-gib", type=float, default=8.0)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--pages", default="1024,16384,65536")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/page_copy_h200.json")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--plot", help="only plot this results JSON (to the same name .png)")
    args = ap.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), os.path.splitext(args.plot)[0] + ".png")
        return
    if not DRY and not torch.cuda.is_available():
        sys.exit("page_copy_bench: needs a CUDA GPU (the zero-copy reads are the point); "
                 "--dry-run checks the script on CPU")
    from vllm_retro.memory.host_mirror import _pinned_arena
    from vllm_retro.memory.triton_page_copy import copy_pages

    if DRY:
        args.arena_gib, args.pages, args.reps = 0.01, "8,32", 1
        args.out = os.devnull
        _pinned_arena = lambda r, c, d: torch.empty(r, c, dtype=d)  # noqa: E731,F811
        sync = lambda: None  # noqa: E731
    else:
        sync = torch.cuda.synchronize
    dev = torch.device("cpu" if DRY else "cuda")
    dt = torch.bfloat16
    cols = 2 * args.head_dim
    row_bytes = cols * dt.itemsize
    page_rows = 16
    page_bytes = page_rows * row_bytes
    rows = int(args.arena_gib * 2**30) // row_bytes // page_rows * page_rows
    arena = _pinned_arena(rows, cols, dt)
    # Content for the check: a random 64 MiB pattern repeated, each row stamped with
    # its own index in its first element (a page copied from the wrong row shows).
    bits = arena.view(torch.int16).view(-1)
    chunk = torch.randint(-2**15, 2**15, (32 * 2**20,), dtype=torch.int16)
    for s in range(0, bits.numel(), chunk.numel()):
        bits[s:s + chunk.numel()] = chunk[:bits.numel() - s]
    arena.view(torch.int16)[:, 0] = (torch.arange(rows) % 32749).to(torch.int16)
    n_pages_all = rows // page_rows
    counts = [int(x) for x in args.pages.split(",")]
    n_max = max(counts)
    cache = torch.empty(n_max, page_rows, cols, dtype=dt, device=dev)
    staging = torch.empty(n_max * page_rows, cols, dtype=dt)
    if not DRY:
        staging = staging.pin_memory()
    flat = torch.empty(n_max * page_rows * cols, dtype=dt, device=dev)
    g = torch.Generator().manual_seed(0)
    records = []
    for n in counts:
        pages = torch.randperm(n_pages_all, generator=g)[:n]
        rows_host = pages * page_rows
        rows_dev = rows_host.to(dev)
        slots_dev = torch.randperm(n, generator=g).to(dev)
        nbytes = n * page_bytes

        def zero_copy():
            copy_pages(arena, cache, rows_dev, slots_dev)

        t_zc = _time_cuda(zero_copy, args.reps)
        # The copy really happened: every slot holds its page.
        want = arena.view(n_pages_all, page_rows, cols)[pages]
        got = cache[slots_dev].cpu()
        if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
            raise SystemExit(f"zero-copy pages differ from the arena at {n} pages")

        idx = (rows_host.view(-1, 1) + torch.arange(page_rows)).view(-1)

        def host_gather_copy():
            torch.index_select(arena, 0, idx, out=staging[:n * page_rows])
            dst = staging[:n * page_rows].to(dev, non_blocking=True)
            cache[slots_dev] = dst.view(n, page_rows, cols)
            sync()

        t_hg = _time_host(host_gather_copy, args.reps)
        src = arena.view(-1)[:n * page_rows * cols]

        def contiguous():
            flat[:src.numel()].copy_(src, non_blocking=True)

        t_ct = _time_cuda(contiguous, args.reps)
        rec = {"pages": n, "bytes": nbytes,
               "zero_copy_gbs": nbytes / t_zc / 1e9,
               "host_gather_copy_gbs": nbytes / t_hg / 1e9,
               "contiguous_gbs": nbytes / t_ct / 1e9,
               "zero_copy_ms": t_zc * 1e3, "host_gather_copy_ms": t_hg * 1e3,
               "contiguous_ms": t_ct * 1e3}
        records.append(rec)
        print(f"{n:>7} pages ({nbytes / 2**20:8.1f} MiB): zero-copy {rec['zero_copy_gbs']:6.1f} "
              f"GB/s, host gather + copy {rec['host_gather_copy_gbs']:6.1f} GB/s, "
              f"contiguous {rec['contiguous_gbs']:6.1f} GB/s", flush=True)
    import triton
    out = {"device": "dry run (CPU)" if DRY else torch.cuda.get_device_name(),
           "date": datetime.date.today().isoformat(),
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "triton": triton.__version__},
           "command": "benchmarks/page_copy_bench.py " + " ".join(argv or sys.argv[1:]),
           "arena_gib": args.arena_gib, "page_bytes": page_bytes, "records": records}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", args.out)
    if not DRY:
        plot(out, os.path.splitext(args.out)[0] + ".png")


def plot(res: dict, path: str) -> None:
    """Copy rate against the number of random pages, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = res["records"]
    pages = [r["pages"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("zero_copy_gbs", "zero-copy Triton gather (pinned arena)"),
                       ("host_gather_copy_gbs", "host gather + copy engine"),
                       ("contiguous_gbs", "contiguous copy (PCIe reference)")):
        ax.plot(pages, [r[key] for r in recs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"random pages of {res['page_bytes'] // 1024} KiB per copy")
    ax.set_ylabel("GB/s host -> device")
    ax.set_title(f"cluster-cache misses over PCIe, {res['device']}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
