"""The page-copy kernel of the cluster cache is defined for Triton's CPU interpreter
when there is no GPU: Triton decides that when the kernel is defined, so the module
is imported here with TRITON_INTERPRET=1 (as tests/conftest.py does for the decode
kernels); tests that run it turn the interpreter on with the ``triton_interpreter``
fixture."""

import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import vllm_retro.memory.triton_page_copy  # noqa: F401
    except ImportError:  # no Triton: the Triton variants skip
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]
