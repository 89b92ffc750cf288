"""CI compile check of the extension's CUDA sources (issue 13): a CUDA compile error
cannot land, though CI has no GPU and a CPU build of torch.

* every ``csrc/cuda/*.cu`` (kernels and their host launchers; CUDA runtime headers
  only) is compiled with nvcc for sm_90, device code through ptxas;
* every ``csrc/cuda/*.cpp`` (the torch-op wrappers that CUDA builds add; generic
  ATen/c10 headers only) is compiled with the host compiler against this torch;
* both are linked with the schemas of ``csrc/bindings.cpp`` (its ``TORCH_LIBRARY``
  block, copied) into a scratch library, which a fresh interpreter loads: each op the
  wrappers register must then have a CUDA kernel (a wrapper whose C++ signature does
  not match its schema fails to load).

Skipped where nvcc is not found. The kernels' results are checked on a GPU
(``test_paged_decode_attention.py::test_cuda_score_matches_triton``).
"""

import glob
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

from conftest import find_nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CU = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
WRAPPERS = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _stub_source() -> str:
    """The TORCH_LIBRARY block of csrc/bindings.cpp (the op schemas) as a TU of its own."""
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        src = f.read()
    m = re.search(r"^TORCH_LIBRARY\(vllm_retro, m\) \{.*?^\}", src, re.S | re.M)
    assert m, "no TORCH_LIBRARY(vllm_retro, m) block in csrc/bindings.cpp"
    return "#include <torch/library.h>\n\n" + m.group(0) + "\n"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Compiles everything at once (in parallel) and returns {source: (rc, log, obj)}."""
    out = tmp_path_factory.mktemp("cuda_compile")
    stub = out / "schemas.cpp"
    stub.write_text(_stub_source())
    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    cxx = os.environ.get("CXX", "c++")
    jobs = {}
    for src in CU:
        obj = out / (os.path.basename(src) + ".o")
        jobs[src] = ([NVCC, "-c", "-arch=sm_90", "-std=c++17", "-O3", "--use_fast_math",
                      "-DRETRO_WITH_CUDA", "-Xcompiler", "-fPIC", *inc, src, "-o", str(obj)],
                     obj)
    for src in WRAPPERS + [str(stub)]:
        obj = out / (os.path.basename(src) + ".o")
        jobs[src] = ([cxx, "-c", "-std=c++17", "-O0", "-fPIC", "-w", abi, "-DRETRO_WITH_CUDA",
                      *inc, src, "-o", str(obj)], obj)
    procs = {src: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
             for src, (cmd, _) in jobs.items()}
    res = {}
    for src, p in procs.items():
        log, _ = p.communicate(timeout=600)
        res[src] = (p.returncode, log, jobs[src][1])
    res["__dir__"] = out
    return res


def _failures(build, sources):
    return {os.path.relpath(s, ROOT): build[s][1][-3000:] for s in sources if build[s][0] != 0}


def test_cuda_sources_exist():
    assert CU, "no csrc/cuda/*.cu"


def test_cuda_kernels_compile_for_sm90(build):
    bad = _failures(build, CU)
    assert not bad, "nvcc -arch=sm_90 failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_op_wrappers_compile(build):
    bad = _failures(build, WRAPPERS)
    assert not bad, "wrapper compile failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in bad.items())


def test_ops_register_cuda_kernels(build):
    """The wrappers' registrations match the schemas: a scratch library of schemas +
    wrappers + kernels loads and has a CUDA kernel for every op the wrappers register."""
    if _failures(build, CU + WRAPPERS) or build[str(build["__dir__"] / "schemas.cpp")][0]:
        pytest.fail("sources did not compile (see the other tests)")
    ops = []
    for src in WRAPPERS:
        with open(src) as f:
            ops += re.findall(r'm\.impl\(\s*"(\w+)"', f.read())
    assert ops, "the CUDA wrappers register no op"
    so = build["__dir__"] / "retro_cuda_check.so"
    objs = [str(v[2]) for k, v in build.items() if k != "__dir__"]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # nvcc as the linker driver links the CUDA runtime statically.
    link = subprocess.run([NVCC, "-shared", "-o", str(so), *objs, f"-L{lib}", "-lc10",
                           "-ltorch_cpu", "-ltorch", f"-Xlinker=-rpath,{lib}"],
                          capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stdout + link.stderr
    code = ("import torch\n"
            f"torch.ops.load_library({str(so)!r})\n"
            f"for op in {ops!r}:\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(\n"
            "        'vllm_retro::' + op, 'CUDA'), op\n"
            "print('registered')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "registered" in run.stdout, run.stdout + run.stderr


def _constants(path: str) -> dict:
    """``constexpr int NAME = VALUE;`` of a header (values that are integers, or
    ``2 * NAME`` of an earlier one)."""
    out = {}
    with open(os.path.join(ROOT, "csrc", "cuda", path)) as f:
        for name, value in re.findall(r"constexpr int (\w+) = ([^;]+);", f.read()):
            m = re.fullmatch(r"2 \* (\w+)", value.strip())
            out[name] = 2 * out[m.group(1)] if m else int(value)
    return out


def test_cuda_constants_match_python():
    """The CUDA views' header words, index words and list packing are the Python
    side's (a renumbered header word must not leave the CUDA kernels reading another
    one; nothing else would catch it without a GPU)."""
    from vllm_retro.index import paged
    from vllm_retro.kernels import triton_decode
    common = _constants("view_common.h")
    assert common["kHdrClusteredEnd"] == paged.HDR_CLUSTERED_END
    assert common["kHdrIbtRow"] == paged.HDR_IBT_ROW
    assert common["kIntSize"] == paged.I_SIZE and common["kIntStart"] == paged.I_START
    attend = _constants("paged_attend.h")
    assert attend["kListItems"] == triton_decode.PACK
    assert attend["kListWords"] == triton_decode.LIST_WORDS
