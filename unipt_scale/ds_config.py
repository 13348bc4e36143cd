"""The DeepSpeed JSON resolved against the run config, once, before data and model are built.

Rule (the JSON named by deepspeed.config; a missing key or "auto" means unset):

* zero_optimization.stage: deepspeed.zero_stage when >= 0, else the JSON's, else 0.
* train_micro_batch_size_per_gpu / gradient_accumulation_steps: the JSON's when set, else data.batch_size /
  train.grad_accum. A set train_batch_size fills whichever of the two is unset (and must equal
  micro x accumulation x world size). The run config returned carries the resolved values, so the data loaders,
  the step count and metrics.json agree with what DeepSpeed does.
* gradient_clipping: the JSON's when set, else train.clip_norm (the returned config carries it).
* precision: the JSON's bf16 / fp16 sections when present; otherwise train.precision (auto = bf16 on CUDA,
  fp32 on CPU).
* optimizer: an "optimizer" section is built by DeepSpeed; without one, ZeRO-Offload of the optimizer gets
  DeepSpeedCPUAdam (unless "zero_force_ds_cpu_optimizer": false), everything else torch.optim.AdamW. Either
  way the parameter groups come from engine.param_groups (train.lr, head_lr, weight_decay).
* scheduler: always train.warmup_ratio + cosine (engine.warmup_cosine); a "scheduler" section is refused.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from typing import List, Tuple

from unipt_scale.config import ConfigError, RunConfig

log = logging.getLogger("unipt_scale")


def _unset(value) -> bool:
    return value is None or value == "auto"


def load_ds_json(path: str) -> dict:
    if not path:
        return {}
    if not os.path.isfile(path):
        raise ConfigError(f"deepspeed.config={path!r} does not exist (see launch/ds_zero*.json)")
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config={path!r} is not valid JSON: {err}") from None


def zero_stage(cfg: RunConfig, ds: dict) -> int:
    """The ZeRO stage a run trains with: deepspeed.zero_stage when >= 0, else the JSON's (`ds`), else 0."""
    stage = cfg.deepspeed.zero_stage if cfg.deepspeed.zero_stage >= 0 else (ds.get("zero_optimization") or {}).get(
        "stage", 0)
    return int(stage or 0)


def check_shared_backbone_stage(cfg: RunConfig, runs: str) -> None:
    """Several engines of one process over one frozen backbone (a sweep's variants, a multi-task run's tasks):
    ZeRO 0-2 only, since ZeRO-3 would partition the shared backbone into the first engine that wraps it."""
    if cfg.deepspeed.enabled and zero_stage(cfg, load_ds_json(cfg.deepspeed.config)) == 3:
        raise ConfigError(f"ZeRO-3 partitions the frozen backbone into the engine that wraps it, and {runs} share "
                          "one backbone between their engines; use ZeRO stage 0-2 (deepspeed.zero_stage=2: each "
                          "side network and its optimizer state sharded, the frozen backbone replicated)")


def trained_config(cfg: RunConfig, world_size: int) -> RunConfig:
    """The run config a run trains with on `world_size` ranks: under DeepSpeed resolved against the JSON (what the
    data loaders, the step count and the checkpoints' config follow), otherwise `cfg` itself."""
    if not cfg.deepspeed.enabled:
        return cfg
    from unipt_scale.distributed import use_cuda

    return resolve_ds_config(cfg, world_size, use_cuda())[0]


def _check_zero3(cfg: RunConfig) -> None:
    """What ZeRO-3's parameter partitioning cannot hold; stages 0-2 shard only what trains, so they take both."""
    for key, bb in (("backbone", cfg.backbone), ("image_backbone", cfg.image_backbone)):
        if bb is not None and bb.quantization != "none":
            raise ConfigError(f"{key}.quantization={bb.quantization}: ZeRO-3 partitions every parameter, and "
                              "bitsandbytes' 8/4-bit weights cannot be split and gathered; use ZeRO stage 0, 1 or "
                              "2 (launch/ds_zero2.json: the quantized base is replicated, the side network's "
                              f"optimizer state sharded), or {key}.quantization=none")


def resolve_ds_config(cfg: RunConfig, world_size: int, cuda: bool) -> Tuple[RunConfig, dict, List[str]]:
    """(run config to train with, DeepSpeed config dict, notes on run-config values the JSON replaced).

    Pure: `cfg` itself is left as it is."""
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    if "scheduler" in ds:
        raise ConfigError(f"{cfg.deepspeed.config}: remove the 'scheduler' section; the learning-rate schedule is "
                          "train.lr with train.warmup_ratio warmup and cosine decay")
    zero = dict(ds.get("zero_optimization") or {})
    zero["stage"] = zero_stage(cfg, ds)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0-3, got {zero['stage']}")
    ds["zero_optimization"] = zero
    if zero["stage"] == 3:
        _check_zero3(cfg)

    micro, gas, total = (None if _unset(ds.get(k)) else int(ds.get(k)) for k in
                         ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))
    if total is not None:
        if micro is None and gas is None:
            micro = cfg.data.batch_size
        if gas is None:
            gas = total // (micro * world_size)
        elif micro is None:
            micro = total // (gas * world_size)
    micro = cfg.data.batch_size if micro is None else micro
    gas = cfg.train.grad_accum if gas is None else gas
    if micro < 1 or gas < 1 or (total is not None and total != micro * gas * world_size):
        raise ConfigError(f"{cfg.deepspeed.config}: train_batch_size={total} is not train_micro_batch_size_per_gpu "
                          f"({micro}) x gradient_accumulation_steps ({gas}) x world size ({world_size}); set "
                          "consistent values or leave them to data.batch_size and train.grad_accum")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = micro * gas * world_size
    if _unset(ds.get("gradient_clipping")):
        ds["gradient_clipping"] = float(cfg.train.clip_norm)

    notes = []
    data = dataclasses.replace(cfg.data, batch_size=micro)
    train = dataclasses.replace(cfg.train, grad_accum=gas, clip_norm=float(ds["gradient_clipping"]))
    for key, old, new in (("data.batch_size", cfg.data.batch_size, micro), ("train.grad_accum", cfg.train.grad_accum,
                          gas), ("train.clip_norm", cfg.train.clip_norm, float(ds["gradient_clipping"]))):
        if old != new:
            notes.append(f"{cfg.deepspeed.config} sets {key} = {new} (the run config had {old})")
    resolved = dataclasses.replace(cfg, data=data, train=train)

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if "bf16" not in ds and "fp16" not in ds and precision in ("bf16", "fp16"):
        ds[precision] = {"enabled": True}
    for k in ("bf16", "fp16"):
        if isinstance(ds.get(k), dict) and _unset(ds[k].get("enabled")):
            ds[k]["enabled"] = precision == k
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return resolved, ds, notes


def offloads_optimizer(ds: dict) -> bool:
    dev = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return dev in ("cpu", "nvme")
