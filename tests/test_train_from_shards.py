"""Training through the WebDataset pipeline: text shards for classification, image+text shards for retrieval."""
import gzip
import json
import os
import struct

import numpy as np
import pytest

from test_cli import write_csv
from tiny_models import tiny_bert_dir, tiny_vit_dir
from unipt_scale.cli import main


def write_idx(folder, n=240, size=28, seed=0):
    """Fashion-MNIST-format idx files: class 1 (trouser) is a vertical bar, class 2 (pullover) a horizontal one."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([1, 2], size=n).astype(np.uint8)
    imgs = (rng.random((n, size, size)) * 60).astype(np.uint8)
    for i, lab in enumerate(labels):
        if lab == 1:
            imgs[i, :, size // 2 - 3:size // 2 + 3] = 255
        else:
            imgs[i, size // 2 - 3:size // 2 + 3, :] = 255
    os.makedirs(folder, exist_ok=True)
    for prefix, sl in (("train", slice(0, n * 3 // 4)), ("t10k", slice(n * 3 // 4, n))):
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as fh:
            part = imgs[sl]
            fh.write(struct.pack(">BBBBIII", 0, 0, 8, 3, len(part), size, size) + part.tobytes())
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as fh:
            fh.write(struct.pack(">BBBBI", 0, 0, 8, 1, len(labels[sl])) + labels[sl].tobytes())
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("shards")


def test_text_classification_from_shards(root):
    csv_path = write_csv(root / "tweets.csv", n=400)
    out = str(root / "text_shards")
    assert main(["shards", "--source", "csv", "--input", csv_path, "--out", out, "--samples-per-shard", "50",
                 "--fractions", "0.8,0.1,0.1", "--text-key", "text", "--label-key", "label", "--quiet"]) == 0
    run = str(root / "text_run")
    assert main(["train", "--output-dir", run, f"backbone.path={tiny_bert_dir(str(root))}", "data.source=shards",
                 f"data.path={out}", "data.batch_size=16", "unipt.mapping_dim=16", "train.lr=1e-2", "train.epochs=6",
                 "task.dropout=0.0", "train.tensorboard=false"]) == 0
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert m["test"]["accuracy"] > 0.8
    n_train = json.load(open(os.path.join(out, "sizes.json")))["splits"]["train"]["samples"]
    assert m["steps"] == 6 * (n_train // 16), "an epoch is sized from the shard index"
    assert m["data"]["samples"] > 0 and m["data"]["skipped"] == 0


def test_image_text_retrieval_from_shards(root):
    idx = write_idx(str(root / "fmnist"))
    out = str(root / "fmnist_shards")
    assert main(["shards", "--source", "fashion-mnist", "--input", idx, "--out", out, "--samples-per-shard", "64",
                 "--fractions", "0.7,0.15,0.15", "--quiet"]) == 0
    run = str(root / "retrieval_run")
    vit = tiny_vit_dir(str(root), image_size=16, channels=3)
    assert main(["train", "--output-dir", run, f"backbone.path={tiny_bert_dir(str(root))}",
                 f"image_backbone.path={vit}", "task.kind=retrieval", "task.embed_dim=16", "data.source=shards",
                 f"data.path={out}", "data.image_size=16", "data.batch_size=16", "data.eval_batch_size=64",
                 "unipt.mapping_dim=16", "train.lr=5e-3", "train.epochs=3", "train.log_every=1",
                 "train.tensorboard=false"]) == 0
    m = json.load(open(os.path.join(run, "metrics.json")))
    test = m["test"]
    assert {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"} <= set(test)
    # Two caption classes: a hit is an item of the same class. Chance for i2t R@1 is ~0.5.
    assert test["i2t_r1"] > 0.8, test
    assert m["train_loss"][-1][1] < m["train_loss"][0][1]
    assert m["data"]["converted_L"] > 0  # grey images were converted to RGB and counted
    assert main(["eval", "--checkpoint", os.path.join(run, "checkpoint"), "--json", str(root / "ev.json")]) == 0
    ev = json.load(open(root / "ev.json"))["test"]
    assert ev["i2t_r1"] == pytest.approx(test["i2t_r1"])
