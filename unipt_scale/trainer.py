"""The one training loop. Backends plug in through the engine seam (engine.py); data through data/."""
from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from unipt_scale.checkpoint import atomic_write_json, save_trained
from unipt_scale.config import RunConfig
from unipt_scale.data import build_data, num_classes_of
from unipt_scale.engine import LocalEngine
from unipt_scale.model import build_model, count_parameters, tokenizer_of

log = logging.getLogger("unipt_scale")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def to_device(batch: Dict, device: torch.device) -> Dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def evaluate(model, loader, engine, desc: str = "eval") -> Optional[Dict[str, float]]:
    """Run eval_step over a loader (each rank its part) and compute metrics on the gathered outputs."""
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    outputs = []
    # An engine whose forwards are collective (ZeRO-3) keeps the ranks in step, with stand-in batches (real=False).
    batches = engine.lockstep(loader) if hasattr(engine, "lockstep") else ((b, True) for b in loader)
    with torch.no_grad(), engine.autocast():
        for batch, real in tqdm(batches, total=_length(loader), desc=desc, leave=False, disable=not engine.is_main):
            out = model.eval_step(to_device(batch, engine.device))
            if real:
                outputs.append(out)
    if _rank_sharded(loader):
        outputs = engine.gather(outputs)  # each rank saw its part; otherwise every rank already saw it all
    model.train(was_training)
    if not outputs:
        return None
    return model.eval_metrics(outputs)


def _rank_sharded(loader) -> bool:
    """Whether each rank iterates only its own part of `loader` (then eval outputs must be gathered).

    A torch DataLoader is split over ranks only by a DistributedSampler; other loaders (the shard streams)
    split their input over ranks themselves. A loader can say so with a `rank_sharded` attribute."""
    flag = getattr(loader, "rank_sharded", None)
    if flag is not None:
        return bool(flag)
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(loader, DataLoader):
        return isinstance(loader.sampler, DistributedSampler)
    return True


def _length(loader) -> Optional[int]:
    try:
        return len(loader)
    except TypeError:
        return None


def _make_engine(cfg: RunConfig, model, total_steps: int, device):
    if cfg.deepspeed.enabled:
        from unipt_scale.distributed import DeepSpeedEngine

        return DeepSpeedEngine(model, cfg, total_steps)
    return LocalEngine(model, cfg.train, total_steps, device)


def _distributed_context(cfg: RunConfig):
    """(rank, world_size, device) before the model is built; DeepSpeed runs set up the process group first."""
    if cfg.deepspeed.enabled:
        from unipt_scale.distributed import init_distributed

        return init_distributed(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 1, device


def train(cfg: RunConfig) -> Dict:
    """Train per `cfg`; writes OUTPUT_DIR/metrics.json (and checkpoint/, tb/) and returns the metrics."""
    start = time.time()
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    rank, world_size, device = _distributed_context(cfg)
    is_main = rank == 0
    out_dir = cfg.output_dir
    if is_main:
        os.makedirs(out_dir, exist_ok=True)

    num_classes = num_classes_of(cfg.data) if cfg.task.kind == "classification" and not cfg.task.num_classes else 0
    model = build_model(cfg, num_classes=num_classes)
    data = build_data(cfg.data, tokenizer_of(model), rank=rank, world_size=world_size,
                      needs_image=cfg.task.kind == "retrieval", needs_labels=cfg.task.kind == "classification" or None)
    steps_per_epoch = max(1, data.train_batches // cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    engine = _make_engine(cfg, model, total_steps, device)
    model = engine.model
    counts = engine.parameter_counts() if hasattr(engine, "parameter_counts") else count_parameters(model)
    if is_main:
        log.info("trainable %s / frozen %s parameters; %d steps (%d per epoch), world size %d",
                 f"{counts['trainable_params']:,}", f"{counts['frozen_params']:,}", total_steps, steps_per_epoch,
                 world_size)

    tb = None
    if is_main and cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(os.path.join(out_dir, "tb"))

    train_loss, val_history = [], []
    step, micro, samples, window, window_n = 0, 0, 0, 0.0, 0
    train_time = 0.0
    epoch, skip_batches = 0, 0
    resumed = engine.resume_state() if hasattr(engine, "resume_state") else None
    if resumed:
        # Continue exactly where the checkpoint stopped: same step, same epoch, same position in the data order.
        step, epoch = resumed["step"], resumed["epoch"]
        skip_batches = resumed.get("batches_in_epoch", 0)
        train_loss = [list(x) for x in resumed.get("train_loss", [])]
        val_history = list(resumed.get("val_history", []))
        window, window_n = resumed.get("window", (0.0, 0))
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not is_main)
    done = step >= total_steps
    while not done:
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        elif hasattr(getattr(data.train, "sampler", None), "set_epoch"):
            data.train.sampler.set_epoch(epoch)
        t_epoch = time.time()
        batches_in_epoch = 0
        for batch in data.train:
            batches_in_epoch += 1
            if skip_batches:
                skip_batches -= 1
                if not skip_batches and hasattr(engine, "data_position_reached"):
                    engine.data_position_reached()  # random streams continue from the checkpoint's point
                continue
            batch = to_device(batch, device)
            with engine.autocast():
                loss, _stats = model.training_loss(batch)
            engine.backward(loss)
            window += loss.item()
            window_n += 1
            micro += 1
            samples += len(next(iter(v for v in batch.values() if torch.is_tensor(v))))
            if not engine.step():
                continue
            step += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total_steps:
                mean_loss = engine.reduce_mean(window / max(window_n, 1))
                train_loss.append([step, mean_loss])
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{engine.lr():.2e}")
                if tb:
                    tb.add_scalar("train/loss", mean_loss, step)
                    tb.add_scalar("train/lr", engine.lr(), step)
                window, window_n = 0.0, 0
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                train_time += time.time() - t_epoch
                val = evaluate(model, data.val, engine, "val")
                t_epoch = time.time()
                if val:
                    val_history.append({"step": step, **val})
                    if tb:
                        for k, v in val.items():
                            tb.add_scalar(f"val/{k}", v, step)
            if hasattr(engine, "maybe_checkpoint"):
                engine.maybe_checkpoint({"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                                         "train_loss": train_loss, "val_history": val_history,
                                         "window": (window, window_n)})
            if step >= total_steps:
                done = True
                break
        train_time += time.time() - t_epoch
        epoch += 1
        if batches_in_epoch == 0:
            raise RuntimeError("the training loader yielded no batch this epoch; check the data source and "
                               "data.batch_size (batches drop their remainder)")
        if not done and not cfg.train.eval_every:
            val = evaluate(model, data.val, engine, "val")
            if val:
                val_history.append({"step": step, "epoch": epoch, **val})
    bar.close()

    val = evaluate(model, data.val, engine, "val")
    if val:
        val_history.append({"step": step, **val})
    test = evaluate(model, data.test, engine, "test")
    if tb:
        for name, m in (("val", val), ("test", test)):
            for k, v in (m or {}).items():
                tb.add_scalar(f"{name}/{k}", v, step)
        tb.close()

    meta = {"num_classes": getattr(model, "num_classes", 0), "label_names": data.label_names, "step": step}
    if cfg.train.save:
        state = engine.trained_state_dict()  # collective under ZeRO-3: every rank takes part
        if is_main:
            save_trained(state, cfg, os.path.join(out_dir, "checkpoint"), meta)
    if hasattr(engine, "finish"):
        engine.finish({"step": step, "epoch": epoch, "batches_in_epoch": 0, "train_loss": train_loss,
                       "val_history": val_history})
    stats = dict(data.stats)
    if data.skip_counts is not None:
        stats.update(data.skip_counts())
    metrics = {
        "config": cfg.to_dict(),
        "train_loss": train_loss,
        "val": val,
        "val_history": val_history,
        "test": test,
        **counts,
        "steps": step,
        "epochs_run": epoch,
        "samples_seen": samples * world_size,
        "train_samples_per_second": samples * world_size / max(train_time, 1e-9),
        "wall_time_s": time.time() - start,
        "world_size": world_size,
        "zero_stage": engine.zero_stage,
        "data": stats,
    }
    if is_main:
        atomic_write_json(os.path.join(out_dir, "metrics.json"), metrics)
    engine.barrier()
    return metrics
