"""``scripts/gpu/ncu_summary.py`` reads an Nsight Compute details CSV as the GPU
script's ``ncu`` stage writes it (progress lines first, rule rows shorter than the
header) into one record per launch, durations in microseconds."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
        '"Block Size","Grid Size","Device","CC","Section Name","Metric Name",'
        '"Metric Unit","Metric Value","Rule Name","Rule Type","Rule Description"')


def _load():
    spec = importlib.util.spec_from_file_location(
        "ncu_summary", os.path.join(ROOT, "scripts", "gpu", "ncu_summary.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(i, kernel, metric, unit, value):
    return (f'"{i}","1","python3","h","{kernel}","1","7","(128, 1, 1)","(256, 1, 1)",'
            f'"0","9.0","S","{metric}","{unit}","{value}","","",""')


def test_one_record_per_launch_in_microseconds(tmp_path):
    lines = ["==PROF== Connected to process 1", HEAD,
             _row(0, "_score_kernel", "Duration", "ns", "18,432"),
             _row(0, "_score_kernel", "Achieved Occupancy", "%", "23.88"),
             '"0","1","python3","h","_score_kernel","1","7","(128, 1, 1)"',   # rule row
             _row(1, "_key_kernel", "Duration", "ms", "0.0115"),
             _row(1, "_key_kernel", "Registers Per Thread", "register/thread", "48")]
    f = tmp_path / "ncu.csv"
    f.write_text("\n".join(lines) + "\n")
    recs = _load().summarize(str(f))
    assert [name for name, _ in recs] == ["_score_kernel", "_key_kernel"]
    assert recs[0][1] == {"us": "18.43", "occ%": "23.88"}
    assert recs[1][1] == {"us": "11.50", "regs": "48"}
