"""DeepSpeed ZeRO behind the trainer's engine seam (see engine.py for the methods the loop calls).

The backbone is frozen and runs under no_grad, so DeepSpeed only ever optimises the side network and the
heads: `deepspeed.initialize` gets those parameters alone. Under ZeRO-3 the frozen backbone is partitioned as
well (built inside transformers' DeepSpeed integration, so no rank ever holds it whole) and gathered layer by
layer by ZeRO-3's forward hooks.

DeepSpeed config rule (the JSON named by deepspeed.config; a missing key or "auto" means unset):

* zero_optimization.stage: deepspeed.zero_stage when >= 0, else the JSON's, else 0.
* train_micro_batch_size_per_gpu / gradient_accumulation_steps: the JSON's when set, else data.batch_size /
  train.grad_accum. A set train_batch_size fills whichever of the two is unset (and must equal
  micro x accumulation x world size). The resolved values are written back into data.batch_size and
  train.grad_accum, so the data loaders, the step count and metrics.json agree with what DeepSpeed does.
* gradient_clipping: the JSON's when set, else train.clip_norm (written back into train.clip_norm).
* precision: the JSON's bf16 / fp16 sections when present; otherwise train.precision (auto = bf16 on CUDA,
  fp32 on CPU).
* optimizer: an "optimizer" section is built by DeepSpeed; without one, ZeRO-Offload of the optimizer gets
  DeepSpeedCPUAdam (unless "zero_force_ds_cpu_optimizer": false), everything else torch.optim.AdamW. Either
  way the parameter groups come from engine.param_groups (train.lr, head_lr, weight_decay).
* scheduler: always train.warmup_ratio + cosine (engine.warmup_cosine); a "scheduler" section is refused.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import socket
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from unipt_scale.config import ConfigError, RunConfig
from unipt_scale.engine import param_groups, warmup_cosine

log = logging.getLogger("unipt_scale")

CKPT_DIR = "ds_ckpt"
RANK_STATE = "unipt_rank{rank}.pt"
FAIL_ENV = "UNIPT_FAIL_AT_STEP"  # fault injection for resume tests: every rank exits right after this step
FAIL_EXIT_CODE = 75

# transformers reads the ZeRO-3 config through a weak reference while it builds models: keep it alive.
_HF_DS_CONFIG = None


def _unset(value) -> bool:
    return value is None or value == "auto"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_accelerator():
    """DeepSpeed picks its accelerator once, at first use: on a machine without CUDA it must be the CPU one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _use_cuda() -> bool:
    """CUDA unless DeepSpeed was told to use another accelerator (DS_ACCELERATOR=cpu: a CPU rehearsal)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"


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


def resolve_ds_config(cfg: RunConfig, world_size: int, cuda: bool) -> dict:
    """The DeepSpeed config dict to run with (rule in the module docstring); updates cfg to match it."""
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    if "scheduler" in ds:
        raise ConfigError(f"{cfg.deepspeed.config}: remove the 'scheduler' section; the learning-rate schedule is "
                          "train.lr with train.warmup_ratio warmup and cosine decay")
    zero = dict(ds.get("zero_optimization") or {})
    if cfg.deepspeed.zero_stage >= 0:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero["stage"] = int(zero.get("stage", 0) or 0)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0-3, got {zero['stage']}")
    ds["zero_optimization"] = zero

    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    micro, gas, total = (None if _unset(v) else int(v) for v in (micro, gas, total))
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
    for section, name, value in (("data", "batch_size", micro), ("train", "grad_accum", gas),
                                 ("train", "clip_norm", float(ds["gradient_clipping"]))):
        sec = getattr(cfg, section)
        if getattr(sec, name) != value:
            if int(os.environ.get("RANK", "0")) == 0:
                log.warning("%s sets %s.%s = %s (the run config had %s)", cfg.deepspeed.config, section, name, value,
                            getattr(sec, name))
            setattr(sec, name, value)

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    if "bf16" not in ds and "fp16" not in ds:
        if precision in ("bf16", "fp16"):
            ds[precision] = {"enabled": True}
    for k in ("bf16", "fp16"):
        if isinstance(ds.get(k), dict) and _unset(ds[k].get("enabled")):
            ds[k]["enabled"] = precision == k
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _offloads_optimizer(ds: dict) -> bool:
    dev = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    return dev in ("cpu", "nvme")


def init_distributed(cfg: RunConfig) -> Tuple[int, int, torch.device]:
    """Join (or create) the process group: gloo on CPU, nccl on CUDA; rank and world size from the launcher.

    Without launcher variables the run is a one-process group on 127.0.0.1. Under ZeRO-3 this also registers
    the DeepSpeed config with transformers, so the backbone built next is partitioned as it is loaded.
    """
    global _HF_DS_CONFIG
    _pick_accelerator()
    import deepspeed

    cuda = _use_cuda()
    mpi = "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ  # DeepSpeed's MPI launchers
    if "RANK" not in os.environ and not mpi:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=mpi, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # MPI discovery sets it only now
    if cuda:
        torch.cuda.set_device(local_rank)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")

    ds = resolve_ds_config(cfg, world_size, cuda)
    if ds["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds)
    else:
        _HF_DS_CONFIG = None
    return rank, world_size, device


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


def _is_trained(name: str) -> bool:
    return ".backbone." not in f".{name}."


class DeepSpeedEngine:
    """The engine seam on deepspeed.initialize: ZeRO 0-3, offload, bf16/fp16, accumulation and clipping from the
    DeepSpeed config, resumable checkpoints in OUTPUT_DIR/ds_ckpt, and stage-independent trained weights."""

    def __init__(self, model: nn.Module, cfg: RunConfig, total_steps: int):
        _pick_accelerator()
        import deepspeed

        if not torch.distributed.is_initialized():
            init_distributed(cfg)
        self.cfg = cfg
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.is_main = self.rank == 0
        cuda = _use_cuda()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        self.ds_config = resolve_ds_config(cfg, self.world_size, cuda)
        self.zero_stage = self.ds_config["zero_optimization"]["stage"]
        self.task = model
        self._counts = _parameter_counts(model)

        t = cfg.train
        groups = param_groups(model, t.weight_decay, t.lr, t.head_lr)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        for g in groups:
            g.pop("names")
        optimizer = None
        if "optimizer" not in self.ds_config:
            if _offloads_optimizer(self.ds_config) and self.ds_config.get("zero_force_ds_cpu_optimizer", True):
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8,
                                             weight_decay=t.weight_decay, adamw_mode=True)
            else:
                optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
        factor = warmup_cosine(total_steps, t.warmup_ratio)
        root = _TaskForward(model)
        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=root, optimizer=optimizer, model_parameters=None if optimizer is not None else groups,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor), config=self.ds_config)
        self.model = _ModelView(self._ds, model)
        self.half = bool(self._ds.bfloat16_enabled() or self._ds.fp16_enabled())

        self.ckpt_dir = os.path.join(cfg.output_dir, CKPT_DIR)
        self._saved_step = None
        self._last_position = None
        self._resumed: Optional[dict] = None
        self._pending_rng = None
        fail = os.environ.get(FAIL_ENV, "")
        self._fail_at = int(fail) if fail.isdigit() else None
        if self.zero_stage == 3:
            self._write_partition_report()
        if cfg.deepspeed.resume:
            self._load(cfg.deepspeed.resume)

    # ----------------------------------------------------------------------------------------------- the loop

    def autocast(self):
        # DeepSpeed casts the module itself for bf16/fp16; there is no autocast region to open.
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def step(self) -> bool:
        """Call after every micro batch; True when this one closed an accumulation window (optimizer stepped)."""
        boundary = self._ds.is_gradient_accumulation_boundary()
        self._ds.step()
        return bool(boundary)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gather(self, outputs: List[Dict]) -> List[Dict]:
        """Every rank's eval outputs, in rank order, on every rank."""
        if self.world_size == 1:
            return outputs
        everyone: List[Optional[List[Dict]]] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, outputs)
        return [o for part in everyone for o in part]

    def lockstep(self, loader):
        """(batch, real) pairs over this rank's part of an eval loader, in step with the other ranks.

        Under ZeRO-3 every forward is collective (parameters are all-gathered layer by layer), so a rank whose
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

    def reduce_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.world_size).item()

    def barrier(self):
        if self.world_size > 1:
            torch.distributed.barrier()

    def parameter_counts(self) -> Dict[str, int]:
        """Counts of the whole model: p.numel() is only the local shard under ZeRO-3, so they are taken up front."""
        return dict(self._counts)

    def trained_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full (unpartitioned) side-network and head weights, the same whatever the stage and world size.

        Collective: every rank must call it. ZeRO-3 parameters are gathered first (an empty shard otherwise
        ends up in the file); with bf16/fp16 the fp32 master weights are exported, not the half-precision copy.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        from unipt_scale.model import trained_state_dict

        params = dict(self.task.named_parameters())
        keys = list(trained_state_dict(self.task).keys())
        trained = [params[k] for k in keys if k in params]
        gather = (deepspeed_gathered(trained) if self.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                     for k, v in trained_state_dict(self.task).items()}
        if self.half:
            for k in keys:
                p = params.get(k)
                if p is not None and p.requires_grad:
                    full = safe_get_full_fp32_param(p)
                    if full is not None:
                        state[k] = full.detach().float().cpu().clone().reshape(state[k].shape)
        return state

    # ------------------------------------------------------------------------------------------ checkpoints

    def maybe_checkpoint(self, position: dict) -> None:
        """Called after every optimizer step: saves every deepspeed.checkpoint_every steps."""
        self._last_position = _snapshot(position)
        every = self.cfg.deepspeed.checkpoint_every
        step = position["step"]
        if every and step % every == 0:
            self.save(self._last_position)
        if self._fail_at is not None and step == self._fail_at:
            self.barrier()
            log.warning("%s=%d: exiting after step %d to simulate a crash", FAIL_ENV, self._fail_at, step)
            os._exit(FAIL_EXIT_CODE)

    def finish(self, position: dict) -> None:
        """The end-of-run checkpoint, at the exact position of the last step (mid-epoch when max_steps stops)."""
        last = self._last_position if self._last_position and self._last_position["step"] == position["step"] \
            else _snapshot(position)
        if self._saved_step != last["step"]:
            self.save(last)

    def save(self, position: dict) -> str:
        """A full resumable checkpoint (collective). Per-rank RNG and loss window go beside DeepSpeed's files,
        written first: DeepSpeed updates `latest` last, so a crash mid-save leaves the previous one current."""
        tag = f"step{position['step']:08d}"
        tag_dir = os.path.join(self.ckpt_dir, tag)
        os.makedirs(tag_dir, exist_ok=True)
        rank_state = {"position": position, "rng": _rng_state(), "world_size": self.world_size,
                      "zero_stage": self.zero_stage}
        _atomic_torch_save(rank_state, os.path.join(tag_dir, RANK_STATE.format(rank=self.rank)))
        self.barrier()
        self._ds.save_checkpoint(self.ckpt_dir, tag=tag, client_state={"unipt_position": position},
                                 exclude_frozen_parameters=True)
        self.barrier()
        self._saved_step = position["step"]
        return tag_dir

    def _find(self, resume: str) -> Optional[Tuple[str, str]]:
        """(checkpoint directory, tag) for deepspeed.resume: 'auto', a directory with `latest`, or a tag dir."""
        if resume == "auto":
            resume = self.ckpt_dir
            if not os.path.isfile(os.path.join(resume, "latest")):
                return None
        resume = os.path.abspath(os.path.expanduser(resume))
        if os.path.isfile(os.path.join(resume, "latest")):
            with open(os.path.join(resume, "latest"), encoding="utf-8") as fh:
                return resume, fh.read().strip()
        if os.path.isdir(resume) and any(f.endswith("model_states.pt") for f in os.listdir(resume)):
            return os.path.dirname(resume), os.path.basename(resume)
        raise ConfigError(f"deepspeed.resume={resume!r} is neither a DeepSpeed checkpoint directory (with a "
                          "'latest' file) nor one of its step directories")

    def _load(self, resume: str) -> None:
        found = self._find(resume)
        if found is None:
            if self.is_main:
                log.info("deepspeed.resume=auto: no checkpoint in %s yet, starting fresh", self.ckpt_dir)
            return
        directory, tag = found
        rank_file = os.path.join(directory, tag, RANK_STATE.format(rank=self.rank))
        if not os.path.isfile(rank_file):
            raise ConfigError(f"{os.path.join(directory, tag)} has no {os.path.basename(rank_file)}: it was not "
                              f"written by a unipt run of this world size ({self.world_size})")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        if rank_state["world_size"] != self.world_size:
            raise ConfigError(f"checkpoint {tag} was written by {rank_state['world_size']} ranks; resume it with the "
                              f"same world size (this run has {self.world_size})")
        path, _client = self._ds.load_checkpoint(directory, tag=tag, load_module_strict=False,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ConfigError(f"DeepSpeed could not load the checkpoint {os.path.join(directory, tag)}")
        self._resumed = rank_state["position"]
        self._pending_rng = rank_state["rng"]
        self._saved_step = self._resumed["step"]
        self._last_position = copy.deepcopy(self._resumed)
        if self.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self._resumed["step"],
                     self._resumed["epoch"], self._resumed.get("batches_in_epoch", 0))

    def resume_state(self) -> Optional[dict]:
        """The position to continue from, or None. At an epoch start the RNG is restored now; mid-epoch it is
        restored once the loop has skipped back to the position (data_position_reached)."""
        if self._resumed and not self._resumed.get("batches_in_epoch"):
            self.data_position_reached()
        return copy.deepcopy(self._resumed) if self._resumed else None

    def data_position_reached(self) -> None:
        """The loop stands where the checkpoint was taken: continue the RNG streams (dropout) from there."""
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    # ----------------------------------------------------------------------------------------------- ZeRO-3

    def partition_report(self) -> dict:
        """Elements of the model this rank holds under ZeRO-3, for the backbone and the trained part.

        A partitioned parameter contributes its local shard (ds_tensor); a persistent one (below
        stage3_param_persistence_threshold) is kept whole on every rank and counts in full."""
        out = {}
        for name, p in self.task.named_parameters():
            part = "trained" if _is_trained(name) else "backbone"
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

    def _write_partition_report(self) -> None:
        report = self.partition_report()
        path = os.path.join(self.cfg.output_dir, f"zero3_partition.rank{self.rank}.json")
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        from unipt_scale.checkpoint import atomic_write_json

        atomic_write_json(path, report)
        log.info("rank %d holds %.1f%% of the backbone and %.1f%% of the trained parameters (ZeRO-3)", self.rank,
                 100 * report.get("backbone", {}).get("share", 0.0), 100 * report.get("trained", {}).get("share", 0.0))


def deepspeed_gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _parameter_counts(model: nn.Module) -> Dict[str, int]:
    trainable = frozen = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return {"trainable_params": trainable, "frozen_params": frozen}


def _snapshot(position: dict) -> dict:
    """The position as it is now: the loop keeps appending to its history lists after handing them over."""
    return {k: list(v) if isinstance(v, list) else v for k, v in position.items()}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)

