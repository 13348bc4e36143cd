"""The run's outputs: the trained weights (OUTPUT_DIR/checkpoint/) and OUTPUT_DIR/metrics.json, as a pair.

`checkpoint/` holds exactly what the run's method trained (model.trained_state_keys: UniPT's side network and
heads, LoRA's adapters and heads, a probe's head, or the whole model for full fine-tuning) in safetensors, the
run config (method included) and meta.json (label names, the weights' sha256, verified on load). Other than for
full fine-tuning, the backbone is referenced through backbone.path, never copied. The two outputs are committed
together through a staged directory with a redo marker: a crash at any instant leaves either the previous run's
pair or the new one (finished by `recover_outputs` on the next read), never one run's checkpoint beside another
run's metrics.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from unipt_scale.atomic import atomic_write_json, fsync_dir, make_temp_dir, save_tensors_file
from unipt_scale.checkpoint import sha256_file
from unipt_scale.config import ConfigError, MOVED_KEYS, RunConfig, load_config

log = logging.getLogger("unipt_scale")

WEIGHTS = "trained.safetensors"
CONFIG = "config.yaml"
META = "meta.json"
CHECKPOINT = "checkpoint"
METRICS = "metrics.json"
_STAGE_PREFIX = ".commit-"
_READY = "READY"


class ExportError(ValueError):
    """A checkpoint directory that cannot be read; the message names the file and the fix."""


def _write_checkpoint(directory: str, state: Dict[str, torch.Tensor], cfg: RunConfig, meta: Optional[dict]) -> None:
    os.makedirs(directory)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    weights = os.path.join(directory, WEIGHTS)
    save_tensors_file(tensors, weights, metadata={"format": "pt", "content": "unipt_scale trained"})
    meta = dict(meta or {})
    meta["weights_sha256"] = sha256_file(weights)
    for name, text in ((CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False)), (META, json.dumps(meta, indent=2))):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    for name in (WEIGHTS, CONFIG, META):
        with open(os.path.join(directory, name), "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(directory)


def save_trained(state: Dict[str, torch.Tensor], cfg: RunConfig, directory: str, meta: Optional[dict] = None) -> str:
    """Write trained weights + config + meta into `directory`, replacing any previous one atomically."""
    directory = os.path.abspath(directory)
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    os.makedirs(parent, exist_ok=True)
    recover(directory)
    stage = make_temp_dir(parent, f".{base}.tmp-")
    try:
        _write_checkpoint(os.path.join(stage, base), state, cfg, meta)
        _swap_in(os.path.join(stage, base), directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return directory


def _swap_in(new: str, directory: str) -> None:
    """Move the complete directory `new` to `directory`; an old one is moved aside first, then removed."""
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    old = None
    if os.path.exists(directory):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-")
        os.rmdir(old)
        os.replace(directory, old)
    os.replace(new, directory)
    fsync_dir(parent)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def recover(directory: str) -> None:
    """Finish what a crash interrupted: restore a moved-aside checkpoint, drop half-built ones, and complete a
    staged output commit of the run directory."""
    directory = os.path.abspath(directory)
    parent, base = os.path.dirname(directory), os.path.basename(directory)
    if not os.path.isdir(parent):
        return
    if base == CHECKPOINT:
        recover_outputs(parent)
    leftovers = sorted(n for n in os.listdir(parent) if n.startswith(f".{base}.old-") or n.startswith(f".{base}.tmp-"))
    for name in leftovers:
        path = os.path.join(parent, name)
        if name.startswith(f".{base}.old-") and not os.path.exists(directory):
            os.replace(path, directory)  # crashed between moving the old one aside and moving the new one in
        else:
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ the output pair


def commit_outputs(out_dir: str, metrics: dict, state: Optional[Dict[str, torch.Tensor]] = None,
                   cfg: Optional[RunConfig] = None, meta: Optional[dict] = None) -> None:
    """Write metrics.json and (with `state`) checkpoint/ so that both always belong to the same run."""
    out_dir = os.path.abspath(out_dir)
    recover_outputs(out_dir)
    stage = make_temp_dir(out_dir, _STAGE_PREFIX)
    if state is not None:
        _write_checkpoint(os.path.join(stage, CHECKPOINT), state, cfg, meta)
        with open(os.path.join(stage, CHECKPOINT, META), encoding="utf-8") as fh:
            metrics = {**metrics, "checkpoint_sha256": json.load(fh)["weights_sha256"]}
    atomic_write_json(os.path.join(stage, METRICS), metrics)
    atomic_write_json(os.path.join(stage, _READY), {"checkpoint": state is not None})  # the redo point
    fsync_dir(stage)
    _roll_forward(out_dir, stage)


def _roll_forward(out_dir: str, stage: str) -> None:
    """Each move is idempotent, so an interrupted roll-forward is finished by running it again."""
    staged_ckpt = os.path.join(stage, CHECKPOINT)
    if os.path.isdir(staged_ckpt):
        final = os.path.join(out_dir, CHECKPOINT)
        aside = os.path.join(stage, "previous-checkpoint")
        if os.path.exists(final) and not os.path.exists(aside):
            os.replace(final, aside)
        os.replace(staged_ckpt, final)
        fsync_dir(out_dir)
    staged_metrics = os.path.join(stage, METRICS)
    if os.path.isfile(staged_metrics):
        os.replace(staged_metrics, os.path.join(out_dir, METRICS))
        fsync_dir(out_dir)
    shutil.rmtree(stage, ignore_errors=True)


def recover_outputs(out_dir: str) -> None:
    """Complete a staged commit that reached its redo point; drop one that did not (the old pair stays)."""
    if not os.path.isdir(out_dir):
        return
    for name in sorted(os.listdir(out_dir)):
        if not name.startswith(_STAGE_PREFIX):
            continue
        stage = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(stage, _READY)):
            _roll_forward(out_dir, stage)
        else:
            shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------------------ reading


def _checkpoint_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG)
    try:
        with open(path, encoding="utf-8") as fh:
            base = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ExportError(f"{path} cannot be read as plain YAML ({type(err).__name__}); the checkpoint is damaged"
                          ) from None
    if not isinstance(base, dict):
        raise ExportError(f"{path} is not a run config; the checkpoint is damaged")
    # Older checkpoints carry keys that moved; remote code in particular is never enabled by a file.
    for dotted in MOVED_KEYS:
        section, key = dotted.split(".", 1)
        if isinstance(base.get(section), dict) and key in base[section]:
            if base[section].pop(key) and key == "trust_remote_code":
                log.warning("%s asks for remote code; that is ignored (pass --trust-remote-code yourself)", path)
    return base


def read_checkpoint(directory: str, overrides=()) -> Tuple[RunConfig, Dict[str, torch.Tensor], dict]:
    recover(directory)
    weights = os.path.join(directory, WEIGHTS)
    if not os.path.isfile(weights):
        raise ExportError(f"{directory!r} is not a unipt checkpoint (no {WEIGHTS}); pass the directory that "
                          "`unipt train` wrote as OUTPUT_DIR/checkpoint")
    meta = {}
    if os.path.isfile(os.path.join(directory, META)):
        try:
            with open(os.path.join(directory, META), encoding="utf-8") as fh:
                meta = json.load(fh)
        except ValueError:
            raise ExportError(f"{os.path.join(directory, META)} is not valid JSON; the checkpoint is damaged") from None
    expected = meta.get("weights_sha256")
    if expected and sha256_file(weights) != expected:
        raise ExportError(f"{weights} does not match the sha256 recorded in {META}: the weights were changed or "
                          "damaged; retrain or restore the file")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights} is not a readable safetensors file ({err}); the checkpoint is damaged") from None
    try:
        cfg = load_config(None, overrides, base=_checkpoint_config(directory))
    except ConfigError as err:
        raise ExportError(f"{os.path.join(directory, CONFIG)}: {err}") from None
    return cfg, state, meta


def load_trained(directory: str, overrides=(), device: str = "cpu", trust_remote_code: bool = False):
    """Rebuild the model a checkpoint was trained as (its config's method included) and load exactly the keys
    that method trains; returns (model, cfg, meta)."""
    from unipt_scale.tasks import build_model
    from unipt_scale.train_state import preserved_rng
    from unipt_scale.trained import trained_state_keys

    cfg, state, meta = read_checkpoint(directory, overrides)
    with preserved_rng():  # loading for use leaves the caller's random streams as they were
        model = build_model(cfg, num_classes=meta.get("num_classes", 0), trust_remote_code=trust_remote_code)
    expected = set(trained_state_keys(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ExportError(f"checkpoint {directory} does not match its config: missing {sorted(missing)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval(), cfg, meta
