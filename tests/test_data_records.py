"""One data path for records: one table reader and label rule, one split rule, one set of constants, the writer
as a Python API, padding by the tokenizer itself, and a caller's image transform."""
import copy
import csv
import gzip
import json
import random
import struct
import tarfile

import pytest
import torch

from unipt_scale.config import DataConfig
from unipt_scale.data import build_data, num_classes_of, shards, sources, stream
from unipt_scale.data.pipeline import cached_shards

WORDS = "a b c d e caption sentence number photo of good bad day".split()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def write_table(path, labels):
    rng = random.Random(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(300):
            text = " ".join(rng.choices(WORDS, k=rng.randint(1, 7)))
            w.writerow([text, labels[i % len(labels)]])  # repeated texts occur: they must stay in one split
    return path


def tar_split(out, split):
    index = json.loads((out / "sizes.json").read_text())
    rows = []
    for name in index["splits"][split]["shards"]:
        with tarfile.open(out / name) as tf:
            got = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                got.setdefault(key, {})[ext] = tf.extractfile(m).read()
        rows += [(s["txt"].decode(), int(s["cls"])) for s in got.values()]
    return sorted(rows)


@pytest.mark.parametrize("labels, names", [(["pos", "neg", "meh"], ["meh", "neg", "pos"]),
                                           (["2", "0", "1", "0"], ["0", "1", "2"])], ids=["names", "integers"])
def test_csv_in_memory_and_csv_shards_give_the_same_splits(tmp_path, tokenizer, labels, names):
    path = write_table(tmp_path / "t.csv", labels)
    cfg = DataConfig(source="csv", path=str(path))  # default split fractions and seed
    data = build_data(cfg, tokenizer)
    out = tmp_path / "shards"
    assert shards.main(["--source", "csv", "--input", str(path), "--out", str(out), "--quiet"]) == 0  # defaults
    index = json.loads((out / "sizes.json").read_text())
    assert index["classes"] == data.label_names == names
    for split, loader in (("test", data.test), ("val", data.val), ("train", data.train)):
        in_memory = sorted((r["text"], r["label"]) for r in loader.dataset.records)
        assert in_memory == tar_split(out, split), split
    texts = {}
    for split in ("train", "val", "test"):
        for t, _ in tar_split(out, split):
            texts.setdefault(t, set()).add(split)
    assert all(len(s) == 1 for s in texts.values())  # a repeated text never straddles two splits
    assert num_classes_of(cfg) == num_classes_of(DataConfig(source="shards", path=str(out))) == len(set(labels))


def test_constants_agree():
    assert tuple(shards.IMAGE_EXTS) == tuple(stream.IMAGE_EXTS) == tuple(sources.IMAGE_EXTS)
    assert "jpeg" in sources.IMAGE_EXTS
    assert list(sources.default_fractions()) == DataConfig().split
    assert shards.build_parser().get_default("fractions") == ",".join(f"{f:g}" for f in DataConfig().split)
    assert shards.INDEX_NAME == stream.INDEX_NAME == "sizes.json"


def test_label_rule():
    assert sources.label_map(["b", "a", "", "b"]) == ([1, 0, None, 1], ["a", "b"])
    assert sources.label_map(["3", " 1", None]) == ([3, 1, None], ["0", "1", "2", "3"])
    assert sources.label_map(["1", "x"]) == ([0, 1], ["1", "x"])  # not all integers: names
    with pytest.raises(ValueError, match="negative"):
        sources.label_map(["-1", "2"], "f.csv")


def write_idx(folder, n=60, size=6):
    folder.mkdir()
    labels = bytes(i % 10 for i in range(n))
    pix = bytes((i * 13) % 256 for i in range(n * size * size))
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, size, size) + pix)
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels)
    return folder


def test_cached_shards_go_through_the_api_and_the_split_rule(tmp_path, monkeypatch):
    def no_argv(*a, **k):
        raise AssertionError("the trainer must not build an argv for the CLI parser")

    monkeypatch.setattr(shards, "build_parser", no_argv)
    idx = write_idx(tmp_path / "fm")
    cfg = DataConfig(source="fashion_mnist", path=str(idx), cache_dir=str(tmp_path / "cache"), seed=4)
    out = cached_shards(cfg)
    index = json.loads(open(f"{out}/sizes.json").read())
    for split, info in index["splits"].items():
        for name in info["shards"]:
            with tarfile.open(f"{out}/{name}") as tf:
                for m in tf.getmembers():
                    if m.name.endswith(".json"):
                        meta = json.loads(tf.extractfile(m).read())
                        key = f"fashion-mnist:{meta['part']}:{meta['offset']}"
                        assert sources.split_of(key, cfg.split, 4) == split
    assert cached_shards(cfg) == out and index == json.loads(open(f"{out}/sizes.json").read())  # reused


def test_padding_is_the_tokenizers_own(tokenizer):
    texts = ["a b c d e", "a", "b c"]
    got = stream.tokenize_batch(tokenizer, texts, max_length=4)
    ref = tokenizer(texts, padding=True, truncation=True, max_length=4, return_tensors="pt")
    assert set(got) == {"input_ids", "attention_mask"}
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["attention_mask"], ref["attention_mask"])
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    enc = stream.tokenize_batch(left, ["a b c", "a"], max_length=None)
    assert enc["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert enc["input_ids"][1].tolist() == [0, 0, tokenizer.convert_tokens_to_ids("a")]


def test_tokenizer_without_pad_token_is_not_changed(tokenizer, tmp_path):
    nopad = copy.deepcopy(tokenizer)
    nopad.pad_token = None
    enc = stream.tokenize_batch(nopad, ["a b", "a"], max_length=None)
    assert enc["input_ids"][1, 1].item() == nopad.eos_token_id and enc["attention_mask"][1].tolist() == [1, 0]
    path = write_table(tmp_path / "t.csv", ["x", "y"])
    data = build_data(DataConfig(source="csv", path=str(path), batch_size=8), nopad)
    batch = next(iter(data.train))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == nopad.eos_token_id).all()
    assert nopad.pad_token is None and nopad.pad_token_id is None  # the caller's tokenizer is untouched
    nothing = copy.deepcopy(nopad)
    nothing.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        stream.tokenize_batch(nothing, ["a"], None)


def test_build_data_takes_an_image_transform(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        Image.new("RGB", (5, 3), (i * 30, 0, 0)).save(src / f"x{i}.png")
    (src / "d.csv").write_text("image,label\n" + "".join(f"x{i}.png,{i % 2}\n" for i in range(8)))
    out = tmp_path / "o"
    shards.write_shards(shards.ShardSpec(source="csv", out=out, input=src / "d.csv", fractions=[1.0]))

    def red_mean(img):  # PIL image -> float tensor (C, H, W)
        import numpy as np

        return torch.full((1, 2, 2), float(np.asarray(img, dtype=np.float32)[..., 0].mean()))

    cfg = DataConfig(source="shards", path=str(out), batch_size=4)
    data = build_data(cfg, None, needs_image=True, image_transform=red_mean)
    pixels = torch.cat([b["pixel_values"] for b in data.train])
    assert pixels.shape == (8, 1, 2, 2)
    assert sorted(pixels[:, 0, 0, 0].tolist()) == [i * 30.0 for i in range(8)]
    default = build_data(cfg, None, needs_image=True)
    assert next(iter(default.train))["pixel_values"].shape == (4, 3, cfg.image_size, cfg.image_size)
