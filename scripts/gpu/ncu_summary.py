"""One line per profiled kernel launch from an Nsight Compute ``--csv --page details``
export (the ``ncu`` stage of ``scripts/gpu/run.sh``): duration, grid, registers,
occupancy, DRAM throughput, cycles per issued instruction and warp instructions.

    python scripts/gpu/ncu_summary.py ncu.csv
"""

import csv
import sys

METRICS = (("Duration", "us"), ("Grid Size", "grid"), ("Registers Per Thread", "regs"),
           ("Achieved Occupancy", "occ%"), ("DRAM Throughput", "dram%"),
           ("Warp Cycles Per Issued Instruction", "cyc/inst"),
           ("Executed Instructions", "warp inst"))


def summarize(path: str) -> list:
    """[(kernel name, {short name: value text})] in launch order."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # ncu prints its own progress lines before the CSV header.
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "Metric Name" in r)
    head = rows[start]
    col = {k: head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Unit",
                                      "Metric Value")}
    out: dict = {}
    for r in rows[start + 1:]:
        if len(r) <= col["Metric Value"]:   # (rule rows stop short of the header)
            continue
        rec = out.setdefault(r[col["ID"]], (r[col["Kernel Name"]], {}))
        for name, short in METRICS:
            if r[col["Metric Name"]] == name:
                val, unit = r[col["Metric Value"]], r[col["Metric Unit"]]
                if name == "Duration" and unit in ("ns", "nsecond"):
                    val = f"{float(val.replace(',', '')) / 1000:.2f}"
                elif name == "Duration" and unit in ("ms", "msecond"):
                    val = f"{float(val.replace(',', '')) * 1000:.2f}"
                rec[1].setdefault(short, val)
    return list(out.values())


def main() -> None:
    recs = summarize(sys.argv[1])
    shorts = [s for _, s in METRICS]
    print(f"{'kernel':<18}" + "".join(f"{s:>12}" for s in shorts))
    for name, vals in recs:
        print(f"{name[:18]:<18}" + "".join(f"{vals.get(s, '-'):>12}" for s in shorts))


if __name__ == "__main__":
    main()
