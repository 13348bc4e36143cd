"""Checkpoints hold only what was trained (side network, heads) in safetensors, plus the run config.

The backbone is referenced through the config's backbone.path, never copied. Writes are atomic: a directory is
built beside its destination and renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch
import yaml
from safetensors.torch import load_file, save_file

from unipt_scale.atomic import atomic_write_json, atomic_write_text, fsync_dir  # noqa: F401 (re-exported)
from unipt_scale.config import RunConfig, load_config

WEIGHTS = "trained.safetensors"
CONFIG = "config.yaml"
META = "meta.json"


def save_trained(state: Dict[str, torch.Tensor], cfg: RunConfig, directory: str, meta: Optional[dict] = None) -> str:
    """Write the trained weights + config + meta into `directory`, replacing any previous one atomically."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    recover(directory)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
    try:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "content": "unipt_scale trained"})
        for name, text in ((CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
                           (META, json.dumps(meta or {}, indent=2))):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as fh:
                fh.write(text)
        for name in (WEIGHTS, CONFIG, META):
            with open(os.path.join(tmp, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.old-")
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def recover(directory: str) -> None:
    """Finish what a crash interrupted: restore a moved-aside checkpoint and drop half-built ones."""
    parent, base = os.path.dirname(os.path.abspath(directory)), os.path.basename(directory)
    if not os.path.isdir(parent):
        return
    leftovers = sorted(n for n in os.listdir(parent) if n.startswith(f".{base}.old-") or n.startswith(f".{base}.tmp-"))
    for name in leftovers:
        path = os.path.join(parent, name)
        if name.startswith(f".{base}.old-") and not os.path.exists(directory):
            os.replace(path, directory)  # crashed between moving the old one aside and moving the new one in
        else:
            shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(directory: str, overrides=()) -> Tuple[RunConfig, Dict[str, torch.Tensor], dict]:
    recover(directory)
    if not os.path.isfile(os.path.join(directory, WEIGHTS)):
        raise FileNotFoundError(f"{directory!r} is not a unipt checkpoint (no {WEIGHTS}); pass the directory that "
                                "`unipt train` wrote as OUTPUT_DIR/checkpoint")
    with open(os.path.join(directory, CONFIG), encoding="utf-8") as fh:
        base = yaml.safe_load(fh)
    cfg = load_config(None, overrides, base=base)
    meta = {}
    if os.path.isfile(os.path.join(directory, META)):
        with open(os.path.join(directory, META), encoding="utf-8") as fh:
            meta = json.load(fh)
    return cfg, load_file(os.path.join(directory, WEIGHTS)), meta


def load_trained(directory: str, overrides=(), device: str = "cpu"):
    """Rebuild the model a checkpoint was trained as and load its trained weights; returns (model, cfg, meta)."""
    from unipt_scale.model import build_model, trained_state_dict

    cfg, state, meta = read_checkpoint(directory, overrides)
    model = build_model(cfg, num_classes=meta.get("num_classes", 0))
    expected = set(trained_state_dict(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), cfg, meta
