"""Random-row gather bandwidth on the GPU by row size and by the span the rows lie in
(TLB reach): torch.index_select over [span / row, row] int8 views."""
import json, sys, torch
dev = "cuda"
res = []
big = torch.empty(int(60e9), dtype=torch.int8, device=dev)
def bench(fn, it=20):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(it): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / it * 1e3  # us
for span in (1e9, 8e9, 60e9):
    for row in (128, 256, 512, 4096):
        n = int(span) // row
        src = big[: n * row].view(n, row)
        nrows = int(200e6) // row
        idx = torch.randint(0, n, (nrows,), device=dev)
        out = torch.empty(nrows, row, dtype=torch.int8, device=dev)
        us = bench(lambda: torch.index_select(src, 0, idx, out=out))
        r = dict(span_gb=span / 1e9, row_bytes=row, rows=nrows, us=round(us, 1),
                 tb_s=round(2 * nrows * row / us / 1e6, 3))
        res.append(r); print(r, flush=True)
c = big[: int(4e9)]; d = torch.empty_like(c)
us = bench(lambda: d.copy_(c), 5)
print({"copy_4gb_tb_s": round(2 * 4e9 / us / 1e6, 3)})
json.dump(res, open(sys.argv[1], "w"), indent=1)
