"""The one trainer: explicit state, one engine interface, one checkpoint manager.

Set-up reads in one direction: config → process group and DeepSpeed config (resolved once) → preprocessors
(tokenizer from the backbone path, no weights) → data (which knows its classes) → model → engine → checkpoint
manager and resume → loop. `train(cfg)` runs it and always tears down in a fixed order.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from unipt_scale.atomic import atomic_write_json, save_tensors_file
from unipt_scale.checkpoint import CheckpointError, CheckpointManager
from unipt_scale.config import TWO_TOWER_TASKS, ConfigError, RunConfig, missing_image_tower
from unipt_scale.distributed import DistContext, broadcast_object, init_process_group, shutdown_process_group, \
    single_process
from unipt_scale.engine import Engine, LocalEngine
from unipt_scale.export import CHECKPOINT, METRICS, commit_outputs, recover_outputs
from unipt_scale.train_state import TrainState, capture_rng, finite_or_none, restore_rng, seed_everything

log = logging.getLogger("unipt_scale")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight; nothing non-finite was written."""


class Callback:
    """Hooks into the loop (progress reporting, tests that stop a run at a chosen point)."""

    def on_step_end(self, trainer: "Trainer") -> None:
        pass

    def on_checkpoint(self, trainer: "Trainer", path: str) -> None:
        pass


def to_device(batch: Dict, device: torch.device) -> Dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


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


def evaluate(model, loader, engine: Optional[Engine], desc: str = "eval",
             device: Optional[torch.device] = None) -> Optional[Dict[str, float]]:
    """eval_step over a loader, metrics on the outputs. With an engine each rank runs its part (in lockstep
    where forwards are collective) and the outputs are gathered; without one it is a plain loop on `device`."""
    return evaluate_many([model], loader, engine, desc, device)[0]


def evaluate_many(models: Sequence, loader, engine: Optional[Engine], desc: str = "eval",
                  device: Optional[torch.device] = None, shared: Sequence = ()) -> List[Optional[Dict[str, float]]]:
    """`evaluate` for several models over one pass of the loader; with `shared` backbones (SharedBackbone) the
    frozen forward of each batch runs once for all of them."""
    if loader is None:
        return [None] * len(models)
    from unipt_scale.shared_forward import shared_batch

    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    outputs: List[List] = [[] for _ in models]
    pairs = engine.lockstep(loader) if engine is not None else ((b, True) for b in loader)
    device = engine.device if engine is not None else (device or torch.device("cpu"))
    main = engine.is_main if engine is not None else True
    autocast = engine.autocast() if engine is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for batch, real in tqdm(pairs, total=_length(loader), desc=desc, leave=False, disable=not main):
            batch = to_device(batch, device)
            with shared_batch(shared):
                for m, kept in zip(models, outputs):
                    out = m.eval_step(batch)
                    if real:
                        kept.append(out)
    results = []
    for m, kept, training in zip(models, outputs, was_training):
        if engine is not None and _rank_sharded(loader):
            kept = engine.gather(kept)
        m.train(training)
        results.append(m.eval_metrics(kept) if kept else None)
    return results


def build_run_data(cfg: RunConfig, dist: Optional[DistContext] = None, trust_remote_code: bool = False):
    """The run's DataBundle: preprocessors from the backbone paths (no weights), then the batches the task reads
    (its module's DATA). Without `dist`: one process."""
    from unipt_scale.data import build_data
    from unipt_scale.preprocessors import load_image_transform, load_tokenizer
    from unipt_scale.tasks import data_fields

    fields = data_fields(cfg.task.kind)
    tokenizer = load_tokenizer(cfg.backbone, trust_remote_code=trust_remote_code)
    vision = cfg.image_backbone or (cfg.backbone if tokenizer is None or (
        cfg.task.kind == "vqa" and reads_images(cfg.backbone, trust_remote_code)) else None)
    image_transform = load_image_transform(vision, cfg.data.image_size, trust_remote_code=trust_remote_code,
                                           resize=fields.get("image_resize", "crop")) if vision is not None else None
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    return build_data(cfg.data, tokenizer, rank=rank, world_size=world_size, image_transform=image_transform,
                      **fields)


class Trainer:
    """One training run: setup(), fit(), finish() (returns the metrics), close(); `train(cfg)` runs them in that
    order. The state lives in `self.state` (a TrainState)."""

    def __init__(self, cfg: RunConfig, callbacks: Sequence[Callback] = (), trust_remote_code: bool = False):
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.trust_remote_code = trust_remote_code
        self.state = TrainState()
        self.dist: Optional[DistContext] = None
        self.engine: Optional[Engine] = None
        self.tb = None
        self.last_checkpoint: Optional[str] = None
        self.resumed_from_step: Optional[int] = None
        self._created_output = False
        self._rng = None  # a sweep variant's own RNG streams while the others run (None: the process's own)
        self.failure: Optional[str] = None  # a sweep variant stopped for non-finite values: why
        self.progress = True  # its own progress bar (a sweep shows one, its first variant's)
        self.shared: list = []  # SharedBackbones this run's models read (a feature cache, or a sweep's forward)

    # ------------------------------------------------------------------------------------------- set-up

    def setup(self, data=None, backbones: Optional[Dict] = None) -> None:
        """`data` (a DataBundle) and `backbones` (by config field) are given by a sweep, which builds them once for
        every variant; a run of its own builds both."""
        cfg = self.cfg
        self.start_time = time.time()
        # Everything that can be checked without weights or data fails here, in a second, with one line.
        check_output_dir(cfg.output_dir)
        check_backbones(cfg, self.trust_remote_code)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        ds_config = None
        if cfg.deepspeed.enabled:
            from unipt_scale.deepspeed_engine import prepare_model_loading
            from unipt_scale.distributed import use_cuda
            from unipt_scale.ds_config import resolve_ds_config

            self.dist = init_process_group()
            cfg, ds_config, notes = resolve_ds_config(cfg, self.dist.world_size, use_cuda())
            if self.dist.is_main:
                for note in notes:
                    log.warning("%s", note)
            prepare_model_loading(ds_config)
            self.cfg = cfg
        else:
            self.dist = single_process()
        # The checkpoint to resume from is found and verified (every file hashed and parsed) before any weights or
        # data load: a damaged or mismatched one fails in a second. The barrier is attached once the engine exists.
        self.manager = CheckpointManager(cfg.output_dir, self.dist.rank, self.dist.world_size, cfg.to_dict(),
                                         cfg.train.keep_checkpoints)
        self._resume_from = None
        if cfg.train.resume:
            self._resume_from = self._find_resume(cfg.train.resume)
        seed_everything(cfg.train.seed)
        if self.dist.is_main:
            self._created_output = not os.path.isdir(cfg.output_dir)
            os.makedirs(cfg.output_dir, exist_ok=True)
            recover_outputs(cfg.output_dir)

        from unipt_scale.tasks import build_model

        self.data = data if data is not None else build_run_data(cfg, self.dist, self.trust_remote_code)
        if self.data.train_batches < 1:
            raise ConfigError(f"the training data gives no full batch of data.batch_size={cfg.data.batch_size} on "
                              f"each of {self.dist.world_size} rank(s) (batches drop their remainder); use more "
                              "data (data.limit_train, data.split) or a smaller data.batch_size")
        num_classes = cfg.task.num_classes or self.data.num_classes
        if backbones is None and cfg.data.feature_cache:
            from unipt_scale.shared_forward import share_backbones
            from unipt_scale.tasks import load_backbones

            shared = share_backbones(cfg, load_backbones(cfg, self.trust_remote_code))
            self.shared = list(shared.values())
            backbones = {name: sb.view() for name, sb in shared.items()}
        model = build_model(cfg, num_classes=num_classes, trust_remote_code=self.trust_remote_code,
                            backbones=backbones)
        if self.shared and cfg.data.feature_cache and self.dist.is_main:
            samples = sum(v for k, v in self.data.stats.items() if k.endswith("_samples")) or \
                self.data.train_batches * cfg.data.batch_size
            estimate = sum(sb.cache_estimate(samples, cfg.data.max_length, cfg.data.feature_cache_dtype)
                           for sb in self.shared)
            log.info("tapped-state cache %s: up to %.1f MiB on disk for %d samples of up to %d positions "
                     "(%s); written once, then read instead of the frozen forward", cfg.data.feature_cache,
                     estimate / 2 ** 20, samples, cfg.data.max_length, cfg.data.feature_cache_dtype)
        self.steps_per_epoch = max(1, self.data.train_batches // cfg.train.grad_accum)
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * self.steps_per_epoch))
        if ds_config is not None:
            from unipt_scale.deepspeed_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(model, cfg, ds_config, self.total_steps, self.dist)
            if self.engine.zero_stage == 3:
                self.engine.write_partition_report(cfg.output_dir)
        else:
            self.engine = LocalEngine(model, cfg.train, self.total_steps, self.dist.device)
        self.model = self.engine.model
        self.counts = self.engine.parameter_counts()
        self.manager.barrier = self.engine.barrier
        self._pending_rng = None
        if cfg.train.resume:
            self._resume(cfg.train.resume, *self._resume_from)
        if self.dist.is_main:
            log.info("trainable %s / frozen %s parameters; %d steps (%d per epoch), world size %d",
                     f"{self.counts['trainable_params']:,}", f"{self.counts['frozen_params']:,}", self.total_steps,
                     self.steps_per_epoch, self.dist.world_size)
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tb"))

    # ------------------------------------------------------------------------------------ checkpoints

    def _rank_files(self) -> tuple:
        return f"rank{self.dist.rank}.json", f"rank{self.dist.rank}.safetensors"

    def _write_checkpoint(self, directory: str) -> None:
        meta, tensors = capture_rng()
        js, st = self._rank_files()
        save_tensors_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, st))
        atomic_write_json(os.path.join(directory, js), {"state": self.state.to_json(), "rng": meta})
        self.engine.save_state(directory)

    def save_checkpoint(self) -> str:
        """A resumable checkpoint at the current step (collective). Refuses to write non-finite state."""
        self._check_finite(weights=True)
        # A loader still positioned in an epoch the state has moved past (the run ended with it) has nothing left.
        same_epoch = int(getattr(self.data.train, "epoch", self.state.epoch)) == self.state.epoch
        self.state.data_position = self.data.train.state_dict() if same_epoch else {}
        self.state.window_sum, self.state.window_count = (float(x) for x in self._window.tolist())
        path = self.manager.save(self.state.step, self._write_checkpoint)
        self.last_checkpoint = path
        if self.dist.is_main:
            log.info("checkpoint %s", path)
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)
        return path

    def _find_resume(self, spec: str):
        """(checkpoint or None, notes), found on rank 0; a refusal reaches every rank (none waits forever)."""
        result, error = (None, []), None
        if self.dist.is_main:
            try:
                result = self.manager.find(spec)
            except CheckpointError as err:
                error = str(err)
        result, error = broadcast_object((result, error))
        if error:
            raise CheckpointError(error)
        return result

    def _resume(self, spec: str, found: Optional[str], notes: List[str]) -> None:
        for note in notes:
            if self.dist.is_main:
                log.warning("resume: %s", note)
        if found is None:
            if self.dist.is_main:
                log.info("train.resume=%s: no checkpoint under %s yet, starting fresh", spec, self.manager.root)
            return
        js, st = self._rank_files()
        import json

        with open(os.path.join(found, js), encoding="utf-8") as fh:
            saved = json.load(fh)
        try:
            self.state = TrainState.from_json(saved["state"])
            self._pending_rng = (saved["rng"], load_file(os.path.join(found, st)))
            if "rng.torch" not in self._pending_rng[1] or "python" not in self._pending_rng[0]:
                raise KeyError("rng")
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{os.path.join(found, js)} (with {st}) lacks the trainer state ({err}): not a "
                                  "checkpoint this version wrote; resume from another one or set train.resume=''") \
                from None
        self.engine.load_state(found)
        self.last_checkpoint = found
        self.resumed_from_step = self.state.step
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d)", found, self.state.step, self.state.epoch)

    # ---------------------------------------------------------------------------------------- non-finite

    def _check_finite(self, weights: bool = False) -> None:
        """One host sync: the device-side flag of the first non-finite micro batch (and, for a checkpoint or
        export, the trained weights and optimizer state)."""
        bad = self.engine.all_reduce_sum((self._bad_step >= 0).to(torch.float64).reshape(1))
        first = int(self._bad_step.item()) if bool(bad.item()) else -1
        finite = not bool(bad.item()) and (not weights or self.engine.trained_finite())
        if finite:
            return
        where = f"at step {first}" if first >= 0 else f"by step {self.state.step}"
        last = self.last_checkpoint or "none (set train.checkpoint_every=N to keep some)"
        raise NonFiniteError(f"non-finite loss or weights {where}; stopped without writing them. Last good "
                             f"checkpoint: {last}. Lower train.lr, check the data, or set train.on_nonfinite=skip")

    # ---------------------------------------------------------------------------------------------- loop

    def _log_loss(self) -> None:
        self._check_finite()
        window = self.engine.all_reduce_sum(self._window.clone())
        total, count = window.tolist()
        mean = total / count if count else None
        self.state.train_loss.append([self.state.step, finite_or_none(mean)])
        self._window.zero_()
        if mean is not None:
            self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{self.engine.lr():.2e}")
            if self.tb:
                self.tb.add_scalar("train/loss", mean, self.state.step)
                self.tb.add_scalar("train/lr", self.engine.lr(), self.state.step)

    def _record_val(self, val: Optional[Dict], **extra) -> None:
        if val:
            self.state.val_history.append({"step": self.state.step, **extra, **val})
            if self.tb:
                for k, v in val.items():
                    self.tb.add_scalar(f"val/{k}", v, self.state.step)

    @contextlib.contextmanager
    def _own_rng(self):
        """A sweep variant's RNG streams (dropout, checkpointed state) in place while it runs, so it draws exactly
        what it would draw alone; a run of its own keeps the process's streams."""
        if self._rng is None:
            yield
            return
        restore_rng(*self._rng)
        try:
            yield
        finally:
            self._rng = capture_rng()

    def _train_micro(self, batch) -> bool:
        """Forward + backward of one micro batch; True when it closed an optimizer step that was applied."""
        if self._pending_rng is not None:
            restore_rng(*self._pending_rng)  # the streams continue exactly where the checkpoint left them
            self._pending_rng = None
        batch = to_device(batch, self.engine.device)
        if self.dist.world_size > 1 and hasattr(self.model, "loss_count"):
            # A token-mean loss: every rank divides by the global batch's average tokens per rank, not its own
            # count, so 2 ranks compute what one process computes on the same global batch (one small all-reduce).
            tokens = self.engine.all_reduce_sum(self.model.loss_count(batch).to(torch.float64).reshape(1))
            batch = {**batch, "loss_normalizer": (tokens / self.dist.world_size).clamp(min=1.0).reshape(())}
        with self.engine.autocast():
            loss, _stats = self.model.training_loss(batch)
        self.engine.backward(loss)
        value = loss.detach().to(torch.float64)
        self._step_window += torch.stack([value, torch.ones_like(value)])
        if self.cfg.train.on_nonfinite == "stop":
            first_bad = (self._bad_step < 0) & ~torch.isfinite(value)
            self._bad_step.copy_(torch.where(first_bad, self.state.step + 1, self._bad_step))
        self.state.samples += len(next(iter(v for v in batch.values() if torch.is_tensor(v))))
        apply = True
        if self.cfg.train.on_nonfinite == "skip" and self.engine.at_boundary():
            apply = bool(torch.isfinite(self._step_window[0])) and self.engine.grads_finite()  # one sync per step
        stepped = self.engine.step(apply=apply)
        if stepped:
            if apply:
                self._window += self._step_window
            else:
                self.state.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", self.state.step + 1,
                            self.state.skipped_steps)
                if self.state.skipped_steps > self.cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(f"{self.state.skipped_steps} steps skipped for non-finite values (more "
                                         f"than train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}); "
                                         f"last good checkpoint: {self.last_checkpoint or 'none'}. Lower train.lr "
                                         "or check the data")
            self._step_window.zero_()
        return stepped and apply

    def _pause_timing(self) -> None:
        """Add the training time since the segment opened (evaluation and checkpoints are not training)."""
        since = getattr(self, "_timing_since", None)
        if since is not None:
            self.state.train_time_s += time.time() - since
            self._timing_since = None

    def _epoch_consumed(self) -> bool:
        """Every batch of this epoch went through the model (False where the loader cannot tell its length)."""
        try:
            return self.state.epoch_batches >= len(self.data.train)
        except TypeError:
            return False

    def fit(self) -> None:
        fit_together([self], self.shared)

    def finish(self) -> Dict:
        """Final evaluation, then metrics.json and checkpoint/ committed as a pair (rank 0)."""
        return finish_together([self], self.shared)[0]

    def _open_fit(self) -> None:
        st, device = self.state, self.engine.device
        self._window = torch.tensor([st.window_sum, float(st.window_count)], dtype=torch.float64, device=device)
        self._step_window = torch.zeros(2, dtype=torch.float64, device=device)
        self._bad_step = torch.tensor(-1, dtype=torch.int64, device=device)
        self.model.train()
        self.bar = tqdm(total=self.total_steps, initial=st.step, desc="train",
                        disable=not (self.dist.is_main and self.progress))

    def _stepped(self) -> None:
        """After an applied optimizer step: count it, log the loss when due."""
        st, cfg = self.state, self.cfg
        st.step += 1
        self.bar.update(1)
        if st.step % cfg.train.log_every == 0 or st.step == self.total_steps:
            self._log_loss()

    def _after_validation(self) -> None:
        every = self.cfg.train.checkpoint_every
        if every and self.state.step % every == 0:
            self._pause_timing()
            self.save_checkpoint()
            self._timing_since = time.time()
        for cb in self.callbacks:
            cb.on_step_end(self)

    def _close_fit(self) -> None:
        self.bar.close()
        every, st = self.cfg.train.checkpoint_every, self.state
        if every and (self.last_checkpoint is None or not self.last_checkpoint.endswith(f"{st.step:08d}")):
            self.save_checkpoint()  # a resumed finished run goes straight to evaluation and export
        self._check_finite(weights=True)

    def _commit(self, val: Optional[Dict], test: Optional[Dict]) -> Dict:
        cfg, st = self.cfg, self.state
        if self.tb:
            for k, v in (test or {}).items():
                self.tb.add_scalar(f"test/{k}", v, st.step)
        state = self.engine.trained_state_dict() if cfg.train.save else None  # collective under ZeRO-3
        metrics = self._metrics(val, test, status="completed")
        if self.dist.is_main:
            meta = {"num_classes": getattr(self.model, "num_classes", 0), "label_names": self.data.label_names,
                    "step": st.step}
            commit_outputs(cfg.output_dir, metrics, state, cfg, meta)
        self.engine.barrier()
        return metrics

    def _metrics(self, val, test, status: str, reason: str = "") -> Dict:
        st, ws = self.state, self.dist.world_size
        self._pause_timing()  # a run stopped inside the loop: its open segment counts
        train_time = st.train_time_s
        stats = dict(self.data.stats)
        if self.data.skip_counts is not None:
            stats.update(self.data.skip_counts())
        metrics = {
            "status": status,
            "config": self.cfg.to_dict(),
            "train_loss": st.train_loss,
            "val": val,
            "val_history": st.val_history,
            "test": test,
            **self.counts,
            "steps": st.step,
            "epochs_run": st.epoch,
            "skipped_steps": st.skipped_steps,
            "samples_seen": st.samples * ws,
            "train_time_s": train_time,  # the loop's own time: evaluation and checkpoints excluded
            "train_samples_per_second": st.samples * ws / train_time if train_time > 0 else None,
            "wall_time_s": time.time() - self.start_time,
            "world_size": ws,
            "zero_stage": self.engine.zero_stage,
            "resumable_checkpoint": self.last_checkpoint,
            "resumed_from_step": self.resumed_from_step,
            "data": stats,
        }
        caches = [sb.cache for sb in self.shared if sb.cache is not None]
        if caches:
            metrics["feature_cache"] = {"dirs": [c.dir for c in caches], "dtype": self.cfg.data.feature_cache_dtype,
                                        "hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
                                        "samples": sum(len(c) for c in caches)}
        if reason:
            metrics["reason"] = reason
        return _strict(metrics)

    def write_stopped(self, reason: str) -> None:
        """A stopped run's metrics (strict JSON). They never replace a finished run's pair: when the directory
        already holds one, they go to metrics.stopped.json beside it."""
        if not self.dist.is_main or self.engine is None:
            return
        metrics = self._metrics(None, None, status="stopped", reason=reason)
        out = self.cfg.output_dir
        has_pair = os.path.isdir(os.path.join(out, CHECKPOINT))
        atomic_write_json(os.path.join(out, "metrics.stopped.json" if has_pair else METRICS), metrics)

    def close(self, failed: bool = False, keep_process_group: bool = False) -> None:
        """Tear down in a fixed order: writers, the engine, then the process group (unless other trainers of this
        process still hold engines on it). A run that failed before it wrote anything of value leaves no output
        directory it created behind."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
            self.tb = None
        for sb in self.shared:
            sb.close()  # the feature cache's last shard
        if self.engine is not None:
            self.engine.close()
        if self.cfg.deepspeed.enabled and self.dist is not None and not keep_process_group:
            shutdown_process_group()
        out = self.cfg.output_dir
        valuable = (METRICS, CHECKPOINT, "checkpoints", "metrics.stopped.json")
        if failed and self._created_output and os.path.isdir(out) and not any(
                os.path.exists(os.path.join(out, n)) for n in valuable):
            shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- the loop, for one or many

@contextlib.contextmanager
def _isolated(trainer: Trainer, live: List[Trainer], isolate: bool):
    """In a sweep, a variant that goes non-finite stops alone: its stopped metrics are written and the others go
    on. A run of its own raises."""
    try:
        yield
    except NonFiniteError as err:
        if not isolate:
            raise
        trainer.failure = str(err)
        trainer.write_stopped(str(err))
        live.remove(trainer)
        log.warning("%s: stopped (%s); the other variants go on", trainer.cfg.output_dir, err)


def _each(live: List[Trainer], isolate: bool, call) -> list:
    """`call(trainer)` for every live trainer, each under its own RNG streams; in a sweep a trainer that goes
    non-finite leaves `live` (see _isolated). Returns what the calls that completed returned."""
    out = []
    for t in list(live):
        with _isolated(t, live, isolate), t._own_rng():
            out.append(call(t))
    return out


def _validate_together(live: List[Trainer], shared: Sequence, **extra) -> None:
    if not live:
        return
    lead = live[0]
    for t in live:
        t._pause_timing()
    results = evaluate_many([t.model for t in live], lead.data.val, lead.engine, "val", shared=shared)
    for t, val in zip(live, results):
        t._record_val(val, **extra)


def fit_together(trainers: Sequence[Trainer], shared: Sequence = (), isolate: bool = False) -> None:
    """The training loop. One trainer: a run of its own. Several (a sweep): set up on one DataBundle and views of
    `shared` backbones, in lockstep (same data, steps, evaluation and checkpoint points); each batch's frozen
    forward runs once and every trainer steps its own model, optimizer, RNG streams and checkpoints on it."""
    from unipt_scale.shared_forward import shared_batch

    live = list(trainers)
    for t in live:
        t._open_fit()
    lead = live[0]
    cfg = lead.cfg
    # train.epochs counts passes: a pass over damaged shards ends early, and is not topped up by another.
    max_epochs = math.ceil(cfg.train.epochs) if not cfg.train.max_steps else None

    def going() -> bool:
        st = live[0].state
        return st.step < live[0].total_steps and (max_epochs is None or st.epoch < max_epochs)

    while live and going():
        lead, st = live[0], live[0].state
        for t in live:
            t._timing_since = time.time()
        # Every train loader of build_data seeks: the consumed part of the epoch is not read again.
        lead.data.train.set_epoch(st.epoch)
        if st.data_position:
            lead.data.train.load_state_dict(st.data_position)
        else:
            for t in live:
                t.state.epoch_batches = 0
        fed = bool(st.data_position)
        finished = True
        for batch in lead.data.train:
            fed = True
            batch = to_device(batch, lead.engine.device)
            for t in live:
                t.state.epoch_batches += 1
            with shared_batch(shared):
                applied = _each(live, isolate, lambda t: t._train_micro(batch))
            if not live:
                break
            if not any(applied):
                continue
            _each(live, isolate, Trainer._stepped)
            if not live:
                break
            lead, st = live[0], live[0].state
            if cfg.train.eval_every and st.step % cfg.train.eval_every == 0 and st.step < lead.total_steps:
                _validate_together(live, shared)
                for t in live:
                    t._timing_since = time.time()
            _each(live, isolate, Trainer._after_validation)
            if not live:
                break
            lead, st = live[0], live[0].state
            if st.step >= lead.total_steps:
                finished = lead._epoch_consumed()  # the step budget may end exactly with the epoch
                break
        for t in live:
            t._pause_timing()
        if not live:
            break
        lead, st = live[0], live[0].state
        if not fed:
            raise RuntimeError("the training loader yielded no batch this epoch; check the data source and "
                               "data.batch_size (batches drop their remainder)")
        if finished:  # the epoch ran out: on to the next one
            for t in live:
                t.state.epoch += 1
                t.state.epoch_batches = 0
                t.state.data_position = {}
            if lead.dist.world_size > 1:  # the next epoch's shard of the data holds other ranks' cached samples
                for sb in shared:
                    sb.sync_cache(lead.engine.barrier)
            if going() and not cfg.train.eval_every:
                _validate_together(live, shared, epoch=st.epoch)
    _each(live, isolate, Trainer._close_fit)
    for t in trainers:
        if getattr(t, "bar", None) is not None:
            t.bar.close()


def finish_together(trainers: Sequence[Trainer], shared: Sequence = ()) -> List[Dict]:
    """Final evaluation (one pass over val and test for every trainer still live), then each one's metrics.json and
    checkpoint/ committed as a pair (rank 0)."""
    live = [t for t in trainers if t.failure is None]
    if not live:
        return []
    lead = live[0]
    _validate_together(live, shared)
    tests = evaluate_many([t.model for t in live], lead.data.test, lead.engine, "test", shared=shared)
    out = []
    for t, test in zip(live, tests):
        st = t.state
        val = st.val_history[-1] if st.val_history and st.val_history[-1]["step"] == st.step else None
        val = {k: v for k, v in val.items() if k != "step"} if val else None
        out.append(t._commit(val, test))
    return out


def train_together(cfgs: Sequence[RunConfig], shared: Dict, trust_remote_code: bool = False,
                   on_finished=None, keep_process_group: bool = False) -> tuple:
    """Runs that differ only in what is trained, on one DataBundle (built from the first config) and views of the
    `shared` backbones (SharedBackbone by config field): set up, fit in lockstep on one frozen forward per batch,
    finish, close. A run that goes non-finite stops alone. Returns (trainers, {id(trainer): metrics} of the
    completed ones); `on_finished(trainers)` runs after the final evaluation, before they close. Under DeepSpeed
    each run has an engine of its own on one process group, which the last one to close ends (unless
    `keep_process_group`: more runs follow on it)."""
    lead = cfgs[0]
    seed_everything(lead.train.seed)
    from unipt_scale.ds_config import trained_config

    # under DeepSpeed every rank reads its own shard of each batch, as `unipt train` would
    dist = init_process_group() if lead.deepspeed.enabled else single_process()
    data = build_run_data(trained_config(lead, dist.world_size), dist, trust_remote_code)
    trainers: List[Trainer] = []
    failed = True
    try:
        for cfg in cfgs:
            t = Trainer(cfg, trust_remote_code=trust_remote_code)
            t.progress = not trainers
            trainers.append(t)
            t.setup(data=data, backbones={name: sb.view() for name, sb in shared.items()})
            t._rng = capture_rng()  # its streams from here on, as if it ran alone
        fit_together(trainers, list(shared.values()), isolate=True)
        live = [t for t in trainers if t.failure is None]
        finished = {id(t): m for t, m in zip(live, finish_together(trainers, list(shared.values())))}
        if on_finished is not None:
            on_finished(trainers)
        failed = False
    finally:
        for n, t in enumerate(trainers):  # the last one ends the process group its engines share
            t.close(failed, keep_process_group=keep_process_group or n < len(trainers) - 1)
    return trainers, finished


def outcome(trainer: Trainer, metrics: Optional[Dict]) -> Dict:
    """A grouped run's line in sweep.json / tasks.json: its status, and its metrics or why it stopped."""
    if metrics is None:
        return {"status": "stopped", "reason": trainer.failure}
    return {"status": "completed", "val": metrics.get("val"), "test": metrics.get("test"),
            "steps": metrics.get("steps"), "trainable_params": metrics.get("trainable_params")}


def check_output_dir(path: str) -> None:
    """The output directory is a directory (or can be created) and writable: checked before any heavy work."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output_dir={path!r} is a file; pass a directory (it is created when missing)")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"output_dir={path!r} cannot be created: {probe!r} is a file; pass another directory")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".unipt-write-check-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise ConfigError(f"output_dir={path!r} is not writable ({err.strerror} in {probe}); pass a directory you can "
                          "write to") from None


def check_backbones(cfg: RunConfig, trust_remote_code: bool) -> None:
    """Backbone shapes from config.json alone (and, for UniPT, the side network against them) before any weights
    load."""
    from unipt_scale.backbone import inspect_backbone, validate_side_network
    from unipt_scale.tasks import BACKBONE_FIELDS

    for name in BACKBONE_FIELDS:
        backbone = getattr(cfg, name)
        if backbone is not None:
            spec = inspect_backbone(backbone, trust_remote_code)
            if spec.kind == "vision_language":
                check_vision_language(cfg, name, spec.model_type)
            elif name == "backbone" and cfg.task.kind in TWO_TOWER_TASKS and cfg.image_backbone is None:
                raise ConfigError(missing_image_tower(cfg.task.kind))
            if cfg.method == "unipt":
                validate_side_network(spec, cfg.unipt_for(name))


def check_vision_language(cfg: RunConfig, field_name: str, model_type: str) -> None:
    """A vision-language backbone (ViLT) is the whole model of a vqa run: question and image in one forward."""
    where = f"{field_name}.path={getattr(cfg, field_name).path!r} is a vision-language model ({model_type})"
    if field_name != "backbone" or cfg.task.kind != "vqa" or cfg.image_backbone is not None:
        raise ConfigError(f"{where}, which reads question and image together: use it as backbone.path with "
                          "task.kind=vqa and no image_backbone")
    if cfg.data.feature_cache:
        raise ConfigError(f"{where}: data.feature_cache keys a sample by one input, and this backbone reads two "
                          "(tokens and pixels); set data.feature_cache=''")


def reads_images(bb_cfg, trust_remote_code: bool = False) -> bool:
    """Whether a text backbone also reads the images (a vision-language model): config.json alone."""
    from unipt_scale.backbone import inspect_backbone

    return inspect_backbone(bb_cfg, trust_remote_code).kind == "vision_language"


def _strict(obj):
    """Non-finite floats become None, so metrics.json is strict JSON."""
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def train(cfg: RunConfig, callbacks: Sequence[Callback] = (), trust_remote_code: bool = False) -> Dict:
    """Train per `cfg`; writes OUTPUT_DIR/metrics.json and checkpoint/ (and checkpoints/, tb/); returns metrics."""
    trainer = Trainer(cfg, callbacks, trust_remote_code)
    failed = True
    try:
        trainer.setup()
        trainer.fit()
        metrics = trainer.finish()
        failed = False
        return metrics
    except NonFiniteError as err:
        trainer.write_stopped(str(err))
        raise
    finally:
        trainer.close(failed)
