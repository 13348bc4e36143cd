"""`unipt bench headlines`: headline generation from BBC news articles on a frozen decoder — the frozen model
zero-shot, UniPT and LoRA with the same data and budget — scored with ROUGE-L and exact match on the test split.

Every system runs in its own subprocess, so each peak resident memory (VmHWM) is its own; step time comes from
the trainer's metrics. Usage:

    unipt bench headlines --json headlines.json [--backbone builtin:smollm2-135m] [--methods zero_shot,unipt,lora]
        [--max-steps 150] [--train-limit 600] [--test-limit 100] [--batch-size 4] [--max-length 192]
        [--max-new-tokens 24] [--quantization none,nf4] [--out-dir DIR] [KEY=VALUE ...]

KEY=VALUE pairs go to every run's config (e.g. unipt.layers=every:3). The data split is the project's one rule
(data.seed); articles are cut to their first ~1,200 characters.

`--quantization` (a comma list of none, int8, nf4; default none): every system runs again on the decoder loaded
quantized (`backbone.quantization=`, bitsandbytes): the frozen quantized model zero-shot, UniPT on it, and LoRA on
it, which is QLoRA (peft's k-bit preparation). Each row also records its `scheme` and `frozen_weight_bytes`, the
resident bytes of the weights that do not train, counted from their storages (quantization.frozen_weight_bytes,
as `unipt info` reports them). `results` (and `ratios`) are the first scheme's, as before there were schemes;
`schemes` holds every scheme's results and `rows` one line per (system, scheme), with a quantized row's ROUGE-L
difference from and peak-RSS / step-time / weight-bytes ratios to the same system at none.
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
from unipt_scale.bench.schemes import SCHEMES, label, parse_schemes

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
            f"output_dir={out_dir}", *([f"backbone.quantization={args.quantization}"]
                                       if getattr(args, "quantization", "none") != "none" else []),
            *args.overrides]


def run_one(args) -> dict:
    """One system in this process: train (not for zero_shot), then generate on the test split."""
    import torch

    from unipt_scale.config import load_config
    from unipt_scale.data.lm import lm_splits
    from unipt_scale.tasks import build_model
    from unipt_scale.preprocessors import load_tokenizer
    from unipt_scale.quantization import frozen_weight_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(None, _config(args, args.run_one, args.out))
    result: dict = {"system": args.run_one, "scheme": args.quantization}
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
    # built as the method builds it (its own parameters trainable), before a forward repacks any 4-bit weight
    result["frozen_weight_bytes"] = frozen_weight_bytes(model)
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


def _ratios(results: dict) -> dict:
    if "unipt" not in results or "lora" not in results:
        return {}
    u, lo = results["unipt"], results["lora"]
    return {"peak_rss_unipt_over_lora": u["peak_rss_bytes"] / max(1, lo["peak_rss_bytes"]),
            "step_time_unipt_over_lora": u["train"]["step_time_s"] / max(lo["train"]["step_time_s"], 1e-9)}


def rows(schemes: dict) -> list:
    """One row per (system, scheme); a quantized row against the same system at none (None without it)."""
    base = schemes.get("none", {})
    out = []
    for scheme, results in schemes.items():
        for system, r in results.items():
            step = (r["train"] or {}).get("step_time_s")
            row = {"system": system, "scheme": scheme, "label": label(system, scheme),
                   "rougeL": r["scores"]["rougeL"], "exact_match": r["scores"]["exact_match"],
                   "peak_rss_bytes": r["peak_rss_bytes"], "step_time_s": step,
                   "frozen_weight_bytes": r.get("frozen_weight_bytes"), "vs_none": None}
            b = base.get(system)
            if scheme != "none" and b is not None:
                b_step = (b["train"] or {}).get("step_time_s")
                row["vs_none"] = {
                    "rougeL_delta": r["scores"]["rougeL"] - b["scores"]["rougeL"],
                    "peak_rss_ratio": r["peak_rss_bytes"] / b["peak_rss_bytes"] if b["peak_rss_bytes"] else None,
                    "step_time_ratio": step / b_step if step and b_step else None,
                    "frozen_weight_bytes_ratio": (r["frozen_weight_bytes"] / b["frozen_weight_bytes"]
                                                  if b.get("frozen_weight_bytes") else None)}
            out.append(row)
    return out


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
    p.add_argument("--quantization", default="none",
                   help=f"comma list of {', '.join(SCHEMES)}: every system again on the decoder quantized that way "
                        "(LoRA on it is QLoRA)")
    p.add_argument("--out-dir", default="")
    p.add_argument("--run-one", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.run_one:
        if args.quantization not in SCHEMES:
            print(f"unipt bench headlines: one run takes one scheme of {', '.join(SCHEMES)}", file=sys.stderr)
            return 2
        atomic_write_json(args.json, run_one(args))
        return 0
    systems = [s.strip() for s in args.methods.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        print(f"unipt bench headlines: --methods takes {', '.join(SYSTEMS)}; got {args.methods!r}", file=sys.stderr)
        return 2
    try:
        schemes = parse_schemes(args.quantization)
    except ValueError as err:
        print(f"unipt bench headlines: {err}", file=sys.stderr)
        return 2
    root = args.out_dir or tempfile.mkdtemp(prefix="unipt-headlines-")
    by_scheme: dict = {}
    for scheme in schemes:
        results = by_scheme.setdefault(scheme, {})
        for system in systems:
            name = system if scheme == "none" else f"{system}-{scheme}"
            out = os.path.join(root, name)
            part = os.path.join(root, f"{name}.json")
            cmd = [sys.executable, "-m", "unipt_scale.bench.headlines", "--json", part, "--run-one", system, "--out",
                   out, "--backbone", args.backbone, "--max-steps", str(args.max_steps), "--train-limit",
                   str(args.train_limit), "--test-limit", str(args.test_limit), "--batch-size", str(args.batch_size),
                   "--max-length", str(args.max_length), "--max-new-tokens", str(args.max_new_tokens), "--threads",
                   str(args.threads), "--quantization", scheme, *args.overrides]
            proc = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode != 0:
                print(f"unipt bench headlines: the {label(system, scheme)} run failed (exit {proc.returncode})",
                      file=sys.stderr)
                return proc.returncode
            with open(part, encoding="utf-8") as fh:
                results[system] = json.load(fh)
            r = results[system]
            step = (r["train"] or {}).get("step_time_s")
            print(f"{label(system, scheme):15s} ROUGE-L {r['scores']['rougeL']:.4f}  exact "
                  f"{r['scores']['exact_match']:.3f}  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB  step "
                  f"{step if step is None else round(step, 3)} s  frozen weights "
                  f"{r['frozen_weight_bytes'] / 2**20:.1f} MiB")
    first = by_scheme[schemes[0]]
    report = {"backbone": args.backbone, "max_steps": args.max_steps, "train_limit": args.train_limit,
              "test_limit": args.test_limit, "batch_size": args.batch_size, "max_length": args.max_length,
              "overrides": args.overrides, "quantization": schemes, "results": first,
              "schemes": by_scheme, "rows": rows(by_scheme)}
    if _ratios(first):
        report["ratios"] = _ratios(first)
    if len(schemes) > 1:
        report["ratios_by_scheme"] = {q: _ratios(res) or None for q, res in by_scheme.items()}
        for row in report["rows"]:
            if row["vs_none"]:
                v = {k: ("-" if x is None else format(x, "+.4f" if k == "rougeL_delta" else ".3f"))
                     for k, x in row["vs_none"].items()}
                print(f"# {row['label']:15s} vs {row['system']}: ROUGE-L {v['rougeL_delta']}, peak RSS "
                      f"x{v['peak_rss_ratio']}, step x{v['step_time_ratio']}, frozen weights "
                      f"x{v['frozen_weight_bytes_ratio']}")
    atomic_write_json(args.json, report)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
