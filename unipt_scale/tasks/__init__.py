"""Task kinds, one module each (its model: head, loss, eval metrics; the batch fields it reads, DATA; the metric a
sweep selects by, SELECTION; `build`), and the one way a config becomes a task model: `build_model`. Adding a task
is a module here, its entry in TASKS, and its name among task.kind's choices (unipt_scale.config.TASK_KINDS).
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, Optional

import torch.nn as nn

from unipt_scale.backbone import FrozenBackbone, load_backbone
from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.encoders import build_encoder
from unipt_scale.tasks import causal_lm, classification, grounding, retrieval, video_retrieval, vqa
from unipt_scale.train_state import seed_everything
from unipt_scale.trained import check_trained_rule

TASKS: Dict[str, ModuleType] = {"classification": classification, "retrieval": retrieval, "causal_lm": causal_lm,
                                 "video_retrieval": video_retrieval, "vqa": vqa, "grounding": grounding}


def data_fields(kind: str) -> dict:
    """What a task's batches carry: keyword arguments of unipt_scale.data.build_data."""
    return dict(TASKS[kind].DATA)


BACKBONE_FIELDS = ("backbone", "image_backbone")


def load_backbones(cfg: RunConfig, trust_remote_code: bool = False) -> Dict[str, FrozenBackbone]:
    """Every backbone a config names, by its field (backbone, image_backbone), loaded once."""
    out = {}
    for name in BACKBONE_FIELDS:
        bb_cfg = getattr(cfg, name)
        if bb_cfg is not None:
            side_cfg = cfg.unipt_for(name) if cfg.method == "unipt" else None  # checked where a side network is built
            out[name] = load_backbone(bb_cfg, trust_remote_code, side_cfg)
    return out


def build_model(cfg: RunConfig, num_classes: int = 0, trust_remote_code: bool = False,
                backbones: Optional[Dict[str, FrozenBackbone]] = None) -> nn.Module:
    """The task model a config describes, with its backbones loaded and set up for `cfg.method` (frozen for
    unipt, ladder and linear_probe, adapters for lora, trainable for full). Remote code runs only when the person
    running the command asked for it (`--trust-remote-code`), never because a file says so.

    `backbones` (by field name) are used instead of loading them: a sweep hands every variant a view of one
    shared backbone. Whatever is trained is initialised after the backbones load, from train.seed alone, so a
    model's initial weights do not depend on how (or whether) its backbone was loaded."""
    task = TASKS.get(cfg.task.kind)
    if task is None:
        raise ConfigError(f"unknown task.kind {cfg.task.kind!r}; choose one of {', '.join(TASKS)}")
    if backbones is None:
        backbones = load_backbones(cfg, trust_remote_code)
    by_config = {id(getattr(cfg, name)): (name, bb) for name, bb in backbones.items()}
    causal = cfg.unipt.causal == "true" or cfg.task.kind == "causal_lm"
    seed_everything(cfg.train.seed)

    def encoder(bb_cfg, what):
        if id(bb_cfg) not in by_config:
            raise ConfigError(f"{what} ({bb_cfg.path}) is not one of the config's backbones")
        name, bb = by_config[id(bb_cfg)]
        return build_encoder(bb, cfg.method, cfg.unipt_for(name), cfg.lora, what=f"{what} ({bb_cfg.path})",
                             causal=causal, ladder=cfg.ladder)

    model = task.build(cfg, encoder, num_classes)
    check_trained_rule(model)
    return model
