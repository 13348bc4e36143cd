"""CLI smoke runs on a tiny random-init BERT and a small CSV: train → eval → predict, info, config errors."""
import csv
import json
import os
import random

import pytest

from tiny_models import tiny_bert_dir
from unipt_scale.cli import main

POS, NEG = ["good", "great", "happy", "love", "fine"], ["bad", "awful", "sad", "hate", "not"]
FILL = ["the", "movie", "food", "was", "very", "day", "night", "a", "is"]


def write_csv(path, n=240, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for _ in range(n):
            lab = rng.choice(["pos", "neg"])
            words = rng.sample(FILL, 4) + [rng.choice(POS if lab == "pos" else NEG)]
            rng.shuffle(words)
            w.writerow([" ".join(words), lab])
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"model": tiny_bert_dir(str(root)), "csv": write_csv(root / "data.csv", n=400), "root": root}


def _base(s):
    return [f"backbone.path={s['model']}", "data.source=csv", f"data.path={s['csv']}", "data.batch_size=16",
            "unipt.mapping_dim=16", "train.lr=1e-2", "train.epochs=6", "train.log_every=2", "task.dropout=0.0"]


def test_train_eval_predict(setup, capsys):
    out = str(setup["root"] / "run")
    assert main(["train", "--output-dir", out] + _base(setup)) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["config"]["output_dir"] == out
    assert m["train_loss"] and all(len(x) == 2 for x in m["train_loss"])
    assert m["train_loss"][-1][1] < m["train_loss"][0][1], "the loss goes down"
    assert m["trainable_params"] > 0 and m["frozen_params"] > m["trainable_params"]
    assert m["test"]["accuracy"] > 0.8, m["test"]  # the keyword task is easy even on a random backbone
    assert m["wall_time_s"] > 0 and os.path.isdir(os.path.join(out, "tb"))
    assert "test accuracy" in capsys.readouterr().out

    ck = os.path.join(out, "checkpoint")
    jpath = str(setup["root"] / "eval.json")
    assert main(["eval", "--checkpoint", ck, "--json", jpath]) == 0
    ev = json.load(open(jpath))["test"]
    assert ev["accuracy"] == pytest.approx(m["test"]["accuracy"])
    assert ev["num_samples"] == m["test"]["num_samples"]

    capsys.readouterr()
    assert main(["predict", "--checkpoint", ck, "the movie was great", "the food was awful"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [x["label"] for x in lines] == ["pos", "neg"]


def test_info_counts(setup, capsys):
    assert main(["info"] + _base(setup)) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_params"] == info["side_network_params"] + info["head_params"]
    assert info["tapped_layers"] == [[0, 1, 2, 3]] and info["mapping_dim"] == [16]
    # The same numbers, independently: 4 taps of Linear(32→16)+LN(16), projection 16→16+LN, gate, up 16→32.
    side = 4 * (32 * 16 + 16 + 32) + (16 * 16 + 16 + 32) + (16 + 1) + (16 * 32 + 32)
    assert info["side_network_params"] == side
    assert info["head_params"] == 32 * 2 + 2


def test_config_errors_exit_2(setup, capsys):
    assert main(["train", "train.nope=1"]) == 2
    assert "valid keys" in capsys.readouterr().err
    assert main(["train", "backbone.path=/no/such/model"] + _base(setup)[1:]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["train", "--print-config", "train.lr=0.01"]) == 0
    assert "lr: 0.01" in capsys.readouterr().out


def test_info_counts_other_methods(setup, capsys):
    assert main(["info", "method=lora"] + _base(setup)) == 0
    info = json.loads(capsys.readouterr().out)
    # r=8 adapters on query and value of 3 layers: (8 x 32 + 32 x 8) x 2 x 3; the head is 32 x 2 + 2.
    assert info["method"] == "lora" and info["backbone_trained_params"] == 3072 and info["head_params"] == 66
    assert info["side_network_params"] == 0 and "tapped_layers" not in info
    assert main(["info", "method=linear_probe"] + _base(setup)) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_params"] == info["head_params"] == 66
