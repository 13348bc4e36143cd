"""Stream training batches from WebDataset shards on many nodes, resumably and without losing data silently.

Per DataLoader worker: shard list -> node split -> worker split -> shuffle groups -> random-access tar reads
(tario.py) -> decode (PIL) -> image transform -> batching with tokenisation and padding.

Order. A pass is a pure function of (seed, epoch, rank, worker): the shard order is a seeded permutation,
consecutive shards form *groups* of at least ``shuffle_buffer`` samples, and inside a group the samples come in
a seeded random permutation (a uniform shuffle within the group, instead of a streaming buffer whose contents
would have to be checkpointed). Several sources are mixed by weight with a counter-based draw.

Position. Every batch carries, beside its counters (COUNTS_KEY), its worker's position (STATE_KEY): samples
consumed per source, draws made, batches made. The loader keeps the latest per worker; `state_dict()` is that
plus the round-robin pointer (torch's DataLoader takes batches from its workers in a fixed cyclic order). On
`load_state_dict` + `__iter__` each worker starts at its own position: groups wholly consumed are skipped from
the index sizes without opening their shards; the current group's shards are opened and their tar headers
scanned (as every read does), and the consumed samples in it are skipped by index: nothing consumed is read,
decoded, tokenised or collated. Shards without sizes (no sizes.json) must be opened and their headers scanned
even when wholly consumed, to learn where the position falls: the one fallback.

Damage. Each shard's sample count is compared with its size in sizes.json: samples that cannot be found (a
truncated shard, a damaged header) are *lost* and counted per shard (`lost`, `lost_by_shard`); found samples
that cannot be used are *skipped* (`skipped_<reason>`); each damaged region of a shard is one `shard_errors`.
Per pass, delivered + skipped + lost + dropped_remainder = samples the index lists. `max_lost_fraction` fails the
pass with DataLossError when more are lost. Nothing is re-read to make up for what was lost or skipped.

Modes:
* exact (``resampled=False``): every sample once per pass; the same shard order on every rank, dealt out to
  (rank, worker). An epoch is one pass: it ends when the pass does, which with lost or skipped samples is
  before ``len()`` batches (``len()`` counts a clean pass from the index).
* resampled (``resampled=True``): every worker draws shards with replacement, seeded by (seed, epoch, rank,
  worker); every rank yields exactly ``len(loader)`` batches. The mode for multi-node training.

Fewer shards than ranks x workers (exact mode): by default every worker walks every shard and takes every k-th
sample (exact and disjoint; each reads only its own samples' payloads), with a warning; ``few_shards="error"``
raises instead.

Global RNGs are not touched: the DataLoader gets its own torch.Generator seeded from (seed, epoch, rank). A
random `image_transform` would draw from the worker's (or, with 0 workers, the main process's) torch RNG and
is then not reproduced by a resume; derive its randomness from the sample instead.
"""
from __future__ import annotations

import bisect
import copy
import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from unipt_scale.data.sources import IMAGE_EXTS, INDEX_NAME
from unipt_scale.data.tario import ShardReader, is_remote, tar_problem
from unipt_scale.data.video import (FRAME_MEMBER, VIDEO_EXTS, VideoDecodeError, decode_video, frame_members,
                                    uniform_indices)

log = logging.getLogger(__name__)

FIELDS = ("image", "frames", "text", "label", "meta")
COUNTS_KEY = "__unipt_counts__"
STATE_KEY = "__unipt_position__"
STATE_FORMAT = "unipt_scale.stream_position/1"
_FIELD_EXTS = {"image": IMAGE_EXTS, "frames": VIDEO_EXTS, "text": ("txt",), "label": ("cls",), "meta": ("json",)}
META_DTYPES = {"float": torch.float32, "long": torch.long}
META_PAD = -1  # lists of different lengths (a question's answers) are padded with it; an absent optional value
_META_KIND = re.compile(r"(float|long)(?:\[(\d*)\])?(\?)?")


def parse_meta_kind(kind: str) -> tuple[str, int | None, bool]:
    """'float' (a number) | 'float[4]' (a list of exactly 4) | 'long[]' (a list of any length), each with '?'
    for optional (absent: META_PAD) -> (dtype name, list length: None for a number / -1 for any, optional)."""
    m = _META_KIND.fullmatch(str(kind))
    if m is None:
        raise ValueError(f"meta type {kind!r} is not float|long, optionally [N] or [] (a list), optionally ? "
                         "(optional)")
    size = None if m.group(2) is None and "[" not in kind else (int(m.group(2)) if m.group(2) else -1)
    return m.group(1), size, bool(m.group(3))


def _meta_problem(value: Any, dtype: str, size: int | None) -> str | None:
    """Why `value` is not of the meta type (dtype, size) that parse_meta_kind gives (None when it is)."""
    if size is None and isinstance(value, list):
        return "is a list, not a number"
    if size is not None and not isinstance(value, list):
        return "is not a list"
    if size is not None and size >= 0 and len(value) != size:
        return f"has {len(value)} values, not {size}"
    flat = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in flat):
        return "is not made of finite numbers"
    if dtype == "long" and not all(float(v).is_integer() for v in flat):
        return "is not made of whole numbers"
    return None
_M64 = (1 << 64) - 1


class DataLossError(ValueError):
    """More samples than data.max_lost_fraction could not be found in their shards."""


# --------------------------------------------------------------------------- spec and index


@dataclass
class Source:
    """One group of shards mixed in with a weight; `sizes` come from the index (None: unknown)."""

    urls: list[str]
    weight: float = 1.0
    sizes: list[int | None] = field(default_factory=list)
    fields: tuple[str, ...] | None = None
    classes: list[str] | None = None
    meta_keys: dict[str, int] | None = None  # KEY.json keys and how many samples have each (None: not indexed)

    @property
    def total(self) -> int | None:
        return None if any(s is None for s in self.sizes) else sum(self.sizes)  # type: ignore[arg-type]


def _check_shard_name(directory: str, name: Any, path: str) -> None:
    """An index may only name shards inside its own directory: no paths, no links out of it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name):
        raise ValueError(f"{path} lists shard {name!r}, which is not a file name inside {directory}; "
                         "an index may only name shards beside it")
    full = os.path.join(directory, name)
    if os.path.lexists(full):
        real, home = os.path.realpath(full), os.path.realpath(directory)
        if os.path.dirname(real) != home:
            raise ValueError(f"{path} lists shard {name!r}, a link to {real} outside {directory}; "
                             "an index may only name shards inside its directory")


def read_index(directory: str | os.PathLike, cache: dict[str, dict | None] | None = None) -> dict | None:
    """`sizes.json` of a shard directory: ours (format unipt_scale.shards/1) or open_clip's flat {name: n},
    validated (shard names inside the directory, non-negative counts). None when there is none.

    `cache` lives for one resolve call only: a process that rewrites shards must not see a stale index."""
    directory = os.fspath(directory)
    path = os.path.join(directory, INDEX_NAME)
    if cache is not None and path in cache:
        return cache[path]
    index = None
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as exn:
            raise ValueError(f"{path}: unreadable shard index ({exn}); rewrite it with `unipt shards`") from None
        if isinstance(raw, dict) and isinstance(raw.get("shards"), dict):
            index = raw
        elif isinstance(raw, dict) and raw and all(isinstance(v, int) for v in raw.values()):
            index = {"shards": raw}
        else:
            raise ValueError(f"{path}: not a shard index (expected unipt shards' format or {{name: count}})")
        for name, n in index["shards"].items():
            _check_shard_name(directory, name, path)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{path}: shard {name!r} has count {n!r}; counts are integers >= 0")
        for split, info in (index.get("splits") or {}).items():
            names = info.get("shards") if isinstance(info, dict) else None
            if not isinstance(names, list):
                raise ValueError(f"{path}: split {split!r} has no shard list")
            for name in names:
                if name not in index["shards"]:
                    raise ValueError(f"{path}: split {split!r} names {name!r}, which has no count in 'shards'")
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


def _expand_item(item: str, split: str, cache: dict) -> list[str]:
    """A directory (its index's `split` shards), a brace pattern, a glob, or a '::' list."""
    from webdataset.shardlists import expand_urls
    from webdataset.utils import glob_with_braces

    if os.path.isdir(item):
        index = read_index(item, cache)
        if index is None or "splits" not in index:
            raise FileNotFoundError(f"{item}: no {INDEX_NAME} from `unipt shards` in this directory (not written "
                                    "by it, or the write did not finish); pass shard files or a brace pattern")
        if split not in index["splits"]:
            raise ValueError(f"{item}: no split {split!r} (has {', '.join(index['splits'])})")
        urls = [os.path.join(item, n) for n in index["splits"][split]["shards"]]
        for u in urls:
            if not os.path.isfile(u):
                raise FileNotFoundError(f"shard not found: {u} (listed in {os.path.join(item, INDEX_NAME)})")
            problem = tar_problem(u)
            if problem:
                raise ValueError(f"{u} (listed in {os.path.join(item, INDEX_NAME)}) {problem}")
        return urls
    urls: list[str] = []
    for u in expand_urls(item):
        if any(c in u for c in "*?[") and not is_remote(u):
            hits = sorted(glob_with_braces(u))
            if not hits:
                raise FileNotFoundError(f"no shards match {u!r}")
            tars = [h for h in hits if os.path.isfile(h) and tar_problem(h) is None]
            if not tars:
                shown = ", ".join(os.path.basename(h) for h in hits[:5]) + (" ..." if len(hits) > 5 else "")
                raise ValueError(f"{u!r} matches no tar file (it matches {shown}); point it at the .tar shards")
            if len(tars) < len(hits):
                others = [os.path.basename(h) for h in hits if h not in set(tars)]
                warnings.warn(f"{u!r}: ignoring {len(others)} match(es) that are not tar files: "
                              f"{', '.join(others[:5])}", stacklevel=3)
            urls.extend(tars)
        else:
            if not is_remote(u):
                if not os.path.isfile(u):
                    raise FileNotFoundError(f"shard not found: {u}")
                problem = tar_problem(u)
                if problem:
                    raise ValueError(f"shard {u} {problem}")
            urls.append(u)
    return urls


def _local_sizes(urls: Sequence[str], cache: dict):
    sizes: list[int | None] = []
    fields: set[str] | None = None
    classes = None
    meta_keys: dict[str, int] | None = None
    for u in urls:
        d, name = os.path.split(u)
        index = read_index(d or ".", cache) if not is_remote(u) else None
        sizes.append(None if index is None else index["shards"].get(name))
        if index is not None and "fields" in index:
            f = set(index["fields"])
            fields = f if fields is None else fields & f
            classes = classes or index.get("classes")
        if index is not None and isinstance(index.get("meta_keys"), dict) and meta_keys is None:
            meta_keys = dict(index["meta_keys"])
    return sizes, (tuple(x for x in FIELDS if x in fields) if fields is not None else None), classes, meta_keys


def resolve_sources(spec: Any, split: str = "train") -> list[Source]:
    """Shard spec -> sources, each shard checked to exist and to start like a tar. Accepted: a directory written
    by `unipt shards` (its `split` shards), a brace pattern or glob (non-tar matches are ignored with a warning),
    'a::b' or a top-level comma list, a list of those, and weights as 'SPEC@0.3' items or (spec, weight) pairs /
    {"spec", "weight"} dicts. Without any weight everything forms one source."""
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
            urls.extend(_expand_item(os.fspath(one), split, cache))
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
        sizes, fields, classes, meta_keys = _local_sizes(urls, cache)
        sources.append(Source(urls=urls, weight=w, sizes=sizes, fields=fields, classes=classes, meta_keys=meta_keys))
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


def padding_tokenizer(tokenizer):
    """The tokenizer itself when it can pad, else a copy whose pad token is its eos token (GPT-style
    tokenizers have none): the caller's tokenizer is never changed."""
    if tokenizer is None or getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; give it a pad token "
                         "(tokenizer.pad_token = ...) before building the data")
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = eos
    return tok


def _length_limit(tokenizer, max_length: int | None) -> int | None:
    if max_length is not None:
        return max_length
    mml = getattr(tokenizer, "model_max_length", None)
    return mml if isinstance(mml, int) and mml < 1_000_000 else None


def tokenize_batch(tokenizer, texts: list[str], max_length: int | None) -> dict[str, torch.Tensor]:
    """Tokenise, truncate and pad (to the longest, on the tokenizer's padding_side) with the tokenizer itself.
    A tokenizer without a pad token is padded with its eos token (on a copy; see padding_tokenizer)."""
    tok = padding_tokenizer(tokenizer)
    limit = _length_limit(tok, max_length)
    enc = tok(list(texts), padding=True, truncation=limit is not None, max_length=limit, return_tensors="pt",
              return_token_type_ids=False)
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


# --------------------------------------------------------------------------- seeds and counters


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any parts: stable across processes (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _unit(seed: int, i: int) -> float:
    """The i-th uniform draw of a counter-based generator (splitmix64): a draw needs no replayed state."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) / 2.0 ** 64


class _Counts:
    """Counts of one worker not yet shipped to the main process, and the run of unusable samples."""

    def __init__(self, max_consecutive_bad: int):
        self.pending: Counter = Counter()
        self.lost_by_shard: Counter = Counter()
        self.logged: Counter = Counter()
        self.bad_run = 0
        self.max_bad = max_consecutive_bad

    def bump(self, name: str, detail: str = "", bad: bool = True, n: int = 1) -> None:
        self.pending[name] += n
        self.logged[name] += n
        k = self.logged[name]
        if detail and (k <= 5 or k % 1000 == 0):
            log.warning("data: %s (%d so far in this worker): %s", name, k, detail)
        if bad:
            self.bad_run += n
            if self.bad_run > self.max_bad:
                raise RuntimeError(f"data: {self.bad_run} unusable samples in a row (last: {name}: {detail}); "
                                   "the shards do not match the requested fields, or are broken")

    def lost(self, url: str) -> None:
        self.lost_by_shard[url] += 1
        self.bump("lost", f"a sample listed for {url} is not in the file" if self.lost_by_shard[url] == 1 else "")

    def good(self) -> None:
        self.bad_run = 0

    def take(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.pending)
        if self.lost_by_shard:
            out["lost_by_shard"] = dict(self.lost_by_shard)
        self.pending.clear()
        self.lost_by_shard.clear()
        return out


def _add_counts(total: dict, part: Mapping[str, Any]) -> None:
    for k, v in part.items():
        if k == "lost_by_shard":
            by = total.setdefault("lost_by_shard", {})
            for u, n in v.items():
                by[u] = by.get(u, 0) + int(n)
        else:
            total[k] = total.get(k, 0) + int(v)


def _report(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Counters for metrics.json: samples (delivered), skipped_<reason> and their sum `skipped`, lost and
    lost_by_shard, shard_errors, converted_<mode>, dropped_remainder (drop_last tails)."""
    out: dict[str, Any] = {k: int(v) for k, v in sorted(raw.items()) if k != "lost_by_shard"}
    out["skipped"] = sum(v for k, v in out.items() if k.startswith("skipped_"))
    for k in ("samples", "lost", "shard_errors"):
        out.setdefault(k, 0)
    out["lost_by_shard"] = dict(sorted(raw.get("lost_by_shard", {}).items()))
    return out


# --------------------------------------------------------------------------- per-worker pipeline


@dataclass
class _Config:
    sources: list[Source]
    fields: tuple[str, ...]
    batch_size: int
    rank: int
    world_size: int
    num_workers: int  # logical workers (1 when the DataLoader has none)
    shuffle: bool
    shuffle_buffer: int
    resampled: bool
    seed: int
    epoch: int
    drop_last: bool
    max_length: int | None
    image_mode: str
    return_keys: bool
    split_modes: list[str]  # per source: "shards" | "samples" | "resampled"
    batches_per_worker: int | None  # resampled mode
    max_consecutive_bad: int
    num_frames: int = 8  # frames per clip (field "frames")
    meta: tuple[tuple[str, str], ...] = ()  # (KEY.json key, "float" | "long") for field "meta"
    resume: list[dict] | None = None  # per logical worker: the position to start from
    start_worker: int = 0  # the logical worker that physical worker 0 plays


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _shard_order(n: int, cfg: _Config, si: int) -> list[int]:
    """This pass's shard order of source `si`: the same on every rank, so the deal over ranks is disjoint."""
    order = list(range(n))
    if cfg.shuffle:
        random.Random(_seed("shards", cfg.seed, cfg.epoch, si)).shuffle(order)
    return order


def _fresh_worker(n_sources: int) -> dict:
    return {"draws": 0, "pos": [0] * n_sources, "live": list(range(n_sources)), "batches": 0, "done": False}


class StreamDataset(torch.utils.data.IterableDataset):
    """Holds only picklable configuration; shards are opened inside each worker."""

    def __init__(self, cfg: _Config, tokenizer=None, image_transform: Callable | None = None):
        super().__init__()
        self.cfg, self.tokenizer, self.image_transform = cfg, tokenizer, image_transform
        self._exts = tuple(e for f in cfg.fields for e in _FIELD_EXTS[f])
        self._match = FRAME_MEMBER if "frames" in cfg.fields else None
        # (key, written type, dtype, list size, optional) per KEY.json value read: parsed once, not per sample
        self._meta = [(key, kind, *parse_meta_kind(kind)) for key, kind in cfg.meta]

    # -- the slot sequence of one source for one worker

    def _plan_source(self, si: int, worker: int):
        """(shard sequence, stride, offset, group seed parts) of source `si` for logical `worker`: the worker
        takes slots offset, offset + stride, ... of the concatenated groups of the sequence."""
        cfg, src = self.cfg, self.cfg.sources[si]
        mode = cfg.split_modes[si]
        if mode == "resampled":
            rng = random.Random(_seed("resample", cfg.seed, cfg.epoch, si, cfg.rank, worker))
            seq: Iterator[int] = (rng.randrange(len(src.urls)) for _ in itertools.count())
            return seq, 1, 0, ("group", cfg.seed, cfg.epoch, si, cfg.rank, worker)
        order = _shard_order(len(src.urls), cfg, si)
        if mode == "samples":
            total = cfg.world_size * cfg.num_workers
            return iter(order), total, cfg.rank * cfg.num_workers + worker, ("group", cfg.seed, cfg.epoch, si)
        mine = order[cfg.rank::cfg.world_size][worker::cfg.num_workers]
        return iter(mine), 1, 0, ("group", cfg.seed, cfg.epoch, si, cfg.rank, worker)

    def _slots(self, si: int, worker: int, start: int, counts: _Counts) -> Iterator[tuple[str, Any]]:
        """("sample", raw) or ("lost", url) for each of the worker's slots from its `start`-th on."""
        cfg, src = self.cfg, self.cfg.sources[si]
        seq, stride, offset, gparts = self._plan_source(si, worker)
        readers: dict[int, ShardReader] = {}
        sizes: dict[int, int] = {}

        def size_of(u: int) -> int:
            if src.sizes[u] is not None:
                return src.sizes[u]  # type: ignore[return-value]
            if u not in sizes:  # no index: the shard must be opened to learn its length (the fallback)
                sizes[u] = len(reader(u))
            return sizes[u]

        def reader(u: int) -> ShardReader:
            if u not in readers:
                readers[u] = ShardReader(src.urls[u])
            return readers[u]

        min_group = cfg.shuffle_buffer if cfg.shuffle and cfg.shuffle_buffer > 1 else 0
        target = offset + start * stride  # index of the next slot to take in the concatenated sequence
        base = 0  # index of the current group's first slot
        try:
            for g, group in enumerate(_groups(seq, size_of, min_group, max_empty=max(100, 10 * len(src.urls)))):
                lens = [size_of(u) for u in group]
                n = sum(lens)
                for u in [u for u in readers if u not in group]:
                    readers.pop(u).close()
                if base + n <= target:  # wholly consumed before the start: not opened (with sizes known)
                    base += n
                    continue
                starts = list(itertools.accumulate([0] + lens[:-1]))
                perm = list(range(n))
                if min_group:
                    random.Random(_seed(*gparts, g)).shuffle(perm)
                first: dict[int, int] = {}  # entry -> group position of its first slot (where it is reported)
                for q, c in enumerate(perm):
                    first.setdefault(bisect.bisect_right(starts, c) - 1, q)
                q = target - base
                while q < n:
                    c = perm[q]
                    e = bisect.bisect_right(starts, c) - 1
                    u, i = group[e], c - starts[e]
                    r = reader(u)
                    if first.get(e) == q:
                        self._report_shard(r, src.sizes[u], counts)
                    if i < len(r):
                        try:
                            yield "sample", r.read(i, self._exts, self._match)
                        except OSError as exn:
                            counts.bump("shard_errors", str(exn), bad=False)
                            yield "lost", r.url
                    else:
                        yield "lost", r.url
                    q += stride
                target = base + q
                base += n
        finally:
            for r in readers.values():
                r.close()

    @staticmethod
    def _report_shard(r: ShardReader, listed: int | None, counts: _Counts) -> None:
        for p in r.scan.problems:
            counts.bump("shard_errors", f"{r.url}: {p}", bad=False)
        if listed is not None and len(r) > listed:
            counts.bump("shard_errors", f"{r.url}: holds {len(r)} samples but its index lists {listed}; "
                                        f"the {len(r) - listed} extra are not read", bad=False)
            counts.bump("unindexed", bad=False, n=len(r) - listed)

    def _choose(self, draws: int, live: list[int]) -> int:
        cfg = self.cfg
        u = _unit(self._mix_seed, draws)
        weights = [cfg.sources[j].weight for j in live]
        x, acc = u * sum(weights), 0.0
        for j, wt in zip(live, weights):
            acc += wt
            if x < acc:
                return j
        return live[-1]

    # -- decode and collate

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
        if "frames" in cfg.fields:
            frames = self._decode_frames(sample, where, counts)
            if frames is None:
                return None
            out["frames"] = frames
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
                label = int(raw.decode("ascii").strip())
                if label < 0:
                    raise ValueError(f"negative label {label}")
            except (UnicodeDecodeError, ValueError) as exn:
                counts.bump("skipped_bad_label", f"{where}: {exn}")
                return None
            out["label"] = label
        if "meta" in cfg.fields:
            meta = self._decode_meta(sample, where, counts)
            if meta is None:
                return None
            out["meta"] = meta
        counts.good()
        return out

    def _decode_frames(self, sample: dict, where: str, counts: _Counts):
        """cfg.num_frames transformed frames (T, C, H, W) of the sample's clip: its frame files, else its video."""
        from PIL import Image

        cfg = self.cfg
        try:
            names = frame_members([e for e in sample if isinstance(sample[e], bytes)])
            if names:
                images = []
                for i in uniform_indices(len(names), cfg.num_frames):
                    img = Image.open(io.BytesIO(sample[names[i]]))
                    img.load()
                    images.append(img)
            else:
                ext = next((e for e in VIDEO_EXTS if e in sample), None)
                if ext is None:
                    counts.bump("skipped_missing_frames", where)
                    return None
                images = decode_video(sample[ext], cfg.num_frames)
            images = [to_mode(img, cfg.image_mode)[0] for img in images]
        except VideoDecodeError as exn:
            counts.bump("skipped_bad_video", f"{where}: {exn}")
            return None
        except Exception as exn:  # PIL raises many types for bad bytes
            counts.bump("skipped_bad_frame", f"{where}: {type(exn).__name__}: {exn}")
            return None
        try:
            if self.image_transform is None:
                return images
            return torch.stack([self.image_transform(img) for img in images])
        except Exception as exn:
            counts.bump("skipped_transform_error", f"{where}: {type(exn).__name__}: {exn}")
            return None

    def _decode_meta(self, sample: dict, where: str, counts: _Counts):
        """The KEY.json values the task reads (numbers, or lists of numbers), checked."""
        raw = sample.get("json")
        if raw is None and all(optional for *_, optional in self._meta):
            return {key: META_PAD for key, *_ in self._meta}
        if raw is None:
            counts.bump("skipped_missing_meta", where)
            return None
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exn:
            counts.bump("skipped_bad_meta", f"{where}: {exn}")
            return None
        out = {}
        for key, kind, dtype, size, optional in self._meta:
            value = obj.get(key) if isinstance(obj, dict) else None
            if value is None and optional:
                out[key] = META_PAD
                continue
            problem = "is missing" if value is None else _meta_problem(value, dtype, size)
            if problem:
                counts.bump(f"skipped_bad_meta_{key}", f"{where}: {key}={value!r} {problem} (expected {kind})")
                return None
            out[key] = value
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
        if "frames" in cfg.fields:
            clips = [r["frames"] for r in rows]
            batch["frames"] = torch.stack(clips).float() if isinstance(clips[0], torch.Tensor) else clips
        if "label" in cfg.fields:
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        for key, _, dtype, _, _ in self._meta if "meta" in cfg.fields else ():
            batch[key] = meta_tensor([r["meta"][key] for r in rows], META_DTYPES[dtype])
        if cfg.return_keys:
            batch["keys"] = [r["__key__"] for r in rows]
        return batch

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        phys, n_phys = _worker_info()
        if n_phys != cfg.num_workers:
            raise RuntimeError(f"planned for {cfg.num_workers} worker(s), running in {n_phys}")
        worker = (phys + cfg.start_worker) % cfg.num_workers
        st = copy.deepcopy(cfg.resume[worker]) if cfg.resume else _fresh_worker(len(cfg.sources))
        if st["done"]:
            return
        self._mix_seed = _seed("mix", cfg.seed, cfg.epoch, cfg.rank, worker)
        counts = _Counts(cfg.max_consecutive_bad)
        cursors = [self._slots(si, worker, st["pos"][si], counts) for si in range(len(cfg.sources))]
        live: list[int] = st["live"]
        rows: list[dict] = []
        limit = cfg.batches_per_worker

        def message(batch: dict) -> dict:
            batch[COUNTS_KEY] = counts.take()
            batch[STATE_KEY] = {"worker": worker, **copy.deepcopy(st)}
            return batch

        try:
            while live and (limit is None or st["batches"] < limit):
                if len(cfg.sources) == 1:
                    si = live[0]
                else:
                    si = self._choose(st["draws"], live)
                    st["draws"] += 1
                item = next(cursors[si], None)
                if item is None:
                    live.remove(si)
                    continue
                st["pos"][si] += 1
                kind, payload = item
                if kind == "lost":
                    counts.lost(payload)
                    continue
                decoded = self._decode(payload, counts)
                if decoded is None:
                    continue
                rows.append(decoded)
                if len(rows) == cfg.batch_size:
                    batch = self._collate(rows)
                    counts.bump("samples", bad=False, n=len(rows))
                    rows = []
                    st["batches"] += 1
                    yield message(batch)
            if rows:
                if cfg.drop_last:
                    counts.bump("dropped_remainder", bad=False, n=len(rows))
                else:
                    batch = self._collate(rows)
                    counts.bump("samples", bad=False, n=len(rows))
                    st["batches"] += 1
                    yield message(batch)
            st["done"] = True
            yield message({})
        finally:
            for c in cursors:
                c.close()


def meta_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """(B,) from numbers, (B, L) from lists (shorter lists padded with META_PAD)."""
    if not any(isinstance(v, list) for v in values):
        return torch.tensor(values, dtype=dtype)
    rows = [v if isinstance(v, list) else [v] for v in values]
    width = max(1, max(len(r) for r in rows))  # at least one column: a batch of questions none of whose answers
    # is in the vocabulary is all padding
    return torch.tensor([r + [META_PAD] * (width - len(r)) for r in rows], dtype=dtype)


def _groups(seq: Iterator[int], size_of: Callable[[int], int], min_samples: int,
            max_empty: int = 10_000) -> Iterator[list[int]]:
    """Consecutive shards of `seq` in groups of at least `min_samples` samples (0: one shard per group).
    `max_empty` empty shards in a row end an endless (resampled) sequence with an error instead of a hang."""
    cur: list[int] = []
    acc = empty = 0
    for u in seq:
        n = size_of(u)
        empty = empty + 1 if n == 0 else 0
        if empty > max_empty:
            raise RuntimeError(f"data: {empty} empty shards in a row; the source holds no samples")
        cur.append(u)
        acc += n
        if acc >= max(min_samples, 1):
            yield cur
            cur, acc = [], 0
    if cur:
        yield cur


# --------------------------------------------------------------------------- planning and the loader


def _batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


class StreamLoader:
    """Iterable of batches for one rank, resumable mid-epoch (see the module docstring).

    `len()` is this rank's batches in a clean pass of the current epoch (exact mode: from the index; resampled:
    exact). `set_epoch(e)` before each epoch; `state_dict()` / `load_state_dict()` save and restore the position
    of the batches delivered so far; `counts()` are the counters since construction (or as restored), and
    `pass_counts()` those of the current pass."""

    rank_sharded = True  # each rank reads its own part (evaluation gathers)

    def __init__(self, dataset: StreamDataset, num_workers: int, loader_kwargs: dict[str, Any],
                 max_lost_fraction: float | None = 0.01):
        self.dataset, self.num_workers, self.loader_kwargs = dataset, num_workers, loader_kwargs
        self.max_lost_fraction = max_lost_fraction
        self._counts: dict[str, Any] = {}
        self._pos: dict | None = None  # position of the current (or last) iterator of this epoch
        self._resume: dict | None = None
        self._plan()

    @property
    def epoch(self) -> int:
        return self.dataset.cfg.epoch

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.dataset.cfg.epoch:
            self._pos = None
            if self._resume is not None and self._resume["epoch"] != epoch:
                self._resume = None
        self.dataset.cfg.epoch = epoch
        self._plan()

    def _plan(self) -> None:
        cfg = self.dataset.cfg
        nw = cfg.num_workers
        if cfg.resampled:
            self.batches_per_rank = [cfg.batches_per_worker * nw] * cfg.world_size  # type: ignore[operator]
            self.samples_per_rank = [b * cfg.batch_size for b in self.batches_per_rank]
            return
        if any(s.total is None for s in cfg.sources):
            self.batches_per_rank = self.samples_per_rank = None  # type: ignore[assignment]
            return
        orders = [_shard_order(len(src.urls), cfg, si) for si, src in enumerate(cfg.sources)]
        per_rank_b, per_rank_s = [], []
        for r in range(cfg.world_size):
            b = s_tot = 0
            for w in range(nw):
                n = 0
                for si, src in enumerate(cfg.sources):
                    if cfg.split_modes[si] == "shards":
                        n += sum(src.sizes[u] for u in orders[si][r::cfg.world_size][w::nw])  # type: ignore[misc]
                    else:  # every k-th sample of the whole source
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
            raise TypeError("epoch length unknown: the shards have no sizes.json beside them; write them with "
                            "`unipt shards`, or use resampled=True with samples_per_epoch")
        return self.num_batches

    # -- position

    def _fresh_position(self) -> dict:
        cfg = self.dataset.cfg
        return {"format": STATE_FORMAT, "epoch": cfg.epoch, "batches": 0, "next_worker": 0,
                "workers": [_fresh_worker(len(cfg.sources)) for _ in range(cfg.num_workers)], "pass_counts": {}}

    def _identity(self) -> dict:
        cfg = self.dataset.cfg
        return {"rank": cfg.rank, "world_size": cfg.world_size, "num_workers": cfg.num_workers,
                "resampled": cfg.resampled, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "sources": [len(s.urls) for s in cfg.sources]}

    def state_dict(self) -> dict:
        """JSON-serialisable position after the batches delivered so far in this epoch, with the counters."""
        pos = self._pos if self._pos is not None else (self._resume or self._fresh_position())
        out = copy.deepcopy(pos)
        out.update(self._identity())
        out["counts"] = copy.deepcopy(self._counts)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (from state_dict of a loader with the same configuration): the next iterator
        starts right after its last batch. Sets the loader to the state's epoch."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a stream loader position (expected format {STATE_FORMAT!r})")
        mine = self._identity()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"the saved data position does not fit this loader ({shown}); resume with the "
                             "same data config, world size and data.num_workers")
        pos = {k: copy.deepcopy(state[k]) for k in ("format", "epoch", "batches", "next_worker", "workers",
                                                     "pass_counts")}
        self._counts = copy.deepcopy(dict(state.get("counts", {})))
        self.set_epoch(pos["epoch"])
        self._resume, self._pos = pos, None

    # -- iteration

    def __iter__(self) -> Iterator[dict]:
        cfg = self.dataset.cfg
        pos = self._resume if self._resume is not None else self._fresh_position()
        self._resume = None
        self._pos = pos
        if not all(w["done"] for w in pos["workers"]):
            run_cfg = replace(cfg, resume=copy.deepcopy(pos["workers"]), start_worker=pos["next_worker"])
            ds = StreamDataset(run_cfg, self.dataset.tokenizer, self.dataset.image_transform)
            gen = torch.Generator()
            gen.manual_seed(_seed("loader", cfg.seed, cfg.epoch, cfg.rank))
            dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                             persistent_workers=False, generator=gen, **self.loader_kwargs)
            for msg in dl:
                counts = msg.pop(COUNTS_KEY, None) or {}
                st = msg.pop(STATE_KEY)
                w = st.pop("worker")
                pos["workers"][w] = st
                pos["next_worker"] = self._next_worker(pos["workers"], w)
                _add_counts(pos["pass_counts"], counts)
                _add_counts(self._counts, counts)
                self._check_lost(pos, final=False)
                if msg:
                    pos["batches"] += 1
                    yield msg
        self._check_lost(pos, final=True)

    @staticmethod
    def _next_worker(workers: list[dict], last: int) -> int:
        n = len(workers)
        for k in range(1, n + 1):
            if not workers[(last + k) % n]["done"]:
                return (last + k) % n
        return (last + 1) % n

    def _check_lost(self, pos: dict, final: bool) -> None:
        f = self.max_lost_fraction
        lost = pos["pass_counts"].get("lost", 0)
        if f is None or not lost:
            return
        if final:
            total = sum(sum(w["pos"]) for w in pos["workers"])
        elif self.dataset.cfg.resampled:
            return  # a resampled pass's length in samples is known only at its end
        else:
            total = self.num_samples  # exact mode: the pass is certain to fail once this many are lost
        if not total or lost <= f * total:
            return
        worst = sorted(pos["pass_counts"].get("lost_by_shard", {}).items(), key=lambda kv: -kv[1])[:3]
        shown = ", ".join(f"{os.path.basename(u)}: {n}" for u, n in worst)
        raise DataLossError(
            f"data: {lost} of {total} samples of this pass are lost (listed in sizes.json but not found in their "
            f"shards; {shown}), more than max_lost_fraction={f:g}; repair or rewrite the shards with "
            "`unipt shards`, or raise data.max_lost_fraction")

    def counts(self) -> dict[str, Any]:
        """Counters since construction (or as restored by load_state_dict), summed over passes."""
        return _report(self._counts)

    def pass_counts(self) -> dict[str, Any]:
        """Counters of the current (or last) pass of this epoch."""
        pos = self._pos if self._pos is not None else (self._resume or self._fresh_position())
        return _report(pos["pass_counts"])


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
    max_lost_fraction: float | None = 0.01,
    num_frames: int = 8,
    meta: Mapping[str, str] | None = None,
    **loader_kwargs: Any,
) -> StreamLoader:
    """Batches from WebDataset shards for this rank (see the module docstring for the modes).

    `fields` picks what each batch carries among image/text/label (default: what the index says every
    sample has). Without a tokenizer, text comes back as `text` (list of str); without an image_transform
    the default ImageTransform(image_size) is used. `shuffle_buffer`: samples per shuffle group (at least).
    `max_lost_fraction`: share of a pass's samples that may be lost before DataLossError (None: no limit).
    Field `frames` gives `num_frames` frames per clip (B, T, C, H, W); field `meta` gives, for each KEY.json key
    of `meta` ({key: "float" | "long"}), a tensor of that name.
    `loader_kwargs` go to torch's DataLoader (pin_memory, prefetch_factor, multiprocessing_context)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if num_workers < 0:
        raise ValueError("num_workers must be >= 0")
    if few_shards not in ("split_samples", "error"):
        raise ValueError("few_shards must be 'split_samples' or 'error'")
    if max_lost_fraction is not None and not 0 <= max_lost_fraction <= 1:
        raise ValueError(f"max_lost_fraction must be in [0, 1] (or None), got {max_lost_fraction}")
    for k in ("generator", "batch_size", "shuffle", "sampler", "batch_sampler", "collate_fn", "worker_init_fn"):
        if k in loader_kwargs:
            raise ValueError(f"loader option {k!r} is set by the stream loader itself")
    if loader_kwargs.get("in_order") is False:
        raise ValueError("in_order=False would make the batch order (and resuming) irreproducible")
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
    meta = dict(meta or {})
    if "meta" in fields and not meta:
        raise ValueError("field 'meta' needs meta={json key: 'float' | 'long'}: the values the task reads")
    for kind in meta.values():
        parse_meta_kind(kind)
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    if "frames" in fields and image_transform is None:
        image_transform = ImageTransform(image_size)
    if "image" in fields and image_transform is None:
        image_transform = ImageTransform(image_size)
    if "text" in fields:
        tokenizer = padding_tokenizer(tokenizer)  # once here, not per batch
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
        if any(s.total == 0 for s in sources):
            raise ValueError("a source's shards hold no samples (sizes.json counts are 0); cannot resample it")
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
            warnings.warn(msg + "; splitting by sample instead (every worker walks every shard)", stacklevel=2)
            split_modes.append("samples")
    cfg = _Config(sources=sources, fields=fields, batch_size=batch_size, rank=rank, world_size=world_size,
                  num_workers=nw, shuffle=shuffle, shuffle_buffer=shuffle_buffer, resampled=resampled, seed=seed,
                  epoch=epoch, drop_last=drop_last, max_length=max_length, image_mode=image_mode,
                  return_keys=return_keys, split_modes=split_modes, batches_per_worker=batches_per_worker,
                  max_consecutive_bad=max_consecutive_bad, num_frames=num_frames, meta=tuple(meta.items()))
    return StreamLoader(StreamDataset(cfg, tokenizer, image_transform), num_workers, loader_kwargs,
                        max_lost_fraction=max_lost_fraction)


def stream_classes(spec: Any, split: str = "train") -> list[str] | None:
    """Class names recorded in the index (for the task head's size), or None."""
    for s in resolve_sources(spec, split):
        if s.classes:
            return list(s.classes)
    return None
