"""Data for the trainer: every source ends as iterables of batches that follow one contract.

A batch is a dict: `input_ids`/`attention_mask` (B, N) for text, `pixel_values` (B, C, H, W) for images,
`labels` (B,) when samples have a class.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from unipt_scale.config import DataConfig
from unipt_scale.data.sources import load_csv, split_records
from unipt_scale.data.stream import tokenize_batch


@dataclass
class DataBundle:
    train: Iterable
    val: Optional[Iterable]
    test: Optional[Iterable]
    num_classes: int
    label_names: List[str]
    train_batches: int  # per epoch, per process
    stats: Dict[str, int] = field(default_factory=dict)  # e.g. skipped-sample counters, for metrics.json
    skip_counts: Optional[Callable[[], Dict[str, int]]] = None


class RecordDataset(Dataset):
    def __init__(self, records: List[dict]):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def text_collate(tokenizer, max_length: int):
    if tokenizer is None:
        raise ValueError("text data needs a backbone with a tokenizer")

    def collate(rows: List[dict]) -> Dict[str, torch.Tensor]:
        batch = tokenize_batch(tokenizer, [r["text"] for r in rows], max_length)
        if rows and rows[0].get("label") is not None:
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return batch

    return collate


def _limit(records, n, seed):
    """A seeded random subset: files are often sorted by label, so a prefix would be one class."""
    if not n or n <= 0 or n >= len(records):
        return records
    rows = list(records)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def load_records(cfg: DataConfig):
    if cfg.source == "csv":
        return load_csv(cfg.path, cfg.text_column, cfg.label_column)
    raise ValueError(f"data.source={cfg.source!r} is not a record source (only csv is read into memory)")


def build_data(cfg: DataConfig, tokenizer=None, rank: int = 0, world_size: int = 1, needs_image: bool = False,
               needs_labels: bool = True) -> DataBundle:
    """Loaders for train/val/test: shards (written on first use for the packaged sources) or a CSV in memory."""
    if cfg.source != "csv":
        from unipt_scale.data.pipeline import build_stream_data

        return build_stream_data(cfg, tokenizer, rank=rank, world_size=world_size, needs_image=needs_image,
                                 needs_labels=needs_labels)
    records, names = load_records(cfg)
    splits = split_records(records, cfg.split, cfg.seed)
    train = _limit(splits["train"], cfg.limit_train, cfg.seed)
    val, test = _limit(splits["val"], cfg.limit_eval, cfg.seed), _limit(splits["test"], cfg.limit_eval, cfg.seed)
    if not train:
        raise ValueError("the training split is empty; check data.split and data.limit_train")
    collate = text_collate(tokenizer, cfg.max_length)
    # The order is a function of (seed, epoch) alone: the same global batches for any world size, and a resumed
    # run can skip to its position. Each rank takes every world_size-th sample of that order.
    sampler = DistributedSampler(RecordDataset(train), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    train_loader = DataLoader(RecordDataset(train), batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=cfg.num_workers, drop_last=True)

    def eval_loader(rows):
        if not rows:
            return None
        return DataLoader(RecordDataset(rows), batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=cfg.num_workers)

    return DataBundle(train_loader, eval_loader(val), eval_loader(test), len(names), names, len(train_loader),
                      stats={"train_samples": len(train), "val_samples": len(val), "test_samples": len(test)})


def num_classes_of(cfg: DataConfig) -> int:
    if cfg.source == "csv":
        return len(load_records(cfg)[1])
    from unipt_scale.data.pipeline import stream_num_classes

    return stream_num_classes(cfg)
