"""CI compile check of ``scripts/gpu/bulk_bw.cu`` (the bulk-copy gather benchmark run
on GPU hosts): it compiles for sm_90 with nvcc (host and device code, one object),
and its bulk-copy kernel really is made of bulk copies and mbarrier waits (``UBLKCP``
and ``SYNCS`` instructions in the sm_90 SASS, read with the ``cuobjdump`` that Triton
ships, where found). Its results, and the agreement of its forms' checksums, are
checked on the GPU by the program itself (exit status 1 on a mismatch). Skipped where
nvcc is not found."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import find_nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "scripts", "gpu", "bulk_bw.cu")
NVCC = find_nvcc()


def _cuobjdump():
    import triton
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                       "cuobjdump")
    return exe if os.path.exists(exe) else shutil.which("cuobjdump")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_bulk_bw_compiles_to_bulk_copies_for_sm90(tmp_path):
    obj = tmp_path / "bulk_bw.o"
    r = subprocess.run([NVCC, "-c", "-arch=sm_90", "-O3", "-std=c++17", SRC, "-o", str(obj)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    dump = _cuobjdump()
    if dump is None:
        pytest.skip("cuobjdump not found: compiled, SASS not inspected")
    sass = subprocess.run([dump, "-sass", str(obj)], capture_output=True, text=True,
                          timeout=120).stdout
    bodies = re.split(r"^\s*Function : ", sass, flags=re.M)
    bulk = [b for b in bodies if "gather_bulk" in b.split("\n", 1)[0]]
    assert len(bulk) == 1, "no gather_bulk kernel in the object"
    assert "UBLKCP" in bulk[0], "gather_bulk has no bulk copy"
    assert "SYNCS.PHASECHK" in bulk[0] and "SYNCS.ARRIVE" in bulk[0], \
        "gather_bulk has no mbarrier wait / arrive"
