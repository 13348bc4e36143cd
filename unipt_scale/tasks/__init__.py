"""Task kinds, one module each (its model: head, loss, eval metrics; the batch fields it reads; `build`), and the one
way a config becomes a task model: `build_model`. Adding a task is a module here, its entry in TASKS, and its
name among task.kind's choices (unipt_scale.config.TASK_KINDS).
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict

import torch.nn as nn

from unipt_scale.backbone import load_backbone
from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.encoders import build_encoder
from unipt_scale.tasks import causal_lm, classification, retrieval
from unipt_scale.trained import check_trained_rule

TASKS: Dict[str, ModuleType] = {"classification": classification, "retrieval": retrieval, "causal_lm": causal_lm}


def build_model(cfg: RunConfig, num_classes: int = 0, trust_remote_code: bool = False) -> nn.Module:
    """The task model a config describes, with its backbones loaded and set up for `cfg.method` (frozen for
    unipt, ladder and linear_probe, adapters for lora, trainable for full). Remote code runs only when the person
    running the command asked for it (`--trust-remote-code`), never because a file says so."""
    task = TASKS.get(cfg.task.kind)
    if task is None:
        raise ConfigError(f"unknown task.kind {cfg.task.kind!r}; choose one of {', '.join(TASKS)}")
    # The UniPT settings are checked against the backbone only where a side network is built.
    side_cfg = cfg.unipt if cfg.method == "unipt" else None
    causal = cfg.unipt.causal == "true" or cfg.task.kind == "causal_lm"

    def encoder(bb_cfg, what):
        bb = load_backbone(bb_cfg, trust_remote_code, side_cfg)
        return build_encoder(bb, cfg.method, cfg.unipt, cfg.lora, what=f"{what} ({bb_cfg.path})", causal=causal,
                             ladder=cfg.ladder)

    model = task.build(cfg, encoder, num_classes)
    check_trained_rule(model)
    return model
