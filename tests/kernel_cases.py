"""Shared parametrisation and checks of the kernel tests: device, dtypes, one assert_close, fp64 references.

Device: every kernel test runs on CUDA when there is a GPU (the Triton kernels compiled; run with
TRITON_INTERPRET=0, as scripts/gpu_check.sh does, since conftest defaults it to 1), else on CPU with the Triton
kernels in the interpreter. bf16 is checked only where Triton is compiled (the interpreter's bf16 arithmetic is
wrong).
"""
import pytest
import torch

from unipt_scale.kernels._utils import interpreting

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INTERPRET = interpreting()
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA or INTERPRET,
                                                          reason="bf16: compiled Triton on CUDA only")),
]


def assert_close(actual, expected, tol, what):
    """max |actual − expected| ≤ tol · max(1, max |expected|), and actual finite (NaN-poisoned empties show)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} x {scale:.2f}"


def fp64_grads(fn, tensors, grad):
    """fn on fp64 copies of `tensors` (requires_grad kept), and the gradients of <out, grad> w.r.t. those that
    require grad (None for the others)."""
    copies = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*copies)
    need = [c for c in copies if c is not None and c.requires_grad]
    grads = iter(torch.autograd.grad(out, need, grad.double()))
    return out, [next(grads) if c is not None and c.requires_grad else None for c in copies]
