"""Random-row gather bandwidth of this GPU, by row size and by the span the rows lie
in (DRAM page and TLB locality), beside a plain copy.

Role: the decode kernels gather 256 B rows (cluster summaries, K/V token rows) from
random pool pages and cache blocks spread over tens of GB; this measures what such
gathers reach with torch.index_select. Bandwidth counts the bytes read and written.
On an H100 index_select's time follows the row count up to 512 B rows (~1.65 G rows
per second; benchmarks/results/gather_bw_h100.json): there it bounds that kernel,
not the DRAM, so the ceiling for 256 B rows needs a gather with 16-byte loads per
lane; the span result (no change from 1 to 60 GB) stands.

    python3 scripts/gpu/gather_bw.py OUT.json
"""
import json
import sys

import torch


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


def main(path: str) -> None:
    free, _ = torch.cuda.mem_get_info()
    top = min(60e9, 0.8 * free - 2e9)
    big = torch.empty(int(top), dtype=torch.int8, device="cuda")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gathers": []}
    for span in (1e9, 8e9, top):
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
    main(sys.argv[1] if len(sys.argv) > 1 else "gather_bw.json")
