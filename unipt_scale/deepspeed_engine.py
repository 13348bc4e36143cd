"""DeepSpeed ZeRO behind the engine interface (engine.Engine).

`deepspeed.initialize` gets the parameters the method trains (engine.trained_names: for UniPT the side network
and the heads, the backbone then frozen under no_grad; LoRA adapters; everything for full fine-tuning). Under
ZeRO-3 the backbone is partitioned as well (built inside transformers' DeepSpeed integration, so no rank ever
holds it whole: see `prepare_model_loading`) and gathered layer by layer by ZeRO-3's forward hooks. The
DeepSpeed config comes resolved from ds_config.resolve_ds_config.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.distributed import DistContext, pick_accelerator
from unipt_scale.ds_config import offloads_optimizer
from unipt_scale.engine import Engine, adamw, param_groups, trained_names, warmup_cosine
from unipt_scale.trained import count_parameters

log = logging.getLogger("unipt_scale")

DS_SUBDIR = "deepspeed"
DS_TAG = "state"
# What DeepSpeed's own checkpoint files reference besides tensors and containers (found by scanning the files of
# ZeRO 0-3, offload, bf16 and fp16 runs). Anything else is refused before DeepSpeed unpickles them: a crafted file
# in an output directory must not run code on resume. These are plain data classes and an enum.
_DS_PICKLE_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                      "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address"}

# transformers reads the ZeRO-3 config through a weak reference while it builds models: keep it alive.
_HF_DS_CONFIG = None


def prepare_model_loading(ds_config: dict) -> None:
    """Under ZeRO-3, register the config with transformers so the backbone is partitioned as it loads."""
    global _HF_DS_CONFIG
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    else:
        _HF_DS_CONFIG = None


class _TaskForward(nn.Module):
    """The root module DeepSpeed wraps. Its forward is the task's training_loss / eval_step, so every forward
    goes through DeepSpeedEngine.forward: ZeRO-3's fetch hooks and the backward prologue hooked onto its output."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, batch, mode: str = "train"):
        return self.task.training_loss(batch) if mode == "train" else self.task.eval_step(batch)


class _ModelView:
    """What the trainer holds as `engine.model`: the task model's API, with forwards routed through DeepSpeed."""

    def __init__(self, ds_engine, task: nn.Module):
        self._ds = ds_engine
        self._task = task

    def training_loss(self, batch):
        return self._ds(batch, mode="train")

    def eval_step(self, batch):
        return self._ds(batch, mode="eval")

    def train(self, mode: bool = True):
        self._ds.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def training(self) -> bool:
        return self._task.training

    def __getattr__(self, name):
        return getattr(self._task, name)


def deepspeed_gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class DeepSpeedEngine(Engine):
    """ZeRO 0-3, offload, bf16/fp16, accumulation and clipping from the resolved DeepSpeed config, and
    stage-independent trained weights."""

    def __init__(self, model: nn.Module, cfg: RunConfig, ds_config: dict, total_steps: int, dist: DistContext):
        pick_accelerator()
        import deepspeed

        self.cfg = cfg
        self.rank, self.world_size, self.device = dist.rank, dist.world_size, dist.device
        self.ds_config = ds_config
        self.zero_stage = ds_config["zero_optimization"]["stage"]
        self.task = model
        if self.zero_stage == 3 and getattr(model, "eval_rows", None):
            # Collective forwards: every rank evaluates each batch in the same number of forwards.
            model.eval_slots = -(-cfg.data.eval_batch_size // model.eval_rows)
        self._counts = count_parameters(model)  # before initialize: ds_numel is the whole size under ZeRO-3
        self._trained = set(trained_names(model))  # the method's rule; fixed once the model is built

        t = cfg.train
        groups = param_groups(model, t.weight_decay, t.lr, t.head_lr)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        for g in groups:
            g.pop("names")
        optimizer = None
        if "optimizer" not in ds_config:
            if offloads_optimizer(ds_config) and ds_config.get("zero_force_ds_cpu_optimizer", True):
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8,
                                             weight_decay=t.weight_decay, adamw_mode=True)
            else:  # ZeRO steps it on this rank's fp32 partitions: the fused kernel where they allow it
                optimizer = adamw(groups, t.lr)
        factor = warmup_cosine(total_steps, t.warmup_ratio)
        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=_TaskForward(model), optimizer=optimizer,
            model_parameters=None if optimizer is not None else groups,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), config=ds_config)
        self.model = _ModelView(self._ds, model)
        self.half = bool(self._ds.bfloat16_enabled() or self._ds.fp16_enabled())
        self._closed = False

    # ----------------------------------------------------------------------------------------------- the loop

    def autocast(self):
        # DeepSpeed casts the module itself for bf16/fp16; there is no autocast region to open.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def at_boundary(self) -> bool:
        return bool(self._ds.is_gradient_accumulation_boundary())

    def step(self, apply: bool = True) -> bool:
        if not apply:
            raise ConfigError("DeepSpeed cannot drop a step's gradients; use train.on_nonfinite=stop")
        boundary = self.at_boundary()
        self._ds.step()
        return boundary

    def grads_finite(self) -> bool:
        raise ConfigError("train.on_nonfinite=skip needs the single-process engine; use train.on_nonfinite=stop")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            moved = tensor.to(self.device)
            torch.distributed.all_reduce(moved)
            tensor.copy_(moved)
        return tensor

    def gather(self, outputs: List[Dict]) -> List[Dict]:
        if self.world_size == 1:
            return outputs
        everyone: List[Optional[List[Dict]]] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, outputs)
        return [o for part in everyone for o in part]

    def lockstep(self, loader):
        """Under ZeRO-3 every forward is collective (parameters are all-gathered layer by layer), so a rank whose
        part is shorter keeps running forwards on a stand-in batch (real=False, outputs dropped) until every rank
        is done; a rank with no batch at all borrows one from another rank. Other stages run the loader as is."""
        if self.zero_stage < 3 or self.world_size == 1:
            for batch in loader:
                yield batch, True
            return
        it, last = iter(loader), None
        while True:
            batch = next(it, None)
            mine = torch.tensor([batch is not None, batch is not None or last is not None], dtype=torch.int64,
                                device=self.device)
            status = [torch.zeros_like(mine) for _ in range(self.world_size)]
            torch.distributed.all_gather(status, mine)
            if not any(int(s[0]) for s in status):
                return
            if not all(int(s[1]) for s in status):
                offered: List[Optional[Dict]] = [None] * self.world_size
                torch.distributed.all_gather_object(offered, batch)
                if batch is None and last is None:
                    last = next(b for b in offered if b is not None)
            if batch is not None:
                last = batch
                yield batch, True
            else:
                yield last, False

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()

    def parameter_counts(self) -> Dict[str, int]:
        """Counts of the whole model: p.numel() is only the local shard under ZeRO-3, so they are taken up front."""
        return dict(self._counts)

    def trained_state_dict(self) -> Dict[str, torch.Tensor]:
        """ZeRO-3 parameters are gathered first (an empty shard otherwise ends up in the file); with bf16/fp16
        the fp32 master weights are exported, not the half-precision copy."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.task.named_parameters())
        keys = trained_names(self.task)
        trained = [params[k] for k in keys if k in params]
        gather = deepspeed_gathered(trained) if self.zero_stage == 3 else contextlib.nullcontext()
        with gather:
            full = self.task.state_dict()
            state = {k: full[k].detach().float().cpu().clone() if full[k].is_floating_point()
                     else full[k].detach().cpu().clone() for k in keys}
        if self.half:
            for k in keys:
                p = params.get(k)
                if p is not None and p.requires_grad:
                    master = safe_get_full_fp32_param(p)
                    if master is not None:
                        state[k] = master.detach().float().cpu().clone().reshape(state[k].shape)
        return state

    def trained_finite(self) -> bool:
        """This rank's shards of the trained weights, their fp32 masters and the optimizer state, reduced."""
        local = []
        for name, p in self.task.named_parameters():
            if name in self._trained:
                shard = getattr(p, "ds_tensor", None)
                local.append(shard if shard is not None else p.data)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for group in getattr(inner, "param_groups", []):
            local.extend(p.data for p in group["params"])
        for s in getattr(inner, "state", {}).values():
            local.extend(v for v in s.values() if torch.is_tensor(v))
        ok = all(bool(torch.isfinite(t).all()) for t in local if t.is_floating_point() and t.numel())
        flag = torch.tensor([0.0 if ok else 1.0], dtype=torch.float64)
        return bool(self.all_reduce_sum(flag).item() == 0)

    # ------------------------------------------------------------------------------------------ state

    def save_state(self, directory: str) -> None:
        self._ds.save_checkpoint(os.path.join(directory, DS_SUBDIR), tag=DS_TAG, save_latest=False,
                                 exclude_frozen_parameters=True)

    def load_state(self, directory: str) -> None:
        root = os.path.join(directory, DS_SUBDIR)
        refuse_unsafe_pickles(os.path.join(root, DS_TAG))
        path, _ = self._ds.load_checkpoint(root, tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the engine state in {root}")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ds.destroy()

    # ----------------------------------------------------------------------------------------------- ZeRO-3

    def partition_report(self) -> dict:
        """Elements of the model this rank holds under ZeRO-3, for the backbone and the trained part.

        A partitioned parameter contributes its local shard (ds_tensor); a persistent one (below
        stage3_param_persistence_threshold) is kept whole on every rank and counts in full."""
        out = {}
        for name, p in self.task.named_parameters():
            part = "trained" if name in self._trained else "backbone"
            full = int(getattr(p, "ds_numel", p.numel()))
            persistent = bool(getattr(p, "ds_persist", False))
            shard = getattr(p, "ds_tensor", None)
            held = full if persistent or shard is None else int(shard.numel())
            d = out.setdefault(part, {"total": 0, "held": 0, "persistent": 0, "params": 0})
            d["total"] += full
            d["held"] += held
            d["persistent"] += full if persistent else 0
            d["params"] += 1
        for d in out.values():
            d["share"] = d["held"] / max(1, d["total"])
        return {"rank": self.rank, "world_size": self.world_size, "zero_stage": self.zero_stage, **out}

    def write_partition_report(self, output_dir: str) -> None:
        from unipt_scale.atomic import atomic_write_json

        report = self.partition_report()
        atomic_write_json(os.path.join(output_dir, f"zero3_partition.rank{self.rank}.json"), report)
        log.info("rank %d holds %.1f%% of the backbone and %.1f%% of the trained parameters (ZeRO-3)", self.rank,
                 100 * report.get("backbone", {}).get("share", 0.0), 100 * report.get("trained", {}).get("share", 0.0))


def pickle_problem(path: str) -> Optional[str]:
    """Why DeepSpeed must not unpickle `path` (None where it references only tensors, containers and DeepSpeed's
    own plain types). Reads the pickle's opcodes only: nothing in the file runs."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        unsafe = get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file at all
        return "is not a DeepSpeed checkpoint file (not an archive torch.save writes)"
    bad = [g for g in unsafe if g not in _DS_PICKLE_GLOBALS]
    if bad:
        return f"references {bad[:3]}, which a DeepSpeed checkpoint never holds, so it could run code"
    return None


def refuse_unsafe_pickles(directory: str) -> None:
    """DeepSpeed unpickles its own files with weights_only=False; check first that none references anything but
    tensors, containers and DeepSpeed's own plain types, so a crafted file in an output directory runs nothing."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is missing: the checkpoint holds no DeepSpeed engine state")
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        problem = pickle_problem(path)
        if problem is not None:
            raise ValueError(f"{path} {problem}; refusing to load it: resume from another checkpoint")
