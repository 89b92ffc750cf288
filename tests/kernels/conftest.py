"""Kernel tests run the Triton kernels in Triton's CPU interpreter when there is no
GPU: the variable must be set before any Triton kernel is defined."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
