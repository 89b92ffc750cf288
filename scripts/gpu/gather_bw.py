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

    python3 scripts/gpu/gather_bw.py OUT.json [--triton-only]
"""
import json
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


def main(path: str, triton_only: bool = False) -> None:
    free, _ = torch.cuda.mem_get_info()
    top = min(60e9, 0.8 * free - 2e9)
    big = torch.empty(int(top), dtype=torch.int8, device="cuda")
    big[: int(32e9)].random_(-8, 8)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "gathers": []}
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


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0] if args else "gather_bw.json", "--triton-only" in sys.argv)
