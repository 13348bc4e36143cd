"""Seeded offline benchmarks for the task kinds no dataset here can exercise: records for `unipt shards`.

- moving-fashion (video-text retrieval): clips of `frames` frames in which 2 or 3 Fashion-MNIST items (real
  images, distinct classes) appear one after another, each drifting across the canvas while it is shown; the
  caption names them in order ("a sneaker, then a bag"). Every clip comes with its twin: the same frames played
  backwards, under the reversed caption, in the same split (they share a key). The items come from a few
  classes (`classes`, default 4: trouser, bag, sneaker, dress), so a batch holds many clips of the same items in
  other orders: the captions can only be told apart by the order, and a video embedding that ignores frame order
  (mean pooling) gives both twins the same score for either caption.
- sort-of-clevr (visual question answering; Santoro et al. 2017): scenes of six objects, one per colour, each a
  circle or a square, on a grey canvas; per scene, non-relational questions (shape of X; is X on the left or the
  right; top or bottom) and relational ones (shape of the object closest to / furthest from X; how many objects
  share X's shape). Answers: circle, square, left, right, top, bottom, 1..6.
- sort-of-clevr-refs (visual grounding): the same scenes with referring expressions ("the red circle", "the
  object closest to the blue square") and the box of the object they name, [x0, y0, x1, y1] in [0, 1].

Every record is a pure function of (seed, its index), so a shard set is reproduced bit for bit from its seed.
Images are rendered when the shard is written, not held by the records.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from unipt_scale.data.sources import (FASHION_MNIST_CLASSES, Record, ShardInputError, _find_idx, _read_idx,
                                      _article)

GENERATOR_VERSION = 2  # bump when a generator's output for the same arguments changes (cached shards are keyed by it)
# moving-fashion's classes, most distinct-looking first: `classes` N takes the first N.
MOVING_FASHION_CLASSES = ("trouser", "bag", "sneaker", "dress", "pullover", "sandal", "ankle boot", "shirt", "coat",
                          "t-shirt/top")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "orange": (240, 140, 20),
           "gray": (128, 128, 128), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square")
BACKGROUND = (200, 200, 200)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ moving-fashion


class _FashionItems:
    """Fashion-MNIST images by class, read from the idx files (both official parts)."""

    def __init__(self, root: Path):
        root = Path(root)
        self.pixels: List[bytes] = []
        self.by_class: List[List[Tuple[int, int]]] = [[] for _ in FASHION_MNIST_CLASSES]
        for part in ("train", "t10k"):
            img_p, lab_p = _find_idx(root, part, "images"), _find_idx(root, part, "labels")
            if img_p is None or lab_p is None:
                continue
            (n, self.h, self.w), pixels = _read_idx(img_p)
            _, labels = _read_idx(lab_p)
            for i in range(n):
                self.by_class[labels[i]].append((len(self.pixels), i))
            self.pixels.append(pixels)
        if not self.pixels:
            raise ShardInputError(f"{root}: no Fashion-MNIST train-/t10k- idx files for --source moving-fashion")

    def image(self, ref: Tuple[int, int]):
        from PIL import Image

        part, i = ref
        n = self.h * self.w
        return Image.frombytes("L", (self.w, self.h), self.pixels[part][i * n:(i + 1) * n])


class _Clip:
    """Renders one clip's frames on demand (the shard writer calls it when it writes the sample). The twin
    (`reverse`) is the same frames played backwards: the same set of frames, the items in the reverse order."""

    def __init__(self, items: _FashionItems, refs, frames: int, size: int, paths, reverse: bool):
        self.items, self.refs, self.frames, self.size, self.paths = items, refs, frames, size, paths
        self.reverse = reverse

    def __call__(self, _arg=None) -> dict:
        from PIL import Image

        side = self.size // 2
        k, out = len(self.refs), {}
        shown = [min(t * k // self.frames, k - 1) for t in range(self.frames)]  # the item in frame t
        for t in range(self.frames):
            src = self.frames - 1 - t if self.reverse else t
            j = shown[src]
            first, span = shown.index(j), max(1, shown.count(j) - 1)
            (x0, y0), (x1, y1) = self.paths[j]
            u = (src - first) / span
            x, y = round(x0 + u * (x1 - x0)), round(y0 + u * (y1 - y0))
            canvas = Image.new("L", (self.size, self.size), 0)
            canvas.paste(self.items.image(self.refs[j]).resize((side, side), Image.BILINEAR), (x, y))
            out[f"f{t:03d}.png"] = _png(canvas)
        return out


def moving_fashion_records(root: Path, samples: int, seed: int, frames: int = 8, size: int = 64,
                           classes: int = 4) -> Tuple[List[Record], List[str]]:
    """`samples` clips (rounded up to whole twins) of items from `classes` classes. Label = the caption's index
    among the captions that occur."""
    if frames < 3:
        raise ShardInputError("--frames must be >= 3 for moving-fashion (three items need a frame each)")
    if size < 16:
        raise ShardInputError("--image-size must be >= 16 for moving-fashion")
    if not 2 <= classes <= len(FASHION_MNIST_CLASSES):
        raise ShardInputError(f"--classes must be 2..{len(FASHION_MNIST_CLASSES)} for moving-fashion")
    items = _FashionItems(root)
    wanted = [FASHION_MNIST_CLASSES.index(n) for n in MOVING_FASHION_CLASSES]
    present = [c for c in wanted if items.by_class[c]][:classes]
    if len(present) < 2:
        raise ShardInputError(f"{root}: moving-fashion needs images of at least 2 classes")
    side = size // 2
    records: List[Record] = []
    for p in range(max(1, math.ceil(samples / 2))):
        rng = random.Random(f"moving-fashion:{seed}:{p}")
        k = min(rng.choice((2, 3)), len(present))
        classes = rng.sample(present, k)
        refs = [rng.choice(items.by_class[c]) for c in classes]
        paths = [tuple((rng.randrange(0, size - side + 1), rng.randrange(0, size - side + 1)) for _ in range(2))
                 for _ in range(k)]
        for order in (0, 1):
            names = [FASHION_MNIST_CLASSES[c] for c in (classes if order == 0 else classes[::-1])]
            caption = ", then ".join(f"{_article(n)} {n}" for n in names)
            rec = Record(index=len(records), key=f"moving-fashion:{seed}:{p}", text=caption, label_name=caption,
                         meta={"pair": p, "order": order, "items": names, "frames": frames})
            rec.meta["_members"] = (_Clip(items, refs, frames, size, paths, reverse=order == 1), None)
            records.append(rec)
    names = sorted({r.label_name for r in records})
    ids = {n: i for i, n in enumerate(names)}
    for r in records:
        r.label = ids[r.label_name]
    return records, names


# ------------------------------------------------------------------------------------------------ sort-of-clevr


def scene(seed: int, index: int, size: int) -> List[dict]:
    """Six objects, one per colour: shape, centre (x, y) and half-size in pixels, placed without overlap."""
    rng = random.Random(f"sort-of-clevr:{seed}:{index}")
    half = max(2, size // 14)
    objs: List[dict] = []
    for colour in COLOURS:
        for _ in range(1000):
            x, y = rng.uniform(half, size - half), rng.uniform(half, size - half)
            if all(math.hypot(x - o["x"], y - o["y"]) > 2.2 * half for o in objs):
                break
        objs.append({"colour": colour, "shape": rng.choice(SHAPES), "x": x, "y": y, "half": half})
    return objs


class _Scene:
    def __init__(self, objs: List[dict], size: int):
        self.objs, self.size = objs, size

    def __call__(self, _arg=None) -> bytes:
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (self.size, self.size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for o in self.objs:
            box = [o["x"] - o["half"], o["y"] - o["half"], o["x"] + o["half"], o["y"] + o["half"]]
            (draw.ellipse if o["shape"] == "circle" else draw.rectangle)(box, fill=COLOURS[o["colour"]])
        return _png(img)


def _named(o: dict) -> str:
    return f"the {o['colour']} {o['shape']}"


def _others(objs, o):
    return [p for p in objs if p is not o]


def _dist(a, b) -> float:
    return math.hypot(a["x"] - b["x"], a["y"] - b["y"])


def _question(objs: List[dict], o: dict, kind: int, size: int) -> Tuple[str, str, int]:
    """(question, answer, relational 0/1) of question type `kind` about object `o`."""
    if kind == 0:
        return f"what is the shape of the {o['colour']} object?", o["shape"], 0
    if kind == 1:
        return f"is the {o['colour']} object on the left or the right?", "left" if o["x"] < size / 2 else "right", 0
    if kind == 2:
        return f"is the {o['colour']} object at the top or the bottom?", "top" if o["y"] < size / 2 else "bottom", 0
    if kind == 3:
        near = min(_others(objs, o), key=lambda p: _dist(o, p))
        return f"what is the shape of the object closest to the {o['colour']} object?", near["shape"], 1
    if kind == 4:
        far = max(_others(objs, o), key=lambda p: _dist(o, p))
        return f"what is the shape of the object furthest from the {o['colour']} object?", far["shape"], 1
    same = sum(1 for p in objs if p["shape"] == o["shape"])
    return f"how many objects have the same shape as the {o['colour']} object?", str(same), 1


def sort_of_clevr_records(samples: int, seed: int, size: int = 64, per_scene: int = 6,
                          referring: bool = False) -> Tuple[List[Record], Optional[List[str]]]:
    """`samples` questions (or referring expressions), `per_scene` per scene; a scene's records share its key,
    so a scene lies in one split."""
    if size < 24:
        raise ShardInputError("--image-size must be >= 24 for sort-of-clevr")
    records: List[Record] = []
    scenes = max(1, math.ceil(samples / per_scene))
    for s in range(scenes):
        objs = scene(seed, s, size)
        draw = _Scene(objs, size)
        rng = random.Random(f"sort-of-clevr-q:{seed}:{s}:{referring}")
        for q in range(per_scene):
            if len(records) >= samples:
                break
            o = rng.choice(objs)
            key = f"sort-of-clevr:{seed}:{s}"
            if referring:
                kind = rng.randrange(3)
                if kind == 0:
                    target, text = o, _named(o)
                elif kind == 1:
                    target = min(_others(objs, o), key=lambda p: _dist(o, p))
                    text = f"the object closest to {_named(o)}"
                else:
                    target = max(_others(objs, o), key=lambda p: _dist(o, p))
                    text = f"the object furthest from {_named(o)}"
                h = target["half"]
                box = [round(max(0.0, (target["x"] - h) / size), 5), round(max(0.0, (target["y"] - h) / size), 5),
                       round(min(1.0, (target["x"] + h) / size), 5), round(min(1.0, (target["y"] + h) / size), 5)]
                meta = {"scene": s, "box": box, "relational": int(kind > 0)}
            else:
                text, answer, relational = _question(objs, o, rng.randrange(6), size)
                meta = {"scene": s, "answers": [answer], "relational": relational}
            rec = Record(index=len(records), key=key, text=text, image_ext="png", meta=meta)
            rec.meta["_encode"] = (draw, None)
            records.append(rec)
    return records, None


def answer_vocabulary(answers: Sequence[Sequence[str]], min_count: int = 1) -> List[str]:
    """The answer classes: every answer given at least `min_count` times in the training split, most frequent
    first (ties by name). VQAv2 models keep the answers given at least 9 times (`--min-answer-count 9`)."""
    counts: dict = {}
    for given in answers:
        for a in given:
            counts[a] = counts.get(a, 0) + 1
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))
