"""Several checkpoints of one backbone served from one frozen forward per batch: every checkpoint on every text,
or each text through the checkpoint it names, with the predictions each checkpoint gives alone."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_resume import _write_csv
from test_sweep import _CountForwards
from tiny_models import tiny_bert_dir
from unipt_scale.config import ConfigError, load_config
from unipt_scale.data import text_collate
from unipt_scale.export import load_trained
from unipt_scale.preprocessors import load_tokenizer
from unipt_scale.serving import MultiModel
from unipt_scale.trainer import train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TEXTS = ["good movie", "awful day was not fine", "the food", "happy happy night", "sad", "very bad food"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = tiny_bert_dir(str(root))
    data = _write_csv(root / "d.csv")
    common = [f"backbone.path={model}", "data.source=csv", f"data.path={data}", "data.batch_size=16",
              "train.max_steps=6", "unipt.mapping_dim=8", "train.tensorboard=false", "train.num_threads=1",
              "train.precision=fp32"]
    out = {}
    for name, extra in (("a", ["train.seed=0"]), ("b", ["train.seed=1", "unipt.layers=[1,3]"]),
                        ("probe", ["method=linear_probe"]), ("lora", ["method=lora"]),
                        ("long", ["data.max_length=32"])):
        train(load_config(None, [*common, *extra, f"output_dir={root / name}"]))
        out[name] = str(root / name / "checkpoint")
    return out


def _alone(path, texts):
    model, cfg, meta = load_trained(path)
    batch = text_collate(load_tokenizer(cfg.backbone), cfg.data.max_length)([{"text": t} for t in texts])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    return [(meta["label_names"][int(p.argmax())], float(p.max())) for p in probs]


def test_every_checkpoint_on_every_text_in_one_forward(ckpts, monkeypatch):
    mm = MultiModel.load([ckpts["a"], ckpts["b"], ckpts["probe"]])
    counter = _CountForwards(monkeypatch)
    got = mm.classify(TEXTS)
    assert counter.n == 1, "one frozen forward for three checkpoints"
    for name in ("a", "b", "probe"):
        alone = _alone(ckpts[name], TEXTS)
        assert [(g[name]["label"], g[name]["probability"]) for g in got] == alone, name


def test_rows_routed_to_their_own_checkpoint(ckpts, monkeypatch):
    mm = MultiModel.load({"sentiment": ckpts["a"], "other": ckpts["b"]})
    tasks = ["sentiment", "other", "other", "sentiment", "other", "sentiment"]
    counter = _CountForwards(monkeypatch)
    got = mm.classify(TEXTS, tasks)
    assert counter.n == 1
    assert all(list(g) == [t] for g, t in zip(got, tasks))
    for name, path in (("sentiment", ckpts["a"]), ("other", ckpts["b"])):
        alone = _alone(path, TEXTS)
        for g, t, ref in zip(got, tasks, alone):
            if t == name:  # the rows' states are the rows of the whole batch's forward (same padded length)
                assert g[name]["label"] == ref[0] and g[name]["probability"] == pytest.approx(ref[1], abs=1e-6)
    with pytest.raises(ValueError, match="one per text"):
        mm.classify(TEXTS, tasks[:2])
    with pytest.raises(ValueError, match="unknown checkpoint"):
        mm.classify(TEXTS[:1], ["nope"])


@pytest.mark.parametrize("other, words", [("lora", "cannot share a forward"), ("long", "tokenize differently")])
def test_checkpoints_that_cannot_share_are_refused(ckpts, other, words):
    with pytest.raises(ConfigError, match=words):
        MultiModel.load([ckpts["a"], ckpts[other]])


def test_cli_predict_with_several_checkpoints(ckpts):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "unipt_scale.cli", "predict", "--checkpoint", f"pos={ckpts['a']}",
                           "--checkpoint", ckpts["probe"], *TEXTS[:2]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == TEXTS[:2]
    assert all(set(r["predictions"]) == {"pos", "probe"} for r in rows)
    refused = subprocess.run([sys.executable, "-m", "unipt_scale.cli", "predict", "--checkpoint", ckpts["a"],
                              "--checkpoint", ckpts["lora"], "x"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=180)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1


def test_loading_for_use_leaves_the_callers_random_streams(ckpts):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_trained(ckpts["a"])
    MultiModel.load([ckpts["a"], ckpts["b"]])
    assert torch.equal(torch.rand(3), expected)
