"""`unipt sweep`: every variant of a grid trained on one frozen forward per batch.

Variants may differ only in what is trained (the side network's and the head's settings, learning rates,
schedule, clipping, seed, and the frozen-backbone method: unipt, ladder or linear_probe). Each has its own
model, optimizer, schedule, RNG streams, checkpoints and outputs — `D/<variant>/metrics.json` and `checkpoint/`,
exactly what `unipt train` writes for it (fp32 on one process: the same bits) — and `D/sweep.json` names the
variant chosen on validation. A variant that goes non-finite stops alone.

Under DeepSpeed (ZeRO 0-2; launched as `unipt train` is, e.g. `deepspeed --num_gpus 8 --module unipt_scale.cli
sweep ... deepspeed.enabled=true`) every rank runs the frozen forward once for its shard of each batch and each
variant has an engine of its own: its side network and optimizer state sharded, its gradients reduced alone.
ZeRO-3 is refused, since it would partition the shared backbone into one variant's engine.

Resume: `train.resume=auto` continues every variant from the newest step that all of them have an intact
checkpoint of (they save in lockstep, but a crash can fall between two variants' saves), so they stay in
lockstep on one data position; with no such step every variant starts over.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Callable, List, Optional, Sequence, Tuple

from unipt_scale.atomic import atomic_write_json
from unipt_scale.config import FROZEN_FORWARD_METHODS, ConfigError, RunConfig, load_config
from unipt_scale.ds_config import check_shared_backbone_stage, trained_config

log = logging.getLogger("unipt_scale")

# What a variant may change: none of it reaches the frozen forward or the data.
SWEEPABLE_PREFIXES = ("unipt.", "ladder.")
SWEEPABLE_KEYS = ("method", "task.dropout", "task.embed_dim", "task.init_temperature", "task.temporal",
                  "task.temporal_layers", "task.text_layers", "task.reversed_negatives", "task.fusion_dim",
                  "task.fusion_layers", "task.box_l1_weight", "task.box_giou_weight", "train.lr", "train.head_lr",
                  "train.weight_decay", "train.warmup_ratio", "train.clip_norm", "train.seed", "train.log_every")
SHARED_FORWARD_METHODS = FROZEN_FORWARD_METHODS
SWEEP_JSON = "sweep.json"


def parse_grid(items: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """`key=v1,v2,...` per item (commas inside [...] stay with their value: unipt.layers=[1,2],all)."""
    grid: List[Tuple[str, List[str]]] = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} is not key=v1,v2,... (e.g. --grid train.lr=1e-4,3e-4)")
        key, raw = (part.strip() for part in item.split("=", 1))
        values, depth, cur = [], 0, ""
        for ch in raw:
            depth += {"[": 1, "]": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                values.append(cur.strip())
                cur = ""
            else:
                cur += ch
        values.append(cur.strip())
        if not key or any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r} has an empty key or value; write key=v1,v2,...")
        if any(k == key for k, _ in grid):
            raise ConfigError(f"--grid names {key} twice; give all its values in one --grid {key}=v1,v2,...")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key} lists a value twice ({raw}); give each value once")
        if not (key in SWEEPABLE_KEYS or key.startswith(SWEEPABLE_PREFIXES)):
            raise ConfigError(f"--grid {key}: a sweep shares one frozen forward per batch, so its variants may "
                              f"differ only in what is trained ({', '.join(SWEEPABLE_KEYS)}, unipt.*, ladder.*); "
                              f"run a separate `unipt train` (or sweep) per {key}")
        grid.append((key, values))
    if not grid:
        raise ConfigError("a sweep needs at least one --grid key=v1,v2,...")
    return grid


def variant_name(assignment: Sequence[Tuple[str, str]]) -> str:
    """A directory name that says what the variant sets: lr=1e-4_seed=0."""
    short = [k.rsplit(".", 1)[-1] for k, _ in assignment]
    parts = []
    for (key, value), name in zip(assignment, short):
        name = key.replace(".", "-") if short.count(name) > 1 else name
        parts.append(f"{name}={re.sub(r'[^A-Za-z0-9._+:-]', '', value.replace(',', '+')) or 'x'}")
    return "_".join(parts)


def expand(grid: List[Tuple[str, List[str]]]) -> List[Tuple[str, List[Tuple[str, str]]]]:
    keys = [k for k, _ in grid]
    out, seen = [], {}
    for values in itertools.product(*(v for _, v in grid)):
        assignment = list(zip(keys, values))
        name = variant_name(assignment)
        if name in seen:
            raise ConfigError(f"--grid values {seen[name]} and {dict(assignment)} both name a variant {name!r} "
                              "(its directory); give values that differ in letters or digits")
        seen[name] = dict(assignment)
        out.append((name, assignment))
    return out


def variant_configs(config: Optional[str], overrides: Sequence[str], grid_items: Sequence[str],
                    output_dir: str) -> List[Tuple[str, List[Tuple[str, str]], RunConfig]]:
    """Every variant's resolved config, refused in one line where a sweep cannot share the frozen forward."""
    grid = parse_grid(grid_items)
    for item in overrides:
        if item.split("=", 1)[0].strip() == "output_dir":
            raise ConfigError("a sweep writes each variant under --output-dir D (D/<variant>/); drop output_dir=")
    variants = []
    for name, assignment in expand(grid):
        extra = [f"{k}={v}" for k, v in assignment]
        cfg = load_config(config, [*overrides, *extra, f"output_dir={os.path.join(output_dir, name)}"])
        variants.append((name, assignment, cfg))
    first = variants[0][2]
    swept = {k for k, _ in grid}
    for name, _, cfg in variants:
        if cfg.method not in SHARED_FORWARD_METHODS:
            raise ConfigError(f"method={cfg.method} trains inside the backbone (its forward cannot be shared); a "
                              f"sweep runs {', '.join(SHARED_FORWARD_METHODS)}: train {cfg.method} with `unipt train`")
        check_shared_backbone_stage(cfg, "a sweep's variants")
        if cfg.train.resume not in ("", "auto"):
            raise ConfigError(f"train.resume={cfg.train.resume!r}: a sweep resumes with train.resume=auto (every "
                              "variant from the newest step all of them have a checkpoint of)")
        if cfg.train.on_nonfinite == "skip":
            raise ConfigError("train.on_nonfinite=skip lets variants take different batches for their steps, and a "
                              "sweep keeps them in lockstep; use train.on_nonfinite=stop (a variant that goes "
                              "non-finite stops alone)")
    if "train.seed" in swept and any(bb is not None and bb.random_init
                                     for bb in (first.backbone, first.image_backbone)):
        raise ConfigError("backbone.random_init=true draws the frozen backbone from train.seed, so each seed needs a "
                          "backbone (and a forward) of its own; sweep train.seed over a saved backbone")
    return variants


def resume_step(cfgs: Sequence[RunConfig], world_size: int = 1) -> Optional[int]:
    """With train.resume=auto: point every variant at the newest step all of them have an intact checkpoint of
    (set in their configs); None, and every variant starts over, where there is none. Under DeepSpeed a checkpoint
    is matched against the config the variant trains with (resolved against the JSON) and the world size."""
    from unipt_scale.checkpoint import checkpoint_of, intact_steps

    if not cfgs or cfgs[0].train.resume != "auto":
        return None
    common = None
    for cfg in cfgs:
        steps = set(intact_steps(cfg.output_dir, trained_config(cfg, world_size).to_dict(), world_size))
        common = steps if common is None else common & steps
    step = max(common) if common else None
    for cfg in cfgs:
        cfg.train.resume = checkpoint_of(cfg.output_dir, step) if step is not None else ""
    if step is None:
        log.info("sweep: train.resume=auto, and no step has a checkpoint of every variant; starting over")
    else:
        log.info("sweep: every variant resumes from step %d, the newest all of them have", step)
    return step


def _select(variants: List[dict], task_kind: str) -> Tuple[Optional[str], dict]:
    from unipt_scale.tasks import TASKS

    metric, mode = TASKS[task_kind].SELECTION
    scored = [(v["val"][metric], v["name"]) for v in variants
              if v["status"] == "completed" and v.get("val") and v["val"].get(metric) is not None]
    rule = {"split": "val", "metric": metric, "mode": mode}
    if not scored:
        return None, rule
    best = (max if mode == "max" else min)(scored, key=lambda s: s[0])
    return best[1], rule


def run_sweep(config: Optional[str], overrides: Sequence[str], grid_items: Sequence[str], output_dir: str,
              trust_remote_code: bool = False, on_finished: Optional[Callable] = None) -> dict:
    """Train every variant of the grid on one frozen forward per batch; returns (and writes) D/sweep.json.

    `on_finished(trainers)` sees the variants' trainers (models still built; `failure` set on the stopped ones)
    after the final evaluation, before they close: e.g. to generate with each trained model."""
    import torch

    from unipt_scale.distributed import init_process_group, shutdown_process_group
    from unipt_scale.shared_forward import share_backbones
    from unipt_scale.tasks import load_backbones
    from unipt_scale.train_state import seed_everything
    from unipt_scale.trainer import check_backbones, check_output_dir, outcome, train_together

    start = time.time()
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    check_output_dir(output_dir)
    variants = variant_configs(config, overrides, grid_items, output_dir)
    for _, _, cfg in variants:
        check_backbones(cfg, trust_remote_code)
    lead = variants[0][2]
    world_size = 1
    if lead.deepspeed.enabled:  # the checkpoints to resume from are matched against the ranks that will train
        world_size = init_process_group().world_size
    try:
        resumed = resume_step([cfg for _, _, cfg in variants], world_size)
        if lead.train.num_threads > 0:
            torch.set_num_threads(lead.train.num_threads)
        os.makedirs(output_dir, exist_ok=True)
        seed_everything(lead.train.seed)  # as `unipt train` seeds before its backbone loads (random_init uses it)
        shared = share_backbones(lead, load_backbones(lead, trust_remote_code))
    except BaseException:
        if lead.deepspeed.enabled:  # no trainer exists yet to end the process group
            shutdown_process_group()
        raise
    try:
        log.info("sweep: %d variants on one frozen forward per batch", len(variants))
        trainers, finished = train_together([cfg for _, _, cfg in variants], shared, trust_remote_code, on_finished)
    finally:
        for sb in shared.values():
            sb.close()
    rows = []
    for (name, assignment, cfg), t in zip(variants, trainers):
        rows.append({"name": name, "overrides": dict(assignment), "output_dir": cfg.output_dir,
                     **outcome(t, finished.get(id(t)))})
    chosen, rule = _select(rows, lead.task.kind)
    result = {"grid": {k: v for k, v in parse_grid(grid_items)}, "selection": rule, "chosen": chosen,
              "resumed_from_step": resumed,
              "variants": rows, "frozen_forwards": sum(sb.forwards for sb in shared.values()),
              "train_time_s": max((t.state.train_time_s for t in trainers), default=0.0),
              "wall_time_s": time.time() - start}
    if not trainers or trainers[0].dist.is_main:  # under DeepSpeed every rank holds the same result
        atomic_write_json(os.path.join(output_dir, SWEEP_JSON), result)
    return result
