"""Random-row gather bandwidth of this GPU, by row size and by the span the rows lie
in (DRAM page and TLB locality), beside a plain copy.

Role: the decode kernels gather 256 B rows (cluster summaries, K/V token rows) from
random pool pages and cache blocks spread over tens of GB; this measures what such
gathers reach with torch.index_select. Bandwidth counts the bytes read and written.
On an H100 index_select's time follows the row count up to 512 B rows (~1.65 G rows
per second; benchmarks/results/gather_bw_h100.json): there it bounds that kernel,
not the DRAM, so the ceiling for 256 B rows needs a gather with 16-byte loads per
lane; the span result (no change from 1 to 60 GB) stands.

The Triton part (``--triton-only``: that part alone) asks it in the decode kernels'
own shape: programs of 4 warps, each reading tiles of ``T`` random rows (16-byte
loads per lane) into an element-wise xor (no traffic between lanes), ``P`` programs
per SM, one tile in flight per program (``AHEAD`` 0) or the next tile read before
this one is used (``AHEAD`` 1), each row's index read directly or through a second
table (``CHAIN``: the block table's dependent load). Read bandwidth only (a program
writes one number). On an H100, 512 B rows in tiles of 32 at 4 programs per SM:
2.8 TB/s direct, 2.5 through the table, against a 3.0 TB/s copy
(benchmarks/results/gather_bw_triton_h100.json).

The KV-run part (``--kv-runs``: that part alone) asks whether the tensor-memory
accelerator (TMA) keeps more bytes in flight than the kernels' register gathers, in
the attention kernel's access shape: the cache viewed as rows of ``H * 2D`` 16-bit
elements (one token, 4 KB at Llama-3-8B's shape), an item a run of ``BOX`` rows of one
KV head's ``2D`` columns (512 B each) starting at a random block's ``BOX``-aligned
row. :func:`_gather_runs_regs` reads tiles of 32 rows (``32 / BOX`` items) through
pointers, the next tile loaded before this one is used (as the kernels do);
:func:`_gather_runs_tma` reads each item as one TMA box (``TensorDescriptor``), 1-8
boxes issued per loop iteration (the boxes a program keeps in flight). Every form
xors every element it reads into one word per program, and the words' xor is the
same for every form (``tests/test_gather_bw.py`` runs both on the interpreter).

    python3 scripts/gpu/gather_bw.py OUT.json [--triton-only | --kv-runs]
    python3 scripts/gpu/gather_bw.py OUT.json OUT.png --plot   (the KV-run part as a PNG)
"""
import functools
import json
import operator
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows(src_ptr, idx_ptr, tab_ptr, out_ptr, n_tiles, ROW: tl.constexpr,
                T: tl.constexpr, CHAIN: tl.constexpr, AHEAD: tl.constexpr):
    """Program p reads tiles p, p + NP, ... of ``T`` rows of ``ROW`` 16-bit elements
    (tile t's rows at ``idx[t*T : (t+1)*T]``, through ``tab`` with CHAIN) and
    writes their xor's sum."""
    p = tl.program_id(0)
    npg = tl.num_programs(0)
    c = tl.arange(0, ROW)
    acc = tl.zeros([T, ROW], tl.int16)
    n_mine = (n_tiles - p + npg - 1) // npg
    t = p
    rows = tl.load(idx_ptr + t * T + tl.arange(0, T))
    if CHAIN:
        rows = tl.load(tab_ptr + rows)
    if AHEAD:
        x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * ROW + c[None, :])
    for i in range(0, n_mine):
        tn = tl.minimum(t + npg, n_tiles - 1)
        rows_n = tl.load(idx_ptr + tn * T + tl.arange(0, T))
        if CHAIN:
            rows_n = tl.load(tab_ptr + rows_n)
        if AHEAD:
            x_n = tl.load(src_ptr + rows_n.to(tl.int64)[:, None] * ROW + c[None, :])
            acc = acc ^ x
            x = x_n
        else:
            x = tl.load(src_ptr + rows.to(tl.int64)[:, None] * ROW + c[None, :])
            acc = acc ^ x
        rows = rows_n
        t = tn
    tl.store(out_ptr + p, tl.sum(tl.sum(acc.to(tl.float32), 1), 0))


@triton.jit
def _gather_runs_regs(src_ptr, items_ptr, out_ptr, n_tiles, W: tl.constexpr,
                      COLS: tl.constexpr, BOX: tl.constexpr, TILE: tl.constexpr):
    """Program p reads tiles p, p + NP, ... of ``TILE // BOX`` items (item ``i``: rows
    ``items[2i] + [0, BOX)``, columns ``items[2i+1] * COLS + [0, COLS)`` of a ``[*,
    W]`` 16-bit tensor) through pointers, and writes the xor of every element read.
    (Columns from a head index times COLS, as the kernels form them: provably
    aligned, so the loads are 16 bytes per lane.)"""
    p = tl.program_id(0)
    npg = tl.num_programs(0)
    per: tl.constexpr = TILE // BOX
    k = tl.arange(0, TILE)
    c = tl.arange(0, COLS)
    acc = tl.zeros([TILE, COLS], tl.int16)
    n_mine = (n_tiles - p + npg - 1) // npg
    it = p * per + k // BOX
    # (Scalar conditions enter masks as bounds: the interpreter mishandles vec & scalar.)
    ok = k < tl.where(n_mine > 0, TILE, 0)
    r0 = tl.load(items_ptr + 2 * it, mask=ok, other=0)
    c0 = tl.load(items_ptr + 2 * it + 1, mask=ok, other=0) * COLS
    x = tl.load(src_ptr + (r0 + k % BOX).to(tl.int64)[:, None] * W + (c0[:, None] + c[None, :]),
                mask=ok[:, None], other=0)
    for i in range(0, n_mine):
        okn = k < tl.where(i + 1 < n_mine, TILE, 0)
        itn = (p + (i + 1) * npg) * per + k // BOX
        r0n = tl.load(items_ptr + 2 * itn, mask=okn, other=0)
        c0n = tl.load(items_ptr + 2 * itn + 1, mask=okn, other=0) * COLS
        xn = tl.load(src_ptr + (r0n + k % BOX).to(tl.int64)[:, None] * W
                     + (c0n[:, None] + c[None, :]), mask=okn[:, None], other=0)
        acc = acc ^ x
        x = xn
    tl.store(out_ptr + p, tl.xor_sum(tl.xor_sum(acc, 1), 0).to(tl.int32))


@triton.jit
def _gather_runs_tma(desc, items_ptr, out_ptr, n_items, COLS: tl.constexpr,
                     BOX: tl.constexpr, STAGES: tl.constexpr, U: tl.constexpr):
    """Program p reads items p, p + NP, ... (as :func:`_gather_runs_regs`'s) each as
    one TMA box ``[BOX, COLS]`` of ``desc``, ``U`` boxes issued per iteration (Triton
    3.6 keeps one buffer per load whatever ``STAGES`` says for a loop without a
    product, so the boxes in flight are the loads written), and writes the xor of
    every element read."""
    p = tl.program_id(0)
    npg = tl.num_programs(0)
    acc = tl.zeros([BOX, COLS], tl.int16)
    for i0 in tl.range(p, n_items, npg * U, num_stages=STAGES):
        for u in tl.static_range(U):
            i = i0 + u * npg
            live = i < n_items
            r0 = tl.load(items_ptr + 2 * i, mask=live, other=0)
            c0 = tl.load(items_ptr + 2 * i + 1, mask=live, other=0) * COLS
            x = desc.load([r0, c0])
            acc = acc ^ tl.where(live, x, tl.zeros_like(x))
    tl.store(out_ptr + p, tl.xor_sum(tl.xor_sum(acc, 1), 0).to(tl.int32))


def kv_run_items(n_items: int, n_rows: int, heads: int, cols: int, box: int, block: int,
                 device, generator=None) -> torch.Tensor:
    """``[n_items, 2]`` int32 (first row, head) of random KV-head runs: a random
    block's ``box``-aligned run of ``box`` rows, a random head's columns."""
    blocks = torch.randint(0, n_rows // block, (n_items,), device=device, generator=generator)
    sub = torch.randint(0, block // box, (n_items,), device=device, generator=generator)
    head = torch.randint(0, heads, (n_items,), device=device, generator=generator)
    return torch.stack([blocks * block + sub * box, head], 1).to(torch.int32)


def gather_runs(src: torch.Tensor, items: torch.Tensor, box: int, programs: int,
                tma: bool, stages: int = 3, cols: int = 256, tile: int = 32,
                unroll: int = 1):
    """Runs one of the two KV-run gathers over ``items`` of ``src`` (``[rows, W]``
    16-bit) on ``programs`` programs; returns (launch function, per-program xor).
    The register form needs whole tiles: ``len(items)`` a multiple of ``tile //
    box``."""
    out = torch.empty(programs, dtype=torch.int32, device=src.device)
    grid = (programs,)
    n = items.shape[0]
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        desc = TensorDescriptor(src, list(src.shape), list(src.stride()), [box, cols])
        fn = lambda: _gather_runs_tma[grid](desc, items, out, n, COLS=cols, BOX=box,
                                            STAGES=stages, U=unroll, num_warps=4)
    else:
        per = tile // box
        if n % per:
            raise ValueError(f"{n} items do not fill tiles of {per}")
        fn = lambda: _gather_runs_regs[grid](src, items, out, n // per, W=src.shape[1],
                                             COLS=cols, BOX=box, TILE=tile, num_warps=4)
    return fn, out


def run_checksum(out: torch.Tensor) -> int:
    """The xor of the per-program words: of every element the programs read."""
    return functools.reduce(operator.xor, out.tolist(), 0)


def kv_runs(big: torch.Tensor, span: int, heads: int = 8, cols: int = 256,
            block: int = 16) -> list:
    """Read bandwidth of the two KV-run gathers over a ``span``-byte cache."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    src = big[:span].view(torch.int16).view(-1, heads * cols)
    res = []
    for box in (4, 8, 16):
        n = int(400e6) // (box * cols * 2) // 32 * 32
        items = kv_run_items(n, src.shape[0], heads, cols, box, block, "cuda")
        want = None
        # TMA: boxes in flight per program = U (see _gather_runs_tma), up to the
        # register form's 16 KB tile and beyond.
        forms = [("regs", 0, 1, P) for P in (2, 4, 8)] + \
                [("tma", 2, u, P) for u in (1, 2, 4, 8) for P in (2, 4, 8)
                 if u * box * cols * 2 <= 65536]
        for form, st, u, P in forms:
            rec = dict(kernel="kv_runs", form=form, box_rows=box, programs_per_sm=P,
                       boxes_per_iteration=u if form == "tma" else None)
            try:
                fn, out = gather_runs(src, items, box, sms * P, form == "tma", st, cols,
                                      unroll=u)
                us = bench(fn, 10)
                rec.update(us=round(us, 1), tb_s=round(n * box * cols * 2 / us / 1e6, 3),
                           checksum=run_checksum(out))
                # Every form reads every item once: one xor of everything read.
                want = rec["checksum"] if want is None else want
                if rec["checksum"] != want:
                    rec["error"] = f"checksum {rec['checksum']} != {want}"
            except Exception as exc:  # a form that fails is a finding
                rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
            res.append(rec)
            print(rec, flush=True)
    return res


def triton_gathers(big: torch.Tensor, span: int) -> list:
    """Read bandwidth of :func:`_gather_rows` over random rows of a ``span``-byte buffer."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    src = big[:span].view(torch.int16)
    for row_bytes in (256, 512):
        row = row_bytes // 2
        n = span // row_bytes
        nrows = int(400e6) // row_bytes
        tab = torch.randperm(n, device="cuda", dtype=torch.int64).to(torch.int32)
        for T in (16, 32, 64):
            if T * row_bytes > 16384:   # the attention kernel's K+V tile is 16 KB
                continue
            idx = torch.randint(0, n, (nrows // T * T,), device="cuda", dtype=torch.int32)
            n_tiles = idx.numel() // T
            for P in (2, 4, 8):
                for chain in (0, 1):
                    for ahead in (0, 1):
                        grid = (sms * P,)
                        res = torch.empty(grid[0], device="cuda", dtype=torch.float32)
                        fn = lambda: _gather_rows[grid](src, idx, tab, res, n_tiles, ROW=row,
                                                       T=T, CHAIN=chain, AHEAD=ahead,
                                                       num_warps=4)
                        us = bench(fn, 10)
                        r = dict(kernel="triton", span_gb=round(span / 1e9, 1),
                                 row_bytes=row_bytes, tile_rows=T, programs_per_sm=P,
                                 chain=chain, ahead=ahead, us=round(us, 1),
                                 tb_s=round(n_tiles * T * row_bytes / us / 1e6, 3))
                        out.append(r)
                        print(r, flush=True)
    return out


def bench(fn, it=20) -> float:
    """Mean microseconds of ``fn`` over ``it`` runs after one warm-up."""
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(it):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / it * 1e3


def main(path: str, triton_only: bool = False, kv_only: bool = False) -> None:
    free, _ = torch.cuda.mem_get_info()
    top = min(60e9, 0.8 * free - 2e9)
    big = torch.empty(int(top), dtype=torch.int8, device="cuda")
    big[: int(32e9)].random_(-8, 8)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "gathers": []}
    if kv_only:
        res["kv_runs"] = kv_runs(big, int(32e9))
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        return
    res["triton_gathers"] = triton_gathers(big, int(32e9))
    for span in (() if triton_only else (1e9, 8e9, top)):
        for row in (128, 256, 512, 4096):
            n = int(span) // row
            src = big[: n * row].view(n, row)
            nrows = int(200e6) // row
            idx = torch.randint(0, n, (nrows,), device="cuda")
            out = torch.empty(nrows, row, dtype=torch.int8, device="cuda")
            us = bench(lambda: torch.index_select(src, 0, idx, out=out))
            r = dict(span_gb=round(span / 1e9, 1), row_bytes=row, rows=nrows, us=round(us, 1),
                     tb_s=round(2 * nrows * row / us / 1e6, 3))
            res["gathers"].append(r)
            print(r, flush=True)
    c = big[: int(4e9)]
    d = torch.empty_like(c)
    res["copy_4gb_tb_s"] = round(2 * 4e9 / bench(lambda: d.copy_(c), 5) / 1e6, 3)
    print({"copy_4gb_tb_s": res["copy_4gb_tb_s"]})
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def plot_kv_runs(path: str, png: str) -> None:
    """The KV-run part of a result JSON as a PNG: TB/s of the TMA form by boxes per
    iteration, one line per (box rows, programs per SM), the register form's rate at
    the same box rows and programs as a dashed level."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        res = json.load(f)
    runs = res["kv_runs"]
    boxes = sorted({r["box_rows"] for r in runs})
    fig, axes = plt.subplots(1, len(boxes), figsize=(4.2 * len(boxes), 3.6), sharey=True)
    for ax, box in zip(axes, boxes):
        for pps, color in zip(sorted({r["programs_per_sm"] for r in runs}),
                              ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            tma = sorted((r["boxes_per_iteration"], r["tb_s"]) for r in runs
                         if r["form"] == "tma" and r["box_rows"] == box
                         and r["programs_per_sm"] == pps)
            if tma:
                ax.plot(*zip(*tma), marker="o", color=color, label=f"TMA, {pps}/SM")
            for r in runs:
                if r["form"] == "regs" and r["box_rows"] == box and r["programs_per_sm"] == pps:
                    ax.axhline(r["tb_s"], color=color, ls="--", lw=1,
                               label=f"registers, {pps}/SM")
        ax.set_xscale("log", base=2)
        ax.set_title(f"runs of {box} rows (512 B each)")
        ax.set_xlabel("TMA boxes per loop iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TB/s read")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"random KV-head runs, {res['device']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--plot" in sys.argv:
        plot_kv_runs(args[0], args[1])
    else:
        main(args[0] if args else "gather_bw.json", "--triton-only" in sys.argv,
             "--kv-runs" in sys.argv)
