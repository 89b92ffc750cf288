"""CI compile check of ``scripts/gpu/bulk_bw.cu`` (the bulk-copy gather benchmark run
on GPU hosts): it compiles for sm_90 with nvcc, and its bulk-copy kernel really is
made of bulk copies and mbarrier waits (``UBLKCP`` and ``SYNCS`` instructions in the
sm_90 SASS, read with the ``nvdisasm`` that Triton ships, where found). Its results,
and the agreement of its forms' checksums, are checked on the GPU by the program
itself (exit status 1 on a mismatch). Skipped where nvcc is not found."""

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "scripts", "gpu", "bulk_bw.cu")
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _nvdisasm():
    import triton
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                   "bin", "nvdisasm"))
    return found[0] if found else shutil.which("nvdisasm")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_bulk_bw_compiles_to_bulk_copies_for_sm90(tmp_path):
    cubin = tmp_path / "bulk_bw.cubin"
    r = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", SRC, "-o",
                        str(cubin)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([NVCC, "-arch=sm_90", "-O3", "-std=c++17", SRC, "-o",
                        str(tmp_path / "bulk_bw")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    dis = _nvdisasm()
    if dis is None:
        pytest.skip("nvdisasm not found: compiled, SASS not inspected")
    sass = subprocess.run([dis, "-c", str(cubin)], capture_output=True, text=True,
                          timeout=120).stdout
    bodies = re.split(r"^//-+ \.text\.", sass, flags=re.M)
    bulk = [b for b in bodies if b.split(" ", 1)[0].find("gather_bulk") >= 0]
    assert len(bulk) == 1, "no gather_bulk kernel in the cubin"
    assert "UBLKCP" in bulk[0], "gather_bulk has no bulk copy"
    assert "SYNCS.PHASECHK" in bulk[0] and "SYNCS.ARRIVE" in bulk[0], \
        "gather_bulk has no mbarrier wait / arrive"
