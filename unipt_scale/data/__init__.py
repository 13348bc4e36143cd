"""Data for the trainer: every source ends as iterables of batches that follow one contract.

A batch is a dict: `input_ids`/`attention_mask` (B, N) for text, `pixel_values` (B, C, H, W) for images,
`frames` (B, T, C, H, W) for clips, `labels` (B,) when samples have a class, and the task's numbers from KEY.json
(`box` (B, 4), `answer_ids` (B, A) padded with -1, ...).

Every train loader `build_data` returns (RecordLoader for a CSV in memory, StreamLoader for shards,
LimitedLoader around either) has `set_epoch(e)`, `len()` (batches per epoch for this rank), `state_dict()`
(JSON-serialisable position after the batches delivered so far this epoch, with the counters) and
`load_state_dict(s)` (the next iterator continues right after that position, bit for bit); none of them draws
from torch's global RNG.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from unipt_scale.config import DataConfig
from unipt_scale.data.stream import _seed, padding_tokenizer, tokenize_batch

RECORDS_FORMAT = "unipt_scale.records_position/1"


@dataclass
class DataBundle:
    train: Iterable
    val: Optional[Iterable]
    test: Optional[Iterable]
    num_classes: int
    label_names: List[str]
    train_batches: int  # per epoch, per process
    stats: Dict[str, int] = field(default_factory=dict)  # e.g. skipped-sample counters, for metrics.json
    skip_counts: Optional[Callable[[], Dict[str, Any]]] = None


class RecordDataset(Dataset):
    def __init__(self, records: List[dict]):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def text_collate(tokenizer, max_length: int):
    """Rows {"text", "label"?} -> a batch, tokenised and padded by the tokenizer (a copy pads a tokenizer that
    has no pad token with its eos token)."""
    if tokenizer is None:
        raise ValueError("text data needs a backbone with a tokenizer")
    tok = padding_tokenizer(tokenizer)

    def collate(rows: List[dict]) -> Dict[str, torch.Tensor]:
        batch = tokenize_batch(tok, [r["text"] for r in rows], max_length)
        if rows and rows[0].get("label") is not None:
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        return batch

    return collate


class RecordLoader:
    """Training batches of in-memory records. The order is a function of (seed, epoch) alone (torch's
    DistributedSampler: the same global order for any world size, each rank every world_size-th sample), so a
    resumed epoch starts at its batch by index: the batches before it are never collated."""

    rank_sharded = True

    def __init__(self, records: List[dict], batch_size: int, collate: Callable, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset = RecordDataset(records)
        self.batch_size, self.collate, self.seed = batch_size, collate, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle, self.drop_last = shuffle, drop_last
        self._epoch, self._batches, self._resume = 0, 0, False

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self._epoch:
            self._batches, self._resume = 0, False
        self._epoch = int(epoch)

    def _plan(self) -> List[List[int]]:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last)
        sampler.set_epoch(self._epoch)
        idx = list(sampler)
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        n = len(self.dataset) // self.world_size if self.drop_last else -(-len(self.dataset) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if not self._resume:
            self._batches = 0
        self._resume = False
        todo = self._plan()[self._batches:]
        if not todo:
            return
        gen = torch.Generator()
        gen.manual_seed(_seed("records", self.seed, self._epoch, self.rank))
        dl = DataLoader(self.dataset, batch_sampler=todo, collate_fn=self.collate, num_workers=self.num_workers,
                        generator=gen)
        for batch in dl:
            self._batches += 1
            yield batch

    def _identity(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "records": len(self.dataset),
                "batch_size": self.batch_size, "seed": self.seed}

    def state_dict(self) -> dict:
        return {"format": RECORDS_FORMAT, "epoch": self._epoch, "batches": self._batches, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != RECORDS_FORMAT:
            raise ValueError(f"not a record-loader position (expected format {RECORDS_FORMAT!r})")
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._identity().items() if state.get(k) != v]
        if diff:
            raise ValueError(f"the saved data position does not fit this loader ({', '.join(diff)}); resume with "
                             "the same data config and world size")
        self._epoch, self._batches, self._resume = int(state["epoch"]), int(state["batches"]), True

    def counts(self) -> Dict[str, Any]:
        return {}


def _limit(records, n, seed):
    """A seeded random subset: files are often sorted by label, so a prefix would be one class."""
    if not n or n <= 0 or n >= len(records):
        return records
    rows = list(records)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def load_records(cfg: DataConfig):
    """(records [{"text", "label"}], class names) of data.source=csv, read by the shard writer's CSV reader."""
    if cfg.source != "csv":
        raise ValueError(f"data.source={cfg.source!r} is not a record source (only csv is read into memory)")
    from unipt_scale.data.sources import read_text_table

    return read_text_table(cfg.path, cfg.text_column, cfg.label_column)


def build_data(cfg: DataConfig, tokenizer=None, rank: int = 0, world_size: int = 1, needs_image: bool = False,
               needs_labels: bool = True, image_transform: Optional[Callable] = None, needs_frames: bool = False,
               meta: Optional[Mapping[str, str]] = None, image_resize: str = "crop") -> DataBundle:
    """Loaders for train/val/test: shards (written on first use for the packaged sources) or a CSV in memory.

    What the batches carry is what the task reads (its module's DATA): images, a clip's frames (`frames`,
    B x T x C x H x W), labels, and numbers from each sample's KEY.json (`meta`: {key: "float" | "long"}).
    `image_transform` (PIL image -> float tensor C,H,W) replaces the ImageTransform the data config describes;
    `image_resize` is that default's resize (crop: shorter side and centre crop; stretch: the whole image).
    Bad paths, shard lists and indexes fail here, before any model is built."""
    if cfg.source in ("jsonl", "bbc_headlines"):  # prompt/response records for task.kind=causal_lm
        from unipt_scale.data.lm import build_lm_data

        return build_lm_data(cfg, tokenizer, rank=rank, world_size=world_size)
    if cfg.source != "csv":
        from unipt_scale.data.pipeline import build_stream_data

        return build_stream_data(cfg, tokenizer, rank=rank, world_size=world_size, needs_image=needs_image,
                                 needs_labels=needs_labels, image_transform=image_transform,
                                 needs_frames=needs_frames, meta=meta, image_resize=image_resize)
    if needs_image or needs_frames or meta:
        raise ValueError("data.source=csv holds texts only; for images write shards with `unipt shards --source "
                         "csv` and train with data.source=shards")
    from unipt_scale.data.sources import split_records

    records, names = load_records(cfg)
    splits = split_records(records, cfg.split, cfg.seed)
    train = _limit(splits["train"], cfg.limit_train, cfg.seed)
    val, test = _limit(splits["val"], cfg.limit_eval, cfg.seed), _limit(splits["test"], cfg.limit_eval, cfg.seed)
    if not train:
        raise ValueError("the training split is empty; check data.split and data.limit_train")
    collate = text_collate(tokenizer, cfg.max_length)
    train_loader = RecordLoader(train, cfg.batch_size, collate, seed=cfg.seed, rank=rank, world_size=world_size,
                                num_workers=cfg.num_workers)

    def eval_loader(rows):
        if not rows:
            return None
        gen = torch.Generator()
        gen.manual_seed(_seed("records-eval", cfg.seed))
        # Each rank evaluates every world_size-th row and evaluation gathers them: the set is read once over all
        # ranks, not whole by each (with the tapped-state cache, each row is also stored once).
        loader = DataLoader(RecordDataset(rows[rank::world_size]), batch_size=cfg.eval_batch_size, shuffle=False,
                            collate_fn=collate, num_workers=cfg.num_workers, generator=gen)
        loader.rank_sharded = world_size > 1
        return loader

    return DataBundle(train_loader, eval_loader(val), eval_loader(test), len(names), names, len(train_loader),
                      stats={"train_samples": len(train), "val_samples": len(val), "test_samples": len(test)})


def num_classes_of(cfg: DataConfig) -> int:
    if cfg.source == "csv":
        return len(load_records(cfg)[1])
    from unipt_scale.data.pipeline import stream_num_classes

    return stream_num_classes(cfg)
