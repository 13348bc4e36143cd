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


def test_epochs_run_counts_an_epoch_that_ended_with_the_step_budget(setup):
    one_epoch = str(setup["root"] / "epoch")
    assert main(["train", "--output-dir", one_epoch] + _base(setup) + ["train.epochs=1"]) == 0
    m = json.load(open(os.path.join(one_epoch, "metrics.json")))
    steps = m["steps"]
    assert steps > 2 and m["epochs_run"] == 1
    for max_steps, epochs in ((steps, 1), (steps - 1, 0), (steps + 1, 1)):
        out = str(setup["root"] / f"steps{max_steps}")
        assert main(["train", "--output-dir", out] + _base(setup) + [f"train.max_steps={max_steps}"]) == 0
        m = json.load(open(os.path.join(out, "metrics.json")))
        assert (m["steps"], m["epochs_run"]) == (max_steps, epochs)
        assert 0 < m["train_time_s"] <= m["wall_time_s"]
        assert m["train_samples_per_second"] == pytest.approx(m["samples_seen"] / m["train_time_s"])


def test_every_output_file_gets_the_mode_the_umask_gives(setup):
    out = str(setup["root"] / "modes")
    previous = os.umask(0o027)
    try:
        assert main(["train", "--output-dir", out] + _base(setup) + ["train.epochs=1", "train.checkpoint_every=2",
                                                                     "train.keep_checkpoints=1"]) == 0
    finally:
        os.umask(previous)
    seen = {}
    for directory, dirs, files in os.walk(out):
        for name in dirs:
            seen[os.path.join(directory, name)] = (os.stat(os.path.join(directory, name)).st_mode & 0o777, 0o750)
        for name in files:
            seen[os.path.join(directory, name)] = (os.stat(os.path.join(directory, name)).st_mode & 0o777, 0o640)
    names = {os.path.relpath(p, out) for p in seen}
    assert {"metrics.json", "checkpoint", os.path.join("checkpoint", "trained.safetensors"),
            os.path.join("checkpoint", "config.yaml"), "checkpoints"} <= names, sorted(names)
    wrong = {os.path.relpath(p, out): oct(mode) for p, (mode, want) in seen.items() if mode != want}
    assert not wrong, wrong


def test_a_closed_pipe_ends_the_output_quietly():
    """`unipt train --help-config | head`: the reader goes away; no traceback, the shell's SIGPIPE status."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the command writes anything: the broken pipe happens every time
    try:
        proc = subprocess.run([sys.executable, "-m", "unipt_scale.cli", "train", "--help-config"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr[-2000:]


def test_help_config_shows_the_optional_image_tower_without_a_text_model_default(capsys):
    assert main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "image_backbone.path = (required)" in text
    assert "image_backbone.path = 'builtin:" not in text
    assert "backbone.path = 'builtin:all-MiniLM-L6-v2'" in text  # the text tower keeps its default
    # Setting another key of the image tower without its path is refused in one line.
    assert main(["train", "task.kind=retrieval", "image_backbone.dtype=bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image_backbone.path" in err[0]
