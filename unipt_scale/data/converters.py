"""Records from the file formats the paper's other task families ship in, for `unipt shards`:

- video-folder: clips (mp4, webm, mkv, avi, mov) with their captions, from a captions file (captions.jsonl or
  captions.csv: one row per (video, caption) pair, MSR-VTT's layout) or a NAME.txt beside each NAME.mp4;
- vqa: VQAv2 (a *questions*.json and an *annotations*.json, COCO images named by their 12-digit id) or GQA
  (a {question id: {imageId, question, answer}} file, images/IMAGEID.jpg) questions with their answers;
- refcoco: referring expressions with their boxes, from refs.json (the refer toolkit's refs, as JSON) and
  instances.json (COCO boxes and images). The toolkit's refs(unc).p is a pickle, which can run code when read:
  it is refused; convert it once where it is trusted (python -c "import pickle, json; json.dump(pickle.load(
  open('refs(unc).p', 'rb')), open('refs.json', 'w'))").

The formats' own splits (VQAv2 train2014/val2014, GQA train/val/testdev, RefCOCO train/val/testA/testB) are kept
(`_split`): a question is never moved into another split than the one its dataset gave it. RefCOCO's testA and
testB both go to the test split; KEY.json keeps which (`ref_split`).

A malformed entry (a missing key, a wrong type) stops the conversion with one line naming the file and entry.
"""
from __future__ import annotations

import csv
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from unipt_scale.data.sources import IMAGE_EXTS, Record, ShardInputError, image_ext
from unipt_scale.data.video import VIDEO_EXTS


class _FileBytes:
    """A file's bytes under a member name, read when the shard is written."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member

    def __call__(self, _arg=None) -> dict:
        return {self.member: self.path.read_bytes()}


@contextmanager
def _entry(path: Path, what: str):
    """Turn a malformed entry's KeyError/TypeError/... into one ShardInputError line naming it."""
    try:
        yield
    except ShardInputError:
        raise
    except KeyError as exn:
        raise ShardInputError(f"{path}: {what} has no {exn}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as exn:
        raise ShardInputError(f"{path}: {what} is malformed ({type(exn).__name__}: {exn})") from None


def _load_json(path: Path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exn:
        raise ShardInputError(f"{path}: not readable JSON ({exn})") from None


# ------------------------------------------------------------------------------------------------ video-folder


def video_folder_records(root: Path) -> Tuple[List[Record], None]:
    root = Path(root)
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory of video files")
    videos = {p.name: p for p in sorted(root.rglob("*")) if p.suffix.lower().lstrip(".") in VIDEO_EXTS}
    if not videos:
        raise ShardInputError(f"{root}: holds no video files ({', '.join(VIDEO_EXTS)})")
    by_stem = {p.stem: p for p in videos.values()}
    pairs: List[Tuple[Path, str]] = []
    if (root / "captions.jsonl").is_file() or (root / "captions.csv").is_file():
        path = root / "captions.jsonl" if (root / "captions.jsonl").is_file() else root / "captions.csv"
        if path.suffix == ".jsonl":
            try:
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except ValueError as exn:
                raise ShardInputError(f"{path}: not one JSON object per line ({exn})") from None
        else:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise ShardInputError(f"{path} row {n}: not an object with video and caption")
            name, caption = str(row.get("video", "")), str(row.get("caption", "")).strip()
            video = videos.get(name) or by_stem.get(name)
            if video is None or not caption:
                raise ShardInputError(f"{path} row {n}: needs a video (a file name in {root}) and a caption, got "
                                      f"video={name!r}")
            pairs.append((video, caption))
    else:
        for video in videos.values():
            side = video.with_suffix(".txt")
            if not side.is_file():
                raise ShardInputError(f"{video}: no caption ({side.name} beside it, or a captions.jsonl / "
                                      f"captions.csv with video,caption rows in {root})")
            pairs.append((video, side.read_text(encoding="utf-8").strip()))
    # A clip's label is the clip: its captions (MSR-VTT has twenty) are all positives of it, not negatives.
    names = sorted({str(video.relative_to(root)) for video, _ in pairs})
    ids = {n: i for i, n in enumerate(names)}
    records = []
    for video, caption in pairs:
        name = str(video.relative_to(root))
        rec = Record(index=len(records), key=f"video:{name}", text=caption, label=ids[name], label_name=name,
                     meta={"video": name})
        rec.meta["_members"] = (_FileBytes(video, video.suffix.lower().lstrip(".")), None)
        records.append(rec)
    return records, names


# ------------------------------------------------------------------------------------------------ vqa

_PUNCT = re.compile(r"[?!.,;:\"']")
_ARTICLES = {"a", "an", "the"}


def normalise_answer(answer: str) -> str:
    """VQA's answer normalisation, in short: lower case, punctuation and articles dropped, spaces collapsed."""
    words = _PUNCT.sub("", str(answer).lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def _split_from_name(name: str) -> Optional[str]:
    name = name.lower()
    for word, split in (("train", "train"), ("testdev", "test"), ("test", "test"), ("val", "val")):
        if word in name:
            return split
    return None


class _Images:
    """Image files under a root, found by exact stem first, then by a COCO id (the stem's trailing number:
    COCO_train2014_000000000009 is image 9) — never a GQA stem by another file's number."""

    def __init__(self, root: Path):
        self.by_stem: Dict[str, Path] = {}
        self.by_number: Dict[int, Path] = {}
        for p in sorted(root.rglob("*")):
            if p.suffix.lower().lstrip(".") in IMAGE_EXTS:
                self.by_stem.setdefault(p.stem, p)
                m = re.search(r"(\d+)$", p.stem)
                if m:
                    self.by_number.setdefault(int(m.group(1)), p)

    def get(self, name) -> Optional[Path]:
        found = self.by_stem.get(str(name))
        if found is None and str(name).isdigit():
            found = self.by_number.get(int(name))
        return found


def _image_record(records: List[Record], image: Path, key: str, text: str, meta: dict, split: Optional[str]):
    rec = Record(index=len(records), key=key, text=text, image_path=str(image), image_ext=image_ext(str(image)),
                 meta=meta)
    if split:
        rec.meta["_split"] = split
    records.append(rec)


def vqa_records(root: Path) -> Tuple[List[Record], None]:
    root = Path(root)
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory holding VQAv2 or GQA question files and images")
    images = _Images(root)
    records: List[Record] = []
    questions = sorted(p for p in root.glob("*.json") if "question" in p.name.lower())
    annotations = sorted(p for p in root.glob("*.json") if "annotation" in p.name.lower())
    if not questions:
        raise ShardInputError(f"{root}: no *questions*.json (VQAv2 questions or GQA balanced questions)")
    for qpath in questions:
        data = _load_json(qpath)
        split = _split_from_name(qpath.name)
        if isinstance(data, dict) and "questions" in data:  # VQAv2
            ann = next((a for a in annotations if _split_from_name(a.name) == split), None)
            if ann is None:
                raise ShardInputError(f"{qpath}: VQAv2 questions need their *annotations*.json (same split) in {root}")
            with _entry(ann, "an annotation"):
                answers = {a["question_id"]: [normalise_answer(x["answer"]) for x in a["answers"]]
                           for a in _load_json(ann)["annotations"]}
            for n, q in enumerate(data["questions"]):
                with _entry(qpath, f"question {n}"):
                    image = images.get(int(q["image_id"]))
                    if image is None or q["question_id"] not in answers:
                        raise ShardInputError(f"{qpath}: question {q['question_id']} has no image {q['image_id']} "
                                              f"under {root} or no answers in {ann.name}")
                    _image_record(records, image, f"vqa:{q['image_id']}", str(q["question"]),
                                  {"question_id": q["question_id"], "answers": answers[q["question_id"]]}, split)
        elif isinstance(data, dict):  # GQA: {question id: {imageId, question, answer}}
            for qid, q in data.items():
                if not isinstance(q, dict) or "imageId" not in q or "question" not in q:
                    raise ShardInputError(f"{qpath}: entry {qid!r} is not a GQA question (imageId, question, "
                                          "answer)")
                image = images.get(q["imageId"])
                if image is None:
                    raise ShardInputError(f"{qpath}: question {qid} names image {q['imageId']}, not found under "
                                          f"{root}")
                given = [normalise_answer(q["answer"])] if "answer" in q else []
                _image_record(records, image, f"gqa:{q['imageId']}", q["question"],
                              {"question_id": str(qid), "answers": given}, split)
        else:
            raise ShardInputError(f"{qpath}: neither VQAv2 ({{'questions': [...]}}) nor GQA ({{id: question}})")
    return records, None


# ------------------------------------------------------------------------------------------------ refcoco


def refcoco_records(root: Path) -> Tuple[List[Record], None]:
    root = Path(root)
    if not root.is_dir():
        raise ShardInputError(f"{root}: not a directory holding refs.json, instances.json and the COCO images")
    if not (root / "refs.json").is_file():
        pickles = [p.name for p in root.glob("refs*.p")]
        hint = (f"; {pickles[0]} is a pickle, which is not read (it can run code): convert it once where it is "
                "trusted, see `unipt shards --help`") if pickles else ""
        raise ShardInputError(f"{root}: no refs.json{hint}")
    if not (root / "instances.json").is_file():
        raise ShardInputError(f"{root}: no instances.json (COCO boxes of the referred objects)")
    refs = _load_json(root / "refs.json")
    inst = _load_json(root / "instances.json")
    if not isinstance(refs, list) or not isinstance(inst, dict):
        raise ShardInputError(f"{root}: refs.json must hold a list of refs and instances.json a COCO object "
                              "(images, annotations)")
    with _entry(root / "instances.json", "an image or annotation"):
        anns = {a["id"]: a for a in inst.get("annotations", [])}
        imgs = {i["id"]: i for i in inst.get("images", [])}
    images = _Images(root)
    records: List[Record] = []
    for n, ref in enumerate(refs):
        with _entry(root / "refs.json", f"ref {n}"):
            _refcoco_ref(records, ref, anns, imgs, images, root)
    if not records:
        raise ShardInputError(f"{root}/refs.json holds no referring expressions")
    return records, None


def _refcoco_ref(records: List[Record], ref: dict, anns: dict, imgs: dict, images: "_Images", root: Path) -> None:
    """One ref's expressions as records: its box in [0, 1] of its image, its own split kept."""
    ann, info = anns.get(ref.get("ann_id")), imgs.get(ref.get("image_id"))
    if ann is None or info is None:
        raise ShardInputError(f"refs.json: ref {ref.get('ref_id')} names annotation {ref.get('ann_id')} / image "
                              f"{ref.get('image_id')}, missing from instances.json")
    image = images.get(Path(info.get("file_name", "")).stem) or images.get(int(info["id"]))
    if image is None:
        raise ShardInputError(f"refs.json: image {info.get('file_name')} of ref {ref.get('ref_id')} not found "
                              f"under {root}")
    w, h = float(info["width"]), float(info["height"])
    x, y, bw, bh = (float(v) for v in ann["bbox"])
    box = [round(x / w, 5), round(y / h, 5), round(min(w, x + bw) / w, 5), round(min(h, y + bh) / h, 5)]
    own = str(ref.get("split", ""))
    split = {"testa": "test", "testb": "test"}.get(own.lower(), own)
    for sent in ref.get("sentences", []):
        _image_record(records, image, f"refcoco:{ref['image_id']}", str(sent["sent"]),
                      {"ref_id": ref.get("ref_id"), "ref_split": own, "box": box},
                      split if split in ("train", "val", "test") else None)


__all__ = ["video_folder_records", "vqa_records", "refcoco_records", "normalise_answer"]
