"""Shared parametrisation of the kernel tests: devices and the dtypes each kernel is checked in."""
import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="interpreter bf16 is wrong; CUDA only")),
]
