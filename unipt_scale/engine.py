"""The engine seam: what the training loop asks of an optimizer/precision/distribution backend.

`LocalEngine` is the single-process engine; `unipt_scale.distributed.DeepSpeedEngine` implements the same
methods on top of `deepspeed.initialize`, so the loop in trainer.py never branches on the backend.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List

import torch
import torch.nn as nn

from unipt_scale.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, lr: float, head_lr=None) -> List[Dict]:
    """AdamW groups: no decay on biases, norms and scalars; the task head may get its own learning rate."""
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or "logit_scale" in name
        is_head = not (".side." in f".{name}")
        glr = head_lr if (is_head and head_lr) else lr
        key = (no_decay, glr)
        g = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr": glr,
                                    "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return [dict(g) for g in groups.values()]


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_dtype(precision: str, device: torch.device):
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class LocalEngine:
    """AdamW + warmup/cosine + accumulation + clipping + autocast on one process."""

    rank = 0
    world_size = 1
    is_main = True
    zero_stage = None

    def __init__(self, model: nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.cfg = cfg
        groups = param_groups(model, cfg.weight_decay, cfg.lr, cfg.head_lr)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        for g in groups:
            g.pop("names")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, cfg.warmup_ratio))
        self.amp_dtype = autocast_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.micro_step = 0
        self.optimizer.zero_grad(set_to_none=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.cfg.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> bool:
        """Call after every micro batch; returns True when an optimizer step was taken."""
        self.micro_step += 1
        if self.micro_step % self.cfg.grad_accum:
            return False
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gather(self, outputs):
        return outputs

    def reduce_mean(self, value: float) -> float:
        return value

    def barrier(self):
        pass

    def trained_state_dict(self):
        from unipt_scale.model import trained_state_dict

        return trained_state_dict(self.model)
