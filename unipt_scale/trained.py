"""The one rule for what a method trains: a task model's trained state-dict keys (its encoders' own — UniPT's
side network, LoRA's adapters, the whole backbone for full fine-tuning, nothing for the probe — and everything
outside its encoders, the task head). Checkpoints hold exactly these keys; parameter counts are logical (ZeRO-3
partitions and 4-bit packing counted as the weights they stand for).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn


def trained_state_keys(model: nn.Module) -> List[str]:
    """State-dict keys of what the model's method trains — exactly what checkpoints hold and reload.

    The task models' rule: each encoder's own trained keys (UniPT: its side network; lora: the adapters; full:
    the whole backbone; linear_probe: nothing) plus everything outside the encoders (the task head)."""
    rule = getattr(model, "trained_state_keys", None)
    if not callable(rule):
        raise TypeError(f"{type(model).__name__} has no trained_state_keys(): a task model says which of its "
                        "state-dict keys its method trains (see unipt_scale.tasks)")
    return list(rule())


def task_trained_keys(model: nn.Module, encoders: Dict[str, nn.Module]) -> List[str]:
    """A task model's trained keys: its encoders' own (each by its rule) and every key outside the encoders."""
    own = {f"{name}.{k}" for name, enc in encoders.items() for k in enc.trained_state_keys()}
    return [k for k in model.state_dict() if k.split(".", 1)[0] not in encoders or k in own]


def check_trained_rule(model: nn.Module) -> None:
    """The parameters in the trained keys are exactly those that require grad: anything trained is saved, and
    nothing frozen is (a mismatch would give other logits after a reload)."""
    keys = set(trained_state_keys(model))
    named = list(model.named_parameters(remove_duplicate=False))
    saved = {n for n, _ in named if n in keys}
    grads = {n for n, p in named if p.requires_grad}
    if saved != grads:
        raise RuntimeError(f"the trained-state rule disagrees with requires_grad: trained but not saved "
                           f"{sorted(grads - saved)[:3]}, saved but frozen {sorted(saved - grads)[:3]}")


def trained_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What the model's method trains (see trained_state_keys), as the checkpoint holds it."""
    state = model.state_dict()
    return {k: state[k] for k in trained_state_keys(model)}


def logical_numel(p: torch.Tensor) -> int:
    """Elements a parameter stands for: a ZeRO-3 partition's full size (ds_numel), a 4-bit weight's unpacked
    shape (bitsandbytes packs two weights a byte), otherwise numel."""
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """Whole-model counts, in logical parameters (see logical_numel), whatever the sharding or quantization."""
    sizes = [(logical_numel(p), p.requires_grad) for p in model.parameters()]
    trainable = sum(n for n, grad in sizes if grad)
    return {"trainable_params": trainable, "frozen_params": sum(n for n, _ in sizes) - trainable}
