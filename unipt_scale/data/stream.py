"""Stream training batches from WebDataset shards on many nodes.

Pipeline per DataLoader worker: shard list -> node split -> worker split -> tar reading -> shuffle buffer
-> decode (PIL) -> image transform -> batching with tokenisation and padding. Samples that cannot be
used are skipped and counted, never fatal; the counts travel to the main process inside the batch
stream (see COUNTS_KEY) so they are exact with any number of workers and any start method.

Two modes:
* exact (``resampled=False``): every sample once per epoch; shards are shuffled with the same seed
  on every rank, then dealt out to (rank, worker). Ranks can get different numbers of batches, so
  DDP trainers should step ``loader.common_num_batches`` times (see ``StreamLoader``). For
  evaluation and exact passes.
* resampled (``resampled=True``): every worker draws shards with replacement, seeded by
  (seed, epoch, rank, worker); every rank yields exactly ``len(loader)`` batches, whatever is
  skipped. The mode for multi-node training.

Fewer shards than ranks x workers (exact mode): by default the loader falls back to splitting
*samples* instead of shards (every worker reads every shard and keeps every k-th sample: exact
and disjoint, at the cost of k-fold reading), with a warning; ``few_shards="error"`` raises instead.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.utils import make_seed

log = logging.getLogger(__name__)

INDEX_NAME = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FIELDS = ("image", "text", "label")
COUNTS_KEY = "__unipt_counts__"
_MIX_SALT = 7_919


# --------------------------------------------------------------------------- spec and index


@dataclass
class Source:
    """One group of shards mixed in with a weight; `sizes` come from the index (None: unknown)."""

    urls: list[str]
    weight: float = 1.0
    sizes: list[int | None] = field(default_factory=list)
    fields: tuple[str, ...] | None = None
    classes: list[str] | None = None

    @property
    def total(self) -> int | None:
        return None if any(s is None for s in self.sizes) else sum(self.sizes)  # type: ignore[arg-type]


def read_index(directory: str | os.PathLike, cache: dict[str, dict | None] | None = None) -> dict | None:
    """`sizes.json` of a shard directory: ours (format unipt_scale.shards/1) or open_clip's flat {name: n}.

    `cache` lives for one resolve call only: a process that rewrites shards must not see a stale index."""
    path = os.path.join(os.fspath(directory), INDEX_NAME)
    if cache is not None and path in cache:
        return cache[path]
    index = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if isinstance(raw, dict) and isinstance(raw.get("shards"), dict):
            index = raw
        elif isinstance(raw, dict) and raw and all(isinstance(v, int) for v in raw.values()):
            index = {"shards": raw}
        else:
            raise ValueError(f"{path}: not a shard index")
    if cache is not None:
        cache[path] = index
    return index


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside braces, so 'a-{0..3}.tar,b-{0,1}.tar' is two items."""
    items, depth, cur = [], 0, []
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def _weight_suffix(item: str) -> tuple[str, float | None]:
    m = re.match(r"^(.*)@([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$", item)
    return (m.group(1), float(m.group(2))) if m else (item, None)


def _expand_item(item: str, split: str, cache: dict) -> tuple[list[str], dict | None]:
    """A directory (its index's `split` shards), a brace pattern, a glob, or a '::' list."""
    if os.path.isdir(item):
        index = read_index(item, cache)
        if index is None or "splits" not in index:
            raise FileNotFoundError(f"{item}: no {INDEX_NAME} from `unipt shards` (is the output incomplete?); "
                                    "pass shard paths or a brace pattern instead")
        if split not in index["splits"]:
            raise ValueError(f"{item}: no split {split!r} (has {', '.join(index['splits'])})")
        return [os.path.join(item, n) for n in index["splits"][split]["shards"]], index
    urls: list[str] = []
    for u in expand_urls(item):
        if any(c in u for c in "*?[") and "://" not in u:
            hits = sorted(wds.utils.glob_with_braces(u))
            if not hits:
                raise FileNotFoundError(f"no shards match {u!r}")
            urls.extend(hits)
        else:
            urls.append(u)
    return urls, None


def _local_sizes(urls: Sequence[str], cache: dict) -> tuple[list[int | None], tuple[str, ...] | None, list[str] | None]:
    sizes: list[int | None] = []
    fields: set[str] | None = None
    classes = None
    for u in urls:
        d, name = os.path.split(u)
        index = read_index(d or ".", cache) if "://" not in u else None
        sizes.append(None if index is None else index["shards"].get(name))
        if index is not None and "fields" in index:
            f = set(index["fields"])
            fields = f if fields is None else fields & f
            classes = classes or index.get("classes")
    return sizes, (tuple(x for x in FIELDS if x in fields) if fields is not None else None), classes


def resolve_sources(spec: Any, split: str = "train") -> list[Source]:
    """Shard spec -> sources. Accepted: a directory written by `unipt shards` (its `split` shards), a brace
    pattern or glob, 'a::b' or a top-level comma list, a list of those, and weights as 'SPEC@0.3' items or
    (spec, weight) pairs / {"spec", "weight"} dicts. Without any weight everything forms one source."""
    if isinstance(spec, (str, os.PathLike)):
        items: list[Any] = _split_top_level(os.fspath(spec))
    elif isinstance(spec, Mapping):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise ValueError("empty shard spec")
    parsed: list[tuple[Any, float | None]] = []
    for it in items:
        if isinstance(it, Mapping):
            parsed.append((it["spec"], float(it.get("weight", 1.0))))
        elif isinstance(it, (tuple, list)) and len(it) == 2 and not isinstance(it[1], str):
            parsed.append((it[0], float(it[1])))
        else:
            parsed.append(_weight_suffix(os.fspath(it)))
    weighted = any(w is not None for _, w in parsed)
    cache: dict[str, dict | None] = {}
    groups: list[tuple[list[str], float]] = []
    for sub, w in parsed:
        sub = os.fspath(sub) if isinstance(sub, os.PathLike) else sub
        urls: list[str] = []
        for one in (_split_top_level(sub) if isinstance(sub, str) else list(sub)):
            urls.extend(_expand_item(os.fspath(one), split, cache)[0])
        if weighted or not groups:
            groups.append((urls, 1.0 if w is None else w))
        else:
            groups[0][0].extend(urls)
    sources = []
    for urls, w in groups:
        if not urls:
            raise ValueError(f"shard spec {spec!r} names no shards")
        if w <= 0 or not math.isfinite(w):
            raise ValueError(f"source weights must be > 0, got {w}")
        for u in urls:
            if "://" not in u and not os.path.isfile(u):
                raise FileNotFoundError(f"shard not found: {u}")
        sizes, fields, classes = _local_sizes(urls, cache)
        sources.append(Source(urls=urls, weight=w, sizes=sizes, fields=fields, classes=classes))
    return sources


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win (tests simulate ranks); then torch.distributed; then RANK/WORLD_SIZE."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("pass both rank and world_size, or neither")
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    return rank, world_size


# --------------------------------------------------------------------------- images and text


def to_mode(img, mode: str = "RGB"):
    """Convert any PIL mode to `mode`; returns (image, original mode or None if untouched).

    Alpha is composited on white (a bare convert would expose whatever colour transparent pixels hold);
    16/32-bit greyscale is rescaled, since PIL's own conversion clips it."""
    from PIL import Image

    orig = img.mode
    if orig == mode:
        return img, None
    if orig == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(img, dtype=np.float32)
        hi = float(a.max()) if a.size else 0.0
        img = Image.fromarray((a * (255.0 / hi) if hi > 0 else a).clip(0, 255).astype("uint8"), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != mode:
        img = img.convert(mode)
    return img, orig


class ImageTransform:
    """Default image transform: resize (shorter side + centre crop, or stretch) -> float tensor (C,H,W),
    scaled to [-1, 1] unless mean/std are given (then (x/255 - mean) / std). A class, not a closure, so it
    pickles into spawned workers."""

    def __init__(self, size: int | tuple[int, int] = 224, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, resize: str = "crop"):
        if resize not in ("crop", "stretch"):
            raise ValueError("resize must be 'crop' or 'stretch'")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean, self.std, self.resize = mean, std, resize

    def __call__(self, img) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        h, w = self.size
        if self.resize == "stretch":
            img = img.resize((w, h), Image.BICUBIC)
        else:
            scale = max(w / img.width, h / img.height)
            nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
            img = img.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        a = np.asarray(img, dtype=np.float32)
        if a.ndim == 2:
            a = a[:, :, None]
        t = torch.from_numpy(a.transpose(2, 0, 1).copy())
        if self.mean is None:
            return t.div_(127.5).sub_(1.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return t.div_(255.0).sub_(mean).div_(std)


def tokenize_batch(tokenizer, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
    """Pad to the longest in the batch on the tokenizer's padding_side. Padding is done here so that
    tokenizers without a pad token (GPT-style) work without being mutated: pad id falls back to eos, then 0."""
    limit = max_length
    if limit is None:
        mml = getattr(tokenizer, "model_max_length", None)
        limit = mml if isinstance(mml, int) and mml < 1_000_000 else None
    enc = tokenizer(texts, truncation=limit is not None, max_length=limit, padding=False)
    ids = [list(x) for x in enc["input_ids"]]
    n = max(1, max(len(x) for x in ids))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(ids), n), int(pad), dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    for i, row in enumerate(ids):
        if not row:
            continue
        sl = slice(n - len(row), n) if left else slice(0, len(row))
        input_ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# --------------------------------------------------------------------------- per-worker pipeline


class _Counts:
    """Counts of one worker's epoch; `pending` is what has not yet been shipped to the main process."""

    def __init__(self, max_consecutive_bad: int):
        self.pending: Counter = Counter()
        self.logged: Counter = Counter()
        self.bad_run = 0
        self.shard_err_run = 0
        self.max_bad = max_consecutive_bad

    def bump(self, name: str, detail: str = "", bad: bool = True) -> None:
        self.pending[name] += 1
        self.logged[name] += 1
        n = self.logged[name]
        if detail and (n <= 5 or n % 1000 == 0):
            log.warning("data: %s (%d so far in this worker): %s", name, n, detail)
        if bad:
            self.bad_run += 1
            if self.bad_run > self.max_bad:
                raise RuntimeError(f"data: {self.bad_run} unusable samples in a row (last: {name}: {detail}); "
                                   "the shards do not match the requested fields, or are broken")

    def good(self) -> None:
        self.pending["samples"] += 1
        self.bad_run = 0
        self.shard_err_run = 0

    def take(self) -> dict[str, int]:
        out = dict(self.pending)
        self.pending.clear()
        return out


@dataclass
class _Config:
    sources: list[Source]
    fields: tuple[str, ...]
    batch_size: int
    rank: int
    world_size: int
    shuffle: bool
    shuffle_buffer: int
    shuffle_initial: int
    resampled: bool
    seed: int
    epoch: int
    drop_last: bool
    max_length: int | None
    image_mode: str
    return_keys: bool
    split_modes: list[str]  # per source: "shards" | "samples"
    batches_per_worker: int | None  # resampled mode
    max_consecutive_bad: int


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class StreamDataset(torch.utils.data.IterableDataset):
    """Holds only picklable configuration; the webdataset pipeline is built inside each worker."""

    def __init__(self, cfg: _Config, tokenizer=None, image_transform: Callable | None = None):
        super().__init__()
        self.cfg, self.tokenizer, self.image_transform = cfg, tokenizer, image_transform

    # -- stages

    def _handler(self, counts: _Counts, n_urls: int) -> Callable[[Exception], bool]:
        def handler(exn: Exception) -> bool:
            counts.shard_err_run += 1
            counts.bump("shard_errors", f"{type(exn).__name__}: {str(exn)[:300]}", bad=False)
            if counts.shard_err_run > max(50, 4 * n_urls):
                raise RuntimeError(f"data: {counts.shard_err_run} shard errors in a row, no sample read; "
                                   f"last: {exn!r}") from exn
            return True
        return handler

    def _source_pipeline(self, si: int, counts: _Counts, worker: int, num_workers: int) -> Iterator[dict]:
        cfg, src = self.cfg, self.cfg.sources[si]
        seed_epoch = make_seed(cfg.seed, cfg.epoch, si)
        stages: list[Any] = []
        if cfg.resampled:
            worker_seed = cfg.rank * 1000 + worker
            stages.append(wds.ResampledShards(src.urls, seed=seed_epoch, deterministic=True,
                                              worker_seed=lambda: worker_seed))
        else:
            # Same shard order on every rank (seed has no rank in it), so the deal below is disjoint.
            stages.append(wds.SimpleShardList(src.urls, seed=seed_epoch if cfg.shuffle else None))
            if cfg.split_modes[si] == "shards":
                # Node split with the rank resolved in the main process: under a spawn start method
                # workers would not see torch.distributed and wds.split_by_node would silently not split.
                stages.append(wds.slice(cfg.rank, None, cfg.world_size))
                stages.append(wds.split_by_worker)
        stages.append(wds.tarfile_to_samples(handler=self._handler(counts, len(src.urls))))
        if not cfg.resampled and cfg.split_modes[si] == "samples":
            gid, total = cfg.rank * num_workers + worker, cfg.world_size * num_workers
            stages.append(wds.slice(gid, None, total))
        if cfg.shuffle and cfg.shuffle_buffer > 1:
            stages.append(wds.shuffle(cfg.shuffle_buffer, cfg.shuffle_initial,
                                      seed=make_seed(cfg.seed, cfg.epoch, cfg.rank, worker, si)))
        return iter(wds.DataPipeline(*stages))

    def _mix(self, streams: list[Iterator[dict]], worker: int) -> Iterator[dict]:
        """Weighted choice among sources with a seeded RNG (wds.RandomMix draws from the global `random`,
        which would make the mix irreproducible). Exhausted sources drop out; the rest keep their weights."""
        if len(streams) == 1:
            yield from streams[0]
            return
        rng = random.Random(make_seed(self.cfg.seed, self.cfg.epoch, self.cfg.rank, worker, _MIX_SALT))
        live = list(range(len(streams)))
        while live:
            i = rng.choices(live, weights=[self.cfg.sources[j].weight for j in live])[0]
            try:
                yield next(streams[i])
            except StopIteration:
                live.remove(i)

    def _decode(self, sample: dict, counts: _Counts) -> dict | None:
        cfg, out, key = self.cfg, {"__key__": sample.get("__key__")}, sample.get("__key__")
        where = f"{key} in {sample.get('__url__')}"
        if "image" in cfg.fields:
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                counts.bump("skipped_missing_image", where)
                return None
            try:
                from PIL import Image

                img = Image.open(io.BytesIO(sample[ext]))
                img.load()
                img, orig = to_mode(img, cfg.image_mode)
            except Exception as exn:  # PIL raises many types for bad bytes
                counts.bump("skipped_bad_image", f"{where}: {type(exn).__name__}: {exn}")
                return None
            if orig is not None:
                counts.bump(f"converted_{orig}", bad=False)
            try:
                out["image"] = self.image_transform(img) if self.image_transform is not None else img
            except Exception as exn:
                counts.bump("skipped_transform_error", f"{where}: {type(exn).__name__}: {exn}")
                return None
        if "text" in cfg.fields:
            raw = sample.get("txt")
            try:
                text = raw.decode("utf-8") if raw is not None else None
            except UnicodeDecodeError as exn:
                counts.bump("skipped_bad_text", f"{where}: {exn}")
                return None
            if text is None or not text.strip():
                counts.bump("skipped_missing_text", where)
                return None
            out["text"] = text
        if "label" in cfg.fields:
            raw = sample.get("cls")
            if raw is None:
                counts.bump("skipped_missing_label", where)
                return None
            try:
                out["label"] = int(raw.decode("ascii").strip())
            except (UnicodeDecodeError, ValueError) as exn:
                counts.bump("skipped_bad_label", f"{where}: {exn}")
                return None
        counts.good()
        return out

    def _collate(self, rows: list[dict]) -> dict[str, Any]:
        cfg, batch = self.cfg, {}
        if "text" in cfg.fields:
            texts = [r["text"] for r in rows]
            if self.tokenizer is not None:
                batch.update(tokenize_batch(self.tokenizer, texts, cfg.max_length))
            else:
                batch["text"] = texts
        if "image" in cfg.fields:
            imgs = [r["image"] for r in rows]
            batch["pixel_values"] = torch.stack(imgs).float() if isinstance(imgs[0], torch.Tensor) else imgs
        if "label" in cfg.fields:
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        if cfg.return_keys:
            batch["keys"] = [r["__key__"] for r in rows]
        return batch

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        worker, num_workers = _worker_info()
        counts = _Counts(cfg.max_consecutive_bad)
        streams = [self._source_pipeline(i, counts, worker, num_workers) for i in range(len(cfg.sources))]
        decoded = (d for d in (self._decode(s, counts) for s in self._mix(streams, worker)) if d is not None)
        batches: Iterable[dict] = wds.batched(cfg.batch_size, collation_fn=self._collate,
                                              partial=not cfg.drop_last)(decoded)
        if cfg.batches_per_worker is not None:
            batches = wds.slice(cfg.batches_per_worker)(batches)
        for b in batches:
            b[COUNTS_KEY] = counts.take()
            yield b
        rest = counts.take()
        if rest:
            yield {COUNTS_KEY: rest}


# --------------------------------------------------------------------------- planning and the loader


def _dealt_sizes(src: Source, seed_epoch: int | None) -> list[int]:
    """Shard sizes in the order the pipeline deals them out (same SimpleShardList, same seed)."""
    pos = {u: i for i, u in enumerate(src.urls)}
    return [src.sizes[pos[d["url"]]] for d in wds.SimpleShardList(list(src.urls), seed=seed_epoch)]  # type: ignore


def _batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class StreamLoader:
    """Iterable of batches for one rank. `len()` is this rank's batches in the current epoch (exact
    mode: from the index, assuming nothing is skipped; resampled: exact). Call `set_epoch` before each
    epoch to reshuffle; `counts()` returns the skip/convert counters accumulated so far."""

    def __init__(self, dataset: StreamDataset, num_workers: int, loader_kwargs: dict[str, Any]):
        self.dataset, self.num_workers, self.loader_kwargs = dataset, num_workers, loader_kwargs
        self._counts: Counter = Counter()
        self._plan()

    @property
    def epoch(self) -> int:
        return self.dataset.cfg.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.cfg.epoch = int(epoch)
        self._plan()

    def _plan(self) -> None:
        cfg = self.dataset.cfg
        nw = max(1, self.num_workers)
        if cfg.resampled:
            self.batches_per_rank = [cfg.batches_per_worker * nw] * cfg.world_size  # type: ignore[operator]
            self.samples_per_rank = [b * cfg.batch_size for b in self.batches_per_rank]
            return
        if any(s.total is None for s in cfg.sources):
            self.batches_per_rank = self.samples_per_rank = None  # type: ignore[assignment]
            return
        dealt = [_dealt_sizes(src, make_seed(cfg.seed, cfg.epoch, si) if cfg.shuffle else None)
                 if cfg.split_modes[si] == "shards" else None for si, src in enumerate(cfg.sources)]
        per_rank_b, per_rank_s = [], []
        for r in range(cfg.world_size):
            b = s_tot = 0
            for w in range(nw):
                n = 0
                for si, src in enumerate(cfg.sources):
                    if dealt[si] is not None:  # shard split: wds.slice(rank) then wds.split_by_worker
                        n += sum(dealt[si][r::cfg.world_size][w::nw])  # type: ignore[index]
                    else:  # sample split: every k-th sample of the whole source
                        gid, total = r * nw + w, cfg.world_size * nw
                        n += max(0, -(-(src.total - gid) // total))  # type: ignore[operator]
                b += _batches(n, cfg.batch_size, cfg.drop_last)
                s_tot += n
            per_rank_b.append(b)
            per_rank_s.append(s_tot)
        self.batches_per_rank, self.samples_per_rank = per_rank_b, per_rank_s

    @property
    def num_batches(self) -> int | None:
        return None if self.batches_per_rank is None else self.batches_per_rank[self.dataset.cfg.rank]

    @property
    def common_num_batches(self) -> int | None:
        """Batches every rank has this epoch: the step count for DDP in exact mode (no rank runs dry)."""
        return None if self.batches_per_rank is None else min(self.batches_per_rank)

    @property
    def num_samples(self) -> int | None:
        return None if self.samples_per_rank is None else self.samples_per_rank[self.dataset.cfg.rank]

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("epoch length unknown: the shards have no sizes.json; pass samples_per_epoch "
                            "with resampled=True, or write shards with `unipt shards`")
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        dl = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                         persistent_workers=False, **self.loader_kwargs)
        for b in dl:
            c = b.pop(COUNTS_KEY, None)
            if c:
                self._counts.update(c)
            if b:
                yield b

    def counts(self) -> dict[str, int]:
        """Cumulative counters: samples (delivered), skipped_<reason>, converted_<mode>, shard_errors,
        and `skipped` (sum of skipped_*). Plain ints, ready for metrics.json."""
        out = {k: int(v) for k, v in sorted(self._counts.items())}
        out["skipped"] = sum(v for k, v in out.items() if k.startswith("skipped_"))
        out.setdefault("samples", 0)
        out.setdefault("shard_errors", 0)
        return out


def make_loader(
    spec: Any,
    *,
    batch_size: int,
    tokenizer=None,
    image_transform: Callable | None = None,
    split: str = "train",
    fields: Sequence[str] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    shuffle_initial: int = 100,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    max_length: int | None = None,
    image_size: int = 224,
    image_mode: str = "RGB",
    few_shards: str = "split_samples",
    return_keys: bool = False,
    max_consecutive_bad: int = 10_000,
    **loader_kwargs: Any,
) -> StreamLoader:
    """Batches from WebDataset shards for this rank (see the module docstring for the modes).

    `fields` picks what each batch carries among image/text/label (default: what the index says every
    sample has). Without a tokenizer, text comes back as `text` (list of str); without an image_transform
    the default ImageTransform(image_size) is used. `loader_kwargs` go to torch's DataLoader
    (pin_memory, prefetch_factor, multiprocessing_context)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if num_workers < 0:
        raise ValueError("num_workers must be >= 0")
    if few_shards not in ("split_samples", "error"):
        raise ValueError("few_shards must be 'split_samples' or 'error'")
    rank, world_size = resolve_rank(rank, world_size)
    sources = resolve_sources(spec, split)
    if fields is None:
        known = [s.fields for s in sources]
        if any(f is None for f in known):
            raise ValueError("cannot tell which fields the samples have (no sizes.json next to the shards); "
                             "pass fields=('image', 'text', 'label') or a subset")
        common = set(known[0])  # type: ignore[arg-type]
        for f in known[1:]:
            common &= set(f)  # type: ignore[arg-type]
        fields = tuple(x for x in FIELDS if x in common)
    else:
        bad = [f for f in fields if f not in FIELDS]
        if bad:
            raise ValueError(f"unknown field(s) {bad}; choose from {FIELDS}")
        fields = tuple(x for x in FIELDS if x in fields)
    if not fields:
        raise ValueError("the samples share no usable field (image/text/label)")
    if "image" in fields and image_transform is None:
        image_transform = ImageTransform(image_size)
    nw = max(1, num_workers)
    split_modes = []
    batches_per_worker = None
    if resampled:
        total = samples_per_epoch
        if total is None:
            totals = [s.total for s in sources]
            if any(t is None for t in totals):
                raise ValueError("resampled mode needs samples_per_epoch when the shards have no sizes.json")
            total = sum(totals)  # type: ignore[arg-type]
        per_rank = -(-total // world_size)
        batches_per_worker = max(1, -(-_batches(per_rank, batch_size, False) // nw))
        split_modes = ["resampled"] * len(sources)
    else:
        if samples_per_epoch is not None:
            raise ValueError("samples_per_epoch only applies with resampled=True (exact mode reads each sample once)")
        for s in sources:
            need = world_size * nw
            if len(s.urls) >= need:
                split_modes.append("shards")
                continue
            msg = (f"{len(s.urls)} shard(s) for {world_size} rank(s) x {nw} worker(s): some would get no shard")
            if few_shards == "error":
                raise ValueError(msg + "; write more, smaller shards (--samples-per-shard), use fewer workers, "
                                       "or resampled=True")
            warnings.warn(msg + "; splitting by sample instead (every worker reads every shard)", stacklevel=2)
            split_modes.append("samples")
    cfg = _Config(sources=sources, fields=fields, batch_size=batch_size, rank=rank, world_size=world_size,
                  shuffle=shuffle, shuffle_buffer=shuffle_buffer, shuffle_initial=shuffle_initial,
                  resampled=resampled, seed=seed, epoch=epoch, drop_last=drop_last, max_length=max_length,
                  image_mode=image_mode, return_keys=return_keys, split_modes=split_modes,
                  batches_per_worker=batches_per_worker, max_consecutive_bad=max_consecutive_bad)
    return StreamLoader(StreamDataset(cfg, tokenizer, image_transform), num_workers, loader_kwargs)


def stream_classes(spec: Any, split: str = "train") -> list[str] | None:
    """Class names recorded in the index (for the task head's size), or None."""
    for s in resolve_sources(spec, split):
        if s.classes:
            return list(s.classes)
    return None
