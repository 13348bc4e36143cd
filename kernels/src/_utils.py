"""Helpers shared by the fused side-network ops: dtype policy, interpreter detection, input checks."""
from __future__ import annotations

import os
from typing import Iterable, Optional

import torch
import triton
import triton.language as tl

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def interpreting() -> bool:
    """True when @triton.jit kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return isinstance(_probe, InterpretedFunction)


@triton.jit
def _probe():
    pass


def tl_dtype(dtype: torch.dtype):
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; the side-network kernels take float16, bfloat16, float32 "
                         "or float64 tensors") from None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 stays fp64 (gradcheck), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_policy(dtype: torch.dtype, *, half_dots: bool = True):
    """(operand dtype, accumulator dtype, input_precision) for tl.dot on tensors of `dtype`.

    16-bit operands go to the tensor cores as they are when `half_dots` (fp32 accumulation); ops whose
    operands can leave the fp16 range (unnormalised relu scores) pass half_dots=False for fp16 and multiply
    in fp32/tf32 instead. The interpreter's bf16 arithmetic is wrong, so there everything is fp32.
    fp32 follows torch.backends.cuda.matmul.allow_tf32, as eager matmuls do.
    """
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if interpreting():
        return tl.float32, tl.float32, "ieee"
    if dtype == torch.bfloat16 or (dtype == torch.float16 and half_dots):
        return tl_dtype(dtype), tl.float32, "ieee"
    if dtype == torch.float16:
        return tl.float32, tl.float32, "tf32"
    return tl.float32, tl.float32, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")


def check_triton_device(*tensors: Optional[torch.Tensor]) -> None:
    """Triton needs CUDA tensors, or the CPU interpreter chosen before the kernels were imported."""
    for t in tensors:
        if t is not None and not t.is_cuda and not interpreting():
            raise ValueError(
                f"backend='triton' got a {t.device.type} tensor, but Triton kernels run on CUDA tensors only; "
                "move the inputs to a GPU, use backend='efficient' (or 'auto') on CPU, or set TRITON_INTERPRET=1 "
                "before importing unipt_scale.kernels to run the kernels in Triton's CPU interpreter")


def next_pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, triton.next_power_of_2(int(n)))


def common_float_dtype(tensors: Iterable[Optional[torch.Tensor]], what: str) -> torch.dtype:
    dtype = None
    for t in tensors:
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"{what} must be floating point, got {t.dtype}")
        dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype


def same_device(tensors: Iterable[Optional[torch.Tensor]], what: str) -> None:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{what} are on different devices {sorted(map(str, devs))}; move them to one device")
