"""`unipt bench headlines`: headline generation from BBC news articles on a frozen decoder — the frozen model
zero-shot, UniPT and LoRA with the same data and budget — scored with ROUGE-L and exact match on the test split.

Every system runs in its own subprocess, so each peak resident memory (VmHWM) is its own; step time comes from
the trainer's metrics. Usage:

    unipt bench headlines --json headlines.json [--backbone builtin:smollm2-135m] [--methods zero_shot,unipt,lora]
        [--max-steps 150] [--train-limit 600] [--test-limit 100] [--batch-size 4] [--max-length 192]
        [--max-new-tokens 24] [--out-dir DIR] [KEY=VALUE ...]

KEY=VALUE pairs go to every run's config (e.g. unipt.layers=every:3). The data split is the project's one rule
(data.seed); articles are cut to their first ~1,200 characters.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List

from unipt_scale.atomic import atomic_write_json
from unipt_scale.bench.generation import generate_scored, rouge_l  # noqa: F401 - rouge_l stays importable here

SYSTEMS = ("zero_shot", "unipt", "lora")


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _config(args, system: str, out_dir: str) -> List[str]:
    method = "unipt" if system == "zero_shot" else system
    return [f"backbone.path={args.backbone}", "task.kind=causal_lm", "data.source=bbc_headlines",
            f"method={method}", f"data.max_length={args.max_length}", f"data.batch_size={args.batch_size}",
            f"data.limit_train={args.train_limit}", f"data.limit_eval={args.test_limit}", "data.eval_batch_size=8",
            f"train.max_steps={max(1, args.max_steps)}", "train.log_every=10", "train.tensorboard=false",
            f"output_dir={out_dir}", *args.overrides]


def run_one(args) -> dict:
    """One system in this process: train (not for zero_shot), then generate on the test split."""
    import torch

    from unipt_scale.config import load_config
    from unipt_scale.data.lm import lm_splits
    from unipt_scale.model import build_model
    from unipt_scale.preprocessors import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, _config(args, args.run_one, args.out))
    result: dict = {"system": args.run_one}
    t0 = time.time()
    if args.run_one == "zero_shot":
        model = build_model(cfg).eval()  # a fresh UniPT adds exactly zero: the frozen model itself
        result["train"] = None
    else:
        from unipt_scale.export import load_trained
        from unipt_scale.trainer import train

        metrics = train(cfg)
        steps = metrics["steps"]
        result["train"] = {"steps": steps, "trainable_params": metrics["trainable_params"],
                           "step_time_s": metrics["samples_seen"] / max(metrics["train_samples_per_second"], 1e-9)
                           / max(steps, 1), "final_train_loss": metrics["train_loss"][-1][1],
                           "test_loss": (metrics.get("test") or {}).get("loss")}
        model = load_trained(os.path.join(args.out, "checkpoint"))[0]
    tokenizer = load_tokenizer(cfg.backbone)
    test = lm_splits(cfg.data)["test"]
    gen = generate_scored(model, tokenizer, test, args.max_new_tokens, cfg.data.max_length)
    predictions = gen["predictions"]
    result["generate_s_per_article"] = gen["generate_s"] / max(1, len(test))
    result["scores"] = gen["scores"]
    result["examples"] = [{"headline": r["response"], "generated": p} for r, p in zip(test[:8], predictions[:8])]
    result["peak_rss_bytes"] = peak_rss_bytes()
    result["wall_s"] = time.time() - t0
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="unipt bench headlines", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--backbone", default="builtin:smollm2-135m")
    p.add_argument("--methods", default=",".join(SYSTEMS))
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--train-limit", type=int, default=600)
    p.add_argument("--test-limit", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-dir", default="")
    p.add_argument("--run-one", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.run_one:
        atomic_write_json(args.json, run_one(args))
        return 0
    systems = [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        print(f"unipt bench headlines: --methods takes {', '.join(SYSTEMS)}; got {args.methods!r}", file=sys.stderr)
        return 2
    root = args.out_dir or tempfile.mkdtemp(prefix="unipt-headlines-")
    results = {}
    for system in systems:
        out = os.path.join(root, system)
        part = os.path.join(root, f"{system}.json")
        cmd = [sys.executable, "-m", "unipt_scale.bench.headlines", "--json", part, "--run-one", system, "--out", out,
               "--backbone", args.backbone, "--max-steps", str(args.max_steps), "--train-limit", str(args.train_limit),
               "--test-limit", str(args.test_limit), "--batch-size", str(args.batch_size), "--max-length",
               str(args.max_length), "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
               *args.overrides]
        proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            print(f"unipt bench headlines: the {system} run failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        with open(part, encoding="utf-8") as fh:
            results[system] = json.load(fh)
        r = results[system]
        step = (r["train"] or {}).get("step_time_s")
        print(f"{system:10s} ROUGE-L {r['scores']['rougeL']:.4f}  exact {r['scores']['exact_match']:.3f}  "
              f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB  step {step if step is None else round(step, 3)} s")
    report = {"backbone": args.backbone, "max_steps": args.max_steps, "train_limit": args.train_limit,
              "test_limit": args.test_limit, "batch_size": args.batch_size, "max_length": args.max_length,
              "overrides": args.overrides, "results": results}
    if "unipt" in results and "lora" in results:
        u, lo = results["unipt"], results["lora"]
        report["ratios"] = {"peak_rss_unipt_over_lora": u["peak_rss_bytes"] / max(1, lo["peak_rss_bytes"]),
                            "step_time_unipt_over_lora": u["train"]["step_time_s"] / max(lo["train"]["step_time_s"],
                                                                                         1e-9)}
    atomic_write_json(args.json, report)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
