"""Quantized frozen backbones: int8 / NF4 weights for the part of a run that never trains.

The frozen backbone is most of a UniPT run's memory and only ever runs a no-grad forward, so its linear layers
can hold 8- or 4-bit weights with no quantization-aware backward. One library does it: **bitsandbytes**, through
transformers' own `BitsAndBytesConfig`, because it is the one well-kept library that quantizes at load time from
the full-precision checkpoint on both CUDA and CPU (0.45+), it is what QLoRA is defined with, and peft builds its
k-bit LoRA layers on its modules, so the QLoRA baseline runs on the very same quantized base. (torchao's int4
weight-only does not run on CPU at all; quanto and hqq have no peft LoRA layers.)

Schemes (`backbone.quantization`):

- `int8`: LLM.int8 (`Linear8bitLt`): int8 weights with one fp32 scale per output row; activations are cast to
  fp16 for the int8 matmul (bitsandbytes' design), outliers above 6.0 stay in 16-bit.
- `nf4`: 4-bit NormalFloat (`Linear4bit`), blocks of 64 weights with one absmax each, double-quantized scales on
  CUDA (bitsandbytes 0.50 repacks them as bf16 on CPU); matmuls run in the backbone's dtype.

Only the backbone's linear layers are quantized; embeddings, norms and the LM head stay in `backbone.dtype`
(transformers keeps the output embedding out, as QLoRA does). The side network and heads keep their own dtype.
"""
from __future__ import annotations

import logging
import sys
import warnings
from typing import Iterable, Optional

import torch
import torch.nn as nn

from unipt_scale.config import QUANTIZATION_SCHEMES as SCHEMES  # noqa: F401  (the one list; config validates it)

NF4_BLOCK = 64  # bitsandbytes' 4-bit block size (one absmax per 64 weights); fixed in transformers' config


class QuantizationError(ValueError):
    """A quantized backbone this machine, library or model cannot provide; the message names the fix."""


def require_bitsandbytes(scheme: str) -> None:
    """bitsandbytes must import (it is an install requirement; a broken wheel or an unsupported device fails here)."""
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a native-library load failure on an unsupported platform
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise QuantizationError(f"backbone.quantization={scheme} needs bitsandbytes, which does not load here "
                                f"({first}); pip install 'bitsandbytes>=0.45' (CPU or CUDA), or use "
                                "backbone.quantization=none") from None


def quiet_bitsandbytes() -> None:
    """Two messages that say nothing about a run: the optional CPU kernel hub, and int8's documented fp16 cast."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast from")


def bnb_config(scheme: str, compute_dtype: torch.dtype):
    """transformers' quantization config for a scheme (None for `none`)."""
    if scheme == "none":
        return None
    from transformers import BitsAndBytesConfig

    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if scheme == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=True)
    raise QuantizationError(f"backbone.quantization={scheme!r} is not a scheme; choose one of {', '.join(SCHEMES)}")


def load_device_map() -> dict:
    """Where bitsandbytes quantizes the weights as they load: this rank's GPU, or the CPU."""
    if torch.cuda.is_available():
        return {"": torch.cuda.current_device()}
    return {"": "cpu"}


def quantized_types() -> tuple:
    """The module types a quantized backbone is made of; empty until bitsandbytes has been imported (a quantized
    model has imported it), so checking an unquantized model never pays for importing it."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def quantized_scheme(module: nn.Module) -> str:
    """`int8`, `nf4` (or another 4-bit type) or `none`, from the modules themselves."""
    types = quantized_types()
    for m in module.modules():
        if types and isinstance(m, types[0]):
            return "int8"
        if types and isinstance(m, types[1]):
            return getattr(getattr(m.weight, "quant_state", None), "quant_type", None) or \
                getattr(m.weight, "quant_type", "nf4")
    return "none"


def is_quantized(module: nn.Module) -> bool:
    return quantized_scheme(module) != "none"


# ------------------------------------------------------------------------------------------ resident bytes

def _tensors_of(obj, seen: set) -> Iterable[torch.Tensor]:
    """Every plain tensor an object holds: a tensor subclass's inner tensors (torchao, quanto flatten through
    __tensor_flatten__), bitsandbytes' quantization state (absmax, code, nested scales) and int8 row scales."""
    if obj is None or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        flatten = getattr(obj, "__tensor_flatten__", None)
        if flatten is not None and type(obj) not in (torch.Tensor, nn.Parameter) and not _is_bnb_param(obj):
            names, _ = flatten()
            for name in names:
                yield from _tensors_of(getattr(obj, name), seen)
        else:
            yield obj
        for attr in ("quant_state", "SCB", "CB"):
            yield from _tensors_of(getattr(obj, attr, None), seen)
        return
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_of(item, seen)
        return
    if type(obj).__name__ == "QuantState":  # bitsandbytes.functional.QuantState: absmax, code, offset, state2
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor) or type(value).__name__ == "QuantState":
                yield from _tensors_of(value, seen)


def _is_bnb_param(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("Params4bit", "Int8Params")


def module_tensors(module: nn.Module) -> Iterable[torch.Tensor]:
    """Parameters, buffers and what quantized layers keep beside them (Linear8bitLt's state.SCB)."""
    seen: set = set()
    for p in module.parameters():
        yield from _tensors_of(p, seen)
    for b in module.buffers():
        yield from _tensors_of(b, seen)
    for m in module.modules():
        state = getattr(m, "state", None)
        if state is not None and not isinstance(state, dict):
            for attr in ("SCB", "CB"):
                yield from _tensors_of(getattr(state, attr, None), seen)


def frozen_weight_bytes(module: nn.Module, frozen_only: bool = True) -> int:
    """Resident bytes of a module's weights, counted from the storages themselves.

    `numel * element_size` is wrong twice over for quantized models: tensor subclasses report their logical
    full-precision shape, and the scales live outside the parameters. Each distinct storage counts once (tied
    embeddings, views); meta tensors count nothing. `frozen_only`: skip parameters that require grad (the side
    network, adapters and heads when counting a whole task model)."""
    trained = {id(p) for p in module.parameters() if p.requires_grad} if frozen_only else set()
    total, storages = 0, set()
    for t in module_tensors(module):
        if id(t) in trained or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in storages:
            continue
        storages.add(key)
        total += storage.nbytes()
    return total


# bitsandbytes' CPU fast path for 4-bit inference repacks each weight at its first no-grad forward, and its
# packing needs these multiples (bitsandbytes.functional._convert_weight_packed_for_cpu).
CPU_PACK_OUT_MULTIPLE, CPU_PACK_IN_MULTIPLE = 32, 64


def fit_cpu_kernels(module: nn.Module, backward_through: bool = False) -> int:
    """Send 4-bit layers down bitsandbytes' generic path where its CPU inference repacking would break them:
    shapes the packing cannot take (they would fail at their first forward), and, with `backward_through`, every
    layer (the packed kernel has no backward, and LoRA's gradients flow through the base layers once an
    evaluation has repacked them). Returns how many layers were sent there."""
    types = quantized_types()
    moved = 0
    for m in module.modules():
        if types and isinstance(m, types[1]) and getattr(m, "support_avx512bf16_for_cpu", False):
            if backward_through or m.out_features % CPU_PACK_OUT_MULTIPLE or m.in_features % CPU_PACK_IN_MULTIPLE:
                m.support_avx512bf16_for_cpu = False
                moved += 1
    return moved


def check_supported(scheme: str, path: str, builtin: Optional[str] = None, random_init: bool = False) -> None:
    """Fail before loading where a quantized backbone cannot be had; each message names the fix."""
    if scheme == "none":
        return
    if builtin is not None:
        raise QuantizationError(f"backbone.quantization={scheme}: builtin:{builtin} is a convolutional network, and "
                                "bitsandbytes quantizes linear layers only (a CNN has almost none); use "
                                "backbone.quantization=none")
    if random_init:
        raise QuantizationError(f"backbone.quantization={scheme} quantizes weights as they load from a checkpoint; "
                                "with backbone.random_init=true there is none: save the random model with "
                                "save_pretrained and point backbone.path at it, or use backbone.quantization=none")
    require_bitsandbytes(scheme)
